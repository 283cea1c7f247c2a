//! Shampoo, KrADagrad* and KrADagrad against dense `f64` references: one Shampoo step is the
//! product of inverse fourth roots (and the mode-unfolding form for order 3, block by block
//! when blocked), KrADagrad* is exact Sherman-Morrison on rank-1 statistics and dominates the
//! true inverse otherwise, KrADagrad replays its own rule; grafting, the diagonal rule, the
//! failure policy, NaN refusal and resume to the bit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kron_autodiff::{Gradients, ParamId, ParamStore, Rng, Tensor};
use kron_optim::adaptive::kradagrad_axis;
use kron_optim::backend::{Eigh, Inverse, LinalgError, Mat};
use kron_optim::{
    AdaptiveConfig, Backend, BlockingConfig, Captures, CpuBackend, Graft, KrAdagrad, KrAdagradStar,
    Momentum, Note, OptimError, Optimizer, Precision, Ridge, RootMethod, Shampoo, TensorLayout,
};

// ---------------------------------------------------------------------------------------------
// Dense f64 references.

/// Cyclic Jacobi eigendecomposition of a symmetric `n x n` row-major matrix: `(values, Q)` with
/// `a = Q diag(values) Q^T`, `Q` row-major with eigenvectors as columns.
fn jacobi(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut q = vec![0.0; n * n];
    for i in 0..n {
        q[i * n + i] = 1.0;
    }
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for r in p + 1..n {
                let apq = a[p * n + r];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[r * n + r] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akr) = (a[k * n + p], a[k * n + r]);
                    a[k * n + p] = c * akp - s * akr;
                    a[k * n + r] = s * akp + c * akr;
                }
                for k in 0..n {
                    let (apk, ark) = (a[p * n + k], a[r * n + k]);
                    a[p * n + k] = c * apk - s * ark;
                    a[r * n + k] = s * apk + c * ark;
                }
                for k in 0..n {
                    let (qkp, qkr) = (q[k * n + p], q[k * n + r]);
                    q[k * n + p] = c * qkp - s * qkr;
                    q[k * n + r] = s * qkp + c * qkr;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), q)
}

/// `(max(a, 0) + eps I)^p` of a symmetric matrix, densely.
fn sym_pow(a: &[f64], n: usize, p: f64, eps: f64) -> Vec<f64> {
    let (e, q) = jacobi(a, n);
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = (0..n)
                .map(|k| q[i * n + k] * (e[k].max(0.0) + eps).powf(p) * q[j * n + k])
                .sum();
        }
    }
    out
}

/// `a (m x k) * b (k x n)`, row-major.
fn mm(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for l in 0..k {
            let x = a[i * k + l];
            for j in 0..n {
                c[i * n + j] += x * b[l * n + j];
            }
        }
    }
    c
}

fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut t = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

fn eye(n: usize, s: f64) -> Vec<f64> {
    let mut a = vec![0.0; n * n];
    for i in 0..n {
        a[i * n + i] = s;
    }
    a
}

fn add(a: &[f64], b: &[f64], sb: f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + sb * y).collect()
}

fn inv(a: &[f64], n: usize) -> Vec<f64> {
    sym_pow(a, n, -1.0, 0.0)
}

/// Mode-`axis` unfolding of a row-major tensor.
fn unfold(t: &[f64], dims: &[usize], axis: usize) -> Vec<f64> {
    let pre: usize = dims[..axis].iter().product();
    let d = dims[axis];
    let post: usize = dims[axis + 1..].iter().product();
    let mut u = vec![0.0; t.len()];
    for p in 0..pre {
        for i in 0..d {
            for q in 0..post {
                u[i * pre * post + p * post + q] = t[(p * d + i) * post + q];
            }
        }
    }
    u
}

fn fold(u: &[f64], dims: &[usize], axis: usize) -> Vec<f64> {
    let pre: usize = dims[..axis].iter().product();
    let d = dims[axis];
    let post: usize = dims[axis + 1..].iter().product();
    let mut t = vec![0.0; u.len()];
    for p in 0..pre {
        for i in 0..d {
            for q in 0..post {
                t[(p * d + i) * post + q] = u[i * pre * post + p * post + q];
            }
        }
    }
    t
}

