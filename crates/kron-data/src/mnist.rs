//! MNIST-format directories: the four canonical files, raw or gzip, checked and paired.

use std::path::{Path, PathBuf};

use crate::dataset::{Dataset, Split};
use crate::error::DataError;
use crate::idx::{self, Images};

/// Canonical name of the training images file.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Canonical name of the training labels file.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Canonical name of the test images file.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Canonical name of the test labels file.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// Classes of MNIST and Fashion-MNIST.
pub const MNIST_CLASSES: usize = 10;

/// Loads an MNIST-format directory (MNIST, Fashion-MNIST, ...) as a train/test [`Split`].
///
/// The directory holds [`TRAIN_IMAGES`], [`TRAIN_LABELS`], [`TEST_IMAGES`] and [`TEST_LABELS`],
/// each raw or with a `.gz` suffix (the raw file is used when both exist; compression is
/// recognized by content either way). Images become `f32` in `[0, 1]` (`/ 255`) with shape
/// `(1, rows, cols)`; there are 10 classes.
///
/// # Errors
/// A [`DataError`] naming the file for a missing or unreadable file, a wrong magic number, a
/// truncated file or one with trailing bytes, images and labels files of different lengths,
/// train and test images of different sizes, or a label outside `0..10`.
pub fn load_mnist_dir(dir: impl AsRef<Path>) -> Result<Split, DataError> {
    let dir = dir.as_ref();
    let train = load_pair(dir, TRAIN_IMAGES, TRAIN_LABELS)?;
    let test = load_pair(dir, TEST_IMAGES, TEST_LABELS)?;
    check_same_shape(&train, &test)?;
    Ok(Split {
        train: train.dataset,
        test: test.dataset,
    })
}

/// One images file and its labels, checked against each other.
pub(crate) struct Pair {
    pub(crate) dataset: Dataset,
    images_path: PathBuf,
}

/// Finds `name` or `name.gz` in `dir`.
fn find(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok(raw);
    }
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    Err(DataError::MissingFile {
        dir: dir.to_path_buf(),
        name: name.to_string(),
    })
}

fn load_pair(dir: &Path, images: &str, labels: &str) -> Result<Pair, DataError> {
    let images_path = find(dir, images)?;
    let labels_path = find(dir, labels)?;
    let imgs = idx::read_images(&images_path)?;
    let labs = idx::read_labels(&labels_path)?;
    pair(imgs, &images_path, labs, &labels_path)
}

/// Pairs images with labels after checking counts and label range.
pub(crate) fn pair(
    images: Images,
    images_path: &Path,
    labels: Vec<u8>,
    labels_path: &Path,
) -> Result<Pair, DataError> {
    if images.count() != labels.len() {
        return Err(DataError::CountMismatch {
            images: images_path.to_path_buf(),
            image_count: images.count(),
            labels: labels_path.to_path_buf(),
            label_count: labels.len(),
        });
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| **l as usize >= MNIST_CLASSES)
    {
        return Err(DataError::LabelOutOfRange {
            path: labels_path.to_path_buf(),
            index,
            label: label as usize,
            num_classes: MNIST_CLASSES,
        });
    }
    let shape = [1, images.rows(), images.cols()];
    let dataset = Dataset::new(
        images.to_tensor(),
        labels.into_iter().map(usize::from).collect(),
        MNIST_CLASSES,
        shape,
    );
    Ok(Pair {
        dataset,
        images_path: images_path.to_path_buf(),
    })
}

/// Train and test images must have one size.
pub(crate) fn check_same_shape(train: &Pair, test: &Pair) -> Result<(), DataError> {
    let (a, b) = (train.dataset.image_shape(), test.dataset.image_shape());
    if a != b {
        return Err(DataError::ShapeMismatch {
            path: test.images_path.clone(),
            expected: a[1..].to_vec(),
            found: b[1..].to_vec(),
        });
    }
    Ok(())
}
