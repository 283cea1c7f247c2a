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
            Init::Zeros => Tensor::zeros(shape),
        }
    }
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
}
