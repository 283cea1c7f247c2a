//! Matrix iterations written once over [`Backend`]: Newton-Schulz for the damped inverse, the
//! coupled Newton iteration for inverse `p`-th roots (Higham, *Functions of Matrices* eq. 7.18;
//! Guo & Higham 2006) and a power iteration for the largest eigenvalue. They need only products, scaling, diagonal updates
//! and reductions, so they run on every backend: in `f32` on a GPU, and on the CPU to test that
//! path or to avoid an eigendecomposition.

use serde::{Deserialize, Serialize};

use super::{Backend, LinalgError, Mat};

/// When Newton-Schulz and coupled Newton stop, and when their result counts as a failure.
///
/// Each iteration watches its own error every step: Newton-Schulz the residual
/// `‖I - A X‖_F / √n` of its iterate (`A = M + dI`), coupled Newton `max_ij |M_k - I|_ij` (the
/// form of Higham's iteration the reference Shampoo implementations use). Either stops when its
/// error falls under `tolerance`, when the error stops shrinking (in `f32` that is the usual
/// exit: rounding sets a floor), or after `max_iterations`, and keeps its best iterate `X`. The
/// result is then judged by its residual `‖I - X^p A‖_F / (p √n)` (`p = 1` for the inverse: the
/// root-mean-square of the residual's columns, which bounds `X`'s relative error in the mean; for
/// a root, `X^p A - I` is to first order `p` times `X`'s relative error): above
/// `failure_threshold` it is refused with [`LinalgError::NotConverged`].
///
/// In `f32` both residuals and errors grow as `κ · 2^-24`: against an `f64` reference, the
/// relative error is about `1e-8 κ` (measured on lavapipe, `n = 96`: 1e-4 at κ = 1e4, 1e-3 to
/// 2e-2 at κ = 1e6), so beyond κ ≈ 1e6 `f32` stops being enough and the damping must carry the
/// conditioning.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct IterationConfig {
    /// Residual under which the iteration has converged (default 1e-6, the tolerance of the
    /// reference Shampoo implementations; in `f32` the rounding floor usually stops it first).
    pub tolerance: f32,
    /// Iteration cap (default 100, as the reference Shampoo implementations).
    pub max_iterations: usize,
    /// Residual above which the result is refused (default 0.1, optax Shampoo's
    /// `inverse_failure_threshold`).
    pub failure_threshold: f32,
}

impl Default for IterationConfig {
    fn default() -> Self {
        IterationConfig {
            tolerance: 1e-6,
            max_iterations: 100,
            failure_threshold: 0.1,
        }
    }
}

impl IterationConfig {
    /// Sets the convergence tolerance.
    pub fn with_tolerance(mut self, tolerance: f32) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Sets the iteration cap.
    pub fn with_max_iterations(mut self, max_iterations: usize) -> Self {
        self.max_iterations = max_iterations;
        self
    }

    /// Sets the residual above which a result is refused.
    pub fn with_failure_threshold(mut self, failure_threshold: f32) -> Self {
        self.failure_threshold = failure_threshold;
        self
    }
}

/// How an iteration ended.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct IterationReport {
    /// Iterations run to reach the returned iterate.
    pub iterations: usize,
    /// Iterations run in all (the last ones may have found no improvement).
    pub iterations_run: usize,
    /// The returned iterate's residual `‖I - X^p A‖_F / (p √n)`.
    pub residual: f64,
    /// Whether the iteration's own error fell under the tolerance (otherwise it stopped at the
    /// rounding floor, or at the cap).
    pub converged: bool,
}

/// `v I` of size `n`.
fn identity(be: &dyn Backend, n: usize, v: f64) -> Mat {
    let mut m = be.zeros(n, n);
    be.add_diag(&mut m, v);
    m
}

/// `‖m - I‖_F / √n`: for the symmetric iterates of coupled Newton (polynomials in `A`), the
/// root-mean-square over the eigenvalues `μ` of `|μ - 1|`, each of which shrinks every step in
/// exact arithmetic, so a growth is rounding or divergence (an elementwise maximum can grow by
/// up to `√n` on the way and stop a converging iteration).
fn rms_minus_identity(be: &dyn Backend, m: &Mat) -> f64 {
    let mut d = m.clone();
    be.add_diag(&mut d, -1.0);
    (be.dot(&d, &d) / m.rows().max(1) as f64).sqrt()
}

