//! What every example shares: its flags, its definition, and its summary.

use std::fmt::Write as _;
use std::path::PathBuf;

use kron::DataParallel;
use kron::layers::Module;
use kron::optim::{CoarseConfig, KfacConfig, LevenbergMarquardt, StepRule};
use kron::prelude::*;

use crate::cli::{CliError, Flags};
use crate::report::Curves;
use crate::resume::RunFiles;
use crate::train::{
    AdaptiveRecipe, BackendKind, Comparison, OptimizerKind, RunSpec, Task, compare,
    default_optimizer, run_with, sweep,
};

/// The flags every example takes.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `--optimizer sgd|adam|kfac|kfac-2l|shampoo|kradagrad|kradagrad-star` (`None`: the
    /// example's default run, [`Example::defaults`]).
    pub optimizer: Option<OptimizerKind>,
    /// `--coarse NAME`: two-level KFAC's coarse space (default Nicolaides).
    pub coarse: Option<CoarseConfig>,
    /// `--lr`: the learning rate (default: the example's tuned value for the optimizer).
    pub lr: Option<f32>,
    /// `--epochs` (default: the example's).
    pub epochs: Option<usize>,
    /// `--batch-size` (default: the example's).
    pub batch_size: Option<usize>,
    /// `--seed` (default 0).
    pub seed: u64,
    /// `--data DIR`: MNIST-format IDX files instead of the bundled data.
    pub data: Option<PathBuf>,
    /// `--fast`: a small run, for tests.
    pub fast: bool,
    /// `--csv PATH`: where the curves go (default `out/NAME.csv`).
    pub csv: Option<PathBuf>,
    /// `--quiet`: no progress bar.
    pub quiet: bool,
    /// `--compare`: run every optimizer and print the time-to-target table.
    pub compare: bool,
    /// `--sweep`: tune each optimizer's learning rate on its grid first (implies `--compare`).
    pub sweep: bool,
    /// `--backend cpu|wgpu`: where KFAC's matrix math runs.
    pub backend: BackendKind,
    /// `--damping`: KFAC's damping λ (default: the example's).
    pub damping: Option<f32>,
    /// `--kl-clip`: KFAC's KL clipping κ, 0 for none (default: the example's).
    pub kl_clip: Option<f32>,
    /// `--kfac-step sgd|quadratic`: how KFAC turns its direction into a step (default: the
    /// example's).
    pub kfac_step: Option<StepRule>,
    /// `--stats-period N`: steps between KFAC's dense-layer statistics (default: the example's).
    pub stats_period: Option<u64>,
    /// `--inverse-period N`: steps between KFAC's refreshes (default: the example's).
    pub inverse_period: Option<u64>,
    /// `--stats-examples N`: examples of each batch KFAC's statistics use.
    pub stats_examples: Option<usize>,
    /// `--curvature-examples N`: examples for the quadratic model's exact Fisher products.
    pub curvature_examples: Option<usize>,
    /// `--trace`: every step's report on stderr.
    pub trace: bool,
    /// `--distributed`: data-parallel training, one rank per process under `mpirun` (the
    /// `distributed/` crate's builds of the examples; single runs only).
    pub distributed: bool,
    /// `--lm`: Levenberg-Marquardt adaptation of KFAC's damping (default: the example's).
    pub lm: bool,
    /// `--save PATH`, `--checkpoint PATH`, `--resume PATH`: the final weights, a checkpoint at
    /// the end of every epoch, the checkpoint to continue from (single runs only).
    pub files: RunFiles,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            optimizer: None,
            coarse: None,
            lr: None,
            epochs: None,
            batch_size: None,
            seed: 0,
            data: None,
            fast: false,
            csv: None,
            quiet: false,
            compare: false,
            sweep: false,
            backend: BackendKind::Cpu,
            damping: None,
            kl_clip: None,
            kfac_step: None,
            lm: false,
            trace: false,
            distributed: false,
            stats_period: None,
            curvature_examples: None,
            inverse_period: None,
            stats_examples: None,
            files: RunFiles::default(),
        }
    }
}

