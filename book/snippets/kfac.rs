//! The code of the book's chapter "KFAC". Each `ANCHOR` region is shown in the chapter;
//! `tests/tests/book_snippets.rs` runs every function here and checks what it returns.

// ANCHOR: imports
use kron::optim::{
    EigenDamping, FisherKind, InverseMethod, Kfac, KfacConfig, LevenbergMarquardt, StepReport,
};
use kron::prelude::*;
// ANCHOR_END: imports
// `mlp` is the tutorial's model function, defined in `examples/src/digits_mlp.rs`.
use kron_examples::digits_mlp::mlp;

/// What a KFAC run on the digits returns.
pub struct KfacRun {
    /// The mini-batch loss of every step.
    pub losses: Vec<f32>,
    /// The report of every step.
    pub reports: Vec<StepReport>,
    /// Test accuracy at the end.
    pub accuracy: f32,
    /// The shapes of `fc1`'s factors `A` and `G`.
    pub fc1_factors: (Vec<usize>, Vec<usize>),
    /// The damping in force after each step.
    pub damping: Vec<f32>,
}

/// `steps` steps of `train_step` on the digits with KFAC configured by `config`, on the MLP of
/// the tutorial.
fn run_digits(steps: usize, config: KfacConfig) -> KfacRun {
    let digits = kron::data::digits();
    let seed = Rng::new(0);
    let mut params = ParamStore::new();
    let model = mlp(&mut params, &mut seed.fork(1), 64, 10);
    // ANCHOR: construct
    let mut opt = Kfac::new(&model, &params, config).expect("a valid configuration"); // reads the model's Fisher blocks
    // ANCHOR_END: construct
    let mut batches = kron::data::Batches::new(digits.train.len(), 32, seed.fork(2));
    let mut rng = seed.fork(3);
    let (mut losses, mut reports, mut damping) = (vec![], vec![], vec![]);
    for idx in batches.by_ref().take(steps) {
        let (x, y) = digits.train.batch(&idx);
        let y = Targets::Classes(y);
        let out = train_step(
            &model,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt,
            &x,
            &y,
            &mut rng,
        )
        .expect("finite gradients");
        losses.push(out.loss);
        reports.push(out.report);
        damping.push(opt.damping());
    }
    let test_y = Targets::Classes(digits.test.labels().to_vec());
    let e = evaluate(
        &model,
        &params,
        LossKind::CrossEntropy,
        digits.test.inputs(),
        &test_y,
        512,
    );
    // ANCHOR: factors
    let (a, g) = opt.factors("fc1").expect("fc1 has statistics"); // running averages A and G
    // ANCHOR_END: factors
    KfacRun {
        losses,
        reports,
        accuracy: e.accuracy.unwrap(),
        fc1_factors: (a.shape().to_vec(), g.shape().to_vec()),
        damping,
    }
}

// ANCHOR: config
/// KFAC with the defaults spelled out, apart from the learning rate, the damping and the
/// inverse period, which suit this small classifier.
pub fn digits_config() -> KfacConfig {
    KfacConfig::new(0.03) // learning rate (a constant schedule)
        .with_damping(0.1) // λ, split between the factors by the π rule
        .with_inverse_period(10) // refresh the inverses every 10 steps (default 20)
        .with_stats_period(1) // fold the statistics into the averages every step
        .with_ema_decay(0.95) // running-average decay ε, warm-started
        .with_fisher(FisherKind::Sampled) // labels sampled from the model: the true Fisher
        .with_kl_clip(Some(1e-3)) // κ
        .with_momentum(0.9)
        .with_method(InverseMethod::Inverse) // explicit damped inverses
}
// ANCHOR_END: config

/// KFAC with [`digits_config`] for `steps` steps.
pub fn kfac_digits(steps: usize) -> KfacRun {
    run_digits(steps, digits_config())
}

// ANCHOR: eigen_lm
/// The eigenbasis method with exact Tikhonov damping of the Kronecker product, and the damping
/// adapted by the Levenberg-Marquardt rule every 5 steps.
pub fn adaptive_config() -> KfacConfig {
    digits_config()
        .with_method(InverseMethod::Eigen(EigenDamping::Tikhonov))
        .with_adaptive_damping(Some(LevenbergMarquardt::default()))
}
// ANCHOR_END: eigen_lm

/// KFAC with [`adaptive_config`] for `steps` steps.
pub fn kfac_adaptive(steps: usize) -> KfacRun {
    run_digits(steps, adaptive_config())
}
