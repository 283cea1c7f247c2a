//! Two-level KFAC against one-level KFAC, as Koroko et al. compare them: the direction check
//! on a deep linear network whose exact Fisher fits in memory, training curves on the deep
//! autoencoder and the conv net over several seeds, and the extra cost of each coarse space
//! per iteration, timed with the coarse term on and off alternated in one process.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kron::autodiff::Gradients;
use kron::layers::{Dense, FisherBlock, Module, Sequential};
use kron::optim::{
    CoarseConfig, EigenDamping, FisherKind, InverseMethod, KfacConfig, Optimizer, Precision,
    TwoLevelKfac,
};
use kron::prelude::*;

use crate::cli::{CliError, Flags};
use crate::example::{Config, Example};
use crate::train::{BackendKind, OptimizerKind, RunSpec, default_optimizer, run};

/// The methods compared: one-level KFAC (`off`) and each coarse space, by
/// [`CoarseConfig::parse`] name.
pub const METHODS: [&str; 7] = [
    "off",
    "nicolaides",
    "spectral",
    "residual",
    "tselepidis",
    "krylov-nicolaides",
    "krylov-residual",
];

/// The dampings of the direction check.
pub const LAMBDAS: [f64; 3] = [1e-3, 1e-2, 1e-1];

/// The label of a method in tables and CSVs.
pub fn label(method: &str) -> String {
    if method == "off" {
        "kfac".into()
    } else {
        format!("2l-{method}")
    }
}

/// The flags.
#[derive(Clone, Debug, PartialEq)]
pub struct TwoLevelConfig {
    /// `--seeds`: training runs per method and example (default 3).
    pub seeds: u64,
    /// `--depth`: layers of the deep linear network (default 16).
    pub depth: usize,
    /// `--width`: its width (default 10).
    pub width: usize,
    /// `--batch`: examples of the direction check's batch (default 64).
    pub batch: usize,
    /// `--rounds`: interleaved rounds of the cost measurement (default 5; 0 skips it).
    pub rounds: usize,
    /// `--cost-steps`: steps per method per round (default 5, one refresh period).
    pub cost_steps: usize,
    /// `--csv`: where the training curves go (default `out/two_level.csv`; the direction
    /// check and the costs go beside it, `-directions.csv` and `-cost.csv`).
    pub csv: Option<PathBuf>,
    /// `--fast`: small sizes everywhere (the snapshot test's run).
    pub fast: bool,
    /// `--parts`: which of `directions`, `training`, `cost` to run (default all three).
    pub parts: Vec<String>,
}

