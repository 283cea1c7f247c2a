//! Tensors on disk in the safetensors format (what PyTorch, candle and burn exchange).
//!
//! Files are written atomically: to a temporary file beside the target, flushed to disk, then
//! renamed over it, so a crash never leaves a half-written file under the real name. Reading
//! checks everything it relies on and returns a [`TensorFileError`] that names the file and what
//! is wrong with it: never a panic.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::param::ParamStore;
use crate::tensor::Tensor;

/// What went wrong reading or writing a tensor file.
#[derive(Debug)]
pub enum TensorFileError {
    /// The file could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The bytes are not a valid safetensors file (bad header, offsets out of range, truncated).
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser found wrong.
        detail: String,
    },
    /// A tensor the reader needs is not in the file.
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor has another shape than the one expected.
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the model has.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored with an element type other than `f32`.
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The element type in the file.
        found: String,
    },
    /// The file's metadata is missing a field or holds an invalid value.
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl fmt::Display for TensorFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorFileError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            TensorFileError::Format { path, detail } => {
                write!(
                    f,
                    "{}: not a valid safetensors file: {detail}",
                    path.display()
                )
            }
            TensorFileError::Missing { path, name } => {
                write!(f, "{}: tensor {name:?} is missing", path.display())
            }
            TensorFileError::Shape {
                path,
                name,
                expected,
                found,
            } => write!(
                f,
                "{}: tensor {name:?} has shape {found:?}, expected {expected:?}",
                path.display()
            ),
            TensorFileError::Dtype { path, name, found } => write!(
                f,
                "{}: tensor {name:?} is stored as {found}, expected F32",
                path.display()
            ),
            TensorFileError::Metadata { path, detail } => {
                write!(f, "{}: metadata: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for TensorFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TensorFileError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The contents of a safetensors file: named `f32` and `f64` tensors and string metadata.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    /// The file the contents came from.
    pub path: PathBuf,
    /// `f32` tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// `f64` tensors by name, as `(shape, row-major values)` (optimizer statistics kept in
    /// double precision).
    pub tensors64: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    /// The header's `__metadata__` map.
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Takes a tensor out by name, checking its shape if `expected` is given.
    pub fn take(
        &mut self,
        name: &str,
        expected: Option<&[usize]>,
    ) -> Result<Tensor, TensorFileError> {
        let t = self.get(name, expected)?.clone();
        self.tensors.remove(name);
        Ok(t)
    }

    /// A tensor by name, checking its shape if `expected` is given.
    /// A tensor stored as `F64` is a [`TensorFileError::Dtype`] here (this reads `f32` ones).
    pub fn get(&self, name: &str, expected: Option<&[usize]>) -> Result<&Tensor, TensorFileError> {
        let t = self.tensors.get(name).ok_or_else(|| {
            if self.tensors64.contains_key(name) {
                TensorFileError::Dtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    found: "F64".into(),
                }
            } else {
                TensorFileError::Missing {
                    path: self.path.clone(),
                    name: name.to_string(),
                }
            }
        })?;
        if let Some(shape) = expected
            && t.shape() != shape
        {
            return Err(TensorFileError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }

    /// A metadata value by key.
    pub fn meta(&self, key: &str) -> Result<&str, TensorFileError> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| TensorFileError::Metadata {
                path: self.path.clone(),
                detail: format!("missing key {key:?}"),
            })
    }
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.numel() * 4);
    for v in t.data() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes named tensors and metadata to `path` as safetensors, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: HashMap<String, String>,
) -> Result<(), TensorFileError> {
    write_tensors_mixed(path, tensors, &[], metadata)
}

/// One `f64` tensor to write: its name, shape and row-major values.
pub type F64Entry<'a> = (String, &'a [usize], &'a [f64]);

