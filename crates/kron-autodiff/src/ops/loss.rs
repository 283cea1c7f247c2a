//! Losses normalized as kron's conventions state, and label sampling from the model's own
//! predictive distribution for the true-Fisher backward pass.
//!
//! * cross-entropy: batch mean of `-log softmax(z)[y]`;
//! * squared error: batch mean of `1/2 sum_j (y_j - t_j)^2`;
//! * sigmoid binary cross-entropy: batch mean of the per-example sum over outputs.
//!
//! With these, the sampled Fisher of a unit-variance Gaussian model gives `G = I` at a linear
//! output layer.

use serde::{Deserialize, Serialize};

use super::activation::{log_softmax_rows, sigmoid, softplus};
use super::{GradSink, Op};
use crate::rng::Rng;
use crate::tape::Var;
use crate::tensor::{Tensor, zip_slices};

/// Which loss a model is trained with; it knows its predictive distribution, so it can draw the
/// labels of the true-Fisher pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossKind {
    /// Softmax cross-entropy with integer labels (categorical model).
    CrossEntropy,
    /// Squared error `1/2 |y - t|^2` (unit-variance Gaussian model).
    SquaredError,
    /// Sigmoid binary cross-entropy on logits (Bernoulli model).
    SigmoidBce,
}

/// Training targets: class labels or real values.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// One class index per example.
    Classes(Vec<usize>),
    /// A tensor shaped like the model's output.
    Values(Tensor),
}

impl LossKind {
    /// Records this loss of `output` against `targets`.
    ///
    /// # Panics
    /// If the targets are of the wrong kind or shape.
    #[track_caller]
    pub fn apply<'t>(self, output: Var<'t>, targets: &Targets) -> Var<'t> {
        match (self, targets) {
            (LossKind::CrossEntropy, Targets::Classes(y)) => output.cross_entropy(y),
            (LossKind::SquaredError, Targets::Values(t)) => output.squared_error(t),
            (LossKind::SigmoidBce, Targets::Values(t)) => output.sigmoid_bce(t),
            (k, t) => wrong_targets(k, t),
        }
    }

    /// The gradient in `output` of the batch-mean loss against `targets`: what the loss node
    /// of [`LossKind::apply`] passes down in a backward sweep, with the same bits, without
    /// computing the loss value. Seeding
    /// [`Tape::backward_captures_from`](crate::Tape::backward_captures_from) with it makes the
    /// true-Fisher pass.
    ///
    /// # Panics
    /// As [`LossKind::apply`]: the wrong kind of targets, or targets that do not fit `output`.
    #[track_caller]
    pub fn input_gradient(self, output: &Tensor, targets: &Targets) -> Tensor {
        // The backward's scale: the upstream gradient 1 over the batch size.
        let s = 1.0f32 / output.dim(0).max(1) as f32;
        match (self, targets) {
            (LossKind::CrossEntropy, Targets::Classes(y)) => {
                let (b, c) = output.dims2();
                check_labels(y, b, c, output.shape());
                let probs = log_softmax_rows(output).map(f32::exp);
                cross_entropy_input_grad(y, &probs, s)
            }
            (LossKind::SquaredError, Targets::Values(t)) => {
                check_same_shape("squared_error", output.shape(), t.shape());
                squared_error_input_grad(output, t, s)
            }
            (LossKind::SigmoidBce, Targets::Values(t)) => {
                check_same_shape("sigmoid_bce", output.shape(), t.shape());
                sigmoid_bce_input_grad(output, t, s)
            }
            (k, t) => wrong_targets(k, t),
        }
    }

    /// Draws one target per example from the model's predictive distribution at `output`
    /// (categorical of the softmax, Gaussian of unit variance around the output, or Bernoulli
    /// of the sigmoid).
    pub fn sample(self, output: &Tensor, rng: &mut Rng) -> Targets {
        match self {
            LossKind::CrossEntropy => Targets::Classes(sample_categorical(output, rng)),
            LossKind::SquaredError => Targets::Values(sample_gaussian(output, rng)),
            LossKind::SigmoidBce => Targets::Values(sample_bernoulli(output, rng)),
        }
    }

    /// [`LossKind::sample`] for the examples from `first` of a global batch (one rank's
    /// shard in data-parallel training): `rng` is the generator one process would sample the
    /// whole global batch from, and each example gets the label it would get there. The
    /// generator skips the draws of the examples before `first` (one `u64` per example for
    /// classes, one per output for Bernoulli, two per output for Gaussian draws).
    pub fn sample_shard(self, output: &Tensor, rng: &mut Rng, first: usize) -> Targets {
        let per_row = output.shape()[1..].iter().product::<usize>();
        let draws = match self {
            LossKind::CrossEntropy => 1,
            LossKind::SquaredError => 2 * per_row,
            LossKind::SigmoidBce => per_row,
        };
        rng.discard((first * draws) as u64);
        self.sample(output, rng)
    }

    /// The loss value of `output` against `targets`, without a tape.
    pub fn value(self, output: &Tensor, targets: &Targets) -> f32 {
        let tape = crate::Tape::without_params();
        let o = tape.input(output.clone());
        self.apply(o, targets).value().item()
    }
}

