//! # kron-layers
//!
//! Layers that know their own Fisher blocks.
//!
//! A model is a [`Module`]: a forward pass on the tape, visitors over its parameters, and
//! [`Module::fisher_blocks`], which lists for every parameterized layer a [`FisherBlock`] (its
//! capture site, kind and sizes, weight and bias ids). Optimizers size and apply their
//! Kronecker factors from these blocks alone, never from concrete layer types.
//!
//! Parameters live in a [`ParamStore`](kron_autodiff::ParamStore) beside the model; layers hold
//! ids into it, created with seeded initializers ([`Init`]). Weights save to and load from
//! safetensors files with [`save`] and [`load`].
//!
//! A model of your own is a struct of modules with a forward pass: [`module!`] writes the
//! struct and its `impl Module` from the fields and the forward you give it.

mod conv;
mod dense;
mod init;
mod macros;
mod module;
mod sequential;
mod stateless;

pub use conv::{Conv2d, Conv2dConfig};
pub use dense::{Dense, DenseConfig};
pub use init::Init;
pub use module::{BlockKind, FisherBlock, Module};
pub use sequential::Sequential;
pub use stateless::{Activation, AvgPool2d, Dropout, Flatten, MaxPool2d};

pub use kron_autodiff::io::{TensorFileError, load_params as load, save_params as save};

/// What [`module!`]'s expansion names, reachable through `$crate` from a crate that depends on
/// `kron` alone. Not an API.
#[doc(hidden)]
pub mod __macro {
    pub use kron_autodiff::ParamId;
}
