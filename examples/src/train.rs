//! The training driver the examples share: batches, steps, evaluation, curves, sweeps and the
//! time-to-target comparison.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use kron::DataParallel;
use kron::data::Batches;
use kron::layers::Module;
use kron::optim::{
    Adam, AdamConfig, AdaptiveConfig, CoarseConfig, Kfac, KfacConfig, KrAdagrad, KrAdagradStar,
    Optimizer, Sgd, SgdConfig, Shampoo, TwoLevelKfac,
};
use kron::prelude::*;

use crate::report::{Curves, Point, Progress, time_to_target};
use crate::resume::{RunFiles, data_position, resume_batches};

/// The optimizers the examples offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    /// SGD with momentum 0.9.
    Sgd,
    /// Adam.
    Adam,
    /// KFAC (KFC for conv layers) as a preconditioner for SGD with momentum.
    Kfac,
    /// Two-level KFAC: KFAC's configuration plus a coarse-space correction.
    TwoLevelKfac,
    /// Shampoo.
    Shampoo,
    /// KrADagrad*.
    KrAdagradStar,
    /// KrADagrad.
    KrAdagrad,
}

impl OptimizerKind {
    /// The name used in flags and tables.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::Kfac => "kfac",
            OptimizerKind::TwoLevelKfac => "kfac-2l",
            OptimizerKind::Shampoo => "shampoo",
            OptimizerKind::KrAdagradStar => "kradagrad-star",
            OptimizerKind::KrAdagrad => "kradagrad",
        }
    }

    /// What it is, in a few words for someone who has not met it.
    pub fn describe(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "first-order: SGD with momentum",
            OptimizerKind::Adam => {
                "first-order: a step per parameter scaled by its gradient's history"
            }
            OptimizerKind::Kfac => {
                "second-order: each layer's gradient times the inverse of its \
                 Kronecker-factored Fisher"
            }
            OptimizerKind::TwoLevelKfac => {
                "second-order: KFAC plus a coarse correction for the curvature between layers"
            }
            OptimizerKind::Shampoo => {
                "adaptive: Kronecker-factored preconditioning from the gradients' second moments"
            }
            OptimizerKind::KrAdagradStar | OptimizerKind::KrAdagrad => {
                "adaptive: Shampoo-like preconditioning kept as inverse statistics"
            }
        }
    }

    /// Whether it is a first-order baseline.
    pub fn first_order(self) -> bool {
        matches!(self, OptimizerKind::Sgd | OptimizerKind::Adam)
    }
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            "kfac" => Ok(OptimizerKind::Kfac),
            "kfac-2l" => Ok(OptimizerKind::TwoLevelKfac),
            "shampoo" => Ok(OptimizerKind::Shampoo),
            "kradagrad-star" => Ok(OptimizerKind::KrAdagradStar),
            "kradagrad" => Ok(OptimizerKind::KrAdagrad),
            _ => Err(format!(
                "unknown optimizer {s:?} (expected sgd, adam, kfac, kfac-2l, shampoo, \
                 kradagrad or kradagrad-star)"
            )),
        }
    }
}

/// Where the optimizer's matrix math runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU backend.
    Cpu,
    /// The wgpu backend (needs the `wgpu` feature and an adapter).
    Wgpu,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" => Ok(BackendKind::Wgpu),
            _ => Err(format!("unknown backend {s:?} (expected cpu or wgpu)")),
        }
    }
}

/// A supervised problem: training and test data, the fixed training subset whose loss the
/// curves report, and the loss.
pub struct Task {
    /// Training inputs (first dimension: examples).
    pub train_x: Tensor,
    /// Training targets.
    pub train_t: Targets,
    /// Test inputs.
    pub test_x: Tensor,
    /// Test targets.
    pub test_t: Targets,
    /// A fixed subset of the training data on which the "train loss" is measured.
    pub eval_x: Tensor,
    /// Its targets.
    pub eval_t: Targets,
    /// The loss.
    pub loss: LossKind,
    /// Random translation of training batches, if any.
    pub augment: Option<Shift>,
}

/// Data augmentation: each training image is translated by a random whole number of pixels in
/// `-max..=max` on each axis (zeros fill the border), drawn from the run's seeded stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shift {
    /// Channels, height and width of an image (the rows of the input, flattened or not).
    pub image: [usize; 3],
    /// Largest translation in pixels.
    pub max: usize,
}

