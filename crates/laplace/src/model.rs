//! The model: a directed acyclic graph of [`Op`]s built from a
//! [`ModelSpec`] and a PyTorch state dict. An `nn.Sequential` is the chain
//! graph whose node `i` is layer `i` (so [`Sequential`] is this same type).
//!
//! Values are numbered: the graph inputs first, then one output per node, in
//! node order (every node reads only earlier values). The parameter vector
//! θ ∈ R^P is the concatenation of the trainable tensors listed in the
//! spec's `parameters` (PyTorch `parameters()` order; for a Sequential,
//! layer by layer, weight before bias), each flattened row-major: exactly
//! the layout of `torch.nn.utils.parameters_to_vector(model.parameters())`.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{bail, Result};
use crate::inputs::Inputs;
use crate::nn::{self, Op};
use crate::spec::{Form, LayerSpec, ModelSpec, OpSpec};
use crate::tensor::{self, DType, Device, Tensor};

/// One trainable tensor and its place in θ.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// State-dict name, e.g. `"3.weight"` or `"layer1.0.bn1.bias"`.
    pub name: String,
    /// Index of the node that owns it.
    pub layer: usize,
    /// Its role in that node (`"weight"`, `"bias"`).
    pub role: &'static str,
    /// Shape as PyTorch stores it.
    pub shape: Vec<usize>,
    /// First coordinate in θ.
    pub offset: usize,
    /// Elements of the tensor.
    pub numel: usize,
}

impl ParamInfo {
    /// A bias (else a weight).
    pub fn is_bias(&self) -> bool {
        self.role == "bias"
    }
}

/// One node: its op, the values it reads, and its name for messages.
pub struct Node {
    /// The op: what the node computes, and its derivatives.
    pub op: Box<dyn Op>,
    /// Value ids of its inputs.
    pub inputs: Vec<usize>,
    /// `layer 3 (Conv2d)` or `node "conv1" (Conv2d)`.
    pub label: String,
}

/// A network as a graph of ops in execution order, with its parameters
/// (θ in `parameters()` order); `Sequential` is its chain form.
pub struct Model {
    spec: ModelSpec,
    nodes: Vec<Node>,
    /// Per-sample shape of every value (inputs, then node outputs).
    shapes: Vec<Vec<usize>>,
    /// The value that is the model output.
    output: usize,
    /// The last node reading each value (`None`: no node reads it).
    last_use: Vec<Option<usize>>,
    params: Vec<ParamInfo>,
    dtype: DType,
    device: Device,
}

/// The chain of layers of an `nn.Sequential` is a graph like any other.
pub type Sequential = Model;

/// Every θ index of these parameter tensors, in their order.
fn theta_indices<'a>(params: impl Iterator<Item = &'a ParamInfo>) -> Vec<i64> {
    params.flat_map(|p| (p.offset..p.offset + p.numel).map(|i| i as i64)).collect()
}

