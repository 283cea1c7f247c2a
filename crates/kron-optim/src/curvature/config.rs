//! The sub-configurations the Kronecker methods share: statistics, refresh, damping and the
//! step rule, each with `Default` (the papers' and reference implementations' values) and
//! `with_*` builders. A method's configuration holds one of each plus what is its own.

use serde::{Deserialize, Serialize};

use super::policy::FailurePolicy;
use super::rules::{Momentum, WeightDecay};
use crate::backend::Precision;
use crate::first_order::AdamConfig;
use crate::optimizer::FisherKind;
use crate::schedule::{Decay, Schedule};

macro_rules! builders {
    ($ty:ident { $(#[$doc:meta] $name:ident: $field:ident: $fty:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[$doc]
                pub const fn $name(mut self, v: $fty) -> Self {
                    self.$field = v;
                    self
                }
            )*
        }
    };
}

/// How the curvature statistics are gathered.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatisticsConfig {
    /// Decay `ε` of the running averages (default 0.95), warm-started as `min(1 - 1/k, ε)` on
    /// the `k`-th update.
    pub ema_decay: f32,
    /// Steps between statistics updates of dense blocks (default 1).
    pub period: u64,
    /// Steps between statistics updates of conv blocks (default 10): KFC's `Ω` costs several
    /// times a whole forward and backward pass at ImageNet-like widths.
    pub conv_period: u64,
    /// Use only the first `n` examples of each batch (default all).
    pub examples: Option<usize>,
    /// True (sampled) or empirical Fisher (default sampled, one label per example).
    pub fisher: FisherKind,
}

impl StatisticsConfig {
    /// The defaults as a constant.
    pub const DEFAULT: StatisticsConfig = StatisticsConfig {
        ema_decay: 0.95,
        period: 1,
        conv_period: 10,
        examples: None,
        fisher: FisherKind::Sampled,
    };
}

impl Default for StatisticsConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

builders!(StatisticsConfig {
    /// With a decay of the running averages.
    with_ema_decay: ema_decay: f32,
    /// With a dense statistics period.
    with_period: period: u64,
    /// With a conv statistics period.
    with_conv_period: conv_period: u64,
    /// With statistics on the first `n` examples of each batch.
    with_examples: examples: Option<usize>,
    /// With a Fisher estimate.
    with_fisher: fisher: FisherKind,
});

/// How often blocks refresh (factorize, take roots), in which precision, and what a failure
/// does.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefreshConfig {
    /// Steps between refreshes (default 20, KFAC's `T3`).
    pub period: u64,
    /// Element type of statistics and refreshed results (default `f32`; `f64` on the CPU).
    pub precision: Precision,
    /// What a failed refresh does.
    pub failure: FailurePolicy,
}

impl RefreshConfig {
    /// The defaults as a constant.
    pub const DEFAULT: RefreshConfig = RefreshConfig {
        period: 20,
        precision: Precision::F32,
        failure: FailurePolicy::DEFAULT,
    };
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

builders!(RefreshConfig {
    /// With a refresh period.
    with_period: period: u64,
    /// With a precision.
    with_precision: precision: Precision,
    /// With a failure policy.
    with_failure: failure: FailurePolicy,
});

/// Levenberg-Marquardt adaptation of the damping λ (Martens & Grosse 2015, Sec. 6.5): every
/// `interval` steps, the loss reduction `ρ = (h(θ+δ) - h(θ)) / (M(δ) - M(0))` of the step just
/// taken is measured on its own mini-batch; `ρ > 3/4` multiplies λ by `decay`, `ρ < 1/4`
/// divides it by `decay`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevenbergMarquardt {
    /// Steps between adaptations (paper: `T1 = 5`).
    pub interval: u64,
    /// The factor `ω1` (paper: `(19/20)^T1`).
    pub decay: f32,
    /// Smallest damping allowed.
    pub min_damping: f32,
    /// Largest damping allowed.
    pub max_damping: f32,
}

impl LevenbergMarquardt {
    /// The paper's rule: every 5 steps, `ω1 = (19/20)^5`, λ kept in `[1e-8, 1e4]`.
    pub const DEFAULT: LevenbergMarquardt = LevenbergMarquardt {
        interval: 5,
        decay: 0.773_780_94,
        min_damping: 1e-8,
        max_damping: 1e4,
    };
}

impl Default for LevenbergMarquardt {
    /// [`LevenbergMarquardt::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The damping λ and its adaptation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DampingConfig {
    /// Tikhonov damping λ (default 1e-3, kfac-pytorch); KFAC splits it between the factors
    /// as `γ_A = π sqrt(λ)`, `γ_G = sqrt(λ) / π`.
    pub lambda: f32,
    /// Levenberg-Marquardt adaptation (default off).
    pub adaptive: Option<LevenbergMarquardt>,
}

impl DampingConfig {
    /// The defaults as a constant.
    pub const DEFAULT: DampingConfig = DampingConfig {
        lambda: 1e-3,
        adaptive: None,
    };
}

impl Default for DampingConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

builders!(DampingConfig {
    /// With damping λ.
    with_lambda: lambda: f32,
    /// With Levenberg-Marquardt adaptation (or none).
    with_adaptive: adaptive: Option<LevenbergMarquardt>,
});

