//! Laplace posteriors N(θ*, P⁻¹) on top of the curvature: laplace-torch's
//! `Laplace(model, likelihood, subset_of_weights, hessian_structure)`.
//!
//! P = s·H + P₀ with H the curvature of the summed loss (GGN by default) at
//! the MAP θ*, s = 1/(σ² T) (observation noise σ for regression, 1 for
//! classification; temperature T), and P₀ = diag(p₀) the prior precision
//! (scalar, one value per parameter tensor, or one per parameter).
//!
//! | structure | H kept as                 | P⁻¹ products through                     |
//! |-----------|---------------------------|------------------------------------------|
//! | full      | (P, P) and its eigenpairs | eigenvalues (scalar prior) or Cholesky   |
//! | diag      | (P,)                      | elementwise                              |
//! | kron      | Kronecker factors         | their eigendecomposition (`KronDecomposed`) |
//! | lowrank   | top-k eigenpairs of H     | Woodbury, k × k                          |
//!
//! Submodules: [`marglik`] (evidence and its optimization), [`predict`]
//! (GLM and sampling predictives), `file` (save / load), and
//! [`metrics`].

pub mod file;
pub mod marglik;
pub mod metrics;
pub mod predict;

use std::str::FromStr;

use crate::curvature::{BatchSize, Curvature, CurvatureKind, KfacApprox, PerPoint, Subset};
use crate::data::Dataset;
use crate::distributed::{self, Communicator};
use crate::error::{bail, Error, Result};
use crate::kron::{Kron, KronDecomposed};
use crate::likelihood::Likelihood;
use crate::model::Sequential;
use crate::operator::{lanczos_top_k, CurvatureOperator};
use crate::pass::{fold_batches, Monitor};
use crate::tensor::{self, Mm, Tensor};

/// How the curvature (and so the posterior precision) is represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structure {
    /// The whole `(P, P)` precision, eigendecomposed.
    Full,
    /// Its diagonal `(P,)`.
    Diag,
    /// Kronecker factors per parameter tensor (KFAC).
    Kron,
    /// The top-k eigenpairs of the curvature.
    LowRank {
        /// Top eigenpairs of the curvature kept.
        rank: usize,
    },
}

impl FromStr for Structure {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Structure::Full),
            "diag" => Ok(Structure::Diag),
            "kron" => Ok(Structure::Kron),
            "lowrank" => Ok(Structure::LowRank { rank: 10 }),
            other => bail!(Invalid, "unknown posterior structure {other:?} (full, diag, kron, lowrank)"),
        }
    }
}

impl Structure {
    /// The lower-case name (`full`, `diag`, `kron`, `lowrank`).
    pub fn name(&self) -> &'static str {
        match self {
            Structure::Full => "full",
            Structure::Diag => "diag",
            Structure::Kron => "kron",
            Structure::LowRank { .. } => "lowrank",
        }
    }
}

/// The fitted curvature H (unit noise, temperature 1, no prior).
#[derive(Clone, Debug)]
pub enum Fitted {
    /// H `(P, P)`, with its eigenvalues (ascending) and eigenvectors (columns).
    Full {
        /// H `(P, P)`.
        h: Tensor,
        /// Its eigenvalues `(P,)`.
        eigvals: Vec<f64>,
        /// Its eigenvectors, one per column.
        eigvecs: faer::Mat<f64>,
    },
    /// diag H `(P,)`.
    Diag {
        /// diag H `(P,)`.
        h: Vec<f64>,
    },
    /// Kronecker factors, and their eigendecomposition.
    Kron {
        /// The KFAC factors.
        kron: Kron,
        /// Their eigendecompositions.
        decomposed: KronDecomposed,
    },
    /// H ≈ Uᵀ diag(λ) U: λ `(k,)`, U `(k, P)` orthonormal rows.
    LowRank {
        /// The top-k eigenvalues of H.
        values: Vec<f64>,
        /// Their eigenvectors `(k, P)`.
        vectors: faer::Mat<f64>,
    },
}

