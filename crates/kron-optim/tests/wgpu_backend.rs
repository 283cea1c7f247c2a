//! The wgpu backend against the CPU backend: every primitive, the matrix-product iterations on
//! ill-conditioned inputs, and whole KFAC/KFC runs.
//!
//! Without an adapter these tests print "skipped: no wgpu adapter (install
//! mesa-vulkan-drivers)" and pass, unless the `CI` environment variable is set (and not `0` or
//! `false`): there they fail, so they can never be skipped silently. On a machine without a GPU,
//! Mesa's lavapipe Vulkan driver provides the adapter "llvmpipe".
//!
//! Tolerances (GPU against the CPU backend, both in `f32` unless said otherwise):
//! * GEMM and factor accumulation: `|gpu - cpu| <= 1e-6 * k * max|cpu|` (`k` the inner dimension,
//!   or the rows of `x`): both sum `k` rounded products, in different orders.
//! * Elementwise ops: `1e-6` relative (one rounding each side).
//! * Trace and inner product: `1e-5` relative to the sum of absolute values.
//! * Newton-Schulz and coupled Newton against the `f64` reference of the same (rounded) input:
//!   relative Frobenius error under `4 κ 2^-24` (measured: 0.1 to 0.5 times `κ 2^-24`), or a
//!   refusal (`NotConverged`) from κ = 1e5 on; see `iterations_on_ill_conditioned_inputs` for
//!   the measured table.
//! * Whole KFAC runs: parameters within `2e-4 * (1 + |w|)` after five steps.

#![cfg(feature = "wgpu")]

use std::sync::OnceLock;

use kron_autodiff::{Gradients, ParamStore, Rng, Tape, Tensor};
use kron_layers::{Activation, Conv2dConfig, Dense, Flatten, Module, Sequential};
use kron_optim::backend::{DeviceError, IterationConfig, LinalgError, Mat, Reduction, WgpuBackend};
use kron_optim::{
    Backend, Captures, CpuBackend, EigenDamping, FisherKind, InverseMethod, Kfac, KfacConfig, Note,
    Optimizer, Precision,
};

/// Whether the `CI` environment variable asks for hard failures.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The shared backend (one device for every test: pipelines compile once), or `None` after
/// printing the skip line.
fn gpu() -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Result<WgpuBackend, DeviceError>> = OnceLock::new();
    match BE.get_or_init(WgpuBackend::new) {
        Ok(be) => Some(be),
        Err(e) if in_ci() => panic!("no wgpu adapter in CI ({e}): the wgpu tests must run here"),
        Err(e) => {
            println!("skipped: no wgpu adapter (install mesa-vulkan-drivers): {e}");
            None
        }
    }
}

fn cpu() -> CpuBackend {
    CpuBackend::new(Precision::F32)
}

fn cpu64() -> CpuBackend {
    CpuBackend::new(Precision::F64)
}

fn randn(r: usize, c: usize, seed: u64) -> Tensor {
    Tensor::randn(&[r, c], 0.0, 1.0, &mut Rng::new(seed))
}

fn max_abs(t: &Tensor) -> f32 {
    t.data().iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Asserts `|got - want| <= tol` elementwise, naming the worst element.
fn close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes");
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
        let d = (g - w).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= tol,
        "{what}: |gpu - cpu| = {worst:e} at {at} (gpu {}, cpu {}), tolerance {tol:e}",
        got.data()[at],
        want.data()[at]
    );
}

/// A random symmetric positive semi-definite matrix `x^T x / r`.
fn spd(n: usize, r: usize, seed: u64) -> Tensor {
    let x = randn(r, n, seed);
    x.matmul_t(true, &x, false).scale(1.0 / r as f32)
}

#[test]
fn upload_download_round_trip_and_zeros() {
    let Some(be) = gpu() else { return };
    let t = randn(37, 53, 1);
    assert_eq!(be.download(&be.upload(&t)), t);
    let head = be.upload_rows(&t, Some(5));
    assert_eq!(head.dims(), (5, 53));
    assert_eq!(be.download(&head).data(), &t.data()[..5 * 53]);
    assert_eq!(be.upload_rows(&t, Some(100)).dims(), (37, 53));
    let z = be.zeros(7, 3);
    assert_eq!(be.download(&z), Tensor::zeros(&[7, 3]));
    let empty = be.zeros(0, 4);
    assert_eq!(be.download(&empty).shape(), &[0, 4]);
    assert!(be.is_finite(&empty));
    assert_eq!(be.trace(&empty), 0.0);
}

#[test]
fn gemm_matches_cpu_for_every_transpose_and_odd_sizes() {
    let Some(be) = gpu() else { return };
    let c = cpu();
    for &(m, k, n) in &[
        (37, 53, 19),
        (1, 1, 1),
        (64, 64, 64),
        (65, 17, 130),
        (3, 300, 5),
        (129, 1, 70),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { randn(k, m, 2) } else { randn(m, k, 2) };
            let b = if tb { randn(n, k, 3) } else { randn(k, n, 3) };
            let want = c.download(&c.gemm(0.7, &c.upload(&a), ta, &c.upload(&b), tb));
            let got = be.download(&be.gemm(0.7, &be.upload(&a), ta, &be.upload(&b), tb));
            let tol = 1e-6 * k as f32 * max_abs(&want).max(1.0);
            close(
                &got,
                &want,
                tol,
                &format!("gemm {m}x{k}x{n} ta {ta} tb {tb}"),
            );
        }
    }
}

