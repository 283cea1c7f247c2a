//! The training step of DESIGN's contract, and evaluation helpers.

use kron_autodiff::{Gradients, LossKind, ParamStore, Rng, Tape, Targets, Tensor, Var, in_pool};
use kron_layers::Module;
use kron_optim::comm::all_reduce_buffers;
use kron_optim::{
    Captures, CurvatureProducts, FisherKind, OptimError, Optimizer, Shard, StepReport,
    TapeCurvature, Wants,
};

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
    step_on(None, model, loss, params, opt, inputs, targets, rng)
}

/// [`train_step`] on one process (`shard` `None`), or on one rank's shard of the global batch
/// `inputs` (see [`DataParallel::train_step`](crate::DataParallel::train_step)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_on(
    shard: Option<&Shard>,
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
        let shard = shard.filter(|s| s.is_distributed());
        // This rank's examples, and the tape that draws their dropout masks as one process
        // would on the whole batch.
        let (local_inputs, local_targets);
        let (inputs, targets) = match shard {
            Some(s) => {
                local_inputs = rows(inputs, s.first(), s.len());
                local_targets = target_rows(targets, s.first(), s.len());
                (&local_inputs, &local_targets)
            }
            None => (inputs, targets),
        };
        let first = shard.map_or(0, |s| s.first());
        let (loss_value, report) = if wants.products {
            // The tape stays alive through the step, for the optimizer's curvature products; it
            // reads a snapshot of the parameters (shared storage), so the step may write `params`.
            let snapshot = params.clone();
            let tape =
                tape_on(&snapshot, &dropout_rng, shard).capturing(wants.capture.iter().copied());
            let (l, grads, captures) = record(
                &tape,
                model,
                loss,
                inputs,
                targets,
                &wants,
                &mut sample_rng,
                first,
            );
            let (loss_value, grads) = reduced(shard, params, l.value().item(), grads)?;
            let rows_here = inputs.shape().first().copied().unwrap_or(0);
            // The products' examples: the first `m` of the global batch, of which this rank
            // holds the first `here` of its shard.
            let part = shard.map(|s| match wants.product_examples {
                Some(m) if m > 0 => s.prefix(m),
                _ => s.clone(),
            });
            let here = match (wants.product_examples, &part) {
                (_, Some(p)) => p.len(),
                (Some(m), None) if m > 0 && m < rows_here => m,
                _ => rows_here,
            };
            let sub;
            let curvature_loss = if here < rows_here {
                // The products on a sub-batch: a forward pass of its own on its first rows.
                sub = tape_on(&snapshot, &dropout_rng, shard);
                let out = model.forward(sub.input(rows(inputs, 0, here.max(1))));
                loss.apply(out, &target_rows(targets, 0, here.max(1)))
            } else {
                l
            };
            let products = TapeCurvature {
                loss: curvature_loss,
            };
            let report = match part {
                Some(part) => {
                    let reduced = ReducedProducts {
                        inner: &products,
                        part,
                    };
                    opt.step_with_curvature(params, &grads, &captures, &reduced)?
                }
                None => opt.step_with_curvature(params, &grads, &captures, &products)?,
            };
            (loss_value, report)
        } else {
            let (loss_value, grads, captures) = {
                let tape =
                    tape_on(params, &dropout_rng, shard).capturing(wants.capture.iter().copied());
                let (l, grads, captures) = record(
                    &tape,
                    model,
                    loss,
                    inputs,
                    targets,
                    &wants,
                    &mut sample_rng,
                    first,
                );
                (l.value().item(), grads, captures)
            };
            let (loss_value, grads) = reduced(shard, params, loss_value, grads)?;
            (loss_value, opt.step(params, &grads, &captures)?)
        };
        if wants.reduction {
            let tape = tape_on(params, &dropout_rng, shard);
            let out = model.forward(tape.input(inputs.clone()));
            let mut after = [loss.apply(out, targets).value().item() as f64];
            if let Some(s) = shard {
                after[0] *= s.weight();
                s.comm().all_reduce_f64(&mut after);
            }
            opt.observe_reduction(loss_value, after[0] as f32);
        }
        Ok(StepOutput {
            loss: loss_value,
            report,
        })
    })
}

