//! Range checks of every configuration: one `validate()` per config, which each optimizer's
//! constructor, `set_learning_rate` and `load_state` call, so that no optimizer ever runs with
//! (or saves) a NaN, an infinity or a value its method has no meaning for. Each error names
//! the field.

use crate::curvature::{
    CoreConfig, DampingConfig, FailurePolicy, Fallback, LevenbergMarquardt, RefreshConfig,
    StatisticsConfig, StepConfig,
};
use crate::error::OptimError;
use crate::first_order::{AdamConfig, SgdConfig};
use crate::kfac::KfacConfig;
use crate::schedule::{Decay, Schedule};

fn bad(field: &str, detail: String) -> OptimError {
    OptimError::Config {
        field: field.to_string(),
        detail,
    }
}

/// `x` finite and above 0.
pub(crate) fn positive(field: &str, x: f32) -> Result<(), OptimError> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(bad(field, format!("must be finite and above 0, not {x}")))
    }
}

/// `x` finite and at least 0.
fn non_negative(field: &str, x: f32) -> Result<(), OptimError> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("must be finite and at least 0, not {x}"),
        ))
    }
}

/// `x` in `[0, 1)`: a decay or momentum coefficient.
fn fraction(field: &str, x: f32) -> Result<(), OptimError> {
    if (0.0..1.0).contains(&x) {
        Ok(())
    } else {
        Err(bad(field, format!("must lie in [0, 1), not {x}")))
    }
}

/// A period or count of at least 1.
fn at_least_one(field: &str, n: u64) -> Result<(), OptimError> {
    if n >= 1 {
        Ok(())
    } else {
        Err(bad(field, "must be at least 1, not 0".into()))
    }
}

/// The learning rate a schedule gives at `step`, refused unless finite and at least 0 (a
/// decay may end at 0).
pub(crate) fn step_lr(schedule: &Schedule, step: u64) -> Result<f32, OptimError> {
    let lr = schedule.lr(step);
    if lr.is_finite() && lr >= 0.0 {
        Ok(lr)
    } else {
        Err(bad(
            "learning rate",
            format!("at step {step} is {lr}: must be finite and at least 0"),
        ))
    }
}

impl Schedule {
    /// Checks the base rate (finite, above 0) and the decay's parameters.
    pub fn validate(&self) -> Result<(), OptimError> {
        positive("schedule.base (the learning rate)", self.base)?;
        match self.decay {
            Decay::Constant => Ok(()),
            Decay::Step { every, gamma } => {
                at_least_one("schedule.decay.every", every)?;
                positive("schedule.decay.gamma", gamma)
            }
            Decay::Cosine { total, final_frac } => {
                at_least_one("schedule.decay.total", total)?;
                if (0.0..=1.0).contains(&final_frac) {
                    Ok(())
                } else {
                    Err(bad(
                        "schedule.decay.final_frac",
                        format!("must lie in [0, 1], not {final_frac}"),
                    ))
                }
            }
        }
    }
}

impl SgdConfig {
    /// Checks every field: the schedule, momentum in `[0, 1)`, weight decay finite and at
    /// least 0.
    pub fn validate(&self) -> Result<(), OptimError> {
        self.schedule.validate()?;
        fraction("momentum", self.momentum)?;
        non_negative("weight_decay", self.weight_decay)
    }
}

impl AdamConfig {
    /// Checks every field: the schedule, both betas in `[0, 1)`, epsilon above 0, weight
    /// decay finite and at least 0.
    pub fn validate(&self) -> Result<(), OptimError> {
        self.schedule.validate()?;
        fraction("beta1", self.beta1)?;
        fraction("beta2", self.beta2)?;
        positive("eps", self.eps)?;
        non_negative("weight_decay", self.weight_decay)
    }
}

impl LevenbergMarquardt {
    /// Checks every field: interval at least 1, decay in `(0, 1)`, damping bounds finite with
    /// `0 < min <= max`.
    pub fn validate(&self) -> Result<(), OptimError> {
        at_least_one("interval", self.interval)?;
        if !(self.decay > 0.0 && self.decay < 1.0) {
            return Err(bad(
                "decay",
                format!("must lie in (0, 1), not {}", self.decay),
            ));
        }
        positive("min_damping", self.min_damping)?;
        positive("max_damping", self.max_damping)?;
        if self.max_damping < self.min_damping {
            return Err(bad(
                "max_damping",
                format!(
                    "{} is below min_damping {}",
                    self.max_damping, self.min_damping
                ),
            ));
        }
        Ok(())
    }
}

impl StatisticsConfig {
    /// Checks every field: the decay in `[0, 1)`, both periods and the example count at
    /// least 1.
    pub fn validate(&self) -> Result<(), OptimError> {
        fraction("ema_decay", self.ema_decay)?;
        at_least_one("period", self.period)?;
        at_least_one("conv_period", self.conv_period)?;
        if let Some(n) = self.examples {
            at_least_one("examples", n as u64)?;
        }
        Ok(())
    }
}

impl FailurePolicy {
    /// Checks every field: the boost finite and above 1, the largest boost finite and at
    /// least 1, the failures in a row at least 1.
    pub fn validate(&self) -> Result<(), OptimError> {
        if !(self.boost.is_finite() && self.boost > 1.0) {
            return Err(bad(
                "boost",
                format!("must be finite and above 1, not {}", self.boost),
            ));
        }
        if !(self.max_boost.is_finite() && self.max_boost >= 1.0) {
            return Err(bad(
                "max_boost",
                format!("must be finite and at least 1, not {}", self.max_boost),
            ));
        }
        at_least_one("max_failures", u64::from(self.max_failures))
    }
}

