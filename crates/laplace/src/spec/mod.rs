//! The model description: a JSON file naming `torch.nn` classes and their
//! constructor arguments, with torch's defaults.
//!
//! ```json
//! {"input_shape": [1, 28, 28],
//!  "layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 8, "kernel_size": 5},
//!             {"type": "ReLU"}, {"type": "Flatten"},
//!             {"type": "Linear", "in_features": 4608, "out_features": 10}]}
//! ```
//!
//! The graph form for any `nn.Module` is in `graph` and
//! `docs/model-format.md`; a Sequential spec is loaded as the chain graph
//! it is.
//!
//! Parsing is strict: an unknown type, an unknown argument, a missing
//! required argument or a value of the wrong kind is an error that names the
//! layer index and the argument, so a typo never silently means "default".

use serde_json::{Map, Value};

use crate::error::{bail, Result};

mod graph;

pub use graph::{BinaryOp, CastKind, CompareOp, Form, InputDType, InputSpec, LogicalOp, MaskKind, MathOp, ModelSpec, NodeSpec, OpSpec, ReduceOp};

/// Conv2d `padding`: explicit amounts, or torch's `"valid"` / `"same"`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Padding {
    /// Zero padding (height, width) on each side.
    Explicit([usize; 2]),
    /// No padding.
    Valid,
    /// Output size = input size (stride 1).
    Same,
}

/// One layer with all constructor arguments resolved (defaults filled in).
#[derive(Clone, Debug, PartialEq)]
pub enum LayerSpec {
    /// `torch.nn.Linear` (or HuggingFace `Conv1D`, by `weight_layout`).
    Linear {
        /// I.
        in_features: usize,
        /// O.
        out_features: usize,
        /// Whether it has a bias `(O,)`.
        bias: bool,
        /// How its weight stores W.
        weight_layout: WeightLayout,
    },
    /// A lookup table `(num_embeddings, embedding_dim)` read with integer indices.
    Embedding {
        /// V, the rows of the table.
        num_embeddings: usize,
        /// D, the width of a row.
        embedding_dim: usize,
        /// The row that gets no gradient (torch's `padding_idx`).
        padding_idx: Option<usize>,
    },
    /// `LayerNorm` / `RMSNorm` over the trailing `normalized_shape` axes.
    Norm {
        /// LayerNorm or RMSNorm.
        kind: NormKind,
        /// The trailing axes normalized over.
        normalized_shape: Vec<usize>,
        /// `None`: the compute dtype's machine epsilon (torch's RMSNorm default).
        eps: Option<f64>,
        /// Whether it has a weight (a learnable scale).
        elementwise_affine: bool,
        /// LayerNorm's bias (with `elementwise_affine`).
        bias: bool,
    },
    /// `torch.nn.Conv2d`.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// (height, width).
        kernel_size: [usize; 2],
        /// (height, width).
        stride: [usize; 2],
        /// Zero padding.
        padding: Padding,
        /// (height, width).
        dilation: [usize; 2],
        /// Channel groups (in_channels for a depthwise convolution).
        groups: usize,
        /// Whether it has a bias `(out_channels,)`.
        bias: bool,
    },
    /// `BatchNorm1d` / `BatchNorm2d` at evaluation (running statistics).
    BatchNorm {
        /// C, the channels.
        num_features: usize,
        /// ε added to the running variance.
        eps: f64,
        /// Whether it has γ and β.
        affine: bool,
        /// BatchNorm2d (inputs `(C, H, W)`) rather than BatchNorm1d (`(C,)` or `(C, L)`).
        spatial: bool,
    },
    /// `torch.nn.AdaptiveAvgPool2d`.
    AdaptiveAvgPool2d {
        /// (height, width) of the output.
        output_size: [usize; 2],
    },
    /// `torch.nn.Flatten`.
    Flatten {
        /// First merged axis (batched numbering; torch's default 1).
        start_dim: i64,
        /// Last merged axis (torch's default −1).
        end_dim: i64,
    },
    /// A parameter-free elementwise activation.
    Activation(Activation),
    /// `Identity`, and `Dropout` at evaluation time.
    Identity,
    /// `torch.nn.MaxPool2d`.
    MaxPool2d {
        /// (height, width).
        kernel_size: [usize; 2],
        /// (height, width).
        stride: [usize; 2],
        /// Implicit −∞ padding (height, width).
        padding: [usize; 2],
        /// (height, width).
        dilation: [usize; 2],
        /// Round the output size up.
        ceil_mode: bool,
    },
    /// `torch.nn.AvgPool2d`.
    AvgPool2d {
        /// (height, width).
        kernel_size: [usize; 2],
        /// (height, width).
        stride: [usize; 2],
        /// Zero padding (height, width).
        padding: [usize; 2],
        /// Round the output size up.
        ceil_mode: bool,
        /// Count padded zeros in the divisor.
        count_include_pad: bool,
        /// Divide by this instead of the window size.
        divisor_override: Option<usize>,
    },
}

