//! `--checkpoint`, `--resume` and `--save`: a run stopped after an epoch and resumed from its
//! checkpoint takes the same steps, to the bit, as one that never stopped (parameters, optimizer
//! state, the training loop's generator, the batch position); the saved weights load into the
//! model; a checkpoint that cannot be used is an error naming its path.

use std::path::Path;

use kron::autodiff::io::read_tensors;
use kron::autodiff::testing::ScratchDir;
use kron::prelude::*;
use kron_examples::example::{Example, cli_main};
use kron_examples::{autoencoder, convnet, digits_mlp};

/// The example's exit code and what it wrote to standard output and standard error.
fn cli(ex: &Example, args: &[&str]) -> (u8, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli_main(
        ex,
        args.iter().map(|s| s.to_string()).collect(),
        &mut out,
        &mut err,
    );
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// Runs `ex` with `--fast --quiet`, the CSV in `dir`, and `args`; panics unless it exits 0.
fn run_ok(ex: &Example, dir: &Path, args: &[&str]) -> String {
    let csv = dir.join("curves.csv");
    let mut all = vec!["--fast", "--quiet", "--csv", csv.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = cli(ex, &all);
    assert_eq!(code, 0, "{all:?}:\n{out}\n{err}");
    out
}

/// Every tensor of two safetensors files, compared bit for bit, and their metadata entries
/// `keys`.
fn assert_same_bits(a: &Path, b: &Path, keys: &[&str]) {
    let (fa, fb) = (read_tensors(a).unwrap(), read_tensors(b).unwrap());
    let names: Vec<&String> = fa.tensors.keys().collect();
    assert_eq!(
        names,
        fb.tensors.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    assert!(!names.is_empty());
    for (name, ta) in &fa.tensors {
        let tb = &fb.tensors[name];
        assert_eq!(ta.shape(), tb.shape(), "{name}");
        let differ = ta
            .data()
            .iter()
            .zip(tb.data())
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(differ, 0, "{name}: {differ} values differ");
    }
    assert_eq!(fa.tensors64, fb.tensors64, "f64 tensors differ");
    for key in keys {
        // JSON where the entry is JSON (its key order is not fixed), the text otherwise.
        let json = |f: &kron::autodiff::io::TensorFile| -> serde_json::Value {
            let text = &f.metadata[*key];
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()))
        };
        assert_eq!(json(&fa), json(&fb), "metadata {key}");
    }
}

/// The last row of `optimizer` in the epoch table (its last evaluation: epoch, step, losses,
/// accuracy), without the seconds: a resumed run counts its seconds from where it resumed.
fn last_row(out: &str, optimizer: &str) -> String {
    let row = out
        .lines()
        .rfind(|l| l.split_whitespace().next() == Some(optimizer))
        .unwrap_or_else(|| panic!("no row of {optimizer} in {out}"));
    let words: Vec<&str> = row.split_whitespace().collect();
    words[..words.len() - 1].join(" ")
}

/// Two epochs straight, against one epoch, a checkpoint, and a resumed second epoch: the
/// final weights, the final checkpoints (optimizer state, generator, batch position, step)
/// and the last evaluation are the same bits.
fn resumes_to_the_bit(ex: &Example, optimizer: &str) {
    let dir = ScratchDir::new(&format!("resume-{}-{optimizer}", ex.name));
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let opt = ["--optimizer", optimizer];
    let straight = run_ok(
        ex,
        dir.path(),
        &[
            &opt[..],
            &["--save", &p("straight.safetensors")],
            &["--checkpoint", &p("straight.ckpt")],
        ]
        .concat(),
    );
    run_ok(
        ex,
        dir.path(),
        &[
            &opt[..],
            &["--epochs", "1", "--checkpoint", &p("half.ckpt")],
        ]
        .concat(),
    );
    let resumed = run_ok(
        ex,
        dir.path(),
        &[
            &opt[..],
            &["--resume", &p("half.ckpt")],
            &["--save", &p("resumed.safetensors")],
            &["--checkpoint", &p("resumed.ckpt")],
        ]
        .concat(),
    );
    assert_same_bits(
        &dir.path().join("straight.safetensors"),
        &dir.path().join("resumed.safetensors"),
        &[],
    );
    assert_same_bits(
        &dir.path().join("straight.ckpt"),
        &dir.path().join("resumed.ckpt"),
        &["kron.train", "kron.optim_state", "kron.optimizer"],
    );
    assert_eq!(
        last_row(&straight, optimizer),
        last_row(&resumed, optimizer)
    );
    // The resumed run starts where the first stopped: its rows are epochs 1 and 2.
    let epochs: Vec<&str> = resumed
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(optimizer))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(epochs, ["1", "2"], "{resumed}");
}

#[test]
fn digits_adam_resumes_to_the_bit() {
    resumes_to_the_bit(&digits_mlp::EXAMPLE, "adam");
}

/// KFAC's factors, inverses, momentum and counters: the resumed epoch crosses a refresh (every
/// 10 steps, 6 steps an epoch) and draws sampled labels and dropout masks from the restored
/// generator.
#[test]
fn digits_kfac_resumes_to_the_bit() {
    resumes_to_the_bit(&digits_mlp::EXAMPLE, "kfac");
}

