//! The communicator seam of data-parallel training: what kron's training code asks of the
//! other ranks (all-reduce, broadcast, gather, barrier), and the shard of a global batch one
//! rank trains on.
//!
//! kron trains on one process by default ([`SingleProcess`]). The `kron-mpi` crate (outside
//! the main workspace, so that building kron needs no MPI) implements [`Communicator`] over
//! Open MPI; [`LocalGroup`] runs several ranks as threads of one process, for tests. Nothing
//! else in kron names a transport.
//!
//! Collectives are infallible: a transport that loses a rank stops the whole group (MPI's
//! default error handler aborts every rank with its message) rather than return an error some
//! ranks would see and others not.

use std::sync::{Arc, Condvar, Mutex};

/// Elements per all-reduce call when many buffers are reduced together
/// ([`all_reduce_buffers`]): 4 Mi elements, 16 MiB of `f32`.
pub const BUCKET_ELEMENTS: usize = 1 << 22;

/// The ranks of a data-parallel run, as kron's training code sees them.
///
/// Every rank calls the collectives in the same order with buffers of the same length; the
/// results are the same bits on every rank.
pub trait Communicator: Send + Sync {
    /// A short name of the transport (`"single"`, `"mpi"`, `"local"`).
    fn name(&self) -> &str;

    /// This rank, from 0.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn size(&self) -> usize;

    /// Sums `buf` over all ranks, in place.
    fn all_reduce_f32(&self, buf: &mut [f32]);

    /// Sums `buf` over all ranks, in place.
    fn all_reduce_f64(&self, buf: &mut [f64]);

    /// Replaces `buf` on every rank with rank `root`'s bytes (its length too).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize);

    /// Every rank's `values` (all ranks pass the same count), rank after rank.
    fn all_gather_f64(&self, values: &[f64]) -> Vec<f64>;

    /// Waits until every rank has reached this call.
    fn barrier(&self);
}

/// The one rank of a run on one process: every collective leaves its buffer as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn name(&self) -> &str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _buf: &mut [f32]) {}
    fn all_reduce_f64(&self, _buf: &mut [f64]) {}
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) {}
    fn all_gather_f64(&self, values: &[f64]) -> Vec<f64> {
        values.to_vec()
    }
    fn barrier(&self) {}
}

/// An element type the communicator reduces.
pub trait Reducible: Copy + Default + Send + Sync + 'static {
    /// Sums `buf` over all ranks through `comm`.
    fn all_reduce(comm: &dyn Communicator, buf: &mut [Self]);
}

impl Reducible for f32 {
    fn all_reduce(comm: &dyn Communicator, buf: &mut [f32]) {
        comm.all_reduce_f32(buf)
    }
}

impl Reducible for f64 {
    fn all_reduce(comm: &dyn Communicator, buf: &mut [f64]) {
        comm.all_reduce_f64(buf)
    }
}

/// Sums many buffers over all ranks in few calls: consecutive buffers are packed into buckets
/// of at most [`BUCKET_ELEMENTS`] elements, one all-reduce per bucket (a buffer larger than
/// a bucket is reduced in place, alone). Every rank must pass buffers of the same lengths in
/// the same order. Returns the number of all-reduce calls made.
pub fn all_reduce_buffers<T: Reducible>(comm: &dyn Communicator, bufs: &mut [&mut [T]]) -> usize {
    if comm.size() == 1 {
        return 0;
    }
    let mut calls = 0;
    let mut start = 0;
    while start < bufs.len() {
        if bufs[start].len() >= BUCKET_ELEMENTS {
            T::all_reduce(comm, bufs[start]);
            calls += 1;
            start += 1;
            continue;
        }
        let mut end = start;
        let mut total = 0;
        while end < bufs.len()
            && bufs[end].len() < BUCKET_ELEMENTS
            && total + bufs[end].len() <= BUCKET_ELEMENTS
        {
            total += bufs[end].len();
            end += 1;
        }
        let mut bucket = Vec::with_capacity(total);
        for b in &bufs[start..end] {
            bucket.extend_from_slice(b);
        }
        T::all_reduce(comm, &mut bucket);
        calls += 1;
        let mut at = 0;
        for b in &mut bufs[start..end] {
            b.copy_from_slice(&bucket[at..at + b.len()]);
            at += b.len();
        }
        start = end;
    }
    calls
}

