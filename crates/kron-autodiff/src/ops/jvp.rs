//! Forward-mode products on a recorded tape: the tangent of a node along a direction in
//! parameter space (`J d`), and the Gauss-Newton (Fisher) quadratic forms `d_i^T F d_j` that the
//! quadratic models of second-order methods need.
//!
//! The tangents are pushed through the recorded values, so no forward pass is repeated: each op
//! applies its linearization at the point the forward pass saw. For the dense and conv layers
//! the tangent is `x dW^T + dx W^T + db` (the patches the forward pass kept give the first term
//! of a conv for free).

use super::activation::unary_jvp;
use super::reduce::outer_inner;
use super::{Op, loss};
use crate::tape::{Node, Tape, Var};
use crate::tensor::Tensor;

/// A direction in parameter space: one optional tensor per parameter of the tape's store,
/// indexed by [`ParamId::index`](crate::ParamId::index); `None` (or a missing entry) is a zero block.
pub type Direction = [Option<Tensor>];

impl Tape<'_> {
    /// The directional derivative (Jacobian-vector product) of node `out` along the parameter
    /// direction `dir`: `J_out(theta) dir`, with the shape of `out`, at the point the forward
    /// pass recorded. A scalar loss gives `grad^T dir`.
    ///
    /// Inputs ([`Tape::input`] and [`Tape::var`] leaves) have zero tangents. Dropout uses the
    /// mask the forward pass drew.
    ///
    /// # Panics
    /// If `out` belongs to another tape, or a block of `dir` does not have its parameter's shape.
    #[track_caller]
    pub fn jvp(&self, out: Var<'_>, dir: &Direction) -> Tensor {
        self.check_own(out, "Tape::jvp");
        let nodes = self.nodes_ref();
        match tangents(&nodes, out.id, dir).swap_remove(out.id) {
            Some(t) => t,
            None => Tensor::zeros(nodes[out.id].value.shape()),
        }
    }

    /// The Gram matrix `G_ij = d_i^T F d_j` of parameter directions under the generalized
    /// Gauss-Newton matrix of the scalar `loss` on this mini-batch, `F = J^T H J`, where `J` is
    /// the Jacobian of the loss's input (the model's output) and `H` the Hessian of the loss in
    /// that input. For the three losses (softmax cross-entropy, sigmoid binary cross-entropy,
    /// squared error) `H` is the predictive distribution's own Fisher, so `F` is the exact
    /// mini-batch Fisher matrix as well. Row-major `k x k` for `k` directions, in f64.
    ///
    /// Costs one tangent sweep per direction (about twice a forward pass each).
    ///
    /// # Panics
    /// If `loss` is not one of the three loss ops, or as [`Tape::jvp`].
    #[track_caller]
    pub fn ggn_gram(&self, loss: Var<'_>, dirs: &[&Direction]) -> Vec<f64> {
        self.check_own(loss, "Tape::ggn_gram");
        let nodes = self.nodes_ref();
        let (input, curvature) = match &nodes[loss.id].op {
            Op::CrossEntropy { logits, probs, .. } => (*logits, Curvature::Softmax(probs)),
            Op::SigmoidBce { logits, .. } => (*logits, Curvature::Sigmoid(&nodes[*logits].value)),
            Op::SquaredError { pred, .. } => (*pred, Curvature::Identity),
            _ => panic!(
                "Tape::ggn_gram: node {} is not a loss (cross-entropy, sigmoid BCE or squared \
                 error)",
                loss.id
            ),
        };
        let shape = nodes[input].value.shape().to_vec();
        let us: Vec<Tensor> = dirs
            .iter()
            .map(|d| match tangents(&nodes, input, d).swap_remove(input) {
                Some(t) => t,
                None => Tensor::zeros(&shape),
            })
            .collect();
        let batch = shape.first().copied().unwrap_or(1).max(1);
        let k = us.len();
        let mut gram = vec![0.0f64; k * k];
        for i in 0..k {
            for j in i..k {
                let v = curvature.form(&us[i], &us[j]) / batch as f64;
                gram[i * k + j] = v;
                gram[j * k + i] = v;
            }
        }
        gram
    }

    #[track_caller]
    pub(crate) fn check_own(&self, v: Var<'_>, op: &str) {
        assert!(
            std::ptr::eq(
                v.tape as *const Tape<'_> as *const u8,
                self as *const Tape<'_> as *const u8
            ),
            "{op}: the node was recorded on another tape"
        );
    }
}

