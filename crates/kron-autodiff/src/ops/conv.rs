//! The fused 2-D convolution op (im2col + GEMM), the capture site of a KFC block.

use std::collections::HashSet;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{GradSink, Op, Unary};
use crate::alloc::{PooledBuffer, scratch, zeroed};
use crate::capture::LayerCapture;
use crate::gemm::gemm;
use crate::param::LayerId;
use crate::tape::Var;
use crate::tensor::Tensor;

/// The geometry of one 2-D convolution over an NCHW batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvGeom {
    /// Batch size `N`.
    pub batch: usize,
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
    /// Input height.
    pub h_in: usize,
    /// Input width.
    pub w_in: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride, both axes.
    pub stride: usize,
    /// Zero padding, both axes.
    pub padding: usize,
    /// Output height.
    pub h_out: usize,
    /// Output width.
    pub w_out: usize,
}

impl ConvGeom {
    /// The geometry of convolving input `(n, c, h, w)` with weight `(out, c, kh, kw)`.
    ///
    /// # Panics
    /// If the shapes disagree or the kernel does not fit the padded input.
    #[track_caller]
    pub fn new(input: &[usize], weight: &[usize], stride: usize, padding: usize) -> Self {
        assert!(
            input.len() == 4 && weight.len() == 4 && input[1] == weight[1],
            "conv2d: input {input:?} does not fit weight {weight:?} (expected NCHW and out x in x kh x kw)"
        );
        assert!(stride > 0, "conv2d: stride must be positive");
        let (h, w, kh, kw) = (input[2], input[3], weight[2], weight[3]);
        assert!(
            h + 2 * padding >= kh && w + 2 * padding >= kw,
            "conv2d: kernel {kh}x{kw} larger than padded input {h}x{w} (padding {padding})"
        );
        ConvGeom {
            batch: input[0],
            in_ch: input[1],
            out_ch: weight[0],
            h_in: h,
            w_in: w,
            kh,
            kw,
            stride,
            padding,
            h_out: (h + 2 * padding - kh) / stride + 1,
            w_out: (w + 2 * padding - kw) / stride + 1,
        }
    }

    /// Output locations per example, `T = h_out * w_out`.
    pub fn locations(&self) -> usize {
        self.h_out * self.w_out
    }

    /// Patch length, `in_ch * kh * kw`.
    pub fn patch_len(&self) -> usize {
        self.in_ch * self.kh * self.kw
    }
}

/// The im2col patch matrix of an NCHW batch: `(N * T) x (C * kh * kw)`, rows in `(n, t)` order,
/// columns in `(c, kh, kw)` order, zeros where the kernel overhangs the padding.
pub fn im2col(x: &[f32], geom: &ConvGeom) -> Vec<f32> {
    let mut out = scratch(geom.batch * geom.locations() * geom.patch_len());
    im2col_into(x, geom, &mut out);
    out
}

/// Width of an input row with its padding on both sides: every kernel window of a row lies
/// inside it.
fn padded_width(geom: &ConvGeom) -> usize {
    geom.w_in + 2 * geom.padding
}

/// [`im2col`] of the images of `x` into `out` (one block of `T x K` per image), image-parallel.
/// Writes every element of `out`, the padding's zeros included, so `out` may hold anything.
fn im2col_into(x: &[f32], geom: &ConvGeom, out: &mut [f32]) {
    let img = geom.in_ch * geom.h_in * geom.w_in;
    out.par_chunks_mut((geom.locations() * geom.patch_len()).max(1))
        .zip(x.par_chunks(img.max(1)))
        .for_each_init(
            || vec![0.0f32; geom.in_ch * geom.kh * padded_width(geom)],
            |rows, (dst, src)| match geom.kw {
                // Kernel rows of the common widths copy as fixed-size arrays.
                3 => im2col_image::<3>(src, geom, rows, dst),
                5 => im2col_image::<5>(src, geom, rows, dst),
                _ => im2col_image::<0>(src, geom, rows, dst),
            },
        );
}

