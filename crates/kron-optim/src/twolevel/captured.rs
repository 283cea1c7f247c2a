//! Exact mini-batch Fisher products from the tape's captures, with no extra pass.
//!
//! With the one-sample Fisher `F = (1/B) sum_n grad_n grad_n^T`, where layer `i`'s part of the
//! per-example gradient is `sum_t g_i(n,t) a_aug_i(n,t)^T` (one location for a dense layer),
//! a coarse vector `R_i` (in the `W_aug` layout) meets the Fisher through the per-example
//! scalar `s_i(n) = <grad_n,i, R_i> = sum_t g_i(n,t)^T R_i a_aug_i(n,t)`, so
//! `R_i^T F_ij R_j = (1/B) sum_n s_i(n) s_j(n)`: the whole coarse matrix is the Gram of a small
//! `B x n_c` matrix. A Fisher-vector product follows the same way: `(F u)_i =
//! (1/B) sum_n w(n) grad_n,i` with `w(n) = sum_j s_j(n)` for `R_j = u_j`.

use kron_autodiff::{LayerCapture, Tensor, gemm};
use rayon::prelude::*;

/// One layer's captured rows, restricted to the examples the statistics use.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    /// Activations or patches, `rows x in` (without the homogeneous coordinate).
    a: &'a [f32],
    /// Pre-activation gradients (`B * dL/ds`), `rows x out`.
    g: &'a [f32],
    /// Input width.
    inputs: usize,
    /// Output width.
    outputs: usize,
    /// Whether `a` gets a homogeneous 1.
    bias: bool,
    /// Examples used.
    pub examples: usize,
    /// Locations per example (1 for dense).
    pub locations: usize,
}

impl<'a> Rows<'a> {
    /// The first `examples` examples of a capture (all of them when `None`).
    pub fn new(cap: &'a LayerCapture, examples: Option<usize>) -> Self {
        let n = examples.map_or(cap.batch, |n| n.clamp(1, cap.batch));
        let (inputs, outputs) = (cap.a.dim(1), cap.g.dim(1));
        let rows = n * cap.locations;
        Rows {
            a: &cap.a.data()[..rows * inputs],
            g: &cap.g.data()[..rows * outputs],
            inputs,
            outputs,
            bias: cap.has_bias,
            examples: n,
            locations: cap.locations,
        }
    }

    fn rows(&self) -> usize {
        self.examples * self.locations
    }

    /// The width of `a_aug`.
    pub fn a_dim(&self) -> usize {
        self.inputs + usize::from(self.bias)
    }

    /// The gradient width.
    pub fn g_dim(&self) -> usize {
        self.outputs
    }

    /// `s(n) = sum_t (g(n,t) . u)(a_aug(n,t) . v)` for a rank-one `R = u v^T`.
    pub fn inner_rank1(&self, u: &[f32], v: &[f32]) -> Vec<f64> {
        let (d, o, t) = (self.inputs, self.outputs, self.locations);
        (0..self.examples)
            .into_par_iter()
            .map(|n| {
                (n * t..(n + 1) * t)
                    .map(|r| {
                        let gu: f64 = self.g[r * o..(r + 1) * o]
                            .iter()
                            .zip(u)
                            .map(|(&x, &y)| x as f64 * y as f64)
                            .sum();
                        let mut av: f64 = self.a[r * d..(r + 1) * d]
                            .iter()
                            .zip(v)
                            .map(|(&x, &y)| x as f64 * y as f64)
                            .sum();
                        if self.bias {
                            av += v[d] as f64;
                        }
                        gu * av
                    })
                    .sum()
            })
            .collect()
    }

    /// `s(n) = sum_t g(n,t)^T R a_aug(n,t)` for a dense `R` (`out x a_dim`): one product
    /// `G R` (`rows x a_dim`), then a dot per row.
    pub fn inner(&self, r: &Tensor) -> Vec<f64> {
        let (d, o, t, rows) = (self.inputs, self.outputs, self.locations, self.rows());
        let da = self.a_dim();
        assert_eq!(
            r.shape(),
            [o, da],
            "coarse inner product: vector {:?} for a block of {o}x{da}",
            r.shape()
        );
        let mut gr = vec![0.0f32; rows * da];
        gemm(
            rows,
            o,
            da,
            1.0,
            self.g,
            false,
            r.data(),
            false,
            0.0,
            &mut gr,
        );
        (0..self.examples)
            .into_par_iter()
            .map(|n| {
                (n * t..(n + 1) * t)
                    .map(|row| {
                        let p = &gr[row * da..(row + 1) * da];
                        let mut s: f64 = p[..d]
                            .iter()
                            .zip(&self.a[row * d..(row + 1) * d])
                            .map(|(&x, &y)| x as f64 * y as f64)
                            .sum();
                        if self.bias {
                            s += p[d] as f64;
                        }
                        s
                    })
                    .sum()
            })
            .collect()
    }