/// KFC on the conv net.
#[test]
fn convnet_kfac_resumes_to_the_bit() {
    resumes_to_the_bit(&convnet::EXAMPLE, "kfac");
}

/// KFAC as the paper runs it on the autoencoder, with the quadratic model's step sizes and
/// momentum (two steps an epoch on the fast sizes: the Levenberg-Marquardt rule, every 5 steps,
/// does not act yet).
#[test]
fn autoencoder_kfac_resumes_to_the_bit() {
    resumes_to_the_bit(&autoencoder::EXAMPLE, "kfac");
}

/// A resumed run starts where its checkpoint stands (a run that ignored `--resume` would train
/// an epoch from step 0): with `--epochs` already reached there is nothing left to train, and
/// the table is the one evaluation of the checkpoint's state.
#[test]
fn a_resumed_run_starts_where_the_checkpoint_stands() {
    let dir = ScratchDir::new("resume-not-fresh");
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    run_ok(
        &digits_mlp::EXAMPLE,
        dir.path(),
        &[
            "--optimizer",
            "adam",
            "--epochs",
            "1",
            "--checkpoint",
            &p("c"),
        ],
    );
    let out = run_ok(
        &digits_mlp::EXAMPLE,
        dir.path(),
        &["--optimizer", "adam", "--resume", &p("c"), "--epochs", "1"],
    );
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("adam")).collect();
    assert_eq!(rows.len(), 1, "{out}");
    let words: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(&words[1..3], ["1", "6"], "{out}");
}

/// `--save` writes weights that load into a freshly built model and give the accuracy the
/// run reported.
#[test]
fn saved_weights_load_into_the_model() {
    let dir = ScratchDir::new("save-load");
    let path = dir.path().join("w.safetensors");
    let out = run_ok(
        &digits_mlp::EXAMPLE,
        dir.path(),
        &["--optimizer", "adam", "--save", path.to_str().unwrap()],
    );
    let mut params = ParamStore::new();
    let model = digits_mlp::mlp(&mut params, &mut Rng::new(99), 64, 10);
    kron::layers::load(&mut params, &path).unwrap();
    // The fast run's test set: the first 100 test digits.
    let test = kron::data::digits().test.take(100);
    let y = Targets::Classes(test.labels().to_vec());
    let e = evaluate(
        &model,
        &params,
        LossKind::CrossEntropy,
        test.inputs(),
        &y,
        500,
    );
    let row = last_row(&out, "adam");
    let words: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(words[4], format!("{:.5}", e.loss), "{out}");
    assert_eq!(
        words[5],
        format!("{:.2}%", 100.0 * e.accuracy.unwrap()),
        "{out}"
    );
    // A model of another shape refuses the file, naming the tensor.
    let mut other = ParamStore::new();
    let _ = digits_mlp::mlp(&mut other, &mut Rng::new(0), 32, 10);
    let e = kron::layers::load(&mut other, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fc1.weight") && e.contains("w.safetensors"),
        "{e}"
    );
}

/// A checkpoint that is missing, not a checkpoint, written by another optimizer or for other
/// batches: exit 1, and the error names the file (and the flag where one is at fault).
#[test]
fn a_checkpoint_that_cannot_resume_is_a_clear_error() {
    let dir = ScratchDir::new("resume-bad");
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let csv = p("c.csv");
    let bad = |args: &[&str], wants: &[&str]| {
        let all = [&["--fast", "--quiet", "--csv", &csv][..], args].concat();
        let (code, out, err) = cli(&digits_mlp::EXAMPLE, &all);
        assert_eq!(code, 1, "{all:?}: {out}\n{err}");
        for w in wants {
            assert!(err.contains(w), "{all:?}: wanted {w:?} in {err}");
        }
        assert!(!out.contains("test acc"), "training ran: {out}");
    };
    let missing = p("missing.ckpt");
    bad(
        &["--optimizer", "adam", "--resume", &missing],
        &["missing.ckpt", "No such file"],
    );
    run_ok(
        &digits_mlp::EXAMPLE,
        dir.path(),
        &[
            "--optimizer",
            "adam",
            "--epochs",
            "1",
            "--save",
            &p("w.safetensors"),
            "--checkpoint",
            &p("adam.ckpt"),
        ],
    );
    // Weights alone are not a checkpoint.
    bad(
        &["--optimizer", "adam", "--resume", &p("w.safetensors")],
        &["w.safetensors"],
    );
    bad(
        &["--optimizer", "kfac", "--resume", &p("adam.ckpt")],
        &["adam.ckpt", "adam"],
    );
    bad(
        &[
            "--optimizer",
            "adam",
            "--resume",
            &p("adam.ckpt"),
            "--batch-size",
            "20",
        ],
        &["adam.ckpt", "--batch-size"],
    );
    bad(
        &[
            "--optimizer",
            "adam",
            "--resume",
            &p("adam.ckpt"),
            "--seed",
            "5",
        ],
        &["adam.ckpt", "--seed"],
    );
    let garbage = dir.path().join("garbage.ckpt");
    std::fs::write(&garbage, b"not a checkpoint").unwrap();
    bad(
        &["--optimizer", "adam", "--resume", garbage.to_str().unwrap()],
        &["garbage.ckpt"],
    );
}
