//! The staged driver every Kronecker method runs on.

use std::collections::BTreeMap;
use std::time::Instant;

use kron_autodiff::{Gradients, ParamId, ParamStore, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::block::{CurvatureBlock, StatsInput, from_state, put, to_state};
use super::config::{CoreConfig, Fallback, StatisticsConfig, StepRule};
use super::note::{Note, StatsSkip};
use super::policy::{RefreshMeta, Refreshed, Refreshing};
use super::products::CurvatureProducts;
use super::rules::{apply_direction, kl_clip_factor};
use crate::backend::{Backend, Mat, Reduction, Store};
use crate::comm::{Packet, Shard, all_reduce_buffers, assign_by_cost};
use crate::error::OptimError;
use crate::first_order::{Adam, Slots};
use crate::optimizer::{
    Captures, OptimState, Optimizer, StateTensor, StepReport, Wants, check_finite,
};
use crate::validate::{positive, step_lr};

/// What a [`Correction`] sees of the step: every block, its usable refreshed result, its
/// gradient, this step's captures, and the blocks' own preconditioner as a function.
pub struct CorrectionInput<'a, B: CurvatureBlock> {
    /// The backend the blocks' matrices live on.
    pub backend: &'a dyn Backend,
    /// The blocks (for their factors and layouts).
    pub blocks: &'a [B],
    /// Each block's usable refreshed result (`None` before a successful refresh or while the
    /// block takes the fallback rule).
    pub refreshed: Vec<Option<&'a Refreshed<B::Refreshed>>>,
    /// Each block's gradient `v` in the `W_aug` layout (`None` for blocks without one).
    pub gradients: &'a [Option<&'a Tensor>],
    /// This step's captures (empty on steps that gathered none).
    pub captures: &'a Captures,
    /// The shared statistics settings (decay, examples per batch).
    pub statistics: &'a StatisticsConfig,
    /// The damping λ in force.
    pub lambda: f64,
    /// The step being taken (from 0).
    pub step: u64,
    /// Whether some block refreshed this step.
    pub refreshed_now: bool,
    /// This rank's shard of the global batch in data-parallel training (`None` on one
    /// process): the captures hold its examples only, so sums over examples must be reduced
    /// across the ranks.
    pub shard: Option<&'a Shard>,
    precondition: &'a (dyn Fn(usize, &Tensor) -> Option<Tensor> + Sync),
}

impl<B: CurvatureBlock> CorrectionInput<'_, B> {
    /// The block preconditioner `M_i^{-1} x` of block `i` for a host matrix `x` in its
    /// `W_aug` layout, with the refreshed result and damping the step itself uses; `None`
    /// when the block has no usable result.
    pub fn precondition(&self, i: usize, x: &Tensor) -> Option<Tensor> {
        (self.precondition)(i, x)
    }
}

/// A correction over all blocks at once, between preconditioning and clipping: it sees every
/// block's gradient `v` and direction `u` (host tensors in the `W_aug` layout; `None` for
/// blocks without a gradient or without a usable refresh) and may change the directions.
/// Two-level KFAC's coarse-space term is one.
pub trait Correction<B: CurvatureBlock>: Send {
    /// Corrects `directions` in place, returning notes for the report. On `Err` the step is
    /// refused and nothing changes.
    fn correct(
        &mut self,
        input: &CorrectionInput<'_, B>,
        directions: &mut [Option<Tensor>],
    ) -> Result<Vec<Note>, OptimError>;
}

/// A block's gradient and direction for one step.
struct BlockUpdate {
    u: Option<Tensor>,
    v: Tensor,
}

/// One block's term `d^T F e` of a quadratic form: the pair of backend matrices whose inner
/// product it is, reduced with the other blocks' in one read-back, or the value when the block
/// computes it another way.
enum Term {
    Pair(Mat, Mat),
    Value(f64),
}

impl Term {
    fn of<B: CurvatureBlock>(b: &B, be: &dyn Backend, d: &Mat, e: &Mat) -> Term {
        match b.bilinear_terms(be, d, e) {
            Some((x, y)) => Term::Pair(x, y),
            None => Term::Value(b.bilinear(be, d, e)),
        }
    }

    /// The terms' values, in order (the pairs' inner products in one read-back).
    fn values<'a>(be: &dyn Backend, terms: impl Iterator<Item = &'a Term> + Clone) -> Vec<f64> {
        let pairs: Vec<Reduction<'_>> = terms
            .clone()
            .filter_map(|t| match t {
                Term::Pair(x, y) => Some(Reduction::Dot(x, y)),
                Term::Value(_) => None,
            })
            .collect();
        let mut dots = be.reductions(&pairs).into_iter();
        terms
            .map(|t| match t {
                Term::Pair(..) => dots.next().expect("a value per pair"),
                Term::Value(v) => *v,
            })
            .collect()
    }
}

/// What the statistics stage did with one block.
enum StatsOutcome {
    /// Nothing was due.
    Idle,
    /// The update stands.
    Updated,
    /// The update awaits the driver's finiteness check.
    Unchecked,
    /// The update was refused.
    Skipped(super::note::StatsSkip),
}

/// The staged step shared by every Kronecker method:
///
/// 1. **statistics**: each block due folds in its capture or gradient;
/// 2. **refresh**: every `refresh.period` steps, each block recomputes its result under the
///    [failure policy](super::FailurePolicy), blocks in parallel;
/// 3. **precondition**: each block's gradient becomes a direction (the fallback rule's
///    gradient for blocks without a usable result);
/// 4. **correction**: an optional [`Correction`] over all blocks at once;
/// 5. **clip**: KL clipping over the preconditioned blocks;
/// 6. **step rule**: momentum and weight decay, or the quadratic model's `(alpha, mu)`;
/// 7. **parameters**: written all or nothing, after checking the update is finite;
///
/// plus the Levenberg-Marquardt hand-back ([`Optimizer::observe_reduction`]).
///
/// A `Driver` is itself an [`Optimizer`]; a method's own type wraps one to add its
/// configuration and accessors.
pub struct Driver<B: CurvatureBlock> {
    kind: &'static str,
    config: CoreConfig,
    structure: serde_json::Value,
    backend: Box<dyn Backend>,
    blocks: Vec<B>,
    refresh: Vec<Refreshing<B::Refreshed>>,
    velocity: Slots,
    slot_of: BTreeMap<ParamId, usize>,
    outside: Vec<ParamId>,
    /// The names of the parameters outside every block, in the store's order.
    outside_names: Vec<String>,
    /// Whether a step of this driver has returned its report (the first one carries
    /// [`Note::OutsideBlocks`]).
    reported_outside: bool,
    adam: Option<Adam>,
    step: u64,
    damping: f32,
    /// The quadratic model's predicted change `M(δ) - M(0)` of the last step, when the damping
    /// adaptation asked for the actual reduction.
    predicted: Option<f64>,
    last_rho: Option<f32>,
    /// This rank's shard in data-parallel training.
    shard: Option<Shard>,
    /// Refreshes this rank computed itself (in data-parallel training, those of the blocks
    /// it owns).
    computed_refreshes: u64,
}