/// The Hessian of a loss in its input, per example (before the batch mean).
enum Curvature<'a> {
    /// `diag(p) - p p^T` per row, `p` the softmax.
    Softmax(&'a Tensor),
    /// `diag(s (1 - s))`, `s` the sigmoid of the logits.
    Sigmoid(&'a Tensor),
    /// The identity.
    Identity,
}

impl Curvature<'_> {
    /// `sum over rows of u_r^T H_r v_r`, in f64.
    fn form(&self, u: &Tensor, v: &Tensor) -> f64 {
        let (ud, vd) = (u.data(), v.data());
        match self {
            Curvature::Identity => ud.iter().zip(vd).map(|(&a, &b)| a as f64 * b as f64).sum(),
            Curvature::Sigmoid(z) => ud
                .iter()
                .zip(vd)
                .zip(z.data())
                .map(|((&a, &b), &z)| {
                    let s = super::activation::sigmoid(z) as f64;
                    s * (1.0 - s) * a as f64 * b as f64
                })
                .sum(),
            Curvature::Softmax(p) => {
                let c = *p.shape().last().unwrap_or(&1);
                let mut total = 0.0f64;
                for ((pr, ur), vr) in p
                    .data()
                    .chunks(c.max(1))
                    .zip(ud.chunks(c.max(1)))
                    .zip(vd.chunks(c.max(1)))
                {
                    let (mut puv, mut pu, mut pv) = (0.0f64, 0.0f64, 0.0f64);
                    for ((&p, &a), &b) in pr.iter().zip(ur).zip(vr) {
                        let (p, a, b) = (p as f64, a as f64, b as f64);
                        puv += p * a * b;
                        pu += p * a;
                        pv += p * b;
                    }
                    total += puv - pu * pv;
                }
                total
            }
        }
    }
}

/// The tangents of nodes `0..=upto` along `dir` (`None`: zero).
#[track_caller]
fn tangents(nodes: &[Node], upto: usize, dir: &Direction) -> Vec<Option<Tensor>> {
    let mut t: Vec<Option<Tensor>> = Vec::with_capacity(upto + 1);
    for node in &nodes[..=upto] {
        let out = &node.value;
        let tan = if node.requires_grad {
            tangent(node, out, nodes, &t, dir)
        } else {
            None
        };
        t.push(tan);
    }
    t
}