/// How a weight tensor stores the affine map's W `(out, in)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `(out, in)` row-major: `nn.Linear`, `nn.Conv2d`.
    OutIn,
    /// `(in, out)` row-major: HuggingFace `Conv1D`, `nn.Embedding` (a
    /// Linear over one-hot inputs whose table is `(vocab, dim)`).
    InOut,
}

/// Which normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// (x − mean) / √(var + ε) · w + b.
    LayerNorm,
    /// x / √(mean(x²) + ε) · w.
    RmsNorm,
}

/// Elementwise activations with their parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// max(x, 0).
    ReLU,
    /// tanh x.
    Tanh,
    /// 1 / (1 + e⁻ˣ).
    Sigmoid,
    /// log(1 + e^(βx)) / β, linear above `threshold`.
    Softplus {
        /// β.
        beta: f64,
        /// βx above which the output is x.
        threshold: f64,
    },
    /// x for x > 0, α(eˣ − 1) otherwise.
    ELU {
        /// α.
        alpha: f64,
    },
    /// x for x > 0, `negative_slope`·x otherwise.
    LeakyReLU {
        /// The slope for x < 0.
        negative_slope: f64,
    },
    /// x Φ(x).
    GELU {
        /// torch's `approximate="tanh"`.
        tanh_approximation: bool,
    },
    /// x · sigmoid(x).
    SiLU,
    /// min(max(x, 0), 6).
    ReLU6,
    /// x · ReLU6(x + 3) / 6.
    Hardswish,
    /// ReLU6(x + 3) / 6.
    Hardsigmoid,
}

impl LayerSpec {
    /// The `torch.nn` class name.
    pub fn type_name(&self) -> &'static str {
        match self {
            LayerSpec::Linear { .. } => "Linear",
            LayerSpec::Embedding { .. } => "Embedding",
            LayerSpec::Norm { kind: NormKind::LayerNorm, .. } => "LayerNorm",
            LayerSpec::Norm { kind: NormKind::RmsNorm, .. } => "RMSNorm",
            LayerSpec::Conv2d { .. } => "Conv2d",
            LayerSpec::Flatten { .. } => "Flatten",
            LayerSpec::Identity => "Identity",
            LayerSpec::MaxPool2d { .. } => "MaxPool2d",
            LayerSpec::AvgPool2d { .. } => "AvgPool2d",
            LayerSpec::BatchNorm { spatial: true, .. } => "BatchNorm2d",
            LayerSpec::BatchNorm { spatial: false, .. } => "BatchNorm1d",
            LayerSpec::AdaptiveAvgPool2d { .. } => "AdaptiveAvgPool2d",
            LayerSpec::Activation(a) => a.type_name(),
        }
    }
}

impl Activation {
    /// The `torch.nn` class name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Activation::ReLU => "ReLU",
            Activation::Tanh => "Tanh",
            Activation::Sigmoid => "Sigmoid",
            Activation::Softplus { .. } => "Softplus",
            Activation::ELU { .. } => "ELU",
            Activation::LeakyReLU { .. } => "LeakyReLU",
            Activation::GELU { .. } => "GELU",
            Activation::SiLU => "SiLU",
            Activation::ReLU6 => "ReLU6",
            Activation::Hardswish => "Hardswish",
            Activation::Hardsigmoid => "Hardsigmoid",
        }
    }
}

