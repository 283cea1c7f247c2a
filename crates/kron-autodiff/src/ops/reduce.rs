//! Reductions: sum and mean of everything or along an axis, maximum along an axis.

use super::{GradSink, Op};
use crate::tape::Var;
use crate::tensor::Tensor;

impl<'t> Var<'t> {
    /// The sum of all elements (a scalar).
    pub fn sum(self) -> Var<'t> {
        let v = Tensor::scalar(self.tape.value_of(self.id).sum_all());
        self.tape.record(Op::SumAll(self.id), v, &[self.id])
    }

    /// The mean of all elements (a scalar).
    pub fn mean(self) -> Var<'t> {
        let v = Tensor::scalar(self.tape.value_of(self.id).mean_all());
        self.tape.record(Op::MeanAll(self.id), v, &[self.id])
    }

    /// Sum along `axis` (kept with size 1 if `keepdim`).
    #[track_caller]
    pub fn sum_axis(self, axis: usize, keepdim: bool) -> Var<'t> {
        let v = self.tape.value_of(self.id).sum_axis(axis, keepdim);
        self.tape
            .record(Op::SumAxis { x: self.id, axis }, v, &[self.id])
    }

    /// Mean along `axis` (kept with size 1 if `keepdim`).
    #[track_caller]
    pub fn mean_axis(self, axis: usize, keepdim: bool) -> Var<'t> {
        let n = self.tape.value_of(self.id).dim(axis).max(1);
        self.sum_axis(axis, keepdim).scale(1.0 / n as f32)
    }

    /// Maximum along `axis`; the gradient flows to the first maximal element.
    #[track_caller]
    pub fn max_axis(self, axis: usize, keepdim: bool) -> Var<'t> {
        let (v, arg) = self.tape.value_of(self.id).max_axis(axis, keepdim);
        self.tape.record(
            Op::MaxAxis {
                x: self.id,
                axis,
                arg,
            },
            v,
            &[self.id],
        )
    }
}

pub(super) fn all_backward(op: &Op, x: usize, g: &Tensor, sink: &mut GradSink<'_>) {
    let xv = sink.value(x);
    let n = xv.numel().max(1);
    let gs = g.item()
        * match op {
            Op::MeanAll(_) => 1.0 / n as f32,
            _ => 1.0,
        };
    let gx = Tensor::full(xv.shape(), gs);
    sink.add(x, gx);
}

pub(super) fn outer_inner(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

pub(super) fn sum_axis_backward(x: usize, axis: usize, g: &Tensor, sink: &mut GradSink<'_>) {
    let shape = sink.value(x).shape().to_vec();
    let (outer, n, inner) = outer_inner(&shape, axis);
    let gd = g.data();
    let mut out = vec![0.0f32; outer * n * inner];
    for o in 0..outer {
        for k in 0..n {
            out[(o * n + k) * inner..(o * n + k + 1) * inner]
                .copy_from_slice(&gd[o * inner..(o + 1) * inner]);
        }
    }
    sink.add(x, Tensor::from_vec(out, &shape));
}

pub(super) fn max_axis_backward(
    x: usize,
    axis: usize,
    arg: &[usize],
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    let shape = sink.value(x).shape().to_vec();
    let (outer, n, inner) = outer_inner(&shape, axis);
    let gd = g.data();
    let mut out = vec![0.0f32; outer * n * inner];
    for o in 0..outer {
        for i in 0..inner {
            let j = o * inner + i;
            out[(o * n + arg[j]) * inner + i] = gd[j];
        }
    }
    sink.add(x, Tensor::from_vec(out, &shape));
}
