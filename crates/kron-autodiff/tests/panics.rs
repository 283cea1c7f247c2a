//! Shape mistakes panic with a message that names the op and the shapes.

use kron_autodiff::{LossKind, ParamStore, Tape, Targets, Tensor};

#[test]
#[should_panic(
    expected = "linear: input [2, 3] does not fit weight [4, 5] (expected batch x in and out x in)"
)]
fn linear_input_and_weight() {
    let t = Tape::without_params();
    let x = t.input(Tensor::zeros(&[2, 3]));
    x.linear(t.input(Tensor::zeros(&[4, 5])), None, None);
}

#[test]
#[should_panic(expected = "linear: input [2, 3, 1] does not fit weight [4, 3]")]
fn linear_input_of_wrong_rank() {
    let t = Tape::without_params();
    let x = t.input(Tensor::zeros(&[2, 3, 1]));
    x.linear(t.input(Tensor::zeros(&[4, 3])), None, None);
}

#[test]
#[should_panic(expected = "linear: bias [5] does not fit weight [4, 3]")]
fn linear_bias() {
    let t = Tape::without_params();
    let x = t.input(Tensor::zeros(&[2, 3]));
    let w = t.input(Tensor::zeros(&[4, 3]));
    x.linear(w, Some(t.input(Tensor::zeros(&[5]))), None);
}

#[test]
#[should_panic(expected = "conv2d: input [1, 2, 5, 5] does not fit weight [3, 4, 3, 3]")]
fn conv2d_channels() {
    let t = Tape::without_params();
    let x = t.input(Tensor::zeros(&[1, 2, 5, 5]));
    x.conv2d(t.input(Tensor::zeros(&[3, 4, 3, 3])), None, 1, 0, None);
}

#[test]
#[should_panic(expected = "conv2d: input [2, 5, 5] does not fit weight [3, 2, 3, 3]")]
fn conv2d_input_not_nchw() {
    let t = Tape::without_params();
    let x = t.input(Tensor::zeros(&[2, 5, 5]));
    x.conv2d(t.input(Tensor::zeros(&[3, 2, 3, 3])), None, 1, 0, None);
}

#[test]
#[should_panic(expected = "conv2d: kernel 5x5 larger than padded input 3x4 (padding 0)")]
fn conv2d_kernel_too_large() {
    let t = Tape::without_params();
    let x = t.input(Tensor::zeros(&[1, 1, 3, 4]));
    x.conv2d(t.input(Tensor::zeros(&[1, 1, 5, 5])), None, 1, 0, None);
}

#[test]
#[should_panic(expected = "conv2d: bias [2] does not fit weight [3, 1, 3, 3]")]
fn conv2d_bias() {
    let t = Tape::without_params();
    let x = t.input(Tensor::zeros(&[1, 1, 5, 5]));
    let w = t.input(Tensor::zeros(&[3, 1, 3, 3]));
    x.conv2d(w, Some(t.input(Tensor::zeros(&[2]))), 1, 0, None);
}

#[test]
#[should_panic(expected = "matmul: inner dimensions differ: [2, 3] x [4, 5]")]
fn matmul_inner_dimensions() {
    let t = Tape::without_params();
    let a = t.input(Tensor::zeros(&[2, 3]));
    a.matmul(t.input(Tensor::zeros(&[4, 5])));
}

#[test]
#[should_panic(expected = "matmul: inner dimensions differ: [2, 3]^T x [4, 5]^T")]
fn matmul_inner_dimensions_with_transposes() {
    let t = Tape::without_params();
    let a = t.input(Tensor::zeros(&[2, 3]));
    a.matmul_t(true, t.input(Tensor::zeros(&[4, 5])), true);
}

#[test]
#[should_panic(expected = "add: shapes [2, 3] and [4] do not broadcast")]
fn add_broadcasting() {
    let t = Tape::without_params();
    let a = t.input(Tensor::zeros(&[2, 3]));
    let _ = a + t.input(Tensor::zeros(&[4]));
}

#[test]
#[should_panic(expected = "mul: shapes [3, 1, 2] and [4, 3] do not broadcast")]
fn mul_broadcasting() {
    let t = Tape::without_params();
    let a = t.input(Tensor::zeros(&[3, 1, 2]));
    a.mul(t.input(Tensor::zeros(&[4, 3])));
}

#[test]
#[should_panic(expected = "squared_error: output [2, 3] and target [3, 2] differ")]
fn squared_error_target() {
    let t = Tape::without_params();
    t.input(Tensor::zeros(&[2, 3]))
        .squared_error(&Tensor::zeros(&[3, 2]));
}

#[test]
#[should_panic(expected = "cross_entropy: label 3 out of range for 3 classes")]
fn cross_entropy_label() {
    let t = Tape::without_params();
    t.input(Tensor::zeros(&[2, 3])).cross_entropy(&[0, 3]);
}

#[test]
#[should_panic(expected = "Tape::backward: the loss must be a single value, found shape [2]")]
fn backward_from_a_vector() {
    let t = Tape::without_params();
    let x = t.var(Tensor::zeros(&[2]));
    t.backward(x.tanh());
}

#[test]
#[should_panic(
    expected = "Tape::backward_captures_from: a seed of shape [3] for an output of shape [2]"
)]
fn seeded_sweep_of_the_wrong_shape() {
    let t = Tape::without_params();
    let x = t.var(Tensor::zeros(&[2]));
    t.backward_captures_from(x.tanh(), Tensor::zeros(&[3]));
}

#[test]
#[should_panic(expected = "cross_entropy: label 3 out of range for 3 classes")]
fn input_gradient_label() {
    LossKind::CrossEntropy.input_gradient(&Tensor::zeros(&[2, 3]), &Targets::Classes(vec![0, 3]));
}

#[test]
#[should_panic(expected = "sigmoid_bce: output [2, 3] and target [3, 2] differ")]
fn input_gradient_target() {
    LossKind::SigmoidBce.input_gradient(
        &Tensor::zeros(&[2, 3]),
        &Targets::Values(Tensor::zeros(&[3, 2])),
    );
}

#[test]
#[should_panic(expected = "ParamStore::add: a parameter named \"w\" already exists")]
fn duplicate_parameter_name() {
    let mut s = ParamStore::new();
    s.add("w", Tensor::zeros(&[1]));
    s.add("w", Tensor::zeros(&[1]));
}
