//! A model of one's own: `kron::module!` against a hand-written `impl Module`, default layer
//! names, and KFAC training a residual model built with the macro.

use kron::prelude::*;

kron::module! {
    /// `head(x + second(relu(first(x))))`: two dense layers around a skip connection.
    #[derive(Clone, Debug)]
    pub struct Residual {
        /// Widens the input.
        pub first: Dense,
        /// Narrows back to the input's width.
        pub(crate) second: Dense,
        head: Dense,
    }

    /// The residual block, then the head.
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        let h = x + self.second.forward(self.first.forward(x).relu());
        self.head.forward(h)
    }
}

/// The same model with its `Module` written by hand.
struct HandResidual {
    first: Dense,
    second: Dense,
    head: Dense,
}

impl Module for HandResidual {
    fn forward<'t>(&self, x: Var<'t>) -> Var<'t> {
        let h = x + self.second.forward(self.first.forward(x).relu());
        self.head.forward(h)
    }
    fn visit_params(&self, f: &mut dyn FnMut(ParamId)) {
        self.first.visit_params(f);
        self.second.visit_params(f);
        self.head.visit_params(f);
    }
    fn visit_blocks(&self, f: &mut dyn FnMut(&FisherBlock)) {
        self.first.visit_blocks(f);
        self.second.visit_blocks(f);
        self.head.visit_blocks(f);
    }
}

const IN: usize = 5;
const WIDE: usize = 12;
const CLASSES: usize = 3;

fn layers(store: &mut ParamStore, seed: u64) -> (Dense, Dense, Dense) {
    let mut rng = Rng::new(seed);
    (
        Dense::new(store, "first", IN, WIDE, &mut rng),
        Dense::new(store, "second", WIDE, IN, &mut rng),
        Dense::new(store, "head", IN, CLASSES, &mut rng),
    )
}

fn residual(store: &mut ParamStore, seed: u64) -> Residual {
    let (first, second, head) = layers(store, seed);
    Residual {
        first,
        second,
        head,
    }
}

/// `x W^T + b` in f64 from the store, row by row.
fn dense64(store: &ParamStore, d: &Dense, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let w = store.get(d.weight());
    let b = store.get(d.bias().unwrap());
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    x.iter()
        .map(|row| {
            (0..out)
                .map(|o| {
                    let s: f64 = (0..inp)
                        .map(|i| w.data()[o * inp + i] as f64 * row[i])
                        .sum();
                    s + b.data()[o] as f64
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_macro_model_has_the_hand_written_blocks_params_and_values() {
    let mut store = ParamStore::new();
    let model = residual(&mut store, 1);
    let mut store2 = ParamStore::new();
    let (first, second, head) = layers(&mut store2, 1);
    let hand = HandResidual {
        first,
        second,
        head,
    };
    assert_eq!(store, store2);
    assert_eq!(model.fisher_blocks(), hand.fisher_blocks());
    assert_eq!(model.param_ids(), hand.param_ids());
    // Every parameter, in declaration order, and a block per layer.
    assert_eq!(model.param_ids(), store.ids().collect::<Vec<_>>());
    let paths: Vec<String> = model.fisher_blocks().into_iter().map(|b| b.path).collect();
    assert_eq!(paths, ["first", "second", "head"]);
    // Attributes pass through: the derives exist.
    let copy = model.clone();
    assert!(format!("{copy:?}").contains("Residual"));

    // Forward values against a brute-force evaluation in f64.
    let x = Tensor::randn(&[4, IN], 0.0, 1.0, &mut Rng::new(2));
    let tape = Tape::new(&store);
    let y = model.forward(tape.input(x.clone())).value();
    let tape2 = Tape::new(&store2);
    assert_eq!(y, hand.forward(tape2.input(x.clone())).value());
    let rows: Vec<Vec<f64>> = (0..4)
        .map(|r| {
            x.data()[r * IN..(r + 1) * IN]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    let h1: Vec<Vec<f64>> = dense64(&store, &model.first, &rows)
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.max(0.0)).collect())
        .collect();
    let h2 = dense64(&store, &model.second, &h1);
    let skip: Vec<Vec<f64>> = rows
        .iter()
        .zip(&h2)
        .map(|(a, b)| a.iter().zip(b).map(|(p, q)| p + q).collect())
        .collect();
    let out = dense64(&store, &model.head, &skip);
    assert_eq!(y.shape(), &[4, CLASSES]);
    for (r, row) in out.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let got = y.data()[r * CLASSES + c] as f64;
            assert!(
                (got - v).abs() <= 1e-5 * (1.0 + v.abs()),
                "{r},{c}: {got} vs {v}"
            );
        }
    }
}

#[test]
fn kfac_trains_a_residual_model_built_with_the_macro() {
    let mut store = ParamStore::new();
    let model = residual(&mut store, 3);
    // Strict blocks: every parameter lies in a block.
    let mut kfac = Kfac::new(
        &model,
        &store,
        KfacConfig::new(0.05)
            .with_damping(0.1)
            .with_strict_blocks(true),
    )
    .unwrap();
    assert!(kfac.outside_blocks().is_empty());
    let mut rng = Rng::new(4);
    let x = Tensor::randn(&[30, IN], 0.0, 1.0, &mut rng);
    // A rule the net can learn: the class of the largest of the first three inputs.
    let y: Vec<usize> = (0..30)
        .map(|r| {
            let row = &x.data()[r * IN..r * IN + CLASSES];
            (0..CLASSES)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap()
        })
        .collect();
    let t = Targets::Classes(y);
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..150 {
        let out = train_step(
            &model,
            LossKind::CrossEntropy,
            &mut store,
            &mut kfac,
            &x,
            &t,
            &mut rng,
        )
        .unwrap();
        assert!(out.report.warnings().next().is_none(), "{:?}", out.report);
        first.get_or_insert(out.loss);
        last = out.loss;
    }
    let first = first.unwrap();
    assert!(last < first / 3.0, "loss {first} -> {last}");
    // KFAC preconditioned every layer: each block has factors.
    for b in model.fisher_blocks() {
        assert!(kfac.factors(&b.path).is_some(), "{}", b.path);
    }
}

#[test]
fn layers_without_a_name_are_named_by_their_position() {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(0);
    let a = Dense::new(&mut store, "", 4, 3, &mut rng);
    let b = Conv2dConfig::new(1, 2, 3).build(&mut store, "", &mut rng);
    let c = DenseConfig::new(3, 2)
        .with_bias(false)
        .build(&mut store, "", &mut rng);
    let named = Dense::new(&mut store, "4", 2, 2, &mut rng);
    // The fifth layer's position, 4, is a name already given: it takes the next free number,
    // and the sixth layer's position, 5, is then taken too.
    let d = Dense::new(&mut store, "", 2, 2, &mut rng);
    let e = Dense::new(&mut store, "", 2, 2, &mut rng);
    let names: Vec<&str> = store.iter().map(|(_, n, _)| n).collect();
    assert_eq!(
        names,
        [
            "0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "4.weight", "4.bias",
            "5.weight", "5.bias", "6.weight", "6.bias"
        ]
    );
    let paths: Vec<String> = [&a.block().path, &b.block().path, &c.block().path]
        .into_iter()
        .chain([&named.block().path, &d.block().path, &e.block().path])
        .cloned()
        .collect();
    assert_eq!(paths, ["0", "1", "2", "4", "5", "6"]);
    assert_eq!(store.layer_path(e.layer()), "6");
}
