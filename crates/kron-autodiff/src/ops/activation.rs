//! Pointwise activations, log-softmax and dropout.

use super::elementary::{exp, ln_1p_unit};
use super::{GradSink, Op};
use crate::tape::Var;
use crate::tensor::Tensor;

/// A pointwise function recorded on the tape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// `max(x, 0)`.
    Relu,
    /// `x` if positive, else `slope * x`.
    LeakyRelu(f32),
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic sigmoid `1 / (1 + e^-x)`.
    Sigmoid,
    /// `ln(1 + e^x)`, computed stably.
    Softplus,
    /// GELU, the tanh approximation `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (as in
    /// BERT and GPT-2).
    Gelu,
    /// `e^x`.
    Exp,
    /// Natural logarithm.
    Log,
    /// `x^2`.
    Square,
    /// Square root.
    Sqrt,
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2/pi)
const GELU_A: f32 = 0.044_715;

/// The logistic sigmoid of one value: `1 / (1 + e^-x)` for `x >= 0` and `e^x / (1 + e^x)`
/// below, so the exponential never overflows. Within 3 ulp of the exact value (tested); the
/// exponential is kron's vectorizable one, so loops of sigmoids run four values at a time.
pub fn sigmoid(x: f32) -> f32 {
    // One exponential, `e^-|x|`, serves both forms; choosing between them by a select rather
    // than a branch keeps inputs of either sign from mispredicting, and lets loops vectorize.
    let e = exp(-x.abs());
    let d = 1.0 + e;
    let (pos, neg) = (1.0 / d, e / d);
    f32::from_bits(std::hint::select_unpredictable(
        x >= 0.0,
        pos.to_bits(),
        neg.to_bits(),
    ))
}

/// `ln(1 + e^x)` without overflow: `max(x, 0) + ln(1 + e^-|x|)`, within 3 ulp of the exact
/// value (tested), in vectorizable arithmetic like [`sigmoid`].
pub fn softplus(x: f32) -> f32 {
    x.max(0.0) + ln_1p_unit(exp(-x.abs()))
}

impl Unary {
    /// Whether the derivative follows from the output alone, as `derivative(y, y)`: true for
    /// ReLU (`y > 0` exactly where `x > 0`), sigmoid and tanh. A layer fuses only these into
    /// one op ([`Var::linear_then`]), since the fused op keeps its output and not its input.
    pub fn derivative_from_output(self) -> bool {
        matches!(self, Unary::Relu | Unary::Sigmoid | Unary::Tanh)
    }

    /// The function's value at `x`.
    pub fn eval(self, x: f32) -> f32 {
        match self {
            Unary::Relu => x.max(0.0),
            Unary::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    s * x
                }
            }
            Unary::Tanh => x.tanh(),
            Unary::Sigmoid => sigmoid(x),
            Unary::Softplus => softplus(x),
            Unary::Gelu => 0.5 * x * (1.0 + (GELU_C * (x + GELU_A * x * x * x)).tanh()),
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Square => x * x,
            Unary::Sqrt => x.sqrt(),
        }
    }

    /// The derivative, given the input `x` and the output `y`.
    pub fn derivative(self, x: f32, y: f32) -> f32 {
        match self {
            Unary::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Unary::LeakyRelu(s) => {
                if x > 0.0 {
                    1.0
                } else {
                    s
                }
            }
            Unary::Tanh => 1.0 - y * y,
            Unary::Sigmoid => y * (1.0 - y),
            Unary::Softplus => sigmoid(x),
            Unary::Gelu => {
                let u = GELU_C * (x + GELU_A * x * x * x);
                let th = u.tanh();
                0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
            }
            Unary::Exp => y,
            Unary::Log => 1.0 / x,
            Unary::Square => 2.0 * x,
            Unary::Sqrt => 0.5 / y,
        }
    }
}

/// Runs `$body` with `$mk` bound to a closure returning `$u`, once per variant, so that every
/// elementwise loop written with `$mk()` is compiled for one function with its `match` folded
/// away (the values are those of [`Unary::eval`] and [`Unary::derivative`], bit for bit).
macro_rules! per_unary {
    ($u:expr, $mk:ident => $body:expr) => {
        match $u {
            Unary::Relu => {
                let $mk = || Unary::Relu;
                $body
            }
            Unary::LeakyRelu(s) => {
                let $mk = move || Unary::LeakyRelu(s);
                $body
            }
            Unary::Tanh => {
                let $mk = || Unary::Tanh;
                $body
            }
            Unary::Sigmoid => {
                let $mk = || Unary::Sigmoid;
                $body
            }
            Unary::Softplus => {
                let $mk = || Unary::Softplus;
                $body
            }
            Unary::Gelu => {
                let $mk = || Unary::Gelu;
                $body
            }
            Unary::Exp => {
                let $mk = || Unary::Exp;
                $body
            }
            Unary::Log => {
                let $mk = || Unary::Log;
                $body
            }
            Unary::Square => {
                let $mk = || Unary::Square;
                $body
            }
            Unary::Sqrt => {
                let $mk = || Unary::Sqrt;
                $body
            }
        }
    };
}