/// Everything `fit` needs besides model and data.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// The parameters that get a posterior (the rest stay at the MAP).
    pub subset: Subset,
    /// How the curvature is stored.
    pub structure: Structure,
    /// GGN, Monte-Carlo Fisher or empirical Fisher.
    pub curvature: CurvatureKind,
    /// Points per batch of the curvature passes; [`BatchSize::Auto`] is
    /// resolved against the memory budget by the curvature being fitted.
    pub batch_size: BatchSize,
    /// Scalar, one per parameter tensor of the subset, or one per parameter.
    pub prior_precision: Vec<f64>,
    /// Scalar or one per parameter of the subset.
    pub prior_mean: Vec<f64>,
    /// Observation noise σ (regression; 1 for classification).
    pub sigma_noise: f64,
    /// Temperature T: the curvature enters the precision as H / T.
    pub temperature: f64,
    /// KFAC: `damping` variant when adding the prior.
    pub kron_damping: bool,
    /// How convolution positions enter the KFAC factors.
    pub kfac_approx: KfacApprox,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            subset: Subset::All,
            structure: Structure::Full,
            curvature: CurvatureKind::Ggn,
            batch_size: BatchSize::Auto,
            prior_precision: vec![1.0],
            prior_mean: vec![0.0],
            sigma_noise: 1.0,
            temperature: 1.0,
            kron_damping: false,
            kfac_approx: KfacApprox::Expand,
        }
    }
}

/// A fitted Laplace approximation.
pub struct Posterior {
    pub(crate) model: Sequential,
    /// The loss the network was trained with.
    pub likelihood: Likelihood,
    /// The parameters with a posterior.
    pub subset: Subset,
    /// How the curvature is stored.
    pub structure: Structure,
    /// Which curvature.
    pub curvature: CurvatureKind,
    /// θ* restricted to the subset (in the subset's order).
    pub(crate) mean: Vec<f64>,
    /// Group (parameter tensor) of every selected coordinate.
    pub(crate) groups: Vec<usize>,
    pub(crate) n_groups: usize,
    pub(crate) fitted: Fitted,
    /// Σ_n ℓ_n at θ* (unit noise).
    pub loss: f64,
    /// N, the points the curvature was summed over.
    pub n_data: usize,
    /// C, the network outputs.
    pub n_outputs: usize,
    /// Prior precision: scalar, one per parameter tensor, or one per parameter.
    pub prior_precision: Vec<f64>,
    /// Expanded to one value per selected parameter.
    pub prior_mean: Vec<f64>,
    /// Observation noise σ (regression).
    pub sigma_noise: f64,
    /// Temperature T.
    pub temperature: f64,
    /// KFAC: the prior added as damping to each factor.
    pub kron_damping: bool,
}

/// The smallest prior precision accepted: 1e-30. Coordinates the data do
/// not constrain (zero curvature) get posterior variance 1/δ, and every
/// predictive multiplies it by squared Jacobian entries: with δ ≥ 1e-30
/// that stays finite for any |J|² below 1e278, and sampled weights
/// (std 1/√δ ≤ 1e15) stay within float32. A smaller δ — a subnormal such as
/// 1e-320 above all, whose reciprocal is infinite — turns predictions into
/// NaN; no meaningful prior is that flat (prior std > 1e15). The marginal-
/// likelihood optimizer stays above e^-40 ≈ 4e-18 on its own.
pub const MIN_PRIOR_PRECISION: f64 = 1e-30;

fn prior_precision_message(bad: f64) -> String {
    if bad > 0.0 && bad < MIN_PRIOR_PRECISION {
        format!(
            "prior precision {bad:e} underflows: the posterior precision of parameters without curvature would be \
             numerically singular (variance 1/{bad:e}); use ≥ {MIN_PRIOR_PRECISION:e}"
        )
    } else {
        format!("prior precision must be positive and finite (≥ {MIN_PRIOR_PRECISION:e}), got {bad}")
    }
}