/// Parse the Sequential form `{"input_shape", "layers"}` into its layers.
pub(crate) fn parse_sequential(root: &Map<String, Value>) -> Result<(Vec<usize>, Vec<LayerSpec>)> {
    for key in root.keys() {
        if key != "input_shape" && key != "layers" {
            bail!(Spec, "unknown top-level key {key:?} (expected \"input_shape\", \"layers\")");
        }
    }
    let input_shape = match root.get("input_shape") {
        None => bail!(Spec, "missing \"input_shape\" (the shape of one sample, e.g. [784])"),
        Some(v) => usize_list(v).ok_or_else(|| {
            crate::Error::Spec(format!("\"input_shape\" must be a list of positive integers, got {v}"))
        })?,
    };
    if input_shape.is_empty() || input_shape.contains(&0) {
        bail!(Spec, "\"input_shape\" must be non-empty with positive sizes, got {input_shape:?}");
    }
    let Some(layers) = root.get("layers").and_then(Value::as_array) else {
        bail!(Spec, "missing \"layers\" (a list of layer objects)");
    };
    if layers.is_empty() {
        bail!(Spec, "\"layers\" is empty");
    }
    let layers = layers.iter().enumerate().map(|(i, v)| parse_layer(i, v)).collect::<Result<_>>()?;
    Ok((input_shape, layers))
}

impl LayerSpec {
    /// The layer as a JSON object in the input format, every argument
    /// explicit, so that parsing it gives the same spec.
    pub fn to_value(&self) -> Value {
        use serde_json::json;
        let l = self;
        match l {
                LayerSpec::Linear { in_features, out_features, bias, weight_layout } => {
                    let mut v = json!({"type": "Linear", "in_features": in_features, "out_features": out_features, "bias": bias});
                    if *weight_layout == WeightLayout::InOut {
                        v["weight_layout"] = json!("in_out");
                    }
                    v
                }
                LayerSpec::Embedding { num_embeddings, embedding_dim, padding_idx } => json!({
                    "type": "Embedding", "num_embeddings": num_embeddings, "embedding_dim": embedding_dim,
                    "padding_idx": padding_idx}),
                LayerSpec::Norm { kind, normalized_shape, eps, elementwise_affine, bias } => {
                    let mut v = json!({"type": l.type_name(), "normalized_shape": normalized_shape, "eps": eps,
                                       "elementwise_affine": elementwise_affine});
                    if *kind == NormKind::LayerNorm {
                        v["bias"] = json!(bias);
                    }
                    v
                }
                LayerSpec::Conv2d { in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias } => {
                    let padding = match padding {
                        Padding::Explicit(p) => json!(p),
                        Padding::Valid => json!("valid"),
                        Padding::Same => json!("same"),
                    };
                    json!({"type": "Conv2d", "in_channels": in_channels, "out_channels": out_channels,
                           "kernel_size": kernel_size, "stride": stride, "padding": padding,
                           "dilation": dilation, "groups": groups, "bias": bias})
                }
                LayerSpec::BatchNorm { num_features, eps, affine, .. } => {
                    json!({"type": l.type_name(), "num_features": num_features, "eps": eps, "affine": affine})
                }
                LayerSpec::AdaptiveAvgPool2d { output_size } => {
                    json!({"type": "AdaptiveAvgPool2d", "output_size": output_size})
                }
                LayerSpec::Flatten { start_dim, end_dim } => json!({"type": "Flatten", "start_dim": start_dim, "end_dim": end_dim}),
                LayerSpec::Identity => json!({"type": "Identity"}),
                LayerSpec::MaxPool2d { kernel_size, stride, padding, dilation, ceil_mode } => json!({
                    "type": "MaxPool2d", "kernel_size": kernel_size, "stride": stride, "padding": padding,
                    "dilation": dilation, "ceil_mode": ceil_mode}),
                LayerSpec::AvgPool2d { kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override } => json!({
                    "type": "AvgPool2d", "kernel_size": kernel_size, "stride": stride, "padding": padding,
                    "ceil_mode": ceil_mode, "count_include_pad": count_include_pad, "divisor_override": divisor_override}),
                LayerSpec::Activation(a) => match a {
                    Activation::Softplus { beta, threshold } => json!({"type": "Softplus", "beta": beta, "threshold": threshold}),
                    Activation::ELU { alpha } => json!({"type": "ELU", "alpha": alpha}),
                    Activation::LeakyReLU { negative_slope } => json!({"type": "LeakyReLU", "negative_slope": negative_slope}),
                    Activation::GELU { tanh_approximation } => {
                        json!({"type": "GELU", "approximate": if *tanh_approximation { "tanh" } else { "none" }})
                    }
                    other => json!({"type": other.type_name()}),
                },
            }
    }

