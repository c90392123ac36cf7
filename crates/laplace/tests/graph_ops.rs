//! Every graph op's derivatives against central finite differences, on
//! small graphs where values fan out to several nodes.
//!
//! Parameters sit before the ops under test, so the Jacobians with respect
//! to θ pull sensitivities back through every op (first order), and the
//! Hessian-vector products exercise their second-order terms (products and
//! quotients of two values, s / x, Hardswish, Tanh). The exact Hessian
//! diagonal (signed rows, or unit-vector products where a product of two
//! values couples them) and the GGN / EF diagonals are checked against the
//! diagonals of the full matrices.

mod common;

use std::collections::HashMap;

use common::assert_close;
use laplace::rng::Rng;
use laplace::spec::{LayerSpec, ModelSpec, OpSpec};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Likelihood, Sequential, Subset};

/// Random weights for every tensor a spec's module nodes read.
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
            OpSpec::Module(LayerSpec::Linear { in_features, out_features, bias, .. }) => {
                put(key("weight"), &[*out_features, *in_features], &mut rng, &|z| z / (*in_features as f64).sqrt());
                if *bias {
                    put(key("bias"), &[*out_features], &mut rng, &|z| 0.1 * z);
                }
            }
            OpSpec::Module(LayerSpec::Conv2d { in_channels, out_channels, kernel_size, groups, bias, .. }) => {
                let fan = in_channels / groups * kernel_size[0] * kernel_size[1];
                put(key("weight"), &[*out_channels, in_channels / groups, kernel_size[0], kernel_size[1]], &mut rng, &|z| {
                    z / (fan as f64).sqrt()
                });
                if *bias {
                    put(key("bias"), &[*out_channels], &mut rng, &|z| 0.1 * z);
                }
            }
            OpSpec::Module(LayerSpec::BatchNorm { num_features: c, affine, .. }) => {
                if *affine {
                    put(key("weight"), &[*c], &mut rng, &|z| 1.0 + 0.2 * z);
                    put(key("bias"), &[*c], &mut rng, &|z| 0.1 * z);
                }
                put(key("running_mean"), &[*c], &mut rng, &|z| 0.3 * z);
                put(key("running_var"), &[*c], &mut rng, &|z| 0.5 + z * z);
            }
            _ => {}
        }
    }
    w
}

fn build(json: &str, seed: u64) -> Sequential {
    let spec = ModelSpec::from_json(json).unwrap();
    let w = random_weights(&spec, seed);
    Sequential::new(spec, w, Some(DType::F64), &Device::Cpu).unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    tensor::from_f64((0..n).map(|_| rng.normal()).collect(), shape, DType::F64, &Device::Cpu).unwrap()
}

/// Elementwise ops and arithmetic between values: the output of `fc1` fans
/// out to four nodes.
const ELEMENTWISE: &str = r#"{"format": "laplace-graph", "version": 1,
 "inputs": [{"name": "x", "shape": [4], "dtype": "float"}],
 "parameters": ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
 "nodes": [
  {"name": "fc1", "op": "Linear", "inputs": ["x"], "module": "fc1", "attrs": {"in_features": 4, "out_features": 6}},
  {"name": "a", "op": "Tanh", "inputs": ["fc1"]},
  {"name": "b", "op": "Hardswish", "inputs": ["fc1"]},
  {"name": "ab", "op": "mul", "inputs": ["a", "b"]},
  {"name": "sig", "op": "Sigmoid", "inputs": ["fc1"]},
  {"name": "pos", "op": "add", "inputs": ["sig"], "attrs": {"scalar": 0.5}},
  {"name": "q", "op": "div", "inputs": ["ab", "pos"]},
  {"name": "inv", "op": "div", "inputs": ["pos"], "attrs": {"scalar": 2.0, "reverse": true}},
  {"name": "s", "op": "sub", "inputs": ["q", "inv"]},
  {"name": "r", "op": "sub", "inputs": ["s"], "attrs": {"scalar": 1.0, "reverse": true}},
  {"name": "t", "op": "mul", "inputs": ["r"], "attrs": {"scalar": 0.7}},
  {"name": "u", "op": "add", "inputs": ["t", "fc1"]},
  {"name": "n", "op": "neg", "inputs": ["u"]},
  {"name": "h6", "op": "ReLU6", "inputs": ["n"]},
  {"name": "hs", "op": "Hardsigmoid", "inputs": ["u"]},
  {"name": "m", "op": "add", "inputs": ["h6", "hs"]},
  {"name": "fc2", "op": "Linear", "inputs": ["m"], "module": "fc2", "attrs": {"in_features": 6, "out_features": 3}}],
 "output": "fc2"}"#;

