//! The code of the book's chapter "Training on many machines". Each `ANCHOR` region is shown
//! in the chapter; `tests/tests/book_snippets.rs` runs every function here and checks what it
//! returns.

use std::sync::Arc;

// ANCHOR: imports
use kron::optim::{Communicator, LocalGroup};
use kron::prelude::*;
use kron::{DataParallel, setup_of};
// ANCHOR_END: imports

/// A small classifier and its data: every rank builds the same from the same seed.
fn problem(params: &mut ParamStore) -> (Sequential, Tensor, Vec<usize>) {
    let mut rng = Rng::new(3);
    let model = Sequential::new()
        .push(Dense::new(params, "fc1", 8, 32, &mut rng))
        .push(Activation::Tanh)
        .push(Dropout::new(0.1))
        .push(Dense::new(params, "fc2", 32, 4, &mut rng));
    let x = Tensor::randn(&[256, 8], 0.0, 1.0, &mut rng);
    let y = (0..256)
        .map(|i| (x.data()[i * 8] > 0.0) as usize * 2 + (i % 2))
        .collect();
    (model, x, y)
}

// ANCHOR: rank
/// What every rank runs: the same model, optimizer, batches and seed; `dp` tells each rank
/// its part. Returns the final parameters.
pub fn train_rank(dp: DataParallel, steps: usize) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let mut params = ParamStore::new();
    let (model, x, y) = problem(&mut params);
    let mut opt = Kfac::new(
        &model,
        &params,
        KfacConfig::default().with_inverse_period(5),
    )?;
    // Refuse to start if another rank was started differently.
    dp.check_setup(&setup_of(&params, &opt, serde_json::json!({ "batch": 64 })))?;
    let mut rng = Rng::new(11);
    for step in 0..steps {
        // The global batch, the same on every rank: rows 64k..64(k+1).
        let k = step % 4;
        let xb = Tensor::from_vec(x.data()[k * 64 * 8..(k + 1) * 64 * 8].to_vec(), &[64, 8]);
        let yb = Targets::Classes(y[k * 64..(k + 1) * 64].to_vec());
        dp.train_step(
            &model,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt,
            &xb,
            &yb,
            &mut rng,
        )?;
    }
    Ok(params
        .iter()
        .flat_map(|(_, _, t)| t.data().to_vec())
        .collect())
}
// ANCHOR_END: rank

// ANCHOR: threads
/// `ranks` ranks as threads of this process (for trying things out, and for tests): each
/// thread gets one communicator of a [`LocalGroup`] and a rayon pool of its own.
pub fn on_threads(ranks: usize, steps: usize) -> Vec<Vec<f32>> {
    let handles: Vec<_> = LocalGroup::new(ranks)
        .into_iter()
        .map(|comm| {
            std::thread::spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                pool.install(|| train_rank(DataParallel::new(comm), steps).unwrap())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
// ANCHOR_END: threads
