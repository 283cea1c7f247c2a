//! SGD (momentum, Nesterov, weight decay) and Adam / AdamW.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use kron_autodiff::{Gradients, ParamId, ParamStore, Tensor};

use crate::error::OptimError;
use crate::optimizer::{Captures, OptimState, Optimizer, StepReport, check_finite};
use crate::schedule::Schedule;
use crate::validate::{positive, step_lr};

const PAR_MIN: usize = 1 << 14;

/// The new `(p, v)` of one element under [`sgd_update`]'s rule (with `mu = 0`, `v` as it was).
#[inline(always)]
fn sgd_next(p: f32, g: f32, v: f32, r: &SgdRule) -> (f32, f32) {
    let d = g + r.weight_decay * p;
    if r.momentum == 0.0 {
        return (p - r.lr * d, v);
    }
    let v = r.momentum * v + d;
    (
        p - r.lr * if r.nesterov { d + r.momentum * v } else { v },
        v,
    )
}

/// The scalars of one SGD update.
#[derive(Clone, Copy, Debug)]
struct SgdRule {
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
}

/// Whether every value `f` gives for the elements of `n`-long slices is finite: blocks
/// without an early exit (so the loops vectorize), on rayon's threads for long slices.
fn all_finite_by(n: usize, f: impl Fn(usize) -> bool + Sync) -> bool {
    const BLOCK: usize = 4096;
    let block = |b: usize| (b * BLOCK..(b * BLOCK + BLOCK).min(n)).fold(true, |ok, i| ok & f(i));
    let blocks = n.div_ceil(BLOCK);
    if n >= PAR_MIN {
        (0..blocks).into_par_iter().all(block)
    } else {
        (0..blocks).all(block)
    }
}

/// Whether [`sgd_update`] with these arguments would leave every element of `p` and `v`
/// finite; reads only. Optimizers check this for every parameter before writing any, so an
/// update that overflows changes nothing.
pub fn sgd_update_is_finite(
    p: &[f32],
    g: &[f32],
    v: &[f32],
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
) -> bool {
    let r = SgdRule {
        lr,
        momentum,
        nesterov,
        weight_decay,
    };
    all_finite_by(p.len(), |i| {
        let (p, v) = sgd_next(p[i], g[i], v[i], &r);
        p.is_finite() & v.is_finite()
    })
}

/// One SGD-with-momentum update of a parameter, in PyTorch's form:
/// `d = g + wd p; v = mu v + d; p -= lr (nesterov ? d + mu v : v)`. With `mu = 0` the velocity
/// is left untouched.
pub fn sgd_update(
    p: &mut [f32],
    g: &[f32],
    v: &mut [f32],
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
) {
    let r = SgdRule {
        lr,
        momentum,
        nesterov,
        weight_decay,
    };
    let f = |(p, (g, v)): (&mut f32, (&f32, &mut f32))| {
        (*p, *v) = sgd_next(*p, *g, *v, &r);
    };
    if p.len() >= PAR_MIN {
        p.par_iter_mut()
            .with_min_len(4096)
            .zip(g.par_iter().zip(v.par_iter_mut()))
            .for_each(f);
    } else {
        p.iter_mut().zip(g.iter().zip(v.iter_mut())).for_each(f);
    }
}

/// SGD's hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Learning-rate schedule (default constant 0.01).
    pub schedule: Schedule,
    /// Heavy-ball momentum (default 0).
    pub momentum: f32,
    /// Nesterov momentum (default off).
    pub nesterov: bool,
    /// L2 weight decay added to the gradient (default 0).
    pub weight_decay: f32,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            schedule: Schedule::constant(0.01),
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl SgdConfig {
    /// Constant learning rate `lr`, no momentum.
    pub fn new(lr: f32) -> Self {
        SgdConfig {
            schedule: Schedule::constant(lr),
            ..Default::default()
        }
    }
    /// With a learning-rate schedule.
    pub fn with_schedule(mut self, s: Schedule) -> Self {
        self.schedule = s;
        self
    }
    /// With heavy-ball momentum.
    pub fn with_momentum(mut self, m: f32) -> Self {
        self.momentum = m;
        self
    }
    /// With Nesterov momentum on or off.
    pub fn with_nesterov(mut self, on: bool) -> Self {
        self.nesterov = on;
        self
    }
    /// With L2 weight decay.
    pub fn with_weight_decay(mut self, wd: f32) -> Self {
        self.weight_decay = wd;
        self
    }
}

