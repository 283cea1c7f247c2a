//! Shampoo (Gupta, Koren, Singer 2018; Anil et al. 2020; Shi et al. 2023): per-axis statistics
//! `L_i += H_(i) H_(i)^T` of each block's gradient (a sum, or a running average with optional
//! bias correction), and the preconditioned gradient `G x_1 (L_1 + eps I)^(-1/(2k)) ... x_k
//! (L_k + eps I)^(-1/(2k))` for an order-`k` block.

use super::config::AdaptiveConfig;
use super::rule::{FactorRule, Root, matrix_root};
use crate::backend::{Backend, LinalgError, Mat, Ridge};

/// Shampoo's rule (see the [module docs](super)); the optimizer is [`Shampoo`](super::Shampoo).
#[derive(Clone, Copy, Debug, Default)]
pub struct ShampooRule;

impl FactorRule for ShampooRule {
    const KIND: &'static str = "shampoo";

    fn initial(&self, be: &dyn Backend, d: usize, _: &AdaptiveConfig) -> Mat {
        be.zeros(d, d)
    }

    fn update(
        &self,
        be: &dyn Backend,
        stat: &mut Mat,
        h: &Mat,
        transposed: bool,
        config: &AdaptiveConfig,
    ) {
        let b2 = config.beta2 as f64;
        let w = if b2 == 1.0 { 1.0 } else { 1.0 - b2 };
        be.gemm_acc(b2, stat, w, h, transposed, h, !transposed);
    }

    fn exponent(&self, config: &AdaptiveConfig, order: usize) -> f64 {
        -config.exponent.unwrap_or(1.0 / (2 * order.max(1)) as f64)
    }

    fn root(
        &self,
        be: &dyn Backend,
        stat: &Mat,
        order: usize,
        updates: u64,
        eps: f64,
        config: &AdaptiveConfig,
    ) -> Result<Root, LinalgError> {
        let b2 = config.beta2 as f64;
        let corrected;
        let stat = if config.bias_correction && b2 < 1.0 {
            let mut s = stat.clone();
            let c = 1.0 - b2.powf(updates.min(i32::MAX as u64) as f64);
            be.scale(&mut s, 1.0 / c);
            corrected = s;
            &corrected
        } else {
            stat
        };
        let ridge = match config.epsilon {
            Ridge::Absolute(_) => Ridge::Absolute(eps),
            Ridge::Relative(_) => Ridge::Relative(eps),
        };
        matrix_root(be, stat, self.exponent(config, order), ridge, config.roots)
    }
}
