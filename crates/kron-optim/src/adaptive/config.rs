//! The configuration the Kronecker-factored adaptive methods share, with each method's defaults.

use serde::{Deserialize, Serialize};

use super::shape::BlockingConfig;
use crate::backend::{IterationConfig, Precision, Ridge};
use crate::curvature::{FailurePolicy, Graft, Momentum, RefreshConfig, WeightDecay};
use crate::error::OptimError;
use crate::schedule::Schedule;

/// How the roots of the statistics are computed at a refresh.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum RootMethod {
    /// A symmetric eigendecomposition ([`Backend::sym_power`](crate::Backend::sym_power)) in
    /// `precision`; with `retry_f64`, a failed or non-finite `f32` root is computed again in
    /// `f64` before the failure policy sees it (Meta's `retry_double_precision`). On a backend
    /// that delegates eigendecompositions (wgpu), the decomposition runs on the host CPU.
    Eigh {
        /// The element type of the decomposition.
        precision: Precision,
        /// Retry a failed `f32` root in `f64`.
        retry_f64: bool,
    },
    /// The coupled Newton iteration ([`coupled_newton`](crate::backend::coupled_newton)) in
    /// the backend's element type, its result judged by its residual: the way a GPU computes
    /// roots without leaving the device, and runnable on the CPU. Needs a root exponent `1/p`
    /// with `p` a whole number.
    CoupledNewton(IterationConfig),
}

impl RootMethod {
    /// `f64` eigendecomposition (kron's default on the CPU).
    pub const EIGH_F64: RootMethod = RootMethod::Eigh {
        precision: Precision::F64,
        retry_f64: false,
    };
    /// `f32` eigendecomposition with an `f64` retry on failure (Meta's default).
    pub const EIGH_F32: RootMethod = RootMethod::Eigh {
        precision: Precision::F32,
        retry_f64: true,
    };
    /// `f32` eigendecomposition with no retry (the reference implementations' plain `f32`).
    pub const EIGH_F32_PLAIN: RootMethod = RootMethod::Eigh {
        precision: Precision::F32,
        retry_f64: false,
    };

    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            RootMethod::Eigh {
                precision: Precision::F64,
                ..
            } => "eigh f64",
            RootMethod::Eigh {
                retry_f64: true, ..
            } => "eigh f32 (f64 retry)",
            RootMethod::Eigh { .. } => "eigh f32",
            RootMethod::CoupledNewton(_) => "coupled Newton",
        }
    }
}

/// The configuration of [`Shampoo`](super::Shampoo), [`KrAdagradStar`](super::KrAdagradStar)
/// and [`KrAdagrad`](super::KrAdagrad). Each method has its own defaults
/// ([`AdaptiveConfig::shampoo`], [`AdaptiveConfig::kradagrad_star`],
/// [`AdaptiveConfig::kradagrad`]); the fields mean the same in all three except `epsilon`,
/// which each method's docs define.
///
/// Steps count from 1 here, as in the reference implementations: at step `t` the statistics
/// update when `t` is a multiple of `statistics_period`, the roots when it is a multiple of
/// `refresh.period`, and the preconditioned direction is used from `t = start_step` on (before
/// it, and for any block without a usable root, the grafted rule alone).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveConfig {
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Momentum on the (grafted) direction.
    pub momentum: Momentum,
    /// Weight decay.
    pub weight_decay: WeightDecay,
    /// Decay of the statistics: 1 is the AdaGrad sum; below 1, Shampoo keeps the running
    /// average `β2 L + (1 - β2) G G^T` and KrADagrad divides its inverse statistic by `β2`.
    pub beta2: f32,
    /// Shampoo: divide the running average by `1 - β2^n` before the root (Adam's bias
    /// correction; no effect at `β2 = 1`). Ignored by KrADagrad.
    pub bias_correction: bool,
    /// The method's epsilon: Shampoo's ridge on the statistics' eigenvalues (absolute, or
    /// relative to the largest); KrADagrad*'s inverse statistic starts at `I / epsilon`;
    /// KrADagrad's damping step `P <- P - epsilon P P`. KrADagrad takes it absolute only.
    pub epsilon: Ridge,
    /// The root's exponent per factor, overriding the method's own (Shampoo `-1/(2k)` for an
    /// order-`k` block, KrADagrad* `1/(2k)`, KrADagrad `1/2`): Shampoo uses `M^-e`,
    /// KrADagrad(*) `P^e`. `Some(0.5)` is Shampoo's `-1/2` per factor.
    pub exponent: Option<f64>,
    /// Steps between statistics updates.
    pub statistics_period: u64,
    /// Steps between root refreshes, the statistics' element type (the backend's precision)
    /// and the failure policy (its boost multiplies the epsilon of the retry).
    pub refresh: RefreshConfig,
    /// The first step that uses the preconditioned direction.
    pub start_step: u64,
    /// The grafted method whose per-block step norm the direction takes (`None`: the direction
    /// as it is; blocks without a usable root and 1-D parameters then take plain SGD).
    pub graft: Option<Graft>,
    /// Shape handling and blocking.
    pub blocking: BlockingConfig,
    /// How roots are computed.
    pub roots: RootMethod,
}

