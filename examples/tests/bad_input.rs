//! What the examples do with bad flags and bad data: a clear error before any training (exit
//! 2 for a usage error), `--help` on standard output with exit 0, and a non-zero exit for a
//! run that stopped early.

use std::path::Path;

use kron::autodiff::testing::ScratchDir;
use kron::data::idx::encode_u8;
use kron::data::{TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS};
use kron_examples::example::{Config, Example, cli_main, run_example};
use kron_examples::train::OptimizerKind;
use kron_examples::{autoencoder, digits_mlp};

/// An MNIST-format directory with `train` and `test` images of `side x side` pixels.
fn mnist_dir(dir: &Path, train: usize, test: usize, side: usize) {
    let images = |n: usize| {
        let px: Vec<u8> = (0..n * side * side).map(|i| (i * 37 % 256) as u8).collect();
        encode_u8(&[n, side, side], &px)
    };
    let labels = |n: usize| encode_u8(&[n], &(0..n).map(|i| (i % 10) as u8).collect::<Vec<_>>());
    std::fs::write(dir.join(TRAIN_IMAGES), images(train)).unwrap();
    std::fs::write(dir.join(TRAIN_LABELS), labels(train)).unwrap();
    std::fs::write(dir.join(TEST_IMAGES), images(test)).unwrap();
    std::fs::write(dir.join(TEST_LABELS), labels(test)).unwrap();
}