/// Per-parameter buffers shaped like the parameters, named after them for checkpoints.
#[derive(Clone, Debug)]
pub(crate) struct Slots {
    pub(crate) ids: Vec<ParamId>,
    pub(crate) names: Vec<String>,
    pub(crate) bufs: Vec<Tensor>,
}

impl Slots {
    pub(crate) fn zeros(store: &ParamStore, ids: &[ParamId]) -> Self {
        Slots {
            ids: ids.to_vec(),
            names: ids.iter().map(|&i| store.name(i).to_string()).collect(),
            bufs: ids
                .iter()
                .map(|&i| Tensor::zeros(store.get(i).shape()))
                .collect(),
        }
    }

    pub(crate) fn export(&self, prefix: &str, out: &mut OptimState) {
        for (n, b) in self.names.iter().zip(&self.bufs) {
            out.tensors.insert(format!("{prefix}.{n}"), b.clone());
        }
    }

    /// The same slots with values from `state`, checked by name and shape.
    pub(crate) fn import(&self, prefix: &str, state: &mut OptimState) -> Result<Self, OptimError> {
        let mut bufs = Vec::with_capacity(self.bufs.len());
        for (n, b) in self.names.iter().zip(&self.bufs) {
            bufs.push(state.take(&format!("{prefix}.{n}"), b.shape())?);
        }
        Ok(Slots {
            bufs,
            ..self.clone()
        })
    }
}

#[derive(Serialize, Deserialize)]
struct SgdMeta {
    kind: String,
    config: SgdConfig,
    step: u64,
}

/// Stochastic gradient descent with optional (Nesterov) momentum and weight decay.
pub struct Sgd {
    config: SgdConfig,
    velocity: Slots,
    step: u64,
}