#[test]
fn factor_ema_matches_cpu_with_and_without_homogeneous_coordinate() {
    let Some(be) = gpu() else { return };
    for (rows, d, seed) in [(50, 13, 4), (1000, 27, 5), (3, 70, 6), (1, 1, 7)] {
        for homogeneous in [false, true] {
            let n = d + usize::from(homogeneous);
            let x = randn(rows, d, seed);
            let acc0 = spd(n, n + 3, seed + 100);
            let (scale, decay) = (1.0 / rows as f32, 0.95);
            let mut want = {
                let c = cpu();
                let mut acc = c.upload(&acc0);
                c.factor_ema(&mut acc, &c.upload(&x), homogeneous, scale, decay);
                c.download(&acc)
            };
            let mut acc = be.upload(&acc0);
            let before = acc.clone();
            be.factor_ema(&mut acc, &be.upload(&x), homogeneous, scale, decay);
            let got = be.download(&acc);
            let tol = 1e-6 * rows as f32 * max_abs(&want).max(1.0);
            close(
                &got,
                &want,
                tol,
                &format!("factor_ema {rows}x{d} homogeneous {homogeneous}"),
            );
            // The result is exactly symmetric, and the clone kept its value.
            assert_eq!(got, got.t(), "factor_ema result is symmetric");
            assert_eq!(be.download(&before), acc0);
            // Against the f64 definition as well.
            let c64 = cpu64();
            let mut a64 = c64.upload(&acc0);
            c64.factor_ema(&mut a64, &c64.upload(&x), homogeneous, scale, decay);
            want = c64.download(&a64);
            close(&got, &want, tol, "factor_ema against f64");
        }
    }
}

#[test]
fn elementwise_ops_match_cpu() {
    let Some(be) = gpu() else { return };
    let c = cpu();
    for (r, cols) in [(9, 9), (5, 8), (8, 5), (300, 257)] {
        let x = randn(r, cols, 8);
        let y = randn(r, cols, 9);
        let run = |f: &dyn Fn(&dyn Backend, &mut Mat, &Mat)| {
            let mut gm = be.upload(&x);
            f(be, &mut gm, &be.upload(&y));
            let mut cm = c.upload(&x);
            f(&c, &mut cm, &c.upload(&y));
            (be.download(&gm), c.download(&cm))
        };
        let (g, w) = run(&|b, m, _| b.add_diag(m, 0.25));
        close(&g, &w, 1e-6, "add_diag");
        let (g, w) = run(&|b, m, _| b.scale(m, -1.5));
        close(&g, &w, 1e-6 * max_abs(&w), "scale");
        let (g, w) = run(&|b, m, o| b.axpby(0.3, o, -2.0, m));
        close(&g, &w, 2e-6 * max_abs(&w), "axpby");
        let left: Vec<f64> = (0..r).map(|i| 0.5 + i as f64 * 0.1).collect();
        let right: Vec<f64> = (0..cols).map(|j| 0.1 + (j % 7) as f64).collect();
        let (g, w) = run(&|b, m, _| b.div_outer(m, &left, &right, 1e-3));
        close(&g, &w, 2e-6 * max_abs(&w), "div_outer");
    }
}

#[test]
fn reductions_match_cpu_and_repeat_to_the_bit() {
    let Some(be) = gpu() else { return };
    let c = cpu();
    for (r, cols, seed) in [(1, 1, 10), (17, 5, 11), (300, 300, 12), (700, 400, 13)] {
        let x = randn(r, cols, seed);
        let y = randn(r, cols, seed + 1);
        let (gx, gy) = (be.upload(&x), be.upload(&y));
        let l1: f64 = x.data().iter().map(|v| v.abs() as f64).sum();
        let l1xy: f64 = x
            .data()
            .iter()
            .zip(y.data())
            .map(|(a, b)| (a * b).abs() as f64)
            .sum();
        let tr = be.trace(&gx);
        assert!(
            (tr - c.trace(&c.upload(&x))).abs() <= 1e-5 * (1.0 + l1),
            "trace {tr}"
        );
        let d = be.dot(&gx, &gy);
        let want = c.dot(&c.upload(&x), &c.upload(&y));
        assert!(
            (d - want).abs() <= 1e-5 * (1.0 + l1xy),
            "dot {r}x{cols}: {d} vs {want}"
        );
        assert_eq!(
            d.to_bits(),
            be.dot(&gx, &gy).to_bits(),
            "dot repeats to the bit"
        );
        assert!(be.is_finite(&gx));
        // A non-finite element anywhere, the last one included, is seen.
        for at in [0, x.numel() / 2, x.numel() - 1] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut t = x.clone();
                t.data_mut()[at] = bad;
                assert!(!be.is_finite(&be.upload(&t)), "{bad} at {at} of {r}x{cols}");
            }
        }
    }
}

