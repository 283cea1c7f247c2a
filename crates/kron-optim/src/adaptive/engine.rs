//! The engine every Kronecker-factored adaptive method runs on: shapes and blocks, the
//! statistics and refresh schedules, the failure policy, grafting, momentum, the
//! all-or-nothing commit and checkpoints.

use std::collections::BTreeMap;
use std::time::Instant;

use kron_autodiff::{Gradients, ParamId, ParamStore, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::AdaptiveConfig;
use super::rule::FactorRule;
use super::shape::{self, BlockSpec, Plan};
use crate::backend::{Backend, CpuBackend, Mat, gather_elements};
use crate::comm::{Packet, Shard, assign_by_cost};
use crate::curvature::block::{from_state, put, to_state};
use crate::curvature::driver::check_structure;
use crate::curvature::{
    Grafting, Note, RefreshMeta, RefreshOk, Refreshing, StatsSkip, apply_direction,
};
use crate::error::OptimError;
use crate::first_order::Slots;
use crate::optimizer::{
    Captures, OptimState, Optimizer, StateTensor, StepReport, Tensor64, check_finite,
};
use crate::validate::step_lr;

/// One block of a parameter: its range, one statistic per axis and the roots kept under the
/// failure policy.
#[derive(Clone)]
struct Block {
    spec: BlockSpec,
    dims: Vec<usize>,
    stats: Vec<Mat>,
    roots: Vec<Refreshing<Mat>>,
    /// Statistics updates per axis.
    counts: Vec<u64>,
    /// Statistics updates of the block (any axis).
    updates: u64,
    /// Axes updated since their last successful refresh.
    dirty: Vec<bool>,
}

/// A parameter's plan and blocks.
#[derive(Clone)]
struct Slot {
    id: ParamId,
    name: String,
    dims: Vec<usize>,
    blocks: Vec<Block>,
    /// The first grafting slot of the parameter (one per block; one for a diagonal one).
    graft_slot: usize,
}

impl Slot {
    fn label(&self, j: usize, axis: usize) -> String {
        if self.blocks.len() == 1 {
            format!("{} axis {axis}", self.name)
        } else {
            format!("{}[{j}] axis {axis}", self.name)
        }
    }
}

/// A Kronecker-factored adaptive optimizer: the engine with one method's [`FactorRule`].
/// [`Shampoo`](super::Shampoo), [`KrAdagradStar`](super::KrAdagradStar) and
/// [`KrAdagrad`](super::KrAdagrad) are this type with their rules.
///
/// Works on any model's parameters and needs no captures: a parameter of order 2 or more is
/// read as its [`BlockingConfig`](super::BlockingConfig) says and split into blocks, each with
/// one statistic per axis; 1-D parameters (biases) take the grafted diagonal rule.
pub struct Adaptive<R: FactorRule> {
    rule: R,
    config: AdaptiveConfig,
    backend: Box<dyn Backend>,
    slots: Vec<Slot>,
    grafting: Option<Grafting>,
    velocity: Slots,
    slot_of: BTreeMap<ParamId, usize>,
    step: u64,
    /// This rank's shard in data-parallel training.
    shard: Option<Shard>,
    /// Roots this rank has computed itself.
    computed_roots: u64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    kind: String,
    structure: serde_json::Value,
    step: u64,
    params: Vec<ParamMeta>,
    graft_steps: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct ParamMeta {
    name: String,
    blocks: Vec<BlockMeta>,
}

#[derive(Serialize, Deserialize)]
struct BlockMeta {
    counts: Vec<u64>,
    updates: u64,
    dirty: Vec<bool>,
    roots: Vec<RefreshMeta>,
}

/// What one block's stages produced: its direction, notes, statistics updated, root refreshed,
/// and (in data-parallel training) the outcome and notes of each axis's refresh when this rank
/// ran it, kept apart to share them.
type BlockStep = (Option<Vec<f32>>, Vec<Note>, bool, bool, Vec<AxisRefresh>);

/// Whether an axis's refresh this rank ran succeeded, and its notes.
type AxisRefresh = Option<(bool, Vec<Note>)>;

/// Which stages a pass over the blocks runs: statistics and refreshes when due, the
/// refreshes of the axes `owned` says (all when `None`), and the preconditioning.
#[derive(Clone, Copy)]
struct Phases<'a> {
    stats: bool,
    refresh: bool,
    precondition: bool,
    owned: Option<&'a [Vec<bool>]>,
}

impl Phases<'_> {
    const ALL: Phases<'static> = Phases {
        stats: true,
        refresh: true,
        precondition: true,
        owned: None,
    };
}

