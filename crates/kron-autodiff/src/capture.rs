//! What the tape keeps of a captured layer, and the Kronecker factors computed from it.

use crate::gemm::gemm;
use crate::ops::linear::column_sums;
use crate::param::LayerId;
use crate::tensor::Tensor;

/// The curvature statistics of one dense or conv layer from one backward pass.
///
/// For a dense layer, `a` is the layer input as the layer saw it (`batch x in`, the tape's own
/// value, not a copy) and `g` is `batch x out`. For a conv layer, `a` is the im2col patch matrix
/// the forward already built (`(batch * locations) x (in_ch * kh * kw)`, columns in
/// `(c_in, kh, kw)` order) and `g` is `(batch * locations) x out_ch`, rows in `(n, t)` order with
/// `t = h * W_out + w`.
///
/// `g` is scaled to per-example gradients: `g_i = B * dL/ds_i` for a batch-mean loss over `B`
/// examples, so the per-example weight gradient is `g_i a_aug_i^T` (dense) or
/// `sum_t g_it a_aug_it^T` (conv), and the batch gradient is their mean.
///
/// A layer applied more than once in one forward pass (a reused or weight-tied layer) has one
/// capture holding every use: the uses are stacked as extra locations of each example (in the
/// order of the forward pass, rows example-major), so the factors treat them as KFC treats
/// locations and [`LayerCapture::weight_grad`] sums over them, which is the shared weight's
/// gradient.
#[derive(Clone, Debug)]
pub struct LayerCapture {
    /// The layer the statistics belong to.
    pub layer: LayerId,
    /// Input activations (dense) or patches (conv), one row per example and location.
    pub a: Tensor,
    /// Per-example pre-activation gradients, one row per example and location.
    pub g: Tensor,
    /// Whether the layer has a bias, so the factors carry a homogeneous coordinate.
    pub has_bias: bool,
    /// The batch size `B`.
    pub batch: usize,
    /// The number of output locations `T` (1 for a dense layer).
    pub locations: usize,
}

impl LayerCapture {
    /// The captures of two uses of one layer in one pass (`self` the earlier) as one: each
    /// example's rows of `self`, then its rows of `later`; `locations` adds up.
    ///
    /// # Panics
    /// If the two uses saw different batch sizes, widths or bias settings (the layer's name in
    /// the message).
    #[track_caller]
    pub fn stacked_with(self, later: LayerCapture) -> LayerCapture {
        assert!(
            self.layer == later.layer
                && self.batch == later.batch
                && self.a.dim(1) == later.a.dim(1)
                && self.g.dim(1) == later.g.dim(1)
                && self.has_bias == later.has_bias,
            "a layer used twice in one pass ({:?}) must see the same batch size and widths in              every use: batch {} and {}, inputs {} and {}, outputs {} and {}",
            self.layer,
            self.batch,
            later.batch,
            self.a.dim(1),
            later.a.dim(1),
            self.g.dim(1),
            later.g.dim(1),
        );
        let interleave = |x: &Tensor, tx: usize, y: &Tensor, ty: usize| -> Tensor {
            let w = x.dim(1);
            let mut out = Vec::with_capacity((x.dim(0) + y.dim(0)) * w);
            for n in 0..self.batch {
                out.extend_from_slice(&x.data()[n * tx * w..(n + 1) * tx * w]);
                out.extend_from_slice(&y.data()[n * ty * w..(n + 1) * ty * w]);
            }
            Tensor::from_vec(out, &[self.batch * (tx + ty), w])
        };
        let (t1, t2) = (self.locations, later.locations);
        LayerCapture {
            layer: self.layer,
            a: interleave(&self.a, t1, &later.a, t2),
            g: interleave(&self.g, t1, &later.g, t2),
            has_bias: self.has_bias,
            batch: self.batch,
            locations: t1 + t2,
        }
    }

    /// The size of the activation factor: input width, plus one with a bias.
    pub fn a_dim(&self) -> usize {
        self.a.dim(1) + usize::from(self.has_bias)
    }

    /// The size of the gradient factor: the output width.
    pub fn g_dim(&self) -> usize {
        self.g.dim(1)
    }

    /// The activation factor, `A = (1/B) sum_i a_aug_i a_aug_i^T` for a dense layer and
    /// `Omega = (1/B) sum_i sum_t a_aug_it a_aug_it^T` (summed over locations, KFC's convention)
    /// for a conv layer. With a bias the homogeneous coordinate is added without building a
    /// column of ones: its row holds the column sums and its corner the row count.
    pub fn a_factor(&self) -> Tensor {
        let (rows, d) = self.a.dims2();
        let n = self.a_dim();
        let scale = 1.0 / self.batch as f32;
        let mut top = vec![0.0f32; d * d];
        gemm(
            d,
            rows,
            d,
            scale,
            self.a.data(),
            true,
            self.a.data(),
            false,
            0.0,
            &mut top,
        );
        if !self.has_bias {
            return Tensor::from_vec(top, &[d, d]);
        }
        let sums = column_sums(self.a.data(), d);
        let mut out = vec![0.0f32; n * n];
        for i in 0..d {
            out[i * n..i * n + d].copy_from_slice(&top[i * d..(i + 1) * d]);
            out[i * n + d] = sums[i] * scale;
            out[d * n + i] = sums[i] * scale;
        }
        out[d * n + d] = rows as f32 * scale;
        Tensor::from_vec(out, &[n, n])
    }

    /// The gradient factor, `G = (1/B) sum_i g_i g_i^T` for a dense layer and
    /// `Gamma = (1/(B T)) sum_i sum_t g_it g_it^T` (averaged over locations) for a conv layer.
    pub fn g_factor(&self) -> Tensor {
        let (rows, d) = self.g.dims2();
        let scale = 1.0 / (self.batch * self.locations) as f32;
        let mut out = vec![0.0f32; d * d];
        gemm(
            d,
            rows,
            d,
            scale,
            self.g.data(),
            true,
            self.g.data(),
            false,
            0.0,
            &mut out,
        );
        Tensor::from_vec(out, &[d, d])
    }

    /// The mean gradient of the loss in the `W_aug = [W | b]` layout (`out x (in + 1)` with a
    /// bias), recomputed from the capture: `(1/B) sum g_i a_aug_i^T`.
    pub fn weight_grad(&self) -> Tensor {
        let (rows, d) = self.a.dims2();
        let out = self.g_dim();
        let n = self.a_dim();
        let scale = 1.0 / self.batch as f32;
        let mut gw = vec![0.0f32; out * d];
        gemm(
            out,
            rows,
            d,
            scale,
            self.g.data(),
            true,
            self.a.data(),
            false,
            0.0,
            &mut gw,
        );
        if !self.has_bias {
            return Tensor::from_vec(gw, &[out, d]);
        }
        let gs = column_sums(self.g.data(), out);
        let mut aug = vec![0.0f32; out * n];
        for o in 0..out {
            aug[o * n..o * n + d].copy_from_slice(&gw[o * d..(o + 1) * d]);
            aug[o * n + d] = gs[o] * scale;
        }
        Tensor::from_vec(aug, &[out, n])
    }
}
