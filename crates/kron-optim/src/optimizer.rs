//! The object-safe `Optimizer` trait, what a step asks of the tape, what it reports, and the
//! state it exports for checkpoints.

use std::collections::BTreeMap;

use kron_autodiff::{Gradients, LayerCapture, LayerId, ParamStore, Tensor};
use serde::{Deserialize, Serialize};

use crate::comm::Shard;
use crate::curvature::{CurvatureProducts, Note};
use crate::error::OptimError;

/// The captured statistics handed to [`Optimizer::step`], by layer.
pub type Captures = BTreeMap<LayerId, LayerCapture>;

/// Which gradients feed the curvature statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FisherKind {
    /// The true Fisher: a second backward pass from a loss on labels sampled from the model's
    /// predictive distribution (one sample per example).
    Sampled,
    /// The empirical Fisher: the captures of the ordinary loss's backward pass.
    Empirical,
}

/// What the training step must record for the optimizer's next step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// Layers whose `(a, g)` to capture.
    pub capture: Vec<LayerId>,
    /// Which pass's captures to hand over (`None` when nothing is captured).
    pub fisher: Option<FisherKind>,
    /// Whether to evaluate the loss again after the step, on the same batch, and report the
    /// actual reduction through [`Optimizer::observe_reduction`].
    pub reduction: bool,
    /// Whether the step uses exact curvature products on the mini-batch
    /// ([`Optimizer::step_with_curvature`]), so the tape must outlive the forward pass.
    pub products: bool,
    /// When set, the products are taken on the first this-many examples of the mini-batch
    /// alone (a forward pass of its own on that sub-batch).
    pub product_examples: Option<usize>,
}

/// What happened in one step, for progress lines and logs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step just taken (counting from 0).
    pub step: u64,
    /// The learning rate used.
    pub lr: f32,
    /// The damping in force, for second-order methods.
    pub damping: Option<f32>,
    /// Whether the curvature statistics of at least one block took this step's captures (not
    /// set when every capture was missing or rejected).
    pub stats_updated: bool,
    /// Whether at least one block's inverse (or eigenbasis, or root) was recomputed this step
    /// (not set when every refresh failed).
    pub refreshed: bool,
    /// What the step did besides the plain step: statistics skipped, refreshes failed or
    /// recovered, fallbacks, coarse corrections skipped, clipping (typed; `Display` renders
    /// each as a log line). Some are routine (KL clipping scales most KFAC steps):
    /// [`StepReport::warnings`] leaves those out.
    pub notes: Vec<Note>,
    /// The momentum coefficient the step chose, for methods that choose it (KFAC's quadratic
    /// model); `lr` is then the step size it chose.
    #[serde(default)]
    pub momentum: Option<f32>,
    /// Milliseconds spent updating statistics.
    pub stats_ms: f64,
    /// Milliseconds spent refreshing inverses (with, in data-parallel training, the sharing of
    /// their results: `share_ms`).
    pub refresh_ms: f64,
    /// Milliseconds of the refresh spent sharing results between ranks: the owners'
    /// broadcasts, which include the wait for the slowest owner. 0 on one process, and when
    /// every rank computes every refresh ([`Shard::with_split_refreshes`](crate::Shard::with_split_refreshes)).
    #[serde(default)]
    pub share_ms: f64,
    /// Milliseconds spent preconditioning and updating parameters.
    pub update_ms: f64,
}

impl StepReport {
    /// The notes that are signs of trouble (a skipped statistic, a failed refresh, a
    /// fallback, a skipped coarse correction), without the routine ones
    /// ([`Note::is_routine`]: KL clipping).
    pub fn warnings(&self) -> impl Iterator<Item = &Note> + '_ {
        self.notes.iter().filter(|n| !n.is_routine())
    }
}

/// An optimizer's state as named tensors (moments, factors, inverses) and a JSON value (config,
/// counters, damping), which a checkpoint stores.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimState {
    /// Tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Double-precision tensors by name (statistics and refreshed results kept in `f64`), so
    /// that a resume is bit-exact in both precisions.
    #[serde(default)]
    pub tensors64: BTreeMap<String, Tensor64>,
    /// Everything else.
    pub meta: serde_json::Value,
}

/// A row-major `f64` tensor of an [`OptimState`]. Deserializing checks that the data fills
/// the shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Tensor64Raw")]
pub struct Tensor64 {
    shape: Vec<usize>,
    data: Vec<f64>,
}

#[derive(Deserialize)]
struct Tensor64Raw {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl TryFrom<Tensor64Raw> for Tensor64 {
    type Error = String;

    fn try_from(r: Tensor64Raw) -> Result<Self, String> {
        Tensor64::new(r.data, &r.shape)
    }
}

impl Tensor64 {
    /// A tensor of `shape` holding `data`, or why not (the data does not fill the shape, or
    /// the shape's element count overflows).
    pub fn new(data: Vec<f64>, shape: &[usize]) -> Result<Self, String> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
        if n != data.len() {
            return Err(format!(
                "{} values do not fill shape {shape:?} ({n} elements)",
                data.len()
            ));
        }
        Ok(Tensor64 {
            shape: shape.to_vec(),
            data,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// The values, consuming the tensor.
    pub fn into_data(self) -> Vec<f64> {
        self.data
    }
}

/// A state tensor of either precision.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StateTensor {
    F32(Tensor),
    F64 { shape: Vec<usize>, data: Vec<f64> },
}

impl OptimState {
    /// Inserts a tensor of either precision.
    pub(crate) fn insert(&mut self, name: String, t: StateTensor) {
        match t {
            StateTensor::F32(t) => {
                self.tensors.insert(name, t);
            }
            StateTensor::F64 { shape, data } => {
                self.tensors64.insert(
                    name,
                    Tensor64::new(data, &shape).expect("a matrix fills its shape"),
                );
            }
        }
    }

