//! Finite-difference gradient checks, used by the tests of every kron crate.
//!
//! The checked function's output is reduced to a scalar with fixed random weights, so every
//! output element's gradient is exercised; the analytic gradient from [`Tape::backward`] is
//! compared element by element with central differences, with the loss accumulated in `f64`.
//!
//! Also the fixtures tests of several crates share: [`ScratchDir`], a temporary directory
//! removed on drop, and [`CountingAlloc`], a global allocator that measures peak memory.

mod counting_alloc;
mod scratch;

pub use counting_alloc::CountingAlloc;
pub use scratch::ScratchDir;

use crate::param::ParamStore;
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;

/// Step and tolerances of a gradient check: an element passes when
/// `|analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)`.
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Central-difference step.
    pub eps: f32,
    /// Relative tolerance.
    pub rtol: f32,
    /// Absolute tolerance.
    pub atol: f32,
    /// Seed of the output weights.
    pub seed: u64,
}

impl Default for GradCheck {
    /// `eps = 1e-2`, `rtol = 1e-2`, `atol = 1e-3`: suited to smooth `f32` functions of inputs
    /// of order one.
    fn default() -> Self {
        GradCheck {
            eps: 1e-2,
            rtol: 1e-2,
            atol: 1e-3,
            seed: 0x5eed,
        }
    }
}

/// The worst element of a passing check.
#[derive(Clone, Debug)]
pub struct GradCheckReport {
    /// Elements compared.
    pub checked: usize,
    /// Largest `|analytic - numeric|`.
    pub max_abs_err: f32,
}

/// Weighted scalar reduction `sum(out * r)` with fixed weights, accumulated in `f64`.
fn reduce(out: &Tensor, weights: &Tensor) -> f64 {
    out.data()
        .iter()
        .zip(weights.data())
        .map(|(&a, &w)| a as f64 * w as f64)
        .sum()
}

fn weights_for(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, 0.5, 1.5, &mut Rng::new(seed))
}

fn compare(
    what: &str,
    analytic: &Tensor,
    numeric: &[f64],
    cfg: &GradCheck,
    report: &mut GradCheckReport,
) -> Result<(), String> {
    for (j, (&a, &n)) in analytic.data().iter().zip(numeric).enumerate() {
        let n = n as f32;
        let err = (a - n).abs();
        report.checked += 1;
        report.max_abs_err = report.max_abs_err.max(err);
        if err > cfg.atol + cfg.rtol * a.abs().max(n.abs()) || !a.is_finite() {
            return Err(format!(
                "{what}, element {j}: analytic {a}, numeric {n} (|diff| {err})"
            ));
        }
    }
    Ok(())
}

/// Checks the gradients of `f` with respect to each of `inputs` against central differences.
///
/// `f` receives the inputs as differentiable leaves of a fresh tape and returns any tensor.
///
/// ```
/// use kron_autodiff::testing::{check_gradients, GradCheck};
/// use kron_autodiff::Tensor;
/// let x = Tensor::from_vec(vec![0.3, -1.2, 0.7], &[3]);
/// check_gradients(|v| v[0].tanh(), &[x], &GradCheck::default()).unwrap();
/// ```
pub fn check_gradients<F>(
    f: F,
    inputs: &[Tensor],
    cfg: &GradCheck,
) -> Result<GradCheckReport, String>
where
    F: for<'t> Fn(&[Var<'t>]) -> Var<'t>,
{
    let tape = Tape::without_params();
    let vars: Vec<Var<'_>> = inputs.iter().map(|x| tape.var(x.clone())).collect();
    let out = f(&vars);
    let weights = weights_for(&out.shape(), cfg.seed);
    let loss = out.mul(tape.input(weights.clone())).sum();
    let grads = tape.backward(loss);
    let eval = |xs: &[Tensor]| -> f64 {
        let t = Tape::without_params();
        let vs: Vec<Var<'_>> = xs.iter().map(|x| t.input(x.clone())).collect();
        reduce(&f(&vs).value(), &weights)
    };
    let mut report = GradCheckReport {
        checked: 0,
        max_abs_err: 0.0,
    };
    for (i, x) in inputs.iter().enumerate() {
        let zero = Tensor::zeros(x.shape());
        let analytic = grads.wrt(vars[i]).unwrap_or(&zero);
        let mut xs = inputs.to_vec();
        let mut numeric = Vec::with_capacity(x.numel());
        for j in 0..x.numel() {
            let orig = x.data()[j];
            xs[i].data_mut()[j] = orig + cfg.eps;
            let up = eval(&xs);
            xs[i].data_mut()[j] = orig - cfg.eps;
            let down = eval(&xs);
            xs[i].data_mut()[j] = orig;
            numeric.push((up - down) / (2.0 * cfg.eps as f64));
        }
        compare(&format!("input {i}"), analytic, &numeric, cfg, &mut report)?;
    }
    Ok(report)
}

/// Checks the gradients of `f` with respect to every parameter of `store` against central
/// differences. `f` runs a forward pass on the given tape (which reads `store`) and returns any
/// tensor.
pub fn check_param_gradients<F>(
    store: &ParamStore,
    f: F,
    cfg: &GradCheck,
) -> Result<GradCheckReport, String>
where
    F: for<'t> Fn(&'t Tape<'t>) -> Var<'t>,
{
    let tape = Tape::new(store);
    let out = f(&tape);
    let weights = weights_for(&out.shape(), cfg.seed);
    let loss = out.mul(tape.input(weights.clone())).sum();
    let grads = tape.backward(loss);
    let eval = |s: &ParamStore| -> f64 {
        let t = Tape::new(s);
        reduce(&f(&t).value(), &weights)
    };
    let mut report = GradCheckReport {
        checked: 0,
        max_abs_err: 0.0,
    };
    let mut probe = store.clone();
    for (id, name, value) in store.iter() {
        let zero = Tensor::zeros(value.shape());
        let analytic = grads.get(id).unwrap_or(&zero);
        let mut numeric = Vec::with_capacity(value.numel());
        for j in 0..value.numel() {
            let orig = value.data()[j];
            probe.get_mut(id).data_mut()[j] = orig + cfg.eps;
            let up = eval(&probe);
            probe.get_mut(id).data_mut()[j] = orig - cfg.eps;
            let down = eval(&probe);
            probe.get_mut(id).data_mut()[j] = orig;
            numeric.push((up - down) / (2.0 * cfg.eps as f64));
        }
        compare(name, analytic, &numeric, cfg, &mut report)?;
    }
    Ok(report)
}