#[test]
fn eigh_is_delegated_to_the_host_and_matches_cpu() {
    let Some(be) = gpu() else { return };
    assert!(be.delegates_eigh());
    assert!(!cpu().delegates_eigh());
    let m = spd(20, 40, 14);
    let got = be.eigh(&be.upload(&m)).unwrap();
    let c = cpu();
    let want = c.eigh(&c.upload(&m)).unwrap();
    for (g, w) in got.values.iter().zip(&want.values) {
        assert!((g - w).abs() < 1e-6, "eigenvalues {g} vs {w}");
    }
    // Q diag(e) Q^T rebuilds m.
    let q = be.download(&got.vectors);
    let mut qd = q.clone();
    for i in 0..20 {
        for j in 0..20 {
            qd.data_mut()[i * 20 + j] *= got.values[j] as f32;
        }
    }
    close(&qd.matmul_t(false, &q, true), &m, 1e-5, "Q diag(e) Q^T");
}

#[test]
fn foreign_matrices_are_refused_with_a_clear_panic() {
    let Some(be) = gpu() else { return };
    let c = cpu();
    let gm = be.upload(&randn(3, 3, 1));
    let cm = c.upload(&randn(3, 3, 1));
    let msg = |r: std::thread::Result<()>| -> String {
        let e = r.expect_err("a foreign matrix must panic");
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    };
    let m1 = msg(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || {
            c.trace(&gm);
        },
    )));
    assert!(m1.contains("wgpu buffer"), "{m1}");
    let m2 = msg(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || {
            be.trace(&cm);
        },
    )));
    assert!(m2.contains("host memory"), "{m2}");
}

#[test]
fn no_adapter_is_an_error_naming_the_backends_tried() {
    // A backend set this build cannot open on this platform, or an empty one.
    let e = WgpuBackend::with_backends(wgpu::Backends::empty()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, DeviceError::NoAdapter { .. }), "{e:?}");
    assert!(
        text.contains("backends tried: none") && text.contains("mesa-vulkan-drivers"),
        "{text}"
    );
}

/// `Q diag(values) Q^T` for a random orthogonal `Q` (the eigenvectors of a random symmetric
/// matrix), computed in f64, as an f32 tensor and as the f64 entries.
fn with_spectrum(values: &[f64], seed: u64) -> Tensor {
    let n = values.len();
    let g = randn(n, n, seed);
    let s = g.add(&g.t());
    let c = cpu64();
    let q = c.download(&c.eigh(&c.upload(&s)).unwrap().vectors);
    let q: Vec<f64> = q.data().iter().map(|&v| v as f64).collect();
    let mut out = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            let v: f64 = (0..n)
                .map(|k| q[i * n + k] * values[k] * q[j * n + k])
                .sum();
            out[i * n + j] = v as f32;
        }
    }
    // Symmetric to the bit.
    for i in 0..n {
        for j in 0..i {
            out[j * n + i] = out[i * n + j];
        }
    }
    Tensor::from_vec(out, &[n, n])
}

