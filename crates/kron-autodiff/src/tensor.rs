//! The f32 tensor: row-major, contiguous, with its storage shared by `Arc`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::alloc;
use crate::gemm;
use crate::rng::Rng;

/// A tensor's dimensions, outermost first. Rank 4 and below is stored inline.
pub type Shape = SmallVec<[usize; 4]>;

/// Elements above which elementwise kernels split the work with rayon. Elementwise results do not
/// depend on the split, so this changes speed, never bits.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;

/// A dense, row-major, contiguous `f32` tensor.
///
/// Cloning is cheap: the storage is shared by `Arc` and copied only when written through
/// [`Tensor::data_mut`] while shared. Methods are plain (untracked) math; the [`Tape`](crate::Tape)
/// records the differentiable versions.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TensorRepr")]
pub struct Tensor {
    shape: Shape,
    data: Arc<Storage>,
}

/// A tensor as serde reads it, before the element count is checked against the shape.
#[derive(Deserialize)]
struct TensorRepr {
    shape: Shape,
    data: Vec<f32>,
}

impl TryFrom<TensorRepr> for Tensor {
    type Error = String;

    /// Refuses data whose length is not the shape's element count (or a shape whose count
    /// overflows), so a crafted file never makes a tensor that panics later.
    fn try_from(r: TensorRepr) -> Result<Self, String> {
        let count = r.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if count != Some(r.data.len()) {
            return Err(format!(
                "tensor of shape {:?} needs {} elements, found {}",
                r.shape.as_slice(),
                count.map_or("more than usize::MAX".to_string(), |c| c.to_string()),
                r.data.len()
            ));
        }
        Ok(Tensor {
            shape: r.shape,
            data: Arc::new(Storage(r.data)),
        })
    }
}

/// A tensor's elements. Large buffers go back to the pool of [`crate::alloc`] when the last
/// tensor sharing them drops, for the next step to reuse.
#[derive(PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct Storage(Vec<f32>);

impl Clone for Storage {
    fn clone(&self) -> Self {
        Storage(alloc::copy_of(&self.0))
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        alloc::recycle(std::mem::take(&mut self.0));
    }
}