/// The tangent of one node from its inputs' tangents.
#[track_caller]
fn tangent(
    node: &Node,
    out: &Tensor,
    nodes: &[Node],
    t: &[Option<Tensor>],
    dir: &Direction,
) -> Option<Tensor> {
    let val = |i: usize| &nodes[i].value;
    let tan = |i: usize| t[i].as_ref();
    // Broadcasts a tangent of an operand to the output's shape.
    let widen = |x: &Tensor| {
        if x.shape() == out.shape() {
            x.clone()
        } else {
            Tensor::zeros(out.shape()).add(x)
        }
    };
    match &node.op {
        Op::Param(pid) => {
            let d = dir.get(pid.index())?.as_ref()?;
            assert_eq!(
                d.shape(),
                out.shape(),
                "Tape::jvp: the direction for parameter {} has shape {:?}, the parameter {:?}",
                pid.index(),
                d.shape(),
                out.shape()
            );
            Some(d.clone())
        }
        Op::Input => None,
        Op::Add(a, b) | Op::Sub(a, b) => {
            let sign = if matches!(node.op, Op::Add(..)) {
                1.0
            } else {
                -1.0
            };
            match (tan(*a), tan(*b)) {
                (None, None) => None,
                (Some(x), None) => Some(widen(x)),
                (None, Some(y)) => Some(widen(&y.scale(sign))),
                (Some(x), Some(y)) => Some(widen(&x.add(&y.scale(sign)))),
            }
        }
        Op::Mul(a, b) => sum2(
            tan(*a).map(|x| widen(&x.mul(val(*b)))),
            tan(*b).map(|y| widen(&val(*a).mul(y))),
        ),
        Op::Div(a, b) => sum2(
            tan(*a).map(|x| widen(&x.div(val(*b)))),
            // d(a/b) = -(a/b) db / b
            tan(*b).map(|y| out.mul(&y.div(val(*b))).scale(-1.0)),
        ),
        Op::Scale(x, s) => tan(*x).map(|x| x.scale(*s)),
        Op::AddScalar(x) => tan(*x).cloned(),
        Op::MatMul { a, b, ta, tb } => sum2(
            tan(*a).map(|x| x.matmul_t(*ta, val(*b), *tb)),
            tan(*b).map(|y| val(*a).matmul_t(*ta, y, *tb)),
        ),
        Op::Transpose(x) => tan(*x).map(Tensor::t),
        Op::Reshape(x) => tan(*x).map(|x| x.reshape(out.shape())),
        Op::SumAll(x) => tan(*x).map(|x| Tensor::full(out.shape(), x.sum_all())),
        Op::MeanAll(x) => tan(*x).map(|x| Tensor::full(out.shape(), x.mean_all())),
        Op::SumAxis { x, axis } => tan(*x).map(|x| x.sum_axis(*axis, false).reshape(out.shape())),
        Op::MaxAxis { x, axis, arg } => tan(*x).map(|tx| {
            let (outer, n, inner) = outer_inner(val(*x).shape(), *axis);
            let d = tx.data();
            let mut o = vec![0.0f32; outer * inner];
            for a in 0..outer {
                for i in 0..inner {
                    let j = a * inner + i;
                    o[j] = d[(a * n + arg[j]) * inner + i];
                }
            }
            Tensor::from_vec(o, out.shape())
        }),
        Op::Unary(x, u) => tan(*x).map(|tx| unary_jvp(val(*x), *u, out, tx)),
        Op::LogSoftmax(x) => tan(*x).map(|tx| {
            // d(x - lse(x)) = dx - sum_j p_j dx_j.
            let c = *out.shape().last().unwrap_or(&1);
            let mut d = tx.data().to_vec();
            for (row, y) in d.chunks_mut(c.max(1)).zip(out.data().chunks(c.max(1))) {
                let s: f32 = row.iter().zip(y).map(|(&r, &yv)| r * yv.exp()).sum();
                for r in row.iter_mut() {
                    *r -= s;
                }
            }
            Tensor::from_vec(d, out.shape())
        }),
        Op::Dropout { x, mask } => tan(*x).map(|tx| tx.mul(mask)),
        Op::Linear { x, w, b, act, .. } => {
            let mut s = sum2(
                tan(*x).map(|tx| tx.matmul_t(false, val(*w), true)),
                tan(*w).map(|tw| val(*x).matmul_t(false, tw, true)),
            );
            if let Some(tb) = b.and_then(tan) {
                let s = s.get_or_insert_with(|| Tensor::zeros(out.shape()));
                super::linear::add_bias_rows(s, tb.data());
            }
            // The activation's tangent rule, from its output.
            match act {
                Some(u) => s.map(|s| super::activation::through_output(*u, out, &s)),
                None => s,
            }
        }
        Op::Conv2d {
            x,
            w,
            b,
            geom,
            patches,
            relu,
            ..
        } => {
            let (nt, oc) = (geom.batch * geom.locations(), geom.out_ch);
            // Rows `(n, t) x out` from the weight tangent over the kept patches.
            let rows = tan(*w)
                .map(|tw| patches.matmul_t(false, &tw.reshape(&[oc, geom.patch_len()]), true));
            let mut s = rows.map(|r| {
                debug_assert_eq!(r.shape(), &[nt, oc]);
                super::conv::rows_to_nchw_tensor(r.data(), geom, None)
            });
            if let Some(tx) = tan(*x) {
                let via_x = super::conv::conv2d_values(tx, val(*w), geom);
                s = sum2(s, Some(via_x));
            }
            if let Some(tb) = b.and_then(tan) {
                let s = s.get_or_insert_with(|| Tensor::zeros(out.shape()));
                let t_len = geom.locations();
                for chunk in s.data_mut().chunks_mut((oc * t_len).max(1)) {
                    for (o, plane) in chunk.chunks_mut(t_len.max(1)).enumerate() {
                        for v in plane {
                            *v += tb.data()[o];
                        }
                    }
                }
            }
            if *relu && let Some(s) = &mut s {
                // The ReLU's tangent rule, as `unary_jvp` applies it (see `relu_grad`).
                for (t, &y) in s.data_mut().iter_mut().zip(out.data()) {
                    *t = super::conv::relu_grad(*t, y);
                }
            }
            s
        }
        Op::MaxPool2d { x, geom, arg } => tan(*x).map(|tx| {
            let (pi, po) = (geom.h_in * geom.w_in, geom.h_out * geom.w_out);
            let d = tx.data();
            let o: Vec<f32> = arg
                .iter()
                .enumerate()
                .map(|(j, &a)| d[(j / po.max(1)) * pi + a as usize])
                .collect();
            Tensor::from_vec(o, out.shape())
        }),
        Op::AvgPool2d { x, geom } => tan(*x).map(|tx| {
            let tape = Tape::without_params();
            tape.input(tx.clone())
                .avg_pool2d(geom.k, geom.stride, geom.padding)
                .value()
        }),
        // A loss's tangent is its input gradient (the reverse rule's) dotted with the input's
        // tangent.
        Op::CrossEntropy {
            logits,
            labels,
            probs,
        } => tan(*logits).map(|tz| {
            let s = 1.0 / probs.dims2().0.max(1) as f32;
            scalar_dot(out, &loss::cross_entropy_input_grad(labels, probs, s), tz)
        }),
        Op::SquaredError { pred, target } => tan(*pred).map(|tp| {
            let y = val(*pred);
            let s = 1.0 / y.dim(0).max(1) as f32;
            scalar_dot(out, &loss::squared_error_input_grad(y, target, s), tp)
        }),
        Op::SigmoidBce { logits, target } => tan(*logits).map(|tz| {
            let z = val(*logits);
            let s = 1.0 / z.dim(0).max(1) as f32;
            scalar_dot(out, &loss::sigmoid_bce_input_grad(z, target, s), tz)
        }),
    }
}

/// `<d, t>` in f64, as a tensor shaped like `out` (a scalar).
fn scalar_dot(out: &Tensor, d: &Tensor, t: &Tensor) -> Tensor {
    let v: f64 = d
        .data()
        .iter()
        .zip(t.data())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    Tensor::full(out.shape(), v as f32)
}

/// The sum of two optional tangents.
fn sum2(a: Option<Tensor>, b: Option<Tensor>) -> Option<Tensor> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.add(&y)),
        (x, None) => x,
        (None, y) => y,
    }
}
