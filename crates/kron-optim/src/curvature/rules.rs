//! The step-rule parts every Kronecker method composes: momentum (heavy ball or Nesterov),
//! weight decay (coupled or decoupled), KL clipping, and grafting (a preconditioned direction
//! with the per-layer norm of a first-order method's step). Learning-rate schedules are
//! [`Schedule`](crate::Schedule).

use serde::{Deserialize, Serialize};

use kron_autodiff::Tensor;

use crate::error::OptimError;
use crate::first_order::sgd_update;
use crate::optimizer::OptimState;

/// Momentum on the (preconditioned) update, in PyTorch's form `v <- mu v + d`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Momentum {
    /// The coefficient `mu` in `[0, 1)` (0: none).
    pub coefficient: f32,
    /// Nesterov's form: the step is `d + mu v` instead of `v`.
    pub nesterov: bool,
}

impl Momentum {
    /// Heavy-ball momentum `mu`.
    pub const fn heavy_ball(mu: f32) -> Self {
        Momentum {
            coefficient: mu,
            nesterov: false,
        }
    }

    /// Nesterov momentum `mu`.
    pub const fn nesterov(mu: f32) -> Self {
        Momentum {
            coefficient: mu,
            nesterov: true,
        }
    }
}

/// L2 weight decay `eta`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightDecay {
    /// The coefficient `eta >= 0` (0: none).
    pub coefficient: f32,
    /// Decoupled (AdamW's form, `p <- p - lr eta p` beside the step) instead of coupled (`eta
    /// p` added to the update before momentum).
    pub decoupled: bool,
}

impl WeightDecay {
    /// No weight decay.
    pub const NONE: WeightDecay = WeightDecay {
        coefficient: 0.0,
        decoupled: false,
    };

    /// Coupled weight decay `eta`.
    pub const fn coupled(eta: f32) -> Self {
        WeightDecay {
            coefficient: eta,
            decoupled: false,
        }
    }

    /// Decoupled weight decay `eta`.
    pub const fn decoupled(eta: f32) -> Self {
        WeightDecay {
            coefficient: eta,
            decoupled: true,
        }
    }
}

/// Applies one update direction `u` to a parameter `p` with its velocity `v`:
/// decoupled decay first (`p <- p - lr eta p`), then `d = u + eta_coupled p`,
/// `v <- mu v + d`, `p <- p - lr (nesterov ? d + mu v : v)`.
pub fn apply_direction(
    p: &mut [f32],
    u: &[f32],
    v: &mut [f32],
    lr: f32,
    momentum: Momentum,
    decay: WeightDecay,
) {
    let coupled = if decay.decoupled {
        if decay.coefficient != 0.0 {
            let s = lr * decay.coefficient;
            p.iter_mut().for_each(|x| *x -= s * *x);
        }
        0.0
    } else {
        decay.coefficient
    };
    sgd_update(
        p,
        u,
        v,
        lr,
        momentum.coefficient,
        momentum.nesterov,
        coupled,
    );
}

/// KL clipping (kfac-pytorch): the factor `nu = min(1, sqrt(kappa / (lr^2 |sum <U, V>|)))`
/// that keeps the update's predicted KL change `lr^2 nu^2 sum <U, V>` at most `kappa`, from
/// `vg = sum <U, V>` over the preconditioned blocks. 1 without a clip or when `vg` is 0.
pub fn kl_clip_factor(kappa: Option<f32>, lr: f32, vg: f64) -> f32 {
    let Some(kappa) = kappa else { return 1.0 };
    let vg = vg * (lr as f64).powi(2);
    if vg.abs() > 0.0 {
        (kappa as f64 / vg.abs()).sqrt().min(1.0) as f32
    } else {
        1.0
    }
}

/// The first-order method whose per-layer step norm a graft gives the direction (Shampoo's
/// grafting, Agarwal et al. 2020).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Graft {
    /// SGD: the gradient's norm.
    Sgd,
    /// AdaGrad: `g / (sqrt(sum g^2) + eps)`.
    AdaGrad {
        /// Added to the root.
        eps: f32,
    },
    /// RMSProp: `g / (sqrt(v) + eps)`, `v <- beta2 v + (1 - beta2) g^2`.
    RmsProp {
        /// The second moment's decay.
        beta2: f32,
        /// Added to the root.
        eps: f32,
    },
    /// Adam: bias-corrected `m / (sqrt(v) + eps)`.
    Adam {
        /// The first moment's decay.
        beta1: f32,
        /// The second moment's decay.
        beta2: f32,
        /// Added to the root.
        eps: f32,
    },
}