/// What one parameter's stages produced at a step.
struct ParamStep {
    /// Per block: the preconditioned direction, when usable.
    dirs: Vec<Option<Vec<f32>>>,
    notes: Vec<Note>,
    stats: bool,
    refreshed: bool,
    /// Per block and axis, the refreshes this rank ran (data-parallel passes only).
    axis_notes: Vec<Vec<AxisRefresh>>,
}

impl<R: FactorRule + Default> Adaptive<R> {
    /// The optimizer over every parameter of `params`, its matrices on a CPU backend of the
    /// configured precision.
    ///
    /// # Errors
    /// [`OptimError::Config`] naming a field `config` gets wrong.
    pub fn new(params: &ParamStore, config: AdaptiveConfig) -> Result<Self, OptimError> {
        let be = CpuBackend::new(config.refresh.precision);
        Self::with_backend(params, config, Box::new(be))
    }

    /// The optimizer with its matrices on `backend` (whose precision must be the configured
    /// one).
    ///
    /// # Errors
    /// [`OptimError::Config`] naming the field at fault.
    pub fn with_backend(
        params: &ParamStore,
        config: AdaptiveConfig,
        backend: Box<dyn Backend>,
    ) -> Result<Self, OptimError> {
        Self::with_rule(R::default(), params, config, backend)
    }
}

impl<R: FactorRule> Adaptive<R> {
    /// The optimizer with an explicit rule value.
    ///
    /// # Errors
    /// [`OptimError::Config`] naming the field at fault.
    pub fn with_rule(
        rule: R,
        params: &ParamStore,
        config: AdaptiveConfig,
        backend: Box<dyn Backend>,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        rule.check(&config)?;
        if backend.precision() != config.refresh.precision {
            return Err(OptimError::Config {
                field: "refresh.precision".into(),
                detail: format!(
                    "is {:?} but the backend {} keeps {:?}",
                    config.refresh.precision,
                    backend.name(),
                    backend.precision()
                ),
            });
        }
        let ids: Vec<ParamId> = params.ids().collect();
        let be = backend.as_ref();
        let mut slots = Vec::with_capacity(ids.len());
        let mut sizes = Vec::new();
        for &id in &ids {
            let t = params.get(id);
            let graft_slot = sizes.len();
            let (dims, blocks) = match shape::plan(t.shape(), &config.blocking) {
                Plan::Diagonal => {
                    sizes.push(t.numel());
                    (vec![], vec![])
                }
                Plan::Factored { dims, blocks } => {
                    let blocks: Vec<Block> = blocks
                        .into_iter()
                        .map(|spec| {
                            let bd = spec.dims();
                            sizes.push(spec.len());
                            Block {
                                stats: bd.iter().map(|&d| rule.initial(be, d, &config)).collect(),
                                roots: bd.iter().map(|_| Refreshing::default()).collect(),
                                counts: vec![0; bd.len()],
                                updates: 0,
                                dirty: vec![false; bd.len()],
                                dims: bd,
                                spec,
                            }
                        })
                        .collect();
                    (dims, blocks)
                }
            };
            slots.push(Slot {
                id,
                name: params.name(id).to_string(),
                dims,
                blocks,
                graft_slot,
            });
        }
        Ok(Adaptive {
            grafting: config.graft.map(|g| Grafting::new(g, &sizes)),
            velocity: Slots::zeros(params, &ids),
            slot_of: ids.iter().enumerate().map(|(i, &id)| (id, i)).collect(),
            rule,
            config,
            backend,
            slots,
            step: 0,
            shard: None,
            computed_roots: 0,
        })
    }

    /// Roots this rank has computed itself. In data-parallel training each root is computed
    /// by its owner only ([`Adaptive::root_owners`]) and broadcast.
    pub fn computed_roots(&self) -> u64 {
        self.computed_roots
    }

