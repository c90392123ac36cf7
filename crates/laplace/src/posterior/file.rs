//! Posterior files: one safetensors file holding everything prediction
//! needs — the model spec (JSON, as bytes under `config`), the weights
//! (`weights.<name>`), the fitted curvature, the hyperparameters — so
//! `laplace predict` needs only the posterior and the inputs.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use super::{Fitted, Posterior, Structure};
use crate::curvature::{CurvatureKind, Subset};
use crate::error::{bail, Error, Result};
use crate::kron::Kron;
use crate::likelihood::Likelihood;
use crate::model::Sequential;
use crate::spec::ModelSpec;
use crate::tensor::{self, DType, Device, Tensor};

const FORMAT: &str = "laplace-rs posterior";
const VERSION: u64 = 1;

fn f64_tensor(v: &[f64], dev: &Device) -> Result<Tensor> {
    tensor::from_f64(v.to_vec(), &[v.len()], DType::F64, dev)
}

fn kind_name(k: CurvatureKind) -> Value {
    match k {
        CurvatureKind::Ggn => json!({"kind": "ggn"}),
        CurvatureKind::Ef => json!({"kind": "ef"}),
        CurvatureKind::Hessian => json!({"kind": "hessian"}),
        CurvatureKind::FisherMc { samples, seed } => json!({"kind": "fisher-mc", "samples": samples, "seed": seed}),
    }
}