/// `t^p` by repeated squaring.
pub(crate) fn power(be: &dyn Backend, t: &Mat, p: u32) -> Mat {
    assert!(p >= 1, "power: p must be at least 1");
    let mut result: Option<Mat> = None;
    let mut base = t.clone();
    let mut e = p;
    loop {
        if e & 1 == 1 {
            result = Some(match result {
                None => base.clone(),
                Some(r) => be.gemm(1.0, &r, false, &base, false),
            });
        }
        e >>= 1;
        if e == 0 {
            break;
        }
        base = be.gemm(1.0, &base, false, &base, false);
    }
    result.expect("p >= 1")
}

/// The largest eigenvalue of a symmetric positive semi-definite `m`, by `iterations` steps of
/// the power iteration from the all-ones vector (a lower bound that converges from below; 0 for
/// an empty or zero matrix).
pub fn largest_eigenvalue(be: &dyn Backend, m: &Mat, iterations: usize) -> f64 {
    let n = m.rows();
    if n == 0 {
        return 0.0;
    }
    let mut v = be.upload(&kron_autodiff::Tensor::from_vec(vec![1.0; n], &[n, 1]));
    let mut lambda = 0.0;
    for _ in 0..iterations.max(1) {
        let w = be.gemm(1.0, m, false, &v, false);
        let norm = be.dot(&w, &w).sqrt();
        let vv = be.dot(&v, &v);
        if !(norm.is_finite() && norm > 0.0 && vv > 0.0) {
            return if norm.is_finite() {
                lambda
            } else {
                f64::INFINITY
            };
        }
        lambda = be.dot(&v, &w) / vv;
        v = w;
        be.scale(&mut v, 1.0 / norm);
    }
    lambda
}

/// Accepts an iterate whose report's residual is within the failure threshold.
fn judge(
    x: Mat,
    report: IterationReport,
    config: &IterationConfig,
) -> Result<(Mat, IterationReport), LinalgError> {
    if report.residual <= config.failure_threshold as f64 {
        Ok((x, report))
    } else {
        Err(LinalgError::NotConverged {
            iterations: report.iterations_run,
            residual: report.residual,
        })
    }
}

/// Newton-Schulz iteration for `(m + damping I)^-1` on any backend, with its report.
///
/// `X_0 = alpha I` with `alpha = 2 / (d + ‖M‖_F + d)` (the eigenvalues of `(M + dI) X_0` then lie
/// in `(0, 2)` for a positive semi-definite `M`), then `X <- X + X (I - A X)` with `A = M + dI`.
/// The residual `‖I - A X‖_F` never grows in exact arithmetic and, once under 1, squares each
/// step; the iterations needed grow as `log2(κ)`. It stops when the residual `/ √n` falls
/// under the tolerance or stops shrinking as it should, and keeps the best iterate.
///
/// # Errors
/// [`LinalgError::NonFinite`] for non-finite input or damping; [`LinalgError::NotConverged`]
/// when the best residual stays above the failure threshold (an input that is not positive
/// definite after damping, or one too ill-conditioned for `f32`).
///
/// # Panics
/// If `m` is not square.
pub fn newton_schulz(
    be: &dyn Backend,
    m: &Mat,
    damping: f64,
    config: &IterationConfig,
) -> Result<(Mat, IterationReport), LinalgError> {
    assert_eq!(m.rows(), m.cols(), "newton_schulz: {m:?} is not square");
    let n = m.rows();
    let d = damping;
    if !d.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    if n == 0 {
        let rep = IterationReport {
            iterations: 0,
            iterations_run: 0,
            residual: 0.0,
            converged: true,
        };
        return Ok((be.zeros(0, 0), rep));
    }
    let norm = be.dot(m, m).sqrt();
    if !norm.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    let upper = norm + d;
    if upper <= 0.0 {
        return Err(LinalgError::NotConverged {
            iterations: 0,
            residual: f64::INFINITY,
        });
    }
    let alpha = 2.0 / (d.max(0.0) + upper);
    let rn = (n as f64).sqrt();
    let mut x = identity(be, n, alpha);
    // R = I - (M + dI) X = I - M X - d X.
    let residual = |x: &Mat| {
        let mut r = be.gemm(-1.0, m, false, x, false);
        be.axpby(-d, x, 1.0, &mut r);
        be.add_diag(&mut r, 1.0);
        r
    };
    let mut r = residual(&x);
    let mut res = be.dot(&r, &r).sqrt();
    if !res.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    let mut best = (x.clone(), res, 0usize);
    let mut run = 0;
    while res / rn > config.tolerance as f64 && run < config.max_iterations {
        // X <- X + X R.
        let mut xr = be.gemm(1.0, &x, false, &r, false);
        be.axpby(1.0, &x, 1.0, &mut xr);
        x = xr;
        run += 1;
        r = residual(&x);
        let prev = res;
        res = be.dot(&r, &r).sqrt();
        if !res.is_finite() {
            break;
        }
        if res < best.1 {
            best = (x.clone(), res, run);
        }
        // In exact arithmetic the residual never grows, and once under 1/2 it at least
        // halves (it squares): anything else is the rounding floor, or divergence.
        let expected = if prev < 0.5 { 0.5 * prev } else { prev };
        if res >= expected {
            break;
        }
    }
    let (x, res, iterations) = best;
    let res = res / rn;
    let report = IterationReport {
        iterations,
        iterations_run: run,
        residual: res,
        converged: res <= config.tolerance as f64,
    };
    judge(x, report, config)
}

