//! The code of the book's chapter "Natural gradient and the Fisher". Each `ANCHOR` region is
//! shown in the chapter; `tests/tests/book_snippets.rs` runs every function here and checks what
//! it returns.

// ANCHOR: imports
use kron::data::LeastSquares;
use kron::layers::DenseConfig;
use kron::optim::{FisherKind, Kfac, KfacConfig, Precision};
use kron::prelude::*;
// ANCHOR_END: imports

// ANCHOR: problem
/// A least-squares problem whose inputs have second-moment eigenvalues from 1 down to 1/1000,
/// and a linear model (no bias) for it: the loss is `1/2 |x W^T - y|^2`, batch mean.
pub fn problem() -> (LeastSquares, Sequential, ParamStore) {
    let mut rng = Rng::new(0);
    let data = LeastSquares::new(1000, 20, 1, 1e3, 0.1, &mut rng);
    let mut params = ParamStore::new();
    let model = Sequential::new().push(DenseConfig::new(20, 1).with_bias(false).build(
        &mut params,
        "lin",
        &mut rng,
    ));
    (data, model, params)
}
// ANCHOR_END: problem

// ANCHOR: natural_step
/// KFAC as a plain natural-gradient method: learning rate 1, no momentum, no clipping, the
/// statistics of the current batch alone (no running average), inverted every step, (almost)
/// no damping, statistics in `f64`.
pub fn natural_gradient(fisher: FisherKind) -> KfacConfig {
    KfacConfig::new(1.0)
        .with_momentum(0.0)
        .with_kl_clip(None)
        .with_damping(1e-10)
        .with_ema_decay(0.0)
        .with_inverse_period(1)
        .with_fisher(fisher)
        .with_precision(Precision::F64)
}
// ANCHOR_END: natural_step

// ANCHOR: run
/// Full-batch training for `steps` steps; returns the loss on the whole set before the first
/// step and after each one.
pub fn losses(
    model: &Sequential,
    mut params: ParamStore,
    opt: &mut dyn Optimizer,
    inputs: &Tensor,
    targets: &Tensor,
    steps: usize,
) -> Vec<f32> {
    let targets = Targets::Values(targets.clone());
    let loss =
        |p: &ParamStore| evaluate(model, p, LossKind::SquaredError, inputs, &targets, 1000).loss;
    let mut rng = Rng::new(1);
    let mut out = vec![loss(&params)];
    for _ in 0..steps {
        let step = train_step(
            model,
            LossKind::SquaredError,
            &mut params,
            opt,
            inputs,
            &targets,
            &mut rng,
        );
        if step.is_err() {
            break; // diverged: NaN or infinite gradients
        }
        out.push(loss(&params));
    }
    out
}
// ANCHOR_END: run

/// The loss curves of the three methods on the same problem from the same start, and the
/// lowest loss reachable.
pub struct Race {
    /// Gradient descent, learning rate 1 (the largest eigenvalue of the curvature is 1).
    pub gd: Vec<f32>,
    /// The natural gradient with the true Fisher (labels sampled from the model).
    pub sampled: Vec<f32>,
    /// The same with the empirical Fisher (the dataset's labels).
    pub empirical: Vec<f32>,
    /// The least-squares optimum's loss.
    pub optimum: f64,
}

// ANCHOR: race
pub fn race(steps: usize) -> Race {
    let (data, model, params) = problem();
    let (x, y) = (data.inputs(), data.targets());
    let mut gd = Sgd::new(&params, SgdConfig::new(1.0)).expect("a valid configuration");
    let mut sampled = Kfac::new(&model, &params, natural_gradient(FisherKind::Sampled))
        .expect("a valid configuration");
    let mut empirical = Kfac::new(&model, &params, natural_gradient(FisherKind::Empirical))
        .expect("a valid configuration");
    Race {
        gd: losses(&model, params.clone(), &mut gd, x, y, steps),
        sampled: losses(&model, params.clone(), &mut sampled, x, y, steps),
        empirical: losses(&model, params, &mut empirical, x, y, steps),
        optimum: data.loss(&data.solution()),
    }
}
// ANCHOR_END: race

/// Loss curves of SGD and KFAC on the problem as given and on the same problem with every input
/// feature rescaled (and the initial weights rescaled inversely, so that the model starts as the
/// same function).
pub struct Invariance {
    /// SGD on the original inputs.
    pub sgd: Vec<f32>,
    /// SGD on the rescaled inputs.
    pub sgd_rescaled: Vec<f32>,
    /// KFAC on the original inputs.
    pub kfac: Vec<f32>,
    /// KFAC on the rescaled inputs.
    pub kfac_rescaled: Vec<f32>,
}

// ANCHOR: invariance
pub fn invariance(steps: usize) -> Invariance {
    let (data, model, params) = problem();
    // The inputs measured in other units (times 10) and the weights rescaled to match (divided
    // by 10): the same model of the same data, in other coordinates.
    let (x, y) = (data.inputs(), data.targets());
    let x2 = x.scale(10.0);
    let w = params.find("lin.weight").unwrap();
    let mut params2 = params.clone();
    params2.set(w, params.get(w).scale(0.1));

    let sgd = |p: &ParamStore| Sgd::new(p, SgdConfig::new(0.01)).expect("a valid configuration");
    let kfac = |p: &ParamStore| {
        Kfac::new(&model, p, natural_gradient(FisherKind::Sampled)).expect("a valid configuration")
    };
    Invariance {
        sgd: losses(&model, params.clone(), &mut sgd(&params), x, y, steps),
        sgd_rescaled: losses(&model, params2.clone(), &mut sgd(&params2), &x2, y, steps),
        kfac: losses(&model, params.clone(), &mut kfac(&params), x, y, steps),
        kfac_rescaled: losses(&model, params2.clone(), &mut kfac(&params2), &x2, y, steps),
    }
}
// ANCHOR_END: invariance
