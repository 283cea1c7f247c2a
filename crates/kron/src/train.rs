//! The training step of DESIGN's contract, and evaluation helpers.

use kron_autodiff::{Gradients, LossKind, ParamStore, Rng, Tape, Targets, Tensor, Var, in_pool};
use kron_layers::Module;
use kron_optim::{Captures, FisherKind, OptimError, Optimizer, StepReport, TapeCurvature, Wants};

/// What one training step returns.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The mini-batch loss before the step.
    pub loss: f32,
    /// The optimizer's report.
    pub report: StepReport,
}

/// One training step on a mini-batch.
///
/// 1. `opt.wants()` says which layers to capture and which Fisher to estimate;
/// 2. forward on a fresh tape in training mode (dropout masks from a stream derived from `rng`),
///    the loss, and backward;
/// 3. for the true Fisher, a loss on labels sampled from the model's own predictive
///    distribution (a second stream derived from `rng`) and a second backward on the same tape;
/// 4. `opt.step(params, grads, captures)`, or, when the optimizer asks for exact curvature
///    products ([`Wants::products`]), `opt.step_with_curvature` with the tape's forward-mode
///    Gauss-Newton products on the same batch;
/// 5. when the optimizer adapts its damping, the loss again on the same batch with the same
///    dropout masks, handed back through `opt.observe_reduction`.
///
/// `rng` advances by exactly one draw per step, so a run is fixed by its seed and resumes from a
/// checkpointed generator with the same bits. A gradient with NaN or infinity is an `Err` and
/// changes nothing.
pub fn train_step(
    model: &dyn Module,
    loss: LossKind,
    params: &mut ParamStore,
    opt: &mut dyn Optimizer,
    inputs: &Tensor,
    targets: &Targets,
    rng: &mut Rng,
) -> Result<StepOutput, OptimError> {
    // On a rayon worker, so that the kernels split their work from inside the pool.
    in_pool(|| {
        let wants = opt.wants();
        let step_rng = Rng::new(rng.next_u64());
        let dropout_rng = step_rng.fork(0);
        let mut sample_rng = step_rng.fork(1);
        let (loss_value, report) = if wants.products {
            // The tape stays alive through the step, for the optimizer's curvature products; it
            // reads a snapshot of the parameters (shared storage), so the step may write `params`.
            let snapshot = params.clone();
            let tape = Tape::new(&snapshot)
                .with_rng(dropout_rng.clone())
                .capturing(wants.capture.iter().copied());
            let (l, grads, captures) =
                record(&tape, model, loss, inputs, targets, &wants, &mut sample_rng);
            let rows = inputs.shape().first().copied().unwrap_or(0);
            let sub;
            let curvature_loss = match wants.product_examples {
                Some(m) if m > 0 && m < rows => {
                    // The products on a sub-batch: a forward pass of its own on the first `m`.
                    sub = Tape::new(&snapshot).with_rng(dropout_rng.clone());
                    let out = model.forward(sub.input(first_rows(inputs, m)));
                    loss.apply(out, &first_targets(targets, m))
                }
                _ => l,
            };
            let products = TapeCurvature {
                loss: curvature_loss,
            };
            let report = opt.step_with_curvature(params, &grads, &captures, &products)?;
            (l.value().item(), report)
        } else {
            let (loss_value, grads, captures) = {
                let tape = Tape::new(params)
                    .with_rng(dropout_rng.clone())
                    .capturing(wants.capture.iter().copied());
                let (l, grads, captures) =
                    record(&tape, model, loss, inputs, targets, &wants, &mut sample_rng);
                (l.value().item(), grads, captures)
            };
            (loss_value, opt.step(params, &grads, &captures)?)
        };
        if wants.reduction {
            let tape = Tape::new(params).with_rng(dropout_rng);
            let out = model.forward(tape.input(inputs.clone()));
            let after = loss.apply(out, targets).value().item();
            opt.observe_reduction(loss_value, after);
        }
        Ok(StepOutput {
            loss: loss_value,
            report,
        })
    })
}

