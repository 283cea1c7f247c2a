//! What data-parallel training costs over MPI: `mpirun -np N -x RAYON_NUM_THREADS=1 overhead
//! [--steps S] [--batch B]` trains the autoencoder example (784-1000-500-250-30 and back, on
//! the bundled MNIST digits, the example's own recipes) with SGD; with KFAC as the example runs
//! it (refreshes split across the ranks, each computed by its owner and broadcast); with the
//! same KFAC computing every refresh on every rank; and with each block's direction computed
//! by its owner too (KAISA's gradient workers at a fraction `1/N`); and with Shampoo (its
//! roots split, every 20 steps from step 20). Rank 0 prints, per step:
//! the step's time; the time in collectives (transfers and the wait for the slowest rank); the
//! compute (the rest); per refresh step, the refresh's time and the part of it spent sharing
//! the results; the optimizer's statistics (with their reduction) and its preconditioning and
//! update; and the collectives and their payload, the counts an alpha-beta model of the
//! network multiplies (the book's "Training on many machines").
//!
//! Run it with 1 rank for the baseline and with 2 for the split, one core per rank
//! (`RAYON_NUM_THREADS=1`): more ranks than cores measure the scheduler, not kron.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use kron::DataParallel;
use kron::optim::{CoarseConfig, Communicator};
use kron::prelude::*;
use kron_examples::autoencoder::EXAMPLE;
use kron_examples::example::Config;
use kron_examples::train::{
    BackendKind, OptimizerKind, Task, default_optimizer, gather_rows, gather_targets,
};
use kron_mpi::MpiComm;

const USAGE: &str = "usage: mpirun -np N -x RAYON_NUM_THREADS=1 overhead [--steps S] [--batch B]";

/// One configuration's means over the measured steps (every step after the first).
#[derive(Default)]
struct Timing {
    steps: usize,
    step_ms: f64,
    comm_ms: f64,
    refreshes: usize,
    refresh_ms: f64,
    share_ms: f64,
    calls: u64,
    bytes: u64,
    stats_ms: f64,
    update_ms: f64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (steps, batch) = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("overhead: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let comm: Arc<dyn Communicator> = match MpiComm::init() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("overhead: {e}");
            return ExitCode::from(2);
        }
    };
    let lead = comm.rank() == 0;
    let threads = rayon::current_num_threads();
    // (name, optimizer, refreshes split, directions split)
    let runs = [
        ("SGD", OptimizerKind::Sgd, true, false),
        ("KFAC, refreshes split", OptimizerKind::Kfac, true, false),
        (
            "KFAC, refreshes on every rank",
            OptimizerKind::Kfac,
            false,
            false,
        ),
        (
            "KFAC, refreshes and directions split",
            OptimizerKind::Kfac,
            true,
            true,
        ),
        ("Shampoo, roots split", OptimizerKind::Shampoo, true, false),
    ];
    let task = match (EXAMPLE.task)(&Config::default(), &EXAMPLE.sizes) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("overhead: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rows = Vec::new();
    for (name, kind, split, directions) in runs {
        let dp = DataParallel::new(comm.clone())
            .split_refreshes(split)
            .split_directions(directions);
        match measure(&dp, &task, kind, steps, batch) {
            Ok(t) => rows.push((name, t)),
            Err(e) => {
                eprintln!("overhead: rank {}: {name}: {e}", comm.rank());
                return ExitCode::FAILURE;
            }
        }
    }
    if lead {
        println!(
            "autoencoder, batch {batch}, {} rank(s) x {threads} thread(s), means over steps 1 \
             to {} (ms)\n",
            comm.size(),
            steps - 1
        );
        println!(
            "| run | step | compute | in collectives | refresh (per refresh step) | of it \
             sharing | statistics | preconditioning and update | collectives per step | MB per \
             step |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (name, t) in rows {
            let n = t.steps.max(1) as f64;
            let r = t.refreshes.max(1) as f64;
            let (step, comm) = (t.step_ms / n, t.comm_ms / n);
            let refresh = if t.refreshes == 0 {
                "-".to_string()
            } else if t.refresh_ms == 0.0 {
                // Shampoo and KrADagrad compute their roots in the statistics stage.
                format!("in statistics ({} steps)", t.refreshes)
            } else {
                format!("{:.1} ({} steps)", t.refresh_ms / r, t.refreshes)
            };
            let share = if t.refreshes == 0 {
                "-".to_string()
            } else {
                format!("{:.1}", t.share_ms / r)
            };
            println!(
                "| {name} | {step:.1} | {:.1} | {comm:.1} | {refresh} | {share} | {:.1} | {:.1} | \
                 {:.1} | {:.2} |",
                step - comm,
                t.stats_ms / n,
                t.update_ms / n,
                t.calls as f64 / n,
                t.bytes as f64 / n / 1e6
            );
        }
    }
    ExitCode::SUCCESS
}

