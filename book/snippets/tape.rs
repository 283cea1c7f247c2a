//! The code of the book's chapter "The tape". Each `ANCHOR` region is shown in the chapter;
//! `tests/tests/book_snippets.rs` runs every function here and checks what it returns.

// ANCHOR: imports
use kron::autodiff::{
    LayerCapture, LayerId, LossKind, ParamId, ParamStore, Rng, Tape, Tensor, Var,
};
// ANCHOR_END: imports

// ANCHOR: reverse_mode
/// `y = mean(tanh(x w)^2)` for a `2 x 3` input and a `3 x 1` parameter: the loss, its gradient
/// with respect to `w`, and the number of nodes the forward pass recorded.
pub fn reverse_mode() -> (f32, Tensor, usize) {
    let mut store = ParamStore::new();
    let w = store.add("w", Tensor::from_vec(vec![0.5, -1.0, 0.25], &[3, 1]));

    let tape = Tape::new(&store);
    let x = tape.input(Tensor::from_vec(
        vec![1.0, 2.0, 3.0, -1.0, 0.5, 2.0],
        &[2, 3],
    ));
    // Nodes: x, w, matmul, tanh, square, mean.
    let y = x.matmul(tape.param(w)).tanh().square().mean();
    let nodes = tape.len();

    let grads = tape.backward(y);
    (y.value().item(), grads.get(w).unwrap().clone(), nodes)
}
// ANCHOR_END: reverse_mode

// ANCHOR: mlp
/// A two-layer perceptron written directly against the tape: its parameters live in a
/// `ParamStore`, and each dense layer is registered as a capture site with a `LayerId`.
pub struct Mlp {
    pub w1: ParamId,
    pub b1: ParamId,
    pub w2: ParamId,
    pub b2: ParamId,
    pub fc1: LayerId,
    pub fc2: LayerId,
}

impl Mlp {
    pub fn new(store: &mut ParamStore, sizes: [usize; 3], rng: &mut Rng) -> Mlp {
        let [d_in, hidden, d_out] = sizes;
        Mlp {
            w1: store.add("fc1.weight", Tensor::randn(&[hidden, d_in], 0.0, 0.5, rng)),
            b1: store.add("fc1.bias", Tensor::randn(&[hidden], 0.0, 0.1, rng)),
            w2: store.add("fc2.weight", Tensor::randn(&[d_out, hidden], 0.0, 0.5, rng)),
            b2: store.add("fc2.bias", Tensor::randn(&[d_out], 0.0, 0.1, rng)),
            fc1: store.add_layer("fc1"),
            fc2: store.add_layer("fc2"),
        }
    }

    /// `fc2(tanh(fc1(x)))`: two fused dense ops, each a capture site.
    pub fn forward<'t>(&self, tape: &'t Tape<'t>, x: Tensor) -> Var<'t> {
        let (w1, b1) = (tape.param(self.w1), tape.param(self.b1));
        let (w2, b2) = (tape.param(self.w2), tape.param(self.b2));
        let h = tape.input(x).linear(w1, Some(b1), Some(self.fc1)).tanh();
        h.linear(w2, Some(b2), Some(self.fc2))
    }
}
// ANCHOR_END: mlp

/// A seeded batch: `batch` inputs of width `d_in` and a class label for each.
pub fn batch(batch: usize, d_in: usize, classes: usize, seed: u64) -> (Tensor, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let x = Tensor::randn(&[batch, d_in], 0.0, 1.0, &mut rng);
    let labels = (0..batch)
        .map(|_| rng.below(classes as u64) as usize)
        .collect();
    (x, labels)
}

/// The model, batch and captures of the chapter's dense example: 4 inputs, 5 hidden units,
/// 3 classes, a batch of 8.
pub struct DenseRun {
    pub store: ParamStore,
    pub mlp: Mlp,
    pub x: Tensor,
    pub labels: Vec<usize>,
    pub loss: f32,
    pub grads: kron::autodiff::Gradients,
}

// ANCHOR: dense_capture
pub fn dense_capture() -> DenseRun {
    let mut rng = Rng::new(42);
    let mut store = ParamStore::new();
    let mlp = Mlp::new(&mut store, [4, 5, 3], &mut rng);
    let (x, labels) = batch(8, 4, 3, 1);

    // Ask for the statistics of both layers; a tape with no request keeps nothing extra.
    let tape = Tape::new(&store).capturing([mlp.fc1, mlp.fc2]);
    let logits = mlp.forward(&tape, x.clone());
    let loss = logits.cross_entropy(&labels);
    let grads = tape.backward(loss);

    let fc2: &LayerCapture = grads.capture(mlp.fc2).unwrap();
    assert_eq!(fc2.a.shape(), &[8, 5]); // the layer's input, batch x in
    assert_eq!(fc2.g.shape(), &[8, 3]); // B * dL/ds, batch x out
    assert_eq!(fc2.a_factor().shape(), &[6, 6]); // A, with the homogeneous coordinate
    assert_eq!(fc2.g_factor().shape(), &[3, 3]); // G

    let loss = loss.value().item();
    DenseRun {
        store,
        mlp,
        x,
        labels,
        loss,
        grads,
    }
}
// ANCHOR_END: dense_capture

