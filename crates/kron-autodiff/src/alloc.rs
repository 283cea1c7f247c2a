//! Large buffers, kept between steps.
//!
//! A training step allocates the same large buffers every time: a conv layer's im2col patches
//! are tens to hundreds of MiB, its outputs and their gradients tens. Fresh from the allocator
//! such a buffer is mapped from the kernel and faulted in page by page, each page zeroed by the
//! kernel and unmapped again when the step drops it; on the conv net benchmark (batch 128) that
//! churn was about a sixth of a forward+backward step. So buffers of at least [`POOL_FROM`]
//! elements go to a pool when the tensor owning them drops, and the next request of about
//! their size takes one back instead of mapping new memory.
//!
//! The pool takes back only buffers it handed out (a buffer allocated elsewhere is freed as
//! usual when its tensor drops), so it holds what the pooled ops of the last step used and no
//! more, and never more than [`POOL_MAX_BYTES`]; [`release_buffers`] empties it. A buffer taken
//! from the pool holds old values: [`zeroed`] clears it, [`scratch`] does not (for callers that
//! write every element, so that results never depend on what the pool held).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

/// Elements (1 MiB) from which buffers are pooled and fresh ones ask for huge pages.
pub(crate) const POOL_FROM: usize = 1 << 18;

/// The most bytes the pool keeps (the buffers of a large step, not of many).
pub(crate) const POOL_MAX_BYTES: usize = 2 << 30;

struct Pool {
    /// Free buffers, oldest first.
    bufs: Vec<Vec<f32>>,
    bytes: usize,
    /// Addresses of the buffers handed out and not yet back.
    lent: HashSet<usize>,
}

/// Addresses of lent buffers kept at most: beyond, buffers dropped as plain `Vec`s (never handed
/// back) would pile up; forgetting them only means their addresses are not taken back.
const MAX_LENT: usize = 1 << 16;

static POOL: LazyLock<Mutex<Pool>> = LazyLock::new(|| {
    Mutex::new(Pool {
        bufs: Vec::new(),
        bytes: 0,
        lent: HashSet::new(),
    })
});

/// Notes `v` as lent, so that [`recycle`] takes it back.
fn lend(p: &mut Pool, v: &[f32]) {
    if p.lent.len() >= MAX_LENT {
        p.lent.clear();
    }
    p.lent.insert(v.as_ptr() as usize);
}

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic elsewhere while holding the lock leaves a consistent pool (every method below
    // finishes its bookkeeping before it can panic), so a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pooled buffer of capacity between `n` and `2n`, the smallest such, if any.
fn take(n: usize) -> Option<Vec<f32>> {
    if n < POOL_FROM {
        return None;
    }
    let mut p = pool();
    let (at, _) = p
        .bufs
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= n && b.capacity() <= 2 * n)
        .min_by_key(|(_, b)| b.capacity())?;
    let mut v = p.bufs.swap_remove(at);
    p.bytes -= v.capacity() * size_of::<f32>();
    lend(&mut p, &v);
    drop(p);
    // Shrinking only moves the length; growing (within the capacity) writes zeros.
    v.resize(n, 0.0);
    Some(v)
}

/// A buffer of `n` elements from the pool of large buffers that kron's ops share, with
/// unspecified contents (stale values of other tensors, NaN among them possibly), for code in
/// this crate that writes every element before reading any (a GEMM output with `beta = 0`,
/// say). Wrapped in a [`Tensor`](crate::Tensor), it returns to the pool when the tensor's
/// storage drops; held as a [`PooledBuffer`] ([`PooledBuffer::stale`]), when that drops.
pub(crate) fn scratch(n: usize) -> Vec<f32> {
    take(n).unwrap_or_else(|| fresh(n))
}

/// A buffer of `n` zeros from the pool of large buffers (see [`scratch`]).
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    match take(n) {
        Some(mut v) => {
            fill(&mut v, 0.0);
            v
        }
        None => fresh(n),
    }
}

/// A copy of `src` in a (possibly pooled) buffer.
pub(crate) fn copy_of(src: &[f32]) -> Vec<f32> {
    match take(src.len()) {
        Some(mut v) => {
            v.copy_from_slice(src);
            v
        }
        None => src.to_vec(),
    }
}

