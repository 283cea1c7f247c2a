//! Checkpoints: model, optimizer, generator and data position in one safetensors file.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kron_autodiff::io::{
    TensorFileError, load_params_from, read_tensors, save_params, write_tensors_mixed,
};
use kron_autodiff::{ParamStore, Rng, Tensor};
use kron_data::BatchState;
use kron_optim::{OptimError, OptimState, Optimizer, Tensor64};
use serde::{Deserialize, Serialize};

/// The version of the checkpoint layout this build writes and reads. Version 2 stores
/// optimizer statistics kept in `f64` as `F64` tensors and the optimizer's state in the
/// curvature core's layout; files of version 1 are refused with a message saying so.
pub const FORMAT_VERSION: u32 = 2;

/// The training loop's own state: what, beside model and optimizer, a run needs to resume with
/// the same bits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps taken.
    pub step: u64,
    /// The training loop's generator.
    pub rng: Rng,
    /// The batch iterator's position ([`Batches::state`](kron_data::Batches::state)), if the
    /// loop draws its batches from one: resume it with
    /// [`Batches::resume`](kron_data::Batches::resume). `None` for a loop that keeps its
    /// position some other way.
    pub data: Option<BatchState>,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug)]
pub enum CheckpointError {
    /// The file itself: I/O, format, a missing or misshapen tensor.
    File(TensorFileError),
    /// The optimizer state does not fit the optimizer.
    Optim {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        source: OptimError,
    },
    /// The file's metadata is missing, malformed, or of another format version.
    Meta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::File(e) => write!(f, "checkpoint {e}"),
            CheckpointError::Optim { path, source } => {
                write!(f, "checkpoint {}: {source}", path.display())
            }
            CheckpointError::Meta { path, detail } => {
                write!(f, "checkpoint {}: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for CheckpointError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CheckpointError::File(e) => Some(e),
            CheckpointError::Optim { source, .. } => Some(source),
            CheckpointError::Meta { .. } => None,
        }
    }
}

impl From<TensorFileError> for CheckpointError {
    fn from(e: TensorFileError) -> Self {
        CheckpointError::File(e)
    }
}

const MODEL: &str = "model/";
const OPTIM: &str = "optim/";

/// Writes model parameters (under `model/`), optimizer tensors (under `optim/`) and, as JSON in
/// the header's metadata, the optimizer's other state, the training state and the format
/// version, to one safetensors file, atomically.
pub fn save_checkpoint(
    path: &Path,
    params: &ParamStore,
    opt: &dyn Optimizer,
    train: &TrainState,
) -> Result<(), CheckpointError> {
    let ostate = opt.state();
    let mut tensors: Vec<(String, &Tensor)> = params
        .iter()
        .map(|(_, n, t)| (format!("{MODEL}{n}"), t))
        .collect();
    tensors.extend(
        ostate
            .tensors
            .iter()
            .map(|(n, t)| (format!("{OPTIM}{n}"), t)),
    );
    let meta_err = |e: serde_json::Error| CheckpointError::Meta {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let mut meta = HashMap::new();
    meta.insert("kron.format_version".into(), FORMAT_VERSION.to_string());
    meta.insert("kron.optimizer".into(), opt.name().to_string());
    meta.insert(
        "kron.optim_state".into(),
        serde_json::to_string(&ostate.meta).map_err(meta_err)?,
    );
    meta.insert(
        "kron.train".into(),
        serde_json::to_string(train).map_err(meta_err)?,
    );
    let tensors64: Vec<(String, &[usize], &[f64])> = ostate
        .tensors64
        .iter()
        .map(|(n, t)| (format!("{OPTIM}{n}"), t.shape(), t.data()))
        .collect();
    write_tensors_mixed(path, &tensors, &tensors64, meta)?;
    Ok(())
}

/// Restores model parameters and optimizer state from a checkpoint and returns the training
/// state. All or nothing: names and shapes are checked against the model and the optimizer
/// before anything changes, and a mismatch is an error naming the tensor.
pub fn load_checkpoint(
    path: &Path,
    params: &mut ParamStore,
    opt: &mut dyn Optimizer,
) -> Result<TrainState, CheckpointError> {
    let file = read_tensors(path)?;
    let meta = |detail: String| CheckpointError::Meta {
        path: path.to_path_buf(),
        detail,
    };
    let version = file.meta("kron.format_version")?;
    if version != FORMAT_VERSION.to_string() {
        return Err(meta(format!(
            "format version {version}, this build reads {FORMAT_VERSION} (a checkpoint of \
             another version cannot resume here: start the run again, or resume it with the \
             kron version that wrote it)"
        )));
    }
    let saved_opt = file.meta("kron.optimizer")?;
    if saved_opt != opt.name() {
        return Err(meta(format!(
            "saved by optimizer {saved_opt:?}, loading into {:?}",
            opt.name()
        )));
    }
    let train: TrainState = serde_json::from_str(file.meta("kron.train")?)
        .map_err(|e| meta(format!("kron.train: {e}")))?;
    let ometa: serde_json::Value = serde_json::from_str(file.meta("kron.optim_state")?)
        .map_err(|e| meta(format!("kron.optim_state: {e}")))?;
    let mut staged = params.clone();
    load_params_from(&mut staged, &file, MODEL)?;
    let ostate = OptimState {
        tensors: file
            .tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(OPTIM).map(|k| (k.to_string(), t.clone())))
            .collect(),
        tensors64: file
            .tensors64
            .iter()
            .filter_map(|(n, (shape, data))| {
                let k = n.strip_prefix(OPTIM)?;
                Some(
                    Tensor64::new(data.clone(), shape)
                        .map(|t| (k.to_string(), t))
                        .map_err(|e| meta(format!("tensor {n:?}: {e}"))),
                )
            })
            .collect::<Result<_, _>>()?,
        meta: ometa,
    };
    opt.load_state(ostate)
        .map_err(|source| CheckpointError::Optim {
            path: path.to_path_buf(),
            source,
        })?;
    *params = staged;
    Ok(train)
}

/// Saves the model's parameters alone (no optimizer, no training state) to a safetensors file,
/// atomically, each under its dotted name (`0.weight`), as PyTorch's `state_dict` and candle's
/// `VarMap::save` do: the file other tools read, and what
/// [`load_weights`] reads back. Arguments in the order of [`save_checkpoint`].
///
/// # Errors
/// [`TensorFileError`] naming the file if it cannot be written.
pub fn save_weights(path: &Path, params: &ParamStore) -> Result<(), TensorFileError> {
    save_params(params, path)
}

/// Loads the model's parameters from a safetensors file written by [`save_weights`] (or by
/// [`save_checkpoint`], whose weights sit under `model/`, or by another tool with the same
/// names), matching each parameter by name and checking its shape. All or nothing: on error
/// `params` is left as it was. Tensors of the file that name no parameter are ignored.
///
/// # Errors
/// [`TensorFileError`] naming the file and the tensor: I/O, format, a parameter missing from
/// the file or of another shape.
pub fn load_weights(path: &Path, params: &mut ParamStore) -> Result<(), TensorFileError> {
    let file = read_tensors(path)?;
    // A checkpoint keeps the weights under `model/`.
    let prefix = if file.metadata.contains_key("kron.format_version") {
        MODEL
    } else {
        ""
    };
    load_params_from(params, &file, prefix)
}
