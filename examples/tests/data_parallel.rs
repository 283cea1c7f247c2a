//! Data-parallel training on ranks that are threads of this process: the checks the MPI rank
//! program runs ([`check`]: every optimizer within 1e-4 of one process with every rank the
//! same bits, refreshes and roots computed once on their owners, a NaN on one rank and a
//! mismatched setup refused on every rank, a checkpoint from one rank count resumed on another)
//! on 2, 3 and 4 ranks, and what only threads show here: the same bits run after run, a batch
//! smaller than the ranks refused, and the `Trainer`.

use std::sync::Arc;

use kron::DataParallel;
use kron::prelude::*;
use kron_examples::data_parallel::{
    Problem, check, checks_without_path, kfac_base, on_threads as on_ranks, optimizers,
    relative_difference, train, values,
};

/// A path named `name` in this test process's scratch directory.
fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kron-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn the_checks_pass_on_2_3_and_4_ranks() {
    for name in checks_without_path() {
        for ranks in [2, 3, 4] {
            for (rank, r) in on_ranks(ranks, move |dp| check(name, &dp, None))
                .into_iter()
                .enumerate()
            {
                match r {
                    Ok(report) if rank == 0 => eprintln!("{name} on {ranks} ranks:\n{report}"),
                    Ok(_) => {}
                    Err(e) => panic!("{name} on rank {rank} of {ranks}: {e}"),
                }
            }
        }
    }
}

#[test]
fn a_checkpoint_from_2_ranks_resumes_on_3() {
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
