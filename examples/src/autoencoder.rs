//! The deep autoencoder of the KFAC papers (Hinton & Salakhutdinov 2006), on the bundled
//! MNIST subset or on MNIST-format data with `--data DIR`.

use kron::layers::Module;
use kron::optim::{KfacConfig, LevenbergMarquardt, StepRule};
use kron::prelude::*;

use crate::data;
use crate::example::{Config, Example, Sizes};
use crate::train::{OptimizerKind, Task};

/// The encoder widths; the decoder mirrors them.
pub const WIDTHS: [usize; 5] = [784, 1000, 500, 250, 30];

// ANCHOR: model
/// `784-1000-500-250-30` with sigmoid hidden units and a linear 30-unit code, mirrored by the
/// decoder, whose last layer emits logits for a sigmoid binary cross-entropy loss. Weights
/// start sparse (Martens 2010: 15 unit-normal incoming weights per unit), biases at zero, as
/// in the KFAC paper's autoencoders.
pub fn autoencoder(store: &mut ParamStore, rng: &mut Rng) -> Sequential {
    let mut net = Sequential::new();
    let mut widths: Vec<usize> = WIDTHS.to_vec();
    widths.extend(WIDTHS.iter().rev().skip(1));
    let last = widths.len() - 2;
    for (i, w) in widths.windows(2).enumerate() {
        let layer = DenseConfig::new(w[0], w[1])
            .with_init(Init::Sparse {
                nonzero: 15,
                std: 1.0,
            })
            .build(store, &format!("layers.{i}"), rng);
        net = net.push(layer);
        // Linear code layer (i == 3) and linear output (logits).
        if i != 3 && i != last {
            net = net.push(Activation::Sigmoid);
        }
    }
    net
}
// ANCHOR_END: model

fn task(cfg: &Config, sizes: &Sizes) -> Result<Task, String> {
    let split = data::load(cfg, data::bundled_mnist)?;
    let (train, test) = data::trimmed(&split, sizes);
    data::check("autoencoder", &train, &test, Some([28, 28]))?;
    let (x, xt) = (data::flat(&train), data::flat(&test));
    Ok(Task::new(
        x.clone(),
        Targets::Values(x),
        xt.clone(),
        Targets::Values(xt),
        LossKind::SigmoidBce,
        2000,
    ))
}

fn model(_task: &Task, store: &mut ParamStore, rng: &mut Rng) -> Box<dyn Module> {
    Box::new(autoencoder(store, rng))
}

// ANCHOR: kfac
/// KFAC as the paper runs it on its autoencoders: the step size and momentum from the exact
/// quadratic model (its Fisher products on a quarter of each batch), Levenberg-Marquardt damping
/// from 0.01, statistics on a quarter of each batch, inverses every 5 steps.
pub const KFAC: KfacConfig = KfacConfig::DEFAULT
    .with_step_rule(StepRule::QuadraticModel)
    .with_damping(0.01)
    .with_adaptive_damping(Some(LevenbergMarquardt::DEFAULT))
    .with_inverse_period(5)
    .with_stats_examples(Some(250))
    .with_curvature_examples(Some(250));
// ANCHOR_END: kfac

/// The deep autoencoder.
pub const EXAMPLE: Example = Example {
    name: "autoencoder",
    title: "autoencoder: 784-1000-500-250-30 deep autoencoder on MNIST digits",
    defaults: &[OptimizerKind::Kfac],
    task,
    model,
    kfac: KFAC,
    adaptive: crate::ADAPTIVE_DEFAULT,
    lrs: &[
        (OptimizerKind::Sgd, 0.01),
        (OptimizerKind::Adam, 1e-3),
        (OptimizerKind::Kfac, 1.0),
        (OptimizerKind::Shampoo, 1e-3),
        (OptimizerKind::KrAdagradStar, 0.01),
        (OptimizerKind::KrAdagrad, 0.01),
    ],
    grid: |k| match k {
        OptimizerKind::Adam | OptimizerKind::Shampoo => vec![3e-4, 1e-3, 3e-3],
        OptimizerKind::KrAdagradStar | OptimizerKind::KrAdagrad => vec![3e-3, 0.01, 0.03, 0.1],
        _ => vec![0.01, 0.03, 0.1],
    },
    sizes: Sizes {
        epochs: 10,
        batch_size: 1000,
        evals_per_epoch: 4,
        eval_every: 1,
        train: None,
        test: None,
    },
    fast: Sizes {
        epochs: 2,
        batch_size: 100,
        evals_per_epoch: 1,
        eval_every: 1,
        train: Some(200),
        test: Some(100),
    },
};
