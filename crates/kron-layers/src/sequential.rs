//! A chain of modules.

use kron_autodiff::{ParamId, Var};

use crate::module::{FisherBlock, Module};

/// Modules applied one after the other.
///
/// ```
/// use kron_autodiff::{ParamStore, Rng, Tape, Tensor};
/// use kron_layers::{Activation, Dense, Module, Sequential};
/// let mut store = ParamStore::new();
/// let mut rng = Rng::new(0);
/// let net = Sequential::new()
///     .push(Dense::new(&mut store, "0", 4, 8, &mut rng))
///     .push(Activation::Relu)
///     .push(Dense::new(&mut store, "2", 8, 3, &mut rng));
/// let tape = Tape::new(&store);
/// let y = net.forward(tape.input(Tensor::zeros(&[5, 4])));
/// assert_eq!(y.shape(), vec![5, 3]);
/// assert_eq!(net.fisher_blocks().len(), 2);
/// ```
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Module>>,
}

impl Sequential {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a module.
    pub fn push(mut self, m: impl Module + 'static) -> Self {
        self.layers.push(Box::new(m));
        self
    }

    /// Appends a boxed module.
    pub fn push_boxed(&mut self, m: Box<dyn Module>) {
        self.layers.push(m);
    }

    /// The number of modules.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the chain is empty.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl Module for Sequential {
    /// Each module in turn, except that a module followed by a pointwise one (an
    /// [`Activation`](crate::Activation)) is offered to fuse it
    /// ([`Module::forward_then`]); the result is the same, bit for bit, either way.
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        let mut h = x;
        let mut i = 0;
        while let Some(m) = self.layers.get(i) {
            let fused = self
                .layers
                .get(i + 1)
                .and_then(|next| next.pointwise())
                .and_then(|act| m.forward_then(h, act));
            match fused {
                Some(y) => (h, i) = (y, i + 2),
                None => (h, i) = (m.forward(h), i + 1),
            }
        }
        h
    }

    fn visit_params(&self, f: &mut dyn FnMut(ParamId)) {
        for m in &self.layers {
            m.visit_params(f);
        }
    }

    fn visit_blocks(&self, f: &mut dyn FnMut(&FisherBlock)) {
        for m in &self.layers {
            m.visit_blocks(f);
        }
    }
}
