//! KFAC's configuration, with the defaults of the paper and the reference implementations.

use serde::{Deserialize, Serialize};

use crate::backend::Precision;
use crate::first_order::AdamConfig;
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

/// How the preconditioned direction becomes the step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepRule {
    /// KFAC as a preconditioner for SGD (kfac-pytorch, ASDL): the direction, KL-clipped, times
    /// the learning-rate schedule, with heavy-ball momentum (the default).
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

/// The first-order rule for parameters outside any Fisher block, and for a block's parameters
/// before its first successful refresh.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Fallback {
    /// SGD with KFAC's own learning rate, momentum and weight decay on the raw gradient (what
    /// kfac-pytorch does for layers it does not precondition).
    Sgd,
    /// Adam with its own configuration.
    Adam(AdamConfig),
}

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

/// KFAC's (and KFC's) hyperparameters. Every default cites its source (see the book's KFAC
/// chapter): kfac-pytorch for the preconditioner-for-SGD recipe, the paper for statistics and
/// periods.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KfacConfig {
    /// Learning rate of the update (default 0.1, kfac-pytorch).
    pub schedule: Schedule,
    /// Heavy-ball momentum on the preconditioned update (default 0.9).
    pub momentum: f32,
    /// L2 weight decay added to the preconditioned update (default 0).
    pub weight_decay: f32,
    /// Tikhonov damping λ (default 1e-3, kfac-pytorch); split between the factors as
    /// `γ_A = π sqrt(λ)`, `γ_G = sqrt(λ) / π`.
    pub damping: f32,
    /// How the factors are inverted (default explicit inverses).
    pub method: InverseMethod,
    /// Decay ε of the factors' running averages (default 0.95), warm-started as
    /// `min(1 - 1/k, ε)` on the `k`-th update.
    pub ema_decay: f32,
    /// Steps between statistics updates of dense blocks (default 1).
    pub stats_period: u64,
    /// Steps between statistics updates of conv blocks (default 10): KFC's `Ω` costs several
    /// times a whole forward and backward pass at ImageNet-like widths.
    pub conv_stats_period: u64,
    /// Use only the first `n` examples of each batch for statistics (default all).
    pub stats_examples: Option<usize>,
    /// Steps between refreshes of the inverses (default 20, the paper's `T3`).
    pub inverse_period: u64,
    /// True (sampled) or empirical Fisher (default sampled, one label per example).
    pub fisher: FisherKind,
    /// KL clipping κ of the update (default `Some(1e-3)`, kfac-pytorch):
    /// `ν = min(1, sqrt(κ / (lr² Σ ⟨U, V⟩)))`.
    pub kl_clip: Option<f32>,
    /// How the direction becomes the step (default [`StepRule::Sgd`]).
    #[serde(default)]
    pub step_rule: StepRule,
    /// Examples (the first of each mini-batch) on which [`StepRule::QuadraticModel`] evaluates
    /// the exact Fisher products (default `None`: the whole mini-batch). A quarter of the batch
    /// cuts the products' cost about fourfold for a noisier curvature estimate; the gradient
    /// term of the model always uses the whole batch.
    #[serde(default)]
    pub curvature_examples: Option<usize>,
    /// Levenberg-Marquardt damping adaptation (default off).
    pub adaptive_damping: Option<LevenbergMarquardt>,
    /// After a failed refresh, the next one retries with the damping times this (default 10).
    pub failure_factor: f32,
    /// Element type of statistics and inverses on the CPU (default `f32`).
    pub precision: Precision,
    /// The rule for parameters outside Fisher blocks (default SGD).
    pub fallback: Fallback,
}

impl KfacConfig {
    /// The defaults as a constant (what [`Default`] returns), for `const` configurations:
    /// `KfacConfig { inverse_period: 10, ..KfacConfig::DEFAULT }`.
    // ANCHOR: kfac_default
    pub const DEFAULT: KfacConfig = KfacConfig {
        schedule: Schedule {
            base: 0.1,
            warmup: 0,
            decay: crate::schedule::Decay::Constant,
        },
        momentum: 0.9,
        weight_decay: 0.0,
        damping: 1e-3,
        method: InverseMethod::Inverse,
        ema_decay: 0.95,
        stats_period: 1,
        conv_stats_period: 10,
        stats_examples: None,
        inverse_period: 20,
        fisher: FisherKind::Sampled,
        kl_clip: Some(1e-3),
        step_rule: StepRule::Sgd,
        curvature_examples: None,
        adaptive_damping: None,
        failure_factor: 10.0,
        precision: Precision::F32,
        fallback: Fallback::Sgd,
    };
    // ANCHOR_END: kfac_default
}

impl Default for KfacConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

macro_rules! with {
    ($(#[$doc:meta] $name:ident: $field:ident: $ty:ty),* $(,)?) => {
        impl KfacConfig {
            $(
                #[$doc]
                pub fn $name(mut self, v: $ty) -> Self {
                    self.$field = v;
                    self
                }
            )*
        }
    };
}

with! {
    /// With a learning-rate schedule.
    with_schedule: schedule: Schedule,
    /// With momentum.
    with_momentum: momentum: f32,
    /// With weight decay.
    with_weight_decay: weight_decay: f32,
    /// With damping λ.
    with_damping: damping: f32,
    /// With an inverse method.
    with_method: method: InverseMethod,
    /// With a factor decay.
    with_ema_decay: ema_decay: f32,
    /// With a dense statistics period.
    with_stats_period: stats_period: u64,
    /// With a conv statistics period.
    with_conv_stats_period: conv_stats_period: u64,
    /// With statistics on the first `n` examples of each batch.
    with_stats_examples: stats_examples: Option<usize>,
    /// With an inverse period.
    with_inverse_period: inverse_period: u64,
    /// With a Fisher estimate.
    with_fisher: fisher: FisherKind,
    /// With KL clipping (or none).
    with_kl_clip: kl_clip: Option<f32>,
    /// Sets how the direction becomes the step.
    with_step_rule: step_rule: StepRule,
    /// With the examples the quadratic model's curvature products use (or the whole batch).
    with_curvature_examples: curvature_examples: Option<usize>,
    /// With Levenberg-Marquardt damping adaptation (or none).
    with_adaptive_damping: adaptive_damping: Option<LevenbergMarquardt>,
    /// With a damping factor for retries after failed refreshes.
    with_failure_factor: failure_factor: f32,
    /// With statistics kept in this precision.
    with_precision: precision: Precision,
    /// With a fallback rule.
    with_fallback: fallback: Fallback,
}

impl KfacConfig {
    /// Constant learning rate `lr`, other settings default.
    pub fn new(lr: f32) -> Self {
        KfacConfig {
            schedule: Schedule::constant(lr),
            ..Default::default()
        }
    }
}
