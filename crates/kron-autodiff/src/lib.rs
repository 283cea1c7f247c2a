//! # kron-autodiff
//!
//! `f32` tensors and a tape-based reverse-mode autodiff built for second-order optimization.
//!
//! * [`Tensor`]: row-major, contiguous, storage shared by `Arc`.
//! * [`gemm`] and [`gemm_strided`]: matrixmultiply's kernels, each large product split into
//!   one slab of the output per rayon thread, with the same bits for any thread count.
//! * [`Tape`] and [`Var`]: an append-only arena of recorded ops (an enum, not closures);
//!   [`Tape::backward`] sweeps it once in reverse, does not consume it, and returns
//!   [`Gradients`] keyed by [`ParamId`].
//! * **Curvature capture**: the dense and conv layers are single fused ops
//!   ([`Var::linear`], [`Var::conv2d`]). A tape asked to capture a layer
//!   ([`Tape::capturing`]) keeps its input activations `a` and its pre-activation gradients
//!   `g` ([`LayerCapture`]), from which the Kronecker factors of KFAC and KFC follow
//!   ([`LayerCapture::a_factor`], [`LayerCapture::g_factor`]).
//! * **Forward-mode products**: [`Tape::jvp`] pushes a parameter direction through the
//!   recorded ops, and [`Tape::ggn_gram`] gives the exact mini-batch Gauss-Newton (Fisher)
//!   quadratic forms `d_i^T F d_j` of a few directions, for quadratic models.
//! * [`Rng`]: the seeded, serializable generator behind every random draw.
//! * [`testing`]: the finite-difference gradient checker the tests of every crate use, and
//!   their shared fixtures (scratch directories, a peak-memory counter).
//! * [`io`]: safetensors files, written atomically and read with errors that say what is wrong.

mod alloc;
mod capture;
mod gemm;
mod gradients;
pub mod io;
pub mod ops;
mod param;
mod pool_thread;
mod rng;
mod tape;
mod tensor;
pub mod testing;

pub use alloc::{PooledBuffer, pooled_bytes, release_buffers};
pub use capture::LayerCapture;
pub use gemm::{GemmScalar, MatMut, MatRef, gemm, gemm_strided, kernel_name};
pub use gradients::Gradients;
pub use ops::loss::{LossKind, Targets};
pub use ops::{ConvGeom, Direction, PoolGeom, Unary};
pub use param::{LayerId, ParamId, ParamStore};
pub use pool_thread::in_pool;
pub use rng::Rng;
pub use tape::{Tape, Var};
pub use tensor::{Shape, Tensor, all_finite, broadcast_shape, numel, sum_to_shape};
