//! Data-parallel training on ranks that are threads of this process ([`LocalGroup`]): after 20
//! steps on the same global batches, 2, 3 and 4 ranks hold the parameters one process holds
//! (to 1e-4 relative: the reductions round in another order) for every optimizer, every rank
//! the same bits, and the same bits run after run; each refresh is computed once, on its
//! owner; a NaN on one rank and a mismatched setup are refused on every rank; a checkpoint
//! written by one rank count resumes on another. The same checks run over Open MPI in the
//! `distributed/` crate.

#[allow(dead_code)] // The classifier and scratch paths, not its data.
mod common;

use std::sync::Arc;

use kron::optim::{
    AdaptiveConfig, CoarseConfig, EigenDamping, InverseMethod, KrAdagrad, KrAdagradStar,
    LevenbergMarquardt, LocalGroup, OptimState, Precision, Ridge, Shampoo, StepRule, TwoLevelKfac,
};
use kron::prelude::*;
use kron::{DataParallel, setup_of};

const STEPS: usize = 20;
const BATCH: usize = 30;

/// A problem: a model and its loss, and the data the global batches come from.
#[derive(Clone, Copy)]
enum Problem {
    /// Dense, tanh, dropout, dense; cross-entropy (sampled categorical labels).
    Classifier,
    /// Dense, tanh, dense; squared error (sampled Gaussian targets).
    Regression,
    /// Conv, relu, flatten, dense; cross-entropy.
    Conv,
}