impl Shift {
    /// Translates every image of a batch.
    pub fn apply(&self, x: &Tensor, rng: &mut Rng) -> Tensor {
        let [c, h, w] = self.image;
        let row = c * h * w;
        let m = self.max as i64;
        let mut out = vec![0.0f32; x.numel()];
        for (src, dst) in x.data().chunks(row).zip(out.chunks_mut(row)) {
            let dy = rng.below(2 * self.max as u64 + 1) as i64 - m;
            let dx = rng.below(2 * self.max as u64 + 1) as i64 - m;
            for ch in 0..c {
                for y in 0..h as i64 {
                    let sy = y - dy;
                    if sy < 0 || sy >= h as i64 {
                        continue;
                    }
                    for xx in 0..w as i64 {
                        let sx = xx - dx;
                        if sx >= 0 && sx < w as i64 {
                            dst[ch * h * w + (y as usize) * w + xx as usize] =
                                src[ch * h * w + (sy as usize) * w + sx as usize];
                        }
                    }
                }
            }
        }
        Tensor::from_vec(out, x.shape())
    }

    /// Advances `rng` exactly as [`apply`](Self::apply) on `images` images would, without the
    /// images: a resumed run's augmentation stream then stands where the interrupted run's stood.
    pub fn skip(&self, rng: &mut Rng, images: u64) {
        for _ in 0..images {
            rng.below(2 * self.max as u64 + 1);
            rng.below(2 * self.max as u64 + 1);
        }
    }
}

/// The rows `idx` of a tensor (first dimension).
pub fn gather_rows(t: &Tensor, idx: &[usize]) -> Tensor {
    let row: usize = t.shape()[1..].iter().product();
    let mut data = Vec::with_capacity(idx.len() * row);
    for &i in idx {
        data.extend_from_slice(&t.data()[i * row..(i + 1) * row]);
    }
    let mut shape = t.shape().to_vec();
    shape[0] = idx.len();
    Tensor::from_vec(data, &shape)
}

/// The targets of the examples `idx`.
pub fn gather_targets(t: &Targets, idx: &[usize]) -> Targets {
    match t {
        Targets::Classes(c) => Targets::Classes(idx.iter().map(|&i| c[i]).collect()),
        Targets::Values(v) => Targets::Values(gather_rows(v, idx)),
    }
}

impl Task {
    /// A task whose "train loss" is measured on the first `eval` training examples.
    pub fn new(
        train_x: Tensor,
        train_t: Targets,
        test_x: Tensor,
        test_t: Targets,
        loss: LossKind,
        eval: usize,
    ) -> Self {
        let n = train_x.dim(0).min(eval);
        let idx: Vec<usize> = (0..n).collect();
        Task {
            eval_x: gather_rows(&train_x, &idx),
            eval_t: gather_targets(&train_t, &idx),
            train_x,
            train_t,
            test_x,
            test_t,
            loss,
            augment: None,
        }
    }

    /// With random translations of the training batches.
    pub fn with_augment(mut self, shift: Shift) -> Self {
        self.augment = Some(shift);
        self
    }

    /// Training examples.
    pub fn len(&self) -> usize {
        self.train_x.dim(0)
    }

    /// Whether there is no training example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How one run trains.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Its learning rate.
    pub lr: f32,
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Seed of initialization, shuffling, dropout and sampled labels.
    pub seed: u64,
    /// Evaluations per epoch (at least 1: the end of the epoch).
    pub evals_per_epoch: usize,
    /// Epochs between evaluations (the last epoch is always evaluated).
    pub eval_every: usize,
    /// No progress bar.
    pub quiet: bool,
    /// Where the optimizer's matrix math runs.
    pub backend: BackendKind,
    /// Print every step's report (loss, step size, momentum, damping) to stderr.
    pub trace: bool,
    /// Data-parallel training over these ranks (`None`: one process). Every rank runs the
    /// same program; rank 0 alone writes checkpoints, weights and the progress bar.
    pub data_parallel: Option<DataParallel>,
}

/// Builds a model into a parameter store.
pub type ModelFn<'a> = &'a dyn Fn(&mut ParamStore, &mut Rng) -> Box<dyn Module>;

/// Builds an optimizer for a model, given the learning rate.
pub type OptimFn<'a> = &'a dyn Fn(
    OptimizerKind,
    f32,
    &dyn Module,
    &ParamStore,
    BackendKind,
) -> Result<Box<dyn Optimizer>, String>;