/// The number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A tensor from its elements in row-major order.
    ///
    /// # Panics
    /// If `data.len()` differs from the product of `shape`.
    #[track_caller]
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Self {
        assert_eq!(
            data.len(),
            numel(shape),
            "Tensor::from_vec: {} elements do not fill shape {:?}",
            data.len(),
            shape
        );
        Tensor {
            shape: Shape::from_slice(shape),
            data: Arc::new(Storage(data)),
        }
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32) -> Self {
        Self::from_vec(vec![value; numel(shape)], shape)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::from_vec(alloc::zeroed(numel(shape)), shape)
    }

    /// A tensor of ones.
    pub fn ones(shape: &[usize]) -> Self {
        Self::full(shape, 1.0)
    }

    /// A scalar (rank-0) tensor.
    pub fn scalar(value: f32) -> Self {
        Self::from_vec(vec![value], &[])
    }

    /// The `n x n` identity matrix.
    pub fn eye(n: usize) -> Self {
        let mut d = vec![0.0; n * n];
        for i in 0..n {
            d[i * n + i] = 1.0;
        }
        Self::from_vec(d, &[n, n])
    }

    /// Normal draws with mean `mean` and standard deviation `std`.
    pub fn randn(shape: &[usize], mean: f32, std: f32, rng: &mut Rng) -> Self {
        let data = (0..numel(shape))
            .map(|_| mean + std * rng.normal())
            .collect();
        Self::from_vec(data, shape)
    }

    /// Uniform draws in `[lo, hi)`.
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut Rng) -> Self {
        let data = (0..numel(shape)).map(|_| rng.uniform(lo, hi)).collect();
        Self::from_vec(data, shape)
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The size of dimension `axis`.
    #[track_caller]
    pub fn dim(&self, axis: usize) -> usize {
        assert!(
            axis < self.rank(),
            "Tensor::dim: axis {axis} out of range for shape {:?}",
            self.shape
        );
        self.shape[axis]
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.data.0.len()
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[f32] {
        &self.data.0
    }

    /// Mutable access to the elements; copies the storage first if it is shared.
    pub fn data_mut(&mut self) -> &mut [f32] {
        Arc::make_mut(&mut self.data).0.as_mut_slice()
    }

    /// The elements as a `Vec` (a copy unless the storage is unshared).
    pub fn into_vec(self) -> Vec<f32> {
        match Arc::try_unwrap(self.data) {
            Ok(mut s) => std::mem::take(&mut s.0),
            Err(shared) => alloc::copy_of(&shared.0),
        }
    }

    /// The value of a one-element tensor.
    #[track_caller]
    pub fn item(&self) -> f32 {
        assert_eq!(
            self.numel(),
            1,
            "Tensor::item: tensor of shape {:?} is not a single value",
            self.shape
        );
        self.data.0[0]
    }

    /// Whether both tensors share one storage (a clone of the other, not a copy).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    /// The same elements under another shape with as many elements (no copy).
    #[track_caller]
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        assert_eq!(
            numel(shape),
            self.numel(),
            "Tensor::reshape: cannot view shape {:?} as {:?}",
            self.shape,
            shape
        );
        Tensor {
            shape: Shape::from_slice(shape),
            data: self.data.clone(),
        }
    }

    /// The rows and columns of a rank-2 tensor.
    #[track_caller]
    pub fn dims2(&self) -> (usize, usize) {
        assert_eq!(
            self.rank(),
            2,
            "expected a matrix, found shape {:?}",
            self.shape
        );
        (self.shape[0], self.shape[1])
    }

    /// The transpose of a matrix (a copy).
    #[track_caller]
    pub fn t(&self) -> Tensor {
        let (r, c) = self.dims2();
        let src = self.data();
        let mut out = vec![0.0; r * c];
        const B: usize = 32;
        for i0 in (0..r).step_by(B) {
            for j0 in (0..c).step_by(B) {
                for i in i0..(i0 + B).min(r) {
                    for j in j0..(j0 + B).min(c) {
                        out[j * r + i] = src[i * c + j];
                    }
                }
            }
        }
        Tensor::from_vec(out, &[c, r])
    }

    /// A new tensor with `f` applied to each element.
    pub fn map(&self, f: impl Fn(f32) -> f32 + Sync) -> Tensor {
        Tensor::from_vec(map_slice(self.data(), f), &self.shape)
    }

    /// A new tensor from `f` applied to the elements of two same-shaped tensors.
    #[track_caller]
    pub fn zip_map(&self, other: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Tensor {
        assert_eq!(
            self.shape, other.shape,
            "Tensor::zip_map: shapes {:?} and {:?} differ",
            self.shape, other.shape
        );
        Tensor::from_vec(zip_slices(self.data(), other.data(), f), &self.shape)
    }

    /// Elementwise sum with broadcasting (see [`broadcast_shape`]).
    #[track_caller]
    pub fn add(&self, other: &Tensor) -> Tensor {
        broadcast_binary("add", self, other, |a, b| a + b)
    }

    /// Elementwise difference with broadcasting.
    #[track_caller]
    pub fn sub(&self, other: &Tensor) -> Tensor {
        broadcast_binary("sub", self, other, |a, b| a - b)
    }

    /// Elementwise product with broadcasting.
    #[track_caller]
    pub fn mul(&self, other: &Tensor) -> Tensor {
        broadcast_binary("mul", self, other, |a, b| a * b)
    }

    /// Elementwise quotient with broadcasting.
    #[track_caller]
    pub fn div(&self, other: &Tensor) -> Tensor {
        broadcast_binary("div", self, other, |a, b| a / b)
    }

    /// Every element times `s`.
    pub fn scale(&self, s: f32) -> Tensor {
        self.map(|x| x * s)
    }

    /// Every element plus `s`.
    pub fn add_scalar(&self, s: f32) -> Tensor {
        self.map(|x| x + s)
    }

    /// The sum of all elements, accumulated in `f64` in a fixed order.
    pub fn sum_all(&self) -> f32 {
        self.data().iter().map(|&x| x as f64).sum::<f64>() as f32
    }

    /// The mean of all elements.
    pub fn mean_all(&self) -> f32 {
        self.sum_all() / self.numel().max(1) as f32
    }

    /// Sum along `axis`, which is removed from the shape (kept with size 1 if `keepdim`).
    #[track_caller]
    pub fn sum_axis(&self, axis: usize, keepdim: bool) -> Tensor {
        let (outer, n, inner) = self.split_axis("sum_axis", axis);
        let src = self.data();
        let mut out = vec![0.0f32; outer * inner];
        for o in 0..outer {
            let dst = &mut out[o * inner..(o + 1) * inner];
            for k in 0..n {
                let row = &src[(o * n + k) * inner..(o * n + k + 1) * inner];
                for (d, &s) in dst.iter_mut().zip(row) {
                    *d += s;
                }
            }
        }
        Tensor::from_vec(out, &reduced_shape(&self.shape, axis, keepdim))
    }

    /// Mean along `axis`.
    #[track_caller]
    pub fn mean_axis(&self, axis: usize, keepdim: bool) -> Tensor {
        let n = self.dim(axis).max(1) as f32;
        self.sum_axis(axis, keepdim).scale(1.0 / n)
    }

    /// Maximum along `axis` and, for each, the index of the first maximum.
    #[track_caller]
    pub fn max_axis(&self, axis: usize, keepdim: bool) -> (Tensor, Vec<usize>) {
        let (outer, n, inner) = self.split_axis("max_axis", axis);
        assert!(
            n > 0,
            "Tensor::max_axis: axis {axis} of shape {:?} is empty",
            self.shape
        );
        let src = self.data();
        let mut out = vec![f32::NEG_INFINITY; outer * inner];
        let mut arg = vec![0usize; outer * inner];
        for o in 0..outer {
            for k in 0..n {
                for i in 0..inner {
                    let v = src[(o * n + k) * inner + i];
                    let j = o * inner + i;
                    // NaN propagates: it becomes the maximum once seen.
                    if v > out[j] || (v.is_nan() && !out[j].is_nan()) {
                        out[j] = v;
                        arg[j] = k;
                    }
                }
            }
        }
        (
            Tensor::from_vec(out, &reduced_shape(&self.shape, axis, keepdim)),
            arg,
        )
    }

    /// Index of the largest element of each row of a matrix.
    #[track_caller]
    pub fn argmax_rows(&self) -> Vec<usize> {
        self.dims2();
        self.max_axis(1, false).1
    }

    /// Matrix product `op(self) * op(other)`, where `op` transposes when the flag says so.
    ///
    /// # Panics
    /// If either operand is not a matrix or the inner dimensions differ.
    #[track_caller]
    pub fn matmul_t(&self, trans_self: bool, other: &Tensor, trans_other: bool) -> Tensor {
        let (ar, ac) = self.dims2();
        let (br, bc) = other.dims2();
        let (m, k) = if trans_self { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if trans_other { (bc, br) } else { (br, bc) };
        assert_eq!(
            k,
            k2,
            "matmul: inner dimensions differ: {:?}{} x {:?}{}",
            self.shape,
            if trans_self { "^T" } else { "" },
            other.shape,
            if trans_other { "^T" } else { "" }
        );
        Tensor::from_gemm(
            m,
            k,
            n,
            1.0,
            self.data(),
            trans_self,
            other.data(),
            trans_other,
        )
    }

    /// `alpha op(a) op(b)` for row-major `a` (`m x k`, or `k x m` when `ta`) and `b` (`k x n`, or
    /// `n x k` when `tb`), as an `m x n` tensor in a pooled buffer that the product writes whole
    /// ([`gemm`](crate::gemm) with `beta = 0`).
    ///
    /// # Panics
    /// If `a` or `b` is shorter than its shape says.
    #[allow(clippy::too_many_arguments)]
    pub fn from_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: &[f32],
        ta: bool,
        b: &[f32],
        tb: bool,
    ) -> Tensor {
        // beta = 0: the GEMM writes every element.
        let mut out = alloc::scratch(m * n);
        gemm::gemm(m, k, n, alpha, a, ta, b, tb, 0.0, &mut out);
        Tensor::from_vec(out, &[m, n])
    }

    /// Matrix product `self * other`.
    #[track_caller]
    pub fn matmul(&self, other: &Tensor) -> Tensor {
        self.matmul_t(false, other, false)
    }

    /// The largest absolute elementwise difference to `other` (same shape).
    #[track_caller]
    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        assert_eq!(self.shape, other.shape, "max_abs_diff: shapes differ");
        self.data()
            .iter()
            .zip(other.data())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Whether every element is finite (no NaN, no infinity).
    pub fn all_finite(&self) -> bool {
        all_finite(self.data())
    }

    /// `(outer, n, inner)` around `axis`, for reductions.
    #[track_caller]
    fn split_axis(&self, op: &str, axis: usize) -> (usize, usize, usize) {
        assert!(
            axis < self.rank(),
            "Tensor::{op}: axis {axis} out of range for shape {:?}",
            self.shape
        );
        let outer = numel(&self.shape[..axis]);
        let inner = numel(&self.shape[axis + 1..]);
        (outer, self.shape[axis], inner)
    }
}

/// The shape after reducing `axis`.
pub(crate) fn reduced_shape(shape: &[usize], axis: usize, keepdim: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if keepdim {
        s[axis] = 1;
    } else {
        s.remove(axis);
    }
    s
}

/// `f` over a slice, split across threads when large (same bits either way).
pub(crate) fn map_slice(src: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = alloc::scratch(src.len());
    let one = |(o, &x): (&mut f32, &f32)| *o = f(x);
    if src.len() >= PAR_THRESHOLD {
        out.par_iter_mut().with_min_len(4096).zip(src).for_each(one);
    } else {
        out.iter_mut().zip(src).for_each(one);
    }
    out
}

/// `f` over two same-length slices, split across threads when large.
pub(crate) fn zip_slices(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    debug_assert_eq!(a.len(), b.len());
    let mut out = alloc::scratch(a.len());
    let one = |(o, (&x, &y)): (&mut f32, (&f32, &f32))| *o = f(x, y);
    if a.len() >= PAR_THRESHOLD {
        out.par_iter_mut()
            .with_min_len(4096)
            .zip(a.par_iter().zip(b))
            .for_each(one);
    } else {
        out.iter_mut().zip(a.iter().zip(b)).for_each(one);
    }
    out
}

/// The broadcast shape of two shapes, NumPy rules: align trailing dimensions; each pair must be
/// equal or contain a 1. `None` if they do not broadcast.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Row-major strides of `shape` as seen from the broadcast `out` shape (0 where broadcast).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let r = out.len();
    let mut strides = vec![0; r];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        let oi = i + r - shape.len();
        strides[oi] = if shape[i] == 1 { 0 } else { acc };
        acc *= shape[i];
    }
    strides
}