impl Default for TwoLevelConfig {
    fn default() -> Self {
        TwoLevelConfig {
            seeds: 3,
            depth: 16,
            width: 10,
            batch: 64,
            rounds: 5,
            cost_steps: 5,
            csv: None,
            fast: false,
            parts: PARTS.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// The parts of a run.
pub const PARTS: [&str; 3] = ["directions", "training", "cost"];

/// The usage text.
pub const USAGE: &str = "\
usage: two_level [flags]
  --seeds N       training runs per method and example (default 3)
  --depth N       layers of the direction check's deep linear net (default 16)
  --width N       its width (default 10)
  --batch N       examples of the direction check's batch (default 64)
  --rounds N      interleaved rounds of the cost measurement (default 5; 0: none)
  --cost-steps N  steps per method and round (default 5)
  --csv PATH      where the curves go (default out/two_level.csv; beside it the direction
                  check, the costs, and each example's seed-mean curves for kron-plot:
                  PATH-directions.csv, PATH-cost.csv, PATH-autoencoder.csv, PATH-convnet.csv)
  --fast          small sizes everywhere
  --parts LIST    which of directions,training,cost to run (default all)
  --help          this text";

impl TwoLevelConfig {
    /// Parses the flags.
    ///
    /// # Errors
    /// A flag that is unknown, malformed or out of range, named.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Self, CliError> {
        let mut f = Flags::parse(args, &["fast", "help"])?;
        if f.switch("help") {
            return Err(CliError(USAGE.to_string()));
        }
        let fast = f.switch("fast");
        let d = if fast {
            TwoLevelConfig {
                seeds: 2,
                depth: 6,
                width: 5,
                batch: 16,
                rounds: 1,
                cost_steps: 1,
                csv: None,
                fast,
                ..TwoLevelConfig::default()
            }
        } else {
            TwoLevelConfig::default()
        };
        let parts = match f.get::<String>("parts")? {
            None => d.parts.clone(),
            Some(list) => list.split(',').map(|p| p.trim().to_string()).collect(),
        };
        if let Some(p) = parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
            return Err(CliError(format!(
                "--parts: {p:?} is not one of directions, training, cost"
            )));
        }
        let c = TwoLevelConfig {
            seeds: f.get("seeds")?.unwrap_or(d.seeds),
            depth: f.get("depth")?.unwrap_or(d.depth),
            width: f.get("width")?.unwrap_or(d.width),
            batch: f.get("batch")?.unwrap_or(d.batch),
            rounds: f.get("rounds")?.unwrap_or(d.rounds),
            cost_steps: f.get("cost-steps")?.unwrap_or(d.cost_steps),
            csv: f.get::<String>("csv")?.map(PathBuf::from),
            fast,
            parts,
        };
        f.finish()?;
        for (name, v) in [
            ("seeds", c.seeds as usize),
            ("depth", c.depth),
            ("width", c.width),
            ("batch", c.batch),
            ("cost-steps", c.cost_steps),
        ] {
            if v == 0 {
                return Err(CliError(format!("--{name} must be at least 1, not 0")));
            }
        }
        let n = c.depth * c.width * (c.width + 1);
        if n > 8000 {
            return Err(CliError(format!(
                "--depth {} --width {} has {n} parameters: the exact Fisher would not fit \
                 (at most 8000)",
                c.depth, c.width
            )));
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------------
// The direction check.

/// One method's direction against the exact natural gradient at one damping.
#[derive(Clone, Debug, PartialEq)]
pub struct Direction {
    /// The first level's damping: kron's factored π-split, or the authors' `λ` on each factor.
    pub damping_mode: &'static str,
    /// The method ([`METHODS`]).
    pub method: &'static str,
    /// The damping λ.
    pub lambda: f64,
    /// The angle to `(F + λ I)^-1 v`, in degrees.
    pub angle: f64,
    /// `|d - d*| / |d*|`.
    pub rel_error: f64,
}

/// A deep linear network of `depth` dense layers of `width` with biases.
fn deep_linear(store: &mut ParamStore, depth: usize, width: usize, rng: &mut Rng) -> Sequential {
    let mut m = Sequential::new();
    for l in 0..depth {
        m = m.push(Dense::new(store, &format!("{l}"), width, width, rng));
    }
    m
}

/// A gradient (or a step) in the blocks' `W_aug` layouts, concatenated, in `f64`.
fn joined(blocks: &[FisherBlock], get: impl Fn(kron::autodiff::ParamId) -> Tensor) -> Vec<f64> {
    let mut out = Vec::new();
    for b in blocks {
        let w = get(b.weight);
        let bias = b.bias.map(&get);
        out.extend(b.join(&w, bias.as_ref()).data().iter().map(|&v| v as f64));
    }
    out
}

/// The rows `[from, from + n)` of a matrix's first axis.
fn rows(x: &Tensor, from: usize, n: usize) -> Tensor {
    let per = x.numel() / x.dim(0);
    let mut shape = x.shape().to_vec();
    shape[0] = n;
    Tensor::from_vec(x.data()[from * per..(from + n) * per].to_vec(), &shape)
}

/// `(F + lambda I)^-1 v` by Cholesky in `f64` (`f` row-major `n x n`).
fn damped_solve(f: &[f64], n: usize, lambda: f64, v: &[f64]) -> Vec<f64> {
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = f[i * n + j] + if i == j { lambda } else { 0.0 };
            let (ri, rj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            s -= ri.iter().zip(rj).map(|(a, b)| a * b).sum::<f64>();
            l[i * n + j] = if i == j { s.sqrt() } else { s / l[j * n + j] };
        }
    }
    let mut z = v.to_vec();
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * z[k]).sum();
        z[i] = (z[i] - s) / l[i * n + i];
    }
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * z[k]).sum();
        z[i] = (z[i] - s) / l[i * n + i];
    }
    z
}

