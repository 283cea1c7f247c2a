//! The KrADagrad paper's synthetic experiment, as the authors ran it
//! (`experiments/quadratic_high_condition.ipynb` of jonathanmei/kradagrad): minimize
//! `f(X) = tr(X^T H0 X H1)` over an `n x n` matrix `X`, where `Hj = Qj diag(lam) Qj^T` with `Qj`
//! random orthogonal (QR of a Gaussian) and `lam = 10^(-(r^2))` for `r` evenly spaced from 0 to
//! `-sqrt(log10 kappa)`, rescaled so the largest is 10: each factor has condition number
//! `kappa`, the Hessian `2 H1 (x) H0` has `kappa^2`. From one Gaussian start, 250 steps of SGD,
//! Adam, Shampoo (f64 roots, the authors' plain f32 roots, and kron's f32 safeguards),
//! KrADagrad* and KrADagrad (f32).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kron::autodiff::{Gradients, MatMut, MatRef, gemm, gemm_strided};
use kron::optim::{
    Adam, AdamConfig, AdaptiveConfig, BlockingConfig, Graft, KrAdagrad, KrAdagradStar, Momentum,
    Optimizer, Precision, Ridge, RootMethod, Sgd, SgdConfig, Shampoo,
};
use kron::prelude::*;

use crate::cli::{CliError, Flags};

/// The steps the table reports (those within the run).
pub const TABLE_STEPS: [usize; 8] = [0, 10, 25, 50, 100, 150, 200, 250];

/// The flags.
#[derive(Clone, Debug, PartialEq)]
pub struct IllConfig {
    /// `--n`: the matrix size (default 512; the paper's is 1536).
    pub n: usize,
    /// `--kappa`: condition numbers per factor, comma-separated (default 1e4,1e6).
    pub kappas: Vec<f64>,
    /// `--steps` (default 250).
    pub steps: usize,
    /// `--seed` of the problem and the start (default 4750, the notebook's problem seed).
    pub seed: u64,
    /// `--csv`: where the curves go, one file per condition number ([`csv_path`]; default
    /// `out/ill_conditioned.csv`).
    pub csv: Option<PathBuf>,
    /// `--fast`: n 48, 30 steps (the snapshot test's run).
    pub fast: bool,
}

impl Default for IllConfig {
    fn default() -> Self {
        IllConfig {
            n: 512,
            kappas: vec![1e4, 1e6],
            steps: 250,
            seed: 4750,
            csv: None,
            fast: false,
        }
    }
}

/// The usage text.
pub const USAGE: &str = "\
usage: ill_conditioned [flags]
  --n N          matrix size (default 512; the paper's 1536)
  --kappa LIST   condition numbers per factor, comma-separated (default 1e4,1e6)
  --steps N      steps (default 250)
  --seed S       seed of the problem and the start (default 4750)
  --csv PATH     where the curves go: PATH-kappa1e4.csv and so on
                 (default out/ill_conditioned.csv)
  --fast         n 48 and 30 steps
  --help         this text";

impl IllConfig {
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
            IllConfig {
                n: 48,
                steps: 30,
                fast,
                ..IllConfig::default()
            }
        } else {
            IllConfig::default()
        };
        let kappas = match f.get::<String>("kappa")? {
            None => d.kappas.clone(),
            Some(s) => s
                .split(',')
                .map(|k| {
                    k.trim()
                        .parse::<f64>()
                        .map_err(|e| CliError(format!("--kappa {k:?}: {e}")))
                })
                .collect::<Result<Vec<f64>, CliError>>()?,
        };
        let c = IllConfig {
            n: f.get("n")?.unwrap_or(d.n),
            kappas,
            steps: f.get("steps")?.unwrap_or(d.steps),
            seed: f.get("seed")?.unwrap_or(d.seed),
            csv: f.get::<String>("csv")?.map(PathBuf::from),
            fast,
        };
        f.finish()?;
        if c.n < 2 {
            return Err(CliError(format!("--n must be at least 2, not {}", c.n)));
        }
        if c.steps == 0 {
            return Err(CliError("--steps must be at least 1, not 0".into()));
        }
        if let Some(k) = c.kappas.iter().find(|k| !(k.is_finite() && **k >= 1.0)) {
            return Err(CliError(format!(
                "--kappa must be finite and at least 1, not {k}"
            )));
        }
        Ok(c)
    }
}

