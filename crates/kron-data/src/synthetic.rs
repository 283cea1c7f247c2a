//! Synthetic problems with known answers, for testing optimizers where the curvature is
//! controlled.

use kron_autodiff::{Rng, Tensor};

/// A seeded linear least-squares problem whose design has a chosen condition number.
///
/// The inputs are `X = sqrt(n) * U * diag(s) * V^T`, with `U` (`n x dim`, orthonormal columns)
/// and `V` (`dim x dim`, orthogonal) from the Gram-Schmidt orthonormalization of Gaussian
/// matrices and `s_j^2` log-spaced from 1 down to `1 / condition_number`. So the second-moment
/// matrix `X^T X / n = V diag(s^2) V^T` has exactly the eigenvalues
/// [`eigenvalues`](Self::eigenvalues) and the condition number asked for (up to the rounding of
/// storing `X` in `f32`, which makes condition numbers above about `1e8` lose meaning). The
/// directions of the spectrum are random rotations, so no coordinate is privileged.
///
/// Targets are `Y = X W^T + noise * E`, with the true weights `W` (`outputs x dim`, the dense
/// layer's layout) and `E` standard normal; the loss is the squared error of kron's losses, the
/// batch mean of `1/2 * sum over outputs (y - t)^2` ([`loss`](Self::loss)).
#[derive(Clone, Debug, PartialEq)]
pub struct LeastSquares {
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
    eigenvalues: Vec<f64>,
    noise: f32,
}

impl LeastSquares {
    /// Draws a problem with `n_samples` examples of `dim` inputs and `outputs` targets, whose
    /// second-moment matrix has condition number `condition_number`; `noise` is the standard
    /// deviation of the target noise. The true weights are standard normal.
    ///
    /// Everything is drawn from `rng` in a fixed order, so a seed fixes the problem.
    ///
    /// # Panics
    /// If `dim` or `outputs` is zero, `n_samples < dim`, `condition_number` is below 1 or not
    /// finite, or `noise` is negative or not finite.
    #[track_caller]
    pub fn new(
        n_samples: usize,
        dim: usize,
        outputs: usize,
        condition_number: f64,
        noise: f32,
        rng: &mut Rng,
    ) -> Self {
        assert!(
            dim > 0 && outputs > 0,
            "LeastSquares::new: dim and outputs must be positive"
        );
        assert!(
            n_samples >= dim,
            "LeastSquares::new: {n_samples} samples cannot give a full-rank design of dim {dim}"
        );
        assert!(
            condition_number.is_finite() && condition_number >= 1.0,
            "LeastSquares::new: condition number {condition_number} must be finite and >= 1"
        );
        assert!(
            noise.is_finite() && noise >= 0.0,
            "LeastSquares::new: noise {noise} must be finite and >= 0"
        );
        let (n, d) = (n_samples, dim);

        let u = orthonormal_columns(n, d, rng);
        let v = orthonormal_columns(d, d, rng);
        let eigenvalues: Vec<f64> = (0..d)
            .map(|j| {
                if d == 1 {
                    1.0
                } else {
                    condition_number.powf(-(j as f64) / (d - 1) as f64)
                }
            })
            .collect();
        let scale: Vec<f64> = eigenvalues
            .iter()
            .map(|l| l.sqrt() * (n as f64).sqrt())
            .collect();

        // X[i][k] = sum_j U[i][j] * scale[j] * V[k][j]; u and v are column-major.
        let mut x = vec![0.0f64; n * d];
        for j in 0..d {
            let uj = &u[j * n..(j + 1) * n];
            let vj = &v[j * d..(j + 1) * d];
            for i in 0..n {
                let a = uj[i] * scale[j];
                let row = &mut x[i * d..(i + 1) * d];
                for k in 0..d {
                    row[k] += a * vj[k];
                }
            }
        }
        let inputs: Vec<f32> = x.iter().map(|&v| v as f32).collect();

        let weights: Vec<f32> = (0..outputs * d).map(|_| rng.normal()).collect();
        let mut targets = vec![0.0f32; n * outputs];
        for i in 0..n {
            let xi = &inputs[i * d..(i + 1) * d];
            for o in 0..outputs {
                let wo = &weights[o * d..(o + 1) * d];
                let clean: f64 = xi.iter().zip(wo).map(|(&a, &b)| a as f64 * b as f64).sum();
                targets[i * outputs + o] = clean as f32;
            }
        }
        for t in targets.iter_mut() {
            *t += noise * rng.normal();
        }

        LeastSquares {
            inputs: Tensor::from_vec(inputs, &[n, d]),
            targets: Tensor::from_vec(targets, &[n, outputs]),
            weights: Tensor::from_vec(weights, &[outputs, d]),
            eigenvalues,
            noise,
        }
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.inputs.dim(0)
    }

    /// Whether there are no examples (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inputs per example.
    pub fn dim(&self) -> usize {
        self.inputs.dim(1)
    }

    /// Targets per example.
    pub fn outputs(&self) -> usize {
        self.targets.dim(1)
    }

    /// The inputs `X`, `n x dim`.
    pub fn inputs(&self) -> &Tensor {
        &self.inputs
    }

    /// The targets `Y`, `n x outputs`.
    pub fn targets(&self) -> &Tensor {
        &self.targets
    }

    /// The true weights `W`, `outputs x dim`, from which the targets were made (before noise).
    pub fn weights(&self) -> &Tensor {
        &self.weights
    }

    /// The eigenvalues of `X^T X / n` by construction, largest (1) first.
    pub fn eigenvalues(&self) -> &[f64] {
        &self.eigenvalues
    }

