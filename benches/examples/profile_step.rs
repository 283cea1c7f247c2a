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
use kron_benches::{Workload, time};

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "convnet".into());
    let steps: usize = args.next().map_or(10, |s| s.parse().expect("a step count"));
    let training = matches!(model.as_str(), "kfac" | "sgd");
    let mut w = match model.as_str() {
        "autoencoder" | "kfac" | "sgd" => Workload::autoencoder(1000, 3),
        "convnet" => Workload::convnet(128, 3),
        other => panic!("unknown workload {other} (expected autoencoder, convnet, kfac or sgd)"),
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
        Box::new(Kfac::new(&w.model, &w.params, cfg))
    } else {
        Box::new(Sgd::new(&w.params, SgdConfig::new(0.01)))
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
