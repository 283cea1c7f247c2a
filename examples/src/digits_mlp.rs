//! A classifier on the UCI handwritten digits (bundled), or on MNIST with `--data DIR`.

use kron::layers::Module;
use kron::optim::KfacConfig;
use kron::prelude::*;

use crate::data;
use crate::example::{Config, Example, Sizes};
use crate::train::{OptimizerKind, Shift, Task};

// ANCHOR: model
/// A multilayer perceptron `features -> 256 -> 128 -> classes` with ReLU units and dropout. Every `Dense`
/// registers its parameters in `store` under its path and reports its Fisher block.
pub fn mlp(store: &mut ParamStore, rng: &mut Rng, features: usize, classes: usize) -> Sequential {
    Sequential::new()
        .push(Dense::new(store, "fc1", features, 256, rng))
        .push(Activation::Relu)
        .push(Dropout::new(0.3))
        .push(Dense::new(store, "fc2", 256, 128, rng))
        .push(Activation::Relu)
        .push(Dropout::new(0.3))
        .push(Dense::new(store, "fc3", 128, classes, rng))
}
// ANCHOR_END: model

// ANCHOR: task
fn task(cfg: &Config, sizes: &Sizes) -> Result<Task, String> {
    let split = data::load(cfg, kron::data::digits)?;
    let (train, test) = data::trimmed(&split, sizes);
    data::check("digits_mlp", &train, &test, None)?;
    let (x, xt) = (data::flat(&train), data::flat(&test));
    let shift = Shift {
        image: train.image_shape(),
        max: 1,
    };
    Ok(Task::new(
        x,
        Targets::Classes(train.labels().to_vec()),
        xt,
        Targets::Classes(test.labels().to_vec()),
        LossKind::CrossEntropy,
        2000,
    )
    .with_augment(shift))
}
// ANCHOR_END: task

fn model(task: &Task, store: &mut ParamStore, rng: &mut Rng) -> Box<dyn Module> {
    let classes = match &task.train_t {
        Targets::Classes(c) => c.iter().max().map_or(10, |m| (m + 1).max(10)),
        Targets::Values(_) => 10,
    };
    Box::new(mlp(store, rng, task.train_x.dim(1), classes))
}

// ANCHOR: kfac
/// KFAC for the digits: the library's defaults (sampled Fisher, factors every step, KL clip
/// 1e-3, momentum 0.9) with damping 0.1 and a refresh every 10 steps, which suit a small
/// network trained with small batches.
pub const KFAC: KfacConfig = KfacConfig::DEFAULT
    .with_damping(0.1)
    .with_inverse_period(10);
// ANCHOR_END: kfac

/// The digits classifier.
pub const EXAMPLE: Example = Example {
    name: "digits_mlp",
    title: "digits_mlp: MLP classifier on handwritten digits",
    defaults: &[OptimizerKind::Adam, OptimizerKind::Kfac],
    task,
    model,
    kfac: KFAC,
    // Small blocks (at most 256 wide): roots every 5 steps cost little.
    adaptive: crate::ADAPTIVE_DEFAULT.with_refresh_period(5),
    lrs: &[
        (OptimizerKind::Sgd, 0.03),
        (OptimizerKind::Adam, 1e-3),
        (OptimizerKind::Kfac, 0.03),
        (OptimizerKind::Shampoo, 3e-4),
        (OptimizerKind::KrAdagradStar, 0.03),
        (OptimizerKind::KrAdagrad, 0.1),
    ],
    grid: |k| match k {
        OptimizerKind::Adam | OptimizerKind::Shampoo => vec![3e-4, 1e-3, 3e-3],
        OptimizerKind::KrAdagradStar | OptimizerKind::KrAdagrad => vec![3e-3, 0.01, 0.03, 0.1],
        _ => vec![0.01, 0.03, 0.1],
    },
    sizes: Sizes {
        epochs: 150,
        batch_size: 32,
        evals_per_epoch: 1,
        eval_every: 10,
        train: None,
        test: None,
    },
    fast: Sizes {
        epochs: 2,
        batch_size: 50,
        evals_per_epoch: 1,
        eval_every: 1,
        train: Some(300),
        test: Some(100),
    },
};
