//! kron's single-precision GEMM (`kron_autodiff::gemm`, through matrixmultiply) on square
//! matrices, n = 1000 and 2048. Criterion's throughput unit is one FLOP (`2 n^3` per product),
//! so its `elem/s` reads as FLOP/s; the GFLOP/s of the measured samples is also printed.

// criterion's macros define undocumented public functions.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kron_benches::{GemmSet, time};

fn sgemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgemm");
    group.sample_size(20);
    for n in [1000usize, 2048] {
        let mut set = GemmSet::square(n, 1);
        let flops = set.flops();
        group.throughput(Throughput::Elements(flops as u64));
        let (mut total, mut count) = (Duration::ZERO, 0u64);
        group.bench_function(format!("n={n}"), |b| {
            b.iter_custom(|iters| {
                let (d, ()) = time(|| {
                    for _ in 0..iters {
                        set.run();
                    }
                });
                total += d;
                count += iters;
                d
            })
        });
        println!(
            "sgemm n={n}: {:.1} GFLOP/s (mean over {count} products)",
            flops * count as f64 / total.as_secs_f64() / 1e9
        );
    }
    group.finish();
}

criterion_group!(benches, sgemm);
criterion_main!(benches);
