//! Data sets from files: `x` `(N, *input_shape)` and, for everything that
//! needs a loss, `y` (int64 class indices `(N,)` or floats `(N, C)`).

use std::path::Path;

use crate::curvature::Batch;
use crate::error::{bail, Result};
use crate::tensor::{self, DType, Device, Tensor};

pub struct Dataset {
    /// Inputs in the compute dtype.
    pub x: Tensor,
    /// Targets as stored (checked against the likelihood when used).
    pub y: Option<Tensor>,
}

impl Dataset {
    /// Read `x` and `y` from a `.npz` or `.safetensors` file; `x` is
    /// converted to `dtype`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut arrays = crate::io::read_tensors(path, device)?;
        let Some(x) = arrays.remove("x") else {
            let mut keys: Vec<_> = arrays.keys().cloned().collect();
            keys.sort();
            bail!(Data, "{}: no array named \"x\" (found {keys:?})", path.display());
        };
        if !tensor::is_compute_dtype(x.dtype()) {
            bail!(Data, "{}: x must be float32 or float64, got {}", path.display(), tensor::dtype_name(x.dtype()));
        }
        if x.rank() < 2 || x.dim(0)? == 0 {
            bail!(Data, "{}: x has shape {:?}; expected (N, *input_shape) with N ≥ 1", path.display(), x.dims());
        }
        let y = arrays.remove("y");
        if let Some(y) = &y {
            if y.rank() == 0 || y.dim(0)? != x.dim(0)? {
                bail!(
                    Data,
                    "{}: y has shape {:?} but x has {} points",
                    path.display(),
                    y.dims(),
                    x.dim(0)?
                );
            }
        }
        Ok(Dataset {
            x: x.to_dtype(dtype)?,
            y,
        })
    }

    pub fn len(&self) -> usize {
        self.x.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The targets, or an error saying the command needs them.
    pub fn targets(&self) -> Result<&Tensor> {
        match &self.y {
            Some(y) => Ok(y),
            None => bail!(Data, "the data file has no targets \"y\", which this quantity needs"),
        }
    }

    /// `(offset, len)` of consecutive batches of at most `size` points.
    pub fn batch_ranges(&self, size: usize) -> Vec<(usize, usize)> {
        let n = self.len();
        let size = size.max(1);
        (0..n).step_by(size).map(|s| (s, size.min(n - s))).collect()
    }

    /// Inputs of points `offset..offset + len`.
    pub fn inputs(&self, offset: usize, len: usize) -> Result<Tensor> {
        Ok(self.x.narrow(0, offset, len)?)
    }

    /// Points `offset..offset + len` with their targets.
    pub fn batch(&self, offset: usize, len: usize) -> Result<Batch> {
        Ok(Batch {
            x: self.x.narrow(0, offset, len)?,
            y: self.targets()?.narrow(0, offset, len)?,
            offset,
        })
    }
}
