//! The CPU backend: GEMM through matrixmultiply's kernels on rayon's threads, factorizations
//! through faer, statistics in `f32` or `f64`.

use kron_autodiff::{GemmScalar, MatMut, MatRef, Tensor, gemm_strided};
use rayon::prelude::*;

use super::{Backend, Eigh, Inverse, LinalgError, Mat, Precision, Ridge, Store, linalg};

/// Matrix primitives on the host. GEMMs split their output among rayon's threads
/// ([`gemm_strided`]), factorizations are sequential inside (callers parallelize across
/// independent blocks), so every result has the same bits for any thread count.
///
/// Factorizations always run in `f64`; [`Precision`] says in which type statistics, inverses
/// and intermediate products are kept.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    precision: Precision,
}

impl CpuBackend {
    /// A backend keeping its matrices in `precision`.
    pub fn new(precision: Precision) -> Self {
        CpuBackend { precision }
    }
}

/// The height of the row blocks of the symmetric rank-k update for a `d x d` result: about
/// an eighth of `d`, a multiple of 16 between 64 and 256.
///
/// Each row block is one product whose right operand (`rows x (d - i0)`) matrixmultiply packs
/// anew, so lower blocks cost more packing and higher ones more work below the diagonal. On
/// the autoencoder's factors (1000 rows, `d` from 30 to 1000, 2 cores of a Zen 3) an eighth
/// ran 10-25% faster than square 256-blocks, which computed 10 of 16 block products of a
/// 1000-wide factor where this computes about 9 of 16.
fn syrk_rows(d: usize) -> usize {
    (d.div_ceil(8).div_ceil(16) * 16).clamp(64, 256)
}

/// `C = beta C + alpha X^T X` for `X` of `rows x d` (row-major) into the leading `d x d` of `C`
/// (row stride `ldc`), computing the entries on and above the diagonal in row blocks (each
/// block's rows from its diagonal entry to the last column) and mirroring them below: the
/// symmetric rank-k update in about `(1 + h/d) / 2` of a GEMM's work for blocks of `h` rows.
///
/// Every entry has the bits the whole product `X^T X` would give it: each is one strided GEMM's
/// sum over all rows in the same order, and every block starts at a row and a column that are
/// multiples of 16, so its register tiles sit where the whole product's do (the argument of
/// [`kron_autodiff::gemm`]'s module docs), whatever the blocking or thread count.
fn syrk<T: GemmScalar>(d: usize, rows: usize, alpha: T, x: &[T], beta: T, c: &mut [T], ldc: usize) {
    assert!(x.len() >= rows * d && (d == 0 || c.len() >= (d - 1) * ldc + d));
    let h = syrk_rows(d);
    for i0 in (0..d).step_by(h) {
        let mi = h.min(d - i0);
        // X[:, i0..i0+mi]^T times X[:, i0..d] into C's rows i0..i0+mi from column i0.
        gemm_strided(
            alpha,
            MatRef::new(&x[i0..rows * d], mi, rows, 1, d),
            MatRef::new(&x[i0..rows * d], rows, d - i0, d, 1),
            beta,
            MatMut::new(&mut c[i0 * ldc + i0..], mi, d - i0, ldc, 1),
        );
    }
    // Mirror the entries above the diagonal into those below, so that the result is exactly
    // symmetric on every kernel. (A diagonal block's own lower entries are the same sums as
    // their mirror images, but a kernel whose tile is not square, 8x4 say, can finish the two
    // differently at the block's bottom edge.) In each row block: its diagonal block on this
    // thread (small), then the rows below it, each taking column j of the block's rows into
    // columns i0..i0+mi, on rayon's threads; the block's rows are only read there.
    for i0 in (0..d).step_by(h) {
        let mi = h.min(d - i0);
        let below = i0 + mi;
        for i in i0..below {
            for j in i + 1..below {
                c[j * ldc + i] = c[i * ldc + j];
            }
        }
        if below >= d {
            break;
        }
        let (top, bottom) = c.split_at_mut(below * ldc);
        let top = &top[i0 * ldc..];
        bottom
            .par_chunks_mut(ldc)
            .take(d - below)
            .enumerate()
            .with_min_len(16)
            .for_each(|(r, row)| {
                let j = below + r;
                for (t, x) in row[i0..below].iter_mut().enumerate() {
                    *x = top[t * ldc + j];
                }
            });
    }
}

