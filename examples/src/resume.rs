//! The files a single run reads and writes beside its curves: a checkpoint to resume from, a
//! checkpoint written at the end of every epoch, and the final weights.

use std::path::{Path, PathBuf};

use kron::data::{BatchState, Batches};
use kron::prelude::*;

/// Where a run reads and writes its checkpoints and weights (`None`: it does not).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunFiles {
    /// `--resume PATH`: the checkpoint the run continues from.
    pub resume: Option<PathBuf>,
    /// `--checkpoint PATH`: written, atomically, at the end of every epoch.
    pub checkpoint: Option<PathBuf>,
    /// `--save PATH`: the final weights, as safetensors named like a PyTorch `state_dict`.
    pub save: Option<PathBuf>,
}

/// The data position a checkpoint stores: the batch iterator's state.
pub fn data_position(batches: &Batches) -> Option<BatchState> {
    Some(batches.state())
}

/// The batch iterator at the position `state` holds, over a dataset of `len` examples; an
/// error (naming `path`, the checkpoint) if the position is missing, malformed or saved for a
/// dataset of another size.
pub fn resume_batches(state: &TrainState, len: usize, path: &Path) -> Result<Batches, String> {
    let saved = state
        .data
        .clone()
        .ok_or_else(|| format!("checkpoint {}: no batch position", path.display()))?;
    Batches::resume(saved, len).map_err(|e| format!("checkpoint {}: {e}", path.display()))
}

/// Checks, before a run spends its time, that a file can be written at `path`: creates the
/// parent directory and opens the file for writing, removing it again if it did not exist.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if !existed {
        std::fs::remove_file(path)?;
    }
    Ok(())
}
