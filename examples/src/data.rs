//! Loading the examples' data: the bundled sets by default, MNIST-format IDX files with
//! `--data DIR`.

use kron::data::{Dataset, Split, load_mnist_dir, mnist_10k};
use kron::prelude::*;

use crate::example::{Config, Sizes};

/// The data the flags name: `--data DIR` or the given bundled split. Errors name the file.
pub fn load(cfg: &Config, bundled: fn() -> Split) -> Result<Split, String> {
    match &cfg.data {
        Some(dir) => load_mnist_dir(dir).map_err(|e| e.to_string()),
        None => Ok(bundled()),
    }
}

/// The first `n` examples (all if `None`).
pub fn trim(d: &Dataset, n: Option<usize>) -> Dataset {
    match n {
        Some(n) if n < d.len() => d.take(n),
        _ => d.clone(),
    }
}

/// Checks, before any training, that neither set is empty, that the images have pixels, and,
/// where `needs` names a size, that the images have it (`who` names the example in errors).
pub fn check(
    who: &str,
    train: &Dataset,
    test: &Dataset,
    needs: Option<[usize; 2]>,
) -> Result<(), String> {
    for (set, d) in [("training", train), ("test", test)] {
        if d.is_empty() {
            return Err(format!("{who}: the {set} set has no examples"));
        }
    }
    let [_, h, w] = train.image_shape();
    if h == 0 || w == 0 {
        return Err(format!(
            "{who}: the images are {h}x{w} pixels: an image needs a pixel"
        ));
    }
    if let Some([nh, nw]) = needs
        && [h, w] != [nh, nw]
    {
        return Err(format!(
            "{who} needs {nh}x{nw} images (its model's first layer is that wide), found {h}x{w}"
        ));
    }
    Ok(())
}

/// The bundled MNIST subset (8,000 train / 2,000 test).
pub fn bundled_mnist() -> Split {
    mnist_10k()
}

/// Train and test sets trimmed to the sizes.
pub fn trimmed(split: &Split, sizes: &Sizes) -> (Dataset, Dataset) {
    (
        trim(&split.train, sizes.train),
        trim(&split.test, sizes.test),
    )
}

/// Flat inputs (`n x features`) of a dataset.
pub fn flat(d: &Dataset) -> Tensor {
    d.inputs().clone()
}

/// Standardizes features with the training set's per-feature mean and standard deviation
/// (features constant in training are centred only), applied to both sets.
pub fn standardize(train: &Tensor, test: &Tensor) -> (Tensor, Tensor) {
    let (n, d) = train.dims2();
    let mut mean = vec![0.0f64; d];
    let mut var = vec![0.0f64; d];
    for row in train.data().chunks(d) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x as f64 / n as f64;
        }
    }
    for row in train.data().chunks(d) {
        for ((v, &x), m) in var.iter_mut().zip(row).zip(&mean) {
            *v += (x as f64 - m).powi(2) / n as f64;
        }
    }
    let inv: Vec<f64> = var
        .iter()
        .map(|v| if *v > 1e-12 { 1.0 / v.sqrt() } else { 1.0 })
        .collect();
    let apply = |t: &Tensor| {
        let mut out = t.data().to_vec();
        for row in out.chunks_mut(d) {
            for ((x, m), s) in row.iter_mut().zip(&mean).zip(&inv) {
                *x = ((*x as f64 - m) * s) as f32;
            }
        }
        Tensor::from_vec(out, t.shape())
    };
    (apply(train), apply(test))
}
