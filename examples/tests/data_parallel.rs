//! Data-parallel training on ranks that are threads of this process ([`LocalGroup`]): after 20
//! steps on the same global batches, 2, 3 and 4 ranks hold the parameters one process holds
//! (to 1e-4 relative: the reductions round in another order) for every optimizer, every rank
//! the same bits, and the same bits run after run; each refresh is computed once, on its
//! owner; a NaN on one rank and a mismatched setup are refused on every rank; a checkpoint
//! written by one rank count resumes on another. The `distributed/` crate runs the same
//! problems over Open MPI.

use std::sync::Arc;

use kron::optim::{AdaptiveConfig, Shampoo};
use kron::prelude::*;
use kron::{DataParallel, setup_of};
use kron_examples::data_parallel::{
    BATCH, Problem, STEPS, kfac_base, on_threads as on_ranks, optimizers, relative_difference,
    train, values,
};

/// A path named `name` in this test process's scratch directory.
fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kron-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
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
        let path = temp(&format!("trainer-dp-rank{rank}.safetensors"));
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

#[test]
fn the_checks_the_mpi_rank_program_runs_pass_on_threads() {
    use kron_examples::data_parallel::check;
    for name in ["equivalence", "owners", "nan", "mismatch"] {
        for ranks in [2, 3] {
            for (rank, r) in on_ranks(ranks, move |dp| check(name, &dp, None))
                .into_iter()
                .enumerate()
            {
                if let Err(e) = r {
                    panic!("{name} on rank {rank} of {ranks}: {e}");
                }
            }
        }
    }
    // A checkpoint written by 2 ranks, resumed on 3.
    let path = Arc::new(temp("checks"));
    let p = path.clone();
    for r in on_ranks(2, move |dp| check("save", &dp, Some(&p))) {
        r.unwrap();
    }
    for r in on_ranks(3, move |dp| check("resume", &dp, Some(&path))) {
        r.unwrap();
    }
    // A check that does not exist is an error naming the others.
    let e = on_ranks(1, |dp| check("nope", &dp, None))
        .remove(0)
        .unwrap_err();
    assert!(e.contains("equivalence"), "{e}");
}
