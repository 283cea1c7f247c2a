//! The 2-D convolution layer.

use kron_autodiff::{LayerId, ParamId, ParamStore, Rng, Tensor, Unary, Var};
use serde::{Deserialize, Serialize};

use crate::init::Init;
use crate::module::{BlockKind, FisherBlock, Module};

/// How to build a [`Conv2d`] layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Stride (both axes, default 1).
    pub stride: usize,
    /// Zero padding (both axes, default 0).
    pub padding: usize,
    /// Whether the layer has a bias (default `true`).
    pub bias: bool,
    /// Weight initialization (default He uniform); biases start at zero.
    pub init: Init,
}

impl Conv2dConfig {
    /// A `k x k` convolution from `in_ch` to `out_ch` channels, stride 1, no padding, with a
    /// bias and He-uniform weights.
    pub fn new(in_ch: usize, out_ch: usize, k: usize) -> Self {
        Conv2dConfig {
            in_ch,
            out_ch,
            kernel: (k, k),
            stride: 1,
            padding: 0,
            bias: true,
            init: Init::HeUniform,
        }
    }

    /// With a rectangular `kh x kw` kernel.
    pub fn with_kernel(mut self, kh: usize, kw: usize) -> Self {
        self.kernel = (kh, kw);
        self
    }

    /// With another stride.
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    /// With zero padding.
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
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
    pub fn build(self, store: &mut ParamStore, path: &str, rng: &mut Rng) -> Conv2d {
        let path = &crate::module::layer_path(store, path);
        let (kh, kw) = self.kernel;
        let area = kh * kw;
        let w = self.init.tensor(
            &[self.out_ch, self.in_ch, kh, kw],
            self.in_ch * area,
            self.out_ch * area,
            rng,
        );
        let weight = store.add(format!("{path}.weight"), w);
        let bias = self
            .bias
            .then(|| store.add(format!("{path}.bias"), Tensor::zeros(&[self.out_ch])));
        Conv2d {
            block: FisherBlock {
                layer: store.add_layer(path),
                path: path.to_string(),
                kind: BlockKind::Conv2d {
                    in_ch: self.in_ch,
                    out_ch: self.out_ch,
                    kh,
                    kw,
                    stride: self.stride,
                    padding: self.padding,
                },
                weight,
                bias,
            },
        }
    }
}

/// A 2-D convolution over NCHW batches, weight `out_ch x in_ch x kh x kw`. Its forward is one
/// fused tape op (im2col + GEMM), the capture site of its KFC block.
#[derive(Clone, Debug)]
pub struct Conv2d {
    block: FisherBlock,
}

impl Conv2d {
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

impl Conv2d {
    /// Records this layer's convolution of `x`, followed in the same op by a ReLU if `relu`.
    fn record<'t>(&self, x: Var<'t>, relu: bool) -> Var<'t> {
        let BlockKind::Conv2d {
            stride,
            padding,
            in_ch,
            ..
        } = self.block.kind
        else {
            unreachable!("a Conv2d layer always has a conv block")
        };
        let shape = x.shape();
        assert!(
            shape.len() == 4 && shape[1] == in_ch,
            "Conv2d `{}`: input of shape {shape:?} does not fit; expected batch x {in_ch} x height x width{}",
            self.block.path,
            if shape.len() == 2 {
                " (flat rows: reshape them to images first)"
            } else {
                ""
            }
        );
        let tape = x.tape();
        let w = tape.param(self.block.weight);
        let b = self.block.bias.map(|b| tape.param(b));
        let layer = Some(self.block.layer);
        if relu {
            x.conv2d_relu(w, b, stride, padding, layer)
        } else {
            x.conv2d(w, b, stride, padding, layer)
        }
    }
}

impl Module for Conv2d {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        self.record(x, false)
    }

    /// Fuses a ReLU ([`Var::conv2d_relu`]).
    fn forward_then<'t>(&self, x: Var<'t>, act: Unary) -> Option<Var<'t>> {
        (act == Unary::Relu).then(|| self.record(x, true))
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
