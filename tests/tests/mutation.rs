//! A seeded mutation test of kron's three loaders: the IDX reader (raw and gzip), the
//! safetensors weights loader and the checkpoint loader. Valid files are truncated, have bytes
//! flipped, have length fields edited and are spliced with each other, thousands of times;
//! no input may panic, allocate more than twice the valid file's decoded size plus 64 MiB, or
//! (when refused) change the model or the optimizer. Bounded in count, so it runs in seconds.
//!
//! This binary counts every allocation (kron's `CountingAlloc` as its global allocator) and
//! holds this test alone.

use std::collections::BTreeMap;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kron::autodiff::io::{load_params, save_params};
use kron::autodiff::testing::{CountingAlloc, ScratchDir};
use kron::data::idx;
use kron::optim::{Kfac, KfacConfig};
use kron::prelude::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// The ways a valid file is damaged.
#[derive(Clone, Copy, Debug)]
enum Mutation {
    /// Cut at a random length.
    Truncate,
    /// One to four random bytes XORed with random non-zero values.
    Flip,
    /// A 4- or 8-byte field near the start (where the lengths live) overwritten with a small,
    /// a large or an extreme value, big- or little-endian.
    Length,
    /// The start of one valid file joined to the end of another (or of itself).
    Splice,
}

const MUTATIONS: [Mutation; 4] = [
    Mutation::Truncate,
    Mutation::Flip,
    Mutation::Length,
    Mutation::Splice,
];

fn mutate(m: Mutation, valid: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let pick = |rng: &mut Rng| &valid[rng.below(valid.len() as u64) as usize];
    let a = pick(rng).clone();
    match m {
        Mutation::Truncate => a[..rng.below(a.len() as u64) as usize].to_vec(),
        Mutation::Flip => {
            let mut a = a;
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(a.len() as u64) as usize;
                a[i] ^= 1 + rng.below(255) as u8;
            }
            a
        }
        Mutation::Length => {
            let mut a = a;
            let width = if rng.below(2) == 0 { 4 } else { 8 };
            let span = a.len().min(64).saturating_sub(width);
            let at = rng.below(span as u64 + 1) as usize;
            let v: u64 = match rng.below(4) {
                0 => rng.below(64),
                1 => rng.below(1 << 32),
                2 => u64::MAX - rng.below(16),
                _ => 1 << (20 + rng.below(40)),
            };
            let bytes = if rng.below(2) == 0 {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let field = if width == 4 { &bytes[..4] } else { &bytes[..] };
            let end = (at + width).min(a.len());
            a[at..end].copy_from_slice(&field[..end - at]);
            a
        }
        Mutation::Splice => {
            let b = pick(rng);
            let cut_a = rng.below(a.len() as u64 + 1) as usize;
            let cut_b = rng.below(b.len() as u64 + 1) as usize;
            let mut out = a[..cut_a].to_vec();
            out.extend_from_slice(&b[cut_b..]);
            out
        }
    }
}

/// What a loader did with the mutated inputs.
#[derive(Default)]
struct Tally {
    tried: usize,
    accepted: usize,
    errors: BTreeMap<String, usize>,
    peak: usize,
}