// ANCHOR: usage
/// The usage text shared by the examples.
pub const USAGE: &str = "flags:
  --optimizer NAME            train with one optimizer: sgd, adam, kfac, kfac-2l
                              (two-level KFAC), shampoo, kradagrad or kradagrad-star
                              (default: the example's; digits_mlp compares adam and kfac)
  --coarse NAME               kfac-2l's coarse space: nicolaides (default), spectral,
                              residual, tselepidis, krylov-nicolaides, krylov-residual
  --lr X                      learning rate (default: the tuned value for the optimizer)
  --epochs N                  epochs
  --batch-size N              mini-batch size
  --seed N                    seed of every random draw (default 0)
  --data DIR                  MNIST-format IDX files instead of the bundled data
  --fast                      a small run (what the tests snapshot)
  --csv PATH                  where to write the curves (default out/NAME.csv)
  --save PATH                 write the final weights there (safetensors)
  --checkpoint PATH           write a checkpoint there at the end of every epoch
  --resume PATH               continue the run a checkpoint holds, to --epochs in all
                              (with the same optimizer and flags: the same bits as a
                              run that never stopped)
  --compare                   run every optimizer; print the time-to-target table
  --sweep                     tune each optimizer's learning rate first (implies --compare)
  --backend cpu|wgpu          where KFAC's matrix math runs (wgpu needs --features wgpu)
  --damping X                 KFAC's damping (default: the example's)
  --kl-clip X                 KFAC's KL clipping, 0 for none (default: the example's)
  --kfac-step sgd|quadratic   KFAC's step: lr and momentum, or the quadratic model's
  --lm                        Levenberg-Marquardt adaptation of KFAC's damping
  --stats-period N            steps between KFAC's dense-layer statistics
  --stats-examples N          examples of each batch that KFAC's statistics use
  --inverse-period N          steps between KFAC's refreshes of its inverses
  --curvature-examples N      examples for the quadratic model's exact Fisher products
  --quiet                     no progress bar
  --trace                     every step's loss, step size, momentum and damping on stderr
  --distributed               data-parallel training, one rank per process, under mpirun
                              (the builds of distributed/; one optimizer's run only)
  --help                      this text";
// ANCHOR_END: usage

impl Config {
    /// Parses the flags.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Self, CliError> {
        let mut f = Flags::parse(
            args,
            &[
                "fast",
                "quiet",
                "compare",
                "sweep",
                "lm",
                "trace",
                "distributed",
                "help",
            ],
        )?;
        if f.switch("help") {
            return Err(CliError(USAGE.to_string()));
        }
        let c = Config {
            optimizer: f
                .get::<String>("optimizer")?
                .map(|s| s.parse().map_err(CliError))
                .transpose()?,
            coarse: f
                .get::<String>("coarse")?
                .map(|s| CoarseConfig::parse(&s).map_err(|e| CliError(format!("--coarse: {e}"))))
                .transpose()?,
            lr: f.get("lr")?,
            epochs: f.get("epochs")?,
            batch_size: f.get("batch-size")?,
            seed: f.get("seed")?.unwrap_or(0),
            data: f.get::<String>("data")?.map(PathBuf::from),
            fast: f.switch("fast"),
            csv: f.get::<String>("csv")?.map(PathBuf::from),
            quiet: f.switch("quiet"),
            compare: f.switch("compare"),
            sweep: f.switch("sweep"),
            backend: f
                .get::<String>("backend")?
                .map(|s| s.parse().map_err(CliError))
                .transpose()?
                .unwrap_or(BackendKind::Cpu),
            damping: f.get("damping")?,
            kl_clip: f.get("kl-clip")?,
            kfac_step: f
                .get::<String>("kfac-step")?
                .map(|s| match s.as_str() {
                    "sgd" => Ok(StepRule::Sgd),
                    "quadratic" => Ok(StepRule::QuadraticModel),
                    other => Err(CliError(format!(
                        "--kfac-step: expected sgd or quadratic, found {other:?}"
                    ))),
                })
                .transpose()?,
            lm: f.switch("lm"),
            trace: f.switch("trace"),
            distributed: f.switch("distributed"),
            stats_period: f.get("stats-period")?,
            curvature_examples: f.get("curvature-examples")?,
            inverse_period: f.get("inverse-period")?,
            stats_examples: f.get("stats-examples")?,
            files: RunFiles {
                save: f.get::<String>("save")?.map(PathBuf::from),
                checkpoint: f.get::<String>("checkpoint")?.map(PathBuf::from),
                resume: f.get::<String>("resume")?.map(PathBuf::from),
            },
        };
        f.finish()?;
        c.validate()?;
        Ok(c)
    }

    /// Checks every value a flag gave: counts at least 1, rates and damping finite and
    /// positive, the KL clip finite and not negative (0 switches it off), and no `--lr` where
    /// it would be ignored (`--compare` and `--sweep` use each optimizer's tuned or swept
    /// rate). The error names the flag.
    pub fn validate(&self) -> Result<(), CliError> {
        let positive = |name: &str, v: Option<f32>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(CliError(format!(
                "--{name} must be a finite number above 0, not {x}"
            ))),
            _ => Ok(()),
        };
        positive("lr", self.lr)?;
        positive("damping", self.damping)?;
        if self.coarse.is_some() && self.optimizer != Some(OptimizerKind::TwoLevelKfac) {
            return Err(CliError(
                "--coarse sets two-level KFAC's coarse space: add --optimizer kfac-2l".into(),
            ));
        }
        if let Some(k) = self.kl_clip
            && !(k.is_finite() && k >= 0.0)
        {
            return Err(CliError(format!(
                "--kl-clip must be a finite number, 0 for no clipping, not {k}"
            )));
        }
        let counts = [
            ("epochs", self.epochs.map(|v| v as u64)),
            ("batch-size", self.batch_size.map(|v| v as u64)),
            ("stats-period", self.stats_period),
            ("inverse-period", self.inverse_period),
            ("stats-examples", self.stats_examples.map(|v| v as u64)),
            (
                "curvature-examples",
                self.curvature_examples.map(|v| v as u64),
            ),
        ];
        for (name, v) in counts {
            if v == Some(0) {
                return Err(CliError(format!("--{name} must be at least 1")));
            }
        }
        if self.lr.is_some() && (self.compare || self.sweep) {
            return Err(CliError(
                "--lr sets the rate of a single run; --compare and --sweep run each optimizer \
                 at its tuned (or swept) rate"
                    .into(),
            ));
        }
        if self.compare || self.sweep {
            self.single_run_flags("--compare and --sweep run every optimizer")?;
        }
        Ok(())
    }

    /// The optimizer of a single run on `ex`, or `None` for a comparison (`--compare`,
    /// `--sweep`, or no `--optimizer` where the example compares by default).
    pub fn single(&self, ex: &Example) -> Option<OptimizerKind> {
        match (self.compare || self.sweep, self.optimizer, ex.defaults) {
            (true, _, _) => None,
            (false, Some(k), _) => Some(k),
            (false, None, [k]) => Some(*k),
            (false, None, _) => None,
        }
    }

    /// [`validate`](Self::validate), and the checks that depend on the example: the flags of a
    /// single run (`--lr`, `--save`, `--checkpoint`, `--resume`) are refused where the flags
    /// ask for a comparison.
    pub fn validate_for(&self, ex: &Example) -> Result<(), CliError> {
        self.validate()?;
        if self.single(ex).is_none() {
            let names: Vec<&str> = ex.defaults.iter().map(|k| k.name()).collect();
            let why = format!(
                "without --optimizer, {} compares {}",
                ex.name,
                names.join(" and ")
            );
            if self.lr.is_some() {
                return Err(CliError(format!(
                    "--lr sets the rate of a single run, and {why}: add --optimizer NAME"
                )));
            }
            self.single_run_flags(&why)?;
        }
        Ok(())
    }

    /// An error naming the first of `--save`, `--checkpoint`, `--resume` given, which belong to
    /// single runs, saying `why` this is not one.
    fn single_run_flags(&self, why: &str) -> Result<(), CliError> {
        let f = &self.files;
        for (name, given) in [
            ("save", f.save.is_some()),
            ("checkpoint", f.checkpoint.is_some()),
            ("resume", f.resume.is_some()),
            ("distributed", self.distributed),
        ] {
            if given {
                return Err(CliError(format!(
                    "--{name} belongs to a single run, and {why}: choose one with --optimizer NAME"
                )));
            }
        }
        Ok(())
    }
}

