//! The fused dense layer op `s = x W^T + b`, the capture site of a KFAC block.

use std::collections::HashSet;

use super::activation::bias_then_rows;
use super::{GradSink, Op, Unary};
use crate::capture::LayerCapture;
use crate::param::LayerId;
use crate::tape::Var;
use crate::tensor::{PAR_THRESHOLD, Tensor};

impl<'t> Var<'t> {
    /// The dense layer `x W^T + b` as one tape op: `x` is `batch x in`, `w` is `out x in`
    /// (PyTorch's layout), `b` is `out`. With a `layer` id, the op is a capture site: when the
    /// tape captures that layer, backward keeps `a = x` and `g = B dL/ds` for KFAC.
    ///
    /// # Panics
    /// If the shapes do not fit, naming them.
    #[track_caller]
    pub fn linear(self, w: Var<'t>, b: Option<Var<'t>>, layer: Option<LayerId>) -> Var<'t> {
        self.linear_op(w, b, layer, None)
    }

    /// `linear(..)` followed by `act`, with the same values, gradients, captures and tangents
    /// bit for bit. Where `act`'s derivative follows from its output
    /// ([`Unary::derivative_from_output`]: ReLU, sigmoid, tanh) the two are one op: the bias
    /// and `act` are applied in one pass over the GEMM's output, the pre-activation is never
    /// stored, and the backward pass takes `act`'s derivative from the output. A capture site
    /// still captures the gradient with respect to the pre-activation. Other functions are
    /// recorded as two ops.
    ///
    /// # Panics
    /// If the shapes do not fit, naming them.
    #[track_caller]
    pub fn linear_then(
        self,
        w: Var<'t>,
        b: Option<Var<'t>>,
        layer: Option<LayerId>,
        act: Unary,
    ) -> Var<'t> {
        if act.derivative_from_output() {
            self.linear_op(w, b, layer, Some(act))
        } else {
            self.linear_op(w, b, layer, None).unary(act)
        }
    }

    #[track_caller]
    fn linear_op(
        self,
        w: Var<'t>,
        b: Option<Var<'t>>,
        layer: Option<LayerId>,
        act: Option<Unary>,
    ) -> Var<'t> {
        let tape = self.tape;
        let value = {
            let xv = tape.value_of(self.id);
            let wv = tape.value_of(w.id);
            assert!(
                xv.rank() == 2 && wv.rank() == 2 && xv.dim(1) == wv.dim(1),
                "linear: input {:?} does not fit weight {:?} (expected batch x in and out x in)",
                xv.shape(),
                wv.shape()
            );
            let mut s = xv.matmul_t(false, &wv, true);
            let bias = b.map(|b| tape.value_of(b.id));
            if let Some(bv) = &bias {
                assert_eq!(
                    bv.shape(),
                    &[wv.dim(0)],
                    "linear: bias {:?} does not fit weight {:?}",
                    bv.shape(),
                    wv.shape()
                );
            }
            match (act, &bias) {
                (Some(u), _) => {
                    bias_then_rows(&mut s, bias.as_ref().map(|b| b.data()), wv.dim(0), u)
                }
                (None, Some(bv)) => add_bias_rows(&mut s, bv.data()),
                (None, None) => {}
            }
            s
        };
        let mut parents = vec![self.id, w.id];
        parents.extend(b.map(|b| b.id));
        tape.record(
            Op::Linear {
                x: self.id,
                w: w.id,
                b: b.map(|b| b.id),
                layer,
                act,
            },
            value,
            &parents,
        )
    }
}

/// Adds `bias` to every row of the matrix `s`, rows split across threads when large (each
/// element is one addition, so the bits do not depend on the split).
pub(crate) fn add_bias_rows(s: &mut Tensor, bias: &[f32]) {
    use rayon::prelude::*;
    let n = bias.len().max(1);
    let add = |row: &mut [f32]| {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    };
    let data = s.data_mut();
    if data.len() >= PAR_THRESHOLD {
        data.par_chunks_mut(n).with_min_len(64).for_each(add);
    } else {
        data.chunks_mut(n).for_each(add);
    }
}

/// Column sums of a `rows x cols` matrix, each column summed in row order (deterministic).
/// Large matrices split their columns, never their rows, across threads, so every sum runs in
/// the same order whatever the split.
pub(crate) fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0.0f32; cols];
    if cols == 0 {
        return out;
    }
    let sum_block = |c0: usize, dst: &mut [f32]| {
        for row in m.chunks(cols) {
            for (o, v) in dst.iter_mut().zip(&row[c0..]) {
                *o += v;
            }
        }
    };
    let threads = rayon::current_num_threads();
    if m.len() >= PAR_THRESHOLD && threads > 1 && cols >= 2 * MIN_COLUMN_BLOCK {
        let block = cols.div_ceil(threads).max(MIN_COLUMN_BLOCK);
        out.par_chunks_mut(block)
            .enumerate()
            .for_each(|(i, dst)| sum_block(i * block, dst));
    } else {
        sum_block(0, &mut out);
    }
    out
}

/// The fewest columns a thread sums in [`column_sums`] (a few cache lines of each row).
const MIN_COLUMN_BLOCK: usize = 64;

pub(super) fn linear_backward(
    x: usize,
    w: usize,
    b: Option<usize>,
    layer: Option<LayerId>,
    g: &Tensor,
    sink: &mut GradSink<'_>,
    capture: &HashSet<LayerId>,
) -> Option<LayerCapture> {
    if sink.needs(x) {
        let gx = g.matmul_t(false, sink.value(w), false);
        sink.add(x, gx);
    }
    if sink.needs(w) {
        let gw = g.matmul_t(true, sink.value(x), false);
        sink.add(w, gw);
    }
    if let Some(b) = b
        && sink.needs(b)
    {
        let out = g.dim(1);
        sink.add(b, Tensor::from_vec(column_sums(g.data(), out), &[out]));
    }
    let layer = layer.filter(|l| capture.contains(l))?;
    let a = sink.value(x).clone();
    let batch = a.dim(0);
    Some(LayerCapture {
        layer,
        a,
        g: g.scale(batch as f32),
        has_bias: b.is_some(),
        batch,
        locations: 1,
    })
}
