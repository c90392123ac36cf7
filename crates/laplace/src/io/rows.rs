//! One contiguous block of rows (points) of every array of a data file,
//! reading only those rows where the format allows it: what a rank of a
//! data-parallel job loads ([`crate::distributed`]).
//!
//! Both formats store arrays row-major behind a header, so the rows
//! `start..end` of an `(N, *rest)` array are one byte range:
//!
//! - `.safetensors`: an 8-byte header length, a JSON header with each array's
//!   dtype, shape and byte offsets, then the data;
//! - `.npz`: a zip archive of `.npy` members, each a header (magic, version,
//!   a Python dict with `descr`, `fortran_order`, `shape`) then the data. A
//!   stored (uncompressed) member is read by seeking to its rows; a
//!   compressed one is decompressed from its start up to its last needed row
//!   and no further.
//!
//! What no byte range can serve (a Fortran-ordered or big-endian array, a
//! dtype we do not map) is read whole and narrowed, as the whole-file readers
//! would.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use crate::error::{bail, Error, Result};
use crate::tensor::{DType, Device, Tensor};

/// Where one array's elements are.
#[derive(Clone, Debug)]
enum Source {
    /// Row-major little-endian data at this byte offset of the file.
    Raw { offset: u64 },
    /// Row-major data behind the `.npy` header of a compressed `.npz` member.
    Member { name: String },
    /// Not readable by rows: read the whole file and narrow.
    Whole,
}

/// An array of a data file, from its header.
#[derive(Clone, Debug)]
struct Layout {
    key: String,
    dtype: DType,
    shape: Vec<usize>,
    source: Source,
}

impl Layout {
    fn row_bytes(&self) -> usize {
        self.shape[1..].iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// Every array of a data file (`.npz` or `.safetensors`) and its shape, from
/// the headers alone, sorted by key.
pub fn array_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut shapes: Vec<_> = layouts(path)?.into_iter().map(|l| (l.key, l.shape)).collect();
    shapes.sort();
    Ok(shapes)
}

/// Rows `rows` of every array of a data file, each `(rows.len(), *rest)` in
/// its stored dtype. Every array must have at least `rows.end` rows.
pub fn read_rows(path: &Path, rows: Range<usize>, device: &Device) -> Result<HashMap<String, Tensor>> {
    let layouts = layouts(path)?;
    let mut whole: Option<HashMap<String, Tensor>> = None;
    let mut out = HashMap::new();
    for l in layouts {
        if l.shape.is_empty() || l.shape[0] < rows.end {
            bail!(Data, "{}: {:?} has shape {:?}, which has no rows {}..{}", path.display(), l.key, l.shape, rows.start, rows.end);
        }
        let mut shape = l.shape.clone();
        shape[0] = rows.len();
        let (skip, take) = (rows.start * l.row_bytes(), rows.len() * l.row_bytes());
        let t = match &l.source {
            Source::Raw { offset } => {
                let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
                f.seek(SeekFrom::Start(offset + skip as u64)).map_err(|e| Error::io(path, e))?;
                from_bytes(&read_exact(&mut f, take, path, &l.key)?, &l, &shape, device)?
            }
            Source::Member { name } => {
                let mut zip = open_zip(path)?;
                let mut member = zip.by_name(name).map_err(|e| not_npz(path, e))?;
                read_npy_header(&mut member, path)?;
                std::io::copy(&mut (&mut member).take(skip as u64), &mut std::io::sink()).map_err(|e| Error::io(path, e))?;
                from_bytes(&read_exact(&mut member, take, path, &l.key)?, &l, &shape, device)?
            }
            Source::Whole => {
                if whole.is_none() {
                    whole = Some(crate::io::read_tensors(path, device)?);
                }
                let all = whole.as_ref().expect("just read");
                all[&l.key].narrow(0, rows.start, rows.len())?
            }
        };
        out.insert(l.key, t);
    }
    Ok(out)
}

fn read_exact(r: &mut impl Read, n: usize, path: &Path, key: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Data(format!("{}: {key:?} is truncated (the file ends inside its data)", path.display())),
        _ => Error::io(path, e),
    })?;
    Ok(buf)
}

fn from_bytes(bytes: &[u8], l: &Layout, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_raw_buffer(bytes, l.dtype, shape, device)?)
}

fn layouts(path: &Path) -> Result<Vec<Layout>> {
    if !path.exists() {
        return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("npz") => npz_layouts(path),
        Some("safetensors") => safetensors_layouts(path),
        _ => bail!(Data, "{}: expected a .npz or .safetensors file", path.display()),
    }
}

fn not_npz(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: not a readable .npz archive: {e}", path.display()))
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    zip::ZipArchive::new(BufReader::new(f)).map_err(|e| not_npz(path, e))
}

fn npz_layouts(path: &Path) -> Result<Vec<Layout>> {
    let mut zip = open_zip(path)?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| not_npz(path, e))?;
        let name = member.name().map_err(|e| not_npz(path, e))?.into_owned();
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let stored = member.compression() == zip::CompressionMethod::Stored;
        let data_start = member.data_start();
        let (header, header_len) = read_npy_header(&mut member, path)?;
        drop(member);
        let (dtype, shape) = match header {
            Some(h) => h,
            None => {
                out.push(Layout { key, dtype: DType::U8, shape: whole_shape(path, &name)?, source: Source::Whole });
                continue;
            }
        };
        let source = match (stored, data_start) {
            (true, Some(start)) => Source::Raw { offset: start + header_len },
            _ => Source::Member { name },
        };
        out.push(Layout { key, dtype, shape, source });
    }
    Ok(out)
}