/// Shapes: grouped and depthwise convolutions, BatchNorm2d / 1d, permute,
/// strided slice, mean, sum, select, adaptive pooling with uneven windows,
/// concat and reshape; `t` fans out to three branches.
const SHAPES: &str = r#"{"format": "laplace-graph", "version": 1,
 "inputs": [{"name": "x", "shape": [2, 6, 5], "dtype": "float"}],
 "parameters": ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "dw.weight", "bn1d.weight", "bn1d.bias", "fc.weight", "fc.bias"],
 "nodes": [
  {"name": "conv", "op": "Conv2d", "inputs": ["x"], "module": "conv",
   "attrs": {"in_channels": 2, "out_channels": 4, "kernel_size": 3, "padding": 1, "groups": 2}},
  {"name": "bn", "op": "BatchNorm2d", "inputs": ["conv"], "module": "bn", "attrs": {"num_features": 4}},
  {"name": "dw", "op": "Conv2d", "inputs": ["bn"], "module": "dw",
   "attrs": {"in_channels": 4, "out_channels": 8, "kernel_size": [3, 2], "padding": [1, 0], "groups": 4, "bias": false}},
  {"name": "t", "op": "Tanh", "inputs": ["dw"]},
  {"name": "p", "op": "permute", "inputs": ["t"], "attrs": {"dims": [0, 1, 3, 2]}},
  {"name": "sl", "op": "slice", "inputs": ["p"], "attrs": {"dim": 3, "start": 1, "end": 6, "step": 2}},
  {"name": "m1", "op": "mean", "inputs": ["sl"], "attrs": {"dim": [-1], "keepdim": false}},
  {"name": "r1", "op": "reshape", "inputs": ["m1"], "attrs": {"shape": [32]}},
  {"name": "g", "op": "AdaptiveAvgPool2d", "inputs": ["t"], "attrs": {"output_size": [4, 3]}},
  {"name": "sel", "op": "select", "inputs": ["g"], "attrs": {"dim": 2, "index": -1}},
  {"name": "r2", "op": "reshape", "inputs": ["sel"], "attrs": {"shape": [24]}},
  {"name": "sm", "op": "sum", "inputs": ["t"], "attrs": {"dim": [2, 3], "keepdim": false}},
  {"name": "q", "op": "cat", "inputs": ["r1", "r2", "sm"], "attrs": {"dim": 1}},
  {"name": "bn1d", "op": "BatchNorm1d", "inputs": ["q"], "module": "bn1d", "attrs": {"num_features": 64}},
  {"name": "fc", "op": "Linear", "inputs": ["bn1d"], "module": "fc", "attrs": {"in_features": 64, "out_features": 3}}],
 "output": "fc"}"#;

/// Two nonlinear branches from one value meeting again: the Hessian
/// diagonal's rows born in either branch are distinct rows where they meet.
const BRANCHES: &str = r#"{"format": "laplace-graph", "version": 1,
 "inputs": [{"name": "x", "shape": [3], "dtype": "float"}],
 "parameters": ["fc1.weight", "fc1.bias", "fa.weight", "fb.weight", "fb.bias", "out.weight", "out.bias"],
 "nodes": [
  {"name": "fc1", "op": "Linear", "inputs": ["x"], "module": "fc1", "attrs": {"in_features": 3, "out_features": 5}},
  {"name": "a", "op": "Tanh", "inputs": ["fc1"]},
  {"name": "fa", "op": "Linear", "inputs": ["a"], "module": "fa", "attrs": {"in_features": 5, "out_features": 4, "bias": false}},
  {"name": "b", "op": "Softplus", "inputs": ["fc1"]},
  {"name": "fb", "op": "Linear", "inputs": ["b"], "module": "fb", "attrs": {"in_features": 5, "out_features": 4}},
  {"name": "j", "op": "add", "inputs": ["fa", "fb"]},
  {"name": "e", "op": "ELU", "inputs": ["j"]},
  {"name": "k", "op": "add", "inputs": ["e", "fb"]},
  {"name": "out", "op": "Linear", "inputs": ["k"], "module": "out", "attrs": {"in_features": 4, "out_features": 3}}],
 "output": "out"}"#;

const CASES: [(&str, &str, &[usize]); 3] =
    [("elementwise", ELEMENTWISE, &[4]), ("shapes", SHAPES, &[2, 6, 5]), ("branches", BRANCHES, &[3])];

fn batch(input: &[usize], seed: u64) -> Batch {
    let m = 3;
    let mut shape = vec![m];
    shape.extend_from_slice(input);
    let y = Tensor::from_vec(vec![0i64, 2, 1], m, &Device::Cpu).unwrap();
    Batch::new(randn(&shape, seed), y)
}

