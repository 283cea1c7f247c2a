//! One forward+backward step of (a) the deep autoencoder at batch 1000 and (b) the CIFAR-style
//! conv net at batch 128, and the same GEMMs alone (the exact shapes the step performs, on
//! preallocated operands). Throughput is in FLOPs of the step's GEMMs.

// criterion's macros define undocumented public functions.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use kron_benches::{GemmSet, Workload};

fn step(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    for w in [Workload::autoencoder(1000, 3), Workload::convnet(128, 3)] {
        let mut gemms = GemmSet::new(w.gemms(), 7);
        group.throughput(Throughput::Elements(gemms.flops() as u64));
        group.bench_function(format!("{} fwd+bwd", w.name), |b| {
            b.iter(|| w.forward_backward())
        });
        group.bench_function(format!("{} gemms alone", w.name), |b| {
            b.iter(|| gemms.run())
        });
    }
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
