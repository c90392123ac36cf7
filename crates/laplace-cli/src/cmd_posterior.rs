//! `laplace fit`, `laplace predict`, `laplace evaluate`: Laplace posteriors
//! from the shell.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use laplace::posterior::marglik::{MarglikOptions, PriorStructure};
use laplace::pass::fold_batches;
use laplace::posterior::metrics;
use laplace::posterior::predict::Link;
use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::{self, DType, Device};
use laplace::{BatchSize, CurvatureKind, Dataset, Likelihood, Subset};

use crate::args::{subset_from_globs, DTypeArg};
use crate::parallel::Job;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubsetArg {
    All,
    LastLayer,
    Subnetwork,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PosteriorStructureArg {
    Full,
    Diag,
    Kron,
    Lowrank,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostCurvatureArg {
    Ggn,
    FisherMc,
    Ef,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizeArg {
    Marglik,
    Gridsearch,
}


#[derive(Args, Debug)]
pub struct FitArgs {
    /// Model spec (JSON: a graph from tools/laplace_export.py, or input_shape and torch.nn layers).
    #[arg(long, value_name = "M.json")]
    pub model: PathBuf,
    /// Weights at the MAP: safetensors with the module's state_dict names.
    #[arg(long, value_name = "W.safetensors")]
    pub weights: PathBuf,
    /// Training data (.npz / .safetensors with x, or one array per named
    /// model input, and y).
    #[arg(long, value_name = "TRAIN.npz")]
    pub data: PathBuf,
    /// The data array holding the targets (HuggingFace batches call it "labels").
    #[arg(long, value_name = "KEY", default_value = "y")]
    pub label_key: String,
    /// The loss the network was trained with.
    #[arg(long, value_enum)]
    pub likelihood: Likelihood,
    /// Which parameters get a posterior (the rest stay at the MAP).
    #[arg(long, value_enum, default_value = "all")]
    pub subset: SubsetArg,
    /// Parameter indices of the subnetwork (int64 .npy), with --subset subnetwork.
    #[arg(long, value_name = "IDX.npy", conflicts_with = "params")]
    pub subnetwork: Option<PathBuf>,
    /// The subnetwork as parameter-name globs ('fc.*,layer4.*'), with --subset subnetwork.
    #[arg(long, value_name = "GLOBS")]
    pub params: Option<String>,
    /// How the posterior precision is stored: full (P, P), diagonal, Kronecker factors (KFAC) or low rank.
    #[arg(long, value_enum)]
    pub structure: PosteriorStructureArg,
    /// Rank of the low-rank structure (top eigenpairs of the curvature).
    #[arg(long, default_value_t = 10)]
    pub rank: usize,
    /// The curvature in the posterior precision: GGN, Monte-Carlo Fisher or empirical Fisher.
    #[arg(long, value_enum, default_value = "ggn")]
    pub curvature: PostCurvatureArg,
    /// Monte-Carlo samples (fisher-mc).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Initial (or fixed) prior precision.
    #[arg(long, default_value_t = 1.0)]
    pub prior_precision: f64,
    /// The prior precision's shape when optimized: one value, one per parameter tensor, or one per parameter.
    #[arg(long, value_enum, default_value = "scalar")]
    pub prior_structure: PriorStructure,
    /// Tune the prior precision: by the marginal likelihood, or by NLL on --val (default: keep --prior-precision).
    #[arg(long, value_enum)]
    pub optimize_prior: Option<OptimizeArg>,
    /// Validation data for --optimize-prior gridsearch.
    #[arg(long, value_name = "VAL.npz")]
    pub val: Option<PathBuf>,
    /// Observation noise σ (regression).
    #[arg(long, default_value_t = 1.0)]
    pub sigma_noise: f64,
    /// Optimize σ together with the prior by the marginal likelihood (regression).
    #[arg(long)]
    pub optimize_sigma: bool,
    /// Temperature T of the posterior: the likelihood's curvature is divided by T (T < 1 sharpens).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Points per batch of the curvature passes, or auto: the largest batch
    /// whose estimated working memory fits the last-level cache (raised
    /// so that the weights, Kronecker factors or full matrix every batch
    /// reads and writes get enough work), and
    /// always half of --memory-limit (the batch size changes only the
    /// summation order).
    #[arg(long, value_name = "auto|N", default_value = "auto")]
    pub batch_size: BatchSize,
    /// Compute dtype (default: the dtype of the weights).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Print the result as JSON on stdout (log marginal likelihood, prior precision, σ, N, P).
    #[arg(long)]
    pub json: bool,
    /// Output posterior file (safetensors, read by predict, evaluate and laplace_rs).
    #[arg(long, value_name = "POSTERIOR.safetensors")]
    pub out: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredTypeArg {
    Glm,
    Nn,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkArg {
    Probit,
    Bridge,
    #[value(alias = "bridge_norm")]
    BridgeNorm,
    Mc,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A posterior written by fit.
    #[arg(long, value_name = "POSTERIOR.safetensors")]
    pub posterior: PathBuf,
    /// Inputs (.npz / .safetensors with x, or one array per named model input;
    /// y is not needed).
    #[arg(long, value_name = "TEST.npz")]
    pub data: PathBuf,
    /// The data array holding the targets (HuggingFace batches call it "labels").
    #[arg(long, value_name = "KEY", default_value = "y")]
    pub label_key: String,
    /// glm: the linearized network's predictive (closed form or a link); nn: Monte-Carlo over sampled weights.
    #[arg(long, value_enum, default_value = "glm")]
    pub pred_type: PredTypeArg,
    /// Link approximation of the GLM predictive for classification (bridge-norm: the normalized Laplace bridge).
    #[arg(long, value_enum, default_value = "probit")]
    pub link: LinkArg,
    /// Samples of the MC link or the nn predictive.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Seed of the Monte-Carlo samples (each batch has its own stream).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Points per predictive batch.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Output safetensors: probs (N, C) for classification; mean, var (N, C) for regression.
    #[arg(long, value_name = "PRED.safetensors")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// A posterior written by fit.
    #[arg(long, value_name = "POSTERIOR.safetensors")]
    pub posterior: PathBuf,
    /// Test data with targets (.npz / .safetensors with x, or one array per named model input, and y).
    #[arg(long, value_name = "TEST.npz")]
    pub data: PathBuf,
    /// The data array holding the targets (HuggingFace batches call it "labels").
    #[arg(long, value_name = "KEY", default_value = "y")]
    pub label_key: String,
    /// Link approximation of the GLM predictive (classification).
    #[arg(long, value_enum, default_value = "probit")]
    pub link: LinkArg,
    /// Points per predictive batch.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Print the metrics as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn link(a: LinkArg, samples: usize, seed: u64) -> Link {
    match a {
        LinkArg::Probit => Link::Probit,
        LinkArg::Bridge => Link::Bridge,
        LinkArg::BridgeNorm => Link::BridgeNorm,
        LinkArg::Mc => Link::Mc { samples, seed },
    }
}

pub fn run_fit(a: &FitArgs, job: &Job) -> laplace::Result<String> {
    let mut inputs = vec![("--model", a.model.as_path()), ("--weights", a.weights.as_path()), ("--data", a.data.as_path())];
    inputs.extend(a.val.as_deref().map(|p| ("--val", p)));
    inputs.extend(a.subnetwork.as_deref().map(|p| ("--subnetwork", p)));
    job.agreed(|| crate::args::check_out(&a.out, &inputs))?;
    let dev = Device::Cpu;
    let dtype = a.dtype.map(|d| match d {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F64 => DType::F64,
    });
    // Everything read from files, agreed across ranks; then rank r holds shard r.
    let (model, data, subset) = job.agreed(|| {
        let model = laplace::Sequential::load(&a.model, &a.weights, dtype, &dev)?;
        let data = job.load_data(&a.data, &a.label_key, model.dtype(), &dev)?;
        let subset = match (a.subset, &a.subnetwork, &a.params) {
            (SubsetArg::All, None, None) => Subset::All,
            (SubsetArg::LastLayer, None, None) => Subset::LastLayer,
            (SubsetArg::Subnetwork, Some(p), _) => Subset::Subnetwork(laplace::io::read_indices(p)?),
            (SubsetArg::Subnetwork, None, Some(globs)) => subset_from_globs(&model, globs)?,
            (SubsetArg::Subnetwork, None, None) => {
                return Err(laplace::Error::Invalid(
                    "--subset subnetwork needs --subnetwork IDX.npy or --params GLOBS".into(),
                ))
            }
            _ => {
                return Err(laplace::Error::Invalid(
                    "--subnetwork and --params need --subset subnetwork".into(),
                ))
            }
        };
        Ok((model, data, subset))
    })?;
    let likelihood: Likelihood = a.likelihood;
    let structure = match a.structure {
        PosteriorStructureArg::Full => Structure::Full,
        PosteriorStructureArg::Diag => Structure::Diag,
        PosteriorStructureArg::Kron => Structure::Kron,
        PosteriorStructureArg::Lowrank => Structure::LowRank { rank: a.rank },
    };
    let curvature = match a.curvature {
        PostCurvatureArg::Ggn => CurvatureKind::Ggn,
        PostCurvatureArg::Ef => CurvatureKind::Ef,
        PostCurvatureArg::FisherMc => CurvatureKind::FisherMc { samples: a.samples, seed: 0 },
    };
    let prior_structure = a.prior_structure;
    if a.optimize_sigma && a.optimize_prior != Some(OptimizeArg::Marglik) {
        return Err(laplace::Error::Invalid("--optimize-sigma needs --optimize-prior marglik".into()));
    }
    let opts = FitOptions {
        subset,
        structure,
        curvature,
        batch_size: a.batch_size,
        prior_precision: vec![a.prior_precision],
        sigma_noise: a.sigma_noise,
        temperature: a.temperature,
        ..FitOptions::default()
    };
    let bar = crate::progress::TerminalBar::new(!a.json && job.is_root());
    // The curvature of the whole data set, on every rank.
    let mut post = Posterior::fit_distributed(model, &data, likelihood, &opts, &bar, job.comm())?;
    // The prior optimization, the evidence and the file: rank 0's, after the
    // passes over data every rank took part in.
    let mut summary = String::new();
    job.on_root(|| {
        // Expand a scalar start to the requested structure.
        post.prior_precision = match prior_structure {
            PriorStructure::Scalar => vec![a.prior_precision],
            PriorStructure::Layerwise => vec![a.prior_precision; post.n_groups()],
            PriorStructure::Diagonal => vec![a.prior_precision; post.n_params()],
        };
        match a.optimize_prior {
            Some(OptimizeArg::Marglik) => {
                let mo = MarglikOptions {
                    prior_structure,
                    optimize_sigma: a.optimize_sigma,
                    init_prior_precision: a.prior_precision,
                    ..MarglikOptions::default()
                };
                post.optimize_marglik(&mo)?;
            }
            Some(OptimizeArg::Gridsearch) => {
                let Some(val) = &a.val else {
                    return Err(laplace::Error::Invalid("--optimize-prior gridsearch needs --val VAL.npz".into()));
                };
                let val = Dataset::load_with_labels(val, &a.label_key, post.model().dtype(), &dev)?;
                post.optimize_gridsearch(&val, None, a.batch_size)?;
            }
            None => {}
        }
        let lml = post.evidence()?;
        if !lml.is_finite() {
            return Err(laplace::Error::NonFinite(format!(
                "the log marginal likelihood is {lml}; nothing was written (a larger --prior-precision keeps the posterior precision invertible)"
            )));
        }
        post.save(&a.out)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"log_marginal_likelihood": lml, "prior_precision": post.prior_precision,
                    "sigma_noise": post.sigma_noise, "n_data": post.n_data, "n_params": post.n_params()})
            );
        }
        summary = format!(
            "wrote {}: {} posterior over {} parameters on {} points, log marginal likelihood {lml:.6}, prior precision {:?}{}",
            a.out.display(),
            post.structure.name(),
            post.n_params(),
            post.n_data,
            post.prior_precision,
            if likelihood == Likelihood::Regression { format!(", sigma_noise {:.6}", post.sigma_noise) } else { String::new() }
        );
        Ok(())
    })?;
    Ok(summary)
}

/// Predictions over a data set, in batches (one pass, with a progress bar).
fn predictions(post: &Posterior, data: &Dataset, a: &PredictArgs) -> laplace::Result<Vec<(String, tensor::Tensor)>> {
    let bar = crate::progress::TerminalBar::new(true);
    let init = (Vec::new(), Vec::new());
    let (first, second) = fold_batches(data, a.batch_size, &bar, "predictive", init, |(mut first, mut second), o, n| {
        let x = data.inputs(o, n)?;
        let seed = a.seed.wrapping_add(o as u64);
        match (post.likelihood, a.pred_type) {
            (Likelihood::Classification, PredTypeArg::Glm) => first.push(post.predict_probs(&x, link(a.link, a.samples, seed))?),
            (Likelihood::Classification, PredTypeArg::Nn) => first.push(post.nn_predictive(&x, a.samples, seed)?.0),
            (Likelihood::Regression, PredTypeArg::Glm) => {
                let (m, v) = post.predict_regression(&x)?;
                first.push(m);
                second.push(v);
            }
            (Likelihood::Regression, PredTypeArg::Nn) => {
                let (m, v) = post.nn_predictive(&x, a.samples, seed)?;
                first.push(m);
                second.push(v.expect("regression has a variance"));
            }
        }
        Ok((first, second))
    })?;
    Ok(match post.likelihood {
        Likelihood::Classification => vec![("probs".into(), tensor::Tensor::cat(&first, 0)?)],
        Likelihood::Regression => vec![
            ("mean".into(), tensor::Tensor::cat(&first, 0)?),
            ("var".into(), tensor::Tensor::cat(&second, 0)?),
        ],
    })
}

pub fn run_predict(a: &PredictArgs) -> laplace::Result<String> {
    crate::args::check_out(&a.out, &[("--posterior", a.posterior.as_path()), ("--data", a.data.as_path())])?;
    let post = Posterior::load(&a.posterior)?;
    let data = Dataset::load_with_labels(&a.data, &a.label_key, post.model().dtype(), &Device::Cpu)?;
    let out = predictions(&post, &data, a)?;
    write_predictions(a, &out)?;
    Ok(crate::summary::wrote(&a.out, &out))
}

/// Write `predict`'s output, explaining a non-finite prediction.
fn write_predictions(a: &PredictArgs, out: &[(String, tensor::Tensor)]) -> laplace::Result<()> {
    laplace::io::write_results(&a.out, out, &[]).map_err(|e| match e {
        laplace::Error::NonFinite(m) => laplace::Error::NonFinite(format!(
            "{m}: the posterior's variance overflows this model's arithmetic; increase the prior precision{}",
            if a.pred_type == PredTypeArg::Nn || a.link == LinkArg::Mc { ", or predict in f64 (fit with --dtype f64)" } else { "" }
        )),
        other => other,
    })
}

pub fn run_evaluate(a: &EvaluateArgs) -> laplace::Result<String> {
    let post = Posterior::load(&a.posterior)?;
    let data = Dataset::load_with_labels(&a.data, &a.label_key, post.model().dtype(), &Device::Cpu)?;
    let y = data.targets()?.clone();
    let f_map = post.model().forward(&data.x)?.to_dtype(DType::F64)?;
    let pa = PredictArgs {
        posterior: a.posterior.clone(),
        label_key: a.label_key.clone(),
        data: a.data.clone(),
        pred_type: PredTypeArg::Glm,
        link: a.link,
        samples: 100,
        seed: 0,
        batch_size: a.batch_size,
        out: PathBuf::new(),
    };
    let la = predictions(&post, &data, &pa)?;
    for (key, t) in &la {
        if let Some(i) = tensor::first_non_finite(t)? {
            return Err(laplace::Error::NonFinite(format!(
                "Laplace prediction {key:?} holds a non-finite value at index {:?}: the posterior's variance overflows; increase the prior precision",
                tensor::unravel(i, t.dims())
            )));
        }
    }
    match post.likelihood {
        Likelihood::Classification => {
            let labels = tensor::to_vec_i64(&y)?;
            let map = metrics::classification(&laplace::likelihood::softmax(&f_map)?, &labels)?;
            let lap = metrics::classification(&la[0].1, &labels)?;
            if a.json {
                let m = |x: &metrics::ClassificationMetrics| serde_json::json!({"accuracy": x.accuracy, "nll": x.nll, "ece": x.ece, "brier": x.brier});
                println!("{}", serde_json::json!({"map": m(&map), "laplace": m(&lap)}));
            } else {
                println!("{:<10} {:>9} {:>9} {:>9} {:>9}", "", "accuracy", "NLL", "ECE", "Brier");
                for (name, x) in [("MAP", map), ("Laplace", lap)] {
                    println!("{name:<10} {:>9.4} {:>9.4} {:>9.4} {:>9.4}", x.accuracy, x.nll, x.ece, x.brier);
                }
            }
        }
        Likelihood::Regression => {
            let y = y.to_dtype(DType::F64)?;
            let s2 = post.sigma_noise * post.sigma_noise;
            let map_var = (f_map.zeros_like()? + s2)?;
            let map = metrics::regression(&f_map, &map_var, &y)?;
            let lap = metrics::regression(&la[0].1, &(la[1].1.clone() + s2)?, &y)?;
            if a.json {
                let m = |x: &metrics::RegressionMetrics| serde_json::json!({"rmse": x.rmse, "nll": x.nll});
                println!("{}", serde_json::json!({"map": m(&map), "laplace": m(&lap)}));
            } else {
                println!("{:<10} {:>9} {:>9}", "", "RMSE", "NLL");
                for (name, x) in [("MAP", map), ("Laplace", lap)] {
                    println!("{name:<10} {:>9.4} {:>9.4}", x.rmse, x.nll);
                }
            }
        }
    }
    Ok(format!("evaluated the {} posterior of {} on {} points", post.structure.name(), a.posterior.display(), data.len()))
}
