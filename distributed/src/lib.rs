//! # kron-mpi
//!
//! kron's MPI transport: [`MpiComm`] implements [`kron::optim::Communicator`] over
//! `MPI_COMM_WORLD` of Open MPI, through the `mpi` crate (rsmpi). Start one process per rank
//! with `mpirun -np N program`; each calls [`MpiComm::init`] once and hands the communicator to
//! kron's data-parallel training. The crate lives outside kron's main workspace, so that
//! building kron needs no MPI.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kron::optim::{Communicator, Shard};
//!
//! let comm = Arc::new(kron_mpi::MpiComm::init()?);
//! println!("rank {} of {}", comm.rank(), comm.size());
//! let shard = Shard::of(comm, 256); // this rank's examples of a global batch of 256
//! # Ok::<(), String>(())
//! ```
//!
//! ## Threads
//!
//! [`MpiComm::init`] asks MPI for the threading level `MPI_THREAD_SERIALIZED`: any thread may
//! call MPI, one at a time. The lower level `MPI_THREAD_FUNNELED` would not do: it allows MPI
//! calls only from the thread that initialized MPI, and kron calls its collectives from inside
//! a training step, which runs on a rayon worker (`kron::autodiff::in_pool`), not on the
//! program's main thread, and not always on the same worker. kron makes one collective call at
//! a time, and [`MpiComm`] holds a lock around each of its calls into MPI, so two threads that
//! share it never call MPI together. `init` refuses an MPI library that provides less than
//! `MPI_THREAD_SERIALIZED`.
//!
//! ## When a rank fails
//!
//! Collectives are infallible, as the [`Communicator`] seam says. `MpiComm` leaves MPI's
//! default error handler, `MPI_ERRORS_ARE_FATAL`, in place: an error inside MPI (a rank that
//! passed a buffer of another length, a lost connection) aborts the job with MPI's own message.
//! When a rank's process dies (killed, crashed, or exited without finalizing MPI), Open MPI's
//! `mpirun` notices it and kills the other ranks, and exits with a non-zero status naming the
//! rank that failed (the rank program's `die` scenario checks this).
//!
//! In builds with debug assertions, every collective first checks that all ranks passed
//! buffers of the same length (one extra all-gather of one number), and panics with every
//! rank's length otherwise, as [`kron::optim::LocalGroup`] does.
//!
//! A rank that panics would otherwise leave the others waiting in their next collective until
//! its process exits. [`MpiComm::init`] therefore installs a panic hook that prints the panic
//! with the rank in front (`rank 1: panicked at src/main.rs:10:5: message (thread 'main')`),
//! with a backtrace when `RUST_BACKTRACE` asks for one, and then calls `MPI_Abort`, which stops
//! every rank of the job at once. The hook runs when the panic starts, before unwinding: a
//! panic that the program would catch (`std::panic::catch_unwind`) stops the job as well, and
//! so does a panic on another thread while one is inside a collective (`MPI_Abort` is the one
//! call that is made then regardless of the lock). Once the [`MpiComm`] is dropped (MPI
//! finalized), the hook hands panics to the hook that was installed before it.
//!
//! ## Reductions
//!
//! The all-reduces sum with `MPI_SUM`. Every rank ends with the same bits: the algorithms of
//! Open MPI's default collective component (`tuned`) compute each element's sum once and send
//! it to every rank (ring, reduce then broadcast), or have two ranks add the same two partial
//! sums, in either order of the operands, which does not change the bits (recursive doubling).
//! The rank program's `collectives` scenario checks this on buffers whose sum depends on the
//! order of the additions, small ones and ones large enough for Open MPI's ring algorithm.
//! The order of the additions is Open MPI's, not rank order: a sum over MPI can differ in its
//! last bits from the same sum by [`kron::optim::LocalGroup`] or on one process.
//!
//! The rsmpi crate does not expose `MPI_IN_PLACE`, so each all-reduce copies the buffer into a
//! scratch buffer that the communicator keeps and reduces from it into the caller's buffer.
//! Large collectives are split into calls of at most [`MpiComm::max_count`] elements (MPI counts
//! are C `int`s).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use kron::optim::Communicator;
use mpi::Threading;
use mpi::collective::{CommunicatorCollectives, Root};
use mpi::environment::Universe;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::Equivalence;

