//! Layers: gradients against finite differences, Fisher-block metadata, weight files.

use kron_autodiff::testing::{GradCheck, check_param_gradients};
use kron_autodiff::{ParamStore, Rng, Tape, Tensor};
use kron_layers::{
    Activation, AvgPool2d, BlockKind, Conv2dConfig, Dense, DenseConfig, Dropout, Flatten,
    MaxPool2d, Module, Sequential, TensorFileError,
};

fn conv_net(store: &mut ParamStore, rng: &mut Rng) -> Sequential {
    Sequential::new()
        .push(
            Conv2dConfig::new(2, 3, 3)
                .with_padding(1)
                .with_stride(2)
                .build(store, "features.0", rng),
        )
        .push(Activation::Tanh)
        .push(AvgPool2d::new(2, 1, 0))
        .push(
            Conv2dConfig::new(3, 4, 2)
                .with_bias(false)
                .build(store, "features.3", rng),
        )
        .push(Activation::Softplus)
        .push(Flatten)
        .push(Dense::new(store, "head", 4, 3, rng))
}

#[test]
fn sequential_conv_net_gradients_match_finite_differences() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(1);
    let net = conv_net(&mut store, &mut rng);
    let x = Tensor::randn(&[2, 2, 6, 5], 0.0, 1.0, &mut rng);
    let labels = [2usize, 0];
    let report = check_param_gradients(
        &store,
        |tape| net.forward(tape.input(x.clone())).cross_entropy(&labels),
        &GradCheck {
            eps: 1e-2,
            rtol: 2e-2,
            atol: 2e-3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.checked, store.num_scalars());
}

#[test]
fn dense_net_gradients_match_finite_differences() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(2);
    let net = Sequential::new()
        .push(Dense::new(&mut store, "0", 5, 4, &mut rng))
        .push(Activation::Sigmoid)
        .push(
            DenseConfig::new(4, 3)
                .with_bias(false)
                .build(&mut store, "2", &mut rng),
        )
        .push(Activation::Gelu)
        .push(Dense::new(&mut store, "4", 3, 5, &mut rng));
    let x = Tensor::randn(&[3, 5], 0.0, 1.0, &mut rng);
    let t = Tensor::rand_uniform(&[3, 5], 0.0, 1.0, &mut rng);
    check_param_gradients(
        &store,
        |tape| net.forward(tape.input(x.clone())).sigmoid_bce(&t),
        &GradCheck::default(),
    )
    .unwrap();
}

#[test]
fn fisher_blocks_describe_the_layers() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(3);
    let net = conv_net(&mut store, &mut rng)
        .push(MaxPool2d::new(1, 1, 0))
        .push(Dropout::new(0.1));
    let blocks = net.fisher_blocks();
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[0].path, "features.0");
    assert_eq!(
        blocks[0].kind,
        BlockKind::Conv2d {
            in_ch: 2,
            out_ch: 3,
            kh: 3,
            kw: 3,
            stride: 2,
            padding: 1
        }
    );
    assert_eq!((blocks[0].a_dim(), blocks[0].g_dim()), (19, 3));
    assert_eq!((blocks[1].a_dim(), blocks[1].g_dim()), (12, 4));
    assert!(blocks[1].bias.is_none());
    assert_eq!((blocks[2].a_dim(), blocks[2].g_dim()), (5, 3));
    assert_eq!(store.name(blocks[2].weight), "head.weight");
    assert_eq!(net.param_ids().len(), 5);
    // Distinct capture sites.
    let mut layers: Vec<_> = blocks.iter().map(|b| b.layer).collect();
    layers.dedup();
    assert_eq!(layers.len(), 3);
}

#[test]
fn join_and_split_round_trip() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(4);
    let conv = Conv2dConfig::new(2, 3, 2).build(&mut store, "c", &mut rng);
    let block = conv.block().clone();
    let w = store.get(block.weight).clone();
    let b = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]);
    let aug = block.join(&w, Some(&b));
    assert_eq!(aug.shape(), &[3, 9]);
    assert_eq!(aug.data()[8], 1.0);
    assert_eq!(aug.data()[17], 2.0);
    let (w2, b2) = block.split(&aug, w.shape());
    assert_eq!(w2, w);
    assert_eq!(b2.unwrap(), b);
}

