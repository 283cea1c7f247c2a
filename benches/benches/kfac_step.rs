//! Whole training steps (`kron::train_step`) on the autoencoder at batch 1000: SGD, and KFAC
//! with inverses every 20 steps and statistics every step or every 10 steps. One iteration is
//! 20 consecutive steps, so every iteration holds one refresh and the time per step is
//! amortized; throughput is in steps. `kfac refresh alone` sums only the refresh time that the
//! optimizer reports (`StepReport::refresh_ms`), one refresh per iteration.

// criterion's macros define undocumented public functions.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use kron::autodiff::Rng;
use kron::optim::{Kfac, KfacConfig, Optimizer, Sgd, SgdConfig, StepReport};
use kron::train_step;
use kron_benches::{Workload, time};

const PERIOD: u64 = 20;

struct Run {
    w: Workload,
    opt: Box<dyn Optimizer>,
    rng: Rng,
}

impl Run {
    fn new(make: impl FnOnce(&Workload) -> Box<dyn Optimizer>) -> Self {
        let w = Workload::autoencoder(1000, 11);
        let opt = make(&w);
        Run {
            w,
            opt,
            rng: Rng::new(5),
        }
    }

    fn step(&mut self) -> StepReport {
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
    }

    fn period(&mut self) -> Vec<StepReport> {
        (0..PERIOD).map(|_| self.step()).collect()
    }
}

fn kfac(stats: u64) -> impl FnOnce(&Workload) -> Box<dyn Optimizer> {
    move |w| {
        let cfg = KfacConfig::default()
            .with_stats_period(stats)
            .with_inverse_period(PERIOD);
        Box::new(Kfac::new(&w.model, &w.params, cfg).expect("a valid configuration"))
    }
}

fn kfac_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step autoencoder b1000");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Elements(PERIOD));
    let runs: Vec<(&str, Run)> = vec![
        (
            "sgd x20",
            Run::new(|w| {
                Box::new(Sgd::new(&w.params, SgdConfig::new(0.01)).expect("a valid configuration"))
            }),
        ),
        ("kfac stats/1 inv/20 x20", Run::new(kfac(1))),
        ("kfac stats/10 inv/20 x20", Run::new(kfac(10))),
    ];
    for (name, mut run) in runs {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (d, ()) = time(|| {
                    for _ in 0..iters {
                        run.period();
                    }
                });
                d
            })
        });
    }
    let mut run = Run::new(kfac(10));
    // The reported refresh time is a small part of each iteration's wall time: one
    // iteration per sample keeps the wall time bounded.
    group
        .throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("kfac refresh alone", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for r in run.period() {
                    if r.refreshed {
                        total += Duration::from_secs_f64(r.refresh_ms / 1e3);
                    }
                }
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, kfac_step);
criterion_main!(benches);
