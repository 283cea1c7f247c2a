//! Kronecker-factored adaptive methods: Shampoo, KrADagrad* and KrADagrad.
//!
//! All three keep, for each block of each parameter's gradient, one `d x d` statistic per
//! axis and precondition the block by a matrix root of each along its axis:
//!
//! * **[`Shampoo`]** (Gupta et al. 2018; Meta's Distributed Shampoo): `L_i += H_(i) H_(i)^T`,
//!   preconditioner `(L_i + eps I)^(-1/(2k))` for an order-`k` block;
//! * **[`KrAdagradStar`]** (Mei, Moreno, Walters 2023): the inverse statistic `P_i ~ L_i^-1`
//!   updated by a dominating Sherman-Morrison step, never inverted, preconditioner
//!   `P_i^(1/(2k))`;
//! * **[`KrAdagrad`]**: one axis per step from the gradient preconditioned along the others,
//!   with a damping step, preconditioner `P_i^(1/2)`.
//!
//! A method is a [`FactorRule`] (its statistic's start, update and root: one file each,
//! [`shampoo`] and [`kradagrad`]); the [`Adaptive`] engine
//! does the rest with the curvature core's pieces: the failure policy
//! ([`Refreshing`](crate::curvature::Refreshing): keep the last good root, retry at a boosted
//! epsilon, fall back to the grafted rule after repeated failures), grafting
//! ([`Grafting`](crate::curvature::Grafting)), momentum and weight decay
//! ([`apply_direction`](crate::curvature::apply_direction)), typed [`Note`](crate::Note)s,
//! the schedules and the all-or-nothing commit.
//!
//! These methods read only parameter gradients, not layer captures, so they do not run on
//! the layer-block [`Driver`](crate::Driver) (whose blocks are layers in the `W_aug` layout,
//! with KL clipping and the Levenberg-Marquardt model); they work on any parameter, a bias
//! being a 1-D parameter of its own (the grafted diagonal rule).
//!
//! Roots come from an eigendecomposition (`f64` or `f32`, with an `f64` retry) or from the
//! coupled Newton iteration ([`RootMethod`]); on the wgpu backend the eigendecomposition is
//! delegated to the host CPU (reported by a [`Note::EighDelegated`](crate::Note)), and coupled
//! Newton stays on the device in `f32`, its result judged by its residual.

mod config;
mod engine;
pub mod kradagrad;
mod rule;
pub mod shampoo;
mod shape;

pub use config::{AdaptiveConfig, RootMethod};
pub use engine::Adaptive;
pub use kradagrad::{Denominator, KrAdRule, KrAdStarRule, kradagrad_axis};
pub use rule::{FactorRule, Root, contraction};
pub use shampoo::ShampooRule;
pub use shape::{BlockingConfig, TensorLayout};

/// Shampoo: [`Adaptive`] with [`ShampooRule`]; defaults [`AdaptiveConfig::shampoo`].
pub type Shampoo = Adaptive<ShampooRule>;

/// KrADagrad*: [`Adaptive`] with [`KrAdStarRule`]; defaults
/// [`AdaptiveConfig::kradagrad_star`].
pub type KrAdagradStar = Adaptive<KrAdStarRule>;

/// KrADagrad: [`Adaptive`] with [`KrAdRule`]; defaults [`AdaptiveConfig::kradagrad`].
pub type KrAdagrad = Adaptive<KrAdRule>;
