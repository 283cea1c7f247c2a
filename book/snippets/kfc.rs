//! The code of the book's chapter "KFC". Each `ANCHOR` region is shown in the chapter;
//! `tests/tests/book_snippets.rs` runs every function here and checks what it returns.

use kron::data::{Batches, mnist_10k};
use kron::layers::Module;
use kron::optim::{Kfac, KfacConfig};
use kron::prelude::*;
use kron_examples::convnet::convnet;

/// What the KFC run returns.
pub struct KfcRun {
    /// For each step, the number of layers whose statistics the optimizer asked the tape for.
    pub captured: Vec<usize>,
    /// The mini-batch loss of every step.
    pub losses: Vec<f32>,
    /// `Ω` and `Γ` of the second convolution, `features.1`.
    pub omega: Tensor,
    /// See `omega`.
    pub gamma: Tensor,
    /// The number of Fisher blocks of the model, and how many are convolutions.
    pub blocks: (usize, usize),
}

// ANCHOR: config
/// KFC for the conv net: the library defaults (conv statistics every 10 steps, dense ones every
/// step) with the statistics of each step taken from the first 16 examples of the batch.
pub fn kfc_config() -> KfacConfig {
    KfacConfig::new(0.03)
        .with_conv_stats_period(10) // the default, spelled out
        .with_stats_examples(Some(16))
}
// ANCHOR_END: config

/// Trains the example's conv net on 32-image batches of the bundled MNIST digits for `steps`
/// steps, recording what each step captured.
pub fn kfc_run(steps: usize) -> KfcRun {
    let data = mnist_10k();
    let seed = Rng::new(0);
    let mut params = ParamStore::new();
    let model = convnet(&mut params, &mut seed.fork(1), 1, 10);
    let blocks = model.fisher_blocks();
    let convs = blocks.iter().filter(|b| b.is_conv()).count();
    let mut opt = Kfac::new(&model, &params, kfc_config()).expect("a valid configuration");
    let mut batches = Batches::new(data.train.len(), 32, seed.fork(2));
    let mut rng = seed.fork(3);
    let (mut captured, mut losses) = (vec![], vec![]);
    for idx in batches.by_ref().take(steps) {
        // ANCHOR: wants
        // What the next step will record: every block on statistics steps of the convolutions,
        // the dense classifier alone in between.
        captured.push(opt.wants().capture.len());
        // ANCHOR_END: wants
        let (x, y) = data.train.batch_nchw(&idx);
        let out = train_step(
            &model,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt,
            &x,
            &Targets::Classes(y),
            &mut rng,
        )
        .expect("finite gradients");
        losses.push(out.loss);
    }
    let (omega, gamma) = opt.factors("features.1").expect("conv statistics");
    KfcRun {
        captured,
        losses,
        omega,
        gamma,
        blocks: (blocks.len(), convs),
    }
}