impl<'t> Var<'t> {
    /// Applies a pointwise function.
    pub fn unary(self, u: Unary) -> Var<'t> {
        let v = {
            let x = self.tape.value_of(self.id);
            per_unary!(u, f => x.map(move |x| f().eval(x)))
        };
        self.tape.record(Op::Unary(self.id, u), v, &[self.id])
    }

    /// `max(x, 0)`.
    pub fn relu(self) -> Var<'t> {
        self.unary(Unary::Relu)
    }

    /// Leaky ReLU with negative `slope`.
    pub fn leaky_relu(self, slope: f32) -> Var<'t> {
        self.unary(Unary::LeakyRelu(slope))
    }

    /// Hyperbolic tangent.
    pub fn tanh(self) -> Var<'t> {
        self.unary(Unary::Tanh)
    }

    /// Logistic sigmoid.
    pub fn sigmoid(self) -> Var<'t> {
        self.unary(Unary::Sigmoid)
    }

    /// Softplus `ln(1 + e^x)`.
    pub fn softplus(self) -> Var<'t> {
        self.unary(Unary::Softplus)
    }

    /// GELU (tanh approximation).
    pub fn gelu(self) -> Var<'t> {
        self.unary(Unary::Gelu)
    }

    /// `e^x`.
    pub fn exp(self) -> Var<'t> {
        self.unary(Unary::Exp)
    }

    /// Natural logarithm.
    pub fn ln(self) -> Var<'t> {
        self.unary(Unary::Log)
    }

    /// `x^2`.
    pub fn square(self) -> Var<'t> {
        self.unary(Unary::Square)
    }

    /// Square root.
    pub fn sqrt(self) -> Var<'t> {
        self.unary(Unary::Sqrt)
    }

    /// Log-softmax along the last axis, computed stably (max subtracted).
    #[track_caller]
    pub fn log_softmax(self) -> Var<'t> {
        let v = log_softmax_rows(&self.tape.value_of(self.id));
        self.tape.record(Op::LogSoftmax(self.id), v, &[self.id])
    }

    /// Inverted dropout: in training, zeroes each element with probability `p` and scales the
    /// rest by `1 / (1 - p)`, with a mask drawn from the tape's generator; in eval mode, the
    /// identity.
    ///
    /// # Panics
    /// If `p` is not in `[0, 1)`.
    #[track_caller]
    pub fn dropout(self, p: f32) -> Var<'t> {
        assert!(
            (0.0..1.0).contains(&p),
            "dropout: probability {p} not in [0, 1)"
        );
        if !self.tape.is_training() || p == 0.0 {
            return self;
        }
        let shape = self.shape();
        let keep = 1.0 / (1.0 - p);
        let n: usize = shape.iter().product();
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let mask_data: Vec<f32> = self.tape.draw_mask(rows, n / rows, |rng, count| {
            (0..count)
                .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
                .collect()
        });
        let mask = Tensor::from_vec(mask_data, &shape);
        let v = self.tape.value_of(self.id).mul(&mask);
        self.tape
            .record(Op::Dropout { x: self.id, mask }, v, &[self.id])
    }
}

/// Log-softmax of each row (last axis) of a tensor.
pub(crate) fn log_softmax_rows(x: &Tensor) -> Tensor {
    let c = *x.shape().last().expect("log_softmax: scalar input");
    let mut out = x.data().to_vec();
    for row in out.chunks_mut(c.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = row
            .iter()
            .map(|&v| ((v - m) as f64).exp())
            .sum::<f64>()
            .ln() as f32
            + m;
        for v in row.iter_mut() {
            *v -= lse;
        }
    }
    Tensor::from_vec(out, x.shape())
}

/// `s = act(s + bias)` in place, row by row (rows of `bias.len()`, or of `cols` without a
/// bias), split across threads when large: the values of adding the bias and then applying
/// `act`, bit for bit.
pub(super) fn bias_then_rows(s: &mut Tensor, bias: Option<&[f32]>, cols: usize, act: Unary) {
    use rayon::prelude::*;
    let data = s.data_mut();
    let large = data.len() >= crate::tensor::PAR_THRESHOLD;
    per_unary!(act, f => {
        let row = |row: &mut [f32]| match bias {
            Some(bias) => {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v = f().eval(*v + b);
                }
            }
            None => {
                for v in row.iter_mut() {
                    *v = f().eval(*v);
                }
            }
        };
        if large {
            data.par_chunks_mut(cols.max(1)).with_min_len(64).for_each(row);
        } else {
            data.chunks_mut(cols.max(1)).for_each(row);
        }
    })
}