impl Tally {
    fn error(&mut self, e: &dyn std::fmt::Debug) {
        let kind = format!("{e:?}");
        let kind = kind
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or("?")
            .to_string();
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// Runs `load` on `input` and checks it did not panic or allocate past `limit` bytes.
fn guarded<T>(
    what: &str,
    input: &[u8],
    limit: usize,
    tally: &mut Tally,
    load: impl FnOnce() -> T,
) -> T {
    let (out, peak) = ALLOC.measure(|| catch_unwind(AssertUnwindSafe(load)));
    tally.tried += 1;
    tally.peak = tally.peak.max(peak);
    let Ok(out) = out else {
        let path = std::env::temp_dir().join(format!("kron-mutation-panic-{what}"));
        let _ = std::fs::write(&path, input);
        panic!(
            "{what}: a mutated input panicked the loader (kept at {})",
            path.display()
        );
    };
    assert!(
        peak <= limit,
        "{what}: {peak} bytes allocated for a {}-byte input (limit {limit})",
        input.len()
    );
    out
}

fn report(what: &str, t: &Tally) {
    println!(
        "{what}: {} inputs, {} accepted, {} refused {:?}, 0 panics, peak {} KiB",
        t.tried,
        t.accepted,
        t.tried - t.accepted,
        t.errors,
        t.peak / 1024
    );
}

const MIB: usize = 1 << 20;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn bits(p: &ParamStore) -> Vec<(String, Vec<u32>)> {
    p.iter()
        .map(|(_, n, t)| {
            (
                n.to_string(),
                t.data().iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

fn model(store: &mut ParamStore, seed: u64) -> Sequential {
    let mut rng = Rng::new(seed);
    Sequential::new()
        .push(Dense::new(store, "fc1", 12, 16, &mut rng))
        .push(Activation::Tanh)
        .push(Dense::new(store, "fc2", 16, 4, &mut rng))
}

#[test]
fn mutated_files_never_panic_overallocate_or_change_the_model() {
    let mut rng = Rng::new(2026);

    // IDX: raw and gzip images and labels, in memory.
    let images = idx::encode_u8(
        &[30, 8, 8],
        &(0..30 * 64).map(|i| i as u8).collect::<Vec<_>>(),
    );
    let labels = idx::encode_u8(&[30], &(0..30).map(|i| (i % 10) as u8).collect::<Vec<_>>());
    let valid = vec![images.clone(), labels.clone(), gzip(&images), gzip(&labels)];
    let limit = 2 * images.len() + 64 * MIB;
    let mut t = Tally::default();
    for i in 0..20_000 {
        let input = mutate(MUTATIONS[i % 4], &valid, &mut rng);
        let r = guarded("idx", &input, limit, &mut t, || {
            (
                idx::parse_images(&input, "m".as_ref()).map(drop),
                idx::parse_labels(&input, "m".as_ref()).map(drop),
                idx::parse_idx(&input, "m".as_ref()).map(drop),
            )
        });
        match r.2 {
            Ok(()) => t.accepted += 1,
            Err(e) => t.error(&e),
        }
    }
    report("IDX reader", &t);
    assert_eq!(t.tried, 20_000);

    // Safetensors weights.
    let dir = ScratchDir::new("mutation");
    let mut store = ParamStore::new();
    let _m = model(&mut store, 1);
    let mut other = ParamStore::new();
    let _o = model(&mut other, 2);
    let (w1, w2) = (dir.path().join("w1"), dir.path().join("w2"));
    save_params(&store, &w1).unwrap();
    save_params(&other, &w2).unwrap();
    let valid = vec![std::fs::read(&w1).unwrap(), std::fs::read(&w2).unwrap()];
    let limit = 2 * valid[0].len() + 64 * MIB;
    let path = dir.path().join("mutated");
    let mut t = Tally::default();
    for i in 0..4000 {
        let input = mutate(MUTATIONS[i % 4], &valid, &mut rng);
        std::fs::write(&path, &input).unwrap();
        let mut target = store.clone();
        let before = bits(&target);
        match guarded("weights", &input, limit, &mut t, || {
            load_params(&mut target, &path)
        }) {
            Ok(()) => t.accepted += 1,
            Err(e) => {
                assert_eq!(
                    bits(&target),
                    before,
                    "a refused weights file changed the model"
                );
                t.error(&e);
            }
        }
    }
    report("weights loader", &t);

    // Checkpoints, with KFAC's state (factors, inverses, counters, config).
    let (x, y) = {
        let mut r = Rng::new(9);
        (
            Tensor::randn(&[32, 12], 0.0, 1.0, &mut r),
            (0..32).map(|i| i % 4).collect::<Vec<usize>>(),
        )
    };
    let mut saved = Vec::new();
    for seed in [1, 2] {
        let mut p = ParamStore::new();
        let m = model(&mut p, seed);
        let mut opt = Kfac::new(&m, &p, KfacConfig::default().with_inverse_period(2)).unwrap();
        let mut r = Rng::new(seed);
        for _ in 0..3 {
            let t = Targets::Classes(y.clone());
            train_step(&m, LossKind::CrossEntropy, &mut p, &mut opt, &x, &t, &mut r).unwrap();
        }
        let f = dir.path().join(format!("ck{seed}"));
        let st = TrainState {
            step: 3,
            rng: r.clone(),
            data: Some(kron::data::Batches::new(8, 4, Rng::new(3)).state()),
        };
        save_checkpoint(&f, &p, &opt, &st).unwrap();
        saved.push(std::fs::read(&f).unwrap());
    }
    let limit = 2 * saved[0].len() + 64 * MIB;
    let mut t = Tally::default();
    let mut p = ParamStore::new();
    let m = model(&mut p, 1);
    let mut opt = Kfac::new(&m, &p, KfacConfig::default().with_inverse_period(2)).unwrap();
    for i in 0..4000 {
        let input = mutate(MUTATIONS[i % 4], &saved, &mut rng);
        std::fs::write(&path, &input).unwrap();
        let (pb, ob) = (bits(&p), state_bits(&opt));
        match guarded("checkpoint", &input, limit, &mut t, || {
            load_checkpoint(&path, &mut p, &mut opt)
        }) {
            Ok(_) => t.accepted += 1,
            Err(e) => {
                assert_eq!(bits(&p), pb, "a refused checkpoint changed the model");
                assert_eq!(
                    state_bits(&opt),
                    ob,
                    "a refused checkpoint changed the optimizer"
                );
                t.error(&e);
            }
        }
    }
    report("checkpoint loader", &t);
}

/// The optimizer's whole exported state, as bits and text.
fn state_bits(opt: &dyn Optimizer) -> (Vec<(String, Vec<u32>)>, String) {
    let s = opt.state();
    (
        s.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.data().iter().map(|v| v.to_bits()).collect()))
            .collect(),
        s.meta.to_string(),
    )
}
