//! Prints kron's measured step figures in one run:
//!
//! 1. the machine's FMA peak (the ceiling of every rate) and sgemm GFLOP/s at n = 1000 and 2048;
//! 2. for the autoencoder (batch 1000) and the conv net (batch 128): the median and best of
//!    `--reps` forward+backward steps, the same GEMMs alone timed in alternation with the
//!    steps, the GEMMs' GFLOP count and rate, and the ratio step time / GEMM time;
//! 3. whole training steps on the autoencoder with SGD and with KFAC (inverses every 20
//!    steps; statistics every step and every 10 steps), amortized per step, their ratios to
//!    SGD, and each ratio divided by its FLOP ratio.
//!
//! ```text
//! cargo run --release -p kron-benches --example step_table [-- --reps 15 --rounds 3 --skip-kfac --detail --only convnet|pieces]
//! cargo run --release -p kron-benches --example step_table -- --help
//! ```

use kron::autodiff::Rng;
use kron::layers::Module;
use kron::optim::{Kfac, KfacConfig, Optimizer, Sgd, SgdConfig, StepReport};
use kron::train_step;
use kron_benches::{
    GemmSet, Samples, Workload, args_or_exit, fma_peak, fma_width, load_average, time,
};

struct Args {
    reps: usize,
    rounds: usize,
    kfac: bool,
    detail: bool,
    only: Option<String>,
}

/// The usage line `--help` prints.
const USAGE: &str = "usage: step_table [--reps N] [--rounds N] [--skip-kfac] [--detail] \
[--only sgemm|autoencoder|convnet|pieces|kfac]

  --reps N       forward+backward steps timed per workload (default 15)
  --rounds N     interleaved rounds of the KFAC/SGD training-step table (default 3)
  --skip-kfac    leave out the training-step table
  --detail       also time the conv net's pieces
  --only PART    run one part: sgemm, autoencoder, convnet, pieces or kfac";

/// The flags, or what is wrong with them (`Ok(None)`: `--help` was asked for).
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut out = Args {
        reps: 15,
        rounds: 3,
        kfac: true,
        detail: false,
        only: None,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("{name} takes a positive whole number, not {v:?}")),
            }
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--reps" => out.reps = num("--reps")?,
            "--rounds" => out.rounds = num("--rounds")?,
            "--skip-kfac" => out.kfac = false,
            "--detail" => out.detail = true,
            "--only" => {
                let part = it.next().ok_or("--only needs a value")?;
                const PARTS: [&str; 5] = ["sgemm", "autoencoder", "convnet", "pieces", "kfac"];
                if !PARTS.contains(&part.as_str()) {
                    return Err(format!(
                        "--only takes one of {}, not {part:?}",
                        PARTS.join(", ")
                    ));
                }
                out.only = Some(part);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(out))
}

fn load() -> String {
    load_average().map_or_else(|| "?".into(), |l| format!("{l:.2}"))
}

fn sgemm_line(n: usize, reps: usize) {
    let mut set = GemmSet::square(n, 1);
    set.run();
    let mut s = Samples::default();
    for _ in 0..reps {
        s.push(time(|| set.run()).0);
    }
    let gf = set.flops() / 1e9;
    println!(
        "sgemm n={n:<5} median {:>7.2} ms  best {:>7.2} ms  {:>6.1} GFLOP/s median  {:>6.1} best",
        s.median() * 1e3,
        s.best() * 1e3,
        gf / s.median(),
        gf / s.best()
    );
}

