//! The graph form of a model spec (`docs/model-format.md`): named inputs,
//! nodes in an order where each reads only earlier values, one output, and
//! θ as an explicit list of state-dict names. A Sequential spec is parsed
//! into the same structure, a chain whose node `i` is layer `i`.

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Map, Value};

use super::{parse_module, parse_sequential, usize_list, Args, LayerSpec, MODULE_OPS};
use crate::error::{bail, Result};

/// A parsed model spec: always a graph.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The model's inputs, in `forward`'s argument order.
    pub inputs: Vec<InputSpec>,
    /// θ: the trainable tensors' state-dict names in `parameters()` order.
    pub parameters: Vec<String>,
    /// The ops, each reading only inputs and earlier nodes' values.
    pub nodes: Vec<NodeSpec>,
    /// The value that is the model output.
    pub output: String,
    /// How the spec was written, so that [`ModelSpec::to_json`] writes it back alike.
    pub form: Form,
}

/// How a spec was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `input_shape` and a list of `torch.nn` layers (an `nn.Sequential`).
    Sequential,
    /// Named inputs and nodes, as `tools/laplace_export.py` writes them.
    Graph,
}

/// One input of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    /// Its name (`x`, or `forward`'s argument name: `input_ids`, ...), also its data file key.
    pub name: String,
    /// Per-sample shape.
    pub shape: Vec<usize>,
    /// Float or integer.
    pub dtype: InputDType,
}

/// What a graph input holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputDType {
    /// Real numbers (images, features).
    Float,
    /// Integers (token ids, masks): never differentiated.
    Int,
}

impl InputDType {
    /// `float` or `int`, as the spec spells it.
    pub fn name(self) -> &'static str {
        match self {
            InputDType::Float => "float",
            InputDType::Int => "int",
        }
    }
}

/// One op of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSpec {
    /// The node's output value.
    pub name: String,
    /// What it computes.
    pub op: OpSpec,
    /// The values it reads (inputs or earlier nodes), in argument order.
    pub inputs: Vec<String>,
    /// Role (`weight`, `running_mean`, ...) → state-dict name, where given.
    pub params: BTreeMap<String, String>,
    /// The module path it came from (`layer1.0.conv1`; `"3"` for layer 3 of a Sequential).
    pub module: Option<String>,
}

/// Elementwise binary arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a · b.
    Mul,
    /// a / b.
    Div,
}

/// A reduction over axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// `x.mean(dims)`.
    Mean,
    /// `x.sum(dims)`.
    Sum,
}

