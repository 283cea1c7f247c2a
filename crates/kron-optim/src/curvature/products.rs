//! Exact curvature products on the current mini-batch, for optimizers that solve a small
//! quadratic model (KFAC's step size and momentum, the damping's reduction ratio).

use kron_autodiff::{Direction, Var};

/// Quadratic forms of the mini-batch curvature matrix `F` (the Fisher, equal to the
/// Gauss-Newton matrix for kron's losses) between a few directions in parameter space.
pub trait CurvatureProducts {
    /// The row-major `k x k` Gram matrix `d_i^T F d_j` of `k` directions, each indexed by
    /// [`ParamId::index`](kron_autodiff::ParamId::index) (`None`: a zero block).
    fn gram(&self, dirs: &[&Direction]) -> Vec<f64>;
}

/// The curvature of a loss recorded on a tape, through forward-mode products on the tape
/// ([`Tape::ggn_gram`](kron_autodiff::Tape::ggn_gram)): the exact mini-batch Fisher, with no
/// second forward pass.
#[derive(Clone, Copy, Debug)]
pub struct TapeCurvature<'t> {
    /// The scalar loss node (cross-entropy, sigmoid BCE or squared error).
    pub loss: Var<'t>,
}

impl CurvatureProducts for TapeCurvature<'_> {
    fn gram(&self, dirs: &[&Direction]) -> Vec<f64> {
        self.loss.tape().ggn_gram(self.loss, dirs)
    }
}