#[derive(Serialize, Deserialize)]
struct DriverMeta {
    kind: String,
    structure: serde_json::Value,
    config: CoreConfig,
    step: u64,
    damping: f32,
    predicted: Option<f64>,
    blocks: Vec<BlockMeta>,
    adam: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct BlockMeta {
    path: String,
    updates: u64,
    refresh: RefreshMeta,
    refreshed: Option<serde_json::Value>,
}

impl<B: CurvatureBlock> Driver<B> {
    /// A driver named `kind` (the optimizer's name and its checkpoints' kind) over `blocks`,
    /// with the matrix math on `backend`. `structure` holds the method's structural settings
    /// (a JSON object: its mode, precision, anything a saved state must agree with to load).
    ///
    /// Parameters of `params` in no block take the fallback rule, and the first step's report
    /// lists them ([`Note::OutsideBlocks`]).
    ///
    /// # Errors
    /// [`OptimError::Config`] if `config` fails [`CoreConfig::validate`], or (field
    /// `step.strict_blocks`, naming them) if it asks for strict blocks and some parameters lie
    /// outside every block.
    pub fn new(
        kind: &'static str,
        blocks: Vec<B>,
        params: &ParamStore,
        config: CoreConfig,
        backend: Box<dyn Backend>,
        structure: serde_json::Value,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        let ids: Vec<ParamId> = params.ids().collect();
        let slot_of = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let in_blocks: Vec<ParamId> = blocks
            .iter()
            .flat_map(|b| std::iter::once(b.layout().weight).chain(b.layout().bias))
            .collect();
        let outside: Vec<ParamId> = ids
            .iter()
            .copied()
            .filter(|i| !in_blocks.contains(i))
            .collect();
        let outside_names: Vec<String> = outside
            .iter()
            .map(|&i| params.name(i).to_string())
            .collect();
        if config.step.strict_blocks && !outside_names.is_empty() {
            return Err(OptimError::Config {
                field: "step.strict_blocks".into(),
                detail: format!(
                    "is on, but {kind} finds parameters {} in no Fisher block (a layer left \
                     out of the model's visit_blocks?); with it off, the fallback rule trains \
                     them",
                    outside_names.join(", ")
                ),
            });
        }
        let adam = match config.step.fallback {
            Fallback::Adam(c) => Some(Adam::new(params, c)?),
            Fallback::Sgd => None,
        };
        Ok(Driver {
            kind,
            damping: config.damping.lambda,
            config,
            structure,
            backend,
            refresh: blocks.iter().map(|_| Refreshing::default()).collect(),
            blocks,
            velocity: Slots::zeros(params, &ids),
            slot_of,
            outside,
            outside_names,
            reported_outside: false,
            adam,
            step: 0,
            predicted: None,
            last_rho: None,
            shard: None,
            computed_refreshes: 0,
        })
    }

    /// The shared configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Replaces the shared configuration (validated first; on error nothing changes). The
    /// damping in force becomes the new one's λ unless Levenberg-Marquardt adapts it.
    ///
    /// # Errors
    /// [`OptimError::Config`] naming the field.
    pub fn set_config(&mut self, config: CoreConfig) -> Result<(), OptimError> {
        config.validate()?;
        if config.damping.adaptive.is_none() {
            self.damping = config.damping.lambda;
        }
        self.config = config;
        Ok(())
    }

    /// The names of the parameters that lie in no block (the fallback rule trains them), in
    /// the store's order.
    pub fn outside_blocks(&self) -> &[String] {
        &self.outside_names
    }

    /// The blocks.
    pub fn blocks(&self) -> &[B] {
        &self.blocks
    }

