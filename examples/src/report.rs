//! What a run prints and writes: a progress bar on a terminal, a table of epochs, a CSV of the
//! curves, and the time-to-target comparison.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::Path;

/// One evaluation point of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Optimizer name.
    pub optimizer: String,
    /// Epoch (1-based) at which the point was taken.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// Training seconds so far (evaluation time excluded).
    pub seconds: f64,
    /// Loss on the fixed training subset, eval mode.
    pub train_loss: f32,
    /// Loss on the test set.
    pub test_loss: f32,
    /// Test accuracy, for classifiers.
    pub test_accuracy: Option<f32>,
}

/// The curves of one or more runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    /// Every evaluation point, in order.
    pub points: Vec<Point>,
}

impl Curves {
    /// The table of epochs; with `seconds` false the timing column is left out (for snapshot
    /// tests, which must not depend on the machine's speed).
    pub fn table(&self, seconds: bool) -> String {
        let acc = self.points.iter().any(|p| p.test_accuracy.is_some());
        let mut s = String::new();
        let _ = write!(
            s,
            "{:<14} {:>5} {:>6} {:>11} {:>10}",
            "optimizer", "epoch", "step", "train loss", "test loss"
        );
        if acc {
            let _ = write!(s, " {:>9}", "test acc");
        }
        if seconds {
            let _ = write!(s, " {:>8}", "seconds");
        }
        s.push('\n');
        for p in &self.points {
            let _ = write!(
                s,
                "{:<14} {:>5} {:>6} {:>11.5} {:>10.5}",
                p.optimizer, p.epoch, p.step, p.train_loss, p.test_loss
            );
            if let Some(a) = p.test_accuracy {
                let _ = write!(s, " {:>8.2}%", 100.0 * a);
            }
            if seconds {
                let _ = write!(s, " {:>8.2}", p.seconds);
            }
            s.push('\n');
        }
        s
    }

    /// Writes the curves as CSV, creating the parent directory.
    pub fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        create_parent(path)?;
        let mut s =
            String::from("optimizer,epoch,step,seconds,train_loss,test_loss,test_accuracy\n");
        for p in &self.points {
            let _ = writeln!(
                s,
                "{},{},{},{:.4},{},{},{}",
                p.optimizer,
                p.epoch,
                p.step,
                p.seconds,
                p.train_loss,
                p.test_loss,
                p.test_accuracy.map_or(String::new(), |a| a.to_string())
            );
        }
        std::fs::write(path, s)
    }

    /// The first point of `optimizer`'s curve at or below `target` training loss.
    pub fn first_reaching(&self, optimizer: &str, target: f32) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.optimizer == optimizer && p.train_loss <= target)
    }

    /// The final training loss of `optimizer`.
    pub fn final_loss(&self, optimizer: &str) -> Option<f32> {
        self.points
            .iter()
            .rev()
            .find(|p| p.optimizer == optimizer)
            .map(|p| p.train_loss)
    }
}

/// Checks that a CSV can be written at `path` before a run spends its time: creates the
/// parent directory and opens the file for writing (creating it empty if absent; an existing
/// file is left as it is until the curves replace it).
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    create_parent(path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
}

/// Creates the directory `path` lies in, if it names one.
fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

/// The time-to-target table: for each optimizer, the steps and seconds it took to first reach
/// `target`, and its speed-up in seconds over `baseline`. A NaN learning rate prints as `auto`
/// (an optimizer that chooses its own step size).
pub fn time_to_target(
    curves: &Curves,
    optimizers: &[(String, f32)],
    target: f32,
    baseline: &str,
    seconds: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "target training loss: {target:.5} (final loss of the best first-order run: {baseline})"
    );
    let _ = write!(
        s,
        "{:<14} {:>10} {:>11} {:>7}",
        "optimizer", "lr", "final loss", "steps"
    );
    if seconds {
        let _ = write!(s, " {:>8} {:>10}", "seconds", "speed-up");
    }
    s.push('\n');
    let base = curves.first_reaching(baseline, target).map(|p| p.seconds);
    for (name, lr) in optimizers {
        let fin = curves.final_loss(name).unwrap_or(f32::NAN);
        let hit = curves.first_reaching(name, target);
        // A NaN rate: the optimizer sets its own step (KFAC's quadratic model).
        let lr = if lr.is_nan() {
            "auto".to_string()
        } else {
            format!("{lr:.3e}")
        };
        let _ = write!(
            s,
            "{:<14} {:>10} {:>11.5} {:>7}",
            name,
            lr,
            fin,
            hit.map_or("-".into(), |p| p.step.to_string())
        );
        if seconds {
            match (hit, base) {
                (Some(p), Some(b)) => {
                    let _ = write!(s, " {:>8.2} {:>9.2}x", p.seconds, b / p.seconds.max(1e-9));
                }
                (Some(p), None) => {
                    let _ = write!(s, " {:>8.2} {:>10}", p.seconds, "-");
                }
                _ => {
                    let _ = write!(s, " {:>8} {:>10}", "-", "-");
                }
            }
        }
        s.push('\n');
    }
    s
}

/// A one-line progress bar on standard error, drawn only when it is a terminal.
pub struct Progress {
    total: u64,
    label: String,
    live: bool,
}

impl Progress {
    /// A bar for `total` steps.
    pub fn new(label: &str, total: u64, quiet: bool) -> Self {
        Progress {
            total,
            label: label.to_string(),
            live: !quiet && std::io::stderr().is_terminal(),
        }
    }

    /// Redraws the bar at `step` with the latest loss.
    pub fn update(&self, step: u64, loss: f32) {
        if !self.live {
            return;
        }
        const W: u64 = 30;
        let filled = (W * step / self.total.max(1)).min(W) as usize;
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r{:<10} [{}{}] {step}/{} loss {loss:.4}",
            self.label,
            "#".repeat(filled),
            " ".repeat(W as usize - filled),
            self.total
        );
        let _ = e.flush();
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if self.live {
            let _ = write!(std::io::stderr(), "\r{:80}\r", "");
        }
    }
}
