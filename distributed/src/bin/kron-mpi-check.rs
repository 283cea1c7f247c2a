//! The rank program of kron-mpi's tests: every rank of `mpirun -np N kron-mpi-check SCENARIO`
//! runs one scenario over [`MpiComm`].
//!
//! * `collectives [--break KIND]`: every [`Communicator`] method, and
//!   `kron::optim::comm::all_reduce_buffers`, on values that expose a wrong sum, order or length,
//!   checked exactly on every rank, with the same bits on every rank. Prints each failed check
//!   with its rank; every rank exits with status 1 when any rank saw a failure. `--break KIND`
//!   runs the checks through a deliberately wrong communicator (`sum`: all-reduces that do not
//!   reduce; `bits`: rank 1's all-reduce results one bit off; `order`: all-gathers in reverse
//!   rank order; `length`: broadcasts one byte short), which the checks must catch.
//! * `panic`: rank 1 panics on a helper thread's rayon worker while the other ranks wait in an
//!   all-reduce and rank 1's main thread works on for a minute: the panic hook of
//!   `MpiComm::init` must end the whole job at once, naming rank 1. Needs 2 ranks or more.
//! * `die`: rank 1's process aborts (no panic, no MPI call) while the other ranks wait in an
//!   all-reduce: `mpirun` must end the job, naming rank 1. Needs 2 ranks or more.
//! * `lengths`: rank 1 passes an all-reduce one element more than the others: in builds with
//!   debug assertions the job ends with a message giving every rank's length.
//!
//! Exits with status 2 on a usage error or when MPI cannot be initialized.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use kron::optim::Communicator;
use kron::optim::comm::{BUCKET_ELEMENTS, all_reduce_buffers};
use kron_mpi::MpiComm;

const USAGE: &str = "usage: mpirun -np N kron-mpi-check SCENARIO\n\
    scenarios: collectives [--break sum|bits|order|length], panic, die, lengths,\n\
    train CHECK [PATH] (CHECK: equivalence, owners, replicated, directions, nan, mismatch,\n\
    save PATH, resume PATH)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let scenario = match args.as_slice() {
        ["collectives"] => Scenario::Collectives(None),
        ["collectives", "--break", kind] => match Break::parse(kind) {
            Some(b) => Scenario::Collectives(Some(b)),
            None => return usage(&format!("unknown breakage `{kind}`")),
        },
        ["panic"] => Scenario::Panic,
        ["die"] => Scenario::Die,
        ["lengths"] => Scenario::Lengths,
        ["train", check] => Scenario::Train(check.to_string(), None),
        ["train", check, path] => Scenario::Train(check.to_string(), Some(path.into())),
        _ => return usage(&format!("bad arguments {args:?}")),
    };
    let comm = match MpiComm::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kron-mpi-check: {e}");
            return ExitCode::from(2);
        }
    };
    match scenario {
        Scenario::Collectives(breakage) => collectives(comm, breakage),
        Scenario::Panic => panic_scenario(comm),
        Scenario::Die => die(comm),
        Scenario::Lengths => lengths(comm),
        Scenario::Train(check, path) => train(comm, &check, path.as_deref()),
    }
}

