//! One Fisher block's Kronecker factors, their running averages, and what a refresh computes
//! from them: KFAC's (and KFC's) [`CurvatureBlock`].

use kron_layers::FisherBlock;
use serde::{Deserialize, Serialize};

use super::config::{EigenDamping, InverseMethod};
use crate::backend::{Backend, LinalgError, Mat};
use crate::curvature::{CurvatureBlock, RefreshOk, Refreshed, StatsInput, StatsSkip, TakeMat};
use crate::error::OptimError;

/// A refreshed KFAC block.
#[derive(Clone, Debug)]
pub enum KfacRefreshed {
    /// Damped inverses of the factors.
    Inverse {
        /// `(A + γ_A I)^-1`.
        a_inv: Mat,
        /// `(G + γ_G I)^-1`.
        g_inv: Mat,
    },
    /// Eigenbases and eigenvalues of the (undamped) factors.
    Eigen {
        /// The eigenvectors of `A`.
        qa: Mat,
        /// The eigenvalues of `A`, ascending.
        ea: Vec<f64>,
        /// The eigenvectors of `G`.
        qg: Mat,
        /// The eigenvalues of `G`, ascending.
        eg: Vec<f64>,
    },
}

/// A KFAC (dense) or KFC (conv) block: the running averages of `A` (or `Ω`) and `G` (or
/// `Γ`).
#[derive(Clone, Debug)]
pub struct KfacBlock {
    info: FisherBlock,
    method: InverseMethod,
    a: Option<Mat>,
    g: Option<Mat>,
    updates: u64,
    /// The factors from before the last update, until the driver's finiteness check settles
    /// it.
    before: Option<(Option<Mat>, Option<Mat>)>,
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

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum RefreshedMeta {
    Inverse,
    Eigen { ea: Vec<f64>, eg: Vec<f64> },
}

impl KfacBlock {
    /// A block with no statistics yet.
    pub fn new(info: FisherBlock, method: InverseMethod) -> Self {
        KfacBlock {
            info,
            method,
            a: None,
            g: None,
            updates: 0,
            before: None,
        }
    }

    /// The running averages `(A, G)`, once a statistic has been seen.
    pub fn factors(&self) -> Option<(&Mat, &Mat)> {
        Some((self.a.as_ref()?, self.g.as_ref()?))
    }

    /// The factored damping `(γ_A, γ_G)` for damping `lambda`.
    fn factored_damping(&self, be: &dyn Backend, lambda: f64) -> (f64, f64) {
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
}

impl CurvatureBlock for KfacBlock {
    type Refreshed = KfacRefreshed;

    fn layout(&self) -> &FisherBlock {
        &self.info
    }

    fn fresh(&self) -> Self {
        KfacBlock::new(self.info.clone(), self.method)
    }

    fn uses_eigh(&self) -> bool {
        matches!(self.method, InverseMethod::Eigen(_))
    }

    fn has_statistics(&self) -> bool {
        self.a.is_some() && self.g.is_some()
    }

    fn update_statistics(
        &mut self,
        be: &dyn Backend,
        input: &StatsInput<'_>,
    ) -> Result<(), StatsSkip> {
        let Some(cap) = input.capture else {
            return Ok(());
        };
        let cfg = input.config;
        if cap.a_dim() != self.info.a_dim() || cap.g_dim() != self.info.g_dim() {
            return Err(StatsSkip::Shape {
                found: (cap.a_dim(), cap.g_dim()),
                expected: (self.info.a_dim(), self.info.g_dim()),
            });
        }
        if !cap.a.all_finite() || !cap.g.all_finite() {
            return Err(StatsSkip::NonFiniteInput);
        }
        let examples = cfg.examples.map_or(cap.batch, |n| n.clamp(1, cap.batch));
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
        // The driver checks the new factors for overflow (every block's at once) and settles.
        assert!(
            self.before.is_none(),
            "KfacBlock::update_statistics: {}: the last update was never settled",
            self.info.path
        );
        self.before = Some((self.a.replace(a), self.g.replace(g)));
        self.updates += 1;
        Ok(())
    }

