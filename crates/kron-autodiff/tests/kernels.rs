//! The kernels under the ops at sizes the small gradient checks do not reach: the parallel
//! elementwise path, the blocked transpose, GEMM with every transpose and with `alpha`/`beta`.

mod common;

use common::*;
use kron_autodiff::{Tape, Tensor, broadcast_shape, gemm, sum_to_shape};

/// More elements than the threshold above which elementwise kernels split work with rayon.
const LARGE: [usize; 2] = [300, 150];

#[test]
fn large_elementwise_ops_match_the_scalar_formulas() {
    let x = randn(&LARGE, 1);
    let y = away_from_zero(&LARGE, 0.5, 2);
    let tape = Tape::without_params();
    let (xv, yv) = (tape.var(x.clone()), tape.var(y.clone()));
    let sum = xv.add(yv);
    let quot = xv.div(yv);
    let th = xv.tanh();
    let loss = sum.mul(quot).add(th).sum();
    for (what, got, f) in [
        ("add", sum.value(), (|a, b| a + b) as fn(f32, f32) -> f32),
        ("div", quot.value(), |a, b| a / b),
    ] {
        let want = Tensor::from_vec(
            x.data()
                .iter()
                .zip(y.data())
                .map(|(&a, &b)| f(a, b))
                .collect(),
            &LARGE,
        );
        assert_bits_eq(what, &got, &want);
    }
    assert_bits_eq("tanh", &th.value(), &x.map(f32::tanh));

    // d/dx [(x + y)(x / y) + tanh x] = x / y + (x + y) / y + 1 - tanh^2 x, and
    // d/dy = x / y - (x + y) x / y^2.
    let grads = tape.backward(loss);
    let gx = grads.wrt(xv).unwrap();
    let gy = grads.wrt(yv).unwrap();
    let n = x.numel();
    let (mut want_x, mut want_y) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (&a, &b) in x.data().iter().zip(y.data()) {
        let (a, b) = (a as f64, b as f64);
        want_x.push((a / b + (a + b) / b + 1.0 - a.tanh().powi(2)) as f32);
        want_y.push((a / b - (a + b) * a / (b * b)) as f32);
    }
    assert_close("d/dx", gx, &Tensor::from_vec(want_x, &LARGE), 1e-5, 1e-5);
    assert_close("d/dy", gy, &Tensor::from_vec(want_y, &LARGE), 1e-5, 1e-5);
}

#[test]
fn blocked_transpose_at_odd_sizes() {
    for (r, c) in [(1, 1), (1, 40), (33, 70), (65, 31)] {
        let x = randn(&[r, c], (r * 100 + c) as u64);
        let t = x.t();
        assert_eq!(t.shape(), &[c, r]);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(
                    t.data()[j * r + i],
                    x.data()[i * c + j],
                    "({i}, {j}) of {r}x{c}"
                );
            }
        }
        assert_eq!(t.t(), x);
    }
}

/// Reference `alpha op(a) op(b) + beta c` in `f64`.
#[allow(clippy::too_many_arguments)]
fn gemm_ref(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    beta: f32,
    c: &[f32],
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            out[i * n + j] = (alpha as f64 * s + beta as f64 * c[i * n + j] as f64) as f32;
        }
    }
    out
}

#[test]
fn gemm_with_transposes_alpha_and_beta_beyond_one_block() {
    // Sizes past matrixmultiply's register and cache blocks, none a multiple of them.
    let (m, k, n) = (70, 300, 90);
    let a = randn(&[m * k], 10);
    let b = randn(&[k * n], 11);
    let c0 = randn(&[m * n], 12);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
            let mut c = c0.data().to_vec();
            gemm(m, k, n, alpha, a.data(), ta, b.data(), tb, beta, &mut c);
            let want = gemm_ref(m, k, n, alpha, a.data(), ta, b.data(), tb, beta, c0.data());
            assert_close(
                &format!("gemm ta={ta} tb={tb} alpha={alpha} beta={beta}"),
                &Tensor::from_vec(c, &[m, n]),
                &Tensor::from_vec(want, &[m, n]),
                1e-4,
                1e-4,
            );
        }
    }
    // Degenerate sizes: k = 0 scales c by beta; m = 0 touches nothing.
    let mut c = vec![2.0f32; 6];
    gemm(2, 0, 3, 1.0, &[], false, &[], false, 0.5, &mut c);
    assert_eq!(c, vec![1.0; 6]);
    let mut c: Vec<f32> = vec![];
    gemm(0, 4, 3, 1.0, &[], false, &[0.0; 12], false, 0.0, &mut c);
}

#[test]
fn matmul_beyond_one_block_through_the_tape() {
    let a = randn(&[70, 130], 20);
    let b = randn(&[90, 130], 21);
    let tape = Tape::without_params();
    let (av, bv) = (tape.var(a.clone()), tape.var(b.clone()));
    let c = av.matmul_t(false, bv, true);
    let w = randn(&[70, 90], 22);
    let grads = tape.backward(c.mul(tape.input(w.clone())).sum());
    // d/da sum(w * a b^T) = w b, d/db = w^T a.
    let ga = gemm_ref(
        70,
        90,
        130,
        1.0,
        w.data(),
        false,
        b.data(),
        false,
        0.0,
        &[0.0; 70 * 130],
    );
    let gb = gemm_ref(
        90,
        70,
        130,
        1.0,
        w.data(),
        true,
        a.data(),
        false,
        0.0,
        &[0.0; 90 * 130],
    );
    let tol = 1e-4;
    assert_close(
        "da",
        grads.wrt(av).unwrap(),
        &Tensor::from_vec(ga, &[70, 130]),
        tol,
        tol,
    );
    assert_close(
        "db",
        grads.wrt(bv).unwrap(),
        &Tensor::from_vec(gb, &[90, 130]),
        tol,
        tol,
    );
}

#[test]
fn broadcast_helpers() {
    assert_eq!(broadcast_shape(&[], &[3]), Some(vec![3]));
    assert_eq!(broadcast_shape(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
    assert_eq!(broadcast_shape(&[2, 3], &[3, 2]), None);
    let t = Tensor::from_vec((1..=24).map(|v| v as f32).collect(), &[2, 3, 4]);
    // Summing to [3, 1] adds over axes 0 and 2.
    let s = sum_to_shape(&t, &[3, 1]);
    let mut want = [0.0f32; 3];
    for (i, v) in t.data().iter().enumerate() {
        want[(i / 4) % 3] += v;
    }
    assert_eq!(s.data(), &want);
    assert_eq!(sum_to_shape(&t, &[1, 1, 1]).data(), &[300.0]);
    assert_eq!(sum_to_shape(&t, &[2, 3, 4]), t);
}