/// Step and GEMMs alone, alternating, so both see the same machine load.
fn step_vs_gemms(w: &Workload, reps: usize, detail: bool) -> (f64, f64) {
    let mut gemms = GemmSet::new(w.gemms(), 7);
    let gflop = gemms.flops() / 1e9;
    // Warm up: allocator, thread pools, caches.
    for _ in 0..2 {
        std::hint::black_box(w.forward_backward());
        gemms.run();
    }
    let (mut step, mut alone) = (Samples::default(), Samples::default());
    for _ in 0..reps {
        step.push(time(|| std::hint::black_box(w.forward_backward())).0);
        alone.push(time(|| gemms.run()).0);
    }
    println!(
        "{:<12} batch {:<5} {:>5.2} GFLOP in {} GEMMs",
        w.name,
        w.batch(),
        gflop,
        gemms.shapes().len()
    );
    for (what, s) in [("fwd+bwd step", &step), ("GEMMs alone", &alone)] {
        println!(
            "  {what:<13} median {:>8.1} ms  best {:>8.1} ms  {:>6.1} GFLOP/s median  {:>6.1} best",
            s.median() * 1e3,
            s.best() * 1e3,
            gflop / s.median(),
            gflop / s.best()
        );
    }
    let ratio_med = step.median() / alone.median();
    let ratio_best = step.best() / alone.best();
    println!(
        "  step / GEMM   {ratio_med:.2} (medians)  {ratio_best:.2} (bests)  goal <= 1.30  [{} reps, load {}]",
        reps,
        load()
    );
    if detail {
        for s in w.gemms() {
            let mut one = GemmSet::new(vec![s.clone()], 3);
            one.run();
            let mut t = Samples::default();
            for _ in 0..5 {
                t.push(time(|| one.run()).0);
            }
            println!(
                "    {:<20} {:>7}x{:<5}x{:<5} {}{} {:>7.2} ms {:>6.1} GFLOP/s",
                s.label,
                s.m,
                s.k,
                s.n,
                if s.ta { "T" } else { "N" },
                if s.tb { "T" } else { "N" },
                t.median() * 1e3,
                s.flops() / 1e9 / t.median()
            );
        }
    }
    println!(
        "  fingerprint of loss and gradients: {:016x}",
        w.fingerprint()
    );
    (step.median(), alone.median())
}

/// Forward and backward times of the conv net's pieces, each op alone on a tape (its backward
/// from `sum()`, whose own backward is one fill), and im2col / col2im alone; medians of `reps`.
fn conv_pieces(reps: usize) {
    use kron::autodiff::ops::conv::{col2im, im2col};
    use kron::autodiff::{ConvGeom, Tape, Tensor, Var};
    let mut rng = Rng::new(9);
    let batch = 128;
    let mut shape = [batch, 3, 32, 32];
    let piece = |name: &str, x: &Tensor, needs_grad: bool, f: &dyn Fn(Var<'_>) -> Var<'_>| {
        let (mut fwd, mut bwd) = (Samples::default(), Samples::default());
        for _ in 0..reps {
            let tape = Tape::without_params();
            let xv = if needs_grad {
                tape.var(x.clone())
            } else {
                tape.input(x.clone())
            };
            let (d, y) = time(|| f(xv));
            fwd.push(d);
            let l = y.sum();
            bwd.push(time(|| tape.backward(l)).0);
        }
        println!(
            "    {name:<24} fwd {:>7.1} ms  bwd {:>7.1} ms",
            fwd.median() * 1e3,
            bwd.median() * 1e3
        );
    };
    for (i, out_ch) in [32usize, 32, 64].into_iter().enumerate() {
        let x = Tensor::randn(&shape, 0.0, 1.0, &mut rng);
        let w = Tensor::randn(&[out_ch, shape[1], 5, 5], 0.0, 0.1, &mut rng);
        let b = Tensor::zeros(&[out_ch]);
        let geom = ConvGeom::new(&shape, w.shape(), 1, 2);
        let mut t = Samples::default();
        let mut patches = Vec::new();
        for _ in 0..reps {
            t.push(time(|| patches = im2col(x.data(), &geom)).0);
        }
        let mut t2 = Samples::default();
        for _ in 0..reps {
            t2.push(time(|| std::hint::black_box(col2im(&patches, &geom))).0);
        }
        println!(
            "    conv{} im2col {:>7.1} ms  col2im {:>7.1} ms  ({} x {} patches)",
            i + 1,
            t.median() * 1e3,
            t2.median() * 1e3,
            geom.batch * geom.locations(),
            geom.patch_len()
        );
        drop(patches);
        piece(&format!("conv{} conv2d", i + 1), &x, i > 0, &|v: Var<
            '_,
        >| {
            let tape = v.tape();
            v.conv2d(tape.var(w.clone()), Some(tape.var(b.clone())), 1, 2, None)
        });
        shape[1] = out_ch;
        let y = Tensor::randn(&shape, 0.0, 1.0, &mut rng);
        piece(&format!("conv{} relu", i + 1), &y, true, &|v: Var<'_>| {
            v.relu()
        });
        // The pool sees the ReLU's output, ties at zero included, as in the net.
        let y = y.map(|v| v.max(0.0));
        piece(&format!("conv{} max_pool2d", i + 1), &y, true, &|v: Var<
            '_,
        >| {
            v.max_pool2d(3, 2, 1)
        });
        shape[2] /= 2;
        shape[3] /= 2;
    }
}

