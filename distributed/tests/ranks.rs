//! Runs the rank program `kron-mpi-check` under `mpirun` on 1 to 4 ranks.
//!
//! Needs Open MPI's `mpirun` on the `PATH` (Debian: `openmpi-bin`). Without it the tests say
//! that they skipped, unless the environment variable `CI` is set (and not `0` or `false`):
//! then they fail, so that CI never skips them silently.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kron_examples::data_parallel::checks_without_path;

/// How long one `mpirun` may take before it is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(120);

/// How soon a job with a panicking rank must end.
const PROMPT: Duration = Duration::from_secs(30);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// `mpirun`'s path, or `None` (after saying so) when the tests skip.
fn mpirun() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("mpirun"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if ci() => panic!(
            "mpirun is not on the PATH, and CI is set: install Open MPI \
             (Debian: openmpi-bin libopenmpi-dev)"
        ),
        None => {
            eprintln!("skipped: mpirun is not on the PATH (Debian: install openmpi-bin)");
            None
        }
    }
}

/// What one `mpirun` did.
struct Run {
    ranks: usize,
    program: String,
    args: Vec<String>,
    success: bool,
    code: Option<i32>,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

impl Run {
    fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Everything about the run, for a failing assertion.
    fn describe(&self) -> String {
        format!(
            "mpirun -np {} {} {}: exit {:?} after {:.1?}\n--- stdout\n{}--- stderr\n{}",
            self.ranks,
            self.program,
            self.args.join(" "),
            self.code,
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `mpirun -np ranks kron-mpi-check args..`, killing it (and failing) after [`TIMEOUT`].
fn run(mpirun: &PathBuf, ranks: usize, args: &[&str]) -> Run {
    run_program(mpirun, ranks, env!("CARGO_BIN_EXE_kron-mpi-check"), args)
}

/// Runs `mpirun -np ranks program args..`, killing it (and failing) after [`TIMEOUT`].
fn run_program(mpirun: &PathBuf, ranks: usize, program: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(mpirun);
    cmd.arg("-np")
        .arg(ranks.to_string())
        // More ranks than cores, and no pinning of ranks to cores, which oversubscribed ranks
        // would otherwise share.
        .args(["--oversubscribe", "--bind-to", "none"])
        // mpirun's own limit, below ours: it kills every rank and says so.
        .args(["--timeout", &(TIMEOUT.as_secs() - 10).to_string()])
        .arg(program)
        .args(args)
        // CI runs as root, which mpirun refuses without these.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Backtraces would make the panic's output long; the message is what is checked.
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout can kill it with its ranks.
        .process_group(0);
    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", mpirun.display()));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for mpirun") {
            break status;
        }
        if t.elapsed() > TIMEOUT {
            // The whole group: mpirun and the ranks it started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mpirun -np {ranks} {program} {} did not end within {TIMEOUT:?}; killed",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = t.elapsed();
    Run {
        ranks,
        program: std::path::Path::new(program)
            .file_name()
            .map_or(program.into(), |n| n.to_string_lossy().into_owned()),
        args: args.iter().map(|s| s.to_string()).collect(),
        success: status.success(),
        code: status.code(),
        elapsed,
        stdout: out.join().expect("reader thread"),
        stderr: err.join().expect("reader thread"),
    }
}

#[test]
fn collectives_agree_on_1_to_4_ranks() {
    let Some(mpirun) = mpirun() else { return };
    for ranks in 1..=4 {
        let r = run(&mpirun, ranks, &["collectives"]);
        eprintln!("{ranks} ranks: {:.1?}", r.elapsed);
        assert!(r.success, "{}", r.describe());
        let want = format!("passed on each of {ranks} ranks");
        assert!(r.stdout.contains(&want), "{}", r.describe());
        assert!(!r.output().contains("FAIL"), "{}", r.describe());
    }
}

/// The checks can fail: each deliberate fault makes the job fail with the checks that should
/// catch it.
#[test]
fn collectives_catch_a_wrong_sum_order_length_or_bits() {
    let Some(mpirun) = mpirun() else { return };
    for (fault, caught) in [
        ("sum", "all_reduce_f32 of 7: sum"),
        (
            "bits",
            "rounded all_reduce_f64 of 1000: same bits on every rank",
        ),
        ("order", "all_gather_f64 of three values"),
        ("length", "broadcast_bytes from rank 0"),
    ] {
        let r = run(&mpirun, 2, &["collectives", "--break", fault]);
        assert!(!r.success, "fault {fault} went unnoticed\n{}", r.describe());
        assert!(
            r.stdout.contains(&format!("FAIL {caught}:")),
            "fault {fault}: no failure of `{caught}`\n{}",
            r.describe()
        );
        assert!(
            r.stdout.contains("failed checks over 2 ranks"),
            "{}",
            r.describe()
        );
    }
}

#[test]
fn a_panicking_rank_stops_every_rank_promptly() {
    let Some(mpirun) = mpirun() else { return };
    for ranks in 2..=4 {
        let r = run(&mpirun, ranks, &["panic"]);
        eprintln!("{ranks} ranks: ended after {:.1?}", r.elapsed);
        assert!(!r.success, "{}", r.describe());
        assert!(
            r.elapsed < PROMPT,
            "took {:.1?}\n{}",
            r.elapsed,
            r.describe()
        );
        let out = r.output();
        assert!(
            out.contains("rank 1: panicked at ")
                && out.contains("rank 1 fails on purpose in the panic scenario"),
            "{}",
            r.describe()
        );
        assert!(!out.contains("past the collective"), "{}", r.describe());
    }
}

#[test]
fn a_dying_rank_stops_every_rank_promptly() {
    let Some(mpirun) = mpirun() else { return };
    let r = run(&mpirun, 3, &["die"]);
    assert!(!r.success, "{}", r.describe());
    assert!(
        r.elapsed < PROMPT,
        "took {:.1?}\n{}",
        r.elapsed,
        r.describe()
    );
    let out = r.output();
    assert!(
        out.contains("process rank 1 ") && out.contains("exited on signal"),
        "{}",
        r.describe()
    );
    assert!(!out.contains("past the collective"), "{}", r.describe());
}

/// Ranks that pass buffers of different lengths are stopped with every rank's length, in
/// builds with debug assertions (the rank program is built with the tests' profile).
#[test]
fn different_lengths_stop_the_job_with_the_lengths() {
    let Some(mpirun) = mpirun() else { return };
    let r = run(&mpirun, 3, &["lengths"]);
    if cfg!(debug_assertions) {
        assert!(!r.success, "{}", r.describe());
        assert!(
            r.output().contains("different lengths [10, 11, 10]"),
            "{}",
            r.describe()
        );
        assert!(r.elapsed < PROMPT, "{}", r.describe());
    } else {
        assert!(r.success, "{}", r.describe());
    }
}

#[test]
fn a_bad_scenario_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_kron-mpi-check"))
        .arg("no-such-scenario")
        .output()
        .expect("the rank program starts");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
}

/// Data-parallel training over MPI: every optimizer on 2 and 4 ranks within 1e-4 of one
/// process with every rank the same bits, each refresh and root computed once on its owner (or
/// on every rank, to the same bits, when not split), each direction computed by its owner to
/// the same bits as on every rank, a NaN on one rank and a mismatched setup
/// refused on every rank.
#[test]
fn training_over_mpi_matches_one_process_and_refuses_together() {
    let Some(mpirun) = mpirun() else { return };
    for ranks in [2, 4] {
        for check in checks_without_path() {
            let r = run(&mpirun, ranks, &["train", check]);
            eprintln!("{ranks} ranks, {check}: {:.1?}", r.elapsed);
            assert!(r.success, "{}", r.describe());
            assert!(
                r.stdout.contains(&format!("train {check}: passed")),
                "{}",
                r.describe()
            );
        }
    }
}

/// A checkpoint rank 0 wrote on 2 ranks resumes on 4 ranks and on 1.
#[test]
fn a_checkpoint_from_2_ranks_resumes_on_4_and_on_1() {
    let Some(mpirun) = mpirun() else { return };
    let dir = std::env::temp_dir().join(format!("kron-mpi-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run");
    let path = path.to_str().unwrap();
    let r = run(&mpirun, 2, &["train", "save", path]);
    assert!(r.success, "{}", r.describe());
    for ranks in [4, 1] {
        let r = run(&mpirun, ranks, &["train", "resume", path]);
        assert!(r.success, "{}", r.describe());
        assert!(
            r.stdout.contains("train resume: passed"),
            "{}",
            r.describe()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The autoencoder and the conv net under mpirun with `--distributed`: rank 0 prints one table,
/// with the communication time, and its losses are those of one process.
#[test]
fn the_examples_train_distributed_as_one_process_does() {
    use kron_examples::example::{Config, run_example};
    let Some(mpirun) = mpirun() else { return };
    let dir = std::env::temp_dir().join(format!("kron-mpi-examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (program, ex) in [
        (
            env!("CARGO_BIN_EXE_autoencoder"),
            &kron_examples::autoencoder::EXAMPLE,
        ),
        (
            env!("CARGO_BIN_EXE_convnet"),
            &kron_examples::convnet::EXAMPLE,
        ),
    ] {
        let csv = dir.join(format!("{}.csv", ex.name));
        let flags = ["--fast", "--quiet", "--optimizer", "kfac"];
        let mut args: Vec<&str> = flags.to_vec();
        args.extend(["--distributed", "--csv", csv.to_str().unwrap()]);
        let r = run_program(&mpirun, 2, program, &args);
        assert!(r.success, "{}", r.describe());
        assert!(
            r.stdout.contains("data-parallel on 2 ranks (mpi)"),
            "{}",
            r.describe()
        );
        assert_eq!(
            r.stdout.matches("curves written to").count(),
            1,
            "{}",
            r.describe()
        );
        let one = run_example(
            ex,
            &Config::from_args(flags.iter().map(|s| s.to_string())).unwrap(),
        )
        .unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (train, test) = (col("train_loss"), col("test_loss"));
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(rows.len(), one.curves.points.len(), "{text}");
        for (row, p) in rows.iter().zip(&one.curves.points) {
            for (cell, want) in [(row[train], p.train_loss), (row[test], p.test_loss)] {
                let got: f32 = cell.parse().unwrap();
                assert!(
                    ((got - want) / want).abs() < 1e-4,
                    "{}: 2 ranks {got}, one process {want}",
                    ex.name
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ranks started with other flags refuse to train, every one of them, naming the flag.
#[test]
fn ranks_started_with_other_flags_refuse() {
    let Some(mpirun) = mpirun() else { return };
    let program = env!("CARGO_BIN_EXE_autoencoder");
    let common = [
        "--fast",
        "--quiet",
        "--optimizer",
        "kfac",
        "--distributed",
        "--csv",
        "/dev/null",
    ];
    let mut cmd = Command::new(&mpirun);
    cmd.args(["--oversubscribe", "--bind-to", "none", "--timeout", "110"])
        .args(["-np", "1", program])
        .args(common)
        .args(["--epochs", "2", ":", "-np", "1", program])
        .args(common)
        .args(["--epochs", "3"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null());
    let out = cmd.output().expect("mpirun runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("first at program.epochs"), "{err}");
    // Both ranks say it.
    assert!(
        err.matches("another setup than rank 0").count() >= 2,
        "{err}"
    );
}
