//! Finite-difference checks of every op's reverse rule, and reference checks of the forward
//! values the rules differentiate.

mod common;

use common::*;
use kron_autodiff::testing::{GradCheck, check_gradients, check_param_gradients};
use kron_autodiff::{LossKind, ParamId, ParamStore, Rng, Tape, Targets, Tensor, Unary, Var};

/// Runs the gradient check of `f` at `inputs` and asserts every element was compared.
#[track_caller]
fn check<F>(what: &str, inputs: &[Tensor], cfg: GradCheck, f: F)
where
    F: for<'t> Fn(&[Var<'t>]) -> Var<'t>,
{
    let n: usize = inputs.iter().map(Tensor::numel).sum();
    match check_gradients(f, inputs, &cfg) {
        Ok(r) => assert_eq!(
            r.checked, n,
            "{what}: compared {} of {n} elements",
            r.checked
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}

fn cfg() -> GradCheck {
    GradCheck::default()
}

/// The value of `f` at `inputs` (constants on a fresh tape).
fn eval<F>(inputs: &[Tensor], f: F) -> Tensor
where
    F: for<'t> Fn(&[Var<'t>]) -> Var<'t>,
{
    let tape = Tape::without_params();
    let vars: Vec<Var<'_>> = inputs.iter().map(|x| tape.input(x.clone())).collect();
    f(&vars).value()
}

// ---------------------------------------------------------------------------------------------
// The checker itself.

#[test]
fn checker_rejects_a_wrong_gradient() {
    // x * stop_gradient(x): the tape sees the second factor as a constant, so its gradient is x
    // where the true derivative is 2x. A checker that passes this is not checking anything.
    let x = randn(&[2, 3], 1);
    let err = check_gradients(|v| v[0].mul(v[0].tape().input(v[0].value())), &[x], &cfg())
        .expect_err("the checker must catch a gradient that is off by a factor of two");
    assert!(err.contains("input 0"), "{err}");

    let mut store = ParamStore::new();
    store.add("w", randn(&[3], 2));
    let err = check_param_gradients(
        &store,
        |t| {
            let w = t.param(store.find("w").unwrap());
            w.mul(t.input(w.value()))
        },
        &cfg(),
    )
    .expect_err("the parameter checker must catch a wrong gradient too");
    assert!(err.contains('w'), "{err}");
}