/// One training run: a model copy, its optimizer and its generator.
struct Run {
    label: String,
    w: Workload,
    opt: Box<dyn Optimizer>,
    rng: Rng,
    per_step: Samples,
    reports: Vec<StepReport>,
}

impl Run {
    fn new(label: &str, make: impl FnOnce(&Workload) -> Box<dyn Optimizer>) -> Self {
        let w = Workload::autoencoder(1000, 11);
        let opt = make(&w);
        Run {
            label: label.to_string(),
            w,
            opt,
            rng: Rng::new(5),
            per_step: Samples::default(),
            reports: Vec::new(),
        }
    }

    /// `n` consecutive training steps; records the mean step time.
    fn steps(&mut self, n: usize, record: bool) {
        let (d, reports) = time(|| {
            (0..n)
                .map(|_| {
                    train_step(
                        &self.w.model,
                        self.w.loss,
                        &mut self.w.params,
                        self.opt.as_mut(),
                        &self.w.inputs,
                        &self.w.targets,
                        &mut self.rng,
                    )
                    .expect("a finite step")
                    .report
                })
                .collect::<Vec<_>>()
        });
        if record {
            self.per_step.0.push(d.as_secs_f64() / n as f64);
            self.reports.extend(reports);
        }
    }
}

fn kfac_table(rounds: usize) {
    const PERIOD: usize = 20;
    let w = Workload::autoencoder(1000, 11);
    let fl = w.kfac_flops();
    let kfac = |stats: u64| {
        move |w: &Workload| -> Box<dyn Optimizer> {
            let cfg = KfacConfig::default()
                .with_stats_period(stats)
                .with_inverse_period(PERIOD as u64);
            Box::new(Kfac::new(&w.model, &w.params, cfg).expect("a valid configuration"))
        }
    };
    let mut runs = vec![
        Run::new("SGD", |w| {
            Box::new(Sgd::new(&w.params, SgdConfig::new(0.01)).expect("a valid configuration"))
        }),
        Run::new("KFAC stats/1", kfac(1)),
        Run::new("KFAC stats/10", kfac(10)),
    ];
    // One warm-up period each, then `rounds` periods each, interleaved so that every
    // optimizer sees the same machine load; a period holds one refresh (and, with statistics
    // every 10 steps, two statistics updates), so its mean is the amortized step.
    for r in &mut runs {
        r.steps(PERIOD, false);
    }
    for _ in 0..rounds {
        for r in &mut runs {
            r.steps(PERIOD, true);
        }
    }
    let sgd = runs[0].per_step.median();
    println!(
        "autoencoder training steps, batch 1000, inverses every {PERIOD} steps, amortized over {rounds} periods of {PERIOD} [load {}]",
        load()
    );
    println!(
        "  FLOP model (GFLOP): SGD step {:.2}; KFAC adds sampled backward {:.2} (with weight gradients: {:.2}), factors {:.2} as blocked symmetric products (full GEMMs: {:.2}), preconditioning {:.2}, refresh {:.2} per {PERIOD} steps",
        fl.sgd_step / 1e9,
        fl.sampled_backward / 1e9,
        fl.sampled_backward_full / 1e9,
        fl.factors / 1e9,
        fl.full_factors / 1e9,
        fl.precondition / 1e9,
        fl.refresh / 1e9
    );
    println!(
        "  {:<14} {:>9} {:>9} {:>7} | {:>6} {:>7} {:>8} | {:>6} {:>7} {:>8} | {:>8} {:>9} {:>10}",
        "optimizer",
        "median",
        "best",
        "ratio",
        "GFLOP",
        "FLOP x",
        "ratio/FL",
        "lean",
        "FLOP x",
        "ratio/FL",
        "stats ms",
        "update ms",
        "refresh ms"
    );
    for (i, r) in runs.iter().enumerate() {
        let period = |stats| match i {
            0 => (fl.sgd_step, fl.sgd_step),
            _ => (
                fl.kfac_step(stats, PERIOD as u64),
                fl.lean_kfac_step(stats, PERIOD as u64),
            ),
        };
        let (flops, lean) = period(if i == 1 { 1 } else { 10 });
        let ratio = r.per_step.median() / sgd;
        let (fr, lr) = (flops / fl.sgd_step, lean / fl.sgd_step);
        let n = r.reports.len().max(1) as f64;
        let stats: f64 = r.reports.iter().map(|x| x.stats_ms).sum::<f64>() / n;
        let update: f64 = r.reports.iter().map(|x| x.update_ms).sum::<f64>() / n;
        let mut refresh = Samples(
            r.reports
                .iter()
                .filter(|x| x.refreshed)
                .map(|x| x.refresh_ms / 1e3)
                .collect(),
        );
        if refresh.0.is_empty() {
            refresh.0.push(0.0);
        }
        println!(
            "  {:<14} {:>7.1}ms {:>7.1}ms {:>6.2}x | {:>6.2} {:>6.2}x {:>8.2} | {:>6.2} {:>6.2}x {:>8.2} | {:>8.1} {:>9.1} {:>10.1}",
            r.label,
            r.per_step.median() * 1e3,
            r.per_step.best() * 1e3,
            ratio,
            flops / 1e9,
            fr,
            ratio / fr,
            lean / 1e9,
            lr,
            ratio / lr,
            stats,
            update,
            refresh.median() * 1e3
        );
    }
    println!(
        "  GFLOP: as kron runs the step (blocked symmetric factor products, the sampled pass for the captures alone); lean: exactly half a GEMM per factor product"
    );
    println!(
        "  goals: KFAC stats/1 <= 2.5x SGD, stats/10 <= 1.8x; stats/update ms are per step (amortized), refresh ms is the median refresh itself"
    );
    sampled_backward(5);
}

