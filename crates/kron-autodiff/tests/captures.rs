//! Curvature capture: the `(a, g)` the dense and conv ops keep, checked against per-example
//! gradients from one-example tapes, brute-force Kronecker factors, the second (sampled-label)
//! backward, and the KFAC identities that follow from kron's conventions (MATH.md).

mod common;

use common::*;
use kron_autodiff::{
    Gradients, LayerCapture, LayerId, LossKind, ParamId, ParamStore, Rng, Tape, Targets, Tensor,
    Var,
};

const KINDS: [LossKind; 3] = [
    LossKind::CrossEntropy,
    LossKind::SquaredError,
    LossKind::SigmoidBce,
];

/// Targets of `kind` for outputs of shape `batch x out`.
fn targets_for(kind: LossKind, batch: usize, out: usize, seed: u64) -> Targets {
    match kind {
        LossKind::CrossEntropy => {
            let mut rng = Rng::new(seed);
            Targets::Classes((0..batch).map(|_| rng.below(out as u64) as usize).collect())
        }
        LossKind::SquaredError => Targets::Values(randn(&[batch, out], seed)),
        LossKind::SigmoidBce => Targets::Values(uniform(&[batch, out], 0.0, 1.0, seed)),
    }
}

/// The targets of example `i` alone.
fn target_of(t: &Targets, i: usize) -> Targets {
    match t {
        Targets::Classes(c) => Targets::Classes(vec![c[i]]),
        Targets::Values(v) => Targets::Values(example(v, i)),
    }
}

/// `sum_t g_it a_aug_it^T` for example `i`, by explicit loops in `f64` (the per-example weight
/// gradient in the `W_aug` layout that the capture implies).
fn per_example_from_capture(c: &LayerCapture, i: usize) -> Tensor {
    let (d, o) = (c.a.dim(1), c.g.dim(1));
    let n = d + usize::from(c.has_bias);
    let mut out = vec![0.0f64; o * n];
    for r in i * c.locations..(i + 1) * c.locations {
        for p in 0..o {
            let gv = c.g.data()[r * o + p] as f64;
            for q in 0..d {
                out[p * n + q] += gv * c.a.data()[r * d + q] as f64;
            }
            if c.has_bias {
                out[p * n + d] += gv;
            }
        }
    }
    Tensor::from_vec(out.into_iter().map(|v| v as f32).collect(), &[o, n])
}

/// `a_aug` rows of a capture: each row of `a` with a 1 appended when the layer has a bias.
fn a_aug_rows(c: &LayerCapture) -> Vec<Vec<f64>> {
    c.a.data()
        .chunks(c.a.dim(1))
        .map(|r| {
            let mut v: Vec<f64> = r.iter().map(|&x| x as f64).collect();
            if c.has_bias {
                v.push(1.0);
            }
            v
        })
        .collect()
}

/// `(1/scale) sum_rows v v^T` by explicit loops in `f64`.
fn second_moment(rows: &[Vec<f64>], scale: f64) -> Tensor {
    let n = rows[0].len();
    let mut m = vec![0.0f64; n * n];
    for r in rows {
        for i in 0..n {
            for j in 0..n {
                m[i * n + j] += r[i] * r[j];
            }
        }
    }
    Tensor::from_vec(m.into_iter().map(|v| (v / scale) as f32).collect(), &[n, n])
}

/// Asserts two captures are bit-for-bit the same.
#[track_caller]
fn assert_same_capture(what: &str, x: &LayerCapture, y: &LayerCapture) {
    assert_eq!(x.layer, y.layer, "{what}");
    assert_eq!(x.has_bias, y.has_bias, "{what}");
    assert_eq!(x.batch, y.batch, "{what}");
    assert_eq!(x.locations, y.locations, "{what}");
    assert_bits_eq(&format!("{what}: a"), &x.a, &y.a);
    assert_bits_eq(&format!("{what}: g"), &x.g, &y.g);
}