/// A data-parallel training check of `kron_examples::data_parallel::check` on every rank;
/// rank 0 prints its report. Fails on any rank that finds a failure.
fn train(comm: MpiComm, check: &str, path: Option<&std::path::Path>) -> ExitCode {
    let dp = kron::DataParallel::new(std::sync::Arc::new(comm));
    let result = kron_examples::data_parallel::check(check, &dp, path);
    let rank = dp.rank();
    // Every handle on the communicator goes before MPI is finalized.
    drop(dp);
    match result {
        Ok(report) => {
            if rank == 0 {
                println!("{report}\ntrain {check}: passed");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rank {rank}: train {check}: FAILED\n{e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("kron-mpi-check: {problem}\n{USAGE}");
    ExitCode::from(2)
}

enum Scenario {
    Collectives(Option<Break>),
    Panic,
    Die,
    Lengths,
    Train(String, Option<std::path::PathBuf>),
}

/// A deliberate fault, for proving that the checks catch one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Break {
    /// All-reduces leave every buffer as the rank passed it.
    Sum,
    /// Rank 1's all-reduce results have the lowest bit of their first element flipped.
    Bits,
    /// All-gathers return the ranks' values in reverse rank order.
    Order,
    /// Broadcasts leave non-root ranks one byte short.
    Length,
}

impl Break {
    fn parse(s: &str) -> Option<Break> {
        Some(match s {
            "sum" => Break::Sum,
            "bits" => Break::Bits,
            "order" => Break::Order,
            "length" => Break::Length,
            _ => return None,
        })
    }
}

/// [`MpiComm`] with an optional fault.
struct Faulty<'a> {
    inner: &'a MpiComm,
    fault: Option<Break>,
}

impl Communicator for Faulty<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) {
        match self.fault {
            Some(Break::Sum) => {}
            Some(Break::Bits) => {
                self.inner.all_reduce_f32(buf);
                if self.rank() == 1
                    && let Some(x) = buf.first_mut()
                {
                    *x = f32::from_bits(x.to_bits() ^ 1);
                }
            }
            _ => self.inner.all_reduce_f32(buf),
        }
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) {
        match self.fault {
            Some(Break::Sum) => {}
            Some(Break::Bits) => {
                self.inner.all_reduce_f64(buf);
                if self.rank() == 1
                    && let Some(x) = buf.first_mut()
                {
                    *x = f64::from_bits(x.to_bits() ^ 1);
                }
            }
            _ => self.inner.all_reduce_f64(buf),
        }
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) {
        self.inner.broadcast_bytes(buf, root);
        if self.fault == Some(Break::Length) && self.rank() != root {
            buf.pop();
        }
    }
    fn all_gather_f64(&self, values: &[f64]) -> Vec<f64> {
        let all = self.inner.all_gather_f64(values);
        if self.fault != Some(Break::Order) {
            return all;
        }
        let n = values.len();
        (0..self.size())
            .rev()
            .flat_map(|r| all[r * n..(r + 1) * n].iter().copied())
            .collect()
    }
    fn barrier(&self) {
        self.inner.barrier()
    }
}