/// The running state of a [`Graft`] for a set of parameters (one slot each): its moments, and
/// the step count for Adam's bias correction.
#[derive(Clone, Debug)]
pub struct Grafting {
    graft: Graft,
    first: Vec<Vec<f32>>,
    second: Vec<Vec<f32>>,
    steps: Vec<u64>,
}

impl Grafting {
    /// Zero state for parameters of the given element counts.
    pub fn new(graft: Graft, sizes: &[usize]) -> Self {
        let needs_first = matches!(graft, Graft::Adam { .. });
        let needs_second = !matches!(graft, Graft::Sgd);
        Grafting {
            graft,
            first: sizes
                .iter()
                .map(|&n| if needs_first { vec![0.0; n] } else { vec![] })
                .collect(),
            second: sizes
                .iter()
                .map(|&n| if needs_second { vec![0.0; n] } else { vec![] })
                .collect(),
            steps: vec![0; sizes.len()],
        }
    }

    /// The graft.
    pub fn graft(&self) -> Graft {
        self.graft
    }

    /// Advances slot `slot`'s state with its gradient `g` and rescales `dir` (the method's
    /// direction for that parameter) to the norm of the grafted method's step. A zero
    /// direction becomes the grafted step itself.
    ///
    /// # Panics
    /// If `dir`, `g` and the slot's size differ.
    pub fn apply(&mut self, slot: usize, dir: &mut [f32], g: &[f32]) {
        assert_eq!(
            dir.len(),
            g.len(),
            "Grafting::apply: direction of {} elements, gradient of {}",
            dir.len(),
            g.len()
        );
        self.steps[slot] += 1;
        let t = self.steps[slot];
        let (m, v) = (&mut self.first[slot], &mut self.second[slot]);
        if !matches!(self.graft, Graft::Sgd) {
            assert_eq!(v.len(), g.len(), "Grafting::apply: slot {slot} size");
        }
        // AdaGrad and RMSProp differ only in how the second moment accumulates.
        let rms = |v: &mut Vec<f32>, keep: f32, add: f32, eps: f32| -> Vec<f32> {
            g.iter()
                .zip(v.iter_mut())
                .map(|(&g, v)| {
                    *v = keep * *v + add * g * g;
                    g / (v.sqrt() + eps)
                })
                .collect()
        };
        let step: Vec<f32> = match self.graft {
            Graft::Sgd => g.to_vec(),
            Graft::AdaGrad { eps } => rms(v, 1.0, 1.0, eps),
            Graft::RmsProp { beta2, eps } => rms(v, beta2, 1.0 - beta2, eps),
            Graft::Adam { beta1, beta2, eps } => {
                let bc1 = 1.0 - beta1.powi(t.min(i32::MAX as u64) as i32);
                let bc2 = 1.0 - beta2.powi(t.min(i32::MAX as u64) as i32);
                g.iter()
                    .zip(m.iter_mut().zip(v.iter_mut()))
                    .map(|(&g, (m, v))| {
                        *m = beta1 * *m + (1.0 - beta1) * g;
                        *v = beta2 * *v + (1.0 - beta2) * g * g;
                        (*m / bc1) / ((*v / bc2).sqrt() + eps)
                    })
                    .collect()
            }
        };
        let norm = |x: &[f32]| x.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        let (nd, ns) = (norm(dir), norm(&step));
        if nd > 0.0 {
            let s = (ns / nd) as f32;
            dir.iter_mut().for_each(|x| *x *= s);
        } else {
            dir.copy_from_slice(&step);
        }
    }

    /// Writes the state under `prefix` (slots by index).
    pub fn export(&self, prefix: &str, out: &mut OptimState) {
        for (i, (m, v)) in self.first.iter().zip(&self.second).enumerate() {
            if !m.is_empty() {
                out.tensors.insert(
                    format!("{prefix}.{i}.m"),
                    Tensor::from_vec(m.clone(), &[m.len()]),
                );
            }
            if !v.is_empty() {
                out.tensors.insert(
                    format!("{prefix}.{i}.v"),
                    Tensor::from_vec(v.clone(), &[v.len()]),
                );
            }
        }
    }