/// One Shampoo step from zero statistics, densely: `G x_i (eps I + G_(i) G_(i)^T)^(-1/(2k))`.
fn shampoo_one_step(g: &[f64], dims: &[usize], eps: f64) -> Vec<f64> {
    let k = dims.len();
    let mut y = g.to_vec();
    for axis in 0..k {
        let d = dims[axis];
        let rest = g.len() / d;
        let gu = unfold(g, dims, axis);
        let l = mm(&gu, &transpose(&gu, d, rest), d, rest, d);
        let root = sym_pow(&l, d, -1.0 / (2 * k) as f64, eps);
        let yu = unfold(&y, dims, axis);
        y = fold(&mm(&root, &yu, d, d, rest), dims, axis);
    }
    y
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

// ---------------------------------------------------------------------------------------------
// Set-up.

fn store(shapes: &[(&str, &[usize])]) -> ParamStore {
    let mut s = ParamStore::new();
    for (name, shape) in shapes {
        s.add(*name, Tensor::zeros(shape));
    }
    s
}

fn gaussian(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, rng)
}

fn grads(ts: Vec<Tensor>) -> Gradients {
    Gradients::from_params(ts.into_iter().map(Some).collect())
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&x| x as f64).collect()
}

fn exact(t: &kron_optim::Tensor64) -> Vec<f64> {
    t.data().to_vec()
}

/// Plain one-step configuration: lr 1, no momentum, no graft, roots every step from step 1.
fn plain(c: AdaptiveConfig) -> AdaptiveConfig {
    c.with_lr(1.0)
        .with_momentum(Momentum::heavy_ball(0.0))
        .with_graft(None)
        .with_beta2(1.0)
        .with_refresh_period(1)
        .with_start_step(1)
}