/// One instance of the problem.
pub struct Problem {
    /// The size.
    pub n: usize,
    h0: Vec<f32>,
    h1: Vec<f32>,
    /// The start.
    pub x0: Tensor,
}

/// `a (m x k) b (k x n)` in `f64`, row-major.
fn mm64(a: &[f64], ta: bool, b: &[f64], tb: bool, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    gemm_strided(
        1.0,
        MatRef::row_major_op(a, m, k, ta),
        MatRef::row_major_op(b, k, n, tb),
        0.0,
        MatMut::new(&mut c, m, n, n, 1),
    );
    c
}

/// The `Q` of a QR factorization of an `n x n` Gaussian matrix, by modified Gram-Schmidt run
/// twice (orthogonal to working precision).
fn random_orthogonal(n: usize, rng: &mut Rng) -> Vec<f64> {
    // Columns as rows of `v` (contiguous).
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|_| (0..n).map(|_| rng.normal() as f64).collect())
        .collect();
    for j in 0..n {
        for _ in 0..2 {
            for i in 0..j {
                let (done, rest) = v.split_at_mut(j);
                let d: f64 = done[i].iter().zip(&rest[0]).map(|(a, b)| a * b).sum();
                for (x, q) in rest[0].iter_mut().zip(&done[i]) {
                    *x -= d * q;
                }
            }
        }
        let norm = v[j].iter().map(|x| x * x).sum::<f64>().sqrt();
        v[j].iter_mut().for_each(|x| *x /= norm);
    }
    // Q[r][c] = v[c][r].
    let mut q = vec![0.0; n * n];
    for (c, col) in v.iter().enumerate() {
        for (r, &x) in col.iter().enumerate() {
            q[r * n + c] = x;
        }
    }
    q
}

/// The eigenvalues of a factor: `10^(-(r^2))`, `r` from 0 to `-sqrt(log10 kappa)`, times 10.
pub fn eigenvalues(n: usize, kappa: f64) -> Vec<f64> {
    let end = -kappa.log10().sqrt();
    (0..n)
        .map(|i| {
            let r = end * i as f64 / (n - 1) as f64;
            10.0 * 10f64.powf(-(r * r))
        })
        .collect()
}

impl Problem {
    /// The problem of size `n` and condition `kappa` per factor from `seed`.
    pub fn new(n: usize, kappa: f64, seed: u64) -> Self {
        let rng = Rng::new(seed);
        let lam = eigenvalues(n, kappa);
        let factor = |stream: u64| -> Vec<f32> {
            let q = random_orthogonal(n, &mut rng.fork(stream));
            let mut ql = q.clone();
            for row in ql.chunks_mut(n) {
                for (x, l) in row.iter_mut().zip(&lam) {
                    *x *= l;
                }
            }
            mm64(&ql, false, &q, true, n, n, n)
                .into_iter()
                .map(|x| x as f32)
                .collect()
        };
        let (h0, h1) = (factor(1), factor(2));
        let x0 = Tensor::randn(&[n, n], 0.0, 1.0, &mut rng.fork(3));
        Problem { n, h0, h1, x0 }
    }

    /// `(f(X), grad f(X) = 2 H0 X H1)`, the loss summed in `f64`.
    pub fn loss_and_grad(&self, x: &Tensor) -> (f64, Tensor) {
        let n = self.n;
        let mut y = vec![0.0f32; n * n];
        gemm(n, n, n, 1.0, &self.h0, false, x.data(), false, 0.0, &mut y);
        let mut z = vec![0.0f32; n * n];
        gemm(n, n, n, 1.0, &y, false, &self.h1, false, 0.0, &mut z);
        let loss: f64 = x
            .data()
            .iter()
            .zip(&z)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        z.iter_mut().for_each(|v| *v *= 2.0);
        (loss, Tensor::from_vec(z, &[n, n]))
    }
}