    /// The state for the same slots from `state` (and the step counts, which the caller
    /// stores with its metadata).
    pub fn import(
        &self,
        prefix: &str,
        steps: Vec<u64>,
        state: &mut OptimState,
    ) -> Result<Self, OptimError> {
        if steps.len() != self.steps.len() {
            return Err(OptimError::BadState {
                detail: format!(
                    "{prefix}: {} graft step counts saved, {} slots here",
                    steps.len(),
                    self.steps.len()
                ),
            });
        }
        let mut take = |name: String, like: &Vec<f32>| -> Result<Vec<f32>, OptimError> {
            if like.is_empty() {
                return Ok(vec![]);
            }
            Ok(state.take(&name, &[like.len()])?.data().to_vec())
        };
        let mut first = Vec::with_capacity(self.first.len());
        let mut second = Vec::with_capacity(self.second.len());
        for (i, (m, v)) in self.first.iter().zip(&self.second).enumerate() {
            first.push(take(format!("{prefix}.{i}.m"), m)?);
            second.push(take(format!("{prefix}.{i}.v"), v)?);
        }
        Ok(Grafting {
            graft: self.graft,
            first,
            second,
            steps,
        })
    }

    /// The step counts, by slot (for the caller's metadata).
    pub fn steps(&self) -> &[u64] {
        &self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(x: &[f32]) -> f64 {
        x.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt()
    }

    #[test]
    fn graft_takes_the_direction_and_the_grafted_norm() {
        let g = [0.5f32, -2.0, 1.0];
        for graft in [
            Graft::Sgd,
            Graft::AdaGrad { eps: 1e-8 },
            Graft::RmsProp {
                beta2: 0.9,
                eps: 1e-8,
            },
            Graft::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ] {
            let mut st = Grafting::new(graft, &[3]);
            let mut dir = [3.0f32, 0.0, 4.0];
            st.apply(0, &mut dir, &g);
            // The grafted step on the first step, by hand.
            let want: Vec<f32> = match graft {
                Graft::Sgd => g.to_vec(),
                // sqrt(g^2) = |g|: sign(g).
                Graft::AdaGrad { .. } => g.iter().map(|x| x.signum()).collect(),
                // v = 0.1 g^2: g / (sqrt(0.1) |g|).
                Graft::RmsProp { .. } => g.iter().map(|x| x.signum() / 0.1f32.sqrt()).collect(),
                // Bias-corrected m = g, v = g^2: sign(g).
                Graft::Adam { .. } => g.iter().map(|x| x.signum()).collect(),
            };
            assert!(
                (norm(&dir) - norm(&want)).abs() < 1e-5 * norm(&want),
                "{graft:?}"
            );
            assert!(
                (dir[0] / dir[2] - 0.75).abs() < 1e-6,
                "direction kept: {graft:?}"
            );
            assert_eq!(dir[1], 0.0);
            let mut zero = [0.0f32; 3];
            st.apply(0, &mut zero, &g);
            assert!(norm(&zero) > 0.0, "a zero direction takes the grafted step");
        }
    }

    #[test]
    fn kl_clip_bounds_the_predicted_change() {
        assert_eq!(kl_clip_factor(None, 0.1, 1e9), 1.0);
        assert_eq!(kl_clip_factor(Some(1e-3), 0.1, 0.0), 1.0);
        let nu = kl_clip_factor(Some(1e-3), 0.1, 10.0);
        assert!((0.01 * nu as f64 * nu as f64 * 10.0 - 1e-3).abs() < 1e-9);
        assert_eq!(kl_clip_factor(Some(1.0), 0.1, 1.0), 1.0);
    }

    #[test]
    fn decoupled_decay_shrinks_beside_the_step() {
        let mut p = [1.0f32, 2.0];
        let mut v = [0.0f32; 2];
        apply_direction(
            &mut p,
            &[1.0, 1.0],
            &mut v,
            0.1,
            Momentum::heavy_ball(0.0),
            WeightDecay::decoupled(0.5),
        );
        assert_eq!(p, [1.0 - 0.05 - 0.1, 2.0 - 0.1 - 0.1]);
        let mut p = [1.0f32, 2.0];
        apply_direction(
            &mut p,
            &[1.0, 1.0],
            &mut v,
            0.1,
            Momentum::heavy_ball(0.0),
            WeightDecay::coupled(0.5),
        );
        assert_eq!(p, [1.0 - 0.1 * 1.5, 2.0 - 0.1 * 2.0]);
    }
}
