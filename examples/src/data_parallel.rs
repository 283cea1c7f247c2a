//! The problems and optimizers every data-parallel check trains, whatever carries the ranks:
//! threads of one process ([`on_threads`], in the workspace's tests) or processes under
//! `mpirun` (the `distributed/` crate). Small models, so that 20 steps of every method take a
//! moment; every configuration is one whose dynamics are stable (see [`optimizers`]).

use std::sync::Arc;

use kron::DataParallel;
use kron::optim::{
    AdaptiveConfig, CoarseConfig, EigenDamping, InverseMethod, KrAdagrad, KrAdagradStar,
    LevenbergMarquardt, LocalGroup, OptimState, Precision, Ridge, Shampoo, StepRule, TwoLevelKfac,
};
use kron::prelude::*;

/// Steps of every equivalence check.
pub const STEPS: usize = 20;
/// Examples in each global batch.
pub const BATCH: usize = 30;

/// A problem: a model and its loss, and the data the global batches come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Dense, tanh, dropout, dense; cross-entropy (sampled categorical labels).
    Classifier,
    /// Dense, tanh, dense; squared error (sampled Gaussian targets).
    Regression,
    /// Conv, relu, flatten, dense; cross-entropy.
    Conv,
}

impl Problem {
    /// The model, its parameters in `store` (the same on every rank: a fixed seed).
    pub fn build(self, store: &mut ParamStore) -> Sequential {
        let mut rng = Rng::new(7);
        match self {
            Problem::Classifier => Sequential::new()
                .push(Dense::new(store, "fc1", 6, 16, &mut rng))
                .push(Activation::Tanh)
                .push(Dropout::new(0.2))
                .push(Dense::new(store, "fc2", 16, 3, &mut rng)),
            Problem::Regression => Sequential::new()
                .push(Dense::new(store, "fc1", 6, 8, &mut rng))
                .push(Activation::Tanh)
                .push(Dense::new(store, "fc2", 8, 5, &mut rng)),
            Problem::Conv => Sequential::new()
                .push(
                    Conv2dConfig::new(2, 3, 3)
                        .with_padding(1)
                        .with_stride(2)
                        .build(store, "c", &mut rng),
                )
                .push(Activation::Relu)
                .push(Flatten)
                .push(Dense::new(store, "fc", 27, 3, &mut rng)),
        }
    }

    /// The loss.
    pub fn loss(self) -> LossKind {
        match self {
            Problem::Regression => LossKind::SquaredError,
            _ => LossKind::CrossEntropy,
        }
    }

    /// The global batch of step `step` (the same on every rank).
    pub fn batch(self, step: usize) -> (Tensor, Targets) {
        let mut rng = Rng::new(1000 + step as u64);
        match self {
            Problem::Classifier => {
                let x = Tensor::randn(&[BATCH, 6], 0.0, 1.0, &mut rng);
                let y = (0..BATCH).map(|i| (i + step) % 3).collect();
                (x, Targets::Classes(y))
            }
            Problem::Regression => {
                let x = Tensor::randn(&[BATCH, 6], 0.0, 1.0, &mut rng);
                let t = Tensor::randn(&[BATCH, 5], 0.0, 1.0, &mut rng);
                (x, Targets::Values(t))
            }
            Problem::Conv => {
                let x = Tensor::randn(&[BATCH, 2, 5, 6], 0.0, 1.0, &mut rng);
                let y = (0..BATCH).map(|i| (i * 7 + step) % 3).collect();
                (x, Targets::Classes(y))
            }
        }
    }
}

/// Builds an optimizer for a problem's model.
pub type MakeOpt = fn(&Sequential, &ParamStore) -> Box<dyn Optimizer>;

/// KFAC's settings in these checks: refreshes every 5 steps, conv statistics every step.
pub fn kfac_base() -> KfacConfig {
    KfacConfig::default()
        .with_inverse_period(5)
        .with_conv_stats_period(1)
}