/// What a node computes.
#[derive(Clone, Debug, PartialEq)]
pub enum OpSpec {
    /// A `torch.nn` module (or the functional form of one).
    Module(LayerSpec),
    /// Two values, broadcast per sample.
    Binary(BinaryOp),
    /// One value and a number: `x ∘ s`, or `s ∘ x` when `reverse`.
    Scalar {
        /// The arithmetic.
        op: BinaryOp,
        /// The number s.
        scalar: f64,
        /// `s ∘ x` instead of `x ∘ s`.
        reverse: bool,
    },
    /// −x.
    Neg,
    /// `torch.cat` of the inputs.
    Cat {
        /// Batched axis numbering (0 is the batch axis).
        dim: i64,
    },
    /// Per-sample target shape.
    Reshape {
        /// The shape of one sample after the reshape.
        shape: Vec<usize>,
    },
    /// Batched axis numbering, `dims[0] == 0`.
    Permute {
        /// The new order of the axes.
        dims: Vec<i64>,
    },
    /// A sum or mean over axes.
    Reduce {
        /// Sum or mean.
        op: ReduceOp,
        /// The axes (batched numbering).
        dims: Vec<i64>,
        /// Keep the reduced axes as size 1.
        keepdim: bool,
    },
    /// `x[..., start:end:step, ...]` along `dim`.
    Slice {
        /// The axis (batched numbering).
        dim: i64,
        /// First index (negative counts from the end).
        start: i64,
        /// One past the last index (`None`: the end).
        end: Option<i64>,
        /// Stride, ≥ 1.
        step: usize,
    },
    /// `x.select(dim, index)`: the axis removed.
    Select {
        /// The axis (batched numbering).
        dim: i64,
        /// The index (negative counts from the end).
        index: i64,
    },
    /// `torch.matmul` of two values.
    Matmul,
    /// softmax (or log-softmax with `log`) along `dim`.
    Softmax {
        /// The axis (batched numbering).
        dim: i64,
        /// log-softmax.
        log: bool,
    },
    /// `x.masked_fill(mask, value)`.
    MaskedFill {
        /// The fill value.
        value: f64,
    },
    /// `torch.where(cond, a, b)`; operands given as numbers are `Some`.
    Where {
        /// `a` where it is a number (else the second input).
        a: Option<f64>,
        /// `b` where it is a number (else the last input).
        b: Option<f64>,
    },
    /// Elementwise comparison → 0 / 1 (with a number: `x ∘ s`, or `s ∘ x` when reversed).
    Compare {
        /// The comparison.
        op: CompareOp,
        /// The number s, when one operand is a number.
        scalar: Option<f64>,
        /// `s ∘ x` instead of `x ∘ s`.
        reverse: bool,
    },
    /// Elementwise logic on 0 / 1 values.
    Logical(LogicalOp),
    /// dtype conversion.
    Cast(CastKind),
    /// xᵖ.
    Pow {
        /// The exponent p.
        exponent: f64,
    },
    /// An elementwise function.
    Math(MathOp),
    /// `F.scaled_dot_product_attention(q, k, v[, mask])`.
    Attention {
        /// A causal (lower-triangular) mask.
        is_causal: bool,
        /// The logit scale (`None`: 1/√d).
        scale: Option<f64>,
        /// How the mask input is given, when there is one.
        mask: Option<MaskKind>,
    },
    /// The same per-sample tensor for every sample (row-major data).
    Constant {
        /// Its per-sample shape.
        shape: Vec<usize>,
        /// Its values, row-major.
        data: Vec<f64>,
    },
    /// `torch.cumsum` along `dim`.
    Cumsum {
        /// The axis (batched numbering).
        dim: i64,
    },
    /// `torch.argmax` along `dim` (an integer result, never differentiated).
    Argmax {
        /// The axis (batched numbering).
        dim: i64,
        /// Keep the axis as size 1.
        keepdim: bool,
    },
    /// Per sample, `x` indexed along `dim` by an integer tensor.
    Index {
        /// The axis (batched numbering).
        dim: i64,
    },
    /// `torch.gather` per sample.
    Gather {
        /// The axis (batched numbering).
        dim: i64,
    },
    /// Per-sample target shape (-1 keeps a size).
    Expand {
        /// The per-sample target shape.
        shape: Vec<i64>,
    },
    /// `x.repeat(*repeats)` per sample.
    Repeat {
        /// Copies along each per-sample axis.
        repeats: Vec<usize>,
    },
}

/// An elementwise comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    /// a = b.
    Eq,
    /// a ≠ b.
    Ne,
    /// a < b.
    Lt,
    /// a ≤ b.
    Le,
    /// a > b.
    Gt,
    /// a ≥ b.
    Ge,
}

/// Elementwise logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogicalOp {
    /// a ∧ b.
    And,
    /// a ∨ b.
    Or,
    /// ¬a.
    Not,
}

/// A dtype conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CastKind {
    /// To the compute dtype.
    Float,
    /// Truncation toward zero.
    Int,
    /// x ≠ 0.
    Bool,
}

/// An elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MathOp {
    /// √x.
    Sqrt,
    /// 1/√x.
    Rsqrt,
    /// eˣ.
    Exp,
    /// ln x.
    Log,
    /// |x|.
    Abs,
}

/// How an attention mask is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// Nonzero = attend.
    Bool,
    /// Added to the scores.
    Additive,
}

