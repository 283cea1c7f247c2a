//! The IDX reader and `load_mnist_dir` on small files the tests write themselves.

mod common;

use common::{ScratchDir, gzip, images_file, labels_file, write_mnist_dir};
use kron_data::idx::{self, IdxDtype};
use kron_data::{DataError, load_mnist_dir, read_images, read_labels};

#[test]
fn reads_valid_raw_and_gzip_images_alike() {
    let dir = ScratchDir::new("valid");
    let bytes = images_file(3, 2, 4);
    let raw = dir.write("imgs", &bytes);
    // A misleading name: compression is recognized by content, not by suffix.
    let gz = dir.write("imgs-not-named-gz", &gzip(&bytes));
    let a = read_images(&raw).unwrap();
    let b = read_images(&gz).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.count(), a.rows(), a.cols()), (3, 2, 4));
    assert_eq!(a.image(1), &bytes[16 + 8..16 + 16]);
    let t = a.to_tensor();
    assert_eq!(t.shape(), &[3, 8]);
    assert_eq!(t.data()[1], bytes[17] as f32 / 255.0);
    assert!(t.data().iter().all(|&v| (0.0..=1.0).contains(&v)));

    let labels = dir.write("labs.gz", &gzip(&labels_file(&[4, 0, 9])));
    assert_eq!(read_labels(&labels).unwrap(), vec![4, 0, 9]);
}

#[test]
fn general_idx_types() {
    let dir = ScratchDir::new("general");
    // A 2 x 2 big-endian i16 file and a rank-1 f32 file.
    let mut bytes = vec![0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 2];
    for v in [-1i16, 2, 300, -400] {
        bytes.extend_from_slice(&v.to_be_bytes());
    }
    let arr = idx::read_idx(dir.write("i16", &bytes)).unwrap();
    assert_eq!(arr.dtype(), IdxDtype::I16);
    assert_eq!(arr.dims(), &[2, 2]);
    assert_eq!(arr.to_f32(), vec![-1.0, 2.0, 300.0, -400.0]);
    assert_eq!(arr.to_tensor().shape(), &[2, 2]);

    let mut bytes = vec![0, 0, 0x0D, 1, 0, 0, 0, 2];
    for v in [1.5f32, -0.25] {
        bytes.extend_from_slice(&v.to_be_bytes());
    }
    let arr = idx::parse_idx(&gzip(&bytes), "mem".as_ref()).unwrap();
    assert_eq!(arr.to_f32(), vec![1.5, -0.25]);

    let e = idx::parse_idx(&[0, 0, 0x07, 1, 0, 0, 0, 0], "mem".as_ref()).unwrap_err();
    assert!(matches!(e, DataError::BadHeader { .. }), "{e:?}");
    let e = idx::parse_idx(&[1, 0, 0x08, 1, 0, 0, 0, 0], "mem".as_ref()).unwrap_err();
    assert!(matches!(e, DataError::BadHeader { .. }), "{e:?}");
    // Dimensions whose product overflows are a header error, not an allocation.
    let e = idx::parse_idx(
        &[
            0, 0, 0x0E, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
        ],
        "mem".as_ref(),
    )
    .unwrap_err();
    assert!(
        matches!(e, DataError::BadHeader { .. } | DataError::Truncated { .. }),
        "{e:?}"
    );
}

#[test]
fn truncated_payload_header_and_gzip_stream() {
    let dir = ScratchDir::new("truncated");
    let bytes = images_file(3, 2, 4);
    let p = dir.write("cut", &bytes[..bytes.len() - 5]);
    let e = read_images(&p).unwrap_err();
    match &e {
        DataError::Truncated {
            path,
            expected_bytes,
            found_bytes,
        } => {
            assert_eq!(path, &p);
            assert_eq!(*expected_bytes, 16 + 24);
            assert_eq!(*found_bytes, 16 + 24 - 5);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("cut") && msg.contains("truncated"), "{msg}");

    // Cut inside the header.
    let p = dir.write("cut-header", &bytes[..10]);
    assert!(matches!(
        read_images(&p),
        Err(DataError::Truncated {
            expected_bytes: 16,
            ..
        })
    ));
    // Too short even for the magic number.
    let p = dir.write("tiny", &bytes[..2]);
    assert!(matches!(read_labels(&p), Err(DataError::Truncated { .. })));

    // A gzip stream cut short.
    let gz = gzip(&bytes);
    let p = dir.write("cut.gz", &gz[..gz.len() / 2]);
    let e = read_images(&p).unwrap_err();
    assert!(matches!(e, DataError::Gzip { .. }), "{e:?}");
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.to_string().contains("cut.gz"), "{e}");
}

