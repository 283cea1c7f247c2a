//! The failure policy of refreshes, written once for every Kronecker method (DESIGN.md
//! "Failures").
//!
//! A block's refresh (inverse, eigenbasis, root) can fail: a factor that is not positive
//! definite at the damping tried, an eigensolver that does not converge. [`Refreshing`] keeps
//! a block's last good result and decides what happens then:
//!
//! * the last good result stays in use; before the first success the block takes the
//!   first-order fallback rule;
//! * the next refresh retries with the damping λ multiplied by the boost (so each of two
//!   factors' dampings, split as `π sqrt(λ)` and `sqrt(λ) / π`, grows by `sqrt(boost)`),
//!   compounding on each further failure up to [`FailurePolicy::max_boost`];
//! * a success stores its result with the λ and boost it was computed at (methods whose
//!   damping enters at preconditioning time, like the eigenbasis, precondition with that
//!   boost) and returns the next refresh to the configured damping;
//! * after [`FailurePolicy::max_failures`] failures in a row the block takes the fallback rule
//!   again, until a refresh succeeds;
//! * every failure, recovery and fallback is a typed [`Note`] in the step's report.

use serde::{Deserialize, Serialize};

use super::note::{Kept, Note};
use crate::backend::LinalgError;

/// How refresh failures are handled. The defaults: boost 10, capped at `1e4`, fallback after
/// 5 failures in a row.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailurePolicy {
    /// The factor λ is multiplied by after each failure (default 10; above 1).
    pub boost: f32,
    /// The largest boost (default `1e4`; at least 1).
    pub max_boost: f32,
    /// Failures in a row after which the block takes the fallback rule instead of its last
    /// good result (default 5; at least 1).
    pub max_failures: u32,
}

impl FailurePolicy {
    /// The defaults as a constant.
    pub const DEFAULT: FailurePolicy = FailurePolicy {
        boost: 10.0,
        max_boost: 1e4,
        max_failures: 5,
    };

    /// With a boost factor.
    pub const fn with_boost(mut self, boost: f32) -> Self {
        self.boost = boost;
        self
    }

    /// With a largest boost.
    pub const fn with_max_boost(mut self, max_boost: f32) -> Self {
        self.max_boost = max_boost;
        self
    }

    /// With the failures in a row after which the fallback rule takes over.
    pub const fn with_max_failures(mut self, n: u32) -> Self {
        self.max_failures = n;
        self
    }
}

impl Default for FailurePolicy {
    /// [`FailurePolicy::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A successful refresh's result, with the damping it was computed at.
#[derive(Clone, Debug)]
pub struct Refreshed<R> {
    /// The method's result (inverses, eigenbases, roots).
    pub value: R,
    /// The configured λ at the refresh.
    pub lambda: f64,
    /// The boost it was multiplied by (1 unless earlier refreshes failed).
    pub boost: f64,
}

impl<R> Refreshed<R> {
    /// The damping actually used, `lambda * boost`.
    pub fn damping(&self) -> f64 {
        self.lambda * self.boost
    }
}

/// A refresh's successful outcome as a method reports it.
#[derive(Clone, Debug)]
pub struct RefreshOk<R> {
    /// The result.
    pub value: R,
    /// Cholesky pivots that had to be regularized (reported; 0 when none).
    pub regularized_pivots: usize,
}

impl<R> RefreshOk<R> {
    /// A result that needed no regularization.
    pub fn clean(value: R) -> Self {
        RefreshOk {
            value,
            regularized_pivots: 0,
        }
    }
}

/// One block's refresh state under the [`FailurePolicy`].
#[derive(Clone, Debug)]
pub struct Refreshing<R> {
    good: Option<Refreshed<R>>,
    boost: f64,
    failures: u32,
}

impl<R> Default for Refreshing<R> {
    fn default() -> Self {
        Refreshing {
            good: None,
            boost: 1.0,
            failures: 0,
        }
    }
}

/// The part of [`Refreshing`] a checkpoint stores besides the result's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefreshMeta {
    /// The boost the next refresh tries.
    pub boost: f64,
    /// Failures in a row.
    pub failures: u32,
    /// `(lambda, boost)` of the stored result, when there is one.
    pub good: Option<(f64, f64)>,
}

impl<R> Refreshing<R> {
    /// Runs one refresh at the configured damping `lambda` times the current boost:
    /// `attempt` gets the damping to use. Returns whether a new result was stored, and the
    /// note to report, if any.
    pub fn refresh(
        &mut self,
        policy: &FailurePolicy,
        block: &str,
        lambda: f64,
        attempt: impl FnOnce(f64) -> Result<RefreshOk<R>, LinalgError>,
    ) -> (bool, Option<Note>) {
        let damping = lambda * self.boost;
        match attempt(damping) {
            Ok(ok) => {
                let note = (self.boost != 1.0 || ok.regularized_pivots > 0).then(|| {
                    Note::RefreshRecovered {
                        block: block.to_string(),
                        damping,
                        regularized_pivots: ok.regularized_pivots,
                    }
                });
                self.good = Some(Refreshed {
                    value: ok.value,
                    lambda,
                    boost: self.boost,
                });
                self.boost = 1.0;
                self.failures = 0;
                (true, note)
            }
            Err(error) => {
                self.boost = (self.boost * policy.boost as f64).min(policy.max_boost as f64);
                self.failures = self.failures.saturating_add(1);
                let kept = if self.usable(policy).is_some() {
                    Kept::LastGood
                } else {
                    Kept::Fallback
                };
                let note = Note::RefreshFailed {
                    block: block.to_string(),
                    error,
                    damping,
                    kept,
                    retry_damping: lambda * self.boost,
                    failures: self.failures,
                };
                (false, Some(note))
            }
        }
    }

