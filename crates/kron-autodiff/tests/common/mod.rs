//! Helpers shared by kron-autodiff's integration tests.
#![allow(dead_code)]

use kron_autodiff::{Rng, Tensor};

/// Standard normal draws.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, &mut Rng::new(seed))
}

/// Uniform draws in `[lo, hi)`.
pub fn uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, lo, hi, &mut Rng::new(seed))
}

/// Normal-ish draws pushed at least `margin` away from zero (for functions with a kink there).
pub fn away_from_zero(shape: &[usize], margin: f32, seed: u64) -> Tensor {
    randn(shape, seed).map(|x| x.signum() * (margin + x.abs()))
}

/// Distinct values `spacing` apart in a random order, centred on zero (so a maximum is never
/// ambiguous and a finite-difference step smaller than `spacing / 2` never changes which
/// element is largest).
pub fn distinct(shape: &[usize], spacing: f32, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut idx);
    let half = n as f32 / 2.0;
    let data = idx.iter().map(|&i| (i as f32 - half) * spacing).collect();
    Tensor::from_vec(data, shape)
}

/// Asserts two tensors have one shape and agree within `atol + rtol * max(|a|, |b|)`.
#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f32, atol: f32) {
    assert_eq!(
        actual.shape(),
        expected.shape(),
        "{what}: shapes {:?} and {:?} differ",
        actual.shape(),
        expected.shape()
    );
    for (j, (&a, &e)) in actual.data().iter().zip(expected.data()).enumerate() {
        let tol = atol + rtol * a.abs().max(e.abs());
        assert!(
            (a - e).abs() <= tol && a.is_finite() == e.is_finite(),
            "{what}, element {j}: {a} vs expected {e} (|diff| {} > {tol})",
            (a - e).abs()
        );
    }
}

/// Asserts two tensors are bit-for-bit identical.
#[track_caller]
pub fn assert_bits_eq(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shapes differ");
    for (j, (a, e)) in actual.data().iter().zip(expected.data()).enumerate() {
        assert_eq!(
            a.to_bits(),
            e.to_bits(),
            "{what}, element {j}: {a} vs {e} (bits differ)"
        );
    }
}

/// A row-major matrix from rows of `f64` values.
pub fn matrix(rows: usize, cols: usize, data: Vec<f64>) -> Tensor {
    assert_eq!(data.len(), rows * cols);
    Tensor::from_vec(data.into_iter().map(|v| v as f32).collect(), &[rows, cols])
}

/// `kron(p, q)` of two matrices: entry `((i, j), (k, l))` is `p[i, k] * q[j, l]`.
pub fn kron(p: &Tensor, q: &Tensor) -> Tensor {
    let (pr, pc) = p.dims2();
    let (qr, qc) = q.dims2();
    let (rows, cols) = (pr * qr, pc * qc);
    let mut out = vec![0.0f32; rows * cols];
    for i in 0..pr {
        for k in 0..pc {
            let pv = p.data()[i * pc + k];
            for j in 0..qr {
                for l in 0..qc {
                    out[(i * qr + j) * cols + k * qc + l] = pv * q.data()[j * qc + l];
                }
            }
        }
    }
    Tensor::from_vec(out, &[rows, cols])
}

/// `v v^T` of a tensor read as a flat vector (row-major `vec`).
pub fn outer_self(v: &Tensor) -> Tensor {
    let n = v.numel();
    let d = v.data();
    let mut out = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = d[i] * d[j];
        }
    }
    Tensor::from_vec(out, &[n, n])
}

/// `[w | b]`: a weight matrix with the bias appended as a last column (`W_aug`).
pub fn augment(w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let (out, inp) = w.dims2();
    let Some(b) = b else { return w.clone() };
    let mut d = Vec::with_capacity(out * (inp + 1));
    for o in 0..out {
        d.extend_from_slice(&w.data()[o * inp..(o + 1) * inp]);
        d.push(b.data()[o]);
    }
    Tensor::from_vec(d, &[out, inp + 1])
}

/// Reference 2-D convolution (NCHW input, `out x in x kh x kw` weight), direct loops in `f64`.
pub fn conv2d_ref(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Tensor {
    let (n, c, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (oc, kh, kw) = (w.dim(0), w.dim(2), w.dim(3));
    let ho = (h + 2 * padding - kh) / stride + 1;
    let wo = (wd + 2 * padding - kw) / stride + 1;
    let mut out = vec![0.0f32; n * oc * ho * wo];
    for ni in 0..n {
        for o in 0..oc {
            for oh in 0..ho {
                for ow in 0..wo {
                    let mut s = b.map_or(0.0, |b| b.data()[o] as f64);
                    for ci in 0..c {
                        for i in 0..kh {
                            for j in 0..kw {
                                let ih = (oh * stride + i) as isize - padding as isize;
                                let iw = (ow * stride + j) as isize - padding as isize;
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                    continue;
                                }
                                let xv =
                                    x.data()[((ni * c + ci) * h + ih as usize) * wd + iw as usize];
                                let wv = w.data()[((o * c + ci) * kh + i) * kw + j];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out[((ni * oc + o) * ho + oh) * wo + ow] = s as f32;
                }
            }
        }
    }
    Tensor::from_vec(out, &[n, oc, ho, wo])
}

/// Reference im2col: rows in `(n, t)` order with `t = h * W_out + w`, columns in
/// `(c, kh, kw)` order, zeros in the padding.
pub fn im2col_ref(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize) -> Tensor {
    let (n, c, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let ho = (h + 2 * padding - kh) / stride + 1;
    let wo = (wd + 2 * padding - kw) / stride + 1;
    let k = c * kh * kw;
    let mut out = vec![0.0f32; n * ho * wo * k];
    for ni in 0..n {
        for oh in 0..ho {
            for ow in 0..wo {
                let row = (ni * ho + oh) * wo + ow;
                for ci in 0..c {
                    for i in 0..kh {
                        for j in 0..kw {
                            let ih = (oh * stride + i) as isize - padding as isize;
                            let iw = (ow * stride + j) as isize - padding as isize;
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                continue;
                            }
                            out[row * k + (ci * kh + i) * kw + j] =
                                x.data()[((ni * c + ci) * h + ih as usize) * wd + iw as usize];
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, &[n * ho * wo, k])
}

/// The rows `start..end` of a matrix.
pub fn rows(m: &Tensor, start: usize, end: usize) -> Tensor {
    let (_, c) = m.dims2();
    Tensor::from_vec(m.data()[start * c..end * c].to_vec(), &[end - start, c])
}

/// Example `i` of a batch (the slice along the first axis, keeping it with size 1).
pub fn example(x: &Tensor, i: usize) -> Tensor {
    let per: usize = x.shape()[1..].iter().product();
    let mut shape = x.shape().to_vec();
    shape[0] = 1;
    Tensor::from_vec(x.data()[i * per..(i + 1) * per].to_vec(), &shape)
}
