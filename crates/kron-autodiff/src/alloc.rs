//! Large zeroed buffers.
//!
//! A conv layer's im2col patch matrix is tens to hundreds of MiB, built anew every step: the
//! allocator maps it fresh from the kernel each time, and faulting it in 4 KiB pages costs
//! about as much as writing it. On Linux such buffers ask for transparent huge pages before
//! their first write, which takes most of that cost away (where the system allows huge pages
//! on request; elsewhere the request does nothing).

/// Bytes from which [`zeroed`] asks for huge pages (a few huge pages' worth).
const HUGE_PAGES_FROM: usize = 8 << 20;

/// A buffer of `n` zeros, backed by huge pages where that is cheap to ask for.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    if std::mem::size_of_val(v.as_slice()) >= HUGE_PAGES_FROM {
        advise_huge_pages(&mut v);
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
