//! Optimizer errors.

use std::fmt;

/// Why an optimizer step or a state restore was refused. A refused step changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimError {
    /// A gradient holds a NaN or an infinity; parameters and state are unchanged.
    NonFiniteGradient {
        /// The parameter's name.
        param: String,
    },
    /// A saved state tensor is missing.
    MissingState {
        /// The tensor's name.
        name: String,
    },
    /// A saved state tensor has the wrong shape for this model.
    StateShape {
        /// The tensor's name.
        name: String,
        /// The shape this model needs.
        expected: Vec<usize>,
        /// The shape saved.
        found: Vec<usize>,
    },
    /// The saved state is for another optimizer or is malformed.
    BadState {
        /// What is wrong.
        detail: String,
    },
    /// A configuration value is outside its range (found by the config's `validate()`, which
    /// every constructor calls, or at a step, for a schedule's learning rate).
    Config {
        /// The field, as the config names it (for example `damping` or `schedule.base`).
        field: String,
        /// What is wrong with its value.
        detail: String,
    },
    /// In data-parallel training, the gradient of these ranks held NaN or an infinity: every
    /// rank refused the step, and nothing changed on any rank.
    NonFiniteGradientOnRanks {
        /// The ranks whose gradient was not finite.
        ranks: Vec<usize>,
        /// The first such parameter, on the rank that reports it (`None` on the others).
        param: Option<String>,
    },
    /// The step's update would have put NaN or an infinity into a parameter (an overflow, with
    /// finite gradients and a valid configuration); the parameters and the optimizer's
    /// buffers are as they were before the step.
    NonFiniteUpdate {
        /// The first parameter whose new value was not finite.
        param: String,
        /// The step's learning rate.
        lr: f32,
    },
}

impl fmt::Display for OptimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptimError::NonFiniteGradient { param } => write!(
                f,
                "gradient of {param:?} holds NaN or infinity; step refused, nothing changed"
            ),
            OptimError::MissingState { name } => {
                write!(f, "optimizer state tensor {name:?} is missing")
            }
            OptimError::StateShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "optimizer state tensor {name:?} has shape {found:?}, this model needs {expected:?}"
            ),
            OptimError::BadState { detail } => write!(f, "bad optimizer state: {detail}"),
            OptimError::Config { field, detail } => write!(f, "configuration: {field} {detail}"),
            OptimError::NonFiniteGradientOnRanks { ranks, param } => {
                let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
                write!(
                    f,
                    "gradient holds NaN or infinity on rank(s) {}",
                    ranks.join(", ")
                )?;
                if let Some(p) = param {
                    write!(f, " (on this rank: {p:?})")?;
                }
                write!(f, "; step refused on every rank, nothing changed")
            }
            OptimError::NonFiniteUpdate { param, lr } => write!(
                f,
                "the update of {param:?} overflowed to NaN or infinity (learning rate {lr}); \
                 step refused, parameters unchanged"
            ),
        }
    }
}

impl std::error::Error for OptimError {}