// ANCHOR: per_example
/// The gradient of each example's own loss with respect to `fc2`'s pre-activation, by brute
/// force: one tape per example, a batch of one, nothing shared.
pub fn per_example_g(run: &DenseRun) -> Vec<Tensor> {
    let (b, d) = run.x.dims2();
    (0..b)
        .map(|i| {
            let xi = Tensor::from_vec(run.x.data()[i * d..(i + 1) * d].to_vec(), &[1, d]);
            let tape = Tape::new(&run.store).capturing([run.mlp.fc2]);
            let loss_i = run
                .mlp
                .forward(&tape, xi)
                .cross_entropy(&run.labels[i..i + 1]);
            let grads = tape.backward(loss_i);
            // With a batch of one, g = 1 * dl_i/ds_i.
            grads.capture(run.mlp.fc2).unwrap().g.clone()
        })
        .collect()
}
// ANCHOR_END: per_example

/// The Kronecker product `a ⊗ b` of two matrices.
pub fn kron(a: &Tensor, b: &Tensor) -> Tensor {
    let (ar, ac) = a.dims2();
    let (br, bc) = b.dims2();
    let mut out = vec![0.0f32; ar * br * ac * bc];
    for i in 0..ar {
        for j in 0..ac {
            for k in 0..br {
                for l in 0..bc {
                    out[(i * br + k) * (ac * bc) + j * bc + l] =
                        a.data()[i * ac + j] * b.data()[k * bc + l];
                }
            }
        }
    }
    Tensor::from_vec(out, &[ar * br, ac * bc])
}

// ANCHOR: one_example_fisher
/// For a single example, the Fisher block of a dense layer is exactly `G ⊗ A`: the outer product
/// of the row-major `vec` of its weight gradient `g a_aug^T` with itself. Returns both sides.
pub fn one_example_fisher(run: &DenseRun) -> (Tensor, Tensor) {
    let d = run.x.dim(1);
    let tape = Tape::new(&run.store).capturing([run.mlp.fc2]);
    let x0 = Tensor::from_vec(run.x.data()[..d].to_vec(), &[1, d]);
    let loss = run.mlp.forward(&tape, x0).cross_entropy(&run.labels[..1]);
    let grads = tape.backward(loss);
    let cap = grads.capture(run.mlp.fc2).unwrap();

    // The gradient in the W_aug = [W | b] layout, flattened row by row: a column vector v.
    let v = cap.weight_grad();
    let v = v.reshape(&[v.numel(), 1]);
    let brute = v.matmul_t(false, &v, true); // v v^T
    let kfac = kron(&cap.g_factor(), &cap.a_factor()); // G ⊗ A
    (brute, kfac)
}
// ANCHOR_END: one_example_fisher

/// The conv example's parameters, captures and gradients.
pub struct ConvRun {
    pub weight: ParamId,
    pub bias: ParamId,
    pub grads: kron::autodiff::Gradients,
    pub layer: LayerId,
}

// ANCHOR: conv_capture
pub fn conv_capture() -> ConvRun {
    let mut rng = Rng::new(3);
    let mut store = ParamStore::new();
    // 2 input channels, 4 output channels, 3x3 kernel: weight 4 x 2 x 3 x 3.
    let weight = store.add(
        "conv.weight",
        Tensor::randn(&[4, 2, 3, 3], 0.0, 0.3, &mut rng),
    );
    let bias = store.add("conv.bias", Tensor::zeros(&[4]));
    let layer = store.add_layer("conv");

    // A batch of 2 images of 6x5 pixels, NCHW.
    let x = Tensor::randn(&[2, 2, 6, 5], 0.0, 1.0, &mut rng);
    let tape = Tape::new(&store).capturing([layer]);
    let (w, b) = (tape.param(weight), tape.param(bias));
    let s = tape.input(x).conv2d(w, Some(b), 1, 1, Some(layer)); // stride 1, padding 1
    let loss = s.tanh().square().mean();
    let grads = tape.backward(loss);

    let cap = grads.capture(layer).unwrap();
    assert_eq!((cap.batch, cap.locations), (2, 6 * 5)); // B and |T|
    assert_eq!(cap.a.shape(), &[2 * 30, 2 * 3 * 3]); // patches: (n, t) rows, (c, kh, kw) columns
    assert_eq!(cap.g.shape(), &[2 * 30, 4]); // one row of g per example and location
    let omega = cap.a_factor(); // 19 x 19, summed over locations
    assert_eq!(omega.data()[19 * 19 - 1], 30.0); // the corner: the 1 appended at each of |T| locations
    let gamma = cap.g_factor(); // 4 x 4, averaged over locations
    assert_eq!(gamma.shape(), &[4, 4]);

    ConvRun {
        weight,
        bias,
        grads,
        layer,
    }
}
// ANCHOR_END: conv_capture

