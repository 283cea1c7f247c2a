//! 2-D max and average pooling over NCHW batches.

use std::hint::select_unpredictable;

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
        // Every output element and its argmax is written.
        let mut out = crate::alloc::scratch(geom.planes * po);
        let mut arg = crate::alloc::Indices::scratch(geom.planes * po);
        let col_spans: Vec<_> = (0..geom.w_out).map(|ow| geom.span(ow, geom.w_in)).collect();
        // Separably: the first maximum of each window's columns in every input row, then the
        // first maximum of those down the window's rows. That is the first maximum (or first
        // NaN) of the window in row-major order, as a single scan would find it. The second
        // pass runs across output columns, one window row at a time, so that the comparisons of
        // neighbouring windows are independent (and vectorize).
        out.par_chunks_mut(po.max(1))
            .zip(arg.par_chunks_mut(po.max(1)))
            .zip(xv.data().par_chunks(pi.max(1)))
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(hv, ha): &mut (Vec<f32>, Vec<u32>), ((o, a), src)| {
                    hv.resize(geom.h_in * geom.w_out, 0.0);
                    ha.resize(geom.h_in * geom.w_out, 0);
                    for ih in 0..geom.h_in {
                        let line = &src[ih * geom.w_in..(ih + 1) * geom.w_in];
                        let (hvr, har) = (
                            &mut hv[ih * geom.w_out..(ih + 1) * geom.w_out],
                            &mut ha[ih * geom.w_out..(ih + 1) * geom.w_out],
                        );
                        for ((v_out, a_out), cols) in hvr.iter_mut().zip(har).zip(&col_spans) {
                            let (best, at) = first_max(cols.clone().map(|iw| (line[iw], iw)));
                            *v_out = best;
                            *a_out = (ih * geom.w_in + at) as u32;
                        }
                    }
                    for (oh, (o_row, a_row)) in o
                        .chunks_exact_mut(geom.w_out.max(1))
                        .zip(a.chunks_exact_mut(geom.w_out.max(1)))
                        .enumerate()
                    {
                        let rows = geom.span(oh, geom.h_in);
                        o_row.copy_from_slice(&hv[rows.start * geom.w_out..][..geom.w_out]);
                        a_row.copy_from_slice(&ha[rows.start * geom.w_out..][..geom.w_out]);
                        for ih in rows.start + 1..rows.end {
                            let (hvr, har) = (
                                &hv[ih * geom.w_out..(ih + 1) * geom.w_out],
                                &ha[ih * geom.w_out..(ih + 1) * geom.w_out],
                            );
                            for (((b, at), &v), &tag) in
                                o_row.iter_mut().zip(a_row.iter_mut()).zip(hvr).zip(har)
                            {
                                (*b, *at) = keep_first_max(*b, *at, v, tag);
                            }
                        }
                    }
                },
            );
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

/// The first largest value of a non-empty sequence and its tag; a NaN counts as larger than
/// any number (so the first NaN wins). Selects rather than branches.
#[inline(always)]
fn first_max<T: Copy>(mut items: impl Iterator<Item = (f32, T)>) -> (f32, T) {
    let (mut best, mut at) = items.next().expect("a pooling window is never empty");
    for (v, tag) in items {
        (best, at) = keep_first_max(best, at, v, tag);
    }
    (best, at)
}

/// The running first maximum `(best, at)` after seeing `v` (tagged `tag`) next: `v` takes over
/// when larger, or when it is the first NaN.
#[inline(always)]
fn keep_first_max<T: Copy>(best: f32, at: T, v: f32, tag: T) -> (f32, T) {
    let take = (v > best) | (v.is_nan() & !best.is_nan());
    // On the bits: an integer select compiles to a conditional move, a float one to a branch
    // that the data mispredicts.
    (
        f32::from_bits(select_unpredictable(take, v.to_bits(), best.to_bits())),
        select_unpredictable(take, tag, at),
    )
}

pub(super) fn max_pool_backward(
    x: usize,
    geom: &PoolGeom,
    arg: &[u32],
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    let (pi, po) = (geom.h_in * geom.w_in, geom.h_out * geom.w_out);
    let mut dx = crate::alloc::zeroed(geom.planes * pi);
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
    let mut dx = crate::alloc::zeroed(geom.planes * pi);
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

#[cfg(test)]
mod tests {
    use crate::tape::Tape;
    use crate::tensor::Tensor;

    use super::PoolGeom;

    /// The first maximum (a NaN beats any number) of each window in row-major order.
    fn reference(x: &[f32], g: &PoolGeom) -> (Vec<f32>, Vec<u32>) {
        let (pi, po) = (g.h_in * g.w_in, g.h_out * g.w_out);
        let mut out = vec![0.0; g.planes * po];
        let mut arg = vec![0; g.planes * po];
        for p in 0..g.planes {
            for oh in 0..g.h_out {
                for ow in 0..g.w_out {
                    let mut at = usize::MAX;
                    let mut best = f32::NEG_INFINITY;
                    for ih in g.span(oh, g.h_in) {
                        for iw in g.span(ow, g.w_in) {
                            let v = x[p * pi + ih * g.w_in + iw];
                            if at == usize::MAX || v > best || (v.is_nan() && !best.is_nan()) {
                                best = v;
                                at = ih * g.w_in + iw;
                            }
                        }
                    }
                    out[p * po + oh * g.w_out + ow] = best;
                    arg[p * po + oh * g.w_out + ow] = at as u32;
                }
            }
        }
        (out, arg)
    }

    #[test]
    fn max_pool_finds_the_first_maximum_and_the_first_nan() {
        // Few distinct values, so windows hold ties; some NaNs.
        let x: Vec<f32> = (0..2 * 3 * 7 * 8)
            .map(|i| match (i * 37) % 11 {
                0 if i % 5 == 0 => f32::NAN,
                v => (v % 4) as f32 - 1.5,
            })
            .collect();
        let x = Tensor::from_vec(x, &[2, 3, 7, 8]);
        for (k, stride, padding) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 1), (4, 3, 2)] {
            let g = PoolGeom::new("max_pool2d", x.shape(), k, stride, padding);
            let (out, arg) = reference(x.data(), &g);
            let tape = Tape::without_params();
            let xv = tape.var(x.clone());
            let y = xv.max_pool2d(k, stride, padding);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let case = format!("k {k} stride {stride} padding {padding}");
            assert_eq!(bits(y.value().data()), bits(&out), "{case}");
            // The gradient lands on the reference's argmax.
            let grads = tape.backward(y.sum());
            let mut expect = vec![0.0f32; x.numel()];
            let (pi, po) = (g.h_in * g.w_in, g.h_out * g.w_out);
            for (o, &a) in arg.iter().enumerate() {
                expect[(o / po) * pi + a as usize] += 1.0;
            }
            assert_eq!(grads.wrt(xv).unwrap().data(), &expect[..], "{case}");
        }
    }
}
