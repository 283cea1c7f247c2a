//! kron's Shampoo, KrADagrad* and KrADagrad against the reference code: three steps of the
//! KrADagrad authors' optimizers (jonathanmei/kradagrad at 9852c42, and the copy of Google's
//! PyTorch Shampoo they extend) on fixed inputs, run by `tests/reference/kradagrad_goldens.py`
//! (by hand; its docstring says how) and committed as `tests/reference/goldens.json`. The
//! settings are the script's: a 12 x 16 matrix, epsilon 0.1, beta2 1, statistics and roots
//! every step from the first, heavy-ball momentum 0.9, lr 0.1, SGD-norm grafting for Shampoo
//! and KrADagrad*, none for KrADagrad, and the authors' serial denominator for KrADagrad*.

use kron_autodiff::{Gradients, ParamId, ParamStore, Tensor};
use kron_optim::adaptive::{Denominator, KrAdStarRule};
use kron_optim::{
    Adaptive, AdaptiveConfig, Captures, CpuBackend, Graft, KrAdagrad, Momentum, Optimizer,
    Precision, Ridge, RootMethod, Shampoo,
};

const GOLDENS: &str = include_str!("../../../tests/reference/goldens.json");

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// The reference's settings in kron's terms.
fn settings(c: AdaptiveConfig, graft: Option<Graft>) -> AdaptiveConfig {
    c.with_lr(0.1)
        .with_momentum(Momentum::heavy_ball(0.9))
        .with_beta2(1.0)
        .with_bias_correction(false)
        .with_epsilon(Ridge::Absolute(0.1))
        .with_statistics_period(1)
        .with_refresh_period(1)
        .with_start_step(1)
        .with_graft(graft)
        .with_precision(Precision::F32)
        .with_roots(RootMethod::EIGH_F32_PLAIN)
}

#[test]
fn three_steps_match_the_reference_implementations() {
    let g: serde_json::Value = serde_json::from_str(GOLDENS).expect("goldens.json parses");
    let shape: Vec<usize> = g["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let w0 = floats(&g["w0"]);
    let grads: Vec<Vec<f32>> = g["grads"].as_array().unwrap().iter().map(floats).collect();
    type Make = fn(&ParamStore) -> Box<dyn Optimizer>;
    let methods: [(&str, Make); 3] = [
        ("shampoo", |p| {
            let c = settings(AdaptiveConfig::shampoo(), Some(Graft::Sgd));
            Box::new(Shampoo::new(p, c).unwrap())
        }),
        ("kradagrad_star", |p| {
            let c = settings(AdaptiveConfig::kradagrad_star(), Some(Graft::Sgd));
            let rule = KrAdStarRule {
                denominator: Denominator::TraceTimesSize,
            };
            let be = Box::new(CpuBackend::new(Precision::F32));
            Box::new(Adaptive::with_rule(rule, p, c, be).unwrap())
        }),
        ("kradagrad", |p| {
            let c = settings(AdaptiveConfig::kradagrad(), None);
            Box::new(KrAdagrad::new(p, c).unwrap())
        }),
    ];
    for (name, make) in methods {
        let want: Vec<Vec<f32>> = g["runs"][name]
            .as_array()
            .unwrap_or_else(|| panic!("goldens.json has no run {name}"))
            .iter()
            .map(floats)
            .collect();
        let mut p = ParamStore::new();
        p.add("w", Tensor::from_vec(w0.clone(), &shape));
        let mut opt = make(&p);
        for (k, (gk, wk)) in grads.iter().zip(&want).enumerate() {
            let gr = Gradients::from_params(vec![Some(Tensor::from_vec(gk.clone(), &shape))]);
            opt.step(&mut p, &gr, &Captures::new()).unwrap();
            let got = p.get(ParamId(0)).data();
            // Relative to the step taken so far: the parameters move by about 0.1 per step.
            let moved: f32 = w0
                .iter()
                .zip(wk)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            let worst = got
                .iter()
                .zip(wk)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                worst <= 1e-4 * moved.max(1e-3),
                "{name} step {}: max |kron - reference| = {worst:e}, the parameters moved {moved:e}",
                k + 1
            );
        }
    }
}