impl Posterior {
    /// Write the posterior to `path` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let subset = match &self.subset {
            Subset::All => "all",
            Subset::LastLayer => "last_layer",
            Subset::Subnetwork(_) => "subnetwork",
        };
        let rank = match self.structure {
            Structure::LowRank { rank } => rank,
            _ => 0,
        };
        let config = json!({
            "format": FORMAT, "version": VERSION,
            "model": serde_json::from_str::<Value>(&self.model.spec().to_json()).expect("valid JSON"),
            "likelihood": self.likelihood.name(), "subset": subset, "structure": self.structure.name(), "rank": rank,
            "curvature": kind_name(self.curvature), "loss": self.loss, "n_data": self.n_data,
            "n_outputs": self.n_outputs, "prior_precision": self.prior_precision, "sigma_noise": self.sigma_noise,
            "temperature": self.temperature, "kron_damping": self.kron_damping, "n_groups": self.n_groups,
        });
        let bytes = config.to_string().into_bytes();
        let n = bytes.len();
        let mut out: Vec<(String, Tensor)> = vec![("config".into(), Tensor::from_vec(bytes, n, &dev)?)];
        for (name, t) in self.model.state_dict() {
            out.push((format!("weights.{name}"), t));
        }
        out.push(("mean".into(), f64_tensor(&self.mean, &dev)?));
        out.push(("prior_mean".into(), f64_tensor(&self.prior_mean, &dev)?));
        let groups: Vec<i64> = self.groups.iter().map(|&g| g as i64).collect();
        out.push(("groups".into(), Tensor::from_vec(groups, self.groups.len(), &dev)?));
        if let Subset::Subnetwork(idx) = &self.subset {
            out.push(("subnetwork".into(), Tensor::from_vec(idx.clone(), idx.len(), &dev)?));
        }
        match &self.fitted {
            Fitted::Full { h, eigvals, eigvecs } => {
                out.push(("H".into(), h.clone()));
                out.push(("H.eigenvalues".into(), f64_tensor(eigvals, &dev)?));
                out.push(("H.eigenvectors".into(), tensor::from_faer(eigvecs.as_ref(), DType::F64, &dev)?));
            }
            Fitted::Diag { h } => out.push(("H".into(), f64_tensor(h, &dev)?)),
            Fitted::Kron { kron, .. } => {
                for (b, fs) in kron.blocks.iter().enumerate() {
                    for (f, t) in fs.iter().enumerate() {
                        out.push((format!("kron.{b}.{f}"), t.clone()));
                    }
                }
            }
            Fitted::LowRank { values, vectors } => {
                out.push(("lowrank.values".into(), f64_tensor(values, &dev)?));
                out.push(("lowrank.vectors".into(), tensor::from_faer(vectors.as_ref(), DType::F64, &dev)?));
            }
        }
        crate::io::write_safetensors(path, &out)
    }

    /// Read a posterior written by [`Posterior::save`], checking that its
    /// parts fit together.
    pub fn load(path: &Path) -> Result<Self> {
        let dev = Device::Cpu;
        let mut t = crate::io::read_safetensors(path, &dev)?;
        let bad = |msg: String| Error::Data(format!("{}: {msg}", path.display()));
        let config = t.remove("config").ok_or_else(|| bad("not a laplace-rs posterior file (no \"config\")".into()))?;
        let bytes: Vec<u8> = config.to_vec1::<u8>().map_err(|_| bad("\"config\" is not a byte string".into()))?;
        let cfg: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("config is not JSON: {e}")))?;
        if cfg["format"] != FORMAT {
            bail!(Data, "{}: not a laplace-rs posterior file", path.display());
        }
        if cfg["version"].as_u64() != Some(VERSION) {
            bail!(Data, "{}: posterior format version {} is not supported (expected {VERSION})", path.display(), cfg["version"]);
        }
        let spec = ModelSpec::from_json(&cfg["model"].to_string())?;
        let weights: HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("weights.").map(|n| (n.to_string(), v.clone())))
            .collect();
        let model = Sequential::new(spec, weights, None, &dev)?;
        let get = |k: &str| t.get(k).cloned().ok_or_else(|| bad(format!("missing tensor {k:?}")));
        let likelihood: Likelihood = cfg["likelihood"].as_str().unwrap_or("").parse()?;
        let subset = match cfg["subset"].as_str() {
            Some("all") => Subset::All,
            Some("last_layer") => Subset::LastLayer,
            Some("subnetwork") => Subset::Subnetwork(tensor::to_vec_i64(&get("subnetwork")?)?),
            other => bail!(Data, "{}: unknown subset {other:?}", path.display()),
        };
        let structure = match cfg["structure"].as_str() {
            Some("lowrank") => Structure::LowRank { rank: cfg["rank"].as_u64().unwrap_or(0) as usize },
            Some(s) => s.parse()?,
            None => bail!(Data, "{}: no structure", path.display()),
        };
        let c = &cfg["curvature"];
        let curvature = match c["kind"].as_str() {
            Some("fisher-mc") => CurvatureKind::FisherMc {
                samples: c["samples"].as_u64().unwrap_or(1) as usize,
                seed: c["seed"].as_u64().unwrap_or(0),
            },
            Some(k) => k.parse()?,
            None => bail!(Data, "{}: no curvature kind", path.display()),
        };
        let mean = tensor::to_vec_f64(&get("mean")?)?;
        let p = mean.len();
        let (expect_mean, expect_groups, n_groups) = super::subset_values(&model, &subset)?;
        if expect_mean.len() != p {
            bail!(Data, "{}: the posterior has {p} parameters, but its model's subset has {}", path.display(), expect_mean.len());
        }
        let fitted = match structure {
            Structure::Full => {
                let h = get("H")?;
                if h.dims() != [p, p] {
                    bail!(Data, "{}: H has shape {:?}, expected ({p}, {p})", path.display(), h.dims());
                }
                Fitted::Full {
                    eigvals: tensor::to_vec_f64(&get("H.eigenvalues")?)?,
                    eigvecs: tensor::to_faer(&get("H.eigenvectors")?)?,
                    h,
                }
            }
            Structure::Diag => {
                let h = tensor::to_vec_f64(&get("H")?)?;
                if h.len() != p {
                    bail!(Data, "{}: H has {} entries, expected {p}", path.display(), h.len());
                }
                Fitted::Diag { h }
            }
            Structure::Kron => {
                let mut blocks = Vec::new();
                for b in 0.. {
                    let fs: Vec<Tensor> = (0..2).filter_map(|f| t.get(&format!("kron.{b}.{f}")).cloned()).collect();
                    if fs.is_empty() {
                        break;
                    }
                    blocks.push(fs);
                }
                let kron = Kron::new(blocks)?;
                if kron.n_params()? != p {
                    bail!(Data, "{}: Kronecker factors cover {} parameters, expected {p}", path.display(), kron.n_params()?);
                }
                let decomposed = kron.decompose(cfg["kron_damping"].as_bool().unwrap_or(false))?;
                Fitted::Kron { kron, decomposed }
            }
            Structure::LowRank { .. } => {
                let vectors = tensor::to_faer(&get("lowrank.vectors")?)?;
                if vectors.ncols() != p {
                    bail!(Data, "{}: low-rank vectors have {} columns, expected {p}", path.display(), vectors.ncols());
                }
                Fitted::LowRank { values: tensor::to_vec_f64(&get("lowrank.values")?)?, vectors }
            }
        };
        let num = |k: &str| cfg[k].as_f64().ok_or_else(|| bad(format!("config has no number {k:?}")));
        let prior_precision: Vec<f64> = cfg["prior_precision"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let post = Posterior {
            model,
            likelihood,
            subset,
            structure,
            curvature,
            mean,
            groups: expect_groups,
            n_groups,
            fitted,
            loss: num("loss")?,
            n_data: num("n_data")? as usize,
            n_outputs: num("n_outputs")? as usize,
            prior_precision,
            prior_mean: tensor::to_vec_f64(&get("prior_mean")?)?,
            sigma_noise: num("sigma_noise")?,
            temperature: num("temperature")?,
            kron_damping: cfg["kron_damping"].as_bool().unwrap_or(false),
        };
        post.prior_diag(&post.prior_precision)?;
        if post.prior_mean.len() != p {
            bail!(Data, "{}: prior mean has {} entries, expected {p}", path.display(), post.prior_mean.len());
        }
        Ok(post)
    }
}
