//! The pinned bits of KFAC and KFC training: the hash of every parameter after
//! [`STEPS`] training steps on the benchmark workloads, for each inverse mode (and the
//! quadratic-model step, and f64 statistics) with Levenberg-Marquardt damping on.
//!
//! A change to the optimizers that claims "same bits" must leave these hashes as they are.
//! They depend on the CPU's GEMM kernel (kernels round differently), so
//! `benches/pinned/kfac_hashes.txt` holds one set per kernel, keyed by the first word of
//! [`kernel_name`] (`avx512f` on AVX-512 CPUs, `fma+avx2` on AVX2 ones, which a build with
//! `MMTEST_FEATURE=fma,avx2` selects on any CPU that has those). The `pinned_bits` test
//! compares; the `kfac_hash` example prints and records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kron::autodiff::{Rng, kernel_name};
use kron::optim::{
    EigenDamping, InverseMethod, Kfac, KfacConfig, LevenbergMarquardt, Precision, StepRule,
};
use kron::train_step;

use crate::{Workload, params_hash};

/// Training steps per run.
pub const STEPS: usize = 20;

/// One pinned run: a label, its workload and its configuration.
pub struct PinnedRun {
    /// The label in the pinned file.
    pub label: &'static str,
    /// The workload, built fresh for the run.
    pub workload: fn() -> Workload,
    /// The optimizer's configuration.
    pub config: KfacConfig,
}

/// The runs, in the order the file lists them.
pub fn runs() -> Vec<PinnedRun> {
    let base = KfacConfig::default()
        .with_inverse_period(5)
        .with_adaptive_damping(Some(LevenbergMarquardt::DEFAULT));
    let eigen = base.with_method(InverseMethod::Eigen(EigenDamping::Factored));
    let ae: fn() -> Workload = || Workload::autoencoder(500, 11);
    let conv: fn() -> Workload = || Workload::convnet(64, 13);
    let run = |label, workload, config| PinnedRun {
        label,
        workload,
        config,
    };
    vec![
        run("kfac-inverse", ae, base),
        run("kfac-eigen", ae, eigen),
        run(
            "kfac-eigen-tikhonov",
            ae,
            base.with_method(InverseMethod::Eigen(EigenDamping::Tikhonov)),
        ),
        run(
            "kfac-quadratic",
            ae,
            base.with_step_rule(StepRule::QuadraticModel),
        ),
        run("kfac-inverse-f64", ae, base.with_precision(Precision::F64)),
        run("kfc-inverse", conv, base.with_conv_stats_period(3)),
        run("kfc-eigen", conv, eigen.with_conv_stats_period(3)),
    ]
}

impl PinnedRun {
    /// The hash ([`params_hash`]) of the parameters after [`STEPS`] training steps on the
    /// workload's one batch, from a fixed seed.
    pub fn hash(&self) -> Result<u64, String> {
        let mut w = (self.workload)();
        let mut opt = Kfac::new(&w.model, &w.params, self.config).map_err(|e| e.to_string())?;
        let mut rng = Rng::new(5);
        for step in 0..STEPS {
            train_step(
                &w.model,
                w.loss,
                &mut w.params,
                &mut opt,
                &w.inputs,
                &w.targets,
                &mut rng,
            )
            .map_err(|e| format!("{}: step {step}: {e}", self.label))?;
        }
        Ok(params_hash(&w.params))
    }
}

/// The key of this CPU's GEMM kernel in the pinned file.
pub fn kernel_key() -> &'static str {
    kernel_name().split(' ').next().unwrap_or("unknown")
}

/// The pinned file.
pub fn pinned_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pinned/kfac_hashes.txt")
}

/// The pinned hashes, `(kernel, label) -> hash` (empty when the file does not exist).
pub fn read_pinned(path: &Path) -> Result<BTreeMap<(String, String), String>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [kernel, label, hash] = f[..] else {
            return Err(format!(
                "{}:{}: expected `kernel label hash`",
                path.display(),
                i + 1
            ));
        };
        out.insert((kernel.to_string(), label.to_string()), hash.to_string());
    }
    Ok(out)
}

/// Writes the pinned hashes.
pub fn write_pinned(
    path: &Path,
    pinned: &BTreeMap<(String, String), String>,
) -> Result<(), String> {
    let mut text = format!(
        "# Parameter hashes after {STEPS} KFAC/KFC training steps, by GEMM kernel \
         (cargo run --release -p kron-benches --example kfac_hash -- --record).\n"
    );
    for ((kernel, label), hash) in pinned {
        text.push_str(&format!("{kernel} {label} {hash}\n"));
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
