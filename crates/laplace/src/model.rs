//! `Sequential`: a chain of [`Layer`]s built from a [`ModelSpec`] and a
//! PyTorch `nn.Sequential` state_dict.
//!
//! The parameter vector θ ∈ R^P is the concatenation of every trainable
//! tensor in PyTorch `parameters()` order (layer by layer, weight before
//! bias), each flattened row-major: exactly the layout of
//! `torch.nn.utils.parameters_to_vector(model.parameters())`.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{bail, Result};
use crate::nn::{self, Layer};
use crate::spec::{LayerSpec, ModelSpec};
use crate::tensor::{self, DType, Device, Tensor};

/// One trainable tensor and its place in θ.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// State-dict name, e.g. `"3.weight"`.
    pub name: String,
    /// Index of the layer that owns it.
    pub layer: usize,
    /// Shape as PyTorch stores it.
    pub shape: Vec<usize>,
    /// First coordinate in θ.
    pub offset: usize,
    pub numel: usize,
}

pub struct Sequential {
    spec: ModelSpec,
    layers: Vec<Box<dyn Layer>>,
    /// Per-sample shape entering layer i; the last entry is the output shape.
    shapes: Vec<Vec<usize>>,
    params: Vec<ParamInfo>,
    dtype: DType,
    device: Device,
}

