//! Typed notes of a step: what the curvature core did besides the plain step, per block.
//!
//! A [`StepReport`](crate::StepReport) carries them; `Display` renders each as the line a
//! progress log prints. Programs and tests match on the variants, never on the text.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::backend::LinalgError;

/// Why a block's statistics did not take this step's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StatsSkip {
    /// The capture's sizes do not fit the block.
    Shape {
        /// The capture's `(a, g)` widths.
        found: (usize, usize),
        /// The block's.
        expected: (usize, usize),
    },
    /// The captured activations or gradients (or the gradient statistic) hold NaN or infinity.
    NonFiniteInput,
    /// The updated statistics overflowed.
    Overflow,
    /// In data-parallel training, the input of these ranks was refused (for one of the
    /// reasons above), so no rank updated the block: the ranks keep the same statistics.
    OnRanks {
        /// The ranks whose input was refused.
        ranks: Vec<usize>,
    },
}

impl fmt::Display for StatsSkip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatsSkip::Shape { found, expected } => write!(
                f,
                "capture of sizes {}x{} does not fit the block's {}x{}",
                found.0, found.1, expected.0, expected.1
            ),
            StatsSkip::NonFiniteInput => write!(
                f,
                "non-finite activations or gradients captured; statistics not updated"
            ),
            StatsSkip::Overflow => write!(f, "statistics overflowed; not updated"),
            StatsSkip::OnRanks { ranks } => write!(
                f,
                "the capture of rank(s) {} was refused; no rank updated the statistics",
                ranks
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// What a block keeps using after a failed refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kept {
    /// The result of its last successful refresh.
    LastGood,
    /// The first-order fallback rule (no refresh has succeeded yet, or too many failed in a
    /// row).
    Fallback,
}

/// One thing a step did that a log should say, by block path where it concerns one block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Note {
    /// A block's statistics were not updated this step; they are as they were.
    StatsSkipped {
        /// The block's layer path.
        block: String,
        /// Why.
        reason: StatsSkip,
    },
    /// A refresh failed; the block keeps what `kept` says and retries at `retry_damping`.
    RefreshFailed {
        /// The block's layer path.
        block: String,
        /// What the factorization reported.
        error: LinalgError,
        /// The damping λ (boost included) it was tried at.
        damping: f64,
        /// What the block uses until a refresh succeeds.
        kept: Kept,
        /// The damping the next refresh tries.
        retry_damping: f64,
        /// Failures in a row so far, this one included.
        failures: u32,
    },
    /// A refresh succeeded after a boost, or only by regularizing pivots.
    RefreshRecovered {
        /// The block's layer path.
        block: String,
        /// The damping λ (boost included) it succeeded at.
        damping: f64,
        /// Cholesky pivots regularized (0 when none).
        regularized_pivots: usize,
    },
    /// The block took the fallback rule this step although it has a last good refresh: that
    /// many refreshes failed in a row.
    FallbackAfterFailures {
        /// The block's layer path.
        block: String,
        /// Failures in a row.
        failures: u32,
    },
    /// An `f32` root failed and was computed again in `f64`, which succeeded.
    RetriedInF64 {
        /// The block (and axis).
        block: String,
    },
    /// The backend ran the eigendecompositions on the host CPU.
    EighDelegated {
        /// The backend's name.
        backend: String,
    },
    /// KL clipping scaled the update by `factor`.
    KlClipped {
        /// The scale, below 1.
        factor: f32,
    },
    /// The quadratic model was not positive definite or not finite: no step on the blocks.
    ModelRejected {
        /// Its Gram matrix, row-major.
        gram: Vec<f64>,
    },
    /// Two-level KFAC took no coarse correction this step (the one-level directions stand).
    CoarseSkipped {
        /// Why.
        reason: String,
    },
    /// The coarse correction's matrix or solve failed; `reason` says what was kept.
    CoarseFailed {
        /// What failed and what the step used instead.
        reason: String,
    },
    /// Parameters that lie in no Fisher block, so the fallback rule (first-order) trains
    /// them, not the curvature: reported in the first step's report. Often a layer the model
    /// left out of its `visit_blocks`; [`StepConfig::strict_blocks`](super::StepConfig) makes
    /// it an error.
    OutsideBlocks {
        /// The parameters' names, in the store's order.
        params: Vec<String>,
    },
    /// A method's own note, already rendered.
    Method(String),
}

impl Note {
    /// The block a note concerns, if one.
    pub fn block(&self) -> Option<&str> {
        match self {
            Note::StatsSkipped { block, .. }
            | Note::RefreshFailed { block, .. }
            | Note::RefreshRecovered { block, .. }
            | Note::FallbackAfterFailures { block, .. }
            | Note::RetriedInF64 { block } => Some(block),
            _ => None,
        }
    }

    /// Whether the note is routine (KL clipping happens most steps) rather than a sign of
    /// trouble; logs that list notes once can leave these out.
    pub fn is_routine(&self) -> bool {
        matches!(self, Note::KlClipped { .. })
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::StatsSkipped { block, reason } => write!(f, "{block}: {reason}"),
            Note::RefreshFailed {
                block,
                error,
                damping,
                kept,
                retry_damping,
                failures,
            } => write!(
                f,
                "{block}: refresh failed ({error}) at damping {damping:.3e}; keeping the {} and \
                 retrying at {retry_damping:.3e}{}",
                match kept {
                    Kept::LastGood => "last good preconditioner",
                    Kept::Fallback => "first-order fallback",
                },
                if *failures > 1 {
                    format!(" ({failures} failures in a row)")
                } else {
                    String::new()
                }
            ),
            Note::RefreshRecovered {
                block,
                damping,
                regularized_pivots,
            } => {
                write!(f, "{block}: refresh succeeded at damping {damping:.3e}")?;
                if *regularized_pivots > 0 {
                    write!(
                        f,
                        " after regularizing {regularized_pivots} Cholesky pivots"
                    )?;
                }
                Ok(())
            }
            Note::FallbackAfterFailures { block, failures } => write!(
                f,
                "{block}: first-order fallback after {failures} failed refreshes in a row"
            ),
            Note::RetriedInF64 { block } => {
                write!(f, "{block}: f32 root failed; computed again in f64")
            }
            Note::EighDelegated { backend } => {
                write!(f, "eigendecomposition on the CPU (delegated by {backend})")
            }
            Note::KlClipped { factor } => write!(f, "update KL-clipped by {factor:.3}"),
            Note::ModelRejected { gram } => write!(
                f,
                "quadratic model not positive definite or not finite (Gram {gram:?}): no step \
                 on the Fisher blocks"
            ),
            Note::CoarseSkipped { reason } => write!(f, "coarse correction skipped: {reason}"),
            Note::CoarseFailed { reason } => write!(f, "coarse correction failed: {reason}"),
            Note::OutsideBlocks { params } => write!(
                f,
                "{} parameter(s) outside every Fisher block, trained by the fallback rule: {}",
                params.len(),
                params.join(", ")
            ),
            Note::Method(s) => f.write_str(s),
        }
    }
}