/// The first `m` rows (examples) of a batch.
fn first_rows(x: &Tensor, m: usize) -> Tensor {
    let mut shape = x.shape().to_vec();
    let row: usize = shape[1..].iter().product();
    shape[0] = m;
    Tensor::from_vec(x.data()[..m * row].to_vec(), &shape)
}

/// The targets of the first `m` examples.
fn first_targets(t: &Targets, m: usize) -> Targets {
    match t {
        Targets::Classes(c) => Targets::Classes(c[..m].to_vec()),
        Targets::Values(v) => Targets::Values(first_rows(v, m)),
    }
}

/// Forward, loss and backward on `tape`, and the captures of the pass `wants` names.
fn record<'t>(
    tape: &'t Tape<'t>,
    model: &dyn Module,
    loss: LossKind,
    inputs: &Tensor,
    targets: &Targets,
    wants: &Wants,
    sample_rng: &mut Rng,
) -> (Var<'t>, Gradients, Captures) {
    let out = model.forward(tape.input(inputs.clone()));
    let l = loss.apply(out, targets);
    let mut grads = tape.backward(l);
    let captures: Captures = match wants.fisher {
        Some(FisherKind::Sampled) => {
            let sampled = loss.sample(&out.value(), sample_rng);
            let ls = loss.apply(out, &sampled);
            tape.backward_captures(ls).take_captures()
        }
        Some(FisherKind::Empirical) => grads.take_captures(),
        None => Captures::new(),
    };
    (l, grads, captures)
}

/// The model's outputs on `inputs` in eval mode (no dropout, nothing captured), computed in
/// batches of `batch` rows to bound memory. No rows give an empty tensor of shape `[0]`.
pub fn predict(model: &dyn Module, params: &ParamStore, inputs: &Tensor, batch: usize) -> Tensor {
    // On a rayon worker, as `train_step` runs.
    in_pool(|| {
        let n = inputs.dim(0);
        if n == 0 {
            return Tensor::zeros(&[0]);
        }
        let row: usize = inputs.shape()[1..].iter().product();
        let mut out = Vec::new();
        let mut out_shape = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + batch.max(1)).min(n);
            let mut shape = inputs.shape().to_vec();
            shape[0] = end - start;
            let x = Tensor::from_vec(inputs.data()[start * row..end * row].to_vec(), &shape);
            let tape = Tape::new(params).training(false);
            let y = model.forward(tape.input(x)).value();
            out_shape = y.shape().to_vec();
            out.extend_from_slice(y.data());
            start = end;
        }
        out_shape[0] = n;
        Tensor::from_vec(out, &out_shape)
    })
}

/// Mean loss and, for classifiers, accuracy of the model on a whole dataset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean loss over the examples.
    pub loss: f32,
    /// Fraction classified correctly (cross-entropy models only).
    pub accuracy: Option<f32>,
}

/// Evaluates the model on `inputs` against `targets` in eval mode, in batches of `batch`.
/// An empty dataset has no mean: its loss is NaN and its accuracy `None`.
pub fn evaluate(
    model: &dyn Module,
    params: &ParamStore,
    loss: LossKind,
    inputs: &Tensor,
    targets: &Targets,
    batch: usize,
) -> Evaluation {
    if inputs.dim(0) == 0 {
        return Evaluation {
            loss: f32::NAN,
            accuracy: None,
        };
    }
    let out = predict(model, params, inputs, batch);
    let l = loss.value(&out, targets);
    let accuracy = match targets {
        Targets::Classes(y) if loss == LossKind::CrossEntropy => {
            let pred = out.argmax_rows();
            let correct = pred.iter().zip(y).filter(|(p, t)| p == t).count();
            Some(correct as f32 / y.len().max(1) as f32)
        }
        _ => None,
    };
    Evaluation { loss: l, accuracy }
}
