//! The fused dense layer op `s = x W^T + b`, the capture site of a KFAC block.

use std::collections::HashSet;

use super::{GradSink, Op};
use crate::capture::LayerCapture;
use crate::param::LayerId;
use crate::tape::Var;
use crate::tensor::Tensor;

impl<'t> Var<'t> {
    /// The dense layer `x W^T + b` as one tape op: `x` is `batch x in`, `w` is `out x in`
    /// (PyTorch's layout), `b` is `out`. With a `layer` id, the op is a capture site: when the
    /// tape captures that layer, backward keeps `a = x` and `g = B dL/ds` for KFAC.
    ///
    /// # Panics
    /// If the shapes do not fit, naming them.
    #[track_caller]
    pub fn linear(self, w: Var<'t>, b: Option<Var<'t>>, layer: Option<LayerId>) -> Var<'t> {
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
            if let Some(b) = b {
                let bv = tape.value_of(b.id);
                assert_eq!(
                    bv.shape(),
                    &[wv.dim(0)],
                    "linear: bias {:?} does not fit weight {:?}",
                    bv.shape(),
                    wv.shape()
                );
                add_bias_rows(&mut s, bv.data());
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
            },
            value,
            &parents,
        )
    }
}

/// Adds `bias` to every row of the matrix `s`.
pub(crate) fn add_bias_rows(s: &mut Tensor, bias: &[f32]) {
    let n = bias.len();
    for row in s.data_mut().chunks_mut(n) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Column sums of a `rows x cols` matrix, in row order (deterministic).
pub(crate) fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; cols];
    for row in m.chunks(cols) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    out
}

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