fn parse(args: &[String]) -> Result<(usize, usize), String> {
    let (mut steps, mut batch) = (21, EXAMPLE.sizes.batch_size);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| -> Result<usize, String> {
            let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{flag}: expected a whole number, found {v:?}"))
        };
        match a.as_str() {
            "--steps" => steps = value("--steps")?,
            "--batch" => batch = value("--batch")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if steps < 2 {
        return Err("--steps: at least 2 (the first step is not measured)".into());
    }
    if batch == 0 {
        return Err("--batch: at least 1".into());
    }
    Ok((steps, batch))
}

/// Trains `steps` steps of the autoencoder with `kind` on consecutive batches of the bundled
/// data, and times every step after the first.
fn measure(
    dp: &DataParallel,
    task: &Task,
    kind: OptimizerKind,
    steps: usize,
    batch: usize,
) -> Result<Timing, String> {
    let n = task.len();
    if batch > n {
        return Err(format!(
            "--batch {batch}: the bundled data has {n} examples"
        ));
    }
    let mut params = ParamStore::new();
    let mut rng = Rng::new(0);
    let model = (EXAMPLE.model)(task, &mut params, &mut rng);
    let lr = EXAMPLE
        .lrs
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(0.01, |(_, lr)| *lr);
    let make = default_optimizer(EXAMPLE.kfac, CoarseConfig::default(), EXAMPLE.adaptive);
    let mut opt = make(kind, lr, model.as_ref(), &params, BackendKind::Cpu)?;
    let mut t = Timing::default();
    for step in 0..steps {
        let idx: Vec<usize> = (0..batch).map(|i| (step * batch + i) % n).collect();
        let (x, y) = (
            gather_rows(&task.train_x, &idx),
            gather_targets(&task.train_t, &idx),
        );
        let comm0 = dp.comm_seconds();
        let (calls0, bytes0) = (dp.comm_calls(), dp.comm_bytes());
        let t0 = Instant::now();
        let out = dp
            .train_step(
                model.as_ref(),
                task.loss,
                &mut params,
                opt.as_mut(),
                &x,
                &y,
                &mut rng,
            )
            .map_err(|e| format!("step {step}: {e}"))?;
        let seconds = t0.elapsed().as_secs_f64();
        if step == 0 {
            continue;
        }
        t.steps += 1;
        t.step_ms += 1e3 * seconds;
        t.comm_ms += 1e3 * (dp.comm_seconds() - comm0);
        t.calls += dp.comm_calls() - calls0;
        t.stats_ms += out.report.stats_ms;
        t.update_ms += out.report.update_ms;
        t.bytes += dp.comm_bytes() - bytes0;
        if out.report.refreshed {
            t.refreshes += 1;
            t.refresh_ms += out.report.refresh_ms;
            t.share_ms += out.report.share_ms;
        }
    }
    Ok(t)
}