    /// The trainable tensors this layer owns, in `parameters()` order.
    pub fn param_roles(&self) -> Vec<&'static str> {
        let (weight, bias) = match *self {
            LayerSpec::Linear { bias, .. } | LayerSpec::Conv2d { bias, .. } => (true, bias),
            LayerSpec::Embedding { .. } => (true, false),
            LayerSpec::Norm { elementwise_affine, bias, .. } => (elementwise_affine, elementwise_affine && bias),
            LayerSpec::BatchNorm { affine, .. } => (affine, affine),
            _ => (false, false),
        };
        [(weight, "weight"), (bias, "bias")].into_iter().filter(|(on, _)| *on).map(|(_, r)| r).collect()
    }
}

fn usize_list(v: &Value) -> Option<Vec<usize>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().map(|u| u as usize))
        .collect()
}

/// The arguments of one layer, consumed one by one so that leftovers are
/// reported as unknown.
struct Args {
    /// "layer 3 (Conv2d)" or "node \"conv1\" (Conv2d)": who the arguments belong to.
    label: String,
    map: Map<String, Value>,
}

impl Args {
    fn err(&self, msg: String) -> crate::Error {
        crate::Error::Spec(format!("{}: {msg}", self.label))
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn usize_req(&mut self, key: &str) -> Result<usize> {
        match self.take(key) {
            None => Err(self.err(format!("missing required argument {key:?}"))),
            Some(v) => self.as_usize(key, &v),
        }
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        match v.as_u64() {
            Some(u) => Ok(u as usize),
            None => Err(self.err(format!("argument {key:?} must be a non-negative integer, got {v}"))),
        }
    }

    fn i64_or(&mut self, key: &str, default: i64) -> Result<i64> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| self.err(format!("argument {key:?} must be an integer, got {v}"))),
        }
    }

    fn i64_req(&mut self, key: &str) -> Result<i64> {
        match self.take(key) {
            None => Err(self.err(format!("missing required argument {key:?}"))),
            Some(v) => v.as_i64().ok_or_else(|| self.err(format!("argument {key:?} must be an integer, got {v}"))),
        }
    }

    /// A finite number, if given.
    fn number_opt(&mut self, key: &str) -> Result<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(format!("argument {key:?} must be a finite number, got {v}"))),
            },
        }
    }

    fn number_req(&mut self, key: &str) -> Result<f64> {
        self.number_opt(key)?.ok_or_else(|| self.err(format!("missing required argument {key:?}")))
    }

    fn f64_or(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(x),
                _ => Err(self.err(format!("argument {key:?} must be a finite number, got {v}"))),
            },
        }
    }

    fn bool_or(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("argument {key:?} must be true or false, got {v}"))),
        }
    }

    /// An `int` or a pair `[h, w]`, as torch's `_pair`.
    fn pair(&mut self, key: &str, default: Option<[usize; 2]>) -> Result<[usize; 2]> {
        match self.take(key) {
            None => default.ok_or_else(|| self.err(format!("missing required argument {key:?}"))),
            Some(v) => self.pair_value(key, &v),
        }
    }

    fn pair_value(&self, key: &str, v: &Value) -> Result<[usize; 2]> {
        if let Some(u) = v.as_u64() {
            return Ok([u as usize, u as usize]);
        }
        match usize_list(v).as_deref() {
            Some([a, b]) => Ok([*a, *b]),
            _ => Err(self.err(format!(
                "argument {key:?} must be an integer or a pair of integers, got {v}"
            ))),
        }
    }

    /// Accept an argument that has no effect at evaluation time (e.g. `inplace`).
    fn ignore(&mut self, key: &str) {
        self.map.remove(key);
    }

    fn finish(self) -> Result<()> {
        if let Some(k) = self.map.keys().next() {
            return Err(self.err(format!("unknown argument {k:?}")));
        }
        Ok(())
    }
}

