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
/// 2: with a checksum (version 1 files, without one, are refused: fit again).
const VERSION: u64 = 2;

/// CRC-32 over the config bytes and every other tensor (name, dtype, shape,
/// bytes) in name order: tells an edited file from one `save` wrote.
fn checksum(config: &[u8], tensors: &HashMap<String, Tensor>) -> Result<u32> {
    use safetensors::View;
    let mut h = crc32fast::Hasher::new();
    h.update(config);
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for k in keys {
        let t = tensors[k].contiguous()?;
        h.update(k.as_bytes());
        h.update(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
        h.update(&<&Tensor as View>::data(&&t));
    }
    Ok(h.finalize())
}

/// `fit`'s rules for σ and the temperature, shared with `load`.
pub(crate) fn check_hyperparameters(likelihood: Likelihood, sigma_noise: f64, temperature: f64) -> Result<()> {
    if !(sigma_noise > 0.0 && sigma_noise.is_finite()) {
        bail!(Invalid, "sigma_noise must be positive and finite, got {sigma_noise}");
    }
    if likelihood == Likelihood::Classification && sigma_noise != 1.0 {
        bail!(Invalid, "sigma_noise is only defined for regression (got {sigma_noise} with classification)");
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!(Invalid, "temperature must be positive and finite, got {temperature}");
    }
    Ok(())
}

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
        let config_bytes = config.to_string().into_bytes();
        let rest: HashMap<String, Tensor> = out.iter().skip(1).cloned().collect();
        let sum = checksum(&config_bytes, &rest)?.to_le_bytes();
        out.push(("checksum".into(), Tensor::from_vec(sum.to_vec(), 4, &dev)?));
        crate::io::write_results(path, &out, &[])
    }

    /// Read a posterior written by [`Posterior::save`], checking it with
    /// the rules `fit` applies to its options (σ > 0 finite and 1 for
    /// classification, temperature > 0 finite, prior precisions valid,
    /// n_data ≥ 1) and for internal consistency: every stored factor's
    /// shape against the model's parameter counts, finite numbers, no
    /// unknown tensors, and the checksum written by `save`, so a file made
    /// for another model or edited afterwards is refused with the reason.
    pub fn load(path: &Path) -> Result<Self> {
        let dev = Device::Cpu;
        let t = crate::io::read_safetensors(path, &dev)?;
        Self::from_tensors(t, &path.display()).map_err(|e| e.in_file(&path.display()))
    }

    /// [`Posterior::load`] of the tensors of a posterior file; `what` names it.
    pub fn from_tensors(t: HashMap<String, Tensor>, what: &dyn std::fmt::Display) -> Result<Self> {
        Self::from_tensors_inner(t, what).map_err(|e| e.in_file(what))
    }

    fn from_tensors_inner(mut t: HashMap<String, Tensor>, what: &dyn std::fmt::Display) -> Result<Self> {
        let bad = |msg: String| Error::Data(format!("{what}: {msg}"));
        let config = t.remove("config").ok_or_else(|| bad("not a laplace-rs posterior file (no \"config\")".into()))?;
        let bytes: Vec<u8> = config.to_vec1::<u8>().map_err(|_| bad("\"config\" is not a byte string".into()))?;
        let cfg: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("config is not JSON: {e}")))?;
        if cfg["format"] != FORMAT {
            return Err(bad("not a laplace-rs posterior file".into()));
        }
        if cfg["version"].as_u64() == Some(1) {
            return Err(bad("posterior format version 1 (an older laplace-rs, without a checksum) is no longer read: fit the posterior again".into()));
        }
        if cfg["version"].as_u64() != Some(VERSION) {
            return Err(bad(format!("posterior format version {} is not supported (expected {VERSION})", cfg["version"])));
        }
        let stored_sum = t.remove("checksum");
        let sum = checksum(&bytes, &t)?;
        let spec = ModelSpec::from_json(&cfg["model"].to_string())?;
        let weights: HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("weights.").map(|n| (n.to_string(), v.clone())))
            .collect();
        let model = Sequential::new(spec, weights, None, &Device::Cpu)?;
        let get = |k: &str| t.get(k).cloned().ok_or_else(|| bad(format!("missing tensor {k:?}")));
        let f64s = |k: &str| -> Result<Vec<f64>> {
            let v = tensor::to_vec_f64(&get(k)?)?;
            match v.iter().position(|x| !x.is_finite()) {
                Some(i) => Err(bad(format!("{k}[{i}] = {} is not finite", v[i]))),
                None => Ok(v),
            }
        };
        let likelihood: Likelihood = cfg["likelihood"].as_str().unwrap_or("").parse()?;
        let subset = match cfg["subset"].as_str() {
            Some("all") => Subset::All,
            Some("last_layer") => Subset::LastLayer,
            Some("subnetwork") => Subset::Subnetwork(tensor::to_vec_i64(&get("subnetwork")?)?),
            other => return Err(bad(format!("unknown subset {other:?}"))),
        };
        let count = |k: &str| cfg[k].as_u64().and_then(|v| usize::try_from(v).ok());
        let structure = match cfg["structure"].as_str() {
            Some("lowrank") => match count("rank") {
                Some(rank) if rank >= 1 => Structure::LowRank { rank },
                _ => return Err(bad(format!("rank {} must be an integer ≥ 1", cfg["rank"]))),
            },
            Some(s) => s.parse()?,
            None => return Err(bad("no structure".into())),
        };
        let c = &cfg["curvature"];
        let curvature = match c["kind"].as_str() {
            Some("fisher-mc") => CurvatureKind::FisherMc {
                samples: c["samples"].as_u64().and_then(|v| usize::try_from(v).ok()).filter(|&s| s >= 1).ok_or_else(|| bad(format!("fisher-mc samples {} must be an integer ≥ 1", c["samples"])))?,
                seed: c["seed"].as_u64().unwrap_or(0),
            },
            Some(k) => k.parse()?,
            None => return Err(bad("no curvature kind".into())),
        };
        let mean = f64s("mean")?;
        let p = mean.len();
        let (expect_mean, expect_groups, n_groups) = super::subset_values(&model, &subset)?;
        if expect_mean.len() != p {
            return Err(bad(format!("the posterior has {p} parameters, but its model's subset has {}", expect_mean.len())));
        }
        if let Some(i) = (0..p).find(|&i| mean[i] != expect_mean[i]) {
            return Err(bad(format!("mean[{i}] = {} differs from the model's weight {} (the MAP the posterior was fitted at)", mean[i], expect_mean[i])));
        }
        // H is positive semi-definite except for the exact Hessian.
        let psd = curvature != CurvatureKind::Hessian;
        let fitted = match structure {
            Structure::Full => {
                let h = get("H")?;
                if h.dims() != [p, p] {
                    return Err(bad(format!("H has shape {:?}, expected ({p}, {p})", h.dims())));
                }
                f64s("H")?;
                let eigvals = f64s("H.eigenvalues")?;
                let vecs = get("H.eigenvectors")?;
                if eigvals.len() != p || vecs.dims() != [p, p] {
                    return Err(bad(format!("H.eigenvalues {:?} / H.eigenvectors {:?} do not fit P = {p}", [eigvals.len()], vecs.dims())));
                }
                f64s("H.eigenvectors")?;
                Fitted::Full { eigvals, eigvecs: tensor::to_faer(&vecs)?, h }
            }
            Structure::Diag => {
                let h = f64s("H")?;
                if h.len() != p || get("H")?.rank() != 1 {
                    return Err(bad(format!("H has {} entries, expected {p}", h.len())));
                }
                if let Some(i) = h.iter().position(|v| psd && *v < 0.0) {
                    return Err(bad(format!("H[{i}] = {} is negative; a {:?} diagonal is not", h[i], curvature)));
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
                    if !t.contains_key(&format!("kron.{b}.0")) {
                        return Err(bad(format!("Kronecker block {b} has a factor 1 but no factor 0")));
                    }
                    for f in 0..fs.len() {
                        f64s(&format!("kron.{b}.{f}"))?;
                    }
                    blocks.push(fs);
                }
                let kron = Kron::new(blocks).map_err(|e| bad(e.to_string()))?;
                let sizes = kron.block_sizes()?;
                let expect: Vec<usize> = (0..n_groups).map(|g| expect_groups.iter().filter(|&&x| x == g).count()).collect();
                if sizes != expect {
                    return Err(bad(format!("Kronecker blocks cover {sizes:?} parameters, the model's tensors have {expect:?}")));
                }
                let decomposed = kron.decompose(cfg["kron_damping"].as_bool().unwrap_or(false))?;
                Fitted::Kron { kron, decomposed }
            }
            Structure::LowRank { rank } => {
                let vectors = get("lowrank.vectors")?;
                let values = f64s("lowrank.values")?;
                if vectors.dims() != [rank, p] || values.len() != rank {
                    return Err(bad(format!(
                        "low-rank values ({},) and vectors {:?} do not fit rank {rank} and P = {p} (expected ({rank},) and ({rank}, {p}))",
                        values.len(),
                        vectors.dims()
                    )));
                }
                if let Some(i) = values.iter().position(|v| *v < 0.0) {
                    return Err(bad(format!("lowrank.values[{i}] = {} is negative", values[i])));
                }
                f64s("lowrank.vectors")?;
                Fitted::LowRank { values, vectors: tensor::to_faer(&vectors)? }
            }
        };
        let num = |k: &str| match cfg[k].as_f64() {
            Some(v) if v.is_finite() => Ok(v),
            _ => Err(bad(format!("config {k:?} is {}, not a finite number", cfg[k]))),
        };
        let prior_precision: Vec<f64> = match cfg["prior_precision"].as_array() {
            Some(a) if !a.is_empty() => a.iter().map(|v| v.as_f64().ok_or_else(|| bad(format!("prior precision {v} is not a number")))).collect::<Result<_>>()?,
            _ => return Err(bad(format!("config \"prior_precision\" is {}, not a list of numbers", cfg["prior_precision"]))),
        };
        let n_data = count("n_data").filter(|&n| n >= 1).ok_or_else(|| bad(format!("n_data {} must be an integer ≥ 1", cfg["n_data"])))?;
        let n_outputs = count("n_outputs").ok_or_else(|| bad(format!("n_outputs {} is not a count", cfg["n_outputs"])))?;
        if n_outputs != model.n_outputs() {
            return Err(bad(format!("n_outputs {n_outputs} does not match the model's {} outputs", model.n_outputs())));
        }
        let sigma_noise = num("sigma_noise")?;
        let temperature = num("temperature")?;
        check_hyperparameters(likelihood, sigma_noise, temperature).map_err(|e| bad(e.to_string()))?;
        if likelihood == Likelihood::Classification && n_outputs < 2 {
            return Err(bad(format!("a classification posterior needs ≥ 2 outputs, the model has {n_outputs}")));
        }
        let prior_mean = f64s("prior_mean")?;
        if prior_mean.len() != p {
            return Err(bad(format!("prior mean has {} entries, expected {p}", prior_mean.len())));
        }
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
            n_data,
            n_outputs,
            prior_precision,
            prior_mean,
            sigma_noise,
            temperature,
            kron_damping: cfg["kron_damping"].as_bool().unwrap_or(false),
        };
        post.prior_diag(&post.prior_precision).map_err(|e| bad(e.to_string()))?;
        let mut known: Vec<String> = ["mean", "prior_mean", "groups", "subnetwork", "H", "H.eigenvalues", "H.eigenvectors", "lowrank.values", "lowrank.vectors"]
            .map(String::from)
            .to_vec();
        if let Fitted::Kron { kron, .. } = &post.fitted {
            for (b, fs) in kron.blocks.iter().enumerate() {
                known.extend((0..fs.len()).map(|f| format!("kron.{b}.{f}")));
            }
        }
        let mut unknown: Vec<&String> = t.keys().filter(|k| !k.starts_with("weights.") && !known.contains(k)).collect();
        unknown.sort();
        if !unknown.is_empty() {
            return Err(bad(format!("unexpected tensors {unknown:?} for a {} posterior", post.structure.name())));
        }
        // Last: anything edited that the checks above let through.
        match stored_sum.map(|s| s.to_vec1::<u8>()) {
            Some(Ok(s)) if s == sum.to_le_bytes() => {}
            Some(_) => return Err(bad("checksum mismatch: the file was modified after it was written".into())),
            None => return Err(bad("no checksum: not written by Posterior::save".into())),
        }
        Ok(post)
    }
}
