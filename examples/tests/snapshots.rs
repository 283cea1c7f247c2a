//! Each example's `--fast` run: its printed table snapshotted with the kernel-dependent numbers
//! masked, and those numbers checked in code against stated values and tolerances.
//!
//! The runs are fixed by their seed and have the same bits for any thread count on one kind of
//! CPU, but not across kinds: matrixmultiply selects another GEMM kernel (AVX-512, FMA+AVX2,
//! ...) whose products round differently in the last bit, and training carries that on. So a
//! snapshot holds only what no kernel changes (the layout, the schedule of epochs and steps,
//! the learning rates, the time-to-target step counts once their margin is proven), and the
//! losses and accuracies are compared here with a tolerance far above the kernels' rounding
//! and far below any change in the method. Work on one kind of CPU never needs the other kind
//! to update a snapshot; a change in numerics fails [`check`] with the new values printed in
//! the form the tests hold them.

use kron_examples::example::{Config, Example, Summary, run_example};
use kron_examples::train::OptimizerKind;

/// Relative tolerance on every loss: the kernels' last-bit differences after a few steps are
/// below 1e-6 relative; a changed method moves these losses by far more than 1e-4.
const LOSS_RTOL: f32 = 1e-4;

/// Absolute tolerance on a test accuracy: one example of the smallest fast test set (64).
const ACC_ATOL: f32 = 1.0 / 64.0 + 1e-6;

/// One evaluation point as the tests hold it: optimizer, step, train loss, test loss, test
/// accuracy (NaN for a regression).
type Expected = (&'static str, u64, f32, f32, f32);

/// Replaces every decimal number (digits, a point, digits, maybe a `%`) by one `~` at the
/// right end of the space it and the blank before it took (the columns are right-aligned, so
/// that span does not change when a value gains a digit, as 9.99% becomes 10.01%): the
/// snapshot keeps the layout and nothing a GEMM kernel changes. Integers (epochs, steps) and
/// numbers in exponent form (learning rates) are kept.
fn mask(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        for (gap, word) in split_keep(line) {
            let digits = word.trim_end_matches('%');
            let decimal = digits.contains('.')
                && !digits.contains(['e', 'E'])
                && digits
                    .trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.')
                && digits.chars().any(|c| c.is_ascii_digit());
            if decimal {
                out.push_str(&" ".repeat(gap.len() + word.len() - 1));
                out.push('~');
            } else {
                out.push_str(gap);
                out.push_str(word);
            }
        }
        out.push('\n');
    }
    out
}

/// The words of a line, each with the whitespace before it.
fn split_keep(line: &str) -> Vec<(&str, &str)> {
    let mut parts = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        let start = rest.len() - rest.trim_start().len();
        let (gap, tail) = rest.split_at(start);
        let end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        let (word, after) = tail.split_at(end);
        parts.push((gap, word));
        rest = after;
    }
    parts
}

fn close(got: f32, want: f32, rtol: f32) -> bool {
    (got.is_nan() && want.is_nan()) || (got - want).abs() <= rtol * want.abs().max(1e-3)
}

/// Every evaluation point of `s` against `want`, and, with a comparison, the margin that makes
/// its time-to-target step counts independent of the kernel: no point other than the
/// baseline's final one lies within the loss tolerance of the target.
fn check(s: &Summary, want: &[Expected]) {
    let got: Vec<(&str, u64, f32, f32, f32)> = s
        .curves
        .points
        .iter()
        .map(|p| {
            let acc = p.test_accuracy.unwrap_or(f32::NAN);
            (p.optimizer.as_str(), p.step, p.train_loss, p.test_loss, acc)
        })
        .collect();
    let matches = got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            g.0 == w.0
                && g.1 == w.1
                && close(g.2, w.2, LOSS_RTOL)
                && close(g.3, w.3, LOSS_RTOL)
                && ((g.4.is_nan() && w.4.is_nan()) || (g.4 - w.4).abs() <= ACC_ATOL)
        });
    let listing: String = got
        .iter()
        .map(|(o, st, tr, te, a)| format!("        ({o:?}, {st}, {tr:?}, {te:?}, {a:?}),\n"))
        .collect();
    assert!(
        matches,
        "the run's numbers left their tolerance (losses {LOSS_RTOL} relative, accuracy \
         {ACC_ATOL}); if the numerics changed on purpose, these are the new values:\n{listing}"
    );
    if let Some(c) = &s.comparison {
        let last_of_baseline = s
            .curves
            .points
            .iter()
            .rposition(|p| p.optimizer == c.baseline);
        for (i, p) in s.curves.points.iter().enumerate() {
            if Some(i) != last_of_baseline {
                assert!(
                    !close(p.train_loss, c.target, LOSS_RTOL),
                    "{} at step {} has loss {} within the tolerance of the target {}: the \
                     time-to-target step count could depend on the GEMM kernel",
                    p.optimizer,
                    p.step,
                    p.train_loss,
                    c.target
                );
            }
        }
    }
}

