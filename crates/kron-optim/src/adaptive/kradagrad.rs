//! KrADagrad* and KrADagrad (Mei, Moreno, Walters, UAI 2023): the inverse statistic
//! `P ~ L^-1` of each axis updated directly, never inverted.
//!
//! KrADagrad* (the authors' `KradagradPP`): with `C = H_(i) H_(i)^T`, the exact update
//! `(L + C)^-1 = P - P H (I + H^T P H)^-1 H^T P` with the inner inverse replaced by its bound
//! `1 / (1 + tr(C P))`, so `P <- P - P C P / (1 + tr(C P))` dominates the true inverse (it is
//! exact Sherman-Morrison for a rank-1 `C`); `P` starts at `I / eps` (the inverse of Shampoo's
//! `eps I`) and preconditions with the positive root `P^(1/(2k))`. The authors' serial code
//! also multiplies the denominator by the axis size; kron keeps the trace form the domination
//! argument needs by default ([`Denominator::TraceTimesSize`] reproduces theirs).
//!
//! KrADagrad (`KradagradMM`): one axis per step on the authors' schedule, its statistic read
//! from the gradient preconditioned along the other axes, a damping step
//! `P' = P - eps P P` before the update `P <- P' - P' C P' / (1 + |P' C|_F)`, `P` starting at
//! `I`, and the root `P^(1/2)` whatever the order. Its update is not a domination (the
//! Frobenius norm is below the trace); the tests replay it densely in `f64`.
//!
//! Their roots add no ridge to the positive definite `P` (the authors' eigendecomposition adds
//! `1e-8 I`). Both symmetrize `P` after each update; `beta2 < 1` divides `P` by `beta2` first (the inverse
//! of `L <- beta2 L`).

use super::config::AdaptiveConfig;
use super::rule::{FactorRule, Root, contraction, matrix_root, root_exponent_fits};
use crate::backend::{Backend, LinalgError, Mat, Ridge};
use crate::error::OptimError;

/// KrADagrad*'s rule; the optimizer is [`KrAdagradStar`](super::KrAdagradStar).
#[derive(Clone, Copy, Debug, Default)]
pub struct KrAdStarRule {
    /// The denominator of the update.
    pub denominator: Denominator,
}

/// The denominator `tau` of KrADagrad*'s update `P <- P - P C P / tau`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Denominator {
    /// `1 + tr(C P)`: the bound on `I + H^T P H` that makes the update dominate the true
    /// inverse, exact Sherman-Morrison for a rank-1 `C` (default).
    #[default]
    Trace,
    /// `(1 + tr(C P)) d`, `d` the axis size: what the authors' serial code
    /// (`KrADPreconditioner.add_statistics` at 9852c42) computes; it subtracts less, so it
    /// still dominates, but is not exact on rank-1 statistics.
    TraceTimesSize,
}

/// KrADagrad's rule; the optimizer is [`KrAdagrad`](super::KrAdagrad).
#[derive(Clone, Copy, Debug, Default)]
pub struct KrAdRule;

/// The epsilon of a KrAD method: absolute (and above 0 when `positive`).
fn absolute_epsilon(config: &AdaptiveConfig, positive: bool) -> Result<f64, OptimError> {
    match config.epsilon {
        Ridge::Absolute(e) if !positive || e > 0.0 => Ok(e),
        Ridge::Absolute(e) => Err(OptimError::Config {
            field: "epsilon".into(),
            detail: format!(
                "KrADagrad* starts its inverse statistic at I / epsilon: must be above 0, not {e}"
            ),
        }),
        Ridge::Relative(_) => Err(OptimError::Config {
            field: "epsilon".into(),
            detail: "KrADagrad takes an absolute epsilon, not one relative to an eigenvalue".into(),
        }),
    }
}

/// `P <- P / beta2` when the statistics decay.
fn undecay(be: &dyn Backend, p: &mut Mat, config: &AdaptiveConfig) {
    if config.beta2 < 1.0 {
        be.scale(p, 1.0 / config.beta2 as f64);
    }
}

/// The positive root `P^p` with the configured method. `P` is positive definite by
/// construction, so a first attempt adds nothing (`eps` is the configured epsilon); a retry
/// after a failure (`eps` boosted by the failure policy) adds the boost's excess
/// `eps - epsilon` as a ridge.
fn positive_root(
    be: &dyn Backend,
    stat: &Mat,
    p: f64,
    eps: f64,
    config: &AdaptiveConfig,
) -> Result<Root, LinalgError> {
    let ridge = (eps - config.epsilon.value()).max(0.0);
    matrix_root(be, stat, p, Ridge::Absolute(ridge), config.roots)
}

