//! Bad input gets an error that names the problem: which layer, which key,
//! which shape. (The CLI's exit status and untouched outputs are tested in
//! the laplace-cli crate.)

mod common;

use std::collections::HashMap;

use laplace::tensor::{DType, Device, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Likelihood, ModelSpec, Sequential, Subset};

fn dev() -> Device {
    Device::Cpu
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F64, &dev()).unwrap()
}

/// A 4 → 3 → 2 MLP spec and matching weights.
fn mlp() -> (String, HashMap<String, Tensor>) {
    let spec = r#"{"input_shape":[4],"layers":[
        {"type":"Linear","in_features":4,"out_features":3},{"type":"Tanh"},
        {"type":"Linear","in_features":3,"out_features":2}]}"#;
    let w = HashMap::from([
        ("0.weight".to_string(), zeros(&[3, 4])),
        ("0.bias".to_string(), zeros(&[3])),
        ("2.weight".to_string(), zeros(&[2, 3])),
        ("2.bias".to_string(), zeros(&[2])),
    ]);
    (spec.to_string(), w)
}

fn build(spec: &str, w: HashMap<String, Tensor>) -> laplace::Result<Sequential> {
    Sequential::new(ModelSpec::from_json(spec)?, w, None, &dev())
}

#[track_caller]
fn expect_err<T>(r: laplace::Result<T>, needles: &[&str]) {
    let Err(e) = r else { panic!("expected an error containing {needles:?}") };
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

#[test]
fn spec_errors_name_the_layer() {
    let (_, w) = mlp();
    expect_err(build("{", w.clone()), &["not valid JSON"]);
    expect_err(build(r#"{"layers":[]}"#, w.clone()), &["input_shape"]);
    expect_err(
        build(r#"{"input_shape":[4],"layers":[{"type":"Lienar","in_features":4,"out_features":2}]}"#, w.clone()),
        &["layer 0", "unknown layer type \"Lienar\""],
    );
    expect_err(
        build(r#"{"input_shape":[4],"layers":[{"type":"Linear","in_features":4,"out_features":2,"bias":1}]}"#, w.clone()),
        &["layer 0 (Linear)", "\"bias\"", "true or false"],
    );
    expect_err(
        build(r#"{"input_shape":[4],"layers":[{"type":"Tanh"},{"type":"ReLU","slope":2}]}"#, w.clone()),
        &["layer 1 (ReLU)", "unknown argument \"slope\""],
    );
    expect_err(
        build(r#"{"input_shape":[4],"layers":[{"type":"Conv2d","in_channels":1,"out_channels":2}]}"#, w.clone()),
        &["layer 0 (Conv2d)", "missing required argument \"kernel_size\""],
    );
    expect_err(
        build(r#"{"input_shape":[1,4,4],"layers":[{"type":"Conv2d","in_channels":1,"out_channels":2,"kernel_size":3,"groups":2}]}"#, w.clone()),
        &["layer 0 (Conv2d)", "groups"],
    );
}

#[test]
fn input_shapes_that_do_not_fit_name_the_layer() {
    let (_, w) = mlp();
    // Linear after a conv without Flatten.
    let spec = r#"{"input_shape":[1,5,5],"layers":[
        {"type":"Conv2d","in_channels":1,"out_channels":2,"kernel_size":3,"bias":false},
        {"type":"Linear","in_features":18,"out_features":2}]}"#;
    let w2 = HashMap::from([("0.weight".to_string(), zeros(&[2, 1, 3, 3]))]);
    expect_err(build(spec, w2), &["layer 1 (Linear)", "[2, 3, 3]", "Flatten"]);
    // in_features that does not match.
    let spec = r#"{"input_shape":[5],"layers":[{"type":"Linear","in_features":4,"out_features":2}]}"#;
    expect_err(build(spec, w.clone()), &["layer 0 (Linear)", "[5]", "in_features = 4"]);
    // Channels that do not match.
    let spec = r#"{"input_shape":[3,5,5],"layers":[{"type":"Conv2d","in_channels":1,"out_channels":2,"kernel_size":3}]}"#;
    expect_err(build(spec, HashMap::new()), &["layer 0 (Conv2d)", "3 channels", "in_channels = 1"]);
    // A kernel larger than the input.
    let spec = r#"{"input_shape":[1,2,2],"layers":[{"type":"MaxPool2d","kernel_size":3}]}"#;
    expect_err(build(spec, HashMap::new()), &["layer 0 (MaxPool2d)", "smaller than the kernel"]);
    // Output not a vector.
    let spec = r#"{"input_shape":[1,4,4],"layers":[{"type":"ReLU"}]}"#;
    expect_err(build(spec, HashMap::new()), &["output", "[1, 4, 4]", "vector"]);
    // Flatten of the batch dimension.
    let spec = r#"{"input_shape":[2,3],"layers":[{"type":"Flatten","start_dim":0}]}"#;
    expect_err(build(spec, HashMap::new()), &["layer 0 (Flatten)", "start_dim = 0"]);
}

#[test]
fn weight_errors_name_the_key() {
    let (spec, w) = mlp();
    let mut missing = w.clone();
    missing.remove("2.bias");
    expect_err(build(&spec, missing), &["missing tensor \"2.bias\"", "layer 2 (Linear)"]);
    let mut extra = w.clone();
    extra.insert("1.weight".into(), zeros(&[3]));
    expect_err(build(&spec, extra), &["unexpected", "\"1.weight\"", "layer 1 is Tanh"]);
    let mut bad_shape = w.clone();
    bad_shape.insert("0.weight".into(), zeros(&[4, 3]));
    expect_err(build(&spec, bad_shape), &["\"0.weight\"", "[4, 3]", "[3, 4]"]);
    let mut nan = w.clone();
    nan.insert("0.bias".into(), Tensor::new(&[0.0f64, f64::NAN, 0.0], &dev()).unwrap());
    expect_err(build(&spec, nan), &["\"0.bias\"", "non-finite", "[1]"]);
    let mut ints = w.clone();
    ints.insert("0.bias".into(), Tensor::new(&[0i64, 1, 2], &dev()).unwrap());
    expect_err(build(&spec, ints), &["\"0.bias\"", "dtype i64"]);
    let mut mixed = w;
    mixed.insert("0.bias".into(), Tensor::zeros(3, DType::F32, &dev()).unwrap());
    expect_err(build(&spec, mixed), &["different dtypes"]);
}

#[test]
fn data_errors_name_the_problem() {
    let (spec, w) = mlp();
    let model = build(&spec, w).unwrap();
    let cls = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
    let reg = Curvature::new(&model, Likelihood::Regression, CurvatureKind::Ggn, &Subset::All).unwrap();
    let x = zeros(&[3, 4]);
    let labels = |v: &[i64]| Tensor::new(v, &dev()).unwrap();
    expect_err(cls.jacobians(&zeros(&[3, 5])), &["[3, 5]", "(N, 4)"]);
    expect_err(cls.jacobians(&Tensor::zeros((3, 4), DType::F32, &dev()).unwrap()), &["dtype f32"]);
    let mut xs = vec![0.0f64; 12];
    xs[6] = f64::INFINITY;
    let bad_x = Tensor::from_vec(xs, (3, 4), &dev()).unwrap();
    expect_err(cls.jacobians(&bad_x), &["non-finite", "[1, 2]"]);
    expect_err(cls.diag(&Batch::new(x.clone(), labels(&[0, 2, 1]))), &["y[1] = 2", "[0, 2)"]);
    expect_err(cls.diag(&Batch::new(x.clone(), labels(&[0, -1, 1]))), &["y[1] = -1"]);
    expect_err(cls.full(&Batch::new(x.clone(), labels(&[0, 1]))), &["shape [2]", "(3,)"]);
    expect_err(cls.gradients(&x, &zeros(&[3])), &["integer class indices"]);
    expect_err(reg.diag(&Batch::new(x.clone(), zeros(&[3, 3]))), &["[3, 3]", "(3, 2)"]);
    expect_err(reg.diag(&Batch::new(x.clone(), labels(&[0, 1, 1]))), &["regression targets", "floats"]);
}

#[test]
fn subset_errors_name_the_index() {
    let (spec, w) = mlp();
    let model = build(&spec, w).unwrap(); // 23 parameters
    let sub = |v: Vec<i64>| Curvature::new(&model, Likelihood::Regression, CurvatureKind::Ggn, &Subset::Subnetwork(v));
    expect_err(sub(vec![3, 23]), &["index 23", "position 1", "23 parameters"]);
    expect_err(sub(vec![-1]), &["index -1"]);
    expect_err(sub(vec![4, 7, 4]), &["index 4 appears twice", "positions 0 and 2"]);
    expect_err(sub(vec![]), &["empty"]);
    let mc0 = CurvatureKind::FisherMc { samples: 0, seed: 0 };
    expect_err(Curvature::new(&model, Likelihood::Regression, mc0, &Subset::All), &["at least one sample"]);
    // Last layer of a model without Linear layers.
    let spec = r#"{"input_shape":[1,4,4],"layers":[
        {"type":"Conv2d","in_channels":1,"out_channels":1,"kernel_size":4,"bias":false},{"type":"Flatten"}]}"#;
    let conv = build(spec, HashMap::from([("0.weight".to_string(), zeros(&[1, 1, 4, 4]))])).unwrap();
    expect_err(
        Curvature::new(&conv, Likelihood::Regression, CurvatureKind::Ggn, &Subset::LastLayer),
        &["Linear", "has none"],
    );
}

#[test]
fn file_errors_name_the_file() {
    let dir = common::fixtures_dir().join("act_tanh");
    expect_err(
        Sequential::load(dir.join("nope.json"), dir.join("weights.safetensors"), None, &dev()),
        &["nope.json"],
    );
    expect_err(
        Sequential::load(dir.join("model.json"), dir.join("meta.json"), None, &dev()),
        &["meta.json", "safetensors"],
    );
    expect_err(laplace::Dataset::load(&dir.join("model.json"), DType::F64, &dev()), &["model.json", ".npz or .safetensors"]);
    // Not a data file: arrays of different lengths.
    expect_err(laplace::Dataset::load(&dir.join("expected.safetensors"), DType::F64, &dev()), &["expected.safetensors", "rows"]);
    expect_err(laplace::io::read_indices(&dir.join("data.npz")), &["exactly one index array"]);
}

/// A graph: x → fc1 → relu → add(relu, fc1) → fc2, with `parameters` listed.
fn graph(nodes: &str, parameters: &str) -> String {
    format!(
        r#"{{"format": "laplace-graph", "version": 1, "inputs": [{{"name": "x", "shape": [4], "dtype": "float"}}],
            "parameters": {parameters}, "nodes": [{nodes}], "output": "fc2"}}"#
    )
}

const GOOD_NODES: &str = r#"
    {"name": "fc1", "op": "Linear", "inputs": ["x"], "module": "fc1", "attrs": {"in_features": 4, "out_features": 3}},
    {"name": "relu", "op": "ReLU", "inputs": ["fc1"]},
    {"name": "res", "op": "add", "inputs": ["relu", "fc1"]},
    {"name": "fc2", "op": "Linear", "inputs": ["res"], "module": "fc2", "attrs": {"in_features": 3, "out_features": 2}}"#;

const GOOD_PARAMS: &str = r#"["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]"#;

fn graph_weights() -> HashMap<String, Tensor> {
    HashMap::from([
        ("fc1.weight".to_string(), zeros(&[3, 4])),
        ("fc1.bias".to_string(), zeros(&[3])),
        ("fc2.weight".to_string(), zeros(&[2, 3])),
        ("fc2.bias".to_string(), zeros(&[2])),
    ])
}

#[test]
fn graph_errors_name_the_node_and_key() {
    assert!(build(&graph(GOOD_NODES, GOOD_PARAMS), graph_weights()).is_ok());
    // Unknown op, with the node named.
    let bad = GOOD_NODES.replace(r#""op": "ReLU""#, r#""op": "Relu""#);
    expect_err(build(&graph(&bad, GOOD_PARAMS), graph_weights()), &["node \"relu\"", "unknown op \"Relu\""]);
    // A value read before it is written.
    let bad = GOOD_NODES.replace(r#""inputs": ["relu", "fc1"]"#, r#""inputs": ["relu", "fc9"]"#);
    expect_err(build(&graph(&bad, GOOD_PARAMS), graph_weights()), &["node \"res\"", "\"fc9\"", "earlier node"]);
    // Wrong arity, unknown node key, unknown attribute.
    let bad = GOOD_NODES.replace(r#""inputs": ["relu", "fc1"]"#, r#""inputs": ["relu"]"#);
    expect_err(build(&graph(&bad, GOOD_PARAMS), graph_weights()), &["node \"res\" (add)", "\"scalar\""]);
    let bad = GOOD_NODES.replace(r#""op": "ReLU","#, r#""op": "ReLU", "inplace_ops": 1,"#);
    expect_err(build(&graph(&bad, GOOD_PARAMS), graph_weights()), &["node 1", "\"inplace_ops\""]);
    let bad = GOOD_NODES.replace(r#""out_features": 3}"#, r#""out_features": 3, "bais": false}"#);
    expect_err(build(&graph(&bad, GOOD_PARAMS), graph_weights()), &["node \"fc1\" (Linear)", "\"bais\""]);
    // Shapes that do not fit name the node.
    let bad = GOOD_NODES.replace(r#""in_features": 3, "out_features": 2"#, r#""in_features": 5, "out_features": 2"#);
    expect_err(build(&graph(&bad, GOOD_PARAMS), graph_weights()), &["node \"fc2\" (Linear)", "in_features = 5"]);
    // Tensors: missing, unexpected, a parameter no node has, one listed twice.
    let mut w = graph_weights();
    w.remove("fc2.bias");
    expect_err(build(&graph(GOOD_NODES, GOOD_PARAMS), w), &["missing tensor \"fc2.bias\"", "node \"fc2\""]);
    let mut w = graph_weights();
    w.insert("fc3.weight".into(), zeros(&[1]));
    expect_err(build(&graph(GOOD_NODES, GOOD_PARAMS), w), &["unexpected", "\"fc3.weight\""]);
    let params = r#"["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight"]"#;
    expect_err(build(&graph(GOOD_NODES, params), graph_weights()), &["\"head.weight\"", "not a parameter of any node"]);
    let params = r#"["fc1.weight", "fc1.bias", "fc1.bias"]"#;
    expect_err(build(&graph(GOOD_NODES, params), graph_weights()), &["\"fc1.bias\"", "twice"]);
    // A module called twice shares its parameters: refused, naming both nodes.
    let shared = GOOD_NODES.replace(
        r#"{"name": "fc2", "op": "Linear", "inputs": ["res"], "module": "fc2""#,
        r#"{"name": "fc1b", "op": "Linear", "inputs": ["res"], "module": "fc1", "attrs": {"in_features": 3, "out_features": 3}},
           {"name": "fc2", "op": "Linear", "inputs": ["fc1b"], "module": "fc2""#,
    );
    expect_err(
        build(&graph(&shared, GOOD_PARAMS), graph_weights()),
        &["\"fc1.weight\"", "node \"fc1\"", "node \"fc1b\"", "called twice"],
    );
}

#[test]
fn graph_last_layer_must_reach_the_output_linearly() {
    // fc2 followed by a Tanh: not a last layer.
    let nodes = format!(
        "{GOOD_NODES}, {}",
        r#"{"name": "out", "op": "Tanh", "inputs": ["fc2"]}"#
    );
    let text = graph(&nodes, GOOD_PARAMS).replace(r#""output": "fc2""#, r#""output": "out""#);
    let model = build(&text, graph_weights()).unwrap();
    expect_err(model.last_linear(), &["node \"fc2\"", "node \"out\" (Tanh)", "linear ops"]);
    // fc2 followed by a slice and a reshape: fine.
    let nodes = format!(
        "{GOOD_NODES}, {}",
        r#"{"name": "sl", "op": "slice", "inputs": ["fc2"], "attrs": {"dim": 1, "start": 0, "end": 2}},
           {"name": "out", "op": "reshape", "inputs": ["sl"], "attrs": {"shape": [2]}}"#
    );
    let text = graph(&nodes, GOOD_PARAMS).replace(r#""output": "fc2""#, r#""output": "out""#);
    let model = build(&text, graph_weights()).unwrap();
    assert_eq!(model.last_linear().unwrap(), 3);
}

/// Geometry that would need absurd memory is refused before anything is
/// allocated (a hostile spec once asked for 192 TB and aborted).
#[test]
fn huge_window_geometry_is_refused_by_name() {
    for (layer, needle) in [
        (r#"{"type":"Conv2d","in_channels":1,"out_channels":2,"kernel_size":3,"padding":1000000000000}"#, "layer 0 (Conv2d)"),
        (r#"{"type":"Conv2d","in_channels":1,"out_channels":2,"kernel_size":3,"padding":9223372036854775807}"#, "layer 0 (Conv2d)"),
        (r#"{"type":"AvgPool2d","kernel_size":1000000,"stride":1,"padding":500000}"#, "layer 0 (AvgPool2d)"),
    ] {
        let spec = format!(r#"{{"input_shape":[1,8,8],"layers":[{layer},{{"type":"Flatten"}}]}}"#);
        let w = HashMap::from([("0.weight".to_string(), zeros(&[2, 1, 3, 3])), ("0.bias".to_string(), zeros(&[2]))]);
        let r = build(&spec, w);
        let Err(e) = r else { panic!("{layer}: accepted") };
        let e = e.to_string();
        assert!(e.contains(needle), "{layer}: {e}");
    }
}
