//! The training step and checkpoints: resume to the bit, refusals that change nothing.

mod common;

use common::{data, model, temp};
use kron::prelude::*;
use kron::{CheckpointError, TrainState};

/// The batch of step `s` (a fixed cyclic order, standing in for a data iterator).
fn batch(x: &Tensor, y: &[usize], s: u64) -> (Tensor, Targets) {
    let start = (s as usize * 8) % 40;
    let xb = Tensor::from_vec(x.data()[start * 6..(start + 8) * 6].to_vec(), &[8, 6]);
    (xb, Targets::Classes(y[start..start + 8].to_vec()))
}

fn make_opt(kind: &str, store: &ParamStore) -> Box<dyn Optimizer> {
    use kron::optim::{
        EigenDamping, Fallback, InverseMethod, Kfac, KfacConfig, LevenbergMarquardt, StepRule,
    };
    let mut dummy = ParamStore::new();
    let blocks = model(&mut dummy, 0).fisher_blocks();
    match kind {
        "sgd" => Box::new(Sgd::new(store, SgdConfig::new(0.1).with_momentum(0.9)).unwrap()),
        "kfac" => Box::new(
            Kfac::with_backend(
                blocks,
                store,
                KfacConfig::default().with_inverse_period(2),
                Box::new(kron::optim::CpuBackend::default()),
            )
            .unwrap(),
        ),
        // Statistics and refreshed results in f64, checkpointed as F64 tensors.
        "kfac-f64" | "kfac-eigen-f64" => {
            let mut cfg = KfacConfig::default()
                .with_inverse_period(2)
                .with_precision(kron::optim::Precision::F64);
            if kind == "kfac-eigen-f64" {
                cfg = cfg.with_method(InverseMethod::Eigen(EigenDamping::Factored));
            }
            Box::new(
                Kfac::with_backend(
                    blocks,
                    store,
                    cfg,
                    Box::new(kron::optim::CpuBackend::new(kron::optim::Precision::F64)),
                )
                .unwrap(),
            )
        }
        "kfac-eigen-lm" => Box::new(
            Kfac::with_backend(
                blocks,
                store,
                KfacConfig::default()
                    .with_inverse_period(2)
                    .with_method(InverseMethod::Eigen(EigenDamping::Tikhonov))
                    .with_adaptive_damping(Some(LevenbergMarquardt {
                        interval: 2,
                        ..Default::default()
                    }))
                    .with_fallback(Fallback::Adam(AdamConfig::default())),
                Box::new(kron::optim::CpuBackend::default()),
            )
            .unwrap(),
        ),
        "kfac-quadratic-lm" => Box::new(
            Kfac::with_backend(
                blocks,
                store,
                KfacConfig::default()
                    .with_inverse_period(3)
                    .with_step_rule(StepRule::QuadraticModel)
                    .with_curvature_examples(Some(4))
                    .with_damping(0.1)
                    .with_weight_decay(1e-4)
                    .with_adaptive_damping(Some(LevenbergMarquardt {
                        interval: 2,
                        ..Default::default()
                    })),
                Box::new(kron::optim::CpuBackend::default()),
            )
            .unwrap(),
        ),
        _ => Box::new(Adam::new(store, AdamConfig::new(0.01)).unwrap()),
    }
}

#[test]
fn resumed_run_matches_uninterrupted_run_bit_for_bit() {
    let (x, y) = data();
    for kind in [
        "sgd",
        "adam",
        "kfac",
        "kfac-f64",
        "kfac-eigen-f64",
        "kfac-eigen-lm",
        "kfac-quadratic-lm",
    ] {
        // Uninterrupted: 6 steps.
        let mut p1 = ParamStore::new();
        let m1 = model(&mut p1, 1);
        let mut o1 = make_opt(kind, &p1);
        let mut r1 = Rng::new(5);
        let mut losses1 = vec![];
        for s in 0..6 {
            let (xb, yb) = batch(&x, &y, s);
            let out = train_step(
                &m1,
                LossKind::CrossEntropy,
                &mut p1,
                o1.as_mut(),
                &xb,
                &yb,
                &mut r1,
            )
            .unwrap();
            losses1.push(out.loss);
        }
        // Interrupted after 3 steps, saved, restored into fresh objects, 3 more.
        let mut p2 = ParamStore::new();
        let m2 = model(&mut p2, 1);
        let mut o2 = make_opt(kind, &p2);
        let mut r2 = Rng::new(5);
        for s in 0..3 {
            let (xb, yb) = batch(&x, &y, s);
            train_step(
                &m2,
                LossKind::CrossEntropy,
                &mut p2,
                o2.as_mut(),
                &xb,
                &yb,
                &mut r2,
            )
            .unwrap();
        }
        let path = temp(&format!("{kind}.safetensors"));
        let st = TrainState {
            step: 3,
            rng: r2.clone(),
            data: Some(kron::data::Batches::new(40, 8, Rng::new(5)).state()),
        };
        save_checkpoint(&path, &p2, o2.as_ref(), &st).unwrap();

        let mut p3 = ParamStore::new();
        let m3 = model(&mut p3, 77); // different init: everything must come from the file
        let mut o3 = make_opt(kind, &p3);
        let st3 = load_checkpoint(&path, &mut p3, o3.as_mut()).unwrap();
        assert_eq!(st3, st);
        let mut r3 = st3.rng;
        let mut losses3 = vec![];
        for s in 3..6 {
            let (xb, yb) = batch(&x, &y, s);
            let out = train_step(
                &m3,
                LossKind::CrossEntropy,
                &mut p3,
                o3.as_mut(),
                &xb,
                &yb,
                &mut r3,
            )
            .unwrap();
            losses3.push(out.loss);
        }
        if kind.contains("f64") {
            let st = o2.state();
            assert!(
                !st.tensors64.is_empty() && st.tensors.keys().all(|n| n.contains("velocity")),
                "{kind}: f64 statistics are stored as f64"
            );
        }
        assert_eq!(p3, p1, "{kind}: parameters differ after resume");
        assert_eq!(o3.state(), o1.state(), "{kind}: optimizer state differs");
        assert_eq!(&losses1[3..], &losses3[..], "{kind}: losses differ");
    }
}

