//! A conv net on 28x28 digits (the bundled MNIST subset), or on Fashion-MNIST with
//! `--data /usr/share/datasets/fashion-mnist`.

use kron::layers::Module;
use kron::optim::KfacConfig;
use kron::prelude::*;

use crate::data;
use crate::example::{Config, Example, Sizes};
use crate::train::{OptimizerKind, Task};

// ANCHOR: model
/// Three times [conv 5x5 padding 2, ReLU, max-pool 3x3 stride 2 padding 1] with 32, 32 and 64
/// channels (28 -> 14 -> 7 -> 4), then dense `1024 -> classes`.
pub fn convnet(store: &mut ParamStore, rng: &mut Rng, in_ch: usize, classes: usize) -> Sequential {
    let mut net = Sequential::new();
    let mut c = in_ch;
    for (i, out) in [32, 32, 64].into_iter().enumerate() {
        net = net
            .push(Conv2dConfig::new(c, out, 5).with_padding(2).build(
                store,
                &format!("features.{i}"),
                rng,
            ))
            .push(Activation::Relu)
            .push(MaxPool2d::new(3, 2, 1));
        c = out;
    }
    net.push(Flatten)
        .push(Dense::new(store, "classifier", 64 * 4 * 4, classes, rng))
}
// ANCHOR_END: model

fn task(cfg: &Config, sizes: &Sizes) -> Result<Task, String> {
    let split = data::load(cfg, data::bundled_mnist)?;
    let (train, test) = data::trimmed(&split, sizes);
    data::check("convnet", &train, &test, Some([28, 28]))?;
    Ok(Task::new(
        train.images_nchw(),
        Targets::Classes(train.labels().to_vec()),
        test.images_nchw(),
        Targets::Classes(test.labels().to_vec()),
        LossKind::CrossEntropy,
        1000,
    ))
}

fn model(task: &Task, store: &mut ParamStore, rng: &mut Rng) -> Box<dyn Module> {
    Box::new(convnet(store, rng, task.train_x.dim(1), 10))
}

// ANCHOR: kfac
/// KFC for the conv net: the library's defaults with damping 0.1, the convolutions' factors
/// every 10 steps and a refresh every 20.
pub const KFAC: KfacConfig = KfacConfig::DEFAULT
    .with_damping(0.1)
    .with_conv_stats_period(10)
    .with_inverse_period(20);
// ANCHOR_END: kfac

/// The conv net.
pub const EXAMPLE: Example = Example {
    name: "convnet",
    title: "convnet: 3-layer conv net on 28x28 digits",
    defaults: &[OptimizerKind::Kfac],
    task,
    model,
    kfac: KFAC,
    adaptive: crate::ADAPTIVE_DEFAULT,
    lrs: &[
        (OptimizerKind::Sgd, 0.01),
        (OptimizerKind::Adam, 1e-3),
        (OptimizerKind::Kfac, 0.01),
        (OptimizerKind::Shampoo, 3e-4),
        (OptimizerKind::KrAdagradStar, 0.01),
        (OptimizerKind::KrAdagrad, 0.01),
    ],
    grid: |k| match k {
        OptimizerKind::Adam | OptimizerKind::Shampoo => vec![3e-4, 1e-3, 3e-3],
        OptimizerKind::KrAdagradStar | OptimizerKind::KrAdagrad => vec![3e-3, 0.01, 0.03, 0.1],
        _ => vec![0.01, 0.03, 0.1],
    },
    sizes: Sizes {
        epochs: 3,
        batch_size: 128,
        evals_per_epoch: 8,
        eval_every: 1,
        train: None,
        test: None,
    },
    fast: Sizes {
        epochs: 2,
        batch_size: 32,
        evals_per_epoch: 1,
        eval_every: 1,
        train: Some(128),
        test: Some(64),
    },
};
