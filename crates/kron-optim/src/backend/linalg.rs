//! Dense symmetric factorizations on the host through faer, always sequential inside one
//! factorization (`Par::Seq`) so results have the same bits for any thread count; parallelism
//! comes from factorizing independent blocks at once.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{
    LltRegularization, cholesky_in_place, cholesky_in_place_scratch,
};
use faer::linalg::cholesky::llt::inverse::{inverse, inverse_scratch};
use faer::linalg::evd::{ComputeEigenvectors, self_adjoint_evd, self_adjoint_evd_scratch};
use faer::{Mat, Par};

use kron_autodiff::{GemmScalar, MatMut, MatRef, gemm_strided};

use super::{LinalgError, Ridge};

/// Regularization threshold and replacement for Cholesky pivots, relative to the largest
/// diagonal entry: pivots below `1e-12 * max_diag` (f64) are replaced.
const PIVOT_EPS: f64 = 1e-12;

fn to_faer(a: &[f64], n: usize) -> Mat<f64> {
    Mat::from_fn(n, n, |i, j| a[i * n + j])
}

/// `(a + damping I)^-1` of a symmetric `n x n` row-major matrix via Cholesky, with the number
/// of pivots that had to be regularized.
pub(crate) fn spd_inverse(
    a: &[f64],
    n: usize,
    damping: f64,
) -> Result<(Vec<f64>, usize), LinalgError> {
    if a.iter().any(|v| !v.is_finite()) || !damping.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    let mut m = to_faer(a, n);
    let mut max_diag = 0.0f64;
    for i in 0..n {
        m[(i, i)] += damping;
        max_diag = max_diag.max(m[(i, i)].abs());
    }
    let eps = PIVOT_EPS * max_diag.max(f64::MIN_POSITIVE);
    let reg = LltRegularization {
        dynamic_regularization_delta: eps,
        dynamic_regularization_epsilon: eps,
    };
    let par = Par::Seq;
    let req = cholesky_in_place_scratch::<f64>(n, par, Default::default())
        .or(inverse_scratch::<f64>(n, par));
    let mut buf = MemBuffer::new(req);
    let stack = MemStack::new(&mut buf);
    let info =
        cholesky_in_place(m.as_mut(), reg, par, stack, Default::default()).map_err(
            |e| match e {
                faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index } => {
                    LinalgError::NotPositiveDefinite { pivot: index }
                }
            },
        )?;
    let mut out = Mat::<f64>::zeros(n, n);
    inverse(out.as_mut(), m.as_ref(), par, stack);
    // Only the lower triangle is written: mirror it.
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let x = out[(i, j)];
            v[i * n + j] = x;
            v[j * n + i] = x;
        }
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    Ok((v, info.dynamic_regularization_count))
}

/// The element types the host factorizations run in.
pub(crate) trait Real:
    faer::traits::RealField + GemmScalar + Copy + Send + Sync + 'static
{
    /// Widened.
    fn to_f64(self) -> f64;
    /// Narrowed (rounded to nearest).
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// Symmetric eigendecomposition of a row-major `n x n` matrix (lower triangle read):
/// eigenvectors row-major as columns, eigenvalues ascending.
pub(crate) fn eigh(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>), LinalgError> {
    eigh_in::<f64>(a, n)
}

/// [`eigh`] computed in `T` (`f32` or `f64`), eigenvalues widened to `f64`.
pub(crate) fn eigh_in<T: Real>(a: &[T], n: usize) -> Result<(Vec<T>, Vec<f64>), LinalgError> {
    if a.iter().any(|v| !v.to_f64().is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    let m = Mat::<T>::from_fn(n, n, |i, j| a[i * n + j]);
    let par = Par::Seq;
    let req = self_adjoint_evd_scratch::<T>(n, ComputeEigenvectors::Yes, par, Default::default());
    let mut buf = MemBuffer::new(req);
    let stack = MemStack::new(&mut buf);
    let mut s = faer::diag::Diag::<T>::zeros(n);
    let mut u = Mat::<T>::zeros(n, n);
    self_adjoint_evd(
        m.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        par,
        stack,
        Default::default(),
    )
    .map_err(|_| LinalgError::NoConvergence)?;
    let values: Vec<f64> = (0..n).map(|i| s[i].to_f64()).collect();
    let mut vectors = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            vectors.push(u[(i, j)]);
        }
    }
    if values.iter().any(|x| !x.is_finite()) || vectors.iter().any(|x| !x.to_f64().is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    Ok((vectors, values))
}

/// `Q diag(f(e)) Q^T` of a symmetric `n x n` row-major matrix with eigendecomposition
/// `Q diag(e) Q^T` computed in `T`; `f` gets the eigenvalues and the largest one (at least 0).
pub(crate) fn spectral_map<T: Real>(
    a: &[T],
    n: usize,
    f: impl Fn(f64, f64) -> f64,
) -> Result<Vec<T>, LinalgError> {
    let (q, e) = eigh_in::<T>(a, n)?;
    let top = e.last().copied().unwrap_or(0.0).max(0.0);
    let d: Vec<f64> = e.iter().map(|&x| f(x, top)).collect();
    if d.iter().any(|x| !x.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    let mut qd = q.clone();
    for row in qd.chunks_mut(n.max(1)) {
        for (x, &dk) in row.iter_mut().zip(&d) {
            *x = T::from_f64(x.to_f64() * dk);
        }
    }
    let mut out = vec![T::from_f64(0.0); n * n];
    if n > 0 {
        gemm_strided(
            T::from_f64(1.0),
            MatRef::row_major_op(&qd, n, n, false),
            MatRef::row_major_op(&q, n, n, true),
            T::from_f64(0.0),
            MatMut::new(&mut out, n, n, n, 1),
        );
    }
    if out.iter().any(|x| !x.to_f64().is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    Ok(out)
}

/// `(a+ + eps I)^p` for a symmetric `a` in `T`, where `a+` floors the eigenvalues at 0 and
/// `eps` is the ridge at the largest eigenvalue.
pub(crate) fn sym_power<T: Real>(
    a: &[T],
    n: usize,
    p: f64,
    ridge: Ridge,
) -> Result<Vec<T>, LinalgError> {
    spectral_map(a, n, |x, top| (x.max(0.0) + ridge.at(top)).powf(p))
}

/// `(a + damping I)^(-1/p)` through the eigendecomposition, eigenvalues clamped at zero before
/// the damping is added.
pub(crate) fn inv_root(a: &[f64], n: usize, p: u32, damping: f64) -> Result<Vec<f64>, LinalgError> {
    let (q, e) = eigh(a, n)?;
    let d: Vec<f64> = e
        .iter()
        .map(|&x| (x.max(0.0) + damping).powf(-1.0 / p as f64))
        .collect();
    if d.iter().any(|x| !x.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    // Q diag(d) Q^T.
    let mut qd = q.clone();
    for row in qd.chunks_mut(n.max(1)) {
        for (x, dk) in row.iter_mut().zip(&d) {
            *x *= dk;
        }
    }
    let mut out = vec![0.0f64; n * n];
    super::cpu::gemm_f64(n, n, n, 1.0, &qd, false, &q, true, 0.0, &mut out, n);
    Ok(out)
}
