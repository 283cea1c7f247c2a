//! # kron
//!
//! A framework for training neural networks with second-order optimizers, built for curvature
//! from the first line: the tape records each layer's input activations and pre-activation
//! gradients natively, the layers know their own Fisher blocks, and the optimizers turn those
//! statistics into preconditioned updates.
//!
//! This crate re-exports the workspace's crates and adds the training step
//! ([`train_step`]), a small loop around it ([`Trainer`]), checkpoints ([`save_checkpoint`],
//! [`load_checkpoint`]) and weights alone ([`save_weights`], [`load_weights`]).
//!
//! * [`autodiff`] holds tensors, the tape, curvature capture, the seeded generator.
//! * [`layers`] holds modules and their Fisher-block metadata.
//! * [`optim`] holds the optimizers.
//! * [`data`] holds datasets and seeded batching.
//!
//! Most programs start with `use kron::prelude::*;`.

mod checkpoint;
mod distributed;

/// The README's code, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}
mod train;
mod trainer;

pub use kron_autodiff as autodiff;
pub use kron_data as data;
pub use kron_layers as layers;
pub use kron_optim as optim;

pub use kron_layers::module;

pub use checkpoint::{
    CheckpointError, FORMAT_VERSION, TrainState, load_checkpoint, load_weights, save_checkpoint,
    save_weights,
};
pub use distributed::{DataParallel, SetupMismatch, setup_of};
pub use train::{Evaluation, StepOutput, evaluate, predict, train_step};
pub use trainer::{EpochOutput, Trainer};

/// The names most programs use.
pub mod prelude {
    pub use crate::{
        TrainState, Trainer, evaluate, load_checkpoint, load_weights, predict, save_checkpoint,
        save_weights, train_step,
    };
    pub use kron_autodiff::{LossKind, ParamId, ParamStore, Rng, Tape, Targets, Tensor, Var};
    pub use kron_layers::{
        Activation, AvgPool2d, BlockKind, Conv2d, Conv2dConfig, Dense, DenseConfig, Dropout,
        FisherBlock, Flatten, Init, MaxPool2d, Module, Sequential, module,
    };
    pub use kron_optim::{
        Adam, AdamConfig, Kfac, KfacConfig, Note, OptimError, Optimizer, Schedule, Sgd, SgdConfig,
        StepReport,
    };
}
