//! A small gzip file that would unpack to far more than its IDX header declares (a "gzip
//! bomb") is refused after decompressing no more than the declared size plus one byte: the
//! peak memory of the read stays near the size of the file the header describes.
//!
//! This binary counts every allocation (its own global allocator), so it holds this test
//! alone.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use flate2::Compression;
use flate2::write::GzEncoder;
use kron_data::{DataError, idx};

/// The system allocator, keeping the bytes live now and the most live since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// 10 images of 28 x 28 (7,856 bytes with the header) followed by 256 MiB of zeros, compressed
/// to a quarter of a megabyte: refused as decompressing to more than the header declares, with a
/// peak of live memory under 16 MiB beyond the compressed file.
#[test]
fn a_gzip_bomb_is_refused_after_the_declared_size() {
    let header = common::images_file(10, 28, 28);
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(&header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        enc.write_all(&zeros).unwrap();
    }
    drop(zeros);
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 4 << 20, "the bomb is {} bytes", bomb.len());

    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = std::time::Instant::now();
    let e = idx::parse_images(&bomb, "bomb.gz".as_ref()).unwrap_err();
    let seconds = start.elapsed().as_secs_f64();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert!(
        matches!(
            e,
            DataError::TrailingData {
                expected_bytes: 7856,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("bomb.gz"), "{e}");
    println!(
        "gzip bomb of {} bytes (256 MiB unpacked): refused in {seconds:.3} s, peak {peak} bytes \
         above the compressed file",
        bomb.len()
    );
    assert!(
        peak < 16 << 20,
        "peak of {peak} bytes while reading the bomb"
    );
}