/// How the preconditioned direction becomes the step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepRule {
    /// The method as a preconditioner for SGD (kfac-pytorch, ASDL): the direction, KL-clipped,
    /// times the learning-rate schedule, with momentum and weight decay (the default).
    #[default]
    Sgd,
    /// The paper's step (Martens & Grosse 2015, Sec. 7): `delta = alpha Delta + mu delta_prev`
    /// with `(alpha, mu)` minimizing the quadratic model
    /// `grad^T delta + 1/2 delta^T (F + (lambda + eta) I) delta` under the exact mini-batch
    /// Fisher `F` (forward-mode products on the tape, when the step is driven by
    /// `train_step`, or the Kronecker approximation when no products are at hand). No learning
    /// rate, no hand-set momentum, no KL clip: the schedule, `momentum` and `kl_clip` are not
    /// used for the Fisher blocks. Pair it with Levenberg-Marquardt damping.
    QuadraticModel,
}

/// The first-order rule for parameters outside any block, and for a block's parameters
/// before its first successful refresh (or after too many failed ones).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Fallback {
    /// SGD with the method's own learning rate, momentum and weight decay on the raw gradient
    /// (what kfac-pytorch does for layers it does not precondition).
    Sgd,
    /// Adam with its own configuration.
    Adam(AdamConfig),
}

/// The step rule: learning rate, momentum, weight decay, clipping.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepConfig {
    /// Learning rate of the update (default constant 0.1, kfac-pytorch).
    pub schedule: Schedule,
    /// Momentum on the preconditioned update (default heavy ball 0.9).
    pub momentum: Momentum,
    /// Weight decay (default none; coupled adds `eta p` to the preconditioned update).
    pub weight_decay: WeightDecay,
    /// KL clipping κ of the update (default `Some(1e-3)`, kfac-pytorch):
    /// `ν = min(1, sqrt(κ / (lr² Σ ⟨U, V⟩)))`.
    pub kl_clip: Option<f32>,
    /// How the direction becomes the step (default [`StepRule::Sgd`]).
    pub rule: StepRule,
    /// Examples (the first of each mini-batch) on which [`StepRule::QuadraticModel`] evaluates
    /// the exact Fisher products (default `None`: the whole mini-batch). A quarter of the batch
    /// cuts the products' cost about fourfold for a noisier curvature estimate; the gradient
    /// term of the model always uses the whole batch.
    pub curvature_examples: Option<usize>,
    /// The rule for parameters outside blocks (default SGD).
    pub fallback: Fallback,
    /// Whether a model with parameters outside every block is refused (default `false`:
    /// they take the [`fallback`](Self::fallback) rule, and the first step's report says so in
    /// a [`Note::OutsideBlocks`](super::Note::OutsideBlocks)). With `true` the optimizer's
    /// constructor returns [`OptimError::Config`](crate::OptimError::Config) naming them: a
    /// layer left out of a model's `visit_blocks` is then an error, not a silent SGD step.
    #[serde(default)]
    pub strict_blocks: bool,
}

impl StepConfig {
    /// The defaults as a constant.
    pub const DEFAULT: StepConfig = StepConfig {
        schedule: Schedule {
            base: 0.1,
            warmup: 0,
            decay: Decay::Constant,
        },
        momentum: Momentum::heavy_ball(0.9),
        weight_decay: WeightDecay::NONE,
        kl_clip: Some(1e-3),
        rule: StepRule::Sgd,
        curvature_examples: None,
        fallback: Fallback::Sgd,
        strict_blocks: false,
    };
}

impl Default for StepConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl StepConfig {
    /// The fallback rule's kind, `"sgd"` or `"adam"` (structural: a saved state must agree).
    pub fn fallback_kind(&self) -> &'static str {
        match self.fallback {
            Fallback::Sgd => "sgd",
            Fallback::Adam(_) => "adam",
        }
    }
}

builders!(StepConfig {
    /// With a learning-rate schedule.
    with_schedule: schedule: Schedule,
    /// With momentum.
    with_momentum: momentum: Momentum,
    /// With weight decay.
    with_weight_decay: weight_decay: WeightDecay,
    /// With KL clipping (or none).
    with_kl_clip: kl_clip: Option<f32>,
    /// With a step rule.
    with_rule: rule: StepRule,
    /// With the examples the quadratic model's curvature products use.
    with_curvature_examples: curvature_examples: Option<usize>,
    /// With a fallback rule.
    with_fallback: fallback: Fallback,
    /// With parameters outside every block refused (`true`) or trained by the fallback rule.
    with_strict_blocks: strict_blocks: bool,
});

/// The shared configuration the staged [`Driver`](super::Driver) runs on: every method's
/// configuration provides one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoreConfig {
    /// Statistics.
    pub statistics: StatisticsConfig,
    /// Refreshes.
    pub refresh: RefreshConfig,
    /// Damping.
    pub damping: DampingConfig,
    /// The step rule.
    pub step: StepConfig,
}

impl CoreConfig {
    /// The defaults as a constant.
    pub const DEFAULT: CoreConfig = CoreConfig {
        statistics: StatisticsConfig::DEFAULT,
        refresh: RefreshConfig::DEFAULT,
        damping: DampingConfig::DEFAULT,
        step: StepConfig::DEFAULT,
    };
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

builders!(CoreConfig {
    /// With statistics settings.
    with_statistics: statistics: StatisticsConfig,
    /// With refresh settings.
    with_refresh: refresh: RefreshConfig,
    /// With damping settings.
    with_damping: damping: DampingConfig,
    /// With a step rule.
    with_step: step: StepConfig,
});
