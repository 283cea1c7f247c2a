//! The `Module` trait and the Fisher-block metadata that parameterized layers report.

use kron_autodiff::{LayerId, ParamId, ParamStore, Tensor, Unary, Var};
use serde::{Deserialize, Serialize};

/// The structure of one layer's Fisher block: what the optimizer needs to size and apply its
/// Kronecker factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// A dense layer `s = W a + b`, `W` being `outputs x inputs`.
    Dense {
        /// Input width.
        inputs: usize,
        /// Output width.
        outputs: usize,
    },
    /// A 2-D convolution, weight `out_ch x in_ch x kh x kw`.
    Conv2d {
        /// Input channels.
        in_ch: usize,
        /// Output channels.
        out_ch: usize,
        /// Kernel height.
        kh: usize,
        /// Kernel width.
        kw: usize,
        /// Stride.
        stride: usize,
        /// Zero padding.
        padding: usize,
    },
}

/// One parameterized layer's Fisher block: its capture site on the tape, its kind and sizes,
/// and the parameters its Kronecker factors precondition (weight and bias together, as the
/// `W_aug = [W | b]` of the math).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FisherBlock {
    /// The capture site: ask the tape to capture this id to get the layer's `(a, g)`.
    pub layer: LayerId,
    /// The layer's dotted path (`features.0`).
    pub path: String,
    /// Kind and sizes.
    pub kind: BlockKind,
    /// The weight parameter.
    pub weight: ParamId,
    /// The bias parameter, if any.
    pub bias: Option<ParamId>,
}

impl FisherBlock {
    /// Whether the block carries a bias (a homogeneous coordinate in its activation factor).
    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// The activation-factor size: the weight's input width (inputs, or `in_ch * kh * kw`),
    /// plus one with a bias.
    pub fn a_dim(&self) -> usize {
        let base = match self.kind {
            BlockKind::Dense { inputs, .. } => inputs,
            BlockKind::Conv2d { in_ch, kh, kw, .. } => in_ch * kh * kw,
        };
        base + usize::from(self.has_bias())
    }

    /// The gradient-factor size: the output width or channel count.
    pub fn g_dim(&self) -> usize {
        match self.kind {
            BlockKind::Dense { outputs, .. } => outputs,
            BlockKind::Conv2d { out_ch, .. } => out_ch,
        }
    }

    /// Whether the block is a convolution (KFC) rather than a dense layer (KFAC).
    pub fn is_conv(&self) -> bool {
        matches!(self.kind, BlockKind::Conv2d { .. })
    }

    /// The block's gradient in the `W_aug = [W | b]` layout (`g_dim x a_dim`), from the
    /// weight's and bias's gradients.
    ///
    /// # Panics
    /// If the shapes do not match the block.
    #[track_caller]
    pub fn join(&self, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (rows, cols) = (self.g_dim(), self.a_dim() - usize::from(self.has_bias()));
        assert_eq!(
            weight.numel(),
            rows * cols,
            "FisherBlock::join({}): weight {:?} does not fit {rows}x{cols}",
            self.path,
            weight.shape()
        );
        let Some(b) = bias else {
            return weight.reshape(&[rows, cols]);
        };
        assert_eq!(
            b.numel(),
            rows,
            "FisherBlock::join({}): bias {:?}",
            self.path,
            b.shape()
        );
        let n = cols + 1;
        let mut out = kron_autodiff::PooledBuffer::zeroed(rows * n);
        for r in 0..rows {
            out[r * n..r * n + cols].copy_from_slice(&weight.data()[r * cols..(r + 1) * cols]);
            out[r * n + cols] = b.data()[r];
        }
        out.into_tensor(&[rows, n])
    }