/// Builds a method's optimizer for a parameter store and the problem's size.
pub type Build = fn(&ParamStore, usize) -> Result<Box<dyn Optimizer>, kron::optim::OptimError>;

/// A method of the comparison: its name and how it is built.
pub struct Method {
    /// Its name in the table.
    pub name: &'static str,
    /// What it is, for the legend.
    pub about: &'static str,
    build: Build,
}

/// The adaptive methods' shared settings in the authors' runs: momentum 0.9 Nesterov, beta2 1,
/// roots every 3 steps from step 3, no blocking.
fn authors(c: AdaptiveConfig, n: usize, lr: f32, eps: f64, graft: Option<Graft>) -> AdaptiveConfig {
    c.with_lr(lr)
        .with_momentum(Momentum::nesterov(0.9))
        .with_beta2(1.0)
        .with_bias_correction(false)
        .with_epsilon(Ridge::Absolute(eps))
        .with_refresh_period(3)
        .with_start_step(3)
        .with_graft(graft)
        .with_blocking(BlockingConfig::DEFAULT.with_max_dim(n + 1))
}

/// The methods, in the table's order.
pub const METHODS: [Method; 8] = [
    Method {
        name: "sgd",
        about: "SGD, lr 1e-3 (no momentum, as torch.optim.SGD there)",
        build: |p, _| Ok(Box::new(Sgd::new(p, SgdConfig::new(1e-3))?)),
    },
    Method {
        name: "adam",
        about: "Adam, lr 1, eps 1e-8",
        build: |p, _| Ok(Box::new(Adam::new(p, AdamConfig::new(1.0).with_eps(1e-8))?)),
    },
    Method {
        name: "shampoo-f64",
        about: "Shampoo, f64 statistics and eigh roots, lr 5e-3, eps 1e-8 (the reference)",
        build: |p, n| {
            let c = authors(AdaptiveConfig::shampoo(), n, 5e-3, 1e-8, Some(Graft::Sgd))
                .with_precision(Precision::F64)
                .with_roots(RootMethod::EIGH_F64);
            Ok(Box::new(Shampoo::new(p, c)?))
        },
    },
    Method {
        name: "shampoo-f32",
        about: "Shampoo, f32 statistics and eigh roots, lr 5e-3, eps 1e-8 (the authors' f32)",
        build: |p, n| {
            let c = authors(AdaptiveConfig::shampoo(), n, 5e-3, 1e-8, Some(Graft::Sgd))
                .with_precision(Precision::F32)
                .with_roots(RootMethod::EIGH_F32_PLAIN);
            Ok(Box::new(Shampoo::new(p, c)?))
        },
    },
    Method {
        name: "shampoo-f32-rel",
        about: "Shampoo, f32, eps 1e-6 relative to the largest eigenvalue, f64 retry on failure",
        build: |p, n| {
            let c = authors(AdaptiveConfig::shampoo(), n, 5e-3, 1e-6, Some(Graft::Sgd))
                .with_epsilon(Ridge::Relative(1e-6))
                .with_precision(Precision::F32)
                .with_roots(RootMethod::EIGH_F32);
            Ok(Box::new(Shampoo::new(p, c)?))
        },
    },
    Method {
        name: "shampoo-newton",
        about: "Shampoo, f32 coupled Newton roots (residual-checked), eps 1e-6 relative",
        build: |p, n| {
            let c = authors(AdaptiveConfig::shampoo(), n, 5e-3, 1e-6, Some(Graft::Sgd))
                .with_epsilon(Ridge::Relative(1e-6))
                .with_precision(Precision::F32)
                .with_roots(RootMethod::CoupledNewton(Default::default()));
            Ok(Box::new(Shampoo::new(p, c)?))
        },
    },
    Method {
        name: "kradagrad-star",
        about: "KrADagrad*, f32, lr 5e-3, eps 1e-8, SGD-norm graft",
        build: |p, n| {
            let c = authors(
                AdaptiveConfig::kradagrad_star(),
                n,
                5e-3,
                1e-8,
                Some(Graft::Sgd),
            );
            Ok(Box::new(KrAdagradStar::new(p, c)?))
        },
    },
    Method {
        name: "kradagrad",
        about: "KrADagrad, f32, lr 1e-2, eps 1e-8, no graft",
        build: |p, n| {
            let c = authors(AdaptiveConfig::kradagrad(), n, 1e-2, 1e-8, None);
            Ok(Box::new(KrAdagrad::new(p, c)?))
        },
    },
];

