//! Layers without parameters: activations, pooling, flatten, dropout.

use kron_autodiff::{ParamId, Unary, Var};
use serde::{Deserialize, Serialize};

use crate::module::{FisherBlock, Module};

macro_rules! no_params {
    () => {
        fn visit_params(&self, _f: &mut dyn FnMut(ParamId)) {}
        fn visit_blocks(&self, _f: &mut dyn FnMut(&FisherBlock)) {}
    };
}

/// A pointwise activation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// Leaky ReLU with this negative slope.
    LeakyRelu(f32),
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic sigmoid.
    Sigmoid,
    /// `ln(1 + e^x)`.
    Softplus,
    /// GELU (tanh approximation).
    Gelu,
}

impl Activation {
    /// The tape's pointwise function for this activation.
    pub fn unary(self) -> Unary {
        match self {
            Activation::Relu => Unary::Relu,
            Activation::LeakyRelu(s) => Unary::LeakyRelu(s),
            Activation::Tanh => Unary::Tanh,
            Activation::Sigmoid => Unary::Sigmoid,
            Activation::Softplus => Unary::Softplus,
            Activation::Gelu => Unary::Gelu,
        }
    }
}

impl Module for Activation {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        x.unary(self.unary())
    }
    fn pointwise(&self) -> Option<Unary> {
        Some(self.unary())
    }
    no_params!();
}

/// 2-D max pooling with a square window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxPool2d {
    /// Window size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding (never wins the max).
    pub padding: usize,
}

impl MaxPool2d {
    /// A `k x k` window moved by `stride`, with `padding`.
    pub fn new(k: usize, stride: usize, padding: usize) -> Self {
        MaxPool2d { k, stride, padding }
    }
}

impl Module for MaxPool2d {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        x.max_pool2d(self.k, self.stride, self.padding)
    }
    no_params!();
}

/// 2-D average pooling with a square window (padding counts as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvgPool2d {
    /// Window size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding.
    pub padding: usize,
}

impl AvgPool2d {
    /// A `k x k` window moved by `stride`, with `padding`.
    pub fn new(k: usize, stride: usize, padding: usize) -> Self {
        AvgPool2d { k, stride, padding }
    }
}

impl Module for AvgPool2d {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        x.avg_pool2d(self.k, self.stride, self.padding)
    }
    no_params!();
}

/// Flattens every dimension after the batch dimension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flatten;

impl Module for Flatten {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        x.flatten()
    }
    no_params!();
}

/// Inverted dropout with probability `p`; the identity when the tape is in eval mode. Masks
/// come from the tape's generator, which the training step seeds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dropout {
    /// Probability of zeroing an element.
    pub p: f32,
}

impl Dropout {
    /// Dropout with probability `p`.
    ///
    /// # Panics
    /// If `p` is not in `[0, 1)`.
    #[track_caller]
    pub fn new(p: f32) -> Self {
        assert!(
            (0.0..1.0).contains(&p),
            "Dropout: probability {p} not in [0, 1)"
        );
        Dropout { p }
    }
}

impl Module for Dropout {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        x.dropout(self.p)
    }
    no_params!();
}
