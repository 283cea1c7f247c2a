//! # kron-data
//!
//! Datasets for kron, all in memory and all reproducible.
//!
//! * **MNIST-format files** ([`idx`]): a reader for IDX files, raw or gzip-compressed
//!   (recognized by content), that checks magic numbers, dimensions and lengths and reports a
//!   [`DataError`] naming the file. [`load_mnist_dir`] reads a directory with the four canonical
//!   MNIST files (MNIST, Fashion-MNIST, ...), e.g. the one Debian's `dataset-fashion-mnist`
//!   package installs in `/usr/share/datasets/fashion-mnist/`.
//! * **Bundled real data**, embedded in the crate, so it needs no download and works from any
//!   working directory: [`digits`] (UCI optical digits, 1797 images of 8x8) and [`mnist_10k`]
//!   (10,000 MNIST digits of 28x28). Credits are in the crate's `data/*/README.md`.
//! * **One dataset type** for all of them: [`Dataset`] (inputs `n x features`, labels, number of
//!   classes, image shape, an NCHW view, [`Dataset::batch`]) in a train/test [`Split`], so a
//!   program can take `--data DIR` and fall back to the bundled data.
//! * **Synthetic problems**: [`LeastSquares`], linear regression whose design has a chosen
//!   condition number, with its exact optimum.
//! * **Seeded batching**: [`Batches`], mini-batch index lists reshuffled each epoch from their
//!   own [`Rng`](kron_autodiff::Rng) stream, whose position ([`BatchState`]) serializes so a
//!   checkpoint resumes mid-epoch with the same batches.
//!
//! ```
//! use kron_autodiff::Rng;
//! use kron_data::{Batches, digits};
//!
//! let data = digits();
//! assert_eq!((data.train.len(), data.test.len()), (1437, 360));
//! let mut batches = Batches::new(data.train.len(), 32, Rng::new(0).fork(1));
//! let idx = batches.next_batch().unwrap();
//! let (x, y) = data.train.batch(&idx);
//! assert_eq!(x.shape(), &[32, 64]);
//! assert_eq!(y.len(), 32);
//! ```

mod batch;
mod bundled;
mod dataset;
mod error;
pub mod idx;
mod mnist;
mod synthetic;

pub use batch::{BatchState, Batches};
pub use bundled::{DIGITS_LEN, DIGITS_TRAIN, digits, mnist_10k};
pub use dataset::{Dataset, Split};
pub use error::DataError;
pub use idx::{Images, read_images, read_labels};
pub use mnist::{
    MNIST_CLASSES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, load_mnist_dir,
};
pub use synthetic::LeastSquares;
