//! Elementwise arithmetic with broadcasting, matrix products, transposes and reshapes.

use super::{GradSink, Op};
use crate::tape::Var;
use crate::tensor::{Tensor, broadcast_shape, sum_to_shape};

#[track_caller]
fn check_same_tape(op: &str, a: &Var<'_>, b: &Var<'_>) {
    assert!(
        std::ptr::eq(a.tape, b.tape),
        "{op}: operands were recorded on different tapes"
    );
}

#[track_caller]
fn binary<'t>(
    op_name: &str,
    a: Var<'t>,
    b: Var<'t>,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
    op: Op,
) -> Var<'t> {
    check_same_tape(op_name, &a, &b);
    let value = {
        let (va, vb) = (a.tape.value_of(a.id), b.tape.value_of(b.id));
        assert!(
            broadcast_shape(va.shape(), vb.shape()).is_some(),
            "{op_name}: shapes {:?} and {:?} do not broadcast",
            va.shape(),
            vb.shape()
        );
        f(&va, &vb)
    };
    a.tape.record(op, value, &[a.id, b.id])
}

// The arithmetic methods have the std::ops names on purpose; the operator traits below call them.
#[allow(clippy::should_implement_trait)]
impl<'t> Var<'t> {
    /// Elementwise `self + other` with NumPy broadcasting.
    #[track_caller]
    pub fn add(self, other: Var<'t>) -> Var<'t> {
        binary("add", self, other, Tensor::add, Op::Add(self.id, other.id))
    }

    /// Elementwise `self - other` with NumPy broadcasting.
    #[track_caller]
    pub fn sub(self, other: Var<'t>) -> Var<'t> {
        binary("sub", self, other, Tensor::sub, Op::Sub(self.id, other.id))
    }

    /// Elementwise `self * other` with NumPy broadcasting.
    #[track_caller]
    pub fn mul(self, other: Var<'t>) -> Var<'t> {
        binary("mul", self, other, Tensor::mul, Op::Mul(self.id, other.id))
    }

    /// Elementwise `self / other` with NumPy broadcasting.
    #[track_caller]
    pub fn div(self, other: Var<'t>) -> Var<'t> {
        binary("div", self, other, Tensor::div, Op::Div(self.id, other.id))
    }

    /// Every element times the constant `s`.
    pub fn scale(self, s: f32) -> Var<'t> {
        let v = self.tape.value_of(self.id).scale(s);
        self.tape.record(Op::Scale(self.id, s), v, &[self.id])
    }

    /// Every element plus the constant `s`.
    pub fn add_scalar(self, s: f32) -> Var<'t> {
        let v = self.tape.value_of(self.id).add_scalar(s);
        self.tape.record(Op::AddScalar(self.id), v, &[self.id])
    }

    /// The negation.
    pub fn neg(self) -> Var<'t> {
        self.scale(-1.0)
    }

    /// Matrix product `self * other`.
    #[track_caller]
    pub fn matmul(self, other: Var<'t>) -> Var<'t> {
        self.matmul_t(false, other, false)
    }

    /// Matrix product `op(self) * op(other)`, `op` transposing where the flag says so.
    #[track_caller]
    pub fn matmul_t(self, ta: bool, other: Var<'t>, tb: bool) -> Var<'t> {
        check_same_tape("matmul", &self, &other);
        let v = {
            let (a, b) = (self.tape.value_of(self.id), other.tape.value_of(other.id));
            a.matmul_t(ta, &b, tb)
        };
        self.tape.record(
            Op::MatMul {
                a: self.id,
                b: other.id,
                ta,
                tb,
            },
            v,
            &[self.id, other.id],
        )
    }

    /// The transpose of a matrix.
    #[track_caller]
    pub fn t(self) -> Var<'t> {
        let v = self.tape.value_of(self.id).t();
        self.tape.record(Op::Transpose(self.id), v, &[self.id])
    }

    /// The same elements under another shape.
    #[track_caller]
    pub fn reshape(self, shape: &[usize]) -> Var<'t> {
        let v = self.tape.value_of(self.id).reshape(shape);
        self.tape.record(Op::Reshape(self.id), v, &[self.id])
    }

    /// Flattens every dimension after the first: `(n, ...) -> (n, prod(...))`.
    #[track_caller]
    pub fn flatten(self) -> Var<'t> {
        let s = self.shape();
        assert!(!s.is_empty(), "flatten: a scalar has no batch dimension");
        let rest: usize = s[1..].iter().product();
        self.reshape(&[s[0], rest])
    }
}