fn fast(ex: &Example, optimizer: OptimizerKind) -> Summary {
    let cfg = Config {
        optimizer: Some(optimizer),
        fast: true,
        quiet: true,
        ..Config::default()
    };
    run_example(ex, &cfg).unwrap()
}

#[test]
fn digits_mlp_fast_adam() {
    let s = fast(&kron_examples::digits_mlp::EXAMPLE, OptimizerKind::Adam);
    check(
        &s,
        &[
            ("adam", 0, 2.36822, 2.40352, 0.0),
            ("adam", 6, 2.24818, 2.30427, 0.09),
            ("adam", 12, 2.14696, 2.21580, 0.11),
        ],
    );
    insta::assert_snapshot!(mask(&s.render(false)));
}

/// What `cargo run --release --example digits_mlp` runs, on the fast sizes: Adam against KFAC,
/// with the lines that explain the run to someone new to it.
#[test]
fn digits_mlp_fast_default() {
    let cfg = Config {
        fast: true,
        quiet: true,
        ..Config::default()
    };
    let s = run_example(&kron_examples::digits_mlp::EXAMPLE, &cfg).unwrap();
    check(
        &s,
        &[
            ("adam", 0, 2.368219, 2.4035246, 0.0),
            ("adam", 6, 2.2481813, 2.3042715, 0.09),
            ("adam", 12, 2.1469588, 2.2158005, 0.11),
            ("kfac", 0, 2.368219, 2.4035246, 0.0),
            ("kfac", 6, 2.226243, 2.2851532, 0.09),
            ("kfac", 12, 1.9514452, 2.0569932, 0.32),
        ],
    );
    insta::assert_snapshot!(mask(&s.render(false)));
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
    check(
        &s,
        &[
            ("sgd", 0, 2.368219, 2.4035246, 0.0),
            ("sgd", 6, 2.2792883, 2.3379202, 0.03),
            ("sgd", 12, 2.1668267, 2.2493782, 0.17),
            ("adam", 0, 2.368219, 2.4035246, 0.0),
            ("adam", 6, 2.2481813, 2.3042715, 0.09),
            ("adam", 12, 2.1469588, 2.2158005, 0.11),
            ("kfac", 0, 2.368219, 2.4035246, 0.0),
            ("kfac", 6, 2.226243, 2.2851532, 0.09),
            ("kfac", 12, 1.9514452, 2.0569932, 0.32),
            ("shampoo", 0, 2.368219, 2.4035246, 0.0),
            ("shampoo", 6, 2.2514908, 2.303431, 0.08),
            ("shampoo", 12, 2.1347518, 2.203969, 0.25),
            ("kradagrad-star", 0, 2.368219, 2.4035246, 0.0),
            ("kradagrad-star", 6, 2.2797627, 2.3379853, 0.03),
            ("kradagrad-star", 12, 2.1614912, 2.2436352, 0.17),
            ("kradagrad", 0, 2.368219, 2.4035246, 0.0),
            ("kradagrad", 6, 2.1525557, 2.241175, 0.15),
            ("kradagrad", 12, 1.834757, 1.9291252, 0.52),
        ],
    );
    insta::assert_snapshot!(mask(&s.render(false)));
}