impl AdaptiveConfig {
    /// Shampoo's defaults: the configuration of Meta's Distributed Shampoo that won the 2024
    /// AlgoPerf training-algorithms competition (external tuning), with one change.
    ///
    /// | field | value | source |
    /// |---|---|---|
    /// | `schedule` | constant 0.01 | Meta's `lr` default |
    /// | `momentum` | 0.9, Nesterov | Meta `betas.0`, optax `nesterov` |
    /// | `beta2` | 0.999, bias-corrected | AlgoPerf submission |
    /// | `epsilon` | 1e-12 absolute | Meta's `epsilon` |
    /// | `refresh.period` | 100 | AlgoPerf `precondition_frequency` |
    /// | `start_step` | 100 | Meta: equal to the refresh period |
    /// | `graft` | Adam (β1 0, β2 0.999, ε 1e-8), per block | AlgoPerf grafting |
    /// | `blocking.max_dim` | 1024 | AlgoPerf `max_preconditioner_dim` |
    /// | statistics | `f32` | Meta `factor_matrix_dtype` |
    /// | `roots` | **`f64` eigendecomposition** | kron's choice; Meta: `f32` with `f64` retry |
    ///
    /// kron's one change is the roots' precision: on the CPU an `f64` eigendecomposition costs
    /// 1.25x an `f32` one at `d = 512` and 1.7x at `d = 1000` (54 against 43 ms and 278 against
    /// 167 ms, faer on an Intel Xeon, `adaptive_table`) and keeps the small eigenvalues that an
    /// inverse root weights most (the book's ill-conditioned experiment measures the difference);
    /// [`RootMethod::EIGH_F32`] restores Meta's choice. The graft is the second moment only, as
    /// Meta grafts it (momentum is applied once, to the grafted direction).
    pub const fn shampoo() -> Self {
        AdaptiveConfig {
            schedule: Schedule::constant(0.01),
            momentum: Momentum::nesterov(0.9),
            weight_decay: WeightDecay::NONE,
            beta2: 0.999,
            bias_correction: true,
            epsilon: Ridge::Absolute(1e-12),
            exponent: None,
            statistics_period: 1,
            refresh: RefreshConfig::DEFAULT
                .with_period(100)
                .with_failure(FailurePolicy::DEFAULT.with_max_failures(3)),
            start_step: 100,
            graft: Some(Graft::Adam {
                beta1: 0.0,
                beta2: 0.999,
                eps: 1e-8,
            }),
            blocking: BlockingConfig::DEFAULT,
            roots: RootMethod::EIGH_F64,
        }
    }

    /// KrADagrad*'s defaults, the authors' (`ShampooHyperParams` of jonathanmei/kradagrad at
    /// 9852c42, as `KradagradPP` runs them): lr 1e-3 (the docstring's), momentum 0.9 Nesterov,
    /// `β2 = 1`, statistics and roots every step from step 1, SGD-norm grafting (their
    /// `Shampoo.step` rescales the direction to the gradient's norm), block size 128, `f32`
    /// throughout, and `epsilon` 1e-12 (the inverse statistic starts at `1e12 I`; their
    /// experiments tune it, 1e-8 on the synthetic problem, 3e-4 to 3e-2 on autoencoders).
    pub const fn kradagrad_star() -> Self {
        AdaptiveConfig {
            schedule: Schedule::constant(1e-3),
            momentum: Momentum::nesterov(0.9),
            weight_decay: WeightDecay::NONE,
            beta2: 1.0,
            bias_correction: false,
            epsilon: Ridge::Absolute(1e-12),
            exponent: None,
            statistics_period: 1,
            refresh: RefreshConfig::DEFAULT
                .with_period(1)
                .with_failure(FailurePolicy::DEFAULT.with_max_failures(3)),
            start_step: 1,
            graft: Some(Graft::Sgd),
            blocking: BlockingConfig::DEFAULT.with_max_dim(128),
            roots: RootMethod::EIGH_F32_PLAIN,
        }
    }

    /// KrADagrad's defaults, the authors' (`KradagradMM`): as
    /// [`AdaptiveConfig::kradagrad_star`] but with no grafting (their step has none) and
    /// `epsilon` the damping step's coefficient (1e-12).
    pub const fn kradagrad() -> Self {
        Self::kradagrad_star().with_graft(None)
    }

    /// With a constant learning rate.
    pub const fn with_lr(mut self, lr: f32) -> Self {
        self.schedule = Schedule::constant(lr);
        self
    }