/// Every optimizer, by name, with the problem it trains.
pub fn optimizers() -> Vec<(&'static str, Problem, MakeOpt)> {
    fn adaptive(mut c: AdaptiveConfig) -> AdaptiveConfig {
        c.refresh.period = 5;
        c
    }
    fn two_level(m: &Sequential, p: &ParamStore, space: &str) -> Box<dyn Optimizer> {
        let coarse = CoarseConfig::parse(space).unwrap();
        Box::new(TwoLevelKfac::new(m, p, kfac_base(), coarse).unwrap())
    }
    vec![
        ("sgd", Problem::Classifier, |_, p| {
            Box::new(Sgd::new(p, SgdConfig::new(0.1)).unwrap())
        }),
        ("adam", Problem::Regression, |_, p| {
            Box::new(Adam::new(p, AdamConfig::new(0.01)).unwrap())
        }),
        ("kfac", Problem::Classifier, |m, p| {
            Box::new(Kfac::new(m, p, kfac_base()).unwrap())
        }),
        ("kfac-gaussian-eigen-lm", Problem::Regression, |m, p| {
            let c = kfac_base()
                .with_method(InverseMethod::Eigen(EigenDamping::Factored))
                .with_adaptive_damping(Some(LevenbergMarquardt::DEFAULT));
            Box::new(Kfac::new(m, p, c).unwrap())
        }),
        // The quadratic model's step and momentum are solved from curvature products (here on
        // the first 11 examples of the global batch, which the first rank holds). At the
        // default λ = 1e-3 this small problem's model picks momenta like -3.8 and the run is
        // chaotic: a rounding difference of 1e-7 grows to O(1) in 20 steps on one process as on
        // many. λ = 0.1 keeps it well-posed.
        ("kfac-quadratic", Problem::Classifier, |m, p| {
            let c = kfac_base()
                .with_damping(0.1)
                .with_step_rule(StepRule::QuadraticModel);
            Box::new(Kfac::new(m, p, c).unwrap())
        }),
        (
            "kfac-quadratic-sub-batch-f64",
            Problem::Regression,
            |m, p| {
                let c = kfac_base()
                    .with_damping(0.1)
                    .with_step_rule(StepRule::QuadraticModel)
                    .with_curvature_examples(Some(11))
                    .with_precision(Precision::F64);
                Box::new(Kfac::new(m, p, c).unwrap())
            },
        ),
        ("kfac-f64", Problem::Classifier, |m, p| {
            let c = kfac_base().with_precision(Precision::F64);
            Box::new(Kfac::new(m, p, c).unwrap())
        }),
        // Statistics on the first 13 examples of each global batch: some ranks hold none.
        ("kfac-stats-examples", Problem::Classifier, |m, p| {
            Box::new(Kfac::new(m, p, kfac_base().with_stats_examples(Some(13))).unwrap())
        }),
        (
            "kfac-2l-residual-stats-examples",
            Problem::Regression,
            |m, p| {
                let c = kfac_base().with_stats_examples(Some(13));
                let coarse = CoarseConfig::parse("residual").unwrap();
                Box::new(TwoLevelKfac::new(m, p, c, coarse).unwrap())
            },
        ),
        ("kfc", Problem::Conv, |m, p| {
            Box::new(Kfac::new(m, p, kfac_base()).unwrap())
        }),
        ("shampoo", Problem::Classifier, |_, p| {
            Box::new(Shampoo::new(p, adaptive(AdaptiveConfig::shampoo())).unwrap())
        }),
        ("kradagrad", Problem::Regression, |_, p| {
            Box::new(KrAdagrad::new(p, adaptive(AdaptiveConfig::kradagrad())).unwrap())
        }),
        // KrADagrad*'s default epsilon starts the inverse statistic at 1e12 I in f32, where
        // rounding differences of the gradient grow to 1e-3 in 20 steps; the authors tune it to
        // 3e-4 and above on autoencoders.
        ("kradagrad-star", Problem::Classifier, |_, p| {
            let mut c = adaptive(AdaptiveConfig::kradagrad_star());
            c.epsilon = Ridge::Absolute(1e-3);
            Box::new(KrAdagradStar::new(p, c).unwrap())
        }),
        ("kfac-2l-nicolaides", Problem::Classifier, |m, p| {
            two_level(m, p, "nicolaides")
        }),
        ("kfac-2l-spectral", Problem::Regression, |m, p| {
            two_level(m, p, "spectral")
        }),
        ("kfac-2l-residual", Problem::Classifier, |m, p| {
            two_level(m, p, "residual")
        }),
        ("kfac-2l-tselepidis", Problem::Conv, |m, p| {
            two_level(m, p, "tselepidis")
        }),
        ("kfac-2l-krylov-nicolaides", Problem::Regression, |m, p| {
            two_level(m, p, "krylov-nicolaides")
        }),
        ("kfac-2l-krylov-residual", Problem::Conv, |m, p| {
            two_level(m, p, "krylov-residual")
        }),
    ]
}

/// Runs `f` on `ranks` ranks, each a thread with a one-thread rayon pool of its own, and
/// returns every rank's result.
pub fn on_threads<R: Send + 'static>(
    ranks: usize,
    f: impl Fn(DataParallel) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = Arc::new(f);
    let handles: Vec<_> = LocalGroup::new(ranks)
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                pool.install(|| f(DataParallel::new(Arc::new(c))))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The parameters, optimizer state and generator after the `steps` of a run (from `resume`'s
/// state when given), on `dp`'s ranks.
pub fn train(
    dp: &DataParallel,
    problem: Problem,
    make: MakeOpt,
    steps: std::ops::Range<usize>,
    resume: Option<&(ParamStore, OptimState, Rng)>,
) -> (ParamStore, OptimState, Rng) {
    let mut params = ParamStore::new();
    let model = problem.build(&mut params);
    let mut opt = make(&model, &params);
    let mut rng = Rng::new(5);
    if let Some((p, s, r)) = resume {
        params = p.clone();
        opt.load_state(s.clone()).unwrap();
        rng = r.clone();
    }
    for step in steps {
        let (x, y) = problem.batch(step);
        dp.train_step(
            &model,
            problem.loss(),
            &mut params,
            &mut opt,
            &x,
            &y,
            &mut rng,
        )
        .unwrap_or_else(|e| panic!("step {step} on rank {}: {e}", dp.rank()));
    }
    (params, opt.state(), rng)
}

/// Every parameter's name and values.
pub fn values(p: &ParamStore) -> Vec<(String, Vec<f32>)> {
    p.iter()
        .map(|(_, n, t)| (n.to_string(), t.data().to_vec()))
        .collect()
}

/// The largest relative difference `|a - b| / |b|` over the parameters.
pub fn relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            let d: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
                .sum();
            let n: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            (d / n.max(1e-30)).sqrt()
        })
        .fold(0.0, f64::max)
}
