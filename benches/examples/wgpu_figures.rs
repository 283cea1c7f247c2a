//! Figures of the wgpu backend for the record: GEMM throughput at n = 256, 512 and 1024, and
//! the damped inverse (Newton-Schulz) of 257 and 1001 wide factors and the inverse 4th root
//! (coupled Newton) of a 257 wide one, each against the CPU backend on the same machine.
//!
//! On lavapipe (Mesa's software Vulkan driver) these measure a compute path on the host CPU, a
//! correctness vehicle and not a speed claim: a 1024 GEMM takes seconds there and the 1001
//! Newton-Schulz minutes. On a real GPU they are the backend's figures.
//!
//! ```text
//! cargo run --release -p kron-benches --features wgpu --example wgpu_figures
//! ```

use std::process::ExitCode;

use kron::autodiff::{Rng, Tensor};
use kron::optim::backend::WgpuBackend;
use kron::optim::{Backend, CpuBackend, Precision};

fn randn(r: usize, c: usize, seed: u64) -> Tensor {
    Tensor::randn(&[r, c], 0.0, 1.0, &mut Rng::new(seed))
}

/// A symmetric positive semi-definite `n x n` matrix, `X^T X / r` of a random `r x n` `X`.
fn spd(n: usize, r: usize, seed: u64) -> Tensor {
    let x = randn(r, n, seed);
    x.matmul_t(true, &x, false).scale(1.0 / r as f32)
}

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("usage: wgpu_figures (no flags): prints the wgpu backend's figures");
        return ExitCode::SUCCESS;
    }
    let be = match WgpuBackend::new() {
        Ok(be) => be,
        Err(e) => {
            eprintln!("wgpu_figures: {e}");
            return ExitCode::FAILURE;
        }
    };
    let c = CpuBackend::new(Precision::F32);
    figures(&be, &c);
    ExitCode::SUCCESS
}

/// Seconds per call of `f`, after one warm-up call, over at least `reps` calls and 0.5 s.
fn time_it(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = std::time::Instant::now();
    let mut n = 0;
    while n < reps || t.elapsed().as_secs_f64() < 0.5 {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// Prints the figures.
fn figures(be: &WgpuBackend, c: &CpuBackend) {
    println!("adapter: {}", be.name());
    for n in [256usize, 512, 1024] {
        let a = randn(n, n, 50);
        let b = randn(n, n, 51);
        let (ga, gb) = (be.upload(&a), be.upload(&b));
        let reps = if n > 512 { 1 } else { 3 };
        let t = time_it(reps, || {
            let _ = be.gemm(1.0, &ga, false, &gb, false);
            be.synchronize();
        });
        let (ca, cb) = (c.upload(&a), c.upload(&b));
        let tc = time_it(3, || {
            let _ = c.gemm(1.0, &ca, false, &cb, false);
        });
        let flops = 2.0 * (n as f64).powi(3);
        println!(
            "gemm {n}: wgpu {:.2} GFLOP/s ({:.1} ms), cpu matrixmultiply {:.1} GFLOP/s ({:.1} ms)",
            flops / t / 1e9,
            t * 1e3,
            flops / tc / 1e9,
            tc * 1e3
        );
    }
    // Factors like a dense layer's A with 1000 inputs (and a 256-wide one), damping 1e-3: one
    // timed run each (the pipelines are compiled by now).
    for n in [257usize, 1001] {
        let m = spd(n, 2 * n, 52);
        let (gm, cm) = (be.upload(&m), c.upload(&m));
        let t = std::time::Instant::now();
        let (_, rep) = be.newton_schulz(&gm, 1e-3).unwrap();
        let t = t.elapsed().as_secs_f64();
        let tc = time_it(3, || {
            let _ = c.spd_inverse(&cm, 1e-3).unwrap();
        });
        println!(
            "spd_inverse {n}: wgpu Newton-Schulz {:.0} ms ({} iterations, residual {:.1e}), \
             cpu Cholesky (f64) {:.1} ms",
            t * 1e3,
            rep.iterations,
            rep.residual,
            tc * 1e3
        );
        if n < 1000 {
            let t = std::time::Instant::now();
            let (_, rep) = be.coupled_newton(&gm, 4, 1e-3).unwrap();
            let t = t.elapsed().as_secs_f64();
            let tc = time_it(3, || {
                let _ = c.inv_root(&cm, 4, 1e-3).unwrap();
            });
            println!(
                "inv_root p=4 {n}: wgpu coupled Newton {:.0} ms ({} iterations, residual {:.1e}), \
                 cpu eigh (f64) {:.1} ms",
                t * 1e3,
                rep.iterations,
                rep.residual,
                tc * 1e3
            );
        }
    }
}
