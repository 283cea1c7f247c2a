//! Prints the pinned bits of KFAC and KFC training (see [`kron_benches::pinned`]): the hash of
//! every parameter after 20 training steps on the benchmark workloads, per inverse mode, with
//! Levenberg-Marquardt damping on. `--check` compares with `benches/pinned/kfac_hashes.txt`
//! for this CPU's GEMM kernel (as the `pinned_bits` test does) and exits 1 on a difference;
//! `--record` writes this kernel's hashes into it.
//!
//! ```text
//! cargo run --release -p kron-benches --example kfac_hash [-- --check | --record]
//! ```

use std::process::ExitCode;

use kron::autodiff::kernel_name;
use kron_benches::args_or_exit;
use kron_benches::pinned::{kernel_key, pinned_path, read_pinned, runs, write_pinned};

/// The usage line `--help` prints.
const USAGE: &str = "usage: kfac_hash [--check | --record]

  (no flag)  print the hashes
  --check    compare with benches/pinned/kfac_hashes.txt for this CPU's GEMM kernel
  --record   write this kernel's hashes into that file";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Print,
    Check,
    Record,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Mode>, String> {
    let mut mode = Mode::Print;
    for a in args {
        mode = match a.as_str() {
            "--check" => Mode::Check,
            "--record" => Mode::Record,
            "--help" | "-h" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        };
    }
    Ok(Some(mode))
}

fn run(mode: Mode) -> Result<bool, String> {
    println!("GEMM kernel: {}", kernel_name());
    let path = pinned_path();
    let mut pinned = read_pinned(&path)?;
    let mut ok = true;
    for r in runs() {
        let hash = format!("{:016x}", r.hash()?);
        let key = (kernel_key().to_string(), r.label.to_string());
        let verdict = match (mode, pinned.get(&key)) {
            (Mode::Check, Some(p)) if *p == hash => "same as pinned".to_string(),
            (Mode::Check, Some(p)) => {
                ok = false;
                format!("DIFFERS from pinned {p}")
            }
            (Mode::Check, None) => {
                ok = false;
                "no pinned hash for this kernel".to_string()
            }
            _ => String::new(),
        };
        println!("{:<22} {hash}  {verdict}", r.label);
        pinned.insert(key, hash);
    }
    if mode == Mode::Record {
        write_pinned(&path, &pinned)?;
        println!("recorded in {}", path.display());
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let mode = args_or_exit("kfac_hash", USAGE, parse_args(std::env::args().skip(1)));
    match run(mode) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kfac_hash: {e}");
            ExitCode::FAILURE
        }
    }
}