/// The update `-(p_after - p_before)` of parameter 0 after one step from zero.
fn first_direction<O: Optimizer>(opt: &mut O, p: &mut ParamStore, g: &Tensor) -> Vec<f64> {
    opt.step(p, &grads(vec![g.clone()]), &Captures::new())
        .unwrap();
    p.get(ParamId(0))
        .data()
        .iter()
        .map(|&x| -(x as f64))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shampoo.

#[test]
fn shampoo_one_step_is_the_product_of_dense_inverse_fourth_roots() {
    let mut rng = Rng::new(3);
    let g = gaussian(&[5, 7], &mut rng);
    let eps = 1e-2;
    let want = shampoo_one_step(&f64s(&g), &[5, 7], eps);
    for (precision, roots, tol) in [
        (Precision::F64, RootMethod::EIGH_F64, 1e-6),
        (Precision::F32, RootMethod::EIGH_F64, 1e-5),
        (Precision::F32, RootMethod::EIGH_F32_PLAIN, 1e-4),
    ] {
        let mut p = store(&[("w", &[5, 7])]);
        let cfg = plain(AdaptiveConfig::shampoo())
            .with_epsilon(Ridge::Absolute(eps))
            .with_precision(precision)
            .with_roots(roots);
        let mut opt = Shampoo::new(&p, cfg).unwrap();
        let got = first_direction(&mut opt, &mut p, &g);
        let e = rel_err(&got, &want);
        assert!(
            e < tol,
            "{precision:?} {}: relative error {e:.2e}",
            roots.name()
        );
    }
}

#[test]
fn shampoo_order_three_matches_the_mode_unfolding_reference() {
    let mut rng = Rng::new(5);
    let dims = [3, 4, 5];
    let g = gaussian(&dims, &mut rng);
    let eps = 1e-2;
    let want = shampoo_one_step(&f64s(&g), &dims, eps);
    let mut p = store(&[("w", &dims)]);
    let cfg = plain(AdaptiveConfig::shampoo())
        .with_epsilon(Ridge::Absolute(eps))
        .with_blocking(
            BlockingConfig::DEFAULT
                .with_layout(TensorLayout::Tensor)
                .with_max_dim(5),
        );
    let mut opt = Shampoo::new(&p, cfg).unwrap();
    assert_eq!(opt.layout("w").unwrap().0, vec![3, 4, 5]);
    let got = first_direction(&mut opt, &mut p, &g);
    let e = rel_err(&got, &want);
    assert!(e < 1e-5, "relative error {e:.2e}");
}

#[test]
fn shampoo_blocks_and_merged_dims_match_the_update_computed_by_hand() {
    let mut rng = Rng::new(7);
    let eps = 1e-2;
    // A 6 x 5 weight in blocks of at most 4: four blocks, each its own one-step update.
    let g = gaussian(&[6, 5], &mut rng);
    let gd = f64s(&g);
    let mut p = store(&[("w", &[6, 5])]);
    let cfg = plain(AdaptiveConfig::shampoo())
        .with_epsilon(Ridge::Absolute(eps))
        .with_blocking(BlockingConfig::DEFAULT.with_max_dim(4));
    let mut opt = Shampoo::new(&p, cfg).unwrap();
    assert_eq!(
        opt.layout("w").unwrap().1,
        vec![vec![4, 4], vec![4, 1], vec![2, 4], vec![2, 1]]
    );
    let got = first_direction(&mut opt, &mut p, &g);
    let mut want = vec![0.0; 30];
    for (r0, rn) in [(0, 4), (4, 2)] {
        for (c0, cn) in [(0, 4), (4, 1)] {
            let sub: Vec<f64> = (0..rn)
                .flat_map(|i| (0..cn).map(move |j| (i, j)))
                .map(|(i, j)| gd[(r0 + i) * 5 + c0 + j])
                .collect();
            let u = shampoo_one_step(&sub, &[rn, cn], eps);
            for i in 0..rn {
                for j in 0..cn {
                    want[(r0 + i) * 5 + c0 + j] = u[i * cn + j];
                }
            }
        }
    }
    assert!(rel_err(&got, &want) < 1e-5, "{:.2e}", rel_err(&got, &want));

    // A 2 x 3 x 2 x 2 tensor read as a tensor with merging at 6: axes 2*3 and 2*2 merge.
    let g = gaussian(&[2, 3, 2, 2], &mut rng);
    let mut p = store(&[("w", &[2, 3, 2, 2])]);
    let cfg = plain(AdaptiveConfig::shampoo())
        .with_epsilon(Ridge::Absolute(eps))
        .with_blocking(
            BlockingConfig::DEFAULT
                .with_layout(TensorLayout::Tensor)
                .with_max_dim(6),
        );
    let mut opt = Shampoo::new(&p, cfg).unwrap();
    assert_eq!(opt.layout("w").unwrap().0, vec![6, 4]);
    let got = first_direction(&mut opt, &mut p, &g);
    let want = shampoo_one_step(&f64s(&g), &[6, 4], eps);
    assert!(rel_err(&got, &want) < 1e-5);
}

#[test]
fn grafting_takes_the_norm_of_the_grafted_step_and_biases_take_it_alone() {
    let mut rng = Rng::new(11);
    let gw = gaussian(&[4, 3], &mut rng);
    let gb = gaussian(&[4], &mut rng);
    let eps = 1e-2;
    let dir = shampoo_one_step(&f64s(&gw), &[4, 3], eps);
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    for graft in [
        Graft::Sgd,
        Graft::Adam {
            beta1: 0.0,
            beta2: 0.999,
            eps: 1e-8,
        },
    ] {
        let mut p = store(&[("w", &[4, 3]), ("b", &[4])]);
        let cfg = plain(AdaptiveConfig::shampoo())
            .with_epsilon(Ridge::Absolute(eps))
            .with_graft(Some(graft));
        let mut opt = Shampoo::new(&p, cfg).unwrap();
        opt.step(
            &mut p,
            &grads(vec![gw.clone(), gb.clone()]),
            &Captures::new(),
        )
        .unwrap();
        let uw: Vec<f64> = p
            .get(ParamId(0))
            .data()
            .iter()
            .map(|&x| -(x as f64))
            .collect();
        let ub: Vec<f64> = p
            .get(ParamId(1))
            .data()
            .iter()
            .map(|&x| -(x as f64))
            .collect();
        // The grafted method's first step: the gradient (SGD), or its sign (Adam from zero
        // moments with beta1 = 0: g / (|g| + eps) after bias correction).
        let step = |g: &Tensor| -> Vec<f64> {
            match graft {
                Graft::Sgd => f64s(g),
                _ => g
                    .data()
                    .iter()
                    .map(|&x| x as f64 / ((x as f64).abs() + 1e-8))
                    .collect(),
            }
        };
        let want_norm = norm(&step(&gw));
        assert!(
            (norm(&uw) - want_norm).abs() < 1e-5 * want_norm,
            "{graft:?}"
        );
        let scale = want_norm / norm(&dir);
        let want: Vec<f64> = dir.iter().map(|x| x * scale).collect();
        assert!(rel_err(&uw, &want) < 1e-5, "{graft:?} direction");
        assert!(rel_err(&ub, &step(&gb)) < 1e-5, "{graft:?} bias");
    }
}

#[test]
fn before_the_start_step_the_grafted_rule_runs_alone() {
    let mut rng = Rng::new(13);
    let g = gaussian(&[3, 3], &mut rng);
    let mut p = store(&[("w", &[3, 3])]);
    let cfg = plain(AdaptiveConfig::shampoo())
        .with_graft(Some(Graft::Sgd))
        .with_start_step(3);
    let mut opt = Shampoo::new(&p, cfg).unwrap();
    let u = first_direction(&mut opt, &mut p, &g);
    assert!(rel_err(&u, &f64s(&g)) < 1e-7, "step 1 is SGD");
}

#[test]
fn coupled_newton_and_f32_roots_agree_with_f64_eigh() {
    let mut rng = Rng::new(17);
    let gs: Vec<Tensor> = (0..5).map(|_| gaussian(&[6, 9], &mut rng)).collect();
    let run = |roots: RootMethod, precision: Precision| -> Vec<f32> {
        let mut p = store(&[("w", &[6, 9])]);
        let cfg = plain(AdaptiveConfig::shampoo())
            .with_epsilon(Ridge::Relative(1e-4))
            .with_precision(precision)
            .with_roots(roots);
        let mut opt = Shampoo::new(&p, cfg).unwrap();
        for g in &gs {
            opt.step(&mut p, &grads(vec![g.clone()]), &Captures::new())
                .unwrap();
        }
        p.get(ParamId(0)).data().to_vec()
    };
    let reference: Vec<f64> = run(RootMethod::EIGH_F64, Precision::F64)
        .iter()
        .map(|&x| x as f64)
        .collect();
    for (roots, precision, tol) in [
        (RootMethod::EIGH_F32_PLAIN, Precision::F32, 1e-4),
        (RootMethod::EIGH_F64, Precision::F32, 1e-5),
        (
            RootMethod::CoupledNewton(Default::default()),
            Precision::F32,
            2e-3,
        ),
        (
            RootMethod::CoupledNewton(Default::default()),
            Precision::F64,
            2e-3,
        ),
    ] {
        let got: Vec<f64> = run(roots, precision).iter().map(|&x| x as f64).collect();
        let e = rel_err(&got, &reference);
        assert!(e < tol, "{} {precision:?}: {e:.2e}", roots.name());
    }
}

// ---------------------------------------------------------------------------------------------
// KrADagrad*.

#[test]
fn kradagrad_star_on_rank_one_statistics_is_exact_sherman_morrison() {
    let mut rng = Rng::new(19);
    let (m, n) = (5, 4);
    let eps = 0.5;
    for (precision, tol) in [(Precision::F64, 1e-10), (Precision::F32, 1e-4)] {
        let mut p = store(&[("w", &[m, n])]);
        let cfg = plain(AdaptiveConfig::kradagrad_star())
            .with_epsilon(Ridge::Absolute(eps))
            .with_precision(precision);
        let mut opt = KrAdagradStar::new(&p, cfg).unwrap();
        let mut l = eye(m, eps);
        let mut r = eye(n, eps);
        for _ in 0..6 {
            // G = u v^T: both contractions are rank 1.
            let u: Vec<f64> = (0..m).map(|_| rng.normal() as f64).collect();
            let v: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
            let g: Vec<f32> = (0..m * n).map(|k| (u[k / n] * v[k % n]) as f32).collect();
            let gd: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            l = add(&l, &mm(&gd, &transpose(&gd, m, n), m, n, m), 1.0);
            r = add(&r, &mm(&transpose(&gd, m, n), &gd, n, m, n), 1.0);
            opt.step(
                &mut p,
                &grads(vec![Tensor::from_vec(g, &[m, n])]),
                &Captures::new(),
            )
            .unwrap();
        }
        let stats = opt.statistics("w", 0).unwrap();
        for (s, truth, d) in [(&stats[0], inv(&l, m), m), (&stats[1], inv(&r, n), n)] {
            let e = rel_err(&exact(s), &truth);
            assert!(e < tol, "{precision:?} axis of size {d}: {e:.2e}");
        }
    }
}

#[test]
fn kradagrad_star_dominates_the_true_inverse() {
    let mut rng = Rng::new(23);
    let (m, n) = (6, 5);
    let eps = 0.1;
    let mut p = store(&[("w", &[m, n])]);
    let cfg = plain(AdaptiveConfig::kradagrad_star())
        .with_epsilon(Ridge::Absolute(eps))
        .with_precision(Precision::F64);
    let mut opt = KrAdagradStar::new(&p, cfg).unwrap();
    let mut l = eye(m, eps);
    let mut r = eye(n, eps);
    for step in 0..40 {
        let g = gaussian(&[m, n], &mut rng);
        let gd = f64s(&g);
        l = add(&l, &mm(&gd, &transpose(&gd, m, n), m, n, m), 1.0);
        r = add(&r, &mm(&transpose(&gd, m, n), &gd, n, m, n), 1.0);
        opt.step(&mut p, &grads(vec![g]), &Captures::new()).unwrap();
        let stats = opt.statistics("w", 0).unwrap();
        for (s, truth, d) in [(&stats[0], inv(&l, m), m), (&stats[1], inv(&r, n), n)] {
            let diff = add(&exact(s), &truth, -1.0);
            let (e, _) = jacobi(&diff, d);
            let lo = e.iter().copied().fold(f64::INFINITY, f64::min);
            let scale = truth.iter().map(|x| x.abs()).fold(0.0, f64::max);
            assert!(
                lo > -1e-9 * scale,
                "step {step}: P - L^-1 has eigenvalue {lo:.3e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// KrADagrad.

#[test]
fn kradagrad_axis_schedule_follows_the_authors_rule() {
    // KradagradMM.step: round robin for the first k^2 updates, then axis e at floor(sqrt(t))^2
    // + e (e < k), the largest axis otherwise; written out for dims [3, 5].
    let want = [
        0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1,
    ];
    let got: Vec<usize> = (0..want.len() as u64)
        .map(|t| kradagrad_axis(&[3, 5], t))
        .collect();
    assert_eq!(got, want);
    // Three axes, the largest in the middle.
    let want3 = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 1, 1, 1, 0, 1, 2, 1];
    let got3: Vec<usize> = (0..want3.len() as u64)
        .map(|t| kradagrad_axis(&[2, 7, 3], t))
        .collect();
    assert_eq!(got3, want3);
}

#[test]
fn kradagrad_matches_a_dense_f64_replay_of_its_rule() {
    let mut rng = Rng::new(29);
    let (m, n) = (5, 4);
    let dims = [m, n];
    let eps = 1e-3;
    let lr = 0.1;
    let mut p = store(&[("w", &[m, n])]);
    let cfg = plain(AdaptiveConfig::kradagrad())
        .with_lr(lr)
        .with_epsilon(Ridge::Absolute(eps))
        .with_precision(Precision::F64)
        .with_roots(RootMethod::EIGH_F64);
    let mut opt = KrAdagrad::new(&p, cfg).unwrap();
    // The replay: P_i, their roots (None until first refreshed), the parameter.
    let mut ps = [eye(m, 1.0), eye(n, 1.0)];
    let mut roots: [Option<Vec<f64>>; 2] = [None, None];
    let mut w = vec![0.0f64; m * n];
    for t in 0..12u64 {
        let g = gaussian(&[m, n], &mut rng);
        let gd = f64s(&g);
        let i = kradagrad_axis(&dims, t);
        // H: the gradient preconditioned along the other axis.
        let h = match (i, &roots) {
            (0, [_, Some(r1)]) => mm(&gd, r1, m, n, n),
            (1, [Some(r0), _]) => mm(r0, &gd, m, m, n),
            _ => gd.clone(),
        };
        let d = dims[i];
        let rest = m * n / d;
        let hu = if i == 0 {
            h.clone()
        } else {
            transpose(&h, m, n)
        };
        let c = mm(&hu, &transpose(&hu, d, rest), d, rest, d);
        let pp = mm(&ps[i], &ps[i], d, d, d);
        let pprime = add(&ps[i], &pp, -eps);
        let lmat = mm(&pprime, &c, d, d, d);
        let tau = 1.0 + lmat.iter().map(|x| x * x).sum::<f64>().sqrt();
        let dmat = mm(&lmat, &transpose(&pprime, d, d), d, d, d);
        let mut newp = add(&pprime, &dmat, -1.0 / tau);
        let sym = transpose(&newp, d, d);
        newp = newp.iter().zip(&sym).map(|(a, b)| 0.5 * (a + b)).collect();
        ps[i] = newp;
        roots[i] = Some(sym_pow(&ps[i], d, 0.5, 0.0));
        let mut u = gd.clone();
        if let Some(r0) = &roots[0] {
            u = mm(r0, &u, m, m, n);
        }
        if let Some(r1) = &roots[1] {
            u = mm(&u, r1, m, n, n);
        }
        // Nesterov momentum is off in `plain`: w -= lr u.
        for (x, du) in w.iter_mut().zip(&u) {
            *x -= lr as f64 * du;
        }
        opt.step(&mut p, &grads(vec![g]), &Captures::new()).unwrap();
        let stats = opt.statistics("w", 0).unwrap();
        for a in 0..2 {
            let e = rel_err(&exact(&stats[a]), &ps[a]);
            assert!(e < 1e-9, "step {t} axis {a}: {e:.2e}");
        }
        let got: Vec<f64> = f64s(p.get(ParamId(0)));
        let e = rel_err(&got, &w);
        assert!(e < 1e-5, "step {t} parameters: {e:.2e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Failures, refusals, resume.

/// A CPU backend whose symmetric matrix powers fail while `fail` is above 0 (each failure
/// counts it down).
#[derive(Debug)]
struct FailingRoots {
    inner: CpuBackend,
    fail: AtomicUsize,
}

impl Backend for FailingRoots {
    fn name(&self) -> String {
        "failing roots".into()
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
    fn zeros(&self, rows: usize, cols: usize) -> Mat {
        self.inner.zeros(rows, cols)
    }
    fn gemm(&self, alpha: f32, a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat {
        self.inner.gemm(alpha, a, ta, b, tb)
    }
    fn factor_ema(&self, acc: &mut Mat, x: &Mat, homogeneous: bool, scale: f32, decay: f32) {
        self.inner.factor_ema(acc, x, homogeneous, scale, decay)
    }
    fn add_diag(&self, m: &mut Mat, v: f64) {
        self.inner.add_diag(m, v)
    }
    fn scale(&self, m: &mut Mat, s: f64) {
        self.inner.scale(m, s)
    }
    fn axpby(&self, alpha: f64, x: &Mat, beta: f64, y: &mut Mat) {
        self.inner.axpby(alpha, x, beta, y)
    }
    fn div_outer(&self, m: &mut Mat, left: &[f64], right: &[f64], add: f64) {
        self.inner.div_outer(m, left, right, add)
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
        self.inner.spd_inverse(m, damping)
    }
    fn eigh(&self, m: &Mat) -> Result<Eigh, LinalgError> {
        self.inner.eigh(m)
    }
    fn inv_root(&self, m: &Mat, p: u32, damping: f32) -> Result<Mat, LinalgError> {
        self.inner.inv_root(m, p, damping)
    }
    fn gemm_acc(&self, beta: f64, c: &mut Mat, alpha: f64, a: &Mat, ta: bool, b: &Mat, tb: bool) {
        self.inner.gemm_acc(beta, c, alpha, a, ta, b, tb)
    }
    fn symmetrize(&self, m: &mut Mat) {
        self.inner.symmetrize(m)
    }
    fn sym_power(
        &self,
        m: &Mat,
        p: f64,
        ridge: Ridge,
        precision: Precision,
    ) -> Result<Mat, LinalgError> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(LinalgError::NoConvergence);
        }
        self.inner.sym_power(m, p, ridge, precision)
    }
}

#[test]
fn a_failed_root_falls_back_then_retries_at_a_larger_epsilon_and_recovers() {
    let mut rng = Rng::new(31);
    let be = Arc::new(FailingRoots {
        inner: CpuBackend::new(Precision::F32),
        // Both axes fail at the first refresh.
        fail: AtomicUsize::new(2),
    });
    let mut p = store(&[("w", &[4, 3])]);
    let cfg = plain(AdaptiveConfig::shampoo())
        .with_epsilon(Ridge::Absolute(1e-3))
        .with_graft(Some(Graft::Sgd));
    let mut opt = Shampoo::with_backend(&p, cfg, Box::new(be.clone())).unwrap();
    let g = gaussian(&[4, 3], &mut rng);
    let r1 = opt
        .step(&mut p, &grads(vec![g.clone()]), &Captures::new())
        .unwrap();
    let failed: Vec<&Note> = r1
        .notes
        .iter()
        .filter(|n| matches!(n, Note::RefreshFailed { .. }))
        .collect();
    assert_eq!(failed.len(), 2, "{:?}", r1.notes);
    match failed[0] {
        Note::RefreshFailed {
            damping,
            retry_damping,
            kept,
            ..
        } => {
            assert_eq!(*damping, 1e-3);
            assert!((retry_damping / damping - 10.0).abs() < 1e-9);
            assert_eq!(*kept, kron_optim::curvature::Kept::Fallback);
        }
        _ => unreachable!(),
    }
    // The fallback (the SGD graft alone) moved the parameters by the gradient.
    let u: Vec<f64> = p
        .get(ParamId(0))
        .data()
        .iter()
        .map(|&x| -(x as f64))
        .collect();
    assert!(rel_err(&u, &f64s(&g)) < 1e-7);
    let r2 = opt.step(&mut p, &grads(vec![g]), &Captures::new()).unwrap();
    let recovered = r2
        .notes
        .iter()
        .filter(|n| matches!(n, Note::RefreshRecovered { damping, .. } if (*damping - 1e-2).abs() < 1e-12))
        .count();
    assert_eq!(recovered, 2, "{:?}", r2.notes);
    assert!(opt.roots("w", 0).is_some());
}

#[test]
fn a_nan_gradient_and_a_nan_learning_rate_change_nothing() {
    let mut rng = Rng::new(37);
    let mut p = store(&[("w", &[3, 4]), ("b", &[3])]);
    let cfg = plain(AdaptiveConfig::shampoo()).with_graft(Some(Graft::Sgd));
    let mut opt = Shampoo::new(&p, cfg).unwrap();
    let g = || {
        grads(vec![
            gaussian(&[3, 4], &mut Rng::new(1)),
            Tensor::ones(&[3]),
        ])
    };
    opt.step(&mut p, &g(), &Captures::new()).unwrap();
    let before = (p.clone(), opt.state());
    let mut bad = gaussian(&[3, 4], &mut rng);
    bad.data_mut()[5] = f32::NAN;
    let e = opt
        .step(
            &mut p,
            &grads(vec![bad, Tensor::ones(&[3])]),
            &Captures::new(),
        )
        .unwrap_err();
    assert!(matches!(e, OptimError::NonFiniteGradient { .. }), "{e}");
    assert_eq!(p.get(ParamId(0)).data(), before.0.get(ParamId(0)).data());
    assert_eq!(opt.state(), before.1);
    assert!(matches!(
        opt.set_learning_rate(f32::NAN),
        Err(OptimError::Config { .. })
    ));
    assert!(matches!(
        Shampoo::new(&p, AdaptiveConfig::shampoo().with_refresh_period(0)),
        Err(OptimError::Config { field, .. }) if field == "refresh.period"
    ));
    assert!(matches!(
        KrAdagradStar::new(&p, AdaptiveConfig::kradagrad_star().with_epsilon(Ridge::Absolute(0.0))),
        Err(OptimError::Config { field, .. }) if field == "epsilon"
    ));
    assert!(matches!(
        Shampoo::new(
            &p,
            AdaptiveConfig::shampoo()
                .with_exponent(Some(0.3))
                .with_roots(RootMethod::CoupledNewton(Default::default()))
        ),
        Err(OptimError::Config { field, .. }) if field == "roots"
    ));
}

/// Runs `n` steps of `opt` on fixed gradients from `seed`.
fn run_steps(opt: &mut dyn Optimizer, p: &mut ParamStore, seed: u64, n: usize) {
    let mut rng = Rng::new(seed);
    for _ in 0..n {
        let gs = vec![
            gaussian(&[6, 5], &mut rng),
            gaussian(&[3, 2, 2], &mut rng),
            gaussian(&[6], &mut rng),
        ];
        opt.step(p, &grads(gs), &Captures::new()).unwrap();
    }
}

#[test]
fn all_three_resume_to_the_bit_in_both_precisions() {
    let shapes: &[(&str, &[usize])] = &[("w", &[6, 5]), ("conv", &[3, 2, 2]), ("b", &[6])];
    let blocking = BlockingConfig::DEFAULT.with_max_dim(4);
    type Make = fn(&ParamStore, AdaptiveConfig) -> Box<dyn Optimizer>;
    let methods: [(AdaptiveConfig, Make); 3] = [
        (
            AdaptiveConfig::shampoo()
                .with_refresh_period(2)
                .with_start_step(2),
            |p, c| Box::new(Shampoo::new(p, c).unwrap()),
        ),
        (
            AdaptiveConfig::kradagrad_star().with_epsilon(Ridge::Absolute(1e-2)),
            |p, c| Box::new(KrAdagradStar::new(p, c).unwrap()),
        ),
        (
            AdaptiveConfig::kradagrad().with_epsilon(Ridge::Absolute(1e-3)),
            |p, c| Box::new(KrAdagrad::new(p, c).unwrap()),
        ),
    ];
    for (base, make) in methods {
        for precision in [Precision::F32, Precision::F64] {
            let cfg = base
                .with_precision(precision)
                .with_blocking(blocking)
                .with_lr(0.01);
            let mut p = store(shapes);
            let mut a = make(&p, cfg);
            run_steps(a.as_mut(), &mut p, 41, 5);
            let saved = (p.clone(), a.state());
            run_steps(a.as_mut(), &mut p, 43, 4);
            let mut q = saved.0;
            let mut b = make(&q, cfg);
            b.load_state(saved.1.clone()).unwrap();
            run_steps(b.as_mut(), &mut q, 43, 4);
            for id in p.ids() {
                assert_eq!(
                    p.get(id).data(),
                    q.get(id).data(),
                    "{} {precision:?}: {}",
                    a.name(),
                    p.name(id)
                );
            }
            if precision == Precision::F64 {
                assert!(
                    !saved.1.tensors64.is_empty(),
                    "f64 statistics are kept as f64"
                );
            }
            // Another method's state is refused.
            let other: Box<dyn Optimizer> = Box::new(
                Shampoo::new(
                    &q,
                    AdaptiveConfig::shampoo()
                        .with_precision(precision)
                        .with_blocking(blocking),
                )
                .unwrap(),
            );
            if a.name() != "shampoo" {
                let mut other = other;
                assert!(other.load_state(saved.1).is_err());
            }
        }
    }
}

#[test]
fn a_statistic_that_overflows_is_kept_as_it_was_and_reported() {
    let mut rng = Rng::new(47);
    let mut p = store(&[("w", &[3, 4])]);
    let cfg = plain(AdaptiveConfig::shampoo()).with_graft(Some(Graft::Sgd));
    let mut opt = Shampoo::new(&p, cfg).unwrap();
    opt.step(
        &mut p,
        &grads(vec![gaussian(&[3, 4], &mut rng)]),
        &Captures::new(),
    )
    .unwrap();
    let before = opt.statistics("w", 0).unwrap();
    // Finite, but its square overflows f32: G G^T is infinite.
    let huge = Tensor::full(&[3, 4], 1e30);
    let r = opt
        .step(&mut p, &grads(vec![huge]), &Captures::new())
        .unwrap();
    let skipped: Vec<&Note> = r
        .notes
        .iter()
        .filter(|n| {
            matches!(
                n,
                Note::StatsSkipped {
                    reason: kron_optim::curvature::StatsSkip::Overflow,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(skipped.len(), 2, "both axes: {:?}", r.notes);
    assert_eq!(
        opt.statistics("w", 0).unwrap(),
        before,
        "statistics unchanged"
    );
}
