//! A batch of model inputs: one tensor per named graph input.
//!
//! A model exported from a dict example input (`{"input_ids": ...,
//! "attention_mask": ...}`) has several inputs; a batch holds one tensor
//! per input, all with the same number of rows M, found by name. A single
//! tensor (the common case) is a batch of one unnamed input, which binds to
//! a model with one input whatever its name.
//!
//! Integer inputs (token ids, masks) are carried in the compute dtype: they
//! are never differentiated, and float32 holds every integer below 2²⁴
//! exactly (float64 below 2⁵³). [`Inputs::bind`] checks that they are.

use crate::error::{bail, Result};
use crate::model::Model;
use crate::spec::InputDType;
use crate::tensor::{self, DType, Tensor};

/// Named input tensors `(M, *shape)` of one batch.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// `(name, tensor)`; the name is `None` for a single unnamed tensor.
    entries: Vec<(Option<String>, Tensor)>,
}

impl Inputs {
    /// A batch from named tensors (data-file arrays, a Python dict). Every
    /// tensor must have the same number of rows.
    pub fn named(entries: Vec<(String, Tensor)>) -> Result<Self> {
        if entries.is_empty() {
            bail!(Data, "a batch needs at least one input tensor");
        }
        let inputs = Inputs { entries: entries.into_iter().map(|(k, t)| (Some(k), t)).collect() };
        inputs.rows()?;
        Ok(inputs)
    }

    /// The number of points M.
    pub fn len(&self) -> usize {
        self.entries[0].1.dims().first().copied().unwrap_or(0)
    }

    /// No points.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of the tensors (`None` for an unnamed one).
    pub fn names(&self) -> Vec<Option<&str>> {
        self.entries.iter().map(|(k, _)| k.as_deref()).collect()
    }

    /// The first tensor: the only one of a one-input batch.
    pub fn first(&self) -> &Tensor {
        &self.entries[0].1
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(k, _)| k.as_deref() == Some(name)).map(|(_, t)| t)
    }

    /// Points `start..start + len` of every tensor.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let entries = self
            .entries
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.narrow(0, start, len)?)))
            .collect::<Result<_>>()?;
        Ok(Inputs { entries })
    }

    /// `f` applied to every tensor (names kept).
    pub fn map(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let entries = self.entries.iter().map(|(k, t)| Ok((k.clone(), f(t)?))).collect::<Result<Vec<_>>>()?;
        let out = Inputs { entries };
        out.rows()?;
        Ok(out)
    }

    /// Every tensor converted to `dtype` (integer arrays of a data file to
    /// the compute dtype, checked to be exact).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let entries = self
            .entries
            .iter()
            .map(|(k, t)| {
                let what = k.as_deref().unwrap_or("x");
                Ok((k.clone(), convert(t, dtype, what)?))
            })
            .collect::<Result<_>>()?;
        Ok(Inputs { entries })
    }

    /// The tensors in the order of `model`'s graph inputs, each checked: its
    /// shape `(M, *shape)`, the compute dtype, finite values, and integer
    /// values for integer inputs. Extra named tensors are ignored (a data
    /// file may hold more arrays than the model reads).
    pub fn bind(&self, model: &Model) -> Result<Vec<Tensor>> {
        let m = self.rows()?;
        let specs = &model.spec().inputs;
        let mut out = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let x = match (specs.len(), self.entries.as_slice()) {
                // One tensor for a one-input model: whatever its name.
                (1, [(_, t)]) => t,
                (_, [(None, _)]) => {
                    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                    bail!(Data, "the model has {} inputs ({}); pass them by name", specs.len(), names.join(", "));
                }
                _ => match self.get(&spec.name) {
                    Some(t) => t,
                    None => {
                        let have: Vec<&str> = self.entries.iter().filter_map(|(k, _)| k.as_deref()).collect();
                        bail!(Data, "no input named {:?} (the model's input {i}); the batch has {have:?}", spec.name);
                    }
                },
            };
            let d = x.dims();
            if d.len() != spec.shape.len() + 1 || d[1..] != spec.shape[..] || d[0] != m {
                bail!(
                    Data,
                    "input {:?} has shape {d:?}, the model expects (N, {})",
                    spec.name,
                    spec.shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                );
            }
            if x.dtype() != model.dtype() {
                bail!(
                    Data,
                    "input {:?} has dtype {}, the model computes in {}",
                    spec.name,
                    tensor::dtype_name(x.dtype()),
                    tensor::dtype_name(model.dtype())
                );
            }
            if let Some(pos) = tensor::first_non_finite(x)? {
                bail!(Data, "input {:?} holds a non-finite value at index {:?}", spec.name, tensor::unravel(pos, d));
            }
            if spec.dtype == InputDType::Int {
                if let Some(pos) = tensor::first_non_integer(x)? {
                    bail!(Data, "input {:?} is an integer input but holds a fraction at index {:?}", spec.name, tensor::unravel(pos, d));
                }
            }
            out.push(x.clone());
        }
        Ok(out)
    }

    /// M, checked to be the same for every tensor.
    fn rows(&self) -> Result<usize> {
        let mut m = None;
        for (k, t) in &self.entries {
            let name = k.as_deref().unwrap_or("x");
            let Some(&rows) = t.dims().first() else {
                bail!(Data, "input {name:?} is a scalar; expected (N, *shape)");
            };
            match m {
                None => m = Some((rows, name)),
                Some((m0, n0)) if m0 != rows => bail!(Data, "input {name:?} has {rows} rows but {n0:?} has {m0}"),
                _ => {}
            }
        }
        Ok(m.map_or(0, |(m, _)| m))
    }
}

/// A data-file array in the compute dtype: floats converted, integers and
/// bools converted after checking that the compute dtype holds them exactly.
fn convert(t: &Tensor, dtype: DType, what: &str) -> Result<Tensor> {
    if tensor::is_compute_dtype(t.dtype()) {
        return Ok(t.to_dtype(dtype)?);
    }
    let limit: f64 = if dtype == DType::F32 { (1u64 << 24) as f64 } else { (1u64 << 53) as f64 };
    if let Some(v) = tensor::max_abs_as_f64(t)? {
        if v > limit {
            bail!(
                Data,
                "input {what:?} holds the integer {v}, which {} does not represent exactly (|value| ≤ {limit})",
                tensor::dtype_name(dtype)
            );
        }
    }
    Ok(t.to_dtype(dtype)?)
}

impl From<Tensor> for Inputs {
    fn from(x: Tensor) -> Self {
        Inputs { entries: vec![(None, x)] }
    }
}

impl From<&Tensor> for Inputs {
    fn from(x: &Tensor) -> Self {
        Inputs { entries: vec![(None, x.clone())] }
    }
}

impl From<&Inputs> for Inputs {
    fn from(x: &Inputs) -> Self {
        x.clone()
    }
}
