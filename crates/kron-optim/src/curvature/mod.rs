//! The curvature core: the pieces every Kronecker method is built from.
//!
//! * [`CurvatureBlock`]: one block's statistics, its refresh (factorization, roots,
//!   eigenbasis), how the refreshed result preconditions the block's gradient, the quadratic
//!   form for the Levenberg-Marquardt model, and its checkpoint form.
//! * [`Driver`]: the staged step shared by every method — statistics, refresh, precondition,
//!   an optional [`Correction`] over all blocks, clip, step rule, parameters — and the
//!   Levenberg-Marquardt hand-back. It owns what methods share: the failure policy
//!   ([`Refreshing`], [`FailurePolicy`]), momentum, weight decay, KL clipping, the fallback
//!   rule, the all-or-nothing commit and checkpoints.
//! * Step-rule parts ([`Momentum`], [`WeightDecay`], [`kl_clip_factor`], [`Graft`]) and the
//!   shared sub-configurations ([`StatisticsConfig`], [`RefreshConfig`], [`DampingConfig`],
//!   [`StepConfig`]).
//! * Typed [`Note`]s for the step's report.
//! * [`CurvatureProducts`]: exact curvature products on the mini-batch (the quadratic-model
//!   step).
//!
//! KFAC and KFC ([`Kfac`](crate::Kfac)) are the first implementation: a block holds the
//! running averages `A` and `G`, a refresh computes damped inverses or eigenbases, and
//! preconditioning is two (or four) GEMMs.
//!
//! # How the next methods fit
//!
//! **Shampoo** (Gupta et al. 2018): a block per layer in the same `W_aug` layout, whose
//! statistics read the gradient ([`CurvatureBlock::wants_gradient`]) instead of a capture and
//! accumulate `L += G G^T`, `R += G^T G` (or their running averages); a refresh computes the
//! inverse roots `L^{-1/4}`, `R^{-1/4}` (matrix powers with an eigenvalue floor); preconditioning
//! is `L^{-1/4} G R^{-1/4}`. Blocking of large dimensions stays inside the block (its
//! statistics are a list of sub-blocks). Grafting is a step-rule part the method applies to
//! each block's direction; no driver change.
//!
//! **KrADagrad** (Moreno et al. 2023): the block keeps the *inverse* statistics and updates
//! them each step from the gradient with a rank-`k` formula; its "refresh" is a cheap
//! re-symmetrization or, every so often, an exact recomputation that can fail and fall back
//! like any other, under the same failure policy. Preconditioning multiplies by the kept
//! inverse roots.
//!
//! **Two-level KFAC** (Koroko et al. 2023): its blocks are KFAC's; the coarse-space correction
//! needs every block's preconditioned gradient at once, which is what [`Correction`] receives
//! between preconditioning and clipping (with the blocks, for their factors). It adds its
//! coarse term to the directions and returns its own notes.

pub(crate) mod block;
mod config;
pub(crate) mod driver;
mod note;
mod policy;
mod products;
mod rules;

pub use block::{CurvatureBlock, StatsInput, TakeMat};
pub use config::{
    CoreConfig, DampingConfig, Fallback, LevenbergMarquardt, RefreshConfig, StatisticsConfig,
    StepConfig, StepRule,
};
pub use driver::{Correction, Driver};
pub use note::{Kept, Note, StatsSkip};
pub use policy::{FailurePolicy, RefreshMeta, RefreshOk, Refreshed, Refreshing};
pub use products::{CurvatureProducts, TapeCurvature};
pub use rules::{Graft, Grafting, Momentum, WeightDecay, apply_direction, kl_clip_factor};