    /// The result to precondition with: the last good one, unless there is none or
    /// [`FailurePolicy::max_failures`] refreshes have failed in a row (the fallback rule then).
    pub fn usable(&self, policy: &FailurePolicy) -> Option<&Refreshed<R>> {
        if self.failures >= policy.max_failures {
            None
        } else {
            self.good.as_ref()
        }
    }

    /// The last good result, whether or not the policy lets it be used.
    pub fn last_good(&self) -> Option<&Refreshed<R>> {
        self.good.as_ref()
    }

    /// The note for a step on which the block takes the fallback rule although it has a last
    /// good result.
    pub fn fallback_note(&self, policy: &FailurePolicy, block: &str) -> Option<Note> {
        (self.good.is_some() && self.failures >= policy.max_failures).then(|| {
            Note::FallbackAfterFailures {
                block: block.to_string(),
                failures: self.failures,
            }
        })
    }

    /// What a checkpoint stores besides the result's tensors.
    pub fn meta(&self) -> RefreshMeta {
        RefreshMeta {
            boost: self.boost,
            failures: self.failures,
            good: self.good.as_ref().map(|g| (g.lambda, g.boost)),
        }
    }

    /// The state from a checkpoint's [`RefreshMeta`] and the stored result (`None` when the
    /// meta says there is none).
    pub fn restore(meta: RefreshMeta, value: Option<R>) -> Self {
        Refreshing {
            good: match (meta.good, value) {
                (Some((lambda, boost)), Some(value)) => Some(Refreshed {
                    value,
                    lambda,
                    boost,
                }),
                _ => None,
            },
            boost: meta.boost,
            failures: meta.failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(_: f64) -> Result<RefreshOk<f64>, LinalgError> {
        Err(LinalgError::NotPositiveDefinite { pivot: 0 })
    }

    #[test]
    fn boost_compounds_is_capped_stored_with_the_result_and_reset() {
        let p = FailurePolicy::DEFAULT.with_max_boost(100.0);
        let mut r = Refreshing::<f64>::default();
        let mut tried = Vec::new();
        for _ in 0..3 {
            let (ok, note) = r.refresh(&p, "b", 0.5, |d| {
                tried.push(d);
                fail(d)
            });
            assert!(!ok);
            assert!(matches!(
                note,
                Some(Note::RefreshFailed {
                    kept: Kept::Fallback,
                    ..
                })
            ));
        }
        let (ok, note) = r.refresh(&p, "b", 0.5, |d| {
            tried.push(d);
            Ok(RefreshOk::clean(d))
        });
        assert!(ok);
        assert_eq!(
            tried,
            [0.5, 5.0, 50.0, 50.0],
            "x10, x10, then capped at 100"
        );
        let good = r.usable(&p).unwrap();
        assert_eq!((good.value, good.lambda, good.boost), (50.0, 0.5, 100.0));
        assert!(matches!(note, Some(Note::RefreshRecovered { damping, .. }) if damping == 50.0));
        // Back to the configured damping.
        let (_, note) = r.refresh(&p, "b", 0.5, |d| Ok(RefreshOk::clean(d)));
        assert!(note.is_none());
        assert_eq!(r.usable(&p).unwrap().damping(), 0.5);
    }

    #[test]
    fn too_many_failures_in_a_row_fall_back_until_a_success() {
        let p = FailurePolicy::DEFAULT.with_max_failures(2);
        let mut r = Refreshing::<f64>::default();
        r.refresh(&p, "b", 1.0, |d| Ok(RefreshOk::clean(d)));
        let (_, n1) = r.refresh(&p, "b", 1.0, fail);
        assert!(matches!(
            n1,
            Some(Note::RefreshFailed {
                kept: Kept::LastGood,
                failures: 1,
                ..
            })
        ));
        assert!(r.usable(&p).is_some());
        let (_, n2) = r.refresh(&p, "b", 1.0, fail);
        assert!(matches!(
            n2,
            Some(Note::RefreshFailed {
                kept: Kept::Fallback,
                failures: 2,
                ..
            })
        ));
        assert!(r.usable(&p).is_none());
        assert!(r.last_good().is_some());
        assert!(matches!(
            r.fallback_note(&p, "b"),
            Some(Note::FallbackAfterFailures { failures: 2, .. })
        ));
        r.refresh(&p, "b", 1.0, |d| Ok(RefreshOk::clean(d)));
        assert!(r.usable(&p).is_some());
        assert!(r.fallback_note(&p, "b").is_none());
    }

    #[test]
    fn meta_round_trips() {
        let p = FailurePolicy::DEFAULT;
        let mut r = Refreshing::<f64>::default();
        r.refresh(&p, "b", 1.0, fail);
        r.refresh(&p, "b", 1.0, |d| Ok(RefreshOk::clean(d)));
        r.refresh(&p, "b", 1.0, fail);
        let m = r.meta();
        let back = Refreshing::restore(m, r.last_good().map(|g| g.value));
        assert_eq!(back.meta(), m);
        assert_eq!(back.usable(&p).unwrap().boost, 10.0);
    }
}
