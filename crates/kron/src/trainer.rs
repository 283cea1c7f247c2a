//! [`Trainer`]: model, parameters, optimizer, loss and the loop's generator kept together.

use std::path::Path;

use kron_autodiff::{LossKind, ParamStore, Rng, Targets, Tensor};
use kron_data::{BatchState, Batches};
use kron_layers::Module;
use kron_optim::{Note, OptimError, Optimizer};

use crate::DataParallel;
use crate::checkpoint::{CheckpointError, TrainState, load_checkpoint, save_checkpoint};
use crate::train::{Evaluation, StepOutput, evaluate, predict};

/// The common training loop's state in one value: the model, its [`ParamStore`], the
/// optimizer, the loss, the loop's generator and the steps taken.
///
/// [`step`](Self::step) is [`train_step`](crate::train_step) on these pieces, so a `Trainer`
/// run has the very bits of the same run written with `train_step`; [`save`](Self::save) and
/// [`resume`](Self::resume) go through [`save_checkpoint`] and [`load_checkpoint`], and a
/// resumed run continues with the bits of the run that never stopped. Programs that want the
/// pieces apart (two models, a loss of their own) call `train_step` themselves.
///
/// ```
/// use kron::prelude::*;
///
/// let mut params = ParamStore::new();
/// let mut rng = Rng::new(0);
/// let model = Sequential::new()
///     .push(Dense::new(&mut params, "", 4, 8, &mut rng))
///     .push(Activation::Relu)
///     .push(Dense::new(&mut params, "", 8, 3, &mut rng));
/// let opt = Sgd::new(&params, SgdConfig::new(0.1)).unwrap();
/// let mut trainer = Trainer::new(model, params, opt, LossKind::CrossEntropy, rng.fork(1));
///
/// let x = Tensor::randn(&[6, 4], 0.0, 1.0, &mut rng);
/// let y = Targets::Classes(vec![0, 1, 2, 0, 1, 2]);
/// let first = trainer.step(&x, &y).unwrap().loss;
/// for _ in 0..20 {
///     trainer.step(&x, &y).unwrap();
/// }
/// assert_eq!(trainer.steps(), 21);
/// assert!(trainer.evaluate(&x, &y, 64).loss < first);
/// ```
pub struct Trainer<M: Module> {
    model: M,
    params: ParamStore,
    optimizer: Box<dyn Optimizer>,
    loss: LossKind,
    rng: Rng,
    steps: u64,
    data_parallel: Option<DataParallel>,
}

/// What [`Trainer::epoch`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochOutput {
    /// Steps taken (the epoch's batches).
    pub steps: usize,
    /// The mean of the steps' mini-batch losses (NaN for an epoch without batches).
    pub mean_loss: f32,
    /// The steps' notes that are signs of trouble
    /// ([`StepReport::warnings`](kron_optim::StepReport::warnings)), in step order.
    pub warnings: Vec<Note>,
}

impl<M: Module> Trainer<M> {
    /// A trainer of `model`, whose parameters are `params`, by `optimizer` (built on the same
    /// model and parameters; a `Box<dyn Optimizer>` chosen at run time is one too) on `loss`,
    /// drawing each step's randomness (dropout, the sampled Fisher's labels) from `rng`. Give
    /// the loop a stream of its own, e.g. `rng.fork(1)`.
    pub fn new(
        model: M,
        params: ParamStore,
        optimizer: impl Optimizer + 'static,
        loss: LossKind,
        rng: Rng,
    ) -> Self {
        Trainer {
            model,
            params,
            optimizer: Box::new(optimizer),
            loss,
            rng,
            steps: 0,
            data_parallel: None,
        }
    }

    /// Trains data-parallel over `dp`'s ranks ([`DataParallel::train_step`]): every rank runs
    /// the same trainer on the same global batches and trains on its shard of each;
    /// [`save`](Self::save) then writes on rank 0 only.
    ///
    /// # Errors
    /// [`SetupMismatch`](crate::SetupMismatch) (on every rank) when the ranks' models,
    /// parameter values or optimizers differ.
    pub fn data_parallel(mut self, dp: DataParallel) -> Result<Self, crate::SetupMismatch> {
        let setup = crate::setup_of(
            &self.params,
            self.optimizer.as_ref(),
            serde_json::json!({ "loss": format!("{:?}", self.loss), "steps": self.steps }),
        );
        dp.check_setup(&setup)?;
        self.data_parallel = Some(dp);
        Ok(self)
    }

