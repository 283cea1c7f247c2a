//! Runs the code the book shows and checks that it computes what the text says, against
//! brute-force computations written out here element by element.

#[path = "../../book/snippets/data_parallel.rs"]
mod data_parallel;
#[path = "../../book/snippets/digits.rs"]
mod digits;
#[path = "../../book/snippets/gpu.rs"]
mod gpu;
#[path = "../../book/snippets/kfac.rs"]
mod kfac;
#[path = "../../book/snippets/kfc.rs"]
mod kfc;
#[path = "../../book/snippets/natural_gradient.rs"]
mod natural_gradient;
#[path = "../../book/snippets/shampoo.rs"]
mod shampoo;
#[path = "../../book/snippets/tape.rs"]
mod tape;
#[path = "../../book/snippets/two_level.rs"]
mod two_level;
#[path = "../../book/snippets/your_model.rs"]
mod your_model;

use kron_autodiff::{LayerCapture, Tensor};

/// `(1/scale) sum_r v_r v_r^T` over the rows of `rows`, each with a 1 appended when `ones`.
fn outer_mean(rows: &Tensor, ones: bool, scale: f64) -> Vec<f64> {
    let (n, d) = rows.dims2();
    let m = d + usize::from(ones);
    let mut out = vec![0.0f64; m * m];
    for r in 0..n {
        let mut v: Vec<f64> = rows.data()[r * d..(r + 1) * d]
            .iter()
            .map(|&x| x as f64)
            .collect();
        if ones {
            v.push(1.0);
        }
        for i in 0..m {
            for j in 0..m {
                out[i * m + j] += v[i] * v[j] / scale;
            }
        }
    }
    out
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}, element {k}: got {g}, want {w} (|diff| {err})"
        );
    }
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&x| x as f64).collect()
}

/// `[dW | db]` from the tape's parameter gradients, for comparison with `weight_grad`.
fn w_aug(w: &Tensor, b: &Tensor) -> Vec<f64> {
    let out = b.numel();
    let d = w.numel() / out;
    let mut v = Vec::with_capacity(out * (d + 1));
    for o in 0..out {
        v.extend(w.data()[o * d..(o + 1) * d].iter().map(|&x| x as f64));
        v.push(b.data()[o] as f64);
    }
    v
}

#[test]
fn reverse_mode_matches_the_chain_rule() {
    let (y, grad, nodes) = tape::reverse_mode();
    assert_eq!(nodes, 6, "x, w, matmul, tanh, square, mean");
    let x = [[1.0f64, 2.0, 3.0], [-1.0, 0.5, 2.0]];
    let w = [0.5f64, -1.0, 0.25];
    let mut loss = 0.0;
    let mut dw = [0.0f64; 3];
    for row in &x {
        let z: f64 = row.iter().zip(&w).map(|(a, b)| a * b).sum();
        let t = z.tanh();
        loss += t * t / 2.0;
        for j in 0..3 {
            // d/dw_j of tanh(z)^2 / 2 = tanh(z) (1 - tanh(z)^2) x_j
            dw[j] += t * (1.0 - t * t) * row[j];
        }
    }
    assert_close("loss", &[y], &[loss], 1e-6);
    assert_eq!(grad.shape(), &[3, 1]);
    assert_close("dL/dw", grad.data(), &dw, 1e-5);
}

#[test]
fn dense_capture_scales_g_to_per_example_gradients() {
    let run = tape::dense_capture();
    assert!(run.loss.is_finite() && run.loss > 0.0);
    let cap = run.grads.capture(run.mlp.fc2).unwrap();
    assert_eq!((cap.batch, cap.locations, cap.has_bias), (8, 1, true));

    // Each row of the captured g is the gradient of that example's own loss, found by brute force.
    let per_example = tape::per_example_g(&run);
    assert_eq!(per_example.len(), 8);
    for (i, gi) in per_example.iter().enumerate() {
        assert_eq!(gi.shape(), &[1, 3]);
        assert_close(
            &format!("g row {i}"),
            &cap.g.data()[i * 3..(i + 1) * 3],
            &to_f64(gi),
            1e-5,
        );
    }

    // A and G are the batch means of the outer products, with a 1 appended to each a.
    assert_close(
        "A",
        cap.a_factor().data(),
        &outer_mean(&cap.a, true, 8.0),
        1e-5,
    );
    let g_rows = Tensor::from_vec(
        per_example.iter().flat_map(|g| g.data().to_vec()).collect(),
        &[8, 3],
    );
    assert_close(
        "G",
        cap.g_factor().data(),
        &outer_mean(&g_rows, false, 8.0),
        1e-5,
    );
}