impl Model {
    /// Build from a spec and a state dict. `dtype` is the compute dtype; with
    /// `None` it is the dtype of the weights (f32 or f64).
    pub fn new(spec: ModelSpec, mut weights: HashMap<String, Tensor>, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let dtype = match dtype {
            Some(d) => d,
            None => weights_dtype(&weights)?,
        };
        if !tensor::is_compute_dtype(dtype) {
            bail!(Invalid, "compute dtype must be f32 or f64, got {}", tensor::dtype_name(dtype));
        }
        refuse_shared_tensors(&spec)?;
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut shapes = Vec::new();
        for inp in &spec.inputs {
            crate::budget::check(&format!("input {:?} of per-sample shape {:?}", inp.name, inp.shape), &inp.shape, dtype.size_in_bytes())?;
            ids.insert(&inp.name, shapes.len());
            shapes.push(inp.shape.clone());
        }
        let mut nodes = Vec::with_capacity(spec.nodes.len());
        for ns in &spec.nodes {
            let label = ns.label(spec.form);
            let inputs: Vec<usize> = ns.inputs.iter().map(|n| ids[n.as_str()]).collect();
            let in_shapes: Vec<&[usize]> = inputs.iter().map(|&v| shapes[v].as_slice()).collect();
            let op = nn::build(ns, &label, &in_shapes, &mut weights, dtype, device)?;
            // Every value of one sample must fit the memory budget (huge
            // padding, expand or repeat sizes stop here, not in an abort).
            crate::budget::check(&format!("{label}: its output of per-sample shape {:?}", op.out_shape()), op.out_shape(), dtype.size_in_bytes())?;
            ids.insert(&ns.name, shapes.len());
            shapes.push(op.out_shape().to_vec());
            nodes.push(Node { op, inputs, label });
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
        let output = ids[spec.output.as_str()];
        let out = &shapes[output];
        if out.len() != 1 {
            bail!(
                Spec,
                "the model output has per-sample shape {out:?}; it must be a vector (C,) \
                 (add a Flatten and a Linear at the end?)"
            );
        }
        let mut last_use = vec![None; shapes.len()];
        for (i, node) in nodes.iter().enumerate() {
            for &v in &node.inputs {
                last_use[v] = Some(i);
            }
        }
        let params = theta_layout(&spec, &nodes)?;
        Ok(Model { spec, nodes, shapes, output, last_use, params, dtype, device: device.clone() })
    }

    /// Load `model.json` (either form) and a safetensors state dict.
    pub fn load(spec_path: impl AsRef<Path>, weights_path: impl AsRef<Path>, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let (spec_path, weights_path) = (spec_path.as_ref(), weights_path.as_ref());
        let size = std::fs::metadata(spec_path).map_err(|e| crate::Error::io(spec_path, e))?.len();
        crate::budget::current().check(&format!("reading {}", spec_path.display()), Some(size))?;
        let text = std::fs::read_to_string(spec_path).map_err(|e| crate::Error::io(spec_path, e))?;
        // Errors name the file they are about.
        let named = |e: crate::Error| match e {
            e @ (crate::Error::Spec(_) | crate::Error::Memory(_)) => e.in_file(&spec_path.display()),
            crate::Error::Weights(m) => crate::Error::Weights(format!("{}: {m} (model {})", weights_path.display(), spec_path.display())),
            other => other,
        };
        let spec = ModelSpec::from_json(&text).map_err(named)?;
        let weights = crate::io::read_safetensors(weights_path, device)?;
        Self::new(spec, weights, dtype, device).map_err(named)
    }

    /// The spec the model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The nodes in execution order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Number of graph inputs (value ids `0..n_inputs()`).
    pub fn n_inputs(&self) -> usize {
        self.spec.inputs.len()
    }

    /// The value id of node `i`'s output.
    pub fn node_value(&self, i: usize) -> usize {
        self.n_inputs() + i
    }

    /// The node producing value `v`, if it is not a graph input.
    pub fn producer(&self, v: usize) -> Option<usize> {
        v.checked_sub(self.n_inputs())
    }

    /// Per-sample shape of value `v`.
    pub fn value_shape(&self, v: usize) -> &[usize] {
        &self.shapes[v]
    }

    /// The value id of the model output.
    pub fn output_value(&self) -> usize {
        self.output
    }

    /// The last node that reads value `v`.
    pub fn last_use(&self, v: usize) -> Option<usize> {
        self.last_use[v]
    }

    /// The per-sample size (elements) of the largest value of the graph.
    pub fn widest_value(&self) -> usize {
        self.shapes.iter().map(|s| s.iter().product::<usize>()).max().unwrap_or(1)
    }

    /// The per-sample size (elements) of the largest node output: the
    /// widest value sensitivities can reach (the model inputs, which
    /// [`Model::widest_value`] counts too, get none).
    pub fn widest_node_output(&self) -> usize {
        (0..self.nodes().len()).map(|i| self.value_shape(self.node_value(i)).iter().product::<usize>()).max().unwrap_or(1)
    }

    /// Per-sample input shape (of the first input).
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[0]
    }

    /// Number of outputs C.
    pub fn n_outputs(&self) -> usize {
        self.shapes[self.output][0]
    }

    /// Number of parameters P.
    pub fn n_params(&self) -> usize {
        self.params.last().map_or(0, |p| p.offset + p.numel)
    }

    /// The trainable tensors in θ order.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device its tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tensor of a parameter, in its PyTorch shape.
    pub fn param_tensor(&self, p: &ParamInfo) -> &Tensor {
        self.nodes[p.layer]
            .op
            .params()
            .into_iter()
            .find(|(r, _)| *r == p.role)
            .map(|(_, t)| t)
            .expect("a parameter belongs to its node")
    }