/// θ* on the subset, and the parameter tensor (group) of every coordinate.
pub(crate) fn subset_values(model: &Sequential, subset: &Subset) -> Result<(Vec<f64>, Vec<usize>, usize)> {
    let theta = tensor::to_vec_f64(&model.parameter_vector()?)?;
    let params = model.params();
    let group_of = |i: usize| params.iter().position(|p| i >= p.offset && i < p.offset + p.numel).expect("index in range");
    Ok(match subset {
        Subset::All => {
            let groups = (0..theta.len()).map(group_of).collect();
            (theta, groups, params.len())
        }
        Subset::LastLayer => {
            let last = model.last_linear()?;
            let tensors: Vec<_> = params.iter().enumerate().filter(|(_, p)| p.layer == last).collect();
            let mut vals = Vec::new();
            let mut groups = Vec::new();
            for (g, (_, p)) in tensors.iter().enumerate() {
                vals.extend_from_slice(&theta[p.offset..p.offset + p.numel]);
                groups.extend(std::iter::repeat_n(g, p.numel));
            }
            (vals, groups, tensors.len())
        }
        Subset::Subnetwork(idx) => {
            // Validated by ParamSelection; groups are the tensors the subnetwork touches.
            crate::curvature::ParamSelection::new(model, subset)?;
            let raw: Vec<usize> = idx.iter().map(|&i| group_of(i as usize)).collect();
            let mut touched: Vec<usize> = raw.clone();
            touched.sort_unstable();
            touched.dedup();
            let groups = raw.iter().map(|g| touched.iter().position(|t| t == g).unwrap()).collect();
            (idx.iter().map(|&i| theta[i as usize]).collect(), groups, touched.len())
        }
    })
}

/// Σ_n ℓ_n over the data set at the model's parameters (over every rank's
/// shard: collective across `comm`).
pub(crate) fn loss_over(
    model: &Sequential,
    likelihood: Likelihood,
    data: &Dataset,
    batch_size: usize,
    monitor: &dyn Monitor,
    comm: &dyn Communicator,
) -> Result<f64> {
    let local = distributed::agreed(comm, || {
        let y = data.targets()?;
        fold_batches(data, batch_size, monitor, "loss", 0.0, |total, o, n| {
            let f = model.forward(&data.inputs(o, n)?)?;
            let t = likelihood.prepare_targets(&y.narrow(0, o, n)?, n, model.n_outputs(), model.dtype())?;
            Ok(total + tensor::scalar_f64(&likelihood.loss(&f, &t)?)?)
        })
    })?;
    distributed::sum_f64(comm, local)
}

impl Posterior {
    /// Fit the curvature of the subset at the model's parameters (the MAP)
    /// over `data`, batch by batch.
    pub fn fit(model: Sequential, data: &Dataset, likelihood: Likelihood, opts: &FitOptions) -> Result<Self> {
        Self::fit_monitored(model, data, likelihood, opts, &crate::pass::SILENT)
    }

    /// [`fit`](Self::fit), reporting its passes over `data` to `monitor`
    /// (a progress bar; it may stop the fit with [`Error::Interrupted`]).
    pub fn fit_monitored(model: Sequential, data: &Dataset, likelihood: Likelihood, opts: &FitOptions, monitor: &dyn Monitor) -> Result<Self> {
        Self::fit_distributed(model, data, likelihood, opts, monitor, &crate::distributed::SINGLE_PROCESS)
    }

