//! Two-level KFAC against brute force: the coarse matrix against the dense mini-batch Fisher
//! of per-example gradients, the coarse vectors and the whole two-level direction against a
//! dense evaluation, Tselepidis' entries against their definition, bit-equality with KFAC when
//! the coarse term is off, failure paths and resuming to the bit.

mod common;

use common::{Net, add_diag, convnet, forgetful, joined, kron, mat64, mlp, solve, trace};
use kron_autodiff::{Gradients, ParamStore, Rng, Tape, Tensor};
use kron_layers::{Activation, Dense, FisherBlock, Module, Sequential};
use kron_optim::{
    Captures, CoarseConfig, CoarseSpace, EigenDamping, FisherKind, InverseMethod, Kfac, KfacConfig,
    Note, OptimError, Optimizer, Precision, TwoLevelKfac,
};

const LAMBDA: f64 = 0.05;

/// The configuration of the dense checks: empirical Fisher, statistics every step for conv
/// too, no clipping, no momentum, `f64` factors, λ = 0.05.
fn config() -> KfacConfig {
    KfacConfig::default()
        .with_fisher(FisherKind::Empirical)
        .with_kl_clip(None)
        .with_momentum(0.0)
        .with_conv_stats_period(1)
        .with_damping(LAMBDA as f32)
        .with_precision(Precision::F64)
        .with_schedule(kron_optim::Schedule::constant(1.0))
}

fn batch(net: &Net, seed: u64) -> (Tensor, Vec<usize>) {
    let conv = net.model.fisher_blocks()[0].is_conv();
    batch_of(net, seed, if conv { 5 } else { 7 })
}

fn batch_of(net: &Net, seed: u64, n: usize) -> (Tensor, Vec<usize>) {
    let conv = net.model.fisher_blocks()[0].is_conv();
    let x = if conv {
        Tensor::randn(&[n, 2, 5, 6], 0.0, 1.0, &mut Rng::new(seed))
    } else {
        Tensor::randn(&[n, 3], 0.0, 1.0, &mut Rng::new(seed))
    };
    let y = (0..x.dim(0)).map(|i| (i * 7 + seed as usize) % 2).collect();
    (x, y)
}

/// Gradients and captures of a batch, capturing what `opt` wants.
fn backward(net: &Net, opt: &dyn Optimizer, x: &Tensor, y: &[usize]) -> (Gradients, Captures) {
    let tape = Tape::new(&net.store).capturing(opt.wants().capture);
    let l = net.model.forward(tape.input(x.clone())).cross_entropy(y);
    let mut g = tape.backward(l);
    let c = g.take_captures();
    (g, c)
}

/// The per-example gradients (each from a backward of its own), joined.
fn per_example(net: &Net, x: &Tensor, y: &[usize]) -> Vec<Vec<f64>> {
    let blocks = net.model.fisher_blocks();
    let b = x.dim(0);
    let per = x.numel() / b;
    (0..b)
        .map(|n| {
            let mut shape = x.shape().to_vec();
            shape[0] = 1;
            let xn = Tensor::from_vec(x.data()[n * per..(n + 1) * per].to_vec(), &shape);
            let tape = Tape::new(&net.store);
            let l = net
                .model
                .forward(tape.input(xn))
                .cross_entropy(&y[n..n + 1]);
            let g = tape.backward(l);
            joined(&blocks, |id| g.get(id).unwrap().clone())
        })
        .collect()
}

/// The mini-batch Fisher `(1/B) sum_n grad_n grad_n^T`.
fn fisher(grads: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = grads[0].len();
    let mut f = vec![vec![0.0; n]; n];
    for g in grads {
        for i in 0..n {
            for j in 0..n {
                f[i][j] += g[i] * g[j] / grads.len() as f64;
            }
        }
    }
    f
}