impl FactorRule for KrAdStarRule {
    const KIND: &'static str = "kradagrad-star";

    fn check(&self, config: &AdaptiveConfig) -> Result<(), OptimError> {
        absolute_epsilon(config, true)?;
        root_exponent_fits(config, self.exponent(config, 2))
    }

    fn initial(&self, be: &dyn Backend, d: usize, config: &AdaptiveConfig) -> Mat {
        let mut p = be.zeros(d, d);
        be.add_diag(&mut p, 1.0 / config.epsilon.value());
        p
    }

    fn update(
        &self,
        be: &dyn Backend,
        stat: &mut Mat,
        h: &Mat,
        transposed: bool,
        config: &AdaptiveConfig,
    ) {
        undecay(be, stat, config);
        let c = contraction(be, h, transposed);
        let m = be.gemm(1.0, &c, false, stat, false);
        let tau = match self.denominator {
            Denominator::Trace => 1.0 + be.trace(&m),
            Denominator::TraceTimesSize => (1.0 + be.trace(&m)) * stat.rows() as f64,
        };
        let pm = be.gemm(1.0, stat, false, &m, false);
        be.axpby(-1.0 / tau, &pm, 1.0, stat);
        be.symmetrize(stat);
    }

    fn exponent(&self, config: &AdaptiveConfig, order: usize) -> f64 {
        config.exponent.unwrap_or(1.0 / (2 * order.max(1)) as f64)
    }

    fn root(
        &self,
        be: &dyn Backend,
        stat: &Mat,
        order: usize,
        _: u64,
        eps: f64,
        config: &AdaptiveConfig,
    ) -> Result<Root, LinalgError> {
        positive_root(be, stat, self.exponent(config, order), eps, config)
    }
}

/// The axis KrADagrad updates at a block's `n`-th statistics update (from 0): round robin for
/// the first `k^2` updates; then axis `e` at `n = floor(sqrt(n))^2 + e` for `e < k`, and the
/// largest axis (the first of equals) otherwise, so the other axes get `O(sqrt(n))` updates.
pub fn kradagrad_axis(dims: &[usize], n: u64) -> usize {
    let k = dims.len() as u64;
    if n < k * k {
        return (n % k) as usize;
    }
    let s = n.isqrt();
    let e = n - s * s;
    if e < k {
        e as usize
    } else {
        let max = dims.iter().copied().max().unwrap_or(0);
        dims.iter().position(|&d| d == max).unwrap_or(0)
    }
}

impl FactorRule for KrAdRule {
    const KIND: &'static str = "kradagrad";

    fn check(&self, config: &AdaptiveConfig) -> Result<(), OptimError> {
        absolute_epsilon(config, false)?;
        root_exponent_fits(config, self.exponent(config, 2))
    }

    fn initial(&self, be: &dyn Backend, d: usize, _: &AdaptiveConfig) -> Mat {
        let mut p = be.zeros(d, d);
        be.add_diag(&mut p, 1.0);
        p
    }

    fn axes_due(&self, dims: &[usize], n: u64) -> Vec<usize> {
        vec![kradagrad_axis(dims, n)]
    }

    fn preconditioned_statistics(&self) -> bool {
        true
    }

    fn refresh_updated_only(&self) -> bool {
        true
    }

    fn identity_before_root(&self) -> bool {
        true
    }

    fn update(
        &self,
        be: &dyn Backend,
        stat: &mut Mat,
        h: &Mat,
        transposed: bool,
        config: &AdaptiveConfig,
    ) {
        undecay(be, stat, config);
        let eps = config.epsilon.value();
        if eps > 0.0 {
            let pp = be.gemm(1.0, stat, false, stat, true);
            be.axpby(-eps, &pp, 1.0, stat);
        }
        let c = contraction(be, h, transposed);
        let l = be.gemm(1.0, stat, false, &c, false);
        let tau = 1.0 + be.dot(&l, &l).sqrt();
        let d = be.gemm(1.0, &l, false, stat, true);
        be.axpby(-1.0 / tau, &d, 1.0, stat);
        be.symmetrize(stat);
    }

    fn exponent(&self, config: &AdaptiveConfig, _: usize) -> f64 {
        config.exponent.unwrap_or(0.5)
    }

    fn root(
        &self,
        be: &dyn Backend,
        stat: &Mat,
        order: usize,
        _: u64,
        eps: f64,
        config: &AdaptiveConfig,
    ) -> Result<Root, LinalgError> {
        positive_root(be, stat, self.exponent(config, order), eps, config)
    }
}