    /// [`fit_monitored`](Self::fit_monitored) on this rank's shard `data` of a
    /// data set split over the ranks of `comm` (collective): the curvature is
    /// accumulated over every shard, and every rank returns the posterior of
    /// the whole data set.
    pub fn fit_distributed(
        model: Sequential,
        data: &Dataset,
        likelihood: Likelihood,
        opts: &FitOptions,
        monitor: &dyn Monitor,
        comm: &dyn Communicator,
    ) -> Result<Self> {
        file::check_hyperparameters(likelihood, opts.sigma_noise, opts.temperature)?;
        if let Some(bad) = opts.prior_precision.iter().find(|v| !(**v >= MIN_PRIOR_PRECISION && v.is_finite())) {
            bail!(Invalid, "{}", prior_precision_message(*bad));
        }
        if opts.structure == Structure::Kron && matches!(opts.subset, Subset::Subnetwork(_)) {
            bail!(Invalid, "a Kronecker posterior needs whole parameter tensors: use full or diag for a subnetwork");
        }
        let (mean, groups, n_groups) = subset_values(&model, &opts.subset)?;
        let curv = Curvature::new(&model, likelihood, opts.curvature, &opts.subset)?.with_monitor(monitor).with_communicator(comm);
        let n_data = curv.n_data(data)?;
        let per_point = match opts.structure {
            Structure::Full => PerPoint::Matrix,
            Structure::Kron => PerPoint::Factors,
            Structure::Diag | Structure::LowRank { .. } => PerPoint::Sums,
        };
        let batch = curv.batch_points(opts.batch_size, per_point, data.len(), crate::budget::current());
        let (loss, fitted) = match opts.structure {
            Structure::Full => {
                // H, its f64 copy and eigenvectors, and the eigensolver's workspace.
                let p = mean.len();
                crate::budget::check(&format!("a full posterior for P = {p} (H, its eigenvectors and workspace)"), &[3, p, p], 8)?;
                let (l, h) = curv.full_over(data, batch)?;
                let (vals, vecs) = crate::linalg::symmetric_eigen(&h.to_dtype(tensor::DType::F64)?)?;
                let fitted = Fitted::Full { h, eigvals: tensor::to_vec_f64(&vals)?, eigvecs: tensor::to_faer(&vecs)? };
                (tensor::scalar_f64(&l)?, fitted)
            }
            Structure::Diag => {
                let (l, h) = curv.diag_over(data, batch)?;
                (tensor::scalar_f64(&l)?, Fitted::Diag { h: tensor::to_vec_f64(&h)? })
            }
            Structure::Kron => {
                let (l, kron) = curv.kron_over(data, batch, n_data, opts.kfac_approx)?;
                let decomposed = kron.decompose(opts.kron_damping)?;
                (tensor::scalar_f64(&l)?, Fitted::Kron { kron, decomposed })
            }
            Structure::LowRank { rank } => {
                let op = CurvatureOperator::new(&curv, data, batch)?;
                let ep = lanczos_top_k(&op, rank, 1e-8, 2000, 0)?;
                let loss = loss_over(&model, likelihood, data, batch, monitor, comm)?;
                let p = mean.len();
                let vectors = faer::Mat::from_fn(rank, p, |r, c| ep.vectors[r][c]);
                (loss, Fitted::LowRank { values: ep.values.iter().map(|v| v.max(0.0)).collect(), vectors })
            }
        };
        let n_outputs = model.n_outputs();
        let p = mean.len();
        let prior_mean = match opts.prior_mean.len() {
            1 => vec![opts.prior_mean[0]; p],
            l if l == p => opts.prior_mean.clone(),
            l => bail!(Invalid, "prior mean has {l} values; expected 1 or {p} (the parameters of the subset)"),
        };
        let post = Posterior {
            model,
            likelihood,
            subset: opts.subset.clone(),
            structure: opts.structure,
            curvature: opts.curvature,
            mean,
            groups,
            n_groups,
            fitted,
            loss,
            n_data,
            n_outputs,
            prior_precision: opts.prior_precision.clone(),
            prior_mean,
            sigma_noise: opts.sigma_noise,
            temperature: opts.temperature,
            kron_damping: opts.kron_damping,
        };
        post.prior_diag(&post.prior_precision)?;
        Ok(post)
    }

    /// Replace a low-rank posterior's eigenpairs (λ `(k,)`, U `(P, k)` with
    /// orthonormal columns), e.g. with ones computed elsewhere.
    pub fn set_lowrank(&mut self, values: Vec<f64>, vectors: &Tensor) -> Result<()> {
        let (p, k) = vectors.dims2()?;
        if p != self.n_params() || k != values.len() {
            bail!(Invalid, "low-rank eigenvectors have shape ({p}, {k}); expected ({}, {})", self.n_params(), values.len());
        }
        let u = tensor::to_faer(vectors)?;
        self.fitted = Fitted::LowRank { values, vectors: u.transpose().to_owned() };
        self.structure = Structure::LowRank { rank: k };
        Ok(())
    }

    /// The network at the MAP.
    pub fn model(&self) -> &Sequential {
        &self.model
    }

    /// Number of parameters of the posterior (the subset).
    pub fn n_params(&self) -> usize {
        self.mean.len()
    }