/// Coupled Newton iteration for `(m + ridge I)^(-1/p)` on any backend, with its report.
///
/// With `A = M + ridge I` and `z = (1 + p) / (2 ‖A‖_F)`: `X_0 = z^(1/p) I`, `M_0 = z A`; each
/// step `T = ((1 + 1/p) I - M / p)`, `X <- X T`, `M <- T^p M`, until `‖M - I‖_F / √n` falls under
/// the tolerance (the reference Shampoo implementations watch the elementwise `max |M - I|`,
/// which can grow while the iteration converges); it stops early when that error grows by more
/// than 1.2x or stops shrinking (the `f32` rounding floor), and returns the best iterate,
/// judged by its residual `‖I - X^p A‖_F / (p √n)` against `config.failure_threshold`.
///
/// # Errors
/// [`LinalgError::NonFinite`] for non-finite input; [`LinalgError::NotConverged`] when the
/// residual stays above the failure threshold.
///
/// # Panics
/// If `m` is not square or `p` is 0.
pub fn coupled_newton(
    be: &dyn Backend,
    m: &Mat,
    p: u32,
    ridge: f64,
    config: &IterationConfig,
) -> Result<(Mat, IterationReport), LinalgError> {
    assert_eq!(m.rows(), m.cols(), "coupled_newton: {m:?} is not square");
    assert!(p >= 1, "coupled_newton: p must be at least 1");
    let n = m.rows();
    if !ridge.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    if n == 0 {
        let rep = IterationReport {
            iterations: 0,
            iterations_run: 0,
            residual: 0.0,
            converged: true,
        };
        return Ok((be.zeros(0, 0), rep));
    }
    let mut a = m.clone();
    be.add_diag(&mut a, ridge);
    let norm = be.dot(&a, &a).sqrt();
    if !norm.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    if norm <= 0.0 {
        return Err(LinalgError::NotConverged {
            iterations: 0,
            residual: f64::INFINITY,
        });
    }
    let pf = p as f64;
    let z = (1.0 + pf) / (2.0 * norm);
    let mut x = identity(be, n, z.powf(1.0 / pf));
    let mut mk = a.clone();
    be.scale(&mut mk, z);
    let mut err = rms_minus_identity(be, &mk);
    if !err.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    let mut best = (x.clone(), err, 0usize);
    let mut run = 0;
    let (c1, c0) = (-(1.0 / pf), 1.0 + 1.0 / pf);
    while err > config.tolerance as f64 && run < config.max_iterations {
        let mut t = mk.clone();
        be.scale(&mut t, c1);
        be.add_diag(&mut t, c0);
        let x_new = be.gemm(1.0, &x, false, &t, false);
        let tp = power(be, &t, p);
        let m_new = be.gemm(1.0, &tp, false, &mk, false);
        let e = rms_minus_identity(be, &m_new);
        run += 1;
        if !e.is_finite() || e > 1.2 * err {
            break;
        }
        let stalled = e >= err;
        x = x_new;
        mk = m_new;
        err = e;
        if err < best.1 {
            best = (x.clone(), err, run);
        }
        if stalled {
            break;
        }
    }
    let (x, err, iterations) = best;
    // The residual of the result itself (the coupled M drifts from X^p A in rounding), divided
    // by p: to first order, p times X's relative error.
    let xp = power(be, &x, p);
    let mut r = be.gemm(1.0, &xp, false, &a, false);
    be.add_diag(&mut r, -1.0);
    let res = (be.dot(&r, &r) / n as f64).sqrt() / pf;
    if !res.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    let report = IterationReport {
        iterations,
        iterations_run: run,
        residual: res,
        converged: err <= config.tolerance as f64,
    };
    judge(x, report, config)
}
