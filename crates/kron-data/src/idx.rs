//! The IDX format of MNIST and its relatives, read raw or gzip-compressed.
//!
//! An IDX file is a header and a payload. The header is a magic number, four bytes
//! `0, 0, type, rank`, then `rank` dimensions as big-endian `u32`s; the payload is the
//! elements, row-major and big-endian. MNIST images have magic 2051 (`u8`, rank 3: count, rows,
//! cols) and labels 2049 (`u8`, rank 1: count).
//!
//! Files may be gzip-compressed; that is recognized by the gzip magic bytes `1f 8b`, never by the
//! file name. Every reader checks the header against the file's length, so a truncated file or
//! one with trailing bytes is an error naming the file, never a panic.
//!
//! [`read_images`] and [`read_labels`] read MNIST's two kinds of file; [`read_idx`] reads any IDX
//! file. The `parse_*` variants take the bytes in memory, with a `source` path used in errors.

use std::borrow::Cow;
use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;
use kron_autodiff::Tensor;

use crate::error::DataError;

/// Magic number of an MNIST images file (`u8`, rank 3).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an MNIST labels file (`u8`, rank 1).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The element type of an IDX file (the third byte of its magic number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdxDtype {
    /// Unsigned byte, code `0x08`.
    U8,
    /// Signed byte, code `0x09`.
    I8,
    /// Big-endian `i16`, code `0x0B`.
    I16,
    /// Big-endian `i32`, code `0x0C`.
    I32,
    /// Big-endian `f32`, code `0x0D`.
    F32,
    /// Big-endian `f64`, code `0x0E`.
    F64,
}

impl IdxDtype {
    /// The type for an IDX type code, if it is one.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x08 => IdxDtype::U8,
            0x09 => IdxDtype::I8,
            0x0B => IdxDtype::I16,
            0x0C => IdxDtype::I32,
            0x0D => IdxDtype::F32,
            0x0E => IdxDtype::F64,
            _ => return None,
        })
    }

    /// The IDX type code.
    pub fn code(self) -> u8 {
        match self {
            IdxDtype::U8 => 0x08,
            IdxDtype::I8 => 0x09,
            IdxDtype::I16 => 0x0B,
            IdxDtype::I32 => 0x0C,
            IdxDtype::F32 => 0x0D,
            IdxDtype::F64 => 0x0E,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            IdxDtype::U8 | IdxDtype::I8 => 1,
            IdxDtype::I16 => 2,
            IdxDtype::I32 | IdxDtype::F32 => 4,
            IdxDtype::F64 => 8,
        }
    }
}

/// A whole IDX file: element type, dimensions and the payload as stored (big-endian).
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    dtype: IdxDtype,
    dims: Vec<usize>,
    bytes: Vec<u8>,
}

impl IdxArray {
    /// The element type.
    pub fn dtype(&self) -> IdxDtype {
        self.dtype
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as stored: elements row-major, each big-endian.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The payload, consuming the array.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The elements converted to `f32` (unscaled; `f64` and large `i32` values round).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = &self.bytes;
        match self.dtype {
            IdxDtype::U8 => b.iter().map(|&v| v as f32).collect(),
            IdxDtype::I8 => b.iter().map(|&v| v as i8 as f32).collect(),
            IdxDtype::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]) as f32)
                .collect(),
            IdxDtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            IdxDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            IdxDtype::F64 => b
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    f64::from_be_bytes(a) as f32
                })
                .collect(),
        }
    }

    /// The elements as a tensor of shape [`dims`](Self::dims), converted by
    /// [`to_f32`](Self::to_f32).
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_vec(self.to_f32(), &self.dims)
    }
}

/// MNIST-style images: `count` images of `rows x cols` unsigned bytes (0 = background).
///
/// The pixels are kept as bytes (a quarter of the memory of `f32`); [`Images::to_tensor`] gives
/// the usual `f32` matrix scaled to `[0, 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    count: usize,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
}

impl Images {
    /// The number of images.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Rows per image.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns per image.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// All pixels: image after image, each row-major (`count * rows * cols` bytes).
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The pixels of image `i`, row-major.
    ///
    /// # Panics
    /// If `i >= count`.
    #[track_caller]
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(i < self.count, "Images::image: index {i} of {}", self.count);
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The images as an `f32` matrix `count x (rows * cols)`, each pixel divided by 255.
    pub fn to_tensor(&self) -> Tensor {
        let data = self.pixels.iter().map(|&p| p as f32 / 255.0).collect();
        Tensor::from_vec(data, &[self.count, self.rows * self.cols])
    }
}