/// The examples of a global batch one rank trains on: `len` consecutive examples from
/// `first`. The global batch of `global` examples is split into contiguous shards in rank
/// order, the first `global % size` ranks taking one example more.
#[derive(Clone)]
pub struct Shard {
    comm: Arc<dyn Communicator>,
    first: usize,
    len: usize,
    global: usize,
    split: bool,
    directions: bool,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.size())
            .field("first", &self.first)
            .field("len", &self.len)
            .field("global", &self.global)
            .field("split", &self.split)
            .field("directions", &self.directions)
            .finish()
    }
}

/// `(first, len)` of rank `rank`'s shard of `global` examples split over `size` ranks.
pub fn shard_range(global: usize, size: usize, rank: usize) -> (usize, usize) {
    assert!(
        size > 0 && rank < size,
        "shard_range: rank {rank} of {size} ranks"
    );
    let q = global / size;
    let r = global % size;
    let len = q + usize::from(rank < r);
    let first = rank * q + rank.min(r);
    (first, len)
}

impl Shard {
    /// This rank's shard of a global batch of `global` examples.
    pub fn of(comm: Arc<dyn Communicator>, global: usize) -> Shard {
        let (first, len) = shard_range(global, comm.size(), comm.rank());
        Shard {
            comm,
            first,
            len,
            global,
            split: true,
            directions: false,
        }
    }

    /// Whether the optimizer splits its refreshes (inverses, eigenbases, roots) across the
    /// ranks, each computed by one owner and broadcast (`true`, the default), or has every
    /// rank compute all of them and send none (`false`): `size` times the arithmetic and no
    /// traffic, which pays where the network is slow next to the ranks, or for measuring what
    /// the split saves. Both give the same bits.
    pub fn with_split_refreshes(mut self, split: bool) -> Shard {
        self.split = split;
        self
    }

    /// Whether each block's preconditioned direction is computed by one rank, the owner of
    /// its refresh, and broadcast (`true`: KAISA's gradient workers at a fraction `1/size`),
    /// or computed by every rank (`false`, the default). Splitting divides the
    /// preconditioning's arithmetic by about `size` and sends the directions, about the
    /// gradient's size, every step. Both give the same bits. It applies to the methods whose
    /// blocks have refreshes split by owner (KFAC, KFC, two-level KFAC); Shampoo and KrADagrad
    /// precondition on every rank.
    pub fn with_split_directions(mut self, split: bool) -> Shard {
        self.directions = split;
        self
    }

    /// Whether the directions are split across the ranks ([`Shard::with_split_directions`]):
    /// only with the refreshes split too, and more than one rank.
    pub fn splits_directions(&self) -> bool {
        self.directions && self.splits_refreshes()
    }

    /// Whether the refreshes are split across the ranks ([`Shard::with_split_refreshes`]);
    /// on one process there is nothing to split.
    pub fn splits_refreshes(&self) -> bool {
        self.split && self.is_distributed()
    }

    /// The whole batch on one process.
    pub fn whole(global: usize) -> Shard {
        Shard::of(Arc::new(SingleProcess), global)
    }

    /// The communicator.
    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// The communicator, shared.
    pub fn comm_arc(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The global index of this shard's first example.
    pub fn first(&self) -> usize {
        self.first
    }

    /// The examples in this shard.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether this shard has no example.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The examples in the global batch.
    pub fn global(&self) -> usize {
        self.global
    }

    /// This shard's share of the global batch, `len / global`: the weight of its means in
    /// the global mean.
    pub fn weight(&self) -> f64 {
        if self.global == 0 {
            0.0
        } else {
            self.len as f64 / self.global as f64
        }
    }

    /// Turns this shard's means into the global batch's, on every rank: each rank's values
    /// weighted by its share, summed over the ranks (in place; nothing on one rank).
    pub fn mean_f64(&self, values: &mut [f64]) {
        if !self.is_distributed() {
            return;
        }
        let w = self.weight();
        values.iter_mut().for_each(|x| *x *= w);
        self.comm.all_reduce_f64(values);
    }

    /// [`Shard::mean_f64`] for many `f32` buffers, in buckets ([`all_reduce_buffers`]).
    pub fn mean_f32(&self, bufs: &mut [&mut [f32]]) {
        if !self.is_distributed() {
            return;
        }
        let w = self.weight() as f32;
        bufs.iter_mut()
            .for_each(|b| b.iter_mut().for_each(|x| *x *= w));
        all_reduce_buffers(self.comm.as_ref(), bufs);
    }

    /// Whether any rank says `yes` (one all-reduce; on one rank, `yes`).
    pub fn any(&self, yes: bool) -> bool {
        if !self.is_distributed() {
            return yes;
        }
        let mut f = [f64::from(u8::from(yes))];
        self.comm.all_reduce_f64(&mut f);
        f[0] > 0.0
    }

    /// The shard of the global batch's first `m` examples this rank holds (all of its own when
    /// `m` covers the batch): the part of a statistic gathered on a prefix of the batch. A rank
    /// may hold none of them (its weight is then 0).
    pub fn prefix(&self, m: usize) -> Shard {
        let global = m.min(self.global);
        let first = self.first.min(global);
        Shard {
            comm: self.comm.clone(),
            first,
            len: (global - first).min(self.len),
            global,
            split: self.split,
            directions: self.directions,
        }
    }

    /// Whether other ranks take part (more than one rank).
    pub fn is_distributed(&self) -> bool {
        self.comm.size() > 1
    }
}

/// Assigns work items of the given `costs` to `ranks` ranks, greedily: the costliest item
/// first (ties by index) to the rank with the least assigned cost so far (ties by rank). The
/// same costs give the same assignment on every rank.
pub fn assign_by_cost(costs: &[f64], ranks: usize) -> Vec<usize> {
    assert!(ranks > 0, "assign_by_cost: no ranks");
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&i, &j| costs[j].total_cmp(&costs[i]).then(i.cmp(&j)));
    let mut load = vec![0.0f64; ranks];
    let mut owner = vec![0; costs.len()];
    for i in order {
        let r = (0..ranks)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .expect("at least one rank");
        owner[i] = r;
        load[r] += costs[i].max(0.0);
    }
    owner
}