    /// The condition number of `X^T X / n` by construction: largest over smallest eigenvalue.
    pub fn condition_number(&self) -> f64 {
        let first = self.eigenvalues.first().copied().unwrap_or(1.0);
        let last = self.eigenvalues.last().copied().unwrap_or(1.0);
        first / last
    }

    /// The standard deviation of the target noise.
    pub fn noise(&self) -> f32 {
        self.noise
    }

    /// The examples at `indices`: inputs `len x dim` and targets `len x outputs`.
    ///
    /// # Panics
    /// If an index is out of range.
    #[track_caller]
    pub fn batch(&self, indices: &[usize]) -> (Tensor, Tensor) {
        (
            gather_rows(&self.inputs, indices),
            gather_rows(&self.targets, indices),
        )
    }

    /// The loss of weights `w` (`outputs x dim`) on the whole set, in `f64`: the mean over
    /// examples of `1/2 * sum over outputs (x w^T - y)^2`.
    ///
    /// # Panics
    /// If `w` is not `outputs x dim`.
    #[track_caller]
    pub fn loss(&self, w: &Tensor) -> f64 {
        let (n, d, o) = (self.len(), self.dim(), self.outputs());
        assert_eq!(
            w.shape(),
            &[o, d],
            "LeastSquares::loss: weights must be {o} x {d}"
        );
        let (x, y, w) = (self.inputs.data(), self.targets.data(), w.data());
        let mut total = 0.0f64;
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            for k in 0..o {
                let wk = &w[k * d..(k + 1) * d];
                let pred: f64 = xi.iter().zip(wk).map(|(&a, &b)| a as f64 * b as f64).sum();
                let r = pred - y[i * o + k] as f64;
                total += 0.5 * r * r;
            }
        }
        total / n as f64
    }

    /// The weights that minimize [`loss`](Self::loss) on the stored data (`outputs x dim`),
    /// from the normal equations `X^T X W^T = X^T Y` solved by Cholesky in `f64`.
    pub fn solution(&self) -> Tensor {
        let (n, d, o) = (self.len(), self.dim(), self.outputs());
        let (x, y) = (self.inputs.data(), self.targets.data());
        let mut a = vec![0.0f64; d * d];
        let mut b = vec![0.0f64; d * o];
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            let yi = &y[i * o..(i + 1) * o];
            for r in 0..d {
                let xr = xi[r] as f64;
                for c in 0..=r {
                    a[r * d + c] += xr * xi[c] as f64;
                }
                for k in 0..o {
                    b[r * o + k] += xr * yi[k] as f64;
                }
            }
        }
        // Cholesky A = L L^T in the lower triangle (A is positive definite by construction; a
        // non-positive pivot, possible only past f32's resolution, is clamped).
        for j in 0..d {
            let mut diag = a[j * d + j];
            for k in 0..j {
                diag -= a[j * d + k] * a[j * d + k];
            }
            let ljj = diag.max(f64::MIN_POSITIVE).sqrt();
            a[j * d + j] = ljj;
            for r in j + 1..d {
                let mut s = a[r * d + j];
                for k in 0..j {
                    s -= a[r * d + k] * a[j * d + k];
                }
                a[r * d + j] = s / ljj;
            }
        }
        let mut w = vec![0.0f32; o * d];
        let mut z = vec![0.0f64; d];
        for k in 0..o {
            for r in 0..d {
                let mut s = b[r * o + k];
                for c in 0..r {
                    s -= a[r * d + c] * z[c];
                }
                z[r] = s / a[r * d + r];
            }
            for r in (0..d).rev() {
                let mut s = z[r];
                for c in r + 1..d {
                    s -= a[c * d + r] * z[c];
                }
                z[r] = s / a[r * d + r];
            }
            for r in 0..d {
                w[k * d + r] = z[r] as f32;
            }
        }
        Tensor::from_vec(w, &[o, d])
    }
}

/// The rows of a matrix at `indices`.
#[track_caller]
fn gather_rows(t: &Tensor, indices: &[usize]) -> Tensor {
    let (rows, cols) = t.dims2();
    let src = t.data();
    let mut out = Vec::with_capacity(indices.len() * cols);
    for &i in indices {
        assert!(
            i < rows,
            "batch: index {i} out of range for {rows} examples"
        );
        out.extend_from_slice(&src[i * cols..(i + 1) * cols]);
    }
    Tensor::from_vec(out, &[indices.len(), cols])
}

/// `cols` orthonormal columns of length `rows` (column-major), by modified Gram-Schmidt applied
/// twice to a standard normal matrix drawn column by column.
fn orthonormal_columns(rows: usize, cols: usize, rng: &mut Rng) -> Vec<f64> {
    let mut q: Vec<f64> = (0..rows * cols).map(|_| rng.normal() as f64).collect();
    for j in 0..cols {
        let (done, rest) = q.split_at_mut(j * rows);
        let qj = &mut rest[..rows];
        for _pass in 0..2 {
            for p in 0..j {
                let qp = &done[p * rows..(p + 1) * rows];
                let dot: f64 = qp.iter().zip(qj.iter()).map(|(a, b)| a * b).sum();
                for (x, &y) in qj.iter_mut().zip(qp) {
                    *x -= dot * y;
                }
            }
        }
        let norm = qj.iter().map(|v| v * v).sum::<f64>().sqrt();
        // A Gaussian column is almost surely independent of the others; guard the measure-zero
        // case so the result stays finite.
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        for x in qj.iter_mut() {
            *x *= inv;
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_orthonormal() {
        let mut rng = Rng::new(4);
        let (r, c) = (50, 7);
        let q = orthonormal_columns(r, c, &mut rng);
        for a in 0..c {
            for b in 0..c {
                let dot: f64 = (0..r).map(|i| q[a * r + i] * q[b * r + i]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12, "({a},{b}) {dot}");
            }
        }
    }
}