/// The direction check: on a deep linear network with a squared loss against a random linear
/// teacher, each method's first step (from the same start and batch, the factors and the
/// coarse matrix from that batch, the empirical Fisher, `f64` factors, no clipping, no
/// momentum, learning rate 1) against the exact damped natural gradient
/// `(F + λ I)^-1 v`, `F = (1/B) sum_n grad_n grad_n^T` from per-example gradients.
pub fn directions(cfg: &TwoLevelConfig, seed: u64) -> Result<Vec<Direction>, String> {
    let (depth, width, b) = (cfg.depth, cfg.width, cfg.batch);
    let rng = Rng::new(seed);
    let mut store = ParamStore::new();
    let model = deep_linear(&mut store, depth, width, &mut rng.fork(1));
    let x = Tensor::randn(&[b, width], 0.0, 1.0, &mut rng.fork(2));
    let teacher = Tensor::randn(
        &[width, width],
        0.0,
        1.0 / (width as f32).sqrt(),
        &mut rng.fork(3),
    );
    let t = x.matmul(&teacher);
    let loss = LossKind::SquaredError;
    let blocks = model.fisher_blocks();

    // The exact Fisher from per-example gradients, and the batch gradient.
    let mut per = Vec::with_capacity(b);
    for i in 0..b {
        let tape = Tape::new(&store);
        let out = model.forward(tape.input(rows(&x, i, 1)));
        let g = tape.backward(loss.apply(out, &Targets::Values(rows(&t, i, 1))));
        per.push(joined(&blocks, |id| g.get(id).expect("a gradient").clone()));
    }
    let n = per[0].len();
    let mut f = vec![0.0f64; n * n];
    for g in &per {
        for i in 0..n {
            let gi = g[i] / b as f64;
            if gi == 0.0 {
                continue;
            }
            for (fij, gj) in f[i * n..(i + 1) * n].iter_mut().zip(g) {
                *fij += gi * gj;
            }
        }
    }
    let grad: Vec<f64> = (0..n)
        .map(|k| per.iter().map(|g| g[k]).sum::<f64>() / b as f64)
        .collect();

    let mut out = Vec::new();
    for &lambda in &LAMBDAS {
        let exact = damped_solve(&f, n, lambda, &grad);
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (mode, method) in [
            ("kron", InverseMethod::Inverse),
            ("per-factor", InverseMethod::Eigen(EigenDamping::PerFactor)),
        ] {
            for name in METHODS {
                let kfac = KfacConfig::DEFAULT
                    .with_fisher(FisherKind::Empirical)
                    .with_kl_clip(None)
                    .with_momentum(0.0)
                    .with_damping(lambda as f32)
                    .with_precision(Precision::F64)
                    .with_method(method)
                    .with_schedule(Schedule::constant(1.0));
                let coarse = CoarseConfig::parse(name).map_err(|e| e.to_string())?;
                let mut opt =
                    TwoLevelKfac::new(&model, &store, kfac, coarse).map_err(|e| e.to_string())?;
                let tape = Tape::new(&store).capturing(opt.wants().capture);
                let o = model.forward(tape.input(x.clone()));
                let mut g: Gradients = tape.backward(loss.apply(o, &Targets::Values(t.clone())));
                let caps = g.take_captures();
                let mut p = store.clone();
                opt.step(&mut p, &g, &caps).map_err(|e| e.to_string())?;
                let d = joined(&blocks, |id| store.get(id).sub(p.get(id)));
                let dot: f64 = d.iter().zip(&exact).map(|(a, b)| a * b).sum();
                let cos = (dot / (norm(&d) * norm(&exact))).clamp(-1.0, 1.0);
                let diff: Vec<f64> = d.iter().zip(&exact).map(|(a, b)| a - b).collect();
                out.push(Direction {
                    damping_mode: mode,
                    method: name,
                    lambda,
                    angle: cos.acos().to_degrees(),
                    rel_error: norm(&diff) / norm(&exact),
                });
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Training.

/// One training run's final point.
#[derive(Clone, Debug, PartialEq)]
pub struct Final {
    /// `autoencoder` or `convnet`.
    pub example: &'static str,
    /// The method ([`METHODS`]).
    pub method: &'static str,
    /// The seed.
    pub seed: u64,
    /// Steps taken.
    pub steps: u64,
    /// Training seconds (evaluations excluded).
    pub seconds: f64,
    /// Final training loss.
    pub train_loss: f32,
}

/// One row of the training CSV.
type CurveRow = (&'static str, &'static str, u64, u64, f64, f32, f32);

/// Trains `ex` with each method and seed from the same starts and batches (the seed fixes
/// both), at KFAC's recipe and tuned rate for the example.
fn train_example(
    ex: &Example,
    cfg: &TwoLevelConfig,
    curves: &mut Vec<CurveRow>,
) -> Result<Vec<Final>, String> {
    let ecfg = Config {
        fast: cfg.fast,
        quiet: true,
        ..Config::default()
    };
    let sizes = if cfg.fast { ex.fast } else { ex.sizes };
    let task = (ex.task)(&ecfg, &sizes)?;
    let model_fn = |p: &mut ParamStore, r: &mut Rng| (ex.model)(&task, p, r);
    let lr = ex
        .lrs
        .iter()
        .find(|(k, _)| *k == OptimizerKind::Kfac)
        .map_or(0.01, |(_, l)| *l);
    let mut out = Vec::new();
    for seed in 0..cfg.seeds {
        for method in METHODS {
            let coarse = CoarseConfig::parse(method).map_err(|e| e.to_string())?;
            let optim = default_optimizer(ex.kfac, coarse, ex.adaptive);
            let spec = RunSpec {
                optimizer: OptimizerKind::TwoLevelKfac,
                lr,
                epochs: sizes.epochs,
                batch_size: sizes.batch_size,
                seed,
                evals_per_epoch: sizes.evals_per_epoch,
                eval_every: sizes.eval_every,
                quiet: true,
                backend: BackendKind::Cpu,
                trace: false,
                data_parallel: None,
            };
            let r = run(&task, &model_fn, &optim, &spec)?;
            if let Some(why) = &r.stopped {
                return Err(format!("{} {} seed {seed}: {why}", ex.name, label(method)));
            }
            for p in &r.curves.points {
                curves.push((
                    ex.name,
                    method,
                    seed,
                    p.step,
                    p.seconds,
                    p.train_loss,
                    p.test_loss,
                ));
            }
            let last = r.curves.points.last().ok_or("no evaluation point")?;
            out.push(Final {
                example: ex.name,
                method,
                seed,
                steps: last.step,
                seconds: last.seconds,
                train_loss: last.train_loss,
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Cost per iteration.

/// The cost of one coarse space against one-level KFAC, in one process.
#[derive(Clone, Debug, PartialEq)]
pub struct Cost {
    /// The coarse space.
    pub method: &'static str,
    /// Median seconds per step with the coarse term off (interleaved with the next).
    pub off: f64,
    /// Median seconds per step with it on.
    pub on: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Per coarse space: `rounds` rounds, each `steps` steps of one-level KFAC (two-level with
/// the coarse term off: the same bits) then `steps` of the coarse space, on the autoencoder's
/// first batch with its KFAC recipe; the medians of the per-step times.
fn costs(ex: &Example, cfg: &TwoLevelConfig) -> Result<Vec<Cost>, String> {
    let ecfg = Config {
        fast: cfg.fast,
        quiet: true,
        ..Config::default()
    };
    let sizes = if cfg.fast { ex.fast } else { ex.sizes };
    let task = (ex.task)(&ecfg, &sizes)?;
    let x = rows(&task.train_x, 0, sizes.batch_size.min(task.train_x.dim(0)));
    let t = match &task.train_t {
        Targets::Values(v) => Targets::Values(rows(v, 0, x.dim(0))),
        Targets::Classes(c) => Targets::Classes(c[..x.dim(0)].to_vec()),
    };
    let lr = ex
        .lrs
        .iter()
        .find(|(k, _)| *k == OptimizerKind::Kfac)
        .map_or(0.01, |(_, l)| *l);
    let kfac = ex.kfac.with_schedule(Schedule::constant(lr));
    let mut out = Vec::new();
    for method in METHODS.into_iter().skip(1) {
        let coarse = CoarseConfig::parse(method).map_err(|e| e.to_string())?;
        let mut runs = Vec::new();
        for c in [CoarseConfig::OFF, coarse] {
            let mut params = ParamStore::new();
            let model = (ex.model)(&task, &mut params, &mut Rng::new(0).fork(1));
            let opt =
                TwoLevelKfac::new(model.as_ref(), &params, kfac, c).map_err(|e| e.to_string())?;
            runs.push((model, params, opt, Rng::new(7), Vec::new()));
        }
        let step = |run: &mut (Box<dyn Module>, ParamStore, TwoLevelKfac, Rng, Vec<f64>),
                    timed: bool|
         -> Result<(), String> {
            let (model, params, opt, rng, times) = run;
            let t0 = Instant::now();
            for _ in 0..cfg.cost_steps {
                train_step(model.as_ref(), task.loss, params, opt, &x, &t, rng)
                    .map_err(|e| e.to_string())?;
            }
            if timed {
                times.push(t0.elapsed().as_secs_f64() / cfg.cost_steps as f64);
            }
            Ok(())
        };
        // One untimed round each (first refresh, allocations), then the rounds alternated.
        for r in runs.iter_mut() {
            step(r, false)?;
        }
        for _ in 0..cfg.rounds {
            for r in runs.iter_mut() {
                step(r, true)?;
            }
        }
        let on = median(runs.pop().expect("two runs").4);
        let off = median(runs.pop().expect("two runs").4);
        out.push(Cost { method, off, on });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Everything, and the report.

/// What a run produced.
#[derive(Clone, Debug)]
pub struct TwoLevelRun {
    /// The direction check.
    pub directions: Vec<Direction>,
    /// The final points of every training run.
    pub finals: Vec<Final>,
    /// The training curves.
    pub curves: Vec<CurveRow>,
    /// The costs.
    pub costs: Vec<Cost>,
}

/// Runs the three parts.
///
/// # Errors
/// Missing data, or a run that stopped (named).
pub fn run_all(cfg: &TwoLevelConfig) -> Result<TwoLevelRun, String> {
    let part = |p: &str| cfg.parts.iter().any(|q| q == p);
    let directions = if part("directions") {
        directions(cfg, 0)?
    } else {
        Vec::new()
    };
    let mut curves = Vec::new();
    let mut finals = Vec::new();
    if part("training") {
        finals = train_example(&crate::autoencoder::EXAMPLE, cfg, &mut curves)?;
        finals.extend(train_example(&crate::convnet::EXAMPLE, cfg, &mut curves)?);
    }
    let costs = if cfg.rounds > 0 && part("cost") {
        costs(&crate::autoencoder::EXAMPLE, cfg)?
    } else {
        Vec::new()
    };
    Ok(TwoLevelRun {
        directions,
        finals,
        curves,
        costs,
    })
}

/// The tables. Without `seconds`, the timing columns are left out (the snapshot).
pub fn render(cfg: &TwoLevelConfig, r: &TwoLevelRun, seconds: bool) -> String {
    let mut s = String::new();
    let n = cfg.depth * cfg.width * (cfg.width + 1);
    if !r.directions.is_empty() {
        let _ = writeln!(
            s,
            "direction check: deep linear net, {} layers of width {} ({n} parameters), batch {}, \
         squared loss; angle (degrees) and relative error to (F + lambda I)^-1 grad",
            cfg.depth, cfg.width, cfg.batch
        );
        let _ = write!(s, "{:<11} {:<20}", "damping", "method");
        for l in LAMBDAS {
            let _ = write!(s, " {:>19}", format!("lambda {l:.0e}"));
        }
        s.push('\n');
        for mode in ["kron", "per-factor"] {
            for m in METHODS {
                let _ = write!(s, "{mode:<11} {:<20}", label(m));
                for l in LAMBDAS {
                    let d = r
                        .directions
                        .iter()
                        .find(|d| d.damping_mode == mode && d.method == m && d.lambda == l);
                    match d {
                        Some(d) => {
                            let _ = write!(s, " {:>8.3} {:>10.5}", d.angle, d.rel_error);
                        }
                        None => {
                            let _ = write!(s, " {:>19}", "-");
                        }
                    }
                }
                s.push('\n');
            }
        }
    }
    for ex in ["autoencoder", "convnet"] {
        let of: Vec<&Final> = r.finals.iter().filter(|f| f.example == ex).collect();
        let Some(first) = of.first() else { continue };
        let _ = writeln!(
            s,
            "\n{ex}: final training loss over {} seeds after {} steps",
            cfg.seeds, first.steps
        );
        let _ = write!(
            s,
            "{:<20} {:>11} {:>11} {:>11} {:>9}",
            "method", "mean", "min", "max", "vs kfac"
        );
        if seconds {
            let _ = write!(s, " {:>9}", "s/step");
        }
        s.push('\n');
        let mean = |m: &str| {
            let v: Vec<&&Final> = of.iter().filter(|f| f.method == m).collect();
            v.iter().map(|f| f.train_loss as f64).sum::<f64>() / v.len().max(1) as f64
        };
        let base = mean("off");
        for m in METHODS {
            let v: Vec<&&Final> = of.iter().filter(|f| f.method == m).collect();
            let lo = v.iter().map(|f| f.train_loss).fold(f32::INFINITY, f32::min);
            let hi = v
                .iter()
                .map(|f| f.train_loss)
                .fold(f32::NEG_INFINITY, f32::max);
            let _ = write!(
                s,
                "{:<20} {:>11.5} {:>11.5} {:>11.5} {:>8.4}x",
                label(m),
                mean(m),
                lo,
                hi,
                mean(m) / base
            );
            if seconds {
                let per: f64 = v
                    .iter()
                    .map(|f| f.seconds / f.steps.max(1) as f64)
                    .sum::<f64>()
                    / v.len().max(1) as f64;
                let _ = write!(s, " {per:>9.4}");
            }
            s.push('\n');
        }
    }
    if seconds && !r.costs.is_empty() {
        let _ = writeln!(
            s,
            "\nextra cost per step on the autoencoder's batch (medians of {} interleaved rounds \
             of {} steps)",
            cfg.rounds, cfg.cost_steps
        );
        let _ = writeln!(
            s,
            "{:<20} {:>12} {:>12} {:>9}",
            "method", "kfac ms", "2-level ms", "extra"
        );
        for c in &r.costs {
            let _ = writeln!(
                s,
                "{:<20} {:>12.1} {:>12.1} {:>8.1}%",
                label(c.method),
                c.off * 1e3,
                c.on * 1e3,
                (c.on / c.off - 1.0) * 100.0
            );
        }
    }
    s
}

/// The CSV paths: the curves, the directions, the costs, and the seed-mean curves of the
/// autoencoder and of the conv net in the examples' format (which `kron-plot` draws).
pub fn csv_paths(path: &Path) -> [PathBuf; 5] {
    let stem = path.with_extension("");
    let with = |suffix: &str| PathBuf::from(format!("{}{suffix}.csv", stem.display()));
    [
        path.to_path_buf(),
        with("-directions"),
        with("-cost"),
        with("-autoencoder"),
        with("-convnet"),
    ]
}

/// One example's curves averaged over the seeds, point by point (the seeds evaluate at the
/// same steps), in the examples' CSV format with the method as the optimizer.
fn mean_curves(r: &TwoLevelRun, example: &str) -> String {
    let mut s = String::from("optimizer,epoch,step,seconds,train_loss,test_loss,test_accuracy\n");
    for m in METHODS {
        let rows: Vec<&CurveRow> = r
            .curves
            .iter()
            .filter(|c| c.0 == example && c.1 == m)
            .collect();
        let mut steps: Vec<u64> = rows.iter().map(|c| c.3).collect();
        steps.sort_unstable();
        steps.dedup();
        for step in steps {
            let at: Vec<&&CurveRow> = rows.iter().filter(|c| c.3 == step).collect();
            let k = at.len() as f64;
            let mean = |f: &dyn Fn(&CurveRow) -> f64| at.iter().map(|c| f(c)).sum::<f64>() / k;
            let _ = writeln!(
                s,
                "{},0,{step},{:.4},{},{},",
                label(m),
                mean(&|c| c.4),
                mean(&|c| c.5 as f64),
                mean(&|c| c.6 as f64)
            );
        }
    }
    s
}

fn write_csv(path: &Path, r: &TwoLevelRun) -> std::io::Result<[PathBuf; 5]> {
    let paths = csv_paths(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut c = String::from("example,method,seed,step,seconds,train_loss,test_loss\n");
    for (ex, m, seed, step, secs, tr, te) in &r.curves {
        let _ = writeln!(c, "{ex},{},{seed},{step},{secs:.4},{tr},{te}", label(m));
    }
    std::fs::write(&paths[0], c)?;
    let mut d = String::from("damping,method,lambda,angle_degrees,relative_error\n");
    for x in &r.directions {
        let _ = writeln!(
            d,
            "{},{},{:e},{},{}",
            x.damping_mode,
            label(x.method),
            x.lambda,
            x.angle,
            x.rel_error
        );
    }
    std::fs::write(&paths[1], d)?;
    let mut k = String::from("method,kfac_seconds_per_step,two_level_seconds_per_step\n");
    for x in &r.costs {
        let _ = writeln!(k, "{},{},{}", label(x.method), x.off, x.on);
    }
    std::fs::write(&paths[2], k)?;
    std::fs::write(&paths[3], mean_curves(r, "autoencoder"))?;
    std::fs::write(&paths[4], mean_curves(r, "convnet"))?;
    Ok(paths)
}

/// The example's entry point.
pub fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let cfg = match TwoLevelConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("two_level: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let path = cfg
        .csv
        .clone()
        .unwrap_or_else(|| crate::train::default_csv("two_level"));
    if let Err(e) = crate::report::check_writable(&path) {
        eprintln!(
            "two_level: cannot write the curves to {}: {e}",
            path.display()
        );
        return std::process::ExitCode::from(2);
    }
    match run_all(&cfg) {
        Ok(r) => {
            print!("{}", render(&cfg, &r, true));
            match write_csv(&path, &r) {
                Ok(paths) => {
                    for p in paths {
                        println!("written: {}", p.display());
                    }
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("two_level: writing {}: {e}", path.display());
                    std::process::ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("two_level: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