/// The example's exit code and what it wrote to standard output and standard error.
fn cli(ex: &Example, args: &[&str]) -> (u8, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli_main(
        ex,
        args.iter().map(|s| s.to_string()).collect(),
        &mut out,
        &mut err,
    );
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn flags(args: &[&str]) -> Result<Config, String> {
    Config::from_args(args.iter().map(|s| s.to_string())).map_err(|e| e.0)
}

#[test]
fn help_goes_to_standard_output_and_exits_zero() {
    let (code, out, err) = cli(&digits_mlp::EXAMPLE, &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--optimizer"), "{out}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn bad_values_are_usage_errors_naming_the_flag() {
    for (args, flag) in [
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--epochs", "0"], "--epochs"),
        (&["--damping", "0"], "--damping"),
        (&["--damping", "-1"], "--damping"),
        (&["--damping", "nan"], "--damping"),
        (&["--kl-clip", "nan"], "--kl-clip"),
        (&["--kl-clip", "-1"], "--kl-clip"),
        (&["--lr", "nan"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--lr", "-0.1"], "--lr"),
        (&["--stats-period", "0"], "--stats-period"),
        (&["--inverse-period", "0"], "--inverse-period"),
        (&["--lr", "0.1", "--compare"], "--lr"),
        (
            &["--optimizer", "kfac-2l", "--coarse", "coarsest"],
            "--coarse",
        ),
        (&["--coarse", "residual"], "--coarse"),
        (&["--compare", "--save", "w"], "--save"),
        (&["--sweep", "--checkpoint", "c"], "--checkpoint"),
        (&["--compare", "--resume", "c"], "--resume"),
        (&["--save"], "--save"),
        (&["--resume"], "--resume"),
    ] {
        let e = flags(args).unwrap_err();
        assert!(e.contains(flag), "{args:?}: {e}");
        let (code, out, err) = cli(&digits_mlp::EXAMPLE, args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(flag) && out.is_empty(), "{args:?}: {err}");
    }
}

/// The autoencoder's KFAC sets its own step sizes: a learning rate for it is refused.
#[test]
fn a_learning_rate_that_would_be_ignored_is_refused() {
    let cfg = Config {
        optimizer: Some(OptimizerKind::Kfac),
        lr: Some(0.1),
        fast: true,
        quiet: true,
        ..Config::default()
    };
    let e = run_example(&autoencoder::EXAMPLE, &cfg).unwrap_err();
    assert!(e.contains("--lr") && e.contains("--kfac-step sgd"), "{e}");
}

/// Two-level KFAC runs from the flags with each coarse space; its name is in the table.
#[test]
fn two_level_kfac_runs_with_each_coarse_space() {
    for coarse in ["nicolaides", "krylov-residual", "tselepidis"] {
        let cfg = flags(&[
            "--optimizer",
            "kfac-2l",
            "--coarse",
            coarse,
            "--fast",
            "--quiet",
        ])
        .unwrap();
        assert_eq!(cfg.optimizer, Some(OptimizerKind::TwoLevelKfac));
        let s = run_example(&digits_mlp::EXAMPLE, &cfg).unwrap();
        assert!(s.stopped.is_empty(), "{coarse}: {:?}", s.stopped);
        let text = s.render(false);
        assert!(text.contains("kfac-2l"), "{text}");
    }
}

/// The digits example compares Adam and KFAC unless `--optimizer` names one: the flags of a
/// single run are usage errors without it, naming the flag and the way out; the other
/// examples train one optimizer by default and take them.
#[test]
fn single_run_flags_need_a_single_run() {
    for (args, flag) in [
        (&["--save", "w"][..], "--save"),
        (&["--checkpoint", "c"], "--checkpoint"),
        (&["--resume", "c"], "--resume"),
        (&["--lr", "0.1"], "--lr"),
    ] {
        let (code, out, err) = cli(&digits_mlp::EXAMPLE, args);
        assert_eq!(code, 2, "{args:?}");
        assert!(
            err.contains(flag) && err.contains("--optimizer NAME") && out.is_empty(),
            "{args:?}: {err}"
        );
        let mut with = args.to_vec();
        with.extend(["--optimizer", "adam"]);
        let cfg = flags(&with).unwrap();
        cfg.validate_for(&digits_mlp::EXAMPLE).unwrap();
        let cfg = flags(args).unwrap();
        cfg.validate_for(&autoencoder::EXAMPLE).unwrap();
    }
}

/// An unwritable `--save` or `--checkpoint` path is found before training, like the CSV's.
#[test]
fn unwritable_weight_and_checkpoint_paths_are_found_before_training() {
    let dir = ScratchDir::new("save-unwritable");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let under = blocker.join("w.safetensors"); // under a file: cannot be created
    let csv = dir.path().join("c.csv");
    for flag in ["--save", "--checkpoint"] {
        let (code, out, err) = cli(
            &digits_mlp::EXAMPLE,
            &[
                "--fast",
                "--quiet",
                "--optimizer",
                "adam",
                "--csv",
                csv.to_str().unwrap(),
                flag,
                under.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 2, "{flag}: {err}");
        assert!(err.contains(flag) && err.contains("w.safetensors"), "{err}");
        assert!(!out.contains("optimizer"), "training ran: {out}");
    }
    // A writable path is probed without leaving a file behind.
    let fine = dir.path().join("sub/w.safetensors");
    kron_examples::resume::check_writable(&fine).unwrap();
    assert!(!fine.exists());
}

#[test]
fn an_unwritable_csv_path_is_found_before_training() {
    let dir = ScratchDir::new("csv");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let csv = blocker.join("curves.csv"); // under a file: cannot be created
    let (code, out, err) = cli(
        &digits_mlp::EXAMPLE,
        &["--fast", "--quiet", "--csv", csv.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("curves.csv"), "{err}");
    assert!(!out.contains("optimizer"), "training ran: {out}");
}

/// Empty sets, pixel-less images and images of the wrong size are errors before training,
/// naming what is wrong.
#[test]
fn data_the_loader_accepts_but_the_example_cannot_use_is_a_clear_error() {
    let run = |ex: &Example, train, test, side| {
        let dir = ScratchDir::new(&format!("{}-{train}-{test}-{side}", ex.name));
        mnist_dir(dir.path(), train, test, side);
        let cfg = Config {
            data: Some(dir.path().to_path_buf()),
            fast: true,
            quiet: true,
            ..Config::default()
        };
        run_example(ex, &cfg).unwrap_err()
    };
    let e = run(&digits_mlp::EXAMPLE, 0, 5, 8);
    assert!(e.contains("training set has no examples"), "{e}");
    let e = run(&digits_mlp::EXAMPLE, 5, 0, 8);
    assert!(e.contains("test set has no examples"), "{e}");
    let e = run(&digits_mlp::EXAMPLE, 5, 5, 0);
    assert!(e.contains("0x0"), "{e}");
    let e = run(&autoencoder::EXAMPLE, 5, 5, 8);
    assert!(e.contains("28x28") && e.contains("8x8"), "{e}");
}

/// A run stopped by a refused step is reported as stopped, and the command exits 1 with the
/// reason on standard error.
#[test]
fn a_run_that_stopped_early_exits_non_zero() {
    let dir = ScratchDir::new("stopped");
    let csv = dir.path().join("c.csv");
    let (code, out, err) = cli(
        &digits_mlp::EXAMPLE,
        &[
            "--fast",
            "--quiet",
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--csv",
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("stopped early"), "{err}");
    // A finished run exits 0.
    let (code, _, err) = cli(
        &digits_mlp::EXAMPLE,
        &["--fast", "--quiet", "--csv", csv.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn distributed_without_a_transport_is_refused() {
    let (code, _, err) = cli(
        &autoencoder::EXAMPLE,
        &["--fast", "--optimizer", "kfac", "--distributed"],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("--distributed") && err.contains("mpirun"),
        "{err}"
    );
    // And it belongs to a single run.
    let e = flags(&["--distributed", "--compare"]).unwrap_err();
    assert!(e.contains("--distributed belongs to a single run"), "{e}");
}