const COMPARE: [(&str, CompareOp); 6] =
    [("eq", CompareOp::Eq), ("ne", CompareOp::Ne), ("lt", CompareOp::Lt), ("le", CompareOp::Le), ("gt", CompareOp::Gt), ("ge", CompareOp::Ge)];
const MATH: [(&str, MathOp); 5] = [("sqrt", MathOp::Sqrt), ("rsqrt", MathOp::Rsqrt), ("exp", MathOp::Exp), ("log", MathOp::Log), ("abs", MathOp::Abs)];
const LOGICAL: [(&str, LogicalOp); 3] = [("logical_and", LogicalOp::And), ("logical_or", LogicalOp::Or), ("logical_not", LogicalOp::Not)];

fn name_of<T: PartialEq + Copy>(table: &[(&'static str, T)], v: T) -> &'static str {
    table.iter().find(|(_, x)| *x == v).map(|(n, _)| *n).expect("every variant is in its table")
}

impl BinaryOp {
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

impl OpSpec {
    /// The op's name as written in `model.json`.
    pub fn name(&self) -> &'static str {
        match self {
            OpSpec::Module(l) => l.type_name(),
            OpSpec::Binary(op) | OpSpec::Scalar { op, .. } => op.name(),
            OpSpec::Neg => "neg",
            OpSpec::Cat { .. } => "cat",
            OpSpec::Reshape { .. } => "reshape",
            OpSpec::Permute { .. } => "permute",
            OpSpec::Reduce { op: ReduceOp::Mean, .. } => "mean",
            OpSpec::Reduce { op: ReduceOp::Sum, .. } => "sum",
            OpSpec::Slice { .. } => "slice",
            OpSpec::Select { .. } => "select",
            OpSpec::Matmul => "matmul",
            OpSpec::Softmax { log: false, .. } => "softmax",
            OpSpec::Softmax { log: true, .. } => "log_softmax",
            OpSpec::MaskedFill { .. } => "masked_fill",
            OpSpec::Where { .. } => "where",
            OpSpec::Compare { op, .. } => name_of(&COMPARE, *op),
            OpSpec::Logical(op) => name_of(&LOGICAL, *op),
            OpSpec::Cast(_) => "to",
            OpSpec::Pow { .. } => "pow",
            OpSpec::Math(op) => name_of(&MATH, *op),
            OpSpec::Attention { .. } => "scaled_dot_product_attention",
            OpSpec::Constant { .. } => "constant",
            OpSpec::Cumsum { .. } => "cumsum",
            OpSpec::Argmax { .. } => "argmax",
            OpSpec::Index { .. } => "index",
            OpSpec::Gather { .. } => "gather",
            OpSpec::Expand { .. } => "expand",
            OpSpec::Repeat { .. } => "repeat",
        }
    }

    /// How many inputs the op reads: exactly `n`, or at least 1 (`None`).
    fn arity(&self) -> Option<usize> {
        match self {
            OpSpec::Binary(_) | OpSpec::Matmul | OpSpec::MaskedFill { .. } | OpSpec::Index { .. } | OpSpec::Gather { .. } => Some(2),
            OpSpec::Logical(LogicalOp::And | LogicalOp::Or) => Some(2),
            OpSpec::Compare { scalar, .. } => Some(if scalar.is_some() { 1 } else { 2 }),
            OpSpec::Where { a, b } => Some(3 - a.is_some() as usize - b.is_some() as usize),
            OpSpec::Attention { mask, .. } => Some(if mask.is_some() { 4 } else { 3 }),
            OpSpec::Cat { .. } => None,
            _ => Some(1),
        }
    }

    fn attrs(&self) -> Value {
        match self {
            OpSpec::Module(l) => {
                let mut v = l.to_value();
                v.as_object_mut().expect("an object").remove("type");
                v
            }
            OpSpec::Binary(_) | OpSpec::Neg => json!({}),
            OpSpec::Scalar { scalar, reverse, .. } => json!({"scalar": scalar, "reverse": reverse}),
            OpSpec::Cat { dim } => json!({"dim": dim}),
            OpSpec::Reshape { shape } => json!({"shape": shape}),
            OpSpec::Permute { dims } => json!({"dims": dims}),
            OpSpec::Reduce { dims, keepdim, .. } => json!({"dim": dims, "keepdim": keepdim}),
            OpSpec::Slice { dim, start, end, step } => json!({"dim": dim, "start": start, "end": end, "step": step}),
            OpSpec::Select { dim, index } => json!({"dim": dim, "index": index}),
            OpSpec::Matmul | OpSpec::Logical(_) | OpSpec::Math(_) => json!({}),
            OpSpec::Softmax { dim, .. } | OpSpec::Cumsum { dim } | OpSpec::Index { dim } | OpSpec::Gather { dim } => json!({"dim": dim}),
            OpSpec::MaskedFill { value } => json!({"value": value}),
            OpSpec::Where { a, b } => {
                let mut m = Map::new();
                if let Some(a) = a {
                    m.insert("a".into(), json!(a));
                }
                if let Some(b) = b {
                    m.insert("b".into(), json!(b));
                }
                Value::Object(m)
            }
            OpSpec::Compare { scalar: Some(s), reverse, .. } => json!({"scalar": s, "reverse": reverse}),
            OpSpec::Compare { scalar: None, .. } => json!({}),
            OpSpec::Cast(k) => json!({"dtype": match k { CastKind::Float => "float", CastKind::Int => "int", CastKind::Bool => "bool" }}),
            OpSpec::Pow { exponent } => json!({"exponent": exponent}),
            OpSpec::Attention { is_causal, scale, mask } => json!({"is_causal": is_causal, "scale": scale,
                "mask": mask.map(|m| match m { MaskKind::Bool => "bool", MaskKind::Additive => "additive" })}),
            OpSpec::Constant { shape, data } => json!({"shape": shape, "data": data}),
            OpSpec::Argmax { dim, keepdim } => json!({"dim": dim, "keepdim": keepdim}),
            OpSpec::Expand { shape } => json!({"shape": shape}),
            OpSpec::Repeat { repeats } => json!({"repeats": repeats}),
        }
    }
}

impl NodeSpec {
    /// The state-dict name of the tensor in `role`: given in `params`, or
    /// `<module>.<role>` (a Sequential layer `i` has module `"i"`).
    pub fn param_key(&self, role: &str) -> Option<String> {
        self.params
            .get(role)
            .cloned()
            .or_else(|| self.module.as_ref().map(|m| format!("{m}.{role}")))
    }

    /// `node "conv1" (Conv2d)`, or `layer 3 (Conv2d)` in a Sequential, for messages.
    pub fn label(&self, form: Form) -> String {
        match form {
            Form::Sequential => format!("layer {} ({})", self.name, self.op.name()),
            Form::Graph => match &self.module {
                Some(m) if m != &self.name => format!("node {:?} ({}, module {m:?})", self.name, self.op.name()),
                _ => format!("node {:?} ({})", self.name, self.op.name()),
            },
        }
    }
}

impl ModelSpec {
    /// Parse either form from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let root: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => bail!(Spec, "not valid JSON: {e}"),
        };
        let Some(root) = root.as_object() else {
            bail!(Spec, "the top level must be an object (\"input_shape\" and \"layers\", or a graph with \"nodes\")");
        };
        if root.contains_key("nodes") || root.contains_key("format") {
            return parse_graph(root);
        }
        let (input_shape, layers) = parse_sequential(root)?;
        Ok(Self::sequential(input_shape, layers))
    }

    /// The chain graph of an `nn.Sequential`: node `i` is layer `i`, reading
    /// the previous node (the first reads input `x`); θ is every layer's
    /// weight and bias in layer order.
    pub fn sequential(input_shape: Vec<usize>, layers: Vec<LayerSpec>) -> Self {
        let mut parameters = Vec::new();
        let nodes = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                parameters.extend(l.param_roles().into_iter().map(|r| format!("{i}.{r}")));
                NodeSpec {
                    name: i.to_string(),
                    op: OpSpec::Module(l),
                    inputs: vec![if i == 0 { "x".to_string() } else { (i - 1).to_string() }],
                    params: BTreeMap::new(),
                    module: Some(i.to_string()),
                }
            })
            .collect::<Vec<_>>();
        let output = nodes.last().map_or_else(|| "x".to_string(), |n| n.name.clone());
        ModelSpec {
            inputs: vec![InputSpec { name: "x".into(), shape: input_shape, dtype: InputDType::Float }],
            parameters,
            nodes,
            output,
            form: Form::Sequential,
        }
    }

    /// The per-sample shape of the first input.
    pub fn input_shape(&self) -> &[usize] {
        &self.inputs[0].shape
    }

    /// The layers of a Sequential spec, in order (`None` for a graph).
    pub fn layers(&self) -> Option<Vec<&LayerSpec>> {
        (self.form == Form::Sequential)
            .then(|| self.nodes.iter().filter_map(|n| if let OpSpec::Module(l) = &n.op { Some(l) } else { None }).collect())
    }

    /// The spec as JSON in the form it was written in, every argument
    /// explicit, so that `from_json(to_json())` gives the same spec.
    pub fn to_json(&self) -> String {
        if let Some(layers) = self.layers() {
            let layers: Vec<Value> = layers.iter().map(|l| l.to_value()).collect();
            return json!({"input_shape": self.input_shape(), "layers": layers}).to_string();
        }
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                let mut v = json!({"name": n.name, "op": n.op.name(), "inputs": n.inputs, "attrs": n.op.attrs()});
                let o = v.as_object_mut().expect("an object");
                if !n.params.is_empty() {
                    o.insert("params".into(), json!(n.params));
                }
                if let Some(m) = &n.module {
                    o.insert("module".into(), json!(m));
                }
                v
            })
            .collect();
        let inputs: Vec<Value> =
            self.inputs.iter().map(|i| json!({"name": i.name, "shape": i.shape, "dtype": i.dtype.name()})).collect();
        json!({"format": FORMAT, "version": VERSION, "inputs": inputs, "parameters": self.parameters,
               "nodes": nodes, "output": self.output})
        .to_string()
    }
}