#[test]
fn digits_mlp_fast_shampoo_and_kradagrad() {
    for (kind, want) in [
        (
            OptimizerKind::Shampoo,
            [
                ("shampoo", 0, 2.368219, 2.4035246, 0.0),
                ("shampoo", 6, 2.2514908, 2.303431, 0.08),
                ("shampoo", 12, 2.1347518, 2.203969, 0.25),
            ],
        ),
        (
            OptimizerKind::KrAdagradStar,
            [
                ("kradagrad-star", 0, 2.368219, 2.4035246, 0.0),
                ("kradagrad-star", 6, 2.2797627, 2.3379853, 0.03),
                ("kradagrad-star", 12, 2.1614912, 2.2436352, 0.17),
            ],
        ),
        (
            OptimizerKind::KrAdagrad,
            [
                ("kradagrad", 0, 2.368219, 2.4035246, 0.0),
                ("kradagrad", 6, 2.1525557, 2.241175, 0.15),
                ("kradagrad", 12, 1.834757, 1.9291252, 0.52),
            ],
        ),
    ] {
        let s = fast(&kron_examples::digits_mlp::EXAMPLE, kind);
        check(&s, &want);
        insta::assert_snapshot!(kind.name(), mask(&s.render(false)));
    }
}

#[test]
fn autoencoder_fast_kfac() {
    let s = fast(&kron_examples::autoencoder::EXAMPLE, OptimizerKind::Kfac);
    check(
        &s,
        &[
            ("kfac", 0, 927.155, 922.3911, f32::NAN),
            ("kfac", 2, 263.55627, 266.84387, f32::NAN),
            ("kfac", 4, 216.84566, 224.18057, f32::NAN),
        ],
    );
    insta::assert_snapshot!(mask(&s.render(false)));
}

#[test]
fn convnet_fast_kfac() {
    let s = fast(&kron_examples::convnet::EXAMPLE, OptimizerKind::Kfac);
    check(
        &s,
        &[
            ("kfac", 0, 3.02493, 3.07747, 0.1406),
            ("kfac", 4, 1.88644, 2.09888, 0.3906),
            ("kfac", 8, 0.84223, 1.17513, 0.7188),
        ],
    );
    insta::assert_snapshot!(mask(&s.render(false)));
}

/// The mask keeps the layout and every integer, and hides every decimal.
/// A value that gains a digit leaves the masked line as it was.
#[test]
fn the_mask_hides_decimals_only() {
    let t = "kfac    1    6   2.22624   9.00%  3.000e-2  -0.5  784-1000-30 (seed 0)";
    assert_eq!(
        mask(t),
        "kfac    1    6         ~       ~  3.000e-2     ~  784-1000-30 (seed 0)\n"
    );
    assert_eq!(mask("acc  9.99%"), mask("acc 10.01%"));
}

