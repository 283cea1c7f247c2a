//! Seeded weight initialization schemes.

use kron_autodiff::{Rng, Tensor};
use serde::{Deserialize, Serialize};

/// How a weight tensor is initialized. `fan_in` and `fan_out` count the inputs and outputs of
/// one unit (times the kernel area for a convolution).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// Glorot & Bengio (2010): uniform in `±sqrt(6 / (fan_in + fan_out))`.
    GlorotUniform,
    /// Glorot & Bengio (2010): normal with std `sqrt(2 / (fan_in + fan_out))`.
    GlorotNormal,
    /// He et al. (2015): uniform in `±sqrt(6 / fan_in)`, for ReLU networks.
    HeUniform,
    /// He et al. (2015): normal with std `sqrt(2 / fan_in)`, for ReLU networks.
    HeNormal,
    /// Normal with the given std (Martens' sparse init aside, what the KFAC autoencoder papers
    /// describe as "small random").
    Normal(f32),
    /// Martens (2010)'s sparse initialization, which the KFAC papers use for their deep
    /// autoencoders: each output unit (a row of the weight, all of its input connections for a
    /// conv kernel) gets exactly `nonzero` incoming weights drawn from a normal with std `std`,
    /// at distinct input positions chosen at random; every other weight is zero (a unit with
    /// fewer inputs than `nonzero` gets all of them). Martens uses 15 and 1.
    Sparse {
        /// Nonzero incoming weights per unit.
        nonzero: usize,
        /// Their standard deviation.
        std: f32,
    },
    /// All zeros.
    Zeros,
}

impl Init {
    /// A tensor of `shape` drawn from this scheme.
    pub fn tensor(self, shape: &[usize], fan_in: usize, fan_out: usize, rng: &mut Rng) -> Tensor {
        let (fi, fo) = (fan_in.max(1) as f32, fan_out.max(1) as f32);
        match self {
            Init::GlorotUniform => {
                let l = (6.0 / (fi + fo)).sqrt();
                Tensor::rand_uniform(shape, -l, l, rng)
            }
            Init::GlorotNormal => Tensor::randn(shape, 0.0, (2.0 / (fi + fo)).sqrt(), rng),
            Init::HeUniform => {
                let l = (6.0 / fi).sqrt();
                Tensor::rand_uniform(shape, -l, l, rng)
            }
            Init::HeNormal => Tensor::randn(shape, 0.0, (2.0 / fi).sqrt(), rng),
            Init::Normal(std) => Tensor::randn(shape, 0.0, std, rng),
            Init::Sparse { nonzero, std } => sparse(shape, nonzero, std, rng),
            Init::Zeros => Tensor::zeros(shape),
        }
    }
}

/// Rows of `shape` (its first axis) with `nonzero` normal entries each at distinct random
/// columns (a partial Fisher-Yates draw per row), zeros elsewhere.
fn sparse(shape: &[usize], nonzero: usize, std: f32, rng: &mut Rng) -> Tensor {
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let cols = shape.iter().product::<usize>() / rows;
    let mut data = vec![0.0f32; rows * cols];
    let mut order: Vec<usize> = (0..cols).collect();
    for row in data.chunks_mut(cols.max(1)) {
        for i in 0..nonzero.min(cols) {
            let j = i + rng.below((cols - i) as u64) as usize;
            order.swap(i, j);
            row[order[i]] = std * rng.normal();
        }
    }
    Tensor::from_vec(data, shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_match_their_definitions() {
        let mut rng = Rng::new(0);
        let t = Init::GlorotUniform.tensor(&[200, 300], 300, 200, &mut rng);
        let l = (6.0f32 / 500.0).sqrt();
        assert!(t.data().iter().all(|v| v.abs() <= l));
        let var: f32 = t.data().iter().map(|v| v * v).sum::<f32>() / t.numel() as f32;
        assert!((var - l * l / 3.0).abs() < 0.05 * l * l / 3.0, "{var}");
        let h = Init::HeNormal.tensor(&[400, 250], 250, 400, &mut rng);
        let var: f32 = h.data().iter().map(|v| v * v).sum::<f32>() / h.numel() as f32;
        assert!((var - 2.0 / 250.0).abs() < 0.05 * 2.0 / 250.0, "{var}");
    }

    #[test]
    fn sparse_rows_have_exactly_their_nonzeros() {
        let mut rng = Rng::new(1);
        let init = Init::Sparse {
            nonzero: 15,
            std: 1.0,
        };
        let t = init.tensor(&[300, 40], 40, 300, &mut rng);
        let mut per_column = vec![0usize; 40];
        for row in t.data().chunks(40) {
            assert_eq!(row.iter().filter(|v| **v != 0.0).count(), 15);
            for (c, v) in row.iter().enumerate() {
                per_column[c] += (*v != 0.0) as usize;
            }
        }
        // Positions spread over the columns (300 * 15 / 40 = 112.5 expected each).
        assert!(
            per_column.iter().all(|&n| (70..160).contains(&n)),
            "{per_column:?}"
        );
        let nz: Vec<f32> = t.data().iter().copied().filter(|v| *v != 0.0).collect();
        let var = nz.iter().map(|v| v * v).sum::<f32>() / nz.len() as f32;
        assert!((var - 1.0).abs() < 0.08, "{var}");
        // Fewer inputs than `nonzero`: all of them; conv kernels count all input connections.
        let small = init.tensor(&[4, 3], 3, 4, &mut rng);
        assert!(small.data().iter().all(|v| *v != 0.0));
        let k = init.tensor(&[6, 2, 3, 3], 18, 54, &mut rng);
        for unit in k.data().chunks(18) {
            assert_eq!(unit.iter().filter(|v| **v != 0.0).count(), 15);
        }
    }
}
