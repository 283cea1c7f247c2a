//! Prints the cost of Shampoo, KrADagrad* and KrADagrad in one run:
//!
//! 1. the time of one root per block size: `f32` and `f64` eigendecomposition
//!    ([`Backend::sym_power`]) and coupled Newton in `f32`, on the CPU backend;
//! 2. whole training steps on the autoencoder (batch 1000) with SGD and each method (roots
//!    every 20 steps), amortized per step over interleaved periods, each method's ratio to SGD
//!    next to its model: the statistics and preconditioning products counted exactly from the
//!    blocks the method built, a refresh counted at the measured time of its roots (table 1's
//!    rate, converted to SGD-step FLOPs at SGD's measured rate).
//!
//! ```text
//! cargo run --release -p kron-benches --example adaptive_table [-- --rounds 5 --only roots|steps]
//! ```

use kron::autodiff::{Rng, Tensor};
use kron::optim::backend::{IterationConfig, coupled_newton};
use kron::optim::{
    AdaptiveConfig, Backend, CpuBackend, KrAdagrad, KrAdagradStar, Optimizer, Precision, Ridge,
    RootMethod, Sgd, SgdConfig, Shampoo,
};
use kron::train_step;
use kron_benches::{Samples, Workload, args_or_exit, load_average, time};

const PERIOD: usize = 20;
const SIZES: [usize; 5] = [64, 128, 256, 512, 1000];

struct Args {
    rounds: usize,
    only: Option<String>,
}

