//! Transformers against laplace-torch, in float64
//! (`tools/reference/make_transformer_fixtures.py`): an encoder with
//! `nn.MultiheadAttention` and a padding mask, a causal decoder with
//! `scaled_dot_product_attention` and RMSNorm, and HuggingFace
//! `BertForSequenceClassification` / `GPT2ForSequenceClassification`, all
//! with dict inputs (`input_ids`, `attention_mask`). Every quantity for all
//! weights, the last layer, a subnetwork by indices and (HuggingFace) by a
//! parameter-name glob, the exact Hessian, and KFAC (expand and reduce) at
//! 1e-8 relative. `hf_bert_lora` is Laplace-LoRA: peft LoRA adapters on BERT's
//! query / value with the base frozen (θ = the adapters and the head).

mod common;

use common::{assert_close, fixtures_dir, rel_err, Fixture};
use laplace::curvature::KfacApprox;
use laplace::kron::Kron;
use laplace::tensor::Tensor;
use laplace::{Batch, Curvature, CurvatureKind, Subset};

const TOL: f64 = 1e-8;
const CASES: [&str; 5] = ["transformer/encoder_mha", "transformer/decoder_sdpa", "transformer/hf_bert", "transformer/hf_gpt2", "transformer/hf_bert_lora"];

fn meta(name: &str, file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join(name).join(file)).unwrap()).unwrap()
}

/// The subsets a fixture has references for: (key prefix, subset).
fn subsets(fx: &Fixture) -> Vec<(&'static str, Subset)> {
    let mut v = vec![("", Subset::All), ("last_layer.", Subset::LastLayer)];
    v.push(("subnetwork.", Subset::Subnetwork(fx.subnetwork.clone().expect("a subnetwork"))));
    if let Some(glob) = meta(&fx.name, "meta.json")["params_glob"]["glob"].as_str() {
        v.push(("params_glob.", Subset::Subnetwork(fx.model.param_indices_matching(&[glob]).unwrap())));
    }
    v
}

fn whole(fx: &Fixture) -> Batch {
    fx.data.batch(0, fx.data.len()).unwrap()
}

#[test]
fn transformer_quantities_match_laplace_torch() {
    for name in CASES {
        let fx = Fixture::load(name);
        let b = whole(&fx);
        for (prefix, subset) in subsets(&fx) {
            let what = |k: &str| format!("{name} {prefix}{k}");
            let ggn = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &subset).unwrap();
            let (jkey, fkey) = if prefix == "last_layer." {
                ("last_layer_jacobians.J".to_string(), "last_layer_jacobians.f")
            } else {
                (format!("{prefix}jacobians.J"), "jacobians.f")
            };
            let (j, f) = ggn.jacobians(&b.x).unwrap();
            assert_close(&j, fx.expect(&jkey), TOL, &what("jacobians.J"));
            assert_close(&f, fx.expect(fkey), TOL, &what("jacobians.f"));
            let ef = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ef, &subset).unwrap();
            if prefix != "last_layer." {
                let (g, loss) = ef.gradients(&b.x, &b.y).unwrap();
                assert_close(&g, fx.expect(&format!("{prefix}gradients.G")), TOL, &what("gradients.G"));
                assert_close(&loss, fx.expect("gradients.loss"), TOL, &what("gradients.loss"));
            }
            for (kind, c) in [("ggn", &ggn), ("ef", &ef)] {
                let (loss, h) = c.full(&b).unwrap();
                assert_close(&h, fx.expect(&format!("{prefix}{kind}.full")), TOL, &what(&format!("{kind}.full")));
                assert_close(&loss, fx.expect("loss"), TOL, &what("loss"));
                let (_, d) = c.diag(&b).unwrap();
                assert_close(&d, fx.expect(&format!("{prefix}{kind}.diag")), TOL, &what(&format!("{kind}.diag")));
            }
            let hess = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &subset).unwrap();
            let (_, h) = hess.full(&b).unwrap();
            assert_close(&h, fx.expect(&format!("{prefix}hessian.full")), TOL, &what("hessian.full"));
            if prefix.is_empty() {
                let (_, d) = hess.diag(&b).unwrap();
                assert_close(&d, fx.expect("hessian.diag"), TOL, &what("hessian.diag"));
            }
        }
    }
}

/// Every KFAC block against the reference's: nn.Linear `[B, A]` (over
/// sequences, `expand` and `reduce`), HuggingFace Conv1D `[A, B]` on its
/// `(in, out)` weight, Embedding `[diag(a), B]`, a fused attention
/// `in_proj` as its Linear block, and 1-D exact diagonals for the norms.
#[test]
fn transformer_kron_matches_reference_factors() {
    for name in CASES {
        let fx = Fixture::load(name);
        let kmeta = meta(name, "kron_meta.json");
        let refs = laplace::io::read_safetensors(&fixtures_dir().join(name).join("kron.safetensors"), &laplace::tensor::Device::Cpu).unwrap();
        let n = fx.data.len();
        for (kind, ck) in [("ggn", CurvatureKind::Ggn), ("ef", CurvatureKind::Ef)] {
            let c = Curvature::new(&fx.model, fx.likelihood, ck, &Subset::All).unwrap();
            for (approx, a) in [("expand", KfacApprox::Expand), ("reduce", KfacApprox::Reduce)] {
                let (_, k) = c.kron(&whole(&fx), n, a).unwrap();
                for (bi, block) in kmeta["blocks"].as_array().unwrap().iter().enumerate() {
                    let layer = block["layer"].as_str().unwrap();
                    let key = match layer {
                        "Embedding" => format!("{kind}.embed.{bi}.product"),
                        "MultiheadAttention" => format!("{kind}.{approx}.linear.{bi}.product"),
                        _ => format!("{kind}.{approx}.{bi}.product"),
                    };
                    let want = &refs[&key];
                    let got = Kron::new(vec![k.blocks[bi].clone()]).unwrap().to_matrix().unwrap();
                    let got = if want.rank() == 1 { diagonal(&got) } else { got };
                    let what = format!("{name} {kind} {approx} block {bi} ({})", block["param"]);
                    if laplace::tensor::to_vec_f64(want).unwrap().iter().all(|v| v.abs() < 1e-20) {
                        // Structurally zero (attention keys under `reduce`): rounding noise.
                        assert!(rel_err(&got, &want.zeros_like().unwrap()) < 1e-14, "{what}: not zero");
                    } else {
                        assert_close(&got, want, TOL, &what);
                    }
                }
            }
        }
    }
}

fn diagonal(m: &Tensor) -> Tensor {
    let n = m.dim(0).unwrap();
    let v = laplace::tensor::to_vec_f64(m).unwrap();
    laplace::tensor::from_f64((0..n).map(|i| v[i * n + i]).collect(), &[n], m.dtype(), m.device()).unwrap()
}
