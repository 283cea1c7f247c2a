//! SGD and Adam against their formulas, NaN refusal, state round trips.

use kron_autodiff::{Gradients, ParamStore, Tensor};
use kron_optim::{Adam, AdamConfig, Captures, OptimError, Optimizer, Sgd, SgdConfig};

fn store() -> ParamStore {
    let mut s = ParamStore::new();
    s.add("w", Tensor::from_vec(vec![1.0, -2.0, 0.5], &[3]));
    s.add("b", Tensor::from_vec(vec![0.25], &[1]));
    s
}

fn grads(g: [f32; 4]) -> Gradients {
    Gradients::from_params(vec![
        Some(Tensor::from_vec(g[..3].to_vec(), &[3])),
        Some(Tensor::from_vec(vec![g[3]], &[1])),
    ])
}

#[test]
fn sgd_nesterov_weight_decay_matches_the_formula() {
    let mut p = store();
    let cfg = SgdConfig::new(0.1)
        .with_momentum(0.9)
        .with_nesterov(true)
        .with_weight_decay(0.01);
    let mut opt = Sgd::new(&p, cfg).unwrap();
    let gs = [[0.5, -1.0, 2.0, 0.1], [0.4, 0.3, -0.2, 0.0]];
    // Reference in f64.
    let mut x: Vec<f64> = vec![1.0, -2.0, 0.5, 0.25];
    let mut v = [0.0f64; 4];
    for g in gs {
        opt.step(&mut p, &grads(g), &Captures::new()).unwrap();
        for i in 0..4 {
            let d = g[i] as f64 + 0.01 * x[i];
            v[i] = 0.9 * v[i] + d;
            x[i] -= 0.1 * (d + 0.9 * v[i]);
        }
    }
    let got: Vec<f32> = p
        .get(kron_autodiff::ParamId(0))
        .data()
        .iter()
        .chain(p.get(kron_autodiff::ParamId(1)).data())
        .copied()
        .collect();
    for i in 0..4 {
        assert!(
            (got[i] as f64 - x[i]).abs() < 1e-6,
            "{i}: {} vs {}",
            got[i],
            x[i]
        );
    }
}

