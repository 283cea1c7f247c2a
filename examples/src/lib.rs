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

use kron::optim::KfacConfig;

/// The examples' KFAC recipe: the library defaults (sampled Fisher, factors every step and conv
/// factors every 10, inverses every 20 steps, damping 1e-3, KL clip 1e-3, momentum 0.9).
pub const KFAC_DEFAULT: KfacConfig = KfacConfig::DEFAULT;