/// The checks one rank made: how many passed, and what failed.
struct Checks {
    rank: usize,
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            let d = detail();
            println!("rank {}: FAIL {name}: {d}", self.rank);
            self.failed.push(name.to_owned());
        }
    }

    /// Checks that `bytes` are the same on every rank as on rank 0 (compared through the
    /// unbroken communicator `real`).
    fn same_bits(&mut self, real: &MpiComm, name: &str, bytes: Vec<u8>) {
        let mut zero = bytes.clone();
        real.broadcast_bytes(&mut zero, 0);
        let first = zero.iter().zip(&bytes).position(|(a, b)| a != b);
        self.check(
            &format!("{name}: same bits on every rank"),
            zero == bytes,
            || match first {
                Some(i) => format!("byte {i} differs from rank 0's"),
                None => format!("{} bytes here, {} on rank 0", bytes.len(), zero.len()),
            },
        );
    }

    fn exact<T: PartialEq + std::fmt::Debug>(&mut self, name: &str, got: &[T], want: &[T]) {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        self.check(name, got == want, || match first {
            Some(i) => format!("element {i}: got {:?}, want {:?}", got[i], want[i]),
            None => format!("got {} elements, want {}", got.len(), want.len()),
        });
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Rank `rank`'s contribution to the exact sums: `(i % 13 + 1) * 2^rank`. Each rank adds a
/// different power of two, so the sum `(i % 13 + 1) * (2^size - 1)` shows whether every rank
/// was added exactly once (a missing, doubled or maximum-instead-of-sum rank gives another
/// number), and all of it is exact in any order.
fn exact_term(rank: usize, i: usize) -> f64 {
    ((i % 13) + 1) as f64 * (1u64 << rank) as f64
}

fn exact_sum(size: usize, i: usize) -> f64 {
    ((i % 13) + 1) as f64 * ((1u64 << size) - 1) as f64
}

/// A value of rank `rank` at `i` whose sum over ranks depends on the order of the additions:
/// pseudo-random in [-1, 1) times 1e-3, 1 or 1e4.
fn rough_term(rank: usize, i: usize) -> f64 {
    let mut z = (rank as u64) << 40 ^ i as u64 ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let unit = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    unit * [1e-3, 1.0, 1e4][i % 3]
}

fn collectives(mut real: MpiComm, fault: Option<Break>) -> ExitCode {
    let (rank, size) = (real.rank(), real.size());
    let mut ck = Checks {
        rank,
        passed: 0,
        failed: Vec::new(),
    };
    if rank == 0 {
        println!(
            "kron-mpi-check collectives: {size} ranks, threading {:?}, fault {fault:?}\n{}",
            real.threading(),
            MpiComm::library_version()
        );
    }

    // Collectives split into many MPI calls give the same results (only the real
    // communicator has the setting; every rank sets the same value).
    real.set_max_count(1000);
    {
        let n = 2500;
        let mut a: Vec<f32> = (0..n).map(|i| exact_term(rank, i) as f32).collect();
        real.all_reduce_f32(&mut a);
        let want: Vec<f32> = (0..n).map(|i| exact_sum(size, i) as f32).collect();
        ck.exact("split all_reduce_f32: sum", &a, &want);
        let mut d: Vec<f64> = (0..n).map(|i| exact_term(rank, i)).collect();
        real.all_reduce_f64(&mut d);
        let want: Vec<f64> = (0..n).map(|i| exact_sum(size, i)).collect();
        ck.exact("split all_reduce_f64: sum", &d, &want);
        let root = size - 1;
        let mut b: Vec<u8> = if rank == root {
            (0..n).map(|i| (i * 7 % 251) as u8).collect()
        } else {
            vec![1; 3]
        };
        real.broadcast_bytes(&mut b, root);
        let want: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        ck.exact("split broadcast_bytes", &b, &want);
        let mine: Vec<f64> = (0..n).map(|i| (rank * n + i) as f64).collect();
        let g = real.all_gather_f64(&mine);
        let want: Vec<f64> = (0..size * n).map(|i| i as f64).collect();
        ck.exact("split all_gather_f64", &g, &want);
    }
    real.set_max_count(kron_mpi::DEFAULT_MAX_COUNT);

    let c = Faulty {
        inner: &real,
        fault,
    };
    ck.check("name", c.name() == "mpi", || format!("name {:?}", c.name()));
    let ranks = c.all_gather_f64(&[rank as f64]);
    let want: Vec<f64> = (0..size).map(|r| r as f64).collect();
    ck.exact("all_gather_f64 of the ranks: rank order", &ranks, &want);

    // Exact sums, of lengths around the algorithms' thresholds.
    for n in [0usize, 1, 7, 1000, 100_003] {
        let mut a: Vec<f32> = (0..n).map(|i| exact_term(rank, i) as f32).collect();
        c.all_reduce_f32(&mut a);
        let want: Vec<f32> = (0..n).map(|i| exact_sum(size, i) as f32).collect();
        ck.exact(&format!("all_reduce_f32 of {n}: sum"), &a, &want);
        ck.same_bits(&real, &format!("all_reduce_f32 of {n}"), f32_bytes(&a));
        let mut d: Vec<f64> = (0..n).map(|i| exact_term(rank, i)).collect();
        c.all_reduce_f64(&mut d);
        let want: Vec<f64> = (0..n).map(|i| exact_sum(size, i)).collect();
        ck.exact(&format!("all_reduce_f64 of {n}: sum"), &d, &want);
        ck.same_bits(&real, &format!("all_reduce_f64 of {n}"), f64_bytes(&d));
    }

    // Sums whose rounding depends on the order of the additions: every rank must get the same
    // bits, close to the exact sum. 3 Mi elements (12 MiB of f32) take Open MPI's algorithms
    // for large messages.
    for n in [1000usize, 3 << 20] {
        let exact: Vec<f64> = (0..n)
            .map(|i| (0..size).map(|r| rough_term(r, i)).sum())
            .collect();
        let mut a: Vec<f32> = (0..n).map(|i| rough_term(rank, i) as f32).collect();
        c.all_reduce_f32(&mut a);
        ck.same_bits(
            &real,
            &format!("rounded all_reduce_f32 of {n}"),
            f32_bytes(&a),
        );
        let worst = a
            .iter()
            .zip(&exact)
            .enumerate()
            .map(|(i, (&x, &e))| ((x as f64 - e).abs(), i))
            .fold((0.0f64, 0usize), |m, x| if x.0 > m.0 { x } else { m });
        // Each rounding (of a term to f32, of a partial sum below size * 1e4) is at most half
        // an ulp of size * 1e4.
        let tol = (size * size) as f64 * 1e4 * f32::EPSILON as f64;
        ck.check(
            &format!("rounded all_reduce_f32 of {n}: near the exact sum"),
            worst.0 <= tol,
            || {
                format!(
                    "element {}: off by {:e} (tolerance {tol:e})",
                    worst.1, worst.0
                )
            },
        );
        let mut d: Vec<f64> = (0..n).map(|i| rough_term(rank, i)).collect();
        c.all_reduce_f64(&mut d);
        ck.same_bits(
            &real,
            &format!("rounded all_reduce_f64 of {n}"),
            f64_bytes(&d),
        );
        let tol = (size * size) as f64 * 1e4 * f64::EPSILON;
        let bad = d.iter().zip(&exact).position(|(x, e)| (x - e).abs() > tol);
        ck.check(
            &format!("rounded all_reduce_f64 of {n}: near the exact sum"),
            bad.is_none(),
            || {
                let i = bad.unwrap_or(0);
                format!("element {i}: {} against {}", d[i], exact[i])
            },
        );
    }

    // kron's bucketing: ten small buffers around one larger than a bucket.
    {
        let mut small: Vec<Vec<f32>> = (0..10)
            .map(|b| (0..1000).map(|i| exact_term(rank, b + i) as f32).collect())
            .collect();
        let mut big: Vec<f32> = (0..BUCKET_ELEMENTS + 3)
            .map(|i| exact_term(rank, i) as f32)
            .collect();
        let mut views: Vec<&mut [f32]> = small.iter_mut().map(|v| v.as_mut_slice()).collect();
        views.insert(5, big.as_mut_slice());
        let calls = all_reduce_buffers(&c, &mut views);
        let want_calls = if size > 1 { 3 } else { 0 };
        ck.check(
            "all_reduce_buffers: two buckets and the large buffer",
            calls == want_calls,
            || format!("{calls} all-reduce calls, want {want_calls}"),
        );
        for (b, v) in small.iter().enumerate() {
            let want: Vec<f32> = (0..1000).map(|i| exact_sum(size, b + i) as f32).collect();
            ck.exact(&format!("all_reduce_buffers: small buffer {b}"), v, &want);
        }
        let want: Vec<f32> = (0..big.len()).map(|i| exact_sum(size, i) as f32).collect();
        ck.exact("all_reduce_buffers: large buffer", &big, &want);
        ck.same_bits(&real, "all_reduce_buffers: large buffer", f32_bytes(&big));

        let mut d: Vec<Vec<f64>> = (0..3)
            .map(|b| (0..10 + b).map(|i| exact_term(rank, b * i)).collect())
            .collect();
        let mut views: Vec<&mut [f64]> = d.iter_mut().map(|v| v.as_mut_slice()).collect();
        let calls = all_reduce_buffers(&c, &mut views);
        let want_calls = usize::from(size > 1);
        ck.check(
            "all_reduce_buffers f64: one bucket",
            calls == want_calls,
            || format!("{calls} calls, want {want_calls}"),
        );
        for (b, v) in d.iter().enumerate() {
            let want: Vec<f64> = (0..10 + b).map(|i| exact_sum(size, b * i)).collect();
            ck.exact(&format!("all_reduce_buffers f64: buffer {b}"), v, &want);
        }
    }

    // Broadcasts from every root; the other ranks start with bytes of another length.
    for root in 0..size {
        let want: Vec<u8> = (0..1000 + 37 * root)
            .map(|i| (i * 31 + root * 7) as u8)
            .collect();
        let mut b = if rank == root {
            want.clone()
        } else {
            vec![0xaa; rank + 3]
        };
        c.broadcast_bytes(&mut b, root);
        ck.exact(&format!("broadcast_bytes from rank {root}"), &b, &want);
    }
    {
        let root = size - 1;
        let mut b = if rank == root {
            Vec::new()
        } else {
            vec![7u8; 5]
        };
        c.broadcast_bytes(&mut b, root);
        ck.exact("broadcast_bytes of nothing", &b, &[]);
        let want: Vec<u8> = (0..5 << 20).map(|i| (i % 253) as u8).collect();
        let mut b = if rank == 0 { want.clone() } else { Vec::new() };
        c.broadcast_bytes(&mut b, 0);
        ck.exact("broadcast_bytes of 5 MiB", &b, &want);
    }

    // All-gathers: rank after rank, every value's bits kept.
    {
        let mine = [
            rank as f64 * 10.0 + 0.5,
            -(rank as f64),
            1e-300 * (rank + 1) as f64,
        ];
        let g = c.all_gather_f64(&mine);
        let want: Vec<f64> = (0..size)
            .flat_map(|r| [r as f64 * 10.0 + 0.5, -(r as f64), 1e-300 * (r + 1) as f64])
            .collect();
        ck.exact("all_gather_f64 of three values", &g, &want);
        let g = c.all_gather_f64(&[]);
        ck.exact("all_gather_f64 of nothing", &g, &[]);
        let n = 100_000;
        let mine: Vec<f64> = (0..n).map(|i| rough_term(rank, i)).collect();
        let g = c.all_gather_f64(&mine);
        let want: Vec<f64> = (0..size)
            .flat_map(|r| (0..n).map(move |i| rough_term(r, i)))
            .collect();
        ck.exact("all_gather_f64 of 100000 values", &g, &want);
    }

    // The barrier holds every rank until the last arrives.
    if size > 1 {
        c.barrier();
        let pause = Duration::from_millis(300);
        let t = Instant::now();
        if rank == size - 1 {
            std::thread::sleep(pause);
        }
        c.barrier();
        let waited = t.elapsed();
        ck.check(
            "barrier waits for the last rank",
            waited >= pause / 2,
            || format!("left the barrier after {waited:?}, the last rank arrived after {pause:?}"),
        );
    }

    // Collectives from other threads than the one that initialized MPI: a spawned thread and
    // a rayon worker, as in kron's training step.
    {
        let want: Vec<f64> = (0..5).map(|i| exact_sum(size, i)).collect();
        let c = &c;
        let from_thread = std::thread::scope(|s| {
            s.spawn(|| {
                let mut d: Vec<f64> = (0..5).map(|i| exact_term(rank, i)).collect();
                c.all_reduce_f64(&mut d);
                d
            })
            .join()
            .expect("the thread does not panic")
        });
        ck.exact("all_reduce_f64 from a spawned thread", &from_thread, &want);
        let on_worker = kron::autodiff::in_pool(|| {
            let mut d: Vec<f64> = (0..5).map(|i| exact_term(rank, i)).collect();
            c.all_reduce_f64(&mut d);
            d
        });
        ck.exact("all_reduce_f64 from a rayon worker", &on_worker, &want);
    }

    // Every rank learns whether any rank failed, and exits alike.
    let mut failures = [ck.failed.len() as f64];
    real.all_reduce_f64(&mut failures);
    let failures = failures[0] as usize;
    if rank == 0 {
        if failures == 0 {
            println!(
                "kron-mpi-check collectives: all {} checks passed on each of {size} ranks",
                ck.passed
            );
        } else {
            println!("kron-mpi-check collectives: {failures} failed checks over {size} ranks");
        }
    }
    drop(real);
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn panic_scenario(comm: MpiComm) -> ExitCode {
    let (rank, size) = (comm.rank(), comm.size());
    if size < 2 {
        eprintln!("kron-mpi-check panic: needs 2 ranks or more, runs on {size}");
        return ExitCode::from(2);
    }
    let mut x = [1.0f32];
    comm.all_reduce_f32(&mut x);
    // Rank 1 panics on a rayon worker of a helper thread while the other ranks wait in an
    // all-reduce and its own main thread goes on working (sleeps) before joining them: only the
    // panic hook's abort ends the job before that work is done.
    if rank == 1 {
        std::thread::spawn(|| {
            kron::autodiff::in_pool(|| {
                std::thread::sleep(Duration::from_millis(300));
                panic!("rank 1 fails on purpose in the panic scenario");
            })
        });
        std::thread::sleep(Duration::from_secs(60));
    }
    comm.all_reduce_f32(&mut x);
    println!("rank {rank}: past the collective after rank 1 panicked");
    ExitCode::SUCCESS
}

fn die(comm: MpiComm) -> ExitCode {
    let (rank, size) = (comm.rank(), comm.size());
    if size < 2 {
        eprintln!("kron-mpi-check die: needs 2 ranks or more, runs on {size}");
        return ExitCode::from(2);
    }
    let mut x = [1.0f32];
    comm.all_reduce_f32(&mut x);
    if rank == 1 {
        // Let the other ranks reach their all-reduce first.
        std::thread::sleep(Duration::from_millis(300));
        std::process::abort();
    }
    comm.all_reduce_f32(&mut x);
    println!("rank {rank}: past the collective after rank 1 died");
    ExitCode::SUCCESS
}

fn lengths(comm: MpiComm) -> ExitCode {
    if !cfg!(debug_assertions) {
        if comm.rank() == 0 {
            println!("kron-mpi-check lengths: skipped, the check needs debug assertions");
        }
        return ExitCode::SUCCESS;
    }
    let mut a = vec![1.0f32; 10 + usize::from(comm.rank() == 1)];
    comm.all_reduce_f32(&mut a);
    println!(
        "rank {}: all-reduced buffers of different lengths",
        comm.rank()
    );
    ExitCode::SUCCESS
}