    /// The block of a layer path.
    pub fn block(&self, path: &str) -> Option<&B> {
        self.blocks.iter().find(|b| b.layout().path == path)
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The damping λ in force (it moves under Levenberg-Marquardt adaptation).
    pub fn damping(&self) -> f32 {
        self.damping
    }

    /// Block refreshes this rank has computed itself. In data-parallel training each block's
    /// refresh is computed by its owner only ([`Driver::refresh_owners`]) and broadcast.
    pub fn computed_refreshes(&self) -> u64 {
        self.computed_refreshes
    }

    /// The rank that computes each block's refresh, in block order: blocks are assigned by
    /// their refresh cost ([`CurvatureBlock::refresh_cost`]), greedily, so the ranks share the
    /// work about evenly. All 0 on one process. When the refreshes are not split
    /// ([`Shard::with_split_refreshes`]) every rank computes every block's instead.
    pub fn refresh_owners(&self) -> Vec<usize> {
        let size = self.shard.as_ref().map_or(1, |s| s.comm().size());
        let costs: Vec<f64> = self.blocks.iter().map(|b| b.refresh_cost()).collect();
        assign_by_cost(&costs, size)
    }

    /// Each block's owner and this rank's index when `split` shares work by owner
    /// ([`Driver::refresh_owners`]); otherwise every block is this rank's, as rank 0 of one.
    fn owners_on(&self, split: Option<&Shard>) -> (Vec<usize>, usize) {
        match split {
            Some(s) => (self.refresh_owners(), s.comm().rank()),
            None => (vec![0; self.blocks.len()], 0),
        }
    }

    /// The reduction ratio ρ of the last adaptation, if any.
    pub fn last_reduction_ratio(&self) -> Option<f32> {
        self.last_rho
    }

    /// The direction `u` (in the `W_aug` layout) the current refreshed result gives for a
    /// block's gradient `v`, or `None` before a usable refresh. For tests and analysis.
    pub fn precondition(&self, path: &str, v: &Tensor) -> Option<Tensor> {
        let i = self.blocks.iter().position(|b| b.layout().path == path)?;
        self.direction(&self.blocks[i], &self.refresh[i], v)
    }

    /// The direction a block's usable refreshed result gives for its gradient `v`, at the
    /// damping in force times the boost the result was refreshed at.
    fn direction(&self, b: &B, r: &Refreshing<B::Refreshed>, v: &Tensor) -> Option<Tensor> {
        let be = self.backend.as_ref();
        Some(be.download(&self.direction_on_backend(b, r, v)?))
    }

    /// [`Driver::direction`], left on the backend.
    fn direction_on_backend(&self, b: &B, r: &Refreshing<B::Refreshed>, v: &Tensor) -> Option<Mat> {
        let be = self.backend.as_ref();
        let r = r.usable(&self.config.refresh.failure)?;
        let lambda = self.damping as f64 * r.boost;
        Some(b.precondition(be, r, &be.upload(v), lambda))
    }

    fn is_stats_step(&self, b: &B) -> bool {
        is_due(&self.config.statistics, b.layout(), self.step)
    }

    fn adapts_now(&self) -> bool {
        self.config
            .damping
            .adaptive
            .is_some_and(|lm| self.step.is_multiple_of(lm.interval.max(1)))
    }

    /// One step, with exact curvature products when the step rule uses them and an optional
    /// correction over all blocks.
    ///
    /// The first report this driver returns lists the parameters outside every block
    /// ([`Note::OutsideBlocks`]), if any.
    ///
    /// # Errors
    /// A non-finite gradient, a learning rate the schedule makes invalid, or an update that
    /// would overflow a parameter: nothing changes.
    pub fn step_with(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        products: Option<&dyn CurvatureProducts>,
        correction: Option<&mut dyn Correction<B>>,
    ) -> Result<StepReport, OptimError> {
        let mut report = self.staged_step(params, grads, curvature, products, correction)?;
        if !self.reported_outside {
            self.reported_outside = true;
            if !self.outside_names.is_empty() {
                report.notes.insert(
                    0,
                    Note::OutsideBlocks {
                        params: self.outside_names.clone(),
                    },
                );
            }
        }
        Ok(report)
    }

    /// The stages of [`step_with`](Self::step_with).
    fn staged_step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        products: Option<&dyn CurvatureProducts>,
        correction: Option<&mut dyn Correction<B>>,
    ) -> Result<StepReport, OptimError> {
        check_finite(params, grads)?;
        let cfg = self.config;
        let lr = step_lr(&cfg.step.schedule, self.step)?;
        let mut report = StepReport {
            step: self.step,
            lr,
            damping: Some(self.damping),
            ..Default::default()
        };

        // 1. Statistics. The new statistics' finiteness is checked for all blocks at once,
        // before a refresh reads them, or else with the directions' read-back (stage 3): on a
        // GPU a step without a refresh waits on the device once.
        let t0 = Instant::now();
        let (stats_config, stats_shard) = self.statistics_shard();
        let mut outcomes = self.statistics(params, grads, curvature, &stats_config);
        if let Some(shard) = &stats_shard {
            self.reduce_statistics(&mut outcomes, shard);
        }
        let mut stats = Some(outcomes);
        report.stats_ms = t0.elapsed().as_secs_f64() * 1e3;

        // 2. Refresh.
        let t1 = Instant::now();
        if self.step.is_multiple_of(cfg.refresh.period.max(1)) {
            if let Some(outcomes) = stats.take() {
                let verdicts = self.backend.reductions(&self.stats_checks(&outcomes));
                self.settle(outcomes, &verdicts, &mut report);
            }
            self.refresh_all(&mut report);
        }
        report.refresh_ms = t1.elapsed().as_secs_f64() * 1e3;

        // 3. Precondition every block.
        let t2 = Instant::now();
        let mut updates = self.precondition_all(params, grads, stats, &mut report);

        // 4. The correction over all blocks.
        if let Some(c) = correction {
            let mut dirs: Vec<Option<Tensor>> = updates
                .iter_mut()
                .map(|u| u.as_mut().and_then(|u| u.u.take()))
                .collect();
            let gradients: Vec<Option<&Tensor>> =
                updates.iter().map(|u| u.as_ref().map(|u| &u.v)).collect();
            let policy = cfg.refresh.failure;
            let this = &*self;
            let precondition =
                |i: usize, x: &Tensor| this.direction(&this.blocks[i], &this.refresh[i], x);
            let input = CorrectionInput {
                backend: self.backend.as_ref(),
                blocks: &self.blocks,
                refreshed: self.refresh.iter().map(|r| r.usable(&policy)).collect(),
                gradients: &gradients,
                captures: curvature,
                statistics: &stats_config,
                lambda: self.damping as f64,
                step: self.step,
                refreshed_now: report.refreshed,
                shard: stats_shard.as_ref(),
                precondition: &precondition,
            };
            let notes = c.correct(&input, &mut dirs)?;
            report.notes.extend(notes);
            for (up, d) in updates.iter_mut().zip(dirs) {
                if let Some(up) = up {
                    up.u = d;
                }
            }
        }

        if cfg.step.rule == StepRule::QuadraticModel {
            self.committed(params, grads, lr, |k, params| {
                k.quadratic_step(params, grads, &updates, products, &mut report)
            })?;
            report.update_ms = t2.elapsed().as_secs_f64() * 1e3;
            self.step += 1;
            return Ok(report);
        }

        // 5. KL clipping over the preconditioned blocks.
        let vg: f64 = updates
            .iter()
            .flatten()
            .filter_map(|up| up.u.as_ref().map(|u| dot(u, &up.v)))
            .sum::<f64>();
        let nu = kl_clip_factor(cfg.step.kl_clip, lr, vg);

        // 6-7. Momentum and weight decay on the preconditioned update; fallback elsewhere.
        let adapting = self.adapts_now();
        let before: Option<ParamStore> = adapting.then(|| params.clone());
        let (per_param, fallback_ids) = self.per_parameter(params, &updates, false);
        self.committed(params, grads, lr, |k, params| {
            for (id, mut u, _) in per_param {
                let slot = k.slot_of[&id];
                if nu != 1.0 {
                    u.data_mut().iter_mut().for_each(|x| *x *= nu);
                }
                apply_direction(
                    params.get_mut(id).data_mut(),
                    u.data(),
                    k.velocity.bufs[slot].data_mut(),
                    lr,
                    cfg.step.momentum,
                    cfg.step.weight_decay,
                );
            }
            k.fallback_step(params, grads, &fallback_ids, lr)
        })?;

        // The quadratic model's prediction for the damping adaptation.
        self.predicted = before.map(|old| self.predicted_change(&old, params, grads));
        report.update_ms = t2.elapsed().as_secs_f64() * 1e3;
        if nu < 1.0 {
            report.notes.push(Note::KlClipped { factor: nu });
        }
        self.step += 1;
        Ok(report)
    }

    /// Stage 1: each block with a capture (or, for gradient statistics, each block due)
    /// folds it into its statistics; what became of each block, to settle with
    /// [`Driver::settle`].
    fn statistics(
        &mut self,
        params: &ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        scfg: &StatisticsConfig,
    ) -> Vec<StatsOutcome> {
        let be = self.backend.as_ref();
        let scfg = *scfg;
        let step = self.step;
        // Block after block: each factor product is a GEMM large enough to split its output
        // among the threads itself (running blocks side by side on top of GEMMs that had
        // threads of their own measured 201.8 against 167.7 ms a step on the autoencoder at
        // batch 1000, 2 cores).
        self.blocks
            .iter_mut()
            .map(|b| {
                // Captures handed over on steps a block's statistics are not due (a correction
                // may want them) are not folded in.
                let capture = if b.wants_capture() && is_due(&scfg, b.layout(), step) {
                    curvature.get(&b.layout().layer)
                } else {
                    None
                };
                let gradient = (b.wants_gradient() && is_due(&scfg, b.layout(), step))
                    .then(|| joined_gradient(b.layout(), params, grads))
                    .flatten();
                if capture.is_none() && gradient.is_none() {
                    return StatsOutcome::Idle;
                }
                let input = StatsInput {
                    capture,
                    gradient: gradient.as_ref(),
                    config: &scfg,
                };
                match b.update_statistics(be, &input) {
                    Ok(()) if b.unchecked_statistics().is_empty() => StatsOutcome::Updated,
                    Ok(()) => StatsOutcome::Unchecked,
                    Err(reason) => StatsOutcome::Skipped(reason),
                }
            })
            .collect()
    }

