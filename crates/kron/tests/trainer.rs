//! `Trainer` against the pieces: the same bits as `train_step`, resume to the bit through
//! `save`/`resume` (SGD, Adam, KFAC), the epoch helper, and weights alone.

use kron::data::Batches;
mod common;

use common::{data, model, temp};
use kron::prelude::*;

fn gather(x: &Tensor, y: &[usize], idx: &[usize]) -> (Tensor, Targets) {
    let mut d = Vec::with_capacity(idx.len() * 6);
    for &i in idx {
        d.extend_from_slice(&x.data()[i * 6..(i + 1) * 6]);
    }
    (
        Tensor::from_vec(d, &[idx.len(), 6]),
        Targets::Classes(idx.iter().map(|&i| y[i]).collect()),
    )
}

fn make_opt(kind: &str, model: &dyn Module, store: &ParamStore) -> Box<dyn Optimizer> {
    match kind {
        "sgd" => Box::new(Sgd::new(store, SgdConfig::new(0.1).with_momentum(0.9)).unwrap()),
        "adam" => Box::new(Adam::new(store, AdamConfig::new(1e-2)).unwrap()),
        "kfac" => Box::new(
            Kfac::new(
                model,
                store,
                KfacConfig::new(0.05)
                    .with_damping(0.1)
                    .with_inverse_period(2),
            )
            .unwrap(),
        ),
        _ => unreachable!(),
    }
}

const KINDS: [&str; 3] = ["sgd", "adam", "kfac"];

fn trainer(kind: &str, seed: u64) -> Trainer<Sequential> {
    let mut params = ParamStore::new();
    let m = model(&mut params, seed);
    let opt = make_opt(kind, &m, &params);
    Trainer::new(m, params, opt, LossKind::CrossEntropy, Rng::new(4))
}

#[test]
fn a_trainer_run_has_the_bits_of_the_same_run_through_train_step() {
    let (x, y) = data();
    for kind in KINDS {
        let mut t = trainer(kind, 1);
        let mut params = ParamStore::new();
        let m = model(&mut params, 1);
        let mut opt = make_opt(kind, &m, &params);
        let mut rng = Rng::new(4);
        let mut b1 = Batches::new(40, 16, Rng::new(9));
        let mut b2 = b1.clone();
        for _ in 0..8 {
            let (xb, yb) = gather(&x, &y, &b1.next().unwrap());
            let a = t.step(&xb, &yb).unwrap();
            let (xb, yb) = gather(&x, &y, &b2.next().unwrap());
            let b = train_step(
                &m,
                LossKind::CrossEntropy,
                &mut params,
                opt.as_mut(),
                &xb,
                &yb,
                &mut rng,
            )
            .unwrap();
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{kind}");
            assert_eq!(a.report.lr, b.report.lr, "{kind}");
        }
        assert_eq!(t.params(), &params, "{kind}");
        assert_eq!(t.optimizer().state(), opt.state(), "{kind}");
        assert_eq!(t.rng(), &rng, "{kind}");
        assert_eq!(t.steps(), 8);
        assert_eq!(t.optimizer().name(), opt.name());
        let (xs, ys) = gather(&x, &y, &(0..40).collect::<Vec<_>>());
        assert_eq!(
            t.evaluate(&xs, &ys, 16),
            evaluate(&m, &params, LossKind::CrossEntropy, &xs, &ys, 16)
        );
        assert_eq!(t.predict(&xs, 7), predict(&m, &params, &xs, 7));
    }
}