#[track_caller]
pub(crate) fn broadcast_binary(
    op: &str,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Tensor {
    if a.shape == b.shape {
        return Tensor::from_vec(zip_slices(a.data(), b.data(), f), &a.shape);
    }
    let out_shape = broadcast_shape(&a.shape, &b.shape).unwrap_or_else(|| {
        panic!(
            "{op}: shapes {:?} and {:?} do not broadcast",
            a.shape, b.shape
        )
    });
    let n = numel(&out_shape);
    // Fast path: `b` is a suffix of `a` (bias-style broadcast).
    if out_shape.as_slice() == a.shape() && a.shape.ends_with(&b.shape) {
        let inner = b.numel().max(1);
        let (ad, bd) = (a.data(), b.data());
        let mut out = vec![0.0; n];
        for (o, chunk) in out.chunks_mut(inner).enumerate() {
            let ar = &ad[o * inner..(o + 1) * inner];
            for ((d, &x), &y) in chunk.iter_mut().zip(ar).zip(bd) {
                *d = f(x, y);
            }
        }
        return Tensor::from_vec(out, &out_shape);
    }
    let sa = broadcast_strides(&a.shape, &out_shape);
    let sb = broadcast_strides(&b.shape, &out_shape);
    let (ad, bd) = (a.data(), b.data());
    let mut idx = vec![0usize; out_shape.len()];
    let mut out = Vec::with_capacity(n);
    let (mut ia, mut ib) = (0usize, 0usize);
    for _ in 0..n {
        out.push(f(ad[ia], bd[ib]));
        // Advance the multi-index, odometer style.
        for d in (0..out_shape.len()).rev() {
            idx[d] += 1;
            ia += sa[d];
            ib += sb[d];
            if idx[d] < out_shape[d] {
                break;
            }
            ia -= sa[d] * out_shape[d];
            ib -= sb[d] * out_shape[d];
            idx[d] = 0;
        }
    }
    Tensor::from_vec(out, &out_shape)
}

/// Sums `t` down to `shape`, undoing a broadcast (the reverse-mode rule of broadcasting).
#[track_caller]
pub fn sum_to_shape(t: &Tensor, shape: &[usize]) -> Tensor {
    if t.shape() == shape {
        return t.clone();
    }
    let r = t.rank();
    assert!(
        shape.len() <= r,
        "sum_to_shape: {:?} -> {:?}",
        t.shape(),
        shape
    );
    let strides = broadcast_strides(shape, t.shape());
    let mut out = vec![0.0f32; numel(shape)];
    let src = t.data();
    let out_shape = t.shape();
    let mut idx = vec![0usize; r];
    let mut io = 0usize;
    for &v in src {
        out[io] += v;
        for d in (0..r).rev() {
            idx[d] += 1;
            io += strides[d];
            if idx[d] < out_shape[d] {
                break;
            }
            io -= strides[d] * out_shape[d];
            idx[d] = 0;
        }
    }
    Tensor::from_vec(out, shape)
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOW: usize = 8;
        write!(f, "Tensor{:?} [", self.shape.as_slice())?;
        for (i, v) in self.data().iter().take(SHOW).enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{v}")?;
        }
        if self.numel() > SHOW {
            write!(f, ", ... ({} total)", self.numel())?;
        }
        write!(f, "]")
    }
}

