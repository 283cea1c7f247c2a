//! Small real datasets embedded in the crate: they need no download and work from any
//! working directory.
//!
//! * [`digits`]: UCI optical digits, 1797 images of 8x8 (CC BY 4.0, Alpaydin and Kaynak).
//! * [`mnist_10k`]: 10,000 MNIST digits of 28x28 (LeCun, Cortes, Burges), split 8000 / 2000.
//!
//! The credits and provenance are in `data/*/README.md` beside the files. Each set is decoded
//! once per process and cached; the returned [`Split`] shares the cached storage (cloning a
//! [`Tensor`] is cheap).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flate2::read::MultiGzDecoder;
use kron_autodiff::Tensor;

use crate::dataset::{Dataset, Split};
use crate::error::DataError;
use crate::idx;
use crate::mnist::{self, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS};

const DIGITS_CSV: &[u8] = include_bytes!("../data/digits/digits.csv.gz");
const MNIST_TRAIN_IMAGES: &[u8] = include_bytes!("../data/mnist-10k/train-images-idx3-ubyte.gz");
const MNIST_TRAIN_LABELS: &[u8] = include_bytes!("../data/mnist-10k/train-labels-idx1-ubyte.gz");
const MNIST_TEST_IMAGES: &[u8] = include_bytes!("../data/mnist-10k/t10k-images-idx3-ubyte.gz");
const MNIST_TEST_LABELS: &[u8] = include_bytes!("../data/mnist-10k/t10k-labels-idx1-ubyte.gz");

/// Rows of the digits set.
pub const DIGITS_LEN: usize = 1797;
/// Rows of the digits set used for training (the first ones); the remaining 360 are the test set.
pub const DIGITS_TRAIN: usize = 1437;

/// The UCI optical recognition of handwritten digits set: 1797 images of 8x8 pixels with values
/// 0..16, scaled to `[0, 1]` by dividing by 16; 10 classes of about 180 images each.
///
/// The split is fixed: the first [`DIGITS_TRAIN`] (1437) rows train, the last 360 test.
/// Image shape `(1, 8, 8)`.
///
/// # Panics
/// Only if the embedded bytes were damaged at build time (the crate's tests decode them).
pub fn digits() -> Split {
    static CACHE: OnceLock<Split> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            try_digits().unwrap_or_else(|e| panic!("the bundled digits data is damaged: {e}"))
        })
        .clone()
}

/// 10,000 real MNIST digits (the first 10,000 of MNIST's training set): 8000 to train and 2000
/// to test, 28x28, pixels scaled to `[0, 1]` by dividing by 255; image shape `(1, 28, 28)`.
///
/// Not MNIST's official split: within each class, the first 80% of its images train and the
/// last 20% test. Class counts: train `[801, 902, 793, 826, 784, 690, 811, 856, 755, 782]`,
/// test `[200, 225, 198, 206, 196, 173, 203, 214, 189, 196]`.
///
/// # Panics
/// Only if the embedded bytes were damaged at build time (the crate's tests decode them).
pub fn mnist_10k() -> Split {
    static CACHE: OnceLock<Split> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            try_mnist_10k().unwrap_or_else(|e| panic!("the bundled MNIST data is damaged: {e}"))
        })
        .clone()
}

fn bundled_path(set: &str, file: &str) -> PathBuf {
    Path::new("<bundled>").join(set).join(file)
}

/// Decodes the embedded digits CSV (the checks that make [`digits`] infallible in practice).
pub(crate) fn try_digits() -> Result<Split, DataError> {
    let all = parse_digits_csv(
        DIGITS_CSV,
        &bundled_path("digits", "digits.csv.gz"),
        DIGITS_LEN,
    )?;
    let train: Vec<usize> = (0..DIGITS_TRAIN).collect();
    let test: Vec<usize> = (DIGITS_TRAIN..all.len()).collect();
    Ok(Split {
        train: all.subset(&train),
        test: all.subset(&test),
    })
}

