//! One Fisher block's Kronecker factors, their running averages and their inverses.

use kron_autodiff::LayerCapture;
use kron_layers::FisherBlock;

use super::config::{EigenDamping, InverseMethod, KfacConfig};
use crate::backend::{Backend, LinalgError, Mat};

/// The cached preconditioner of a block, from its last successful refresh.
#[derive(Clone, Debug)]
pub(crate) enum Precond {
    /// Damped inverses of the factors.
    Inverse { a_inv: Mat, g_inv: Mat },
    /// Eigenbases and eigenvalues of the (undamped) factors.
    Eigen {
        qa: Mat,
        ea: Vec<f64>,
        qg: Mat,
        eg: Vec<f64>,
    },
}

/// A block's state.
#[derive(Clone, Debug)]
pub(crate) struct BlockState {
    pub(crate) info: FisherBlock,
    /// Running averages of `A` (or `Ω`) and `G` (or `Γ`), once a statistic has been seen.
    pub(crate) a: Option<Mat>,
    pub(crate) g: Option<Mat>,
    /// Statistics updates so far (for the warm-started decay).
    pub(crate) updates: u64,
    pub(crate) precond: Option<Precond>,
    /// Damping multiplier for the next refresh (1 unless the last one failed).
    pub(crate) boost: f32,
}

/// The π rule: `sqrt((tr(A)/dim A) / (tr(G)/dim G))`, 1 when either trace vanishes.
pub(crate) fn pi(tr_a: f64, dim_a: usize, tr_g: f64, dim_g: usize) -> f64 {
    let (ma, mg) = (tr_a / dim_a as f64, tr_g / dim_g as f64);
    if ma > 0.0 && mg > 0.0 && ma.is_finite() && mg.is_finite() {
        (ma / mg).sqrt()
    } else {
        1.0
    }
}

impl BlockState {
    pub(crate) fn new(info: FisherBlock) -> Self {
        BlockState {
            info,
            a: None,
            g: None,
            updates: 0,
            precond: None,
            boost: 1.0,
        }
    }

    /// Folds one capture into the running averages. `Err` (with nothing changed) when the
    /// capture or the result is not finite.
    pub(crate) fn update_stats(
        &mut self,
        cap: &LayerCapture,
        cfg: &KfacConfig,
        be: &dyn Backend,
    ) -> Result<(), String> {
        if cap.a_dim() != self.info.a_dim() || cap.g_dim() != self.info.g_dim() {
            return Err(format!(
                "capture of sizes {}x{} does not fit the block's {}x{}",
                cap.a_dim(),
                cap.g_dim(),
                self.info.a_dim(),
                self.info.g_dim()
            ));
        }
        if !cap.a.all_finite() || !cap.g.all_finite() {
            return Err(
                "non-finite activations or gradients captured; statistics not updated".into(),
            );
        }
        let examples = cfg
            .stats_examples
            .map_or(cap.batch, |n| n.clamp(1, cap.batch));
        let rows = examples * cap.locations;
        let xa = be.upload_rows(&cap.a, Some(rows));
        let xg = be.upload_rows(&cap.g, Some(rows));
        let k = (self.updates + 1) as f32;
        let decay = (1.0 - 1.0 / k).min(cfg.ema_decay);
        let mut a = self
            .a
            .clone()
            .unwrap_or_else(|| be.zeros(self.info.a_dim(), self.info.a_dim()));
        let mut g = self
            .g
            .clone()
            .unwrap_or_else(|| be.zeros(self.info.g_dim(), self.info.g_dim()));
        be.factor_ema(
            &mut a,
            &xa,
            cap.has_bias,
            (1.0 - decay) / examples as f32,
            decay,
        );
        be.factor_ema(
            &mut g,
            &xg,
            false,
            (1.0 - decay) / (examples * cap.locations) as f32,
            decay,
        );
        if !be.is_finite(&a) || !be.is_finite(&g) {
            return Err("statistics overflowed; not updated".into());
        }
        self.a = Some(a);
        self.g = Some(g);
        self.updates += 1;
        Ok(())
    }

    /// The factored damping `(γ_A, γ_G)` for damping `lambda`.
    pub(crate) fn factored_damping(&self, be: &dyn Backend, lambda: f64) -> (f64, f64) {
        let (Some(a), Some(g)) = (&self.a, &self.g) else {
            return (lambda.sqrt(), lambda.sqrt());
        };
        let p = pi(
            be.trace(a),
            self.info.a_dim(),
            be.trace(g),
            self.info.g_dim(),
        );
        (p * lambda.sqrt(), lambda.sqrt() / p)
    }

