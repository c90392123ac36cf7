//! Files: safetensors (weights, data, results), numpy `.npz` (data) and
//! `.npy` (index lists). Part of the candle boundary (see [`crate::tensor`]).
//!
//! Results are written atomically (a temporary file in the same directory,
//! then a rename), so a failed run never leaves a half-written output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{bail, Error, Result};
use crate::tensor::{self, Device, Tensor};

pub mod rows;

/// All tensors of a safetensors file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        Error::Data(format!("{}: not a readable safetensors file: {e}", path.display()))
    })
}

/// All tensors of a safetensors file already in memory.
pub fn read_safetensors_bytes(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| Error::Data(format!("not a readable safetensors buffer: {e}")))
}

/// All arrays of a numpy `.npz` archive (uncompressed or deflated).
pub fn read_npz(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    let arrays = Tensor::read_npz(path)
        .map_err(|e| Error::Data(format!("{}: not a readable .npz archive: {e}", path.display())))?;
    arrays
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect()
}

/// One numpy `.npy` array.
pub fn read_npy(path: &Path, device: &Device) -> Result<Tensor> {
    if !path.exists() {
        return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    let t = Tensor::read_npy(path)
        .map_err(|e| Error::Data(format!("{}: not a readable .npy array: {e}", path.display())))?;
    Ok(t.to_device(device)?)
}

/// A tensor file by extension: `.npz` or `.safetensors`.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npz") => read_npz(path, device),
        Some("safetensors") => read_safetensors(path, device),
        _ => bail!(Data, "{}: expected a .npz or .safetensors file", path.display()),
    }
}

/// A 1-D integer index list from `.npy` (or a `.safetensors` / `.npz` holding
/// exactly one array).
pub fn read_indices(path: &Path) -> Result<Vec<i64>> {
    let t = match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => read_npy(path, &Device::Cpu)?,
        _ => {
            let all = read_tensors(path, &Device::Cpu)?;
            if all.len() != 1 {
                bail!(Data, "{}: expected exactly one index array, found {}", path.display(), all.len());
            }
            all.into_values().next().expect("one array")
        }
    };
    if t.rank() != 1 {
        bail!(Data, "{}: indices must be a 1-D array, got shape {:?}", path.display(), t.dims());
    }
    if !tensor::is_int_dtype(t.dtype()) {
        bail!(
            Data,
            "{}: indices must be integers (int64), got dtype {}",
            path.display(),
            tensor::dtype_name(t.dtype())
        );
    }
    tensor::to_vec_i64(&t)
}

/// The string metadata (`__metadata__`) of a safetensors file.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Data(format!("{}: not a safetensors file: {e}", path.display())))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Write tensors to a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, &[])
}

/// Write tensors and string metadata (the header's `__metadata__`) to a
/// safetensors file, atomically.
pub fn write_safetensors_with_metadata(path: &Path, tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<()> {
    let map: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let info: Option<HashMap<String, String>> = (!metadata.is_empty()).then(|| metadata.iter().cloned().collect());
    let tmp = temp_path(path);
    safetensors::serialize_to_file(map, info, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        match e {
            safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
            other => Error::Invalid(format!("cannot write {}: {other}", path.display())),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A sibling temporary file: `dir/.name.tmp-<pid>`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = format!(".{name}.tmp-{}", std::process::id());
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tmp),
        _ => PathBuf::from(tmp),
    }
}
