//! KFAC's configuration, with the defaults of the paper and the reference implementations.

use serde::{Deserialize, Serialize};

use crate::backend::Precision;
use crate::curvature::{
    CoreConfig, DampingConfig, Fallback, LevenbergMarquardt, Momentum, RefreshConfig,
    StatisticsConfig, StepConfig, StepRule, WeightDecay,
};
use crate::optimizer::FisherKind;
use crate::schedule::Schedule;

/// How damping enters the eigenbasis preconditioner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EigenDamping {
    /// Each factor damped on its own with the π rule: `(e_G + γ_G)(e_A + γ_A)`; the same
    /// update as the inverse method.
    Factored,
    /// Exact Tikhonov damping of the Kronecker product: `e_G e_A^T + λ` (kfac-pytorch's EIGEN).
    Tikhonov,
    /// The whole `λ` added to each factor: `(e_G + λ)(e_A + λ)`, as the two-level KFAC authors'
    /// code does (Koroko et al.; for reproductions). Its damping is of order `λ (e_G + e_A)`,
    /// not `λ`, so the same `λ` damps far more than the other two modes.
    PerFactor,
}

/// How the Kronecker factors are inverted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InverseMethod {
    /// Explicit damped inverses `(A + γ_A I)^-1`, `(G + γ_G I)^-1` by Cholesky (default);
    /// the update is two matrix products.
    Inverse,
    /// Eigenbases of `A` and `G` (reusable by EKFAC-style refinements); the update is four
    /// matrix products and an elementwise division.
    Eigen(EigenDamping),
}

/// KFAC's (and KFC's) hyperparameters: the shared sub-configurations plus the inverse
/// method. Every default cites its source (see the book's KFAC chapter): kfac-pytorch for the
/// preconditioner-for-SGD recipe, the paper for statistics and periods. The `with_*` builders
/// reach into the sub-configurations (`with_damping(λ)` sets `damping.lambda`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KfacConfig {
    /// Statistics: decay 0.95, every step (dense) and every 10 steps (conv), sampled Fisher.
    pub statistics: StatisticsConfig,
    /// Refreshes: every 20 steps (the paper's `T3`), `f32`, the default failure policy.
    pub refresh: RefreshConfig,
    /// Damping λ = 1e-3 (kfac-pytorch), no adaptation.
    pub damping: DampingConfig,
    /// The step: learning rate 0.1, heavy-ball momentum 0.9, KL clip 1e-3 (kfac-pytorch).
    pub step: StepConfig,
    /// How the factors are inverted (default explicit inverses).
    pub method: InverseMethod,
}

impl KfacConfig {
    /// The defaults as a constant (what [`Default`] returns), for `const` configurations.
    // ANCHOR: kfac_default
    pub const DEFAULT: KfacConfig = KfacConfig {
        statistics: StatisticsConfig::DEFAULT,
        refresh: RefreshConfig::DEFAULT,
        damping: DampingConfig::DEFAULT,
        step: StepConfig::DEFAULT,
        method: InverseMethod::Inverse,
    };
    // ANCHOR_END: kfac_default

    /// Constant learning rate `lr`, other settings default.
    pub fn new(lr: f32) -> Self {
        KfacConfig::DEFAULT.with_schedule(Schedule::constant(lr))
    }

    /// The shared part, which the staged driver runs on.
    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            statistics: self.statistics,
            refresh: self.refresh,
            damping: self.damping,
            step: self.step,
        }
    }
}

impl Default for KfacConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

macro_rules! with {
    ($(#[$doc:meta] $name:ident: $($field:ident).+ => $ty:ty),* $(,)?) => {
        impl KfacConfig {
            $(
                #[$doc]
                pub const fn $name(mut self, v: $ty) -> Self {
                    self.$($field).+ = v;
                    self
                }
            )*
        }
    };
}

with! {
    /// With statistics settings.
    with_statistics: statistics => StatisticsConfig,
    /// With refresh settings.
    with_refresh: refresh => RefreshConfig,
    /// With damping settings.
    with_damping_config: damping => DampingConfig,
    /// With a step rule's settings.
    with_step: step => StepConfig,
    /// With a learning-rate schedule.
    with_schedule: step.schedule => Schedule,
    /// With momentum (heavy ball or Nesterov).
    with_momentum_rule: step.momentum => Momentum,
    /// With weight decay (coupled or decoupled).
    with_weight_decay_rule: step.weight_decay => WeightDecay,
    /// With damping λ.
    with_damping: damping.lambda => f32,
    /// With an inverse method.
    with_method: method => InverseMethod,
    /// With a factor decay.
    with_ema_decay: statistics.ema_decay => f32,
    /// With a dense statistics period.
    with_stats_period: statistics.period => u64,
    /// With a conv statistics period.
    with_conv_stats_period: statistics.conv_period => u64,
    /// With statistics on the first `n` examples of each batch.
    with_stats_examples: statistics.examples => Option<usize>,
    /// With an inverse (refresh) period.
    with_inverse_period: refresh.period => u64,
    /// With a Fisher estimate.
    with_fisher: statistics.fisher => FisherKind,
    /// With KL clipping (or none).
    with_kl_clip: step.kl_clip => Option<f32>,
    /// Sets how the direction becomes the step.
    with_step_rule: step.rule => StepRule,
    /// With the examples the quadratic model's curvature products use (or the whole batch).
    with_curvature_examples: step.curvature_examples => Option<usize>,
    /// With Levenberg-Marquardt damping adaptation (or none).
    with_adaptive_damping: damping.adaptive => Option<LevenbergMarquardt>,
    /// With the factor λ is multiplied by after a failed refresh.
    with_failure_factor: refresh.failure.boost => f32,
    /// With statistics kept in this precision.
    with_precision: refresh.precision => Precision,
    /// With a fallback rule.
    with_fallback: step.fallback => Fallback,
    /// With parameters outside every Fisher block refused by the constructor (or not).
    with_strict_blocks: step.strict_blocks => bool,
}

impl KfacConfig {
    /// With heavy-ball momentum `mu`.
    pub const fn with_momentum(self, mu: f32) -> Self {
        self.with_momentum_rule(Momentum::heavy_ball(mu))
    }

    /// With coupled L2 weight decay `eta` (added to the preconditioned update).
    pub const fn with_weight_decay(self, eta: f32) -> Self {
        self.with_weight_decay_rule(WeightDecay::coupled(eta))
    }
}
