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
        out.par_chunks_mut(po.max(1))
            .zip(arg.par_chunks_mut(po.max(1)))
            .zip(xv.data().par_chunks(pi.max(1)))
            .for_each_init(
                || MaxPoolPlane::new(&geom),
                |plane, ((o, a), src)| plane.pool(src, o, a),
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

/// One thread's working buffers for max pooling a plane, separably: down the windows' rows
/// first, then across their columns.
///
/// The first pass keeps, for each output row and input column, the first maximum (or first
/// NaN) of the window's rows and its row-major index; it runs over whole input rows, so
/// neighbouring columns are independent and the comparisons vectorize. Its rows are then laid
/// out by stride phase: padded column `q = iw + padding` of output row `oh` goes to phase
/// `q % stride`, position `oh * len + q / stride`. The `j`-th column of every window of the
/// plane then lies in one contiguous run (phase `j % stride`, from `j / stride`), one position
/// per window plus `len - w_out` spare ones per row, so the second pass is a few long
/// elementwise loops that vectorize too. Padding columns hold `-inf` tagged `u32::MAX`, which
/// never wins. The second pass breaks ties by the smaller row-major index, so the two together
/// find the first maximum (or first NaN) of each window in row-major order, as a single scan
/// would.
struct MaxPoolPlane {
    geom: PoolGeom,
    /// Column maxima of each output row's window rows and their indices, `h_out x w_in`.
    down: (Vec<f32>, Vec<u32>),
    /// The same by phase: `stride` runs of `phase_len`.
    phases: (Vec<f32>, Vec<u32>),
    /// Positions per output row in a phase.
    len: usize,
    /// Positions per phase: `h_out * len` and room for the last row's windows to read past it.
    phase_len: usize,
    /// Window maxima with `len` positions a row (the first `w_out` of each are the output).
    wide: (Vec<f32>, Vec<u32>),
    /// For each phase that holds input columns: the phase, its first input column, and that
    /// column's position in the phase (the phase's other input columns follow `stride` apart).
    phase_starts: Vec<(usize, usize, usize)>,
}

impl MaxPoolPlane {
    fn new(geom: &PoolGeom) -> Self {
        let len = (geom.w_in + 2 * geom.padding).div_ceil(geom.stride);
        let phase_len = geom.h_out * len + (geom.k - 1) / geom.stride + 1;
        let n = geom.stride * phase_len;
        MaxPoolPlane {
            geom: *geom,
            down: (
                vec![0.0; geom.h_out * geom.w_in],
                vec![0; geom.h_out * geom.w_in],
            ),
            phases: (vec![f32::NEG_INFINITY; n], vec![u32::MAX; n]),
            len,
            phase_len,
            wide: (vec![0.0; geom.h_out * len], vec![0; geom.h_out * len]),
            phase_starts: (0..geom.stride)
                .filter_map(|r| {
                    // The first padded column of phase `r` that is an input column.
                    let q0 =
                        geom.padding + (r + geom.stride - geom.padding % geom.stride) % geom.stride;
                    let iw0 = q0 - geom.padding;
                    (iw0 < geom.w_in).then_some((r, iw0, q0 / geom.stride))
                })
                .collect(),
        }
    }

    /// Pools plane `src` into `out` and its argmax into `arg`.
    fn pool(&mut self, src: &[f32], out: &mut [f32], arg: &mut [u32]) {
        let g = self.geom;
        let (w_in, w_out, stride, len) = (g.w_in, g.w_out, g.stride, self.len);
        let (dv, da) = (&mut self.down.0, &mut self.down.1);
        let (pv, pa) = (&mut self.phases.0, &mut self.phases.1);
        for (oh, (dvr, dar)) in dv
            .chunks_exact_mut(w_in)
            .zip(da.chunks_exact_mut(w_in))
            .enumerate()
        {
            let rows = g.span(oh, g.h_in);
            let first = rows.start * w_in;
            dvr.copy_from_slice(&src[first..first + w_in]);
            for (iw, t) in dar.iter_mut().enumerate() {
                *t = (first + iw) as u32;
            }
            for ih in rows.start + 1..rows.end {
                let line = &src[ih * w_in..(ih + 1) * w_in];
                let base = (ih * w_in) as u32;
                for (iw, ((b, at), &v)) in dvr.iter_mut().zip(dar.iter_mut()).zip(line).enumerate()
                {
                    (*b, *at) = keep_first_max(*b, *at, v, base + iw as u32);
                }
            }
            for &(r, iw0, pos) in &self.phase_starts {
                let at = r * self.phase_len + oh * len + pos;
                let columns = dvr[iw0..]
                    .iter()
                    .step_by(stride)
                    .zip(dar[iw0..].iter().step_by(stride));
                for ((d_v, d_a), (&v, &t)) in pv[at..].iter_mut().zip(&mut pa[at..]).zip(columns) {
                    (*d_v, *d_a) = (v, t);
                }
            }
        }
        let (wv, wa) = (&mut self.wide.0, &mut self.wide.1);
        for j in 0..g.k {
            let from = (j % stride) * self.phase_len + j / stride;
            let (cv, ca) = (&pv[from..from + wv.len()], &pa[from..from + wa.len()]);
            if j == 0 {
                wv.copy_from_slice(cv);
                wa.copy_from_slice(ca);
                continue;
            }
            for (((b, at), &v), &t) in wv.iter_mut().zip(wa.iter_mut()).zip(cv).zip(ca) {
                (*b, *at) = keep_earliest_max(*b, *at, v, t);
            }
        }
        for ((o_row, a_row), (wvr, war)) in out
            .chunks_exact_mut(w_out.max(1))
            .zip(arg.chunks_exact_mut(w_out.max(1)))
            .zip(wv.chunks_exact(len).zip(wa.chunks_exact(len)))
        {
            o_row.copy_from_slice(&wvr[..w_out]);
            a_row.copy_from_slice(&war[..w_out]);
        }
    }
}

/// The running maximum `(best, at)` of candidates seen in any order after seeing `v` (at
/// row-major index `tag`): `v` takes over when larger, when equal and earlier, when it is a NaN
/// and `best` is not, or when both are NaNs and it is earlier. Among the candidates it keeps the
/// first maximum (or first NaN) in row-major order.
#[inline(always)]
fn keep_earliest_max(best: f32, at: u32, v: f32, tag: u32) -> (f32, u32) {
    let earlier = tag < at;
    let take = (v > best) | ((v == best) & earlier) | (v.is_nan() & (!best.is_nan() | earlier));
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
    // Each plane is cleared just before its gradients land, while it is in cache.
    let mut dx = crate::alloc::scratch(geom.planes * pi);
    dx.par_chunks_mut(pi.max(1)).enumerate().for_each(|(p, d)| {
        d.fill(0.0);
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
        for (k, stride, padding) in [
            (2, 2, 0),
            (3, 2, 1),
            (3, 1, 1),
            (2, 1, 1),
            (4, 3, 2),
            (5, 3, 2),
            (1, 1, 0),
            (3, 4, 1),
            (7, 1, 3),
        ] {
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
