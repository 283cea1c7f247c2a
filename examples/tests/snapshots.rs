//! Each example's `--fast` run, snapshotted without its timing columns. The runs are fixed by
//! their seed and have the same bits for any thread count, so any change in these tables is a
//! change in numerics.

use kron_examples::example::{Config, Example, run_example};
use kron_examples::train::OptimizerKind;

fn fast(ex: &Example, optimizer: OptimizerKind) -> String {
    let cfg = Config {
        optimizer,
        fast: true,
        quiet: true,
        ..Config::default()
    };
    run_example(ex, &cfg).unwrap().render(false)
}

#[test]
fn digits_mlp_fast_adam() {
    insta::assert_snapshot!(fast(
        &kron_examples::digits_mlp::EXAMPLE,
        OptimizerKind::Adam
    ));
}

#[test]
fn digits_mlp_fast_compare() {
    let cfg = Config {
        fast: true,
        quiet: true,
        compare: true,
        ..Config::default()
    };
    let s = run_example(&kron_examples::digits_mlp::EXAMPLE, &cfg).unwrap();
    insta::assert_snapshot!(s.render(false));
}

#[test]
fn autoencoder_fast_kfac() {
    insta::assert_snapshot!(fast(
        &kron_examples::autoencoder::EXAMPLE,
        OptimizerKind::Kfac
    ));
}

#[test]
fn convnet_fast_kfac() {
    insta::assert_snapshot!(fast(&kron_examples::convnet::EXAMPLE, OptimizerKind::Kfac));
}

#[test]
fn bad_flags_and_missing_data_are_clear_errors() {
    let e =
        Config::from_args(["--optimizer".into(), "lbfgs".into()], OptimizerKind::Adam).unwrap_err();
    assert!(e.0.contains("lbfgs"), "{e}");
    let cfg = Config {
        data: Some("/nonexistent/mnist".into()),
        fast: true,
        quiet: true,
        ..Config::default()
    };
    let e = run_example(&kron_examples::digits_mlp::EXAMPLE, &cfg).unwrap_err();
    assert!(e.contains("/nonexistent/mnist"), "{e}");
}
