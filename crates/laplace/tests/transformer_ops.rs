//! The transformer ops against central finite differences, on small
//! graphs with integer inputs: Embedding (with padding_idx), LayerNorm,
//! RMSNorm, Linear over sequences (both weight layouts), attention written
//! out (matmul, softmax, the additive mask `(1 − mask) · c`) and fused
//! (`scaled_dot_product_attention` with a boolean mask, and causal), GPT-2's
//! last-token pooling (`ne`, `argmax`, `index`), pointwise math, cumsum,
//! where, logical ops, expand, repeat, gather, log-softmax.
//!
//! Jacobians and Hessian-vector products (the second-order terms of
//! attention, softmax and the normalizations) are checked against finite
//! differences of the model and of its gradients; diagonals against the
//! full matrices; and a masked model's quantities do not change when a
//! padded token does.

mod common;

use std::collections::HashMap;

use common::assert_close;
use laplace::rng::Rng;
use laplace::spec::{LayerSpec, ModelSpec, NormKind, OpSpec, WeightLayout};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Inputs, Likelihood, Model, Subset};

fn random_weights(spec: &ModelSpec, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let mut w = HashMap::new();
    let mut put = |key: String, shape: &[usize], rng: &mut Rng, f: &dyn Fn(f64) -> f64| {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| f(rng.normal())).collect();
        w.insert(key, tensor::from_f64(v, shape, DType::F64, &Device::Cpu).unwrap());
    };
    for node in &spec.nodes {
        let key = |role: &str| node.param_key(role).unwrap();
        match &node.op {
            OpSpec::Module(LayerSpec::Linear { in_features: i, out_features: o, bias, weight_layout }) => {
                let shape = if *weight_layout == WeightLayout::InOut { [*i, *o] } else { [*o, *i] };
                put(key("weight"), &shape, &mut rng, &|z| z / (*i as f64).sqrt());
                if *bias {
                    put(key("bias"), &[*o], &mut rng, &|z| 0.1 * z);
                }
            }
            OpSpec::Module(LayerSpec::Embedding { num_embeddings, embedding_dim, .. }) => {
                put(key("weight"), &[*num_embeddings, *embedding_dim], &mut rng, &|z| z);
            }
            OpSpec::Module(LayerSpec::Norm { kind, normalized_shape, elementwise_affine: true, bias, .. }) => {
                put(key("weight"), normalized_shape, &mut rng, &|z| 1.0 + 0.3 * z);
                if *kind == NormKind::LayerNorm && *bias {
                    put(key("bias"), normalized_shape, &mut rng, &|z| 0.2 * z);
                }
            }
            _ => {}
        }
    }
    w
}

fn build(json: &str, seed: u64) -> Model {
    let spec = ModelSpec::from_json(json).unwrap();
    let w = random_weights(&spec, seed);
    Model::new(spec, w, Some(DType::F64), &Device::Cpu).unwrap()
}