#[track_caller]
fn assert_same_grads(what: &str, store: &ParamStore, x: &Gradients, y: &Gradients) {
    for id in store.ids() {
        match (x.get(id), y.get(id)) {
            (Some(a), Some(b)) => assert_bits_eq(&format!("{what}: {}", store.name(id)), a, b),
            (None, None) => {}
            _ => panic!("{what}: {} present in one only", store.name(id)),
        }
    }
    assert_eq!(
        x.captures().keys().collect::<Vec<_>>(),
        y.captures().keys().collect::<Vec<_>>(),
        "{what}: captured layers differ"
    );
    for (l, c) in x.captures() {
        assert_same_capture(&format!("{what}: layer {l:?}"), c, &y.captures()[l]);
    }
}

// ---------------------------------------------------------------------------------------------
// Two tiny nets built directly on a ParamStore.

/// fc1 (3 -> 4, bias) -> tanh -> fc2 (4 -> 3, no bias).
struct DenseNet {
    store: ParamStore,
    w1: ParamId,
    b1: ParamId,
    w2: ParamId,
    l1: LayerId,
    l2: LayerId,
}

impl DenseNet {
    fn new() -> Self {
        let mut store = ParamStore::new();
        let l1 = store.add_layer("fc1");
        let w1 = store.add("fc1.weight", randn(&[4, 3], 1).scale(0.7));
        let b1 = store.add("fc1.bias", randn(&[4], 2).scale(0.3));
        let l2 = store.add_layer("fc2");
        let w2 = store.add("fc2.weight", randn(&[3, 4], 3).scale(0.7));
        DenseNet {
            store,
            w1,
            b1,
            w2,
            l1,
            l2,
        }
    }

    /// The inputs each layer saw and the output; with `probes`, a zero leaf is added to each
    /// layer's output so that `dL/ds` can be read back with `Gradients::wrt`.
    fn forward<'t>(&self, t: &'t Tape<'t>, x: &Tensor, probes: bool) -> Fwd<'t> {
        let probe = |s: Var<'t>, list: &mut Vec<Var<'t>>| {
            if !probes {
                return s;
            }
            let p = t.var(Tensor::zeros(&s.shape()));
            list.push(p);
            s.add(p)
        };
        let mut ps = Vec::new();
        let x = t.input(x.clone());
        let s1 = x.linear(t.param(self.w1), Some(t.param(self.b1)), Some(self.l1));
        let h = probe(s1, &mut ps).tanh();
        let s2 = h.linear(t.param(self.w2), None, Some(self.l2));
        let out = probe(s2, &mut ps);
        Fwd {
            inputs: vec![x, h],
            probes: ps,
            out,
        }
    }
}

struct Fwd<'t> {
    inputs: Vec<Var<'t>>,
    probes: Vec<Var<'t>>,
    out: Var<'t>,
}

/// conv1 (2 -> 3, k3, stride 1, pad 1, bias) -> relu -> conv2 (3 -> 2, k3, stride 2, pad 1, no
/// bias) -> flatten -> fc (12 -> 3, bias), on 5 x 4 images.
struct ConvNet {
    store: ParamStore,
    cw1: ParamId,
    cb1: ParamId,
    cw2: ParamId,
    fw: ParamId,
    fb: ParamId,
    c1: LayerId,
    c2: LayerId,
    f: LayerId,
}

impl ConvNet {
    fn new() -> Self {
        let mut store = ParamStore::new();
        let c1 = store.add_layer("conv1");
        let cw1 = store.add("conv1.weight", randn(&[3, 2, 3, 3], 11).scale(0.4));
        let cb1 = store.add("conv1.bias", randn(&[3], 12).scale(0.2));
        let c2 = store.add_layer("conv2");
        let cw2 = store.add("conv2.weight", randn(&[2, 3, 3, 3], 13).scale(0.4));
        let f = store.add_layer("fc");
        let fw = store.add("fc.weight", randn(&[3, 12], 14).scale(0.4));
        let fb = store.add("fc.bias", randn(&[3], 15).scale(0.2));
        ConvNet {
            store,
            cw1,
            cb1,
            cw2,
            fw,
            fb,
            c1,
            c2,
            f,
        }
    }

