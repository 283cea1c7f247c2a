//! The matrix primitives every optimizer is written over, behind an object-safe trait.
//!
//! A [`Backend`] keeps matrices where it computes ([`Mat`] is an opaque handle: host memory for
//! the CPU, a storage buffer for a GPU); [`Backend::upload`] and [`Backend::download`] are the
//! only copies between the host and the backend. The primitive list is the union of what
//! KFAC/KFC, Shampoo, KrADagrad and two-level KFAC need: GEMM with transposes, factor
//! accumulation into a running average, diagonal and elementwise updates, traces and inner
//! products, and the symmetric factorizations (damped inverse, eigendecomposition, inverse
//! `p`-th root).
//!
//! [`CpuBackend`] is always there; `WgpuBackend` (WGSL compute shaders through wgpu) comes with
//! the `wgpu` cargo feature. [`wgpu_backend`] opens the latter where it is compiled in and says
//! why not otherwise, so programs can offer `--backend wgpu` without `#[cfg]`.

mod cpu;
pub mod iterate;
pub(crate) mod linalg;
#[cfg(feature = "wgpu")]
mod wgpu;

use std::fmt;

use kron_autodiff::Tensor;
use serde::{Deserialize, Serialize};

#[cfg(feature = "wgpu")]
pub use self::wgpu::WgpuBackend;
pub use cpu::CpuBackend;
pub use iterate::{IterationConfig, IterationReport, coupled_newton, largest_eigenvalue};

/// The element type a backend keeps statistics and factorizations in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// Single precision (every backend).
    #[default]
    F32,
    /// Double precision (the CPU backend).
    F64,
}

/// A matrix resident on a backend. Only the backend that made it can read it.
#[derive(Clone)]
pub struct Mat {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) store: Store,
}

/// Where a matrix's elements live.
#[derive(Clone)]
pub(crate) enum Store {
    /// Host memory, `f32`, row-major (a [`Tensor`], so uploads of captures are not copies).
    F32(Tensor),
    /// Host memory, `f64`, row-major.
    F64(Vec<f64>),
    /// A wgpu storage buffer, `f32`, row-major.
    #[cfg(feature = "wgpu")]
    Gpu(self::wgpu::GpuBuf),
}

impl Mat {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The same elements, row-major, as a `rows x cols` matrix (no copy).
    ///
    /// # Panics
    /// If the element counts differ.
    pub fn reshaped(&self, rows: usize, cols: usize) -> Mat {
        assert_eq!(
            rows * cols,
            self.rows * self.cols,
            "Mat::reshaped: {self:?} into {rows}x{cols}"
        );
        let store = match &self.store {
            Store::F32(t) => Store::F32(t.reshape(&[rows, cols])),
            other => other.clone(),
        };
        Mat { rows, cols, store }
    }
}

/// The `rows x cols` matrix whose `i`-th element (row-major) is element `index[i]` of `m`, in
/// `m`'s own element type: the host-side permutation behind tensor unfoldings and sub-block
/// takes (a matrix in a GPU buffer goes through the host).
pub(crate) fn gather_elements(
    be: &dyn Backend,
    m: &Mat,
    index: &[usize],
    rows: usize,
    cols: usize,
) -> Mat {
    assert_eq!(
        index.len(),
        rows * cols,
        "gather_elements: {} indices for {rows}x{cols}",
        index.len()
    );
    let store = match &m.store {
        Store::F32(t) => {
            let d = t.data();
            Store::F32(Tensor::from_vec(
                index.iter().map(|&i| d[i]).collect(),
                &[rows, cols],
            ))
        }
        Store::F64(d) => Store::F64(index.iter().map(|&i| d[i]).collect()),
        #[cfg(feature = "wgpu")]
        Store::Gpu(_) => {
            let t = be.download(m);
            let d = t.data();
            return be.upload(&Tensor::from_vec(
                index.iter().map(|&i| d[i]).collect(),
                &[rows, cols],
            ));
        }
    };
    let _ = be;
    Mat { rows, cols, store }
}

impl fmt::Debug for Mat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.store {
            Store::F32(_) => "f32",
            Store::F64(_) => "f64",
            #[cfg(feature = "wgpu")]
            Store::Gpu(_) => "f32, wgpu buffer",
        };
        write!(f, "Mat({}x{}, {kind})", self.rows, self.cols)
    }
}

