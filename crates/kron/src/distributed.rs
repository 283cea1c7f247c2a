//! Data-parallel training: every rank runs the same program on the same global batches and
//! trains on its shard of each; gradients, losses and curvature statistics are reduced across
//! the ranks, and curvature refreshes are split among them.
//!
//! The ranks talk through a [`Communicator`]: [`SingleProcess`](kron_optim::SingleProcess) by
//! default, `kron-mpi`'s `MpiComm` over Open MPI, or a [`LocalGroup`](kron_optim::LocalGroup)
//! of threads in tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kron_autodiff::{LossKind, ParamStore, Rng, Targets, Tensor};
use kron_layers::Module;
use kron_optim::{Communicator, OptimError, Optimizer, Shard};

use crate::train::{StepOutput, step_on};

/// A communicator that counts the time spent in its collectives.
struct Timed {
    inner: Arc<dyn Communicator>,
    nanos: AtomicU64,
    calls: AtomicU64,
    bytes: AtomicU64,
}

impl Timed {
    /// Runs one collective of `bytes(result)` bytes (the payload every rank ends with).
    fn time<R>(&self, f: impl FnOnce() -> R, bytes: impl FnOnce(&R) -> usize) -> R {
        let t = Instant::now();
        let r = f();
        self.nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes(&r) as u64, Ordering::Relaxed);
        r
    }
}

impl Communicator for Timed {
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
        let n = 4 * buf.len();
        self.time(|| self.inner.all_reduce_f32(buf), |_| n)
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) {
        let n = 8 * buf.len();
        self.time(|| self.inner.all_reduce_f64(buf), |_| n)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) {
        // The message's length, which the other ranks learn from the broadcast.
        let received = || {
            self.inner.broadcast_bytes(buf, root);
            buf.len()
        };
        self.time(received, |&n| n);
    }
    fn all_gather_f64(&self, values: &[f64]) -> Vec<f64> {
        self.time(|| self.inner.all_gather_f64(values), |all| 8 * all.len())
    }
    fn barrier(&self) {
        self.time(|| self.inner.barrier(), |_| 0)
    }
}

/// Data-parallel training over a [`Communicator`].
///
/// Every rank builds the same model from the same seed, the same optimizer and the same
/// batches (the data order is seeded, so the global batch is the same whatever the number of
/// ranks), checks that with [`DataParallel::check_setup`], and calls
/// [`DataParallel::train_step`] on each global batch. Each rank then:
///
/// 1. runs forward and backward on its shard (contiguous examples, the first
///    `batch % ranks` ranks taking one more), with the dropout masks and sampled labels one
///    process would draw for those examples on the whole batch;
/// 2. reduces the mean loss and the gradients (the shards' means weighted by their shares) in
///    one bucketed all-reduce; a NaN or infinity on any rank refuses the step on all of them,
///    naming the ranks;
/// 3. steps the optimizer, which reduces its curvature statistics from the captures the same
///    way (KFAC, KFC, two-level KFAC) and computes each block's refresh on one rank, chosen by
///    cost, which broadcasts it. Methods whose statistics come from the gradients (Shampoo,
///    KrADagrad) build them from the reduced gradient, as one process would.
///
/// Every rank then holds the same parameters and optimizer state, to the bit; they equal one
/// process's on the same global batches up to the rounding of the reductions. A checkpoint is
/// the same file as one process's: rank 0 writes it, and a run resumes from it on any number
/// of ranks.
#[derive(Clone)]
pub struct DataParallel {
    comm: Arc<Timed>,
    split: bool,
    directions: bool,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("transport", &self.comm.name())
            .field("rank", &self.rank())
            .field("size", &self.size())
            .field("split_refreshes", &self.split)
            .field("split_directions", &self.directions)
            .finish()
    }
}

/// Ranks that were started with different setups (model, optimizer, data or configuration):
/// every rank refuses to start, with the first difference found.
#[derive(Clone, Debug, PartialEq)]
pub struct SetupMismatch {
    /// The first rank whose setup differs from rank 0's.
    pub rank: usize,
    /// Every rank that differs.
    pub ranks: Vec<usize>,
    /// The first differing field, as a path into the setup (`optimizer.config.damping.lambda`).
    pub field: String,
    /// Rank 0's value there.
    pub rank0: String,
    /// Rank `rank`'s value there.
    pub theirs: String,
}

