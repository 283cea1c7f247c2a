//! What a Kronecker-factored adaptive method says of its own: one statistic per axis of each
//! block, how a step's gradient updates it, and what root of it preconditions.

use crate::backend::iterate::power;
use crate::backend::largest_eigenvalue;
use crate::backend::{Backend, LinalgError, Mat, Precision, Ridge, coupled_newton};

use super::config::{AdaptiveConfig, RootMethod};
use crate::error::OptimError;

/// A root computed at a refresh.
#[derive(Clone, Debug)]
pub struct Root {
    /// The matrix that multiplies the block's gradient along its axis.
    pub mat: Mat,
    /// Whether an `f32` eigendecomposition failed and the root came from the `f64` retry.
    pub retried_f64: bool,
}

/// One method's per-axis rule; the [`Adaptive`](super::Adaptive) engine owns the rest (shapes
/// and blocks, schedules, the failure policy, grafting, momentum, checkpoints).
pub trait FactorRule: Send + Sync + 'static {
    /// The optimizer's name, and its checkpoints' kind.
    const KIND: &'static str;

    /// Refuses configurations the method has no meaning for (beyond
    /// [`AdaptiveConfig::validate`]).
    ///
    /// # Errors
    /// [`OptimError::Config`] naming the field.
    fn check(&self, config: &AdaptiveConfig) -> Result<(), OptimError> {
        root_exponent_fits(config, self.exponent(config, 2))
    }

    /// The statistic of an axis of size `d` before any update.
    fn initial(&self, be: &dyn Backend, d: usize, config: &AdaptiveConfig) -> Mat;

    /// The axes of a block whose statistics update at its `n`-th statistics update (counted
    /// from 0). Every axis unless the method says otherwise.
    fn axes_due(&self, dims: &[usize], n: u64) -> Vec<usize> {
        let _ = n;
        (0..dims.len()).collect()
    }

    /// Whether an axis's statistic reads the gradient already preconditioned along the other
    /// axes (KrADagrad) instead of the raw gradient.
    fn preconditioned_statistics(&self) -> bool {
        false
    }

    /// Whether an axis with no usable root yet leaves the block alone along that axis (the
    /// identity, as KrADagrad's reference starts its preconditioners) instead of sending the
    /// whole block to the grafted rule.
    fn identity_before_root(&self) -> bool {
        false
    }

    /// Whether a refresh recomputes only the roots of axes updated since the last one.
    fn refresh_updated_only(&self) -> bool {
        false
    }

    /// Folds this step's mode-`i` unfolding `H_(i)` (of the gradient, or of its preconditioned
    /// form) into the axis's statistic; `h` holds `H_(i)`, or its transpose when `transposed`
    /// (the last axis of a row-major block is unfolded for free that way), and
    /// [`contraction`] forms `H_(i) H_(i)^T`. The engine checks the result is finite and keeps
    /// the old statistic otherwise.
    fn update(
        &self,
        be: &dyn Backend,
        stat: &mut Mat,
        h: &Mat,
        transposed: bool,
        config: &AdaptiveConfig,
    );

    /// The signed exponent of the root that preconditions an axis of an order-`order` block
    /// (negative for an inverse root).
    fn exponent(&self, config: &AdaptiveConfig, order: usize) -> f64;

    /// The root of an axis's statistic after `updates` updates, with `eps` (the configured
    /// epsilon times the failure policy's boost) as its ridge.
    ///
    /// # Errors
    /// The factorization's or iteration's failure.
    fn root(
        &self,
        be: &dyn Backend,
        stat: &Mat,
        order: usize,
        updates: u64,
        eps: f64,
        config: &AdaptiveConfig,
    ) -> Result<Root, LinalgError>;
}

/// `H_(i) H_(i)^T` from `h` holding `H_(i)` (or its transpose when `transposed`), in the
/// backend's element type (an uploaded gradient stays `f32` on an `f64` backend; the product
/// into an `f64` matrix is formed in `f64`).
pub fn contraction(be: &dyn Backend, h: &Mat, transposed: bool) -> Mat {
    let d = if transposed { h.cols() } else { h.rows() };
    let mut c = be.zeros(d, d);
    be.gemm_acc(0.0, &mut c, 1.0, h, transposed, h, !transposed);
    c
}

/// With coupled Newton roots, the exponent must be `±1/q` for a whole `q`.
pub(crate) fn root_exponent_fits(config: &AdaptiveConfig, p: f64) -> Result<(), OptimError> {
    if let RootMethod::CoupledNewton(_) = config.roots {
        newton_order(p).ok_or_else(|| OptimError::Config {
            field: "roots".into(),
            detail: format!(
                "coupled Newton computes roots of exponent ±1/q for a whole q, not {p}; use an \
                 eigendecomposition"
            ),
        })?;
    }
    Ok(())
}

/// `q` for an exponent `±1/q`, `q` whole.
fn newton_order(p: f64) -> Option<u32> {
    let q = 1.0 / p.abs();
    let r = q.round();
    ((q - r).abs() < 1e-9 && (1.0..=64.0).contains(&r)).then_some(r as u32)
}

/// `(stat+ + ridge I)^p` by the configured root method: an eigendecomposition (with the `f64`
/// retry), or coupled Newton (`p = -1/q` directly; `p = 1/q` as `(S^(-1/q))^(q-1) S`, the
/// KrADagrad authors' iterative form).
pub(crate) fn matrix_root(
    be: &dyn Backend,
    stat: &Mat,
    p: f64,
    ridge: Ridge,
    method: RootMethod,
) -> Result<Root, LinalgError> {
    match method {
        RootMethod::Eigh {
            precision,
            retry_f64,
        } => match be.sym_power(stat, p, ridge, precision) {
            Ok(mat) => Ok(Root {
                mat,
                retried_f64: false,
            }),
            Err(_) if retry_f64 && precision == Precision::F32 => be
                .sym_power(stat, p, ridge, Precision::F64)
                .map(|mat| Root {
                    mat,
                    retried_f64: true,
                }),
            Err(e) => Err(e),
        },
        RootMethod::CoupledNewton(it) => {
            let q = newton_order(p).expect("checked at construction");
            let top = match ridge {
                Ridge::Absolute(_) => 0.0,
                Ridge::Relative(_) => largest_eigenvalue(be, stat, 50),
            };
            let (x, _) = coupled_newton(be, stat, q, ridge.at(top), &it)?;
            let mat = if p < 0.0 {
                x
            } else if q == 1 {
                stat.clone()
            } else {
                let mut m = be.gemm(1.0, &power(be, &x, q - 1), false, stat, false);
                be.symmetrize(&mut m);
                m
            };
            if !be.is_finite(&mat) {
                return Err(LinalgError::NonFinite);
            }
            Ok(Root {
                mat,
                retried_f64: false,
            })
        }
    }
}