/// The settings of the Kronecker-factored adaptive methods an example runs (their learning
/// rates come from its tuned rates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveRecipe {
    /// Shampoo's.
    pub shampoo: AdaptiveConfig,
    /// KrADagrad*'s.
    pub kradagrad_star: AdaptiveConfig,
    /// KrADagrad's.
    pub kradagrad: AdaptiveConfig,
}

impl AdaptiveRecipe {
    /// With roots every `period` steps for all three, and Shampoo preconditioning from then.
    pub const fn with_refresh_period(mut self, period: u64) -> Self {
        self.shampoo = self
            .shampoo
            .with_refresh_period(period)
            .with_start_step(period);
        self.kradagrad_star = self.kradagrad_star.with_refresh_period(period);
        self.kradagrad = self.kradagrad.with_refresh_period(period);
        self
    }
}

/// The examples' optimizer recipes: SGD with momentum 0.9 (Nesterov), Adam, KFAC with the given
/// configuration (two-level KFAC with it and the given coarse space), and Shampoo, KrADagrad*
/// and KrADagrad with theirs, each at the given learning rate.
pub fn default_optimizer(
    kfac: KfacConfig,
    coarse: CoarseConfig,
    adaptive: AdaptiveRecipe,
) -> impl Fn(
    OptimizerKind,
    f32,
    &dyn Module,
    &ParamStore,
    BackendKind,
) -> Result<Box<dyn Optimizer>, String> {
    move |kind, lr, model, params, backend| -> Result<Box<dyn Optimizer>, String> {
        let e = |e: kron::optim::OptimError| e.to_string();
        Ok(match kind {
            OptimizerKind::Sgd => Box::new(
                Sgd::new(
                    params,
                    SgdConfig::new(lr).with_momentum(0.9).with_nesterov(true),
                )
                .map_err(e)?,
            ),
            OptimizerKind::Adam => Box::new(Adam::new(params, AdamConfig::new(lr)).map_err(e)?),
            OptimizerKind::Kfac => {
                let cfg = kfac.with_schedule(kron::optim::Schedule::constant(lr));
                match backend {
                    BackendKind::Cpu => Box::new(Kfac::new(model, params, cfg).map_err(e)?),
                    BackendKind::Wgpu => Box::new(
                        Kfac::with_backend(model.fisher_blocks(), params, cfg, wgpu_backend()?)
                            .map_err(e)?,
                    ),
                }
            }
            OptimizerKind::TwoLevelKfac => {
                let cfg = kfac.with_schedule(kron::optim::Schedule::constant(lr));
                match backend {
                    BackendKind::Cpu => {
                        Box::new(TwoLevelKfac::new(model, params, cfg, coarse).map_err(e)?)
                    }
                    BackendKind::Wgpu => Box::new(
                        TwoLevelKfac::with_backend(
                            model.fisher_blocks(),
                            params,
                            cfg,
                            coarse,
                            wgpu_backend()?,
                        )
                        .map_err(e)?,
                    ),
                }
            }
            OptimizerKind::Shampoo => {
                let cfg = adaptive.shampoo.with_lr(lr);
                match backend {
                    BackendKind::Cpu => Box::new(Shampoo::new(params, cfg).map_err(e)?),
                    BackendKind::Wgpu => {
                        Box::new(Shampoo::with_backend(params, cfg, wgpu_backend()?).map_err(e)?)
                    }
                }
            }
            OptimizerKind::KrAdagradStar => {
                let cfg = adaptive.kradagrad_star.with_lr(lr);
                match backend {
                    BackendKind::Cpu => Box::new(KrAdagradStar::new(params, cfg).map_err(e)?),
                    BackendKind::Wgpu => Box::new(
                        KrAdagradStar::with_backend(params, cfg, wgpu_backend()?).map_err(e)?,
                    ),
                }
            }
            OptimizerKind::KrAdagrad => {
                let cfg = adaptive.kradagrad.with_lr(lr);
                match backend {
                    BackendKind::Cpu => Box::new(KrAdagrad::new(params, cfg).map_err(e)?),
                    BackendKind::Wgpu => {
                        Box::new(KrAdagrad::with_backend(params, cfg, wgpu_backend()?).map_err(e)?)
                    }
                }
            }
        })
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_backend() -> Result<Box<dyn kron::optim::Backend>, String> {
    kron::optim::backend::WgpuBackend::new()
        .map(|b| Box::new(b) as Box<dyn kron::optim::Backend>)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_backend() -> Result<Box<dyn kron::optim::Backend>, String> {
    Err("the wgpu backend needs the `wgpu` feature: cargo run --release --features wgpu --example ...".into())
}

/// The outcome of one run.
pub struct RunResult {
    /// Its curves.
    pub curves: Curves,
    /// Why it stopped early, if it did (a step refused for NaN gradients, say).
    pub stopped: Option<String>,
    /// Notes from the optimizer's reports (failed refreshes, skipped statistics), deduplicated.
    pub notes: Vec<String>,
}

/// Trains one model from scratch and records its curves.
pub fn run(
    task: &Task,
    model_fn: ModelFn<'_>,
    optim_fn: OptimFn<'_>,
    spec: &RunSpec,
) -> Result<RunResult, String> {
    run_with(task, model_fn, optim_fn, spec, &RunFiles::default())
}

/// Trains one model, from scratch or from `files.resume`, up to `spec.epochs` epochs in all,
/// writing `files.checkpoint` at the end of every epoch and `files.save` at the end, and
/// records its curves. A resumed run takes the same steps, to the bit, as one that never
/// stopped; its curves start with an evaluation where it resumed, and its seconds count from
/// there. Errors (a file that cannot be read or written) name the file.
pub fn run_with(
    task: &Task,
    model_fn: ModelFn<'_>,
    optim_fn: OptimFn<'_>,
    spec: &RunSpec,
    files: &RunFiles,
) -> Result<RunResult, String> {
    let mut params = ParamStore::new();
    let rng = Rng::new(spec.seed);
    let model = model_fn(&mut params, &mut rng.fork(1));
    let mut opt = optim_fn(
        spec.optimizer,
        spec.lr,
        model.as_ref(),
        &params,
        spec.backend,
    )?;
    let mut batches = Batches::new(task.len(), spec.batch_size, rng.fork(2)).drop_last(true);
    let mut loop_rng = rng.fork(3);
    let mut augment_rng = rng.fork(4);
    let mut step = 0u64;
    let dp = spec.data_parallel.as_ref();
    let lead = dp.is_none_or(|d| d.rank() == 0);
    // One process is the data-parallel step on one rank: `train_step` itself.
    let stepper = dp.cloned().unwrap_or_else(DataParallel::single);
    if let Some(d) = dp {
        // Ranks started with other flags, data or seed refuse before the first step.
        let program = serde_json::json!({
            "examples": task.len(),
            "batch": spec.batch_size,
            "epochs": spec.epochs,
            "seed": spec.seed,
            "lr": spec.lr,
            "resume": files.resume.as_ref().map(|p| p.display().to_string()),
        });
        d.check_setup(&kron::setup_of(&params, opt.as_ref(), program))
            .map_err(|e| e.to_string())?;
    }
    if let Some(path) = &files.resume {
        let state = load_checkpoint(path, &mut params, opt.as_mut()).map_err(|e| e.to_string())?;
        let resumed = resume_batches(&state, task.len(), path)?;
        if resumed.batch_size() != spec.batch_size {
            return Err(format!(
                "checkpoint {}: its run took batches of {} examples, this one of {} \
                 (--batch-size)",
                path.display(),
                resumed.batch_size(),
                spec.batch_size
            ));
        }
        // The augmentation stream is re-derived from the seed: the checkpoint's batch stream
        // tells whether it was the same.
        if resumed.state().rng != rng.fork(2) {
            return Err(format!(
                "checkpoint {}: its run had another seed (--seed)",
                path.display()
            ));
        }
        batches = resumed.drop_last(true);
        loop_rng = state.rng;
        step = state.step;
        // Every batch is full (drop_last), so `step` batches augmented this many images.
        if let Some(shift) = &task.augment {
            shift.skip(&mut augment_rng, step * spec.batch_size as u64);
        }
    }
    let per_epoch = batches.batches_per_epoch().max(1);
    let start_epoch = batches.epoch() as usize;
    let first_batch = batches.cursor() / spec.batch_size;
    let total = (per_epoch * spec.epochs) as u64;
    let eval_at: Vec<usize> = (1..=spec.evals_per_epoch.max(1))
        .map(|k| k * per_epoch / spec.evals_per_epoch.max(1))
        .collect();
    let name = spec.optimizer.name();
    let progress = Progress::new(name, total, spec.quiet || !lead);
    let mut curves = Curves::default();
    let mut seconds = 0.0f64;
    let mut notes: Vec<String> = Vec::new();
    let evaluate_point = |params: &ParamStore, epoch: usize, step: u64, seconds: f64| {
        let tr = evaluate(
            model.as_ref(),
            params,
            task.loss,
            &task.eval_x,
            &task.eval_t,
            500,
        );
        let te = evaluate(
            model.as_ref(),
            params,
            task.loss,
            &task.test_x,
            &task.test_t,
            500,
        );
        Point {
            optimizer: name.to_string(),
            epoch,
            step,
            seconds,
            train_loss: tr.loss,
            test_loss: te.loss,
            test_accuracy: te.accuracy,
        }
    };
    curves
        .points
        .push(evaluate_point(&params, start_epoch, step, 0.0));
    for epoch in start_epoch + 1..=spec.epochs {
        let from = if epoch == start_epoch + 1 {
            first_batch
        } else {
            0
        };
        for b in from..per_epoch {
            let idx = batches
                .next_batch()
                .ok_or("the data has fewer examples than one batch")?;
            let mut xb = gather_rows(&task.train_x, &idx);
            if let Some(shift) = &task.augment {
                xb = shift.apply(&xb, &mut augment_rng);
            }
            let tb = gather_targets(&task.train_t, &idx);
            let t0 = Instant::now();
            let out = stepper.train_step(
                model.as_ref(),
                task.loss,
                &mut params,
                opt.as_mut(),
                &xb,
                &tb,
                &mut loop_rng,
            );
            seconds += t0.elapsed().as_secs_f64();
            step += 1;
            match out {
                Ok(o) => {
                    progress.update(step, o.loss);
                    if spec.trace {
                        trace_line(step, o.loss, &o.report);
                    }
                    for n in o.report.notes.iter().filter(|n| !n.is_routine()) {
                        let n = n.to_string();
                        if !notes.contains(&n) {
                            notes.push(n);
                        }
                    }
                }
                Err(e) => {
                    progress.finish();
                    return Ok(RunResult {
                        curves,
                        stopped: Some(format!("step {step}: {e}")),
                        notes,
                    });
                }
            }
            let due = epoch.is_multiple_of(spec.eval_every.max(1)) || epoch == spec.epochs;
            if due && eval_at.contains(&(b + 1)) {
                let point = evaluate_point(&params, epoch, step, seconds);
                let loss = point.train_loss;
                curves.points.push(point);
                if !loss.is_finite() {
                    progress.finish();
                    return Ok(RunResult {
                        curves,
                        stopped: Some(format!("step {step}: diverged (training loss {loss})")),
                        notes,
                    });
                }
            }
        }
        // Consume the end-of-epoch marker so the next epoch starts afresh.
        let _ = batches.next_batch();
        if let Some(path) = files.checkpoint.as_ref().filter(|_| lead) {
            let state = TrainState {
                step,
                rng: loop_rng.clone(),
                data: data_position(&batches),
            };
            save_checkpoint(path, &params, opt.as_ref(), &state).map_err(|e| e.to_string())?;
        }
    }
    progress.finish();
    if let Some(d) = dp {
        let comm = d.comm_seconds();
        notes.push(format!(
            "data-parallel on {} ranks ({}): {:.2} ms of communication per step, {:.1}% of the \
             training time",
            d.size(),
            d.comm().name(),
            1e3 * comm / step.max(1) as f64,
            100.0 * comm / seconds.max(1e-9)
        ));
    }
    if let Some(path) = files.save.as_ref().filter(|_| lead) {
        kron::save_weights(path, &params).map_err(|e| format!("cannot save the weights: {e}"))?;
    }
    Ok(RunResult {
        curves,
        stopped: None,
        notes,
    })
}

/// A learning-rate sweep: each candidate trains for `spec.epochs`; the one with the lowest
/// final training loss wins (a run that stops early loses).
pub fn sweep(
    task: &Task,
    model_fn: ModelFn<'_>,
    optim_fn: OptimFn<'_>,
    spec: &RunSpec,
    grid: &[f32],
) -> Result<(f32, String), String> {
    let mut best = (grid[0], f32::INFINITY);
    let mut log = String::new();
    for &lr in grid {
        let r = run(task, model_fn, optim_fn, &RunSpec { lr, ..spec.clone() })?;
        let fin = if r.stopped.is_some() {
            f32::INFINITY
        } else {
            r.curves
                .final_loss(spec.optimizer.name())
                .unwrap_or(f32::INFINITY)
        };
        log.push_str(&format!(
            "  {:<14} lr {lr:.3e}: final train loss {fin:.5}\n",
            spec.optimizer.name()
        ));
        if fin < best.1 {
            best = (lr, fin);
        }
    }
    Ok((best.0, log))
}

/// Several optimizers on one task, and the time each takes to reach a common target.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// Every run's curves.
    pub curves: Curves,
    /// The optimizers with their learning rates, in run order.
    pub lrs: Vec<(String, f32)>,
    /// The target: the final training loss of the best first-order run.
    pub target: f32,
    /// That run's optimizer.
    pub baseline: String,
    /// Runs that stopped early, with the reason.
    pub stopped: Vec<String>,
}

impl Comparison {
    /// The time-to-target table (without the seconds columns for snapshots).
    pub fn table(&self, seconds: bool) -> String {
        time_to_target(
            &self.curves,
            &self.lrs,
            self.target,
            &self.baseline,
            seconds,
        )
    }

    /// The table's reading in sentences: how each optimizer did against the baseline (without
    /// the seconds for snapshots).
    pub fn verdict(&self, seconds: bool) -> String {
        let base = &self.baseline;
        let base_hit = self.curves.first_reaching(base, self.target);
        let mut s = String::new();
        for (name, _) in self.lrs.iter().filter(|(n, _)| n != base) {
            let (Some(hit), Some(b)) = (self.curves.first_reaching(name, self.target), base_hit)
            else {
                s.push_str(&format!(
                    "{name} did not reach {base}'s final training loss.\n"
                ));
                continue;
            };
            s.push_str(&format!(
                "{name} reached {base}'s final training loss in {} steps ({base}: {} steps).\n",
                hit.step, b.step
            ));
            if seconds {
                s.push_str(&format!(
                    "In training time: {:.2} s against {:.2} s, {:.2}x the speed",
                    hit.seconds,
                    b.seconds,
                    b.seconds / hit.seconds.max(1e-9)
                ));
                if hit.step < b.step && hit.seconds > b.seconds {
                    let per = |p: &Point| p.seconds / p.step.max(1) as f64;
                    s.push_str(&format!(
                        ": fewer steps, but a {name} step cost {:.1} {base} steps here",
                        per(hit) / per(b).max(1e-12)
                    ));
                }
                s.push_str(".\n");
            }
        }
        s
    }
}

/// Runs each optimizer with its learning rate; the target is the final training loss of the
/// best first-order run.
pub fn compare(
    task: &Task,
    model_fn: ModelFn<'_>,
    optim_fn: OptimFn<'_>,
    spec: &RunSpec,
    lrs: &[(OptimizerKind, f32)],
) -> Result<Comparison, String> {
    let mut curves = Curves::default();
    let mut stopped = Vec::new();
    for &(kind, lr) in lrs {
        let r = run(
            task,
            model_fn,
            optim_fn,
            &RunSpec {
                optimizer: kind,
                lr,
                ..spec.clone()
            },
        )?;
        if let Some(why) = r.stopped {
            stopped.push(format!("{}: {why}", kind.name()));
        }
        curves.points.extend(r.curves.points);
    }
    let (baseline, target) = lrs
        .iter()
        .filter(|(k, _)| k.first_order())
        .filter_map(|(k, _)| curves.final_loss(k.name()).map(|l| (k.name(), l)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or("no first-order run to set the target")?;
    Ok(Comparison {
        lrs: lrs
            .iter()
            .map(|(k, l)| (k.name().to_string(), *l))
            .collect(),
        target,
        baseline: baseline.to_string(),
        curves,
        stopped,
    })
}

/// The default path of an example's CSV.
pub fn default_csv(example: &str) -> PathBuf {
    PathBuf::from("out").join(format!("{example}.csv"))
}

/// One step's report on stderr.
fn trace_line(step: u64, loss: f32, r: &kron::optim::StepReport) {
    let opt = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.4e}"));
    eprintln!(
        "step {step:>6}  loss {loss:>11.5}  step size {:.4e}  momentum {}  damping {}  \
         ms stats/refresh/update {:.0}/{:.0}/{:.0}{}{}",
        r.lr,
        opt(r.momentum),
        opt(r.damping),
        r.stats_ms,
        r.refresh_ms,
        r.update_ms,
        if r.stats_updated { "  stats" } else { "" },
        if r.refreshed { "  refresh" } else { "" },
    );
}
