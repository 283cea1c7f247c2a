//! Forward-mode products: every op's tangent rule against the (finite-difference-checked)
//! reverse rules by the adjoint identity `c^T (J d) = (J^T c)^T d`, whole nets against central
//! differences, and the Gauss-Newton Gram matrix against its definition.

mod common;

use common::*;
use kron_autodiff::{ParamStore, Tape, Tensor, Var};

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.data()
        .iter()
        .zip(b.data())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// Parameters of the given shapes (normal, seeded) and a random direction over them.
fn point(shapes: &[&[usize]], seed: u64) -> (ParamStore, Vec<Option<Tensor>>) {
    let mut store = ParamStore::new();
    let mut dir = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        store.add(format!("p{i}"), randn(s, seed + 2 * i as u64));
        dir.push(Some(randn(s, seed + 2 * i as u64 + 1)));
    }
    (store, dir)
}

/// Checks `c^T jvp(out, d) == grad(c^T out)^T d` for the op(s) in `f`, and that the tangent is
/// not trivially zero.
#[track_caller]
fn adjoint<F>(what: &str, shapes: &[&[usize]], f: F)
where
    F: for<'t> Fn(&'t Tape<'t>, &[Var<'t>]) -> Var<'t>,
{
    let (store, dir) = point(shapes, 11);
    let tape = Tape::new(&store).with_rng(kron_autodiff::Rng::new(5));
    let vars: Vec<Var<'_>> = store.ids().map(|id| tape.param(id)).collect();
    let out = f(&tape, &vars);
    let c = randn(&out.shape(), 99);
    let s = out.mul(tape.input(c.clone())).sum();
    let grads = tape.backward(s);
    let u = tape.jvp(out, &dir);
    assert_eq!(u.shape(), out.shape().as_slice(), "{what}: tangent shape");
    let lhs = dot(&c, &u);
    let rhs: f64 = store
        .ids()
        .filter_map(|id| Some(dot(grads.get(id)?, dir[id.index()].as_ref()?)))
        .sum();
    let scale = lhs.abs().max(rhs.abs()).max(1e-6);
    assert!(
        (lhs - rhs).abs() <= 2e-5 * scale + 1e-6,
        "{what}: c^T (J d) = {lhs}, (J^T c)^T d = {rhs}"
    );
    assert!(u.data().iter().any(|&v| v != 0.0), "{what}: zero tangent");
}

#[test]
fn arithmetic_tangents_are_adjoint_to_the_reverse_rules() {
    adjoint("add (broadcast bias)", &[&[4, 3], &[3]], |_, v| {
        v[0].add(v[1])
    });
    adjoint("add (broadcast both)", &[&[4, 1], &[1, 3]], |_, v| {
        v[0].add(v[1])
    });
    adjoint("sub (broadcast)", &[&[3], &[4, 3]], |_, v| v[0].sub(v[1]));
    adjoint("mul (broadcast)", &[&[4, 3], &[1, 3]], |_, v| {
        v[0].mul(v[1])
    });
    adjoint("div", &[&[4, 3], &[4, 3]], |t, v| {
        v[0].div(
            v[1].square()
                .add_scalar(0.5)
                .add(t.input(Tensor::zeros(&[4, 3]))),
        )
    });
    adjoint("scale, add_scalar, neg", &[&[5]], |_, v| {
        v[0].scale(3.0).add_scalar(1.0).neg()
    });
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (sa, sb): (&[usize], &[usize]) = match (ta, tb) {
            (false, false) => (&[3, 4], &[4, 2]),
            (true, false) => (&[4, 3], &[4, 2]),
            (false, true) => (&[3, 4], &[2, 4]),
            (true, true) => (&[4, 3], &[2, 4]),
        };
        adjoint(
            &format!("matmul ta={ta} tb={tb}"),
            &[sa, sb],
            move |_, v| v[0].matmul_t(ta, v[1], tb),
        );
    }
    adjoint("transpose, reshape, flatten", &[&[2, 3, 4]], |_, v| {
        v[0].reshape(&[6, 4]).t().reshape(&[2, 2, 6]).flatten()
    });
}

#[test]
fn reduction_tangents_are_adjoint_to_the_reverse_rules() {
    adjoint("sum", &[&[3, 4]], |_, v| v[0].sum());
    adjoint("mean", &[&[3, 4]], |_, v| v[0].mean());
    adjoint("sum_axis 1", &[&[3, 4, 2]], |_, v| v[0].sum_axis(1, false));
    adjoint("mean_axis keepdim", &[&[3, 4]], |_, v| {
        v[0].mean_axis(0, true)
    });
    adjoint("max_axis", &[&[3, 5, 2]], |_, v| v[0].max_axis(1, false));
}

