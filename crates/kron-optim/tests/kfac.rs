//! KFAC and KFC against brute force: factors, preconditioned updates, the natural-gradient
//! identity, and the failure policy.

use std::sync::{Arc, Mutex};

use kron_autodiff::{Gradients, LossKind, ParamStore, Rng, Tape, Targets, Tensor};
mod common;

use common::{Net, add_diag, convnet, forgetful, kron, mat64, mlp, solve, trace};
use kron_layers::{Dense, Module, Sequential};
use kron_optim::backend::{Eigh, Inverse, LinalgError, Mat};
use kron_optim::curvature::{CurvatureBlock, Kept, StatsSkip};
use kron_optim::{
    Backend, Captures, CpuBackend, CurvatureProducts, EigenDamping, FisherKind, InverseMethod,
    Kfac, KfacConfig, Note, OptimError, Optimizer, Precision, StepReport, StepRule, TapeCurvature,
};

/// Gradients and empirical-Fisher captures of a batch.
fn backward(net: &Net, kfac: &Kfac, x: &Tensor, y: &[usize]) -> (Gradients, Captures) {
    let tape = Tape::new(&net.store).capturing(kfac.wants().capture);
    let l = net.model.forward(tape.input(x.clone())).cross_entropy(y);
    let mut g = tape.backward(l);
    let c = g.take_captures();
    (g, c)
}

fn empirical(cfg: KfacConfig) -> KfacConfig {
    cfg.with_fisher(FisherKind::Empirical).with_kl_clip(None)
}

#[test]
fn factors_equal_their_definitions_dense_and_conv() {
    for (net, x) in [
        (mlp(1), Tensor::randn(&[5, 3], 0.0, 1.0, &mut Rng::new(2))),
        (
            convnet(1),
            Tensor::randn(&[4, 2, 5, 6], 0.0, 1.0, &mut Rng::new(2)),
        ),
    ] {
        let mut net = net;
        let mut kfac = Kfac::new(
            &net.model,
            &net.store,
            empirical(KfacConfig::default()).with_conv_stats_period(1),
        )
        .unwrap();
        let y: Vec<usize> = (0..x.dim(0)).map(|i| i % 2).collect();
        let (g, caps) = backward(&net, &kfac, &x, &y);
        kfac.step(&mut net.store, &g, &caps).unwrap();
        for b in net.model.fisher_blocks() {
            let cap = &caps[&b.layer];
            let (a, gf) = kfac.factors(&b.path).unwrap();
            // Brute force: explicit homogeneous coordinate, sums over rows.
            let (rows, d) = cap.a.dims2();
            let n = d + 1;
            let mut bf = vec![0.0f64; n * n];
            for r in 0..rows {
                let mut v: Vec<f64> = cap.a.data()[r * d..(r + 1) * d]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                v.push(1.0);
                for i in 0..n {
                    for j in 0..n {
                        bf[i * n + j] += v[i] * v[j] / cap.batch as f64;
                    }
                }
            }
            for (k, (&got, want)) in a.data().iter().zip(&bf).enumerate() {
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{} A[{k}]: {got} vs {want}",
                    b.path
                );
            }
            let (_, o) = cap.g.dims2();
            let mut bg = vec![0.0f64; o * o];
            for r in 0..rows {
                let v = &cap.g.data()[r * o..(r + 1) * o];
                for i in 0..o {
                    for j in 0..o {
                        bg[i * o + j] +=
                            v[i] as f64 * v[j] as f64 / (cap.batch * cap.locations) as f64;
                    }
                }
            }
            for (k, (&got, want)) in gf.data().iter().zip(&bg).enumerate() {
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{} G[{k}]: {got} vs {want}",
                    b.path
                );
            }
        }
    }
}

