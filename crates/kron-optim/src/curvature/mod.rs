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
//! **Shampoo and KrADagrad** ([`adaptive`](crate::adaptive)) read only parameter gradients,
//! work on any parameter (a bias is a 1-D parameter of its own, not a column of `W_aug`),
//! split parameters into blocks of their own and need neither KL clipping nor the
//! Levenberg-Marquardt model, so they run on their own engine,
//! [`Adaptive`](crate::adaptive::Adaptive), built from this core's pieces: the failure policy
//! ([`Refreshing`] per axis, the boost multiplying the epsilon of a retry), grafting
//! ([`Grafting`]), [`apply_direction`], the typed [`Note`]s, the schedules and the
//! all-or-nothing commit. Each method is one [`FactorRule`](crate::adaptive::FactorRule): its
//! statistic's start, update and root.
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
pub use driver::{Correction, CorrectionInput, Driver};
pub use note::{Kept, Note, StatsSkip};
pub use policy::{FailurePolicy, RefreshMeta, RefreshOk, Refreshed, Refreshing};
pub use products::{CurvatureProducts, TapeCurvature};
pub use rules::{Graft, Grafting, Momentum, WeightDecay, apply_direction, kl_clip_factor};
