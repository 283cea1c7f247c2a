//! The code of the book's chapter "The GPU backend". Each `ANCHOR` region is shown in the
//! chapter; `tests/tests/book_snippets.rs` runs every function here and checks what it returns.

// ANCHOR: imports
use kron::optim::backend::wgpu_backend;
use kron::optim::{Backend, CpuBackend, Kfac, KfacConfig, Precision};
use kron::prelude::*;
// ANCHOR_END: imports
// `mlp` is the tutorial's model function, defined in `examples/src/digits_mlp.rs`.
use kron_examples::digits_mlp::mlp;

/// What a run returns: the backend's name and the mini-batch losses.
pub struct GpuRun {
    /// The name of the backend the optimizer ran on.
    pub backend: String,
    /// The mini-batch loss of every step.
    pub losses: Vec<f32>,
}

// ANCHOR: choose
/// The wgpu backend when this build has the feature and the machine an adapter; the CPU
/// backend otherwise, with the reason on standard error.
pub fn backend() -> Box<dyn Backend> {
    match wgpu_backend() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("optimizer math on the CPU: {e}");
            Box::new(CpuBackend::new(Precision::F32))
        }
    }
}
// ANCHOR_END: choose

/// `steps` steps of KFAC on the digits with its matrix math on [`backend`].
pub fn run_digits(steps: usize) -> GpuRun {
    let digits = kron::data::digits();
    let seed = Rng::new(0);
    let mut params = ParamStore::new();
    let model = mlp(&mut params, &mut seed.fork(1), 64, 10);
    // ANCHOR: construct
    let config = KfacConfig::new(0.03)
        .with_damping(0.1)
        .with_inverse_period(10);
    let mut opt = Kfac::with_backend(model.fisher_blocks(), &params, config, backend())
        .expect("a valid configuration"); // the precision must be the backend's: f32 here
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
            &mut opt,
            &x,
            &Targets::Classes(y),
            &mut rng,
        )
        .expect("finite gradients");
        losses.push(out.loss);
    }
    GpuRun {
        backend: opt.backend_name(),
        losses,
    }
}