    /// One training step on a mini-batch ([`train_step`](crate::train_step)); the step count
    /// advances when it succeeds.
    ///
    /// # Errors
    /// As [`train_step`](crate::train_step): a gradient with NaN or infinity, or an update the
    /// optimizer refuses; the parameters and the optimizer are left as they were.
    pub fn step(&mut self, inputs: &Tensor, targets: &Targets) -> Result<StepOutput, OptimError> {
        // One process is the data-parallel step on one rank: `train_step` itself.
        let one;
        let dp = match &self.data_parallel {
            Some(dp) => dp,
            None => {
                one = DataParallel::single();
                &one
            }
        };
        let out = dp.train_step(
            &self.model,
            self.loss,
            &mut self.params,
            self.optimizer.as_mut(),
            inputs,
            targets,
            &mut self.rng,
        )?;
        self.steps += 1;
        Ok(out)
    }

    /// The rest of `batches`' current epoch: a step on each batch, which `batch` makes from
    /// the batch's example indices (e.g. `|idx| { let (x, y) = train.batch(idx);
    /// (x, Targets::Classes(y)) }`). `batches` then stands at the next epoch's start.
    ///
    /// # Errors
    /// The first step's error; `batches` stands after the batch that failed.
    pub fn epoch(
        &mut self,
        batches: &mut Batches,
        mut batch: impl FnMut(&[usize]) -> (Tensor, Targets),
    ) -> Result<EpochOutput, OptimError> {
        let mut sum = 0.0f64;
        let mut steps = 0;
        let mut warnings = Vec::new();
        while let Some(idx) = batches.next_batch() {
            let (x, y) = batch(idx.as_slice());
            let out = self.step(&x, &y)?;
            sum += f64::from(out.loss);
            steps += 1;
            warnings.extend(out.report.warnings().cloned());
        }
        Ok(EpochOutput {
            steps,
            mean_loss: if steps == 0 {
                f32::NAN
            } else {
                (sum / steps as f64) as f32
            },
            warnings,
        })
    }

    /// Mean loss and, for classifiers, accuracy on `inputs` in eval mode, in batches of
    /// `batch` rows ([`evaluate`]).
    pub fn evaluate(&self, inputs: &Tensor, targets: &Targets, batch: usize) -> Evaluation {
        evaluate(&self.model, &self.params, self.loss, inputs, targets, batch)
    }

    /// The model's outputs on `inputs` in eval mode, in batches of `batch` rows ([`predict`]).
    pub fn predict(&self, inputs: &Tensor, batch: usize) -> Tensor {
        predict(&self.model, &self.params, inputs, batch)
    }

    /// Saves a checkpoint ([`save_checkpoint`]): parameters, optimizer state, the step count,
    /// the loop's generator and `data`, the batch iterator's position (`Some(batches.state())`)
    /// if the loop draws from one.
    ///
    /// In data-parallel training only rank 0 writes (every rank holds the same state); the
    /// others return `Ok` at once.
    ///
    /// # Errors
    /// [`CheckpointError`] naming the file if it cannot be written.
    pub fn save(&self, path: &Path, data: Option<BatchState>) -> Result<(), CheckpointError> {
        if self.data_parallel.as_ref().is_some_and(|d| d.rank() != 0) {
            return Ok(());
        }
        let state = TrainState {
            step: self.steps,
            rng: self.rng.clone(),
            data,
        };
        save_checkpoint(path, &self.params, self.optimizer.as_ref(), &state)
    }

    /// Resumes from a checkpoint written by [`save`](Self::save) ([`load_checkpoint`]):
    /// parameters, optimizer state, step count and generator. Returns the batch position saved
    /// with it, for [`Batches::resume`]. All or nothing: on error the trainer is as it was.
    ///
    /// # Errors
    /// [`CheckpointError`] naming the file and what does not fit (another optimizer, a
    /// parameter missing or of another shape, another format version).
    pub fn resume(&mut self, path: &Path) -> Result<Option<BatchState>, CheckpointError> {
        let state = load_checkpoint(path, &mut self.params, self.optimizer.as_mut())?;
        self.steps = state.step;
        self.rng = state.rng;
        Ok(state.data)
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The parameters, to change (load weights into them, edit them).
    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// The optimizer, to change (its learning rate, say).
    pub fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.optimizer.as_mut()
    }

    /// The loss.
    pub fn loss(&self) -> LossKind {
        self.loss
    }

    /// The loop's generator, as it stands.
    pub fn rng(&self) -> &Rng {
        &self.rng
    }

    /// Steps taken (counting those before a resume).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The pieces back: model, parameters, optimizer.
    pub fn into_parts(self) -> (M, ParamStore, Box<dyn Optimizer>) {
        (self.model, self.params, self.optimizer)
    }
}