/// Sizes of a run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Evaluations per epoch.
    pub evals_per_epoch: usize,
    /// Epochs between end-of-epoch evaluations (the last epoch is always evaluated).
    pub eval_every: usize,
    /// Training examples used (`None`: all).
    pub train: Option<usize>,
    /// Test examples used (`None`: all).
    pub test: Option<usize>,
}

/// An example: its data, its model, its optimizer recipes and sizes.
pub struct Example {
    /// Its name (the CSV's default file name).
    pub name: &'static str,
    /// What it trains, in one line.
    pub title: &'static str,
    /// What a run without `--optimizer` trains: one optimizer, or several compared (each at
    /// its tuned rate, with the time-to-target table).
    pub defaults: &'static [OptimizerKind],
    /// Loads the task (bundled data, or `--data`), trimmed to the sizes.
    pub task: fn(&Config, &Sizes) -> Result<Task, String>,
    /// Builds the model for a task.
    pub model: fn(&Task, &mut ParamStore, &mut Rng) -> Box<dyn Module>,
    /// KFAC's configuration (its learning rate comes from `lrs`).
    pub kfac: KfacConfig,
    /// Shampoo's and KrADagrad's configurations (their learning rates come from `lrs`).
    pub adaptive: AdaptiveRecipe,
    /// Tuned learning rates (the result of `--sweep` on the default sizes; see the book).
    pub lrs: &'static [(OptimizerKind, f32)],
    /// The learning rates `--sweep` tries.
    pub grid: fn(OptimizerKind) -> Vec<f32>,
    /// Default sizes.
    pub sizes: Sizes,
    /// Sizes with `--fast`.
    pub fast: Sizes,
}

