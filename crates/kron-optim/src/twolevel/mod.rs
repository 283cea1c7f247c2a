//! Two-level KFAC (Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou and Tran 2023): KFAC
//! plus an additive coarse-space correction that restores the curvature between layers.
//!
//! The preconditioner is `P^-1 = M^-1 + R0^T (R0 F R0^T + λ D)^-1 R0`, where `M` is KFAC's
//! block-diagonal Kronecker preconditioner, `R0` holds one (or, with Krylov enrichment, two)
//! coarse vectors per layer, `F` is the exact mini-batch Fisher — the same one-sample Fisher
//! the factors are built from — and `D` is the diagonal of each vector's parameter count.
//! The coarse matrix `R0 F R0^T` is `L x L` (`2L x 2L`) and comes straight from the tape's
//! captures with no extra pass: its entries are `(1/B) sum_n s_i(n) s_j(n)` with the
//! per-example scalar `s_i(n) = sum_t g_i(n,t)^T R_i a_i(n,t)`.
//!
//! [`TwoLevelKfac`] is a separate optimizer (not an option of [`Kfac`](crate::Kfac)): it runs
//! KFAC's blocks on the shared [`Driver`] and hands it the coarse term as the driver's
//! [`Correction`](crate::curvature::Correction) hook, between preconditioning and KL
//! clipping, so clipping, momentum, weight decay and the quadratic-model step all see the
//! corrected direction. With [`CoarseConfig::OFF`] it gives the same bits as `Kfac`.
//!
//! The coarse matrix of the spaces whose vectors stay fixed (Nicolaides and Tselepidis for the
//! whole run; spectral and Krylov-Nicolaides between refreshes) is a running average with the
//! factors' decay over the batches since the vectors last changed; the residual space's
//! vectors change every step and its matrix comes from that step's batch. Its Cholesky factor
//! is recomputed every step at the damping in force; one that fails keeps the last good
//! factor (before any, the step is the one-level step), and says so in a note.

mod captured;
mod coarse;
mod config;

use kron_autodiff::{Gradients, ParamStore, Tensor};
use kron_layers::{FisherBlock, Module};

pub use config::{CoarseConfig, CoarseSpace};

use crate::backend::{Backend, CpuBackend};
use crate::curvature::{CurvatureBlock, CurvatureProducts, Driver};
use crate::error::OptimError;
use crate::kfac::{KfacBlock, KfacConfig, build_driver, host_factors, structure};
use crate::optimizer::{Captures, OptimState, Optimizer, StepReport, Wants};
use coarse::Coarse;

/// KFAC with a coarse-space correction (see the [module docs](self)).
pub struct TwoLevelKfac {
    config: KfacConfig,
    driver: Driver<KfacBlock>,
    coarse: Coarse,
}

impl TwoLevelKfac {
    /// Two-level KFAC over `model`'s Fisher blocks, on the CPU backend in the configured
    /// precision.
    ///
    /// # Errors
    /// [`OptimError::Config`], naming the field, if `config` fails
    /// [`KfacConfig::validate`] or `coarse` fails [`CoarseConfig::validate`].
    pub fn new(
        model: &dyn Module,
        params: &ParamStore,
        config: KfacConfig,
        coarse: CoarseConfig,
    ) -> Result<Self, OptimError> {
        let be = Box::new(CpuBackend::new(config.refresh.precision));
        Self::with_backend(model.fisher_blocks(), params, config, coarse, be)
    }

    /// Two-level KFAC over the given blocks, with the one-level matrix math on `backend` (the
    /// coarse problem is solved on the host in `f64`).
    ///
    /// # Errors
    /// As [`TwoLevelKfac::new`], and (field `refresh.precision`) if the backend's precision
    /// is not the configured one.
    pub fn with_backend(
        blocks: Vec<FisherBlock>,
        params: &ParamStore,
        config: KfacConfig,
        coarse: CoarseConfig,
        backend: Box<dyn Backend>,
    ) -> Result<Self, OptimError> {
        coarse.validate()?;
        let mut s = structure(&config);
        s["coarse"] = serde_json::json!(coarse.name());
        let driver = build_driver("kfac-2l", blocks, params, &config, backend, s)?;
        Ok(TwoLevelKfac {
            config,
            driver,
            coarse: Coarse::new(coarse),
        })
    }

    /// The one-level configuration.
    pub fn config(&self) -> &KfacConfig {
        &self.config
    }

    /// The coarse correction's configuration.
    pub fn coarse_config(&self) -> &CoarseConfig {
        &self.coarse.config
    }

    /// The damping λ in force.
    pub fn damping(&self) -> f32 {
        self.driver.damping()
    }