/// After one step with fresh statistics, each block's preconditioned gradient equals a dense
/// solve with the damped Kronecker product built explicitly.
#[test]
fn preconditioned_update_equals_dense_solve_with_the_damped_kronecker_product() {
    let lambda = 0.05f64;
    for method in [
        InverseMethod::Inverse,
        InverseMethod::Eigen(EigenDamping::Factored),
        InverseMethod::Eigen(EigenDamping::Tikhonov),
        InverseMethod::Eigen(EigenDamping::PerFactor),
    ] {
        for mut net in [mlp(3), convnet(3)] {
            let x = if net.model.fisher_blocks()[0].is_conv() {
                Tensor::randn(&[4, 2, 5, 6], 0.0, 1.0, &mut Rng::new(4))
            } else {
                Tensor::randn(&[6, 3], 0.0, 1.0, &mut Rng::new(4))
            };
            let cfg = empirical(KfacConfig::default())
                .with_damping(lambda as f32)
                .with_method(method)
                .with_conv_stats_period(1)
                .with_precision(Precision::F64);
            let mut kfac = Kfac::new(&net.model, &net.store, cfg).unwrap();
            let y: Vec<usize> = (0..x.dim(0)).map(|i| (i * 7) % 2).collect();
            let (g, caps) = backward(&net, &kfac, &x, &y);
            kfac.step(&mut net.store, &g, &caps).unwrap();
            for b in net.model.fisher_blocks() {
                let (a, gf) = kfac.factors(&b.path).unwrap();
                let (a, gf) = (mat64(&a), mat64(&gf));
                let v = Tensor::randn(&[b.g_dim(), b.a_dim()], 0.0, 1.0, &mut Rng::new(9));
                let u = kfac.precondition(&b.path, &v).unwrap();
                let k = match method {
                    InverseMethod::Eigen(EigenDamping::Tikhonov) => add_diag(kron(&gf, &a), lambda),
                    InverseMethod::Eigen(EigenDamping::PerFactor) => {
                        kron(&add_diag(gf.clone(), lambda), &add_diag(a.clone(), lambda))
                    }
                    _ => {
                        let pi =
                            ((trace(&a) / a.len() as f64) / (trace(&gf) / gf.len() as f64)).sqrt();
                        kron(
                            &add_diag(gf.clone(), lambda.sqrt() / pi),
                            &add_diag(a.clone(), pi * lambda.sqrt()),
                        )
                    }
                };
                let want = solve(k, v.data().iter().map(|&x| x as f64).collect());
                let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for (i, (&got, w)) in u.data().iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - w).abs() < 1e-4 * scale,
                        "{method:?} {}: U[{i}] = {got}, dense solve {w}",
                        b.path
                    );
                }
            }
        }
    }
}

#[test]
fn inverse_and_factored_eigenbasis_paths_agree() {
    let x = Tensor::randn(&[8, 3], 0.0, 1.0, &mut Rng::new(5));
    let y: Vec<usize> = (0..8).map(|i| i % 2).collect();
    let mut outs = vec![];
    for method in [
        InverseMethod::Inverse,
        InverseMethod::Eigen(EigenDamping::Factored),
    ] {
        let mut net = mlp(6);
        let mut kfac = Kfac::new(
            &net.model,
            &net.store,
            empirical(KfacConfig::default()).with_method(method),
        )
        .unwrap();
        for _ in 0..3 {
            let (g, caps) = backward(&net, &kfac, &x, &y);
            kfac.step(&mut net.store, &g, &caps).unwrap();
        }
        outs.push(net.store);
    }
    for ((_, n, a), (_, _, b)) in outs[0].iter().zip(outs[1].iter()) {
        assert!(a.max_abs_diff(b) < 1e-5, "{n}: {}", a.max_abs_diff(b));
    }
}

