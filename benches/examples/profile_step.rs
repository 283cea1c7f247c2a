//! Runs steps of one benchmark model in a loop, for a profiler:
//!
//! ```text
//! cargo build --release -p kron-benches --example profile_step
//! perf record -g target/release/examples/profile_step convnet 10
//! ```
//!
//! Arguments: the workload and the number of steps (default 10). Workloads: `autoencoder` and
//! `convnet` (forward+backward, default `convnet`), `kfac` (whole autoencoder training steps
//! with KFAC, statistics every step, inverses every 20 steps) and `sgd` (the same with SGD).
//! Prints the mean step time.

use kron::autodiff::Rng;
use kron::optim::{Kfac, KfacConfig, Optimizer, Sgd, SgdConfig};
use kron::train_step;
use kron_benches::{Workload, args_or_exit, time};

/// The usage `--help` prints.
const USAGE: &str = "usage: profile_step [autoencoder|convnet|kfac|sgd] [STEPS]

  autoencoder, convnet   forward+backward steps of that benchmark model (default convnet)
  kfac, sgd              whole autoencoder training steps with that optimizer
  STEPS                  how many steps to time (default 10)";

/// The workload and the step count, or what is wrong with the arguments (`Ok(None)`:
/// `--help` was asked for).
fn parse_args(args: &[String]) -> Result<Option<(String, usize)>, String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(None);
    }
    if args.len() > 2 {
        return Err(format!("too many arguments: {}", args.join(" ")));
    }
    let model = args.first().cloned().unwrap_or_else(|| "convnet".into());
    if !["autoencoder", "convnet", "kfac", "sgd"].contains(&model.as_str()) {
        return Err(format!(
            "unknown workload {model:?} (expected autoencoder, convnet, kfac or sgd)"
        ));
    }
    let steps = match args.get(1) {
        None => 10,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(format!(
                    "the step count must be a positive whole number, not {s:?}"
                ));
            }
        },
    };
    Ok(Some((model, steps)))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, steps) = args_or_exit("profile_step", USAGE, parse_args(&args));
    let training = matches!(model.as_str(), "kfac" | "sgd");
    let mut w = match model.as_str() {
        "autoencoder" | "kfac" | "sgd" => Workload::autoencoder(1000, 3),
        "convnet" => Workload::convnet(128, 3),
        _ => unreachable!("parse_args accepts only the four workloads"),
    };
    if !training {
        std::hint::black_box(w.forward_backward());
        let (d, ()) = time(|| {
            for _ in 0..steps {
                std::hint::black_box(w.forward_backward());
            }
        });
        println!(
            "{}: {:.1} ms per forward+backward step ({steps} steps)",
            w.name,
            d.as_secs_f64() * 1e3 / steps as f64
        );
        return;
    }
    let mut opt: Box<dyn Optimizer> = if model == "kfac" {
        let cfg = KfacConfig::default()
            .with_stats_period(1)
            .with_inverse_period(20);
        Box::new(Kfac::new(&w.model, &w.params, cfg).expect("a valid configuration"))
    } else {
        Box::new(Sgd::new(&w.params, SgdConfig::new(0.01)).expect("a valid configuration"))
    };
    let mut rng = Rng::new(5);
    let mut step = |w: &mut Workload| {
        train_step(
            &w.model,
            w.loss,
            &mut w.params,
            opt.as_mut(),
            &w.inputs,
            &w.targets,
            &mut rng,
        )
        .expect("a finite step")
    };
    step(&mut w);
    let (d, ()) = time(|| {
        for _ in 0..steps {
            std::hint::black_box(step(&mut w));
        }
    });
    println!(
        "{model} on {}: {:.1} ms per training step ({steps} steps)",
        w.name,
        d.as_secs_f64() * 1e3 / steps as f64
    );
}
