//! The code of the book's chapter "Your own model". Each `ANCHOR` region is shown in the
//! chapter; `tests/tests/book_snippets.rs` runs every function here and checks what it returns.

use std::error::Error;
use std::path::Path;

// ANCHOR: imports
use kron::data::{BatchState, Batches, Dataset};
use kron::prelude::*;
// ANCHOR_END: imports

// ANCHOR: model
kron::module! {
    /// A residual classifier: `h = relu(stem(x))`, then `h + down(relu(up(h)))`, then the
    /// class scores.
    pub struct ResidualNet {
        /// From the pixels to the residual width.
        pub stem: Dense,
        /// The residual branch, widening...
        pub up: Dense,
        /// ...and back to the residual width.
        pub down: Dense,
        /// The class scores.
        pub head: Dense,
    }

    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        let h = self.stem.forward(x).relu();
        let h = h + self.down.forward(self.up.forward(h).relu());
        self.head.forward(h)
    }
}

impl ResidualNet {
    /// The net from `inputs` features to `classes` scores. Its layers get no names of their
    /// own: the store numbers them, `0` to `3`, in the order they are created.
    pub fn new(params: &mut ParamStore, rng: &mut Rng, inputs: usize, classes: usize) -> Self {
        ResidualNet {
            stem: Dense::new(params, "", inputs, 32, rng),
            up: Dense::new(params, "", 32, 64, rng),
            down: Dense::new(params, "", 64, 32, rng),
            head: Dense::new(params, "", 32, classes, rng),
        }
    }
}
// ANCHOR_END: model

// ANCHOR: recipe
/// KFAC's recipe for the digits, refusing a model with parameters outside every Fisher block.
fn recipe() -> KfacConfig {
    KfacConfig::new(0.03)
        .with_damping(0.1)
        .with_inverse_period(10)
        .with_strict_blocks(true)
}

/// A batch of the digits from its example indices, as the trainer takes it.
fn batch(data: &Dataset, idx: &[usize]) -> (Tensor, Targets) {
    let (x, y) = data.batch(idx);
    (x, Targets::Classes(y))
}
// ANCHOR_END: recipe

/// What [`train`] returns.
pub struct Trained {
    /// The names of the parameters, in the store's order.
    pub names: Vec<String>,
    /// Each epoch's mean training loss.
    pub epoch_losses: Vec<f32>,
    /// Test accuracy after training.
    pub accuracy: f32,
    /// Steps taken.
    pub steps: u64,
}

/// Trains [`ResidualNet`] on the digits with KFAC for `epochs` epochs.
pub fn train(epochs: usize) -> Result<Trained, Box<dyn Error>> {
    // ANCHOR: train
    let digits = kron::data::digits(); // bundled: 1437 training and 360 test images of 8x8
    let seed = Rng::new(0);

    let mut params = ParamStore::new();
    let model = ResidualNet::new(&mut params, &mut seed.fork(1), digits.train.features(), 10);
    let names: Vec<String> = params.iter().map(|(_, name, _)| name.to_string()).collect();
    let kfac = Kfac::new(&model, &params, recipe())?;
    let mut trainer = Trainer::new(model, params, kfac, LossKind::CrossEntropy, seed.fork(3));

    let mut batches = Batches::new(digits.train.len(), 32, seed.fork(2));
    let mut epoch_losses = Vec::new();
    for _ in 0..epochs {
        let epoch = trainer.epoch(&mut batches, |idx| batch(&digits.train, idx))?;
        for warning in &epoch.warnings {
            eprintln!("{warning}");
        }
        epoch_losses.push(epoch.mean_loss);
    }

    let test_y = Targets::Classes(digits.test.labels().to_vec());
    let test = trainer.evaluate(digits.test.inputs(), &test_y, 512);
    // ANCHOR_END: train
    Ok(Trained {
        names,
        epoch_losses,
        accuracy: test.accuracy.unwrap(),
        steps: trainer.steps(),
    })
}

/// What [`checkpoint_and_resume`] returns.
pub struct Resumed {
    /// The parameters of the run that never stopped.
    pub straight: ParamStore,
    /// The parameters of the run saved mid-epoch and resumed in a new trainer.
    pub resumed: ParamStore,
    /// The batch position the checkpoint held.
    pub position: BatchState,
    /// Steps the resumed trainer counts at the end.
    pub steps: u64,
}

/// `steps` steps of `trainer` from wherever `batches` stands, across epochs.
fn steps(
    trainer: &mut Trainer<ResidualNet>,
    batches: &mut Batches,
    data: &Dataset,
    steps: usize,
) -> Result<(), Box<dyn Error>> {
    for idx in batches.by_ref().take(steps) {
        let (x, y) = batch(data, &idx);
        trainer.step(&x, &y)?;
    }
    Ok(())
}