/// Whether every element of `x` is finite (no NaN, no infinity).
///
/// Checks blocks of elements without an early exit inside a block, so that the check
/// vectorizes, and large slices on rayon's threads: a step's captures and gradients are
/// scanned at memory speed.
pub fn all_finite(x: &[f32]) -> bool {
    use rayon::prelude::*;
    const BLOCK: usize = 1024;
    let block = |c: &[f32]| c.iter().fold(true, |ok, v| ok & v.is_finite());
    if x.len() >= 64 * BLOCK {
        x.par_chunks(16 * BLOCK).all(|c| c.chunks(BLOCK).all(block))
    } else {
        x.chunks(BLOCK).all(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_finds_every_non_finite_value() {
        // Lengths around the block size and the parallel threshold; the bad value first,
        // in the middle and last.
        for n in [1, 1023, 1024, 1025, 65_535, 65_536, 200_001] {
            let mut x: Vec<f32> = (0..n).map(|i| (i as f32 - 7.0) * 1e-3).collect();
            x[0] = f32::MAX;
            if n > 2 {
                x[1] = -0.0;
                x[2] = f32::MIN_POSITIVE / 4.0;
            }
            assert!(all_finite(&x), "n = {n}");
            for at in [0, n / 2, n - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let keep = x[at];
                    x[at] = bad;
                    assert!(!all_finite(&x), "n = {n}, {bad} at {at}");
                    x[at] = keep;
                }
            }
        }
        assert!(all_finite(&[]));
    }

    #[test]
    fn broadcast_rules() {
        assert_eq!(broadcast_shape(&[4, 3], &[3]), Some(vec![4, 3]));
        assert_eq!(broadcast_shape(&[4, 1], &[1, 3]), Some(vec![4, 3]));
        assert_eq!(broadcast_shape(&[2, 3], &[4]), None);
        let a = Tensor::from_vec(vec![1., 2., 3., 4., 5., 6.], &[2, 3]);
        let b = Tensor::from_vec(vec![10., 20., 30.], &[3]);
        assert_eq!(a.add(&b).data(), &[11., 22., 33., 14., 25., 36.]);
        let c = Tensor::from_vec(vec![1., 2.], &[2, 1]);
        assert_eq!(a.mul(&c).data(), &[1., 2., 3., 8., 10., 12.]);
        assert_eq!(b.sub(&a).data(), &[9., 18., 27., 6., 15., 24.]);
    }

    #[test]
    fn sum_to_shape_undoes_broadcast() {
        let t = Tensor::from_vec(vec![1., 2., 3., 4., 5., 6.], &[2, 3]);
        assert_eq!(sum_to_shape(&t, &[3]).data(), &[5., 7., 9.]);
        assert_eq!(sum_to_shape(&t, &[2, 1]).data(), &[6., 15.]);
        assert_eq!(sum_to_shape(&t, &[]).data(), &[21.]);
    }

    #[test]
    fn reductions() {
        let t = Tensor::from_vec(vec![1., 5., 3., 4., 2., 6.], &[2, 3]);
        assert_eq!(t.sum_axis(0, false).data(), &[5., 7., 9.]);
        assert_eq!(t.sum_axis(1, true).shape(), &[2, 1]);
        assert_eq!(t.mean_axis(1, false).data(), &[3., 4.]);
        let (m, a) = t.max_axis(1, false);
        assert_eq!(m.data(), &[5., 6.]);
        assert_eq!(a, vec![1, 2]);
        assert_eq!(t.sum_all(), 21.0);
    }

    #[test]
    fn matmul_with_transposes() {
        let a = Tensor::from_vec(vec![1., 2., 3., 4., 5., 6.], &[2, 3]);
        let b = Tensor::from_vec(vec![1., 0., 2., 1., 0., 1.], &[3, 2]);
        let c = a.matmul(&b);
        // [1 2 3; 4 5 6] [1 0; 2 1; 0 1] = [5 5; 14 11]
        assert_eq!(c.data(), &[5., 5., 14., 11.]);
        let c2 = a.t().matmul_t(true, &b.t(), true);
        assert_eq!(c2.data(), c.data());
        assert_eq!(a.t().t(), a);
    }

    #[test]
    #[should_panic(expected = "matmul: inner dimensions differ")]
    fn matmul_shape_mismatch_names_op_and_shapes() {
        let a = Tensor::zeros(&[2, 3]);
        a.matmul(&a);
    }
}