#[test]
fn a_trainer_saved_mid_epoch_resumes_with_the_bits_of_the_run_that_never_stopped() {
    let (x, y) = data();
    for kind in KINDS {
        let run = |t: &mut Trainer<Sequential>, b: &mut Batches, n: usize| {
            let mut losses = Vec::new();
            for _ in 0..n {
                let (xb, yb) = gather(&x, &y, &b.next().unwrap());
                losses.push(t.step(&xb, &yb).unwrap().loss);
            }
            losses
        };
        let mut straight = trainer(kind, 1);
        let mut b1 = Batches::new(40, 16, Rng::new(9)).drop_last(true);
        let l1 = run(&mut straight, &mut b1, 7);

        let mut first = trainer(kind, 1);
        let mut b2 = Batches::new(40, 16, Rng::new(9)).drop_last(true);
        run(&mut first, &mut b2, 3);
        let path = temp(&format!("{kind}.safetensors"));
        first.save(&path, Some(b2.state())).unwrap();
        drop(first);

        // Another initialization and generator: everything must come from the file.
        let mut params = ParamStore::new();
        let m = model(&mut params, 77);
        let opt = make_opt(kind, &m, &params);
        let mut resumed = Trainer::new(m, params, opt, LossKind::CrossEntropy, Rng::new(123));
        let position = resumed.resume(&path).unwrap().expect("a batch position");
        assert_eq!(position, b2.state());
        assert_eq!(resumed.steps(), 3);
        let mut b3 = Batches::resume(position, 40).unwrap();
        let l3 = run(&mut resumed, &mut b3, 4);
        assert_eq!(&l1[3..], &l3[..], "{kind}: losses differ");
        assert_eq!(resumed.params(), straight.params(), "{kind}: parameters");
        assert_eq!(
            resumed.optimizer().state(),
            straight.optimizer().state(),
            "{kind}: optimizer state"
        );
        assert_eq!(resumed.steps(), 7);
        assert_eq!(b3.state(), b1.state());
    }
}

#[test]
fn a_refused_resume_changes_nothing() {
    let mut t = trainer("sgd", 1);
    let path = temp("adam.safetensors");
    trainer("adam", 2).save(&path, None).unwrap();
    let before = t.params().clone();
    assert!(t.resume(&path).is_err());
    assert_eq!(t.params(), &before);
    assert_eq!(t.steps(), 0);
    // A checkpoint without a batch position gives `None`.
    let mut a = trainer("adam", 3);
    assert_eq!(a.resume(&path).unwrap(), None);
}

#[test]
fn an_epoch_is_a_step_on_each_of_the_epochs_batches() {
    let (x, y) = data();
    let mut t = trainer("kfac", 1);
    let mut manual = trainer("kfac", 1);
    let mut b1 = Batches::new(40, 16, Rng::new(9));
    let mut b2 = b1.clone();
    let out = t.epoch(&mut b1, |idx| gather(&x, &y, idx)).unwrap();
    let mut losses = Vec::new();
    while let Some(idx) = b2.next_batch() {
        let (xb, yb) = gather(&x, &y, &idx);
        losses.push(manual.step(&xb, &yb).unwrap().loss as f64);
    }
    assert_eq!(out.steps, 3);
    assert_eq!(losses.len(), 3);
    assert_eq!(
        out.mean_loss,
        (losses.iter().sum::<f64>() / 3.0) as f32,
        "mean of the steps' losses"
    );
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert_eq!(t.params(), manual.params());
    assert_eq!(b1.epoch(), 1);
    assert_eq!(b1.state(), b2.state());
}

#[test]
fn weights_alone_save_and_load_back_to_the_bit() {
    let t = trainer("adam", 1);
    let path = temp("weights.safetensors");
    save_weights(&path, t.params()).unwrap();
    let mut params = ParamStore::new();
    let _m = model(&mut params, 5);
    assert_ne!(&params, t.params());
    load_weights(&path, &mut params).unwrap();
    assert_eq!(&params, t.params());

    // The weights of a checkpoint load too.
    let ck = temp("weights-ck.safetensors");
    let mut k = trainer("kfac", 6);
    let (x, y) = data();
    let (xb, yb) = gather(&x, &y, &(0..8).collect::<Vec<_>>());
    k.step(&xb, &yb).unwrap();
    k.save(&ck, None).unwrap();
    load_weights(&ck, &mut params).unwrap();
    assert_eq!(&params, k.params());

    // Another architecture: an error naming the tensor, and nothing changes.
    let mut other = ParamStore::new();
    let mut rng = Rng::new(0);
    let _o = Dense::new(&mut other, "fc1", 6, 8, &mut rng);
    let before = other.clone();
    let err = load_weights(&path, &mut other).unwrap_err().to_string();
    assert!(err.contains("fc1.weight"), "{err}");
    assert_eq!(other, before);
    // A missing file names it.
    let missing = temp("none.safetensors");
    let err = load_weights(&missing, &mut other).unwrap_err().to_string();
    assert!(err.contains("none.safetensors"), "{err}");
}