fn positive(a: &Args, key: &str, v: usize) -> Result<usize> {
    if v == 0 {
        return Err(a.err(format!("argument {key:?} must be positive")));
    }
    Ok(v)
}

fn positive_pair(a: &Args, key: &str, v: [usize; 2]) -> Result<[usize; 2]> {
    if v.contains(&0) {
        return Err(a.err(format!("argument {key:?} must be positive, got {v:?}")));
    }
    Ok(v)
}

fn parse_layer(index: usize, v: &Value) -> Result<LayerSpec> {
    let Some(obj) = v.as_object() else {
        bail!(Spec, "layer {index}: must be an object with a \"type\", got {v}");
    };
    let mut map = obj.clone();
    let ty = match map.remove("type") {
        Some(Value::String(s)) => s,
        Some(other) => bail!(Spec, "layer {index}: \"type\" must be a string, got {other}"),
        None => bail!(Spec, "layer {index}: missing \"type\" (a torch.nn class name such as \"Linear\")"),
    };
    match parse_module(&format!("layer {index} ({ty})"), &ty, map)? {
        Some(layer) => Ok(layer),
        None => bail!(
            Spec,
            "layer {index}: unknown layer type {ty:?} (known: {})",
            MODULE_OPS.join(", ")
        ),
    }
}

/// The `torch.nn` classes a layer (or a graph node's `op`) may name.
pub const MODULE_OPS: &[&str] = &[
    "Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "Flatten", "ReLU", "ReLU6", "Tanh", "Sigmoid", "Softplus",
    "ELU", "LeakyReLU", "GELU", "SiLU", "Hardswish", "Hardsigmoid", "Identity", "Dropout", "MaxPool2d", "AvgPool2d",
    "AdaptiveAvgPool2d", "Embedding", "LayerNorm", "RMSNorm",
];

