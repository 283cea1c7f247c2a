//! Datasets for kron: MNIST-format IDX files, bundled real data, synthetic problems, seeded batching.