/// The bytes of an IDX file, decompressed as [`decompress`] does if they start with the gzip
/// magic bytes `1f 8b`.
pub fn read_bytes(path: impl AsRef<Path>) -> Result<Vec<u8>, DataError> {
    let path = path.as_ref();
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(decompress(&raw, path)?.into_owned())
}

/// The most bytes deflate can expand one compressed byte to (its best ratio is about 1032:1):
/// a bound on what a compressed stream can decode to, so no capacity is reserved beyond it.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// IDX `bytes` decompressed if they start with the gzip magic bytes `1f 8b`, else unchanged.
/// `name` names the data in errors.
///
/// Decompression reads the IDX header first and never produces more than the size it
/// declares plus one byte: a small file that would unpack to gigabytes (a "gzip bomb") costs
/// no more memory or time than the file its header describes, and is refused with
/// [`DataError::TrailingData`]. Without a well-formed header only the header's bytes are
/// decompressed, and the parser reports what is wrong with them.
pub fn decompress<'a>(bytes: &'a [u8], name: &Path) -> Result<Cow<'a, [u8]>, DataError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(Cow::Borrowed(bytes));
    }
    let gzip = |source| DataError::Gzip {
        path: name.to_path_buf(),
        source,
    };
    let mut decoder = MultiGzDecoder::new(bytes);
    let mut out = Vec::new();
    let mut read_up_to = |out: &mut Vec<u8>, total: u64| -> Result<(), DataError> {
        let more = total.saturating_sub(out.len() as u64);
        (&mut decoder).take(more).read_to_end(out).map_err(gzip)?;
        Ok(())
    };
    read_up_to(&mut out, 4)?;
    if out.len() < 4 || out[0] != 0 || out[1] != 0 {
        return Ok(Cow::Owned(out));
    }
    let header_len = 4 + 4 * out[3] as u64;
    read_up_to(&mut out, header_len)?;
    let Some(total) = declared_len(&out) else {
        return Ok(Cow::Owned(out));
    };
    let bound = DEFLATE_MAX_RATIO.saturating_mul(bytes.len() as u64);
    let reserve = total.min(bound).min(1 << 32) as usize;
    out.reserve(reserve.saturating_sub(out.len()));
    read_up_to(&mut out, total.saturating_add(1))?;
    if out.len() as u64 > total {
        return Err(DataError::TrailingData {
            path: name.to_path_buf(),
            expected_bytes: total,
        });
    }
    Ok(Cow::Owned(out))
}

/// The whole size (header and payload) an IDX header declares, if `head` holds a complete
/// header with a known element type and a size that fits in a `u64`.
fn declared_len(head: &[u8]) -> Option<u64> {
    let dtype = IdxDtype::from_code(*head.get(2)?)?;
    let header_len = 4 + 4 * *head.get(3)? as usize;
    file_len(dtype, &dims_of(head.get(4..header_len)?), header_len)
}

/// The dimensions held in a header's big-endian `u32`s (the bytes after the magic number).
fn dims_of(header: &[u8]) -> Vec<usize> {
    header
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect()
}

/// The whole size of a file of `dims` elements of `dtype` after a `header_len`-byte header,
/// if it fits in a `u64`.
fn file_len(dtype: IdxDtype, dims: &[usize], header_len: usize) -> Option<u64> {
    dims.iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))?
        .checked_add(header_len as u64)
}

/// Reads any IDX file (raw or gzip).
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray, DataError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_plain(&bytes, path)
}

/// Parses an IDX file held in memory (raw or gzip); `source` names it in errors.
pub fn parse_idx(bytes: &[u8], source: &Path) -> Result<IdxArray, DataError> {
    parse_plain(&decompress(bytes, source)?, source)
}

/// Reads an MNIST images file (magic 2051: `u8`, rank 3), raw or gzip.
pub fn read_images(path: impl AsRef<Path>) -> Result<Images, DataError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    images_from_plain(&bytes, path)
}

