//! # kron-optim
//!
//! Optimizers behind one object-safe trait, [`Optimizer`]: first-order baselines ([`Sgd`],
//! [`Adam`]) and the Kronecker-factored second-order methods, which read the curvature
//! statistics the tape captures for the layers' [`FisherBlock`](kron_layers::FisherBlock)s.
//!
//! Every optimizer exports its state ([`Optimizer::state`]) as named tensors and JSON, so a
//! run resumes from a checkpoint with the same bits, and refuses a step whose gradients hold
//! NaN or infinity without changing anything. Every configuration has a `validate()` that the
//! constructors call (an [`OptimError::Config`] names the field), and a step whose update
//! would overflow a parameter is refused ([`OptimError::NonFiniteUpdate`]) with the
//! parameters unchanged.

pub mod adaptive;
pub mod backend;
pub mod comm;
pub mod curvature;
mod error;
mod first_order;
mod kfac;
mod optimizer;
mod schedule;
pub mod twolevel;
mod validate;

pub use adaptive::{
    Adaptive, AdaptiveConfig, BlockingConfig, KrAdagrad, KrAdagradStar, RootMethod, Shampoo,
    TensorLayout,
};
pub use backend::{Backend, CpuBackend, Precision, Ridge};
pub use comm::{Communicator, LocalComm, LocalGroup, Shard, SingleProcess};
pub use curvature::{
    CoreConfig, CurvatureBlock, CurvatureProducts, DampingConfig, Driver, FailurePolicy, Fallback,
    Graft, LevenbergMarquardt, Momentum, Note, RefreshConfig, StatisticsConfig, StepConfig,
    StepRule, TapeCurvature, WeightDecay,
};
pub use error::OptimError;
pub use first_order::{Adam, AdamConfig, Sgd, SgdConfig, sgd_update, sgd_update_is_finite};
pub use kfac::{EigenDamping, InverseMethod, Kfac, KfacBlock, KfacConfig, KfacRefreshed};
pub use optimizer::{
    Captures, FisherKind, OptimState, Optimizer, StepReport, Tensor64, Wants, check_finite,
};
pub use schedule::{Decay, Schedule};
pub use twolevel::{CoarseConfig, CoarseSpace, TwoLevelKfac};