/// One class per row of `logits`, drawn from its softmax.
pub fn sample_categorical(logits: &Tensor, rng: &mut Rng) -> Vec<usize> {
    let (_, c) = logits.dims2();
    let lp = log_softmax_rows(logits);
    lp.data()
        .chunks(c)
        .map(|row| {
            let u = rng.next_f64();
            let mut acc = 0.0f64;
            for (k, &l) in row.iter().enumerate() {
                acc += (l as f64).exp();
                if u < acc {
                    return k;
                }
            }
            c - 1
        })
        .collect()
}

/// `output + N(0, 1)` noise: draws from the unit-variance Gaussian model.
pub fn sample_gaussian(output: &Tensor, rng: &mut Rng) -> Tensor {
    let d = output.data().iter().map(|&m| m + rng.normal()).collect();
    Tensor::from_vec(d, output.shape())
}

/// 0/1 draws with probabilities `sigmoid(logits)`.
///
/// The uniform draws come off the generator in order, one per element; comparing each with its
/// probability, where the time goes (an exponential per element), runs on rayon's threads, so
/// the result is the same whatever the number of threads.
pub fn sample_bernoulli(logits: &Tensor, rng: &mut Rng) -> Tensor {
    use rayon::prelude::*;
    let mut d: Vec<f32> = logits.data().iter().map(|_| rng.next_f32()).collect();
    d.par_iter_mut()
        .with_min_len(1 << 14)
        .zip(logits.data().par_iter())
        .for_each(|(u, &z)| *u = if *u < sigmoid(z) { 1.0 } else { 0.0 });
    Tensor::from_vec(d, logits.shape())
}

#[track_caller]
fn wrong_targets(k: LossKind, t: &Targets) -> ! {
    panic!(
        "{k:?}: wrong kind of targets ({})",
        match t {
            Targets::Classes(_) => "class labels",
            Targets::Values(_) => "values",
        }
    )
}

/// Panics unless there is one label per row of `b x c` logits (`shape`), each below `c`.
#[track_caller]
fn check_labels(labels: &[usize], b: usize, c: usize, shape: &[usize]) {
    assert_eq!(
        labels.len(),
        b,
        "cross_entropy: {} labels for logits {shape:?}",
        labels.len(),
    );
    if let Some(&y) = labels.iter().find(|&&y| y >= c) {
        panic!("cross_entropy: label {y} out of range for {c} classes");
    }
}

#[track_caller]
fn check_same_shape(op: &str, a: &[usize], b: &[usize]) {
    assert!(
        a == b && !a.is_empty(),
        "{op}: output {a:?} and target {b:?} differ (or have no batch dimension)"
    );
}