const USAGE: &str = "usage: adaptive_table [--rounds N] [--only roots|steps]

  --rounds N   interleaved periods of 20 steps per optimizer (default 5)
  --only PART  run one part: roots or steps";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        rounds: 5,
        only: None,
    };
    let mut it = args.into_iter();
    while let Some(s) = it.next() {
        match s.as_str() {
            "--help" | "-h" => return Ok(None),
            "--rounds" => {
                let v = it.next().ok_or("--rounds needs a value")?;
                a.rounds = v.parse().map_err(|e| format!("--rounds {v:?}: {e}"))?;
                if a.rounds == 0 {
                    return Err("--rounds must be at least 1".into());
                }
            }
            "--only" => {
                let v = it.next().ok_or("--only needs a value")?;
                if v != "roots" && v != "steps" {
                    return Err(format!("--only: expected roots or steps, found {v:?}"));
                }
                a.only = Some(v);
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(Some(a))
}

/// A statistic like Shampoo's: `G G^T` over `2d` random columns, plus a small ridge.
fn statistic(d: usize) -> Tensor {
    let g = Tensor::randn(&[d, 2 * d], 0.0, 1.0, &mut Rng::new(d as u64));
    g.matmul_t(false, &g, true)
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn median_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut s = Samples::default();
    for _ in 0..reps {
        s.push(time(&mut f).0);
    }
    s.median()
}

/// Table 1: seconds per root by size and method; returns `(d, f64 eigh, f32 eigh)` seconds.
fn roots_table() -> Vec<(usize, f64, f64)> {
    println!("one root (L + eps I)^(-1/4) on the CPU backend, median of 3 (ms)");
    println!(
        "  {:>5} {:>10} {:>10} {:>12} {:>9}",
        "d", "eigh f64", "eigh f32", "Newton f32", "its"
    );
    let (c32, c64) = (
        CpuBackend::new(Precision::F32),
        CpuBackend::new(Precision::F64),
    );
    let mut out = Vec::new();
    for d in SIZES {
        let s = statistic(d);
        let ridge = Ridge::Relative(1e-6);
        let m64 = c64.upload(&s);
        let m32 = c32.upload(&s);
        let e64 = median_of(3, || {
            c64.sym_power(&m64, -0.25, ridge, Precision::F64).unwrap();
        });
        let e32 = median_of(3, || {
            c32.sym_power(&m32, -0.25, ridge, Precision::F32).unwrap();
        });
        let top = kron::optim::backend::largest_eigenvalue(&c32, &m32, 50);
        let mut its = 0;
        let nt = median_of(3, || {
            let (_, rep) =
                coupled_newton(&c32, &m32, 4, ridge.at(top), &IterationConfig::default()).unwrap();
            its = rep.iterations_run;
        });
        println!(
            "  {d:>5} {:>10.1} {:>10.1} {:>12.1} {its:>9}",
            e64 * 1e3,
            e32 * 1e3,
            nt * 1e3
        );
        out.push((d, e64, e32));
    }
    out
}

/// The root time of a `d`-wide axis, interpolated in `d^3` from table 1.
fn root_seconds(table: &[(usize, f64, f64)], d: usize, f64_roots: bool) -> f64 {
    let pick = |r: &(usize, f64, f64)| if f64_roots { r.1 } else { r.2 };
    let (lo, hi) = match table.iter().position(|r| r.0 >= d) {
        Some(0) => (table[0], table[0]),
        Some(i) => (table[i - 1], table[i]),
        None => (table[table.len() - 1], table[table.len() - 1]),
    };
    let cube = |x: usize| (x as f64).powi(3);
    if hi.0 == lo.0 {
        pick(&hi) * cube(d) / cube(hi.0)
    } else {
        let t = (cube(d) - cube(lo.0)) / (cube(hi.0) - cube(lo.0));
        pick(&lo) + t * (pick(&hi) - pick(&lo))
    }
}

/// A method's extra FLOPs per step (statistics and preconditioning, from its blocks) and its
/// refresh seconds per period (from the root table).
#[derive(Default)]
struct Model {
    flops: f64,
    refresh_seconds: f64,
}

fn model_of(
    blocks: &[Vec<usize>],
    method: &str,
    table: &[(usize, f64, f64)],
    f64_roots: bool,
) -> Model {
    let mut m = Model::default();
    for dims in blocks {
        let len: f64 = dims.iter().map(|&d| d as f64).product();
        let per_axis = |d: usize| 2.0 * d as f64 * len; // H_(i) H_(i)^T, or one mode product
        let cube = |d: usize| 2.0 * (d as f64).powi(3);
        let precondition: f64 = dims.iter().map(|&d| per_axis(d)).sum();
        let roots: f64 = dims
            .iter()
            .map(|&d| root_seconds(table, d, f64_roots))
            .sum();
        match method {
            "shampoo" => {
                m.flops += dims.iter().map(|&d| per_axis(d)).sum::<f64>() + precondition;
                m.refresh_seconds += roots;
            }
            "kradagrad-star" => {
                // C, then C P and P (C P).
                m.flops += dims
                    .iter()
                    .map(|&d| per_axis(d) + 2.0 * cube(d))
                    .sum::<f64>()
                    + precondition;
                m.refresh_seconds += roots;
            }
            _ => {
                // One axis a step (the largest, in the steady state): H along the other axes,
                // its contraction, P P, P' C and (P' C) P'.
                let big = *dims.iter().max().unwrap();
                let others: f64 = precondition - per_axis(big);
                m.flops += others + per_axis(big) + 3.0 * cube(big) + precondition;
                m.refresh_seconds += root_seconds(table, big, f64_roots);
            }
        }
    }
    m
}

struct Run {
    label: &'static str,
    w: Workload,
    opt: Box<dyn Optimizer>,
    rng: Rng,
    per_step: Samples,
}

impl Run {
    fn steps(&mut self, n: usize, record: bool) {
        let (d, ()) = time(|| {
            for _ in 0..n {
                train_step(
                    &self.w.model,
                    self.w.loss,
                    &mut self.w.params,
                    self.opt.as_mut(),
                    &self.w.inputs,
                    &self.w.targets,
                    &mut self.rng,
                )
                .expect("a finite step");
            }
        });
        if record {
            self.per_step.0.push(d.as_secs_f64() / n as f64);
        }
    }
}

fn steps_table(rounds: usize, table: &[(usize, f64, f64)]) {
    let w0 = Workload::autoencoder(1000, 11);
    let sgd_flops = w0.kfac_flops().sgd_step;
    // Shampoo at lr 1e-3 (its graft is Adam's step): at its default 0.01 the sigmoid units
    // saturate within ten steps, the gradients turn denormal and every GEMM of the step runs
    // about ten times slower, the optimizer's as well as the model's.
    let shampoo = AdaptiveConfig::shampoo()
        .with_lr(1e-3)
        .with_refresh_period(PERIOD as u64)
        .with_start_step(1);
    let star = AdaptiveConfig::kradagrad_star()
        .with_epsilon(Ridge::Absolute(3e-4))
        .with_refresh_period(PERIOD as u64);
    let krad = AdaptiveConfig::kradagrad()
        .with_epsilon(Ridge::Absolute(8.5e-4))
        .with_refresh_period(PERIOD as u64);
    let blocks = |o: &dyn Fn(&str) -> Option<Vec<Vec<usize>>>, w: &Workload| -> Vec<Vec<usize>> {
        w.params
            .ids()
            .filter_map(|id| o(w.params.name(id)))
            .flatten()
            .collect()
    };
    let make = |label: &'static str| -> (Run, Vec<Vec<usize>>) {
        let w = Workload::autoencoder(1000, 11);
        let (opt, b): (Box<dyn Optimizer>, Vec<Vec<usize>>) = match label {
            "SGD" => (
                Box::new(Sgd::new(&w.params, SgdConfig::new(0.01)).unwrap()),
                vec![],
            ),
            "shampoo" => {
                let o = Shampoo::new(&w.params, shampoo).unwrap();
                let b = blocks(&|n| o.layout(n).map(|l| l.1), &w);
                (Box::new(o), b)
            }
            "kradagrad-star" => {
                let o = KrAdagradStar::new(&w.params, star).unwrap();
                let b = blocks(&|n| o.layout(n).map(|l| l.1), &w);
                (Box::new(o), b)
            }
            _ => {
                let o = KrAdagrad::new(&w.params, krad).unwrap();
                let b = blocks(&|n| o.layout(n).map(|l| l.1), &w);
                (Box::new(o), b)
            }
        };
        (
            Run {
                label,
                w,
                opt,
                rng: Rng::new(5),
                per_step: Samples::default(),
            },
            b,
        )
    };
    let mut runs = Vec::new();
    let mut models = Vec::new();
    for label in ["SGD", "shampoo", "kradagrad-star", "kradagrad"] {
        let (r, b) = make(label);
        let f64_roots = label == "shampoo" && shampoo.roots == RootMethod::EIGH_F64;
        models.push(model_of(&b, label, table, f64_roots));
        runs.push(r);
    }
    for r in &mut runs {
        r.steps(PERIOD, false);
    }
    for _ in 0..rounds {
        for r in &mut runs {
            r.steps(PERIOD, true);
        }
    }
    let sgd = runs[0].per_step.median();
    let rate = sgd_flops / sgd;
    println!(
        "\nautoencoder training steps, batch 1000, roots every {PERIOD} steps, medians of {rounds} interleaved periods [load {}]",
        load()
    );
    println!(
        "  model: SGD step {:.2} GFLOP at the measured {:.1} GFLOP/s; a method adds its statistics and preconditioning products and its roots' measured time per period",
        sgd_flops / 1e9,
        rate / 1e9
    );
    println!(
        "  {:<15} {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7} {:>8}",
        "optimizer", "median", "best", "ratio", "+GFLOP", "roots ms", "model", "ratio/mo"
    );
    for (r, m) in runs.iter().zip(&models) {
        let ratio = r.per_step.median() / sgd;
        let model = 1.0 + m.flops / sgd_flops + m.refresh_seconds / PERIOD as f64 / sgd;
        println!(
            "  {:<15} {:>7.1}ms {:>7.1}ms {:>6.2}x | {:>9.2} {:>9.1} {:>6.2}x {:>8.2}",
            r.label,
            r.per_step.median() * 1e3,
            r.per_step.best() * 1e3,
            ratio,
            m.flops / 1e9,
            m.refresh_seconds * 1e3,
            model,
            ratio / model
        );
    }
    println!("  goal: ratio/model <= 1.15 for each method");
}

fn load() -> String {
    load_average().map_or_else(|| "?".into(), |l| format!("{l:.2}"))
}

fn main() {
    let args = args_or_exit(
        "adaptive_table",
        USAGE,
        parse_args(std::env::args().skip(1)),
    );
    println!(
        "kron adaptive table: {} cores, GEMM kernel {}, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kron::autodiff::kernel_name(),
        load()
    );
    let table = roots_table();
    if args.only.as_deref() != Some("roots") {
        steps_table(args.rounds, &table);
    }
}