    /// The finiteness checks the statistics stage left to the driver, block after block.
    fn stats_checks(&self, outcomes: &[StatsOutcome]) -> Vec<Reduction<'_>> {
        self.blocks
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| matches!(o, StatsOutcome::Unchecked))
            .flat_map(|(b, _)| b.unchecked_statistics())
            .map(Reduction::NonFinite)
            .collect()
    }

    /// Settles the statistics stage with the verdicts of [`Driver::stats_checks`] (in its
    /// order): blocks whose new statistics overflowed take back their old ones; the report
    /// says which blocks were skipped and whether any updated.
    fn settle(&mut self, outcomes: Vec<StatsOutcome>, verdicts: &[f64], report: &mut StepReport) {
        let mut verdicts = verdicts.iter();
        let mut any = false;
        for (b, o) in self.blocks.iter_mut().zip(outcomes) {
            let result = match o {
                StatsOutcome::Idle => continue,
                StatsOutcome::Updated => Ok(()),
                StatsOutcome::Skipped(reason) => Err(reason),
                StatsOutcome::Unchecked => {
                    let finite = b
                        .unchecked_statistics()
                        .iter()
                        .all(|_| *verdicts.next().expect("a verdict per check") == 0.0);
                    b.settle_statistics(finite)
                }
            };
            match result {
                Ok(()) => any = true,
                Err(reason) => report.notes.push(Note::StatsSkipped {
                    block: b.layout().path.clone(),
                    reason,
                }),
            }
        }
        report.stats_updated = any;
    }

    /// The statistics settings this rank's blocks use and, in data-parallel training, the
    /// shard of the examples they gather on: this rank's whole shard, or its part of the first
    /// `statistics.examples` examples of the global batch (a rank holding none of them still
    /// updates, on one example, with weight 0, so every rank stages the same update).
    fn statistics_shard(&self) -> (StatisticsConfig, Option<Shard>) {
        let mut scfg = self.config.statistics;
        let Some(shard) = self.shard.as_ref().filter(|s| s.is_distributed()) else {
            return (scfg, None);
        };
        let part = match scfg.examples {
            Some(m) => shard.prefix(m),
            None => shard.clone(),
        };
        if scfg.examples.is_some() {
            scfg.examples = Some(part.len().max(1));
        }
        (scfg, Some(part))
    }

    /// Data-parallel statistics: each block that reads captures has folded in its shard's
    /// examples only; the ranks sum their new statistics weighted by their shards' shares, so
    /// that every rank holds the global batch's. The running average is linear in the batch
    /// statistic, so summing the averaged matrices is exact:
    /// `sum_r w_r (decay old + (1 - decay) S_r) = decay old + (1 - decay) sum_r w_r S_r`.
    ///
    /// Two collectives: which ranks refused their input, block by block (a block refused on
    /// any rank is taken back on every rank, [`StatsSkip::OnRanks`]), then the matrices, in
    /// buckets. The finiteness checks then run on the reduced matrices, the same on every
    /// rank.
    fn reduce_statistics(&mut self, outcomes: &mut [StatsOutcome], shard: &Shard) {
        let comm = shard.comm();
        let (me, size) = (comm.rank(), comm.size());
        let taking: Vec<usize> = (0..self.blocks.len())
            .filter(|&i| {
                self.blocks[i].wants_capture() && !matches!(outcomes[i], StatsOutcome::Idle)
            })
            .collect();
        let mut refused = vec![0.0f64; taking.len() * size];
        for (k, &i) in taking.iter().enumerate() {
            if matches!(outcomes[i], StatsOutcome::Skipped(_)) {
                refused[k * size + me] = 1.0;
            }
        }
        comm.all_reduce_f64(&mut refused);
        let mut reduce = Vec::with_capacity(taking.len());
        for (k, &i) in taking.iter().enumerate() {
            let ranks: Vec<usize> = (0..size)
                .filter(|&r| refused[k * size + r] != 0.0)
                .collect();
            if ranks.is_empty() {
                reduce.push(i);
                continue;
            }
            let b = &mut self.blocks[i];
            match outcomes[i] {
                StatsOutcome::Unchecked => {
                    // Taken back: the verdict's own reason is replaced by the ranks'.
                    let _ = b.settle_statistics(false);
                }
                StatsOutcome::Updated => panic!(
                    "Driver: block {} checks its own statistics, so a capture refused on \
                     another rank cannot be undone here; data-parallel training needs blocks \
                     that stage their statistics (CurvatureBlock::unchecked_statistics)",
                    b.layout().path
                ),
                _ => {}
            }
            outcomes[i] = StatsOutcome::Skipped(StatsSkip::OnRanks { ranks });
        }
        let be = self.backend.as_ref();
        let w = shard.weight();
        let mut f32s: Vec<Vec<f32>> = Vec::new();
        let mut f64s: Vec<Vec<f64>> = Vec::new();
        for &i in &reduce {
            for (_, m) in self.blocks[i].statistics() {
                match &m.store {
                    Store::F64(d) => f64s.push(d.iter().map(|x| x * w).collect()),
                    _ => {
                        let wf = w as f32;
                        f32s.push(be.download(m).data().iter().map(|x| x * wf).collect());
                    }
                }
            }
        }
        {
            let mut views: Vec<&mut [f32]> = f32s.iter_mut().map(|v| v.as_mut_slice()).collect();
            all_reduce_buffers(comm, &mut views);
            let mut views: Vec<&mut [f64]> = f64s.iter_mut().map(|v| v.as_mut_slice()).collect();
            all_reduce_buffers(comm, &mut views);
        }
        let (mut f32s, mut f64s) = (f32s.into_iter(), f64s.into_iter());
        for &i in &reduce {
            for m in self.blocks[i].statistics_mut() {
                let (rows, cols) = m.dims();
                match &mut m.store {
                    Store::F64(d) => d.copy_from_slice(&f64s.next().expect("a reduced matrix")),
                    Store::F32(t) => t
                        .data_mut()
                        .copy_from_slice(&f32s.next().expect("a reduced matrix")),
                    #[allow(unreachable_patterns)]
                    _ => {
                        let v = f32s.next().expect("a reduced matrix");
                        *m = be.upload(&Tensor::from_vec(v, &[rows, cols]));
                    }
                }
            }
        }
    }

    /// Hands each owner's refreshes to the other ranks, owner after owner (one broadcast of
    /// a [`Packet`] each): every rank ends with the same refresh state and notes, to the bit.
    fn share_refreshes(
        &mut self,
        shard: &Shard,
        owners: &[usize],
        results: &mut [(bool, Option<Note>)],
    ) {
        let comm = shard.comm();
        let me = comm.rank();
        for root in 0..comm.size() {
            let owned: Vec<usize> = (0..self.blocks.len())
                .filter(|&i| owners[i] == root && self.blocks[i].has_statistics())
                .collect();
            if owned.is_empty() {
                continue;
            }
            let mut bytes = if root == me {
                self.refresh_packet(&owned, results).encode()
            } else {
                Vec::new()
            };
            comm.broadcast_bytes(&mut bytes, root);
            if root != me {
                let packet = Packet::decode(&bytes)
                    .unwrap_or_else(|e| panic!("Driver: rank {root}'s refreshes: {e}"));
                self.take_refresh_packet(&owned, packet, results)
                    .unwrap_or_else(|e| panic!("Driver: rank {root}'s refreshes: {e}"));
            }
        }
    }

    /// The refresh state of blocks `owned` (and their step outcomes) as a packet.
    fn refresh_packet(&self, owned: &[usize], results: &[(bool, Option<Note>)]) -> Packet {
        let be = self.backend.as_ref();
        let mut packet = Packet::default();
        let mut metas = Vec::with_capacity(owned.len());
        for &i in owned {
            let (b, r) = (&self.blocks[i], &self.refresh[i]);
            let refreshed = r.last_good().map(|g| {
                let (mats, meta) = b.export_refreshed(&g.value);
                for (name, m) in mats {
                    let name = format!("{i}.{name}");
                    match to_state(be, &m) {
                        StateTensor::F32(t) => {
                            packet
                                .f32s
                                .push((name, t.shape().to_vec(), t.data().to_vec()))
                        }
                        StateTensor::F64 { shape, data } => packet.f64s.push((name, shape, data)),
                    }
                }
                meta
            });
            metas.push(serde_json::json!({
                "refresh": r.meta(),
                "refreshed": refreshed,
                "ok": results[i].0,
                "note": results[i].1,
            }));
        }
        packet.meta = serde_json::Value::Array(metas);
        packet
    }

    /// Takes another rank's [`Driver::refresh_packet`] for blocks `owned`.
    fn take_refresh_packet(
        &mut self,
        owned: &[usize],
        mut packet: Packet,
        results: &mut [(bool, Option<Note>)],
    ) -> Result<(), String> {
        let be = self.backend.as_ref();
        let metas = match std::mem::take(&mut packet.meta) {
            serde_json::Value::Array(m) if m.len() == owned.len() => m,
            _ => return Err(format!("not one record per block of {owned:?}")),
        };
        for (&i, m) in owned.iter().zip(metas) {
            let b = &self.blocks[i];
            let refresh: RefreshMeta = serde_json::from_value(m["refresh"].clone())
                .map_err(|e| format!("block {i}: {e}"))?;
            let ok = m["ok"]
                .as_bool()
                .ok_or_else(|| format!("block {i}: no outcome"))?;
            let note: Option<Note> =
                serde_json::from_value(m["note"].clone()).map_err(|e| format!("block {i}: {e}"))?;
            let mut take = |name: &str, shape: &[usize]| -> Result<Mat, OptimError> {
                let key = format!("{i}.{name}");
                let bad = |detail: String| OptimError::BadState { detail };
                if let Some(k) = packet.f64s.iter().position(|t| t.0 == key) {
                    let (_, s, data) = packet.f64s.swap_remove(k);
                    if s != shape {
                        return Err(bad(format!("{key}: shape {s:?}, expected {shape:?}")));
                    }
                    return Ok(from_state(be, StateTensor::F64 { shape: s, data }));
                }
                let k = packet
                    .f32s
                    .iter()
                    .position(|t| t.0 == key)
                    .ok_or_else(|| bad(format!("{key} missing")))?;
                let (_, s, data) = packet.f32s.swap_remove(k);
                if s != shape {
                    return Err(bad(format!("{key}: shape {s:?}, expected {shape:?}")));
                }
                Ok(from_state(be, StateTensor::F32(Tensor::from_vec(data, &s))))
            };
            let value = match &m["refreshed"] {
                serde_json::Value::Null => None,
                rm => Some(
                    b.import_refreshed(be, rm, &mut take)
                        .map_err(|e| format!("block {i}: {e}"))?,
                ),
            };
            self.refresh[i] = Refreshing::restore(refresh, value);
            results[i] = (ok, note);
        }
        Ok(())
    }

    /// Stage 2: every block with statistics refreshes under the failure policy, in parallel;
    /// in data-parallel training, on its owner rank only, which broadcasts the outcome.
    fn refresh_all(&mut self, report: &mut StepReport) {
        let be = self.backend.as_ref();
        let lambda = self.damping as f64;
        let policy = self.config.refresh.failure;
        // Split: each block on its owner, then broadcast. Replicated (or one process): every
        // block here, as rank 0 of one.
        let shard = self.shard.clone().filter(|s| s.splits_refreshes());
        let (owners, me) = self.owners_on(shard.as_ref());
        let mut results: Vec<(bool, Option<Note>)> = self
            .blocks
            .par_iter()
            .zip(self.refresh.par_iter_mut())
            .zip(&owners)
            .map(|((b, r), &owner)| {
                if !b.has_statistics() || owner != me {
                    return (false, None);
                }
                r.refresh(&policy, &b.layout().path, lambda, |d| b.refresh(be, d))
            })
            .collect();
        self.computed_refreshes += self
            .blocks
            .iter()
            .zip(&owners)
            .filter(|(b, o)| b.has_statistics() && **o == me)
            .count() as u64;
        if let Some(shard) = shard {
            let t = Instant::now();
            self.share_refreshes(&shard, &owners, &mut results);
            report.share_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        let be = self.backend.as_ref();
        report.refreshed = results.iter().any(|(ok, _)| *ok);
        if be.delegates_eigh()
            && self
                .blocks
                .iter()
                .any(|b| b.uses_eigh() && b.has_statistics())
        {
            report
                .notes
                .push(Note::EighDelegated { backend: be.name() });
        }
        report
            .notes
            .extend(results.into_iter().filter_map(|(_, n)| n));
    }

    /// Stage 3: each block's gradient `v` (plus the L2 term under the quadratic model) and its
    /// direction `u`, when the block has a usable refreshed result. The directions come back
    /// from the backend in one read-back, with the statistics' finiteness checks when they are
    /// still to settle (`stats`).
    fn precondition_all(
        &mut self,
        params: &ParamStore,
        grads: &Gradients,
        stats: Option<Vec<StatsOutcome>>,
        report: &mut StepReport,
    ) -> Vec<Option<BlockUpdate>> {
        let cfg = &self.config;
        let quadratic = cfg.step.rule == StepRule::QuadraticModel;
        let wd = cfg.step.weight_decay.coefficient;
        let policy = &cfg.refresh.failure;
        let mut fallback_notes = Vec::new();
        // With the directions split, each block's is computed by its refresh's owner only and
        // broadcast (KAISA's gradient workers at a fraction 1/p); otherwise every rank computes
        // every block's.
        let split = self.shard.clone().filter(|s| s.splits_directions());
        let (owners, me) = self.owners_on(split.as_ref());
        // Block after block, for the same reason as the statistics (194 -> 161 ms).
        let staged: Vec<Option<(Tensor, Option<Mat>)>> = self
            .blocks
            .iter()
            .zip(&self.refresh)
            .zip(&owners)
            .map(|((b, r), &owner)| {
                let info = b.layout();
                let mut v = joined_gradient(info, params, grads)?;
                if quadratic && wd != 0.0 {
                    // The paper's h includes the L2 term: precondition its gradient too.
                    let theta =
                        info.join(params.get(info.weight), info.bias.map(|id| params.get(id)));
                    v = v.add(&theta.scale(wd));
                }
                // Another rank's block: whether it has a direction is known here too (every
                // rank holds the refreshed results), the direction comes from its owner.
                let u = (owner == me)
                    .then(|| self.direction_on_backend(b, r, &v))
                    .flatten();
                let usable = r.usable(policy).is_some();
                if !usable && let Some(n) = r.fallback_note(policy, &info.path) {
                    fallback_notes.push(n);
                }
                Some((v, u))
            })
            .collect();
        let on_backend: Vec<&Mat> = staged
            .iter()
            .flatten()
            .filter_map(|(_, u)| u.as_ref())
            .collect();
        let checks = stats
            .as_ref()
            .map_or_else(Vec::new, |o| self.stats_checks(o));
        let (directions, verdicts) = self.backend.read_back(&on_backend, &checks);
        drop(checks);
        if let Some(outcomes) = stats {
            self.settle(outcomes, &verdicts, report);
        }
        report.notes.extend(fallback_notes);
        let mut directions = directions.into_iter();
        let mut updates: Vec<Option<BlockUpdate>> = staged
            .into_iter()
            .map(|s| {
                let (v, u) = s?;
                let u = u.map(|_| directions.next().expect("a direction per block"));
                Some(BlockUpdate { u, v })
            })
            .collect();
        if let Some(shard) = split {
            self.share_directions(&shard, &owners, &mut updates);
        }
        updates
    }

    /// Every owner broadcasts the directions it computed (the blocks it owns that have a
    /// usable refresh, which every rank can tell), and every other rank takes them: afterwards
    /// each rank holds every block's direction, the owner's bits.
    fn share_directions(
        &self,
        shard: &Shard,
        owners: &[usize],
        updates: &mut [Option<BlockUpdate>],
    ) {
        let comm = shard.comm();
        let me = comm.rank();
        let policy = &self.config.refresh.failure;
        for root in 0..comm.size() {
            let sent: Vec<usize> = (0..updates.len())
                .filter(|&i| {
                    owners[i] == root
                        && updates[i].is_some()
                        && self.refresh[i].usable(policy).is_some()
                })
                .collect();
            if sent.is_empty() {
                continue;
            }
            let mut bytes = if root == me {
                let mut packet = Packet::default();
                for &i in &sent {
                    let u = updates[i]
                        .as_ref()
                        .and_then(|up| up.u.as_ref())
                        .expect("an owner computes the direction of a usable block");
                    packet
                        .f32s
                        .push((i.to_string(), u.shape().to_vec(), u.data().to_vec()));
                }
                packet.encode()
            } else {
                Vec::new()
            };
            comm.broadcast_bytes(&mut bytes, root);
            if root == me {
                continue;
            }
            let packet = Packet::decode(&bytes)
                .unwrap_or_else(|e| panic!("Driver: rank {root}'s directions: {e}"));
            assert_eq!(
                packet.f32s.len(),
                sent.len(),
                "Driver: rank {root} sent {} directions for blocks {sent:?}",
                packet.f32s.len()
            );
            for (&i, (name, shape, data)) in sent.iter().zip(packet.f32s) {
                assert_eq!(
                    name,
                    i.to_string(),
                    "Driver: rank {root}'s directions out of order"
                );
                if let Some(up) = updates[i].as_mut() {
                    up.u = Some(Tensor::from_vec(data, &shape));
                }
            }
        }
    }

    /// The preconditioned direction `u` of each parameter of the blocks that have one, split
    /// from the `W_aug` layout (with the gradient `v` too when `with_grad`), and the
    /// parameters that take the fallback rule instead (those outside any block and those of
    /// blocks without a usable refresh).
    #[allow(clippy::type_complexity)]
    fn per_parameter(
        &self,
        params: &ParamStore,
        updates: &[Option<BlockUpdate>],
        with_grad: bool,
    ) -> (Vec<(ParamId, Tensor, Option<Tensor>)>, Vec<ParamId>) {
        let mut out = Vec::new();
        let mut fallback_ids: Vec<ParamId> = self.outside.clone();
        for (b, up) in self.blocks.iter().zip(updates) {
            let info = b.layout();
            let Some(up) = up else { continue };
            let Some(u) = &up.u else {
                fallback_ids.push(info.weight);
                fallback_ids.extend(info.bias);
                continue;
            };
            let wshape = params.get(info.weight).shape();
            let (uw, ub) = info.split(u, wshape);
            let (vw, vb) = if with_grad {
                let (vw, vb) = info.split(&up.v, wshape);
                (Some(vw), vb)
            } else {
                (None, None)
            };
            out.push((info.weight, uw, vw));
            if let (Some(id), Some(ub)) = (info.bias, ub) {
                out.push((id, ub, vb));
            }
        }
        (out, fallback_ids)
    }

    /// Runs `apply`, which writes the step into the parameters, the velocity and the fallback
    /// rule's state, all or nothing: if it fails, or leaves a parameter that has a gradient
    /// holding NaN or an infinity (an overflow), the parameters, the velocity and the fallback
    /// state are put back as they were and the step is refused. The snapshot costs no copy up
    /// front: tensors share their storage until `apply` writes them.
    fn committed(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        lr: f32,
        apply: impl FnOnce(&mut Self, &mut ParamStore) -> Result<(), OptimError>,
    ) -> Result<(), OptimError> {
        let saved = (
            params.clone(),
            self.velocity.bufs.clone(),
            self.adam.clone(),
        );
        let overflow = match apply(self, params) {
            Ok(()) => grads
                .params()
                .find(|&(id, _)| !params.get(id).all_finite())
                .map(|(id, _)| OptimError::NonFiniteUpdate {
                    param: params.name(id).to_string(),
                    lr,
                }),
            Err(e) => Some(e),
        };
        match overflow {
            None => Ok(()),
            Some(e) => {
                (*params, self.velocity.bufs, self.adam) = saved;
                Err(e)
            }
        }
    }

    /// The first-order fallback rule on `ids`.
    fn fallback_step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        ids: &[ParamId],
        lr: f32,
    ) -> Result<(), OptimError> {
        let step = self.config.step;
        match &mut self.adam {
            Some(adam) => {
                let mut g: Vec<Option<Tensor>> = vec![None; params.len()];
                for &id in ids {
                    g[id.index()] = grads.get(id).cloned();
                }
                adam.step(params, &Gradients::from_params(g), &Captures::new())?;
            }
            None => {
                for &id in ids {
                    let Some(g) = grads.get(id) else { continue };
                    let slot = self.slot_of[&id];
                    apply_direction(
                        params.get_mut(id).data_mut(),
                        g.data(),
                        self.velocity.bufs[slot].data_mut(),
                        lr,
                        step.momentum,
                        step.weight_decay,
                    );
                }
            }
        }
        Ok(())
    }

    /// The paper's step: `delta = alpha Delta + mu delta_prev` minimizing the quadratic model
    /// under the exact mini-batch Fisher (or the blocks' own curvature without `products`),
    /// for the blocks with a direction; the fallback rule for the rest.
    fn quadratic_step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        updates: &[Option<BlockUpdate>],
        products: Option<&dyn CurvatureProducts>,
        report: &mut StepReport,
    ) -> Result<(), OptimError> {
        let cfg = self.config;
        let n = params.len();
        let mut proposal: Vec<Option<Tensor>> = vec![None; n];
        let mut grad: Vec<Option<Tensor>> = vec![None; n];
        let (per_param, fallback_ids) = self.per_parameter(params, updates, true);
        for (id, u, v) in per_param {
            proposal[id.index()] = Some(u.scale(-1.0));
            grad[id.index()] = v;
        }
        let ids: Vec<ParamId> = params
            .ids()
            .filter(|id| proposal[id.index()].is_some())
            .collect();
        let mut previous: Vec<Option<Tensor>> = vec![None; n];
        for id in &ids {
            previous[id.index()] = Some(self.velocity.bufs[self.slot_of[id]].clone());
        }
        let has_previous = previous
            .iter()
            .flatten()
            .any(|t| t.data().iter().any(|&x| x != 0.0));
        let dirs: Vec<&[Option<Tensor>]> = if has_previous {
            vec![&proposal, &previous]
        } else {
            vec![&proposal]
        };
        let k = dirs.len();
        let gram = match products {
            Some(p) => p.gram(&dirs),
            None => self.block_gram(params, &dirs),
        };
        let lambda = (self.damping + cfg.step.weight_decay.coefficient) as f64;
        let inner = |a: &[Option<Tensor>], b: &[Option<Tensor>]| -> f64 {
            a.iter()
                .zip(b)
                .filter_map(|(x, y)| Some(dot(x.as_ref()?, y.as_ref()?)))
                .sum()
        };
        let mut m = [[0.0f64; 2]; 2];
        let mut rhs = [0.0f64; 2];
        for i in 0..k {
            rhs[i] = -inner(&grad, dirs[i]);
            for j in 0..k {
                m[i][j] = gram[i * k + j] + lambda * inner(dirs[i], dirs[j]);
            }
        }
        let (alpha, mu) = match solve_model(m, rhs, k) {
            Some(x) => x,
            None => {
                report.notes.push(Note::ModelRejected { gram });
                (0.0, 0.0)
            }
        };
        // M(delta) - M(0) at the minimizer: 1/2 (alpha, mu) . (grad^T Delta, grad^T delta_prev).
        let predicted = -0.5 * (alpha * rhs[0] + mu * rhs[1]);
        // The previous steps are rewritten in place below: release the shared copies first.
        drop(dirs);
        drop(previous);
        for id in &ids {
            let slot = self.slot_of[id];
            let delta = proposal[id.index()].as_ref().expect("proposal of a block");
            let prev = self.velocity.bufs[slot].data_mut();
            let p = params.get_mut(*id).data_mut();
            for ((p, v), &d) in p.iter_mut().zip(prev.iter_mut()).zip(delta.data()) {
                let step = alpha as f32 * d + mu as f32 * *v;
                *v = step;
                *p += step;
            }
        }
        let lr = step_lr(&cfg.step.schedule, self.step)?;
        self.fallback_step(params, grads, &fallback_ids, lr)?;
        self.predicted = self.adapts_now().then_some(predicted);
        report.lr = alpha as f32;
        report.momentum = Some(mu as f32);
        Ok(())
    }

    /// The Gram matrix of `dirs` under the blocks' own curvature (block-diagonal), its terms
    /// reduced in one read-back.
    fn block_gram(&self, params: &ParamStore, dirs: &[&[Option<Tensor>]]) -> Vec<f64> {
        let be = self.backend.as_ref();
        let k = dirs.len();
        let mut terms = Vec::new();
        for b in &self.blocks {
            let info = b.layout();
            let wshape = params.get(info.weight).shape();
            let joined: Vec<Option<_>> = dirs
                .iter()
                .map(|d| {
                    let w = d.get(info.weight.index())?.as_ref()?;
                    let zero = info.bias.map(|id| Tensor::zeros(params.get(id).shape()));
                    let bias = info
                        .bias
                        .and_then(|id| d.get(id.index())?.as_ref())
                        .or(zero.as_ref());
                    debug_assert_eq!(w.shape(), wshape);
                    Some(be.upload(&info.join(w, bias)))
                })
                .collect();
            for i in 0..k {
                for j in i..k {
                    if let (Some(x), Some(y)) = (&joined[i], &joined[j]) {
                        terms.push(((i, j), Term::of(b, be, x, y)));
                    }
                }
            }
        }
        let values = Term::values(be, terms.iter().map(|(_, t)| t));
        let mut gram = vec![0.0f64; k * k];
        for (((i, j), _), v) in terms.iter().zip(values) {
            gram[i * k + j] += v;
            if i != j {
                gram[j * k + i] += v;
            }
        }
        gram
    }

    /// `M(δ) - M(0) = ∇h^T δ + 1/2 δ^T (F + λ I) δ` for the step just taken (`δ = new - old`),
    /// with `F` the blocks' block-diagonal curvature (zero outside blocks), its block terms
    /// reduced in one read-back.
    fn predicted_change(&self, old: &ParamStore, new: &ParamStore, grads: &Gradients) -> f64 {
        let be = self.backend.as_ref();
        let delta = |id: ParamId| new.get(id).sub(old.get(id));
        let mut lin = 0.0f64;
        let mut sq = 0.0f64;
        for (id, g) in grads.params() {
            let d = delta(id);
            lin += dot(g, &d);
            sq += dot(&d, &d);
        }
        let terms: Vec<Term> = self
            .blocks
            .iter()
            .map(|b| {
                let info = b.layout();
                let dw = delta(info.weight);
                let db = info.bias.map(delta);
                let d = be.upload(&info.join(&dw, db.as_ref()));
                Term::of(b, be, &d, &d)
            })
            .collect();
        let quad: f64 = Term::values(be, terms.iter()).into_iter().sum();
        lin + 0.5 * (quad + self.damping as f64 * sq)
    }

    /// The Levenberg-Marquardt hand-back: the loss before and after the last step.
    fn reduction(&mut self, before: f32, after: f32) {
        let (Some(pred), Some(lm)) = (self.predicted.take(), self.config.damping.adaptive) else {
            return;
        };
        let actual = (after - before) as f64;
        // A model predicting no decrease cannot be trusted: treat as a poor step.
        let rho = if pred < 0.0 {
            actual / pred
        } else {
            f64::NEG_INFINITY
        };
        self.last_rho = Some(rho as f32);
        if rho > 0.75 {
            self.damping *= lm.decay;
        } else if rho < 0.25 {
            self.damping /= lm.decay;
        }
        self.damping = self.damping.clamp(lm.min_damping, lm.max_damping);
    }

    fn export(&self) -> OptimState {
        let be = self.backend.as_ref();
        let kind = self.kind;
        let mut s = OptimState::default();
        self.velocity.export(&format!("{kind}.velocity"), &mut s);
        let mut blocks = Vec::new();
        for (b, r) in self.blocks.iter().zip(&self.refresh) {
            let p = &b.layout().path;
            for (name, m) in b.statistics() {
                put(be, &mut s, format!("{kind}.{p}.{name}"), m);
            }
            let refreshed = r.last_good().map(|g| {
                let (mats, meta) = b.export_refreshed(&g.value);
                for (name, m) in mats {
                    put(be, &mut s, format!("{kind}.{p}.{name}"), &m);
                }
                meta
            });
            blocks.push(BlockMeta {
                path: p.clone(),
                updates: b.updates(),
                refresh: r.meta(),
                refreshed,
            });
        }
        let adam = self.adam.as_ref().map(|a| {
            let st = a.state();
            for (n, t) in st.tensors {
                s.tensors.insert(format!("fallback.{n}"), t);
            }
            st.meta
        });
        s.meta = serde_json::to_value(DriverMeta {
            kind: kind.into(),
            structure: self.structure.clone(),
            config: self.config,
            step: self.step,
            damping: self.damping,
            predicted: self.predicted,
            blocks,
            adam,
        })
        .expect("the driver's metadata serializes");
        s
    }

    /// Restores a state: structural settings must match this driver's (else an error names
    /// the field); tunables stay as configured here; adapted state (counters, the boosts, the
    /// Levenberg-Marquardt damping) comes from the file. All or nothing.
    fn import(&mut self, mut state: OptimState) -> Result<(), OptimError> {
        let kind = self.kind;
        let meta: DriverMeta = state.meta_as(kind)?;
        let bad = |detail: String| OptimError::BadState { detail };
        if meta.kind != kind {
            return Err(bad(format!("state of {:?}, not {kind}", meta.kind)));
        }
        check_structure(&meta.structure, &self.structure)?;
        if meta.config.step.fallback_kind() != self.config.step.fallback_kind() {
            return Err(bad(format!(
                "structural field step.fallback differs: saved {}, this optimizer {}",
                meta.config.step.fallback_kind(),
                self.config.step.fallback_kind()
            )));
        }
        positive("damping (adapted)", meta.damping)?;
        if meta.blocks.len() != self.blocks.len() {
            return Err(bad(format!(
                "{} blocks saved, this model has {}",
                meta.blocks.len(),
                self.blocks.len()
            )));
        }
        let be = self.backend.as_ref();
        let velocity = self
            .velocity
            .import(&format!("{kind}.velocity"), &mut state)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut refresh = Vec::with_capacity(self.blocks.len());
        for (b, m) in self.blocks.iter().zip(&meta.blocks) {
            let p = &b.layout().path;
            if &m.path != p {
                return Err(bad(format!(
                    "block {:?} saved where this model has {p:?}",
                    m.path
                )));
            }
            let mut take = |name: &str, shape: &[usize]| -> Result<Mat, OptimError> {
                let t = state.take_any(&format!("{kind}.{p}.{name}"), shape)?;
                Ok(from_state(be, t))
            };
            let mut nb = b.fresh();
            if m.updates > 0 {
                nb.restore_statistics(be, m.updates, &mut take)?;
            }
            let value = match (&m.refreshed, m.refresh.good) {
                (Some(rm), Some(_)) => Some(b.import_refreshed(be, rm, &mut take)?),
                (None, None) => None,
                _ => {
                    return Err(bad(format!(
                        "{p}: refreshed result and its record disagree"
                    )));
                }
            };
            if !m.refresh.boost.is_finite() || m.refresh.boost < 1.0 {
                return Err(bad(format!(
                    "{p}: boost {} is not at least 1",
                    m.refresh.boost
                )));
            }
            blocks.push(nb);
            refresh.push(Refreshing::restore(m.refresh, value));
        }
        let adam = match (&self.adam, meta.adam) {
            (Some(a), Some(am)) => {
                let mut inner = OptimState {
                    tensors: state
                        .tensors
                        .iter()
                        .filter_map(|(n, t)| {
                            n.strip_prefix("fallback.")
                                .map(|k| (k.to_string(), t.clone()))
                        })
                        .collect(),
                    meta: am,
                    ..Default::default()
                };
                let mut fresh = Adam::new_like(a);
                fresh.load_state(std::mem::take(&mut inner))?;
                Some(fresh)
            }
            (None, None) => None,
            _ => return Err(bad("fallback rule differs from the saved one".into())),
        };
        self.velocity = velocity;
        self.blocks = blocks;
        self.refresh = refresh;
        self.adam = adam;
        self.step = meta.step;
        self.damping = if self.config.damping.adaptive.is_some() {
            meta.damping
        } else {
            self.config.damping.lambda
        };
        self.predicted = meta.predicted;
        Ok(())
    }
}

