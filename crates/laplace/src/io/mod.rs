//! Files: safetensors (weights, data, results), numpy `.npz` (data) and
//! `.npy` (index lists). Part of the candle boundary (see [`crate::tensor`]).
//!
//! Results are written atomically (a temporary file in the same directory,
//! then a rename), so a failed run never leaves a half-written output; see
//! [`output`] for what an output path may be.

pub mod npy;
pub mod output;

use std::collections::HashMap;
use std::path::Path;

use crate::error::{bail, Error, Result};
use crate::tensor::{self, Device, Tensor};

pub mod rows;

/// All tensors of a safetensors file (its size checked against the memory
/// budget first; the file is memory-mapped, so the tensors are its only copy).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    crate::budget::current().check(&format!("reading {}", path.display()), Some(size))?;
    // SAFETY: read-only map, dropped before we return (see `npy::read_npy`).
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        Error::Data(format!("{}: not a readable safetensors file: {e}", path.display()))
    })
}

/// All tensors of a safetensors file already in memory.
pub fn read_safetensors_bytes(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| Error::Data(format!("not a readable safetensors buffer: {e}")))
}

/// All arrays of a numpy `.npz` archive (stored or deflated; CRC-32
/// checked; every declared size checked before allocation: [`npy`]).
pub fn read_npz(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    npy::read_npz(path, device)
}

/// One numpy `.npy` array.
pub fn read_npy(path: &Path, device: &Device) -> Result<Tensor> {
    npy::read_npy(path, device)
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

/// Write tensors to a safetensors file, atomically. Values are written as
/// they are (tests use this to make bad files); results go through
/// [`write_results`].
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, &[])
}

/// [`write_safetensors`] with string metadata (the header's `__metadata__`).
pub fn write_safetensors_with_metadata(path: &Path, tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<()> {
    output::write_atomically(path, |file| output::write_safetensors_to(file, tensors, metadata))
}

/// Write a command's results: every float tensor is checked for NaN and
/// infinity first ([`Error::NonFinite`] naming the key and the first bad
/// index), so no non-finite number leaves the program unannounced; then as
/// [`write_safetensors_with_metadata`].
pub fn write_results(path: &Path, tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<()> {
    for (key, t) in tensors {
        if tensor::is_compute_dtype(t.dtype()) {
            if let Some(pos) = tensor::first_non_finite(t)? {
                bail!(
                    NonFinite,
                    "output {key:?} of {} holds a non-finite value at index {:?}; nothing was written",
                    path.display(),
                    tensor::unravel(pos, t.dims())
                );
            }
        }
    }
    write_safetensors_with_metadata(path, tensors, metadata)
}