/// Hands a buffer back: kept for reuse when the pool lent it and has room, freed otherwise.
pub(crate) fn recycle(v: Vec<f32>) {
    let bytes = v.capacity() * size_of::<f32>();
    if v.capacity() < POOL_FROM {
        return;
    }
    let mut p = pool();
    if !p.lent.remove(&(v.as_ptr() as usize)) || bytes > POOL_MAX_BYTES {
        return;
    }
    // Room for it by freeing the oldest buffers first.
    let mut freed = 0;
    let mut over = (p.bytes + bytes).saturating_sub(POOL_MAX_BYTES);
    while over > 0 && freed < p.bufs.len() {
        let b = p.bufs[freed].capacity() * size_of::<f32>();
        over = over.saturating_sub(b);
        p.bytes -= b;
        freed += 1;
    }
    let old: Vec<Vec<f32>> = p.bufs.drain(..freed).collect();
    p.bytes += bytes;
    p.bufs.push(v);
    drop(p);
    drop(old);
}

/// A buffer from the pool of large buffers that returns itself to the pool when dropped, or
/// lives on as a [`Tensor`](crate::Tensor)'s storage ([`PooledBuffer::into_tensor`]), which
/// does the same. Its public constructors give defined contents (zeros or a copy); stale
/// memory is only handed out inside this crate.
pub struct PooledBuffer(Vec<f32>);

impl PooledBuffer {
    /// `n` zeros.
    pub fn zeroed(n: usize) -> Self {
        PooledBuffer(zeroed(n))
    }

    /// A copy of `src`.
    pub fn copy_of(src: &[f32]) -> Self {
        PooledBuffer(copy_of(src))
    }

    /// `n` elements with unspecified contents, for code that writes every element first.
    pub(crate) fn stale(n: usize) -> Self {
        PooledBuffer(scratch(n))
    }

    /// Takes charge of a buffer from [`scratch`], [`zeroed`] or [`copy_of`].
    pub(crate) fn adopt(v: Vec<f32>) -> Self {
        PooledBuffer(v)
    }

    /// The buffer as a tensor of `shape` (its storage returns it to the pool in turn).
    ///
    /// # Panics
    /// If `shape` does not hold the buffer's length.
    pub fn into_tensor(mut self, shape: &[usize]) -> crate::Tensor {
        crate::Tensor::from_vec(std::mem::take(&mut self.0), shape)
    }

    /// The buffer as a plain vector, which no longer returns to the pool by itself.
    pub(crate) fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for PooledBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl std::fmt::Debug for PooledBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuffer({} elements)", self.0.len())
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

/// `u32` indices (max-pooling's argmax) in a pooled buffer, handed back when dropped.
pub(crate) struct Indices(Vec<u32>);

impl Indices {
    /// `n` indices with unspecified contents, for callers that write every one.
    pub(crate) fn scratch(n: usize) -> Self {
        let mut v = std::mem::ManuallyDrop::new(scratch(n));
        // SAFETY: f32 and u32 have the same size and alignment and every bit pattern is a
        // valid value of both, so the allocation, its length and its initialized elements are
        // reinterpreted as they are (and later freed with the same layout).
        Indices(unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<u32>(), v.len(), v.capacity()) })
    }
}

impl std::ops::Deref for Indices {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.0
    }
}

impl std::ops::DerefMut for Indices {
    fn deref_mut(&mut self) -> &mut [u32] {
        &mut self.0
    }
}

impl std::fmt::Debug for Indices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Indices({} entries)", self.0.len())
    }
}

impl Drop for Indices {
    fn drop(&mut self) {
        let mut v = std::mem::ManuallyDrop::new(std::mem::take(&mut self.0));
        // SAFETY: as in `Indices::scratch`, the other way round.
        recycle(unsafe {
            Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity())
        });
    }
}

