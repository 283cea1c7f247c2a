//! A labelled classification dataset held in memory, and its train/test split.

use kron_autodiff::Tensor;

/// Examples with class labels: an `n x features` input matrix, one label per row.
///
/// Each row is an image flattened row-major from its `(channels, height, width)` shape
/// ([`image_shape`](Self::image_shape)); [`images_nchw`](Self::images_nchw) views the same
/// storage as `n x c x h x w` for convolutional nets. Bundled data ([`digits`](crate::digits),
/// [`mnist_10k`](crate::mnist_10k)) and files read by [`load_mnist_dir`](crate::load_mnist_dir)
/// all come out as this type, so a program can swap one for the other.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    inputs: Tensor,
    labels: Vec<usize>,
    num_classes: usize,
    image_shape: [usize; 3],
}

/// A dataset's training and test parts.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// The examples to train on.
    pub train: Dataset,
    /// The held-out examples to evaluate on.
    pub test: Dataset,
}

impl Dataset {
    /// A dataset from its inputs (`n x features`), labels (`n`, each below `num_classes`) and the
    /// `(channels, height, width)` shape each row flattens.
    ///
    /// # Panics
    /// If `inputs` is not a matrix, the number of labels differs from its rows, a label is not
    /// below `num_classes`, or `c * h * w` differs from its columns. (Readers of files check all
    /// of this first and return a [`DataError`](crate::DataError) instead.)
    #[track_caller]
    pub fn new(
        inputs: Tensor,
        labels: Vec<usize>,
        num_classes: usize,
        image_shape: [usize; 3],
    ) -> Self {
        assert_eq!(
            inputs.rank(),
            2,
            "Dataset::new: inputs must be n x features, found shape {:?}",
            inputs.shape()
        );
        let (n, features) = inputs.dims2();
        assert_eq!(
            labels.len(),
            n,
            "Dataset::new: {} labels for {n} inputs",
            labels.len()
        );
        assert_eq!(
            image_shape.iter().product::<usize>(),
            features,
            "Dataset::new: image shape {image_shape:?} does not have {features} features"
        );
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, l)| **l >= num_classes) {
            panic!("Dataset::new: label {l} of example {i} is not below {num_classes}");
        }
        Dataset {
            inputs,
            labels,
            num_classes,
            image_shape,
        }
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per example (`c * h * w`).
    pub fn features(&self) -> usize {
        self.image_shape.iter().product()
    }

    /// The number of classes; every label is below it.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The `(channels, height, width)` shape of one example.
    pub fn image_shape(&self) -> [usize; 3] {
        self.image_shape
    }

    /// The inputs, `n x features`.
    pub fn inputs(&self) -> &Tensor {
        &self.inputs
    }

    /// The labels, one per example.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The inputs viewed as images `n x c x h x w` (NCHW; no copy).
    pub fn images_nchw(&self) -> Tensor {
        let [c, h, w] = self.image_shape;
        self.inputs.reshape(&[self.len(), c, h, w])
    }

    /// How many examples each class has.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[l] += 1;
        }
        counts
    }

    /// The examples at `indices` (in that order, repeats allowed): inputs
    /// `indices.len() x features` and their labels.
    ///
    /// # Panics
    /// If an index is out of range.
    #[track_caller]
    pub fn batch(&self, indices: &[usize]) -> (Tensor, Vec<usize>) {
        let f = self.features();
        let src = self.inputs.data();
        let mut data = Vec::with_capacity(indices.len() * f);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            assert!(
                i < self.len(),
                "Dataset::batch: index {i} out of range for {} examples",
                self.len()
            );
            data.extend_from_slice(&src[i * f..(i + 1) * f]);
            labels.push(self.labels[i]);
        }
        (Tensor::from_vec(data, &[indices.len(), f]), labels)
    }

    /// Like [`batch`](Self::batch), with the inputs shaped `indices.len() x c x h x w`.
    #[track_caller]
    pub fn batch_nchw(&self, indices: &[usize]) -> (Tensor, Vec<usize>) {
        let (x, y) = self.batch(indices);
        let [c, h, w] = self.image_shape;
        (x.reshape(&[indices.len(), c, h, w]), y)
    }

    /// A new dataset of the examples at `indices` (in that order).
    ///
    /// # Panics
    /// If an index is out of range.
    #[track_caller]
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let (inputs, labels) = self.batch(indices);
        Dataset {
            inputs,
            labels,
            num_classes: self.num_classes,
            image_shape: self.image_shape,
        }
    }

    /// The first `n` examples (all of them if there are fewer), e.g. for a fast run.
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        let f = self.features();
        Dataset {
            inputs: Tensor::from_vec(self.inputs.data()[..n * f].to_vec(), &[n, f]),
            labels: self.labels[..n].to_vec(),
            num_classes: self.num_classes,
            image_shape: self.image_shape,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let x = Tensor::from_vec((0..12).map(|v| v as f32).collect(), &[3, 4]);
        Dataset::new(x, vec![2, 0, 1], 3, [1, 2, 2])
    }

    #[test]
    fn batch_gathers_rows_in_order() {
        let d = tiny();
        let (x, y) = d.batch(&[2, 0, 2]);
        assert_eq!(x.shape(), &[3, 4]);
        assert_eq!(&x.data()[..4], &[8.0, 9.0, 10.0, 11.0]);
        assert_eq!(&x.data()[4..8], &[0.0, 1.0, 2.0, 3.0]);
        assert_eq!(y, vec![1, 2, 1]);
        let (xi, _) = d.batch_nchw(&[1]);
        assert_eq!(xi.shape(), &[1, 1, 2, 2]);
    }

    #[test]
    fn views_and_counts() {
        let d = tiny();
        assert_eq!(d.images_nchw().shape(), &[3, 1, 2, 2]);
        assert!(d.images_nchw().shares_storage(d.inputs()));
        assert_eq!(d.class_counts(), vec![1, 1, 1]);
        assert_eq!(d.take(2).labels(), &[2, 0]);
        assert_eq!(d.take(10).len(), 3);
        assert_eq!(d.subset(&[1]).inputs().data(), &[4.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    #[should_panic(expected = "label 3 of example 0")]
    fn new_rejects_label_out_of_range() {
        Dataset::new(Tensor::zeros(&[1, 1]), vec![3], 3, [1, 1, 1]);
    }
}
