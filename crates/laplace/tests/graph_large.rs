//! torchvision's resnet18 and mobilenet_v3_small (3 classes, 3×32×32, two
//! points) exported with `tools/laplace_export.py`, against laplace-torch
//! (`tools/reference/make_large_graph_fixtures.py`). Their weights are too
//! large to commit, so both sides build them from the same formula
//! ("synthetic-sin-v2", `tools/reference/synthetic.py`): every state-dict
//! tensor `name` with k = (Σ bytes of name) mod 97 and s_i = sin(0.37 i + k)
//! holds 1 + ½s² (running_var), s/10 (running_mean), 0.1 + s/20 (bias:
//! the offset keeps the ReLUs after BatchNorm active), 1 + s/5 (a 1-D
//! weight) or √(3/fan_in)·s (other weights).
//! Dense whole-network results do not fit in a fixture: the whole diagonals
//! are compared as sums per parameter tensor, the rest on a subnetwork of
//! 100 coordinates spread over 40 tensors and on the last layer.

mod common;

use std::collections::HashMap;

use common::{assert_close, fixtures_dir};
use laplace::spec::{LayerSpec, ModelSpec, OpSpec};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Dataset, Likelihood, Sequential, Subset};

const TOL: f64 = 1e-8;

/// The synthetic-sin-v2 state dict of a spec.
fn synthetic_weights(spec: &ModelSpec) -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>| {
        let k = (name.bytes().map(|b| b as u64).sum::<u64>() % 97) as f64;
        let n: usize = shape.iter().product();
        let s = |i: usize| (0.37 * i as f64 + k).sin();
        let v: Vec<f64> = if name.ends_with(".running_var") {
            (0..n).map(|i| 1.0 + 0.5 * s(i).powi(2)).collect()
        } else if name.ends_with(".running_mean") {
            (0..n).map(|i| 0.1 * s(i)).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|i| 0.1 + 0.05 * s(i)).collect()
        } else if shape.len() == 1 {
            (0..n).map(|i| 1.0 + 0.2 * s(i)).collect()
        } else {
            let scale = (3.0 / (n / shape[0]) as f64).sqrt();
            (0..n).map(|i| scale * s(i)).collect()
        };
        w.insert(name, tensor::from_f64(v, &shape, DType::F64, &Device::Cpu).unwrap());
    };
    for node in &spec.nodes {
        let key = |role: &str| node.param_key(role).unwrap();
        match &node.op {
            OpSpec::Module(LayerSpec::Linear { in_features, out_features, bias, .. }) => {
                put(key("weight"), vec![*out_features, *in_features]);
                if *bias {
                    put(key("bias"), vec![*out_features]);
                }
            }
            OpSpec::Module(LayerSpec::Conv2d { in_channels, out_channels, kernel_size, groups, bias, .. }) => {
                put(key("weight"), vec![*out_channels, in_channels / groups, kernel_size[0], kernel_size[1]]);
                if *bias {
                    put(key("bias"), vec![*out_channels]);
                }
            }
            OpSpec::Module(LayerSpec::BatchNorm { num_features: c, affine, .. }) => {
                if *affine {
                    put(key("weight"), vec![*c]);
                    put(key("bias"), vec![*c]);
                }
                put(key("running_mean"), vec![*c]);
                put(key("running_var"), vec![*c]);
            }
            _ => {}
        }
    }
    w
}

struct Large {
    name: &'static str,
    model: Sequential,
    data: Dataset,
    expected: HashMap<String, Tensor>,
    subnetwork: Vec<i64>,
    block: Vec<i64>,
}