    /// `(1/B) sum_n w(n) sum_t g(n,t) a_aug(n,t)^T` (`out x a_dim`): this layer's part of a
    /// Fisher-vector product with per-example weights `w`.
    pub fn weighted_gradient(&self, w: &[f64]) -> Tensor {
        let (d, o, t, rows) = (self.inputs, self.outputs, self.locations, self.rows());
        let da = self.a_dim();
        let inv_b = 1.0 / self.examples as f64;
        let mut gw = vec![0.0f32; rows * o];
        gw.par_chunks_mut(o * t).enumerate().for_each(|(n, chunk)| {
            let s = (w[n] * inv_b) as f32;
            for (x, &g) in chunk.iter_mut().zip(&self.g[n * t * o..(n + 1) * t * o]) {
                *x = g * s;
            }
        });
        let mut out = vec![0.0f32; o * da];
        let mut top = vec![0.0f32; o * d];
        gemm(o, rows, d, 1.0, &gw, true, self.a, false, 0.0, &mut top);
        for (row, chunk) in out.chunks_mut(da).zip(top.chunks(d)) {
            row[..d].copy_from_slice(chunk);
        }
        if self.bias {
            let mut col = vec![0.0f64; o];
            for r in 0..rows {
                for (c, &x) in col.iter_mut().zip(&gw[r * o..(r + 1) * o]) {
                    *c += x as f64;
                }
            }
            for (k, c) in col.iter().enumerate() {
                out[k * da + d] = *c as f32;
            }
        }
        Tensor::from_vec(out, &[o, da])
    }

    /// Per row, the sums `(sum_o g(row)_o, sum_j a_aug(row)_j)` that Tselepidis' cross
    /// factors with all-ones vectors reduce to.
    pub fn row_sums(&self) -> (Vec<f64>, Vec<f64>) {
        let (d, o) = (self.inputs, self.outputs);
        let one = if self.bias { 1.0 } else { 0.0 };
        let sg = self
            .g
            .par_chunks(o)
            .map(|r| r.iter().map(|&x| x as f64).sum())
            .collect();
        let sa = self
            .a
            .par_chunks(d)
            .map(|r| r.iter().map(|&x| x as f64).sum::<f64>() + one)
            .collect();
        (sg, sa)
    }
}

/// Tselepidis, Kohler and Orvieto's coarse entry between two layers with all-ones vectors,
/// `<1, G_ij 1 1^T A_ij^T> = (1^T G_ij 1)(1^T A_ij 1)`, as its two factors `(1^T G_ij 1,
/// 1^T A_ij 1)` (means over examples, which data-parallel ranks reduce before multiplying),
/// from the cross factors `A_ij = (1/B) sum_n sum_t a_aug_i(n,t) a_aug_j(n,t)^T` (summed over
/// locations, as kron's `Omega`) and `G_ij = (1/(B T)) sum_n sum_t g_i(n,t) g_j(n,t)^T`
/// (averaged), so that the diagonal entries are those of kron's own Kronecker blocks. Layers
/// with different location counts are aligned to the smaller count `T` as the authors' code
/// does: location `t` of the larger layer is its flattened location `floor(t T_big / T)`
/// (one-dimensional nearest neighbour on the flattened grid; a dense layer has `T = 1`, so it
/// meets a conv layer's first location).
pub(crate) fn tselepidis_means(
    (sg_i, sa_i, t_i): (&[f64], &[f64], usize),
    (sg_j, sa_j, t_j): (&[f64], &[f64], usize),
    examples: usize,
) -> (f64, f64) {
    let t = t_i.min(t_j);
    let at = |big: usize, k: usize| k * big / t;
    let (mut gg, mut aa) = (0.0f64, 0.0f64);
    for n in 0..examples {
        for k in 0..t {
            let (ri, rj) = (n * t_i + at(t_i, k), n * t_j + at(t_j, k));
            gg += sg_i[ri] * sg_j[rj];
            aa += sa_i[ri] * sa_j[rj];
        }
    }
    let b = examples as f64;
    (gg / (b * t as f64), aa / b)
}