    /// Splits a `g_dim x a_dim` matrix in the `W_aug` layout back into weight-shaped and
    /// bias-shaped tensors (`weight_shape` is the weight parameter's shape).
    #[track_caller]
    pub fn split(&self, aug: &Tensor, weight_shape: &[usize]) -> (Tensor, Option<Tensor>) {
        let (rows, n) = aug.dims2();
        assert_eq!(
            (rows, n),
            (self.g_dim(), self.a_dim()),
            "FisherBlock::split({}): matrix {:?}",
            self.path,
            aug.shape()
        );
        if !self.has_bias() {
            return (aug.reshape(weight_shape), None);
        }
        let cols = n - 1;
        let mut w = kron_autodiff::PooledBuffer::zeroed(rows * cols);
        let mut b = Vec::with_capacity(rows);
        for r in 0..rows {
            w[r * cols..(r + 1) * cols].copy_from_slice(&aug.data()[r * n..r * n + cols]);
            b.push(aug.data()[r * n + cols]);
        }
        (
            w.into_tensor(weight_shape),
            Some(Tensor::from_vec(b, &[rows])),
        )
    }
}

/// `path`, or where it is empty, the layer's position in `store`: the number of layers
/// registered before it, or the next number no parameter of `store` is named under.
pub(crate) fn layer_path(store: &ParamStore, path: &str) -> String {
    if !path.is_empty() {
        return path.to_string();
    }
    let mut n = store.num_layers();
    while store.find(&format!("{n}.weight")).is_some() || store.find(&format!("{n}.bias")).is_some()
    {
        n += 1;
    }
    n.to_string()
}

/// A piece of a model: a forward pass on the tape, its parameters, and its Fisher blocks.
///
/// Layers are plain structs that hold [`ParamId`]s into the [`ParamStore`] kept beside the
/// model; compose them with [`Sequential`](crate::Sequential) or a struct of your own that
/// implements this trait by delegating to its fields.
pub trait Module: Send + Sync {
    /// Records the forward pass of `x` on its tape and returns the output.
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t>;

    /// Calls `f` with every parameter of this module, in a fixed order.
    fn visit_params(&self, f: &mut dyn FnMut(ParamId));

    /// Calls `f` with the Fisher block of every parameterized layer, in a fixed order.
    fn visit_blocks(&self, f: &mut dyn FnMut(&FisherBlock));

    /// The pointwise function this module is, if it is nothing more (an
    /// [`Activation`](crate::Activation)). A [`Sequential`](crate::Sequential) offers it to the
    /// module before it through [`forward_then`](Module::forward_then).
    fn pointwise(&self) -> Option<Unary> {
        None
    }

    /// [`forward`](Module::forward) followed by the pointwise `act`, recorded as one fused op,
    /// where this module can fuse them: the same values, gradients and captures, bit for bit,
    /// as `act` applied after `forward`. `None` (and nothing recorded) where it cannot; the
    /// default never fuses. [`Conv2d`](crate::Conv2d) fuses a ReLU; [`Dense`](crate::Dense) a ReLU,
    /// sigmoid or tanh.
    fn forward_then<'t>(&self, x: Var<'t>, act: Unary) -> Option<Var<'t>> {
        let _ = (x, act);
        None
    }

    /// Every parameter id of this module.
    fn param_ids(&self) -> Vec<ParamId> {
        let mut out = Vec::new();
        self.visit_params(&mut |p| out.push(p));
        out
    }

    /// The Fisher blocks of this module's parameterized layers.
    fn fisher_blocks(&self) -> Vec<FisherBlock> {
        let mut out = Vec::new();
        self.visit_blocks(&mut |b| out.push(b.clone()));
        out
    }

    /// Calls `f` with every parameter's id and mutable value.
    fn visit_params_mut(&self, store: &mut ParamStore, f: &mut dyn FnMut(ParamId, &mut Tensor)) {
        for id in self.param_ids() {
            f(id, store.get_mut(id));
        }
    }
}

impl<M: Module + ?Sized> Module for Box<M> {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        (**self).forward(x)
    }
    fn visit_params(&self, f: &mut dyn FnMut(ParamId)) {
        (**self).visit_params(f)
    }
    fn visit_blocks(&self, f: &mut dyn FnMut(&FisherBlock)) {
        (**self).visit_blocks(f)
    }
    fn pointwise(&self) -> Option<Unary> {
        (**self).pointwise()
    }
    fn forward_then<'t>(&self, x: Var<'t>, act: Unary) -> Option<Var<'t>> {
        (**self).forward_then(x, act)
    }
}
