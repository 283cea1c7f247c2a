//! The code of the book's chapter "Two-level KFAC". Each `ANCHOR` region is shown in the
//! chapter; `tests/tests/book_snippets.rs` runs every function here and checks what it returns.

// ANCHOR: imports
use kron::optim::{CoarseConfig, CoarseSpace, KfacConfig, Note, TwoLevelKfac};
use kron::prelude::*;
// ANCHOR_END: imports
// `mlp` is the tutorial's model function, defined in `examples/src/digits_mlp.rs`.
use kron_examples::digits_mlp::mlp;

/// What a two-level run on the digits returns.
pub struct TwoLevelRun {
    /// The mini-batch loss of every step.
    pub losses: Vec<f32>,
    /// Test accuracy at the end.
    pub accuracy: f32,
    /// The size of the coarse problem in use at the end.
    pub coarse_size: usize,
    /// The coarse notes of every step (skipped or failed corrections), rendered.
    pub coarse_notes: Vec<String>,
}

// ANCHOR: config
/// Two-level KFAC for the digits: the first level is KFAC with its own configuration; the
/// coarse space is a separate one.
pub fn configs() -> (KfacConfig, CoarseConfig) {
    let kfac = KfacConfig::new(0.03) // KFAC's learning rate, damping and periods
        .with_damping(0.1) // λ: the first level's π-split damping and the coarse λ N_i
        .with_inverse_period(10);
    let coarse = CoarseConfig::new(CoarseSpace::Residual) // one vector per layer, every step
        .with_krylov(true); // and a second, M_i^-1 r_i: a 2L x 2L coarse problem
    (kfac, coarse)
}
// ANCHOR_END: config

/// `steps` steps of `train_step` on the digits with two-level KFAC and `coarse`.
pub fn run_digits(steps: usize, coarse: CoarseConfig) -> TwoLevelRun {
    let digits = kron::data::digits();
    let seed = Rng::new(0);
    let mut params = ParamStore::new();
    let model = mlp(&mut params, &mut seed.fork(1), 64, 10);
    let (kfac, _) = configs();
    // ANCHOR: construct
    let mut opt = TwoLevelKfac::new(&model, &params, kfac, coarse).expect("a valid configuration");
    // ANCHOR_END: construct
    let mut batches = kron::data::Batches::new(digits.train.len(), 32, seed.fork(2));
    let mut rng = seed.fork(3);
    let (mut losses, mut coarse_notes) = (vec![], vec![]);
    for idx in batches.by_ref().take(steps) {
        let (x, y) = digits.train.batch(&idx);
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
        // ANCHOR: notes
        for n in &out.report.notes {
            if matches!(n, Note::CoarseSkipped { .. } | Note::CoarseFailed { .. }) {
                coarse_notes.push(n.to_string()); // the one-level direction stood this step
            }
        }
        // ANCHOR_END: notes
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
    TwoLevelRun {
        losses,
        accuracy: e.accuracy.unwrap(),
        coarse_size: opt
            .coarse_matrix()
            .map_or(0, |m| (m.len() as f64).sqrt() as usize),
        coarse_notes,
    }
}