const FORMAT: &str = "laplace-graph";
const VERSION: u64 = 1;

fn parse_graph(root: &Map<String, Value>) -> Result<ModelSpec> {
    const KEYS: [&str; 6] = ["format", "version", "inputs", "parameters", "nodes", "output"];
    for key in root.keys() {
        if !KEYS.contains(&key.as_str()) {
            bail!(Spec, "unknown top-level key {key:?} (expected {})", KEYS.join(", "));
        }
    }
    match root.get("format") {
        Some(Value::String(s)) if s == FORMAT => {}
        other => bail!(Spec, "\"format\" must be \"{FORMAT}\", got {}", other.map_or("nothing".into(), |v| v.to_string())),
    }
    match root.get("version").and_then(Value::as_u64) {
        Some(VERSION) => {}
        _ => bail!(Spec, "\"version\" must be {VERSION}, got {}", root.get("version").map_or("nothing".into(), |v| v.to_string())),
    }
    let Some(inputs) = root.get("inputs").and_then(Value::as_array).filter(|a| !a.is_empty()) else {
        bail!(Spec, "\"inputs\" must be a non-empty list of {{\"name\", \"shape\", \"dtype\"}}");
    };
    let mut values: HashSet<String> = HashSet::new();
    let inputs = inputs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let o = v.as_object().ok_or_else(|| spec_err(format!("input {i} must be an object, got {v}")))?;
            for k in o.keys() {
                if !["name", "shape", "dtype"].contains(&k.as_str()) {
                    bail!(Spec, "input {i}: unknown key {k:?} (expected name, shape, dtype)");
                }
            }
            let name = str_field(o, "name").ok_or_else(|| spec_err(format!("input {i} needs a \"name\"")))?;
            let shape = o
                .get("shape")
                .and_then(usize_list)
                .filter(|s| !s.contains(&0))
                .ok_or_else(|| spec_err(format!("input {name:?}: \"shape\" must be a list of positive sizes")))?;
            let dtype = match o.get("dtype").and_then(Value::as_str) {
                None | Some("float") => InputDType::Float,
                Some("int") => InputDType::Int,
                Some(other) => bail!(Spec, "input {name:?}: dtype {other:?} is not supported (\"float\" or \"int\")"),
            };
            if !values.insert(name.clone()) {
                bail!(Spec, "input name {name:?} appears twice");
            }
            Ok(InputSpec { name, shape, dtype })
        })
        .collect::<Result<Vec<_>>>()?;
    let parameters: Vec<String> = match root.get("parameters") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| spec_err(format!("\"parameters\" must be a list of state-dict names, got {v}")))?,
    };
    let mut seen = HashSet::new();
    for p in &parameters {
        if !seen.insert(p) {
            bail!(Spec, "parameter {p:?} is listed twice in \"parameters\"");
        }
    }
    let Some(nodes) = root.get("nodes").and_then(Value::as_array).filter(|a| !a.is_empty()) else {
        bail!(Spec, "\"nodes\" must be a non-empty list of node objects");
    };
    let nodes = nodes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let node = parse_node(i, v)?;
            for inp in &node.inputs {
                if !values.contains(inp) {
                    bail!(
                        Spec,
                        "{}: input {inp:?} is not a graph input or an earlier node (nodes must come after the values they read)",
                        node.label(Form::Graph)
                    );
                }
            }
            if !values.insert(node.name.clone()) {
                bail!(Spec, "node name {:?} (node {i}) is already a value of the graph", node.name);
            }
            Ok(node)
        })
        .collect::<Result<Vec<_>>>()?;
    let output = match root.get("output") {
        Some(Value::String(s)) if values.contains(s) => s.clone(),
        Some(Value::String(s)) => bail!(Spec, "\"output\" {s:?} is not a value of the graph"),
        _ => bail!(Spec, "\"output\" must name the value that is the model output"),
    };
    Ok(ModelSpec { inputs, parameters, nodes, output, form: Form::Graph })
}