fn ints(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

/// An encoder block with padding: Embedding (padding_idx 0) + learned
/// positions, LayerNorm, a fused qkv Linear over the sequence, attention
/// written out with the additive mask, an output projection stored
/// `(in, out)` (HuggingFace Conv1D), tanh-GELU, residual, RMSNorm, then
/// fused attention with a boolean key mask, and the first token's features
/// into the classifier.
const ENCODER: &str = r#"{"format": "laplace-graph", "version": 1,
 "inputs": [{"name": "input_ids", "shape": [5], "dtype": "int"}, {"name": "attention_mask", "shape": [5], "dtype": "int"}],
 "parameters": ["tok.weight", "pos.weight", "ln.weight", "ln.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rms.weight", "cls.weight", "cls.bias"],
 "nodes": [
  {"name": "tok", "op": "Embedding", "inputs": ["input_ids"], "module": "tok", "attrs": {"num_embeddings": 7, "embedding_dim": 4, "padding_idx": 0}},
  {"name": "pos_ids", "op": "constant", "inputs": ["input_ids"], "attrs": {"shape": [5], "data": [0, 1, 2, 3, 4]}},
  {"name": "pos", "op": "Embedding", "inputs": ["pos_ids"], "module": "pos", "attrs": {"num_embeddings": 5, "embedding_dim": 4}},
  {"name": "h0", "op": "add", "inputs": ["tok", "pos"]},
  {"name": "ln", "op": "LayerNorm", "inputs": ["h0"], "module": "ln", "attrs": {"normalized_shape": [4], "eps": 1e-5}},
  {"name": "qkv", "op": "Linear", "inputs": ["ln"], "module": "qkv", "attrs": {"in_features": 4, "out_features": 12}},
  {"name": "q", "op": "slice", "inputs": ["qkv"], "attrs": {"dim": 2, "start": 0, "end": 4, "step": 1}},
  {"name": "k", "op": "slice", "inputs": ["qkv"], "attrs": {"dim": 2, "start": 4, "end": 8, "step": 1}},
  {"name": "v", "op": "slice", "inputs": ["qkv"], "attrs": {"dim": 2, "start": 8, "end": 12, "step": 1}},
  {"name": "qh", "op": "reshape", "inputs": ["q"], "attrs": {"shape": [5, 2, 2]}},
  {"name": "kh", "op": "reshape", "inputs": ["k"], "attrs": {"shape": [5, 2, 2]}},
  {"name": "vh", "op": "reshape", "inputs": ["v"], "attrs": {"shape": [5, 2, 2]}},
  {"name": "qp", "op": "permute", "inputs": ["qh"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "kt", "op": "permute", "inputs": ["kh"], "attrs": {"dims": [0, 2, 3, 1]}},
  {"name": "vp", "op": "permute", "inputs": ["vh"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "sc", "op": "matmul", "inputs": ["qp", "kt"]},
  {"name": "scs", "op": "mul", "inputs": ["sc"], "attrs": {"scalar": 0.7071067811865476}},
  {"name": "mf", "op": "to", "inputs": ["attention_mask"], "attrs": {"dtype": "float"}},
  {"name": "inv", "op": "sub", "inputs": ["mf"], "attrs": {"scalar": 1.0, "reverse": true}},
  {"name": "addm", "op": "mul", "inputs": ["inv"], "attrs": {"scalar": -1.7976931348623157e308}},
  {"name": "am", "op": "reshape", "inputs": ["addm"], "attrs": {"shape": [1, 1, 5]}},
  {"name": "sc2", "op": "add", "inputs": ["scs", "am"]},
  {"name": "pr", "op": "softmax", "inputs": ["sc2"], "attrs": {"dim": -1}},
  {"name": "ctx", "op": "matmul", "inputs": ["pr", "vp"]},
  {"name": "ctxp", "op": "permute", "inputs": ["ctx"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "ctxr", "op": "reshape", "inputs": ["ctxp"], "attrs": {"shape": [5, 4]}},
  {"name": "proj", "op": "Linear", "inputs": ["ctxr"], "module": "proj", "attrs": {"in_features": 4, "out_features": 4, "weight_layout": "in_out"}},
  {"name": "g", "op": "GELU", "inputs": ["proj"], "attrs": {"approximate": "tanh"}},
  {"name": "res", "op": "add", "inputs": ["g", "ln"]},
  {"name": "rms", "op": "RMSNorm", "inputs": ["res"], "module": "rms", "attrs": {"normalized_shape": [4], "eps": null}},
  {"name": "bm", "op": "reshape", "inputs": ["attention_mask"], "attrs": {"shape": [1, 1, 5]}},
  {"name": "rh", "op": "reshape", "inputs": ["rms"], "attrs": {"shape": [5, 2, 2]}},
  {"name": "rp", "op": "permute", "inputs": ["rh"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "att", "op": "scaled_dot_product_attention", "inputs": ["rp", "rp", "rp", "bm"], "attrs": {"mask": "bool"}},
  {"name": "atp", "op": "permute", "inputs": ["att"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "atr", "op": "reshape", "inputs": ["atp"], "attrs": {"shape": [5, 4]}},
  {"name": "first", "op": "select", "inputs": ["atr"], "attrs": {"dim": 1, "index": 0}},
  {"name": "cls", "op": "Linear", "inputs": ["first"], "module": "cls", "attrs": {"in_features": 4, "out_features": 3}}],
 "output": "cls"}"#;

/// A causal decoder with GPT-2's pooling: Embedding, RMSNorm, q/k/v
/// Linears, causal fused attention, gelu_new written out with `pow`,
/// pointwise math, cumsum, a score head over every position and the last
/// non-padded token picked with ne / to / argmax / index.
const DECODER: &str = r#"{"format": "laplace-graph", "version": 1,
 "inputs": [{"name": "input_ids", "shape": [5], "dtype": "int"}],
 "parameters": ["tok.weight", "norm.weight", "wq.weight", "wk.weight", "wk.bias", "wv.weight", "score.weight"],
 "nodes": [
  {"name": "tok", "op": "Embedding", "inputs": ["input_ids"], "module": "tok", "attrs": {"num_embeddings": 7, "embedding_dim": 4}},
  {"name": "norm", "op": "RMSNorm", "inputs": ["tok"], "module": "norm", "attrs": {"normalized_shape": [4], "eps": 1e-6}},
  {"name": "wq", "op": "Linear", "inputs": ["norm"], "module": "wq", "attrs": {"in_features": 4, "out_features": 4, "bias": false}},
  {"name": "wk", "op": "Linear", "inputs": ["norm"], "module": "wk", "attrs": {"in_features": 4, "out_features": 4}},
  {"name": "wv", "op": "Linear", "inputs": ["norm"], "module": "wv", "attrs": {"in_features": 4, "out_features": 4, "bias": false}},
  {"name": "qh", "op": "reshape", "inputs": ["wq"], "attrs": {"shape": [5, 2, 2]}},
  {"name": "kh", "op": "reshape", "inputs": ["wk"], "attrs": {"shape": [5, 2, 2]}},
  {"name": "vh", "op": "reshape", "inputs": ["wv"], "attrs": {"shape": [5, 2, 2]}},
  {"name": "qp", "op": "permute", "inputs": ["qh"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "kp", "op": "permute", "inputs": ["kh"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "vp", "op": "permute", "inputs": ["vh"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "att", "op": "scaled_dot_product_attention", "inputs": ["qp", "kp", "vp"], "attrs": {"is_causal": true, "scale": 0.9}},
  {"name": "ap", "op": "permute", "inputs": ["att"], "attrs": {"dims": [0, 2, 1, 3]}},
  {"name": "x", "op": "reshape", "inputs": ["ap"], "attrs": {"shape": [5, 4]}},
  {"name": "x3", "op": "pow", "inputs": ["x"], "attrs": {"exponent": 3.0}},
  {"name": "c1", "op": "mul", "inputs": ["x3"], "attrs": {"scalar": 0.044715}},
  {"name": "c2", "op": "add", "inputs": ["x", "c1"]},
  {"name": "c3", "op": "mul", "inputs": ["c2"], "attrs": {"scalar": 0.7978845608028654}},
  {"name": "t", "op": "Tanh", "inputs": ["c3"]},
  {"name": "t1", "op": "add", "inputs": ["t"], "attrs": {"scalar": 1.0}},
  {"name": "t2", "op": "mul", "inputs": ["x", "t1"]},
  {"name": "gel", "op": "mul", "inputs": ["t2"], "attrs": {"scalar": 0.5}},
  {"name": "e", "op": "exp", "inputs": ["gel"]},
  {"name": "e1", "op": "add", "inputs": ["e"], "attrs": {"scalar": 1.0}},
  {"name": "sp", "op": "log", "inputs": ["e1"]},
  {"name": "sq", "op": "sqrt", "inputs": ["e1"]},
  {"name": "sq2", "op": "pow", "inputs": ["sq"], "attrs": {"exponent": 2.0}},
  {"name": "r", "op": "rsqrt", "inputs": ["sq2"]},
  {"name": "a", "op": "add", "inputs": ["sp", "r"]},
  {"name": "cs", "op": "cumsum", "inputs": ["a"], "attrs": {"dim": 1}},
  {"name": "score", "op": "Linear", "inputs": ["cs"], "module": "score", "attrs": {"in_features": 4, "out_features": 3, "bias": false}},
  {"name": "nonpad", "op": "ne", "inputs": ["input_ids"], "attrs": {"scalar": 0}},
  {"name": "npi", "op": "to", "inputs": ["nonpad"], "attrs": {"dtype": "int"}},
  {"name": "ar", "op": "constant", "inputs": ["input_ids"], "attrs": {"shape": [5], "data": [0, 1, 2, 3, 4]}},
  {"name": "prod", "op": "mul", "inputs": ["ar", "npi"]},
  {"name": "last", "op": "argmax", "inputs": ["prod"], "attrs": {"dim": -1}},
  {"name": "pooled", "op": "index", "inputs": ["score", "last"], "attrs": {"dim": 1}}],
 "output": "pooled"}"#;

/// where / masked_fill / logical ops / expand / repeat / gather / log_softmax,
/// attention with an additive mask and causal at once, abs,
/// and a product of values of different per-sample ranks ((3, 4) · (4,)).
const MISC: &str = r#"{"format": "laplace-graph", "version": 1,
 "inputs": [{"name": "x", "shape": [3, 4], "dtype": "float"}],
 "parameters": ["fc.weight", "fc.bias", "out.weight", "out.bias"],
 "nodes": [
  {"name": "fc", "op": "Linear", "inputs": ["x"], "module": "fc", "attrs": {"in_features": 4, "out_features": 4}},
  {"name": "sm", "op": "log_softmax", "inputs": ["fc"], "attrs": {"dim": -1}},
  {"name": "pos", "op": "gt", "inputs": ["x"], "attrs": {"scalar": 0.0}},
  {"name": "neg", "op": "logical_not", "inputs": ["pos"]},
  {"name": "none", "op": "logical_and", "inputs": ["pos", "neg"]},
  {"name": "any", "op": "logical_or", "inputs": ["pos", "none"]},
  {"name": "rv", "op": "mean", "inputs": ["fc"], "attrs": {"dim": [1], "keepdim": false}},
  {"name": "fcb", "op": "mul", "inputs": ["fc", "rv"]},
  {"name": "w", "op": "where", "inputs": ["any", "sm", "fcb"]},
  {"name": "w2", "op": "where", "inputs": ["neg", "w"], "attrs": {"b": 0.5}},
  {"name": "col", "op": "slice", "inputs": ["x"], "attrs": {"dim": 2, "start": 0, "end": 1, "step": 1}},
  {"name": "cm", "op": "lt", "inputs": ["col"], "attrs": {"scalar": 0.3}},
  {"name": "mfl", "op": "masked_fill", "inputs": ["w2", "cm"], "attrs": {"value": -2.0}},
  {"name": "r3", "op": "reshape", "inputs": ["mfl"], "attrs": {"shape": [3, 1, 4]}},
  {"name": "ex", "op": "expand", "inputs": ["r3"], "attrs": {"shape": [-1, 2, -1]}},
  {"name": "exf", "op": "reshape", "inputs": ["ex"], "attrs": {"shape": [24]}},
  {"name": "rp", "op": "repeat", "inputs": ["mfl"], "attrs": {"repeats": [2, 1]}},
  {"name": "rpf", "op": "reshape", "inputs": ["rp"], "attrs": {"shape": [24]}},
  {"name": "gi", "op": "constant", "inputs": ["x"], "attrs": {"shape": [3, 2], "data": [3, 0, 1, 1, 2, 3]}},
  {"name": "ga", "op": "gather", "inputs": ["mfl", "gi"], "attrs": {"dim": 2}},
  {"name": "gaf", "op": "reshape", "inputs": ["ga"], "attrs": {"shape": [6]}},
  {"name": "am", "op": "constant", "inputs": ["x"], "attrs": {"shape": [3, 3], "data": [0, 0.5, -1e30, 0.2, 0, -0.3, -1e30, 0.1, 0]}},
  {"name": "sa", "op": "scaled_dot_product_attention", "inputs": ["fc", "sm", "mfl", "am"], "attrs": {"mask": "additive", "is_causal": true}},
  {"name": "ab", "op": "abs", "inputs": ["sa"]},
  {"name": "abf", "op": "reshape", "inputs": ["ab"], "attrs": {"shape": [12]}},
  {"name": "all", "op": "cat", "inputs": ["exf", "rpf", "gaf", "abf"], "attrs": {"dim": 1}},
  {"name": "out", "op": "Linear", "inputs": ["all"], "module": "out", "attrs": {"in_features": 66, "out_features": 3}}],
 "output": "out"}"#;

fn labels() -> Tensor {
    Tensor::from_vec(vec![0i64, 2, 1], 3, &Device::Cpu).unwrap()
}

/// Three sequences; the first two end in padding (id 0, mask 0).
fn encoder_batch(pad_token: i64) -> Batch {
    let ids = ints(&[3, 1, 4, pad_token, pad_token, 2, 6, 5, 1, pad_token, 1, 2, 3, 4, 5], &[3, 5]);
    let mask = ints(&[1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1], &[3, 5]);
    let x = Inputs::named(vec![("input_ids".into(), ids), ("attention_mask".into(), mask)]).unwrap().to_dtype(DType::F64).unwrap();
    Batch::new(x, labels())
}

fn decoder_batch() -> Batch {
    let ids = ints(&[3, 1, 4, 0, 0, 2, 6, 5, 1, 0, 1, 2, 3, 4, 5], &[3, 5]);
    let x = Inputs::named(vec![("input_ids".into(), ids)]).unwrap().to_dtype(DType::F64).unwrap();
    Batch::new(x, labels())
}

fn misc_batch() -> Batch {
    let mut rng = Rng::new(3);
    let x = tensor::from_f64((0..36).map(|_| rng.normal()).collect(), &[3, 3, 4], DType::F64, &Device::Cpu).unwrap();
    Batch::new(x, labels())
}

fn cases() -> Vec<(&'static str, Model, Batch)> {
    vec![
        ("encoder", build(ENCODER, 7), encoder_batch(0)),
        ("decoder", build(DECODER, 8), decoder_batch()),
        ("misc", build(MISC, 9), misc_batch()),
    ]
}

fn shifted(model: &Model, v: &[f64], h: f64) -> Model {
    let theta = tensor::to_vec_f64(&model.parameter_vector().unwrap()).unwrap();
    let t: Vec<f64> = theta.iter().zip(v).map(|(a, b)| a + h * b).collect();
    let n = t.len();
    model.with_parameter_vector(&tensor::from_f64(t, &[n], DType::F64, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn transformer_op_jacobians_match_finite_differences() {
    for (name, model, b) in cases() {
        let c = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
        let (j, _) = c.jacobians(&b.x).unwrap();
        let (m, cc, p) = j.dims3().unwrap();
        let h = 1e-6;
        let mut fd = vec![0.0; m * cc * p];
        for q in 0..p {
            let mut e = vec![0.0; p];
            e[q] = 1.0;
            let fp = tensor::to_vec_f64(&shifted(&model, &e, h).forward(&b.x).unwrap()).unwrap();
            let fm = tensor::to_vec_f64(&shifted(&model, &e, -h).forward(&b.x).unwrap()).unwrap();
            for r in 0..m * cc {
                fd[r * p + q] = (fp[r] - fm[r]) / (2.0 * h);
            }
        }
        let fd = tensor::from_f64(fd, &[m, cc, p], DType::F64, &Device::Cpu).unwrap();
        assert_close(&j, &fd, 1e-6, &format!("{name}: Jacobians vs finite differences"));
    }
}

#[test]
fn transformer_op_hessian_products_match_finite_differences() {
    for (name, model, b) in cases() {
        let p = model.n_params();
        let hc = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Hessian, &Subset::All).unwrap();
        let mut rng = Rng::new(5);
        let v = tensor::from_f64((0..2 * p).map(|_| rng.normal()).collect(), &[2, p], DType::F64, &Device::Cpu).unwrap();
        let (_, hv) = hc.matmat(&b, &v).unwrap();
        let grad = |m: &Model| -> Vec<f64> {
            let c = Curvature::new(m, Likelihood::Classification, CurvatureKind::Ef, &Subset::All).unwrap();
            let (g, _) = c.gradients(&b.x, &b.y).unwrap();
            tensor::to_vec_f64(&g.sum(0).unwrap()).unwrap()
        };
        let vs = tensor::to_vec_f64(&v).unwrap();
        let h = 1e-5;
        let mut fd = Vec::new();
        for k in 0..2 {
            let dir = &vs[k * p..(k + 1) * p];
            let (gp, gm) = (grad(&shifted(&model, dir, h)), grad(&shifted(&model, dir, -h)));
            fd.extend(gp.iter().zip(&gm).map(|(a, b)| (a - b) / (2.0 * h)));
        }
        let fd = tensor::from_f64(fd, &[2, p], DType::F64, &Device::Cpu).unwrap();
        assert_close(&hv, &fd, 1e-6, &format!("{name}: Hessian-vector products vs finite differences"));
    }
}

#[test]
fn transformer_op_diagonals_are_the_diagonals_of_the_full_matrices() {
    for (name, model, b) in cases() {
        let p = model.n_params() as i64;
        for kind in [CurvatureKind::Hessian, CurvatureKind::Ggn, CurvatureKind::Ef] {
            for subset in [Subset::All, Subset::Subnetwork(vec![p - 1, 3, 17, 2, p / 2, 30, 5])] {
                let c = Curvature::new(&model, Likelihood::Classification, kind, &subset).unwrap();
                let (_, h) = c.full(&b).unwrap();
                let (_, d) = c.diag(&b).unwrap();
                let n = d.dim(0).unwrap();
                let hd = tensor::to_vec_f64(&h).unwrap();
                let want = tensor::from_f64((0..n).map(|i| hd[i * n + i]).collect(), &[n], DType::F64, &Device::Cpu).unwrap();
                assert_close(&d, &want, 1e-10, &format!("{name} {kind:?} {subset:?}: diag vs full"));
            }
        }
    }
}

/// The encoder masks padded keys and reads the first token: a padded
/// token's id changes nothing, for every quantity.
#[test]
fn padded_tokens_change_no_quantity() {
    let model = build(ENCODER, 7);
    let (a, b) = (encoder_batch(0), encoder_batch(6));
    for kind in [CurvatureKind::Ggn, CurvatureKind::Ef, CurvatureKind::Hessian] {
        let c = Curvature::new(&model, Likelihood::Classification, kind, &Subset::All).unwrap();
        let (la, da) = c.diag(&a).unwrap();
        let (lb, db) = c.diag(&b).unwrap();
        assert_close(&da, &db, 1e-12, &format!("{kind:?} diag under a changed padded token"));
        assert_close(&la, &lb, 1e-12, "loss under a changed padded token");
    }
    let c = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
    let (ja, _) = c.jacobians(&a.x).unwrap();
    let (jb, _) = c.jacobians(&b.x).unwrap();
    assert_close(&ja, &jb, 1e-12, "Jacobians under a changed padded token");
    // The padded token's own embedding row gets nothing (it is padding_idx 0, or masked).
    let tok_row6: Vec<i64> = (6 * 4..7 * 4).collect();
    let sub = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::Subnetwork(tok_row6)).unwrap();
    let (_, d) = sub.diag(&encoder_batch(6)).unwrap();
    let (_, d0) = sub.diag(&a).unwrap();
    assert_close(&d, &d0, 1e-12, "row 6 of the token table: only real tokens count");
}

/// Integer inputs are checked by name, shape and value.
#[test]
fn integer_inputs_are_checked() {
    let model = build(ENCODER, 7);
    let c = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
    let b = encoder_batch(0);
    let only_ids = Inputs::named(vec![("input_ids".into(), b.x.get("input_ids").unwrap().clone())]).unwrap();
    let e = c.jacobians(&only_ids).unwrap_err().to_string();
    assert!(e.contains("attention_mask"), "{e}");
    let bad = ints(&[3, 1, 9, 0, 0, 2, 6, 5, 1, 0, 1, 2, 3, 4, 5], &[3, 5]);
    let x = Inputs::named(vec![("input_ids".into(), bad), ("attention_mask".into(), b.x.get("attention_mask").unwrap().to_dtype(DType::I64).unwrap())])
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let e = c.jacobians(&x).unwrap_err().to_string();
    assert!(e.contains("tok") && e.contains('9'), "{e}");
    let frac = b.x.map(|t| Ok((t + 0.5)?)).unwrap();
    let e = c.jacobians(&frac).unwrap_err().to_string();
    assert!(e.contains("integer"), "{e}");
}

/// Malformed transformer graphs are refused with the node and the reason.
#[test]
fn transformer_spec_errors_name_the_node() {
    let graph = |inputs: &str, nodes: &str, params: &str| {
        format!(
            r#"{{"format": "laplace-graph", "version": 1, "inputs": [{inputs}], "parameters": [{params}],
             "nodes": [{nodes}, {{"name": "out", "op": "Linear", "inputs": ["h"], "module": "out", "attrs": {{"in_features": 4, "out_features": 2}}}}],
             "output": "out"}}"#
        )
    };
    let x = r#"{"name": "x", "shape": [3, 4], "dtype": "float"}"#;
    let ids = r#"{"name": "ids", "shape": [3], "dtype": "int"}"#;
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            graph(x, r#"{"name": "ln", "op": "LayerNorm", "inputs": ["x"], "module": "ln", "attrs": {"normalized_shape": [5]}}, {"name": "h", "op": "select", "inputs": ["ln"], "attrs": {"dim": 1, "index": 0}}"#, r#""ln.weight", "ln.bias", "out.weight", "out.bias""#),
            vec!["node \"ln\"", "normalized_shape [5]"],
        ),
        (
            graph(x, r#"{"name": "a", "op": "scaled_dot_product_attention", "inputs": ["x", "x"]}, {"name": "h", "op": "select", "inputs": ["a"], "attrs": {"dim": 1, "index": 0}}"#, r#""out.weight", "out.bias""#),
            vec!["node \"a\"", "3 input"],
        ),
        (
            graph(x, r#"{"name": "t", "op": "reshape", "inputs": ["x"], "attrs": {"shape": [4, 3]}}, {"name": "m", "op": "matmul", "inputs": ["x", "x"]}, {"name": "h", "op": "select", "inputs": ["m"], "attrs": {"dim": 1, "index": 0}}"#, r#""out.weight", "out.bias""#),
            vec!["node \"m\"", "inner sizes"],
        ),
        (
            graph(ids, r#"{"name": "e", "op": "Embedding", "inputs": ["ids"], "module": "e", "attrs": {"num_embeddings": 5, "embedding_dim": 4, "padding_idx": 7}}, {"name": "h", "op": "select", "inputs": ["e"], "attrs": {"dim": 1, "index": 0}}"#, r#""e.weight", "out.weight", "out.bias""#),
            vec!["node \"e\"", "padding_idx"],
        ),
        (
            graph(x, r#"{"name": "c", "op": "constant", "inputs": ["x"], "attrs": {"shape": [2, 2], "data": [1, 2, 3]}}, {"name": "h", "op": "select", "inputs": ["x"], "attrs": {"dim": 1, "index": 0}}"#, r#""out.weight", "out.bias""#),
            vec!["node \"c\"", "3 numbers"],
        ),
        (
            graph(x, r#"{"name": "w", "op": "where", "inputs": ["x"], "attrs": {"a": 1.0}}, {"name": "h", "op": "select", "inputs": ["w"], "attrs": {"dim": 1, "index": 0}}"#, r#""out.weight", "out.bias""#),
            vec!["node \"w\"", "2 input"],
        ),
    ];
    for (json, want) in cases {
        let err = match ModelSpec::from_json(&json) {
            Err(e) => e.to_string(),
            Ok(spec) => match Model::new(spec.clone(), random_weights(&spec, 1), Some(DType::F64), &Device::Cpu) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("accepted: {json}"),
            },
        };
        for w in want {
            assert!(err.contains(w), "{err:?} should mention {w:?}");
        }
    }
}