fn load(name: &'static str) -> Large {
    let dir = fixtures_dir().join("graph_large").join(name);
    let spec = ModelSpec::from_json(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    let weights = synthetic_weights(&spec);
    let model = Sequential::new(spec, weights, Some(DType::F64), &Device::Cpu).unwrap();
    let data = Dataset::load(&dir.join("data.npz"), DType::F64, &Device::Cpu).unwrap();
    let expected = laplace::io::read_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let subnetwork = laplace::io::read_indices(&dir.join("subnetwork.npy")).unwrap();
    let block = laplace::io::read_indices(&dir.join("last_layer_block.npy")).unwrap();
    Large { name, model, data, expected, subnetwork, block }
}

impl Large {
    fn expect(&self, key: &str) -> &Tensor {
        self.expected.get(key).unwrap_or_else(|| panic!("{}: no key {key:?}", self.name))
    }

    fn batch(&self) -> Batch {
        self.data.batch(0, self.data.len()).unwrap()
    }
}

/// Sums of a diagonal `(P,)` over each parameter tensor, in θ order.
fn per_tensor(model: &Sequential, d: &Tensor) -> Tensor {
    let v = tensor::to_vec_f64(d).unwrap();
    let sums: Vec<f64> = model.params().iter().map(|p| v[p.offset..p.offset + p.numel].iter().sum()).collect();
    let n = sums.len();
    tensor::from_f64(sums, &[n], DType::F64, &Device::Cpu).unwrap()
}

#[test]
fn torchvision_resnet18_and_mobilenet_v3_small_match_laplace_torch() {
    for name in ["resnet18", "mobilenet_v3_small"] {
        let fx = load(name);
        let lik = Likelihood::Classification;
        let f = fx.model.forward(&fx.data.x).unwrap();
        assert_close(&f, fx.expect("jacobians.f"), TOL, &format!("{name} f"));

        // Whole-network diagonals (never an (M, C, P) Jacobian), per tensor.
        for (kind, key) in [(CurvatureKind::Ggn, "ggn"), (CurvatureKind::Ef, "ef")] {
            let c = Curvature::new(&fx.model, lik, kind, &Subset::All).unwrap();
            let (loss, d) = c.diag(&fx.batch()).unwrap();
            assert_close(&loss, fx.expect("loss"), TOL, &format!("{name} loss"));
            assert_close(&per_tensor(&fx.model, &d), fx.expect(&format!("{key}.diag.per_tensor")), TOL, &format!("{name} {key}.diag per tensor"));
        }

        // A subnetwork over 40 tensors.
        let sub = Subset::Subnetwork(fx.subnetwork.clone());
        let c = Curvature::new(&fx.model, lik, CurvatureKind::Ggn, &sub).unwrap();
        let (j, _) = c.jacobians(&fx.data.x).unwrap();
        assert_close(&j, fx.expect("subnetwork.jacobians.J"), TOL, &format!("{name} subnetwork J"));
        let (g, _) = c.gradients(&fx.data.x, fx.data.y.as_ref().unwrap()).unwrap();
        assert_close(&g, fx.expect("subnetwork.gradients.G"), TOL, &format!("{name} subnetwork G"));
        for (kind, key) in [(CurvatureKind::Ggn, "ggn"), (CurvatureKind::Ef, "ef"), (CurvatureKind::Hessian, "hessian")] {
            let c = Curvature::new(&fx.model, lik, kind, &sub).unwrap();
            let (_, h) = c.full(&fx.batch()).unwrap();
            assert_close(&h, fx.expect(&format!("subnetwork.{key}.full")), TOL, &format!("{name} subnetwork {key} full"));
            if kind != CurvatureKind::Hessian {
                let (_, d) = c.diag(&fx.batch()).unwrap();
                assert_close(&d, fx.expect(&format!("subnetwork.{key}.diag")), TOL, &format!("{name} subnetwork {key} diag"));
            }
        }

        // The last layer: Jacobians, the GGN's diagonal, a principal block and FᵀF.
        let c = Curvature::new(&fx.model, lik, CurvatureKind::Ggn, &Subset::LastLayer).unwrap();
        let (j, _) = c.last_layer_jacobians(&fx.data.x).unwrap();
        assert_close(&j, fx.expect("last_layer_jacobians.J"), TOL, &format!("{name} last-layer J"));
        let (_, h) = c.full(&fx.batch()).unwrap();
        let fac = fx.expect("last_layer.ggn.factor");
        assert_close(&h, &fac.t().unwrap().matmul(fac).unwrap(), TOL, &format!("{name} last-layer GGN = FᵀF"));
        let ids = tensor::index_tensor(&fx.block.iter().map(|&i| i as usize).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let block = tensor::select(&tensor::select(&h, &ids, 0).unwrap(), &ids, 1).unwrap();
        assert_close(&block, fx.expect("last_layer.ggn.block"), TOL, &format!("{name} last-layer GGN block"));
        let (_, d) = c.diag(&fx.batch()).unwrap();
        assert_close(&d, fx.expect("last_layer.ggn.diag"), TOL, &format!("{name} last-layer GGN diag"));
    }
}