/// Decodes the embedded MNIST files through the same checks as
/// [`load_mnist_dir`](crate::load_mnist_dir).
pub(crate) fn try_mnist_10k() -> Result<Split, DataError> {
    let load = |images: &[u8], iname: &str, labels: &[u8], lname: &str| {
        let ipath = bundled_path("mnist-10k", &format!("{iname}.gz"));
        let lpath = bundled_path("mnist-10k", &format!("{lname}.gz"));
        let imgs = idx::parse_images(images, &ipath)?;
        let labs = idx::parse_labels(labels, &lpath)?;
        mnist::pair(imgs, &ipath, labs, &lpath)
    };
    let train = load(
        MNIST_TRAIN_IMAGES,
        TRAIN_IMAGES,
        MNIST_TRAIN_LABELS,
        TRAIN_LABELS,
    )?;
    let test = load(
        MNIST_TEST_IMAGES,
        TEST_IMAGES,
        MNIST_TEST_LABELS,
        TEST_LABELS,
    )?;
    mnist::check_same_shape(&train, &test)?;
    Ok(Split {
        train: train.dataset,
        test: test.dataset,
    })
}

/// Parses the digits CSV (gzip or plain): per line 64 integers 0..16 then a label 0..9, no
/// header; exactly `expected_rows` lines.
pub(crate) fn parse_digits_csv(
    bytes: &[u8],
    path: &Path,
    expected_rows: usize,
) -> Result<Dataset, DataError> {
    const PIXELS: usize = 64;
    let parse_err = |line: usize, detail: String| DataError::Parse {
        path: path.to_path_buf(),
        line,
        detail,
    };
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        MultiGzDecoder::new(bytes)
            .read_to_string(&mut s)
            .map_err(|source| DataError::Gzip {
                path: path.to_path_buf(),
                source,
            })?;
        s
    } else {
        String::from_utf8(bytes.to_vec()).map_err(|e| parse_err(0, format!("not UTF-8: {e}")))?
    };
    let mut data = Vec::with_capacity(expected_rows * PIXELS);
    let mut labels = Vec::with_capacity(expected_rows);
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != PIXELS + 1 {
            return Err(parse_err(
                lineno,
                format!("{} fields, expected {}", fields.len(), PIXELS + 1),
            ));
        }
        for (j, f) in fields.iter().enumerate() {
            let v: u8 = f.trim().parse().map_err(|_| {
                parse_err(lineno, format!("field {}: {f:?} is not an integer", j + 1))
            })?;
            if j < PIXELS {
                if v > 16 {
                    return Err(parse_err(
                        lineno,
                        format!("field {}: pixel {v} is outside 0..=16", j + 1),
                    ));
                }
                data.push(v as f32 / 16.0);
            } else {
                if v > 9 {
                    return Err(parse_err(
                        lineno,
                        format!("field {}: label {v} is outside 0..=9", j + 1),
                    ));
                }
                labels.push(v as usize);
            }
        }
    }
    if labels.len() != expected_rows {
        return Err(parse_err(
            text.lines().count(),
            format!("{} rows, expected {expected_rows}", labels.len()),
        ));
    }
    let n = labels.len();
    Ok(Dataset::new(
        Tensor::from_vec(data, &[n, PIXELS]),
        labels,
        10,
        [1, 8, 8],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_errors_name_line_and_field() {
        let p = Path::new("x.csv");
        let mut row: Vec<String> = (0..64).map(|_| "0".to_string()).collect();
        row.push("3".into());
        let good = row.join(",");
        let ok = parse_digits_csv(format!("{good}\n{good}\n").as_bytes(), p, 2).unwrap();
        assert_eq!(ok.labels(), &[3, 3]);

        let short = format!("{good}\n0,1,2\n");
        let e = parse_digits_csv(short.as_bytes(), p, 2).unwrap_err();
        assert!(matches!(e, DataError::Parse { line: 2, .. }), "{e}: {e:?}");

        let bad_pixel = good.replacen('0', "17", 1);
        let e = parse_digits_csv(bad_pixel.as_bytes(), p, 1).unwrap_err();
        assert!(e.to_string().contains("x.csv:1: field 1"), "{e}");

        let e = parse_digits_csv(good.as_bytes(), p, 2).unwrap_err();
        assert!(e.to_string().contains("1 rows, expected 2"), "{e}");
    }
}