#[test]
fn dropout_is_identity_in_eval_and_seeded_in_training() {
    let store = ParamStore::new();
    let x = Tensor::ones(&[4, 50]);
    let eval = Tape::new(&store).training(false);
    let y = Dropout::new(0.5).forward(eval.input(x.clone())).value();
    assert_eq!(y, x);
    let run = |seed| {
        let t = Tape::new(&store).with_rng(Rng::new(seed));
        Dropout::new(0.5).forward(t.input(x.clone())).value()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    let kept = run(7).data().iter().filter(|&&v| v != 0.0).count();
    assert!((60..140).contains(&kept), "{kept} of 200 kept");
    assert!(run(7).data().iter().all(|&v| v == 0.0 || v == 2.0));
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kron-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn weights_round_trip_and_mismatches_are_refused() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(5);
    let _net = conv_net(&mut store, &mut rng);
    let path = temp("net.safetensors");
    kron_layers::save(&store, &path).unwrap();
    let mut other = ParamStore::new();
    let _ = conv_net(&mut other, &mut Rng::new(6));
    assert_ne!(other, store);
    kron_layers::load(&mut other, &path).unwrap();
    assert_eq!(other, store);

    // A model with a wider head does not fit: error names the tensor and shapes, store intact.
    let mut wide = ParamStore::new();
    let mut r = Rng::new(7);
    let _ = Conv2dConfig::new(2, 3, 3)
        .with_padding(1)
        .with_stride(2)
        .build(&mut wide, "features.0", &mut r);
    let _ = Conv2dConfig::new(3, 4, 2)
        .with_bias(false)
        .build(&mut wide, "features.3", &mut r);
    let _ = Dense::new(&mut wide, "head", 4, 5, &mut r);
    let before = wide.clone();
    let err = kron_layers::load(&mut wide, &path).unwrap_err();
    assert!(matches!(err, TensorFileError::Shape { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("head.weight") && msg.contains("[3, 4]") && msg.contains("[5, 4]"),
        "{msg}"
    );
    assert_eq!(wide, before);
}

/// A `Sequential` fuses each conv and the ReLU after it into one op (fewer tape nodes), with
/// the same loss, gradients and captures, bit for bit, as the modules applied one by one.
#[test]
fn sequential_fuses_layers_and_activations_with_the_same_bits() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(6);
    let conv1 = Conv2dConfig::new(2, 4, 3)
        .with_padding(1)
        .build(&mut store, "c1", &mut rng);
    let conv2 = Conv2dConfig::new(4, 3, 3)
        .with_stride(2)
        .build(&mut store, "c2", &mut rng);
    let layers: Vec<Box<dyn Module>> = vec![
        Box::new(conv1),
        Box::new(Activation::Relu),
        Box::new(MaxPool2d::new(2, 1, 0)),
        Box::new(conv2),
        Box::new(Activation::Relu),
        Box::new(Flatten),
        Box::new(Dense::new(&mut store, "d1", 12, 6, &mut rng)),
        Box::new(Activation::Tanh),
        Box::new(Dense::new(&mut store, "d2", 6, 5, &mut rng)),
        Box::new(Activation::Softplus),
        Box::new(Dense::new(&mut store, "d3", 5, 4, &mut rng)),
        Box::new(Activation::Relu),
        Box::new(Dense::new(&mut store, "head", 4, 3, &mut rng)),
        Box::new(Activation::Sigmoid),
    ];
    let mut net = Sequential::new();
    let x = Tensor::randn(&[3, 2, 7, 7], 0.0, 1.0, &mut rng);
    let blocks: Vec<_> = layers.iter().flat_map(|m| m.fisher_blocks()).collect();
    let layer_ids = blocks.iter().map(|b| b.layer).collect::<Vec<_>>();
    let run = |forward: &dyn Fn(kron_autodiff::Var<'_>) -> kron_autodiff::Var<'_>| {
        let tape = Tape::new(&store).capturing(layer_ids.iter().copied());
        let loss = forward(tape.input(x.clone())).cross_entropy(&[0, 2, 1]);
        let grads = tape.backward(loss);
        let mut out = vec![loss.value()];
        out.extend(store.ids().map(|id| grads.get(id).unwrap().clone()));
        for l in &layer_ids {
            let c = grads.capture(*l).unwrap();
            out.extend([c.a.clone(), c.g.clone()]);
        }
        (tape.len(), out)
    };
    let (plain_nodes, plain) = run(&|h| layers.iter().fold(h, |h, m| m.forward(h)));
    for m in layers {
        net.push_boxed(m);
    }
    let (fused_nodes, fused) = run(&|h| net.forward(h));
    // The convs fuse their ReLUs, the dense layers their tanh, ReLU and sigmoid; the softplus
    // (whose derivative needs its input) stays an op of its own.
    assert_eq!(fused_nodes + 5, plain_nodes);
    assert_eq!(fused.len(), plain.len());
    for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
        assert_eq!(f.shape(), p.shape(), "output {i}");
        let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(f), bits(p), "output {i} differs");
    }
}

/// Input of the wrong shape panics on the calling thread with the layer's name and the shape it
/// expects (flat rows into a conv layer, images into a dense one).
#[test]
fn a_misshapen_input_names_the_layer_and_the_shape_it_expects() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(0);
    let conv = Conv2dConfig::new(1, 2, 3).build(&mut store, "stem", &mut rng);
    let dense = Dense::new(&mut store, "head", 16, 3, &mut rng);
    let message = |f: &dyn Fn()| -> String {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err();
        e.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let m = message(&|| {
        let tape = Tape::new(&store);
        let _ = conv.forward(tape.input(Tensor::zeros(&[4, 16])));
    });
    assert!(
        m.contains("Conv2d `stem`")
            && m.contains("batch x 1 x height x width")
            && m.contains("flat rows"),
        "{m}"
    );
    let m = message(&|| {
        let tape = Tape::new(&store);
        let _ = dense.forward(tape.input(Tensor::zeros(&[4, 1, 4, 4])));
    });
    assert!(
        m.contains("Dense `head`") && m.contains("batch x 16") && m.contains("Flatten"),
        "{m}"
    );
}
