//! Optimizers for kron: SGD, Adam, and Kronecker-factored second-order methods.