#[test]
fn activation_tangents_are_adjoint_to_the_reverse_rules() {
    let s: &[&[usize]] = &[&[4, 6]];
    adjoint("relu", s, |_, v| v[0].relu());
    adjoint("leaky relu", s, |_, v| v[0].leaky_relu(0.1));
    adjoint("tanh", s, |_, v| v[0].tanh());
    adjoint("sigmoid", s, |_, v| v[0].sigmoid());
    adjoint("softplus", s, |_, v| v[0].softplus());
    adjoint("gelu", s, |_, v| v[0].gelu());
    adjoint("exp", s, |_, v| v[0].exp());
    adjoint("ln sqrt square", s, |_, v| {
        v[0].square().add_scalar(1.0).sqrt().ln()
    });
    adjoint("log_softmax", s, |_, v| v[0].log_softmax());
    adjoint("dropout", s, |_, v| v[0].dropout(0.4));
}

#[test]
fn layer_tangents_are_adjoint_to_the_reverse_rules() {
    adjoint("linear", &[&[5, 4], &[3, 4], &[3]], |_, v| {
        v[0].linear(v[1], Some(v[2]), None)
    });
    adjoint("linear without bias", &[&[5, 4], &[3, 4]], |_, v| {
        v[0].linear(v[1], None, None)
    });
    for (stride, padding) in [(1, 0), (1, 1), (2, 1), (2, 2)] {
        adjoint(
            &format!("conv2d stride {stride} padding {padding}"),
            &[&[2, 3, 6, 5], &[4, 3, 3, 3], &[4]],
            move |_, v| v[0].conv2d(v[1], Some(v[2]), stride, padding, None),
        );
        adjoint(
            &format!("conv2d_relu stride {stride} padding {padding}"),
            &[&[2, 3, 6, 5], &[4, 3, 3, 3], &[4]],
            move |_, v| v[0].conv2d_relu(v[1], Some(v[2]), stride, padding, None),
        );
    }
    adjoint("max_pool2d", &[&[2, 3, 7, 6]], |_, v| {
        v[0].max_pool2d(3, 2, 1)
    });
    adjoint("avg_pool2d", &[&[2, 3, 7, 6]], |_, v| {
        v[0].avg_pool2d(3, 2, 1)
    });
}

#[test]
fn loss_tangents_are_directional_derivatives() {
    adjoint("cross_entropy", &[&[4, 5]], |_, v| {
        v[0].cross_entropy(&[0, 4, 2, 2])
    });
    let t = uniform(&[4, 5], 0.0, 1.0, 3);
    adjoint("sigmoid_bce", &[&[4, 5]], move |_, v| v[0].sigmoid_bce(&t));
    let t = randn(&[4, 5], 4);
    adjoint("squared_error", &[&[4, 5]], move |_, v| {
        v[0].squared_error(&t)
    });
}

/// A small conv net with every kind of layer, as a function of its parameters.
fn net<'t>(tape: &'t Tape<'t>, v: &[Var<'t>], x: &Tensor) -> Var<'t> {
    let h = tape
        .input(x.clone())
        .conv2d(v[0], Some(v[1]), 1, 1, None)
        .tanh()
        .max_pool2d(2, 2, 0)
        .conv2d(v[2], Some(v[3]), 1, 1, None)
        .softplus()
        .avg_pool2d(2, 2, 0)
        .flatten();
    h.linear(v[4], Some(v[5]), None).sigmoid()
}

const NET: [&[usize]; 6] = [
    &[3, 2, 3, 3],
    &[3],
    &[4, 3, 3, 3],
    &[4],
    &[5, 4 * 2 * 2],
    &[5],
];

#[test]
fn a_conv_net_tangent_matches_central_differences() {
    let (store, dir) = point(&NET, 21);
    let x = randn(&[3, 2, 8, 8], 7);
    let eval = |store: &ParamStore| {
        let tape = Tape::new(store);
        let vars: Vec<Var<'_>> = store.ids().map(|id| tape.param(id)).collect();
        net(&tape, &vars, &x).value()
    };
    let tape = Tape::new(&store);
    let vars: Vec<Var<'_>> = store.ids().map(|id| tape.param(id)).collect();
    let out = net(&tape, &vars, &x);
    let u = tape.jvp(out, &dir);
    let eps = 1e-2f32;
    let moved = |sign: f32| {
        let mut s = store.clone();
        for id in store.ids() {
            let d = dir[id.index()].as_ref().unwrap();
            s.set(id, store.get(id).add(&d.scale(sign * eps)));
        }
        eval(&s)
    };
    let fd = moved(1.0).sub(&moved(-1.0)).scale(0.5 / eps);
    assert_close("conv net J d", &u, &fd, 2e-2, 2e-4);
    // A direction on one parameter alone moves only what depends on it.
    let mut only_last = vec![None; dir.len()];
    only_last[5] = dir[5].clone();
    let u5 = tape.jvp(out, &only_last);
    assert!(u5.data().iter().all(|v| v.is_finite()));
    let zero = tape.jvp(out, &vec![None; dir.len()]);
    assert!(zero.data().iter().all(|&v| v == 0.0));
}

