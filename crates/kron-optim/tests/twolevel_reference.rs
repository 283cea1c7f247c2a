//! kron's two-level KFAC against the reference code: one step of the authors' `TwolevelKFAC`
//! (Abdoulaye-Koroko/natural-gradients at 97105b6) on tiny fixed nets for each coarse space,
//! run by `tests/reference/twolevel_goldens.py` (by hand; its docstring says how, and which two
//! quirks of the reference it patches) and committed as `tests/reference/twolevel_goldens.json`.
//! kron runs the same step with the reference's first-level damping,
//! `EigenDamping::PerFactor`, and must give the same damped coarse matrix and the same
//! corrected direction to `f32` accuracy.

mod common;

use common::joined;
use kron_autodiff::{ParamStore, Rng, Tape, Tensor};
use kron_layers::{Activation, Conv2dConfig, Dense, Flatten, Module, Sequential};
use kron_optim::{
    CoarseConfig, EigenDamping, FisherKind, InverseMethod, KfacConfig, Optimizer, Precision,
    Schedule, TwoLevelKfac,
};

const GOLDENS: &str = include_str!("../../../tests/reference/twolevel_goldens.json");

/// The reference's nets with its weights, `0.5 sin(1 + k)` over the parameters in PyTorch's
/// order (each layer's weight, row-major as kron's, then its bias), and its inputs.
fn net(name: &str) -> (ParamStore, Sequential, Tensor) {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(0);
    let (model, x) = match name {
        "dense" => (
            Sequential::new()
                .push(Dense::new(&mut store, "0", 3, 4, &mut rng))
                .push(Activation::Tanh)
                .push(Dense::new(&mut store, "2", 4, 2, &mut rng)),
            Tensor::from_vec((0..24).map(input).collect(), &[8, 3]),
        ),
        "conv" => (
            Sequential::new()
                .push(
                    Conv2dConfig::new(2, 3, 3)
                        .with_padding(1)
                        .with_stride(2)
                        .build(&mut store, "0", &mut rng),
                )
                .push(Activation::Relu)
                .push(Flatten)
                .push(Dense::new(&mut store, "3", 27, 2, &mut rng)),
            Tensor::from_vec((0..300).map(input).collect(), &[5, 2, 5, 6]),
        ),
        other => panic!("no net {other}"),
    };
    let mut k = 0usize;
    for b in model.fisher_blocks() {
        for id in std::iter::once(b.weight).chain(b.bias) {
            for v in store.get_mut(id).data_mut() {
                *v = (0.5 * (1.0 + k as f64).sin()) as f32;
                k += 1;
            }
        }
    }
    (store, model, x)
}

/// The reference's inputs, `sin(0.37 k^2 + 1)`.
fn input(k: usize) -> f32 {
    (0.37 * (k * k) as f64 + 1.0).sin() as f32
}

fn flat(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().expect("a number")],
    }
}

#[test]
fn one_step_matches_the_reference_for_every_coarse_space() {
    let g: serde_json::Value = serde_json::from_str(GOLDENS).expect("the goldens parse");
    let lambda = g["damping"].as_f64().unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let (netname, space, krylov) = (
            case["net"].as_str().unwrap(),
            case["space"].as_str().unwrap(),
            case["krylov"].as_bool().unwrap(),
        );
        let name = match (space, krylov) {
            ("tpselepedis", _) => "tselepidis".to_string(),
            (s, true) => format!("krylov-{s}"),
            (s, false) => s.to_string(),
        };
        let what = format!("{netname} {name}");
        let (mut store, model, x) = net(netname);
        let blocks = model.fisher_blocks();
        let cfg = KfacConfig::default()
            .with_fisher(FisherKind::Empirical)
            .with_method(InverseMethod::Eigen(EigenDamping::PerFactor))
            .with_damping(lambda as f32)
            .with_kl_clip(None)
            .with_momentum(0.0)
            .with_schedule(Schedule::constant(1.0))
            .with_conv_stats_period(1)
            .with_precision(Precision::F64);
        let coarse = CoarseConfig::parse(&name).unwrap();
        let mut opt = TwoLevelKfac::new(&model, &store, cfg, coarse).unwrap();
        let y: Vec<usize> = (0..x.dim(0)).map(|n| n % 2).collect();
        let tape = Tape::new(&store).capturing(opt.wants().capture);
        let l = model.forward(tape.input(x.clone())).cross_entropy(&y);
        let mut grads = tape.backward(l);
        let caps = grads.take_captures();
        let before = store.clone();
        opt.step(&mut store, &grads, &caps).unwrap();

        // The coarse vectors (the spectral ones up to sign).
        let want_v: Vec<Vec<f64>> = case["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(flat)
            .collect();
        let got_v = opt.coarse_vectors();
        assert_eq!(got_v.len(), want_v.len(), "{what}: vectors");
        for (k, ((_, r), w)) in got_v.iter().zip(&want_v).enumerate() {
            let r: Vec<f64> = r.data().iter().map(|&v| v as f64).collect();
            let sign =
                if name == "spectral" && r.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() < 0.0 {
                    -1.0
                } else {
                    1.0
                };
            for (i, (a, b)) in r.iter().zip(w).enumerate() {
                assert!(
                    (sign * a - b).abs() <= 1e-4,
                    "{what}: vector {k} [{i}] {a} vs the reference's {b}"
                );
            }
        }

        // The damped coarse matrix (the reference stores it damped).
        let want = flat(&case["coarse_matrix"]);
        let m = opt.coarse_matrix().expect("a coarse matrix").to_vec();
        let nc = (m.len() as f64).sqrt() as usize;
        assert_eq!(nc * nc, want.len(), "{what}: coarse size");
        let per_layer = coarse.vectors_per_layer();
        let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        for i in 0..nc {
            for j in 0..nc {
                let b = &blocks[i / per_layer];
                let mut got = m[i * nc + j];
                if i == j {
                    got += lambda * (b.g_dim() * b.a_dim()) as f64;
                }
                // The spectral vectors' signs are the eigensolvers' choice.
                let (got, w) = if name == "spectral" {
                    (got.abs(), want[i * nc + j].abs())
                } else {
                    (got, want[i * nc + j])
                };
                assert!(
                    (got - w).abs() <= 1e-4 * scale,
                    "{what}: coarse matrix [{i},{j}] {got} vs the reference's {w}"
                );
            }
        }

        // The corrected direction (dense net: the conv net's one-level KFC differs by design).
        if netname == "dense" {
            let want = flat(&case["direction"]);
            let got = joined(&blocks, |id| before.get(id).sub(store.get(id)));
            let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for (k, (a, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - w).abs() <= 1e-4 * scale,
                    "{what}: direction [{k}] {a} vs the reference's {w}"
                );
            }
        }
    }
}
