//! kron: a Rust framework for training neural networks with second-order optimizers.