/// The shape of an array the row reader cannot map, by the whole-file reader.
fn whole_shape(path: &Path, member: &str) -> Result<Vec<usize>> {
    let key = member.strip_suffix(".npy").unwrap_or(member);
    let all = crate::io::read_npz(path, &Device::Cpu)?;
    match all.get(key) {
        Some(t) => Ok(t.dims().to_vec()),
        None => bail!(Data, "{}: cannot read member {member:?}", path.display()),
    }
}

/// Read a `.npy` header: the dtype and shape of a C-ordered little-endian
/// array of a dtype we map, or `None` for one the row reader cannot serve;
/// and the header's length in bytes (where the data starts).
fn read_npy_header(r: &mut impl Read, path: &Path) -> Result<(Option<(DType, Vec<usize>)>, u64)> {
    let bad = |what: &str| Error::Data(format!("{}: not a readable .npz archive: {what}", path.display()));
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(|_| bad("a member is not a .npy array"))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("a member is not a .npy array (no magic string)"));
    }
    let (len, fixed) = if pre[6] == 1 {
        let mut l = [0u8; 2];
        r.read_exact(&mut l).map_err(|_| bad("truncated .npy header"))?;
        (u16::from_le_bytes(l) as usize, 10)
    } else {
        let mut l = [0u8; 4];
        r.read_exact(&mut l).map_err(|_| bad("truncated .npy header"))?;
        (u32::from_le_bytes(l) as usize, 12)
    };
    let header_len = (fixed + len) as u64;
    let mut dict = vec![0u8; len];
    r.read_exact(&mut dict).map_err(|_| bad("truncated .npy header"))?;
    let dict = String::from_utf8_lossy(&dict);
    let descr = dict_value(&dict, "descr").ok_or_else(|| bad("no descr in a .npy header"))?;
    let fortran = dict_value(&dict, "fortran_order").ok_or_else(|| bad("no fortran_order in a .npy header"))?;
    let shape = dict_value(&dict, "shape").ok_or_else(|| bad("no shape in a .npy header"))?;
    let shape: Vec<usize> = shape
        .trim_matches(|c: char| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("a .npy shape is not a tuple of sizes")))
        .collect::<Result<_>>()?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr.strip_prefix(['<', '|', '=']).unwrap_or(descr) {
        "f8" => DType::F64,
        "f4" => DType::F32,
        "f2" => DType::F16,
        "i8" => DType::I64,
        "i4" => DType::I32,
        "i2" => DType::I16,
        "u4" => DType::U32,
        "u1" | "b1" => DType::U8,
        _ => return Ok((None, header_len)),
    };
    if fortran.trim() != "False" || descr.starts_with('>') {
        return Ok((None, header_len));
    }
    Ok((Some((dtype, shape)), header_len))
}

/// The value of `'key': value` in a `.npy` header dict (a Python literal):
/// up to the next top-level comma (tuples kept whole).
fn dict_value<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    let at = dict.find(&format!("'{key}'")).or_else(|| dict.find(&format!("\"{key}\"")))?;
    let rest = dict[at + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..=i]);
                }
            }
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

fn safetensors_layouts(path: &Path) -> Result<Vec<Layout>> {
    let bad = |what: String| Error::Data(format!("{}: not a readable safetensors file: {what}", path.display()));
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("shorter than its header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!("header length {n} does not fit the file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| bad("truncated header".into()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut out = Vec::new();
    for (key, info) in header {
        if key == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad(format!("{key:?} has no dtype")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad(format!("{key:?} has no shape")))?;
        let begin = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.first())
            .and_then(|b| b.as_u64())
            .ok_or_else(|| bad(format!("{key:?} has no data_offsets")))?;
        let dtype = match dtype {
            "F64" => Some(DType::F64),
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "I64" => Some(DType::I64),
            "I32" => Some(DType::I32),
            "I16" => Some(DType::I16),
            "U32" => Some(DType::U32),
            "U8" => Some(DType::U8),
            _ => None,
        };
        out.push(match dtype {
            Some(dtype) => Layout { key, dtype, shape, source: Source::Raw { offset: 8 + n + begin } },
            None => Layout { key, dtype: DType::U8, shape, source: Source::Whole },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_dict_values() {
        let d = "{'descr': '<f8', 'fortran_order': False, 'shape': (8, 3, 2), }";
        assert_eq!(dict_value(d, "descr"), Some("'<f8'"));
        assert_eq!(dict_value(d, "fortran_order"), Some("False"));
        assert_eq!(dict_value(d, "shape"), Some("(8, 3, 2)"));
        assert_eq!(dict_value("{'shape': (5,), 'descr': '<i8', 'fortran_order': True}", "shape"), Some("(5,)"));
        assert_eq!(dict_value(d, "nothing"), None);
    }
}
