//! `laplace fit`, `laplace predict`, `laplace evaluate`: Laplace posteriors
//! from the shell.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use laplace::posterior::marglik::{MarglikOptions, PriorStructure};
use laplace::posterior::metrics;
use laplace::posterior::predict::Link;
use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::{self, DType, Device};
use laplace::{CurvatureKind, Dataset, Likelihood, Subset};

use crate::args::{subset_from_globs, DTypeArg, LikelihoodArg};
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

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriorStructureArg {
    Scalar,
    Layerwise,
    Diagonal,
}

#[derive(Args, Debug)]
pub struct FitArgs {
    #[arg(long, value_name = "M.json")]
    pub model: PathBuf,
    #[arg(long, value_name = "W.safetensors")]
    pub weights: PathBuf,
    /// Training data (.npz / .safetensors with x, or one array per named
    /// model input, and y).
    #[arg(long, value_name = "TRAIN.npz")]
    pub data: PathBuf,
    /// The data array holding the targets (HuggingFace batches call it "labels").
    #[arg(long, value_name = "KEY", default_value = "y")]
    pub label_key: String,
    #[arg(long, value_enum)]
    pub likelihood: LikelihoodArg,
    #[arg(long, value_enum, default_value = "all")]
    pub subset: SubsetArg,
    /// Parameter indices of the subnetwork (int64 .npy), with --subset subnetwork.
    #[arg(long, value_name = "IDX.npy", conflicts_with = "params")]
    pub subnetwork: Option<PathBuf>,
    /// The subnetwork as parameter-name globs ('fc.*,layer4.*'), with --subset subnetwork.
    #[arg(long, value_name = "GLOBS")]
    pub params: Option<String>,
    #[arg(long, value_enum)]
    pub structure: PosteriorStructureArg,
    /// Rank of the low-rank structure (top eigenpairs of the curvature).
    #[arg(long, default_value_t = 10)]
    pub rank: usize,
    #[arg(long, value_enum, default_value = "ggn")]
    pub curvature: PostCurvatureArg,
    /// Monte-Carlo samples (fisher-mc).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Initial (or fixed) prior precision.
    #[arg(long, default_value_t = 1.0)]
    pub prior_precision: f64,
    #[arg(long, value_enum, default_value = "scalar")]
    pub prior_structure: PriorStructureArg,
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
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
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
    #[arg(long, value_name = "POSTERIOR.safetensors")]
    pub posterior: PathBuf,
    /// Inputs (.npz / .safetensors with x, or one array per named model input;
    /// y is not needed).
    #[arg(long, value_name = "TEST.npz")]
    pub data: PathBuf,
    /// The data array holding the targets (HuggingFace batches call it "labels").
    #[arg(long, value_name = "KEY", default_value = "y")]
    pub label_key: String,
    #[arg(long, value_enum, default_value = "glm")]
    pub pred_type: PredTypeArg,
    #[arg(long, value_enum, default_value = "probit")]
    pub link: LinkArg,
    /// Samples of the MC link or the nn predictive.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// probs (N, C) for classification; mean, var (N, C) for regression.
    #[arg(long, value_name = "PRED.safetensors")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[arg(long, value_name = "POSTERIOR.safetensors")]
    pub posterior: PathBuf,
    #[arg(long, value_name = "TEST.npz")]
    pub data: PathBuf,
    /// The data array holding the targets (HuggingFace batches call it "labels").
    #[arg(long, value_name = "KEY", default_value = "y")]
    pub label_key: String,
    #[arg(long, value_enum, default_value = "probit")]
    pub link: LinkArg,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
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

pub fn run_fit(a: &FitArgs, job: &Job) -> laplace::Result<()> {
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
    let likelihood: Likelihood = a.likelihood.into();
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
    let prior_structure = match a.prior_structure {
        PriorStructureArg::Scalar => PriorStructure::Scalar,
        PriorStructureArg::Layerwise => PriorStructure::Layerwise,
        PriorStructureArg::Diagonal => PriorStructure::Diagonal,
    };
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
        post.save(&a.out)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"log_marginal_likelihood": lml, "prior_precision": post.prior_precision,
                    "sigma_noise": post.sigma_noise, "n_data": post.n_data, "n_params": post.n_params()})
            );
        } else {
            println!(
                "fitted {} posterior over {} parameters on {} points: log marginal likelihood {lml:.6}, prior precision {:?}{}",
                post.structure.name(),
                post.n_params(),
                post.n_data,
                post.prior_precision,
                if likelihood == Likelihood::Regression { format!(", sigma_noise {:.6}", post.sigma_noise) } else { String::new() }
            );
        }
        Ok(())
    })
}

/// Predictions over a data set, in batches.
fn predictions(post: &Posterior, data: &Dataset, a: &PredictArgs) -> laplace::Result<Vec<(String, tensor::Tensor)>> {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for (o, n) in data.batch_ranges(a.batch_size) {
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
    }
    Ok(match post.likelihood {
        Likelihood::Classification => vec![("probs".into(), tensor::Tensor::cat(&first, 0)?)],
        Likelihood::Regression => vec![
            ("mean".into(), tensor::Tensor::cat(&first, 0)?),
            ("var".into(), tensor::Tensor::cat(&second, 0)?),
        ],
    })
}

pub fn run_predict(a: &PredictArgs) -> laplace::Result<()> {
    let post = Posterior::load(&a.posterior)?;
    let data = Dataset::load_with_labels(&a.data, &a.label_key, post.model().dtype(), &Device::Cpu)?;
    let out = predictions(&post, &data, a)?;
    laplace::io::write_safetensors(&a.out, &out)
}

pub fn run_evaluate(a: &EvaluateArgs) -> laplace::Result<()> {
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
    Ok(())
}