fn logspace(n: usize, from: f64, to: f64) -> Vec<f64> {
    (0..n)
        .map(|i| from * (to / from).powf(i as f64 / (n - 1).max(1) as f64))
        .collect()
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let num: f64 = got
        .data()
        .iter()
        .zip(want.data())
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.data().iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Newton-Schulz (`spd_inverse`) and coupled Newton (`inv_root`, p = 1, 2, 4) on SPD inputs
/// whose damped condition number `κ(M + dI)` runs from 1e2 to 1e7, in two shapes: a nearly
/// singular `M` (eigenvalues 1 .. 1e-12) made well-posed by the damping, as KFAC's factors are,
/// and an `M` with spectrum `[1/κ, 1]` and no damping. Prints the table of iterations,
/// residuals and errors against the `f64` reference of the same `f32` input.
#[test]
fn iterations_on_ill_conditioned_inputs() {
    let Some(be) = gpu() else { return };
    let c64 = cpu64();
    let n = 96;
    let u = 2f64.powi(-24);
    println!("n = {n}; errors relative (Frobenius) to the f64 reference of the same f32 input");
    println!(
        "{:<10} {:>7} {:<14} {:>5} {:>10} {:>10} {:>10}",
        "input", "kappa", "method", "iters", "residual", "rel err", "kappa*u"
    );
    for kappa in [1e2, 1e3, 1e4, 1e5, 1e6, 1e7] {
        for shape in ["damped", "undamped"] {
            let (values, damping) = match shape {
                "damped" => (logspace(n, 1.0, 1e-12), (1.0 / (kappa - 1.0)) as f32),
                _ => (logspace(n, 1.0, 1.0 / kappa), 0.0f32),
            };
            let m = with_spectrum(&values, 20);
            let gm = be.upload(&m);
            let cm = c64.upload(&m);
            // Newton-Schulz.
            let want = c64.download(&c64.spd_inverse(&cm, damping).unwrap().mat);
            match be.newton_schulz(&gm, damping) {
                Ok((x, rep)) => {
                    let err = rel_err(&be.download(&x), &want);
                    println!(
                        "{shape:<10} {kappa:>7.0e} {:<14} {:>5} {:>10.2e} {:>10.2e} {:>10.2e}",
                        "newton-schulz",
                        rep.iterations,
                        rep.residual,
                        err,
                        kappa * u
                    );
                    assert!(
                        err < 4.0 * kappa * u,
                        "Newton-Schulz κ {kappa:e} {shape}: error {err:e}"
                    );
                    // log2(κ) iterations to enter the quadratic phase, a handful after it.
                    assert!(
                        rep.iterations as f64 <= kappa.log2() + 10.0,
                        "Newton-Schulz κ {kappa:e}: {} iterations",
                        rep.iterations
                    );
                    // The trait reports the same count.
                    assert_eq!(
                        be.spd_inverse(&gm, damping).unwrap().iterations,
                        Some(rep.iterations)
                    );
                }
                Err(e) => {
                    println!("{shape:<10} {kappa:>7.0e} {:<14} {e}", "newton-schulz");
                    assert!(
                        kappa >= 1e5,
                        "Newton-Schulz must converge at κ {kappa:e}: {e}"
                    );
                    assert!(matches!(e, LinalgError::NotConverged { .. }));
                }
            }
            // Coupled Newton.
            for p in [1u32, 2, 4] {
                let want = c64.download(&c64.inv_root(&cm, p, damping).unwrap());
                match be.coupled_newton(&gm, p, damping) {
                    Ok((x, rep)) => {
                        let err = rel_err(&be.download(&x), &want);
                        println!(
                            "{shape:<10} {kappa:>7.0e} {:<14} {:>5} {:>10.2e} {:>10.2e} {:>10.2e}",
                            format!("coupled p={p}"),
                            rep.iterations,
                            rep.residual,
                            err,
                            kappa * u
                        );
                        assert!(
                            err < 4.0 * kappa * u,
                            "coupled Newton p {p} κ {kappa:e} {shape}: error {err:e}"
                        );
                    }
                    Err(e) => {
                        println!(
                            "{shape:<10} {kappa:>7.0e} {:<14} {e}",
                            format!("coupled p={p}")
                        );
                        assert!(
                            kappa >= 1e5,
                            "coupled Newton p {p} must converge at κ {kappa:e}: {e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn iterations_refuse_what_they_cannot_invert() {
    let Some(be) = gpu() else { return };
    // Indefinite: eigenvalues of both signs.
    let mut values = logspace(16, 1.0, 0.1);
    values[3] = -0.5;
    let m = be.upload(&with_spectrum(&values, 21));
    assert!(matches!(
        be.spd_inverse(&m, 0.0),
        Err(LinalgError::NotConverged { .. })
    ));
    assert!(be.inv_root(&m, 2, 0.0).is_err());
    // Non-finite.
    let mut t = spd(8, 16, 22);
    t.data_mut()[5] = f32::NAN;
    let m = be.upload(&t);
    assert!(matches!(
        be.spd_inverse(&m, 1e-3),
        Err(LinalgError::NonFinite)
    ));
    assert!(matches!(
        be.inv_root(&m, 2, 1e-3),
        Err(LinalgError::NonFinite)
    ));
    // A cap too small to converge is reported with the iterations run and the residual.
    let strict = WgpuBackend::new()
        .unwrap()
        .with_iteration(IterationConfig::default().with_max_iterations(2));
    let m = strict.upload(&with_spectrum(&logspace(32, 1.0, 1e-4), 23));
    match strict.spd_inverse(&m, 0.0) {
        Err(LinalgError::NotConverged {
            iterations,
            residual,
        }) => {
            assert_eq!(iterations, 2);
            assert!(residual > 0.1);
        }
        other => panic!("expected NotConverged, got {other:?}"),
    }
}

struct Net {
    store: ParamStore,
    model: Sequential,
}

fn mlp(seed: u64) -> Net {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(seed);
    let model = Sequential::new()
        .push(Dense::new(&mut store, "0", 6, 16, &mut rng))
        .push(Activation::Tanh)
        .push(Dense::new(&mut store, "2", 16, 3, &mut rng));
    Net { store, model }
}

fn convnet(seed: u64) -> Net {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(seed);
    let model = Sequential::new()
        .push(
            Conv2dConfig::new(2, 4, 3)
                .with_padding(1)
                .with_stride(2)
                .build(&mut store, "c", &mut rng),
        )
        .push(Activation::Relu)
        .push(Flatten)
        .push(Dense::new(&mut store, "fc", 4 * 3 * 3, 3, &mut rng));
    Net { store, model }
}

fn backward(net: &Net, kfac: &Kfac, x: &Tensor, y: &[usize]) -> (Gradients, Captures) {
    let tape = Tape::new(&net.store).capturing(kfac.wants().capture);
    let l = net.model.forward(tape.input(x.clone())).cross_entropy(y);
    let mut g = tape.backward(l);
    let c = g.take_captures();
    (g, c)
}

/// Five KFAC steps on the CPU backend and on the wgpu backend from the same start; returns both
/// parameter stores and the wgpu run's reports.
fn twin_runs(
    make: fn(u64) -> Net,
    x: &Tensor,
    cfg: KfacConfig,
) -> (ParamStore, ParamStore, Vec<kron_optim::StepReport>) {
    let y: Vec<usize> = (0..x.dim(0)).map(|i| (i * 5) % 3).collect();
    let mut stores = vec![];
    let mut reports = vec![];
    for on_gpu in [false, true] {
        let mut net = make(31);
        let be: Box<dyn Backend> = if on_gpu {
            Box::new(WgpuBackend::new().expect("adapter"))
        } else {
            Box::new(CpuBackend::new(Precision::F32))
        };
        let mut kfac = Kfac::with_backend(net.model.fisher_blocks(), &net.store, cfg, be).unwrap();
        for _ in 0..5 {
            let (g, caps) = backward(&net, &kfac, x, &y);
            let r = kfac.step(&mut net.store, &g, &caps).unwrap();
            if on_gpu {
                reports.push(r);
            }
        }
        stores.push(net.store);
    }
    let gpu = stores.pop().unwrap();
    (stores.pop().unwrap(), gpu, reports)
}

#[test]
fn kfac_on_wgpu_agrees_with_the_cpu_backend() {
    if gpu().is_none() {
        return;
    }
    let base = KfacConfig::default()
        .with_fisher(FisherKind::Empirical)
        .with_inverse_period(2)
        .with_conv_stats_period(1);
    let inputs = [
        (
            mlp as fn(u64) -> Net,
            Tensor::randn(&[32, 6], 0.0, 1.0, &mut Rng::new(40)),
        ),
        (
            convnet as fn(u64) -> Net,
            Tensor::randn(&[8, 2, 6, 6], 0.0, 1.0, &mut Rng::new(41)),
        ),
    ];
    for (make, x) in &inputs {
        for method in [
            InverseMethod::Inverse,
            InverseMethod::Eigen(EigenDamping::Factored),
            InverseMethod::Eigen(EigenDamping::Tikhonov),
        ] {
            let cfg = base.with_method(method);
            let (cpu_store, gpu_store, reports) = twin_runs(*make, x, cfg);
            for ((_, name, a), (_, _, b)) in cpu_store.iter().zip(gpu_store.iter()) {
                for (i, (p, q)) in a.data().iter().zip(b.data()).enumerate() {
                    assert!(
                        (p - q).abs() <= 2e-4 * (1.0 + p.abs()),
                        "{method:?} {name}[{i}]: cpu {p}, wgpu {q}"
                    );
                }
            }
            let says = reports.iter().filter(|r| r.refreshed).all(|r| {
                r.notes
                    .iter()
                    .any(|n| matches!(n, Note::EighDelegated { .. }))
            });
            match method {
                InverseMethod::Inverse => {
                    assert!(
                        reports.iter().flat_map(|r| &r.notes).all(|n| !matches!(
                            n,
                            Note::EighDelegated { .. } | Note::RefreshFailed { .. }
                        )),
                        "{:?}",
                        reports.iter().map(|r| &r.notes).collect::<Vec<_>>()
                    )
                }
                _ => assert!(says, "eigen mode on wgpu reports the delegation"),
            }
        }
    }
}

/// The same run twice on the wgpu backend gives the same bits (fixed-order sums, immutable
/// buffers), although blocks are refreshed from several threads.
#[test]
fn kfac_on_wgpu_repeats_to_the_bit() {
    if gpu().is_none() {
        return;
    }
    let cfg = KfacConfig::default()
        .with_fisher(FisherKind::Empirical)
        .with_inverse_period(1);
    let x = Tensor::randn(&[32, 6], 0.0, 1.0, &mut Rng::new(42));
    let (_, first, _) = twin_runs(mlp, &x, cfg);
    let (_, second, _) = twin_runs(mlp, &x, cfg);
    assert_eq!(first, second);
}

/// The primitives Shampoo and KrADagrad add, on odd sizes and with transposes: the accumulating
/// product against CPU `f32` and `f64`, symmetrization exactly, and the symmetric matrix power
/// (delegated to the host on wgpu) against the CPU's `f64` one.
#[test]
fn adaptive_primitives_match_cpu_and_f64() {
    use kron_optim::Ridge;
    let Some(be) = gpu() else { return };
    let (c, c64) = (cpu(), cpu64());
    for (m, k, n) in [(7, 5, 9), (33, 65, 17), (128, 300, 129)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { randn(k, m, 20) } else { randn(m, k, 20) };
            let b = if tb { randn(n, k, 21) } else { randn(k, n, 21) };
            let acc0 = randn(m, n, 22);
            let run = |x: &dyn Backend| {
                let mut acc = x.upload(&acc0);
                x.gemm_acc(0.9, &mut acc, -0.5, &x.upload(&a), ta, &x.upload(&b), tb);
                x.download(&acc)
            };
            let (g, w, w64) = (run(be), run(&c), run(&c64));
            let tol = 1e-6 * k as f32 * max_abs(&w).max(1.0);
            close(&g, &w, tol, &format!("gemm_acc {m}x{k}x{n} {ta} {tb}"));
            close(&g, &w64, tol, &format!("gemm_acc against f64 {m}x{k}x{n}"));
        }
    }
    for n in [1, 6, 65] {
        let x = randn(n, n, 23);
        let mut gm = be.upload(&x);
        be.symmetrize(&mut gm);
        let mut cm = c.upload(&x);
        c.symmetrize(&mut cm);
        let (g, w) = (be.download(&gm), c.download(&cm));
        assert_eq!(g, w, "symmetrize {n}");
        assert_eq!(g, g.t(), "symmetric {n}");
        let s = spd(n, 2 * n + 3, 24);
        for (p, ridge) in [
            (-0.25, Ridge::Absolute(1e-3)),
            (0.5, Ridge::Absolute(0.0)),
            (-0.5, Ridge::Relative(1e-4)),
        ] {
            let got = be.download(
                &be.sym_power(&be.upload(&s), p, ridge, Precision::F64)
                    .unwrap(),
            );
            let want = c64.download(
                &c64.sym_power(&c64.upload(&s), p, ridge, Precision::F64)
                    .unwrap(),
            );
            close(
                &got,
                &want,
                1e-5 * max_abs(&want),
                &format!("sym_power {n} {p} {ridge:?}"),
            );
        }
    }
}

/// The coupled Newton iteration written over `&dyn Backend` gives the same root on the CPU
/// (`f32`) and on wgpu, and both agree with the `f64` eigendecomposition to `f32` tolerance.
#[test]
fn coupled_newton_agrees_on_cpu_and_wgpu() {
    use kron_optim::Ridge;
    use kron_optim::backend::coupled_newton;
    let Some(be) = gpu() else { return };
    let (c, c64) = (cpu(), cpu64());
    for (n, p) in [(5, 4), (40, 2), (97, 4)] {
        let s = spd(n, n + 8, 25);
        let ridge = 1e-2;
        let cfg = IterationConfig::default();
        let (gr, grep) = coupled_newton(be, &be.upload(&s), p, ridge, &cfg).unwrap();
        let (cr, crep) = coupled_newton(&c, &c.upload(&s), p, ridge, &cfg).unwrap();
        let want = c64.download(
            &c64.sym_power(
                &c64.upload(&s),
                -1.0 / p as f64,
                Ridge::Absolute(ridge),
                Precision::F64,
            )
            .unwrap(),
        );
        let (g, w) = (be.download(&gr), c.download(&cr));
        let scale = max_abs(&want);
        close(
            &g,
            &w,
            1e-4 * scale,
            &format!("newton cpu vs wgpu n {n} p {p}"),
        );
        close(
            &w,
            &want,
            1e-4 * scale,
            &format!("newton cpu vs f64 n {n} p {p}"),
        );
        assert!(
            grep.residual < 1e-4 && crep.residual < 1e-4,
            "{grep:?} {crep:?}"
        );
    }
}

/// Five steps of Shampoo (eigh delegated to the host; and coupled Newton on the device),
/// KrADagrad* and KrADagrad on wgpu against the CPU backend, on a matrix, a blocked matrix, an
/// order-3 tensor and a bias.
#[test]
fn shampoo_and_kradagrad_on_wgpu_match_cpu() {
    use kron_optim::{
        AdaptiveConfig, BlockingConfig, KrAdagrad, KrAdagradStar, Ridge, RootMethod, Shampoo,
        TensorLayout,
    };
    if gpu().is_none() {
        return;
    }
    let blocking = BlockingConfig::DEFAULT
        .with_max_dim(6)
        .with_layout(TensorLayout::Tensor);
    let store = || {
        let mut s = ParamStore::new();
        s.add("w", Tensor::randn(&[5, 9], 0.0, 0.5, &mut Rng::new(30)));
        s.add("t", Tensor::randn(&[3, 4, 5], 0.0, 0.5, &mut Rng::new(31)));
        s.add("b", Tensor::zeros(&[5]));
        s
    };
    type Make = fn(&ParamStore, AdaptiveConfig, Box<dyn Backend>) -> Box<dyn Optimizer>;
    let cases: [(&str, AdaptiveConfig, Make); 4] = [
        (
            "shampoo eigh",
            AdaptiveConfig::shampoo().with_epsilon(Ridge::Relative(1e-3)),
            |p, c, b| Box::new(Shampoo::with_backend(p, c, b).unwrap()),
        ),
        (
            "shampoo newton",
            AdaptiveConfig::shampoo()
                .with_epsilon(Ridge::Relative(1e-3))
                .with_roots(RootMethod::CoupledNewton(IterationConfig::default())),
            |p, c, b| Box::new(Shampoo::with_backend(p, c, b).unwrap()),
        ),
        (
            "kradagrad-star",
            AdaptiveConfig::kradagrad_star().with_epsilon(Ridge::Absolute(1e-2)),
            |p, c, b| Box::new(KrAdagradStar::with_backend(p, c, b).unwrap()),
        ),
        (
            "kradagrad",
            AdaptiveConfig::kradagrad().with_epsilon(Ridge::Absolute(1e-3)),
            |p, c, b| Box::new(KrAdagrad::with_backend(p, c, b).unwrap()),
        ),
    ];
    for (name, base, make) in cases {
        let cfg = base
            .with_lr(0.05)
            .with_refresh_period(2)
            .with_start_step(2)
            .with_blocking(blocking);
        let gpu_be: Box<dyn Backend> = Box::new(WgpuBackend::new().unwrap());
        let mut runs = Vec::new();
        for backend in [gpu_be, Box::new(cpu()) as Box<dyn Backend>] {
            let mut p = store();
            let mut opt = make(&p, cfg, backend);
            let mut rng = Rng::new(32);
            for _ in 0..5 {
                let g = Gradients::from_params(vec![
                    Some(Tensor::randn(&[5, 9], 0.0, 1.0, &mut rng)),
                    Some(Tensor::randn(&[3, 4, 5], 0.0, 1.0, &mut rng)),
                    Some(Tensor::randn(&[5], 0.0, 1.0, &mut rng)),
                ]);
                opt.step(&mut p, &g, &Captures::new()).unwrap();
            }
            runs.push(p);
        }
        for id in runs[0].ids() {
            let (g, w) = (runs[0].get(id), runs[1].get(id));
            let tol = 2e-4 * (1.0 + max_abs(w));
            close(g, w, tol, &format!("{name}: {}", runs[0].name(id)));
        }
    }
}

/// `f64` copies of a host matrix's elements.
fn f64s(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

/// The diagonal grafts' elementwise primitives on odd sizes: square root, reciprocal with and
/// without epsilon, and the elementwise product, on wgpu and the CPU backend (`f32`, which rounds
/// once per element as the kernel does: equal to the bit or within one ulp) and against the
/// dense `f64` reference of the same inputs; the CPU backend's `f64` matrices against it too.
#[test]
fn graft_elementwise_primitives_match_cpu_and_f64() {
    let Some(be) = gpu() else { return };
    let (c, c64) = (cpu(), cpu64());
    for (r, cols) in [(1, 1), (7, 5), (33, 129), (300, 257)] {
        // Non-negative for the root; away from -eps for the reciprocal.
        let x = randn(r, cols, 50).map(|v| v * v + 0.1);
        let y = randn(r, cols, 51);
        let (xs, ys) = (f64s(&x), f64s(&y));
        type Op<'a> = (&'a str, &'a dyn Fn(&dyn Backend, &mut Mat, &Mat), Vec<f64>);
        let ops: [Op<'_>; 4] = [
            (
                "sqrt",
                &|b, m, _| b.sqrt(m),
                xs.iter().map(|v| v.sqrt()).collect(),
            ),
            (
                "recip",
                &|b, m, _| b.recip(m, 0.0),
                xs.iter().map(|v| 1.0 / v).collect(),
            ),
            (
                "recip eps",
                &|b, m, _| b.recip(m, 1e-3),
                xs.iter().map(|v| 1.0 / (v + 1e-3)).collect(),
            ),
            (
                "mul",
                &|b, m, o| b.mul(o, m),
                xs.iter().zip(&ys).map(|(a, b)| a * b).collect(),
            ),
        ];
        for (what, op, want) in ops {
            let run = |b: &dyn Backend| {
                let mut m = b.upload(&x);
                op(b, &mut m, &b.upload(&y));
                b.download(&m)
            };
            let (g, w, w64) = (run(be), run(&c), run(&c64));
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())) as f32;
            close(
                &g,
                &w,
                3.6e-7 * scale,
                &format!("{what} {r}x{cols} wgpu vs cpu"),
            );
            let reference = Tensor::from_vec(want.iter().map(|&v| v as f32).collect(), &[r, cols]);
            close(
                &g,
                &reference,
                3.6e-7 * scale,
                &format!("{what} wgpu vs f64"),
            );
            close(
                &w64,
                &reference,
                3.6e-7 * scale,
                &format!("{what} cpu f64 vs f64"),
            );
        }
    }
    // A negative element's root is NaN on both.
    let neg = Tensor::from_vec(vec![-1.0, 4.0], &[1, 2]);
    for b in [be as &dyn Backend, &c] {
        let mut m = b.upload(&neg);
        b.sqrt(&mut m);
        let t = b.download(&m);
        assert!(t.data()[0].is_nan() && t.data()[1] == 2.0, "{}", b.name());
    }
}

/// One batched read-back of matrices and scalars: the matrices equal their downloads, the
/// scalars equal the single primitives (wgpu: to the bit, the same kernels; CPU: exactly) and
/// the dense `f64` references (traces of square and non-square matrices, inner products of
/// transposed products, squared norms, non-finite flags), and the whole batch costs the wgpu
/// backend one read-back.
#[test]
fn batched_read_back_matches_single_reductions_and_f64() {
    if gpu().is_none() {
        return;
    }
    // A device of its own: the shared one counts the read-backs of tests running beside it.
    let own = WgpuBackend::new().expect("adapter");
    let be = &own;
    let c = cpu();
    let shapes = [(1, 1), (17, 5), (5, 17), (64, 64), (300, 257)];
    let xs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(r, k))| randn(r, k, 60 + i as u64))
        .collect();
    let ys: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(r, k))| randn(r, k, 70 + i as u64))
        .collect();
    // A product with a transpose on the device: x^T x (square), compared as such.
    let mut bad = randn(9, 4, 80);
    bad.data_mut()[35] = f32::INFINITY;
    for (b, on_gpu) in [(be as &dyn Backend, true), (&c, false)] {
        let gx: Vec<Mat> = xs.iter().map(|t| b.upload(t)).collect();
        let gy: Vec<Mat> = ys.iter().map(|t| b.upload(t)).collect();
        let gram: Vec<Mat> = gx.iter().map(|m| b.gemm(1.0, m, true, m, false)).collect();
        let gbad = b.upload(&bad);
        let mut scalars = Vec::new();
        let mut want = Vec::new();
        for i in 0..shapes.len() {
            let (x, y) = (f64s(&xs[i]), f64s(&ys[i]));
            let (r, k) = shapes[i];
            scalars.push(Reduction::Trace(&gx[i]));
            want.push((0..r.min(k)).map(|j| x[j * k + j]).sum::<f64>());
            scalars.push(Reduction::Dot(&gx[i], &gy[i]));
            want.push(x.iter().zip(&y).map(|(a, b)| a * b).sum());
            scalars.push(Reduction::SquaredNorm(&gy[i]));
            want.push(y.iter().map(|a| a * a).sum());
            // tr(x^T x) = |x|^2, through a device product with a transpose.
            scalars.push(Reduction::Trace(&gram[i]));
            want.push(x.iter().map(|a| a * a).sum());
            scalars.push(Reduction::NonFinite(&gx[i]));
            want.push(0.0);
        }
        scalars.push(Reduction::NonFinite(&gbad));
        want.push(1.0);
        let mats: Vec<&Mat> = gx.iter().chain(&gram).collect();
        let before = be.read_backs();
        let (tensors, values) = b.read_back(&mats, &scalars);
        if on_gpu {
            assert_eq!(
                be.read_backs() - before,
                1,
                "one read-back for the whole batch"
            );
        }
        assert_eq!(tensors.len(), mats.len());
        for (t, m) in tensors.iter().zip(&mats) {
            assert_eq!(t, &b.download(m), "{}: batched matrix = download", b.name());
        }
        for (i, t) in xs.iter().enumerate() {
            assert_eq!(&tensors[i], t, "uploaded matrices come back unchanged");
        }
        assert_eq!(values.len(), scalars.len());
        for ((got, want), r) in values.iter().zip(&want).zip(&scalars) {
            let single = match *r {
                Reduction::Trace(m) => b.trace(m),
                Reduction::Dot(p, q) => b.dot(p, q),
                Reduction::SquaredNorm(m) => b.dot(m, m),
                Reduction::NonFinite(m) => f64::from(u8::from(!b.is_finite(m))),
            };
            assert_eq!(
                got.to_bits(),
                single.to_bits(),
                "{}: batched {r:?} = single",
                b.name()
            );
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{}: {r:?}: {got} vs f64 {want}",
                b.name()
            );
        }
        // Nothing to read: no read-back.
        let before = be.read_backs();
        let (t, v) = b.read_back(&[], &[]);
        assert!(t.is_empty() && v.is_empty());
        assert_eq!(be.read_backs(), before);
    }
}