/// Compares two structure objects field by field, naming the first that differs.
pub(crate) fn check_structure(
    saved: &serde_json::Value,
    here: &serde_json::Value,
) -> Result<(), OptimError> {
    let fields = |v: &serde_json::Value| -> BTreeMap<String, serde_json::Value> {
        v.as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let (s, h) = (fields(saved), fields(here));
    for (k, hv) in &h {
        match s.get(k) {
            Some(sv) if sv == hv => {}
            sv => {
                return Err(OptimError::BadState {
                    detail: format!(
                        "structural field {k} differs: saved {}, this optimizer {hv}",
                        sv.map_or("nothing".to_string(), |v| v.to_string())
                    ),
                });
            }
        }
    }
    if let Some(k) = s.keys().find(|k| !h.contains_key(*k)) {
        return Err(OptimError::BadState {
            detail: format!("structural field {k} saved, unknown to this optimizer"),
        });
    }
    Ok(())
}

impl<B: CurvatureBlock> Optimizer for Driver<B> {
    fn name(&self) -> &str {
        self.kind
    }

    fn steps_taken(&self) -> u64 {
        self.step
    }

    fn wants(&self) -> Wants {
        let capture: Vec<_> = self
            .blocks
            .iter()
            .filter(|b| b.wants_capture() && self.is_stats_step(b))
            .map(|b| b.layout().layer)
            .collect();
        Wants {
            fisher: (!capture.is_empty()).then_some(self.config.statistics.fisher),
            capture,
            reduction: self.adapts_now(),
            products: self.config.step.rule == StepRule::QuadraticModel,
            product_examples: self.config.step.curvature_examples,
        }
    }

    fn step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
    ) -> Result<StepReport, OptimError> {
        self.step_with(params, grads, curvature, None, None)
    }

    fn step_with_curvature(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        curvature: &Captures,
        products: &dyn CurvatureProducts,
    ) -> Result<StepReport, OptimError> {
        self.step_with(params, grads, curvature, Some(products), None)
    }

    fn observe_reduction(&mut self, before: f32, after: f32) {
        self.reduction(before, after);
    }

    fn set_shard(&mut self, shard: Option<Shard>) {
        self.shard = shard;
    }

    fn learning_rate(&self) -> f32 {
        self.config.step.schedule.base
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), OptimError> {
        positive("learning rate", lr)?;
        self.config.step.schedule.base = lr;
        Ok(())
    }

    fn state(&self) -> OptimState {
        self.export()
    }

    fn load_state(&mut self, state: OptimState) -> Result<(), OptimError> {
        self.import(state)
    }
}