    fn unchecked_statistics(&self) -> Vec<&Mat> {
        match (&self.before, &self.a, &self.g) {
            (Some(_), Some(a), Some(g)) => vec![a, g],
            _ => Vec::new(),
        }
    }

    fn settle_statistics(&mut self, finite: bool) -> Result<(), StatsSkip> {
        let Some((a, g)) = self.before.take() else {
            return Ok(());
        };
        if finite {
            return Ok(());
        }
        (self.a, self.g) = (a, g);
        self.updates -= 1;
        Err(StatsSkip::Overflow)
    }

    fn refresh(
        &self,
        be: &dyn Backend,
        damping: f64,
    ) -> Result<RefreshOk<KfacRefreshed>, LinalgError> {
        let (Some(a), Some(g)) = (&self.a, &self.g) else {
            return Err(LinalgError::NonFinite);
        };
        match self.method {
            InverseMethod::Inverse => {
                let (ga, gg) = self.factored_damping(be, damping);
                let ai = be.spd_inverse(a, ga as f32)?;
                let gi = be.spd_inverse(g, gg as f32)?;
                Ok(RefreshOk {
                    regularized_pivots: ai.regularized_pivots + gi.regularized_pivots,
                    value: KfacRefreshed::Inverse {
                        a_inv: ai.mat,
                        g_inv: gi.mat,
                    },
                })
            }
            // The eigenbases do not depend on the damping, which enters when preconditioning
            // (the boost with it).
            InverseMethod::Eigen(_) => {
                let ea = be.eigh(a)?;
                let eg = be.eigh(g)?;
                Ok(RefreshOk::clean(KfacRefreshed::Eigen {
                    qa: ea.vectors,
                    ea: ea.values,
                    qg: eg.vectors,
                    eg: eg.values,
                }))
            }
        }
    }

    fn precondition(
        &self,
        be: &dyn Backend,
        refreshed: &Refreshed<KfacRefreshed>,
        v: &Mat,
        lambda: f64,
    ) -> Mat {
        match &refreshed.value {
            KfacRefreshed::Inverse { a_inv, g_inv } => {
                let gv = be.gemm(1.0, g_inv, false, v, false);
                be.gemm(1.0, &gv, false, a_inv, false)
            }
            KfacRefreshed::Eigen { qa, ea, qg, eg } => {
                let t = be.gemm(1.0, qg, true, v, false);
                let mut t = be.gemm(1.0, &t, false, qa, false);
                let ea0: Vec<f64> = ea.iter().map(|x| x.max(0.0)).collect();
                let eg0: Vec<f64> = eg.iter().map(|x| x.max(0.0)).collect();
                match self.method {
                    InverseMethod::Eigen(EigenDamping::Tikhonov) => {
                        be.div_outer(&mut t, &eg0, &ea0, lambda)
                    }
                    InverseMethod::Eigen(EigenDamping::PerFactor) => {
                        let left: Vec<f64> = eg0.iter().map(|x| x + lambda).collect();
                        let right: Vec<f64> = ea0.iter().map(|x| x + lambda).collect();
                        be.div_outer(&mut t, &left, &right, 0.0)
                    }
                    _ => {
                        // π from the factors as they were at the refresh: the eigenvalue
                        // sums are their traces.
                        let p = pi(ea.iter().sum(), ea.len(), eg.iter().sum(), eg.len());
                        let l = lambda.sqrt();
                        let (ga, gg) = (p * l, l / p);
                        let left: Vec<f64> = eg0.iter().map(|x| x + gg).collect();
                        let right: Vec<f64> = ea0.iter().map(|x| x + ga).collect();
                        be.div_outer(&mut t, &left, &right, 0.0)
                    }
                }
                let t = be.gemm(1.0, qg, false, &t, false);
                be.gemm(1.0, &t, false, qa, true)
            }
        }
    }