/// The threading level [`MpiComm::init`] requests (see the crate's documentation).
pub const THREADING: Threading = Threading::Serialized;

/// The most elements one MPI call carries unless [`MpiComm::set_max_count`] says otherwise:
/// 2^30, below the largest C `int`.
pub const DEFAULT_MAX_COUNT: usize = 1 << 30;

/// Largest scratch buffer an all-reduce keeps between calls, in elements: 4 Mi (16 MiB of
/// `f32`, 32 MiB of `f64`), the size of one bucket of `kron::optim::comm::all_reduce_buffers`.
/// Larger buffers are reduced through the scratch buffer in pieces of this size.
const SCRATCH_ELEMENTS: usize = 1 << 22;

/// Whether an [`MpiComm`] is alive (MPI initialized and not finalized): the panic hook aborts
/// the job only then.
static LIVE: AtomicBool = AtomicBool::new(false);

/// What the lock of an [`MpiComm`] guards: its permission to call MPI, and the scratch buffers
/// all-reduces send from.
#[derive(Default)]
struct Scratch {
    f32s: Vec<f32>,
    f64s: Vec<f64>,
}

/// [`Communicator`] over `MPI_COMM_WORLD`. One per process, from [`MpiComm::init`]; dropping
/// it finalizes MPI.
///
/// Drop it (every `Arc` of it) before the program returns from `main`: a rank that exits
/// without finalizing MPI (also through `std::process::exit`) is reported by `mpirun` as
/// failed, and the job's exit status is non-zero.
pub struct MpiComm {
    rank: usize,
    size: usize,
    provided: Threading,
    max_count: usize,
    scratch: Mutex<Scratch>,
    // Last: dropping it calls MPI_Finalize, after everything else.
    _universe: Universe,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("threading", &self.provided)
            .field("max_count", &self.max_count)
            .finish()
    }
}

impl MpiComm {
    /// Initializes MPI with the threading level [`THREADING`] and returns this process's
    /// communicator over `MPI_COMM_WORLD`, after installing the panic hook that aborts the job
    /// (see the crate's documentation).
    ///
    /// Errors when MPI is already initialized in this process (this is the only way to
    /// initialize it, once) or when the library provides a lower threading level. Run outside
    /// `mpirun`, Open MPI starts a job of one rank. A failure inside `MPI_Init_thread` itself
    /// aborts the process with MPI's message.
    pub fn init() -> Result<MpiComm, String> {
        let (universe, provided) = mpi::initialize_with_threading(THREADING).ok_or(
            "MpiComm::init: MPI is already initialized in this process \
             (it can be initialized once; share the first MpiComm)",
        )?;
        if provided < THREADING {
            return Err(format!(
                "MpiComm::init: the MPI library provides threading level {provided:?}, below \
                 the {THREADING:?} that kron needs (its collectives run on rayon worker threads)"
            ));
        }
        let world = universe.world();
        let rank = usize::try_from(world.rank()).expect("MPI ranks are not negative");
        let size = usize::try_from(world.size()).expect("MPI sizes are positive");
        install_panic_hook(rank);
        LIVE.store(true, Ordering::SeqCst);
        Ok(MpiComm {
            rank,
            size,
            provided,
            max_count: DEFAULT_MAX_COUNT,
            scratch: Mutex::new(Scratch::default()),
            _universe: universe,
        })
    }

    /// The threading level the MPI library provides: [`THREADING`] or higher.
    pub fn threading(&self) -> Threading {
        self.provided
    }