#[test]
fn adam_and_adamw_match_the_formula() {
    for decoupled in [false, true] {
        let mut p = store();
        let cfg = AdamConfig::new(0.01).with_weight_decay(0.1, decoupled);
        let mut opt = Adam::new(&p, cfg).unwrap();
        let gs = [
            [0.5, -1.0, 2.0, 0.1],
            [0.4, 0.3, -0.2, 0.0],
            [1.0, 1.0, 1.0, 1.0],
        ];
        let mut x: Vec<f64> = vec![1.0, -2.0, 0.5, 0.25];
        let (mut m, mut v) = ([0.0f64; 4], [0.0f64; 4]);
        for (t, g) in gs.iter().enumerate() {
            opt.step(&mut p, &grads(*g), &Captures::new()).unwrap();
            let t = (t + 1) as i32;
            for i in 0..4 {
                let mut gi = g[i] as f64;
                if decoupled {
                    x[i] -= 0.01 * 0.1 * x[i];
                } else {
                    gi += 0.1 * x[i];
                }
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                x[i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let w = p.get(kron_autodiff::ParamId(0)).data().to_vec();
        for i in 0..3 {
            assert!(
                (w[i] as f64 - x[i]).abs() < 1e-5,
                "decoupled {decoupled} {i}: {} vs {}",
                w[i],
                x[i]
            );
        }
        assert_eq!(opt.name(), if decoupled { "adamw" } else { "adam" });
    }
}

#[test]
fn non_finite_gradients_are_refused_and_change_nothing() {
    for opt in [0, 1] {
        let mut p = store();
        let mut o: Box<dyn Optimizer> = if opt == 0 {
            Box::new(Sgd::new(&p, SgdConfig::new(0.1).with_momentum(0.9)).unwrap())
        } else {
            Box::new(Adam::new(&p, AdamConfig::default()).unwrap())
        };
        o.step(&mut p, &grads([1.0, 1.0, 1.0, 1.0]), &Captures::new())
            .unwrap();
        let (p0, s0) = (p.clone(), o.state());
        for bad in [f32::NAN, f32::INFINITY] {
            let err = o
                .step(&mut p, &grads([0.0, bad, 0.0, 0.0]), &Captures::new())
                .unwrap_err();
            assert_eq!(err, OptimError::NonFiniteGradient { param: "w".into() });
            assert!(err.to_string().contains("\"w\""));
            assert_eq!(p, p0);
            assert_eq!(o.state(), s0);
        }
    }
}

#[test]
fn state_round_trip_and_mismatch() {
    let mut p = store();
    let mut a = Adam::new(&p, AdamConfig::default()).unwrap();
    a.step(&mut p, &grads([1.0, 2.0, 3.0, 4.0]), &Captures::new())
        .unwrap();
    let s = a.state();
    let mut same = Adam::new(&p, AdamConfig::default()).unwrap();
    same.load_state(s.clone()).unwrap();
    assert_eq!(same.state(), s);
    // The moments and the step count come from the state; the configuration (tunables) stays
    // the one the optimizer was built with, so a resumed run can change its learning rate.
    let mut b = Adam::new(&p, AdamConfig::new(0.5)).unwrap();
    b.load_state(s.clone()).unwrap();
    assert_eq!(b.state().tensors, s.tensors);
    assert_eq!(b.steps_taken(), 1);
    assert_eq!(b.learning_rate(), 0.5);
    let mut sg = Sgd::new(&p, SgdConfig::new(0.1).with_momentum(0.9)).unwrap();
    sg.step(
        &mut p.clone(),
        &grads([1.0, 2.0, 3.0, 4.0]),
        &Captures::new(),
    )
    .unwrap();
    let ss = sg.state();
    let mut sg2 = Sgd::new(&p, SgdConfig::new(0.2).with_momentum(0.5)).unwrap();
    sg2.load_state(ss.clone()).unwrap();
    assert_eq!(sg2.state().tensors, ss.tensors);
    assert_eq!((sg2.learning_rate(), sg2.config().momentum), (0.2, 0.5));

    // A model whose "w" is longer refuses the state, naming the tensor; nothing changes.
    let mut q = ParamStore::new();
    q.add("w", Tensor::zeros(&[4]));
    q.add("b", Tensor::zeros(&[1]));
    let mut c = Adam::new(&q, AdamConfig::default()).unwrap();
    let before = c.state();
    let err = c.load_state(s.clone()).unwrap_err();
    assert!(
        matches!(err, OptimError::StateShape { ref name, .. } if name == "adam.m.w"),
        "{err}"
    );
    assert_eq!(c.state(), before);

    // Another optimizer's state is refused.
    let mut sgd = Sgd::new(&p, SgdConfig::default()).unwrap();
    assert!(matches!(
        sgd.load_state(s),
        Err(OptimError::BadState { .. })
    ));
}

/// Every constructor validates its configuration and names the field; `set_learning_rate`
/// refuses what the constructor would.
#[test]
fn invalid_configurations_are_refused_naming_the_field() {
    let p = store();
    let field = |e: OptimError| match e {
        OptimError::Config { field, .. } => field,
        other => panic!("{other:?}"),
    };
    let e = Sgd::new(&p, SgdConfig::new(f32::NAN)).err().unwrap();
    assert!(field(e).contains("learning rate"));
    let e = Sgd::new(&p, SgdConfig::new(0.1).with_momentum(-0.5))
        .err()
        .unwrap();
    assert_eq!(field(e), "momentum");
    let e = Adam::new(&p, AdamConfig::new(-1e-3)).err().unwrap();
    assert!(field(e).contains("learning rate"));
    let e = Adam::new(&p, AdamConfig::default().with_betas(0.9, 1.0))
        .err()
        .unwrap();
    assert_eq!(field(e), "beta2");
    let mut opt = Sgd::new(&p, SgdConfig::new(0.1)).unwrap();
    for lr in [f32::NAN, f32::INFINITY, 0.0, -1.0] {
        assert!(opt.set_learning_rate(lr).is_err(), "{lr}");
    }
    assert_eq!(opt.learning_rate(), 0.1);
}

/// An update that overflows (finite gradients, a finite but huge learning rate) is refused
/// before any parameter is written: the parameters and the velocity or moments are as they
/// were, and the error names the update and the parameter, not the gradient.
#[test]
fn an_overflowing_update_is_refused_and_changes_nothing() {
    let g = grads([1e3, -1e3, 1e3, 1.0]);
    let sgd: Box<dyn Optimizer> =
        Box::new(Sgd::new(&store(), SgdConfig::new(1e37).with_momentum(0.9)).unwrap());
    let adam: Box<dyn Optimizer> = Box::new(Adam::new(&store(), AdamConfig::new(3e38)).unwrap());
    for mut opt in [sgd, adam] {
        let mut p = store();
        // A finite first step at a sane rate, so the velocity or moments are not zero.
        opt.set_learning_rate(1e-3).unwrap();
        opt.step(&mut p, &grads([0.1, 0.2, 0.3, 0.4]), &Captures::new())
            .unwrap();
        opt.set_learning_rate(if opt.name() == "sgd" { 1e37 } else { 3e38 })
            .unwrap();
        let (p0, s0) = (p.clone(), opt.state());
        let e = opt.step(&mut p, &g, &Captures::new()).unwrap_err();
        match &e {
            OptimError::NonFiniteUpdate { param, .. } => assert_eq!(param, "w"),
            other => panic!("{}: {other:?}", opt.name()),
        }
        assert!(e.to_string().contains("update"), "{e}");
        assert_eq!(p, p0, "{}", opt.name());
        assert_eq!(opt.state(), s0, "{}", opt.name());
    }
}

/// A saved state whose configuration is out of range is refused naming the field, and the
/// optimizer is left as it was.
#[test]
fn a_state_with_an_invalid_configuration_is_refused() {
    let p = store();
    let mut opt = Sgd::new(&p, SgdConfig::new(0.1)).unwrap();
    let mut s = opt.state();
    s.meta["config"]["momentum"] = serde_json::json!(-3.0);
    let e = opt.load_state(s).unwrap_err();
    assert!(e.to_string().contains("momentum"), "{e}");
    assert_eq!(opt.config().momentum, 0.0);
}

/// AdamW's saved state says what `name()` says, and loads into AdamW only.
#[test]
fn adamw_state_is_named_as_the_optimizer() {
    let p = store();
    let mut w = Adam::new(&p, AdamConfig::adamw(1e-3, 0.01)).unwrap();
    assert_eq!(w.name(), "adamw");
    let s = w.state();
    assert_eq!(s.meta["kind"], "adamw");
    w.load_state(s.clone()).unwrap();
    let mut plain = Adam::new(&p, AdamConfig::new(1e-3)).unwrap();
    let e = plain.load_state(s).unwrap_err();
    assert!(e.to_string().contains("adamw"), "{e}");
}