/// Trains 80 steps without stopping, and again with a checkpoint at step 60 (mid-epoch)
/// resumed in a new trainer.
pub fn checkpoint_and_resume(path: &Path) -> Result<Resumed, Box<dyn Error>> {
    let digits = kron::data::digits();
    let fresh = |init: u64, loop_seed: u64| -> Result<Trainer<ResidualNet>, Box<dyn Error>> {
        let mut params = ParamStore::new();
        let model = ResidualNet::new(&mut params, &mut Rng::new(init), 64, 10);
        let kfac = Kfac::new(&model, &params, recipe())?;
        let rng = Rng::new(loop_seed);
        Ok(Trainer::new(
            model,
            params,
            kfac,
            LossKind::CrossEntropy,
            rng,
        ))
    };

    let mut straight = fresh(1, 3)?;
    let mut straight_batches = Batches::new(digits.train.len(), 32, Rng::new(2));
    steps(&mut straight, &mut straight_batches, &digits.train, 80)?;

    let mut trainer = fresh(1, 3)?;
    let mut batches = Batches::new(digits.train.len(), 32, Rng::new(2));
    steps(&mut trainer, &mut batches, &digits.train, 60)?;
    // ANCHOR: save
    // Parameters, KFAC's factors and inverses, the step count, the loop's generator and the
    // batch position, in one file.
    trainer.save(path, Some(batches.state()))?;
    // ANCHOR_END: save
    drop(trainer);

    // ANCHOR: resume
    // A new trainer as in a new process: the same model and recipe (initial values and
    // generator do not matter: the checkpoint replaces them), then the saved state.
    let mut trainer = fresh(12345, 0)?;
    let position = trainer
        .resume(path)?
        .ok_or("the checkpoint holds no batch position")?;
    let mut batches = Batches::resume(position.clone(), digits.train.len())?;
    // ANCHOR_END: resume
    steps(&mut trainer, &mut batches, &digits.train, 20)?;
    Ok(Resumed {
        straight: straight.params().clone(),
        resumed: trainer.params().clone(),
        position,
        steps: trainer.steps(),
    })
}

/// Test loss of a trained model and of the same model rebuilt from its saved weights.
pub fn weights_round_trip(path: &Path) -> Result<(f32, f32), Box<dyn Error>> {
    let digits = kron::data::digits();
    let mut params = ParamStore::new();
    let model = ResidualNet::new(&mut params, &mut Rng::new(1), 64, 10);
    let kfac = Kfac::new(&model, &params, recipe())?;
    let mut trainer = Trainer::new(model, params, kfac, LossKind::CrossEntropy, Rng::new(3));
    let mut batches = Batches::new(digits.train.len(), 32, Rng::new(2));
    trainer.epoch(&mut batches, |idx| batch(&digits.train, idx))?;
    let test_y = Targets::Classes(digits.test.labels().to_vec());

    // ANCHOR: weights
    // The weights alone, under their store names: for inference, or for other tools.
    save_weights(path, trainer.params())?;

    // Later, elsewhere: the same model, then its weights.
    let mut params = ParamStore::new();
    let model = ResidualNet::new(&mut params, &mut Rng::new(0), 64, 10);
    load_weights(path, &mut params)?;
    let reloaded = evaluate(
        &model,
        &params,
        LossKind::CrossEntropy,
        digits.test.inputs(),
        &test_y,
        512,
    );
    // ANCHOR_END: weights
    let trained = trainer.evaluate(digits.test.inputs(), &test_y, 512);
    Ok((trained.loss, reloaded.loss))
}

// ANCHOR: by_hand
/// A residual block whose scale is data, not a module: `module!` takes modules only, so its
/// `Module` is written by hand, and here it forgets `outer` in `visit_blocks`.
pub struct Scaled {
    inner: Dense,
    outer: Dense,
    scale: f32,
}

impl Module for Scaled {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        x + self.outer.forward(self.inner.forward(x).tanh()) * self.scale
    }

    fn visit_params(&self, f: &mut dyn FnMut(ParamId)) {
        self.inner.visit_params(f);
        self.outer.visit_params(f);
    }

    fn visit_blocks(&self, f: &mut dyn FnMut(&FisherBlock)) {
        self.inner.visit_blocks(f); // `outer` is missing
    }
}
// ANCHOR_END: by_hand

/// What KFAC makes of [`Scaled`]: the parameters it lists outside every block, the notes of
/// the first two steps' reports, and the error of the strict recipe.
pub struct Forgotten {
    /// `Kfac::outside_blocks`.
    pub outside: Vec<String>,
    /// The first step's notes.
    pub first_notes: Vec<Note>,
    /// The second step's notes.
    pub second_notes: Vec<Note>,
    /// The strict recipe's error, rendered.
    pub strict_error: String,
}

/// Builds [`Scaled`] and hands it to KFAC, with and without strict blocks.
pub fn forgotten_layer() -> Result<Forgotten, Box<dyn Error>> {
    let mut params = ParamStore::new();
    let mut rng = Rng::new(0);
    let model = Scaled {
        inner: Dense::new(&mut params, "inner", 4, 8, &mut rng),
        outer: Dense::new(&mut params, "outer", 8, 4, &mut rng),
        scale: 0.5,
    };
    // ANCHOR: strict
    let strict = Kfac::new(
        &model,
        &params,
        KfacConfig::default().with_strict_blocks(true),
    );
    let strict_error = match strict {
        Err(e) => e.to_string(), // names outer.weight and outer.bias
        Ok(_) => String::new(),
    };

    let kfac = Kfac::new(&model, &params, KfacConfig::default())?;
    let outside = kfac.outside_blocks().to_vec(); // ["outer.weight", "outer.bias"]
    // ANCHOR_END: strict
    let x = Tensor::randn(&[6, 4], 0.0, 1.0, &mut rng);
    let y = Targets::Values(Tensor::randn(&[6, 4], 0.0, 1.0, &mut rng));
    let mut trainer = Trainer::new(model, params, kfac, LossKind::SquaredError, rng.fork(1));
    let first_notes = trainer.step(&x, &y)?.report.notes;
    let second_notes = trainer.step(&x, &y)?.report.notes;
    Ok(Forgotten {
        outside,
        first_notes,
        second_notes,
        strict_error,
    })
}
