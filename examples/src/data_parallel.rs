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

/// The checks of [`CHECKS`] that take no checkpoint path.
pub fn checks_without_path() -> impl Iterator<Item = &'static str> {
    CHECKS
        .into_iter()
        .filter(|c| !matches!(*c, "save" | "resume"))
}

/// The names of the checks [`check`] runs.
pub const CHECKS: [&str; 8] = [
    "equivalence",
    "owners",
    "replicated",
    "directions",
    "nan",
    "mismatch",
    "save",
    "resume",
];

/// One check of data-parallel training, run by every rank of `dp` (under `mpirun`, or as
/// threads); `Ok` carries the lines rank 0 reports, `Err` what failed. `path` is the
/// checkpoint of `save` and `resume`:
///
/// * `equivalence`: every optimizer of [`optimizers`] trains [`STEPS`] steps; every rank
///   holds the same bits, within 1e-4 relative of one process (which each rank runs itself);
/// * `owners`: each refresh (KFAC, KFC) and each root (Shampoo) is computed once per period,
///   by its owner;
/// * `replicated`: with the refreshes computed on every rank instead
///   ([`DataParallel::split_refreshes`]), every optimizer trains to the same bits as with the
///   split, each rank computing every refresh; ranks that disagree on it refuse to start;
/// * `directions`: with each block's direction computed by its owner and broadcast
///   ([`DataParallel::split_directions`]), every optimizer trains to the same bits as with
///   every rank computing all of them;
/// * `nan`: a NaN in the last rank's shard is refused on every rank, naming that rank;
/// * `mismatch`: the last rank, started with another damping, makes every rank refuse;
/// * `save`: 10 steps of each of KFAC, two-level KFAC and Shampoo, each checkpointed by rank 0
///   to `path` plus the optimizer's name;
/// * `resume`: the checkpoints of `save` (from any number of ranks) resumed for 10 more steps
///   land within 1e-4 of one process's 20.
pub fn check(
    name: &str,
    dp: &DataParallel,
    path: Option<&std::path::Path>,
) -> Result<String, String> {
    match name {
        "equivalence" => equivalence(dp),
        "owners" => owners(dp),
        "replicated" => replicated(dp),
        "directions" => directions(dp),
        "nan" => nan(dp),
        "mismatch" => mismatch(dp),
        "save" | "resume" => {
            let path = path.ok_or_else(|| format!("{name} needs a checkpoint path"))?;
            checkpoints(dp, name == "save", path)
        }
        _ => Err(format!(
            "no check {name:?}; the checks are {}",
            CHECKS.join(", ")
        )),
    }
}

/// Whether every rank holds these values, to the bit (their hashes gathered).
fn agreed(dp: &DataParallel, v: &[(String, Vec<f32>)]) -> bool {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for x in v.iter().flat_map(|(_, x)| x) {
        h = (h ^ u64::from(x.to_bits())).wrapping_mul(0x0100_0000_01b3);
    }
    // Two 32-bit halves, each exact in an f64.
    let all = dp
        .comm()
        .all_gather_f64(&[(h >> 32) as f64, (h & 0xffff_ffff) as f64]);
    all.chunks(2).all(|c| c == &all[..2])
}

fn equivalence(dp: &DataParallel) -> Result<String, String> {
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    for (name, problem, make) in optimizers() {
        let one = values(&train(&DataParallel::single(), problem, make, 0..STEPS, None).0);
        let mine = values(&train(dp, problem, make, 0..STEPS, None).0);
        let d = relative_difference(&mine, &one);
        let same = agreed(dp, &mine);
        lines.push(format!(
            "{name}: {} ranks vs one process {d:.2e}, ranks agree: {same}",
            dp.size()
        ));
        if d > 1e-4 || !same {
            failed.push(name);
        }
    }
    let report = lines.join("\n");
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(format!("{report}\nfailed: {}", failed.join(", ")))
    }
}

