//! numpy `.npy` arrays and `.npz` archives, read defensively.
//!
//! Every size a file declares (the header length, the shape) is checked
//! against the bytes actually present and against the memory budget
//! ([`crate::budget`]) before anything is allocated, so a 400-byte file
//! claiming 10¹² elements is an error, not an abort. Archives are read with
//! the `zip` crate: stored members straight from the memory-mapped file
//! (their CRC-32 checked, one copy into the tensor), deflated members
//! (`np.savez_compressed`) through its decoder, which checks the CRC-32 at
//! the end of the stream. numpy refuses the same corrupt files.

use std::collections::HashMap;
use std::fmt::Display;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};

const MAGIC: &[u8] = b"\x93NUMPY";

/// What an `.npy` header declares.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Element type (from `descr`).
    pub dtype: DType,
    /// Shape, C order unless `fortran_order`.
    pub shape: Vec<usize>,
    /// Column-major data.
    pub fortran_order: bool,
    /// Offset of the data from the start of the array bytes.
    pub data_offset: usize,
}

fn bad(what: &dyn Display, msg: impl Display) -> Error {
    Error::Data(format!("{what}: {msg}"))
}

/// Parse the header of the `.npy` bytes `b`; `what` names them in errors.
pub fn parse_header(b: &[u8], what: &dyn Display) -> Result<Header> {
    if b.len() < 10 || &b[..6] != MAGIC {
        return Err(bad(what, "not a .npy array (no \\x93NUMPY magic)"));
    }
    let (len, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(bad(what, format!(".npy format version {v}.{} is not supported (1, 2 or 3)", b[7]))),
    };
    let end = start.checked_add(len).filter(|&e| e <= b.len()).ok_or_else(|| {
        bad(what, format!("the .npy header declares {len} bytes but only {} follow", b.len() - start))
    })?;
    let text = std::str::from_utf8(&b[start..end]).map_err(|_| bad(what, "the .npy header is not text"))?;
    let dict = parse_dict(text).map_err(|m| bad(what, format!("bad .npy header {:?}: {m}", truncate(text))))?;
    let get = |k: &str| dict.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let descr = match get("descr") {
        Some(Lit::Str(s)) => s.clone(),
        _ => return Err(bad(what, "the .npy header has no string 'descr' (structured arrays are not supported)")),
    };
    let fortran_order = match get("fortran_order") {
        Some(Lit::Bool(f)) => *f,
        _ => return Err(bad(what, "the .npy header has no boolean 'fortran_order'")),
    };
    let shape = match get("shape") {
        Some(Lit::Tuple(s)) => s.clone(),
        _ => return Err(bad(what, "the .npy header has no tuple 'shape'")),
    };
    Ok(Header { dtype: dtype_of(&descr).map_err(|m| bad(what, m))?, shape, fortran_order, data_offset: end })
}

fn truncate(s: &str) -> String {
    s.chars().take(120).collect()
}

/// numpy's dtype string → candle's dtype (little-endian or byte-sized only).
fn dtype_of(descr: &str) -> std::result::Result<DType, String> {
    if !descr.is_char_boundary(1) {
        return Err(format!("dtype {descr:?} is not supported"));
    }
    let (order, code) = descr.split_at(1);
    if order == ">" && !matches!(code, "u1" | "b1" | "i1") {
        return Err(format!("big-endian dtype {descr:?} is not supported (save with '<' byte order)"));
    }
    if !matches!(order, "<" | "|" | "=" | ">") {
        return Err(format!("dtype {descr:?} is not supported"));
    }
    Ok(match code {
        "f2" => DType::F16,
        "f4" => DType::F32,
        "f8" => DType::F64,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "u1" | "b1" => DType::U8,
        "u4" => DType::U32,
        _ => return Err(format!("dtype {descr:?} is not supported (float16/32/64, int16/32/64, uint8/32, bool)")),
    })
}