    /// The rank that computes each root, by parameter, block and axis: assigned greedily by
    /// cost (`d^3` for an axis of size `d`) over all of them. All 0 on one process.
    pub fn root_owners(&self) -> Vec<Vec<Vec<usize>>> {
        let size = self.shard.as_ref().map_or(1, |s| s.comm().size());
        let costs: Vec<f64> = self
            .slots
            .iter()
            .flat_map(|s| s.blocks.iter())
            .flat_map(|b| b.dims.iter().map(|&d| (d as f64).powi(3)))
            .collect();
        let mut flat = assign_by_cost(&costs, size).into_iter();
        self.slots
            .iter()
            .map(|s| {
                s.blocks
                    .iter()
                    .map(|b| {
                        b.dims
                            .iter()
                            .map(|_| flat.next().expect("an owner"))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// The configuration.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// Replaces the configuration's tunables (validated first; on error nothing changes).
    /// Structural fields (precision, blocking, graft kind, root method) must stay.
    ///
    /// # Errors
    /// [`OptimError::Config`] naming the field.
    pub fn set_config(&mut self, config: AdaptiveConfig) -> Result<(), OptimError> {
        config.validate()?;
        self.rule.check(&config)?;
        check_structure(&self.structure_of(&config), &self.structure())?;
        self.config = config;
        Ok(())
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The statistics of a parameter's block `block` (row-major block order), one per axis,
    /// exactly as kept (`f64` statistics stay `f64`); `None` for a parameter that has none.
    pub fn statistics(&self, param: &str, block: usize) -> Option<Vec<Tensor64>> {
        let s = self.slots.iter().find(|s| s.name == param)?;
        let b = s.blocks.get(block)?;
        Some(b.stats.iter().map(|m| self.exact(m)).collect())
    }

    /// The roots in use for a parameter's block, one per axis; `None` before each axis has a
    /// usable one.
    pub fn roots(&self, param: &str, block: usize) -> Option<Vec<Tensor64>> {
        let s = self.slots.iter().find(|s| s.name == param)?;
        let b = s.blocks.get(block)?;
        let policy = &self.config.refresh.failure;
        b.roots
            .iter()
            .map(|r| r.usable(policy).map(|r| self.exact(&r.value)))
            .collect()
    }

    /// A backend matrix on the host in its own precision.
    fn exact(&self, m: &Mat) -> Tensor64 {
        match to_state(self.backend.as_ref(), m) {
            StateTensor::F64 { shape, data } => {
                Tensor64::new(data, &shape).expect("a matrix fills its shape")
            }
            StateTensor::F32(t) => {
                Tensor64::new(t.data().iter().map(|&x| x as f64).collect(), t.shape())
                    .expect("a matrix fills its shape")
            }
        }
    }

    /// The interpreted shape of a parameter (empty for the diagonal rule) and its blocks'
    /// dimensions.
    pub fn layout(&self, param: &str) -> Option<(Vec<usize>, Vec<Vec<usize>>)> {
        let s = self.slots.iter().find(|s| s.name == param)?;
        Some((
            s.dims.clone(),
            s.blocks.iter().map(|b| b.dims.clone()).collect(),
        ))
    }

    fn structure(&self) -> serde_json::Value {
        self.structure_of(&self.config)
    }

    fn structure_of(&self, c: &AdaptiveConfig) -> serde_json::Value {
        serde_json::json!({
            "precision": format!("{:?}", c.refresh.precision),
            "blocking": c.blocking,
            "graft": c.graft.map(|g| match g {
                crate::curvature::Graft::Sgd => "sgd",
                crate::curvature::Graft::AdaGrad { .. } => "adagrad",
                crate::curvature::Graft::RmsProp { .. } => "rmsprop",
                crate::curvature::Graft::Adam { .. } => "adam",
            }),
        })
    }

    /// The stages `phases` names for every parameter with a gradient, parameters side by side;
    /// `owned` holds, per parameter, what `phases` reads of it.
    fn stages<'o>(
        &mut self,
        grads: &Gradients,
        t: u64,
        owned: &'o [Vec<Vec<bool>>],
        phases: impl Fn(&'o [Vec<bool>]) -> Phases<'o> + Sync,
    ) -> Vec<Option<ParamStep>> {
        let cfg = self.config;
        let (rule, be) = (&self.rule, self.backend.as_ref());
        self.slots
            .par_iter_mut()
            .zip(owned)
            .map(|(slot, own)| {
                let g = grads.get(slot.id)?;
                if slot.blocks.is_empty() {
                    return Some(ParamStep {
                        dirs: vec![],
                        notes: vec![],
                        stats: false,
                        refreshed: false,
                        axis_notes: vec![],
                    });
                }
                Some(Self::param_stages(rule, &cfg, be, slot, g, t, phases(own)))
            })
            .collect()
    }

    /// Hands each owner's new roots to the other ranks, owner after owner (one [`Packet`]
    /// each): the refresh state, the root in its own precision, whether the axis is still to
    /// refresh, and the refresh's notes. Every rank ends with the same roots, to the bit.
    fn share_roots(
        &mut self,
        shard: &Shard,
        owners: &[Vec<Vec<usize>>],
        steps: &mut [Option<ParamStep>],
    ) {
        let comm = shard.comm();
        let me = comm.rank();
        // Every (parameter, block, axis), in order, with its owner.
        let items: Vec<(usize, usize, usize, usize)> = owners
            .iter()
            .enumerate()
            .flat_map(|(s, blocks)| {
                blocks.iter().enumerate().flat_map(move |(j, axes)| {
                    axes.iter().enumerate().map(move |(i, &o)| (s, j, i, o))
                })
            })
            .collect();
        for root in 0..comm.size() {
            let mut bytes = Vec::new();
            if root == me {
                let be = self.backend.as_ref();
                let mut packet = Packet::default();
                let mut metas = Vec::new();
                for (k, &(s, j, i, o)) in items.iter().enumerate() {
                    let attempted = steps[s]
                        .as_ref()
                        .filter(|_| o == me)
                        .and_then(|st| st.axis_notes.get(j)?.get(i)?.as_ref());
                    let Some((ok, notes)) = attempted else {
                        continue;
                    };
                    let b = &self.slots[s].blocks[j];
                    if let Some(g) = b.roots[i].last_good() {
                        match to_state(be, &g.value) {
                            StateTensor::F32(t) => {
                                packet
                                    .f32s
                                    .push((k.to_string(), t.shape().to_vec(), t.into_vec()))
                            }
                            StateTensor::F64 { shape, data } => {
                                packet.f64s.push((k.to_string(), shape, data))
                            }
                        }
                    }
                    metas.push(serde_json::json!({
                        "item": k,
                        "refresh": b.roots[i].meta(),
                        "dirty": b.dirty[i],
                        "ok": ok,
                        "notes": notes,
                    }));
                    self.computed_roots += 1;
                }
                packet.meta = serde_json::Value::Array(metas);
                bytes = packet.encode();
            }
            comm.broadcast_bytes(&mut bytes, root);
            let packet = Packet::decode(&bytes)
                .unwrap_or_else(|e| panic!("Adaptive: rank {root}'s roots: {e}"));
            let serde_json::Value::Array(metas) = packet.meta else {
                panic!("Adaptive: rank {root}'s roots: no records");
            };
            let (mut f32s, mut f64s) = (packet.f32s, packet.f64s);
            for m in metas {
                let k = m["item"].as_u64().expect("an item index") as usize;
                let (s, j, i, _) = items[k];
                let notes: Vec<Note> =
                    serde_json::from_value(m["notes"].clone()).expect("the notes parse");
                if let Some(st) = steps[s].as_mut() {
                    st.refreshed |= m["ok"].as_bool().expect("an outcome");
                    st.notes.extend(notes);
                }
                if root == me {
                    continue;
                }
                let meta: RefreshMeta =
                    serde_json::from_value(m["refresh"].clone()).expect("the refresh state parses");
                let key = k.to_string();
                let be = self.backend.as_ref();
                let value = if let Some(p) = f64s.iter().position(|t| t.0 == key) {
                    let (_, shape, data) = f64s.swap_remove(p);
                    Some(from_state(be, StateTensor::F64 { shape, data }))
                } else if let Some(p) = f32s.iter().position(|t| t.0 == key) {
                    let (_, shape, data) = f32s.swap_remove(p);
                    Some(from_state(
                        be,
                        StateTensor::F32(Tensor::from_vec(data, &shape)),
                    ))
                } else {
                    None
                };
                let b = &mut self.slots[s].blocks[j];
                b.roots[i] = Refreshing::restore(meta, value);
                b.dirty[i] = m["dirty"].as_bool().expect("a dirty flag");
            }
        }
    }

    /// Stages 1-3 of one parameter: statistics, refresh, precondition.
    #[allow(clippy::too_many_arguments)]
    fn param_stages(
        rule: &R,
        config: &AdaptiveConfig,
        be: &dyn Backend,
        slot: &mut Slot,
        g: &Tensor,
        t: u64,
        phases: Phases<'_>,
    ) -> ParamStep {
        let mut out = ParamStep {
            dirs: Vec::with_capacity(slot.blocks.len()),
            notes: vec![],
            stats: false,
            refreshed: false,
            axis_notes: vec![],
        };
        let stats_due = phases.stats && t.is_multiple_of(config.statistics_period);
        let refresh_due = phases.refresh && t.is_multiple_of(config.refresh.period);
        let labels: Vec<Vec<String>> = (0..slot.blocks.len())
            .map(|j| {
                (0..slot.blocks[j].dims.len())
                    .map(|i| slot.label(j, i))
                    .collect()
            })
            .collect();
        let dims = &slot.dims;
        // Blocks are independent: their stages (roots above all) run side by side.
        let per_block: Vec<BlockStep> = slot
            .blocks
            .par_iter_mut()
            .zip(labels)
            .enumerate()
            .map(|(j, (b, labels))| {
                Self::block_stages(
                    rule,
                    config,
                    be,
                    b,
                    &labels,
                    g,
                    dims,
                    t,
                    stats_due,
                    refresh_due,
                    phases.owned.map(|o| o[j].as_slice()),
                    phases.precondition,
                )
            })
            .collect();
        for (dir, notes, stats, refreshed, axis_notes) in per_block {
            out.dirs.push(dir);
            out.notes.extend(notes);
            out.stats |= stats;
            out.refreshed |= refreshed;
            out.axis_notes.push(axis_notes);
        }
        out
    }

    /// Stages 1-3 of one block: its direction (when usable), notes, and whether its statistics
    /// were updated and a root refreshed.
    #[allow(clippy::too_many_arguments)]
    fn block_stages(
        rule: &R,
        config: &AdaptiveConfig,
        be: &dyn Backend,
        b: &mut Block,
        labels: &[String],
        g: &Tensor,
        dims: &[usize],
        t: u64,
        stats_due: bool,
        refresh_due: bool,
        owned: Option<&[bool]>,
        apply: bool,
    ) -> BlockStep {
        let policy = config.refresh.failure;
        let eps = config.epsilon.value();
        let order = b.dims.len();
        let mut out: BlockStep = (None, vec![], false, false, vec![None; order]);
        let gb = be.upload(&Tensor::from_vec(
            shape::gather(g.data(), dims, &b.spec),
            &[b.dims[0], b.spec.len() / b.dims[0]],
        ));
        if stats_due {
            for i in rule.axes_due(&b.dims, b.updates) {
                let h = if rule.preconditioned_statistics() {
                    let others: Vec<Option<&Mat>> = (0..order)
                        .map(|a| {
                            if a == i {
                                None
                            } else {
                                b.roots[a].usable(&policy).map(|r| &r.value)
                            }
                        })
                        .collect();
                    precondition(be, &gb, &b.dims, &others)
                } else {
                    gb.clone()
                };
                let (hm, tr) = unfolding(be, &h, &b.dims, i);
                let mut s = b.stats[i].clone();
                rule.update(be, &mut s, &hm, tr, config);
                if be.is_finite(&s) {
                    b.stats[i] = s;
                    b.counts[i] += 1;
                    b.dirty[i] = true;
                    out.2 = true;
                } else {
                    out.1.push(Note::StatsSkipped {
                        block: labels[i].clone(),
                        reason: StatsSkip::Overflow,
                    });
                }
            }
            b.updates += 1;
        }
        if refresh_due {
            for i in 0..order {
                let wanted = b.counts[i] > 0 && (!rule.refresh_updated_only() || b.dirty[i]);
                if !wanted || owned.is_some_and(|o| !o[i]) {
                    continue;
                }
                let mut notes = Vec::new();
                let mut retried = false;
                let (stat, count) = (&b.stats[i], b.counts[i]);
                let (ok, note) = b.roots[i].refresh(&policy, &labels[i], eps, |e| {
                    rule.root(be, stat, order, count, e, config).map(|r| {
                        retried = r.retried_f64;
                        RefreshOk::clean(r.mat)
                    })
                });
                if ok {
                    b.dirty[i] = false;
                    out.3 = true;
                }
                if retried {
                    notes.push(Note::RetriedInF64 {
                        block: labels[i].clone(),
                    });
                }
                notes.extend(note);
                // The step's notes, or the axis's own, to share with the other ranks.
                if owned.is_some() {
                    out.4[i] = Some((ok, notes));
                } else {
                    out.1.extend(notes);
                }
            }
        }
        if !apply {
            return out;
        }
        let roots: Vec<Option<&Mat>> = b
            .roots
            .iter()
            .map(|r| r.usable(&policy).map(|r| &r.value))
            .collect();
        let usable = t >= config.start_step
            && if rule.identity_before_root() {
                roots.iter().any(Option::is_some)
            } else {
                roots.iter().all(Option::is_some)
            };
        out.0 = usable.then(|| {
            be.download(&precondition(be, &gb, &b.dims, &roots))
                .into_vec()
        });
        if t >= config.start_step {
            for (i, r) in b.roots.iter().enumerate() {
                out.1.extend(r.fallback_note(&policy, &labels[i]));
            }
        }
        out
    }
}

/// The mode-`axis` unfolding of a block (any matrix holding its elements row-major) on the
/// backend, as `(h, transposed)`: the first axis is the block itself (`d x rest`), the last its
/// transpose for free (`rest x d`), a middle one a permutation.
fn unfolding(be: &dyn Backend, t: &Mat, dims: &[usize], axis: usize) -> (Mat, bool) {
    let k = dims.len();
    let d = dims[axis];
    let rest = t.rows() * t.cols() / d.max(1);
    if axis == 0 {
        (t.reshaped(d, rest), false)
    } else if axis == k - 1 {
        (t.reshaped(rest, d), true)
    } else {
        let idx = shape::unfold_index(dims, axis);
        (gather_elements(be, t, &idx, d, rest), false)
    }
}

/// `t x_1 M_1 ... x_k M_k` for symmetric `M_i` (axes with `None` left alone) on the backend,
/// in its element type: a matrix block in two products, higher orders through unfoldings.
/// The result holds the block row-major as `dims[0] x rest`.
pub(crate) fn precondition(
    be: &dyn Backend,
    t: &Mat,
    dims: &[usize],
    mats: &[Option<&Mat>],
) -> Mat {
    let k = dims.len();
    let d0 = dims[0];
    let rest = t.rows() * t.cols() / d0.max(1);
    let mut y = t.reshaped(d0, rest);
    if k == 2 {
        if let Some(m) = mats[0] {
            y = be.gemm(1.0, m, false, &y, false);
        }
        if let Some(m) = mats[1] {
            y = be.gemm(1.0, &y, false, m, false);
        }
        return y;
    }
    for (axis, m) in mats.iter().enumerate() {
        let Some(m) = m else { continue };
        if axis == 0 {
            y = be.gemm(1.0, m, false, &y, false);
            continue;
        }
        let d = dims[axis];
        let r = d0 * rest / d;
        let u = gather_elements(be, &y, &shape::unfold_index(dims, axis), d, r);
        let p = be.gemm(1.0, m, false, &u, false);
        y = gather_elements(be, &p, &shape::fold_index(dims, axis), d0, rest);
    }
    y
}

impl<R: FactorRule> Optimizer for Adaptive<R> {
    fn name(&self) -> &str {
        R::KIND
    }

    fn steps_taken(&self) -> u64 {
        self.step
    }

    fn step(
        &mut self,
        params: &mut ParamStore,
        grads: &Gradients,
        _curvature: &Captures,
    ) -> Result<StepReport, OptimError> {
        check_finite(params, grads)?;
        let cfg = self.config;
        let lr = step_lr(&cfg.schedule, self.step)?;
        let t = self.step + 1;
        let mut report = StepReport {
            step: self.step,
            lr,
            ..Default::default()
        };
        if t.is_multiple_of(cfg.refresh.period)
            && self.backend.delegates_eigh()
            && matches!(cfg.roots, crate::adaptive::RootMethod::Eigh { .. })
        {
            report.notes.push(Note::EighDelegated {
                backend: self.backend.name(),
            });
        }
        let t0 = Instant::now();
        let shard = self.shard.clone().filter(|s| s.is_distributed());
        let steps = match shard {
            // In data-parallel training a refresh step runs in three passes: statistics and the
            // roots this rank owns; the owners' roots broadcast; the preconditioning.
            Some(shard) if t.is_multiple_of(cfg.refresh.period) && shard.splits_refreshes() => {
                let owners = self.root_owners();
                let me = shard.comm().rank();
                let owned: Vec<Vec<Vec<bool>>> = owners
                    .iter()
                    .map(|s| {
                        s.iter()
                            .map(|b| b.iter().map(|&o| o == me).collect())
                            .collect()
                    })
                    .collect();
                let phases = |o| Phases {
                    stats: true,
                    refresh: true,
                    precondition: false,
                    owned: Some(o),
                };
                let mut steps = self.stages(grads, t, &owned, phases);
                let t_share = Instant::now();
                self.share_roots(&shard, &owners, &mut steps);
                report.share_ms = t_share.elapsed().as_secs_f64() * 1e3;
                let apply = Phases {
                    stats: false,
                    refresh: false,
                    precondition: true,
                    owned: None,
                };
                let applied = self.stages(grads, t, &owned, |_| apply);
                for (s, a) in steps.iter_mut().zip(applied) {
                    if let (Some(s), Some(a)) = (s.as_mut(), a) {
                        s.dirs = a.dirs;
                        s.notes.extend(a.notes);
                    }
                }
                steps
            }
            _ => {
                let none: Vec<Vec<Vec<bool>>> = vec![vec![]; self.slots.len()];
                self.stages(grads, t, &none, |_| Phases::ALL)
            }
        };
        report.stats_ms = t0.elapsed().as_secs_f64() * 1e3;
        for s in steps.iter().flatten() {
            report.stats_updated |= s.stats;
            report.refreshed |= s.refreshed;
            report.notes.extend(s.notes.iter().cloned());
        }

        // Grafting, momentum and weight decay, all or nothing.
        let t1 = Instant::now();
        let saved = (
            params.clone(),
            self.velocity.bufs.clone(),
            self.grafting.clone(),
        );
        let mut overflow = None;
        for (slot, st) in self.slots.iter().zip(steps) {
            let (Some(st), Some(g)) = (st, grads.get(slot.id)) else {
                continue;
            };
            let mut dir = vec![0.0f32; g.numel()];
            if slot.blocks.is_empty() {
                match &mut self.grafting {
                    Some(gr) => gr.apply(slot.graft_slot, &mut dir, g.data()),
                    None => dir.copy_from_slice(g.data()),
                }
            } else {
                for (j, (b, u)) in slot.blocks.iter().zip(st.dirs).enumerate() {
                    let gb = shape::gather(g.data(), &slot.dims, &b.spec);
                    let mut u = match (u, &self.grafting) {
                        (Some(u), _) => u,
                        (None, Some(_)) => vec![0.0; gb.len()],
                        (None, None) => gb.clone(),
                    };
                    if let Some(gr) = &mut self.grafting {
                        gr.apply(slot.graft_slot + j, &mut u, &gb);
                    }
                    shape::scatter(&mut dir, &slot.dims, &b.spec, &u);
                }
            }
            let k = self.slot_of[&slot.id];
            let p = params.get_mut(slot.id);
            apply_direction(
                p.data_mut(),
                &dir,
                self.velocity.bufs[k].data_mut(),
                lr,
                cfg.momentum,
                cfg.weight_decay,
            );
            if !p.all_finite() && overflow.is_none() {
                overflow = Some(OptimError::NonFiniteUpdate {
                    param: slot.name.clone(),
                    lr,
                });
            }
        }
        if let Some(e) = overflow {
            (*params, self.velocity.bufs, self.grafting) = saved;
            return Err(e);
        }
        report.update_ms = t1.elapsed().as_secs_f64() * 1e3;
        self.step += 1;
        Ok(report)
    }

    fn set_shard(&mut self, shard: Option<Shard>) {
        self.shard = shard;
    }

    fn learning_rate(&self) -> f32 {
        self.config.schedule.lr(self.step)
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), OptimError> {
        let mut c = self.config;
        c.schedule.base = lr;
        self.set_config(c)
    }

    fn state(&self) -> OptimState {
        let kind = R::KIND;
        let be = self.backend.as_ref();
        let mut out = OptimState::default();
        self.velocity.export(&format!("{kind}.velocity"), &mut out);
        if let Some(g) = &self.grafting {
            g.export(&format!("{kind}.graft"), &mut out);
        }
        let mut params = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut blocks = Vec::with_capacity(s.blocks.len());
            for (j, b) in s.blocks.iter().enumerate() {
                for (i, m) in b.stats.iter().enumerate() {
                    put(be, &mut out, format!("{kind}.{}.{j}.stat{i}", s.name), m);
                }
                for (i, r) in b.roots.iter().enumerate() {
                    if let Some(g) = r.last_good() {
                        put(
                            be,
                            &mut out,
                            format!("{kind}.{}.{j}.root{i}", s.name),
                            &g.value,
                        );
                    }
                }
                blocks.push(BlockMeta {
                    counts: b.counts.clone(),
                    updates: b.updates,
                    dirty: b.dirty.clone(),
                    roots: b.roots.iter().map(|r| r.meta()).collect(),
                });
            }
            params.push(ParamMeta {
                name: s.name.clone(),
                blocks,
            });
        }
        let meta = Meta {
            kind: kind.to_string(),
            structure: self.structure(),
            step: self.step,
            params,
            graft_steps: self
                .grafting
                .as_ref()
                .map(|g| g.steps().to_vec())
                .unwrap_or_default(),
        };
        out.meta = serde_json::to_value(meta).expect("the state's metadata serializes");
        out
    }

    fn load_state(&mut self, mut state: OptimState) -> Result<(), OptimError> {
        let kind = R::KIND;
        let meta: Meta = state.meta_as(kind)?;
        let bad = |detail: String| OptimError::BadState { detail };
        if meta.kind != kind {
            return Err(bad(format!("state of {:?}, not {kind}", meta.kind)));
        }
        check_structure(&meta.structure, &self.structure())?;
        if meta.params.len() != self.slots.len() {
            return Err(bad(format!(
                "{} parameters saved, this model has {}",
                meta.params.len(),
                self.slots.len()
            )));
        }
        let be = self.backend.as_ref();
        let velocity = self
            .velocity
            .import(&format!("{kind}.velocity"), &mut state)?;
        let grafting = match &self.grafting {
            Some(g) => Some(g.import(&format!("{kind}.graft"), meta.graft_steps, &mut state)?),
            None => None,
        };
        let mut slots = self.slots.clone();
        for (s, pm) in slots.iter_mut().zip(&meta.params) {
            if pm.name != s.name || pm.blocks.len() != s.blocks.len() {
                return Err(bad(format!(
                    "parameter {:?} with {} blocks saved where this model has {:?} with {}",
                    pm.name,
                    pm.blocks.len(),
                    s.name,
                    s.blocks.len()
                )));
            }
            for (j, (b, bm)) in s.blocks.iter_mut().zip(&pm.blocks).enumerate() {
                let k = b.dims.len();
                if bm.counts.len() != k || bm.dirty.len() != k || bm.roots.len() != k {
                    return Err(bad(format!(
                        "{}: block {j} saved with another order",
                        s.name
                    )));
                }
                for i in 0..k {
                    let d = b.dims[i];
                    let t = state.take_any(&format!("{kind}.{}.{j}.stat{i}", s.name), &[d, d])?;
                    b.stats[i] = from_state(be, t);
                    let value = match bm.roots[i].good {
                        Some(_) => Some(from_state(
                            be,
                            state.take_any(&format!("{kind}.{}.{j}.root{i}", s.name), &[d, d])?,
                        )),
                        None => None,
                    };
                    b.roots[i] = Refreshing::restore(bm.roots[i], value);
                }
                b.counts = bm.counts.clone();
                b.updates = bm.updates;
                b.dirty = bm.dirty.clone();
            }
        }
        self.slots = slots;
        self.velocity = velocity;
        self.grafting = grafting;
        self.step = meta.step;
        Ok(())
    }
}