#[test]
fn wrong_magic() {
    let dir = ScratchDir::new("magic");
    let labels = dir.write("labels-as-images", &labels_file(&[1, 2, 3]));
    let e = read_images(&labels).unwrap_err();
    match &e {
        DataError::BadMagic {
            path,
            expected,
            found,
        } => {
            assert_eq!(path, &labels);
            assert_eq!((*expected, *found), (2051, 2049));
        }
        other => panic!("expected BadMagic, got {other:?}"),
    }
    assert!(e.to_string().contains("2051"), "{e}");

    let images = dir.write("images-as-labels.gz", &gzip(&images_file(1, 2, 2)));
    assert!(matches!(
        read_labels(&images),
        Err(DataError::BadMagic {
            expected: 2049,
            found: 2051,
            ..
        })
    ));

    let text = dir.write("text", b"hello, this is not IDX");
    assert!(matches!(
        read_images(&text),
        Err(DataError::BadMagic { .. })
    ));
}

#[test]
fn trailing_bytes() {
    let dir = ScratchDir::new("trailing");
    let mut bytes = labels_file(&[1, 2, 3]);
    bytes.extend_from_slice(&[0, 0]);
    // Raw: the whole file is there to count.
    let p = dir.write("long", &bytes);
    let e = read_labels(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::TrailingBytes {
                expected_bytes: 11,
                found_bytes: 13,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("2 trailing bytes"), "{e}");
    // Compressed: decompression stops one byte past the declared 11.
    let p = dir.write("long.gz", &gzip(&bytes));
    let e = read_labels(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::TrailingData {
                expected_bytes: 11,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("long.gz"), "{e}");
}

#[test]
fn missing_file_names_it() {
    let e = read_images("/nonexistent/kron/dir/file").unwrap_err();
    assert!(matches!(e, DataError::Io { .. }), "{e:?}");
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.to_string().contains("/nonexistent/kron/dir/file"), "{e}");

    let dir = ScratchDir::new("missing");
    write_mnist_dir(&dir, true);
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let e = load_mnist_dir(dir.path()).unwrap_err();
    match &e {
        DataError::MissingFile { name, .. } => assert_eq!(name, "t10k-labels-idx1-ubyte"),
        other => panic!("expected MissingFile, got {other:?}"),
    }
    assert!(e.to_string().contains("t10k-labels-idx1-ubyte.gz"), "{e}");
}

#[test]
fn mnist_dir_raw_and_gzip() {
    for gz in [false, true] {
        let dir = ScratchDir::new("mnistdir");
        write_mnist_dir(&dir, gz);
        let split = load_mnist_dir(dir.path()).unwrap();
        assert_eq!(split.train.len(), 5);
        assert_eq!(split.test.len(), 3);
        assert_eq!(split.train.labels(), &[0, 9, 3, 3, 1]);
        assert_eq!(split.test.labels(), &[2, 7, 0]);
        assert_eq!(split.train.image_shape(), [1, 4, 3]);
        assert_eq!(split.train.num_classes(), 10);
        assert_eq!(split.train.inputs().shape(), &[5, 12]);
        assert_eq!(split.test.images_nchw().shape(), &[3, 1, 4, 3]);
        assert_eq!(split.train.inputs().data()[1], 7.0 / 255.0);
    }
    // Mixed: raw images, gzip labels.
    let dir = ScratchDir::new("mixed");
    write_mnist_dir(&dir, false);
    let labels = std::fs::read(dir.path().join("train-labels-idx1-ubyte")).unwrap();
    std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
    dir.write("train-labels-idx1-ubyte.gz", &gzip(&labels));
    assert_eq!(load_mnist_dir(dir.path()).unwrap().train.len(), 5);
}

#[test]
fn count_mismatch() {
    let dir = ScratchDir::new("count");
    write_mnist_dir(&dir, false);
    dir.write("train-labels-idx1-ubyte", &labels_file(&[0, 1, 2, 3]));
    let e = load_mnist_dir(dir.path()).unwrap_err();
    match &e {
        DataError::CountMismatch {
            image_count,
            label_count,
            ..
        } => assert_eq!((*image_count, *label_count), (5, 4)),
        other => panic!("expected CountMismatch, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("train-images-idx3-ubyte") && msg.contains("train-labels-idx1-ubyte"),
        "{msg}"
    );
}

#[test]
fn label_out_of_range() {
    let dir = ScratchDir::new("range");
    write_mnist_dir(&dir, true);
    dir.write(
        "t10k-labels-idx1-ubyte.gz",
        &gzip(&labels_file(&[2, 10, 0])),
    );
    let e = load_mnist_dir(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::LabelOutOfRange {
                index: 1,
                label: 10,
                num_classes: 10,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn train_and_test_image_sizes_must_agree() {
    let dir = ScratchDir::new("shape");
    write_mnist_dir(&dir, false);
    dir.write("t10k-images-idx3-ubyte", &images_file(3, 3, 4));
    let e = load_mnist_dir(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::ShapeMismatch { .. }), "{e:?}");
}

#[test]
fn truncated_file_inside_mnist_dir_is_named() {
    let dir = ScratchDir::new("dirtrunc");
    write_mnist_dir(&dir, false);
    let bytes = images_file(5, 4, 3);
    let p = dir.write("train-images-idx3-ubyte", &bytes[..bytes.len() - 1]);
    match load_mnist_dir(dir.path()).unwrap_err() {
        DataError::Truncated { path, .. } => assert_eq!(path, p),
        other => panic!("expected Truncated, got {other:?}"),
    }
}