    fn forward<'t>(&self, t: &'t Tape<'t>, x: &Tensor, probes: bool) -> Fwd<'t> {
        let probe = |s: Var<'t>, list: &mut Vec<Var<'t>>| {
            if !probes {
                return s;
            }
            let p = t.var(Tensor::zeros(&s.shape()));
            list.push(p);
            s.add(p)
        };
        let mut ps = Vec::new();
        let x = t.input(x.clone());
        let s1 = x.conv2d(
            t.param(self.cw1),
            Some(t.param(self.cb1)),
            1,
            1,
            Some(self.c1),
        );
        let h1 = probe(s1, &mut ps).relu();
        let s2 = h1.conv2d(t.param(self.cw2), None, 2, 1, Some(self.c2));
        let h2 = probe(s2, &mut ps).tanh().flatten();
        let s3 = h2.linear(t.param(self.fw), Some(t.param(self.fb)), Some(self.f));
        let out = probe(s3, &mut ps);
        Fwd {
            inputs: vec![x, h1, h2],
            probes: ps,
            out,
        }
    }
}

const B: usize = 4;

fn dense_input() -> Tensor {
    randn(&[B, 3], 100)
}

fn conv_input() -> Tensor {
    randn(&[B, 2, 5, 4], 101)
}

/// A weight gradient as `out x rest` (a conv weight's `(c_in, kh, kw)` flattened).
fn as_matrix(w: &Tensor) -> Tensor {
    w.reshape(&[w.dim(0), w.numel() / w.dim(0)])
}

// ---------------------------------------------------------------------------------------------
// (a), (b): per-example gradients and their mean.

/// For each captured layer `(layer, weight, bias)`: the capture's per-example `g_i a_aug_i^T`
/// equals the gradient of example `i`'s loss alone, their mean equals the batch gradient, and
/// `weight_grad()` equals `[dW | db]`.
fn check_per_example<'s>(
    store: &'s ParamStore,
    layers: &[(LayerId, ParamId, Option<ParamId>)],
    forward: impl for<'t> Fn(&'t Tape<'t>, &Tensor) -> Var<'t>,
    x: &Tensor,
    kind: LossKind,
    targets: &Targets,
) {
    let tape = Tape::new(store).capturing(layers.iter().map(|l| l.0));
    let out = forward(&tape, x);
    let grads = tape.backward(kind.apply(out, targets));
    assert_eq!(grads.captures().len(), layers.len());

    let mut sums: Vec<Tensor> = Vec::new();
    for i in 0..B {
        let one = Tape::new(store);
        let out_i = forward(&one, &example(x, i));
        let gi = one.backward(kind.apply(out_i, &target_of(targets, i)));
        for (k, &(layer, w, b)) in layers.iter().enumerate() {
            let cap = grads.capture(layer).unwrap();
            let dw = as_matrix(gi.get(w).unwrap());
            let want = augment(&dw, b.map(|b| gi.get(b).unwrap()));
            let got = per_example_from_capture(cap, i);
            let what = format!("{kind:?} {}: example {i}", store.layer_path(layer));
            assert_close(&what, &got, &want, 1e-4, 1e-5);
            if i == 0 {
                sums.push(got);
            } else {
                sums[k] = sums[k].add(&got);
            }
        }
    }
    for (k, &(layer, w, b)) in layers.iter().enumerate() {
        let cap = grads.capture(layer).unwrap();
        let path = store.layer_path(layer);
        assert_eq!(cap.batch, B, "{path}");
        assert_eq!(cap.has_bias, b.is_some(), "{path}");
        let dw = as_matrix(grads.get(w).unwrap());
        let batch_grad = augment(&dw, b.map(|b| grads.get(b).unwrap()));
        let what = format!("{kind:?} {path}");
        assert_close(
            &format!("{what}: mean of per-example gradients"),
            &sums[k].scale(1.0 / B as f32),
            &batch_grad,
            1e-4,
            1e-6,
        );
        assert_close(
            &format!("{what}: weight_grad()"),
            &cap.weight_grad(),
            &batch_grad,
            1e-4,
            1e-6,
        );
    }
}