/// The gradient `g` through `act` from its output `y` alone (`g * act'(y, y)`), for the
/// functions of [`Unary::derivative_from_output`]: the bits of [`unary_jvp`] given the input.
pub(super) fn through_output(act: Unary, y: &Tensor, g: &Tensor) -> Tensor {
    debug_assert!(act.derivative_from_output());
    unary_jvp(y, act, y, g)
}

pub(super) fn unary_backward(
    x: usize,
    u: Unary,
    out: &Tensor,
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    let gx = unary_jvp(sink.value(x), u, out, g);
    sink.add(x, gx);
}

/// `t * f'(x, y)` elementwise: the reverse rule (with `t` the output gradient) and the tangent
/// rule (with `t` the input tangent) of an elementwise function are the same product.
pub(super) fn unary_jvp(xv: &Tensor, u: Unary, out: &Tensor, t: &Tensor) -> Tensor {
    let (xd, yd, td) = (xv.data(), out.data(), t.data());
    let d = per_unary!(u, f => unary_grad(xd, yd, td, move |x, y| f().derivative(x, y)));
    Tensor::from_vec(d, xv.shape())
}

/// `g * f'(x, y)` elementwise, split across threads when large (same bits either way).
fn unary_grad(xd: &[f32], yd: &[f32], gd: &[f32], df: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let one = |((o, x), (y, g)): ((&mut f32, &f32), (&f32, &f32))| *o = g * df(*x, *y);
    let mut d = crate::alloc::scratch(xd.len());
    if xd.len() >= crate::tensor::PAR_THRESHOLD {
        d.par_iter_mut()
            .with_min_len(4096)
            .zip(xd.par_iter())
            .zip(yd.par_iter().zip(gd.par_iter()))
            .for_each(one);
    } else {
        d.iter_mut().zip(xd).zip(yd.iter().zip(gd)).for_each(one);
    }
    d
}

pub(super) fn log_softmax_backward(x: usize, out: &Tensor, g: &Tensor, sink: &mut GradSink<'_>) {
    // y = x - lse(x): dx = g - softmax(x) * sum(g).
    let c = *out.shape().last().unwrap();
    let mut gx = g.data().to_vec();
    for (row, y) in gx.chunks_mut(c.max(1)).zip(out.data().chunks(c.max(1))) {
        let s: f32 = row.iter().sum();
        for (r, &yv) in row.iter_mut().zip(y) {
            *r -= yv.exp() * s;
        }
    }
    sink.add(x, Tensor::from_vec(gx, out.shape()));
}

#[cfg(test)]
mod tests {
    use super::super::elementary::ulps;
    use super::{exp, sigmoid, softplus};

    #[test]
    fn sigmoid_has_the_bits_of_its_two_sided_definition() {
        let reference = |x: f32| {
            if x >= 0.0 {
                1.0 / (1.0 + exp(-x))
            } else {
                let e = exp(x);
                e / (1.0 + e)
            }
        };
        let special = [0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 104.0, -104.0];
        let inf = [f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN];
        let grid = (-4000..=4000).map(|i| i as f32 * 0.01);
        for x in special.into_iter().chain(inf).chain(grid) {
            assert_eq!(sigmoid(x).to_bits(), reference(x).to_bits(), "x = {x}");
        }
        assert!(sigmoid(f32::NAN).is_nan());
        assert_eq!(sigmoid(0.0), 0.5);
    }

    #[test]
    fn sigmoid_and_softplus_are_within_three_ulp_of_their_exact_values() {
        let sigmoid64 = |x: f64| 1.0 / (1.0 + (-x).exp());
        let softplus64 = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        let (mut worst_sigmoid, mut worst_softplus) = (0.0f64, 0.0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 * 5e-4 + 1e-5;
            worst_sigmoid = worst_sigmoid.max(ulps(sigmoid(x), sigmoid64(x as f64)));
            worst_softplus = worst_softplus.max(ulps(softplus(x), softplus64(x as f64)));
        }
        assert!(worst_sigmoid <= 3.0, "sigmoid: {worst_sigmoid} ulp");
        assert!(worst_softplus <= 3.0, "softplus: {worst_softplus} ulp");
        assert_eq!(softplus(f32::INFINITY), f32::INFINITY);
        assert_eq!(softplus(f32::NEG_INFINITY), 0.0);
        assert!(softplus(f32::NAN).is_nan());
        assert_eq!(softplus(-200.0), 0.0);
        assert_eq!(softplus(200.0), 200.0);
    }
}
