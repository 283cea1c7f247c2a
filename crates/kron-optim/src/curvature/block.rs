//! The per-block abstraction every Kronecker method implements.

use kron_autodiff::{LayerCapture, Tensor};
use kron_layers::FisherBlock;

use super::config::StatisticsConfig;
use super::note::StatsSkip;
use super::policy::{RefreshOk, Refreshed};
use crate::backend::{Backend, LinalgError, Mat, Store};
use crate::error::OptimError;
use crate::optimizer::{OptimState, StateTensor};

/// Takes a saved matrix out of a checkpoint's state by its name within the block, checking
/// its shape, onto the backend.
pub type TakeMat<'a> = dyn FnMut(&str, &[usize]) -> Result<Mat, OptimError> + 'a;

/// What a block's statistics update reads at a step.
#[derive(Clone, Copy, Debug)]
pub struct StatsInput<'a> {
    /// The layer's capture (`a` and `g`), when the block asked for one
    /// ([`CurvatureBlock::wants_capture`]) and the tape recorded it.
    pub capture: Option<&'a LayerCapture>,
    /// The block's gradient in the `W_aug` layout (`out x in(+1)`), on the host, when the
    /// block asked for it ([`CurvatureBlock::wants_gradient`]).
    pub gradient: Option<&'a Tensor>,
    /// The shared statistics settings.
    pub config: &'a StatisticsConfig,
}

/// One block of a Kronecker method: its statistics, what a refresh computes from them, and
/// how that preconditions the block's gradient. The staged [`Driver`](super::Driver) runs the
/// stages over all blocks and owns everything shared (the failure policy, momentum, clipping,
/// the fallback rule, checkpoints); an implementation says only what is its method's own.
///
/// Matrices live on the [`Backend`] the driver hands in; the gradient `v` and direction `u`
/// are in the layer's `W_aug` layout (`out x in`, plus a bias column when the layer has one).
pub trait CurvatureBlock: Send + Sync {
    /// What a successful refresh computes (inverses, eigenbases, roots), which the failure
    /// policy keeps as the last good result.
    type Refreshed: Clone + Send + Sync;

    /// The layer this block preconditions: its parameters and how they join into `W_aug`.
    fn layout(&self) -> &FisherBlock;

    /// Whether the statistics read the tape's capture of the layer (KFAC's `a` and `g`).
    fn wants_capture(&self) -> bool {
        true
    }

    /// Whether the statistics read the block's gradient (Shampoo's and KrADagrad's).
    fn wants_gradient(&self) -> bool {
        false
    }

    /// The same block with no statistics (what a checkpoint's state is restored into).
    fn fresh(&self) -> Self
    where
        Self: Sized;

    /// Whether refreshes run eigendecompositions (reported when the backend delegates them
    /// to the host CPU).
    fn uses_eigh(&self) -> bool {
        false
    }

    /// Whether any statistics have been gathered (a refresh before then is skipped).
    fn has_statistics(&self) -> bool;

    /// Folds one step's input into the statistics. On `Err` nothing has changed.
    ///
    /// A block may leave the check that the new statistics are finite to the driver (so that a
    /// GPU step reads every block's verdict back at once, with the directions): it keeps what it
    /// had, lists the new matrices in [`CurvatureBlock::unchecked_statistics`], and the driver
    /// calls [`CurvatureBlock::settle_statistics`] with the verdict before the statistics are
    /// read (by a refresh, a correction or the quadratic model) and before the next update.
    fn update_statistics(
        &mut self,
        be: &dyn Backend,
        input: &StatsInput<'_>,
    ) -> Result<(), StatsSkip>;

    /// The statistics the last update wrote that the driver must check for NaN and infinity
    /// (none, the default, for a block that checks its own).
    fn unchecked_statistics(&self) -> Vec<&Mat> {
        Vec::new()
    }

    /// The driver's verdict on [`CurvatureBlock::unchecked_statistics`]: when `finite`, the
    /// update stands; otherwise the block takes back the statistics it had before it and says
    /// why ([`StatsSkip::Overflow`]). The default (for blocks that check their own) accepts.
    fn settle_statistics(&mut self, finite: bool) -> Result<(), StatsSkip> {
        let _ = finite;
        Ok(())
    }