    /// Takes a tensor of either precision out, checking its shape.
    pub(crate) fn take_any(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<StateTensor, OptimError> {
        if let Some(t) = self.tensors64.remove(name) {
            if t.shape() != shape {
                return Err(OptimError::StateShape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.shape().to_vec(),
                });
            }
            return Ok(StateTensor::F64 {
                shape: t.shape,
                data: t.data,
            });
        }
        self.take(name, shape).map(StateTensor::F32)
    }

    /// Takes a tensor out, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, OptimError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| OptimError::MissingState {
                name: name.to_string(),
            })?;
        if t.shape() != shape {
            return Err(OptimError::StateShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }

    /// Deserializes `meta`, naming the optimizer on error.
    pub fn meta_as<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T, OptimError> {
        serde_json::from_value(self.meta.clone()).map_err(|e| OptimError::BadState {
            detail: format!("{what}: {e}"),
        })
    }
}

/// A training algorithm that turns gradients (and, for second-order methods, captured curvature
/// statistics) into parameter updates.
///
/// Object-safe: programs choose one at run time as `Box<dyn Optimizer>`. The training step (see
/// `kron::train_step`) asks [`Optimizer::wants`] what to record, runs forward and backward, and
/// calls [`Optimizer::step`].
pub trait Optimizer: Send {
    /// A short name (`"sgd"`, `"adam"`, `"kfac"`).
    fn name(&self) -> &str;

    /// The number of steps taken so far.
    fn steps_taken(&self) -> u64;

    /// What the next step needs recorded. First-order methods want nothing.
    fn wants(&self) -> Wants {
        Wants::default()
    }

    /// Updates `params` from `grads` (and `curvature`, the captures of the pass [`Wants`]
    /// named). A gradient holding NaN or infinity is an `Err` and changes nothing.
    fn step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
    ) -> Result<StepReport, OptimError>;

    /// [`Optimizer::step`] with exact curvature products on the same mini-batch at hand, for
    /// optimizers whose [`Wants::products`] is set. The default ignores them.
    fn step_with_curvature(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        _products: &dyn CurvatureProducts,
    ) -> Result<StepReport, OptimError> {
        self.step(params, grads, curvature)
    }

    /// Receives the loss before and after the last step on the same batch, when
    /// [`Wants::reduction`] asked for it (Levenberg-Marquardt damping adaptation).
    fn observe_reduction(&mut self, _before: f32, _after: f32) {}

    /// Tells the optimizer which shard of the global batch this rank's next steps train on,
    /// in data-parallel training (`kron::DataParallel`); `None` (the start): one process.
    ///
    /// The gradients a step receives are then already the global batch's (reduced across the
    /// ranks), so first-order methods, and methods whose statistics come from the gradients,
    /// need nothing more: the default ignores the shard. Methods whose statistics come from the
    /// captures (which hold this shard's examples only) reduce those across the ranks, and
    /// split their refreshes among them.
    fn set_shard(&mut self, shard: Option<Shard>) {
        let _ = shard;
    }

    /// The base learning rate.
    fn learning_rate(&self) -> f32;

    /// Sets the base learning rate.
    ///
    /// # Errors
    /// [`OptimError::Config`] unless `lr` is finite and above 0; the rate is then unchanged.
    fn set_learning_rate(&mut self, lr: f32) -> Result<(), OptimError>;

    /// The state to checkpoint.
    fn state(&self) -> OptimState;

    /// Restores a state from [`Optimizer::state`], all or nothing: on error the optimizer is
    /// unchanged. Every optimizer loads the same way: structural settings (a method, a
    /// precision, the blocks, a coarse space) must match this optimizer's or the load is
    /// refused naming the field; tunables (learning rate, momentum, damping without
    /// adaptation, periods, clipping) stay as this optimizer was configured, so a resumed run
    /// can change them; adapted state (moments, statistics, the Levenberg-Marquardt damping,
    /// failure boosts, counters) comes from the state.
    fn load_state(&mut self, state: OptimState) -> Result<(), OptimError>;
}

/// A boxed optimizer is an optimizer: `train_step(.., &mut opt, ..)` takes a
/// `Box<dyn Optimizer>` chosen at run time as it takes a concrete one.
impl<O: Optimizer + ?Sized> Optimizer for Box<O> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn steps_taken(&self) -> u64 {
        (**self).steps_taken()
    }
    fn wants(&self) -> Wants {
        (**self).wants()
    }
    fn step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
    ) -> Result<StepReport, OptimError> {
        (**self).step(params, grads, curvature)
    }
    fn step_with_curvature(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        products: &dyn CurvatureProducts,
    ) -> Result<StepReport, OptimError> {
        (**self).step_with_curvature(params, grads, curvature, products)
    }
    fn observe_reduction(&mut self, before: f32, after: f32) {
        (**self).observe_reduction(before, after)
    }
    fn set_shard(&mut self, shard: Option<Shard>) {
        (**self).set_shard(shard)
    }
    fn learning_rate(&self) -> f32 {
        (**self).learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f32) -> Result<(), OptimError> {
        (**self).set_learning_rate(lr)
    }
    fn state(&self) -> OptimState {
        (**self).state()
    }
    fn load_state(&mut self, state: OptimState) -> Result<(), OptimError> {
        (**self).load_state(state)
    }
}

/// Refuses a step whose gradients hold NaN or infinity, naming the parameter.
pub fn check_finite(params: &ParamStore, grads: &Gradients) -> Result<(), OptimError> {
    match grads.first_non_finite() {
        Some(id) => Err(OptimError::NonFiniteGradient {
            param: params.name(id).to_string(),
        }),
        None => Ok(()),
    }
}