/// `c = alpha op(a) op(b) + beta c` in `f64` into a block of a larger row-major matrix of row
/// stride `ldc` (the `f32` products go through [`kron_autodiff::gemm`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f64(
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    a: &[f64],
    ta: bool,
    b: &[f64],
    tb: bool,
    beta: f64,
    c: &mut [f64],
    ldc: usize,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && (m == 0 || c.len() >= (m - 1) * ldc + n));
    if m == 0 || n == 0 {
        return;
    }
    let a = MatRef::row_major_op(&a[..m * k], m, k, ta);
    let b = MatRef::row_major_op(&b[..k * n], k, n, tb);
    gemm_strided(alpha, a, b, beta, MatMut::new(c, m, n, ldc, 1));
}

/// A matrix of another backend reached the CPU backend: a caller's bug.
#[cfg(feature = "wgpu")]
#[track_caller]
fn foreign() -> ! {
    panic!(
        "CpuBackend: got a matrix that lives in a wgpu buffer; only the backend that made a \
         matrix can read it (download it there and upload it here)"
    )
}

fn as_f64(m: &Mat) -> Vec<f64> {
    match &m.store {
        Store::F32(t) => t.data().iter().map(|&x| x as f64).collect(),
        Store::F64(v) => v.clone(),
        #[cfg(feature = "wgpu")]
        Store::Gpu(_) => foreign(),
    }
}

