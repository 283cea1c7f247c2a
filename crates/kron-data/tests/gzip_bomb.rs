//! A small gzip file that would unpack to far more than its IDX header declares (a "gzip
//! bomb") is refused after decompressing no more than the declared size plus one byte: the
//! peak memory of the read stays near the size of the file the header describes.
//!
//! This binary counts every allocation (kron's `CountingAlloc` as its global allocator), so
//! it holds this test alone.

mod common;

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use kron_autodiff::testing::CountingAlloc;
use kron_data::{DataError, idx};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

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

    let start = std::time::Instant::now();
    let (e, peak) = ALLOC.measure(|| idx::parse_images(&bomb, "bomb.gz".as_ref()).unwrap_err());
    let seconds = start.elapsed().as_secs_f64();
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