/// One dense layer, squared error, unit-variance Gaussian model: the Fisher is exactly
/// `kron(I, A)` (the expectation of `g g^T` is the identity), so KFAC with the sampled Fisher
/// is the exact natural gradient up to Monte Carlo error in `G`.
#[test]
fn kfac_on_one_linear_layer_with_squared_loss_is_the_natural_gradient() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(11);
    let layer = Dense::new(&mut store, "lin", 4, 3, &mut rng);
    let model = Sequential::new().push(layer);
    let b = 8192;
    let x = Tensor::randn(&[b, 4], 0.5, 1.0, &mut rng);
    let t = Tensor::randn(&[b, 3], 0.0, 1.0, &mut rng);
    let lambda = 1e-6f32;
    let cfg = KfacConfig::default()
        .with_damping(lambda)
        .with_kl_clip(None);
    let mut kfac = Kfac::new(&model, &store, cfg).unwrap();
    let mut loop_rng = Rng::new(12);
    // One step through the real training-step machinery (sampled labels, second backward).
    let out = {
        let tape = Tape::new(&store).capturing(kfac.wants().capture);
        let y = model.forward(tape.input(x.clone()));
        let l = y.squared_error(&t);
        let g = tape.backward(l);
        let sampled = LossKind::SquaredError.sample(&y.value(), &mut loop_rng);
        let Targets::Values(s) = &sampled else {
            unreachable!()
        };
        let caps = tape.backward(y.squared_error(s)).take_captures();
        (g, caps)
    };
    let v = model.fisher_blocks()[0].join(
        out.0.get(layer_weight(&model)).unwrap(),
        layer_bias(&model).and_then(|id| out.0.get(id)),
    );
    kfac.step(&mut store, &out.0, &out.1).unwrap();
    let (a, g) = kfac.factors("lin").unwrap();
    // G is the identity up to sampling error.
    assert!(g.max_abs_diff(&Tensor::eye(3)) < 0.05, "G = {g:?}");
    // Exact natural gradient from the analytic Fisher kron(I, A).
    let a64 = mat64(&a);
    let eye: Vec<Vec<f64>> = (0..3)
        .map(|i| (0..3).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    let f = add_diag(kron(&eye, &a64), lambda as f64);
    let nat = solve(f, v.data().iter().map(|&x| x as f64).collect());
    let u = kfac.precondition("lin", &v).unwrap();
    let norm = nat.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = u
        .data()
        .iter()
        .zip(&nat)
        .map(|(&p, q)| (p as f64 - q).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(err < 0.05 * norm, "relative error {}", err / norm);
}

fn layer_weight(m: &Sequential) -> kron_autodiff::ParamId {
    m.fisher_blocks()[0].weight
}

fn layer_bias(m: &Sequential) -> Option<kron_autodiff::ParamId> {
    m.fisher_blocks()[0].bias
}

#[test]
fn f32_and_f64_statistics_agree() {
    let x = Tensor::randn(&[16, 3], 0.0, 1.0, &mut Rng::new(7));
    let y: Vec<usize> = (0..16).map(|i| i % 2).collect();
    let mut outs = vec![];
    for p in [Precision::F32, Precision::F64] {
        let mut net = mlp(8);
        let mut kfac = Kfac::new(
            &net.model,
            &net.store,
            empirical(KfacConfig::default())
                .with_precision(p)
                .with_inverse_period(2),
        )
        .unwrap();
        for _ in 0..5 {
            let (g, caps) = backward(&net, &kfac, &x, &y);
            kfac.step(&mut net.store, &g, &caps).unwrap();
        }
        outs.push(net.store);
    }
    for ((_, n, a), (_, _, b)) in outs[0].iter().zip(outs[1].iter()) {
        assert!(a.max_abs_diff(b) < 1e-4, "{n}: {}", a.max_abs_diff(b));
    }
}

#[test]
fn non_finite_gradients_are_refused_and_non_finite_captures_skipped() {
    let mut net = mlp(9);
    let mut kfac = Kfac::new(&net.model, &net.store, empirical(KfacConfig::default())).unwrap();
    let x = Tensor::randn(&[4, 3], 0.0, 1.0, &mut Rng::new(1));
    let y = vec![0, 1, 0, 1];
    let (g, caps) = backward(&net, &kfac, &x, &y);
    kfac.step(&mut net.store, &g, &caps).unwrap();
    let (p0, s0) = (net.store.clone(), kfac.state());
    // NaN gradient: Err, nothing changes.
    let mut gbad: Vec<Option<Tensor>> = net.store.ids().map(|id| g.get(id).cloned()).collect();
    gbad[0].as_mut().unwrap().data_mut()[0] = f32::NAN;
    assert!(
        kfac.step(&mut net.store, &Gradients::from_params(gbad), &caps)
            .is_err()
    );
    assert_eq!(net.store, p0);
    assert_eq!(kfac.state(), s0);
    // Non-finite capture: that block's statistics are skipped, the report says so, step is Ok.
    let mut caps2 = caps.clone();
    let first = *caps2.keys().next().unwrap();
    caps2.get_mut(&first).unwrap().a.data_mut()[0] = f32::INFINITY;
    let (fa, _) = kfac.factors("0").unwrap();
    let report = kfac.step(&mut net.store, &g, &caps2).unwrap();
    assert!(
        report.notes.iter().any(|n| matches!(
            n,
            Note::StatsSkipped { block, reason: StatsSkip::NonFiniteInput } if block == "0"
        )),
        "{:?}",
        report.notes
    );
    assert_eq!(kfac.factors("0").unwrap().0, fa);
    // A skipped statistic is a warning; KL clipping, routine, is not.
    assert!(
        report
            .warnings()
            .any(|n| matches!(n, Note::StatsSkipped { .. }))
    );
    assert!(
        report
            .warnings()
            .all(|n| !matches!(n, Note::KlClipped { .. }))
    );
    assert!(report.stats_updated, "the other block took its capture");
    assert!(net.store.iter().all(|(_, _, t)| t.all_finite()));
    // Every capture non-finite: no statistics updated, and the report does not claim any.
    let mut caps3 = caps.clone();
    for c in caps3.values_mut() {
        c.a.data_mut()[0] = f32::NAN;
    }
    let report = kfac.step(&mut net.store, &g, &caps3).unwrap();
    assert!(!report.stats_updated, "{:?}", report.notes);
}

/// A backend whose damped inverse (or eigendecomposition) fails a given number of times,
/// recording the damping it was asked for.
#[derive(Debug)]
struct Flaky {
    inner: CpuBackend,
    failures: Mutex<usize>,
    eigh_failures: Mutex<Vec<bool>>,
    asked: Mutex<Vec<f32>>,
}

impl Flaky {
    fn new(failures: usize) -> Arc<Self> {
        Arc::new(Flaky {
            inner: CpuBackend::new(Precision::F32),
            failures: Mutex::new(failures),
            eigh_failures: Mutex::new(vec![]),
            asked: Mutex::new(vec![]),
        })
    }
}

impl Backend for Flaky {
    fn name(&self) -> String {
        "flaky".into()
    }
    fn precision(&self) -> Precision {
        self.inner.precision()
    }
    fn upload_rows(&self, t: &Tensor, rows: Option<usize>) -> Mat {
        self.inner.upload_rows(t, rows)
    }
    fn download(&self, m: &Mat) -> Tensor {
        self.inner.download(m)
    }
    fn zeros(&self, r: usize, c: usize) -> Mat {
        self.inner.zeros(r, c)
    }
    fn gemm(&self, al: f32, a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat {
        self.inner.gemm(al, a, ta, b, tb)
    }
    fn factor_ema(&self, acc: &mut Mat, x: &Mat, h: bool, s: f32, d: f32) {
        self.inner.factor_ema(acc, x, h, s, d)
    }
    fn add_diag(&self, m: &mut Mat, v: f64) {
        self.inner.add_diag(m, v)
    }
    fn scale(&self, m: &mut Mat, s: f64) {
        self.inner.scale(m, s)
    }
    fn axpby(&self, a: f64, x: &Mat, b: f64, y: &mut Mat) {
        self.inner.axpby(a, x, b, y)
    }
    fn div_outer(&self, m: &mut Mat, l: &[f64], r: &[f64], add: f64) {
        self.inner.div_outer(m, l, r, add)
    }
    fn trace(&self, m: &Mat) -> f64 {
        self.inner.trace(m)
    }
    fn dot(&self, a: &Mat, b: &Mat) -> f64 {
        self.inner.dot(a, b)
    }
    fn is_finite(&self, m: &Mat) -> bool {
        self.inner.is_finite(m)
    }
    fn spd_inverse(&self, m: &Mat, damping: f32) -> Result<Inverse, LinalgError> {
        self.asked.lock().unwrap().push(damping);
        let mut f = self.failures.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(LinalgError::NotPositiveDefinite { pivot: 0 });
        }
        self.inner.spd_inverse(m, damping)
    }
    fn eigh(&self, m: &Mat) -> Result<Eigh, LinalgError> {
        // The next scripted outcome (true: fail), if any.
        let mut script = self.eigh_failures.lock().unwrap();
        if !script.is_empty() && script.remove(0) {
            return Err(LinalgError::NoConvergence);
        }
        self.inner.eigh(m)
    }
    fn inv_root(&self, m: &Mat, p: u32, d: f32) -> Result<Mat, LinalgError> {
        self.inner.inv_root(m, p, d)
    }
}

/// Finite captures whose factor products overflow: the block keeps the factors it had and the
/// report says why, whether the overflow is checked before a refresh or with the directions
/// (steps without a refresh check it there, in the step's one read-back).
#[test]
fn overflowing_statistics_are_undone_before_and_without_a_refresh() {
    let mut net = mlp(9);
    let cfg = empirical(KfacConfig::default()).with_inverse_period(2);
    let mut kfac = Kfac::new(&net.model, &net.store, cfg).unwrap();
    let x = Tensor::randn(&[4, 3], 0.0, 1.0, &mut Rng::new(1));
    let y = vec![0, 1, 0, 1];
    let (g, caps) = backward(&net, &kfac, &x, &y);
    kfac.step(&mut net.store, &g, &caps).unwrap();
    let mut huge = caps.clone();
    let first = *huge.keys().next().unwrap();
    huge.get_mut(&first)
        .unwrap()
        .a
        .data_mut()
        .iter_mut()
        .for_each(|v| *v = 1e30);
    // Step 1 refreshes nothing, step 2 refreshes.
    for step in [1, 2] {
        let (fa, fg) = kfac.factors("0").unwrap();
        let updates = |k: &Kfac| k.driver().block("0").unwrap().updates();
        let before = updates(&kfac);
        let report = kfac.step(&mut net.store, &g, &huge).unwrap();
        assert_eq!(report.refreshed, step == 2);
        assert!(
            report.notes.iter().any(|n| matches!(
                n,
                Note::StatsSkipped { block, reason: StatsSkip::Overflow } if block == "0"
            )),
            "step {step}: {:?}",
            report.notes
        );
        assert!(report.stats_updated, "the other block took its capture");
        assert_eq!(kfac.factors("0").unwrap(), (fa, fg), "step {step}");
        assert_eq!(updates(&kfac), before, "step {step}");
        assert!(net.store.iter().all(|(_, _, t)| t.all_finite()));
    }
}

#[test]
fn failed_refresh_keeps_fallback_then_retries_with_more_damping() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(10);
    let model = Sequential::new().push(Dense::new(&mut store, "only", 3, 2, &mut rng));
    let flaky = Flaky::new(1);
    let cfg = empirical(KfacConfig::default())
        .with_inverse_period(1)
        .with_momentum(0.0);
    let mut kfac =
        Kfac::with_backend(model.fisher_blocks(), &store, cfg, Box::new(flaky.clone())).unwrap();
    let net = Net {
        store: store.clone(),
        model,
    };
    let x = Tensor::randn(&[6, 3], 0.0, 1.0, &mut rng);
    let y = vec![0, 1, 1, 0, 1, 0];
    let (g, caps) = backward(&net, &kfac, &x, &y);
    // First refresh fails: the block falls back to SGD on the raw gradient.
    let before = store.clone();
    let r = kfac.step(&mut store, &g, &caps).unwrap();
    assert!(
        r.notes.iter().any(|n| matches!(
            n,
            Note::RefreshFailed {
                kept: Kept::Fallback,
                failures: 1,
                ..
            }
        )),
        "{:?}",
        r.notes
    );
    assert!(
        !r.refreshed,
        "every refresh failed, yet reported as refreshed"
    );
    let w = model_weight(&net);
    let sgd = before.get(w).sub(&g.get(w).unwrap().scale(0.1));
    assert!(store.get(w).max_abs_diff(&sgd) < 1e-6);
    // Second refresh succeeds at ten times the damping and says so; the third is back to normal.
    let r2 = kfac.step(&mut store, &g, &caps).unwrap();
    assert!(
        r2.notes
            .iter()
            .any(|n| matches!(n, Note::RefreshRecovered { .. })),
        "{:?}",
        r2.notes
    );
    assert!(r2.refreshed);
    kfac.step(&mut store, &g, &caps).unwrap();
    let asked = flaky.asked.lock().unwrap().clone();
    // Two inverses (A then G) per refresh; the first failed at A. The boost multiplies
    // lambda by 10, so each factor's damping (pi-split sqrt(lambda)) grows by sqrt(10).
    assert!(
        (asked[1] / asked[0] - 10f32.sqrt()).abs() < 1e-3,
        "{asked:?}"
    );
    assert!(asked.last().unwrap() < &asked[1]);
}