/// A module op `ty` with constructor arguments `map`, or `None` when `ty`
/// is not a module op. `label` names the layer or node in messages.
pub(crate) fn parse_module(label: &str, ty: &str, map: Map<String, Value>) -> Result<Option<LayerSpec>> {
    let mut a = Args {
        label: label.to_string(),
        map,
    };
    let layer = match ty {
        "Linear" => {
            let in_features = a.usize_req("in_features")?;
            let in_features = positive(&a, "in_features", in_features)?;
            let out_features = a.usize_req("out_features")?;
            let out_features = positive(&a, "out_features", out_features)?;
            let bias = a.bool_or("bias", true)?;
            let weight_layout = match a.take("weight_layout") {
                None => WeightLayout::OutIn,
                Some(Value::String(s)) if s == "out_in" => WeightLayout::OutIn,
                Some(Value::String(s)) if s == "in_out" => WeightLayout::InOut,
                Some(v) => return Err(a.err(format!("\"weight_layout\" must be \"out_in\" or \"in_out\", got {v}"))),
            };
            LayerSpec::Linear {
                in_features,
                out_features,
                bias,
                weight_layout,
            }
        }
        "Embedding" => {
            let num_embeddings = a.usize_req("num_embeddings")?;
            let num_embeddings = positive(&a, "num_embeddings", num_embeddings)?;
            let embedding_dim = a.usize_req("embedding_dim")?;
            let embedding_dim = positive(&a, "embedding_dim", embedding_dim)?;
            let padding_idx = match a.take("padding_idx") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    let i = v.as_i64().ok_or_else(|| a.err(format!("\"padding_idx\" must be an integer or null, got {v}")))?;
                    let n = num_embeddings as i64;
                    let i = if i < 0 { i + n } else { i };
                    if !(0..n).contains(&i) {
                        return Err(a.err(format!("\"padding_idx\" {v} is out of range for {num_embeddings} embeddings")));
                    }
                    Some(i as usize)
                }
            };
            for unsupported in ["max_norm"] {
                if a.take(unsupported).is_some_and(|v| !v.is_null()) {
                    return Err(a.err(format!("{unsupported:?} is not supported (it changes the table during the forward pass)")));
                }
            }
            a.ignore("norm_type");
            a.ignore("scale_grad_by_freq");
            a.ignore("sparse");
            LayerSpec::Embedding { num_embeddings, embedding_dim, padding_idx }
        }
        "LayerNorm" | "RMSNorm" => {
            let normalized_shape = match a.take("normalized_shape") {
                Some(Value::Number(n)) => n.as_u64().map(|d| vec![d as usize]),
                Some(v) => usize_list(&v),
                None => None,
            }
            .filter(|s| !s.is_empty() && !s.contains(&0))
            .ok_or_else(|| a.err("\"normalized_shape\" must be a positive size or a list of them".into()))?;
            let kind = if ty == "LayerNorm" { NormKind::LayerNorm } else { NormKind::RmsNorm };
            let eps = match a.take("eps") {
                None if kind == NormKind::LayerNorm => Some(1e-5),
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_f64().filter(|e| *e >= 0.0).ok_or_else(|| a.err(format!("\"eps\" must be a non-negative number, got {v}")))?),
            };
            if kind == NormKind::LayerNorm && eps.is_none() {
                return Err(a.err("LayerNorm needs a number \"eps\"".into()));
            }
            let elementwise_affine = a.bool_or("elementwise_affine", true)?;
            let bias = if kind == NormKind::LayerNorm { a.bool_or("bias", true)? } else { false };
            LayerSpec::Norm { kind, normalized_shape, eps, elementwise_affine, bias }
        }
        "Conv2d" => {
            let in_channels = a.usize_req("in_channels")?;
            let in_channels = positive(&a, "in_channels", in_channels)?;
            let out_channels = a.usize_req("out_channels")?;
            let out_channels = positive(&a, "out_channels", out_channels)?;
            let kernel_size = a.pair("kernel_size", None)?;
            let kernel_size = positive_pair(&a, "kernel_size", kernel_size)?;
            let stride = a.pair("stride", Some([1, 1]))?;
            let stride = positive_pair(&a, "stride", stride)?;
            let dilation = a.pair("dilation", Some([1, 1]))?;
            let dilation = positive_pair(&a, "dilation", dilation)?;
            let padding = match a.take("padding") {
                None => Padding::Explicit([0, 0]),
                Some(Value::String(s)) if s == "valid" => Padding::Valid,
                Some(Value::String(s)) if s == "same" => {
                    if stride != [1, 1] {
                        return Err(a.err("padding=\"same\" requires stride 1 (as in torch)".into()));
                    }
                    Padding::Same
                }
                Some(v) => Padding::Explicit(a.pair_value("padding", &v)?),
            };
            let groups = match a.take("groups") {
                None => 1,
                Some(v) => a.as_usize("groups", &v)?,
            };
            if groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
                return Err(a.err(format!(
                    "groups = {groups} must be positive and divide in_channels = {in_channels} and \
                     out_channels = {out_channels}"
                )));
            }
            if let Some(mode) = a.take("padding_mode") {
                if mode != "zeros" {
                    return Err(a.err(format!(
                        "padding_mode {mode} is not supported (only \"zeros\")"
                    )));
                }
            }
            let bias = a.bool_or("bias", true)?;
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
                bias,
            }
        }
        "BatchNorm1d" | "BatchNorm2d" => {
            let num_features = a.usize_req("num_features")?;
            let num_features = positive(&a, "num_features", num_features)?;
            let eps = a.f64_or("eps", 1e-5)?;
            if eps < 0.0 {
                return Err(a.err(format!("argument \"eps\" must be non-negative, got {eps}")));
            }
            let affine = a.bool_or("affine", true)?;
            // Evaluation mode: the running statistics are used, momentum does not matter.
            a.ignore("momentum");
            if !a.bool_or("track_running_stats", true)? {
                return Err(a.err(
                    "track_running_stats = false normalizes by batch statistics even at evaluation; \
                     only running statistics are supported"
                        .into(),
                ));
            }
            LayerSpec::BatchNorm {
                num_features,
                eps,
                affine,
                spatial: ty == "BatchNorm2d",
            }
        }
        "AdaptiveAvgPool2d" => {
            let output_size = a.pair("output_size", None)?;
            let output_size = positive_pair(&a, "output_size", output_size)?;
            LayerSpec::AdaptiveAvgPool2d { output_size }
        }
        "ReLU6" => {
            a.ignore("inplace");
            LayerSpec::Activation(Activation::ReLU6)
        }
        "Hardswish" => {
            a.ignore("inplace");
            LayerSpec::Activation(Activation::Hardswish)
        }
        "Hardsigmoid" => {
            a.ignore("inplace");
            LayerSpec::Activation(Activation::Hardsigmoid)
        }
        "Flatten" => LayerSpec::Flatten {
            start_dim: a.i64_or("start_dim", 1)?,
            end_dim: a.i64_or("end_dim", -1)?,
        },
        "Identity" => LayerSpec::Identity,
        "Dropout" => {
            let p = a.f64_or("p", 0.5)?;
            if !(0.0..=1.0).contains(&p) {
                return Err(a.err(format!("argument \"p\" must be in [0, 1], got {p}")));
            }
            a.ignore("inplace");
            LayerSpec::Identity
        }
        "ReLU" => {
            a.ignore("inplace");
            LayerSpec::Activation(Activation::ReLU)
        }
        "Tanh" => LayerSpec::Activation(Activation::Tanh),
        "Sigmoid" => LayerSpec::Activation(Activation::Sigmoid),
        "SiLU" => {
            a.ignore("inplace");
            LayerSpec::Activation(Activation::SiLU)
        }
        "Softplus" => {
            let beta = a.f64_or("beta", 1.0)?;
            if beta == 0.0 {
                return Err(a.err("argument \"beta\" must be non-zero".into()));
            }
            let threshold = a.f64_or("threshold", 20.0)?;
            LayerSpec::Activation(Activation::Softplus { beta, threshold })
        }
        "ELU" => {
            let alpha = a.f64_or("alpha", 1.0)?;
            a.ignore("inplace");
            LayerSpec::Activation(Activation::ELU { alpha })
        }
        "LeakyReLU" => {
            let negative_slope = a.f64_or("negative_slope", 0.01)?;
            a.ignore("inplace");
            LayerSpec::Activation(Activation::LeakyReLU { negative_slope })
        }
        "GELU" => {
            let tanh_approximation = match a.take("approximate") {
                None => false,
                Some(Value::String(s)) if s == "none" => false,
                Some(Value::String(s)) if s == "tanh" => true,
                Some(v) => {
                    return Err(a.err(format!(
                        "argument \"approximate\" must be \"none\" or \"tanh\", got {v}"
                    )))
                }
            };
            LayerSpec::Activation(Activation::GELU { tanh_approximation })
        }
        "MaxPool2d" => {
            let kernel_size = a.pair("kernel_size", None)?;
            let kernel_size = positive_pair(&a, "kernel_size", kernel_size)?;
            let stride = a.pair("stride", Some(kernel_size))?;
            let stride = positive_pair(&a, "stride", stride)?;
            let padding = a.pair("padding", Some([0, 0]))?;
            let dilation = a.pair("dilation", Some([1, 1]))?;
            let dilation = positive_pair(&a, "dilation", dilation)?;
            let ceil_mode = a.bool_or("ceil_mode", false)?;
            if a.bool_or("return_indices", false)? {
                return Err(a.err("return_indices = true is not supported".into()));
            }
            check_pool_padding(&a, padding, kernel_size)?;
            LayerSpec::MaxPool2d {
                kernel_size,
                stride,
                padding,
                dilation,
                ceil_mode,
            }
        }
        "AvgPool2d" => {
            let kernel_size = a.pair("kernel_size", None)?;
            let kernel_size = positive_pair(&a, "kernel_size", kernel_size)?;
            let stride = a.pair("stride", Some(kernel_size))?;
            let stride = positive_pair(&a, "stride", stride)?;
            let padding = a.pair("padding", Some([0, 0]))?;
            let ceil_mode = a.bool_or("ceil_mode", false)?;
            let count_include_pad = a.bool_or("count_include_pad", true)?;
            let divisor_override = match a.take("divisor_override") {
                None => None,
                Some(v) => Some(positive(&a, "divisor_override", a.as_usize("divisor_override", &v)?)?),
            };
            check_pool_padding(&a, padding, kernel_size)?;
            LayerSpec::AvgPool2d {
                kernel_size,
                stride,
                padding,
                ceil_mode,
                count_include_pad,
                divisor_override,
            }
        }
        _ => return Ok(None),
    };
    a.finish()?;
    Ok(Some(layer))
}