/// What the true-Fisher example returns: `G` from the sampled pass and from the training pass,
/// and the number of tape nodes before and after the sampled loss was recorded.
pub struct FisherRun {
    pub g_true: Tensor,
    pub g_empirical: Tensor,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

// ANCHOR: true_fisher
pub fn true_fisher() -> FisherRun {
    let mut rng = Rng::new(11);
    let mut store = ParamStore::new();
    let w = store.add("out.weight", Tensor::randn(&[3, 6], 0.0, 0.3, &mut rng));
    let b = store.add("out.bias", Tensor::zeros(&[3]));
    let layer = store.add_layer("out");

    // A linear output layer trained with squared error: a unit-variance Gaussian model.
    let batch = 4096;
    let x = Tensor::randn(&[batch, 6], 0.0, 1.0, &mut rng);
    let targets = Tensor::randn(&[batch, 3], 2.0, 1.5, &mut rng);

    let tape = Tape::new(&store).capturing([layer]);
    let y = tape
        .input(x)
        .linear(tape.param(w), Some(tape.param(b)), Some(layer));
    let loss = y.squared_error(&targets);
    let grads = tape.backward(loss); // the training pass: parameter gradients
    let nodes_before = tape.len();

    // Labels drawn from the model's own predictive distribution, N(y, I).
    let mut label_rng = rng.fork(1);
    let sampled = LossKind::SquaredError.sample(&y.value(), &mut label_rng);
    let sampled_loss = LossKind::SquaredError.apply(y, &sampled);
    let fisher = tape.backward(sampled_loss); // same tape: no second forward pass

    FisherRun {
        g_true: fisher.capture(layer).unwrap().g_factor(),
        g_empirical: grads.capture(layer).unwrap().g_factor(),
        nodes_before,
        nodes_after: tape.len(),
    }
}
// ANCHOR_END: true_fisher

/// What the forward-mode example computes.
pub struct ProductsRun {
    /// `J d` of the logits for the direction on the output layer alone.
    pub jd: Tensor,
    /// The hidden activations, the direction's weight and bias blocks, for the check.
    pub hidden: Tensor,
    pub dw: Tensor,
    pub db: Tensor,
    /// The model's logits.
    pub logits: Tensor,
    /// The Gram matrix `d_i^T F d_j` of the two directions.
    pub gram: Vec<f64>,
    /// `jvp` of the loss, and `grad^T d` from the reverse pass.
    pub directional: f32,
    pub grad_dot: f64,
}

// ANCHOR: products
pub fn fisher_products() -> ProductsRun {
    let mut rng = Rng::new(5);
    let mut store = ParamStore::new();
    let mlp = Mlp::new(&mut store, [4, 6, 3], &mut rng);
    let (x, labels) = batch(32, 4, 3, 6);

    let tape = Tape::new(&store);
    let logits = mlp.forward(&tape, x);
    let loss = logits.cross_entropy(&labels);
    let grads = tape.backward(loss);

    // A direction in parameter space: one optional tensor per parameter, by index.
    let mut only_output: Vec<Option<Tensor>> = vec![None; store.len()];
    only_output[mlp.w2.index()] = Some(Tensor::randn(&[3, 6], 0.0, 1.0, &mut rng));
    only_output[mlp.b2.index()] = Some(Tensor::randn(&[3], 0.0, 1.0, &mut rng));
    let everywhere: Vec<Option<Tensor>> = store
        .iter()
        .map(|(_, _, p)| Some(Tensor::randn(p.shape(), 0.0, 1.0, &mut rng)))
        .collect();

    // J d: how the logits move along the direction, at the recorded point.
    let jd = tape.jvp(logits, &only_output);
    // d_i^T F d_j for both directions: F = J^T H J / B, the exact mini-batch Fisher.
    let gram = tape.ggn_gram(loss, &[&only_output, &everywhere]);
    // The directional derivative of the loss itself is grad^T d.
    let directional = tape.jvp(loss, &everywhere).item();
    // ANCHOR_END: products

    let grad_dot = store
        .ids()
        .map(|id| {
            let (g, d) = (
                grads.get(id).unwrap(),
                everywhere[id.index()].as_ref().unwrap(),
            );
            g.data()
                .iter()
                .zip(d.data())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
        })
        .sum();
    let hidden = {
        let t = Tape::new(&store);
        let (w1, b1) = (t.param(mlp.w1), t.param(mlp.b1));
        let (x, _) = batch(32, 4, 3, 6);
        t.input(x).linear(w1, Some(b1), None).tanh().value()
    };
    ProductsRun {
        jd,
        hidden,
        dw: only_output[mlp.w2.index()].clone().unwrap(),
        db: only_output[mlp.b2.index()].clone().unwrap(),
        logits: logits.value(),
        gram,
        directional,
        grad_dot,
    }
}
