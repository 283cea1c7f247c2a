//! The curvature core's seams fit a new method: a diagonal-Fisher preconditioner written as
//! one `CurvatureBlock` (the method's own code is the block below, under 60 lines) on the
//! shared `Driver`, which trains the bundled digits MLP past 90% test accuracy in 20 epochs.

use kron::layers::FisherBlock;
use kron::optim::backend::{Backend, LinalgError, Mat};
use kron::optim::curvature::{
    CoreConfig, CurvatureBlock, Driver, RefreshOk, Refreshed, StatsInput, StatsSkip, TakeMat,
};
use kron::optim::{CpuBackend, OptimError};
use kron::prelude::*;

// --- the method's own code ---
/// The diagonal of the Fisher block: `D_ij = E[g_i^2 a_j^2]`, preconditioner `1 / (D + λ)`.
#[derive(Clone)]
struct DiagFisher {
    info: FisherBlock,
    d: Option<Mat>,
    updates: u64,
}

impl CurvatureBlock for DiagFisher {
    type Refreshed = Tensor;
    fn layout(&self) -> &FisherBlock {
        &self.info
    }
    fn fresh(&self) -> Self {
        DiagFisher {
            info: self.info.clone(),
            d: None,
            updates: 0,
        }
    }
    fn has_statistics(&self) -> bool {
        self.d.is_some()
    }
    fn update_statistics(&mut self, be: &dyn Backend, s: &StatsInput<'_>) -> Result<(), StatsSkip> {
        let Some(c) = s.capture else { return Ok(()) };
        let (rows, n) = (c.a.dim(0), c.a.dim(1));
        let w = n + usize::from(c.has_bias);
        let mut a2 = Tensor::ones(&[rows, w]);
        for r in 0..rows {
            for j in 0..n {
                a2.data_mut()[r * w + j] = c.a.data()[r * n + j].powi(2);
            }
        }
        let g2 = c.g.map(|x| x * x);
        let batch = g2.matmul_t(true, &a2, false).scale(1.0 / rows as f32);
        let decay = (1.0 - 1.0 / (self.updates + 1) as f32).min(s.config.ema_decay);
        let d = match &self.d {
            Some(d) => be.download(d).scale(decay).add(&batch.scale(1.0 - decay)),
            None => batch,
        };
        if !d.all_finite() {
            return Err(StatsSkip::Overflow);
        }
        self.d = Some(be.upload(&d));
        self.updates += 1;
        Ok(())
    }
    fn refresh(&self, be: &dyn Backend, damping: f64) -> Result<RefreshOk<Tensor>, LinalgError> {
        let d = be.download(self.d.as_ref().ok_or(LinalgError::NonFinite)?);
        Ok(RefreshOk::clean(d.map(|x| 1.0 / (x + damping as f32))))
    }
    fn precondition(&self, be: &dyn Backend, r: &Refreshed<Tensor>, v: &Mat, _: f64) -> Mat {
        be.upload(&be.download(v).mul(&r.value))
    }
    fn bilinear(&self, be: &dyn Backend, x: &Mat, y: &Mat) -> f64 {
        let Some(d) = &self.d else { return 0.0 };
        let p = be.download(x).mul(&be.download(d)).mul(&be.download(y));
        p.data().iter().map(|&v| v as f64).sum()
    }
    fn refresh_cost(&self) -> f64 {
        (self.info.a_dim() * self.info.g_dim()) as f64
    }
    fn statistics_mut(&mut self) -> Vec<&mut Mat> {
        self.d.iter_mut().collect()
    }
    fn statistics(&self) -> Vec<(&'static str, &Mat)> {
        self.d.iter().map(|d| ("D", d)).collect()
    }
    fn restore_statistics(
        &mut self,
        _: &dyn Backend,
        updates: u64,
        take: &mut TakeMat<'_>,
    ) -> Result<(), OptimError> {
        self.d = Some(take("D", &[self.info.g_dim(), self.info.a_dim()])?);
        self.updates = updates;
        Ok(())
    }
    fn updates(&self) -> u64 {
        self.updates
    }
    fn export_refreshed(&self, r: &Tensor) -> (Vec<(&'static str, Mat)>, serde_json::Value) {
        (vec![], serde_json::json!({ "inverse": r.data() }))
    }
    fn import_refreshed(
        &self,
        _: &dyn Backend,
        m: &serde_json::Value,
        _: &mut TakeMat<'_>,
    ) -> Result<Tensor, OptimError> {
        let v: Vec<f32> =
            serde_json::from_value(m["inverse"].clone()).map_err(|e| OptimError::BadState {
                detail: e.to_string(),
            })?;
        Ok(Tensor::from_vec(v, &[self.info.g_dim(), self.info.a_dim()]))
    }
}
// --- end of the method's own code ---

#[test]
fn a_diagonal_fisher_method_from_the_core_trains_the_digits_mlp() {
    let digits = kron::data::digits();
    let (mut params, mut rng) = (ParamStore::new(), Rng::new(0));
    let model = Sequential::new()
        .push(Dense::new(&mut params, "fc1", 64, 128, &mut rng))
        .push(Activation::Relu)
        .push(Dense::new(&mut params, "fc2", 128, 10, &mut rng));
    let blocks = model
        .fisher_blocks()
        .into_iter()
        .map(|info| DiagFisher {
            info,
            d: None,
            updates: 0,
        })
        .collect();
    let mut config = CoreConfig::default();
    config.step.schedule = Schedule::constant(0.01);
    config.damping.lambda = 0.1;
    config.step.kl_clip = None;
    config.refresh.period = 10;
    let be = Box::new(CpuBackend::default());
    let mut opt = Driver::new(
        "diag-fisher",
        blocks,
        &params,
        config,
        be,
        serde_json::json!({}),
    )
    .expect("a valid configuration");
    let epochs = 20;
    let batches = kron::data::Batches::new(digits.train.len(), 32, rng.fork(1));
    let steps = epochs * digits.train.len().div_ceil(32);
    for idx in batches.take(steps) {
        let (x, y) = digits.train.batch(&idx);
        let y = Targets::Classes(y);
        let out = train_step(
            &model,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt,
            &x,
            &y,
            &mut rng,
        )
        .expect("a finite step");
        assert!(
            out.report.notes.iter().all(|n| n.is_routine()),
            "{:?}",
            out.report.notes
        );
    }
    let test_y = Targets::Classes(digits.test.labels().to_vec());
    let e = evaluate(
        &model,
        &params,
        LossKind::CrossEntropy,
        digits.test.inputs(),
        &test_y,
        512,
    );
    let acc = e.accuracy.unwrap_or(0.0);
    assert!(acc >= 0.90, "test accuracy {:.1}%", 100.0 * acc);
    // Its checkpoint form round-trips through the driver.
    let st = opt.state();
    let mut other = Driver::new(
        "diag-fisher",
        opt.blocks().iter().map(|b| b.fresh()).collect(),
        &params,
        config,
        Box::new(CpuBackend::default()),
        serde_json::json!({}),
    )
    .unwrap();
    other.load_state(st.clone()).unwrap();
    assert_eq!(other.state(), st);
}
