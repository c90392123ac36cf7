//! One contiguous block of rows (points) of every array of a data file,
//! reading only those rows where the format allows it: what a rank of a
//! data-parallel job loads ([`crate::distributed`]).
//!
//! Both formats store arrays row-major behind a header, so the rows
//! `start..end` of an `(N, *rest)` array are one byte range of the
//! memory-mapped file, and only its pages are copied into the tensor:
//!
//! - `.safetensors`: the header is parsed and validated by the `safetensors`
//!   crate (offsets against shapes and the file's length);
//! - `.npz`: a stored (uncompressed) member, as `np.savez` writes, is
//!   bounds-checked and its CRC-32 verified like the whole-file reader does
//!   ([`super::npy`]; the check streams the member through the page cache,
//!   it copies nothing), and its `.npy` header checked against its bytes.
//!
//! What no byte range can serve (a deflated member from `np.savez_compressed`,
//! a Fortran-ordered array, a dtype we do not map) is read whole by the
//! whole-file reader, under the same memory budget, and narrowed.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use super::npy;
use crate::error::{bail, Error, Result};
use crate::tensor::{DType, Device, Tensor};

/// A data file opened for reading by rows.
pub struct RowReader {
    path: std::path::PathBuf,
    map: memmap2::Mmap,
    /// Every array, sorted by key; `None` when some array needs the
    /// whole-file reader.
    arrays: Option<Vec<Array>>,
}

/// An array of the mapped file: its rows are `bytes` split evenly.
struct Array {
    key: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

impl RowReader {
    /// Map `path` (`.npz` or `.safetensors`) and read its headers.
    pub fn open(path: &Path) -> Result<Self> {
        let kind = match path.extension().and_then(|e| e.to_str()) {
            Some(e @ ("npz" | "safetensors")) => e,
            _ => bail!(Data, "{}: expected a .npz or .safetensors file", path.display()),
        };
        let map = npy::map(path)?;
        let arrays = if kind == "npz" { npz_arrays(&map, &path.display())? } else { safetensors_arrays(&map, path)? };
        Ok(RowReader { path: path.to_path_buf(), map, arrays })
    }

    /// Every array's key and shape, sorted by key.
    pub fn shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let mut shapes: Vec<_> = match &self.arrays {
            Some(arrays) => arrays.iter().map(|a| (a.key.clone(), a.shape.clone())).collect(),
            None => self.whole()?.into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect(),
        };
        shapes.sort();
        Ok(shapes)
    }

    /// Rows `rows` of every array, each `(rows.len(), *rest)` in its stored
    /// dtype. Every array must have at least `rows.end` rows.
    pub fn read(&self, rows: Range<usize>, device: &Device) -> Result<HashMap<String, Tensor>> {
        let no_rows = |key: &str, shape: &[usize]| {
            Error::Data(format!("{}: {key:?} has shape {shape:?}, which has no rows {}..{}", self.path.display(), rows.start, rows.end))
        };
        let Some(arrays) = &self.arrays else {
            let mut out = HashMap::new();
            for (key, t) in self.whole()? {
                if t.rank() == 0 || t.dim(0)? < rows.end {
                    return Err(no_rows(&key, t.dims()));
                }
                out.insert(key, t.narrow(0, rows.start, rows.len())?);
            }
            return Ok(out);
        };
        let mut out = HashMap::new();
        for a in arrays {
            if a.shape.first().is_none_or(|&n| n < rows.end) {
                return Err(no_rows(&a.key, &a.shape));
            }
            // Exact: the headers were checked against the byte ranges.
            let row_bytes = a.bytes.len() / a.shape[0].max(1);
            let mut shape = a.shape.clone();
            shape[0] = rows.len();
            crate::budget::check(&format!("{}: rows {}..{} of {:?}", self.path.display(), rows.start, rows.end, a.key), &shape, a.dtype.size_in_bytes())?;
            let start = a.bytes.start + rows.start * row_bytes;
            let data = &self.map[start..start + rows.len() * row_bytes];
            out.insert(a.key.clone(), Tensor::from_raw_buffer(data, a.dtype, &shape, device)?);
        }
        Ok(out)
    }

    /// Every array, by the whole-file reader.
    fn whole(&self) -> Result<HashMap<String, Tensor>> {
        super::read_tensors(&self.path, &Device::Cpu)
    }
}

/// The stored, C-ordered arrays of a `.npz` archive in memory, or `None` when
/// some member is not one (read it whole).
fn npz_arrays(bytes: &[u8], what: &dyn std::fmt::Display) -> Result<Option<Vec<Array>>> {
    let bad = |m: String| Error::Data(format!("{what}: {m}"));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(format!("not a readable .npz (zip) archive: {e}")))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let f = zip.by_index(i).map_err(|e| bad(format!("member {i}: {e}")))?;
        if f.is_dir() {
            continue;
        }
        if f.compression() != zip::CompressionMethod::Stored {
            return Ok(None);
        }
        let name = f.name().map_err(|e| bad(format!("member {i}: bad name: {e}")))?.into_owned();
        let member = format!("{what}: member {name:?}");
        let data = npy::stored_member(bytes, &f, &member)?;
        let h = npy::parse_header(data, &member)?;
        npy::check_data_len(&h, data.len() - h.data_offset, &member)?;
        if h.fortran_order && h.shape.len() > 1 {
            return Ok(None);
        }
        // Offsets within the whole mapped file.
        let base = data.as_ptr() as usize - bytes.as_ptr() as usize;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        out.push(Array { key, dtype: h.dtype, shape: h.shape, bytes: base + h.data_offset..base + data.len() });
    }
    Ok(Some(out))
}

/// The arrays of a `.safetensors` file in memory (header validated by the
/// `safetensors` crate), or `None` when one has a dtype we do not map.
fn safetensors_arrays(bytes: &[u8], path: &Path) -> Result<Option<Vec<Array>>> {
    use safetensors::Dtype as S;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Data(format!("{}: not a readable safetensors file: {e}", path.display())))?;
    let mut out = Vec::new();
    for (key, view) in st.iter() {
        let dtype = match view.dtype() {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::U32 => DType::U32,
            S::U8 => DType::U8,
            _ => return Ok(None),
        };
        let data = view.data();
        let base = data.as_ptr() as usize - bytes.as_ptr() as usize;
        out.push(Array { key: key.to_string(), dtype, shape: view.shape().to_vec(), bytes: base..base + data.len() });
    }
    Ok(Some(out))
}