/// One method's run on one problem.
#[derive(Clone, Debug)]
pub struct Run {
    /// The method's name.
    pub method: &'static str,
    /// The loss after each step (index 0: the start), as long as the run went.
    pub losses: Vec<f64>,
    /// Failures and other events the optimizer reported, deduplicated, and why it stopped.
    pub events: Vec<String>,
    /// Mean seconds of one optimizer step (without the gradient).
    pub seconds_per_step: f64,
    /// Optimizer seconds up to each step (index 0: 0).
    pub seconds: Vec<f64>,
}

/// Every method on one problem.
#[derive(Clone, Debug)]
pub struct ProblemRuns {
    /// The condition number per factor.
    pub kappa: f64,
    /// The runs, in [`METHODS`] order.
    pub runs: Vec<Run>,
}

/// Runs one method for `steps` steps.
pub fn run_method(m: &Method, p: &Problem, steps: usize) -> Result<Run, String> {
    let mut params = ParamStore::new();
    let id = params.add("X", p.x0.clone());
    let mut opt = (m.build)(&params, p.n).map_err(|e| format!("{}: {e}", m.name))?;
    let mut losses = Vec::with_capacity(steps + 1);
    let mut events: Vec<String> = Vec::new();
    let mut seconds = 0.0;
    let mut elapsed = vec![0.0];
    let (l0, mut g) = p.loss_and_grad(params.get(id));
    losses.push(l0);
    for step in 1..=steps {
        let grads = Gradients::from_params(vec![Some(g)]);
        let t0 = Instant::now();
        let r = opt.step(&mut params, &grads, &Default::default());
        seconds += t0.elapsed().as_secs_f64();
        match r {
            Ok(rep) => {
                for n in rep.notes.iter().filter(|n| !n.is_routine()) {
                    let line = format!("{}: {n}", m.name);
                    if !events.contains(&line) {
                        events.push(line);
                    }
                }
            }
            Err(e) => {
                events.push(format!("{}: stopped at step {step}: {e}", m.name));
                break;
            }
        }
        let (l, gn) = p.loss_and_grad(params.get(id));
        losses.push(l);
        elapsed.push(seconds);
        g = gn;
        if !l.is_finite() {
            events.push(format!("{}: loss {l} at step {step}; stopped", m.name));
            break;
        }
    }
    let taken = (losses.len() - 1).max(1);
    Ok(Run {
        method: m.name,
        losses,
        events,
        seconds_per_step: seconds / taken as f64,
        seconds: elapsed,
    })
}

/// Every method on every condition number.
pub fn run_all(cfg: &IllConfig) -> Result<Vec<ProblemRuns>, String> {
    cfg.kappas
        .iter()
        .map(|&kappa| {
            let p = Problem::new(cfg.n, kappa, cfg.seed);
            let runs = METHODS
                .iter()
                .map(|m| run_method(m, &p, cfg.steps))
                .collect::<Result<Vec<Run>, String>>()?;
            Ok(ProblemRuns { kappa, runs })
        })
        .collect()
}