/// A factorization that did not succeed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LinalgError {
    /// Cholesky met a pivot that could not be made positive.
    NotPositiveDefinite {
        /// The pivot's index.
        pivot: usize,
    },
    /// The eigensolver did not converge.
    NoConvergence,
    /// An input or the result holds NaN or infinity.
    NonFinite,
    /// An iteration stopped without meeting its tolerance.
    NotConverged {
        /// Iterations run.
        iterations: usize,
        /// The residual reached.
        residual: f64,
    },
}

impl fmt::Display for LinalgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinalgError::NotPositiveDefinite { pivot } => {
                write!(f, "not positive definite (pivot {pivot})")
            }
            LinalgError::NoConvergence => write!(f, "eigensolver did not converge"),
            LinalgError::NonFinite => write!(f, "non-finite input or result"),
            LinalgError::NotConverged {
                iterations,
                residual,
            } => write!(
                f,
                "iteration stopped after {iterations} steps at residual {residual:.3e}"
            ),
        }
    }
}

impl std::error::Error for LinalgError {}

/// Why a backend could not be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// No adapter was found.
    NoAdapter {
        /// The wgpu backends tried (for example `"Vulkan"`).
        tried: String,
        /// What wgpu said.
        reason: String,
    },
    /// The adapter refused to open a device.
    Device {
        /// The adapter's name.
        adapter: String,
        /// What wgpu said.
        reason: String,
    },
    /// This build of kron-optim has no `wgpu` feature.
    FeatureDisabled,
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::NoAdapter { tried, reason } => write!(
                f,
                "no wgpu adapter found (backends tried: {tried}): {reason}; without a GPU, a \
                 software Vulkan driver works (Debian: mesa-vulkan-drivers)"
            ),
            DeviceError::Device { adapter, reason } => {
                write!(f, "wgpu adapter {adapter:?} refused a device: {reason}")
            }
            DeviceError::FeatureDisabled => write!(
                f,
                "kron-optim was built without its `wgpu` feature (enable `kron/wgpu`)"
            ),
        }
    }
}

impl std::error::Error for DeviceError {}

/// The wgpu backend, boxed, when this build has the `wgpu` feature: the first adapter
/// `WgpuBackend::new` finds. Lets a program choose its backend at run time
/// without `#[cfg]`.
///
/// # Errors
/// [`DeviceError::FeatureDisabled`] without the feature; otherwise what opening the adapter
/// reported.
pub fn wgpu_backend() -> Result<Box<dyn Backend>, DeviceError> {
    #[cfg(feature = "wgpu")]
    {
        Ok(Box::new(WgpuBackend::new()?))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        Err(DeviceError::FeatureDisabled)
    }
}

/// A damped inverse and how it was obtained.
#[derive(Clone, Debug)]
pub struct Inverse {
    /// `(M + damping I)^-1`.
    pub mat: Mat,
    /// Cholesky pivots that had to be regularized (0 when none).
    pub regularized_pivots: usize,
    /// Iterations, for iterative methods (Newton-Schulz on a GPU); `None` for direct ones.
    pub iterations: Option<usize>,
}

/// A symmetric eigendecomposition `M = Q diag(values) Q^T`, eigenvalues ascending.
#[derive(Clone, Debug)]
pub struct Eigh {
    /// The eigenvectors, as columns of `Q`.
    pub vectors: Mat,
    /// The eigenvalues, ascending.
    pub values: Vec<f64>,
}

/// The ridge `eps` a symmetric matrix power adds to the eigenvalues (after flooring them at 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Ridge {
    /// A fixed `eps`.
    Absolute(f64),
    /// `eps` times the largest eigenvalue (optax's `relative_matrix_epsilon`): the same relative
    /// floor whatever the statistics' scale.
    Relative(f64),
}

impl Ridge {
    /// The ridge for a matrix whose largest eigenvalue is `largest`.
    pub fn at(self, largest: f64) -> f64 {
        match self {
            Ridge::Absolute(e) => e,
            Ridge::Relative(e) => e * largest.max(0.0),
        }
    }

    /// The same kind of ridge, `factor` times larger (the failure policy's boost).
    pub fn boosted(self, factor: f64) -> Ridge {
        match self {
            Ridge::Absolute(e) => Ridge::Absolute(e * factor),
            Ridge::Relative(e) => Ridge::Relative(e * factor),
        }
    }

