//! Learning-rate schedules: a linear warm-up followed by a decay rule.

use serde::{Deserialize, Serialize};

/// How the learning rate decays after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Decay {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` every `every` steps.
    Step {
        /// Steps between multiplications.
        every: u64,
        /// The factor.
        gamma: f32,
    },
    /// Cosine from the base rate down to `base * final_frac` over `total` steps (counted after
    /// warm-up), then flat.
    Cosine {
        /// Length of the decay in steps.
        total: u64,
        /// The final rate as a fraction of the base rate.
        final_frac: f32,
    },
}

/// A learning-rate schedule: `base` scaled by a linear warm-up over `warmup` steps (from
/// `base / warmup` to `base`) and then by the decay rule.
///
/// ```
/// use kron_optim::{Decay, Schedule};
/// let s = Schedule::constant(0.1).with_warmup(10).with_decay(Decay::Step { every: 100, gamma: 0.5 });
/// assert!((s.lr(0) - 0.01).abs() < 1e-7);
/// assert_eq!(s.lr(10), 0.1);
/// assert_eq!(s.lr(110), 0.05);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The base learning rate.
    pub base: f32,
    /// Warm-up steps (0 for none).
    pub warmup: u64,
    /// The decay after warm-up.
    pub decay: Decay,
}

impl Schedule {
    /// A constant rate.
    pub const fn constant(base: f32) -> Self {
        Schedule {
            base,
            warmup: 0,
            decay: Decay::Constant,
        }
    }

    /// With a linear warm-up over `steps`.
    pub const fn with_warmup(mut self, steps: u64) -> Self {
        self.warmup = steps;
        self
    }

    /// With a decay rule.
    pub const fn with_decay(mut self, decay: Decay) -> Self {
        self.decay = decay;
        self
    }

    /// The rate at `step` (counting from 0).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.base * (step + 1) as f32 / self.warmup as f32;
        }
        let s = step - self.warmup;
        match self.decay {
            Decay::Constant => self.base,
            Decay::Step { every, gamma } => self.base * gamma.powi((s / every.max(1)) as i32),
            Decay::Cosine { total, final_frac } => {
                let p = (s as f64 / total.max(1) as f64).min(1.0);
                let c = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
                self.base * (final_frac as f64 + (1.0 - final_frac as f64) * c) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_ends_at_the_final_fraction() {
        let s = Schedule::constant(1.0).with_decay(Decay::Cosine {
            total: 100,
            final_frac: 0.1,
        });
        assert_eq!(s.lr(0), 1.0);
        assert!((s.lr(50) - 0.55).abs() < 1e-6);
        assert!((s.lr(100) - 0.1).abs() < 1e-6);
        assert!((s.lr(1000) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn warmup_is_linear() {
        let s = Schedule::constant(1.0).with_warmup(4);
        let r: Vec<f32> = (0..6).map(|i| s.lr(i)).collect();
        assert_eq!(r, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }
}