/// The printed report: per condition number, the loss table at [`TABLE_STEPS`] (relative to
/// the start with `relative`), seconds per step when `seconds`, and the events. With
/// `numbers` false every loss and time is `~` (the layout alone, for snapshots).
pub fn render(cfg: &IllConfig, all: &[ProblemRuns], seconds: bool, numbers: bool) -> String {
    let mut s = format!(
        "ill_conditioned: minimize tr(X^T H0 X H1), X {n}x{n}, {steps} steps, seed {seed}\n",
        n = cfg.n,
        steps = cfg.steps,
        seed = cfg.seed
    );
    for m in &METHODS {
        let _ = writeln!(s, "  {:<16} {}", m.name, m.about);
    }
    for pr in all {
        let _ = writeln!(
            s,
            "\nkappa {:.0e} per factor (Hessian {:.0e}): loss after each step",
            pr.kappa,
            pr.kappa * pr.kappa
        );
        let _ = write!(s, "{:>6}", "step");
        for r in &pr.runs {
            let _ = write!(s, " {:>15}", r.method);
        }
        s.push('\n');
        for &st in TABLE_STEPS.iter().filter(|&&st| st <= cfg.steps) {
            let _ = write!(s, "{st:>6}");
            for r in &pr.runs {
                let cell = match r.losses.get(st) {
                    Some(_) if !numbers => "~".to_string(),
                    Some(l) => format!("{l:.4e}"),
                    None => "stopped".to_string(),
                };
                let _ = write!(s, " {cell:>15}");
            }
            s.push('\n');
        }
        if cfg.steps != *TABLE_STEPS.last().unwrap() && !TABLE_STEPS.contains(&cfg.steps) {
            let _ = write!(s, "{:>6}", cfg.steps);
            for r in &pr.runs {
                let cell = match r.losses.get(cfg.steps) {
                    Some(_) if !numbers => "~".to_string(),
                    Some(l) => format!("{l:.4e}"),
                    None => "stopped".to_string(),
                };
                let _ = write!(s, " {cell:>15}");
            }
            s.push('\n');
        }
        if seconds {
            let _ = write!(s, "{:>6}", "s/step");
            for r in &pr.runs {
                let _ = write!(s, " {:>15}", format!("{:.4}", r.seconds_per_step));
            }
            s.push('\n');
        }
        for r in &pr.runs {
            for e in &r.events {
                let _ = writeln!(s, "event: {e}");
            }
        }
    }
    s
}

/// The CSV path of one condition number: `PATH` with `-kappa1e4` (say) before its extension.
pub fn csv_path(path: &Path, kappa: f64) -> PathBuf {
    let stem = path.file_stem().map_or_else(
        || "ill_conditioned".into(),
        |s| s.to_string_lossy().into_owned(),
    );
    let ext = path
        .extension()
        .map_or_else(|| "csv".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-kappa{kappa:.0e}.{ext}"))
}

/// Writes each condition number's curves as a CSV beside `path` ([`csv_path`]), in the columns
/// the examples' CSVs share (`optimizer,step,seconds,train_loss`, read by `kron-plot`), and
/// returns the paths written.
///
/// # Errors
/// What the file system reported, with the path.
pub fn write_csv(path: &Path, all: &[ProblemRuns]) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    for pr in all {
        let mut s = String::from("optimizer,step,seconds,train_loss\n");
        for r in &pr.runs {
            for (i, (l, t)) in r.losses.iter().zip(&r.seconds).enumerate() {
                let _ = writeln!(s, "{},{i},{t:e},{l:e}", r.method);
            }
        }
        let p = csv_path(path, pr.kappa);
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&p, s).map_err(|e| format!("{}: {e}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

/// The example's `main`: flags, runs, table, CSV; exit 2 on a usage error, 1 on a failure.
pub fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let cfg = match IllConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ill_conditioned: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let path = cfg
        .csv
        .clone()
        .unwrap_or_else(|| crate::train::default_csv("ill_conditioned"));
    if let Err(e) = crate::report::check_writable(&path) {
        eprintln!(
            "ill_conditioned: cannot write the curves to {}: {e}",
            path.display()
        );
        return std::process::ExitCode::from(2);
    }
    match run_all(&cfg) {
        Ok(all) => {
            print!("{}", render(&cfg, &all, true, true));
            match write_csv(&path, &all) {
                Ok(paths) => {
                    for p in paths {
                        println!("curves written to {}", p.display());
                    }
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ill_conditioned: cannot write {e}");
                    std::process::ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("ill_conditioned: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