/// A Python literal of an `.npy` header.
#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// `{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }` → entries.
fn parse_dict(text: &str) -> std::result::Result<Vec<(String, Lit)>, String> {
    let mut s = Cursor { s: text.trim_end().as_bytes(), i: 0 };
    s.expect(b'{')?;
    let mut out = Vec::new();
    loop {
        s.ws();
        if s.eat(b'}') {
            break;
        }
        let Lit::Str(key) = s.literal()? else { return Err("keys must be strings".into()) };
        s.ws();
        s.expect(b':')?;
        s.ws();
        let value = s.literal()?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("key {key:?} appears twice"));
        }
        out.push((key, value));
        s.ws();
        if !s.eat(b',') {
            s.ws();
            s.expect(b'}')?;
            break;
        }
    }
    s.ws();
    if s.i != s.s.len() {
        return Err("text after the dictionary".into());
    }
    Ok(out)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        let hit = self.s.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected {:?} at offset {}", c as char, self.i))
        }
    }
    fn literal(&mut self) -> std::result::Result<Lit, String> {
        match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while self.s.get(self.i).is_some_and(|&c| c != q) {
                    self.i += 1;
                }
                let v = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.expect(q)?;
                Ok(Lit::Str(v))
            }
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    self.ws();
                    if self.eat(b')') {
                        break;
                    }
                    let start = self.i;
                    while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                        self.i += 1;
                    }
                    let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                    let d: usize = digits.parse().map_err(|_| format!("shape entry at offset {start} is not a non-negative integer"))?;
                    dims.push(d);
                    self.ws();
                    if !self.eat(b',') {
                        self.ws();
                        self.expect(b')')?;
                        break;
                    }
                }
                Ok(Lit::Tuple(dims))
            }
            _ if self.s[self.i..].starts_with(b"True") => {
                self.i += 4;
                Ok(Lit::Bool(true))
            }
            _ if self.s[self.i..].starts_with(b"False") => {
                self.i += 5;
                Ok(Lit::Bool(false))
            }
            _ => Err(format!("unexpected value at offset {}", self.i)),
        }
    }
}

/// Refuse a header whose shape does not account for exactly the `have` data
/// bytes that follow it (before anything is allocated for the shape).
pub fn check_data_len(h: &Header, have: usize, what: &dyn Display) -> Result<()> {
    let need = crate::budget::bytes(&h.shape, h.dtype.size_in_bytes());
    if need != Some(have as u64) {
        let need = need.map_or("more than 2^64 bytes".to_string(), |n| format!("{n} bytes"));
        return Err(bad(what, format!("its header declares shape {:?} of {:?} ({need}), but the array holds {have} bytes", h.shape, h.dtype)));
    }
    Ok(())
}

/// The array of the `.npy` bytes `b` (header and data), on `device`.
pub fn array(b: &[u8], what: &dyn Display, device: &Device) -> Result<Tensor> {
    let h = parse_header(b, what)?;
    let item = h.dtype.size_in_bytes();
    check_data_len(&h, b.len() - h.data_offset, what)?;
    crate::budget::check(&format!("{what} (shape {:?})", h.shape), &h.shape, item)?;
    let data = &b[h.data_offset..];
    if !h.fortran_order || h.shape.len() < 2 {
        return Ok(Tensor::from_raw_buffer(data, h.dtype, &h.shape, device)?);
    }
    // Column-major: the row-major array of the reversed shape, transposed.
    let rev: Vec<usize> = h.shape.iter().rev().copied().collect();
    let t = Tensor::from_raw_buffer(data, h.dtype, &rev, device)?;
    let axes: Vec<usize> = (0..rev.len()).rev().collect();
    Ok(t.permute(axes)?.contiguous()?)
}

/// A memory map of the file at `path` (errors name the path).
pub(crate) fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before we return; as with
    // any reader, a file truncated by another process while we read it
    // can fault. Data files are inputs nobody writes during a run.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// One `.npy` file.
pub fn read_npy(path: &Path, device: &Device) -> Result<Tensor> {
    let m = map(path)?;
    array(&m, &path.display(), device)
}

