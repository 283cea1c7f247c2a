//! The dense (fully connected) layer.

use kron_autodiff::{LayerId, ParamId, ParamStore, Rng, Tensor, Unary, Var};
use serde::{Deserialize, Serialize};

use crate::init::Init;
use crate::module::{BlockKind, FisherBlock, Module};

/// How to build a [`Dense`] layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseConfig {
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// Whether the layer has a bias (default `true`).
    pub bias: bool,
    /// Weight initialization (default Glorot uniform); biases start at zero.
    pub init: Init,
}

impl DenseConfig {
    /// A layer from `inputs` to `outputs` with a bias and Glorot-uniform weights.
    pub fn new(inputs: usize, outputs: usize) -> Self {
        DenseConfig {
            inputs,
            outputs,
            bias: true,
            init: Init::GlorotUniform,
        }
    }

    /// With or without a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// With another weight initialization.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    /// Creates the layer's parameters in `store` under `path` (`path.weight`, `path.bias`).
    /// An empty `path` names the layer by its position: the number of layers created in
    /// `store` before it (`"0"`, `"1"`, ..., as PyTorch's `Sequential` numbers its children;
    /// the next free number if a layer already has that name).
    pub fn build(self, store: &mut ParamStore, path: &str, rng: &mut Rng) -> Dense {
        let path = &crate::module::layer_path(store, path);
        let w = self
            .init
            .tensor(&[self.outputs, self.inputs], self.inputs, self.outputs, rng);
        let weight = store.add(format!("{path}.weight"), w);
        let bias = self
            .bias
            .then(|| store.add(format!("{path}.bias"), Tensor::zeros(&[self.outputs])));
        Dense {
            block: FisherBlock {
                layer: store.add_layer(path),
                path: path.to_string(),
                kind: BlockKind::Dense {
                    inputs: self.inputs,
                    outputs: self.outputs,
                },
                weight,
                bias,
            },
        }
    }
}

/// A dense layer `s = x W^T + b`, weight `outputs x inputs` (PyTorch's layout). Its forward is
/// one fused tape op, the capture site of its KFAC block.
#[derive(Clone, Debug)]
pub struct Dense {
    block: FisherBlock,
}

impl Dense {
    /// A layer with a bias and Glorot-uniform weights (see [`DenseConfig`] for other choices),
    /// its parameters `path.weight` and `path.bias` in `store`. An empty `path` names it by
    /// its position ([`DenseConfig::build`]: `"0"` for the store's first layer).
    pub fn new(
        store: &mut ParamStore,
        path: &str,
        inputs: usize,
        outputs: usize,
        rng: &mut Rng,
    ) -> Self {
        DenseConfig::new(inputs, outputs).build(store, path, rng)
    }

    /// The weight parameter.
    pub fn weight(&self) -> ParamId {
        self.block.weight
    }

    /// The bias parameter, if any.
    pub fn bias(&self) -> Option<ParamId> {
        self.block.bias
    }

    /// The capture site.
    pub fn layer(&self) -> LayerId {
        self.block.layer
    }

    /// The Fisher block.
    pub fn block(&self) -> &FisherBlock {
        &self.block
    }
}

impl Dense {
    /// The layer's op, with `act` fused into it where given.
    fn record<'t>(&self, x: Var<'t>, act: Option<Unary>) -> Var<'t> {
        let BlockKind::Dense { inputs, .. } = self.block.kind else {
            unreachable!("a Dense layer always has a dense block")
        };
        let shape = x.shape();
        assert!(
            shape.len() == 2 && shape[1] == inputs,
            "Dense `{}`: input of shape {shape:?} does not fit; expected batch x {inputs}{}",
            self.block.path,
            if shape.len() > 2 {
                " (images: add a Flatten before it)"
            } else {
                ""
            }
        );
        let tape = x.tape();
        let w = tape.param(self.block.weight);
        let b = self.block.bias.map(|b| tape.param(b));
        let layer = Some(self.block.layer);
        match act {
            Some(act) => x.linear_then(w, b, layer, act),
            None => x.linear(w, b, layer),
        }
    }
}

impl Module for Dense {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        self.record(x, None)
    }

    /// Fuses a ReLU, sigmoid or tanh ([`Var::linear_then`]).
    fn forward_then<'t>(&self, x: Var<'t>, act: Unary) -> Option<Var<'t>> {
        act.derivative_from_output()
            .then(|| self.record(x, Some(act)))
    }

    fn visit_params(&self, f: &mut dyn FnMut(ParamId)) {
        f(self.block.weight);
        if let Some(b) = self.block.bias {
            f(b);
        }
    }

    fn visit_blocks(&self, f: &mut dyn FnMut(&FisherBlock)) {
        f(&self.block);
    }
}