/// In the eigenbasis mode the damping enters at preconditioning: a refresh that succeeds after
/// a failure must precondition with the boosted damping (it used to keep the unboosted one, so
/// the retry changed nothing), and the next refresh returns to the configured damping.
#[test]
fn eigen_mode_retries_precondition_with_the_boosted_damping() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(10);
    let model = Sequential::new().push(Dense::new(&mut store, "only", 3, 2, &mut rng));
    let flaky = Flaky::new(0);
    // Refresh 1: A and G succeed; refresh 2: A fails; refresh 3: both succeed; refresh 4 too.
    *flaky.eigh_failures.lock().unwrap() = vec![false, false, true];
    let method = InverseMethod::Eigen(EigenDamping::Tikhonov);
    let cfg = empirical(KfacConfig::default())
        .with_inverse_period(1)
        .with_method(method);
    let mut kfac =
        Kfac::with_backend(model.fisher_blocks(), &store, cfg, Box::new(flaky.clone())).unwrap();
    let net = Net {
        store: store.clone(),
        model,
    };
    let x = Tensor::randn(&[6, 3], 0.0, 1.0, &mut rng);
    let y = vec![0, 1, 1, 0, 1, 0];
    let v = Tensor::randn(&[2, 4], 0.0, 1.0, &mut Rng::new(3));
    // The eigen preconditioner at damping `lambda` on the current factors, densely.
    let dense = |kfac: &Kfac, lambda: f64| -> Vec<f64> {
        let path = kfac.refresh_costs()[0].0.clone();
        let (a, g) = kfac.factors(&path).unwrap();
        let f = add_diag(kron(&mat64(&g), &mat64(&a)), lambda);
        let b: Vec<f64> = v.data().iter().map(|&x| x as f64).collect();
        solve(f, b)
    };
    let close = |u: &Tensor, want: &[f64]| {
        u.data()
            .iter()
            .zip(want)
            .all(|(&p, &q)| (p as f64 - q).abs() <= 1e-3 * (1.0 + q.abs()))
    };
    let (g, caps) = backward(&net, &kfac, &x, &y);
    kfac.step(&mut store, &g, &caps).unwrap();
    let r = kfac.step(&mut store, &g, &caps).unwrap();
    assert!(
        r.notes.iter().any(|n| matches!(
            n,
            Note::RefreshFailed {
                kept: Kept::LastGood,
                ..
            }
        )),
        "{:?}",
        r.notes
    );
    // Refresh 3 succeeds at the boost: the preconditioner is that of 10 lambda on the
    // factors it was refreshed from.
    let lambda = kfac.damping() as f64;
    let r = kfac.step(&mut store, &g, &caps).unwrap();
    assert!(
        r.notes.iter().any(|n| matches!(
            n,
            Note::RefreshRecovered { damping, .. } if (damping / lambda - 10.0).abs() < 1e-9
        )),
        "{:?}",
        r.notes
    );
    // The same captures every step keep the factors where they were at the refresh.
    let path = kfac.refresh_costs()[0].0.clone();
    let boosted = kfac.precondition(&path, &v).unwrap();
    assert!(
        close(&boosted, &dense(&kfac, 10.0 * lambda)),
        "retry at 10 lambda"
    );
    assert!(!close(&boosted, &dense(&kfac, lambda)));
    // Refresh 4 returns to the configured damping.
    kfac.step(&mut store, &g, &caps).unwrap();
    let plain = kfac.precondition(&path, &v).unwrap();
    assert!(close(&plain, &dense(&kfac, lambda)), "back to lambda");
}