/// What a run of an example produced.
#[derive(Clone, Debug)]
pub struct Summary {
    /// A heading.
    pub title: String,
    /// What the run does, for a reader new to it (the example's default comparison).
    pub intro: Option<String>,
    /// The curves of every run.
    pub curves: Curves,
    /// The comparison, with `--compare` or `--sweep`.
    pub comparison: Option<Comparison>,
    /// The sweep's log, with `--sweep`.
    pub sweep_log: Option<String>,
    /// Notes: runs that stopped early, refreshes that failed, and the like.
    pub notes: Vec<String>,
    /// Why each reported run that stopped before its last step stopped (a refused step, a
    /// divergence); empty when every reported run finished. The runs a `--sweep` tries on
    /// its way are not reported runs.
    pub stopped: Vec<String>,
}

impl Summary {
    /// The printed report; without `seconds` nothing depends on the machine's speed (what the
    /// snapshot tests compare).
    pub fn render(&self, seconds: bool) -> String {
        let mut s = format!("{}\n\n", self.title);
        if let Some(intro) = &self.intro {
            let _ = write!(s, "{intro}\n\n");
        }
        s.push_str(&self.curves.table(seconds));
        if let Some(log) = &self.sweep_log {
            let _ = write!(s, "\nlearning-rate sweep:\n{log}");
        }
        if let Some(c) = &self.comparison {
            let _ = write!(s, "\n{}\n{}", c.table(seconds), c.verdict(seconds));
            let _ = write!(
                s,
                "\nEvery run trained the same model from the same initialization on the same \
                 batches,\nat its tuned learning rate. The target is the final training loss of \
                 the best\nfirst-order run; \"steps\" is the first evaluation at or below it.\n"
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

/// Runs an example with a configuration.
pub fn run_example(ex: &Example, cfg: &Config) -> Result<Summary, String> {
    run_example_on(ex, cfg, None)
}

/// [`run_example`], data-parallel over `dp`'s ranks when `--distributed` asked for it (`dp`
/// is then the transport: the `distributed/` crate's builds pass Open MPI's).
pub fn run_example_on(
    ex: &Example,
    cfg: &Config,
    dp: Option<DataParallel>,
) -> Result<Summary, String> {
    cfg.validate_for(ex).map_err(|e| e.0)?;
    let dp = match (cfg.distributed, dp) {
        (true, None) => {
            return Err(format!(
                "--distributed: this build of {} has no transport between processes; build the \
                 one in distributed/ and run it under mpirun (see the README)",
                ex.name
            ));
        }
        (true, dp) => dp,
        (false, _) => None,
    };
    let single = cfg.single(ex);
    let sizes = if cfg.fast { ex.fast } else { ex.sizes };
    let task = (ex.task)(cfg, &sizes)?;
    let model_fn = |p: &mut ParamStore, r: &mut Rng| (ex.model)(&task, p, r);
    let mut kfac = ex.kfac;
    if let Some(d) = cfg.damping {
        kfac = kfac.with_damping(d);
    }
    if let Some(k) = cfg.kl_clip {
        kfac = kfac.with_kl_clip((k > 0.0).then_some(k));
    }
    if let Some(r) = cfg.kfac_step {
        kfac = kfac.with_step_rule(r);
    }
    if let Some(p) = cfg.stats_period {
        kfac = kfac.with_stats_period(p);
    }
    if let Some(p) = cfg.inverse_period {
        kfac = kfac.with_inverse_period(p);
    }
    if let Some(m) = cfg.stats_examples {
        kfac = kfac.with_stats_examples(Some(m));
    }
    if let Some(m) = cfg.curvature_examples {
        kfac = kfac.with_curvature_examples(Some(m));
    }
    if cfg.lm && kfac.damping.adaptive.is_none() {
        kfac = kfac.with_adaptive_damping(Some(LevenbergMarquardt::default()));
    }
    if cfg.lr.is_some()
        && matches!(
            single,
            Some(OptimizerKind::Kfac | OptimizerKind::TwoLevelKfac)
        )
        && kfac.step.rule == StepRule::QuadraticModel
    {
        return Err(format!(
            "--lr has no effect on {}'s KFAC, whose quadratic-model step sets each step's size; \
             add --kfac-step sgd to run KFAC at a learning rate",
            ex.name
        ));
    }
    let coarse = cfg.coarse.unwrap_or_default();
    let optim = default_optimizer(kfac, coarse, ex.adaptive);
    let spec = RunSpec {
        optimizer: single.unwrap_or(ex.defaults[0]),
        lr: 0.0,
        epochs: cfg.epochs.unwrap_or(sizes.epochs),
        batch_size: cfg.batch_size.unwrap_or(sizes.batch_size),
        seed: cfg.seed,
        evals_per_epoch: sizes.evals_per_epoch,
        eval_every: sizes.eval_every,
        quiet: cfg.quiet,
        backend: cfg.backend,
        trace: cfg.trace,
        data_parallel: dp,
    };
    // Two-level KFAC runs at KFAC's tuned rate.
    let tuned = |k: OptimizerKind| {
        let k = match k {
            OptimizerKind::TwoLevelKfac => OptimizerKind::Kfac,
            k => k,
        };
        ex.lrs
            .iter()
            .find(|(o, _)| *o == k)
            .map_or(0.01, |(_, l)| *l)
    };
    let title = format!(
        "{} ({} training examples, batch {}, {} epochs, seed {})",
        ex.title,
        task.len(),
        spec.batch_size,
        spec.epochs,
        spec.seed
    );
    let mut notes = Vec::new();
    let summary = if single.is_none() {
        let mut lrs: Vec<(OptimizerKind, f32)> = if cfg.compare || cfg.sweep {
            ex.lrs.to_vec()
        } else {
            ex.defaults.iter().map(|&k| (k, tuned(k))).collect()
        };
        let mut log = None;
        if cfg.sweep {
            let mut text = String::new();
            for (k, lr) in lrs.iter_mut() {
                if *k == OptimizerKind::Kfac && kfac.step.rule == StepRule::QuadraticModel {
                    text.push_str(
                        "  kfac  no learning rate to tune: the quadratic model sets each step\n",
                    );
                    continue;
                }
                let (best, l) = sweep(
                    &task,
                    &model_fn,
                    &optim,
                    &RunSpec {
                        optimizer: *k,
                        ..spec.clone()
                    },
                    &(ex.grid)(*k),
                )?;
                text.push_str(&l);
                *lr = best;
            }
            log = Some(text);
        }
        let mut c = compare(&task, &model_fn, &optim, &spec, &lrs)?;
        if kfac.step.rule == StepRule::QuadraticModel {
            for (name, lr) in &mut c.lrs {
                if name == OptimizerKind::Kfac.name() {
                    *lr = f32::NAN;
                }
            }
        }
        notes.extend(c.stopped.iter().cloned());
        let intro = (!(cfg.compare || cfg.sweep)).then(|| {
            let mut t = String::from("Without --optimizer, this example compares\n");
            for k in ex.defaults {
                let _ = writeln!(t, "  {:<6} {}", k.name(), k.describe());
            }
            t.push_str(
                "--optimizer NAME trains one optimizer, --compare all of them, --help lists \
                 the flags.\nOn a model this small a KFAC step costs a few Adam steps; on the \
                 KFAC paper's deep autoencoder\nits fewer steps take less time as well: cargo \
                 run --release --example autoencoder -- --compare",
            );
            t
        });
        Summary {
            title,
            intro,
            curves: c.curves.clone(),
            stopped: c.stopped.clone(),
            comparison: Some(c),
            sweep_log: log,
            notes,
        }
    } else {
        let lr = cfg.lr.unwrap_or_else(|| tuned(spec.optimizer));
        let r = run_with(
            &task,
            &model_fn,
            &optim,
            &RunSpec { lr, ..spec.clone() },
            &cfg.files,
        )?;
        notes.extend(r.stopped.iter().cloned());
        notes.extend(r.notes);
        Summary {
            title,
            intro: None,
            curves: r.curves,
            comparison: None,
            sweep_log: None,
            notes,
            stopped: r.stopped.into_iter().collect(),
        }
    };
    Ok(summary)
}

/// The `main` of an example: [`cli_main`] on the process's arguments and standard streams.
pub fn main(ex: &Example) -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = cli_main(
        ex,
        args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    std::process::ExitCode::from(code)
}

/// Parses flags, runs, prints the table to `out`, writes the CSV, and returns the exit code:
/// 0 when every reported run finished, 1 when one stopped early or something failed (the
/// reason on `err`: a checkpoint that cannot be read names its path), 2 for a usage error (a
/// bad flag or value, an unwritable `--csv`, `--save` or `--checkpoint` path, found before
/// training). `--help` prints the flags to `out` and returns 0.
pub fn cli_main(
    ex: &Example,
    args: Vec<String>,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> u8 {
    cli_main_on(ex, args, out, err, None)
}

/// [`cli_main`] with a transport for `--distributed`: every rank runs it, rank 0 alone prints
/// the table and writes the CSV; a failure is reported by every rank that sees it.
pub fn cli_main_on(
    ex: &Example,
    args: Vec<String>,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
    dp: Option<DataParallel>,
) -> u8 {
    let lead = dp.as_ref().is_none_or(|d| d.rank() == 0);
    if args.iter().any(|a| a == "--help" || a == "-h") {
        let _ = writeln!(out, "{USAGE}");
        return 0;
    }
    let cfg = match Config::from_args(args).and_then(|c| c.validate_for(ex).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{}: {e}\n{USAGE}", ex.name);
            return 2;
        }
    };
    let path = cfg
        .csv
        .clone()
        .unwrap_or_else(|| crate::train::default_csv(ex.name));
    // Found out before training, not after it.
    if let Err(e) = crate::report::check_writable(&path) {
        let _ = writeln!(
            err,
            "{}: cannot write the curves to {}: {e}",
            ex.name,
            path.display()
        );
        return 2;
    }
    let files = [
        ("--save", "the weights", &cfg.files.save),
        ("--checkpoint", "a checkpoint", &cfg.files.checkpoint),
    ];
    for (flag, what, file) in files {
        if let Some(p) = file
            && let Err(e) = crate::resume::check_writable(p)
        {
            let _ = writeln!(
                err,
                "{}: cannot write {what} to {} ({flag}): {e}",
                ex.name,
                p.display()
            );
            return 2;
        }
    }
    match run_example_on(ex, &cfg, dp) {
        Ok(_) if !lead => 0,
        Ok(s) => {
            let _ = write!(out, "{}", s.render(true));
            match s.curves.write_csv(&path) {
                Ok(()) => {
                    let _ = writeln!(out, "curves written to {}", path.display());
                }
                Err(e) => {
                    let _ = writeln!(err, "{}: cannot write {}: {e}", ex.name, path.display());
                    return 1;
                }
            }
            for why in &s.stopped {
                let _ = writeln!(err, "{}: stopped early: {why}", ex.name);
            }
            u8::from(!s.stopped.is_empty())
        }
        Err(e) => {
            let _ = writeln!(err, "{}: {e}", ex.name);
            1
        }
    }
}