    /// The names of the parameters that lie in no Fisher block: the fallback rule (SGD by
    /// default) trains them, not the curvature. The first step's report lists them too
    /// ([`Note::OutsideBlocks`](crate::Note::OutsideBlocks)); `with_strict_blocks(true)`
    /// refuses such a model.
    pub fn outside_blocks(&self) -> &[String] {
        self.driver.outside_blocks()
    }

    /// The staged driver underneath.
    pub fn driver(&self) -> &Driver<KfacBlock> {
        &self.driver
    }

    /// The current running averages `(A, G)` of a block, by layer path, as host tensors.
    pub fn factors(&self, path: &str) -> Option<(Tensor, Tensor)> {
        host_factors(&self.driver, path)
    }

    /// The one-level direction `M_i^-1 v` of a block (in the `W_aug` layout), or `None`
    /// before its first refresh.
    pub fn precondition(&self, path: &str, v: &Tensor) -> Option<Tensor> {
        self.driver.precondition(path, v)
    }

    /// The coarse vectors in use, as dense matrices in the `W_aug` layout, each with the
    /// index of its block (empty before the first correction).
    pub fn coarse_vectors(&self) -> Vec<(usize, Tensor)> {
        self.coarse.vectors(self.driver.blocks())
    }

    /// The undamped coarse matrix `R0 F R0^T` in use, row-major, if one has been built.
    pub fn coarse_matrix(&self) -> Option<&[f64]> {
        self.coarse.matrix()
    }
}

impl Optimizer for TwoLevelKfac {
    fn name(&self) -> &str {
        "kfac-2l"
    }

    fn steps_taken(&self) -> u64 {
        self.driver.steps_taken()
    }

    fn wants(&self) -> Wants {
        let mut w = self.driver.wants();
        let step = self.driver.steps_taken();
        let refresh_due = step.is_multiple_of(self.config.refresh.period.max(1));
        if self.coarse.wants_captures(refresh_due) {
            w.capture = self
                .driver
                .blocks()
                .iter()
                .map(|b| b.layout().layer)
                .collect();
            w.fisher = Some(self.config.statistics.fisher);
        }
        w
    }

    fn step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
    ) -> Result<StepReport, OptimError> {
        self.step_inner(params, grads, curvature, None)
    }

    fn step_with_curvature(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        products: &dyn CurvatureProducts,
    ) -> Result<StepReport, OptimError> {
        self.step_inner(params, grads, curvature, Some(products))
    }

    fn observe_reduction(&mut self, before: f32, after: f32) {
        self.driver.observe_reduction(before, after);
    }

    fn set_shard(&mut self, shard: Option<crate::Shard>) {
        self.driver.set_shard(shard);
    }

    fn learning_rate(&self) -> f32 {
        self.driver.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), OptimError> {
        self.driver.set_learning_rate(lr)?;
        self.config.step.schedule.base = lr;
        Ok(())
    }

    /// The driver's state (kind `kfac-2l`) plus the coarse vectors (`coarse.<k>.*`), the
    /// coarse matrix and its last good factor (`coarse.matrix`, `coarse.factor`, in `f64`).
    fn state(&self) -> OptimState {
        let mut state = self.driver.state();
        let meta = self.coarse.save(&mut state);
        if let serde_json::Value::Object(m) = &mut state.meta {
            m.insert("coarse".into(), meta);
        }
        state
    }

    /// Restores a state saved by two-level KFAC with the same coarse space (and everything
    /// [`Kfac`](crate::Kfac)'s load checks); all or nothing.
    fn load_state(&mut self, mut state: OptimState) -> Result<(), OptimError> {
        let meta = match &mut state.meta {
            serde_json::Value::Object(m) => m.remove("coarse"),
            _ => None,
        }
        .ok_or_else(|| OptimError::BadState {
            detail: "no coarse correction in the state (saved by another optimizer?)".into(),
        })?;
        let coarse = self.coarse.load(&meta, &mut state, self.driver.blocks())?;
        self.driver.load_state(state)?;
        self.coarse = coarse;
        Ok(())
    }
}

impl TwoLevelKfac {
    fn step_inner(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        products: Option<&dyn CurvatureProducts>,
    ) -> Result<StepReport, OptimError> {
        if self.coarse.config.space.is_none() {
            return self
                .driver
                .step_with(params, grads, curvature, products, None);
        }
        // A refused step leaves the coarse state as it was.
        let saved = self.coarse.clone();
        let out = self
            .driver
            .step_with(params, grads, curvature, products, Some(&mut self.coarse));
        if out.is_err() {
            self.coarse = saved;
        }
        out
    }
}