    /// With a learning-rate schedule.
    pub const fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// With momentum.
    pub const fn with_momentum(mut self, momentum: Momentum) -> Self {
        self.momentum = momentum;
        self
    }

    /// With weight decay.
    pub const fn with_weight_decay(mut self, weight_decay: WeightDecay) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// With a statistics decay.
    pub const fn with_beta2(mut self, beta2: f32) -> Self {
        self.beta2 = beta2;
        self
    }

    /// With or without bias correction.
    pub const fn with_bias_correction(mut self, on: bool) -> Self {
        self.bias_correction = on;
        self
    }

    /// With an epsilon.
    pub const fn with_epsilon(mut self, epsilon: Ridge) -> Self {
        self.epsilon = epsilon;
        self
    }

    /// With a root exponent per factor.
    pub const fn with_exponent(mut self, exponent: Option<f64>) -> Self {
        self.exponent = exponent;
        self
    }

    /// With a statistics period.
    pub const fn with_statistics_period(mut self, period: u64) -> Self {
        self.statistics_period = period;
        self
    }

    /// With a root refresh period.
    pub const fn with_refresh_period(mut self, period: u64) -> Self {
        self.refresh.period = period;
        self
    }

    /// With the statistics' element type.
    pub const fn with_precision(mut self, precision: Precision) -> Self {
        self.refresh.precision = precision;
        self
    }

    /// With a failure policy.
    pub const fn with_failure(mut self, failure: FailurePolicy) -> Self {
        self.refresh.failure = failure;
        self
    }

    /// With a first preconditioned step.
    pub const fn with_start_step(mut self, step: u64) -> Self {
        self.start_step = step;
        self
    }

    /// With a graft (or none).
    pub const fn with_graft(mut self, graft: Option<Graft>) -> Self {
        self.graft = graft;
        self
    }

    /// With blocking settings.
    pub const fn with_blocking(mut self, blocking: BlockingConfig) -> Self {
        self.blocking = blocking;
        self
    }

    /// With a root method.
    pub const fn with_roots(mut self, roots: RootMethod) -> Self {
        self.roots = roots;
        self
    }

    /// Checks every value, naming the field at fault.
    ///
    /// # Errors
    /// [`OptimError::Config`] naming the field.
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |field: &str, detail: String| OptimError::Config {
            field: field.to_string(),
            detail,
        };
        self.schedule.validate()?;
        let mu = self.momentum.coefficient;
        if !(0.0..1.0).contains(&mu) {
            return Err(bad(
                "momentum.coefficient",
                format!("must lie in [0, 1), not {mu}"),
            ));
        }
        let wd = self.weight_decay.coefficient;
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(bad(
                "weight_decay.coefficient",
                format!("must be finite and at least 0, not {wd}"),
            ));
        }
        if !(self.beta2 > 0.0 && self.beta2 <= 1.0) {
            return Err(bad(
                "beta2",
                format!("must lie in (0, 1], not {}", self.beta2),
            ));
        }
        let e = self.epsilon.value();
        if !(e.is_finite() && e >= 0.0) {
            return Err(bad(
                "epsilon",
                format!("must be finite and at least 0, not {e}"),
            ));
        }
        if let Some(x) = self.exponent
            && !(x.is_finite() && x > 0.0)
        {
            return Err(bad(
                "exponent",
                format!("must be finite and above 0, not {x}"),
            ));
        }
        for (field, n) in [
            ("statistics_period", self.statistics_period),
            ("refresh.period", self.refresh.period),
            ("start_step", self.start_step),
        ] {
            if n == 0 {
                return Err(bad(field, "must be at least 1, not 0".into()));
            }
        }
        self.refresh.failure.validate()?;
        if self.blocking.max_dim == 0 {
            return Err(bad("blocking.max_dim", "must be at least 1, not 0".into()));
        }
        if let Some(g) = self.graft {
            let (b1, b2, eps) = match g {
                Graft::Sgd => (0.0, 0.5, 1.0),
                Graft::AdaGrad { eps } => (0.0, 0.5, eps),
                Graft::RmsProp { beta2, eps } => (0.0, beta2, eps),
                Graft::Adam { beta1, beta2, eps } => (beta1, beta2, eps),
            };
            if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
                return Err(bad("graft", format!("decays must lie in [0, 1): {g:?}")));
            }
            if !(eps.is_finite() && eps > 0.0) {
                return Err(bad(
                    "graft",
                    format!("eps must be finite and above 0: {g:?}"),
                ));
            }
        }
        if let RootMethod::CoupledNewton(it) = self.roots
            && !(it.tolerance.is_finite()
                && it.tolerance > 0.0
                && it.failure_threshold.is_finite()
                && it.failure_threshold > 0.0
                && it.max_iterations >= 1)
        {
            return Err(bad(
                "roots",
                format!("coupled Newton needs a positive tolerance, threshold and cap: {it:?}"),
            ));
        }
        Ok(())
    }
}