fn model_weight(net: &Net) -> kron_autodiff::ParamId {
    net.model.fisher_blocks()[0].weight
}

#[test]
fn state_round_trip_restores_everything() {
    let mut net = mlp(12);
    let x = Tensor::randn(&[6, 3], 0.0, 1.0, &mut Rng::new(1));
    let y = vec![0, 1, 1, 0, 1, 0];
    for method in [
        InverseMethod::Inverse,
        InverseMethod::Eigen(EigenDamping::Tikhonov),
    ] {
        let mut kfac = Kfac::new(
            &net.model,
            &net.store,
            empirical(KfacConfig::default()).with_method(method),
        )
        .unwrap();
        for _ in 0..2 {
            let (g, caps) = backward(&net, &kfac, &x, &y);
            kfac.step(&mut net.store, &g, &caps).unwrap();
        }
        let st = kfac.state();
        let mut other = Kfac::new(
            &net.model,
            &net.store,
            empirical(KfacConfig::default()).with_method(method),
        )
        .unwrap();
        other.load_state(st.clone()).unwrap();
        assert_eq!(other.state(), st);
        let v = Tensor::randn(&[4, 4], 0.0, 1.0, &mut Rng::new(2));
        assert_eq!(other.precondition("0", &v), kfac.precondition("0", &v));
    }
}

