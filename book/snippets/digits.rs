//! The code of the book's chapter "Tutorial: digits". Each `ANCHOR` region is shown in the
//! chapter; `tests/tests/book_snippets.rs` runs every function here and checks what it returns.

// ANCHOR: imports
use std::error::Error;
use std::path::Path;

use kron::TrainState;
use kron::data::{Batches, Dataset};
use kron::optim::{Kfac, KfacConfig};
use kron::prelude::*;
// ANCHOR_END: imports
// The model function the chapter shows from `examples/src/digits_mlp.rs`.
use kron_examples::digits_mlp::mlp;

/// What the training run of the tutorial returns.
pub struct Trained {
    /// Test accuracy of the untrained model.
    pub accuracy_before: f32,
    /// Test accuracy after training.
    pub accuracy_after: f32,
    /// Test loss after training.
    pub test_loss: f32,
    /// The mini-batch loss of every step.
    pub losses: Vec<f32>,
    /// The test accuracy at the end of each epoch.
    pub accuracy_by_epoch: Vec<f32>,
}

// ANCHOR: train
/// Trains the digits MLP with Adam for `epochs` epochs of mini-batches of 32, and evaluates it
/// on the test set before training and after each epoch.
pub fn train_digits(epochs: usize) -> Trained {
    let digits = kron::data::digits(); // bundled: 1437 training and 360 test images of 8x8
    let seed = Rng::new(0);

    // The model and its parameters, initialized from their own stream.
    let mut params = ParamStore::new();
    let model = mlp(&mut params, &mut seed.fork(1), digits.train.features(), 10);
    let mut opt = Adam::new(&params, AdamConfig::new(1e-3)).expect("a valid configuration");

    // Seeded batches (their own stream) and the training loop's generator.
    let mut batches = Batches::new(digits.train.len(), 32, seed.fork(2));
    let mut rng = seed.fork(3);

    let test_y = Targets::Classes(digits.test.labels().to_vec());
    let test = |params: &ParamStore| {
        evaluate(
            &model,
            params,
            LossKind::CrossEntropy,
            digits.test.inputs(),
            &test_y,
            512,
        )
    };
    let before = test(&params);

    let mut losses = Vec::new();
    let mut accuracy_by_epoch = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        // One epoch: every training example once, in this epoch's shuffled order.
        while let Some(idx) = batches.next_batch() {
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
            .expect("the gradients are finite");
            losses.push(out.loss);
        }
        let e = test(&params);
        let accuracy = e.accuracy.unwrap();
        println!(
            "epoch {epoch}: test loss {:.4}, accuracy {:.1}%",
            e.loss,
            100.0 * accuracy
        );
        accuracy_by_epoch.push(accuracy);
    }

    let after = test(&params);
    Trained {
        accuracy_before: before.accuracy.unwrap(),
        accuracy_after: after.accuracy.unwrap(),
        test_loss: after.loss,
        losses,
        accuracy_by_epoch,
    }
}
// ANCHOR_END: train

// ANCHOR: steps
/// `steps` training steps from wherever `batches` and `rng` stand, across epoch boundaries.
fn train(
    model: &dyn Module,
    params: &mut ParamStore,
    opt: &mut dyn Optimizer,
    batches: &mut Batches,
    rng: &mut Rng,
    data: &Dataset,
    steps: usize,
) -> Result<(), Box<dyn Error>> {
    for idx in batches.by_ref().take(steps) {
        let (x, y) = data.batch(&idx);
        let y = Targets::Classes(y);
        train_step(model, LossKind::CrossEntropy, params, opt, &x, &y, rng)?;
    }
    Ok(())
}
// ANCHOR_END: steps

/// The recipe of the checkpoint example.
fn kfac_config() -> KfacConfig {
    KfacConfig::new(0.03)
        .with_damping(0.1)
        .with_inverse_period(10)
}

/// What the checkpoint example returns: the parameters and optimizer state of a run that never
/// stopped, and of one that was saved, dropped and loaded half-way.
pub struct Resumed {
    /// The uninterrupted run's parameters.
    pub straight: ParamStore,
    /// Its optimizer state.
    pub straight_state: kron::optim::OptimState,
    /// The resumed run's parameters.
    pub resumed: ParamStore,
    /// Its optimizer state.
    pub resumed_state: kron::optim::OptimState,
    /// The training state read back from the file.
    pub loaded: TrainState,
}

/// Trains with KFAC for 40 steps, saves a checkpoint to `path`, trains 40 more; then builds a
/// fresh model and optimizer, loads the checkpoint and trains the same 40 steps again.
pub fn checkpoint_and_resume(path: &Path) -> Result<Resumed, Box<dyn Error>> {
    let digits = kron::data::digits();
    let seed = Rng::new(7);
    let mut params = ParamStore::new();
    let model = mlp(&mut params, &mut seed.fork(1), 64, 10);
    let mut opt = Kfac::new(&model, &params, kfac_config())?;
    let mut batches = Batches::new(digits.train.len(), 32, seed.fork(2));
    let mut rng = seed.fork(3);
    train(
        &model,
        &mut params,
        &mut opt,
        &mut batches,
        &mut rng,
        &digits.train,
        40,
    )?;

    // ANCHOR: save
    // Everything a run needs to go on: parameters, optimizer state (for KFAC: factors,
    // inverses, momentum, counters, damping), the loop's generator and the batch position.
    let state = TrainState {
        step: 40,
        rng: rng.clone(),
        data: Some(batches.state()),
    };
    save_checkpoint(path, &params, &opt, &state)?;
    // ANCHOR_END: save

    train(
        &model,
        &mut params,
        &mut opt,
        &mut batches,
        &mut rng,
        &digits.train,
        40,
    )?;

    // ANCHOR: resume
    // A fresh start, as in a new process: the same model and optimizer recipe (any initial
    // values: the checkpoint overwrites them), then the saved state.
    let mut params2 = ParamStore::new();
    let model2 = mlp(&mut params2, &mut Rng::new(12345), 64, 10);
    let mut opt2 = Kfac::new(&model2, &params2, kfac_config())?;
    let loaded = load_checkpoint(path, &mut params2, &mut opt2)?;
    let saved = loaded
        .data
        .clone()
        .ok_or("the checkpoint holds no batch position")?;
    let mut batches2 = Batches::resume(saved, digits.train.len())?;
    let mut rng2 = loaded.rng.clone();
    train(
        &model2,
        &mut params2,
        &mut opt2,
        &mut batches2,
        &mut rng2,
        &digits.train,
        40,
    )?;
    // ANCHOR_END: resume

    Ok(Resumed {
        straight_state: opt.state(),
        straight: params,
        resumed_state: opt2.state(),
        resumed: params2,
        loaded,
    })
}