impl<'t> Var<'t> {
    /// Softmax cross-entropy of `batch x classes` logits with integer labels, batch mean.
    ///
    /// # Panics
    /// If the labels do not match the batch or a label is out of range.
    #[track_caller]
    pub fn cross_entropy(self, labels: &[usize]) -> Var<'t> {
        let z = self.value();
        let (b, c) = z.dims2();
        check_labels(labels, b, c, z.shape());
        let lp = log_softmax_rows(&z);
        let mut loss = 0.0f64;
        for (i, &y) in labels.iter().enumerate() {
            loss -= lp.data()[i * c + y] as f64;
        }
        let probs = lp.map(f32::exp);
        self.tape.record(
            Op::CrossEntropy {
                logits: self.id,
                labels: labels.to_vec(),
                probs,
            },
            Tensor::scalar((loss / b.max(1) as f64) as f32),
            &[self.id],
        )
    }

    /// Squared error `1/2 sum_j (y_j - t_j)^2`, batch mean.
    #[track_caller]
    pub fn squared_error(self, target: &Tensor) -> Var<'t> {
        let y = self.value();
        check_same_shape("squared_error", y.shape(), target.shape());
        let b = y.dim(0).max(1);
        let s: f64 = y
            .data()
            .iter()
            .zip(target.data())
            .map(|(&a, &t)| {
                let d = (a - t) as f64;
                d * d
            })
            .sum();
        self.tape.record(
            Op::SquaredError {
                pred: self.id,
                target: target.clone(),
            },
            Tensor::scalar((0.5 * s / b as f64) as f32),
            &[self.id],
        )
    }

    /// Sigmoid binary cross-entropy of logits against targets in `[0, 1]`: the per-example sum
    /// over outputs, batch mean. Computed stably as `softplus(z) - t z`.
    #[track_caller]
    pub fn sigmoid_bce(self, target: &Tensor) -> Var<'t> {
        let z = self.value();
        check_same_shape("sigmoid_bce", z.shape(), target.shape());
        let b = z.dim(0).max(1);
        // The terms in parallel, their sum in order (the same bits for any thread count).
        let terms = zip_slices(z.data(), target.data(), |z, t| softplus(z) - t * z);
        let s: f64 = terms.iter().map(|&v| v as f64).sum();
        self.tape.record(
            Op::SigmoidBce {
                logits: self.id,
                target: target.clone(),
            },
            Tensor::scalar((s / b as f64) as f32),
            &[self.id],
        )
    }
}

/// `s (p - onehot(y))`: the gradient of the summed cross-entropy in the logits, times `s`.
pub(super) fn cross_entropy_input_grad(labels: &[usize], probs: &Tensor, s: f32) -> Tensor {
    let c = probs.dims2().1;
    let mut d = probs.data().to_vec();
    for (i, &y) in labels.iter().enumerate() {
        d[i * c + y] -= 1.0;
    }
    for v in &mut d {
        *v *= s;
    }
    Tensor::from_vec(d, probs.shape())
}

/// `s (y - t)`: the gradient of the summed squared error in the prediction, times `s`.
pub(super) fn squared_error_input_grad(y: &Tensor, target: &Tensor, s: f32) -> Tensor {
    y.zip_map(target, |a, t| (a - t) * s)
}

/// `s (sigmoid(z) - t)`: the gradient of the summed binary cross-entropy in the logits,
/// times `s`.
pub(super) fn sigmoid_bce_input_grad(z: &Tensor, target: &Tensor, s: f32) -> Tensor {
    z.zip_map(target, |z, t| (sigmoid(z) - t) * s)
}

pub(super) fn cross_entropy_backward(
    logits: usize,
    labels: &[usize],
    probs: &Tensor,
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    let s = g.item() / probs.dims2().0.max(1) as f32;
    sink.add(logits, cross_entropy_input_grad(labels, probs, s));
}

pub(super) fn squared_error_backward(
    pred: usize,
    target: &Tensor,
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    let y = sink.value(pred);
    let s = g.item() / y.dim(0).max(1) as f32;
    let d = squared_error_input_grad(y, target, s);
    sink.add(pred, d);
}

pub(super) fn sigmoid_bce_backward(
    logits: usize,
    target: &Tensor,
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    let z = sink.value(logits);
    let s = g.item() / z.dim(0).max(1) as f32;
    let d = sigmoid_bce_input_grad(z, target, s);
    sink.add(logits, d);
}
