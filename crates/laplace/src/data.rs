//! Data sets from files: inputs (`x` `(N, *input_shape)`, or one array per
//! named model input) and, for everything that needs a loss, `y` (int64
//! class indices `(N,)` or floats `(N, C)`).

use std::path::Path;

use crate::curvature::Batch;
use crate::error::{bail, Result};
use crate::inputs::Inputs;
use crate::tensor::{DType, Device, Tensor};

/// A data set in memory: inputs and (optional) targets, `N ≥ 1` points.
pub struct Dataset {
    /// Inputs in the compute dtype: `x`, or one array per named model input.
    pub x: Inputs,
    /// Targets as stored (checked against the likelihood when used).
    pub y: Option<Tensor>,
}

impl Dataset {
    /// Read a `.npz` or `.safetensors` data file: targets under `"y"`, every
    /// other array an input (`x`, or `input_ids`, `attention_mask`, ... by
    /// the model's input names), converted to `dtype`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_labels(path, "y", dtype, device)
    }

    /// [`Dataset::load`] with the targets under `label_key` (`labels`, as
    /// HuggingFace batches name them).
    pub fn load_with_labels(path: &Path, label_key: &str, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_arrays(path, crate::io::read_tensors(path, device)?, label_key, dtype)
    }

    /// Part `part` of `parts` of a data file: the contiguous block of points
    /// [`distributed::split`](crate::distributed::split) gives that rank,
    /// reading only its rows where the format allows
    /// ([`crate::io::rows`]). An error when there are fewer points than parts.
    pub fn load_part(path: &Path, label_key: &str, part: usize, parts: usize, dtype: DType, device: &Device) -> Result<Self> {
        let reader = crate::io::rows::RowReader::open(path)?;
        let shapes = reader.shapes()?;
        let Some((first, shape)) = shapes.iter().find(|(k, _)| k != label_key) else {
            bail!(Data, "{}: no input arrays (only {label_key:?}); expected \"x\" or one array per model input", path.display());
        };
        let n = match shape.first() {
            Some(&n) if n >= 1 => n,
            _ => bail!(Data, "{}: {first:?} has shape {shape:?}; expected (N, *shape) with N ≥ 1", path.display()),
        };
        if let Some((k, s)) = shapes.iter().find(|(_, s)| s.first() != Some(&n)) {
            let what = if k == label_key { "targets" } else { "input" };
            bail!(Data, "{}: {what} {k:?} has shape {s:?} but {first:?} has {n} points", path.display());
        }
        if parts > n {
            bail!(Invalid, "{}: {n} points cannot be split over {parts} processes (run at most {n})", path.display());
        }
        let rows = crate::distributed::split(n, part, parts);
        Self::from_arrays(path, reader.read(rows, device)?, label_key, dtype)
    }

    /// A data set from a file's arrays: targets under `label_key`, every other
    /// array an input.
    fn from_arrays(path: &Path, mut arrays: std::collections::HashMap<String, Tensor>, label_key: &str, dtype: DType) -> Result<Self> {
        let y = arrays.remove(label_key);
        let mut keys: Vec<String> = arrays.keys().cloned().collect();
        keys.sort();
        if keys.is_empty() {
            bail!(Data, "{}: no input arrays (only {label_key:?}); expected \"x\" or one array per model input", path.display());
        }
        let mut entries = Vec::with_capacity(keys.len());
        for k in keys {
            let t = arrays.remove(&k).expect("a listed key");
            if t.rank() < 1 || t.dim(0)? == 0 {
                bail!(Data, "{}: {k:?} has shape {:?}; expected (N, *shape) with N ≥ 1", path.display(), t.dims());
            }
            entries.push((k, t));
        }
        let in_file = |e: crate::Error| match e {
            crate::Error::Data(m) => crate::Error::Data(format!("{}: {m}", path.display())),
            other => other,
        };
        let x = Inputs::named(entries).and_then(|x| x.to_dtype(dtype)).map_err(in_file)?;
        if let Some(y) = &y {
            if y.rank() == 0 || y.dim(0)? != x.len() {
                bail!(Data, "{}: {label_key:?} has shape {:?} but the inputs have {} points", path.display(), y.dims(), x.len());
            }
        }
        Ok(Dataset { x, y })
    }

    /// The number of points N.
    pub fn len(&self) -> usize {
        self.x.len()
    }

    /// Always false (a data set has at least one point); for clippy.
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
    pub fn inputs(&self, offset: usize, len: usize) -> Result<Inputs> {
        self.x.narrow(offset, len)
    }

    /// Points `offset..offset + len` with their targets.
    pub fn batch(&self, offset: usize, len: usize) -> Result<Batch> {
        Ok(Batch {
            x: self.x.narrow(offset, len)?,
            y: self.targets()?.narrow(0, offset, len)?,
            offset,
        })
    }
}