#[test]
fn checker_passes_on_a_composite_and_counts_elements() {
    let x = randn(&[3, 4], 3);
    let r = check_gradients(
        |v| {
            // y is read three times: gradients from several consumers must accumulate.
            let y = v[0].add_scalar(1.0);
            y.add(y).mul(y).tanh()
        },
        std::slice::from_ref(&x),
        &cfg(),
    )
    .unwrap();
    assert_eq!(r.checked, 12);
    assert!(r.max_abs_err < 1e-2, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Elementwise arithmetic and broadcasting.

/// Reference broadcast of `f` over two tensors (NumPy rules), index by index.
fn broadcast_ref(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Tensor {
    let r = a.rank().max(b.rank());
    let pad = |s: &[usize]| {
        let mut p = vec![1; r - s.len()];
        p.extend_from_slice(s);
        p
    };
    let (sa, sb) = (pad(a.shape()), pad(b.shape()));
    let out: Vec<usize> = (0..r).map(|i| sa[i].max(sb[i])).collect();
    let n: usize = out.iter().product();
    let flat = |s: &[usize], idx: &[usize]| {
        let mut k = 0;
        for d in 0..r {
            k = k * s[d] + if s[d] == 1 { 0 } else { idx[d] };
        }
        k
    };
    let mut data = Vec::with_capacity(n);
    let mut idx = vec![0; r];
    for _ in 0..n {
        data.push(f(a.data()[flat(&sa, &idx)], b.data()[flat(&sb, &idx)]));
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < out[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::from_vec(data, &out)
}

/// Shape pairs that broadcast: bias-style, reversed, outer-product style, scalar-shaped in
/// every form, and rank 3 with ones in the middle.
const BROADCAST_PAIRS: &[(&[usize], &[usize])] = &[
    (&[3, 4], &[3, 4]),
    (&[3, 4], &[4]),
    (&[4], &[3, 4]),
    (&[3, 1], &[1, 4]),
    (&[3, 4], &[3, 1]),
    (&[3, 4], &[]),
    (&[], &[3, 4]),
    (&[3, 4], &[1]),
    (&[1, 1], &[3, 4]),
    (&[2, 1, 3], &[4, 1]),
    (&[2, 3, 4], &[3, 1]),
];

#[test]
fn add_sub_mul_div_with_broadcasting() {
    for (k, &(sa, sb)) in BROADCAST_PAIRS.iter().enumerate() {
        let a = randn(sa, 10 + k as u64);
        let b = randn(sb, 100 + k as u64);
        let d = away_from_zero(sb, 0.5, 200 + k as u64);
        let tag = |op: &str| format!("{op} {sa:?} with {sb:?}");
        let inputs = [a.clone(), b.clone()];
        let divs = [a.clone(), d.clone()];
        check(&tag("add"), &inputs, cfg(), |v| v[0].add(v[1]));
        check(&tag("sub"), &inputs, cfg(), |v| v[0].sub(v[1]));
        check(&tag("mul"), &inputs, cfg(), |v| v[0].mul(v[1]));
        check(&tag("div"), &divs, cfg(), |v| v[0].div(v[1]));

        let pairs: [(&str, Tensor, Tensor); 4] = [
            (
                "add",
                eval(&inputs, |v| v[0] + v[1]),
                broadcast_ref(&a, &b, |x, y| x + y),
            ),
            (
                "sub",
                eval(&inputs, |v| v[0] - v[1]),
                broadcast_ref(&a, &b, |x, y| x - y),
            ),
            (
                "mul",
                eval(&inputs, |v| v[0] * v[1]),
                broadcast_ref(&a, &b, |x, y| x * y),
            ),
            (
                "div",
                eval(&divs, |v| v[0] / v[1]),
                broadcast_ref(&a, &d, |x, y| x / y),
            ),
        ];
        for (op, got, want) in pairs {
            assert_bits_eq(&tag(op), &got, &want);
        }
    }
}

#[test]
fn scale_add_scalar_and_neg() {
    let x = randn(&[3, 4], 20);
    check("scale", std::slice::from_ref(&x), cfg(), |v| {
        v[0].scale(-2.5)
    });
    check("scale operator", std::slice::from_ref(&x), cfg(), |v| {
        v[0] * 0.5
    });
    check("add_scalar", std::slice::from_ref(&x), cfg(), |v| {
        v[0].add_scalar(3.0).square()
    });
    check(
        "add_scalar operator",
        std::slice::from_ref(&x),
        cfg(),
        |v| (v[0] + 1.5).tanh(),
    );
    check("neg", std::slice::from_ref(&x), cfg(), |v| (-v[0]).exp());
    let y = eval(std::slice::from_ref(&x), |v| -(v[0].scale(2.0) + 1.0));
    assert_bits_eq("-(2x + 1)", &y, &x.map(|a| -(2.0 * a + 1.0)));
}

// ---------------------------------------------------------------------------------------------
// Matrix products and shape ops.

/// Reference `op(a) op(b)` with explicit transposes, in `f64`.
fn matmul_ref(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Tensor {
    let a = if ta { a.t() } else { a.clone() };
    let b = if tb { b.t() } else { b.clone() };
    let ((m, k), (_, n)) = (a.dims2(), b.dims2());
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| a.data()[i * k + p] as f64 * b.data()[p * n + j] as f64)
                .sum();
            out[i * n + j] = s as f32;
        }
    }
    Tensor::from_vec(out, &[m, n])
}

#[test]
fn matmul_all_four_transposes() {
    // op(a) is 3 x 4 and op(b) is 4 x 5 in every combination.
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let sa: &[usize] = if ta { &[4, 3] } else { &[3, 4] };
        let sb: &[usize] = if tb { &[5, 4] } else { &[4, 5] };
        let a = randn(sa, 30);
        let b = randn(sb, 31);
        let what = format!("matmul ta={ta} tb={tb}");
        check(&what, &[a.clone(), b.clone()], cfg(), move |v| {
            v[0].matmul_t(ta, v[1], tb)
        });
        let got = eval(&[a.clone(), b.clone()], move |v| {
            v[0].matmul_t(ta, v[1], tb)
        });
        assert_close(&what, &got, &matmul_ref(&a, ta, &b, tb), 1e-5, 1e-5);
    }
    // The same matrix on both sides: a^T a, whose gradient gets two contributions.
    let a = randn(&[4, 3], 32);
    check("a^T a", &[a], cfg(), |v| v[0].matmul_t(true, v[0], false));
}

#[test]
fn transpose_reshape_flatten() {
    let x = randn(&[3, 5], 40);
    check("t", std::slice::from_ref(&x), cfg(), |v| v[0].t().tanh());
    let got = eval(std::slice::from_ref(&x), |v| v[0].t());
    assert_eq!(got.shape(), &[5, 3]);
    for i in 0..3 {
        for j in 0..5 {
            assert_eq!(got.data()[j * 3 + i], x.data()[i * 5 + j]);
        }
    }

    let x = randn(&[2, 3, 4], 41);
    check("reshape", std::slice::from_ref(&x), cfg(), |v| {
        v[0].reshape(&[4, 6]).sigmoid()
    });
    let x = randn(&[2, 3, 2, 2], 42);
    check("flatten", std::slice::from_ref(&x), cfg(), |v| {
        let f = v[0].flatten();
        assert_eq!(f.shape(), vec![2, 12]);
        f.matmul(v[0].tape().input(randn(&[12, 3], 43)))
    });
}

// ---------------------------------------------------------------------------------------------
// Reductions.

#[test]
fn sum_and_mean_of_everything() {
    let x = randn(&[2, 3, 4], 50);
    check("sum", std::slice::from_ref(&x), cfg(), |v| {
        v[0].square().sum()
    });
    check("mean", std::slice::from_ref(&x), cfg(), |v| {
        v[0].square().mean()
    });
    let s = eval(std::slice::from_ref(&x), |v| v[0].sum());
    let m = eval(std::slice::from_ref(&x), |v| v[0].mean());
    let want: f64 = x.data().iter().map(|&a| a as f64).sum();
    assert_eq!(s.shape(), &[] as &[usize]);
    assert!((s.item() as f64 - want).abs() < 1e-5);
    assert!((m.item() as f64 - want / 24.0).abs() < 1e-6);
}

#[test]
fn sum_axis_and_mean_axis_every_axis_and_keepdim() {
    let x = randn(&[2, 3, 4], 51);
    for axis in 0..3 {
        for keepdim in [false, true] {
            let what = format!("sum_axis({axis}, {keepdim})");
            check(&what, std::slice::from_ref(&x), cfg(), move |v| {
                v[0].sum_axis(axis, keepdim).tanh()
            });
            let what = format!("mean_axis({axis}, {keepdim})");
            check(&what, std::slice::from_ref(&x), cfg(), move |v| {
                v[0].mean_axis(axis, keepdim).tanh()
            });

            // Forward against index loops.
            let s = eval(std::slice::from_ref(&x), move |v| {
                v[0].sum_axis(axis, keepdim)
            });
            let m = eval(std::slice::from_ref(&x), move |v| {
                v[0].mean_axis(axis, keepdim)
            });
            let mut shape = x.shape().to_vec();
            if keepdim {
                shape[axis] = 1;
            } else {
                shape.remove(axis);
            }
            assert_eq!(s.shape(), shape.as_slice(), "{what}");
            assert_eq!(m.shape(), shape.as_slice(), "{what}");
            let dims = [2usize, 3, 4];
            let mut want = vec![0.0f64; s.numel()];
            for i in 0..2 {
                for j in 0..3 {
                    for k in 0..4 {
                        let mut idx = [i, j, k];
                        idx[axis] = 0;
                        // Flat index of the reduced position in the reduced row-major layout.
                        let mut flat = 0;
                        for d in 0..3 {
                            if d == axis {
                                continue;
                            }
                            flat = flat * dims[d] + idx[d];
                        }
                        want[flat] += x.data()[(i * 3 + j) * 4 + k] as f64;
                    }
                }
            }
            let want_s = Tensor::from_vec(want.iter().map(|&w| w as f32).collect(), &shape);
            let n = dims[axis] as f32;
            assert_close(&what, &s, &want_s, 1e-6, 1e-6);
            assert_close(&what, &m, &want_s.scale(1.0 / n), 1e-6, 1e-6);
        }
    }
}

#[test]
fn max_axis_every_axis_and_keepdim() {
    // Values 0.05 apart: the +-0.01 probe never changes which element is the maximum.
    let x = distinct(&[2, 3, 4], 0.05, 52);
    for axis in 0..3 {
        for keepdim in [false, true] {
            let what = format!("max_axis({axis}, {keepdim})");
            check(&what, std::slice::from_ref(&x), cfg(), move |v| {
                v[0].max_axis(axis, keepdim)
            });
            let m = eval(std::slice::from_ref(&x), move |v| {
                v[0].max_axis(axis, keepdim)
            });
            // Reference: the maximum of each line along `axis`.
            let want_sum = eval(std::slice::from_ref(&x), move |v| {
                v[0].sum_axis(axis, keepdim)
            });
            assert_eq!(m.shape(), want_sum.shape(), "{what}");
            let dims = [2usize, 3, 4];
            let mut want = vec![f32::NEG_INFINITY; m.numel()];
            for i in 0..2 {
                for j in 0..3 {
                    for k in 0..4 {
                        let idx = [i, j, k];
                        let mut flat = 0;
                        for d in 0..3 {
                            if d != axis {
                                flat = flat * dims[d] + idx[d];
                            }
                        }
                        want[flat] = want[flat].max(x.data()[(i * 3 + j) * 4 + k]);
                    }
                }
            }
            assert_eq!(m.data(), want.as_slice(), "{what}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pointwise functions, log-softmax, dropout.

#[test]
fn relu_and_leaky_relu() {
    // Away from the kink at zero by more than the probe step.
    let x = away_from_zero(&[4, 5], 0.1, 60);
    check("relu", std::slice::from_ref(&x), cfg(), |v| v[0].relu());
    check("leaky_relu", std::slice::from_ref(&x), cfg(), |v| {
        v[0].leaky_relu(0.1)
    });
    let r = eval(std::slice::from_ref(&x), |v| v[0].relu());
    let l = eval(std::slice::from_ref(&x), |v| v[0].leaky_relu(0.1));
    assert_bits_eq("relu", &r, &x.map(|a| a.max(0.0)));
    assert_bits_eq(
        "leaky_relu",
        &l,
        &x.map(|a| if a > 0.0 { a } else { 0.1 * a }),
    );
}

#[test]
fn smooth_activations() {
    let x = randn(&[4, 5], 61).scale(2.0);
    let one = std::slice::from_ref(&x);
    check("tanh", one, cfg(), |v| v[0].tanh());
    check("sigmoid", one, cfg(), |v| v[0].sigmoid());
    check("softplus", one, cfg(), |v| v[0].softplus());
    check("gelu", one, cfg(), |v| v[0].gelu());
    check("square", one, cfg(), |v| v[0].square());
    let e = uniform(&[4, 5], -2.0, 2.0, 62);
    check("exp", std::slice::from_ref(&e), cfg(), |v| v[0].exp());
    let p = uniform(&[4, 5], 0.5, 3.0, 63);
    check("ln", std::slice::from_ref(&p), cfg(), |v| v[0].ln());
    check("sqrt", std::slice::from_ref(&p), cfg(), |v| v[0].sqrt());

    // Values against f64 definitions.
    let close = |what: &str, got: Tensor, f: fn(f64) -> f64, x: &Tensor| {
        let want = x.map(|a| f(a as f64) as f32);
        assert_close(what, &got, &want, 2e-6, 2e-6);
    };
    close("tanh", eval(one, |v| v[0].tanh()), f64::tanh, &x);
    close(
        "sigmoid",
        eval(one, |v| v[0].sigmoid()),
        |a| 1.0 / (1.0 + (-a).exp()),
        &x,
    );
    close(
        "softplus",
        eval(one, |v| v[0].softplus()),
        |a| a.exp().ln_1p(),
        &x,
    );
    close(
        "gelu",
        eval(one, |v| v[0].gelu()),
        |a| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * a * (1.0 + (c * (a + 0.044715 * a * a * a)).tanh())
        },
        &x,
    );
    close("square", eval(one, |v| v[0].square()), |a| a * a, &x);
    let ep = std::slice::from_ref(&e);
    close("exp", eval(ep, |v| v[0].exp()), f64::exp, &e);
    let pp = std::slice::from_ref(&p);
    close("ln", eval(pp, |v| v[0].ln()), f64::ln, &p);
    close("sqrt", eval(pp, |v| v[0].sqrt()), f64::sqrt, &p);

    // Stability far out: no overflow, no NaN.
    let far = Tensor::from_vec(vec![-100.0, -30.0, 30.0, 100.0], &[4]);
    let sp = eval(std::slice::from_ref(&far), |v| v[0].softplus());
    let sg = eval(std::slice::from_ref(&far), |v| v[0].sigmoid());
    assert!(sp.all_finite() && sg.all_finite(), "{sp:?} {sg:?}");
    assert_eq!(sp.data()[3], 100.0);
    assert_eq!(sg.data()[3], 1.0);
    assert_eq!(sg.data()[0], (-100.0f64).exp() as f32);
}

#[test]
fn log_softmax_rows_and_rank_three() {
    let x = randn(&[3, 5], 70).scale(2.0);
    check("log_softmax 2-D", std::slice::from_ref(&x), cfg(), |v| {
        v[0].log_softmax()
    });
    let x3 = randn(&[2, 3, 4], 71);
    check("log_softmax 3-D", std::slice::from_ref(&x3), cfg(), |v| {
        v[0].log_softmax()
    });
    // Each row is x - log(sum exp x): probabilities sum to one, and large logits do not overflow.
    let big = x.add_scalar(1000.0);
    for (t, shift) in [(&x, 0.0f64), (&big, 1000.0)] {
        let y = eval(std::slice::from_ref(t), |v| v[0].log_softmax());
        for (r, row) in y.data().chunks(5).enumerate() {
            let xs = &x.data()[r * 5..(r + 1) * 5];
            let lse = xs.iter().map(|&a| (a as f64).exp()).sum::<f64>().ln();
            for (yv, &xv) in row.iter().zip(xs) {
                let want = xv as f64 - lse;
                assert!(
                    (*yv as f64 - want).abs() < 1e-4 + shift * 1e-7,
                    "row {r}: {yv} vs {want}"
                );
            }
        }
    }
}

#[test]
fn dropout_masks_are_fixed_per_tape_and_gradients_check() {
    let mask_of = |tape: &Tape<'_>| tape.input(Tensor::ones(&[8, 32])).dropout(0.5).value();
    let m1 = mask_of(&Tape::without_params());
    let m2 = mask_of(&Tape::without_params());
    // Fresh tapes start from Rng::new(0): the checker's probe tapes see the same mask.
    assert_eq!(m1, m2, "two fresh tapes drew different masks");
    assert_eq!(m1, mask_of(&Tape::without_params().with_rng(Rng::new(0))));
    assert_ne!(m1, mask_of(&Tape::without_params().with_rng(Rng::new(1))));
    assert!(m1.data().iter().all(|&v| v == 0.0 || v == 2.0), "{m1:?}");
    let dropped = m1.data().iter().filter(|&&v| v == 0.0).count();
    assert!(
        (80..=176).contains(&dropped),
        "{dropped} of 256 dropped at p = 0.5"
    );
    // The generator advances: a second dropout on the same tape draws another mask.
    let tape = Tape::without_params();
    let a = tape.input(Tensor::ones(&[8, 32])).dropout(0.5).value();
    let b = tape.input(Tensor::ones(&[8, 32])).dropout(0.5).value();
    assert_eq!(a, m1);
    assert_ne!(a, b);
    // Eval mode and p = 0 are the identity.
    let x = randn(&[8, 32], 80);
    let eval_tape = Tape::without_params().training(false);
    let y = eval_tape.input(x.clone()).dropout(0.5).value();
    assert!(y.shares_storage(&x));
    let t = Tape::without_params();
    assert!(t.input(x.clone()).dropout(0.0).value().shares_storage(&x));

    let x = randn(&[4, 6], 81);
    let w = randn(&[4, 6], 82);
    check("dropout", std::slice::from_ref(&x), cfg(), |v| {
        v[0].dropout(0.5)
    });
    check("two dropouts", &[x, w], cfg(), |v| {
        v[0].tanh().dropout(0.3).mul(v[1]).dropout(0.5)
    });
}

// ---------------------------------------------------------------------------------------------
// Dense and conv layers.

/// Reference `x W^T + b`.
fn linear_ref(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let s = matmul_ref(x, false, w, true);
    match b {
        Some(b) => broadcast_ref(&s, b, |a, c| a + c),
        None => s,
    }
}

#[test]
fn linear_with_and_without_bias() {
    let x = randn(&[4, 3], 90);
    let w = randn(&[5, 3], 91);
    let b = randn(&[5], 92);
    check(
        "linear + bias",
        &[x.clone(), w.clone(), b.clone()],
        cfg(),
        |v| v[0].linear(v[1], Some(v[2]), None),
    );
    check("linear", &[x.clone(), w.clone()], cfg(), |v| {
        v[0].linear(v[1], None, None).tanh()
    });
    let inputs = [x.clone(), w.clone(), b.clone()];
    let got = eval(&inputs, |v| v[0].linear(v[1], Some(v[2]), None));
    assert_close(
        "linear + bias",
        &got,
        &linear_ref(&x, &w, Some(&b)),
        1e-5,
        1e-5,
    );
    let got = eval(&inputs[..2], |v| v[0].linear(v[1], None, None));
    assert_close("linear", &got, &linear_ref(&x, &w, None), 1e-5, 1e-5);
}

/// One conv configuration: input shape, weight shape, stride, padding, bias.
struct ConvCase {
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
    bias: bool,
}

#[rustfmt::skip]
const CONV_CASES: &[ConvCase] = &[
    // kernel 3
    ConvCase { x: [2, 2, 5, 6], w: [3, 2, 3, 3], stride: 1, padding: 0, bias: true },
    ConvCase { x: [2, 2, 5, 6], w: [3, 2, 3, 3], stride: 1, padding: 1, bias: false },
    ConvCase { x: [2, 3, 7, 6], w: [2, 3, 3, 3], stride: 2, padding: 1, bias: true },
    ConvCase { x: [1, 2, 6, 4], w: [3, 2, 3, 3], stride: 2, padding: 0, bias: false },
    // kernel 5
    ConvCase { x: [1, 2, 6, 7], w: [2, 2, 5, 5], stride: 1, padding: 2, bias: true },
    ConvCase { x: [2, 2, 9, 8], w: [2, 2, 5, 5], stride: 2, padding: 2, bias: false },
    ConvCase { x: [1, 1, 7, 9], w: [3, 1, 5, 5], stride: 2, padding: 1, bias: true },
    // a non-square kernel and a 1x1 kernel
    ConvCase { x: [2, 2, 5, 4], w: [2, 2, 3, 2], stride: 1, padding: 1, bias: true },
    ConvCase { x: [2, 3, 3, 4], w: [2, 3, 1, 1], stride: 1, padding: 0, bias: true },
];

#[test]
fn conv2d_gradients_and_values() {
    for (k, c) in CONV_CASES.iter().enumerate() {
        let seed = 300 + 10 * k as u64;
        let x = randn(&c.x, seed);
        let w = randn(&c.w, seed + 1).scale(0.5);
        let b = randn(&[c.w[0]], seed + 2);
        let (s, p) = (c.stride, c.padding);
        let what = format!(
            "conv2d x{:?} w{:?} stride {s} padding {p} bias {}",
            c.x, c.w, c.bias
        );
        let got = if c.bias {
            check(&what, &[x.clone(), w.clone(), b.clone()], cfg(), move |v| {
                v[0].conv2d(v[1], Some(v[2]), s, p, None)
            });
            eval(&[x.clone(), w.clone(), b.clone()], move |v| {
                v[0].conv2d(v[1], Some(v[2]), s, p, None)
            })
        } else {
            check(&what, &[x.clone(), w.clone()], cfg(), move |v| {
                v[0].conv2d(v[1], None, s, p, None)
            });
            eval(&[x.clone(), w.clone()], move |v| {
                v[0].conv2d(v[1], None, s, p, None)
            })
        };
        let want = conv2d_ref(&x, &w, c.bias.then_some(&b), s, p);
        assert_close(&what, &got, &want, 1e-5, 1e-5);
    }
}

/// `conv2d_relu` is `conv2d` then `relu`, bit for bit: the value, every gradient, the capture
/// (the pre-activation's gradient) and the tangent. (Both halves are checked against finite
/// differences above; the fused op's kinks make its own check a matter of luck.)
#[test]
fn conv2d_relu_is_conv2d_then_relu_bit_for_bit() {
    for (k, c) in CONV_CASES.iter().enumerate() {
        let seed = 700 + 10 * k as u64;
        let mut store = ParamStore::new();
        let layer = store.add_layer("conv");
        let w = store.add("w", randn(&c.w, seed + 1).scale(0.5));
        let b = c.bias.then(|| store.add("b", randn(&[c.w[0]], seed + 2)));
        let x = randn(&c.x, seed);
        let mut dir = vec![Some(randn(&c.w, seed + 3))];
        dir.extend(b.map(|_| Some(randn(&[c.w[0]], seed + 4))));
        let (s, p) = (c.stride, c.padding);
        let run = |fused: bool| {
            let tape = Tape::new(&store).capturing([layer]);
            let (xv, wv) = (tape.var(x.clone()), tape.param(w));
            let bv = b.map(|b| tape.param(b));
            let y = if fused {
                xv.conv2d_relu(wv, bv, s, p, Some(layer))
            } else {
                xv.conv2d(wv, bv, s, p, Some(layer)).relu()
            };
            let r = randn(&y.shape(), seed + 5);
            let grads = tape.backward(y.mul(tape.input(r)).sum());
            let cap = grads.capture(layer).expect("a capture").clone();
            let mut out = vec![y.value(), grads.wrt(xv).unwrap().clone()];
            out.extend(store.ids().map(|id| grads.get(id).unwrap().clone()));
            out.extend([cap.a, cap.g, tape.jvp(y, &dir)]);
            out
        };
        let (fused, plain) = (run(true), run(false));
        // Some outputs are clipped and some are not, so the mask matters.
        let y = &fused[0];
        assert!(y.data().contains(&0.0) && y.data().iter().any(|&v| v > 0.0));
        let what = format!("conv2d_relu x{:?} w{:?} stride {s} padding {p}", c.x, c.w);
        assert_fused_bits_eq(&what, c.bias, &fused, &plain);
    }
}

/// A fused layer op against its unfused ops, output by output: the value, the input, weight
/// and (with `bias`) bias gradients, the captured `a` and `g`, and the tangent.
fn assert_fused_bits_eq(what: &str, bias: bool, fused: &[Tensor], plain: &[Tensor]) {
    let names = [
        "value",
        "x grad",
        "w grad",
        "b grad",
        "capture a",
        "capture g",
    ];
    let names = names.iter().filter(|n| bias || **n != "b grad");
    let names: Vec<&str> = names.copied().chain(["tangent"]).collect();
    assert_eq!(
        (fused.len(), plain.len()),
        (names.len(), names.len()),
        "{what}"
    );
    for ((name, f), u) in names.iter().zip(fused).zip(plain) {
        assert_bits_eq(&format!("{what}: {name}"), f, u);
    }
}

/// `linear_then` against `linear(..)` then the activation: value, input and parameter
/// gradients, captures and tangent, bit for bit, for each fusable activation and one that is
/// not fused, with and without a bias, small and large enough to split across threads.
#[test]
fn linear_then_is_linear_then_the_activation_bit_for_bit() {
    let acts = [Unary::Relu, Unary::Sigmoid, Unary::Tanh, Unary::Softplus];
    for (k, &(batch, inp, out)) in [(3, 5, 4), (300, 20, 130)].iter().enumerate() {
        for (j, &act) in acts.iter().enumerate() {
            for bias in [true, false] {
                let seed = 900 + 40 * k as u64 + 4 * j as u64;
                let mut store = ParamStore::new();
                let layer = store.add_layer("dense");
                let w = store.add("w", randn(&[out, inp], seed + 1));
                let b = bias.then(|| store.add("b", randn(&[out], seed + 2)));
                let x = randn(&[batch, inp], seed);
                let mut dir = vec![Some(randn(&[out, inp], seed + 3))];
                dir.extend(b.map(|_| Some(randn(&[out], seed + 4))));
                let run = |fused: bool| {
                    let tape = Tape::new(&store).capturing([layer]);
                    let (xv, wv) = (tape.var(x.clone()), tape.param(w));
                    let bv = b.map(|b| tape.param(b));
                    let y = if fused {
                        xv.linear_then(wv, bv, Some(layer), act)
                    } else {
                        xv.linear(wv, bv, Some(layer)).unary(act)
                    };
                    let nodes = tape.len();
                    let r = randn(&y.shape(), seed + 5);
                    let grads = tape.backward(y.mul(tape.input(r)).sum());
                    let cap = grads.capture(layer).expect("a capture").clone();
                    let mut out = vec![y.value(), grads.wrt(xv).unwrap().clone()];
                    out.extend(store.ids().map(|id| grads.get(id).unwrap().clone()));
                    out.extend([cap.a, cap.g, tape.jvp(y, &dir)]);
                    (nodes, out)
                };
                let ((fused_nodes, fused), (plain_nodes, plain)) = (run(true), run(false));
                let one_op = act.derivative_from_output();
                assert_eq!(fused_nodes + usize::from(one_op), plain_nodes, "{act:?}");
                if act == Unary::Relu {
                    // Some outputs are clipped and some are not, so the mask matters.
                    let y = &fused[0];
                    assert!(y.data().contains(&0.0) && y.data().iter().any(|&v| v > 0.0));
                }
                let what = format!("linear_then {act:?} {batch}x{inp}->{out} bias {bias}");
                assert_fused_bits_eq(&what, bias, &fused, &plain);
            }
        }
    }
}

/// Reference pooling: max over the window clipped to the image, or the window's sum over `k^2`.
fn pool_ref(x: &Tensor, k: usize, stride: usize, padding: usize, max: bool) -> Tensor {
    let (n, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let ho = (h + 2 * padding - k) / stride + 1;
    let wo = (w + 2 * padding - k) / stride + 1;
    let mut out = Vec::new();
    for plane in 0..n * c {
        for oh in 0..ho {
            for ow in 0..wo {
                let mut best = f32::NEG_INFINITY;
                let mut sum = 0.0f64;
                for i in 0..k {
                    for j in 0..k {
                        let ih = (oh * stride + i) as isize - padding as isize;
                        let iw = (ow * stride + j) as isize - padding as isize;
                        if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                            continue;
                        }
                        let v = x.data()[plane * h * w + ih as usize * w + iw as usize];
                        best = best.max(v);
                        sum += v as f64;
                    }
                }
                out.push(if max {
                    best
                } else {
                    (sum / (k * k) as f64) as f32
                });
            }
        }
    }
    Tensor::from_vec(out, &[n, c, ho, wo])
}

#[test]
fn max_pool2d_and_avg_pool2d() {
    // (k, stride, padding) on a non-square image with two channels.
    for (k, s, p) in [(2, 2, 0), (3, 2, 1), (2, 2, 1), (3, 1, 1), (3, 3, 0)] {
        let x = distinct(&[2, 2, 5, 6], 0.05, 400 + k as u64 + 10 * p as u64);
        let one = std::slice::from_ref(&x);
        let what = format!("max_pool2d k {k} stride {s} padding {p}");
        check(&what, one, cfg(), move |v| v[0].max_pool2d(k, s, p));
        let got = eval(one, move |v| v[0].max_pool2d(k, s, p));
        assert_bits_eq(&what, &got, &pool_ref(&x, k, s, p, true));

        let x = randn(&[2, 2, 5, 6], 500 + k as u64 + 10 * p as u64);
        let one = std::slice::from_ref(&x);
        let what = format!("avg_pool2d k {k} stride {s} padding {p}");
        check(&what, one, cfg(), move |v| v[0].avg_pool2d(k, s, p));
        let got = eval(one, move |v| v[0].avg_pool2d(k, s, p));
        assert_close(&what, &got, &pool_ref(&x, k, s, p, false), 1e-6, 1e-6);
    }
}

#[test]
fn max_pool2d_with_all_negative_inputs_and_padding() {
    // Padding must never win the maximum, even when every input is negative.
    let x = distinct(&[1, 1, 4, 4], 0.05, 450).add_scalar(-10.0);
    let one = std::slice::from_ref(&x);
    let got = eval(one, |v| v[0].max_pool2d(3, 2, 1));
    assert!(got.data().iter().all(|&v| v < -9.0), "{got:?}");
    assert_bits_eq("max_pool2d", &got, &pool_ref(&x, 3, 2, 1, true));
    check("max_pool2d negative", one, cfg(), |v| {
        v[0].max_pool2d(3, 2, 1)
    });
}

// ---------------------------------------------------------------------------------------------
// Losses.

fn ce_ref(z: &Tensor, labels: &[usize]) -> f64 {
    let (b, c) = z.dims2();
    let mut total = 0.0;
    for (i, &y) in labels.iter().enumerate() {
        let row = &z.data()[i * c..(i + 1) * c];
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        total += lse - row[y] as f64;
    }
    total / b as f64
}

fn se_ref(y: &Tensor, t: &Tensor) -> f64 {
    let b = y.dim(0);
    let s: f64 = y
        .data()
        .iter()
        .zip(t.data())
        .map(|(&a, &c)| 0.5 * (a as f64 - c as f64).powi(2))
        .sum();
    s / b as f64
}

fn bce_ref(z: &Tensor, t: &Tensor) -> f64 {
    let b = z.dim(0);
    let s: f64 = z
        .data()
        .iter()
        .zip(t.data())
        .map(|(&z, &t)| {
            let p = 1.0 / (1.0 + (-(z as f64)).exp());
            -(t as f64 * p.ln() + (1.0 - t as f64) * (1.0 - p).ln())
        })
        .sum();
    s / b as f64
}

#[test]
fn cross_entropy() {
    let z = randn(&[4, 5], 600).scale(2.0);
    let labels = vec![0usize, 4, 2, 2];
    let l = labels.clone();
    check("cross_entropy", std::slice::from_ref(&z), cfg(), move |v| {
        v[0].cross_entropy(&l)
    });
    let l = labels.clone();
    let got = eval(std::slice::from_ref(&z), move |v| v[0].cross_entropy(&l)).item();
    assert!((got as f64 - ce_ref(&z, &labels)).abs() < 1e-5, "{got}");
    let targets = Targets::Classes(labels.clone());
    assert_eq!(LossKind::CrossEntropy.value(&z, &targets), got);
    // Large logits stay finite.
    let big = Tensor::from_vec(vec![1000.0, 0.0, -1000.0, 0.0], &[2, 2]);
    let v = LossKind::CrossEntropy.value(&big, &Targets::Classes(vec![1, 0]));
    // Each example's loss is 1000 (its label's logit is 1000 below the other).
    assert!((v - 1000.0).abs() < 1e-3, "{v}");
}

#[test]
fn squared_error() {
    let y = randn(&[4, 3], 610);
    let t = randn(&[4, 3], 611);
    let tt = t.clone();
    check("squared_error", std::slice::from_ref(&y), cfg(), move |v| {
        v[0].squared_error(&tt)
    });
    let got = LossKind::SquaredError.value(&y, &Targets::Values(t.clone()));
    assert!((got as f64 - se_ref(&y, &t)).abs() < 1e-6, "{got}");
}

#[test]
fn sigmoid_bce() {
    let z = randn(&[4, 3], 620).scale(2.0);
    // Hard and soft targets.
    let t = Tensor::from_vec(
        vec![0., 1., 1., 0., 0.3, 1., 0., 0.7, 1., 1., 0., 0.5],
        &[4, 3],
    );
    let tt = t.clone();
    check("sigmoid_bce", std::slice::from_ref(&z), cfg(), move |v| {
        v[0].sigmoid_bce(&tt)
    });
    let got = LossKind::SigmoidBce.value(&z, &Targets::Values(t.clone()));
    assert!((got as f64 - bce_ref(&z, &t)).abs() < 1e-5, "{got}");
    // Stable far out: -log(1 - sigmoid(100)) = 100 without overflow.
    let far = Tensor::from_vec(vec![100.0, -100.0], &[1, 2]);
    let v = LossKind::SigmoidBce.value(&far, &Targets::Values(Tensor::zeros(&[1, 2])));
    assert!((v - 100.0).abs() < 1e-3, "{v}");
}

#[test]
fn losses_through_a_network() {
    // Gradients through a loss into an upstream layer (the loss node's incoming gradient is
    // not 1 when the loss is scaled).
    let x = randn(&[3, 4], 630);
    let w = randn(&[5, 4], 631);
    let t = randn(&[3, 5], 632);
    check("2 * ce(linear)", &[x.clone(), w.clone()], cfg(), |v| {
        v[0].linear(v[1], None, None)
            .cross_entropy(&[1, 0, 4])
            .scale(2.0)
    });
    check(
        "se(tanh(linear)) / 3",
        &[x.clone(), w.clone()],
        cfg(),
        move |v| {
            v[0].linear(v[1], None, None)
                .tanh()
                .squared_error(&t)
                .scale(1.0 / 3.0)
        },
    );
    let t01 = uniform(&[3, 5], 0.0, 1.0, 633);
    check("bce(linear)", &[x, w], cfg(), move |v| {
        v[0].linear(v[1], None, None).sigmoid_bce(&t01)
    });
}

// ---------------------------------------------------------------------------------------------
// Parameters on the tape.

/// conv (2x5x4 -> 3x3x2) -> tanh -> flatten -> dense -> gelu -> tied matmuls, reading its parameters by id.
fn model<'t>(t: &'t Tape<'t>, x: &Tensor, ids: [ParamId; 5]) -> Var<'t> {
    let [cw, cb, w1, b1, tied] = ids;
    let h = t
        .input(x.clone())
        .conv2d(t.param(cw), Some(t.param(cb)), 2, 1, None)
        .tanh()
        .flatten();
    let h = h.linear(t.param(w1), Some(t.param(b1)), None).gelu();
    // The same parameter twice: Tape::param returns one node, whose gradient accumulates.
    h.matmul(t.param(tied)).tanh().matmul(t.param(tied))
}

#[test]
fn param_gradients_of_a_small_model() {
    let mut store = ParamStore::new();
    let cw = store.add("conv.weight", randn(&[3, 2, 3, 3], 700).scale(0.4));
    let cb = store.add("conv.bias", randn(&[3], 701));
    let w1 = store.add("fc.weight", randn(&[4, 18], 702).scale(0.3));
    let b1 = store.add("fc.bias", randn(&[4], 703));
    let tied = store.add("tied", randn(&[4, 4], 704).scale(0.5));
    let unused = store.add("unused", randn(&[2], 705));
    let x = randn(&[2, 2, 5, 4], 706);
    let ids = [cw, cb, w1, b1, tied];
    let r = check_param_gradients(&store, |t| model(t, &x, ids), &cfg())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.checked, store.num_scalars());

    // An unused parameter has no gradient; a used one has exactly one node on the tape.
    let tape = Tape::new(&store);
    let a = tape.param(tied);
    let b = tape.param(tied);
    assert_eq!(a.id(), b.id());
    let loss = a.matmul(b).sum();
    let grads = tape.backward(loss);
    assert!(grads.get(unused).is_none());
    assert!(grads.get(cw).is_none());
    // d/dW sum(W W) = 1 W^T + W^T 1 in matrix form; compare with a hand computation.
    let wv = store.get(tied);
    let ones = Tensor::ones(&[4, 4]);
    let want = ones
        .matmul_t(false, wv, true)
        .add(&wv.matmul_t(true, &ones, false));
    assert_close(
        "d sum(W W) / dW",
        grads.get(tied).unwrap(),
        &want,
        1e-5,
        1e-5,
    );
}