    /// Computes the refreshed result at damping `damping` (the configured λ times the
    /// failure policy's boost), reading the statistics only.
    fn refresh(
        &self,
        be: &dyn Backend,
        damping: f64,
    ) -> Result<RefreshOk<Self::Refreshed>, LinalgError>;

    /// The direction `u` for the gradient `v` under a refreshed result, at the damping `lambda`
    /// in force (times the boost `refreshed` was computed at). Methods whose damping is baked
    /// into the refresh ignore `lambda`.
    fn precondition(
        &self,
        be: &dyn Backend,
        refreshed: &Refreshed<Self::Refreshed>,
        v: &Mat,
        lambda: f64,
    ) -> Mat;

    /// `d^T F e` for two updates in the `W_aug` layout under the block's curvature estimate
    /// (the quadratic model of Levenberg-Marquardt damping and the quadratic-model step); 0
    /// before any statistics.
    fn bilinear(&self, be: &dyn Backend, d: &Mat, e: &Mat) -> f64;

    /// Two matrices on the backend whose Frobenius inner product is
    /// [`CurvatureBlock::bilinear`]`(d, e)`, so that the driver reduces every block's term in
    /// one read-back ([`Backend::read_back`]); `None` (the default) when the block computes its
    /// form another way, or has no statistics (the form is then 0 or its own).
    fn bilinear_terms(&self, be: &dyn Backend, d: &Mat, e: &Mat) -> Option<(Mat, Mat)> {
        let _ = (be, d, e);
        None
    }

    /// A relative cost of one refresh (for example the sum of the factors' `d^3`), for
    /// assigning blocks to workers.
    fn refresh_cost(&self) -> f64;

    /// The statistics as named matrices, for checkpoints.
    fn statistics(&self) -> Vec<(&'static str, &Mat)>;

    /// The matrices of [`CurvatureBlock::statistics`], in the same order, to write: in
    /// data-parallel training the driver replaces a block's new statistics by their sum over
    /// the ranks (so a block must stage its update, [`CurvatureBlock::unchecked_statistics`],
    /// for the driver to take it back on every rank when one rank's input is refused).
    fn statistics_mut(&mut self) -> Vec<&mut Mat>;

    /// Sets the statistics from named host tensors (checked against the block's dimensions;
    /// each taken from `take`), for checkpoints; `updates` is the count they summarize.
    fn restore_statistics(
        &mut self,
        be: &dyn Backend,
        updates: u64,
        take: &mut TakeMat<'_>,
    ) -> Result<(), OptimError>;

    /// Statistics updates so far.
    fn updates(&self) -> u64;

    /// A refreshed result as named matrices and a JSON value (eigenvalues, a mode), for
    /// checkpoints and for broadcasting it to other workers.
    fn export_refreshed(
        &self,
        r: &Self::Refreshed,
    ) -> (Vec<(&'static str, Mat)>, serde_json::Value);

    /// The refreshed result from [`CurvatureBlock::export_refreshed`]'s form.
    fn import_refreshed(
        &self,
        be: &dyn Backend,
        meta: &serde_json::Value,
        take: &mut TakeMat<'_>,
    ) -> Result<Self::Refreshed, OptimError>;
}

/// A backend matrix as a checkpoint tensor, keeping its element type (`f64` statistics are
/// stored as `f64`).
pub(crate) fn to_state(be: &dyn Backend, m: &Mat) -> StateTensor {
    match &m.store {
        Store::F64(d) => StateTensor::F64 {
            shape: vec![m.rows, m.cols],
            data: d.clone(),
        },
        _ => StateTensor::F32(be.download(m)),
    }
}

/// A checkpoint tensor on the backend, in the backend's element type.
pub(crate) fn from_state(be: &dyn Backend, t: StateTensor) -> Mat {
    match t {
        StateTensor::F64 { shape, data } if be.precision() == crate::Precision::F64 => Mat {
            rows: shape[0],
            cols: shape[1],
            store: Store::F64(data),
        },
        StateTensor::F64 { shape, data } => be.upload(&Tensor::from_vec(
            data.iter().map(|&x| x as f32).collect(),
            &shape,
        )),
        StateTensor::F32(t) => be.upload(&t),
    }
}

/// Puts a backend matrix into a state under `name`.
pub(crate) fn put(be: &dyn Backend, state: &mut OptimState, name: String, m: &Mat) {
    state.insert(name, to_state(be, m));
}