macro_rules! var_binop {
    ($trait:ident, $method:ident, $call:ident) => {
        impl<'t> std::ops::$trait<Var<'t>> for Var<'t> {
            type Output = Var<'t>;
            #[track_caller]
            fn $method(self, rhs: Var<'t>) -> Var<'t> {
                Var::$call(self, rhs)
            }
        }
    };
}
var_binop!(Add, add, add);
var_binop!(Sub, sub, sub);
var_binop!(Mul, mul, mul);
var_binop!(Div, div, div);

impl<'t> std::ops::Neg for Var<'t> {
    type Output = Var<'t>;
    fn neg(self) -> Var<'t> {
        Var::neg(self)
    }
}

impl<'t> std::ops::Mul<f32> for Var<'t> {
    type Output = Var<'t>;
    fn mul(self, rhs: f32) -> Var<'t> {
        self.scale(rhs)
    }
}

impl<'t> std::ops::Add<f32> for Var<'t> {
    type Output = Var<'t>;
    fn add(self, rhs: f32) -> Var<'t> {
        self.add_scalar(rhs)
    }
}

pub(super) fn add_backward(a: usize, b: usize, g: &Tensor, sink: &mut GradSink<'_>, sign: f32) {
    if sink.needs(a) {
        let s = sink.value(a).shape().to_vec();
        sink.add(a, sum_to_shape(g, &s));
    }
    if sink.needs(b) {
        let s = sink.value(b).shape().to_vec();
        let gb = sum_to_shape(g, &s);
        sink.add(b, if sign == 1.0 { gb } else { gb.scale(sign) });
    }
}

pub(super) fn mul_backward(a: usize, b: usize, g: &Tensor, sink: &mut GradSink<'_>) {
    if sink.needs(a) {
        let ga = g.mul(sink.value(b));
        let s = sink.value(a).shape().to_vec();
        sink.add(a, sum_to_shape(&ga, &s));
    }
    if sink.needs(b) {
        let gb = g.mul(sink.value(a));
        let s = sink.value(b).shape().to_vec();
        sink.add(b, sum_to_shape(&gb, &s));
    }
}

pub(super) fn div_backward(a: usize, b: usize, out: &Tensor, g: &Tensor, sink: &mut GradSink<'_>) {
    // out = a / b: da = g / b, db = -g * out / b.
    if sink.needs(a) {
        let ga = g.div(sink.value(b));
        let s = sink.value(a).shape().to_vec();
        sink.add(a, sum_to_shape(&ga, &s));
    }
    if sink.needs(b) {
        let gb = g.mul(out).div(sink.value(b)).scale(-1.0);
        let s = sink.value(b).shape().to_vec();
        sink.add(b, sum_to_shape(&gb, &s));
    }
}

pub(super) fn matmul_backward(
    a: usize,
    b: usize,
    ta: bool,
    tb: bool,
    g: &Tensor,
    sink: &mut GradSink<'_>,
) {
    // C = op(A) op(B). dop(A) = G op(B)^T, dop(B) = op(A)^T G; transpose back where op did.
    if sink.needs(a) {
        let (va, vb) = (sink.value(a), sink.value(b));
        let ga = if ta {
            // A^T = d(op A) => dA = op(B) G^T
            vb.matmul_t(tb, g, true)
        } else {
            g.matmul_t(false, vb, !tb)
        };
        debug_assert_eq!(ga.shape(), va.shape());
        sink.add(a, ga);
    }
    if sink.needs(b) {
        let (va, vb) = (sink.value(a), sink.value(b));
        let gb = if tb {
            g.matmul_t(true, va, ta)
        } else {
            va.matmul_t(!ta, g, false)
        };
        debug_assert_eq!(gb.shape(), vb.shape());
        sink.add(b, gb);
    }
}