#[test]
fn bad_flags_and_missing_data_are_clear_errors() {
    let e = Config::from_args(["--optimizer".into(), "lbfgs".into()]).unwrap_err();
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

/// A loss off by more than its tolerance fails the check, naming the new values.
#[test]
#[should_panic(expected = "these are the new values")]
fn a_moved_loss_fails_the_check() {
    let s = fast(&kron_examples::digits_mlp::EXAMPLE, OptimizerKind::Adam);
    check(
        &s,
        &[
            ("adam", 0, 2.36822, 2.40352, 0.0),
            ("adam", 6, 2.24818 * (1.0 + 3.0 * LOSS_RTOL), 2.30427, 0.09),
            ("adam", 12, 2.14696, 2.21580, 0.11),
        ],
    );
}

/// The ill-conditioned quadratic's `--fast` run (n 48, 30 steps): the layout snapshotted with
/// every number masked, and the final losses checked here. Over 30 steps of a problem whose
/// Hessian has condition 1e8 and 1e12 the GEMM kernels' last-bit differences grow, so the
/// losses are compared at 2% (the methods differ from each other by far more), and the
/// orderings the paper's claims rest on are checked directly.
#[test]
fn ill_conditioned_fast() {
    use kron_examples::ill_conditioned::{IllConfig, METHODS, render, run_all};
    let cfg = IllConfig::from_args(["--fast".to_string()]).unwrap();
    let all = run_all(&cfg).unwrap();
    let want: [(f64, [f64; 8]); 2] = [
        (
            1e4,
            [
                1.5029e3, 8.3199e2, 2.7261e1, 2.9996e1, 2.7142e1, 2.7140e1, 3.9633e1, 3.1680e2,
            ],
        ),
        (
            1e6,
            [
                1.0495e3, 9.1087e2, 1.7566e1, 3.7246e1, 1.7620e1, 1.7621e1, 2.6247e1, 2.0747e2,
            ],
        ),
    ];
    let mut listing = String::new();
    let mut ok = true;
    for (pr, (kappa, finals)) in all.iter().zip(&want) {
        assert_eq!(pr.kappa, *kappa);
        for (r, &f) in pr.runs.iter().zip(finals) {
            assert_eq!(
                r.losses.len(),
                cfg.steps + 1,
                "{} stopped: {:?}",
                r.method,
                r.events
            );
            assert!(r.events.is_empty(), "{:?}", r.events);
            let got = *r.losses.last().unwrap();
            listing.push_str(&format!("  kappa {kappa:e} {}: {got:.4e}\n", r.method));
            ok &= (got - f).abs() <= 2e-2 * f;
        }
        let fin = |name: &str| {
            let i = METHODS.iter().position(|m| m.name == name).unwrap();
            *pr.runs[i].losses.last().unwrap()
        };
        // Every preconditioned method beats both first-order ones; f64 Shampoo beats the
        // plain f32 one, and kron's f32 safeguards bring f32 Shampoo back to within 2% of f64.
        for m in ["shampoo-f64", "shampoo-f32", "kradagrad-star", "kradagrad"] {
            assert!(
                fin(m) < fin("sgd").min(fin("adam")),
                "{m} at kappa {kappa:e}"
            );
        }
        assert!(fin("shampoo-f64") < fin("shampoo-f32"));
        for m in ["shampoo-f32-rel", "shampoo-newton"] {
            assert!(
                (fin(m) - fin("shampoo-f64")).abs() < 0.02 * fin("shampoo-f64"),
                "{m}"
            );
        }
    }
    assert!(
        ok,
        "final losses left their 2% tolerance; new values:\n{listing}"
    );
    insta::assert_snapshot!(render(&cfg, &all, false, false));
}

/// Two-level KFAC's `--fast` run: the direction check on a 6-layer linear net and two seeds of
/// training on the fast autoencoder and conv net, the layout snapshotted with every number
/// masked and the numbers held here (the directions come from one step with `f64` factors, so
/// they move with the kernels by far less than 1e-3).
#[test]
fn two_level_fast() {
    use kron_examples::two_level::{METHODS, TwoLevelConfig, label, render, run_all};
    let cfg =
        TwoLevelConfig::from_args(["--fast".to_string(), "--rounds".into(), "0".into()]).unwrap();
    let r = run_all(&cfg).unwrap();
    // (damping, method, lambda, angle in degrees, relative error)
    let want: [(&str, &str, f64, f64, f64); 42] = [
        ("kron", "kfac", 1e-3, 87.2942, 3.57565),
        ("kron", "2l-nicolaides", 1e-3, 87.5206, 3.58819),
        ("kron", "2l-spectral", 1e-3, 87.2969, 3.57684),
        ("kron", "2l-residual", 1e-3, 87.2973, 3.75106),
        ("kron", "2l-tselepidis", 1e-3, 87.584, 3.59324),
        ("kron", "2l-krylov-nicolaides", 1e-3, 87.5627, 3.59494),
        ("kron", "2l-krylov-residual", 1e-3, 87.3812, 3.91633),
        ("per-factor", "kfac", 1e-3, 90.2313, 86.2969),
        ("per-factor", "2l-nicolaides", 1e-3, 90.2402, 86.3003),
        ("per-factor", "2l-spectral", 1e-3, 90.2313, 86.2969),
        ("per-factor", "2l-residual", 1e-3, 90.2244, 86.8789),
        ("per-factor", "2l-tselepidis", 1e-3, 90.2426, 86.3013),
        ("per-factor", "2l-krylov-nicolaides", 1e-3, 90.2405, 86.3046),
        ("per-factor", "2l-krylov-residual", 1e-3, 90.2248, 86.934),
        ("kron", "kfac", 1e-2, 75.1334, 2.45955),
        ("kron", "2l-nicolaides", 1e-2, 74.698, 2.53404),
        ("kron", "2l-spectral", 1e-2, 75.1358, 2.4598),
        ("kron", "2l-residual", 1e-2, 74.5273, 2.60658),
        ("kron", "2l-tselepidis", 1e-2, 75.2798, 2.56448),
        ("kron", "2l-krylov-nicolaides", 1e-2, 74.7381, 2.54098),
        ("kron", "2l-krylov-residual", 1e-2, 74.6998, 2.65529),
        ("per-factor", "kfac", 1e-2, 85.5525, 27.4845),
        ("per-factor", "2l-nicolaides", 1e-2, 85.4656, 27.4868),
        ("per-factor", "2l-spectral", 1e-2, 85.5525, 27.4845),
        ("per-factor", "2l-residual", 1e-2, 85.4756, 28.1289),
        ("per-factor", "2l-tselepidis", 1e-2, 85.5082, 27.4931),
        ("per-factor", "2l-krylov-nicolaides", 1e-2, 85.4677, 27.4941),
        ("per-factor", "2l-krylov-residual", 1e-2, 85.481, 28.166),
        ("kron", "kfac", 1e-1, 64.4057, 2.37018),
        ("kron", "2l-nicolaides", 1e-1, 63.9205, 2.77024),
        ("kron", "2l-spectral", 1e-1, 64.406, 2.37021),
        ("kron", "2l-residual", 1e-1, 63.9313, 2.60382),
        ("kron", "2l-tselepidis", 1e-1, 66.4699, 2.95422),
        ("kron", "2l-krylov-nicolaides", 1e-1, 64.0378, 2.78896),
        ("kron", "2l-krylov-residual", 1e-1, 63.9685, 2.66934),
        ("per-factor", "kfac", 1e-1, 67.4791, 7.3861),
        ("per-factor", "2l-nicolaides", 1e-1, 66.4359, 7.57367),
        ("per-factor", "2l-spectral", 1e-1, 67.4791, 7.3861),
        ("per-factor", "2l-residual", 1e-1, 67.0558, 7.83192),
        ("per-factor", "2l-tselepidis", 1e-1, 67.0455, 7.61605),
        ("per-factor", "2l-krylov-nicolaides", 1e-1, 66.4341, 7.57549),
        ("per-factor", "2l-krylov-residual", 1e-1, 67.1001, 7.85859),
    ];
    let mut listing = String::new();
    let mut ok = true;
    assert_eq!(r.directions.len(), want.len());
    for (d, w) in r.directions.iter().zip(&want) {
        assert_eq!(
            (d.damping_mode, label(d.method).as_str(), d.lambda),
            (w.0, w.1, w.2)
        );
        listing.push_str(&format!(
            "        (\"{}\", \"{}\", {:.0e}, {:.6}, {:.6}),\n",
            w.0, w.1, w.2, d.angle, d.rel_error
        ));
        ok &= (d.angle - w.3).abs() <= 1e-3 * w.3 && (d.rel_error - w.4).abs() <= 1e-3 * w.4;
    }
    assert!(
        ok,
        "directions left their tolerance; new values:\n{listing}"
    );
    // Mean final training loss over the two seeds, per example and method.
    let finals: [(&str, [f32; 7]); 2] = [
        (
            "autoencoder",
            [
                217.09106, 210.57563, 217.08838, 216.95471, 210.69406, 210.56644, 216.95152,
            ],
        ),
        (
            "convnet",
            [
                0.88973753, 0.9010409, 0.88973753, 0.89014581, 0.91889124, 0.90084327, 0.89000545,
            ],
        ),
    ];
    let mut listing = String::new();
    let mut ok = true;
    for (ex, want) in finals {
        for (m, w) in METHODS.iter().zip(want) {
            let v: Vec<f32> = r
                .finals
                .iter()
                .filter(|f| f.example == ex && f.method == *m)
                .map(|f| f.train_loss)
                .collect();
            assert_eq!(v.len(), 2, "{ex} {m}");
            let mean = v.iter().sum::<f32>() / 2.0;
            listing.push_str(&format!("  {ex} {m}: {mean}\n"));
            ok &= close(mean, w, LOSS_RTOL);
        }
    }
    assert!(
        ok,
        "final losses left their tolerance; new values:\n{listing}"
    );
    insta::assert_snapshot!(mask(&render(&cfg, &r, false)));
}
