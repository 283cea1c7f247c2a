//! Reads all of Fashion-MNIST, as Debian's `dataset-fashion-mnist` package installs it,
//! through `load_mnist_dir`. Skipped (with a message) where the package is absent, except under
//! CI, where its absence is a failure. `KRON_FASHION_MNIST_DIR` points it elsewhere.

use std::path::PathBuf;

use kron_data::load_mnist_dir;

/// Where Debian's package installs the files.
const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

#[test]
fn reads_all_of_fashion_mnist() {
    let dir = std::env::var_os("KRON_FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEBIAN_DIR));
    if !dir.is_dir() {
        let dir = dir.display();
        assert!(
            !in_ci(),
            "{dir} is missing and CI is set: install it with `apt-get install dataset-fashion-mnist`"
        );
        println!("skipped: {dir} not installed (apt-get install dataset-fashion-mnist)");
        return;
    }
    let split = load_mnist_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(split.train.len(), 60_000);
    assert_eq!(split.test.len(), 10_000);
    assert_eq!(split.train.image_shape(), [1, 28, 28]);
    assert_eq!(split.train.inputs().shape(), &[60_000, 784]);
    // Fashion-MNIST is exactly balanced.
    assert_eq!(split.train.class_counts(), vec![6000; 10]);
    assert_eq!(split.test.class_counts(), vec![1000; 10]);
    let data = split.test.inputs().data();
    assert!(data.iter().all(|&v| (0.0..=1.0).contains(&v)));
}