/// The true-Fisher pass on the autoencoder: a backward sweep from the sampled-label loss with
/// parameter gradients (`Tape::backward`) and for the captures alone, seeded with the loss's
/// gradient in the outputs as `train_step` runs it (`Tape::backward_captures_from`),
/// alternating.
fn sampled_backward(reps: usize) {
    use kron::autodiff::Tape;
    let w = Workload::autoencoder(1000, 11);
    let tape = Tape::new(&w.params).capturing(w.blocks().iter().map(|b| b.layer));
    let out = w.model.forward(tape.input(w.inputs.clone()));
    std::hint::black_box(tape.backward(w.loss.apply(out, &w.targets)));
    let sampled = w.loss.sample(&out.value(), &mut Rng::new(2));
    let ls = w.loss.apply(out, &sampled);
    let (mut full, mut alone) = (Samples::default(), Samples::default());
    for _ in 0..reps {
        full.push(time(|| tape.backward(ls)).0);
        alone.push(
            time(|| {
                let seed = w.loss.input_gradient(&out.value(), &sampled);
                tape.backward_captures_from(out, seed)
            })
            .0,
        );
    }
    println!(
        "  sampled-label backward: with parameter gradients {:.1} ms, captures alone {:.1} ms (medians of {reps}) [load {}]",
        full.median() * 1e3,
        alone.median() * 1e3,
        load()
    );
}

fn main() {
    let args = args_or_exit("step_table", USAGE, parse_args(std::env::args().skip(1)));
    println!(
        "kron step table: {} cores, load {} at start",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
    );
    let runs = |part: &str| args.only.as_deref().is_none_or(|o| o == part);
    if runs("sgemm") {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let (Some((isa, _)), Some(one), Some(all)) = (fma_width(), fma_peak(1), fma_peak(cores))
        {
            println!(
                "FMA peak (f32, {isa}): {one:.1} GFLOP/s on 1 core, {all:.1} on {cores}: the ceiling of every rate below"
            );
        }
        println!("matrixmultiply kernel: {}", kron::autodiff::kernel_name());
        sgemm_line(1000, 10);
        sgemm_line(2048, 5);
    }
    if runs("autoencoder") {
        step_vs_gemms(&Workload::autoencoder(1000, 3), args.reps, args.detail);
    }
    if runs("convnet") {
        step_vs_gemms(&Workload::convnet(128, 3), args.reps, args.detail);
    }
    if (runs("convnet") && args.detail) || args.only.as_deref() == Some("pieces") {
        conv_pieces(args.reps);
    }
    if args.kfac && runs("kfac") {
        kfac_table(args.rounds);
    }
    println!("load {} at end", load());
}
