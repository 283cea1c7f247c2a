//! The ill-conditioned least-squares problem: its spectrum, determinism and optimum.

use kron_autodiff::Rng;
use kron_data::LeastSquares;

/// Eigenvalues of a symmetric matrix (row-major, `n x n`) by the cyclic Jacobi method, in f64.
fn jacobi_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        let diag: f64 = (0..n).map(|i| a[i * n + i] * a[i * n + i]).sum();
        if off <= 1e-30 * diag {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut ev: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    ev.sort_by(|x, y| y.total_cmp(x));
    ev
}

/// `X^T X / n` of the stored (f32) inputs, in f64.
fn second_moment(p: &LeastSquares) -> Vec<f64> {
    let (n, d) = (p.len(), p.dim());
    let x = p.inputs().data();
    let mut m = vec![0.0f64; d * d];
    for i in 0..n {
        let row = &x[i * d..(i + 1) * d];
        for r in 0..d {
            for c in 0..d {
                m[r * d + c] += row[r] as f64 * row[c] as f64;
            }
        }
    }
    m.iter().map(|v| v / n as f64).collect()
}

#[test]
fn jacobi_finds_known_eigenvalues() {
    // [[2, 1], [1, 2]] has eigenvalues 3 and 1.
    let ev = jacobi_eigenvalues(vec![2.0, 1.0, 1.0, 2.0], 2);
    assert!(
        (ev[0] - 3.0).abs() < 1e-12 && (ev[1] - 1.0).abs() < 1e-12,
        "{ev:?}"
    );
}

#[test]
fn second_moment_has_the_requested_condition_number() {
    for (kappa, seed) in [(1.0, 1), (100.0, 2), (1e4, 3), (1e6, 4)] {
        let mut rng = Rng::new(seed);
        let p = LeastSquares::new(400, 20, 3, kappa, 0.1, &mut rng);
        assert_eq!(p.inputs().shape(), &[400, 20]);
        assert_eq!(p.targets().shape(), &[400, 3]);
        assert_eq!(p.weights().shape(), &[3, 20]);
        assert!((p.condition_number() / kappa - 1.0).abs() < 1e-12);

        let ev = jacobi_eigenvalues(second_moment(&p), p.dim());
        for (got, want) in ev.iter().zip(p.eigenvalues()) {
            assert!(
                (got / want - 1.0).abs() < 1e-4,
                "kappa {kappa}: eigenvalue {got} vs designed {want}"
            );
        }
        let measured = ev[0] / ev[ev.len() - 1];
        assert!(
            (measured / kappa - 1.0).abs() < 1e-4,
            "kappa {kappa}: measured {measured}"
        );
    }
}

#[test]
fn spectrum_is_log_spaced_and_rotated() {
    let p = LeastSquares::new(200, 5, 1, 1e4, 0.0, &mut Rng::new(9));
    let ev = p.eigenvalues();
    assert_eq!(ev[0], 1.0);
    for w in ev.windows(2) {
        assert!((w[0] / w[1] - 10.0).abs() < 1e-9, "{ev:?}");
    }
    // Rotated: the second moment is far from diagonal.
    let m = second_moment(&p);
    let off: f64 = (0..5)
        .flat_map(|i| (0..5).filter(move |&j| j != i).map(move |j| (i, j)))
        .map(|(i, j)| m[i * 5 + j].abs())
        .sum();
    assert!(off > 0.1, "off-diagonal mass {off}");
}

#[test]
fn seeded_and_reproducible() {
    let a = LeastSquares::new(100, 8, 2, 50.0, 0.5, &mut Rng::new(11));
    let b = LeastSquares::new(100, 8, 2, 50.0, 0.5, &mut Rng::new(11));
    let c = LeastSquares::new(100, 8, 2, 50.0, 0.5, &mut Rng::new(12));
    assert_eq!(a, b);
    assert_ne!(a.inputs(), c.inputs());
}

#[test]
fn solution_recovers_weights_without_noise_and_beats_them_with_noise() {
    let clean = LeastSquares::new(300, 10, 2, 1e3, 0.0, &mut Rng::new(5));
    let w = clean.solution();
    let err = w.max_abs_diff(clean.weights());
    assert!(err < 1e-2, "max weight error {err}");
    assert!(clean.loss(clean.weights()) < 1e-10);
    assert!(clean.loss(&w) < 1e-9);

    let noisy = LeastSquares::new(2000, 10, 2, 1e3, 0.5, &mut Rng::new(6));
    let best = noisy.loss(&noisy.solution());
    let truth = noisy.loss(noisy.weights());
    assert!(best <= truth, "{best} > {truth}");
    // E[loss at truth] = outputs * noise^2 / 2 = 0.25; the optimum fits (d / n) of the noise.
    assert!((truth - 0.25).abs() < 0.03, "loss at true weights {truth}");
    let expected_best = 0.25 * (1.0 - 10.0 / 2000.0);
    assert!((best - expected_best).abs() < 0.03, "optimal loss {best}");

    let (x, y) = noisy.batch(&[3, 1]);
    assert_eq!(x.shape(), &[2, 10]);
    assert_eq!(&y.data()[..2], &noisy.targets().data()[6..8]);
}