impl Problem {
    fn build(self, store: &mut ParamStore) -> Sequential {
        let mut rng = Rng::new(7);
        match self {
            Problem::Classifier => common::model(store, 7),
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

    fn loss(self) -> LossKind {
        match self {
            Problem::Regression => LossKind::SquaredError,
            _ => LossKind::CrossEntropy,
        }
    }

    /// The global batch of step `step` (the same on every rank).
    fn batch(self, step: usize) -> (Tensor, Targets) {
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

type MakeOpt = fn(&Sequential, &ParamStore) -> Box<dyn Optimizer>;

fn kfac_base() -> KfacConfig {
    KfacConfig::default()
        .with_inverse_period(5)
        .with_conv_stats_period(1)
}

/// Every optimizer, by name.
fn optimizers() -> Vec<(&'static str, Problem, MakeOpt)> {
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
fn on_ranks<R: Send + 'static>(
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

/// The parameters after `steps` steps from `start`, on `dp`'s ranks.
fn train(
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

fn values(p: &ParamStore) -> Vec<(String, Vec<f32>)> {
    p.iter()
        .map(|(_, n, t)| (n.to_string(), t.data().to_vec()))
        .collect()
}

/// The largest relative difference `|a - b| / |b|` over the parameters.
fn relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
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

#[test]
fn every_optimizer_on_2_3_and_4_ranks_matches_one_process() {
    let mut failures = Vec::new();
    for (name, problem, make) in optimizers() {
        let one = values(&train(&DataParallel::single(), problem, make, 0..STEPS, None).0);
        let start = values(&{
            let mut p = ParamStore::new();
            problem.build(&mut p);
            p
        });
        let moved = relative_difference(&start, &one);
        assert!(
            moved > 1e-3,
            "{name}: one process barely trained ({moved:e})"
        );
        for ranks in [2, 3, 4] {
            let all = on_ranks(ranks, move |dp| {
                values(&train(&dp, problem, make, 0..STEPS, None).0)
            });
            for (r, v) in all.iter().enumerate() {
                assert_eq!(
                    v, &all[0],
                    "{name}: rank {r} of {ranks} differs from rank 0"
                );
            }
            let d = relative_difference(&all[0], &one);
            eprintln!("{name}: {ranks} ranks vs one process: {d:.2e}");
            if d > 1e-4 {
                failures.push(format!("{name} on {ranks} ranks: {d:.2e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "relative difference from one process above 1e-4:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_fixed_rank_count_gives_the_same_bits_run_after_run() {
    let (_, problem, make) = optimizers()
        .into_iter()
        .find(|o| o.0 == "kfac-2l-residual")
        .unwrap();
    let run = || {
        on_ranks(3, move |dp| {
            values(&train(&dp, problem, make, 0..8, None).0)
        })
    };
    assert_eq!(run(), run());
}

#[test]
fn each_refresh_is_computed_once_on_its_owner() {
    // The classifier's two blocks and the conv net's two, refreshed at steps 0, 5, 10, 15.
    for problem in [Problem::Classifier, Problem::Conv] {
        let out = on_ranks(2, move |dp| {
            let mut params = ParamStore::new();
            let model = problem.build(&mut params);
            let mut opt = Kfac::new(&model, &params, kfac_base()).unwrap();
            let mut rng = Rng::new(5);
            for step in 0..STEPS {
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
                .unwrap();
            }
            (
                opt.driver().computed_refreshes(),
                opt.driver().refresh_owners(),
            )
        });
        let owners = &out[0].1;
        assert_eq!(owners, &out[1].1);
        assert_eq!(owners.len(), 2);
        // Two blocks of different sizes on two ranks: one each.
        assert_ne!(owners[0], owners[1], "blocks {owners:?}");
        for (rank, (computed, _)) in out.iter().enumerate() {
            let owned = owners.iter().filter(|&&o| o == rank).count() as u64;
            assert_eq!(*computed, owned * 4, "rank {rank} computed {computed}");
        }
    }
}

#[test]
fn each_root_of_the_adaptive_methods_is_computed_once_on_its_owner() {
    // The classifier's two weights (blocks 16x6 and 3x16), two axes each, rooted at steps
    // 5, 10, 15 and 20 (t = step + 1).
    let out = on_ranks(2, |dp| {
        let problem = Problem::Classifier;
        let mut params = ParamStore::new();
        let model = problem.build(&mut params);
        let mut c = AdaptiveConfig::shampoo();
        c.refresh.period = 5;
        let mut opt = Shampoo::new(&params, c).unwrap();
        let mut rng = Rng::new(5);
        for step in 0..STEPS {
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
            .unwrap();
        }
        (opt.computed_roots(), opt.root_owners())
    });
    let owners = &out[0].1;
    assert_eq!(owners, &out[1].1);
    let all: Vec<usize> = owners.iter().flatten().flatten().copied().collect();
    assert_eq!(all.len(), 4, "{owners:?}");
    for (rank, (computed, _)) in out.iter().enumerate() {
        let owned = all.iter().filter(|&&o| o == rank).count() as u64;
        assert!(owned > 0, "rank {rank} owns no root: {owners:?}");
        assert_eq!(*computed, owned * 4, "rank {rank} computed {computed}");
    }
}

#[test]
fn a_non_finite_gradient_on_one_rank_is_refused_on_every_rank() {
    let out = on_ranks(3, |dp| {
        let problem = Problem::Classifier;
        let mut params = ParamStore::new();
        let model = problem.build(&mut params);
        let mut opt = Kfac::new(&model, &params, kfac_base()).unwrap();
        let mut rng = Rng::new(5);
        let (mut x, y) = problem.batch(0);
        // Example 12 lies in rank 1's shard (examples 10..20).
        x.data_mut()[12 * 6] = f32::NAN;
        let before = values(&params);
        let err = dp
            .train_step(
                &model,
                problem.loss(),
                &mut params,
                &mut opt,
                &x,
                &y,
                &mut rng,
            )
            .unwrap_err();
        (err, before == values(&params), opt.steps_taken())
    });
    for (rank, (err, unchanged, steps)) in out.into_iter().enumerate() {
        match &err {
            OptimError::NonFiniteGradientOnRanks { ranks, param } => {
                assert_eq!(ranks, &[1]);
                assert_eq!(param.is_some(), rank == 1, "{err}");
            }
            e => panic!("rank {rank}: {e}"),
        }
        assert!(err.to_string().contains("rank(s) 1"), "{err}");
        assert!(unchanged, "rank {rank} changed its parameters");
        assert_eq!(steps, 0);
    }
}

#[test]
fn ranks_started_differently_refuse_naming_the_difference() {
    let out = on_ranks(3, |dp| {
        let mut params = ParamStore::new();
        let model = Problem::Classifier.build(&mut params);
        let lambda = if dp.rank() == 2 { 0.01 } else { 0.001 };
        let opt = Kfac::new(&model, &params, kfac_base().with_damping(lambda)).unwrap();
        let extra = serde_json::json!({"batch": BATCH, "seed": 5});
        dp.check_setup(&setup_of(&params, &opt, extra))
    });
    for r in out {
        let e = r.unwrap_err();
        assert_eq!(e.ranks, vec![2]);
        assert!(e.field.ends_with("damping.lambda"), "{e}");
        assert!(e.to_string().contains("rank 2"), "{e}");
    }
    // The same setup everywhere passes.
    let out = on_ranks(2, |dp| {
        let mut params = ParamStore::new();
        let model = Problem::Classifier.build(&mut params);
        let opt = Kfac::new(&model, &params, kfac_base()).unwrap();
        dp.check_setup(&setup_of(&params, &opt, serde_json::json!({})))
    });
    assert!(out.iter().all(Result::is_ok));
}

#[test]
fn a_checkpoint_resumes_on_another_rank_count() {
    for name in ["kfac", "kfac-2l-nicolaides", "shampoo"] {
        let (_, problem, make) = optimizers().into_iter().find(|o| o.0 == name).unwrap();
        let one = values(&train(&DataParallel::single(), problem, make, 0..STEPS, None).0);
        // 10 steps on 2 ranks; rank 0's state (the checkpoint's content) resumed on 3 ranks.
        let half = on_ranks(2, move |dp| train(&dp, problem, make, 0..10, None))
            .into_iter()
            .next()
            .unwrap();
        let half = Arc::new(half);
        let resumed = on_ranks(3, move |dp| {
            values(&train(&dp, problem, make, 10..STEPS, Some(&*half)).0)
        });
        let d = relative_difference(&resumed[0], &one);
        assert!(
            d <= 1e-4,
            "{name}: resumed on 3 ranks vs one process: {d:.2e}"
        );
    }
}

#[test]
fn a_batch_smaller_than_the_ranks_is_refused() {
    let out = on_ranks(4, |dp| {
        let mut params = ParamStore::new();
        let model = Problem::Classifier.build(&mut params);
        let mut opt = Sgd::new(&params, SgdConfig::new(0.1)).unwrap();
        let (x, y) = Problem::Classifier.batch(0);
        let x = Tensor::from_vec(x.data()[..18].to_vec(), &[3, 6]);
        let Targets::Classes(y) = y else {
            unreachable!()
        };
        let y = Targets::Classes(y[..3].to_vec());
        dp.train_step(
            &model,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt,
            &x,
            &y,
            &mut Rng::new(1),
        )
        .unwrap_err()
    });
    for e in out {
        assert!(
            matches!(&e, OptimError::Config { field, .. } if field == "batch"),
            "{e}"
        );
    }
}

#[test]
fn a_trainer_trains_data_parallel_and_saves_on_rank_0_only() {
    let run = move |dp: Option<DataParallel>| {
        let problem = Problem::Classifier;
        let mut params = ParamStore::new();
        let model = problem.build(&mut params);
        let opt = Kfac::new(&model, &params, kfac_base()).unwrap();
        let mut t = Trainer::new(model, params, opt, problem.loss(), Rng::new(5));
        let rank = dp.as_ref().map_or(0, |d| d.rank());
        if let Some(dp) = dp {
            t = t.data_parallel(dp).unwrap();
        }
        for step in 0..10 {
            let (x, y) = problem.batch(step);
            t.step(&x, &y).unwrap();
        }
        let path = common::temp(&format!("trainer-dp-rank{rank}.safetensors"));
        t.save(&path, None).unwrap();
        (values(t.params()), path.exists())
    };
    let (one, _) = run(None);
    let out = on_ranks(2, move |dp| run(Some(dp)));
    assert_eq!(out[0].0, out[1].0);
    assert!(relative_difference(&out[0].0, &one) < 1e-5);
    assert!(out[0].1, "rank 0 writes its checkpoint");
    assert!(!out[1].1, "rank 1 writes nothing");
}