/// What a rank hands in to one collective of a [`LocalGroup`].
#[derive(Clone)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    Nothing,
}

struct GroupState {
    arrived: usize,
    generation: u64,
    dead: Option<usize>,
    slots: Vec<Payload>,
}

struct Group {
    size: usize,
    state: Mutex<GroupState>,
    turn: Condvar,
}

/// Several ranks in one process, one thread each, for tests of data-parallel training without
/// a transport: [`LocalGroup::new`] gives one communicator per rank. Sums add the ranks'
/// buffers in rank order, so every rank gets the same bits. A rank whose thread panics stops
/// the others at their next collective (they panic naming it) rather than leave them waiting.
pub struct LocalGroup;

/// One rank of a [`LocalGroup`].
pub struct LocalComm {
    rank: usize,
    group: Arc<Group>,
}

impl LocalGroup {
    /// `size` communicators, rank 0 first; move each to its own thread.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<LocalComm> {
        assert!(size > 0, "LocalGroup::new: no ranks");
        let group = Arc::new(Group {
            size,
            state: Mutex::new(GroupState {
                arrived: 0,
                generation: 0,
                dead: None,
                slots: vec![Payload::Nothing; size],
            }),
            turn: Condvar::new(),
        });
        (0..size)
            .map(|rank| LocalComm {
                rank,
                group: group.clone(),
            })
            .collect()
    }
}

impl LocalComm {
    /// Waits for every rank at the same point (a barrier on the group's lock).
    fn wait<'a>(
        &self,
        mut s: std::sync::MutexGuard<'a, GroupState>,
    ) -> std::sync::MutexGuard<'a, GroupState> {
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.group.size {
            s.arrived = 0;
            s.generation += 1;
            self.group.turn.notify_all();
        } else {
            while s.generation == generation && s.dead.is_none() {
                s = self.group.turn.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
        if let Some(r) = s.dead {
            drop(s);
            panic!(
                "LocalComm: rank {r} of the local group stopped; rank {} cannot go on",
                self.rank
            );
        }
        s
    }

    /// Hands in `mine` and returns every rank's payload, in rank order.
    fn exchange(&self, mine: Payload) -> Vec<Payload> {
        let mut s = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        s.slots[self.rank] = mine;
        let s = self.wait(s);
        let all = s.slots.clone();
        // Nobody hands in the next payload before everyone has read this one.
        drop(self.wait(s));
        all
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut s = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
            s.dead.get_or_insert(self.rank);
            self.group.turn.notify_all();
        }
    }
}

