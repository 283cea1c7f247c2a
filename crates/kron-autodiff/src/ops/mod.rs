//! The recorded operations: their forward methods on [`Var`](crate::Var) and their reverse-mode
//! rules, one `match` over an enum (no boxed closures), so the tape can be inspected and tested.

mod activation;
mod arith;
pub mod conv;
mod elementary;
mod jvp;
pub(crate) mod linear;
pub mod loss;
pub mod pool;
mod reduce;

use std::collections::HashSet;

use crate::capture::LayerCapture;
use crate::param::{LayerId, ParamId};
use crate::tape::Node;
use crate::tensor::Tensor;

pub use activation::Unary;
pub use conv::ConvGeom;
pub use jvp::Direction;
pub use pool::PoolGeom;

/// A recorded operation and the indices of the nodes it read.
pub(crate) enum Op {
    Param(ParamId),
    Input,
    Add(usize, usize),
    Sub(usize, usize),
    Mul(usize, usize),
    Div(usize, usize),
    Scale(usize, f32),
    AddScalar(usize),
    MatMul {
        a: usize,
        b: usize,
        ta: bool,
        tb: bool,
    },
    Transpose(usize),
    Reshape(usize),
    SumAll(usize),
    MeanAll(usize),
    SumAxis {
        x: usize,
        axis: usize,
    },
    MaxAxis {
        x: usize,
        axis: usize,
        arg: Vec<usize>,
    },
    Unary(usize, Unary),
    LogSoftmax(usize),
    Dropout {
        x: usize,
        mask: Tensor,
    },
    Linear {
        x: usize,
        w: usize,
        b: Option<usize>,
        layer: Option<LayerId>,
        /// The pointwise function that follows in the same op (the value is after it).
        act: Option<Unary>,
    },
    Conv2d {
        x: usize,
        w: usize,
        b: Option<usize>,
        geom: ConvGeom,
        patches: Tensor,
        layer: Option<LayerId>,
        /// Whether a ReLU follows in the same op (the value is after it).
        relu: bool,
    },
    MaxPool2d {
        x: usize,
        geom: PoolGeom,
        arg: crate::alloc::Indices,
    },
    AvgPool2d {
        x: usize,
        geom: PoolGeom,
    },
    CrossEntropy {
        logits: usize,
        labels: Vec<usize>,
        probs: Tensor,
    },
    SquaredError {
        pred: usize,
        target: Tensor,
    },
    SigmoidBce {
        logits: usize,
        target: Tensor,
    },
}

/// Where the reverse rules send the gradients of a node's inputs.
pub(crate) struct GradSink<'a> {
    pub(crate) nodes: &'a [Node],
    pub(crate) grads: &'a mut [Option<Tensor>],
    /// Whether parameter leaves take gradients (not in a sweep for the captures alone).
    pub(crate) params: bool,
}

impl GradSink<'_> {
    /// Whether node `id` needs a gradient at all (skip the work if not).
    pub(crate) fn needs(&self, id: usize) -> bool {
        let node = &self.nodes[id];
        node.requires_grad && (self.params || !matches!(node.op, Op::Param(_)))
    }

    /// The forward value of node `id`.
    pub(crate) fn value(&self, id: usize) -> &Tensor {
        &self.nodes[id].value
    }

    /// Adds `g` to the gradient of node `id`.
    pub(crate) fn add(&mut self, id: usize, g: Tensor) {
        if !self.needs(id) {
            return;
        }
        debug_assert_eq!(g.shape(), self.nodes[id].value.shape(), "gradient shape");
        match &mut self.grads[id] {
            slot @ None => *slot = Some(g),
            Some(acc) => {
                let dst = acc.data_mut();
                for (d, s) in dst.iter_mut().zip(g.data()) {
                    *d += s;
                }
            }
        }
    }
}

/// The reverse rule of `op`, whose output was `out` and whose output gradient is `g`. Returns a
/// capture when `op` is a dense or conv layer whose id is in `capture`.
pub(crate) fn backward(
    op: &Op,
    out: &Tensor,
    g: &Tensor,
    sink: &mut GradSink<'_>,
    capture: &HashSet<LayerId>,
) -> Option<LayerCapture> {
    match op {
        Op::Param(_) | Op::Input => {}
        Op::Add(a, b) => arith::add_backward(*a, *b, g, sink, 1.0),
        Op::Sub(a, b) => arith::add_backward(*a, *b, g, sink, -1.0),
        Op::Mul(a, b) => arith::mul_backward(*a, *b, g, sink),
        Op::Div(a, b) => arith::div_backward(*a, *b, out, g, sink),
        Op::Scale(x, s) => sink.add(*x, g.scale(*s)),
        Op::AddScalar(x) => sink.add(*x, g.clone()),
        Op::MatMul { a, b, ta, tb } => arith::matmul_backward(*a, *b, *ta, *tb, g, sink),
        Op::Transpose(x) => sink.add(*x, g.t()),
        Op::Reshape(x) => {
            let shape = sink.value(*x).shape().to_vec();
            sink.add(*x, g.reshape(&shape));
        }
        Op::SumAll(x) | Op::MeanAll(x) => reduce::all_backward(op, *x, g, sink),
        Op::SumAxis { x, axis } => reduce::sum_axis_backward(*x, *axis, g, sink),
        Op::MaxAxis { x, axis, arg } => reduce::max_axis_backward(*x, *axis, arg, g, sink),
        Op::Unary(x, u) => activation::unary_backward(*x, *u, out, g, sink),
        Op::LogSoftmax(x) => activation::log_softmax_backward(*x, out, g, sink),
        Op::Dropout { x, mask } => sink.add(*x, g.mul(mask)),
        Op::Linear {
            x,
            w,
            b,
            layer,
            act,
        } => {
            let g_s = act.map(|u| activation::through_output(u, out, g));
            let g = g_s.as_ref().unwrap_or(g);
            return linear::linear_backward(*x, *w, *b, *layer, g, sink, capture);
        }
        Op::Conv2d {
            x,
            w,
            b,
            geom,
            patches,
            layer,
            relu,
        } => {
            let after = relu.then_some(out);
            return conv::conv2d_backward(
                *x, *w, *b, geom, patches, *layer, after, g, sink, capture,
            );
        }
        Op::MaxPool2d { x, geom, arg } => pool::max_pool_backward(*x, geom, arg, g, sink),
        Op::AvgPool2d { x, geom } => pool::avg_pool_backward(*x, geom, g, sink),
        Op::CrossEntropy {
            logits,
            labels,
            probs,
        } => loss::cross_entropy_backward(*logits, labels, probs, g, sink),
        Op::SquaredError { pred, target } => loss::squared_error_backward(*pred, target, g, sink),
        Op::SigmoidBce { logits, target } => loss::sigmoid_bce_backward(*logits, target, g, sink),
    }
    None
}