/// Applies `f` to the elements of a host matrix in its own precision.
macro_rules! each_mut {
    ($m:expr, |$x:ident| $body:expr) => {
        match &mut $m.store {
            Store::F32(t) => t.data_mut().iter_mut().for_each(|$x| {
                let v = *$x as f64;
                let r: f64 = {
                    let $x = v;
                    $body
                };
                *$x = r as f32;
            }),
            Store::F64(d) => d.iter_mut().for_each(|$x| {
                let v = *$x;
                let r: f64 = {
                    let $x = v;
                    $body
                };
                *$x = r;
            }),
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    };
}

/// Applies `f32_op` or `f64_op` to every element of a host matrix, in its own precision (so an
/// `f32` matrix rounds once per element, as a GPU kernel does).
fn elementwise(m: &mut Mat, f32_op: impl Fn(f32) -> f32, f64_op: impl Fn(f64) -> f64) {
    match &mut m.store {
        Store::F32(t) => t.data_mut().iter_mut().for_each(|x| *x = f32_op(*x)),
        Store::F64(d) => d.iter_mut().for_each(|x| *x = f64_op(*x)),
        #[cfg(feature = "wgpu")]
        Store::Gpu(_) => foreign(),
    }
}

impl CpuBackend {
    fn make(&self, rows: usize, cols: usize, data: Vec<f64>) -> Mat {
        let store = match self.precision {
            Precision::F32 => Store::F32(Tensor::from_vec(
                data.into_iter().map(|x| x as f32).collect(),
                &[rows, cols],
            )),
            Precision::F64 => Store::F64(data),
        };
        Mat { rows, cols, store }
    }

    fn column_sums(x: &Mat) -> Vec<f64> {
        let (r, c) = x.dims();
        let mut s = vec![0.0f64; c];
        match &x.store {
            Store::F32(t) => {
                // Accumulate each row block in f32 like the GEMM does, in a fixed order.
                let mut acc = vec![0.0f32; c];
                for row in t.data()[..r * c].chunks(c.max(1)) {
                    for (a, v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
                for (o, a) in s.iter_mut().zip(acc) {
                    *o = a as f64;
                }
            }
            Store::F64(d) => {
                for row in d[..r * c].chunks(c.max(1)) {
                    for (o, v) in s.iter_mut().zip(row) {
                        *o += v;
                    }
                }
            }
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
        s
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        match self.precision {
            Precision::F32 => "cpu (f32)".into(),
            Precision::F64 => "cpu (f64)".into(),
        }
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn upload_rows(&self, t: &Tensor, rows: Option<usize>) -> Mat {
        let (r, c) = t.dims2();
        let rows = rows.map_or(r, |k| k.min(r));
        let store = match self.precision {
            Precision::F32 if rows == r => Store::F32(t.clone()),
            Precision::F32 => Store::F32(
                kron_autodiff::PooledBuffer::copy_of(&t.data()[..rows * c]).into_tensor(&[rows, c]),
            ),
            Precision::F64 => Store::F64(t.data()[..rows * c].iter().map(|&x| x as f64).collect()),
        };
        Mat {
            rows,
            cols: c,
            store,
        }
    }

    fn download(&self, m: &Mat) -> Tensor {
        match &m.store {
            Store::F32(t) => t.clone(),
            Store::F64(d) => {
                Tensor::from_vec(d.iter().map(|&x| x as f32).collect(), &[m.rows, m.cols])
            }
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    }

    fn zeros(&self, rows: usize, cols: usize) -> Mat {
        let store = match self.precision {
            Precision::F32 => Store::F32(Tensor::zeros(&[rows, cols])),
            Precision::F64 => Store::F64(vec![0.0; rows * cols]),
        };
        Mat { rows, cols, store }
    }

    fn gemm(&self, alpha: f32, a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat {
        let (m, k) = if ta {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (k2, n) = if tb {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        assert_eq!(
            k, k2,
            "Backend::gemm: inner dimensions differ: {a:?} x {b:?} (ta {ta}, tb {tb})"
        );
        match (&a.store, &b.store) {
            (Store::F32(x), Store::F32(y)) => Mat {
                rows: m,
                cols: n,
                store: Store::F32(Tensor::from_gemm(
                    m,
                    k,
                    n,
                    alpha,
                    x.data(),
                    ta,
                    y.data(),
                    tb,
                )),
            },
            _ => {
                let (x, y) = (as_f64(a), as_f64(b));
                let mut c = vec![0.0f64; m * n];
                gemm_f64(m, k, n, alpha as f64, &x, ta, &y, tb, 0.0, &mut c, n);
                self.make(m, n, c)
            }
        }
    }

    fn factor_ema(&self, acc: &mut Mat, x: &Mat, homogeneous: bool, scale: f32, decay: f32) {
        let (rows, d) = x.dims();
        let n = d + usize::from(homogeneous);
        assert_eq!(
            acc.dims(),
            (n, n),
            "Backend::factor_ema: accumulator {acc:?} does not fit x {x:?} (homogeneous {homogeneous})"
        );
        let sums = homogeneous.then(|| Self::column_sums(x));
        match (&mut acc.store, &x.store) {
            (Store::F32(a), Store::F32(xs)) => {
                let ad = a.data_mut();
                syrk(d, rows, scale, xs.data(), decay, ad, n);
                if let Some(s) = sums {
                    for i in 0..d {
                        let v = scale * s[i] as f32;
                        ad[i * n + d] = decay * ad[i * n + d] + v;
                        ad[d * n + i] = decay * ad[d * n + i] + v;
                    }
                    ad[d * n + d] = decay * ad[d * n + d] + scale * rows as f32;
                }
            }
            (Store::F64(a), _) => {
                let xs = as_f64(x);
                syrk(d, rows, scale as f64, &xs, decay as f64, a, n);
                if let Some(s) = sums {
                    let (sc, de) = (scale as f64, decay as f64);
                    for i in 0..d {
                        a[i * n + d] = de * a[i * n + d] + sc * s[i];
                        a[d * n + i] = de * a[d * n + i] + sc * s[i];
                    }
                    a[d * n + d] = de * a[d * n + d] + sc * rows as f64;
                }
            }
            (Store::F32(_), Store::F64(_)) => {
                panic!("Backend::factor_ema: f32 accumulator with an f64 input")
            }
            #[cfg(feature = "wgpu")]
            _ => foreign(),
        }
    }

    fn add_diag(&self, m: &mut Mat, v: f64) {
        let n = m.rows.min(m.cols);
        let c = m.cols;
        match &mut m.store {
            Store::F32(t) => {
                let d = t.data_mut();
                for i in 0..n {
                    d[i * c + i] += v as f32;
                }
            }
            Store::F64(d) => {
                for i in 0..n {
                    d[i * c + i] += v;
                }
            }
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    }

    fn scale(&self, m: &mut Mat, s: f64) {
        each_mut!(m, |x| x * s);
    }

    fn axpby(&self, alpha: f64, x: &Mat, beta: f64, y: &mut Mat) {
        assert_eq!(x.dims(), y.dims(), "Backend::axpby: {x:?} vs {y:?}");
        let xs = as_f64(x);
        let (a, b) = (alpha, beta);
        match &mut y.store {
            Store::F32(t) => {
                for (yv, xv) in t.data_mut().iter_mut().zip(&xs) {
                    *yv = (a * xv + b * *yv as f64) as f32;
                }
            }
            Store::F64(d) => {
                for (yv, xv) in d.iter_mut().zip(&xs) {
                    *yv = a * xv + b * *yv;
                }
            }
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    }

    fn div_outer(&self, m: &mut Mat, left: &[f64], right: &[f64], add: f64) {
        let (r, c) = m.dims();
        assert!(
            left.len() == r && right.len() == c,
            "Backend::div_outer: {m:?} vs {}x{}",
            left.len(),
            right.len()
        );
        match &mut m.store {
            Store::F32(t) => {
                for (i, row) in t.data_mut().chunks_mut(c.max(1)).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (*v as f64 / (left[i] * right[j] + add)) as f32;
                    }
                }
            }
            Store::F64(d) => {
                for (i, row) in d.chunks_mut(c.max(1)).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v /= left[i] * right[j] + add;
                    }
                }
            }
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    }

    fn trace(&self, m: &Mat) -> f64 {
        let n = m.rows.min(m.cols);
        match &m.store {
            Store::F32(t) => (0..n).map(|i| t.data()[i * m.cols + i] as f64).sum(),
            Store::F64(d) => (0..n).map(|i| d[i * m.cols + i]).sum(),
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    }

    fn dot(&self, a: &Mat, b: &Mat) -> f64 {
        assert_eq!(a.dims(), b.dims(), "Backend::dot: {a:?} vs {b:?}");
        match (&a.store, &b.store) {
            (Store::F32(x), Store::F32(y)) => x
                .data()
                .iter()
                .zip(y.data())
                .map(|(&p, &q)| p as f64 * q as f64)
                .sum(),
            _ => as_f64(a).iter().zip(as_f64(b)).map(|(p, q)| p * q).sum(),
        }
    }

    fn is_finite(&self, m: &Mat) -> bool {
        match &m.store {
            Store::F32(t) => t.all_finite(),
            Store::F64(d) => d
                .chunks(1024)
                .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite())),
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    }

    fn sqrt(&self, m: &mut Mat) {
        elementwise(m, f32::sqrt, f64::sqrt);
    }

    fn recip(&self, m: &mut Mat, eps: f64) {
        let e32 = eps as f32;
        elementwise(m, |x| 1.0 / (x + e32), |x| 1.0 / (x + eps));
    }

    fn mul(&self, a: &Mat, m: &mut Mat) {
        assert_eq!(a.dims(), m.dims(), "Backend::mul: {a:?} vs {m:?}");
        match (&a.store, &mut m.store) {
            (Store::F32(x), Store::F32(y)) => {
                for (yv, xv) in y.data_mut().iter_mut().zip(x.data()) {
                    *yv *= xv;
                }
            }
            (_, Store::F64(y)) => {
                for (yv, xv) in y.iter_mut().zip(as_f64(a)) {
                    *yv *= xv;
                }
            }
            (_, Store::F32(y)) => {
                for (yv, xv) in y.data_mut().iter_mut().zip(as_f64(a)) {
                    *yv = (*yv as f64 * xv) as f32;
                }
            }
            #[cfg(feature = "wgpu")]
            _ => foreign(),
        }
    }

    fn spd_inverse(&self, m: &Mat, damping: f32) -> Result<Inverse, LinalgError> {
        assert_eq!(m.rows, m.cols, "Backend::spd_inverse: {m:?} is not square");
        let (v, reg) = linalg::spd_inverse(&as_f64(m), m.rows, damping as f64)?;
        let mat = self.make(m.rows, m.cols, v);
        if !self.is_finite(&mat) {
            return Err(LinalgError::NonFinite);
        }
        Ok(Inverse {
            mat,
            regularized_pivots: reg,
            iterations: None,
        })
    }

    fn eigh(&self, m: &Mat) -> Result<Eigh, LinalgError> {
        assert_eq!(m.rows, m.cols, "Backend::eigh: {m:?} is not square");
        let (q, e) = linalg::eigh(&as_f64(m), m.rows)?;
        Ok(Eigh {
            vectors: self.make(m.rows, m.cols, q),
            values: e,
        })
    }

    fn inv_root(&self, m: &Mat, p: u32, damping: f32) -> Result<Mat, LinalgError> {
        assert_eq!(m.rows, m.cols, "Backend::inv_root: {m:?} is not square");
        let r = linalg::inv_root(&as_f64(m), m.rows, p, damping as f64)?;
        Ok(self.make(m.rows, m.cols, r))
    }

    fn gemm_acc(&self, beta: f64, c: &mut Mat, alpha: f64, a: &Mat, ta: bool, b: &Mat, tb: bool) {
        let (m, k) = if ta {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (k2, n) = if tb {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        assert!(
            k == k2 && (m, n) == c.dims(),
            "Backend::gemm_acc: {a:?} x {b:?} (ta {ta}, tb {tb}) does not fit {c:?}"
        );
        match (&a.store, &b.store, &mut c.store) {
            (Store::F32(x), Store::F32(y), Store::F32(z)) => {
                kron_autodiff::gemm(
                    m,
                    k,
                    n,
                    alpha as f32,
                    x.data(),
                    ta,
                    y.data(),
                    tb,
                    beta as f32,
                    z.data_mut(),
                );
            }
            (_, _, Store::F64(z)) => {
                let (x, y) = (as_f64(a), as_f64(b));
                gemm_f64(m, k, n, alpha, &x, ta, &y, tb, beta, z, n);
            }
            _ => {
                let p = self.gemm(alpha as f32, a, ta, b, tb);
                self.axpby(1.0, &p, beta, c);
            }
        }
    }

    fn symmetrize(&self, m: &mut Mat) {
        assert_eq!(m.rows, m.cols, "Backend::symmetrize: {m:?} is not square");
        let n = m.rows;
        macro_rules! sym {
            ($d:expr) => {
                for i in 0..n {
                    for j in 0..i {
                        let v = 0.5 * ($d[i * n + j] + $d[j * n + i]);
                        $d[i * n + j] = v;
                        $d[j * n + i] = v;
                    }
                }
            };
        }
        match &mut m.store {
            Store::F32(t) => {
                let d = t.data_mut();
                sym!(d)
            }
            Store::F64(d) => sym!(d),
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => foreign(),
        }
    }

    fn sym_power(
        &self,
        m: &Mat,
        p: f64,
        ridge: Ridge,
        precision: Precision,
    ) -> Result<Mat, LinalgError> {
        assert_eq!(m.rows, m.cols, "Backend::sym_power: {m:?} is not square");
        let n = m.rows;
        let out: Vec<f64> = match (precision, &m.store) {
            (Precision::F32, Store::F32(t)) => linalg::sym_power::<f32>(t.data(), n, p, ridge)?
                .into_iter()
                .map(|x| x as f64)
                .collect(),
            (Precision::F32, _) => {
                let a: Vec<f32> = as_f64(m).into_iter().map(|x| x as f32).collect();
                linalg::sym_power::<f32>(&a, n, p, ridge)?
                    .into_iter()
                    .map(|x| x as f64)
                    .collect()
            }
            (Precision::F64, _) => linalg::sym_power::<f64>(&as_f64(m), n, p, ridge)?,
        };
        let r = self.make(n, n, out);
        if !self.is_finite(&r) {
            return Err(LinalgError::NonFinite);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod syrk_tests {
    use super::*;
    use kron_autodiff::Rng;

    #[test]
    fn blocked_symmetric_update_has_the_bits_of_the_full_product() {
        assert_eq!(syrk_rows(600), 80);
        assert_eq!(syrk_rows(1100), 144);
        // Row blocks of 80 (d = 600: seven full and a partial one) with a leading dimension
        // wider than d, k within one of matrixmultiply's k-blocks; then blocks of 144 with k
        // past the first k-block, where the kernel accumulates into c, and a last block of 92
        // rows, which ends inside a register tile. f64 runs on a kernel whose tiles are not
        // square (8x4 with FMA and AVX2), where a tile's finishing differs across the diagonal.
        for (rows, d, ldc) in [(37, 600, 603), (300, 1100, 1100)] {
            blocked_against_full::<f32>(rows, d, ldc, |v| v.to_bits() as u64, |a| a);
            blocked_against_full::<f64>(rows, d, ldc, f64::to_bits, |a| a as f64);
        }
        // And the f64 update is the exact sum, to rounding.
        let (rows, d) = (37, 600);
        let mut rng = Rng::new(4);
        let x64: Vec<f64> = (0..rows * d).map(|_| rng.normal() as f64).collect();
        let mut s64 = vec![0.0f64; d * d];
        syrk(d, rows, 1.0, &x64, 0.0, &mut s64, d);
        for i in (0..d).step_by(97) {
            for j in (0..d).step_by(89) {
                let exact: f64 = (0..rows).map(|r| x64[r * d + i] * x64[r * d + j]).sum();
                assert!((s64[i * d + j] - exact).abs() < 1e-9 * (1.0 + exact.abs()));
            }
        }
    }

    /// Runs [`syrk`] on a symmetric start and checks it: exactly symmetric, each entry on and
    /// above the diagonal with the bits of the full product's, the padding untouched.
    fn blocked_against_full<T: GemmScalar + PartialEq + std::fmt::Debug>(
        rows: usize,
        d: usize,
        ldc: usize,
        bits: impl Fn(T) -> u64,
        from: impl Fn(f32) -> T,
    ) {
        let mut rng = Rng::new(3);
        let x: Vec<T> = (0..rows * d).map(|_| from(rng.normal())).collect();
        let c0: Vec<T> = (0..d * ldc).map(|_| from(rng.normal())).collect();
        let (alpha, beta) = (from(0.3), from(0.9));
        let mut sym = c0.clone();
        // A symmetric start, as a running average is.
        for i in 0..d {
            for j in 0..i {
                sym[i * ldc + j] = sym[j * ldc + i];
            }
        }
        // The full product on a dense copy of the leading d x d.
        let mut full: Vec<T> = (0..d * d).map(|e| sym[(e / d) * ldc + e % d]).collect();
        gemm_strided(
            alpha,
            MatRef::new(&x, d, rows, 1, d),
            MatRef::new(&x, rows, d, d, 1),
            beta,
            MatMut::new(&mut full, d, d, d, 1),
        );
        syrk(d, rows, alpha, &x, beta, &mut sym, ldc);
        for i in 0..d {
            for j in i..d {
                let (s, f) = (sym[i * ldc + j], full[i * d + j]);
                assert_eq!(bits(s), bits(f), "d {d}: ({i}, {j}): {s:?} vs {f:?}");
                assert_eq!(bits(s), bits(sym[j * ldc + i]), "d {d}: ({j}, {i}) mirrors");
            }
            // The padding columns beyond d are untouched.
            for j in d..ldc {
                assert_eq!(sym[i * ldc + j], c0[i * ldc + j]);
            }
        }
    }
}