impl Sgd {
    /// SGD over every parameter of `store`.
    ///
    /// # Errors
    /// [`OptimError::Config`], naming the field, if `config` fails [`SgdConfig::validate`].
    pub fn new(store: &ParamStore, config: SgdConfig) -> Result<Self, OptimError> {
        config.validate()?;
        let ids: Vec<ParamId> = store.ids().collect();
        Ok(Sgd {
            config,
            velocity: Slots::zeros(store, &ids),
            step: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &str {
        "sgd"
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
        let t0 = std::time::Instant::now();
        let lr = step_lr(&self.config.schedule, self.step)?;
        let c = self.config;
        // Every parameter's update is checked before any is written.
        for (i, &id) in self.velocity.ids.iter().enumerate() {
            let Some(g) = grads.get(id) else { continue };
            let (p, v) = (params.get(id).data(), self.velocity.bufs[i].data());
            if !sgd_update_is_finite(p, g.data(), v, lr, c.momentum, c.nesterov, c.weight_decay) {
                return Err(OptimError::NonFiniteUpdate {
                    param: params.name(id).to_string(),
                    lr,
                });
            }
        }
        for (i, &id) in self.velocity.ids.iter().enumerate() {
            let Some(g) = grads.get(id) else { continue };
            let v = self.velocity.bufs[i].data_mut();
            sgd_update(
                params.get_mut(id).data_mut(),
                g.data(),
                v,
                lr,
                c.momentum,
                c.nesterov,
                c.weight_decay,
            );
        }
        let report = StepReport {
            step: self.step,
            lr,
            update_ms: t0.elapsed().as_secs_f64() * 1e3,
            ..Default::default()
        };
        self.step += 1;
        Ok(report)
    }

    fn learning_rate(&self) -> f32 {
        self.config.schedule.base
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), OptimError> {
        positive("learning rate", lr)?;
        self.config.schedule.base = lr;
        Ok(())
    }

    fn state(&self) -> OptimState {
        let mut s = OptimState {
            meta: serde_json::to_value(SgdMeta {
                kind: "sgd".into(),
                config: self.config,
                step: self.step,
            })
            .expect("SGD metadata serializes"),
            ..Default::default()
        };
        self.velocity.export("sgd.velocity", &mut s);
        s
    }

    fn load_state(&mut self, mut state: OptimState) -> Result<(), OptimError> {
        let meta: SgdMeta = state.meta_as("sgd")?;
        if meta.kind != "sgd" {
            return Err(OptimError::BadState {
                detail: format!("state of {:?}, not sgd", meta.kind),
            });
        }
        meta.config.validate()?;
        let velocity = self.velocity.import("sgd.velocity", &mut state)?;
        // The configuration (every field of SGD's is a tunable) stays the one this optimizer
        // was built with, so a resumed run can change it; the velocity and the step count come
        // from the state.
        self.velocity = velocity;
        self.step = meta.step;
        Ok(())
    }
}

/// Adam's hyperparameters; with `decoupled` weight decay it is AdamW.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// Learning-rate schedule (default constant 1e-3).
    pub schedule: Schedule,
    /// First-moment decay (default 0.9).
    pub beta1: f32,
    /// Second-moment decay (default 0.999).
    pub beta2: f32,
    /// Denominator offset (default 1e-8).
    pub eps: f32,
    /// Weight decay (default 0).
    pub weight_decay: f32,
    /// Decoupled weight decay (AdamW: `p -= lr wd p`) instead of L2 added to the gradient.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    /// Kingma & Ba (2015): lr 1e-3, betas 0.9 / 0.999, eps 1e-8.
    fn default() -> Self {
        AdamConfig {
            schedule: Schedule::constant(1e-3),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

impl AdamConfig {
    /// Adam with a constant learning rate `lr`.
    pub fn new(lr: f32) -> Self {
        AdamConfig {
            schedule: Schedule::constant(lr),
            ..Default::default()
        }
    }
    /// AdamW (Loshchilov & Hutter 2019) with decoupled weight decay `wd` (0.01 is customary).
    pub fn adamw(lr: f32, wd: f32) -> Self {
        AdamConfig {
            schedule: Schedule::constant(lr),
            weight_decay: wd,
            decoupled: true,
            ..Default::default()
        }
    }
    /// With a learning-rate schedule.
    pub fn with_schedule(mut self, s: Schedule) -> Self {
        self.schedule = s;
        self
    }
    /// With moment decays.
    pub fn with_betas(mut self, beta1: f32, beta2: f32) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }
    /// With another denominator offset.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }
    /// With L2 weight decay (or decoupled, for AdamW).
    pub fn with_weight_decay(mut self, wd: f32, decoupled: bool) -> Self {
        self.weight_decay = wd;
        self.decoupled = decoupled;
        self
    }
}

/// The scalars of one Adam step.
#[derive(Clone, Copy, Debug)]
struct AdamRule {
    c: AdamConfig,
    lr: f32,
    /// Bias corrections `1 - beta^t`.
    bc1: f32,
    bc2: f32,
}

impl AdamRule {
    /// The new `(p, m, v)` of one element.
    #[inline(always)]
    fn next(&self, mut p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let (c, lr) = (&self.c, self.lr);
        let mut g = g;
        if c.decoupled {
            p -= lr * c.weight_decay * p;
        } else {
            g += c.weight_decay * p;
        }
        let m = c.beta1 * m + (1.0 - c.beta1) * g;
        let v = c.beta2 * v + (1.0 - c.beta2) * g * g;
        (
            p - lr * (m / self.bc1) / ((v / self.bc2).sqrt() + c.eps),
            m,
            v,
        )
    }
}

#[derive(Serialize, Deserialize)]
struct AdamMeta {
    kind: String,
    config: AdamConfig,
    step: u64,
}

/// Adam (Kingma & Ba 2015), and AdamW with decoupled weight decay.
#[derive(Clone)]
pub struct Adam {
    config: AdamConfig,
    m: Slots,
    v: Slots,
    step: u64,
}

impl Adam {
    /// Adam over every parameter of `store`.
    ///
    /// # Errors
    /// [`OptimError::Config`], naming the field, if `config` fails [`AdamConfig::validate`].
    pub fn new(store: &ParamStore, config: AdamConfig) -> Result<Self, OptimError> {
        config.validate()?;
        let ids: Vec<ParamId> = store.ids().collect();
        Ok(Adam {
            config,
            m: Slots::zeros(store, &ids),
            v: Slots::zeros(store, &ids),
            step: 0,
        })
    }

    /// A fresh Adam (zero moments, step 0) over the same parameters as `other`.
    pub(crate) fn new_like(other: &Adam) -> Self {
        let zero = |s: &Slots| Slots {
            bufs: s.bufs.iter().map(|b| Tensor::zeros(b.shape())).collect(),
            ..s.clone()
        };
        Adam {
            config: other.config,
            m: zero(&other.m),
            v: zero(&other.v),
            step: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }
}

impl Optimizer for Adam {
    fn name(&self) -> &str {
        if self.config.decoupled {
            "adamw"
        } else {
            "adam"
        }
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
        let t0 = std::time::Instant::now();
        let c = self.config;
        let lr = step_lr(&c.schedule, self.step)?;
        let t = (self.step + 1) as i32;
        let rule = AdamRule {
            c,
            lr,
            bc1: 1.0 - c.beta1.powi(t),
            bc2: 1.0 - c.beta2.powi(t),
        };
        // Every parameter's update is checked before any is written.
        for (i, &id) in self.m.ids.iter().enumerate() {
            let Some(g) = grads.get(id) else { continue };
            let (p, g) = (params.get(id).data(), g.data());
            let (m, v) = (self.m.bufs[i].data(), self.v.bufs[i].data());
            let finite = all_finite_by(p.len(), |j| {
                let (p, m, v) = rule.next(p[j], g[j], m[j], v[j]);
                p.is_finite() & m.is_finite() & v.is_finite()
            });
            if !finite {
                return Err(OptimError::NonFiniteUpdate {
                    param: params.name(id).to_string(),
                    lr,
                });
            }
        }
        for (i, &id) in self.m.ids.iter().enumerate() {
            let Some(g) = grads.get(id) else { continue };
            let m = self.m.bufs[i].data_mut();
            let v = self.v.bufs[i].data_mut();
            let p = params.get_mut(id).data_mut();
            let f = |(p, (g, (m, v))): (&mut f32, (&f32, (&mut f32, &mut f32)))| {
                (*p, *m, *v) = rule.next(*p, *g, *m, *v);
            };
            if p.len() >= PAR_MIN {
                p.par_iter_mut()
                    .with_min_len(4096)
                    .zip(
                        g.data()
                            .par_iter()
                            .zip(m.par_iter_mut().zip(v.par_iter_mut())),
                    )
                    .for_each(f);
            } else {
                p.iter_mut()
                    .zip(g.data().iter().zip(m.iter_mut().zip(v.iter_mut())))
                    .for_each(f);
            }
        }
        let report = StepReport {
            step: self.step,
            lr,
            update_ms: t0.elapsed().as_secs_f64() * 1e3,
            ..Default::default()
        };
        self.step += 1;
        Ok(report)
    }

    fn learning_rate(&self) -> f32 {
        self.config.schedule.base
    }

    fn set_learning_rate(&mut self, lr: f32) -> Result<(), OptimError> {
        positive("learning rate", lr)?;
        self.config.schedule.base = lr;
        Ok(())
    }

    fn state(&self) -> OptimState {
        let mut s = OptimState {
            meta: serde_json::to_value(AdamMeta {
                kind: self.name().into(),
                config: self.config,
                step: self.step,
            })
            .expect("Adam metadata serializes"),
            ..Default::default()
        };
        self.m.export("adam.m", &mut s);
        self.v.export("adam.v", &mut s);
        s
    }

    fn load_state(&mut self, mut state: OptimState) -> Result<(), OptimError> {
        let meta: AdamMeta = state.meta_as(self.name())?;
        if meta.kind != self.name() {
            return Err(OptimError::BadState {
                detail: format!("state of {:?}, not {}", meta.kind, self.name()),
            });
        }
        meta.config.validate()?;
        let m = self.m.import("adam.m", &mut state)?;
        let v = self.v.import("adam.v", &mut state)?;
        // The configuration stays the one this optimizer was built with (decoupled weight
        // decay, the one structural setting, is checked by the kind: adam or adamw); the
        // moments and the step count come from the state.
        self.m = m;
        self.v = v;
        self.step = meta.step;
        Ok(())
    }
}