impl Sequential {
    /// Build from a spec and a state dict. `dtype` is the compute dtype; with
    /// `None` it is the dtype of the weights (f32 or f64).
    pub fn new(
        spec: ModelSpec,
        mut weights: HashMap<String, Tensor>,
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Self> {
        let dtype = match dtype {
            Some(d) => d,
            None => weights_dtype(&weights)?,
        };
        if !tensor::is_compute_dtype(dtype) {
            bail!(Invalid, "compute dtype must be f32 or f64, got {}", tensor::dtype_name(dtype));
        }
        let mut layers = Vec::with_capacity(spec.layers.len());
        let mut shapes = vec![spec.input_shape.clone()];
        for (i, ls) in spec.layers.iter().enumerate() {
            let layer = nn::build(i, ls, shapes.last().unwrap(), &mut weights, dtype, device)?;
            shapes.push(layer.out_shape().to_vec());
            layers.push(layer);
        }
        if !weights.is_empty() {
            let mut keys: Vec<_> = weights.keys().cloned().collect();
            keys.sort();
            let detail: Vec<String> = keys
                .iter()
                .map(|k| match owner_of(k, &spec) {
                    Some(owner) => format!("{k:?} ({owner})"),
                    None => format!("{k:?}"),
                })
                .collect();
            bail!(Weights, "unexpected tensors not used by any layer: {}", detail.join(", "));
        }
        let out = shapes.last().unwrap();
        if out.len() != 1 {
            bail!(
                Spec,
                "the model output has per-sample shape {out:?}; it must be a vector (C,) \
                 (add a Flatten and a Linear at the end?)"
            );
        }
        let mut params = Vec::new();
        let mut offset = 0;
        for (i, layer) in layers.iter().enumerate() {
            for (pname, t) in layer.params() {
                let numel = t.elem_count();
                params.push(ParamInfo {
                    name: format!("{i}.{pname}"),
                    layer: i,
                    shape: t.dims().to_vec(),
                    offset,
                    numel,
                });
                offset += numel;
            }
        }
        Ok(Sequential {
            spec,
            layers,
            shapes,
            params,
            dtype,
            device: device.clone(),
        })
    }

    /// Load `model.json` and a safetensors state dict.
    pub fn load(
        spec_path: impl AsRef<Path>,
        weights_path: impl AsRef<Path>,
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Self> {
        let spec_path = spec_path.as_ref();
        let text = std::fs::read_to_string(spec_path).map_err(|e| crate::Error::io(spec_path, e))?;
        let spec = ModelSpec::from_json(&text)?;
        let weights = crate::io::read_safetensors(weights_path.as_ref(), device)?;
        Self::new(spec, weights, dtype, device)
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// Per-sample input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[0]
    }

    /// Per-sample shape entering layer `i` (`i = len` gives the output shape).
    pub fn shape_before(&self, i: usize) -> &[usize] {
        &self.shapes[i]
    }

    /// Number of outputs C.
    pub fn n_outputs(&self) -> usize {
        self.shapes.last().unwrap()[0]
    }

    /// Number of parameters P.
    pub fn n_params(&self) -> usize {
        self.params.last().map_or(0, |p| p.offset + p.numel)
    }

    /// The trainable tensors in θ order.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The state dict `(name, tensor)` in θ order, tensors in PyTorch shapes.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.params()
                    .into_iter()
                    .map(move |(n, t)| (format!("{i}.{n}"), t.clone()))
            })
            .collect()
    }

    /// θ as one vector `(P,)`.
    pub fn parameter_vector(&self) -> Result<Tensor> {
        let flat: Vec<Tensor> = self
            .state_dict()
            .into_iter()
            .map(|(_, t)| t.flatten_all())
            .collect::<std::result::Result<_, _>>()?;
        if flat.is_empty() {
            return Ok(Tensor::zeros(0, self.dtype, &self.device)?);
        }
        Ok(Tensor::cat(&flat, 0)?)
    }

    /// An independent copy (same spec, weights, dtype and device).
    pub fn try_clone(&self) -> Result<Self> {
        let weights = self.state_dict().into_iter().collect();
        Self::new(self.spec.clone(), weights, Some(self.dtype), &self.device)
    }

    /// The same network with parameters θ `(P,)`.
    pub fn with_parameter_vector(&self, theta: &Tensor) -> Result<Self> {
        if theta.dims() != [self.n_params()] {
            bail!(Invalid, "parameter vector has shape {:?}, the model has {} parameters", theta.dims(), self.n_params());
        }
        let weights = self
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), theta.narrow(0, p.offset, p.numel)?.reshape(p.shape.as_slice())?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::new(self.spec.clone(), weights, Some(self.dtype), &self.device)
    }

    /// Index of the final `Linear` layer: the "last layer" of last-layer
    /// Laplace. Only parameter-free layers may follow it.
    pub fn last_linear(&self) -> Result<usize> {
        let Some(i) = self
            .spec
            .layers
            .iter()
            .rposition(|l| matches!(l, LayerSpec::Linear { .. }))
        else {
            bail!(Spec, "last-layer quantities need a Linear layer, and the model has none");
        };
        if let Some(j) = (i + 1..self.layers.len()).find(|&j| !self.layers[j].params().is_empty()) {
            bail!(
                Spec,
                "last-layer quantities need the final Linear (layer {i}) to be the last layer with \
                 parameters, but layer {j} ({}) has parameters",
                self.layers[j].type_name()
            );
        }
        Ok(i)
    }

    /// Check a batch of inputs: `(M, *input_shape)`, compute dtype, finite.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let d = x.dims();
        if d.len() != self.shapes[0].len() + 1 || d[1..] != self.shapes[0][..] {
            bail!(
                Data,
                "inputs have shape {d:?}, the model expects (N, {}) (input_shape {:?})",
                self.shapes[0].iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
                self.shapes[0]
            );
        }
        if x.dtype() != self.dtype {
            bail!(Data, "inputs have dtype {}, the model computes in {}", tensor::dtype_name(x.dtype()), tensor::dtype_name(self.dtype));
        }
        if let Some(pos) = tensor::first_non_finite(x)? {
            bail!(Data, "inputs hold a non-finite value at index {:?}", tensor::unravel(pos, d));
        }
        Ok(())
    }

    /// The network output f(x) `(M, C)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h, false)?.0;
        }
        Ok(h)
    }
}

/// The common dtype of the weights (f32 if there are none).
fn weights_dtype(weights: &HashMap<String, Tensor>) -> Result<DType> {
    let mut keys: Vec<_> = weights.keys().collect();
    keys.sort();
    let mut found: Option<(DType, &String)> = None;
    for k in keys {
        let dt = weights[k].dtype();
        if !tensor::is_compute_dtype(dt) {
            bail!(Weights, "tensor {k:?} has dtype {}, expected f32 or f64", tensor::dtype_name(dt));
        }
        match found {
            None => found = Some((dt, k)),
            Some((d0, k0)) if d0 != dt => bail!(
                Weights,
                "tensors have different dtypes ({k0:?} is {}, {k:?} is {}); pass a compute dtype",
                tensor::dtype_name(d0),
                tensor::dtype_name(dt)
            ),
            _ => {}
        }
    }
    Ok(found.map_or(DType::F32, |(d, _)| d))
}

/// For an unexpected key "i.name": which layer i is, if it exists.
fn owner_of(key: &str, spec: &ModelSpec) -> Option<String> {
    let idx: usize = key.split('.').next()?.parse().ok()?;
    let layer = spec.layers.get(idx)?;
    Some(format!("layer {idx} is {}", layer.type_name()))
}