fn matvec(m: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    m.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The blocks' offsets and sizes in the joined layout.
fn ranges(blocks: &[FisherBlock]) -> Vec<std::ops::Range<usize>> {
    let mut at = 0;
    blocks
        .iter()
        .map(|b| {
            let n = b.g_dim() * b.a_dim();
            at += n;
            at - n..at
        })
        .collect()
}

/// The one-level damped Kronecker block of the inverse method (π-split damping).
fn kfac_block(opt: &TwoLevelKfac, b: &FisherBlock) -> Vec<Vec<f64>> {
    let (a, g) = opt.factors(&b.path).unwrap();
    let (a, g) = (mat64(&a), mat64(&g));
    let pi = ((trace(&a) / a.len() as f64) / (trace(&g) / g.len() as f64)).sqrt();
    kron(
        &add_diag(g, LAMBDA.sqrt() / pi),
        &add_diag(a, pi * LAMBDA.sqrt()),
    )
}

/// `M^-1 x` block by block.
fn one_level(blocks: &[Vec<Vec<f64>>], r: &[std::ops::Range<usize>], x: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for (k, r) in blocks.iter().zip(r) {
        out.extend(solve(k.clone(), x[r.clone()].to_vec()));
    }
    out
}

fn normalized(mut x: Vec<f64>) -> Vec<f64> {
    let m = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    x.iter_mut().for_each(|v| *v /= m);
    x
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// The coarse vectors as full-length vectors (zero outside their block).
fn coarse_rows(opt: &TwoLevelKfac, r: &[std::ops::Range<usize>], n: usize) -> Vec<Vec<f64>> {
    opt.coarse_vectors()
        .into_iter()
        .map(|(b, v)| {
            let mut full = vec![0.0; n];
            for (dst, &x) in full[r[b].clone()].iter_mut().zip(v.data()) {
                *dst = x as f64;
            }
            full
        })
        .collect()
}

/// One step of two-level KFAC on a fresh net, with everything the dense checks need.
struct Stepped {
    net: Net,
    before: ParamStore,
    opt: TwoLevelKfac,
    /// The full-batch gradient and the per-example ones, joined.
    grad: Vec<f64>,
    fisher: Vec<Vec<f64>>,
    ranges: Vec<std::ops::Range<usize>>,
    report: kron_optim::StepReport,
}

fn stepped(net: Net, kfac: KfacConfig, coarse: CoarseConfig) -> Stepped {
    let (x, y) = batch(&net, 3);
    stepped_on(net, kfac, coarse, x, y)
}

fn stepped_on(
    mut net: Net,
    kfac: KfacConfig,
    coarse: CoarseConfig,
    x: Tensor,
    y: Vec<usize>,
) -> Stepped {
    let mut opt = TwoLevelKfac::new(&net.model, &net.store, kfac, coarse).unwrap();
    let blocks = net.model.fisher_blocks();
    let per = per_example(&net, &x, &y);
    let f = fisher(&per);
    let (g, caps) = backward(&net, &opt, &x, &y);
    let grad = joined(&blocks, |id| g.get(id).unwrap().clone());
    let before = net.store.clone();
    let report = opt.step(&mut net.store, &g, &caps).unwrap();
    let ranges = ranges(&blocks);
    Stepped {
        net,
        before,
        opt,
        grad,
        fisher: f,
        ranges,
        report,
    }
}

fn spaces() -> Vec<CoarseConfig> {
    [
        "nicolaides",
        "spectral",
        "residual",
        "krylov-nicolaides",
        "krylov-residual",
    ]
    .iter()
    .map(|n| CoarseConfig::parse(n).unwrap())
    .collect()
}

#[test]
fn the_coarse_matrix_is_the_exact_minibatch_fisher_between_the_coarse_vectors() {
    for coarse in spaces() {
        for net in [mlp(1), convnet(1)] {
            let s = stepped(net, config(), coarse);
            let n = s.grad.len();
            let rows = coarse_rows(&s.opt, &s.ranges, n);
            assert_eq!(
                rows.len(),
                coarse.vectors_per_layer() * s.ranges.len(),
                "{}",
                coarse.name()
            );
            let m = s.opt.coarse_matrix().expect("a coarse matrix");
            let nc = rows.len();
            let mut want = Vec::with_capacity(nc * nc);
            for ri in &rows {
                let fr = matvec(&s.fisher, ri);
                for rj in &rows {
                    want.push(dot(rj, &fr));
                }
            }
            assert_close(&format!("{} matrix", coarse.name()), m, &want, 1e-4);
            // Every vector is normalized by its largest entry.
            for r in &rows {
                let inf = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(
                    (inf - 1.0).abs() < 1e-6,
                    "{}: |r|_inf = {inf}",
                    coarse.name()
                );
            }
        }
    }
}

#[test]
fn the_two_level_direction_equals_its_dense_evaluation() {
    for coarse in spaces() {
        for net in [mlp(2), convnet(2)] {
            let s = stepped(net, config(), coarse);
            let blocks = s.net.model.fisher_blocks();
            let kb: Vec<_> = blocks.iter().map(|b| kfac_block(&s.opt, b)).collect();
            let n = s.grad.len();
            let u = one_level(&kb, &s.ranges, &s.grad);

            // The coarse vectors against their definitions.
            let rows = coarse_rows(&s.opt, &s.ranges, n);
            let expect: Vec<Vec<f64>> = match (coarse.space.unwrap(), coarse.krylov) {
                (CoarseSpace::Nicolaides, false) => s.ranges.iter().map(|r| ones(n, r)).collect(),
                (CoarseSpace::Nicolaides, true) => s
                    .ranges
                    .iter()
                    .flat_map(|r| {
                        let r1 = ones(n, r);
                        let r2 = one_level(&kb, &s.ranges, &r1);
                        [r1, normalized(r2)]
                    })
                    .collect(),
                (CoarseSpace::Residual, krylov) => {
                    // rho = v - F u - lambda u, then M^-1 rho per layer.
                    let fu = matvec(&s.fisher, &u);
                    let rho: Vec<f64> = (0..n).map(|k| s.grad[k] - fu[k] - LAMBDA * u[k]).collect();
                    let r = one_level(&kb, &s.ranges, &rho);
                    s.ranges
                        .iter()
                        .flat_map(|rg| {
                            let r1 = restricted(&r, n, rg);
                            let mut out = vec![normalized(r1.clone())];
                            if krylov {
                                out.push(normalized(one_level(&kb, &s.ranges, &r1)));
                            }
                            out
                        })
                        .collect()
                }
                (CoarseSpace::Spectral, _) => rows.clone(),
                (CoarseSpace::Tselepidis, _) => unreachable!(),
            };
            for (k, (got, want)) in rows.iter().zip(&expect).enumerate() {
                assert_close(&format!("{} vector {k}", coarse.name()), got, want, 1e-4);
            }

            // d = M^-1 v + R0^T (R0 F R0^T + lambda D)^-1 R0 v, D the blocks' sizes.
            let nc = rows.len();
            let per_layer = coarse.vectors_per_layer();
            let mut c = vec![vec![0.0; nc]; nc];
            for i in 0..nc {
                let fr = matvec(&s.fisher, &rows[i]);
                for j in 0..nc {
                    c[i][j] = dot(&rows[j], &fr);
                }
                c[i][i] += LAMBDA * s.ranges[i / per_layer].len() as f64;
            }
            let y: Vec<f64> = rows.iter().map(|r| dot(r, &s.grad)).collect();
            let beta = solve(c, y);
            let mut d = u.clone();
            for (r, b) in rows.iter().zip(&beta) {
                for (dk, rk) in d.iter_mut().zip(r) {
                    *dk += b * rk;
                }
            }
            let moved = joined(&blocks, |id| s.before.get(id).sub(s.net.store.get(id)));
            assert_close(&format!("{} direction", coarse.name()), &moved, &d, 1e-4);
            // The correction is not nothing.
            let diff = d
                .iter()
                .zip(&u)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff > 1e-6, "{}: no coarse correction", coarse.name());
            assert!(
                !s.report
                    .notes
                    .iter()
                    .any(|n| matches!(n, Note::CoarseSkipped { .. } | Note::CoarseFailed { .. })),
                "{}: {:?}",
                coarse.name(),
                s.report.notes
            );
        }
    }
}

fn ones(n: usize, r: &std::ops::Range<usize>) -> Vec<f64> {
    let mut v = vec![0.0; n];
    v[r.clone()].iter_mut().for_each(|x| *x = 1.0);
    v
}

fn restricted(x: &[f64], n: usize, r: &std::ops::Range<usize>) -> Vec<f64> {
    let mut v = vec![0.0; n];
    v[r.clone()].copy_from_slice(&x[r.clone()]);
    v
}

#[test]
fn with_one_layer_the_correction_is_its_closed_form() {
    // One dense layer: beta = <1, v> / ((1/B) sum_n <1, grad_n>^2 + lambda N) along all ones.
    let mut store = ParamStore::new();
    let mut rng = Rng::new(5);
    // A tanh after the layer: with softmax cross-entropy straight on it the all-ones
    // direction would not change the loss (the gradients of the logits sum to zero).
    let model = Sequential::new()
        .push(Dense::new(&mut store, "0", 3, 3, &mut rng))
        .push(Activation::Tanh);
    let net = Net { store, model };
    let s = stepped(net, config(), CoarseConfig::DEFAULT);
    let blocks = s.net.model.fisher_blocks();
    let kb = vec![kfac_block(&s.opt, &blocks[0])];
    let n = s.grad.len();
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let num = sum(&s.grad);
    // 1^T F 1 from the Fisher as (1/B) sum_n (1^T grad_n)^2 = 1^T F 1.
    let den = sum(&matvec(&s.fisher, &vec![1.0; n])) + LAMBDA * n as f64;
    let beta = num / den;
    let mut d = one_level(&kb, &s.ranges, &s.grad);
    d.iter_mut().for_each(|x| *x += beta);
    let moved = joined(&blocks, |id| s.before.get(id).sub(s.net.store.get(id)));
    assert_close("one-layer direction", &moved, &d, 1e-4);
    let m = s.opt.coarse_matrix().unwrap();
    assert!((m[0] - (den - LAMBDA * n as f64)).abs() < 1e-4 * m[0].abs());
    assert!(beta.abs() > 1e-3 * d.iter().fold(0.0f64, |m, x| m.max(x.abs())));
}

#[test]
fn the_spectral_vectors_from_the_eigenbasis_and_from_power_iterations_agree() {
    // A batch wider than every layer's input, so that the smallest eigenvalue of each A is
    // simple (with fewer examples than inputs it is 0, many times over, and any vector of
    // the null space is one).
    for net_fn in [mlp as fn(u64) -> Net, convnet] {
        let (x, y) = batch_of(&net_fn(4), 3, 40);
        let eig = stepped_on(
            net_fn(4),
            config().with_method(InverseMethod::Eigen(EigenDamping::Factored)),
            CoarseConfig::new(CoarseSpace::Spectral),
            x.clone(),
            y.clone(),
        );
        let pow = stepped_on(
            net_fn(4),
            config(),
            CoarseConfig::new(CoarseSpace::Spectral).with_power_iterations(5000),
            x,
            y,
        );
        for ((b, x), (_, y)) in eig
            .opt
            .coarse_vectors()
            .iter()
            .zip(pow.opt.coarse_vectors())
        {
            let (x, y): (Vec<f64>, Vec<f64>) = (
                x.data().iter().map(|&v| v as f64).collect(),
                y.data().iter().map(|&v| v as f64).collect(),
            );
            let cos = dot(&x, &y) / (dot(&x, &x) * dot(&y, &y)).sqrt();
            assert!(cos.abs() > 1.0 - 1e-5, "block {b}: cos {cos}\n{x:?}\n{y:?}");
        }
        // The eigenbasis vector belongs to the smallest eigenvalue of A: its Rayleigh
        // quotient is below every diagonal entry.
        let blocks = eig.net.model.fisher_blocks();
        for (bi, r) in eig.opt.coarse_vectors() {
            let (a, _) = eig.opt.factors(&blocks[bi].path).unwrap();
            let a = mat64(&a);
            let (o, d) = r.dims2();
            // R = u v^T: v is any nonzero row.
            let row = (0..o)
                .max_by(|&i, &j| {
                    let n = |k: usize| {
                        r.data()[k * d..(k + 1) * d]
                            .iter()
                            .map(|x| x.abs())
                            .sum::<f32>()
                    };
                    n(i).total_cmp(&n(j))
                })
                .unwrap();
            let v: Vec<f64> = r.data()[row * d..(row + 1) * d]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let rq = dot(&v, &matvec(&a, &v)) / dot(&v, &v);
            assert!((0..d).all(|i| rq <= a[i][i] + 1e-9), "block {bi}: rq {rq}");
        }
    }
}

#[test]
fn tselepidis_entries_equal_their_definition() {
    for net in [mlp(6), convnet(6)] {
        let mut net = net;
        let mut opt = TwoLevelKfac::new(
            &net.model,
            &net.store,
            config(),
            CoarseConfig::new(CoarseSpace::Tselepidis),
        )
        .unwrap();
        let (x, y) = batch(&net, 8);
        let (g, caps) = backward(&net, &opt, &x, &y);
        opt.step(&mut net.store, &g, &caps).unwrap();
        let blocks = net.model.fisher_blocks();
        let m = opt.coarse_matrix().unwrap().to_vec();
        let l = blocks.len();
        let scale = m.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        for i in 0..l {
            // The diagonal: (1^T G 1)(1^T A 1) of kron's own factors.
            let (a, gf) = opt.factors(&blocks[i].path).unwrap();
            let want = gf.data().iter().map(|&v| v as f64).sum::<f64>()
                * a.data().iter().map(|&v| v as f64).sum::<f64>();
            assert!(
                (m[i * l + i] - want).abs() < 1e-5 * scale,
                "diagonal {i}: {} vs {want}",
                m[i * l + i]
            );
            for j in 0..l {
                // Cross factors from the captures, aligned to the smaller location count.
                let (ci, cj) = (&caps[&blocks[i].layer], &caps[&blocks[j].layer]);
                let t = ci.locations.min(cj.locations);
                let b = ci.batch;
                let (mut gsum, mut asum) = (0.0f64, 0.0f64);
                for n in 0..b {
                    for k in 0..t {
                        let ri = n * ci.locations + k * ci.locations / t;
                        let rj = n * cj.locations + k * cj.locations / t;
                        let row =
                            |c: &kron_autodiff::LayerCapture, r: usize, g: bool| -> Vec<f64> {
                                let t = if g { &c.g } else { &c.a };
                                let w = t.dim(1);
                                let mut v: Vec<f64> = t.data()[r * w..(r + 1) * w]
                                    .iter()
                                    .map(|&x| x as f64)
                                    .collect();
                                if !g && c.has_bias {
                                    v.push(1.0);
                                }
                                v
                            };
                        // 1^T (x y^T) 1 for each outer product of the cross factors.
                        let (gi, gj) = (row(ci, ri, true), row(cj, rj, true));
                        let (ai, aj) = (row(ci, ri, false), row(cj, rj, false));
                        for p in &gi {
                            for q in &gj {
                                gsum += p * q;
                            }
                        }
                        for p in &ai {
                            for q in &aj {
                                asum += p * q;
                            }
                        }
                    }
                }
                let want = gsum / (b * t) as f64 * asum / b as f64;
                let got = m[i * l + j];
                assert!(
                    (got - want).abs() < 1e-5 * scale,
                    "entry {i},{j}: {got} vs {want}"
                );
            }
        }
    }
}

/// `steps` steps of an optimizer on fresh batches from `seed`.
fn train(net: &mut Net, opt: &mut dyn Optimizer, seed: u64, steps: u64) {
    for s in 0..steps {
        let (x, y) = batch(net, seed + s);
        let (g, caps) = backward(net, opt, &x, &y);
        opt.step(&mut net.store, &g, &caps).unwrap();
    }
}

fn bits(store: &ParamStore) -> Vec<u32> {
    store
        .ids()
        .flat_map(|id| {
            store
                .get(id)
                .data()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn with_the_coarse_term_off_it_is_kfac_to_the_bit() {
    for net_fn in [mlp as fn(u64) -> Net, convnet] {
        let cfg = KfacConfig::default()
            .with_fisher(FisherKind::Empirical)
            .with_inverse_period(2);
        let mut a = net_fn(7);
        let mut b = net_fn(7);
        let mut kfac = Kfac::new(&a.model, &a.store, cfg).unwrap();
        let mut two = TwoLevelKfac::new(&b.model, &b.store, cfg, CoarseConfig::OFF).unwrap();
        train(&mut a, &mut kfac, 11, 6);
        train(&mut b, &mut two, 11, 6);
        assert_eq!(bits(&a.store), bits(&b.store));
        let (sa, sb) = (kfac.state(), two.state());
        assert_eq!(sa.tensors.len(), sb.tensors.len());
        for (k, t) in &sa.tensors {
            let k2 = k.replacen("kfac.", "kfac-2l.", 1);
            assert_eq!(t.data(), sb.tensors[&k2].data(), "{k}");
        }
    }
}

#[test]
fn the_corrected_direction_trains_and_resumes_to_the_bit() {
    for name in [
        "nicolaides",
        "spectral",
        "tselepidis",
        "krylov-residual",
        "krylov-nicolaides",
    ] {
        for net_fn in [mlp as fn(u64) -> Net, convnet] {
            let coarse = CoarseConfig::parse(name).unwrap();
            let cfg = KfacConfig::default()
                .with_fisher(FisherKind::Empirical)
                .with_inverse_period(2)
                .with_conv_stats_period(2);
            let mut net = net_fn(9);
            let mut opt = TwoLevelKfac::new(&net.model, &net.store, cfg, coarse).unwrap();
            train(&mut net, &mut opt, 20, 3);
            let saved = (net.store.clone(), opt.state());
            train(&mut net, &mut opt, 40, 4);

            let mut resumed = Net {
                store: saved.0,
                model: net_fn(9).model,
            };
            let mut again = TwoLevelKfac::new(&resumed.model, &resumed.store, cfg, coarse).unwrap();
            again.load_state(saved.1.clone()).unwrap();
            train(&mut resumed, &mut again, 40, 4);
            assert_eq!(bits(&net.store), bits(&resumed.store), "{name}");

            // Another coarse space, or KFAC, refuses the state and stays as it was.
            let other = if name == "nicolaides" {
                "residual"
            } else {
                "nicolaides"
            };
            let mut wrong = TwoLevelKfac::new(
                &resumed.model,
                &resumed.store,
                cfg,
                CoarseConfig::parse(other).unwrap(),
            )
            .unwrap();
            let before = wrong.state();
            assert!(matches!(
                wrong.load_state(saved.1.clone()),
                Err(OptimError::Config { .. } | OptimError::BadState { .. })
            ));
            assert_eq!(wrong.state().meta, before.meta);
            let mut kfac = Kfac::new(&resumed.model, &resumed.store, cfg).unwrap();
            assert!(kfac.load_state(saved.1).is_err());
        }
    }
}

#[test]
fn the_residual_space_asks_for_every_layer_each_step() {
    let net = convnet(3);
    let cfg = KfacConfig::default().with_fisher(FisherKind::Empirical);
    let res = TwoLevelKfac::new(
        &net.model,
        &net.store,
        cfg,
        CoarseConfig::parse("residual").unwrap(),
    )
    .unwrap();
    let nic = TwoLevelKfac::new(&net.model, &net.store, cfg, CoarseConfig::DEFAULT).unwrap();
    let mut net = net;
    let (mut res, mut nic) = (res, nic);
    train(&mut net, &mut res, 1, 1);
    let mut net2 = convnet(3);
    train(&mut net2, &mut nic, 1, 1);
    // Step 1: the conv block's statistics are not due (every 10 steps).
    assert_eq!(res.wants().capture.len(), 2);
    assert_eq!(nic.wants().capture.len(), 1);
}

#[test]
fn non_finite_inputs_change_nothing_or_skip_the_coarse_term_with_a_note() {
    for name in ["nicolaides", "residual"] {
        let mut net = mlp(12);
        let coarse = CoarseConfig::parse(name).unwrap();
        let cfg = KfacConfig::default().with_fisher(FisherKind::Empirical);
        let mut opt = TwoLevelKfac::new(&net.model, &net.store, cfg, coarse).unwrap();
        train(&mut net, &mut opt, 1, 2);
        let (x, y) = batch(&net, 5);

        // A NaN gradient: refused, nothing changes.
        let (g, caps) = backward(&net, &opt, &x, &y);
        let before = (bits(&net.store), opt.state());
        let mut bad: Vec<Option<Tensor>> = net.store.ids().map(|id| g.get(id).cloned()).collect();
        bad[0].as_mut().unwrap().data_mut()[0] = f32::NAN;
        assert!(
            opt.step(&mut net.store, &Gradients::from_params(bad), &caps)
                .is_err()
        );
        assert_eq!(bits(&net.store), before.0);
        let after = opt.state();
        assert_eq!(after.meta, before.1.meta);
        for (k, t) in &before.1.tensors64 {
            assert_eq!(t.data(), after.tensors64[k].data(), "{k}");
        }

        // Infinite captures of one layer: statistics skipped, the coarse term kept (averaged
        // spaces use their last matrix) or skipped (the residual needs this step's), finite.
        let (g, mut caps) = backward(&net, &opt, &x, &y);
        let layer = net.model.fisher_blocks()[1].layer;
        caps.get_mut(&layer).unwrap().g.data_mut()[0] = f32::INFINITY;
        let r = opt.step(&mut net.store, &g, &caps).unwrap();
        assert!(
            r.notes
                .iter()
                .any(|n| matches!(n, Note::StatsSkipped { .. }))
        );
        let skipped = r
            .notes
            .iter()
            .any(|n| matches!(n, Note::CoarseSkipped { .. }));
        assert_eq!(skipped, name == "residual", "{name}: {:?}", r.notes);
        assert!(net.store.ids().all(|id| net.store.get(id).all_finite()));
    }
}

#[test]
fn small_damping_in_f32_stays_finite() {
    // The authors' code produced NaN after a refresh at damping 1e-5 in f32.
    for name in [
        "nicolaides",
        "spectral",
        "residual",
        "tselepidis",
        "krylov-residual",
    ] {
        for net_fn in [mlp as fn(u64) -> Net, convnet] {
            let mut net = net_fn(13);
            let cfg = KfacConfig::default()
                .with_fisher(FisherKind::Empirical)
                .with_damping(1e-5)
                .with_inverse_period(3)
                .with_schedule(kron_optim::Schedule::constant(0.01));
            let coarse = CoarseConfig::parse(name).unwrap();
            let mut opt = TwoLevelKfac::new(&net.model, &net.store, cfg, coarse).unwrap();
            train(&mut net, &mut opt, 50, 20);
            assert!(
                net.store.ids().all(|id| net.store.get(id).all_finite()),
                "{name}"
            );
            assert!(opt.coarse_matrix().is_some(), "{name}");
        }
    }
}

#[test]
fn invalid_coarse_settings_are_refused_by_name() {
    let net = mlp(1);
    let bad = CoarseConfig::new(CoarseSpace::Spectral).with_krylov(true);
    match TwoLevelKfac::new(&net.model, &net.store, KfacConfig::default(), bad) {
        Err(OptimError::Config { field, .. }) => assert_eq!(field, "coarse.krylov"),
        _ => panic!("Krylov with the spectral space accepted"),
    }
    match CoarseConfig::parse("coarse") {
        Err(OptimError::Config { field, detail }) => {
            assert_eq!(field, "coarse");
            assert!(detail.contains("krylov-residual"), "{detail}");
        }
        _ => panic!("an unknown space parsed"),
    }
    for name in [
        "off",
        "nicolaides",
        "spectral",
        "residual",
        "tselepidis",
        "krylov-nicolaides",
        "krylov-residual",
    ] {
        assert_eq!(CoarseConfig::parse(name).unwrap().name(), name);
    }
}

#[test]
fn parameters_outside_every_block_are_reported_or_refused() {
    let (mut store, model) = forgetful(3);
    let coarse = CoarseConfig::new(CoarseSpace::Nicolaides);
    let mut opt = TwoLevelKfac::new(&model, &store, KfacConfig::default(), coarse).unwrap();
    assert_eq!(opt.outside_blocks(), ["second.weight", "second.bias"]);
    let x = Tensor::randn(&[5, 3], 0.0, 1.0, &mut Rng::new(4));
    let y = [0, 1, 1, 0, 1];
    for step in 0..2 {
        let tape = Tape::new(&store).capturing(opt.wants().capture);
        let l = model.forward(tape.input(x.clone())).cross_entropy(&y);
        let mut g = tape.backward(l);
        let c = g.take_captures();
        let r = opt.step(&mut store, &g, &c).unwrap();
        let outside: Vec<&Note> = r
            .notes
            .iter()
            .filter(|n| matches!(n, Note::OutsideBlocks { .. }))
            .collect();
        let expected = Note::OutsideBlocks {
            params: vec!["second.weight".into(), "second.bias".into()],
        };
        assert_eq!(outside, if step == 0 { vec![&expected] } else { vec![] });
    }
    match TwoLevelKfac::new(
        &model,
        &store,
        KfacConfig::default().with_strict_blocks(true),
        coarse,
    ) {
        Err(OptimError::Config { field, detail }) => {
            assert_eq!(field, "step.strict_blocks");
            assert!(detail.contains("second.weight, second.bias"), "{detail}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("strict blocks accepted parameters outside every block"),
    }
}