impl Communicator for LocalComm {
    fn name(&self) -> &str {
        "local"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_f32(&self, buf: &mut [f32]) {
        let all = self.exchange(Payload::F32(buf.to_vec()));
        buf.fill(0.0);
        for p in all {
            let Payload::F32(v) = p else {
                panic!("LocalComm::all_reduce_f32: ranks called different collectives")
            };
            assert_eq!(
                v.len(),
                buf.len(),
                "LocalComm::all_reduce_f32: lengths differ"
            );
            buf.iter_mut().zip(v).for_each(|(b, x)| *b += x);
        }
    }

    fn all_reduce_f64(&self, buf: &mut [f64]) {
        let all = self.exchange(Payload::F64(buf.to_vec()));
        buf.fill(0.0);
        for p in all {
            let Payload::F64(v) = p else {
                panic!("LocalComm::all_reduce_f64: ranks called different collectives")
            };
            assert_eq!(
                v.len(),
                buf.len(),
                "LocalComm::all_reduce_f64: lengths differ"
            );
            buf.iter_mut().zip(v).for_each(|(b, x)| *b += x);
        }
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) {
        let mine = if self.rank == root {
            Payload::Bytes(buf.clone())
        } else {
            Payload::Nothing
        };
        let all = self.exchange(mine);
        match &all[root] {
            Payload::Bytes(b) => *buf = b.clone(),
            _ => panic!("LocalComm::broadcast_bytes: ranks called different collectives"),
        }
    }

    fn all_gather_f64(&self, values: &[f64]) -> Vec<f64> {
        let all = self.exchange(Payload::F64(values.to_vec()));
        all.into_iter()
            .flat_map(|p| match p {
                Payload::F64(v) => v,
                _ => panic!("LocalComm::all_gather_f64: ranks called different collectives"),
            })
            .collect()
    }

    fn barrier(&self) {
        self.exchange(Payload::Nothing);
    }
}

/// A binary packet of named tensors and a JSON header, for broadcasting refreshed results
/// between ranks (bit-exact, unlike a JSON rendering of the numbers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packet {
    /// The header.
    pub meta: serde_json::Value,
    /// `f32` tensors: name, shape, values.
    pub f32s: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// `f64` tensors: name, shape, values.
    pub f64s: Vec<(String, Vec<usize>, Vec<f64>)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PacketHeader {
    meta: serde_json::Value,
    f32s: Vec<(String, Vec<usize>)>,
    f64s: Vec<(String, Vec<usize>)>,
}

impl Packet {
    /// The packet as bytes: the header's JSON length (8 bytes, little-endian), the header,
    /// then the tensors' values, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let header = PacketHeader {
            meta: self.meta.clone(),
            f32s: self
                .f32s
                .iter()
                .map(|(n, s, _)| (n.clone(), s.clone()))
                .collect(),
            f64s: self
                .f64s
                .iter()
                .map(|(n, s, _)| (n.clone(), s.clone()))
                .collect(),
        };
        let h = serde_json::to_vec(&header).expect("a packet header serializes");
        let values: usize = self.f32s.iter().map(|t| t.2.len() * 4).sum::<usize>()
            + self.f64s.iter().map(|t| t.2.len() * 8).sum::<usize>();
        let mut out = Vec::with_capacity(8 + h.len() + values);
        out.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out.extend_from_slice(&h);
        for (_, _, v) in &self.f32s {
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        for (_, _, v) in &self.f64s {
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        out
    }

    /// The packet [`Packet::encode`] wrote, or what is wrong with the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Packet, String> {
        let take = |at: usize, n: usize| -> Result<&[u8], String> {
            bytes
                .get(at..at.checked_add(n).ok_or("packet length overflows")?)
                .ok_or_else(|| {
                    format!(
                        "packet of {} bytes ends before byte {}",
                        bytes.len(),
                        at + n
                    )
                })
        };
        let hlen = u64::from_le_bytes(take(0, 8)?.try_into().expect("8 bytes")) as usize;
        let header: PacketHeader =
            serde_json::from_slice(take(8, hlen)?).map_err(|e| format!("packet header: {e}"))?;
        let mut at = 8 + hlen;
        let count = |shape: &[usize]| -> Result<usize, String> {
            shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| format!("shape {shape:?} overflows"))
        };
        let mut f32s = Vec::with_capacity(header.f32s.len());
        for (name, shape) in header.f32s {
            let n = count(&shape)?;
            let raw = take(at, n.checked_mul(4).ok_or("packet length overflows")?)?;
            at += n * 4;
            let v = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            f32s.push((name, shape, v));
        }
        let mut f64s = Vec::with_capacity(header.f64s.len());
        for (name, shape) in header.f64s {
            let n = count(&shape)?;
            let raw = take(at, n.checked_mul(8).ok_or("packet length overflows")?)?;
            at += n * 8;
            let v = raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            f64s.push((name, shape, v));
        }
        if at != bytes.len() {
            return Err(format!(
                "packet of {} bytes has {} bytes after its tensors",
                bytes.len(),
                bytes.len() - at
            ));
        }
        Ok(Packet {
            meta: header.meta,
            f32s,
            f64s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_group<R: Send + 'static>(
        size: usize,
        f: impl Fn(LocalComm) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let handles: Vec<_> = LocalGroup::new(size)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn shards_cover_the_batch_in_rank_order() {
        for global in [0usize, 1, 5, 7, 8, 1000] {
            for size in 1..=5 {
                let mut next = 0;
                for rank in 0..size {
                    let (first, len) = shard_range(global, size, rank);
                    assert_eq!(first, next, "global {global} size {size} rank {rank}");
                    assert!(len == global / size || len == global / size + 1);
                    next += len;
                }
                assert_eq!(next, global);
            }
        }
    }

    #[test]
    fn local_group_sums_in_rank_order_and_agrees_on_every_rank() {
        let out = run_group(3, |c| {
            let r = c.rank() as f32;
            let mut a = vec![r + 0.1, 2.0 * r, 1e8 * (r - 1.0)];
            c.all_reduce_f32(&mut a);
            let mut d = vec![c.rank() as f64; 2];
            c.all_reduce_f64(&mut d);
            let mut b = if c.rank() == 2 { vec![7u8, 8] } else { vec![] };
            c.broadcast_bytes(&mut b, 2);
            let g = c.all_gather_f64(&[c.rank() as f64 * 10.0]);
            c.barrier();
            (a, d, b, g)
        });
        let want_a = {
            let mut s = [0.0f32; 3];
            for r in 0..3 {
                let r = r as f32;
                s[0] += r + 0.1;
                s[1] += 2.0 * r;
                s[2] += 1e8 * (r - 1.0);
            }
            s.to_vec()
        };
        for (a, d, b, g) in out {
            assert_eq!(a, want_a);
            assert_eq!(d, vec![3.0, 3.0]);
            assert_eq!(b, vec![7, 8]);
            assert_eq!(g, vec![0.0, 10.0, 20.0]);
        }
    }

    #[test]
    fn buckets_reduce_many_buffers_in_few_calls() {
        let out = run_group(2, |c| {
            let r = c.rank() as f32 + 1.0;
            let mut small: Vec<Vec<f32>> = (0..10).map(|i| vec![r * i as f32; 1000]).collect();
            let mut big = vec![r; BUCKET_ELEMENTS + 3];
            let mut views: Vec<&mut [f32]> = small.iter_mut().map(|v| v.as_mut_slice()).collect();
            views.insert(5, big.as_mut_slice());
            let calls = all_reduce_buffers(&c, &mut views);
            (calls, small, big[BUCKET_ELEMENTS + 2])
        });
        for (calls, small, big) in out {
            assert_eq!(
                calls, 3,
                "two buckets around the large buffer, and the large one"
            );
            for (i, v) in small.iter().enumerate() {
                assert!(v.iter().all(|&x| x == 3.0 * i as f32));
            }
            assert_eq!(big, 3.0);
        }
    }

    #[test]
    fn a_rank_that_panics_stops_the_others() {
        let handles: Vec<_> = LocalGroup::new(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    if c.rank() == 1 {
                        panic!("rank 1 fails");
                    }
                    c.barrier();
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().is_err(), "every rank stops");
        }
    }

    #[test]
    fn greedy_assignment_balances_costs_deterministically() {
        let owners = assign_by_cost(&[8.0, 1.0, 4.0, 4.0, 1.0], 2);
        assert_eq!(owners, vec![0, 0, 1, 1, 1]);
        let load = |r| -> f64 {
            owners
                .iter()
                .zip([8.0, 1.0, 4.0, 4.0, 1.0])
                .filter(|(o, _)| **o == r)
                .map(|(_, c)| c)
                .sum()
        };
        assert_eq!((load(0), load(1)), (9.0, 9.0));
        assert_eq!(assign_by_cost(&[1.0, 2.0], 1), vec![0, 0]);
    }

    #[test]
    fn packets_round_trip_to_the_bit_and_refuse_bad_bytes() {
        let p = Packet {
            meta: serde_json::json!({"eigenvalues": [0.1f64, 1e-300, -0.0]}),
            f32s: vec![(
                "a".into(),
                vec![2, 2],
                vec![1.0, f32::MIN_POSITIVE, -0.0, 3.5],
            )],
            f64s: vec![("b".into(), vec![3], vec![0.1, f64::EPSILON, 7.0])],
        };
        let bytes = p.encode();
        let q = Packet::decode(&bytes).unwrap();
        assert_eq!(p, q);
        assert!(q.f32s[0].2[2].is_sign_negative());
        assert!(Packet::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Packet::decode(&longer).is_err());
        assert!(Packet::decode(&[1, 2]).is_err());
    }
}