fn spec_err(msg: String) -> crate::Error {
    crate::Error::Spec(msg)
}

fn str_field(o: &Map<String, Value>, key: &str) -> Option<String> {
    o.get(key).and_then(Value::as_str).map(str::to_string)
}

const FUNCTIONAL_OPS: &[&str] = &[
    "add", "sub", "mul", "div", "neg", "cat", "reshape", "permute", "mean", "sum", "slice", "select", "matmul", "softmax",
    "log_softmax", "masked_fill", "where", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "to", "pow", "sqrt", "rsqrt", "exp", "log", "abs", "scaled_dot_product_attention", "constant", "cumsum", "argmax",
    "index", "gather", "expand", "repeat",
];

fn parse_node(i: usize, v: &Value) -> Result<NodeSpec> {
    let Some(o) = v.as_object() else {
        bail!(Spec, "node {i} must be an object, got {v}");
    };
    const KEYS: [&str; 6] = ["name", "op", "inputs", "attrs", "params", "module"];
    for k in o.keys() {
        if !KEYS.contains(&k.as_str()) {
            bail!(Spec, "node {i}: unknown key {k:?} (expected {})", KEYS.join(", "));
        }
    }
    let name = str_field(o, "name").ok_or_else(|| spec_err(format!("node {i} needs a \"name\" (its output value)")))?;
    let op_name = str_field(o, "op").ok_or_else(|| spec_err(format!("node {name:?} needs an \"op\"")))?;
    let module = match o.get("module") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => bail!(Spec, "node {name:?}: \"module\" must be a string, got {other}"),
    };
    let inputs = o
        .get("inputs")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| spec_err(format!("node {name:?}: \"inputs\" must be a list of value names")))?;
    let params: BTreeMap<String, String> = match o.get("params") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_str().map(str::to_string).ok_or_else(|| spec_err(format!("node {name:?}: params.{k} must be a state-dict name, got {v}")))?)))
            .collect::<Result<_>>()?,
        Some(other) => bail!(Spec, "node {name:?}: \"params\" must be an object (role → state-dict name), got {other}"),
    };
    let attrs = match o.get("attrs") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => bail!(Spec, "node {name:?}: \"attrs\" must be an object, got {other}"),
    };
    let label = format!("node {name:?} ({op_name})");
    let op = match parse_module(&label, &op_name, attrs.clone())? {
        Some(l) => OpSpec::Module(l),
        None => parse_functional(&label, &op_name, attrs, inputs.len())?,
    };
    match op.arity() {
        Some(n) if n != inputs.len() => bail!(Spec, "{label}: takes {n} input(s), got {}", inputs.len()),
        None if inputs.is_empty() => bail!(Spec, "{label}: needs at least one input"),
        _ => {}
    }
    Ok(NodeSpec { name, op, inputs, params, module })
}

