//! Helpers shared by the integration tests: scratch directories and tiny IDX fixtures.

#![allow(dead_code)]

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;

pub use kron_autodiff::testing::ScratchDir;

/// `bytes` gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// An MNIST images file of `count` images of `rows x cols`; pixel values follow their position.
pub fn images_file(count: usize, rows: usize, cols: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..count * rows * cols)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    kron_data::idx::encode_u8(&[count, rows, cols], &data)
}

/// An MNIST labels file holding `labels`.
pub fn labels_file(labels: &[u8]) -> Vec<u8> {
    kron_data::idx::encode_u8(&[labels.len()], labels)
}

/// Writes a complete small MNIST directory: 5 train and 3 test images of 4x3, gzip or raw.
pub fn write_mnist_dir(dir: &ScratchDir, gz: bool) {
    let files = [
        ("train-images-idx3-ubyte", images_file(5, 4, 3)),
        ("train-labels-idx1-ubyte", labels_file(&[0, 9, 3, 3, 1])),
        ("t10k-images-idx3-ubyte", images_file(3, 4, 3)),
        ("t10k-labels-idx1-ubyte", labels_file(&[2, 7, 0])),
    ];
    for (name, bytes) in files {
        if gz {
            dir.write(&format!("{name}.gz"), &gzip(&bytes));
        } else {
            dir.write(name, &bytes);
        }
    }
}