/// Parses an MNIST images file held in memory (raw or gzip); `source` names it in errors.
pub fn parse_images(bytes: &[u8], source: &Path) -> Result<Images, DataError> {
    images_from_plain(&decompress(bytes, source)?, source)
}

/// Reads an MNIST labels file (magic 2049: `u8`, rank 1), raw or gzip.
///
/// The labels are returned as stored; their range is checked where the number of classes is
/// known (for example by [`load_mnist_dir`](crate::load_mnist_dir)).
pub fn read_labels(path: impl AsRef<Path>) -> Result<Vec<u8>, DataError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    labels_from_plain(&bytes, path)
}

/// Parses an MNIST labels file held in memory (raw or gzip); `source` names it in errors.
pub fn parse_labels(bytes: &[u8], source: &Path) -> Result<Vec<u8>, DataError> {
    labels_from_plain(&decompress(bytes, source)?, source)
}

fn images_from_plain(bytes: &[u8], path: &Path) -> Result<Images, DataError> {
    expect_magic(bytes, IMAGES_MAGIC, path)?;
    let arr = parse_plain(bytes, path)?;
    let (count, rows, cols) = (arr.dims[0], arr.dims[1], arr.dims[2]);
    Ok(Images {
        count,
        rows,
        cols,
        pixels: arr.bytes,
    })
}

fn labels_from_plain(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    expect_magic(bytes, LABELS_MAGIC, path)?;
    Ok(parse_plain(bytes, path)?.bytes)
}

/// Checks the first four bytes against `expected`.
fn expect_magic(bytes: &[u8], expected: u32, path: &Path) -> Result<(), DataError> {
    let Some(head) = bytes.get(..4) else {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected_bytes: 4,
            found_bytes: bytes.len() as u64,
        });
    };
    let found = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if found != expected {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    Ok(())
}

/// Parses uncompressed IDX bytes, checking the header against the length.
fn parse_plain(bytes: &[u8], path: &Path) -> Result<IdxArray, DataError> {
    let truncated = |expected: u64| DataError::Truncated {
        path: path.to_path_buf(),
        expected_bytes: expected,
        found_bytes: bytes.len() as u64,
    };
    let bad_header = |detail: String| DataError::BadHeader {
        path: path.to_path_buf(),
        detail,
    };
    let Some(magic) = bytes.get(..4) else {
        return Err(truncated(4));
    };
    if magic[0] != 0 || magic[1] != 0 {
        return Err(bad_header(format!(
            "magic number starts with {:#04x} {:#04x}, not 0 0 (not an IDX file?)",
            magic[0], magic[1]
        )));
    }
    let dtype = IdxDtype::from_code(magic[2])
        .ok_or_else(|| bad_header(format!("unknown element type code {:#04x}", magic[2])))?;
    let rank = magic[3] as usize;
    let header_len = 4 + 4 * rank;
    let Some(header) = bytes.get(4..header_len) else {
        return Err(truncated(header_len as u64));
    };
    let dims = dims_of(header);
    let expected = file_len(dtype, &dims, header_len)
        .ok_or_else(|| bad_header(format!("dimensions {dims:?} overflow")))?;
    let found = bytes.len() as u64;
    if found < expected {
        return Err(truncated(expected));
    }
    if found > expected {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected_bytes: expected,
            found_bytes: found,
        });
    }
    Ok(IdxArray {
        dtype,
        dims,
        bytes: bytes[header_len..].to_vec(),
    })
}

/// Encodes an MNIST-style `u8` IDX file (uncompressed): the header for `dims`, then `data`.
///
/// The inverse of [`read_idx`] for `u8` files; useful to write small test fixtures.
///
/// # Panics
/// If `data.len()` is not the product of `dims`, there are more than 255 dimensions, or a
/// dimension does not fit in a `u32`.
#[track_caller]
pub fn encode_u8(dims: &[usize], data: &[u8]) -> Vec<u8> {
    assert_eq!(
        data.len(),
        dims.iter().product::<usize>(),
        "encode_u8: {} bytes do not fill dims {dims:?}",
        data.len()
    );
    let rank = u8::try_from(dims.len()).expect("encode_u8: more than 255 dimensions");
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    out.extend_from_slice(&[0, 0, IdxDtype::U8.code(), rank]);
    for &d in dims {
        let d = u32::try_from(d).expect("encode_u8: dimension does not fit in u32");
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}
