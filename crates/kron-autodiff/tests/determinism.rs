//! Same seed, same bits, whatever rayon's thread count (the GEMMs run on rayon's threads too).
//!
//! The global pool is one per process and reads its size from the environment once, so the
//! test runs this very test binary again as child processes with `RAYON_NUM_THREADS` set to 1,
//! 2 and 3; each child runs the ignored
//! helper [`determinism_child`], which prints a digest of every bit a training step produces.

use std::process::Command;

use kron_autodiff::{LossKind, ParamStore, Rng, Tape, Tensor};

/// The prefix of the line the child prints.
const MARK: &str = "KRON_DETERMINISM";

/// FNV-1a over the bits of every value fed to it.
struct Digest(u64);

impl Digest {
    fn new() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    fn tensor(&mut self, t: &Tensor) {
        for &d in t.shape() {
            self.bytes(&(d as u64).to_le_bytes());
        }
        for v in t.data() {
            self.bytes(&v.to_bits().to_le_bytes());
        }
    }

    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// One training step's worth of bits: a conv net and a dense net large enough that rayon
/// splits the batch, the elementwise kernels and the GEMMs' outputs (a batch
/// of 64, an 8 -> 16 channel conv on 16 x 16 images, 1024 -> 512 -> 512 dense layers), forward,
/// backward from the loss, a second backward from sampled labels, and the Kronecker factors.
fn digest(seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut store = ParamStore::new();
    let mut randn = |shape: &[usize], std: f32| Tensor::randn(shape, 0.0, std, &mut rng);
    let conv = store.add_layer("conv");
    let cw = store.add("conv.weight", randn(&[16, 8, 3, 3], 0.2));
    let cb = store.add("conv.bias", randn(&[16], 0.1));
    let fc1 = store.add_layer("fc1");
    let w1 = store.add("fc1.weight", randn(&[512, 1024], 0.03));
    let b1 = store.add("fc1.bias", randn(&[512], 0.1));
    let fc2 = store.add_layer("fc2");
    let w2 = store.add("fc2.weight", randn(&[512, 512], 0.05));
    let b2 = store.add("fc2.bias", randn(&[512], 0.1));
    let fc3 = store.add_layer("fc3");
    let w3 = store.add("fc3.weight", randn(&[10, 512], 0.05));
    let x = randn(&[64, 8, 16, 16], 1.0);
    let labels: Vec<usize> = (0..64).map(|_| rng.below(10) as usize).collect();

    let tape = Tape::new(&store)
        .capturing([conv, fc1, fc2, fc3])
        .with_rng(rng.fork(1));
    let t = &tape;
    let h = t
        .input(x)
        .conv2d(t.param(cw), Some(t.param(cb)), 1, 1, Some(conv))
        .relu();
    let h = h.max_pool2d(2, 2, 0).add(h.avg_pool2d(2, 2, 0)).flatten();
    let h = h
        .linear(t.param(w1), Some(t.param(b1)), Some(fc1))
        .gelu()
        .dropout(0.1);
    let h = h.linear(t.param(w2), Some(t.param(b2)), Some(fc2)).tanh();
    let out = h.linear(t.param(w3), None, Some(fc3));
    let loss = out.cross_entropy(&labels);
    let first = tape.backward(loss);
    let sampled = LossKind::CrossEntropy.sample(&out.value(), &mut rng.fork(2));
    let second = tape.backward(LossKind::CrossEntropy.apply(out, &sampled));

    let mut d = Digest::new();
    d.tensor(&loss.value());
    d.tensor(&out.value());
    for grads in [&first, &second] {
        for (_, g) in grads.params() {
            d.tensor(g);
        }
        for c in grads.captures().values() {
            d.tensor(&c.a);
            d.tensor(&c.g);
        }
    }
    assert_eq!(second.captures().len(), 4);
    for c in second.captures().values() {
        d.tensor(&c.a_factor());
        d.tensor(&c.g_factor());
        d.tensor(&c.weight_grad());
    }
    d.0
}

#[test]
#[ignore = "helper: run in a child process by same_bits_for_any_thread_count"]
fn determinism_child() {
    println!(
        "{MARK} rayon={} digest={:016x}",
        rayon::current_num_threads(),
        digest(42)
    );
}

/// Runs [`determinism_child`] with `threads` threads in both pools; returns the rayon thread
/// count the child saw and its digest.
fn run_child(threads: usize) -> (usize, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([
            "determinism_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .expect("spawn the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child with {threads} threads failed:\n{stdout}\n{stderr}"
    );
    let line = stdout
        .lines()
        // libtest may print "test determinism_child ... " on the same line first.
        .find_map(|l| l.split_once(MARK).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("child printed no {MARK} line:\n{stdout}\n{stderr}"));
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    };
    let rayon_threads = field("rayon=").parse().expect("a thread count");
    (rayon_threads, field("digest="))
}

#[test]
fn same_bits_for_any_thread_count() {
    let (r1, d1) = run_child(1);
    let (r2, d2) = run_child(2);
    let (r3, d3) = run_child(3);
    // The environment reached the pools (otherwise the comparison proves nothing).
    assert_eq!((r1, r2, r3), (1, 2, 3));
    assert_eq!(d1, d2, "1 thread vs 2 threads");
    assert_eq!(d1, d3, "1 thread vs 3 threads");
    // And this process, with its default pools, agrees.
    assert_eq!(format!("{:016x}", digest(42)), d1, "in-process vs 1 thread");
}

#[test]
fn the_digest_sees_the_seed() {
    // A digest that ignored the computation would make the comparison above vacuous.
    assert_ne!(digest(42), digest(43));
}