    /// Recomputes the preconditioner with damping `lambda * boost`. On failure the last good
    /// one stays and the boost grows by `cfg.failure_factor`; on success the boost returns to 1.
    /// Returns whether a new preconditioner was computed, and a note for the report, if any.
    pub(crate) fn refresh(
        &mut self,
        cfg: &KfacConfig,
        be: &dyn Backend,
        lambda: f32,
    ) -> (bool, Option<String>) {
        let (Some(a), Some(g)) = (&self.a, &self.g) else {
            return (false, None);
        };
        let eff = lambda as f64 * self.boost as f64;
        let result: Result<(Precond, usize), LinalgError> = match cfg.method {
            InverseMethod::Inverse => {
                let (ga, gg) = self.factored_damping(be, eff);
                be.spd_inverse(a, ga as f32).and_then(|ai| {
                    be.spd_inverse(g, gg as f32).map(|gi| {
                        (
                            Precond::Inverse {
                                a_inv: ai.mat,
                                g_inv: gi.mat,
                            },
                            ai.regularized_pivots + gi.regularized_pivots,
                        )
                    })
                })
            }
            InverseMethod::Eigen(_) => be.eigh(a).and_then(|ea| {
                be.eigh(g).map(|eg| {
                    (
                        Precond::Eigen {
                            qa: ea.vectors,
                            ea: ea.values,
                            qg: eg.vectors,
                            eg: eg.values,
                        },
                        0,
                    )
                })
            }),
        };
        match result {
            Ok((p, pivots)) => {
                let note = (self.boost != 1.0 || pivots > 0).then(|| {
                    format!(
                        "{}: refresh succeeded at damping {:.3e}{}",
                        self.info.path,
                        eff,
                        if pivots > 0 {
                            format!(" after regularizing {pivots} Cholesky pivots")
                        } else {
                            String::new()
                        }
                    )
                });
                self.precond = Some(p);
                self.boost = 1.0;
                (true, note)
            }
            Err(e) => {
                self.boost *= cfg.failure_factor;
                let note = format!(
                    "{}: refresh failed ({e}) at damping {eff:.3e}; keeping the {} and retrying at {:.3e}",
                    self.info.path,
                    if self.precond.is_some() {
                        "last good preconditioner"
                    } else {
                        "first-order fallback"
                    },
                    lambda as f64 * self.boost as f64
                );
                (false, Some(note))
            }
        }
    }

    /// The preconditioned gradient `U` of `v` (the gradient in the `W_aug` layout), or `None`
    /// before the first successful refresh.
    pub(crate) fn precondition(
        &self,
        cfg: &KfacConfig,
        be: &dyn Backend,
        v: &Mat,
        lambda: f32,
    ) -> Option<Mat> {
        match self.precond.as_ref()? {
            Precond::Inverse { a_inv, g_inv } => {
                let gv = be.gemm(1.0, g_inv, false, v, false);
                Some(be.gemm(1.0, &gv, false, a_inv, false))
            }
            Precond::Eigen { qa, ea, qg, eg } => {
                let t = be.gemm(1.0, qg, true, v, false);
                let mut t = be.gemm(1.0, &t, false, qa, false);
                let ea0: Vec<f64> = ea.iter().map(|x| x.max(0.0)).collect();
                let eg0: Vec<f64> = eg.iter().map(|x| x.max(0.0)).collect();
                match cfg.method {
                    InverseMethod::Eigen(EigenDamping::Tikhonov) => {
                        be.div_outer(&mut t, &eg0, &ea0, lambda as f64)
                    }
                    _ => {
                        // π from the factors as they were at the refresh: the eigenvalue
                        // sums are their traces.
                        let p = pi(ea.iter().sum(), ea.len(), eg.iter().sum(), eg.len());
                        let l = (lambda as f64).sqrt();
                        let (ga, gg) = (p * l, l / p);
                        let left: Vec<f64> = eg0.iter().map(|x| x + gg).collect();
                        let right: Vec<f64> = ea0.iter().map(|x| x + ga).collect();
                        be.div_outer(&mut t, &left, &right, 0.0)
                    }
                }
                let t = be.gemm(1.0, qg, false, &t, false);
                Some(be.gemm(1.0, &t, false, qa, true))
            }
        }
    }

    /// `d^T F d` for an update `d` in the `W_aug` layout under this block's Kronecker factors:
    /// `tr(D^T G D A)`.
    pub(crate) fn quadratic(&self, be: &dyn Backend, d: &Mat) -> f64 {
        self.bilinear(be, d, d)
    }

    /// `d^T F e` under this block's Kronecker factors: `tr(D^T G E A)` (zero before any
    /// statistics).
    pub(crate) fn bilinear(&self, be: &dyn Backend, d: &Mat, e: &Mat) -> f64 {
        let (Some(a), Some(g)) = (&self.a, &self.g) else {
            return 0.0;
        };
        let gd = be.gemm(1.0, g, false, d, false);
        let ea = be.gemm(1.0, e, false, a, false);
        be.dot(&gd, &ea)
    }
}