/// Frees every buffer the pool holds and returns how many bytes that was.
///
/// kron keeps the large buffers of dropped tensors (up to 2 GiB) so that the next training step
/// reuses them instead of mapping fresh memory from the kernel; call this after training to
/// give that memory back.
pub fn release_buffers() -> usize {
    let mut p = pool();
    let bufs = std::mem::take(&mut p.bufs);
    let bytes = std::mem::replace(&mut p.bytes, 0);
    drop(p);
    drop(bufs);
    bytes
}

/// Bytes the pool holds now.
pub fn pooled_bytes() -> usize {
    pool().bytes
}

/// Sets every element to `v`, on rayon's threads when large.
fn fill(x: &mut [f32], v: f32) {
    use rayon::prelude::*;
    x.par_chunks_mut(POOL_FROM).for_each(|c| c.fill(v));
}

/// A new zeroed buffer, backed by huge pages where that is cheap to ask for, lent when large.
fn fresh(n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    if n >= POOL_FROM {
        advise_huge_pages(&mut v);
        lend(&mut pool(), &v);
    }
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(v: &mut [f32]) {
    unsafe extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    const MADV_HUGEPAGE: i32 = 14;
    const PAGE: usize = 4096;
    let begin = v.as_mut_ptr() as usize;
    let start = begin.next_multiple_of(PAGE);
    let end = (begin + std::mem::size_of_val(v)) / PAGE * PAGE;
    if end > start {
        // SAFETY: the page-aligned range [start, end) lies inside `v`'s allocation, which we
        // hold mutably; MADV_HUGEPAGE changes how the kernel backs those pages, never their
        // contents or validity. A refusal (no huge-page support) is ignored: it is a hint.
        unsafe {
            madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_v: &mut [f32]) {}

#[cfg(test)]
mod tests {
    use super::*;

    // One test touches the global pool, so that no other test in this binary races it (the
    // pooled-buffer checks run inside it).
    #[test]
    fn the_pool_reuses_clears_and_bounds_its_buffers() {
        release_buffers();
        let n = 3 * POOL_FROM + 3;
        let mut v = scratch(n);
        v.fill(7.0);
        let ptr = v.as_ptr();
        recycle(v);
        assert_eq!(pooled_bytes(), n * 4);
        // A request of about the same size takes it back, with its old values...
        let w = scratch(n - 1);
        assert_eq!(w.as_ptr(), ptr);
        assert_eq!(w.len(), n - 1);
        assert!(w.iter().all(|&x| x == 7.0));
        recycle(w);
        // ...zeroed when asked, and grown to length when the capacity allows.
        let z = zeroed(n);
        assert_eq!(z.as_ptr(), ptr);
        assert!(z.iter().all(|&x| x == 0.0));
        recycle(z);
        // A much smaller request does not pin the large buffer; small buffers are not pooled.
        let small = scratch(POOL_FROM + 1);
        assert_ne!(small.as_ptr(), ptr);
        recycle(vec![1.0; 10]);
        // A buffer the pool did not lend is freed, not kept.
        recycle(vec![1.0; 2 * POOL_FROM]);
        assert_eq!(pooled_bytes(), n * 4);
        // The bound: the oldest buffers go first.
        let big = POOL_MAX_BYTES / 4 / 2 + 1;
        let (b1, b2) = (scratch(big), scratch(big));
        recycle(b1);
        recycle(b2);
        assert!(pooled_bytes() <= POOL_MAX_BYTES);
        assert_eq!(pooled_bytes(), big * 4, "{}", pooled_bytes());
        drop(small);
        assert_eq!(release_buffers(), big * 4);
        assert_eq!(pooled_bytes(), 0);
        // A pooled buffer hands itself back when dropped, with no call to forget...
        let b = PooledBuffer::stale(n);
        let ptr = b.as_ptr();
        drop(b);
        assert_eq!(pooled_bytes(), n * 4);
        // ...its public constructors never show stale values...
        let z = PooledBuffer::zeroed(n);
        assert_eq!(z.as_ptr(), ptr);
        assert!(z.iter().all(|&x| x == 0.0));
        // ...and as a tensor's storage it goes back when the tensor drops.
        let t = z.into_tensor(&[n]);
        assert_eq!(pooled_bytes(), 0);
        drop(t);
        assert_eq!(pooled_bytes(), n * 4);
        release_buffers();
    }
}