    /// The most elements one MPI call carries: larger collectives are split into several calls
    /// (every rank splits alike, so they still pair up). [`DEFAULT_MAX_COUNT`] unless
    /// [`MpiComm::set_max_count`] changed it.
    pub fn max_count(&self) -> usize {
        self.max_count
    }

    /// Sets [`MpiComm::max_count`], clamped to 1..=[`DEFAULT_MAX_COUNT`]. Every rank must set
    /// the same value. Tests lower it to exercise the splitting on small buffers. Results stay
    /// the same bits on every rank, and exact sums stay exact; the rounding of an inexact sum
    /// can change, since Open MPI chooses its algorithm by the size of each call.
    pub fn set_max_count(&mut self, count: usize) {
        self.max_count = count.clamp(1, DEFAULT_MAX_COUNT);
    }

    /// The version string of the MPI library (for logs).
    pub fn library_version() -> String {
        mpi::environment::library_version()
            .unwrap_or_else(|e| format!("(not UTF-8: {e})"))
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_owned()
    }

    /// The permission to call MPI: one thread at a time (`MPI_THREAD_SERIALIZED`).
    fn lock(&self) -> MutexGuard<'_, Scratch> {
        // A thread that panicked while holding the lock aborted the job in the panic hook, so
        // a poisoned lock is only seen after MPI is finalized; the scratch buffers stay valid.
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks, in builds with debug assertions, that every rank passed `len` elements to
    /// collective `what`, and panics with every rank's length otherwise (an extra all-gather of
    /// one number per collective). Without the check, MPI aborts the job on a mismatch it
    /// detects and may hang or truncate on one it does not.
    fn check_lengths(&self, world: &SimpleCommunicator, what: &str, len: usize) {
        if cfg!(debug_assertions) && self.size > 1 {
            let mine = len as u64;
            let mut all = vec![0u64; self.size];
            world.all_gather_into(&mine, &mut all[..]);
            if all.iter().any(|&n| n != mine) {
                panic!(
                    "MpiComm::{what}: ranks passed buffers of different lengths {all:?} \
                     (rank order); every rank must pass the same length"
                );
            }
        }
    }

    /// The chunks `[start, end)` of `len` elements, at most [`MpiComm::max_count`] and `most`
    /// each, one MPI call per chunk. None for `len == 0`: every rank knows the length, and an
    /// empty slice's pointer is a dangling address that for bytes is `(void *) 1`, Open MPI's
    /// `MPI_IN_PLACE`, which `MPI_Bcast` refuses.
    fn chunks(&self, len: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = self.max_count.min(most).max(1);
        (0..len.div_ceil(step)).map(move |i| (i * step, ((i + 1) * step).min(len)))
    }

    /// Sums `buf` over all ranks: copies each chunk into `scratch` and reduces it into `buf`.
    fn all_reduce<T: Equivalence + Copy>(
        &self,
        what: &str,
        buf: &mut [T],
        scratch: &mut Vec<T>,
        world: &SimpleCommunicator,
    ) {
        self.check_lengths(world, what, buf.len());
        if self.size == 1 {
            return;
        }
        for (start, end) in self.chunks(buf.len(), SCRATCH_ELEMENTS) {
            let part = &mut buf[start..end];
            scratch.clear();
            scratch.reserve_exact(part.len());
            scratch.extend_from_slice(part);
            world.all_reduce_into(&scratch[..], part, mpi::collective::SystemOperation::sum());
        }
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // From here on a panic is no longer the job's business: MPI is about to be finalized.
        LIVE.store(false, Ordering::SeqCst);
    }
}