/// [`STEPS`] steps of `opt` on `problem` from `params`, on `dp`'s ranks.
fn steps_on(
    dp: &DataParallel,
    opt: &mut dyn Optimizer,
    problem: Problem,
    params: &mut ParamStore,
) -> Result<(), String> {
    let model = problem.build(&mut ParamStore::new());
    let mut rng = Rng::new(5);
    for step in 0..STEPS {
        let (x, y) = problem.batch(step);
        dp.train_step(&model, problem.loss(), params, opt, &x, &y, &mut rng)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn owners(dp: &DataParallel) -> Result<String, String> {
    let steps = |opt: &mut dyn Optimizer, problem: Problem, params: &mut ParamStore| {
        steps_on(dp, opt, problem, params)
    };
    let mut lines = Vec::new();
    // (what, computed here, owners of every item, refreshes per item in 20 steps)
    let mut runs: Vec<(String, u64, Vec<usize>)> = Vec::new();
    for problem in [Problem::Classifier, Problem::Conv] {
        let mut params = ParamStore::new();
        let model = problem.build(&mut params);
        let mut opt = Kfac::new(&model, &params, kfac_base()).map_err(|e| e.to_string())?;
        steps(&mut opt, problem, &mut params)?;
        let d = opt.driver();
        runs.push((
            format!("kfac {problem:?}"),
            d.computed_refreshes(),
            d.refresh_owners(),
        ));
    }
    let mut params = ParamStore::new();
    Problem::Classifier.build(&mut params);
    let mut c = AdaptiveConfig::shampoo();
    c.refresh.period = 5;
    let mut opt = Shampoo::new(&params, c).map_err(|e| e.to_string())?;
    steps(&mut opt, Problem::Classifier, &mut params)?;
    let owners: Vec<usize> = opt.root_owners().into_iter().flatten().flatten().collect();
    runs.push(("shampoo roots".into(), opt.computed_roots(), owners));
    let mut ok = true;
    for (what, computed, owners) in runs {
        let all = dp.comm().all_gather_f64(&[computed as f64]);
        let want: Vec<f64> = (0..dp.size())
            .map(|r| 4.0 * owners.iter().filter(|&&o| o == r).count() as f64)
            .collect();
        ok &= all == want;
        lines.push(format!(
            "{what}: owners {owners:?}, computed per rank {all:?}, expected {want:?}"
        ));
    }
    let report = lines.join("\n");
    if ok { Ok(report) } else { Err(report) }
}

fn replicated(dp: &DataParallel) -> Result<String, String> {
    let everywhere = dp.clone().split_refreshes(false);
    let (mut lines, mut ok) = same_bits(dp, &everywhere, "refreshes on every rank");
    // Every rank computes every refresh (KFAC: all blocks, every 5 steps of 20).
    let problem = Problem::Classifier;
    let mut params = ParamStore::new();
    let model = problem.build(&mut params);
    let mut opt = Kfac::new(&model, &params, kfac_base()).map_err(|e| e.to_string())?;
    steps_on(&everywhere, &mut opt, problem, &mut params)?;
    let blocks = opt.driver().refresh_owners().len() as f64;
    let all = dp
        .comm()
        .all_gather_f64(&[opt.driver().computed_refreshes() as f64]);
    let want = vec![4.0 * blocks; dp.size()];
    ok &= all == want;
    lines.push(format!(
        "kfac replicated: computed per rank {all:?}, expected {want:?}"
    ));
    // Ranks that disagree on it refuse to start.
    let last = dp.size() - 1;
    let mixed = dp.clone().split_refreshes(dp.rank() != last);
    let setup = kron::setup_of(&params, &opt, serde_json::json!({ "batch": BATCH }));
    match mixed.check_setup(&setup) {
        Err(e) if dp.size() > 1 && e.ranks == [last] && e.field.contains("split refreshes") => {
            lines.push(e.to_string());
        }
        Ok(()) if dp.size() == 1 => lines.push("one rank: nothing to disagree with".into()),
        other => {
            ok = false;
            lines.push(format!("rank {}: mixed split: {other:?}", dp.rank()));
        }
    }
    let report = lines.join("\n");
    if ok { Ok(report) } else { Err(report) }
}

fn directions(dp: &DataParallel) -> Result<String, String> {
    let owners = dp.clone().split_directions(true);
    let (lines, ok) = same_bits(dp, &owners, "directions by their owners");
    let report = lines.join("\n");
    if ok { Ok(report) } else { Err(report) }
}

/// Whether every optimizer trains to the same bits on `variant` as on `dp`, every rank
/// agreeing: a line per optimizer, and whether all of them did.
fn same_bits(dp: &DataParallel, variant: &DataParallel, what: &str) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    for (name, problem, make) in optimizers() {
        let base = values(&train(dp, problem, make, 0..STEPS, None).0);
        let other = values(&train(variant, problem, make, 0..STEPS, None).0);
        let same = other == base && agreed(dp, &other);
        ok &= same;
        lines.push(format!(
            "{name}: {what} give the same bits on every rank: {same}"
        ));
    }
    (lines, ok)
}

fn nan(dp: &DataParallel) -> Result<String, String> {
    let last = dp.size() - 1;
    let problem = Problem::Classifier;
    let mut params = ParamStore::new();
    let model = problem.build(&mut params);
    let mut opt = Kfac::new(&model, &params, kfac_base()).map_err(|e| e.to_string())?;
    let (mut x, y) = problem.batch(0);
    let (first, _) = kron::optim::comm::shard_range(BATCH, dp.size(), last);
    x.data_mut()[first * 6] = f32::NAN;
    let before = values(&params);
    let r = dp.train_step(
        &model,
        problem.loss(),
        &mut params,
        &mut opt,
        &x,
        &y,
        &mut Rng::new(5),
    );
    match r {
        // The rank that saw it names the parameter; every rank names the rank.
        Err(e @ OptimError::NonFiniteGradientOnRanks { .. })
            if matches!(&e, OptimError::NonFiniteGradientOnRanks { ranks, param }
                if ranks == &[last] && param.is_some() == (dp.rank() == last))
                && e.to_string().contains(&format!("rank(s) {last}"))
                && values(&params) == before
                && opt.steps_taken() == 0 =>
        {
            Ok(format!("rank {} of {}: {e}", dp.rank(), dp.size()))
        }
        other => Err(format!("rank {}: {other:?}", dp.rank())),
    }
}

fn mismatch(dp: &DataParallel) -> Result<String, String> {
    let last = dp.size() - 1;
    let mut params = ParamStore::new();
    let model = Problem::Classifier.build(&mut params);
    let lambda = if dp.rank() == last { 0.01 } else { 0.001 };
    let opt =
        Kfac::new(&model, &params, kfac_base().with_damping(lambda)).map_err(|e| e.to_string())?;
    let setup = kron::setup_of(&params, &opt, serde_json::json!({ "batch": BATCH }));
    match dp.check_setup(&setup) {
        Err(e)
            if dp.size() > 1
                && e.ranks == [last]
                && e.field.ends_with("damping.lambda")
                && e.to_string().contains(&format!("rank {last} has")) =>
        {
            Ok(e.to_string())
        }
        Ok(()) if dp.size() == 1 => Ok("one rank: nothing to disagree with".into()),
        other => Err(format!("rank {}: {other:?}", dp.rank())),
    }
}

fn checkpoints(dp: &DataParallel, save: bool, path: &std::path::Path) -> Result<String, String> {
    let mut lines = Vec::new();
    for name in ["kfac", "kfac-2l-nicolaides", "shampoo"] {
        let (_, problem, make) = optimizers()
            .into_iter()
            .find(|o| o.0 == name)
            .expect("a listed optimizer");
        let file = path.with_extension(format!("{name}.safetensors"));
        if save {
            let (params, state, rng) = train(dp, problem, make, 0..10, None);
            if dp.rank() == 0 {
                let mut opt = make(&problem.build(&mut ParamStore::new()), &params);
                opt.load_state(state).map_err(|e| e.to_string())?;
                let train = TrainState {
                    step: 10,
                    rng,
                    data: None,
                };
                save_checkpoint(&file, &params, opt.as_ref(), &train).map_err(|e| e.to_string())?;
            }
            dp.comm().barrier();
            lines.push(format!(
                "{name}: saved by rank 0 of {} to {}",
                dp.size(),
                file.display()
            ));
        } else {
            let mut params = ParamStore::new();
            let model = problem.build(&mut params);
            let mut opt = make(&model, &params);
            let st =
                load_checkpoint(&file, &mut params, opt.as_mut()).map_err(|e| e.to_string())?;
            let resumed = (params, opt.state(), st.rng);
            let mine = values(&train(dp, problem, make, 10..STEPS, Some(&resumed)).0);
            let one = values(&train(&DataParallel::single(), problem, make, 0..STEPS, None).0);
            let d = relative_difference(&mine, &one);
            let same = agreed(dp, &mine);
            lines.push(format!(
                "{name}: resumed on {} ranks vs one process {d:.2e}, ranks agree: {same}",
                dp.size()
            ));
            if d > 1e-4 || !same {
                return Err(lines.join("\n"));
            }
        }
    }
    Ok(lines.join("\n"))
}