#[test]
fn captures_recompute_the_tape_gradients() {
    let run = tape::dense_capture();
    let g = &run.grads;
    for (layer, w, b) in [
        (run.mlp.fc1, run.mlp.w1, run.mlp.b1),
        (run.mlp.fc2, run.mlp.w2, run.mlp.b2),
    ] {
        let cap: &LayerCapture = g.capture(layer).unwrap();
        let want = w_aug(g.get(w).unwrap(), g.get(b).unwrap());
        assert_close("weight_grad", cap.weight_grad().data(), &want, 1e-5);
    }
}

#[test]
fn one_example_fisher_is_exactly_g_kron_a() {
    let run = tape::dense_capture();
    let (brute, kfac) = tape::one_example_fisher(&run);
    assert_eq!(brute.shape(), &[18, 18], "3 outputs x (5 inputs + 1)");
    assert_eq!(kfac.shape(), brute.shape());
    assert_close("v v^T vs G ⊗ A", kfac.data(), &to_f64(&brute), 1e-5);
}

#[test]
fn kron_is_the_kronecker_product() {
    // I_2 ⊗ [1 2] is block diagonal; [1 2] ⊗ I_2 interleaves.
    let eye = Tensor::eye(2);
    let row = Tensor::from_vec(vec![1.0, 2.0], &[1, 2]);
    assert_eq!(
        tape::kron(&eye, &row).data(),
        &[1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]
    );
    assert_eq!(
        tape::kron(&row, &eye).data(),
        &[1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 2.0]
    );
}

#[test]
fn conv_capture_follows_kfc_conventions() {
    let run = tape::conv_capture();
    let cap = run.grads.capture(run.layer).unwrap();
    let (b, t) = (cap.batch as f64, cap.locations as f64);
    // Omega sums over locations (divides by B only); Gamma averages (divides by B |T|).
    assert_close(
        "Omega",
        cap.a_factor().data(),
        &outer_mean(&cap.a, true, b),
        1e-4,
    );
    assert_close(
        "Gamma",
        cap.g_factor().data(),
        &outer_mean(&cap.g, false, b * t),
        1e-4,
    );
    // (1/B) sum over examples and locations of g_it a_aug_it^T is the tape's [dW | db].
    let want = w_aug(
        run.grads.get(run.weight).unwrap(),
        run.grads.get(run.bias).unwrap(),
    );
    assert_close("conv weight_grad", cap.weight_grad().data(), &want, 1e-5);
}

#[test]
fn sampled_fisher_of_a_gaussian_model_is_the_identity() {
    let run = tape::true_fisher();
    assert_eq!(
        run.nodes_after,
        run.nodes_before + 1,
        "the sampled loss is one node"
    );
    assert_eq!(run.g_true.shape(), &[3, 3]);
    let eye = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    // 4096 draws: each entry is within a few standard errors (about 0.016 to 0.022) of I.
    for (k, (&g, e)) in run.g_true.data().iter().zip(eye).enumerate() {
        assert!((g - e).abs() < 0.1, "G[{k}] = {g}, expected about {e}");
    }
    // The empirical Fisher uses the training targets, which this model does not fit: its G is
    // the second moment of the residuals, nowhere near I.
    for i in 0..3 {
        let d = run.g_empirical.data()[i * 3 + i];
        assert!(d > 3.0, "empirical G[{i},{i}] = {d}");
    }
}

/// The mean of a slice.
fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

/// The KFAC chapter's table of defaults gives the precision `KfacConfig::DEFAULT` has: `f32`,
/// on the CPU as on the GPU.
#[test]
fn the_kfac_defaults_table_states_the_default_precision() {
    use kron::optim::{KfacConfig, Precision};
    assert_eq!(KfacConfig::DEFAULT.refresh.precision, Precision::F32);
    let chapter = concat!(env!("CARGO_MANIFEST_DIR"), "/../book/src/kfac.md");
    let text = std::fs::read_to_string(chapter).unwrap();
    let row = text
        .lines()
        .find(|l| l.contains("`with_precision`"))
        .expect("a row for the precision");
    assert!(row.contains("`f32` on every backend"), "{row}");
}