#[test]
fn mismatched_or_damaged_checkpoints_are_refused_and_change_nothing() {
    let mut p = ParamStore::new();
    let _m = model(&mut p, 1);
    let o = make_opt("adam", &p);
    let path = temp("good.safetensors");
    let st = TrainState {
        step: 0,
        rng: Rng::new(1),
        data: None,
    };
    save_checkpoint(&path, &p, o.as_ref(), &st).unwrap();

    // Another architecture: the error names the tensor; nothing changes.
    let mut q = ParamStore::new();
    let mut rng = Rng::new(3);
    let _ = Dense::new(&mut q, "fc1", 6, 17, &mut rng);
    let _ = Dense::new(&mut q, "fc2", 17, 3, &mut rng);
    let mut oq = make_opt("adam", &q);
    let (q0, s0) = (q.clone(), oq.state());
    let err = load_checkpoint(&path, &mut q, oq.as_mut()).unwrap_err();
    assert!(err.to_string().contains("model/fc1.weight"), "{err}");
    assert_eq!(q, q0);
    assert_eq!(oq.state(), s0);

    // Another optimizer.
    let mut os = make_opt("sgd", &p);
    let err = load_checkpoint(&path, &mut p.clone(), os.as_mut()).unwrap_err();
    assert!(matches!(err, CheckpointError::Meta { .. }), "{err}");

    // Damaged bytes.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    let bad = temp("damaged.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let mut p4 = p.clone();
    let mut o4 = make_opt("adam", &p4);
    let err = load_checkpoint(&bad, &mut p4, o4.as_mut()).unwrap_err();
    assert!(matches!(err, CheckpointError::File(_)), "{err}");
    assert!(err.to_string().contains("damaged.safetensors"), "{err}");
    assert_eq!(p4, p);
}

#[test]
fn a_nan_step_changes_nothing() {
    let mut p = ParamStore::new();
    let m = model(&mut p, 1);
    let mut o = make_opt("sgd", &p);
    let (x, y) = data();
    let (mut xb, yb) = batch(&x, &y, 0);
    xb.data_mut()[0] = f32::NAN;
    let (p0, s0) = (p.clone(), o.state());
    let mut rng = Rng::new(0);
    let err = train_step(
        &m,
        LossKind::CrossEntropy,
        &mut p,
        o.as_mut(),
        &xb,
        &yb,
        &mut rng,
    );
    assert!(err.is_err());
    assert_eq!(p, p0);
    assert_eq!(o.state(), s0);
}

