//! Draws on a shard of a batch are the whole batch's draws for those examples: sampled labels
//! of every loss and dropout masks (two dropout layers in a row, so the second starts where
//! the first left the generator), for shards of every split, so data-parallel ranks draw what
//! one process draws.

use kron_autodiff::{LossKind, Rng, Tape, Targets, Tensor};

fn rows(x: &Tensor, first: usize, len: usize) -> Tensor {
    let mut shape = x.shape().to_vec();
    let row: usize = shape[1..].iter().product();
    shape[0] = len;
    Tensor::from_vec(x.data()[first * row..(first + len) * row].to_vec(), &shape)
}

fn target_rows(t: &Targets, first: usize, len: usize) -> Targets {
    match t {
        Targets::Classes(c) => Targets::Classes(c[first..first + len].to_vec()),
        Targets::Values(v) => Targets::Values(rows(v, first, len)),
    }
}

const SPLITS: [&[usize]; 4] = [&[9], &[4, 5], &[1, 1, 7], &[3, 0, 3, 3]];

#[test]
fn sampled_labels_of_a_shard_are_the_whole_batchs() {
    let out = Tensor::randn(&[9, 4], 0.0, 2.0, &mut Rng::new(3));
    for loss in [
        LossKind::CrossEntropy,
        LossKind::SquaredError,
        LossKind::SigmoidBce,
    ] {
        let whole = loss.sample(&out, &mut Rng::new(11));
        for split in SPLITS {
            let mut first = 0;
            for &len in split {
                let part = loss.sample_shard(&rows(&out, first, len), &mut Rng::new(11), first);
                assert_eq!(
                    part,
                    target_rows(&whole, first, len),
                    "{loss:?}: examples {first}..{}",
                    first + len
                );
                first += len;
            }
        }
    }
}

#[test]
fn dropout_masks_of_a_shard_are_the_whole_batchs() {
    let x = Tensor::randn(&[9, 2, 3], 1.0, 0.1, &mut Rng::new(4));
    let masks = |x: Tensor, shard: Option<(usize, usize)>| -> (Tensor, Tensor) {
        let tape = Tape::without_params().with_rng(Rng::new(21));
        let tape = match shard {
            Some((first, global)) => tape.with_shard(first, global),
            None => tape,
        };
        let a = tape.input(x).dropout(0.5);
        let b = a.dropout(0.3);
        (a.value(), b.value())
    };
    let (wa, wb) = masks(x.clone(), None);
    // Not the same mask twice: the second layer draws on from where the first stopped.
    assert_ne!(wa.data(), wb.data());
    for split in SPLITS {
        let mut first = 0;
        for &len in split {
            if len > 0 {
                let (a, b) = masks(rows(&x, first, len), Some((first, 9)));
                assert_eq!(a, rows(&wa, first, len), "first layer, from {first}");
                assert_eq!(b, rows(&wb, first, len), "second layer, from {first}");
            }
            first += len;
        }
    }
}
