//! The library behind kron's examples: each example file's `main` parses its flags and calls
//! [`example::run_example`] with its [`example::Example`] definition, so the tests can run the
//! same code with `--fast` and snapshot the printed table.

pub mod autoencoder;
pub mod cli;
pub mod convnet;
pub mod data;
pub mod data_parallel;
pub mod digits_mlp;
pub mod example;
pub mod ill_conditioned;
pub mod report;
pub mod resume;
pub mod train;
pub mod two_level;

use kron::optim::{AdaptiveConfig, Ridge};

use crate::train::AdaptiveRecipe;

/// The examples' Shampoo and KrADagrad recipes. Shampoo: the library defaults (Meta's AlgoPerf
/// configuration: Adam grafting, beta2 0.999, epsilon 1e-12, blocks of 1024, f64 roots) with
/// roots every 20 steps from step 20 (AlgoPerf: 100, for runs of many thousand steps).
/// KrADagrad* and KrADagrad: the authors' defaults (SGD-norm grafting for KrADagrad*, none for
/// KrADagrad, blocks of 128, f32) with the epsilons their MNIST autoencoder runs tuned (3e-4 and
/// 8.5e-4, `experiments/autoencoders/best_eps.json`) and roots every 20 steps.
pub const ADAPTIVE_DEFAULT: AdaptiveRecipe = AdaptiveRecipe {
    shampoo: AdaptiveConfig::shampoo()
        .with_refresh_period(20)
        .with_start_step(20),
    kradagrad_star: AdaptiveConfig::kradagrad_star()
        .with_epsilon(Ridge::Absolute(3e-4))
        .with_refresh_period(20),
    kradagrad: AdaptiveConfig::kradagrad()
        .with_epsilon(Ridge::Absolute(8.5e-4))
        .with_refresh_period(20),
};