#[test]
fn tutorial_training_raises_the_test_accuracy() {
    // 20 epochs of 45 batches (1437 examples: 44 of 32 and one of 29).
    let run = digits::train_digits(20);
    assert_eq!(run.losses.len(), 900);
    assert_eq!(run.accuracy_by_epoch.len(), 20);
    assert_eq!(run.accuracy_by_epoch[19], run.accuracy_after);
    // Ten classes: an untrained model is near chance.
    assert!(run.accuracy_before < 0.25, "{}", run.accuracy_before);
    assert!(run.accuracy_after > 0.9, "{}", run.accuracy_after);
    assert!(
        run.test_loss.is_finite() && run.test_loss < 0.5,
        "{}",
        run.test_loss
    );
    let (first, last) = (mean(&run.losses[..50]), mean(&run.losses[850..]));
    assert!(last < 0.2 * first, "loss {first} -> {last}");
}

#[test]
fn a_resumed_run_has_the_same_bits_as_one_that_never_stopped() {
    let dir = std::env::temp_dir().join(format!("kron-book-digits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let r = digits::checkpoint_and_resume(&dir.join("digits.safetensors")).unwrap();
    assert_eq!(r.loaded.step, 40);
    // 40 batches of 32 into an epoch of 1437 examples: the checkpoint is mid-epoch.
    assert_eq!(r.loaded.data.as_ref().map(|b| b.cursor), Some(1280));
    assert!(r.resumed == r.straight, "parameters differ after resuming");
    assert!(
        r.resumed_state == r.straight_state,
        "optimizer state differs after resuming"
    );
    assert!(
        r.straight_state
            .tensors
            .keys()
            .any(|k| k.ends_with("fc1.A"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn natural_gradient_solves_the_ill_conditioned_problem_and_gradient_descent_does_not() {
    let r = natural_gradient::race(30);
    let opt = r.optimum as f32;
    let start = r.gd[0] - opt;
    assert!(start > 1.0, "initial excess loss {start}");
    assert_eq!(
        (r.gd.len(), r.sampled.len(), r.empirical.len()),
        (31, 31, 31)
    );
    // The true Fisher: within 1e-5 of the start's excess after 3 steps, and it stays there.
    for (k, &l) in r.sampled.iter().enumerate().skip(3) {
        assert!((l - opt).abs() < 1e-5 * start, "step {k}: {l} vs {opt}");
    }
    // Gradient descent at its largest sensible rate is still far off after 30 steps: the
    // directions of small curvature have hardly moved.
    let gd = r.gd[30] - opt;
    assert!(gd > 3e-3 * start, "gd excess {gd}");
    assert!(r.gd.windows(2).all(|w| w[1] < w[0]), "gd decreases");
    // The empirical Fisher shrinks with the residuals: its steps grow too long near the
    // optimum, and the loss never settles.
    let worst = r.empirical[20..].iter().fold(0.0f32, |m, &l| m.max(l));
    assert!(
        worst > 20.0 * opt,
        "empirical Fisher settled: {:?}",
        r.empirical
    );
}

#[test]
fn natural_gradient_is_invariant_to_the_units_of_the_inputs() {
    let r = natural_gradient::invariance(5);
    for (k, (a, b)) in r.kfac.iter().zip(&r.kfac_rescaled).enumerate() {
        assert!((a - b).abs() <= 5e-3 * a, "KFAC step {k}: {a} vs {b}");
    }
    // SGD with one learning rate: in the new units the curvature is 100 times larger, and the
    // same rate makes a different (here much faster) descent.
    assert_eq!(
        r.sgd[0], r.sgd_rescaled[0],
        "the same function at the start"
    );
    assert!(
        r.sgd_rescaled[5] < 0.1 * r.sgd[5],
        "{:?} {:?}",
        r.sgd,
        r.sgd_rescaled
    );
}

#[test]
fn kfac_trains_the_digits_and_refreshes_on_schedule() {
    let run = kfac::kfac_digits(200);
    let (first, last) = (mean(&run.losses[..20]), mean(&run.losses[180..]));
    assert!(last < 0.1 * first, "loss {first} -> {last}");
    assert!(run.accuracy > 0.9, "accuracy {}", run.accuracy);
    // 64 inputs + the homogeneous coordinate; 256 outputs.
    assert_eq!(run.fc1_factors, (vec![65, 65], vec![256, 256]));
    for r in &run.reports {
        assert!(r.stats_updated, "step {}: statistics every step", r.step);
        assert_eq!(r.refreshed, r.step % 10 == 0, "step {}", r.step);
        assert_eq!(r.damping, Some(0.1));
    }
    assert!(run.damping.iter().all(|&d| d == 0.1), "fixed damping");
}

#[test]
fn levenberg_marquardt_moves_the_damping_every_five_steps() {
    let run = kfac::kfac_adaptive(100);
    let (first, last) = (mean(&run.losses[..20]), mean(&run.losses[80..]));
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let mut prev = 0.1f32;
    let mut changes = 0;
    for (k, &d) in run.damping.iter().enumerate() {
        if d != prev {
            assert_eq!(k % 5, 0, "damping changed after step {k}");
            changes += 1;
        }
        prev = d;
    }
    assert!(changes >= 5, "{:?}", run.damping);
    assert!(*run.damping.last().unwrap() < 0.1);
}

#[test]
fn kfc_takes_conv_statistics_every_tenth_step() {
    let run = kfc::kfc_run(12);
    assert_eq!(
        run.blocks,
        (4, 3),
        "three convolutions and a dense classifier"
    );
    // All four blocks on steps 0 and 10; the dense classifier alone on the others.
    let want: Vec<usize> = (0..12).map(|s| if s % 10 == 0 { 4 } else { 1 }).collect();
    assert_eq!(run.captured, want);
    // features.1: 32 channels in, 5x5 kernel, plus the homogeneous coordinate; 32 out.
    assert_eq!(run.omega.shape(), &[801, 801]);
    assert_eq!(run.gamma.shape(), &[32, 32]);
    // Omega sums over the 14 x 14 output locations: its corner is |T| = 196, not 1.
    let corner = run.omega.data()[801 * 801 - 1];
    assert!((corner - 196.0).abs() < 1e-3, "corner {corner}");
    assert!(run.losses.iter().all(|l| l.is_finite()));
    assert!(
        mean(&run.losses[8..]) < 0.5 * run.losses[0],
        "{:?}",
        run.losses
    );
}

#[test]
fn tape_forward_mode_products_are_j_d_and_j_transpose_h_j() {
    let r = tape::fisher_products();
    // The direction moves only the output layer: J d = h dW^T + db.
    let (b, c) = r.jd.dims2();
    let hd = r.hidden.dims2().1;
    let mut fisher = 0.0f64;
    for i in 0..b {
        let u: Vec<f64> = (0..c)
            .map(|k| {
                let mut v = r.db.data()[k] as f64;
                for j in 0..hd {
                    v += r.hidden.data()[i * hd + j] as f64 * r.dw.data()[k * hd + j] as f64;
                }
                v
            })
            .collect();
        for k in 0..c {
            let got = r.jd.data()[i * c + k] as f64;
            assert!(
                (got - u[k]).abs() < 1e-5 * (1.0 + u[k].abs()),
                "J d [{i},{k}]"
            );
        }
        // u^T (diag p - p p^T) u with p the softmax of the logits.
        let z = &r.logits.data()[i * c..(i + 1) * c];
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
        let e: Vec<f64> = z.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        let pu: f64 = p.iter().zip(&u).map(|(a, b)| a * b).sum();
        fisher += p.iter().zip(&u).map(|(a, b)| a * b * b).sum::<f64>() - pu * pu;
    }
    fisher /= b as f64;
    let g = &r.gram;
    assert!(
        (g[0] - fisher).abs() < 1e-5 * fisher,
        "{} vs {fisher}",
        g[0]
    );
    assert_eq!(g[1], g[2]);
    assert!(
        g[3] > 0.0 && g[0] * g[3] >= g[1] * g[1],
        "positive semi-definite"
    );
    let rel = (r.directional as f64 - r.grad_dot).abs() / r.grad_dot.abs();
    assert!(rel < 1e-5, "{} vs {}", r.directional, r.grad_dot);
}

#[test]
fn shampoo_and_kradagrad_train_the_digits() {
    for (which, name, drop, acc) in [
        (0, "shampoo", 0.1, 0.88),
        (1, "kradagrad-star", 0.1, 0.88),
        (2, "kradagrad", 0.1, 0.88),
    ] {
        let run = shampoo::run_digits(200, which);
        let (first, last) = (mean(&run.losses[..20]), mean(&run.losses[180..]));
        assert!(last < drop * first, "{name}: loss {first} -> {last}");
        assert!(run.accuracy > acc, "{name}: accuracy {}", run.accuracy);
    }
}

#[test]
fn two_level_kfac_trains_the_digits_and_is_kfac_with_the_coarse_term_off() {
    let (_, coarse) = two_level::configs();
    let run = two_level::run_digits(200, coarse);
    let (first, last) = (mean(&run.losses[..20]), mean(&run.losses[180..]));
    assert!(last < 0.1 * first, "loss {first} -> {last}");
    assert!(run.accuracy > 0.88, "accuracy {}", run.accuracy);
    // Three layers, two vectors each.
    assert_eq!(run.coarse_size, 6);
    assert!(run.coarse_notes.is_empty(), "{:?}", run.coarse_notes);
    // Off, the same losses as KFAC with the same configuration, to the bit.
    let off = two_level::run_digits(30, kron::optim::CoarseConfig::OFF);
    let (kfac, _) = two_level::configs();
    let one = kfac_with(30, kfac);
    assert_eq!(off.losses, one);
}

/// The mini-batch losses of `steps` steps of KFAC on the digits, as `two_level::run_digits`
/// runs them.
fn kfac_with(steps: usize, config: kron::optim::KfacConfig) -> Vec<f32> {
    use kron::prelude::*;
    let digits = kron::data::digits();
    let seed = Rng::new(0);
    let mut params = ParamStore::new();
    let model = kron_examples::digits_mlp::mlp(&mut params, &mut seed.fork(1), 64, 10);
    let mut opt = kron::optim::Kfac::new(&model, &params, config).unwrap();
    let mut batches = kron::data::Batches::new(digits.train.len(), 32, seed.fork(2));
    let mut rng = seed.fork(3);
    let mut losses = vec![];
    for idx in batches.by_ref().take(steps) {
        let (x, y) = digits.train.batch(&idx);
        let out = train_step(
            &model,
            LossKind::CrossEntropy,
            &mut params,
            &mut opt,
            &x,
            &Targets::Classes(y),
            &mut rng,
        )
        .unwrap();
        losses.push(out.loss);
    }
    losses
}

#[test]
fn kfac_runs_on_the_backend_the_machine_has() {
    let run = gpu::run_digits(30);
    // With the feature and an adapter (lavapipe in CI) the wgpu backend; otherwise the CPU.
    assert!(!run.backend.is_empty());
    let (first, last) = (mean(&run.losses[..5]), mean(&run.losses[25..]));
    assert!(last < first, "{}: loss {first} -> {last}", run.backend);
}

#[test]
fn your_model_the_macro_model_trains_on_the_digits_with_kfac() {
    let r = your_model::train(4).unwrap();
    // The layers are named by position, as the chapter says.
    assert_eq!(
        r.names,
        [
            "0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"
        ]
    );
    // Four epochs of 45 batches of 32 (1437 examples, the last batch smaller).
    assert_eq!(r.steps, 4 * 45);
    assert_eq!(r.epoch_losses.len(), 4);
    let (first, last) = (r.epoch_losses[0], r.epoch_losses[3]);
    assert!(last < first / 4.0, "mean loss {first} -> {last}");
    assert!(r.accuracy > 0.9, "test accuracy {}", r.accuracy);
}

#[test]
fn your_model_a_resumed_trainer_has_the_bits_of_the_one_that_never_stopped() {
    let dir = std::env::temp_dir().join(format!("kron-book-your-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let r = your_model::checkpoint_and_resume(&dir.join("ck.safetensors")).unwrap();
    // 60 batches of 32: the second epoch, 15 batches in.
    assert_eq!((r.position.epoch, r.position.cursor), (1, 15 * 32));
    assert_eq!(r.steps, 80);
    assert!(r.resumed == r.straight, "parameters differ after resuming");

    let (trained, reloaded) = your_model::weights_round_trip(&dir.join("w.safetensors")).unwrap();
    assert_eq!(trained.to_bits(), reloaded.to_bits());
    assert!(trained < 1.0, "{trained}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn your_model_a_layer_left_out_of_the_blocks_is_reported_or_refused() {
    use kron::prelude::Note;
    let r = your_model::forgotten_layer().unwrap();
    assert_eq!(r.outside, ["outer.weight", "outer.bias"]);
    let expected = Note::OutsideBlocks {
        params: vec!["outer.weight".into(), "outer.bias".into()],
    };
    assert!(r.first_notes.contains(&expected), "{:?}", r.first_notes);
    assert!(!r.second_notes.contains(&expected), "{:?}", r.second_notes);
    assert!(
        r.strict_error.contains("step.strict_blocks")
            && r.strict_error.contains("outer.weight, outer.bias"),
        "{}",
        r.strict_error
    );
}

#[test]
fn data_parallel_two_and_three_ranks_train_as_one_process() {
    let one = data_parallel::train_rank(kron::DataParallel::single(), 12).unwrap();
    for ranks in [2, 3] {
        let all = data_parallel::on_threads(ranks, 12);
        assert!(
            all.iter().all(|p| p == &all[0]),
            "the ranks agree to the bit"
        );
        let d: f64 = all[0]
            .iter()
            .zip(&one)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let n: f64 = one.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!((d / n).sqrt() < 1e-5, "{ranks} ranks: {:e}", (d / n).sqrt());
    }
}