/// `sum_i <a_i, b_i>` over the blocks present in both.
fn inner(a: &[Option<Tensor>], b: &[Option<Tensor>]) -> f64 {
    a.iter()
        .zip(b)
        .filter_map(|(x, y)| {
            let (x, y) = (x.as_ref()?, y.as_ref()?);
            Some(
                x.data()
                    .iter()
                    .zip(y.data())
                    .map(|(&p, &q)| p as f64 * q as f64)
                    .sum::<f64>(),
            )
        })
        .sum()
}

/// `a - b` (or `(a - s b) / t`) per parameter.
fn combine(a: &[Option<Tensor>], b: &[Option<Tensor>], s: f32, t: f32) -> Vec<Option<Tensor>> {
    a.iter()
        .zip(b)
        .map(|(x, y)| Some(x.as_ref()?.sub(&y.as_ref()?.scale(s)).scale(1.0 / t)))
        .collect()
}

fn values(store: &ParamStore) -> Vec<Option<Tensor>> {
    store.ids().map(|id| Some(store.get(id).clone())).collect()
}

/// One step with the exact mini-batch curvature products of a tape at the current point.
fn exact_step(net: &mut Net, kfac: &mut Kfac, x: &Tensor, y: &[usize]) -> StepReport {
    let snapshot = net.store.clone();
    let tape = Tape::new(&snapshot).capturing(kfac.wants().capture);
    let l = net.model.forward(tape.input(x.clone())).cross_entropy(y);
    let mut g = tape.backward(l);
    let c = g.take_captures();
    kfac.step_with_curvature(&mut net.store, &g, &c, &TapeCurvature { loss: l })
        .unwrap()
}