/// Replaces the panic hook with one that prints the panic with `rank` in front and aborts the
/// job while an [`MpiComm`] is alive, and hands panics to the previous hook otherwise.
fn install_panic_hook(rank: usize) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !LIVE.load(Ordering::SeqCst) {
            previous(info);
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("Box<dyn Any>");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("<unnamed>");
        let backtrace = std::backtrace::Backtrace::capture();
        let mut err = std::io::stderr().lock();
        // Nothing to do if stderr is gone; the abort below still stops the job.
        let _ = writeln!(
            err,
            "rank {rank}: panicked{at}: {message} (thread '{thread}')"
        );
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            let _ = writeln!(err, "rank {rank}: backtrace:\n{backtrace}");
        }
        let _ = err.flush();
        drop(err);
        SimpleCommunicator::world().abort(1);
    }));
}

impl Communicator for MpiComm {
    fn name(&self) -> &str {
        "mpi"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) {
        let mut scratch = self.lock();
        let world = SimpleCommunicator::world();
        self.all_reduce("all_reduce_f32", buf, &mut scratch.f32s, &world);
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) {
        let mut scratch = self.lock();
        let world = SimpleCommunicator::world();
        self.all_reduce("all_reduce_f64", buf, &mut scratch.f64s, &world);
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) {
        assert!(
            root < self.size,
            "MpiComm::broadcast_bytes: root {root} of {} ranks",
            self.size
        );
        let _guard = self.lock();
        let world = SimpleCommunicator::world();
        let from = world.process_at_rank(root as mpi::Rank);
        let mut len = buf.len() as u64;
        from.broadcast_into(&mut len);
        let len = usize::try_from(len).expect("a broadcast length fits in memory");
        if self.rank != root {
            buf.clear();
            buf.resize(len, 0);
        }
        for (start, end) in self.chunks(len, usize::MAX) {
            from.broadcast_into(&mut buf[start..end]);
        }
    }

    fn all_gather_f64(&self, values: &[f64]) -> Vec<f64> {
        let _guard = self.lock();
        let world = SimpleCommunicator::world();
        self.check_lengths(&world, "all_gather_f64", values.len());
        let n = values.len();
        let mut out = vec![0.0; n * self.size];
        if self.size == 1 {
            out.copy_from_slice(values);
            return out;
        }
        let mut part = Vec::new();
        for (start, end) in self.chunks(n, (self.max_count / self.size).max(1)) {
            let m = end - start;
            part.clear();
            part.resize(m * self.size, 0.0);
            world.all_gather_into(&values[start..end], &mut part[..]);
            for r in 0..self.size {
                out[r * n + start..r * n + end].copy_from_slice(&part[r * m..(r + 1) * m]);
            }
        }
        out
    }

    fn barrier(&self) {
        let _guard = self.lock();
        SimpleCommunicator::world().barrier();
    }
}

// The communicator is used from whichever rayon worker runs a training step.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<MpiComm>();
};

/// The `main` of an example program trained data-parallel over MPI (the crate's `autoencoder`
/// and `convnet` binaries): every rank parses the example's flags, which must include
/// `--distributed`, joins `MPI_COMM_WORLD` and trains its shard; rank 0 prints the table and
/// writes the files. `--help` prints the flags. Exit codes as the workspace's examples.
pub fn example_main(ex: &kron_examples::example::Example) -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let help = args.iter().any(|a| a == "--help" || a == "-h");
    if !help && !args.iter().any(|a| a == "--distributed") {
        eprintln!(
            "{}: this build trains data-parallel under mpirun: add --distributed (for one \
             process, run `cargo run --release --example {}`)",
            ex.name, ex.name
        );
        return std::process::ExitCode::from(2);
    }
    let dp = if help {
        None
    } else {
        match MpiComm::init() {
            Ok(c) => Some(kron::DataParallel::new(std::sync::Arc::new(c))),
            Err(e) => {
                eprintln!("{}: {e}", ex.name);
                return std::process::ExitCode::from(2);
            }
        }
    };
    let code = kron_examples::example::cli_main_on(
        ex,
        args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
        dp,
    );
    std::process::ExitCode::from(code)
}