/// torch: "pad should be at most half of effective kernel size".
fn check_pool_padding(a: &Args, padding: [usize; 2], kernel: [usize; 2]) -> Result<()> {
    for d in 0..2 {
        if padding[d] * 2 > kernel[d] {
            return Err(a.err(format!(
                "padding {padding:?} must be at most half the kernel size {kernel:?}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_torch() {
        let s = ModelSpec::from_json(
            r#"{"input_shape":[1,8,8],"layers":[
                {"type":"Conv2d","in_channels":1,"out_channels":2,"kernel_size":3},
                {"type":"MaxPool2d","kernel_size":2},
                {"type":"Softplus"},{"type":"Flatten"},
                {"type":"Linear","in_features":18,"out_features":3}]}"#,
        )
        .unwrap();
        let layers = s.layers().unwrap();
        assert_eq!(
            *layers[0],
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 2,
                kernel_size: [3, 3],
                stride: [1, 1],
                padding: Padding::Explicit([0, 0]),
                dilation: [1, 1],
                groups: 1,
                bias: true
            }
        );
        match layers[1] {
            LayerSpec::MaxPool2d { stride, .. } => assert_eq!(stride, &[2, 2]),
            l => panic!("{l:?}"),
        }
        assert_eq!(
            *layers[2],
            LayerSpec::Activation(Activation::Softplus {
                beta: 1.0,
                threshold: 20.0
            })
        );
        assert_eq!(*layers[3], LayerSpec::Flatten { start_dim: 1, end_dim: -1 });
    }

    #[test]
    fn json_round_trip() {
        let text = r#"{"input_shape":[2,9,9],"layers":[
            {"type":"Conv2d","in_channels":2,"out_channels":3,"kernel_size":[2,3],"padding":"same"},
            {"type":"GELU","approximate":"tanh"},{"type":"MaxPool2d","kernel_size":2,"ceil_mode":true},
            {"type":"AvgPool2d","kernel_size":2,"count_include_pad":false,"divisor_override":3},
            {"type":"Softplus","beta":2.0},{"type":"Dropout"},{"type":"Flatten"},
            {"type":"Linear","in_features":48,"out_features":3,"bias":false}]}"#;
        let s = ModelSpec::from_json(text).unwrap();
        assert_eq!(ModelSpec::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn errors_name_layer_and_argument() {
        let e = ModelSpec::from_json(
            r#"{"input_shape":[4],"layers":[{"type":"Linear","in_features":4,"out_features":2,"bais":false}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("layer 0 (Linear)") && e.contains("\"bais\""), "{e}");
        let e = ModelSpec::from_json(r#"{"input_shape":[4],"layers":[{"type":"Relu"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 0") && e.contains("unknown layer type \"Relu\""), "{e}");
        let e = ModelSpec::from_json(r#"{"input_shape":[4],"layers":[{"type":"Linear","in_features":4}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing required argument \"out_features\""), "{e}");
    }
}