#[test]
fn quadratic_model_step_minimizes_the_exact_model_in_its_plane() {
    // delta = alpha Delta + mu delta_prev minimizes M(d) = grad^T d + 1/2 d^T (F + l I) d over
    // the plane of Delta and delta_prev: M's gradient at delta is orthogonal to both, with F
    // the exact mini-batch Fisher, checked here from the outside (parameters before and after).
    let mut net = mlp(3);
    let wd = 1e-3;
    let cfg = empirical(KfacConfig::default())
        .with_step_rule(StepRule::QuadraticModel)
        .with_inverse_period(1)
        .with_damping(0.05)
        .with_weight_decay(wd);
    let mut kfac = Kfac::new(&net.model, &net.store, cfg).unwrap();
    assert!(kfac.wants().products);
    let x = Tensor::randn(&[12, 3], 0.0, 1.0, &mut Rng::new(8));
    let y: Vec<usize> = (0..12).map(|i| (i * 7) % 2).collect();
    let mut history = vec![values(&net.store)];
    let mut reports = Vec::new();
    for _ in 0..4 {
        reports.push(exact_step(&mut net, &mut kfac, &x, &y));
        history.push(values(&net.store));
    }
    assert_eq!(reports[0].momentum, Some(0.0), "no previous step to reuse");
    let lambda = kfac.damping() as f64 + wd as f64;
    for k in 1..4 {
        let (alpha, mu) = (reports[k].lr, reports[k].momentum.unwrap());
        assert!(alpha > 0.0 && mu != 0.0, "step {k}: alpha {alpha}, mu {mu}");
        let delta = combine(&history[k + 1], &history[k], 1.0, 1.0);
        let prev = combine(&history[k], &history[k - 1], 1.0, 1.0);
        let proposal = combine(&delta, &prev, mu, alpha);
        // The gradient of h (loss plus the L2 term) and the Fisher at the step's point.
        let mut store = net.store.clone();
        for (id, v) in store.ids().zip(&history[k]).collect::<Vec<_>>() {
            store.set(id, v.clone().unwrap());
        }
        let tape = Tape::new(&store);
        let l = net.model.forward(tape.input(x.clone())).cross_entropy(&y);
        let g = tape.backward(l);
        let grad: Vec<Option<Tensor>> = store
            .ids()
            .map(|id| Some(g.get(id)?.add(&store.get(id).scale(wd))))
            .collect();
        let gram = tape.ggn_gram(l, &[&proposal, &prev, &delta]);
        for (i, d) in [(0, &proposal), (1, &prev)] {
            let lin = inner(&grad, d);
            let stationarity = lin + gram[i * 3 + 2] + lambda * inner(d, &delta);
            assert!(
                stationarity.abs() <= 2e-3 * lin.abs(),
                "step {k}, direction {i}: dM(delta) = {stationarity:e} against grad^T d = {lin:e}"
            );
        }
        let model = inner(&grad, &delta) + 0.5 * (gram[8] + lambda * inner(&delta, &delta));
        assert!(
            model < 0.0,
            "step {k}: the model predicts no decrease ({model})"
        );
    }
}

/// Curvature products that fail.
struct Broken;

impl CurvatureProducts for Broken {
    fn gram(&self, dirs: &[&kron_autodiff::Direction]) -> Vec<f64> {
        vec![f64::NAN; dirs.len() * dirs.len()]
    }
}

#[test]
fn a_broken_quadratic_model_moves_nothing_and_says_so() {
    let mut net = mlp(4);
    let cfg = empirical(KfacConfig::default())
        .with_step_rule(StepRule::QuadraticModel)
        .with_inverse_period(1);
    let mut kfac = Kfac::new(&net.model, &net.store, cfg).unwrap();
    let x = Tensor::randn(&[6, 3], 0.0, 1.0, &mut Rng::new(2));
    let y = [0usize, 1, 0, 1, 1, 0];
    let (g, c) = backward(&net, &kfac, &x, &y);
    let before = values(&net.store);
    let r = kfac
        .step_with_curvature(&mut net.store, &g, &c, &Broken)
        .unwrap();
    assert_eq!(values(&net.store), before);
    assert!(
        r.notes
            .iter()
            .any(|n| matches!(n, Note::ModelRejected { .. })),
        "{:?}",
        r.notes
    );
    // Without exact products the step uses the Kronecker model, and it descends.
    let loss = |net: &Net| {
        let tape = Tape::new(&net.store);
        net.model
            .forward(tape.input(x.clone()))
            .cross_entropy(&y)
            .value()
            .item()
    };
    let start = loss(&net);
    for _ in 0..5 {
        let (g, c) = backward(&net, &kfac, &x, &y);
        let r = kfac.step(&mut net.store, &g, &c).unwrap();
        assert!(r.lr > 0.0);
    }
    assert!(loss(&net) < start, "{} -> {}", start, loss(&net));
}