/// [`write_tensors`] with `f64` tensors too (stored as safetensors `F64`).
pub fn write_tensors_mixed(
    path: &Path,
    tensors: &[(String, &Tensor)],
    tensors64: &[F64Entry<'_>],
    metadata: HashMap<String, String>,
) -> Result<(), TensorFileError> {
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), f32_bytes(t), t.shape().to_vec(), Dtype::F32))
        .collect();
    for (n, shape, data) in tensors64 {
        let mut b = Vec::with_capacity(data.len() * 8);
        for v in *data {
            b.extend_from_slice(&v.to_le_bytes());
        }
        bytes.push((n.clone(), b, shape.to_vec(), Dtype::F64));
    }
    let views = bytes
        .iter()
        .map(|(n, b, s, dtype)| {
            TensorView::new(*dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TensorFileError::Format {
                    path: path.to_path_buf(),
                    detail: format!("tensor {n:?}: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = (!metadata.is_empty()).then_some(metadata);
    let data = safetensors::serialize(views, meta).map_err(|e| TensorFileError::Format {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    write_atomic(path, &data)
}

/// Writes `data` to `path` through a temporary file in the same directory and a rename, so
/// that `path` holds either its old contents or all of `data`, never a part.
///
/// The temporary file is created exclusively (`O_CREAT | O_EXCL`: a file or symbolic link
/// already at that name is never opened, so a link planted there cannot redirect the write)
/// under a name that cannot be predicted (`.NAME.` plus 64 random bits from the operating
/// system's hasher seed, the process id and a clock), retried under a new name if taken. A
/// file replaced at `path` keeps its permission bits; a new one gets the process's defaults.
/// On every error the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TensorFileError> {
    let io = |source| TensorFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("path has no file name")))?;
    // What the replaced file allowed (a symbolic link at `path` is replaced, not followed).
    let keep = std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.permissions());
    let (mut f, tmp) = (0..16)
        .find_map(|attempt| {
            let mut name = std::ffi::OsString::from(".");
            name.push(file_name);
            name.push(format!(".{:016x}.tmp", unpredictable(attempt)));
            let tmp = path.with_file_name(name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => Some(Ok((f, tmp))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                Err(e) => Some(Err(e)),
            }
        })
        .unwrap_or_else(|| {
            Err(std::io::Error::other(
                "no free temporary file name beside it after 16 tries",
            ))
        })
        .map_err(io)?;
    let result = (|| {
        if let Some(perm) = keep {
            f.set_permissions(perm)?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// 64 bits no other process can guess: the standard library's per-process random hasher keys
/// over the process id, a clock and `salt`.
fn unpredictable(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(salt);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// Reads every tensor of a safetensors file (each `f32` or `f64`).
pub fn read_tensors(path: &Path) -> Result<TensorFile, TensorFileError> {
    let data = std::fs::read(path).map_err(|source| TensorFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let format = |detail: String| TensorFileError::Format {
        path: path.to_path_buf(),
        detail,
    };
    let (_, meta) = SafeTensors::read_metadata(&data).map_err(|e| format(e.to_string()))?;
    let st = SafeTensors::deserialize(&data).map_err(|e| format(e.to_string()))?;
    let mut tensors = BTreeMap::new();
    let mut tensors64 = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let shape = view.shape().to_vec();
        let fill = |n: usize| -> Result<(), TensorFileError> {
            if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(n) {
                Ok(())
            } else {
                Err(format(format!(
                    "tensor {name:?}: {} bytes do not fill shape {shape:?}",
                    raw.len()
                )))
            }
        };
        match view.dtype() {
            Dtype::F32 => {
                let values: Vec<f32> = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                fill(values.len())?;
                tensors.insert(name, Tensor::from_vec(values, &shape));
            }
            Dtype::F64 => {
                let values: Vec<f64> = raw
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                fill(values.len())?;
                tensors64.insert(name, (shape, values));
            }
            other => {
                return Err(TensorFileError::Dtype {
                    path: path.to_path_buf(),
                    name,
                    found: format!("{other:?}"),
                });
            }
        }
    }
    Ok(TensorFile {
        path: path.to_path_buf(),
        tensors,
        tensors64,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// Saves every parameter of `store` under its dotted name (PyTorch `state_dict` style).
pub fn save_params(store: &ParamStore, path: &Path) -> Result<(), TensorFileError> {
    let tensors: Vec<(String, &Tensor)> = store
        .iter()
        .map(|(_, name, t)| (name.to_string(), t))
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "kron-params".to_string());
    write_tensors(path, &tensors, meta)
}

/// Loads every parameter of `store` from a file, matching by name and checking shapes. Every
/// tensor is checked before any is written, so on error the store is left as it was. Extra
/// tensors in the file are ignored.
pub fn load_params(store: &mut ParamStore, path: &Path) -> Result<(), TensorFileError> {
    let file = read_tensors(path)?;
    load_params_from(store, &file, "")
}

/// Loads the parameters of `store` from tensors named `prefix + name` in an already-read file,
/// all or nothing.
pub fn load_params_from(
    store: &mut ParamStore,
    file: &TensorFile,
    prefix: &str,
) -> Result<(), TensorFileError> {
    let mut staged = Vec::with_capacity(store.len());
    for (id, name, value) in store.iter() {
        let t = file.get(&format!("{prefix}{name}"), Some(value.shape()))?;
        staged.push((id, t.clone()));
    }
    for (id, t) in staged {
        store.set(id, t);
    }
    Ok(())
}
