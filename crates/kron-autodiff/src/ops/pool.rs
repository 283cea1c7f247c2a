//! 2-D max and average pooling over NCHW batches.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{GradSink, Op};
use crate::tape::Var;
use crate::tensor::Tensor;

/// The geometry of one 2-D pooling over an NCHW batch (square window, same stride and padding on
/// both axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolGeom {
    /// Batch size times channels: the number of independent planes.
    pub planes: usize,
    /// Input height.
    pub h_in: usize,
    /// Input width.
    pub w_in: usize,
    /// Window size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding (ignored by max pooling, counted as zeros by average pooling).
    pub padding: usize,
    /// Output height.
    pub h_out: usize,
    /// Output width.
    pub w_out: usize,
}

impl PoolGeom {
    /// The geometry of pooling input `(n, c, h, w)`.
    ///
    /// # Panics
    /// If the input is not NCHW, the stride is zero, or the padding is more than half the window
    /// (PyTorch's rule, so that every window holds an input element).
    #[track_caller]
    pub fn new(op: &str, input: &[usize], k: usize, stride: usize, padding: usize) -> Self {
        assert_eq!(input.len(), 4, "{op}: input {input:?} is not NCHW");
        assert!(
            k > 0 && stride > 0,
            "{op}: window {k} and stride {stride} must be positive"
        );
        assert!(
            2 * padding <= k,
            "{op}: padding {padding} is more than half the window {k}"
        );
        let (h, w) = (input[2], input[3]);
        assert!(
            h + 2 * padding >= k && w + 2 * padding >= k,
            "{op}: window {k} larger than padded input {h}x{w}"
        );
        PoolGeom {
            planes: input[0] * input[1],
            h_in: h,
            w_in: w,
            k,
            stride,
            padding,
            h_out: (h + 2 * padding - k) / stride + 1,
            w_out: (w + 2 * padding - k) / stride + 1,
        }
    }

    /// The input rows (or columns) covered by output row `o`, clipped to the image.
    fn span(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride).saturating_sub(self.padding);
        let end = (o * self.stride + self.k)
            .saturating_sub(self.padding)
            .min(len);
        start..end
    }
}

impl<'t> Var<'t> {
    /// Max pooling with a `k x k` window, stride and padding (padding never wins the max).
    #[track_caller]
    pub fn max_pool2d(self, k: usize, stride: usize, padding: usize) -> Var<'t> {
        let xv = self.value();
        let geom = PoolGeom::new("max_pool2d", xv.shape(), k, stride, padding);
        let (pi, po) = (geom.h_in * geom.w_in, geom.h_out * geom.w_out);
        let mut out = vec![0.0f32; geom.planes * po];
        let mut arg = vec![0u32; geom.planes * po];
        out.par_chunks_mut(po.max(1))
            .zip(arg.par_chunks_mut(po.max(1)))
            .enumerate()
            .for_each(|(p, (o, a))| {
                let src = &xv.data()[p * pi..(p + 1) * pi];
                for oh in 0..geom.h_out {
                    for ow in 0..geom.w_out {
                        let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
                        for ih in geom.span(oh, geom.h_in) {
                            for iw in geom.span(ow, geom.w_in) {
                                let v = src[ih * geom.w_in + iw];
                                if at == usize::MAX || v > best || (v.is_nan() && !best.is_nan()) {
                                    best = v;
                                    at = ih * geom.w_in + iw;
                                }
                            }
                        }
                        o[oh * geom.w_out + ow] = best;
                        a[oh * geom.w_out + ow] = at as u32;
                    }
                }
            });
        let mut shape = xv.shape().to_vec();
        shape[2] = geom.h_out;
        shape[3] = geom.w_out;
        self.tape.record(
            Op::MaxPool2d {
                x: self.id,
                geom,
                arg,
            },
            Tensor::from_vec(out, &shape),
            &[self.id],
        )
    }

    /// Average pooling with a `k x k` window, stride and zero padding; every window divides by
    /// `k * k` (PyTorch's default, `count_include_pad = true`).
    #[track_caller]
    pub fn avg_pool2d(self, k: usize, stride: usize, padding: usize) -> Var<'t> {
        let xv = self.value();
        let geom = PoolGeom::new("avg_pool2d", xv.shape(), k, stride, padding);
        let (pi, po) = (geom.h_in * geom.w_in, geom.h_out * geom.w_out);
        let inv = 1.0 / (k * k) as f32;
        let mut out = vec![0.0f32; geom.planes * po];
        out.par_chunks_mut(po.max(1))
            .enumerate()
            .for_each(|(p, o)| {
                let src = &xv.data()[p * pi..(p + 1) * pi];
                for oh in 0..geom.h_out {
                    for ow in 0..geom.w_out {
                        let mut s = 0.0f32;
                        for ih in geom.span(oh, geom.h_in) {
                            for iw in geom.span(ow, geom.w_in) {
                                s += src[ih * geom.w_in + iw];
                            }
                        }
                        o[oh * geom.w_out + ow] = s * inv;
                    }
                }
            });
        let mut shape = xv.shape().to_vec();
        shape[2] = geom.h_out;
        shape[3] = geom.w_out;
        self.tape.record(
            Op::AvgPool2d { x: self.id, geom },
            Tensor::from_vec(out, &shape),
            &[self.id],
        )
    }
}

pub(super) fn max_pool_backward(
    x: usize,
    geom: &PoolGeom,
    arg: &[u32],
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    let (pi, po) = (geom.h_in * geom.w_in, geom.h_out * geom.w_out);
    let mut dx = vec![0.0f32; geom.planes * pi];
    dx.par_chunks_mut(pi.max(1)).enumerate().for_each(|(p, d)| {
        let gp = &g.data()[p * po..(p + 1) * po];
        let ap = &arg[p * po..(p + 1) * po];
        for (gv, &a) in gp.iter().zip(ap) {
            d[a as usize] += gv;
        }
    });
    let shape = sink.value(x).shape().to_vec();
    sink.add(x, Tensor::from_vec(dx, &shape));
}

pub(super) fn avg_pool_backward(x: usize, geom: &PoolGeom, g: &Tensor, sink: &mut GradSink<'_>) {
    let (pi, po) = (geom.h_in * geom.w_in, geom.h_out * geom.w_out);
    let inv = 1.0 / (geom.k * geom.k) as f32;
    let mut dx = vec![0.0f32; geom.planes * pi];
    dx.par_chunks_mut(pi.max(1)).enumerate().for_each(|(p, d)| {
        let gp = &g.data()[p * po..(p + 1) * po];
        for oh in 0..geom.h_out {
            for ow in 0..geom.w_out {
                let gv = gp[oh * geom.w_out + ow] * inv;
                for ih in geom.span(oh, geom.h_in) {
                    for iw in geom.span(ow, geom.w_in) {
                        d[ih * geom.w_in + iw] += gv;
                    }
                }
            }
        }
    });
    let shape = sink.value(x).shape().to_vec();
    sink.add(x, Tensor::from_vec(dx, &shape));
}
