//! The fused 2-D convolution op (im2col + GEMM), the capture site of a KFC block.

use std::collections::HashSet;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{GradSink, Op};
use crate::capture::LayerCapture;
use crate::gemm::gemm;
use crate::ops::linear::column_sums;
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

    /// For output position `(oh, ow)` and kernel offset `(i, j)`, the input coordinates, if
    /// inside the image.
    #[inline]
    fn source(&self, oh: usize, ow: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let ih = (oh * self.stride + i).checked_sub(self.padding)?;
        let iw = (ow * self.stride + j).checked_sub(self.padding)?;
        (ih < self.h_in && iw < self.w_in).then_some((ih, iw))
    }
}

/// The im2col patch matrix of an NCHW batch: `(N * T) x (C * kh * kw)`, rows in `(n, t)` order,
/// columns in `(c, kh, kw)` order, zeros where the kernel overhangs the padding.
pub fn im2col(x: &[f32], geom: &ConvGeom) -> Vec<f32> {
    let (t_len, k_len) = (geom.locations(), geom.patch_len());
    let plane = geom.h_in * geom.w_in;
    let img = geom.in_ch * plane;
    let mut out = vec![0.0f32; geom.batch * t_len * k_len];
    out.par_chunks_mut((t_len * k_len).max(1))
        .enumerate()
        .for_each(|(n, dst)| {
            let src = &x[n * img..(n + 1) * img];
            for oh in 0..geom.h_out {
                for ow in 0..geom.w_out {
                    let row = &mut dst[(oh * geom.w_out + ow) * k_len..][..k_len];
                    for c in 0..geom.in_ch {
                        for i in 0..geom.kh {
                            for j in 0..geom.kw {
                                if let Some((ih, iw)) = geom.source(oh, ow, i, j) {
                                    row[(c * geom.kh + i) * geom.kw + j] =
                                        src[c * plane + ih * geom.w_in + iw];
                                }
                            }
                        }
                    }
                }
            }
        });
    out
}

/// The adjoint of [`im2col`]: sums patch gradients back into an NCHW image gradient.
pub fn col2im(dp: &[f32], geom: &ConvGeom) -> Vec<f32> {
    let (t_len, k_len) = (geom.locations(), geom.patch_len());
    let plane = geom.h_in * geom.w_in;
    let img = geom.in_ch * plane;
    let mut dx = vec![0.0f32; geom.batch * img];
    dx.par_chunks_mut(img.max(1))
        .enumerate()
        .for_each(|(n, dst)| {
            let src = &dp[n * t_len * k_len..(n + 1) * t_len * k_len];
            for oh in 0..geom.h_out {
                for ow in 0..geom.w_out {
                    let row = &src[(oh * geom.w_out + ow) * k_len..][..k_len];
                    for c in 0..geom.in_ch {
                        for i in 0..geom.kh {
                            for j in 0..geom.kw {
                                if let Some((ih, iw)) = geom.source(oh, ow, i, j) {
                                    dst[c * plane + ih * geom.w_in + iw] +=
                                        row[(c * geom.kh + i) * geom.kw + j];
                                }
                            }
                        }
                    }
                }
            }
        });
    dx
}

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
        let tape = self.tape;
        let (value, geom, patches) = {
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
            let patches = im2col(xv.data(), &geom);
            let (nt, k, oc) = (geom.batch * geom.locations(), geom.patch_len(), geom.out_ch);
            let mut s = vec![0.0f32; nt * oc];
            gemm(
                nt,
                k,
                oc,
                1.0,
                &patches,
                false,
                wv.data(),
                true,
                0.0,
                &mut s,
            );
            let out = rows_to_nchw(&s, &geom, bias.as_ref().map(|b| b.data()));
            let patches = Tensor::from_vec(patches, &[nt, k]);
            (
                Tensor::from_vec(out, &[geom.batch, oc, geom.h_out, geom.w_out]),
                geom,
                patches,
            )
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
            },
            value,
            &parents,
        )
    }
}

/// `(N*T) x out` rows to NCHW, adding the bias.
fn rows_to_nchw(s: &[f32], geom: &ConvGeom, bias: Option<&[f32]>) -> Vec<f32> {
    let (t_len, oc) = (geom.locations(), geom.out_ch);
    let mut out = vec![0.0f32; geom.batch * oc * t_len];
    out.par_chunks_mut((oc * t_len).max(1))
        .enumerate()
        .for_each(|(n, dst)| {
            let src = &s[n * t_len * oc..(n + 1) * t_len * oc];
            for o in 0..oc {
                let b = bias.map_or(0.0, |b| b[o]);
                for t in 0..t_len {
                    dst[o * t_len + t] = src[t * oc + o] + b;
                }
            }
        });
    out
}

/// NCHW gradient to `(N*T) x out` rows.
fn nchw_to_rows(g: &[f32], geom: &ConvGeom) -> Vec<f32> {
    let (t_len, oc) = (geom.locations(), geom.out_ch);
    let mut out = vec![0.0f32; geom.batch * oc * t_len];
    out.par_chunks_mut((oc * t_len).max(1))
        .enumerate()
        .for_each(|(n, dst)| {
            let src = &g[n * oc * t_len..(n + 1) * oc * t_len];
            for o in 0..oc {
                for t in 0..t_len {
                    dst[t * oc + o] = src[o * t_len + t];
                }
            }
        });
    out
}

#[allow(clippy::too_many_arguments)]
pub(super) fn conv2d_backward(
    x: usize,
    w: usize,
    b: Option<usize>,
    geom: &ConvGeom,
    patches: &Tensor,
    layer: Option<LayerId>,
    g: &Tensor,
    sink: &mut GradSink<'_>,
    capture: &HashSet<LayerId>,
) -> Option<LayerCapture> {
    let (nt, k, oc) = (geom.batch * geom.locations(), geom.patch_len(), geom.out_ch);
    let g_rows = nchw_to_rows(g.data(), geom);
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
        let mut dp = vec![0.0f32; nt * k];
        gemm(
            nt,
            oc,
            k,
            1.0,
            &g_rows,
            false,
            sink.value(w).data(),
            false,
            0.0,
            &mut dp,
        );
        let dx = col2im(&dp, geom);
        let shape = sink.value(x).shape().to_vec();
        sink.add(x, Tensor::from_vec(dx, &shape));
    }
    let layer = layer.filter(|l| capture.contains(l))?;
    let batch = geom.batch as f32;
    let mut g_cap = g_rows;
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