    /// θ's tensors `(name, tensor)` in θ order, in PyTorch shapes.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.name.clone(), self.param_tensor(p).clone())).collect()
    }

    /// The whole state dict the model was built from: θ's tensors in θ
    /// order, then frozen parameters and buffers (running statistics).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = self.named_parameters();
        for (i, node) in self.nodes.iter().enumerate() {
            let ns = &self.spec.nodes[i];
            for (role, t) in node.op.params().into_iter().chain(node.op.buffers()) {
                let key = ns.param_key(role).expect("a built node names its tensors");
                if !self.params.iter().any(|p| p.name == key) {
                    out.push((key, t.clone()));
                }
            }
        }
        out
    }

    /// θ as one vector `(P,)`.
    pub fn parameter_vector(&self) -> Result<Tensor> {
        let flat: Vec<Tensor> = self
            .named_parameters()
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

    /// The same network with parameters θ `(P,)` (buffers and frozen tensors unchanged).
    pub fn with_parameter_vector(&self, theta: &Tensor) -> Result<Self> {
        if theta.dims() != [self.n_params()] {
            bail!(Invalid, "parameter vector has shape {:?}, the model has {} parameters", theta.dims(), self.n_params());
        }
        let mut weights: HashMap<String, Tensor> = self.state_dict().into_iter().collect();
        for p in &self.params {
            weights.insert(p.name.clone(), theta.narrow(0, p.offset, p.numel)?.reshape(p.shape.as_slice())?);
        }
        Self::new(self.spec.clone(), weights, Some(self.dtype), &self.device)
    }

    /// The θ indices of every parameter tensor whose name matches one of the
    /// glob `patterns` (`*` any run of characters, `?` one), in θ order: the
    /// subnetwork `--params 'fc.*,layer4.*'`. A pattern matching nothing is
    /// an error that lists the parameter names.
    pub fn param_indices_matching(&self, patterns: &[&str]) -> Result<Vec<i64>> {
        for pat in patterns {
            if !self.params.iter().any(|p| glob_match(pat, &p.name)) {
                let names: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
                let shown = if names.len() > 12 { format!("{}, ...", names[..12].join(", ")) } else { names.join(", ") };
                bail!(Invalid, "parameter pattern {pat:?} matches no parameter (parameters: {shown})");
            }
        }
        Ok(theta_indices(self.params.iter().filter(|p| patterns.iter().any(|pat| glob_match(pat, &p.name)))))
    }

    /// The θ indices of the last layer's parameters ([`last_linear`](Self::last_linear)),
    /// in θ order: the columns `Subset::LastLayer` selects.
    pub fn last_layer_indices(&self) -> Result<Vec<i64>> {
        let last = self.last_linear()?;
        Ok(theta_indices(self.params.iter().filter(|p| p.layer == last)))
    }

    /// The nodes that depend on any of `sources` (themselves included):
    /// where sensitivities of their parameters must be pulled back through.
    pub fn downstream_of(&self, sources: &[usize]) -> Vec<bool> {
        let mut on = vec![false; self.nodes.len()];
        for &s in sources {
            on[s] = true;
        }
        for i in 0..self.nodes.len() {
            if !on[i] {
                on[i] = self.nodes[i].inputs.iter().any(|&v| self.producer(v).is_some_and(|j| on[j]));
            }
        }
        on
    }

    /// The node of the final `Linear` layer: the "last layer" of last-layer
    /// Laplace. It is the last `Linear` executed, and its output must reach
    /// the model output only through parameter-free ops linear in it
    /// (reshape, slice, select, identities).
    pub fn last_linear(&self) -> Result<usize> {
        let is_linear = |i: usize| matches!(self.spec.nodes[i].op, OpSpec::Module(LayerSpec::Linear { .. }));
        let Some(i) = (0..self.nodes.len()).rev().find(|&i| is_linear(i)) else {
            bail!(Spec, "last-layer quantities need a Linear layer, and the model has none");
        };
        if !self.params.iter().any(|p| p.layer == i) {
            bail!(Spec, "last-layer quantities need trainable parameters in the final Linear ({})", self.nodes[i].label);
        }
        let after = self.downstream_of(&[i]);
        if let Some(j) = (i + 1..self.nodes.len()).find(|&j| after[j] && !self.nodes[j].op.is_linear_map()) {
            bail!(
                Spec,
                "last-layer quantities need the output of the final Linear ({}) to reach the model output \
                 through parameter-free linear ops only (reshape, slice, select), but {} is not one",
                self.nodes[i].label,
                self.nodes[j].label
            );
        }
        if let Some(p) = self.params.iter().find(|p| p.layer > i || (p.layer != i && after[p.layer])) {
            bail!(
                Spec,
                "last-layer quantities need the final Linear ({}) to be the last layer with parameters, but {} \
                 has parameters",
                self.nodes[i].label,
                self.nodes[p.layer].label
            );
        }
        if self.producer(self.output).is_none_or(|o| !after[o]) {
            bail!(Spec, "the model output does not depend on the final Linear ({})", self.nodes[i].label);
        }
        Ok(i)
    }

    /// Check a batch of inputs: each `(M, *shape)` in the compute dtype,
    /// finite, integer where the input is (see [`Inputs::bind`]).
    pub fn check_input(&self, x: &Inputs) -> Result<()> {
        x.bind(self).map(|_| ())
    }

    /// The network output f(x) `(M, C)`.
    pub fn forward(&self, x: impl Into<Inputs>) -> Result<Tensor> {
        Ok(crate::engine::forward(self, &x.into(), &vec![false; self.nodes.len()])?.output)
    }
}