#[test]
fn dense_per_example_gradients_for_every_loss() {
    let net = DenseNet::new();
    let layers = [(net.l1, net.w1, Some(net.b1)), (net.l2, net.w2, None)];
    for (k, kind) in KINDS.into_iter().enumerate() {
        let targets = targets_for(kind, B, 3, 200 + k as u64);
        check_per_example(
            &net.store,
            &layers,
            |t, x| net.forward(t, x, false).out,
            &dense_input(),
            kind,
            &targets,
        );
    }
}

#[test]
fn conv_per_example_gradients_for_every_loss() {
    let net = ConvNet::new();
    let layers = [
        (net.c1, net.cw1, Some(net.cb1)),
        (net.c2, net.cw2, None),
        (net.f, net.fw, Some(net.fb)),
    ];
    for (k, kind) in KINDS.into_iter().enumerate() {
        let targets = targets_for(kind, B, 3, 300 + k as u64);
        check_per_example(
            &net.store,
            &layers,
            |t, x| net.forward(t, x, false).out,
            &conv_input(),
            kind,
            &targets,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The layout of `a` and `g` and the scaling of `g`.

#[test]
fn dense_capture_layout_and_scaling() {
    let net = DenseNet::new();
    let x = dense_input();
    let tape = Tape::new(&net.store).capturing([net.l1, net.l2]);
    let f = net.forward(&tape, &x, true);
    let grads = tape.backward(f.out.cross_entropy(&[0, 2, 1, 1]));
    for (k, layer) in [net.l1, net.l2].into_iter().enumerate() {
        let cap = grads.capture(layer).unwrap();
        assert_eq!(cap.layer, layer);
        assert_eq!(cap.locations, 1);
        // `a` is the layer's input as the tape holds it: the same storage, not a copy.
        let input = f.inputs[k].value();
        assert!(cap.a.shares_storage(&input), "layer {k}: a was copied");
        assert_bits_eq("a", &cap.a, &input);
        // g_i = B dL/ds_i, exactly.
        let dlds = grads.wrt(f.probes[k]).unwrap();
        assert_bits_eq("g = B dL/ds", &cap.g, &dlds.scale(B as f32));
    }
    let c1 = grads.capture(net.l1).unwrap();
    assert_eq!((c1.a_dim(), c1.g_dim()), (4, 4));
    let c2 = grads.capture(net.l2).unwrap();
    assert_eq!((c2.a_dim(), c2.g_dim()), (4, 3));
}

#[test]
fn conv_capture_layout_and_scaling() {
    let net = ConvNet::new();
    let x = conv_input();
    let tape = Tape::new(&net.store).capturing([net.c1, net.c2]);
    let f = net.forward(&tape, &x, true);
    let grads = tape.backward(f.out.cross_entropy(&[0, 2, 1, 1]));
    // (layer, its input, kernel, stride, padding, output h, output w)
    let cases = [(net.c1, 0, 3, 1, 1, 5, 4), (net.c2, 1, 3, 2, 1, 3, 2)];
    for (k, &(layer, input, ks, stride, pad, ho, wo)) in cases.iter().enumerate() {
        let cap = grads.capture(layer).unwrap();
        let t = ho * wo;
        assert_eq!(cap.locations, t);
        assert_eq!(cap.batch, B);
        // `a` is the patch matrix: rows (n, t) with t = h * W_out + w, columns (c, kh, kw).
        let want_a = im2col_ref(&f.inputs[input].value(), ks, ks, stride, pad);
        assert_bits_eq(&format!("conv {k}: patches"), &cap.a, &want_a);
        // `g` rows follow the same order: g[(n T + h W_out + w), o] = B dL/ds[n, o, h, w].
        let dlds = grads.wrt(f.probes[k]).unwrap();
        let oc = dlds.dim(1);
        assert_eq!(cap.g.shape(), &[B * t, oc]);
        for n in 0..B {
            for o in 0..oc {
                for h in 0..ho {
                    for w in 0..wo {
                        let want = dlds.data()[((n * oc + o) * ho + h) * wo + w] * B as f32;
                        let got = cap.g.data()[(n * t + h * wo + w) * oc + o];
                        assert_eq!(got.to_bits(), want.to_bits(), "conv {k} g[{n},{o},{h},{w}]");
                    }
                }
            }
        }
    }
    let c1 = grads.capture(net.c1).unwrap();
    assert_eq!((c1.a_dim(), c1.g_dim()), (2 * 9 + 1, 3));
    let c2 = grads.capture(net.c2).unwrap();
    assert_eq!((c2.a_dim(), c2.g_dim()), (3 * 9, 2));
}

// ---------------------------------------------------------------------------------------------
// (c): the factors against their definitions.

fn check_factors(what: &str, cap: &LayerCapture) {
    let b = cap.batch as f64;
    let t = cap.locations as f64;
    let a_rows = a_aug_rows(cap);
    let g_rows: Vec<Vec<f64>> = cap
        .g
        .data()
        .chunks(cap.g.dim(1))
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    assert_eq!(a_rows.len(), cap.batch * cap.locations);
    // Dense: A = (1/B) sum_i a_aug a_aug^T. Conv: Omega = (1/B) sum_i sum_t (summed over t).
    let want_a = second_moment(&a_rows, b);
    // Dense: G = (1/B) sum_i g g^T. Conv: Gamma = (1/(B T)) sum_i sum_t (averaged over t).
    let want_g = second_moment(&g_rows, b * t);
    let a = cap.a_factor();
    let g = cap.g_factor();
    assert_eq!(a.shape(), &[cap.a_dim(), cap.a_dim()], "{what}");
    assert_eq!(g.shape(), &[cap.g_dim(), cap.g_dim()], "{what}");
    assert_close(&format!("{what}: a_factor"), &a, &want_a, 1e-5, 1e-6);
    assert_close(&format!("{what}: g_factor"), &g, &want_g, 1e-5, 1e-6);
    // The homogeneous corner is T (1 for a dense layer): the count of ones, over B.
    if cap.has_bias {
        let n = cap.a_dim();
        assert_eq!(a.data()[n * n - 1], t as f32, "{what}: corner");
    }
    // Both factors are symmetric.
    for (m, name) in [(&a, "a_factor"), (&g, "g_factor")] {
        assert_bits_eq(&format!("{what}: {name} symmetric"), m, &m.t());
    }
}

#[test]
fn factors_match_their_definitions() {
    let net = DenseNet::new();
    let tape = Tape::new(&net.store).capturing([net.l1, net.l2]);
    let out = net.forward(&tape, &dense_input(), false).out;
    let grads = tape.backward(out.squared_error(&randn(&[B, 3], 400)));
    check_factors("fc1 (bias)", grads.capture(net.l1).unwrap());
    check_factors("fc2 (no bias)", grads.capture(net.l2).unwrap());

    let net = ConvNet::new();
    let tape = Tape::new(&net.store).capturing([net.c1, net.c2, net.f]);
    let out = net.forward(&tape, &conv_input(), false).out;
    let grads = tape.backward(out.cross_entropy(&[1, 1, 0, 2]));
    check_factors("conv1 (bias)", grads.capture(net.c1).unwrap());
    check_factors("conv2 (no bias)", grads.capture(net.c2).unwrap());
    check_factors("fc after conv", grads.capture(net.f).unwrap());
}

// ---------------------------------------------------------------------------------------------
// (d): the second backward on the same tape.

fn second_backward_matches_fresh_tape<'s>(
    what: &str,
    store: &'s ParamStore,
    layers: &[LayerId],
    forward: impl for<'t> Fn(&'t Tape<'t>) -> Var<'t>,
    kind: LossKind,
    targets: &Targets,
) {
    let tape = Tape::new(store).capturing(layers.iter().copied());
    let out = forward(&tape);
    let first = tape.backward(kind.apply(out, targets));
    let sampled = kind.sample(&out.value(), &mut Rng::new(9));
    let second = tape.backward(kind.apply(out, &sampled));

    let fresh_tape = Tape::new(store).capturing(layers.iter().copied());
    let fresh_out = forward(&fresh_tape);
    let fresh = fresh_tape.backward(kind.apply(fresh_out, &sampled));
    assert_same_grads(
        &format!("{what} {kind:?}: sampled pass"),
        store,
        &second,
        &fresh,
    );
    assert_eq!(second.captures().len(), layers.len());

    // The first pass is untouched by the second, and matches a fresh tape too.
    let fresh_tape = Tape::new(store).capturing(layers.iter().copied());
    let fresh_out = forward(&fresh_tape);
    let fresh_first = fresh_tape.backward(kind.apply(fresh_out, targets));
    assert_same_grads(
        &format!("{what} {kind:?}: loss pass"),
        store,
        &first,
        &fresh_first,
    );

    // Not vacuous: the sampled labels changed the gradients the capture holds.
    for l in layers {
        let (g1, g2) = (
            &first.capture(*l).unwrap().g,
            &second.capture(*l).unwrap().g,
        );
        assert!(
            g1.max_abs_diff(g2) > 1e-3,
            "{what} {kind:?}: sampled g equals loss g"
        );
    }
}

#[test]
fn second_backward_gives_the_captures_of_the_sampled_loss() {
    let net = DenseNet::new();
    let x = dense_input();
    for (k, kind) in KINDS.into_iter().enumerate() {
        let targets = targets_for(kind, B, 3, 500 + k as u64);
        second_backward_matches_fresh_tape(
            "dense",
            &net.store,
            &[net.l1, net.l2],
            |t| net.forward(t, &x, false).out,
            kind,
            &targets,
        );
    }
    let net = ConvNet::new();
    let x = conv_input();
    for (k, kind) in KINDS.into_iter().enumerate() {
        let targets = targets_for(kind, B, 3, 600 + k as u64);
        second_backward_matches_fresh_tape(
            "conv",
            &net.store,
            &[net.c1, net.c2, net.f],
            |t| net.forward(t, &x, false).out,
            kind,
            &targets,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (e): captures only where asked.

#[test]
fn captures_only_what_was_requested() {
    let net = ConvNet::new();
    let x = conv_input();
    let labels = [0, 1, 2, 0];

    let tape = Tape::new(&net.store);
    let out = net.forward(&tape, &x, false).out;
    let grads = tape.backward(out.cross_entropy(&labels));
    assert!(grads.captures().is_empty(), "no request, yet captures");
    assert!(grads.capture(net.c1).is_none());
    assert_eq!(grads.params().count(), net.store.len());

    let tape = Tape::new(&net.store).capturing([net.c2]);
    assert!(tape.captures(net.c2) && !tape.captures(net.c1));
    let out = net.forward(&tape, &x, false).out;
    let mut grads = tape.backward(out.cross_entropy(&labels));
    assert_eq!(
        grads.captures().keys().copied().collect::<Vec<_>>(),
        [net.c2]
    );
    let taken = grads.take_captures();
    assert_eq!(taken.len(), 1);
    assert!(grads.captures().is_empty());

    // A requested layer the loss does not reach, an op with no layer id, and a layer id that
    // no op carries: none of them yields a capture.
    let mut store = ParamStore::new();
    let used = store.add_layer("used");
    let head = store.add_layer("other_head");
    let ghost = store.add_layer("ghost");
    let w = store.add("w", randn(&[2, 3], 700));
    let v = store.add("v", randn(&[2, 3], 701));
    let tape = Tape::new(&store).capturing([used, head, ghost]);
    let xin = tape.input(randn(&[2, 3], 702));
    let out = xin.linear(tape.param(w), None, Some(used));
    let _other = xin.linear(tape.param(v), None, Some(head));
    let _anonymous = xin.linear(tape.param(w), None, None);
    let grads = tape.backward(out.sum());
    assert_eq!(grads.captures().keys().copied().collect::<Vec<_>>(), [used]);
    assert!(grads.get(v).is_none());
}

// ---------------------------------------------------------------------------------------------
// (f): KFAC identities.
//
// One dense layer s = W a + b with squared error L = (1/B) sum_i 1/2 |s_i - t_i|^2. The capture
// holds g_i = B dL/ds_i = s_i - t_i (the per-example loss gradient) and a_aug_i = [a_i; 1], and
// the batch gradient is dW_aug = (1/B) sum_i g_i a_aug_i^T. With the row-major vec
// (index p (in+1) + q), vec(g a^T) = g (x) a, so
//   kron(G, A) = (1/B^2) sum_{i,j} kron(g_i g_i^T, a_j a_j^T)  ... only when the i and j sums
// factor, which they do in these cases:
// * B = 1: kron(G, A) = kron(g g^T, a a^T) = (g (x) a)(g (x) a)^T = vec(dW_aug) vec(dW_aug)^T.
// * B copies of one example: every g_i = g and a_i = a, so again
//   kron(G, A) = vec(dW_aug) vec(dW_aug)^T. Built instead from the raw backward output
//   dL/ds_i = g / B, the gradient factor would be G / B^2: kron(G_raw, A) B^2 is the identity,
//   which is the factor the per-example scaling g_i = B dL/ds_i puts back.
// * one input, B different targets: A = a a^T is common to every example, so
//   kron(G, A) = (1/B) sum_i kron(g_i g_i^T, a a^T) = (1/B) sum_i vec(dW_i) vec(dW_i)^T, the
//   exact empirical Fisher, with dW_i the gradient of example i's loss alone.

struct OneLayer {
    store: ParamStore,
    w: ParamId,
    b: ParamId,
    layer: LayerId,
}

fn one_layer(inp: usize, out: usize) -> OneLayer {
    let mut store = ParamStore::new();
    let layer = store.add_layer("fc");
    let w = store.add("fc.weight", randn(&[out, inp], 800));
    let b = store.add("fc.bias", randn(&[out], 801));
    OneLayer { store, w, b, layer }
}

/// The capture, the `W_aug` gradient and the raw `dL/ds` of squared error on one layer.
fn one_layer_pass(net: &OneLayer, x: &Tensor, t: &Tensor) -> (LayerCapture, Tensor, Tensor) {
    let tape = Tape::new(&net.store).capturing([net.layer]);
    let xin = tape.input(x.clone());
    let s = xin.linear(tape.param(net.w), Some(tape.param(net.b)), Some(net.layer));
    let probe = tape.var(Tensor::zeros(&s.shape()));
    let grads = tape.backward(s.add(probe).squared_error(t));
    let dw = augment(grads.get(net.w).unwrap(), grads.get(net.b));
    let raw = grads.wrt(probe).unwrap().clone();
    (grads.capture(net.layer).unwrap().clone(), dw, raw)
}

#[test]
fn kfac_identity_with_batch_one() {
    let net = one_layer(3, 2);
    let (cap, dw, _) = one_layer_pass(&net, &randn(&[1, 3], 810), &randn(&[1, 2], 811));
    let kfac = kron(&cap.g_factor(), &cap.a_factor());
    assert_eq!(kfac.shape(), &[8, 8]);
    assert_close(
        "kron(G, A) = vec vec^T",
        &kfac,
        &outer_self(&dw),
        1e-5,
        1e-6,
    );
    // The other Kronecker order is a different matrix: the test pins the convention.
    let other = kron(&cap.a_factor(), &cap.g_factor());
    assert!(other.max_abs_diff(&outer_self(&dw)) > 1e-2);
}

#[test]
fn kfac_identity_with_copies_of_one_example_and_the_batch_scaling() {
    let net = one_layer(3, 2);
    let (x1, t1) = (randn(&[1, 3], 820), randn(&[1, 2], 821));
    let copies = 5;
    let tile = |t: &Tensor| {
        let d: Vec<f32> = (0..copies).flat_map(|_| t.data().to_vec()).collect();
        Tensor::from_vec(d, &[copies, t.dim(1)])
    };
    let (cap, dw, raw) = one_layer_pass(&net, &tile(&x1), &tile(&t1));
    let (cap1, dw1, _) = one_layer_pass(&net, &x1, &t1);
    let a = cap.a_factor();
    let vv = outer_self(&dw);
    assert_close(
        "kron(G, A) = vec vec^T",
        &kron(&cap.g_factor(), &a),
        &vv,
        1e-5,
        1e-6,
    );
    // Same factors and gradient as the single example: the statistics do not depend on B.
    assert_close(
        "G vs batch 1",
        &cap.g_factor(),
        &cap1.g_factor(),
        1e-5,
        1e-6,
    );
    assert_close("dW vs batch 1", &dw, &dw1, 1e-5, 1e-6);
    // From the raw dL/ds = g / B, the factor is G / B^2, and B^2 kron(G_raw, A) is vec vec^T.
    let raw_rows: Vec<Vec<f64>> = raw
        .data()
        .chunks(2)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    let g_raw = second_moment(&raw_rows, copies as f64);
    let b2 = (copies * copies) as f32;
    assert_close(
        "G_raw = G / B^2",
        &g_raw.scale(b2),
        &cap.g_factor(),
        1e-5,
        1e-6,
    );
    assert_close(
        "B^2 kron(G_raw, A)",
        &kron(&g_raw, &a).scale(b2),
        &vv,
        1e-5,
        1e-6,
    );
    assert!(
        kron(&g_raw, &a).max_abs_diff(&vv) > 1e-2,
        "B^2 is not 1 here"
    );
}

#[test]
fn kfac_equals_the_empirical_fisher_when_inputs_agree() {
    let net = one_layer(3, 2);
    let x1 = randn(&[1, 3], 830);
    let x = Tensor::from_vec(x1.data().repeat(B), &[B, 3]);
    let t = randn(&[B, 2], 831);
    let (cap, _, _) = one_layer_pass(&net, &x, &t);
    // The exact empirical Fisher from per-example gradients, each from its own tape.
    let mut fisher = Tensor::zeros(&[8, 8]);
    for i in 0..B {
        let (_, dwi, _) = one_layer_pass(&net, &x1, &example(&t, i));
        fisher = fisher.add(&outer_self(&dwi));
    }
    let fisher = fisher.scale(1.0 / B as f32);
    let kfac = kron(&cap.g_factor(), &cap.a_factor());
    assert_close("kron(G, A) = empirical Fisher", &kfac, &fisher, 1e-4, 1e-6);
}

// ---------------------------------------------------------------------------------------------
// The sampled (true) Fisher at a linear output layer has the predictive distribution's
// covariance as its gradient factor: G = I for the unit-variance Gaussian, diag(p) - p p^T for
// the categorical, diag(p (1 - p)) for the Bernoulli.

/// The gradient factor of one linear output layer on `batch` copies of one input, after a
/// backward from labels sampled from the model, and the output row.
fn sampled_g(kind: LossKind, batch: usize) -> (Tensor, Vec<f32>) {
    let net = one_layer(3, 3);
    let x1 = randn(&[1, 3], 840).scale(0.5);
    let x = Tensor::from_vec(x1.data().repeat(batch), &[batch, 3]);
    let tape = Tape::new(&net.store).capturing([net.layer]);
    let out = tape
        .input(x)
        .linear(tape.param(net.w), Some(tape.param(net.b)), Some(net.layer));
    let sampled = kind.sample(&out.value(), &mut Rng::new(841));
    let grads = tape.backward(kind.apply(out, &sampled));
    let row = out.value().data()[..3].to_vec();
    (grads.capture(net.layer).unwrap().g_factor(), row)
}

#[test]
fn sampled_fisher_gradient_factor_is_the_predictive_covariance() {
    let n = 50_000;
    let (g, _) = sampled_g(LossKind::SquaredError, n);
    assert_close("Gaussian: G = I", &g, &Tensor::eye(3), 0.0, 0.05);

    let (g, z) = sampled_g(LossKind::CrossEntropy, n);
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = z.iter().map(|&v| ((v - m) as f64).exp()).collect();
    let p: Vec<f64> = e.iter().map(|v| v / e.iter().sum::<f64>()).collect();
    let want: Vec<f64> = (0..9)
        .map(|k| {
            let (i, j) = (k / 3, k % 3);
            f64::from(u8::from(i == j)) * p[i] - p[i] * p[j]
        })
        .collect();
    assert_close("categorical", &g, &matrix(3, 3, want), 0.0, 0.02);

    let (g, z) = sampled_g(LossKind::SigmoidBce, n);
    let want: Vec<f64> = (0..9)
        .map(|k| {
            let (i, j) = (k / 3, k % 3);
            let p = 1.0 / (1.0 + (-(z[i] as f64)).exp());
            if i == j { p * (1.0 - p) } else { 0.0 }
        })
        .collect();
    assert_close("Bernoulli", &g, &matrix(3, 3, want), 0.0, 0.02);
}