/// `u^T H v` of a loss in its input by central differences of the loss's own gradient.
fn hessian_form(
    loss: impl for<'t> Fn(Var<'t>) -> Var<'t>,
    z: &Tensor,
    u: &Tensor,
    v: &Tensor,
) -> f64 {
    let grad_at = |z: Tensor| {
        let tape = Tape::without_params();
        let zv = tape.var(z);
        let l = loss(zv);
        tape.backward(l).wrt(zv).unwrap().clone()
    };
    let eps = 1e-2f32;
    let hv = grad_at(z.add(&v.scale(eps)))
        .sub(&grad_at(z.sub(&v.scale(eps))))
        .scale(0.5 / eps);
    dot(u, &hv)
}

#[test]
fn the_gauss_newton_gram_is_j_transpose_h_j() {
    let (store, dirs) = point(&NET, 31);
    let dirs2: Vec<Vec<Option<Tensor>>> = (0..2)
        .map(|k| {
            NET.iter()
                .enumerate()
                .map(|(i, s)| Some(randn(s, 500 + 10 * k + i as u64)))
                .collect()
        })
        .collect();
    let all = [&dirs[..], &dirs2[0][..], &dirs2[1][..]];
    let x = randn(&[4, 2, 8, 8], 8);
    let labels = [1usize, 4, 0, 2];
    let bce_t = uniform(&[4, 5], 0.0, 1.0, 9);
    let se_t = randn(&[4, 5], 10);
    for kind in 0..3 {
        let tape = Tape::new(&store);
        let vars: Vec<Var<'_>> = store.ids().map(|id| tape.param(id)).collect();
        let h = net(&tape, &vars, &x);
        fn apply<'t>(
            kind: usize,
            z: Var<'t>,
            labels: &[usize],
            bce: &Tensor,
            se: &Tensor,
        ) -> Var<'t> {
            match kind {
                0 => z.cross_entropy(labels),
                1 => z.sigmoid_bce(bce),
                _ => z.squared_error(se),
            }
        }
        let loss = |z| apply(kind, z, &labels, &bce_t, &se_t);
        let l = loss(h);
        let gram = tape.ggn_gram(l, &all);
        let us: Vec<Tensor> = all.iter().map(|d| tape.jvp(h, d)).collect();
        let z = h.value();
        for i in 0..3 {
            for j in 0..3 {
                let want = hessian_form(
                    |v| apply(kind, v, &labels, &bce_t, &se_t),
                    &z,
                    &us[i],
                    &us[j],
                );
                let got = gram[i * 3 + j];
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs().max(1e-3),
                    "loss {kind}: G[{i}{j}] = {got}, J^T H J by differences = {want}"
                );
            }
        }
        // Positive semi-definite, as a Gauss-Newton matrix must be.
        assert!(gram[0] > 0.0 && gram[0] * gram[4] >= gram[1] * gram[1]);
    }
}

#[test]
fn one_linear_layer_with_squared_error_has_the_exact_gram() {
    // F = J^T J / B: d^T F d = |X dW^T + db|^2 / B.
    let mut store = ParamStore::new();
    let w = store.add("w", randn(&[3, 4], 1));
    let b = store.add("b", randn(&[3], 2));
    let x = randn(&[6, 4], 3);
    let (dw, db) = (randn(&[3, 4], 4), randn(&[3], 5));
    let tape = Tape::new(&store);
    let out = tape
        .input(x.clone())
        .linear(tape.param(w), Some(tape.param(b)), None);
    let l = out.squared_error(&randn(&[6, 3], 6));
    let d = vec![Some(dw.clone()), Some(db.clone())];
    let gram = tape.ggn_gram(l, &[&d]);
    let mut jd = x.matmul_t(false, &dw, true);
    for row in jd.data_mut().chunks_mut(3) {
        for (r, bv) in row.iter_mut().zip(db.data()) {
            *r += bv;
        }
    }
    let want = dot(&jd, &jd) / 6.0;
    assert!(
        (gram[0] - want).abs() <= 1e-5 * want,
        "{} vs {want}",
        gram[0]
    );
}

#[test]
#[should_panic(expected = "Tape::ggn_gram: node")]
fn the_gram_needs_a_loss() {
    let mut store = ParamStore::new();
    let w = store.add("w", randn(&[2, 2], 1));
    let tape = Tape::new(&store);
    let s = tape.param(w).sum();
    let _ = tape.ggn_gram(s, &[&[None]]);
}