/// Does `name` match the glob `pat` (`*`: any run of characters, `?`: one)?
fn glob_match(pat: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pat.chars().collect(), name.chars().collect());
    // Classic two-pointer match with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// A module called twice reads the same state-dict tensors from two nodes;
/// its parameters would be shared, which the engine does not support.
fn refuse_shared_tensors(spec: &ModelSpec) -> Result<()> {
    let mut claimed: HashMap<String, usize> = HashMap::new();
    for (i, ns) in spec.nodes.iter().enumerate() {
        let OpSpec::Module(layer) = &ns.op else { continue };
        let mut roles = layer.param_roles();
        if matches!(layer, LayerSpec::BatchNorm { .. }) {
            roles.extend(["running_mean", "running_var"]);
        }
        for role in roles {
            let Some(key) = ns.param_key(role) else { continue };
            if let Some(&j) = claimed.get(&key) {
                bail!(
                    Spec,
                    "tensor {key:?} is read by both {} and {} (a module called twice shares its \
                     parameters, which is not supported)",
                    spec.nodes[j].label(spec.form),
                    ns.label(spec.form)
                );
            }
            claimed.insert(key, i);
        }
    }
    Ok(())
}

/// θ: the spec's `parameters`, each the tensor of exactly one node.
fn theta_layout(spec: &ModelSpec, nodes: &[Node]) -> Result<Vec<ParamInfo>> {
    let mut owner: HashMap<String, (usize, &'static str, Vec<usize>)> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for (role, t) in node.op.params() {
            let key = spec.nodes[i].param_key(role).expect("a built node names its tensors");
            owner.insert(key, (i, role, t.dims().to_vec()));
        }
    }
    let mut params = Vec::with_capacity(spec.parameters.len());
    let mut offset = 0;
    for name in &spec.parameters {
        let Some((layer, role, shape)) = owner.get(name).cloned() else {
            bail!(Spec, "parameter {name:?} (in \"parameters\") is not a parameter of any node");
        };
        let numel = shape.iter().product();
        params.push(ParamInfo { name: name.clone(), layer, role, shape, offset, numel });
        offset += numel;
    }
    Ok(params)
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

/// For an unexpected key "i.name" of a Sequential: which layer i is, if it exists.
fn owner_of(key: &str, spec: &ModelSpec) -> Option<String> {
    if spec.form != Form::Sequential {
        return None;
    }
    let idx: usize = key.split('.').next()?.parse().ok()?;
    let node = spec.nodes.get(idx)?;
    Some(format!("layer {idx} is {}", node.op.name()))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match("fc.*", "fc.weight"));
        assert!(glob_match("layer4.*", "layer4.1.bn2.bias"));
        assert!(!glob_match("layer4.*", "layer1.0.conv1.weight"));
        assert!(glob_match("*.bias", "layer1.0.bn1.bias"));
        assert!(glob_match("layer?.0.*", "layer3.0.conv1.weight"));
        assert!(!glob_match("fc", "fc.weight"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "axxbyyc") && !glob_match("a*b*c", "axxbyy"));
    }
}
