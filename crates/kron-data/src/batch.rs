//! Seeded, reproducible mini-batch order whose position can be saved and resumed to the bit.

use kron_autodiff::Rng;
use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// The mini-batches of index lists over a dataset of `len` examples, epoch after epoch.
///
/// Epoch `e` visits the examples in the order of `0..len` shuffled by `rng.fork(e)` (or in order
/// when shuffling is off); the base generator never advances, so each epoch's order depends only
/// on the seed and the epoch number. The position, [`BatchState`] (sizes, flags, epoch, cursor,
/// generator), is all there is to the iterator: [`state`](Self::state) /
/// [`from_state`](Self::from_state), or serde directly on `Batches`, resume mid-epoch with the
/// very same batches.
///
/// Two ways to draw:
/// * [`next_batch`](Self::next_batch) stays within the epoch: it returns `None` once the epoch's
///   batches are done and moves on to the next epoch, so `while let Some(idx) =
///   batches.next_batch()` is one epoch;
/// * as an [`Iterator`], `Batches` runs on across epochs without end (for step-counted training,
///   `batches.by_ref().take(steps)`); it ends only when an epoch has no batch at all (an empty
///   dataset, or `drop_last` with fewer examples than a batch).
///
/// ```
/// use kron_autodiff::Rng;
/// use kron_data::Batches;
///
/// let mut batches = Batches::new(10, 4, Rng::new(0));
/// let mut seen = Vec::new();
/// while let Some(idx) = batches.next_batch() {
///     seen.extend(idx);
/// }
/// seen.sort();
/// assert_eq!(seen, (0..10).collect::<Vec<_>>());
/// assert_eq!(batches.epoch(), 1);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BatchState", into = "BatchState")]
pub struct Batches {
    state: BatchState,
    order: Vec<usize>,
}

/// The whole position of a [`Batches`]: serializable, e.g. into a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchState {
    /// Examples in the dataset.
    pub len: usize,
    /// Examples per batch (the last batch of an epoch may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Whether each epoch is shuffled.
    pub shuffle: bool,
    /// Whether an epoch's final, smaller batch is skipped.
    pub drop_last: bool,
    /// The current epoch, from 0 (the number of epochs completed).
    pub epoch: u64,
    /// Examples of the current epoch already handed out.
    pub cursor: usize,
    /// The base generator; epoch `e` shuffles with `rng.fork(e)`.
    pub rng: Rng,
}

impl Batches {
    /// Batches of `batch_size` over `len` examples, shuffled each epoch from `rng`, keeping the
    /// final smaller batch. Give the iterator a stream of its own (e.g. `rng.fork(1)`).
    ///
    /// # Panics
    /// If `batch_size` is zero.
    #[track_caller]
    pub fn new(len: usize, batch_size: usize, rng: Rng) -> Self {
        assert!(batch_size > 0, "Batches::new: batch_size must be positive");
        Self::build(BatchState {
            len,
            batch_size,
            shuffle: true,
            drop_last: false,
            epoch: 0,
            cursor: 0,
            rng,
        })
    }

    /// Whether to shuffle each epoch (default `true`); restarts the current epoch's order.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.state.shuffle = shuffle;
        self.order = self.state.order();
        self
    }

    /// Whether to skip an epoch's final, smaller batch (default `false`).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.state.drop_last = drop_last;
        self
    }

    /// Resumes from a saved position.
    ///
    /// # Errors
    /// [`DataError::BadState`] if the state is inconsistent (zero batch size, cursor past the
    /// end).
    pub fn from_state(state: BatchState) -> Result<Self, DataError> {
        if state.batch_size == 0 {
            return Err(DataError::BadState {
                detail: "batch_size is 0".into(),
            });
        }
        if state.cursor > state.len {
            return Err(DataError::BadState {
                detail: format!("cursor {} is past {} examples", state.cursor, state.len),
            });
        }
        Ok(Self::build(state))
    }

    /// Resumes from a saved position over a dataset of `len` examples: [`from_state`]
    /// (Self::from_state), and also refuses a state saved for a dataset of another size,
    /// which would index past a smaller dataset's end or silently train on the first
    /// examples of a larger one only.
    ///
    /// # Errors
    /// [`DataError::BadState`], naming both sizes, if `len` is not the saved one; otherwise as
    /// [`from_state`](Self::from_state).
    pub fn resume(state: BatchState, len: usize) -> Result<Self, DataError> {
        if state.len != len {
            return Err(DataError::BadState {
                detail: format!(
                    "the saved batch position is for a dataset of {} examples, but this dataset \
                     has {len}",
                    state.len
                ),
            });
        }
        Self::from_state(state)
    }

    fn build(state: BatchState) -> Self {
        let order = state.order();
        Batches { state, order }
    }

    /// The current position, to save and later hand to [`from_state`](Self::from_state).
    pub fn state(&self) -> BatchState {
        self.state.clone()
    }

    /// The current epoch, from 0 (the number of epochs completed).
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Examples of the current epoch already handed out.
    pub fn cursor(&self) -> usize {
        self.state.cursor
    }

    /// Examples in the dataset.
    pub fn len(&self) -> usize {
        self.state.len
    }

    /// Whether the dataset is empty.
    pub fn is_empty(&self) -> bool {
        self.state.len == 0
    }

    /// Examples per batch.
    pub fn batch_size(&self) -> usize {
        self.state.batch_size
    }

    /// Batches in a full epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let BatchState {
            len, batch_size, ..
        } = self.state;
        if self.state.drop_last {
            len / batch_size
        } else {
            len.div_ceil(batch_size)
        }
    }

    /// The order of the current epoch: a permutation of `0..len`.
    pub fn epoch_order(&self) -> &[usize] {
        &self.order
    }

    /// The next batch of the current epoch, or `None` when the epoch is done; in that case the
    /// iterator has moved to the next epoch (reshuffled), so the next call starts it.
    pub fn next_batch(&mut self) -> Option<Vec<usize>> {
        let BatchState {
            len,
            batch_size,
            cursor,
            drop_last,
            ..
        } = self.state;
        let remaining = len - cursor;
        if remaining == 0 || (drop_last && remaining < batch_size) {
            self.state.epoch += 1;
            self.state.cursor = 0;
            self.order = self.state.order();
            return None;
        }
        let end = cursor + remaining.min(batch_size);
        self.state.cursor = end;
        Some(self.order[cursor..end].to_vec())
    }
}

impl BatchState {
    /// The order of the epoch this state is in.
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            self.rng.fork(self.epoch).shuffle(&mut order);
        }
        order
    }
}

impl Iterator for Batches {
    type Item = Vec<usize>;

    /// The next batch, crossing into the next epoch when this one is done.
    fn next(&mut self) -> Option<Vec<usize>> {
        if self.batches_per_epoch() == 0 {
            return None;
        }
        self.next_batch().or_else(|| self.next_batch())
    }
}

impl From<Batches> for BatchState {
    fn from(b: Batches) -> Self {
        b.state
    }
}

impl TryFrom<BatchState> for Batches {
    type Error = DataError;

    fn try_from(state: BatchState) -> Result<Self, DataError> {
        Batches::from_state(state)
    }
}
