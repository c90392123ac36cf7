//! Entry points for the fuzz targets (`fuzz/`, `cargo fuzz`) and the
//! property test (`tests/malformed.rs`): each feeds arbitrary bytes to one
//! reader of untrusted input and returns its verdict. Whatever the bytes,
//! they must return (an error is fine), never panic or abort: every size the
//! bytes declare meets the memory budget before anything is allocated.

use std::collections::HashMap;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// A model spec (JSON), built into a model with weights of the shapes it
/// asks for where that fits in `1 << 16` numbers (zeros), so the geometry
/// checks of every layer run, not only the parser.
pub fn spec(bytes: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|_| crate::Error::Spec("not UTF-8".into()))?;
    let spec = crate::spec::ModelSpec::from_json(text)?;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    // Each build stops at the first missing tensor and names its shape:
    // supply it (zeros) and build again, up to 64 tensors.
    for _ in 0..64 {
        match crate::model::Model::new(spec.clone(), weights.clone(), Some(crate::tensor::DType::F32), &Device::Cpu) {
            Ok(_) => return Ok(()),
            Err(crate::Error::Weights(m)) => {
                let Some((key, shape)) = missing_tensor(&m) else { return Err(crate::Error::Weights(m)) };
                if crate::budget::numel(&shape).is_none_or(|n| n > 1 << 16) || weights.contains_key(&key) {
                    return Err(crate::Error::Weights(m));
                }
                weights.insert(key, Tensor::zeros(shape, crate::tensor::DType::F32, &Device::Cpu)?);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `(key, shape)` of a "missing tensor \"key\" (the weight of ..., shape [a, b])" error.
fn missing_tensor(m: &str) -> Option<(String, Vec<usize>)> {
    let rest = m.split_once("missing tensor \"")?.1;
    let (key, rest) = rest.split_once("\" (the ")?;
    let dims = rest.rsplit_once("shape [")?.1.split_once(']')?.0;
    let shape = dims.split(',').map(str::trim).filter(|d| !d.is_empty()).map(str::parse).collect::<std::result::Result<_, _>>().ok()?;
    Some((key.to_string(), shape))
}

/// A safetensors file (weights, data, results).
pub fn safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    crate::io::read_safetensors_bytes(bytes, &Device::Cpu)
}

/// A numpy `.npz` archive.
pub fn npz(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    crate::io::npy::read_npz_bytes(bytes, &"fuzz.npz", &Device::Cpu)
}

/// A numpy `.npy` array.
pub fn npy(bytes: &[u8]) -> Result<Tensor> {
    crate::io::npy::array(bytes, &"fuzz.npy", &Device::Cpu)
}

/// A posterior file (a safetensors file `Posterior::save` wrote).
pub fn posterior(bytes: &[u8]) -> Result<crate::posterior::Posterior> {
    let t = crate::io::read_safetensors_bytes(bytes, &Device::Cpu)?;
    crate::posterior::Posterior::from_tensors(t, &"fuzz posterior")
}