/// Every array of a `.npz` archive, keyed by member name without `.npy`.
pub fn read_npz(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let m = map(path)?;
    read_npz_bytes(&m, &path.display(), device)
}

/// The bytes of the stored (uncompressed) archive member `f` within the
/// archive `bytes`, bounds-checked, their CRC-32 verified; `member` names it.
pub(crate) fn stored_member<'a, R: Read>(bytes: &'a [u8], f: &zip::read::ZipFile<'_, R>, member: &dyn Display) -> Result<&'a [u8]> {
    let start = f.data_start().ok_or_else(|| bad(member, "no data offset"))?;
    let slice = usize::try_from(start)
        .ok()
        .zip(usize::try_from(f.size()).ok())
        .and_then(|(s, n)| bytes.get(s..s.checked_add(n)?))
        .filter(|_| f.compressed_size() == f.size())
        .ok_or_else(|| bad(member, format!("declares {} bytes past the end of the archive", f.size())))?;
    let crc = crc32fast::hash(slice);
    if crc != f.crc32() {
        return Err(bad(member, format!("CRC-32 mismatch (stored {:08x}, computed {crc:08x}): the archive is corrupt", f.crc32())));
    }
    Ok(slice)
}

/// [`read_npz`] of bytes in memory; `what` names them in errors.
pub fn read_npz_bytes(bytes: &[u8], what: &dyn Display, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| bad(what, format!("not a readable .npz (zip) archive: {e}")))?;
    let mut out = HashMap::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).map_err(|e| bad(what, format!("member {i}: {e}")))?;
        if f.is_dir() {
            continue;
        }
        let name = f.name().map_err(|e| bad(what, format!("member {i}: bad name: {e}")))?.into_owned();
        let member = format!("{what}: member {name:?}");
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let t = match f.compression() {
            zip::CompressionMethod::Stored => array(stored_member(bytes, &f, &member)?, &member, device)?,
            zip::CompressionMethod::Deflated => {
                let size = usize::try_from(f.size()).map_err(|_| bad(&member, "too large"))?;
                let mut buf = crate::budget::try_vec::<u8>(&format!("{member} (deflated, {size} bytes)"), size)?;
                // At most the declared size (+1 to notice a lie); the
                // decoder checks the CRC-32 when it reaches the end.
                (&mut f).take(size as u64 + 1).read_to_end(&mut buf).map_err(|e| bad(&member, format!("cannot inflate: {e}")))?;
                if buf.len() != size {
                    return Err(bad(&member, format!("inflates to {} bytes, the archive declares {size}", buf.len())));
                }
                array(&buf, &member, device)?
            }
            other => return Err(bad(&member, format!("compression method {other} is not supported (numpy writes stored or deflated members)"))),
        };
        if out.insert(key.clone(), t).is_some() {
            return Err(bad(what, format!("array {key:?} appears twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = MAGIC.to_vec();
        b.extend([1, 0]);
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn headers_parse_and_data_must_match() {
        let data: Vec<u8> = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", &data);
        let t = array(&b, &"t", &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [2, 3]);
        assert_eq!(t.to_vec2::<f64>().unwrap(), [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let f = npy("{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }", &data);
        assert_eq!(array(&f, &"t", &Device::Cpu).unwrap().to_vec2::<f64>().unwrap(), [[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]);
        let huge = npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }", &data);
        let e = array(&huge, &"big.npy", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("big.npy") && e.contains("1000000000000") && e.contains("48 bytes"), "{e}");
        let mut long = b.clone();
        long[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(array(&long, &"t", &Device::Cpu).unwrap_err().to_string().contains("declares 65535 bytes"));
        for h in ["{'descr': '>f8', 'fortran_order': False, 'shape': (6,)}", "{'descr': '<f8', 'shape': (6,)}", "{'descr': '<f8', 'fortran_order': False, 'shape': (-6,)}", "[1]"] {
            assert!(array(&npy(h, &data), &"t", &Device::Cpu).is_err(), "{h}");
        }
    }
}