    /// `tr(D^T G E A)` (zero before any statistics).
    fn bilinear(&self, be: &dyn Backend, d: &Mat, e: &Mat) -> f64 {
        match self.bilinear_terms(be, d, e) {
            Some((gd, ea)) => be.dot(&gd, &ea),
            None => 0.0,
        }
    }

    /// `G D` and `E A`.
    fn bilinear_terms(&self, be: &dyn Backend, d: &Mat, e: &Mat) -> Option<(Mat, Mat)> {
        let (a, g) = (self.a.as_ref()?, self.g.as_ref()?);
        Some((
            be.gemm(1.0, g, false, d, false),
            be.gemm(1.0, e, false, a, false),
        ))
    }

    fn refresh_cost(&self) -> f64 {
        let (a, g) = (self.info.a_dim() as f64, self.info.g_dim() as f64);
        a.powi(3) + g.powi(3)
    }

    fn statistics_mut(&mut self) -> Vec<&mut Mat> {
        self.a.iter_mut().chain(self.g.iter_mut()).collect()
    }

    fn statistics(&self) -> Vec<(&'static str, &Mat)> {
        let mut out = Vec::new();
        if let Some(a) = &self.a {
            out.push(("A", a));
        }
        if let Some(g) = &self.g {
            out.push(("G", g));
        }
        out
    }

    fn restore_statistics(
        &mut self,
        _be: &dyn Backend,
        updates: u64,
        take: &mut TakeMat<'_>,
    ) -> Result<(), OptimError> {
        let (da, dg) = (self.info.a_dim(), self.info.g_dim());
        self.a = Some(take("A", &[da, da])?);
        self.g = Some(take("G", &[dg, dg])?);
        self.updates = updates;
        Ok(())
    }

    fn updates(&self) -> u64 {
        self.updates
    }

    fn export_refreshed(&self, r: &KfacRefreshed) -> (Vec<(&'static str, Mat)>, serde_json::Value) {
        let (mats, meta) = match r {
            KfacRefreshed::Inverse { a_inv, g_inv } => (
                vec![("A_inv", a_inv.clone()), ("G_inv", g_inv.clone())],
                RefreshedMeta::Inverse,
            ),
            KfacRefreshed::Eigen { qa, ea, qg, eg } => (
                vec![("QA", qa.clone()), ("QG", qg.clone())],
                RefreshedMeta::Eigen {
                    ea: ea.clone(),
                    eg: eg.clone(),
                },
            ),
        };
        (
            mats,
            serde_json::to_value(meta).expect("KFAC block metadata serializes"),
        )
    }

    fn import_refreshed(
        &self,
        _be: &dyn Backend,
        meta: &serde_json::Value,
        take: &mut TakeMat<'_>,
    ) -> Result<KfacRefreshed, OptimError> {
        let p = &self.info.path;
        let bad = |detail: String| OptimError::BadState { detail };
        let meta: RefreshedMeta = serde_json::from_value(meta.clone())
            .map_err(|e| bad(format!("{p}: refreshed result: {e}")))?;
        let (da, dg) = (self.info.a_dim(), self.info.g_dim());
        match (meta, self.method) {
            (RefreshedMeta::Inverse, InverseMethod::Inverse) => Ok(KfacRefreshed::Inverse {
                a_inv: take("A_inv", &[da, da])?,
                g_inv: take("G_inv", &[dg, dg])?,
            }),
            (RefreshedMeta::Eigen { ea, eg }, InverseMethod::Eigen(_)) => {
                if ea.len() != da || eg.len() != dg {
                    return Err(bad(format!("{p}: eigenvalue counts do not fit the block")));
                }
                Ok(KfacRefreshed::Eigen {
                    qa: take("QA", &[da, da])?,
                    ea,
                    qg: take("QG", &[dg, dg])?,
                    eg,
                })
            }
            _ => Err(bad(format!(
                "{p}: the saved refreshed result is of another inverse method"
            ))),
        }
    }
}
