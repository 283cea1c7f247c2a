//! The embedded datasets: they parse, with the expected sizes and class counts.

use std::path::Path;

use kron_data::{digits, load_mnist_dir, mnist_10k};

#[test]
fn digits_shapes_split_and_classes() {
    let d = digits();
    assert_eq!(d.train.len(), 1437);
    assert_eq!(d.test.len(), 360);
    for part in [&d.train, &d.test] {
        assert_eq!(part.image_shape(), [1, 8, 8]);
        assert_eq!(part.features(), 64);
        assert_eq!(part.num_classes(), 10);
        assert_eq!(part.inputs().shape(), &[part.len(), 64]);
        assert_eq!(part.images_nchw().shape(), &[part.len(), 1, 8, 8]);
        let data = part.inputs().data();
        assert!(data.iter().all(|&v| (0.0..=1.0).contains(&v)));
        // Values are k / 16 exactly.
        assert!(data.iter().all(|&v| (v * 16.0).fract() == 0.0));
    }
    let all: Vec<usize> = d
        .train
        .class_counts()
        .iter()
        .zip(d.test.class_counts())
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!(all.iter().sum::<usize>(), 1797);
    assert!(all.iter().all(|&c| (170..=190).contains(&c)), "{all:?}");
    // The first row of the CSV: 0,0,5,13,9,1,0,0,... label 0.
    assert_eq!(d.train.labels()[0], 0);
    assert_eq!(
        &d.train.inputs().data()[..8],
        &[
            0.0,
            0.0,
            5.0 / 16.0,
            13.0 / 16.0,
            9.0 / 16.0,
            1.0 / 16.0,
            0.0,
            0.0
        ]
    );
    // The maximum value 16 occurs and maps to 1.
    assert!(d.train.inputs().data().contains(&1.0));
}

#[test]
fn mnist_10k_counts() {
    let m = mnist_10k();
    assert_eq!(m.train.len(), 8000);
    assert_eq!(m.test.len(), 2000);
    assert_eq!(m.train.inputs().shape(), &[8000, 784]);
    assert_eq!(m.test.image_shape(), [1, 28, 28]);
    assert_eq!(m.test.images_nchw().shape(), &[2000, 1, 28, 28]);
    assert_eq!(
        m.train.class_counts(),
        vec![801, 902, 793, 826, 784, 690, 811, 856, 755, 782]
    );
    assert_eq!(
        m.test.class_counts(),
        vec![200, 225, 198, 206, 196, 173, 203, 214, 189, 196]
    );
    let data = m.train.inputs().data();
    assert!(data.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert!(data.contains(&1.0), "255 occurs and maps to 1");
    // Pixels are exact multiples of 1/255.
    assert!(
        data.iter()
            .all(|&v| ((v * 255.0).round() / 255.0 - v).abs() < 1e-7)
    );
    // Background dominates MNIST: the mean pixel is about 0.13.
    let mean = m.train.inputs().mean_all();
    assert!((0.10..0.16).contains(&mean), "mean {mean}");
}

#[test]
fn cached_copies_share_storage() {
    let (a, b) = (mnist_10k(), mnist_10k());
    assert!(a.train.inputs().shares_storage(b.train.inputs()));
    assert_eq!(digits(), digits());
}

#[test]
fn bundled_files_read_from_disk_equal_the_embedded_copy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist-10k");
    let from_disk = load_mnist_dir(&dir).unwrap();
    assert_eq!(from_disk, mnist_10k());
}
