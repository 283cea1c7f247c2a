//! `kron-plot CSV PREFIX [--title TITLE]`: renders an example's curves to `PREFIX-steps.svg`
//! and `PREFIX-seconds.svg`, e.g.
//!
//! ```text
//! cargo run --release -p kron-plot -- out/autoencoder.csv book/src/figures/autoencoder
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: kron-plot CSV PREFIX [--title TITLE]
  CSV     curves written by an example (optimizer,epoch,step,seconds,train_loss,...)
  PREFIX  writes PREFIX-steps.svg and PREFIX-seconds.svg (directories are created)
  --title the figures' title (default: the last component of PREFIX)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut title = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--title" => match args.next() {
                Some(t) => title = Some(t),
                None => {
                    eprintln!("kron-plot: --title needs a value\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [csv, prefix] = positional.as_slice() else {
        eprintln!(
            "kron-plot: expected two arguments, got {}\n{USAGE}",
            positional.len()
        );
        return ExitCode::from(2);
    };
    let title = title.unwrap_or_else(|| {
        prefix
            .file_name()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
    });
    let result =
        kron_plot::read_csv(csv).and_then(|curves| kron_plot::render(&curves, prefix, &title));
    match result {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kron-plot: {e}");
            ExitCode::FAILURE
        }
    }
}