    /// Number of prior-precision groups (parameter tensors of the subset).
    pub fn n_groups(&self) -> usize {
        self.n_groups
    }

    /// θ* on the subset.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The stored curvature.
    pub fn fitted(&self) -> &Fitted {
        &self.fitted
    }

    /// The factor s = 1/(σ² T) of the curvature in the posterior precision.
    pub fn h_factor(&self, sigma_noise: f64) -> f64 {
        1.0 / (sigma_noise * sigma_noise * self.temperature)
    }

    /// The prior precision as one value per parameter of the subset, from a
    /// scalar, one value per group (parameter tensor), or one per parameter.
    pub fn prior_diag(&self, precision: &[f64]) -> Result<Vec<f64>> {
        let p = self.n_params();
        if let Some(bad) = precision.iter().find(|v| !(**v >= MIN_PRIOR_PRECISION && v.is_finite())) {
            bail!(Invalid, "{}", prior_precision_message(*bad));
        }
        Ok(match precision.len() {
            1 => vec![precision[0]; p],
            l if l == self.n_groups => self.groups.iter().map(|&g| precision[g]).collect(),
            l if l == p => {
                if self.structure == Structure::Kron {
                    bail!(Invalid, "a Kronecker posterior takes a scalar or per-layer prior precision, not one per parameter");
                }
                precision.to_vec()
            }
            l => bail!(
                Invalid,
                "prior precision has {l} values; expected 1 (scalar), {} (one per parameter tensor) or {p} (diagonal)",
                self.n_groups
            ),
        })
    }

    /// Per-block δ for a Kronecker posterior.
    pub(crate) fn kron_deltas(&self, precision: &[f64]) -> Result<Vec<f64>> {
        self.prior_diag(precision)?; // validates
        Ok(match precision.len() {
            1 => vec![precision[0]; self.n_groups],
            _ => precision.to_vec(),
        })
    }

    /// The posterior precision of a Kronecker posterior as a decomposition.
    pub fn kron_posterior_precision(&self, precision: &[f64], sigma_noise: f64) -> Result<KronDecomposed> {
        let Fitted::Kron { decomposed, .. } = &self.fitted else {
            bail!(Invalid, "not a Kronecker posterior");
        };
        decomposed.scale(self.h_factor(sigma_noise))?.add_delta(&self.kron_deltas(precision)?)
    }

    /// The dense posterior precision s·H + P₀ `(P, P)` (full structure; for
    /// the others the dense equivalent, for tests and small models).
    pub fn posterior_precision_dense(&self) -> Result<Tensor> {
        let p0 = self.prior_diag(&self.prior_precision)?;
        let s = self.h_factor(self.sigma_noise);
        let dev = self.model.device();
        let p = self.n_params();
        crate::budget::check(&format!("the dense posterior precision for P = {p}"), &[p, p], 8)?;
        let dense_h = match &self.fitted {
            Fitted::Full { h, .. } => h.to_dtype(tensor::DType::F64)?,
            Fitted::Diag { h } => {
                let d = tensor::from_f64(h.clone(), &[p], tensor::DType::F64, dev)?;
                Tensor::eye(p, tensor::DType::F64, dev)?.broadcast_mul(&d.reshape((1, p))?)?
            }
            Fitted::Kron { kron, .. } => {
                if self.kron_damping {
                    return self.kron_posterior_precision(&self.prior_precision, self.sigma_noise)?.to_matrix(1.0);
                }
                kron.to_matrix()?.to_dtype(tensor::DType::F64)?
            }
            Fitted::LowRank { values, vectors } => {
                let u = tensor::from_faer(vectors.as_ref(), tensor::DType::F64, dev)?;
                let l = tensor::from_f64(values.clone(), &[values.len(), 1], tensor::DType::F64, dev)?;
                u.t()?.mm(&u.broadcast_mul(&l)?)?
            }
        };
        let prior = tensor::from_f64(p0, &[p], tensor::DType::F64, dev)?;
        let eye = Tensor::eye(p, tensor::DType::F64, dev)?;
        Ok(((dense_h * s)? + eye.broadcast_mul(&prior.reshape((1, p))?)?)?)
    }
}