impl std::fmt::Display for SetupMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranks: Vec<String> = self.ranks.iter().map(|r| r.to_string()).collect();
        write!(
            f,
            "rank(s) {} were started with another setup than rank 0: first at {}: rank 0 has \
             {}, rank {} has {}",
            ranks.join(", "),
            self.field,
            self.rank0,
            self.rank,
            self.theirs
        )
    }
}

impl std::error::Error for SetupMismatch {}

impl DataParallel {
    /// Data-parallel training over `comm`.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        DataParallel {
            comm: Arc::new(Timed {
                inner: comm,
                nanos: AtomicU64::new(0),
                calls: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
            split: true,
            directions: false,
        }
    }

    /// Whether each block's preconditioned direction is computed by the owner of its refresh
    /// only and broadcast (`true`: KAISA's gradient workers at a fraction `1/size`), or by
    /// every rank (`false`, the default): see
    /// [`Shard::with_split_directions`](kron_optim::Shard::with_split_directions). It applies
    /// with the refreshes split, to KFAC, KFC and two-level KFAC. Both train to the same bits.
    pub fn split_directions(mut self, split: bool) -> Self {
        self.directions = split;
        self
    }

    /// Whether the optimizer's refreshes (inverses, eigenbases, roots) are split across the
    /// ranks, each computed by one owner chosen by cost and broadcast (`true`, the default), or
    /// computed by every rank, with no broadcast (`false`): see
    /// [`Shard::with_split_refreshes`](kron_optim::Shard::with_split_refreshes). Both train
    /// to the same bits.
    pub fn split_refreshes(mut self, split: bool) -> Self {
        self.split = split;
        self
    }

    /// One process (the default transport, which does nothing).
    pub fn single() -> Self {
        Self::new(Arc::new(kron_optim::SingleProcess))
    }

    /// The communicator (timed: [`DataParallel::comm_seconds`]).
    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Seconds spent in collectives so far (gradients, statistics, refreshes, checks).
    pub fn comm_seconds(&self) -> f64 {
        self.comm.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Collectives called so far (every all-reduce, broadcast, all-gather and barrier): the
    /// count a latency (`α`) term of a communication model multiplies.
    pub fn comm_calls(&self) -> u64 {
        self.comm.calls.load(Ordering::Relaxed)
    }

    /// Bytes of the collectives' payloads so far: an all-reduce's buffer, a broadcast's
    /// message, an all-gather's result, each counted once per call (what a bandwidth (`β`)
    /// term of a communication model multiplies, before the algorithm's factor).
    pub fn comm_bytes(&self) -> u64 {
        self.comm.bytes.load(Ordering::Relaxed)
    }

    /// This rank's shard of a global batch of `global` examples.
    pub fn shard(&self, global: usize) -> Shard {
        Shard::of(self.comm.clone(), global)
            .with_split_refreshes(self.split)
            .with_split_directions(self.directions)
    }

    /// One training step on this rank's shard of the global batch `inputs`/`targets`: see
    /// [`DataParallel`] and [`train_step`](crate::train_step), which it equals on one rank.
    ///
    /// # Errors
    /// Those of [`train_step`](crate::train_step), on every rank alike
    /// ([`OptimError::NonFiniteGradientOnRanks`] when a rank's gradient is not finite), and
    /// [`OptimError::Config`] (field `batch`) when the batch has fewer examples than there are
    /// ranks.
    pub fn train_step(
        &self,
        model: &dyn Module,
        loss: LossKind,
        params: &mut ParamStore,
        opt: &mut dyn Optimizer,
        inputs: &Tensor,
        targets: &Targets,
        rng: &mut Rng,
    ) -> Result<StepOutput, OptimError> {
        let global = inputs.shape().first().copied().unwrap_or(0);
        if self.size() == 1 {
            return step_on(None, model, loss, params, opt, inputs, targets, rng);
        }
        if global < self.size() {
            return Err(OptimError::Config {
                field: "batch".into(),
                detail: format!(
                    "of {global} examples cannot be split over {} ranks (at least one each)",
                    self.size()
                ),
            });
        }
        let shard = self.shard(global);
        opt.set_shard(Some(shard.clone()));
        step_on(Some(&shard), model, loss, params, opt, inputs, targets, rng)
    }

    /// Checks that every rank was started with the same `setup` (see [`setup_of`]) and the same
    /// [`DataParallel::split_refreshes`] and [`DataParallel::split_directions`]: rank 0 broadcasts its own, each rank compares, and all of them refuse when any differs, with
    /// the first difference of the first differing rank.
    ///
    /// # Errors
    /// [`SetupMismatch`], on every rank alike.
    pub fn check_setup(&self, setup: &serde_json::Value) -> Result<(), SetupMismatch> {
        let comm = self.comm();
        // The ranks must also agree on how they share the refreshes and the directions (owners
        // broadcasting, or none): otherwise one would wait on a broadcast another never sends.
        let mut setup = setup.clone();
        if let Some(map) = setup.as_object_mut() {
            map.insert(
                "data-parallel".into(),
                serde_json::json!({
                    "split refreshes": self.split,
                    "split directions": self.directions,
                }),
            );
        }
        let setup = &setup;
        let mut bytes = serde_json::to_vec(setup).expect("a setup serializes");
        comm.broadcast_bytes(&mut bytes, 0);
        let rank0: serde_json::Value =
            serde_json::from_slice(&bytes).expect("rank 0's setup parses");
        // Both sides through the same text and parser (a parsed float may differ from the
        // value it was printed from in the last bit).
        let ours: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(setup).expect("a setup serializes"))
                .expect("a setup parses");
        let mine = first_difference("", &rank0, &ours);
        let flags = comm.all_gather_f64(&[f64::from(u8::from(mine.is_some()))]);
        let ranks: Vec<usize> = (0..comm.size()).filter(|&r| flags[r] != 0.0).collect();
        let Some(&first) = ranks.first() else {
            return Ok(());
        };
        let mut msg = match (&mine, comm.rank() == first) {
            (Some(d), true) => serde_json::to_vec(d).expect("a difference serializes"),
            _ => Vec::new(),
        };
        comm.broadcast_bytes(&mut msg, first);
        let (field, a, b): (String, String, String) =
            serde_json::from_slice(&msg).expect("the difference parses");
        Err(SetupMismatch {
            rank: first,
            ranks,
            field,
            rank0: a,
            theirs: b,
        })
    }
}