/// The count of device read-backs of a KFAC (dense) and KFC (conv) step on wgpu: exactly one on
/// every step without a refresh (the directions of all blocks and the statistics' finiteness
/// checks, batched), in the inverse and eigenbasis modes; refresh steps read more (the
/// statistics' checks before the refresh, then the factorizations). The quadratic model's
/// terms take one more, batched over the blocks: on Levenberg-Marquardt adaptation steps (the
/// predicted reduction) and on every step of the quadratic-model rule (its Gram matrix).
#[test]
fn kfac_step_reads_back_once_outside_refreshes() {
    use kron_optim::{LevenbergMarquardt, StepRule};
    use std::sync::Arc;
    if gpu().is_none() {
        return;
    }
    let inputs = [
        (
            mlp as fn(u64) -> Net,
            Tensor::randn(&[32, 6], 0.0, 1.0, &mut Rng::new(43)),
        ),
        (
            convnet as fn(u64) -> Net,
            Tensor::randn(&[8, 2, 6, 6], 0.0, 1.0, &mut Rng::new(44)),
        ),
    ];
    let base = KfacConfig::default()
        .with_fisher(FisherKind::Empirical)
        .with_inverse_period(4)
        .with_conv_stats_period(2);
    // Read-backs allowed on step i without a refresh.
    type Allowed = fn(usize) -> u64;
    let configs: [(KfacConfig, Allowed); 4] = [
        (base.with_method(InverseMethod::Inverse), |_| 1),
        (
            base.with_method(InverseMethod::Eigen(EigenDamping::Factored)),
            |_| 1,
        ),
        (
            base.with_adaptive_damping(Some(LevenbergMarquardt::DEFAULT)),
            |i| 1 + u64::from(i % 5 == 0),
        ),
        (base.with_step_rule(StepRule::QuadraticModel), |_| 2),
    ];
    for (make, x) in &inputs {
        let y: Vec<usize> = (0..x.dim(0)).map(|i| (i * 5) % 3).collect();
        for (cfg, allowed) in configs {
            let be = Arc::new(WgpuBackend::new().expect("adapter"));
            let mut net = make(31);
            let mut kfac = Kfac::with_backend(
                net.model.fisher_blocks(),
                &net.store,
                cfg,
                Box::new(be.clone()),
            )
            .unwrap();
            let mut counts = vec![];
            for _ in 0..11 {
                let (g, caps) = backward(&net, &kfac, x, &y);
                let before = be.read_backs();
                let r = kfac.step(&mut net.store, &g, &caps).unwrap();
                counts.push((r.refreshed, be.read_backs() - before));
                assert!(
                    r.notes
                        .iter()
                        .all(|n| !matches!(n, Note::StatsSkipped { .. }))
                );
            }
            for (i, &(refreshed, n)) in counts.iter().enumerate() {
                assert_eq!(refreshed, i % 4 == 0, "step {i}");
                if !refreshed {
                    assert_eq!(n, allowed(i), "{cfg:?} step {i}: {counts:?}");
                }
            }
            println!(
                "{:?} {:?} {:?}: (refreshed, read-backs) per step {counts:?}",
                cfg.method,
                cfg.step.rule,
                cfg.damping.adaptive.is_some()
            );
        }
    }
}
