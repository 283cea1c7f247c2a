//! What a backward pass returns: parameter gradients by id and the captured statistics.

use std::collections::BTreeMap;

use crate::capture::LayerCapture;
use crate::param::{LayerId, ParamId};
use crate::tape::Var;
use crate::tensor::Tensor;

/// The result of [`Tape::backward`](crate::Tape::backward).
#[derive(Clone, Debug, Default)]
pub struct Gradients {
    params: Vec<Option<Tensor>>,
    leaves: BTreeMap<usize, Tensor>,
    captures: BTreeMap<LayerId, LayerCapture>,
}

impl Gradients {
    pub(crate) fn new(
        params: Vec<Option<Tensor>>,
        leaves: BTreeMap<usize, Tensor>,
        captures: BTreeMap<LayerId, LayerCapture>,
    ) -> Self {
        Gradients {
            params,
            leaves,
            captures,
        }
    }

    /// Gradients built by hand (for optimizers' tests and custom training loops): one optional
    /// tensor per parameter, in the store's order.
    pub fn from_params(params: Vec<Option<Tensor>>) -> Self {
        Gradients {
            params,
            ..Default::default()
        }
    }

    /// The gradient of a parameter; `None` if the loss does not depend on it.
    pub fn get(&self, id: ParamId) -> Option<&Tensor> {
        self.params.get(id.index()).and_then(Option::as_ref)
    }

    /// The gradient of a [`Tape::var`](crate::Tape::var) leaf.
    pub fn wrt(&self, v: Var<'_>) -> Option<&Tensor> {
        self.leaves.get(&v.id)
    }

    /// `(id, gradient)` for each parameter the loss depends on.
    pub fn params(&self) -> impl Iterator<Item = (ParamId, &Tensor)> + '_ {
        self.params
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_ref().map(|g| (ParamId(i as u32), g)))
    }

    /// The capture of one layer, if it was requested and the loss depends on it.
    pub fn capture(&self, layer: LayerId) -> Option<&LayerCapture> {
        self.captures.get(&layer)
    }

    /// All captures, by layer id.
    pub fn captures(&self) -> &BTreeMap<LayerId, LayerCapture> {
        &self.captures
    }

    /// Takes the captures out (for handing them to an optimizer).
    pub fn take_captures(&mut self) -> BTreeMap<LayerId, LayerCapture> {
        std::mem::take(&mut self.captures)
    }

    /// Whether every parameter gradient is finite.
    pub fn all_finite(&self) -> bool {
        self.params().all(|(_, g)| g.all_finite())
    }

    /// The first parameter whose gradient holds a NaN or an infinity.
    pub fn first_non_finite(&self) -> Option<ParamId> {
        self.params()
            .find(|(_, g)| !g.all_finite())
            .map(|(id, _)| id)
    }

    /// The Euclidean norm of all parameter gradients together (accumulated in `f64`).
    pub fn global_norm(&self) -> f32 {
        self.params()
            .flat_map(|(_, g)| g.data().iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt() as f32
    }
}