/// KFAC's constructor validates its configuration (damping 0 or NaN, a NaN learning rate, a
/// negative KL clip are refused naming the field), and an update that overflows is refused
/// with the parameters and the velocity as they were. (The quadratic-model rule chooses its
/// own step size, so its steps do not overflow this way; it commits through the same guard.)
#[test]
fn kfac_refuses_invalid_configurations_and_overflowing_updates() {
    let net = mlp(4);
    for (cfg, want) in [
        (KfacConfig::default().with_damping(0.0), "damping"),
        (KfacConfig::default().with_damping(f32::NAN), "damping"),
        (KfacConfig::new(f32::NAN), "learning rate"),
        (KfacConfig::default().with_kl_clip(Some(-1.0)), "kl_clip"),
    ] {
        let e = Kfac::new(&net.model, &net.store, cfg).err().unwrap();
        assert!(e.to_string().contains(want), "{e}");
    }
    let x = Tensor::randn(&[4, 3], 0.0, 1.0, &mut Rng::new(1));
    let y = vec![0, 1, 0, 1];
    {
        let rule = StepRule::Sgd;
        let mut net = mlp(4);
        let cfg = empirical(KfacConfig::new(1e-2).with_inverse_period(1)).with_step_rule(rule);
        let mut kfac = Kfac::new(&net.model, &net.store, cfg).unwrap();
        let (g, caps) = backward(&net, &kfac, &x, &y);
        kfac.step(&mut net.store, &g, &caps).unwrap();
        // Gradients so large that any step overflows.
        let (g, caps) = backward(&net, &kfac, &x, &y);
        let huge: Vec<Option<Tensor>> = net
            .store
            .ids()
            .map(|id| g.get(id).map(|t| t.scale(1e36)))
            .collect();
        kfac.set_learning_rate(3e38).unwrap();
        let (p0, v0) = (net.store.clone(), kfac.state().tensors);
        let e = kfac
            .step(&mut net.store, &Gradients::from_params(huge), &caps)
            .unwrap_err();
        assert!(
            matches!(e, OptimError::NonFiniteUpdate { .. }),
            "{rule:?}: {e:?}"
        );
        assert_eq!(net.store, p0, "{rule:?}");
        let v1 = kfac.state().tensors;
        for (name, t) in &v0 {
            if name.contains("velocity") {
                assert_eq!(Some(t), v1.get(name), "{rule:?}: {name}");
            }
        }
    }
}

/// KL clipping, which scales most KFAC steps, is a routine note; `warnings` leaves it out and
/// keeps the signs of trouble.
#[test]
fn warnings_leave_out_routine_notes() {
    let report = StepReport {
        notes: vec![
            Note::KlClipped { factor: 0.5 },
            Note::StatsSkipped {
                block: "fc".into(),
                reason: StatsSkip::NonFiniteInput,
            },
            Note::CoarseSkipped {
                reason: "no captures".into(),
            },
        ],
        ..Default::default()
    };
    let w: Vec<&Note> = report.warnings().collect();
    assert_eq!(w.len(), 2);
    assert!(w.iter().all(|n| !matches!(n, Note::KlClipped { .. })));
}

/// The `OutsideBlocks` notes of a report.
fn outside_notes(r: &StepReport) -> Vec<&Note> {
    r.notes
        .iter()
        .filter(|n| matches!(n, Note::OutsideBlocks { .. }))
        .collect()
}

#[test]
fn parameters_outside_every_block_are_reported_or_refused() {
    let (mut store, model) = forgetful(3);
    let x = Tensor::randn(&[5, 3], 0.0, 1.0, &mut Rng::new(4));
    let y = [0, 1, 1, 0, 1];
    let mut kfac = Kfac::new(&model, &store, KfacConfig::default()).unwrap();
    assert_eq!(kfac.outside_blocks(), ["second.weight", "second.bias"]);
    for step in 0..3 {
        let tape = Tape::new(&store).capturing(kfac.wants().capture);
        let l = model.forward(tape.input(x.clone())).cross_entropy(&y);
        let mut g = tape.backward(l);
        let c = g.take_captures();
        let r = kfac.step(&mut store, &g, &c).unwrap();
        let expected = Note::OutsideBlocks {
            params: vec!["second.weight".into(), "second.bias".into()],
        };
        if step == 0 {
            // A warning, not a routine note, on the first step only.
            assert_eq!(outside_notes(&r), [&expected]);
            assert!(r.warnings().any(|n| *n == expected));
            assert!(expected.to_string().contains("second.weight, second.bias"));
        } else {
            assert!(outside_notes(&r).is_empty(), "step {step}: {:?}", r.notes);
        }
    }

    // Strict: the constructor refuses the model, naming the parameters.
    match Kfac::new(
        &model,
        &store,
        KfacConfig::default().with_strict_blocks(true),
    ) {
        Err(OptimError::Config { field, detail }) => {
            assert_eq!(field, "step.strict_blocks");
            assert!(
                detail.contains("second.weight") && detail.contains("second.bias"),
                "{detail}"
            );
            assert!(!detail.contains("first."), "{detail}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("strict blocks accepted parameters outside every block"),
    }

    // A model whose every parameter lies in a block: strict accepts it, and no note.
    let mut net = mlp(1);
    let mut kfac = Kfac::new(
        &net.model,
        &net.store,
        KfacConfig::default().with_strict_blocks(true),
    )
    .unwrap();
    assert!(kfac.outside_blocks().is_empty());
    let (g, c) = backward(&net, &kfac, &x, &y);
    let r = kfac.step(&mut net.store, &g, &c).unwrap();
    assert!(outside_notes(&r).is_empty());
    assert!(!KfacConfig::default().step.strict_blocks);
}