/// What ranks must agree on to train together: the parameters' names, shapes and a hash of
/// their values (the same seed), the optimizer's name and exported state (its configuration,
/// counters and statistics), and `extra` (the data, batch size, seed and schedule a program
/// uses).
pub fn setup_of(
    params: &ParamStore,
    opt: &dyn Optimizer,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut shapes = serde_json::Map::new();
    for (_, name, t) in params.iter() {
        shapes.insert(name.to_string(), serde_json::json!(t.shape()));
        for v in t.data() {
            hash = (hash ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let state = opt.state();
    serde_json::json!({
        "parameters": shapes,
        "parameter values (hash)": format!("{hash:016x}"),
        "optimizer": {
            "name": opt.name(),
            "state": state.meta,
            "tensors": state.tensors.keys().collect::<Vec<_>>(),
        },
        "program": extra,
    })
}

/// The first path where `theirs` differs from `ours`, with both values rendered.
fn first_difference(
    path: &str,
    ours: &serde_json::Value,
    theirs: &serde_json::Value,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    let here = |p: &str| {
        if p.is_empty() {
            "(the setup)".to_string()
        } else {
            p.to_string()
        }
    };
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                match b.get(k) {
                    Some(vb) => {
                        if let Some(d) = first_difference(&join(k), va, vb) {
                            return Some(d);
                        }
                    }
                    None => return Some((join(k), va.to_string(), "nothing".into())),
                }
            }
            b.keys()
                .find(|k| !a.contains_key(*k))
                .map(|k| (join(k), "nothing".into(), b[k].to_string()))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(&join(&i.to_string()), x, y)),
        _ if ours == theirs => None,
        _ => Some((here(path), ours.to_string(), theirs.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_difference_is_named_by_its_path() {
        let a = serde_json::json!({"opt": {"lr": 0.1, "m": [1, 2]}, "seed": 3});
        let mut b = a.clone();
        assert_eq!(first_difference("", &a, &b), None);
        b["opt"]["m"][1] = serde_json::json!(5);
        assert_eq!(
            first_difference("", &a, &b),
            Some(("opt.m.1".into(), "2".into(), "5".into()))
        );
        b = a.clone();
        b["extra"] = serde_json::json!(true);
        assert_eq!(
            first_difference("", &a, &b),
            Some(("extra".into(), "nothing".into(), "true".into()))
        );
    }
}