/// The input row `ih` of channel `c` that kernel row `i` of output row `oh` reads, or `None`
/// where it falls in the padding.
fn input_row(geom: &ConvGeom, oh: usize, i: usize) -> Option<usize> {
    (oh * geom.stride + i)
        .checked_sub(geom.padding)
        .filter(|&ih| ih < geom.h_in)
}

/// The patch rows of one image; `KW` is the kernel width when it is known at compile time
/// (`0` otherwise). `rows` holds `C * kh` padded rows of [`padded_width`].
///
/// For each output row, the input rows that its kernel rows read are copied once into the
/// middle of `rows` (zeros where a kernel row falls in the padding; the padding columns are
/// zero); each patch row is then written front to back, `kw` values per channel and kernel
/// row, with no bounds to test.
#[inline(always)]
fn im2col_image<const KW: usize>(src: &[f32], geom: &ConvGeom, rows: &mut [f32], dst: &mut [f32]) {
    let (plane, k_len, kw, w_in) = (geom.h_in * geom.w_in, geom.patch_len(), geom.kw, geom.w_in);
    let (p, wp) = (geom.padding, padded_width(geom));
    for (oh, out_rows) in dst
        .chunks_exact_mut(geom.w_out * k_len)
        .enumerate()
        .take(geom.h_out)
    {
        for (ci, row) in rows.chunks_exact_mut(wp).enumerate() {
            let (c, i) = (ci / geom.kh, ci % geom.kh);
            match input_row(geom, oh, i) {
                Some(ih) => row[p..p + w_in].copy_from_slice(&src[c * plane + ih * w_in..][..w_in]),
                None => row[p..p + w_in].fill(0.0),
            }
        }
        for (ow, patch) in out_rows.chunks_exact_mut(k_len).enumerate() {
            let from = ow * geom.stride;
            if KW != 0 {
                for (d, row) in patch.chunks_exact_mut(KW).zip(rows.chunks_exact(wp)) {
                    let s: &[f32; KW] = row[from..from + KW].try_into().unwrap();
                    let d: &mut [f32; KW] = d.try_into().unwrap();
                    *d = *s;
                }
            } else {
                for (d, row) in patch.chunks_exact_mut(kw).zip(rows.chunks_exact(wp)) {
                    d.copy_from_slice(&row[from..from + kw]);
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: sums patch gradients back into an NCHW image gradient.
pub fn col2im(dp: &[f32], geom: &ConvGeom) -> Vec<f32> {
    let mut dx = zeroed(geom.batch * geom.in_ch * geom.h_in * geom.w_in);
    col2im_into(dp, geom, &mut dx);
    dx
}

/// [`col2im`] of the images whose patch rows `dp` holds, added into their gradients `dx`
/// (`dp.len() / (T * K)` images). Each input element sums its patch entries in `(oh, ow)`
/// order for any split of the batch, so the bits do not depend on the split.
fn col2im_into(dp: &[f32], geom: &ConvGeom, dx: &mut [f32]) {
    let (t_len, k_len) = (geom.locations(), geom.patch_len());
    let img = geom.in_ch * geom.h_in * geom.w_in;
    dx.par_chunks_mut(img.max(1))
        .zip(dp.par_chunks((t_len * k_len).max(1)))
        .for_each_init(
            || vec![0.0f32; padded_width(geom)],
            |row, (dst, src)| match geom.kw {
                3 => col2im_image::<3>(src, geom, row, dst),
                5 => col2im_image::<5>(src, geom, row, dst),
                _ => col2im_image::<0>(src, geom, row, dst),
            },
        );
}

/// The gradient of one image from its patch rows; `KW` and `row` as in `im2col_image`.
///
/// For each output row, channel and kernel row inside the image, the input row's gradient is
/// copied into the middle of `row`, every output column adds its kernel row into it (what lands
/// in the padding is dropped), and the middle is copied back. An input element thus receives
/// its entries in `(oh, ow)` order, each added to its running sum.
#[inline(always)]
fn col2im_image<const KW: usize>(src: &[f32], geom: &ConvGeom, row: &mut [f32], dst: &mut [f32]) {
    let (plane, k_len, kw, w_in) = (geom.h_in * geom.w_in, geom.patch_len(), geom.kw, geom.w_in);
    let p = geom.padding;
    for (oh, rows) in src
        .chunks_exact(geom.w_out * k_len)
        .enumerate()
        .take(geom.h_out)
    {
        for c in 0..geom.in_ch {
            for i in 0..geom.kh {
                let Some(ih) = input_row(geom, oh, i) else {
                    continue;
                };
                let off = (c * geom.kh + i) * kw;
                let line = &mut dst[c * plane + ih * w_in..][..w_in];
                row[p..p + w_in].copy_from_slice(line);
                let done = if KW != 0 && geom.stride == 1 {
                    add_kernel_rows::<KW>(rows, k_len, off, geom.w_out, row)
                } else {
                    0
                };
                for (ow, patch) in rows.chunks_exact(k_len).enumerate().skip(done) {
                    let to = ow * geom.stride;
                    if KW != 0 {
                        let s: &[f32; KW] = patch[off..off + KW].try_into().unwrap();
                        let d: &mut [f32; KW] = (&mut row[to..to + KW]).try_into().unwrap();
                        for j in 0..KW {
                            d[j] += s[j];
                        }
                    } else {
                        for (d, s) in row[to..to + kw].iter_mut().zip(&patch[off..off + kw]) {
                            *d += s;
                        }
                    }
                }
                line.copy_from_slice(&row[p..p + w_in]);
            }
        }
    }
}

/// At stride 1, adds the kernel rows (entries `off..off + KW`) of the first output columns
/// of `rows`, [`COLUMNS`] at a time, into `row` (column `ow` into `row[ow..ow + KW]`); returns
/// how many columns it added.
///
/// The sums of a group's `COLUMNS + KW - 1` elements stay in registers, and the last `KW - 1`
/// of them, which the next group adds to, are carried over rather than stored and loaded
/// again: adding column by column into memory makes each add wait for the previous column's
/// overlapping store. Each element still receives its entries in column order.
#[inline(always)]
fn add_kernel_rows<const KW: usize>(
    rows: &[f32],
    k_len: usize,
    off: usize,
    w_out: usize,
    row: &mut [f32],
) -> usize {
    let span = COLUMNS + KW - 1;
    if span > CARRY {
        return 0;
    }
    let mut acc = [0.0f32; CARRY];
    acc[..KW - 1].copy_from_slice(&row[..KW - 1]);
    let mut ow = 0;
    while ow + COLUMNS <= w_out {
        acc[KW - 1..span].copy_from_slice(&row[ow + KW - 1..ow + span]);
        for r in 0..COLUMNS {
            let s: &[f32; KW] = rows[(ow + r) * k_len + off..][..KW].try_into().unwrap();
            for j in 0..KW {
                acc[r + j] += s[j];
            }
        }
        row[ow..ow + COLUMNS].copy_from_slice(&acc[..COLUMNS]);
        acc.copy_within(COLUMNS..span, 0);
        ow += COLUMNS;
    }
    row[ow..ow + KW - 1].copy_from_slice(&acc[..KW - 1]);
    ow
}

/// Output columns whose kernel rows [`add_kernel_rows`] adds as one group.
const COLUMNS: usize = 4;

/// Room for a group's sums in [`add_kernel_rows`] (kernels up to `CARRY - COLUMNS + 1` wide).
const CARRY: usize = 12;

impl<'t> Var<'t> {
    /// 2-D convolution of an NCHW batch with weight `out x in x kh x kw` and bias `out`, by
    /// im2col and one GEMM, batch-parallel. With a `layer` id the op is a capture site: the
    /// patch matrix it builds anyway becomes KFC's `a`.
    ///
    /// # Panics
    /// If the shapes do not fit, naming them.
    #[track_caller]
    pub fn conv2d(
        self,
        w: Var<'t>,
        b: Option<Var<'t>>,
        stride: usize,
        padding: usize,
        layer: Option<LayerId>,
    ) -> Var<'t> {
        self.conv2d_op(w, b, stride, padding, layer, false)
    }

    /// `conv2d(..).relu()` as one op, with the same values and gradients bit for bit: the ReLU
    /// is applied in the pass that lays the GEMM's rows out as NCHW, and its mask in the
    /// backward pass that lays the gradient back out as rows, so neither the pre-activation
    /// nor its gradient is ever stored. A capture site captures the gradient with respect to
    /// the pre-activation, as it would without the ReLU.
    ///
    /// # Panics
    /// If the shapes do not fit, naming them.
    #[track_caller]
    pub fn conv2d_relu(
        self,
        w: Var<'t>,
        b: Option<Var<'t>>,
        stride: usize,
        padding: usize,
        layer: Option<LayerId>,
    ) -> Var<'t> {
        self.conv2d_op(w, b, stride, padding, layer, true)
    }

    #[track_caller]
    fn conv2d_op(
        self,
        w: Var<'t>,
        b: Option<Var<'t>>,
        stride: usize,
        padding: usize,
        layer: Option<LayerId>,
        relu: bool,
    ) -> Var<'t> {
        let tape = self.tape;
        let (value, patches, geom) = {
            let xv = tape.value_of(self.id);
            let wv = tape.value_of(w.id);
            let geom = ConvGeom::new(xv.shape(), wv.shape(), stride, padding);
            let bias = b.map(|b| tape.value_of(b.id).clone());
            if let Some(bv) = &bias {
                assert_eq!(
                    bv.shape(),
                    &[geom.out_ch],
                    "conv2d: bias {:?} does not fit weight {:?}",
                    bv.shape(),
                    wv.shape()
                );
            }
            forward(&xv, &wv, &geom, bias.as_ref().map(Tensor::data), relu)
        };
        let mut parents = vec![self.id, w.id];
        parents.extend(b.map(|b| b.id));
        tape.record(
            Op::Conv2d {
                x: self.id,
                w: w.id,
                b: b.map(|b| b.id),
                geom,
                patches,
                layer,
                relu,
            },
            value,
            &parents,
        )
    }
}

/// The gradient `g` through a ReLU whose output is `y`: the reverse and tangent rule of
/// [`Unary::Relu`], computed as they compute it (`y > 0` exactly where the input is).
#[inline(always)]
pub(super) fn relu_grad(g: f32, y: f32) -> f32 {
    g * Unary::Relu.derivative(y, y)
}

/// The convolution of `x` with `w` (and `bias`) in the geometry `geom`: the NCHW output and the
/// `(N*T) x (in*kh*kw)` patch matrix it was computed from.
///
/// A few images at a time, each block wholly on one thread and the blocks side by side: their
/// patches (kept whole for the backward pass and the capture), their GEMM while the patches
/// are in cache, and their rows into NCHW with the bias. Rows of a GEMM do not depend on how
/// the rows are split.
fn forward(
    x: &Tensor,
    w: &Tensor,
    geom: &ConvGeom,
    bias: Option<&[f32]>,
    relu: bool,
) -> (Tensor, Tensor, ConvGeom) {
    let geom = *geom;
    let (nt, k, oc) = (geom.batch * geom.locations(), geom.patch_len(), geom.out_ch);
    let (t_len, img) = (geom.locations(), geom.in_ch * geom.h_in * geom.w_in);
    let images = (BLOCK / (t_len * k).max(1)).clamp(1, geom.batch.max(1));
    // Every element of `patches`, of `out` and of each GEMM block `s` (beta = 0) is written.
    let mut patches = scratch(nt * k);
    let mut out = scratch(geom.batch * oc * t_len);
    patches
        .par_chunks_mut((images * t_len * k).max(1))
        .zip(out.par_chunks_mut((images * oc * t_len).max(1)))
        .enumerate()
        .for_each(|(bi, (pb, ob))| {
            let (n0, rows) = (bi * images, pb.len() / k.max(1));
            let nb = rows / t_len.max(1);
            im2col_into(&x.data()[n0 * img..(n0 + nb) * img], &geom, pb);
            let mut sb = PooledBuffer::stale(rows * oc);
            gemm(rows, k, oc, 1.0, pb, false, w.data(), true, 0.0, &mut sb);
            rows_to_nchw(&sb, &geom, bias, relu, ob);
        });
    (
        Tensor::from_vec(out, &[geom.batch, oc, geom.h_out, geom.w_out]),
        Tensor::from_vec(patches, &[nt, k]),
        geom,
    )
}

/// The convolution of a tangent `x` with `w` (no bias) in the geometry `geom`, NCHW.
pub(super) fn conv2d_values(x: &Tensor, w: &Tensor, geom: &ConvGeom) -> Tensor {
    forward(x, w, geom, None, false).0
}

/// `(N*T) x out` rows to an NCHW tensor, adding `bias`.
pub(super) fn rows_to_nchw_tensor(s: &[f32], geom: &ConvGeom, bias: Option<&[f32]>) -> Tensor {
    let mut out = scratch(geom.batch * geom.out_ch * geom.locations());
    rows_to_nchw(s, geom, bias, false, &mut out);
    Tensor::from_vec(out, &[geom.batch, geom.out_ch, geom.h_out, geom.w_out])
}

/// `(N*T) x out` rows of whole images to NCHW in `out`, adding the bias and then applying the
/// ReLU if `relu`.
fn rows_to_nchw(s: &[f32], geom: &ConvGeom, bias: Option<&[f32]>, relu: bool, out: &mut [f32]) {
    if relu {
        rows_to_nchw_with(s, geom, bias, out, |v| Unary::Relu.eval(v));
    } else {
        rows_to_nchw_with(s, geom, bias, out, |v| v);
    }
}

/// [`rows_to_nchw`] with `f` applied to each biased value.
#[inline(always)]
fn rows_to_nchw_with(
    s: &[f32],
    geom: &ConvGeom,
    bias: Option<&[f32]>,
    out: &mut [f32],
    f: impl Fn(f32) -> f32 + Sync,
) {
    let (t_len, oc) = (geom.locations(), geom.out_ch);
    out.par_chunks_mut((oc * t_len).max(1))
        .zip(s.par_chunks((t_len * oc).max(1)))
        .for_each(|(dst, src)| {
            // A few locations at a time, so that the rows read stay in L1 across channels.
            for t0 in (0..t_len).step_by(TRANSPOSE_TILE) {
                let t1 = (t0 + TRANSPOSE_TILE).min(t_len);
                // 4 x 4 blocks: four rows of four channels read, four runs of four locations
                // written.
                let (t4, o4) = (t0 + (t1 - t0) / 4 * 4, oc / 4 * 4);
                for t in (t0..t4).step_by(4) {
                    for o in (0..o4).step_by(4) {
                        let mut blk = [[0.0f32; 4]; 4];
                        for (j, b) in blk.iter_mut().enumerate() {
                            b.copy_from_slice(&src[(t + j) * oc + o..][..4]);
                        }
                        for i in 0..4 {
                            let bo = bias.map_or(0.0, |b| b[o + i]);
                            let d: &mut [f32] = &mut dst[(o + i) * t_len + t..][..4];
                            for j in 0..4 {
                                d[j] = f(blk[j][i] + bo);
                            }
                        }
                    }
                }
                // The rest, one element at a time.
                for o in 0..oc {
                    let b = bias.map_or(0.0, |b| b[o]);
                    let from = if o < o4 { t4 } else { t0 };
                    for t in from..t1 {
                        dst[o * t_len + t] = f(src[t * oc + o] + b);
                    }
                }
            }
        });
}

/// Locations per tile of the NCHW <-> rows transposes.
const TRANSPOSE_TILE: usize = 64;

/// The sum of each column of `(N*T) x out` rows: the bias gradient. Each column sums its
/// elements in row order, [`SUM_GROUP`] columns side by side (independent additions, which
/// vectorize); the groups split across threads (each sum in one thread, so the bits do not
/// depend on the split).
fn column_sums(rows: &[f32], oc: usize) -> Vec<f32> {
    let groups: Vec<usize> = (0..oc).step_by(SUM_GROUP).collect();
    let sums = |&o0: &usize| {
        let width = SUM_GROUP.min(oc - o0);
        let mut acc = [0.0f32; SUM_GROUP];
        for row in rows.chunks_exact(oc.max(1)) {
            if width == SUM_GROUP {
                let row: &[f32; SUM_GROUP] = row[o0..o0 + SUM_GROUP].try_into().unwrap();
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            } else {
                for (a, v) in acc.iter_mut().zip(&row[o0..o0 + width]) {
                    *a += v;
                }
            }
        }
        acc[..width].to_vec()
    };
    let per_group: Vec<Vec<f32>> = if rows.len() >= crate::tensor::PAR_THRESHOLD {
        groups.par_iter().map(sums).collect()
    } else {
        groups.iter().map(sums).collect()
    };
    per_group.concat()
}

/// Columns that [`column_sums`] adds side by side: a cache line of each row.
const SUM_GROUP: usize = 16;

/// NCHW gradient to `(N*T) x out` rows (through the ReLU whose output is `after`, if any).
fn nchw_to_rows(g: &[f32], after: Option<&[f32]>, geom: &ConvGeom) -> Vec<f32> {
    let mut out = scratch(g.len());
    match after {
        Some(y) => nchw_to_rows_with(g, y, geom, &mut out, relu_grad),
        // `g` stands in for the unread second input.
        None => nchw_to_rows_with(g, g, geom, &mut out, |v, _| v),
    }
    out
}

/// [`nchw_to_rows`] of `f(g, y)`, with `y` laid out as `g`.
#[inline(always)]
fn nchw_to_rows_with(
    g: &[f32],
    y: &[f32],
    geom: &ConvGeom,
    out: &mut [f32],
    f: impl Fn(f32, f32) -> f32 + Sync,
) {
    let (t_len, oc) = (geom.locations(), geom.out_ch);
    let img = oc * t_len;
    out.par_chunks_mut(img.max(1))
        .enumerate()
        .for_each(|(n, dst)| {
            let (src, ys) = (&g[n * img..(n + 1) * img], &y[n * img..(n + 1) * img]);
            for t0 in (0..t_len).step_by(TRANSPOSE_TILE) {
                let t1 = (t0 + TRANSPOSE_TILE).min(t_len);
                for o in 0..oc {
                    let run = o * t_len + t0..o * t_len + t1;
                    for (t, (s, y)) in (t0..t1).zip(src[run.clone()].iter().zip(&ys[run])) {
                        dst[t * oc + o] = f(*s, *y);
                    }
                }
            }
        });
}

/// Elements (2 MiB) of patches, or of their gradient, that the forward and backward passes
/// work on at a time: a few images' worth, so that they stay in cache between steps. On the conv
/// net at batch 128 (2 cores), 2 MiB beat 4 MiB by 1.5-2.5% a step in four of five alternated
/// runs; 1 MiB loses more to handing each block to the threads than it gains, 8 and 16 MiB
/// match 4.
const BLOCK: usize = (2 << 20) / std::mem::size_of::<f32>();

#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d_backward(
    x: usize,
    w: usize,
    b: Option<usize>,
    geom: &ConvGeom,
    patches: &Tensor,
    layer: Option<LayerId>,
    after: Option<&Tensor>,
    g: &Tensor,
    sink: &mut GradSink<'_>,
    capture: &HashSet<LayerId>,
) -> Option<LayerCapture> {
    let (nt, k, oc) = (geom.batch * geom.locations(), geom.patch_len(), geom.out_ch);
    let after = after.map(Tensor::data);
    // Back to the pool on every path: dropped, or kept as the capture's storage.
    let g_rows = PooledBuffer::adopt(nchw_to_rows(g.data(), after, geom));
    if sink.needs(w) {
        let mut gw = vec![0.0f32; oc * k];
        gemm(
            oc,
            nt,
            k,
            1.0,
            &g_rows,
            true,
            patches.data(),
            false,
            0.0,
            &mut gw,
        );
        let shape = sink.value(w).shape().to_vec();
        sink.add(w, Tensor::from_vec(gw, &shape));
    }
    if let Some(b) = b
        && sink.needs(b)
    {
        sink.add(b, Tensor::from_vec(column_sums(&g_rows, oc), &[oc]));
    }
    if sink.needs(x) {
        // The patch gradient `g W`, a few images at a time, each block folded back into the
        // image gradient while it is still in cache (the whole `(N*T) x K` matrix is never
        // built). The blocks run side by side, each wholly on one thread. Rows of a GEMM do
        // not depend on how the rows are split, nor do col2im's sums.
        let (t_len, per_image) = (geom.locations(), geom.locations() * k);
        let images = (BLOCK / per_image.max(1)).clamp(1, geom.batch.max(1));
        let img = geom.in_ch * geom.h_in * geom.w_in;
        let mut dx = zeroed(geom.batch * img);
        let wv = sink.value(w).data();
        dx.par_chunks_mut((images * img).max(1))
            .enumerate()
            .for_each(|(bi, dxb)| {
                let (n0, nb) = (bi * images, dxb.len() / img.max(1));
                let rows = nb * t_len;
                // Written whole by its GEMM (beta = 0) before col2im reads it.
                let mut dpb = PooledBuffer::stale(nb * per_image);
                gemm(
                    rows,
                    oc,
                    k,
                    1.0,
                    &g_rows[n0 * t_len * oc..][..rows * oc],
                    false,
                    wv,
                    false,
                    0.0,
                    &mut dpb,
                );
                col2im_into(&dpb, geom, dxb);
            });
        let shape = sink.value(x).shape().to_vec();
        sink.add(x, Tensor::from_vec(dx, &shape));
    }
    // Without a capture, `g_rows` drops here and returns to the pool.
    let layer = layer.filter(|l| capture.contains(l))?;
    let batch = geom.batch as f32;
    let mut g_cap = g_rows.into_vec();
    for v in &mut g_cap {
        *v *= batch;
    }
    Some(LayerCapture {
        layer,
        a: patches.clone(),
        g: Tensor::from_vec(g_cap, &[nt, oc]),
        has_bias: b.is_some(),
        batch: geom.batch,
        locations: geom.locations(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The element-by-element definitions of im2col and col2im, in the loop order of the
    /// sums (rows `(n, oh, ow)`, then `(c, i, j)`).
    fn reference(x: &[f32], dp: &[f32], g: &ConvGeom) -> (Vec<f32>, Vec<f32>) {
        let (t_len, k_len) = (g.locations(), g.patch_len());
        let plane = g.h_in * g.w_in;
        let mut p = vec![0.0f32; g.batch * t_len * k_len];
        let mut dx = vec![0.0f32; g.batch * g.in_ch * plane];
        for n in 0..g.batch {
            for oh in 0..g.h_out {
                for ow in 0..g.w_out {
                    let r = (n * t_len + oh * g.w_out + ow) * k_len;
                    for c in 0..g.in_ch {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let ih = (oh * g.stride + i) as isize - g.padding as isize;
                                let iw = (ow * g.stride + j) as isize - g.padding as isize;
                                if ih < 0
                                    || iw < 0
                                    || ih >= g.h_in as isize
                                    || iw >= g.w_in as isize
                                {
                                    continue;
                                }
                                let at =
                                    (n * g.in_ch + c) * plane + ih as usize * g.w_in + iw as usize;
                                let col = (c * g.kh + i) * g.kw + j;
                                p[r + col] = x[at];
                                dx[at] += dp[r + col];
                            }
                        }
                    }
                }
            }
        }
        (p, dx)
    }

    #[test]
    fn im2col_and_col2im_match_their_definitions_bit_for_bit() {
        let mut rng = Rng::new(3);
        for (kh, kw) in [(1, 1), (2, 3), (3, 3), (5, 5), (4, 7), (5, 2)] {
            for stride in 1..=3 {
                for padding in 0..=3 {
                    let (h, w) = (6, 9);
                    if h + 2 * padding < kh || w + 2 * padding < kw {
                        continue;
                    }
                    let g = ConvGeom::new(&[2, 3, h, w], &[4, 3, kh, kw], stride, padding);
                    let x = Tensor::randn(&[2, 3, h, w], 0.0, 1.0, &mut rng);
                    let rows = g.batch * g.locations() * g.patch_len();
                    let dp = Tensor::randn(&[rows], 0.0, 1.0, &mut rng);
                    let (p, dx) = reference(x.data(), dp.data(), &g);
                    let case = format!("kernel {kh}x{kw} stride {stride} padding {padding}");
                    assert_eq!(im2col(x.data(), &g), p, "im2col, {case}");
                    assert_eq!(col2im(dp.data(), &g), dx, "col2im, {case}");
                }
            }
        }
    }

    #[test]
    fn layout_passes_and_bias_sums_match_their_definitions_bit_for_bit() {
        let mut rng = Rng::new(8);
        // Channel counts around the 4 x 4 blocks and the summed groups; widths with and
        // without a partial tile.
        for (oc, h, w) in [(3, 5, 7), (16, 9, 9), (37, 4, 4), (64, 8, 8)] {
            let g = ConvGeom::new(&[3, 1, h, w], &[oc, 1, 1, 1], 1, 0);
            let t_len = g.locations();
            let rows = Tensor::randn(&[3 * t_len * oc], 0.0, 1.0, &mut rng);
            let bias = Tensor::randn(&[oc], 0.0, 1.0, &mut rng);
            let (r, b) = (rows.data(), bias.data());
            for relu in [false, true] {
                let mut got = vec![0.0f32; r.len()];
                rows_to_nchw(r, &g, Some(b), relu, &mut got);
                for n in 0..3 {
                    for o in 0..oc {
                        for t in 0..t_len {
                            let v = r[(n * t_len + t) * oc + o] + b[o];
                            let want = if relu { v.max(0.0) } else { v };
                            let at = (n * oc + o) * t_len + t;
                            assert_eq!(got[at].to_bits(), want.to_bits(), "oc {oc} relu {relu}");
                        }
                    }
                }
            }
            let mut want = vec![0.0f32; oc];
            for row in r.chunks(oc) {
                for (a, v) in want.iter_mut().zip(row) {
                    *a += v;
                }
            }
            assert_eq!(column_sums(r, oc), want, "column sums, oc {oc}");
        }
    }

    #[test]
    fn blocks_of_images_equal_whole_gemms() {
        let mut rng = Rng::new(5);
        let (n, c, h, w, oc) = (10, 64, 16, 16, 8);
        let x = Tensor::randn(&[n, c, h, w], 0.0, 1.0, &mut rng);
        let wt = Tensor::randn(&[oc, c, 3, 3], 0.0, 0.1, &mut rng);
        let r = Tensor::randn(&[n, oc, h, w], 0.0, 1.0, &mut rng);
        let geom = ConvGeom::new(x.shape(), wt.shape(), 1, 1);
        // Several blocks of images, the last one partial.
        let per_block = BLOCK / (geom.locations() * geom.patch_len());
        assert!(per_block > 1 && n % per_block != 0 && n > per_block);

        let tape = crate::Tape::without_params();
        let (xv, wv) = (tape.var(x.clone()), tape.var(wt.clone()));
        let y = xv.conv2d(wv, None, 1, 1, None);
        let grads = tape.backward((y * tape.input(r.clone())).sum());

        let (nt, k) = (n * geom.locations(), geom.patch_len());
        // The forward pass in blocks, too, against one whole GEMM.
        let mut rows = vec![0.0f32; nt * oc];
        let patches = im2col(x.data(), &geom);
        gemm(
            nt,
            k,
            oc,
            1.0,
            &patches,
            false,
            wt.data(),
            true,
            0.0,
            &mut rows,
        );
        let mut expect = vec![0.0f32; nt * oc];
        rows_to_nchw(&rows, &geom, None, false, &mut expect);
        assert_eq!(y.value().data(), &expect[..]);
        let g_rows = nchw_to_rows(r.data(), None, &geom);
        let mut dp = vec![0.0f32; nt * k];
        gemm(
            nt,
            oc,
            k,
            1.0,
            &g_rows,
            false,
            wt.data(),
            false,
            0.0,
            &mut dp,
        );
        assert_eq!(grads.wrt(xv).unwrap().data(), &col2im(&dp, &geom)[..]);
    }
}