/// A run driven by the data crate's shuffling iterator, checkpointed mid-epoch with the
/// iterator's position in the training state, resumes with the same bits.
#[test]
fn resume_mid_epoch_with_the_batch_iterator() {
    use kron::data::Batches;
    let (x, y) = data();
    let gather = |idx: &[usize]| {
        let mut d = Vec::new();
        for &i in idx {
            d.extend_from_slice(&x.data()[i * 6..(i + 1) * 6]);
        }
        (
            Tensor::from_vec(d, &[idx.len(), 6]),
            Targets::Classes(idx.iter().map(|&i| y[i]).collect()),
        )
    };
    // 40 examples, batch 16, drop-last: 2 batches an epoch; 7 steps cross 3 epochs, and the
    // checkpoint after step 3 falls in the middle of the second epoch.
    let steps = |m: &Sequential,
                 p: &mut ParamStore,
                 o: &mut dyn Optimizer,
                 b: &mut Batches,
                 r: &mut Rng,
                 n: usize| {
        for _ in 0..n {
            let idx = b.next_batch().or_else(|| b.next_batch()).unwrap();
            let (xb, yb) = gather(&idx);
            train_step(m, LossKind::CrossEntropy, p, o, &xb, &yb, r).unwrap();
        }
    };
    let fresh = |seed| {
        let mut p = ParamStore::new();
        let m = model(&mut p, seed);
        let o = make_opt("kfac", &p);
        (p, m, o)
    };
    let (mut p1, m1, mut o1) = fresh(1);
    let mut b1 = Batches::new(40, 16, Rng::new(9)).drop_last(true);
    let mut r1 = Rng::new(4);
    steps(&m1, &mut p1, o1.as_mut(), &mut b1, &mut r1, 7);

    let (mut p2, m2, mut o2) = fresh(1);
    let mut b2 = Batches::new(40, 16, Rng::new(9)).drop_last(true);
    let mut r2 = Rng::new(4);
    steps(&m2, &mut p2, o2.as_mut(), &mut b2, &mut r2, 3);
    let path = temp("mid-epoch.safetensors");
    let st = TrainState {
        step: 3,
        rng: r2,
        data: Some(b2.state()),
    };
    save_checkpoint(&path, &p2, o2.as_ref(), &st).unwrap();

    let (mut p3, m3, mut o3) = fresh(2);
    let st3 = load_checkpoint(&path, &mut p3, o3.as_mut()).unwrap();
    let mut b3 = Batches::resume(st3.data.unwrap(), 40).unwrap();
    let mut r3 = st3.rng;
    steps(&m3, &mut p3, o3.as_mut(), &mut b3, &mut r3, 4);
    assert_eq!(p3, p1);
    assert_eq!(o3.state(), o1.state());
    assert_eq!(b3.state(), b1.state());
}

/// A checkpoint never holds a configuration it cannot load: a non-finite learning rate or
/// damping is refused when the optimizer is built or the rate is set (JSON would have written
/// it as `null`), and what an optimizer can hold saves and loads back unchanged.
#[test]
fn no_checkpoint_is_saved_that_cannot_be_loaded() {
    use kron::optim::{Kfac, KfacConfig};
    let mut p = ParamStore::new();
    let m = model(&mut p, 1);
    for cfg in [
        KfacConfig::new(f32::NAN),
        KfacConfig::default().with_damping(f32::INFINITY),
        KfacConfig::default().with_kl_clip(Some(f32::NAN)),
    ] {
        assert!(Kfac::new(&m, &p, cfg).is_err(), "{cfg:?}");
    }
    let mut opt = Kfac::new(&m, &p, KfacConfig::new(0.05).with_damping(0.3)).unwrap();
    assert!(opt.set_learning_rate(f32::NAN).is_err());
    let path = temp("no-null.safetensors");
    let st = TrainState {
        step: 0,
        rng: Rng::new(1),
        data: None,
    };
    save_checkpoint(&path, &p, &opt, &st).unwrap();
    let mut p2 = ParamStore::new();
    let m2 = model(&mut p2, 2);
    let mut opt2 = Kfac::new(&m2, &p2, KfacConfig::new(0.05).with_damping(0.3)).unwrap();
    load_checkpoint(&path, &mut p2, &mut opt2).unwrap();
    assert_eq!(opt2.state(), opt.state());
    // Tunables come from the configuration the run resumes with, not from the file.
    let mut p3 = ParamStore::new();
    let m3 = model(&mut p3, 3);
    let mut opt3 = Kfac::new(&m3, &p3, KfacConfig::new(0.2).with_damping(0.01)).unwrap();
    load_checkpoint(&path, &mut p3, &mut opt3).unwrap();
    assert_eq!(opt3.learning_rate(), 0.2);
    assert_eq!(opt3.damping(), 0.01);
    // Structural settings must agree: a state of the inverse method does not load into the
    // eigenbasis method.
    let eigen = KfacConfig::default().with_method(kron::optim::InverseMethod::Eigen(
        kron::optim::EigenDamping::Factored,
    ));
    let mut opt4 = Kfac::new(&m3, &p3, eigen).unwrap();
    let e = load_checkpoint(&path, &mut p3, &mut opt4).unwrap_err();
    assert!(e.to_string().contains("structural field method"), "{e}");
}

/// An empty dataset is evaluated without a panic: no mean, so the loss is NaN and there is no
/// accuracy; `predict` gives an empty tensor.
#[test]
fn an_empty_dataset_evaluates_without_a_panic() {
    let mut p = ParamStore::new();
    let m = model(&mut p, 1);
    let x = Tensor::zeros(&[0, 6]);
    assert_eq!(predict(&m, &p, &x, 16).numel(), 0);
    let e = evaluate(
        &m,
        &p,
        LossKind::CrossEntropy,
        &x,
        &Targets::Classes(vec![]),
        16,
    );
    assert!(e.loss.is_nan() && e.accuracy.is_none(), "{e:?}");
}
