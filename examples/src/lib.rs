//! The library behind kron's examples: each example file's `main` parses its flags and calls
//! [`example::run_example`] with its [`example::Example`] definition, so the tests can run the
//! same code with `--fast` and snapshot the printed table.

pub mod autoencoder;
pub mod cli;
pub mod convnet;
pub mod data;
pub mod digits_mlp;
pub mod example;
pub mod report;
pub mod train;

use kron::optim::{FisherKind, InverseMethod, KfacConfig, Precision, Schedule};

// ANCHOR: kfac_default
/// The examples' KFAC recipe (the library defaults, spelled out so a `const` can use them):
/// sampled Fisher, factors every step (conv every 10), inverses every 20 steps, damping 1e-3,
/// KL clip 1e-3, momentum 0.9.
pub const KFAC_DEFAULT: KfacConfig = KfacConfig {
    schedule: Schedule {
        base: 0.1,
        warmup: 0,
        decay: kron::optim::Decay::Constant,
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
    adaptive_damping: None,
    failure_factor: 10.0,
    precision: Precision::F32,
    fallback: kron::optim::Fallback::Sgd,
};
// ANCHOR_END: kfac_default