/// Whether a block's statistics are due at `step` (dense and conv blocks have their own
/// periods).
fn is_due(s: &super::config::StatisticsConfig, info: &kron_layers::FisherBlock, step: u64) -> bool {
    let period = if info.is_conv() {
        s.conv_period
    } else {
        s.period
    };
    step.is_multiple_of(period.max(1))
}

/// A block's gradient joined into the `W_aug` layout (a missing bias gradient as zeros), or
/// `None` when the weight has no gradient.
fn joined_gradient(
    info: &kron_layers::FisherBlock,
    params: &ParamStore,
    grads: &Gradients,
) -> Option<Tensor> {
    let gw = grads.get(info.weight)?;
    let gb = info.bias.and_then(|id| grads.get(id));
    let zero;
    let gb = match (info.bias, gb) {
        (Some(id), None) => {
            zero = Tensor::zeros(params.get(id).shape());
            Some(&zero)
        }
        (_, g) => g,
    };
    Some(info.join(gw, gb))
}

/// The minimizer `(alpha, mu)` of `1/2 x^T m x - rhs^T x` over the first `k` (1 or 2)
/// coordinates, when `m` is positive definite there and everything is finite.
fn solve_model(m: [[f64; 2]; 2], rhs: [f64; 2], k: usize) -> Option<(f64, f64)> {
    let finite = m.iter().flatten().chain(&rhs).all(|v| v.is_finite());
    if !finite || m[0][0] <= 0.0 {
        return None;
    }
    if k == 1 {
        return Some((rhs[0] / m[0][0], 0.0));
    }
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    if det <= 1e-12 * m[0][0] * m[1][1] {
        // Parallel directions: the proposal alone.
        return Some((rhs[0] / m[0][0], 0.0));
    }
    Some((
        (rhs[0] * m[1][1] - rhs[1] * m[0][1]) / det,
        (m[0][0] * rhs[1] - m[1][0] * rhs[0]) / det,
    ))
}

/// `sum_i a_i b_i` in `f64`.
pub(crate) fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.data()
        .iter()
        .zip(b.data())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}