impl RefreshConfig {
    /// Checks every field: the period at least 1 and the failure policy.
    pub fn validate(&self) -> Result<(), OptimError> {
        at_least_one("period", self.period)?;
        self.failure.validate().map_err(|e| prefix("failure", e))
    }
}

impl DampingConfig {
    /// Checks every field: λ finite and above 0, the adaptation by its own `validate()`.
    pub fn validate(&self) -> Result<(), OptimError> {
        positive("lambda", self.lambda)?;
        if let Some(lm) = &self.adaptive {
            lm.validate().map_err(|e| prefix("adaptive", e))?;
        }
        Ok(())
    }
}

impl StepConfig {
    /// Checks every field: the schedule; momentum in `[0, 1)`; weight decay finite and at
    /// least 0; the KL clip (when on) finite and above 0; the curvature examples at least 1;
    /// an Adam fallback by its own `validate()`.
    pub fn validate(&self) -> Result<(), OptimError> {
        self.schedule.validate()?;
        fraction("momentum", self.momentum.coefficient)?;
        non_negative("weight_decay", self.weight_decay.coefficient)?;
        if let Some(k) = self.kl_clip {
            positive("kl_clip", k)?;
        }
        if let Some(n) = self.curvature_examples {
            at_least_one("curvature_examples", n as u64)?;
        }
        if let Fallback::Adam(c) = &self.fallback {
            c.validate().map_err(|e| prefix("fallback (Adam)", e))?;
        }
        Ok(())
    }
}

impl CoreConfig {
    /// Checks every sub-configuration; an error names the field by its path
    /// (`damping.lambda`, `step.kl_clip`).
    pub fn validate(&self) -> Result<(), OptimError> {
        self.statistics
            .validate()
            .map_err(|e| prefix("statistics", e))?;
        self.refresh.validate().map_err(|e| prefix("refresh", e))?;
        self.damping.validate().map_err(|e| prefix("damping", e))?;
        self.step.validate().map_err(|e| prefix("step", e))
    }
}

impl KfacConfig {
    /// Checks every field through [`CoreConfig::validate`]: an error names the field by its
    /// path (`damping.lambda`, `refresh.period`, `step.schedule.base (the learning rate)`).
    pub fn validate(&self) -> Result<(), OptimError> {
        self.core().validate()
    }
}

/// The same error with its field placed under `outer`.
fn prefix(outer: &str, e: OptimError) -> OptimError {
    match e {
        OptimError::Config { field, detail } => OptimError::Config {
            field: format!("{outer}.{field}"),
            detail,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: OptimError) -> String {
        match e {
            OptimError::Config { field, .. } => field,
            other => panic!("not a config error: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        SgdConfig::default().validate().unwrap();
        AdamConfig::default().validate().unwrap();
        KfacConfig::default().validate().unwrap();
        LevenbergMarquardt::default().validate().unwrap();
    }

    #[test]
    fn each_bad_value_is_refused_naming_its_field() {
        let k = KfacConfig::default;
        for (cfg, want) in [
            (k().with_damping(0.0), "damping.lambda"),
            (k().with_damping(-1.0), "damping.lambda"),
            (k().with_damping(f32::NAN), "damping.lambda"),
            (k().with_kl_clip(Some(f32::NAN)), "step.kl_clip"),
            (k().with_kl_clip(Some(-1.0)), "step.kl_clip"),
            (k().with_inverse_period(0), "refresh.period"),
            (k().with_stats_period(0), "statistics.period"),
            (k().with_momentum(1.0), "step.momentum"),
            (k().with_ema_decay(f32::INFINITY), "statistics.ema_decay"),
            (k().with_failure_factor(1.0), "refresh.failure.boost"),
            (
                k().with_refresh(
                    RefreshConfig::DEFAULT
                        .with_failure(FailurePolicy::DEFAULT.with_max_failures(0)),
                ),
                "refresh.failure.max_failures",
            ),
            (
                KfacConfig::new(f32::NAN),
                "step.schedule.base (the learning rate)",
            ),
            (
                KfacConfig::new(-0.1),
                "step.schedule.base (the learning rate)",
            ),
            (
                k().with_fallback(Fallback::Adam(AdamConfig::new(f32::INFINITY))),
                "step.fallback (Adam).schedule.base (the learning rate)",
            ),
            (
                k().with_adaptive_damping(Some(LevenbergMarquardt {
                    decay: 1.0,
                    ..LevenbergMarquardt::DEFAULT
                })),
                "damping.adaptive.decay",
            ),
        ] {
            assert_eq!(field(cfg.validate().unwrap_err()), want, "{cfg:?}");
        }
        assert_eq!(
            field(SgdConfig::new(f32::NAN).validate().unwrap_err()),
            "schedule.base (the learning rate)"
        );
        assert_eq!(
            field(AdamConfig::default().with_eps(0.0).validate().unwrap_err()),
            "eps"
        );
        let e = step_lr(&Schedule::constant(f32::INFINITY), 3).unwrap_err();
        assert!(e.to_string().contains("at step 3"), "{e}");
    }
}
