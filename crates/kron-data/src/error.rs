//! The one error type of kron-data: every failure names the file (or source) and what is wrong.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What went wrong while reading or checking data.
///
/// Every variant that concerns a file carries its path (for bundled data, a path under
/// `<bundled>/`), so a message such as
/// `data/train-images-idx3-ubyte.gz: truncated: expected 47040016 bytes, found 1000` says both
/// which file and what is wrong.
#[derive(Debug)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or read.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file starts like gzip (bytes `1f 8b`) but its stream is damaged or cut short.
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decompressor's error.
        source: io::Error,
    },
    /// A required file is in neither its raw nor its `.gz` form.
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// The canonical file name looked for (also tried with `.gz`).
        name: String,
    },
    /// The IDX magic number is not the one this file must have.
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The expected magic number (2051 for images, 2049 for labels).
        expected: u32,
        /// The magic number found (the first four bytes, big-endian).
        found: u32,
    },
    /// The IDX header is malformed (non-zero leading bytes, unknown type code, sizes that
    /// overflow).
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The (decompressed) file is shorter than its header says.
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header calls for.
        expected_bytes: u64,
        /// Bytes present.
        found_bytes: u64,
    },
    /// The (decompressed) file is longer than its header says.
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Bytes the header calls for.
        expected_bytes: u64,
        /// Bytes present.
        found_bytes: u64,
    },
    /// A gzip-compressed file decompresses to more than its header says. Decompression
    /// stops one byte past the declared size, so how much more is not known.
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Bytes the header calls for.
        expected_bytes: u64,
    },
    /// An images file and its labels file disagree on the number of examples.
    CountMismatch {
        /// The images file.
        images: PathBuf,
        /// Number of images it holds.
        image_count: usize,
        /// The labels file.
        labels: PathBuf,
        /// Number of labels it holds.
        label_count: usize,
    },
    /// Images of one file differ in size from those of another (train and test must agree).
    ShapeMismatch {
        /// The file whose images do not match.
        path: PathBuf,
        /// The image shape expected (rows, cols).
        expected: Vec<usize>,
        /// The image shape found.
        found: Vec<usize>,
    },
    /// A label lies outside `0..num_classes`.
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// The example's position in the file.
        index: usize,
        /// The label found.
        label: usize,
        /// The number of classes allowed.
        num_classes: usize,
    },
    /// A line of a text (CSV) file could not be parsed.
    Parse {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// A saved batch-iterator position is inconsistent (for example, a cursor past the end).
    BadState {
        /// What is wrong.
        detail: String,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Io { path, source } => {
                write!(f, "{}: cannot read: {source}", path.display())
            }
            DataError::Gzip { path, source } => {
                write!(f, "{}: damaged gzip stream: {source}", path.display())
            }
            DataError::MissingFile { dir, name } => write!(
                f,
                "{}: neither {name} nor {name}.gz is there",
                dir.display()
            ),
            DataError::BadMagic {
                path,
                expected,
                found,
            } => write!(
                f,
                "{}: bad magic number: expected {expected} ({expected:#010x}), found {found} \
                 ({found:#010x})",
                path.display()
            ),
            DataError::BadHeader { path, detail } => {
                write!(f, "{}: bad IDX header: {detail}", path.display())
            }
            DataError::Truncated {
                path,
                expected_bytes,
                found_bytes,
            } => write!(
                f,
                "{}: truncated: expected {expected_bytes} bytes, found {found_bytes}",
                path.display()
            ),
            DataError::TrailingBytes {
                path,
                expected_bytes,
                found_bytes,
            } => write!(
                f,
                "{}: {} trailing bytes: expected {expected_bytes} bytes, found {found_bytes}",
                path.display(),
                found_bytes.saturating_sub(*expected_bytes)
            ),
            DataError::TrailingData {
                path,
                expected_bytes,
            } => write!(
                f,
                "{}: decompresses to more than the {expected_bytes} bytes its header calls for \
                 (decompression stopped there)",
                path.display()
            ),
            DataError::CountMismatch {
                images,
                image_count,
                labels,
                label_count,
            } => write!(
                f,
                "{} holds {image_count} images but {} holds {label_count} labels",
                images.display(),
                labels.display()
            ),
            DataError::ShapeMismatch {
                path,
                expected,
                found,
            } => write!(
                f,
                "{}: images are {found:?}, expected {expected:?}",
                path.display()
            ),
            DataError::LabelOutOfRange {
                path,
                index,
                label,
                num_classes,
            } => write!(
                f,
                "{}: label {label} of example {index} is outside 0..{num_classes}",
                path.display()
            ),
            DataError::Parse { path, line, detail } => {
                write!(f, "{}:{line}: {detail}", path.display())
            }
            DataError::BadState { detail } => write!(f, "bad batch iterator state: {detail}"),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Io { source, .. } | DataError::Gzip { source, .. } => Some(source),
            _ => None,
        }
    }
}
