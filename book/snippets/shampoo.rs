//! The code of the book's chapter "Shampoo and KrADagrad". Each `ANCHOR` region is shown in
//! the chapter; `tests/tests/book_snippets.rs` runs every function here and checks what it
//! returns.

// ANCHOR: imports
use kron::optim::{
    AdaptiveConfig, BlockingConfig, Graft, KrAdagrad, KrAdagradStar, Momentum, Precision, Ridge,
    RootMethod, Shampoo, TensorLayout,
};
use kron::prelude::*;
// ANCHOR_END: imports
// `mlp` is the tutorial's model function, defined in `examples/src/digits_mlp.rs`.
use kron_examples::digits_mlp::mlp;

// ANCHOR: shampoo_config
/// Shampoo for the digits classifier: the library's defaults (Meta's AlgoPerf configuration)
/// with the learning rate, the root period and the first preconditioned step of a short run.
pub fn shampoo_config() -> AdaptiveConfig {
    AdaptiveConfig::shampoo()
        .with_lr(1e-3) // the grafted Adam's step size
        .with_refresh_period(10) // inverse fourth roots every 10 steps (default 100)
        .with_start_step(10) // Adam alone before step 10
        .with_graft(Some(Graft::Adam {
            beta1: 0.0, // momentum is applied once, to the grafted direction
            beta2: 0.999,
            eps: 1e-8,
        }))
        .with_epsilon(Ridge::Absolute(1e-12)) // added to the eigenvalues before the root
        .with_roots(RootMethod::EIGH_F64) // f64 eigendecompositions on the host
        .with_blocking(
            BlockingConfig::DEFAULT
                .with_max_dim(1024) // longer axes are split into blocks
                .with_layout(TensorLayout::Matrix), // conv weights as out x (in kh kw)
        )
}
// ANCHOR_END: shampoo_config

// ANCHOR: krad_config
/// KrADagrad* and KrADagrad: the authors' settings (f32 throughout, blocks of 128) with the
/// epsilons their MNIST autoencoder runs tuned.
pub fn kradagrad_configs() -> (AdaptiveConfig, AdaptiveConfig) {
    let star = AdaptiveConfig::kradagrad_star()
        .with_lr(0.1) // the step norm is lr |G| (SGD-norm grafting)
        .with_epsilon(Ridge::Absolute(3e-4)) // the inverse statistic starts at I / 3e-4
        .with_refresh_period(10) // the positive roots P^(1/4)
        .with_momentum(Momentum::nesterov(0.9))
        .with_precision(Precision::F32);
    let krad = AdaptiveConfig::kradagrad()
        .with_lr(0.1)
        .with_epsilon(Ridge::Absolute(8.5e-4)) // the damping step P <- P - eps P P
        .with_refresh_period(10); // P^(1/2), for the axes updated since
    (star, krad)
}
// ANCHOR_END: krad_config

/// What a run returns: the mini-batch loss of every step and the final test accuracy.
pub struct AdaptiveRun {
    /// The mini-batch losses.
    pub losses: Vec<f32>,
    /// Test accuracy at the end.
    pub accuracy: f32,
}

/// `steps` steps of `train_step` on the digits with the optimizer `which` (0 Shampoo, 1
/// KrADagrad*, 2 KrADagrad).
pub fn run_digits(steps: usize, which: usize) -> AdaptiveRun {
    let digits = kron::data::digits();
    let seed = Rng::new(0);
    let mut params = ParamStore::new();
    let model = mlp(&mut params, &mut seed.fork(1), 64, 10);
    let (star, krad) = kradagrad_configs();
    // ANCHOR: construct
    let mut opt: Box<dyn Optimizer> = match which {
        0 => Box::new(Shampoo::new(&params, shampoo_config()).expect("a valid configuration")),
        1 => Box::new(KrAdagradStar::new(&params, star).expect("a valid configuration")),
        _ => Box::new(KrAdagrad::new(&params, krad).expect("a valid configuration")),
    }; // no model needed: they read only parameter gradients
    // ANCHOR_END: construct
    let mut batches = kron::data::Batches::new(digits.train.len(), 32, seed.fork(2));
    let mut rng = seed.fork(3);
    let mut losses = vec![];
    for idx in batches.by_ref().take(steps) {
        let (x, y) = digits.train.batch(&idx);
        let out = train_step(
            &model,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt, // a Box<dyn Optimizer> is an Optimizer
            &x,
            &Targets::Classes(y),
            &mut rng,
        )
        .expect("finite gradients");
        losses.push(out.loss);
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
    AdaptiveRun {
        losses,
        accuracy: e.accuracy.unwrap(),
    }
}
