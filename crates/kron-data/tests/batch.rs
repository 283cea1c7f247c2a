//! Seeded batching: coverage, determinism and resumption to the bit.

use kron_autodiff::Rng;
use kron_data::{BatchState, Batches, DataError};

fn one_epoch(b: &mut Batches) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    while let Some(idx) = b.next_batch() {
        out.push(idx);
    }
    out
}

#[test]
fn an_epoch_is_a_permutation_in_batches() {
    let mut b = Batches::new(10, 3, Rng::new(1));
    assert_eq!(b.batches_per_epoch(), 4);
    let e0 = one_epoch(&mut b);
    assert_eq!(
        e0.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 3, 1]
    );
    let mut all: Vec<usize> = e0.concat();
    assert_ne!(all, (0..10).collect::<Vec<_>>(), "shuffled");
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    assert_eq!(b.epoch(), 1);
    let e1 = one_epoch(&mut b);
    assert_ne!(e0, e1, "each epoch reshuffled");
    assert_eq!(b.epoch(), 2);
}

#[test]
fn drop_last_and_no_shuffle() {
    let mut b = Batches::new(10, 3, Rng::new(1))
        .shuffle(false)
        .drop_last(true);
    assert_eq!(b.batches_per_epoch(), 3);
    assert_eq!(
        one_epoch(&mut b),
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]
    );
    assert_eq!(one_epoch(&mut b).len(), 3);

    // Too few examples for one batch: no epoch has a batch and the iterator ends.
    let mut tiny = Batches::new(2, 3, Rng::new(1)).drop_last(true);
    assert_eq!(tiny.next(), None);
    let mut empty = Batches::new(0, 3, Rng::new(1));
    assert_eq!(empty.next(), None);
}

#[test]
fn same_seed_same_batches_other_seed_other_batches() {
    let a: Vec<Vec<usize>> = Batches::new(50, 8, Rng::new(7)).take(30).collect();
    let b: Vec<Vec<usize>> = Batches::new(50, 8, Rng::new(7)).take(30).collect();
    let c: Vec<Vec<usize>> = Batches::new(50, 8, Rng::new(8)).take(30).collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn iterator_crosses_epochs_like_next_batch() {
    let mut a = Batches::new(10, 4, Rng::new(3));
    let mut by_epoch = Vec::new();
    for _ in 0..3 {
        by_epoch.extend(one_epoch(&mut a));
    }
    let endless: Vec<Vec<usize>> = Batches::new(10, 4, Rng::new(3)).take(9).collect();
    assert_eq!(by_epoch, endless);
}

#[test]
fn resume_from_state_mid_epoch_is_bit_identical() {
    let mut original = Batches::new(103, 10, Rng::new(42).fork(1));
    // Two full epochs and part of a third.
    for _ in 0..25 {
        original.next().unwrap();
    }
    assert_eq!(original.epoch(), 2);
    assert_eq!(original.cursor(), 30);

    let saved = original.state();
    let json = serde_json::to_string(&saved).unwrap();
    let restored_state: BatchState = serde_json::from_str(&json).unwrap();
    let mut resumed = Batches::from_state(restored_state).unwrap();
    assert_eq!(resumed, original);

    // Serde directly on the iterator works too.
    let mut via_serde: Batches =
        serde_json::from_str(&serde_json::to_string(&original).unwrap()).unwrap();

    let want: Vec<Vec<usize>> = original.by_ref().take(40).collect();
    let got: Vec<Vec<usize>> = resumed.by_ref().take(40).collect();
    let got2: Vec<Vec<usize>> = via_serde.by_ref().take(40).collect();
    assert_eq!(want, got);
    assert_eq!(want, got2);
    assert_eq!(original.state(), resumed.state());
}

#[test]
fn resume_at_epoch_end_keeps_epoch_boundary() {
    let mut a = Batches::new(9, 3, Rng::new(5));
    for _ in 0..3 {
        a.next_batch().unwrap();
    }
    let mut b = Batches::from_state(a.state()).unwrap();
    assert_eq!(a.next_batch(), None);
    assert_eq!(b.next_batch(), None);
    assert_eq!(one_epoch(&mut a), one_epoch(&mut b));
}

#[test]
fn inconsistent_state_is_an_error() {
    let mut s = Batches::new(10, 3, Rng::new(0)).state();
    s.cursor = 11;
    assert!(matches!(
        Batches::from_state(s.clone()),
        Err(DataError::BadState { .. })
    ));
    s.cursor = 0;
    s.batch_size = 0;
    let e = Batches::from_state(s.clone()).unwrap_err();
    assert!(e.to_string().contains("batch_size"), "{e}");
    let json = serde_json::to_string(&s).unwrap();
    assert!(serde_json::from_str::<Batches>(&json).is_err());
}

#[test]
fn batches_gather_from_a_dataset() {
    let data = kron_data::digits();
    let mut b = Batches::new(data.train.len(), 64, Rng::new(0));
    let idx = b.next_batch().unwrap();
    let (x, y) = data.train.batch(&idx);
    assert_eq!(x.shape(), &[64, 64]);
    assert_eq!(y.len(), 64);
    for (row, &i) in idx.iter().enumerate() {
        assert_eq!(y[row], data.train.labels()[i]);
        assert_eq!(
            &x.data()[row * 64..(row + 1) * 64],
            &data.train.inputs().data()[i * 64..(i + 1) * 64]
        );
    }
}

/// A position saved for a dataset of another size is refused, naming both sizes, whether the
/// new dataset is smaller (it would index past its end) or larger (it would train on the old
/// first examples only); the same size resumes.
#[test]
fn resuming_on_a_dataset_of_another_size_is_refused() {
    let mut a = Batches::new(100, 8, Rng::new(5));
    let _ = a.next_batch();
    for other in [60, 140] {
        let e = Batches::resume(a.state(), other).unwrap_err().to_string();
        assert!(e.contains("100") && e.contains(&other.to_string()), "{e}");
    }
    let mut b = Batches::resume(a.state(), 100).unwrap();
    assert_eq!(b.next_batch(), a.next_batch());
}
