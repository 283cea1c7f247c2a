//! SGD (momentum, Nesterov, weight decay) and Adam / AdamW.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use kron_autodiff::{Gradients, ParamId, ParamStore, Tensor};

use crate::error::OptimError;
use crate::optimizer::{Captures, OptimState, Optimizer, StepReport, check_finite};
use crate::schedule::Schedule;

const PAR_MIN: usize = 1 << 14;

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
    let f = |(p, (g, v)): (&mut f32, (&f32, &mut f32))| {
        let d = g + weight_decay * *p;
        if momentum == 0.0 {
            *p -= lr * d;
            return;
        }
        *v = momentum * *v + d;
        *p -= lr * if nesterov { d + momentum * *v } else { *v };
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
    pub fn new(store: &ParamStore, config: SgdConfig) -> Self {
        let ids: Vec<ParamId> = store.ids().collect();
        Sgd {
            config,
            velocity: Slots::zeros(store, &ids),
            step: 0,
        }
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
        let lr = self.config.schedule.lr(self.step);
        let c = self.config;
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

    fn set_learning_rate(&mut self, lr: f32) {
        self.config.schedule.base = lr;
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
        let velocity = self.velocity.import("sgd.velocity", &mut state)?;
        self.velocity = velocity;
        self.config = meta.config;
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

#[derive(Serialize, Deserialize)]
struct AdamMeta {
    kind: String,
    config: AdamConfig,
    step: u64,
}

/// Adam (Kingma & Ba 2015), and AdamW with decoupled weight decay.
pub struct Adam {
    config: AdamConfig,
    m: Slots,
    v: Slots,
    step: u64,
}

impl Adam {
    /// Adam over every parameter of `store`.
    pub fn new(store: &ParamStore, config: AdamConfig) -> Self {
        let ids: Vec<ParamId> = store.ids().collect();
        Adam {
            config,
            m: Slots::zeros(store, &ids),
            v: Slots::zeros(store, &ids),
            step: 0,
        }
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
        let lr = c.schedule.lr(self.step);
        let t = (self.step + 1) as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, &id) in self.m.ids.iter().enumerate() {
            let Some(g) = grads.get(id) else { continue };
            let m = self.m.bufs[i].data_mut();
            let v = self.v.bufs[i].data_mut();
            let p = params.get_mut(id).data_mut();
            let f = |(p, (g, (m, v))): (&mut f32, (&f32, (&mut f32, &mut f32)))| {
                let mut g = *g;
                if c.decoupled {
                    *p -= lr * c.weight_decay * *p;
                } else {
                    g += c.weight_decay * *p;
                }
                *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                *p -= lr * (*m / bc1) / ((*v / bc2).sqrt() + c.eps);
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

    fn set_learning_rate(&mut self, lr: f32) {
        self.config.schedule.base = lr;
    }

    fn state(&self) -> OptimState {
        let mut s = OptimState {
            meta: serde_json::to_value(AdamMeta {
                kind: "adam".into(),
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
        let meta: AdamMeta = state.meta_as("adam")?;
        if meta.kind != "adam" {
            return Err(OptimError::BadState {
                detail: format!("state of {:?}, not adam", meta.kind),
            });
        }
        let m = self.m.import("adam.m", &mut state)?;
        let v = self.v.import("adam.v", &mut state)?;
        self.m = m;
        self.v = v;
        self.config = meta.config;
        self.step = meta.step;
        Ok(())
    }
}
