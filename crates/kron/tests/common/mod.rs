//! What the facade's training tests share: a small classifier with dropout, its data, and a
//! scratch path.

use kron::prelude::*;

/// Two dense layers with tanh and dropout between them, 6 inputs, 3 classes.
pub fn model(store: &mut ParamStore, seed: u64) -> Sequential {
    let mut rng = Rng::new(seed);
    Sequential::new()
        .push(Dense::new(store, "fc1", 6, 16, &mut rng))
        .push(Activation::Tanh)
        .push(Dropout::new(0.2))
        .push(Dense::new(store, "fc2", 16, 3, &mut rng))
}

/// 40 examples of 6 inputs and their classes.
pub fn data() -> (Tensor, Vec<usize>) {
    let mut rng = Rng::new(99);
    let x = Tensor::randn(&[40, 6], 0.0, 1.0, &mut rng);
    let y = (0..40).map(|i| i % 3).collect();
    (x, y)
}

/// A path named `name` in this test process's scratch directory.
pub fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kron-facade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}