    /// The coefficient.
    pub fn value(self) -> f64 {
        match self {
            Ridge::Absolute(e) | Ridge::Relative(e) => e,
        }
    }
}

/// A scalar that [`Backend::read_back`] (and [`Backend::reductions`]) computes on the backend,
/// so that many of them travel back to the host together.
#[derive(Clone, Copy, Debug)]
pub enum Reduction<'a> {
    /// The trace ([`Backend::trace`]).
    Trace(&'a Mat),
    /// The Frobenius inner product `sum_ij a_ij b_ij` ([`Backend::dot`]).
    Dot(&'a Mat, &'a Mat),
    /// The squared Frobenius norm `sum_ij m_ij^2` (the inner product of `m` with itself).
    SquaredNorm(&'a Mat),
    /// 1 when some element is NaN or infinite, 0 when [`Backend::is_finite`] holds.
    NonFinite(&'a Mat),
}

/// Matrix primitives for the optimizers' math. Object-safe: optimizers hold a
/// `Box<dyn Backend>` chosen at run time.
pub trait Backend: Send + Sync + fmt::Debug {
    /// A name for reports (`"cpu (f64)"`, `"wgpu: llvmpipe (Vulkan)"`).
    fn name(&self) -> String;

    /// The element type of its matrices.
    fn precision(&self) -> Precision;

    /// Copies the first `rows` rows of a host matrix (all rows if `None`) to the backend.
    fn upload_rows(&self, t: &Tensor, rows: Option<usize>) -> Mat;

    /// Copies a host matrix to the backend.
    fn upload(&self, t: &Tensor) -> Mat {
        self.upload_rows(t, None)
    }

    /// Copies a matrix back to the host, as `f32`.
    fn download(&self, m: &Mat) -> Tensor;

    /// A matrix of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Mat;

    /// `alpha * op(a) * op(b)`, `op` transposing where the flag says.
    fn gemm(&self, alpha: f32, a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat;

    /// The running average of a Kronecker factor:
    /// `acc <- decay * acc + scale * x_aug^T x_aug`, where `x_aug` is `x` with a column of ones
    /// appended when `homogeneous` (never built: its row of the product is the column sums).
    fn factor_ema(&self, acc: &mut Mat, x: &Mat, homogeneous: bool, scale: f32, decay: f32);

    /// `m <- m + v I`.
    fn add_diag(&self, m: &mut Mat, v: f64);

    /// `m <- s m`.
    fn scale(&self, m: &mut Mat, s: f64);

    /// `y <- alpha x + beta y`.
    fn axpby(&self, alpha: f64, x: &Mat, beta: f64, y: &mut Mat);

    /// `m_ij <- m_ij / (left_i * right_j + add)` (the eigenbasis preconditioner's division).
    fn div_outer(&self, m: &mut Mat, left: &[f64], right: &[f64], add: f64);

    /// The trace.
    fn trace(&self, m: &Mat) -> f64;

    /// The Frobenius inner product `sum_ij a_ij b_ij` (its square root on `(a, a)` is the
    /// Frobenius norm).
    fn dot(&self, a: &Mat, b: &Mat) -> f64;

    /// Whether every element is finite.
    fn is_finite(&self, m: &Mat) -> bool;

    /// `m <- sqrt(m)` elementwise (NaN where an element is negative). The default goes through
    /// the host in `f32`.
    fn sqrt(&self, m: &mut Mat) {
        *m = self.upload(&self.download(m).map(f32::sqrt));
    }

    /// `m <- 1 / (m + eps)` elementwise: the reciprocal with the denominator's epsilon of the
    /// adaptive first-order rules (`eps = 0` for the plain reciprocal). The default goes through
    /// the host in `f32`.
    fn recip(&self, m: &mut Mat, eps: f64) {
        let e = eps as f32;
        *m = self.upload(&self.download(m).map(|x| 1.0 / (x + e)));
    }

    /// `m <- a ⊙ m`, the elementwise (Hadamard) product. The default goes through the host in
    /// `f32`.
    fn mul(&self, a: &Mat, m: &mut Mat) {
        assert_eq!(a.dims(), m.dims(), "Backend::mul: {a:?} vs {m:?}");
        *m = self.upload(&self.download(a).mul(&self.download(m)));
    }

    /// Copies the matrices `mats` back to the host (as [`Backend::download`] does) and computes
    /// the scalars `scalars` (each as its own primitive does: [`Backend::trace`],
    /// [`Backend::dot`], ...), in one read-back from the device: a step that needs several
    /// blocks' results waits on the device once, not once per block. The default reads each on
    /// its own (right for host backends, where a read-back is free).
    fn read_back(&self, mats: &[&Mat], scalars: &[Reduction<'_>]) -> (Vec<Tensor>, Vec<f64>) {
        let t = mats.iter().map(|m| self.download(m)).collect();
        let s = scalars
            .iter()
            .map(|r| match *r {
                Reduction::Trace(m) => self.trace(m),
                Reduction::Dot(a, b) => self.dot(a, b),
                Reduction::SquaredNorm(m) => self.dot(m, m),
                Reduction::NonFinite(m) => f64::from(u8::from(!self.is_finite(m))),
            })
            .collect();
        (t, s)
    }

    /// The scalars `scalars` in one read-back ([`Backend::read_back`] without matrices).
    fn reductions(&self, scalars: &[Reduction<'_>]) -> Vec<f64> {
        self.read_back(&[], scalars).1
    }

    /// `(m + damping I)^-1` for a symmetric positive semi-definite `m`.
    fn spd_inverse(&self, m: &Mat, damping: f32) -> Result<Inverse, LinalgError>;

    /// The symmetric eigendecomposition of `m`.
    fn eigh(&self, m: &Mat) -> Result<Eigh, LinalgError>;

    /// `(m + damping I)^(-1/p)` for a symmetric positive semi-definite `m`.
    fn inv_root(&self, m: &Mat, p: u32, damping: f32) -> Result<Mat, LinalgError>;

    /// `C <- beta C + alpha op(a) op(b)`: the accumulating product (Shampoo's `L += G G^T`).
    /// The default forms the product and adds it.
    #[allow(clippy::too_many_arguments)]
    fn gemm_acc(&self, beta: f64, c: &mut Mat, alpha: f64, a: &Mat, ta: bool, b: &Mat, tb: bool) {
        let p = self.gemm(alpha as f32, a, ta, b, tb);
        assert_eq!(
            p.dims(),
            c.dims(),
            "Backend::gemm_acc: product of {a:?} and {b:?} (ta {ta}, tb {tb}) does not fit {c:?}"
        );
        self.axpby(1.0, &p, beta, c);
    }

    /// `m <- (m + m^T) / 2` for a square `m`. The default goes through the host.
    fn symmetrize(&self, m: &mut Mat) {
        assert_eq!(m.rows, m.cols, "Backend::symmetrize: {m:?} is not square");
        let mut t = self.download(m);
        let n = m.rows;
        let d = t.data_mut();
        for i in 0..n {
            for j in 0..i {
                let v = 0.5 * (d[i * n + j] + d[j * n + i]);
                d[i * n + j] = v;
                d[j * n + i] = v;
            }
        }
        *m = self.upload(&t);
    }

    /// `(m+ + eps I)^p` for a symmetric `m` and any real `p`, through the eigendecomposition
    /// `m = Q diag(e) Q^T` computed in `precision`: the eigenvalues are floored at 0, the ridge
    /// `eps` (absolute, or relative to the largest eigenvalue) is added, and the result is
    /// `Q diag((max(e, 0) + eps)^p) Q^T` (Shampoo's `-1/(2k)`, KrADagrad's `1/4`, `1/2`). A
    /// non-finite input or result (a negative `p` on a singular matrix without a ridge) is
    /// [`LinalgError::NonFinite`]. The default decomposes on the host (as [`Backend::eigh`] does
    /// on a GPU).
    fn sym_power(
        &self,
        m: &Mat,
        p: f64,
        ridge: Ridge,
        precision: Precision,
    ) -> Result<Mat, LinalgError> {
        assert_eq!(m.rows, m.cols, "Backend::sym_power: {m:?} is not square");
        let t = self.download(m);
        let n = m.rows;
        let out: Vec<f32> = match precision {
            Precision::F32 => linalg::sym_power::<f32>(t.data(), n, p, ridge)?,
            Precision::F64 => {
                let a: Vec<f64> = t.data().iter().map(|&x| x as f64).collect();
                linalg::sym_power::<f64>(&a, n, p, ridge)?
                    .into_iter()
                    .map(|x| x as f32)
                    .collect()
            }
        };
        let r = Tensor::from_vec(out, &[n, n]);
        if !r.all_finite() {
            return Err(LinalgError::NonFinite);
        }
        Ok(self.upload(&r))
    }

    /// Whether [`Backend::eigh`] leaves the backend's device: it downloads, decomposes on the
    /// host CPU and uploads (the wgpu backend does). Optimizers say so in their reports. The
    /// default is `false`.
    fn delegates_eigh(&self) -> bool {
        false
    }
}

/// A shared backend is a backend: an optimizer can own an `Arc` of one that a program (or a
/// test) keeps a handle to, to inspect or to share between optimizers.
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn precision(&self) -> Precision {
        (**self).precision()
    }
    fn upload_rows(&self, t: &Tensor, rows: Option<usize>) -> Mat {
        (**self).upload_rows(t, rows)
    }
    fn upload(&self, t: &Tensor) -> Mat {
        (**self).upload(t)
    }
    fn download(&self, m: &Mat) -> Tensor {
        (**self).download(m)
    }
    fn zeros(&self, rows: usize, cols: usize) -> Mat {
        (**self).zeros(rows, cols)
    }
    fn gemm(&self, alpha: f32, a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat {
        (**self).gemm(alpha, a, ta, b, tb)
    }
    fn factor_ema(&self, acc: &mut Mat, x: &Mat, homogeneous: bool, scale: f32, decay: f32) {
        (**self).factor_ema(acc, x, homogeneous, scale, decay)
    }
    fn add_diag(&self, m: &mut Mat, v: f64) {
        (**self).add_diag(m, v)
    }
    fn scale(&self, m: &mut Mat, s: f64) {
        (**self).scale(m, s)
    }
    fn axpby(&self, alpha: f64, x: &Mat, beta: f64, y: &mut Mat) {
        (**self).axpby(alpha, x, beta, y)
    }
    fn div_outer(&self, m: &mut Mat, left: &[f64], right: &[f64], add: f64) {
        (**self).div_outer(m, left, right, add)
    }
    fn trace(&self, m: &Mat) -> f64 {
        (**self).trace(m)
    }
    fn dot(&self, a: &Mat, b: &Mat) -> f64 {
        (**self).dot(a, b)
    }
    fn is_finite(&self, m: &Mat) -> bool {
        (**self).is_finite(m)
    }
    fn sqrt(&self, m: &mut Mat) {
        (**self).sqrt(m)
    }
    fn recip(&self, m: &mut Mat, eps: f64) {
        (**self).recip(m, eps)
    }
    fn mul(&self, a: &Mat, m: &mut Mat) {
        (**self).mul(a, m)
    }
    fn read_back(&self, mats: &[&Mat], scalars: &[Reduction<'_>]) -> (Vec<Tensor>, Vec<f64>) {
        (**self).read_back(mats, scalars)
    }
    fn reductions(&self, scalars: &[Reduction<'_>]) -> Vec<f64> {
        (**self).reductions(scalars)
    }
    fn spd_inverse(&self, m: &Mat, damping: f32) -> Result<Inverse, LinalgError> {
        (**self).spd_inverse(m, damping)
    }
    fn eigh(&self, m: &Mat) -> Result<Eigh, LinalgError> {
        (**self).eigh(m)
    }
    fn inv_root(&self, m: &Mat, p: u32, damping: f32) -> Result<Mat, LinalgError> {
        (**self).inv_root(m, p, damping)
    }
    fn gemm_acc(&self, beta: f64, c: &mut Mat, alpha: f64, a: &Mat, ta: bool, b: &Mat, tb: bool) {
        (**self).gemm_acc(beta, c, alpha, a, ta, b, tb)
    }
    fn symmetrize(&self, m: &mut Mat) {
        (**self).symmetrize(m)
    }
    fn sym_power(
        &self,
        m: &Mat,
        p: f64,
        ridge: Ridge,
        precision: Precision,
    ) -> Result<Mat, LinalgError> {
        (**self).sym_power(m, p, ridge, precision)
    }
    fn delegates_eigh(&self) -> bool {
        (**self).delegates_eigh()
    }
}