/// A fresh tape over `store` in training mode, drawing dropout masks from `rng` (for the
/// shard's examples as on the whole batch).
fn tape_on<'s>(store: &'s ParamStore, rng: &Rng, shard: Option<&Shard>) -> Tape<'s> {
    let t = Tape::new(store).with_rng(rng.clone());
    match shard {
        Some(s) => t.with_shard(s.first(), s.global()),
        None => t,
    }
}

/// The global batch's mean loss and gradients from this rank's (the shards' means weighted by
/// their shares, summed over the ranks in one bucketed all-reduce); on one process, the local
/// ones. A gradient with NaN or infinity on any rank refuses the step on every rank.
fn reduced(
    shard: Option<&Shard>,
    params: &ParamStore,
    loss: f32,
    grads: Gradients,
) -> Result<(f32, Gradients), OptimError> {
    let Some(s) = shard else {
        return Ok((loss, grads));
    };
    let comm = s.comm();
    let (me, size) = (comm.rank(), comm.size());
    let w = s.weight();
    let bad = grads.first_non_finite();
    // One f64 buffer: the weighted loss, then a flag per rank.
    let mut scalars = vec![0.0f64; 1 + size];
    scalars[0] = loss as f64 * w;
    if bad.is_some() {
        scalars[1 + me] = 1.0;
    }
    let wf = w as f32;
    let mut bufs: Vec<Option<Vec<f32>>> = (0..params.len())
        .map(|i| {
            grads
                .get(kron_autodiff::ParamId(i as u32))
                .map(|g| g.data().iter().map(|x| x * wf).collect())
        })
        .collect();
    comm.all_reduce_f64(&mut scalars);
    let ranks: Vec<usize> = (0..size).filter(|&r| scalars[1 + r] != 0.0).collect();
    if !ranks.is_empty() {
        return Err(OptimError::NonFiniteGradientOnRanks {
            ranks,
            param: bad.map(|id| params.name(id).to_string()),
        });
    }
    {
        let mut views: Vec<&mut [f32]> = bufs
            .iter_mut()
            .flatten()
            .map(|v| v.as_mut_slice())
            .collect();
        all_reduce_buffers(comm, &mut views);
    }
    let reduced = bufs
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            b.map(|b| {
                let id = kron_autodiff::ParamId(i as u32);
                let shape = grads
                    .get(id)
                    .expect("a gradient where one was sent")
                    .shape();
                Tensor::from_vec(b, shape)
            })
        })
        .collect();
    Ok((scalars[0] as f32, Gradients::from_params(reduced)))
}

/// Curvature products on this rank's examples, reduced to the global batch's: each rank's
/// Gram matrix weighted by its share of the products' examples (`part`, the shard of them it
/// holds), summed over the ranks.
struct ReducedProducts<'a> {
    inner: &'a dyn CurvatureProducts,
    part: Shard,
}

impl CurvatureProducts for ReducedProducts<'_> {
    fn gram(&self, dirs: &[&kron_autodiff::Direction]) -> Vec<f64> {
        let mut g = if self.part.is_empty() {
            vec![0.0; dirs.len() * dirs.len()]
        } else {
            self.inner.gram(dirs)
        };
        self.part.mean_f64(&mut g);
        g
    }
}

/// Rows `first..first + len` (examples) of a batch.
pub(crate) fn rows(x: &Tensor, first: usize, len: usize) -> Tensor {
    let mut shape = x.shape().to_vec();
    let row: usize = shape[1..].iter().product();
    shape[0] = len;
    Tensor::from_vec(x.data()[first * row..(first + len) * row].to_vec(), &shape)
}

/// The targets of examples `first..first + len`.
pub(crate) fn target_rows(t: &Targets, first: usize, len: usize) -> Targets {
    match t {
        Targets::Classes(c) => Targets::Classes(c[first..first + len].to_vec()),
        Targets::Values(v) => Targets::Values(rows(v, first, len)),
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
    first: usize,
) -> (Var<'t>, Gradients, Captures) {
    let out = model.forward(tape.input(inputs.clone()));
    let l = loss.apply(out, targets);
    let mut grads = tape.backward(l);
    let captures: Captures = match wants.fisher {
        Some(FisherKind::Sampled) => {
            // Seeded with the sampled loss's gradient in the outputs: the sweep below it has
            // the bits a recorded loss's would, without the loss value nobody reads.
            let z = out.value();
            let sampled = loss.sample_shard(&z, sample_rng, first);
            let seed = loss.input_gradient(&z, &sampled);
            tape.backward_captures_from(out, seed).take_captures()
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
