//! Data-parallel training with the optimizers' matrix math on wgpu (lavapipe in CI): the
//! statistics reduced across ranks leave and re-enter the device, refreshes are broadcast from
//! their owners' devices, and the ranks still match one process and each other.
#![cfg(feature = "wgpu")]

use std::sync::Arc;

use kron::DataParallel;
use kron::optim::backend::WgpuBackend;
use kron::optim::{
    AdaptiveConfig, Backend, EigenDamping, InverseMethod, LocalGroup, Precision, RootMethod,
    Shampoo,
};
use kron::prelude::*;

/// Whether the `CI` environment variable asks for hard failures.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn device() -> Option<Box<dyn Backend>> {
    match WgpuBackend::new() {
        Ok(be) => Some(Box::new(be)),
        Err(e) if in_ci() => panic!("no wgpu adapter in CI ({e}): the wgpu tests must run here"),
        Err(e) => {
            println!("skipped: no wgpu adapter (install mesa-vulkan-drivers): {e}");
            None
        }
    }
}

fn model(store: &mut ParamStore) -> Sequential {
    let mut rng = Rng::new(7);
    Sequential::new()
        .push(Dense::new(store, "fc1", 6, 16, &mut rng))
        .push(Activation::Tanh)
        .push(Dense::new(store, "fc2", 16, 3, &mut rng))
}

fn batch(step: usize) -> (Tensor, Targets) {
    let mut rng = Rng::new(1000 + step as u64);
    let x = Tensor::randn(&[24, 6], 0.0, 1.0, &mut rng);
    (
        x,
        Targets::Classes((0..24).map(|i| (i + step) % 3).collect()),
    )
}

type Make = fn(&Sequential, &ParamStore, Box<dyn Backend>) -> Box<dyn Optimizer>;

fn train(dp: &DataParallel, make: Make, be: Box<dyn Backend>) -> Vec<f32> {
    let mut params = ParamStore::new();
    let m = model(&mut params);
    let mut opt = make(&m, &params, be);
    let mut rng = Rng::new(5);
    for step in 0..10 {
        let (x, y) = batch(step);
        dp.train_step(
            &m,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt,
            &x,
            &y,
            &mut rng,
        )
        .unwrap();
    }
    params
        .iter()
        .flat_map(|(_, _, t)| t.data().to_vec())
        .collect()
}

#[test]
fn wgpu_optimizers_on_2_ranks_match_one_process() {
    let Some(_) = device() else { return };
    let cases: [(&str, Make); 3] = [
        ("kfac inverse", |m, p, be| {
            let c = KfacConfig::default().with_inverse_period(3);
            Box::new(Kfac::with_backend(m.fisher_blocks(), p, c, be).unwrap())
        }),
        ("kfac eigen", |m, p, be| {
            let c = KfacConfig::default()
                .with_inverse_period(3)
                .with_method(InverseMethod::Eigen(EigenDamping::Factored));
            Box::new(Kfac::with_backend(m.fisher_blocks(), p, c, be).unwrap())
        }),
        ("shampoo coupled newton", |_, p, be| {
            let mut c = AdaptiveConfig::shampoo();
            c.refresh.period = 3;
            c.refresh.precision = Precision::F32;
            c.roots = RootMethod::CoupledNewton(Default::default());
            Box::new(Shampoo::with_backend(p, c, be).unwrap())
        }),
    ];
    for (name, make) in cases {
        let one = train(&DataParallel::single(), make, device().unwrap());
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .unwrap();
                    let dp = DataParallel::new(Arc::new(c));
                    pool.install(|| train(&dp, make, device().unwrap()))
                })
            })
            .collect();
        let ranks: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ranks[0], ranks[1], "{name}: the ranks agree to the bit");
        let d: f64 = ranks[0]
            .iter()
            .zip(&one)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let n: f64 = one.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = (d / n).sqrt();
        eprintln!("{name}: 2 ranks vs one process: {rel:.2e}");
        assert!(rel < 1e-4, "{name}: {rel:e}");
    }
}