/// θ + h·v as a model.
fn shifted(model: &Sequential, v: &[f64], h: f64) -> Sequential {
    let theta = tensor::to_vec_f64(&model.parameter_vector().unwrap()).unwrap();
    let t: Vec<f64> = theta.iter().zip(v).map(|(a, b)| a + h * b).collect();
    let n = t.len();
    model.with_parameter_vector(&tensor::from_f64(t, &[n], DType::F64, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn graph_op_jacobians_match_finite_differences() {
    for (name, json, input) in CASES {
        let model = build(json, 7);
        let b = batch(input, 11);
        let c = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
        let (j, _) = c.jacobians(&b.x).unwrap(); // (M, C, P)
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
fn graph_op_hessian_products_match_finite_differences() {
    for (name, json, input) in CASES {
        let model = build(json, 7);
        let b = batch(input, 11);
        let p = model.n_params();
        let hc = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Hessian, &Subset::All).unwrap();
        let v = randn(&[2, p], 5);
        let (_, hv) = hc.matmat(&b, &v).unwrap();
        // (∇L(θ + h v) − ∇L(θ − h v)) / 2h, ∇L = Σ_n G_n.
        let grad = |m: &Sequential| -> Vec<f64> {
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
fn graph_op_diagonals_are_the_diagonals_of_the_full_matrices() {
    for (name, json, input) in CASES {
        let model = build(json, 7);
        let b = batch(input, 11);
        for kind in [CurvatureKind::Hessian, CurvatureKind::Ggn, CurvatureKind::Ef] {
            for subset in [Subset::All, Subset::Subnetwork(vec![40, 3, 17, 2, 50, 30, 5])] {
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

/// A parameterized node whose output the model never uses: its
/// coordinates get zero curvature, and the rest equals the chain without it.
#[test]
fn a_dead_branch_contributes_zeros() {
    let dead = r#"{"format": "laplace-graph", "version": 1,
     "inputs": [{"name": "x", "shape": [4], "dtype": "float"}],
     "parameters": ["0.weight", "0.bias", "aux.weight", "2.weight", "2.bias"],
     "nodes": [
      {"name": "0", "op": "Linear", "inputs": ["x"], "module": "0", "attrs": {"in_features": 4, "out_features": 5}},
      {"name": "1", "op": "Tanh", "inputs": ["0"]},
      {"name": "aux", "op": "Linear", "inputs": ["1"], "module": "aux", "attrs": {"in_features": 5, "out_features": 2, "bias": false}},
      {"name": "2", "op": "Linear", "inputs": ["1"], "module": "2", "attrs": {"in_features": 5, "out_features": 3}}],
     "output": "2"}"#;
    let chain = r#"{"input_shape": [4], "layers": [{"type": "Linear", "in_features": 4, "out_features": 5},
        {"type": "Tanh"}, {"type": "Linear", "in_features": 5, "out_features": 3}]}"#;
    let g = build(dead, 3);
    let mut w: HashMap<String, Tensor> = g.state_dict().into_iter().collect();
    w.remove("aux.weight");
    let c = Sequential::new(ModelSpec::from_json(chain).unwrap(), w, Some(DType::F64), &Device::Cpu).unwrap();
    let b = batch(&[4], 2);
    // θ of the graph: 25 (layer 0), 10 (aux, dead), 18 (layer 2).
    let live: Vec<usize> = (0..25).chain(35..53).collect();
    let take = |t: &Tensor, dim: usize| tensor::select(t, &tensor::index_tensor(&live, &Device::Cpu).unwrap(), dim).unwrap();
    let dead_part = |t: &Tensor, dim: usize| t.narrow(dim, 25, 10).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    for kind in [CurvatureKind::Ggn, CurvatureKind::Ef, CurvatureKind::Hessian] {
        let cg = Curvature::new(&g, Likelihood::Classification, kind, &Subset::All).unwrap();
        let cc = Curvature::new(&c, Likelihood::Classification, kind, &Subset::All).unwrap();
        let (_, dg) = cg.diag(&b).unwrap();
        let (_, dc) = cc.diag(&b).unwrap();
        assert_close(&take(&dg, 0), &dc, 1e-12, &format!("{kind:?} diag, live part"));
        assert_eq!(dead_part(&dg, 0).to_scalar::<f64>().unwrap(), 0.0);
        let (_, hg) = cg.full(&b).unwrap();
        let (_, hc) = cc.full(&b).unwrap();
        assert_close(&take(&take(&hg, 0), 1), &hc, 1e-12, &format!("{kind:?} full, live part"));
        assert_eq!(dead_part(&hg, 0).to_scalar::<f64>().unwrap(), 0.0);
    }
    let cg = Curvature::new(&g, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
    let (_, k) = cg.kron(&b, 3, laplace::curvature::KfacApprox::Expand).unwrap();
    assert_eq!(k.blocks.len(), 5);
    let dead_block = tensor::to_vec_f64(&k.blocks[2][0]).unwrap();
    assert!(dead_block.len() == 10 && dead_block.iter().all(|&v| v == 0.0));
    let (j, _) = cg.jacobians(&b.x).unwrap();
    assert_eq!(dead_part(&j, 2).to_scalar::<f64>().unwrap(), 0.0);
    // Only the dead tensor selected: every product is zero.
    let only = Curvature::new(&g, Likelihood::Classification, CurvatureKind::Hessian, &Subset::Subnetwork((25..35).collect())).unwrap();
    let (_, h) = only.full(&b).unwrap();
    assert_eq!(h.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap(), 0.0);
}
