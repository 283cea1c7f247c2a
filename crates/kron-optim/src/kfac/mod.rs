//! KFAC (Martens & Grosse 2015) for dense layers and KFC (Grosse & Martens 2016) for conv
//! layers, as one optimizer driven by the layers' Fisher blocks: a [`KfacBlock`] per layer on
//! the shared staged [`Driver`].

mod block;
mod config;

use kron_autodiff::{Gradients, ParamStore, Tensor};
use kron_layers::{FisherBlock, Module};

use crate::backend::{Backend, CpuBackend};
use crate::curvature::{CurvatureBlock, CurvatureProducts, Driver};
use crate::error::OptimError;
use crate::optimizer::{Captures, OptimState, Optimizer, StepReport, Wants};

pub use block::{KfacBlock, KfacRefreshed};
pub use config::{EigenDamping, InverseMethod, KfacConfig};

/// The Kronecker-factored approximate natural gradient.
///
/// Each Fisher block `F_l ≈ A ⊗ G` (KFAC: `A = E[a_aug a_aug^T]`, `G = E[g g^T]`; KFC for
/// convolutions: `Ω` summed over locations, `Γ` averaged over them) is kept as running averages
/// of the tape's captures. Every `refresh.period` steps the damped factors are inverted (or
/// eigendecomposed); every step the gradient of each block is preconditioned,
/// `U = (G + γ_G I)^-1 V (A + γ_A I)^-1`, KL-clipped, and applied with momentum and weight decay.
/// Parameters outside any block follow the [`Fallback`](crate::Fallback) rule.
///
/// The matrix math runs on a [`Backend`] (the CPU by default), written once over its
/// primitives; refreshes run across blocks in parallel.
pub struct Kfac {
    config: KfacConfig,
    driver: Driver<KfacBlock>,
}

impl Kfac {
    /// KFAC over `model`'s Fisher blocks, on the CPU backend in the configured precision.
    ///
    /// # Errors
    /// [`OptimError::Config`], naming the field, if `config` fails [`KfacConfig::validate`].
    pub fn new(
        model: &dyn Module,
        params: &ParamStore,
        config: KfacConfig,
    ) -> Result<Self, OptimError> {
        let be = Box::new(CpuBackend::new(config.refresh.precision));
        Self::with_backend(model.fisher_blocks(), params, config, be)
    }

    /// KFAC over the given blocks, with the matrix math on `backend`.
    ///
    /// # Errors
    /// [`OptimError::Config`], naming the field, if `config` fails [`KfacConfig::validate`],
    /// or (field `refresh.precision`) if the backend's precision is not the configured one.
    pub fn with_backend(
        blocks: Vec<FisherBlock>,
        params: &ParamStore,
        config: KfacConfig,
        backend: Box<dyn Backend>,
    ) -> Result<Self, OptimError> {
        let driver = build_driver("kfac", blocks, params, &config, backend, structure(&config))?;
        Ok(Kfac { config, driver })
    }

    /// The configuration.
    pub fn config(&self) -> &KfacConfig {
        &self.config
    }

    /// The damping λ in force (it moves under Levenberg-Marquardt adaptation).
    pub fn damping(&self) -> f32 {
        self.driver.damping()
    }

    /// The reduction ratio ρ of the last adaptation, if any.
    pub fn last_reduction_ratio(&self) -> Option<f32> {
        self.driver.last_reduction_ratio()
    }

    /// The backend's name.
    pub fn backend_name(&self) -> String {
        self.driver.backend().name()
    }

    /// The names of the parameters that lie in no Fisher block: the fallback rule (SGD by
    /// default) trains them, not the curvature. The first step's report lists them too
    /// ([`Note::OutsideBlocks`](crate::Note::OutsideBlocks)); `with_strict_blocks(true)`
    /// refuses such a model.
    pub fn outside_blocks(&self) -> &[String] {
        self.driver.outside_blocks()
    }

    /// The staged driver underneath (its blocks, backend and shared configuration).
    pub fn driver(&self) -> &Driver<KfacBlock> {
        &self.driver
    }

    /// The current running averages `(A, G)` of a block, by layer path, as host tensors.
    pub fn factors(&self, path: &str) -> Option<(Tensor, Tensor)> {
        host_factors(&self.driver, path)
    }

    /// The preconditioned gradient `U` (in the `W_aug` layout) that the current preconditioner
    /// gives for a block's gradient `v`, or `None` before its first refresh. For tests and
    /// analysis.
    pub fn precondition(&self, path: &str, v: &Tensor) -> Option<Tensor> {
        self.driver.precondition(path, v)
    }

    /// The relative refresh cost of each block (`d_A^3 + d_G^3`), by layer path.
    pub fn refresh_costs(&self) -> Vec<(String, f64)> {
        self.driver
            .blocks()
            .iter()
            .map(|b| (b.layout().path.clone(), b.refresh_cost()))
            .collect()
    }
}

/// A block's running averages `(A, G)`, by layer path, downloaded to host tensors.
pub(crate) fn host_factors(driver: &Driver<KfacBlock>, path: &str) -> Option<(Tensor, Tensor)> {
    let (a, g) = driver.block(path)?.factors()?;
    let be = driver.backend();
    Some((be.download(a), be.download(g)))
}

/// The staged driver of KFAC's blocks, named `kind`, after checking `config` and that the
/// backend computes in the configured precision (shared with two-level KFAC).
pub(crate) fn build_driver(
    kind: &'static str,
    blocks: Vec<FisherBlock>,
    params: &ParamStore,
    config: &KfacConfig,
    backend: Box<dyn Backend>,
    structure: serde_json::Value,
) -> Result<Driver<KfacBlock>, OptimError> {
    config.validate()?;
    if backend.precision() != config.refresh.precision {
        return Err(OptimError::Config {
            field: "refresh.precision".into(),
            detail: format!(
                "is {:?}, but the backend {} computes in {:?}",
                config.refresh.precision,
                backend.name(),
                backend.precision()
            ),
        });
    }
    let blocks = blocks
        .into_iter()
        .map(|b| KfacBlock::new(b, config.method))
        .collect();
    Driver::new(kind, blocks, params, config.core(), backend, structure)
}

/// What a saved state must agree with: the inverse method and the precision (the fallback
/// rule's kind and the block layout the driver checks itself).
pub(crate) fn structure(c: &KfacConfig) -> serde_json::Value {
    serde_json::json!({
        "method": c.method,
        "precision": c.refresh.precision,
    })
}

impl Optimizer for Kfac {
    fn name(&self) -> &str {
        "kfac"
    }

    fn steps_taken(&self) -> u64 {
        self.driver.steps_taken()
    }

    fn wants(&self) -> Wants {
        self.driver.wants()
    }

    fn step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
    ) -> Result<StepReport, OptimError> {
        self.driver.step(params, grads, curvature)
    }

    fn step_with_curvature(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        products: &dyn CurvatureProducts,
    ) -> Result<StepReport, OptimError> {
        self.driver
            .step_with_curvature(params, grads, curvature, products)
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

    fn state(&self) -> OptimState {
        self.driver.state()
    }

    /// Restores a state saved by KFAC. Structural settings (the inverse method, the
    /// precision, the fallback rule's kind, the blocks) must match this optimizer's, or the
    /// load is refused naming the field; tunables (learning rate, damping without adaptation,
    /// periods, clipping) stay as this optimizer was configured, so a resumed run can change
    /// them; adapted state (the Levenberg-Marquardt damping, the failure boosts, the counters)
    /// comes from the state.
    fn load_state(&mut self, state: OptimState) -> Result<(), OptimError> {
        self.driver.load_state(state)
    }
}
