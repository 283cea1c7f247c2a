//! A global allocator that measures the peak memory of a piece of code, for tests that bound
//! what a loader may allocate.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes live now and the most live since the last
/// [`measure`](Self::measure) began. A test binary installs it with
/// `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc::new();` (one per binary,
/// so such a test lives in a binary of its own: other tests running beside it would count too).
#[derive(Debug, Default)]
pub struct CountingAlloc {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl CountingAlloc {
    /// A counter at zero.
    pub const fn new() -> Self {
        CountingAlloc {
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Runs `f` and returns its result with the most bytes that were live at once during it,
    /// above what was live when it began.
    pub fn measure<T>(&self, f: impl FnOnce() -> T) -> (T, usize) {
        let base = self.live.load(Ordering::Relaxed);
        self.peak.store(base, Ordering::Relaxed);
        let out = f();
        let peak = self.peak.load(Ordering::Relaxed).saturating_sub(base);
        (out, peak)
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only
// observe sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = self.live.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.live.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}