fn parse_functional(label: &str, op: &str, attrs: Map<String, Value>, n_inputs: usize) -> Result<OpSpec> {
    let mut a = Args { label: label.to_string(), map: attrs };
    let dims = |a: &mut Args, key: &str| -> Result<Vec<i64>> {
        match a.take(key) {
            None => Err(a.err(format!("missing required argument {key:?}"))),
            Some(Value::Number(n)) => n.as_i64().map(|d| vec![d]).ok_or_else(|| a.err(format!("{key:?} must be an integer"))),
            Some(v) => v
                .as_array()
                .and_then(|l| l.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                .ok_or_else(|| a.err(format!("{key:?} must be an integer or a list of integers, got {v}"))),
        }
    };
    let binary = |name: &str| match name {
        "add" => Some(BinaryOp::Add),
        "sub" => Some(BinaryOp::Sub),
        "mul" => Some(BinaryOp::Mul),
        "div" => Some(BinaryOp::Div),
        _ => None,
    };
    let spec = match op {
        _ if binary(op).is_some() => {
            let bop = binary(op).expect("checked");
            match a.take("scalar") {
                None if n_inputs == 2 => OpSpec::Binary(bop),
                None => return Err(a.err("with one input, the number is given as \"scalar\"".into())),
                Some(v) => {
                    let scalar = v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| a.err(format!("\"scalar\" must be a finite number, got {v}")))?;
                    let reverse = a.bool_or("reverse", false)?;
                    OpSpec::Scalar { op: bop, scalar, reverse }
                }
            }
        }
        "neg" => OpSpec::Neg,
        "cat" => OpSpec::Cat { dim: a.i64_or("dim", 0)? },
        "reshape" => {
            let shape = a.take("shape").and_then(|v| usize_list(&v)).ok_or_else(|| a.err("\"shape\" must be the per-sample target shape, a list of sizes".into()))?;
            OpSpec::Reshape { shape }
        }
        "permute" => OpSpec::Permute { dims: dims(&mut a, "dims")? },
        "mean" | "sum" => {
            let d = dims(&mut a, "dim")?;
            let keepdim = a.bool_or("keepdim", false)?;
            OpSpec::Reduce { op: if op == "mean" { ReduceOp::Mean } else { ReduceOp::Sum }, dims: d, keepdim }
        }
        "slice" => {
            let dim = a.i64_or("dim", 0)?;
            let start = a.i64_or("start", 0)?;
            let end = match a.take("end") {
                None => None,
                Some(v) => Some(v.as_i64().ok_or_else(|| a.err(format!("\"end\" must be an integer, got {v}")))?),
            };
            let step = a.i64_or("step", 1)?;
            if step < 1 {
                return Err(a.err(format!("\"step\" must be positive, got {step}")));
            }
            OpSpec::Slice { dim, start, end, step: step as usize }
        }
        "select" => OpSpec::Select { dim: a.i64_or("dim", 0)?, index: a.i64_or("index", 0)? },
        "matmul" => OpSpec::Matmul,
        "softmax" | "log_softmax" => OpSpec::Softmax { dim: a.i64_req("dim")?, log: op == "log_softmax" },
        "masked_fill" => OpSpec::MaskedFill { value: a.number_req("value")? },
        "where" => {
            let a_ = a.number_opt("a")?;
            let b_ = a.number_opt("b")?;
            OpSpec::Where { a: a_, b: b_ }
        }
        _ if COMPARE.iter().any(|(n, _)| *n == op) => {
            let cop = COMPARE.iter().find(|(n, _)| *n == op).expect("checked").1;
            let scalar = a.number_opt("scalar")?;
            let reverse = a.bool_or("reverse", false)?;
            if scalar.is_none() && n_inputs != 2 {
                return Err(a.err("with one input, the number is given as \"scalar\"".into()));
            }
            OpSpec::Compare { op: cop, scalar, reverse }
        }
        _ if LOGICAL.iter().any(|(n, _)| *n == op) => OpSpec::Logical(LOGICAL.iter().find(|(n, _)| *n == op).expect("checked").1),
        _ if MATH.iter().any(|(n, _)| *n == op) => OpSpec::Math(MATH.iter().find(|(n, _)| *n == op).expect("checked").1),
        "to" => OpSpec::Cast(match a.take("dtype") {
            Some(Value::String(s)) if s == "float" => CastKind::Float,
            Some(Value::String(s)) if s == "int" => CastKind::Int,
            Some(Value::String(s)) if s == "bool" => CastKind::Bool,
            other => return Err(a.err(format!("\"dtype\" must be \"float\", \"int\" or \"bool\", got {other:?}"))),
        }),
        "pow" => OpSpec::Pow { exponent: a.number_req("exponent")? },
        "scaled_dot_product_attention" => {
            let is_causal = a.bool_or("is_causal", false)?;
            let scale = a.number_opt("scale")?;
            let mask = match a.take("mask") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s == "bool" => Some(MaskKind::Bool),
                Some(Value::String(s)) if s == "additive" => Some(MaskKind::Additive),
                Some(v) => return Err(a.err(format!("\"mask\" must be \"bool\", \"additive\" or null, got {v}"))),
            };
            if mask.is_some() != (n_inputs == 4) {
                return Err(a.err(format!("takes q, k, v and a mask exactly when \"mask\" is given ({n_inputs} inputs)")));
            }
            OpSpec::Attention { is_causal, scale, mask }
        }
        "constant" => {
            let shape = a.take("shape").and_then(|v| usize_list(&v)).ok_or_else(|| a.err("\"shape\" must be the per-sample shape, a list of sizes".into()))?;
            let data = a
                .take("data")
                .and_then(|v| v.as_array().and_then(|l| l.iter().map(Value::as_f64).collect::<Option<Vec<_>>>()))
                .ok_or_else(|| a.err("\"data\" must be a list of numbers".into()))?;
            let need = crate::budget::numel(&shape);
            if need != Some(data.len() as u64) {
                let need = need.map_or("more than 2^64".to_string(), |n| n.to_string());
                return Err(a.err(format!("\"data\" has {} numbers, shape {shape:?} needs {need}", data.len())));
            }
            OpSpec::Constant { shape, data }
        }
        "cumsum" => OpSpec::Cumsum { dim: a.i64_req("dim")? },
        "argmax" => OpSpec::Argmax { dim: a.i64_req("dim")?, keepdim: a.bool_or("keepdim", false)? },
        "index" => OpSpec::Index { dim: a.i64_req("dim")? },
        "gather" => OpSpec::Gather { dim: a.i64_req("dim")? },
        "expand" => OpSpec::Expand { shape: dims(&mut a, "shape")? },
        "repeat" => {
            let repeats = a.take("repeats").and_then(|v| usize_list(&v)).ok_or_else(|| a.err("\"repeats\" must be a list of counts".into()))?;
            OpSpec::Repeat { repeats }
        }
        other => bail!(
            Spec,
            "{label}: unknown op {other:?} (module ops: {}; functional ops: {})",
            MODULE_OPS.join(", "),
            FUNCTIONAL_OPS.join(", ")
        ),
    };
    a.finish()?;
    Ok(spec)
}
