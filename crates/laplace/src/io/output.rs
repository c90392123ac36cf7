//! Output files: what a path may be, and how a result reaches it.
//!
//! An output replaces a regular file or creates one; it never replaces a
//! device, FIFO, socket or directory (renaming over `/dev/null` would
//! replace the node itself), nor one of the run's inputs. It is written to
//! a randomly named sibling (the `tempfile` crate: created exclusively, so
//! no pre-planted file or link is followed), then renamed over the path,
//! so a failed run leaves nothing behind and an old file untouched. New
//! files get mode 0666 less the umask, like any shell redirection, and
//! every error names the user's path, never the temporary one.
//!
//! No `fsync`: the rename makes a result appear whole or not at all to
//! every reader, and the kernel writes it back to disk in its own time, as
//! it does for numpy's, torch's and safetensors' savers; an `fdatasync`
//! made every command wait for the device (1–5 ms for results of 0.4–6 MB
//! on this machine's disk, more for larger ones).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{bail, Error, Result};
use crate::tensor::Tensor;

/// Refuse `out` if it exists and is not a regular file (symlinks are
/// followed, as a shell would), or if it is the same file as one of
/// `inputs` (`(flag, path)`, e.g. `("--data", ...)`).
pub fn check_output(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let Ok(meta) = std::fs::metadata(out) else {
        return Ok(()); // does not exist (yet): it will be created
    };
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "not a regular file (a device, FIFO or socket)" };
        bail!(Invalid, "output {} is {kind}; refusing to replace it: name a regular file", out.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        for (flag, input) in inputs {
            if let Ok(m) = std::fs::metadata(input) {
                if m.dev() == meta.dev() && m.ino() == meta.ino() {
                    bail!(Invalid, "output {} is the input {flag} {}; writing it would replace the input", out.display(), input.display());
                }
            }
        }
    }
    #[cfg(not(unix))]
    for (flag, input) in inputs {
        if std::fs::canonicalize(input).ok() == std::fs::canonicalize(out).ok() {
            bail!(Invalid, "output {} is the input {flag} {}", out.display(), input.display());
        }
    }
    Ok(())
}

/// Write `path` atomically with `write` (given the temporary file).
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    check_output(path, &[])?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    let prefix = format!(".{name}.tmp-");
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(path, plain(e)))?;
    write(tmp.as_file_mut()).map_err(|e| Error::io(path, plain(e)))?;
    // Dropping `tmp` on an error above removes it.
    tmp.persist(path).map_err(|e| Error::io(path, plain(e.error)))?;
    Ok(())
}

/// The OS error without the temporary path `tempfile` attaches to it: the
/// message is about the user's path.
fn plain(e: std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None if e.get_ref().is_some() && e.kind() != std::io::ErrorKind::Other => std::io::Error::from(e.kind()),
        None => e,
    }
}

/// The safetensors encoding of `tensors` (and string `metadata`), streamed
/// to `file` one tensor at a time: an 8-byte header length, the JSON header
/// (padded to 8 bytes), then the tensors' bytes in order.
pub(crate) fn write_safetensors_to(file: &mut File, tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> std::io::Result<()> {
    use safetensors::View;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = metadata.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
        header.insert("__metadata__".into(), meta.into());
    }
    let mut offset = 0usize;
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if header.contains_key(name) {
            return Err(invalid(format!("tensor name {name:?} appears twice")));
        }
        let t = t.contiguous().map_err(|e| invalid(e.to_string()))?;
        let dtype = serde_json::to_value(<&Tensor as View>::dtype(&&t)).map_err(|e| invalid(e.to_string()))?;
        let len = <&Tensor as View>::data_len(&&t);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
        views.push(t);
    }
    let mut text = serde_json::to_string(&header).map_err(|e| invalid(e.to_string()))?.into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(&text)?;
    for t in &views {
        write_data(&mut w, t)?;
    }
    w.flush()
}

/// The bytes of `t` (contiguous) in safetensors' little-endian layout. Float
/// tensors are encoded from their storage in chunks of 64 Ki elements: no
/// copy of the whole tensor (candle's `View::data` makes two, which for a
/// 665 MB full GGN doubled the command's time in page faults and copies).
fn write_data(w: &mut impl Write, t: &Tensor) -> std::io::Result<()> {
    fn encode<T: Copy, const N: usize>(w: &mut impl Write, v: &[T], le: impl Fn(T) -> [u8; N]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(N << 16);
        for chunk in v.chunks(1 << 16) {
            buf.clear();
            for &x in chunk {
                buf.extend_from_slice(&le(x));
            }
            w.write_all(&buf)?;
        }
        Ok(())
    }
    let io = |e: crate::Error| std::io::Error::other(e.to_string());
    match t.dtype() {
        crate::tensor::DType::F32 => crate::tensor::with_host_slice(t, |v: &[f32]| encode(w, v, f32::to_le_bytes)).map_err(io)?,
        crate::tensor::DType::F64 => crate::tensor::with_host_slice(t, |v: &[f64]| encode(w, v, f64::to_le_bytes)).map_err(io)?,
        _ => w.write_all(&<&Tensor as safetensors::View>::data(&t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, Device};

    /// The chunked encoder writes exactly the bytes of candle's `View::data`
    /// (the generic path), across chunk boundaries and for odd values.
    #[test]
    fn tensor_bytes_match_the_generic_encoding() {
        let n = (1 << 16) * 2 + 5;
        let values: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.37).sin() * 10f64.powi(i as i32 % 40 - 20)).collect();
        let mut odd = values.clone();
        odd[..4].copy_from_slice(&[-0.0, f64::MIN_POSITIVE / 3.0, f64::MAX, 1.0]);
        let t64 = Tensor::from_vec(odd, (n,), &Device::Cpu).unwrap();
        let t32 = t64.to_dtype(DType::F32).unwrap().reshape((n, 1)).unwrap();
        let ti = Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), (n,), &Device::Cpu).unwrap();
        for t in [&t64, &t32, &ti] {
            let mut ours = Vec::new();
            write_data(&mut ours, t).unwrap();
            let generic = <&Tensor as safetensors::View>::data(&t);
            assert!(ours == *generic, "{:?}: the chunked encoding differs", t.dtype());
        }
    }
}
