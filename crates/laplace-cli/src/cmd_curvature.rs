//! `laplace curvature`: loss and curvature over a whole data set.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use laplace::tensor::Tensor;
use laplace::curvature::KfacApprox;
use laplace::{Curvature, CurvatureKind, Dataset, PerPoint, Sequential};

use crate::args::{Inputs, SubsetArgs};
use crate::parallel::Job;

/// Named output tensors, and string metadata, of a safetensors output.
pub type Named = Vec<(String, Tensor)>;
pub type Metadata = Vec<(String, String)>;

/// What to compute: the curvature flags shared by `curvature` and `bench`.
#[derive(Args, Debug, Clone)]
pub struct CurvatureSpec {
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// The loss the curvature is of.
    #[arg(long, value_enum)]
    pub likelihood: laplace::Likelihood,
    /// ggn: exact generalized Gauss-Newton; fisher-mc: Monte-Carlo Fisher; ef: empirical Fisher;
    /// hessian: the exact Hessian (full or diag).
    #[arg(long, value_enum, default_value = "ggn")]
    pub curvature: CurvatureArg,
    /// full: the (P, P) matrix; diag: its diagonal (P,); kron: Kronecker factors per parameter tensor (KFAC).
    #[arg(long, value_enum, default_value = "diag")]
    pub structure: StructureArg,
    /// Seed of the Monte-Carlo draws (fisher-mc); each point has its own stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// KFAC treatment of convolution positions (structure kron).
    #[arg(long, value_enum, default_value = "expand")]
    pub kfac_approx: KfacApprox,
    /// N of the KFAC input factors A = (1/N) Σ a aᵀ (structure kron; default: points in the data).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub n_data: Option<u64>,
}


/// Monte-Carlo samples per point for fisher-mc (`--samples`; `trace` calls it `--mc-samples`).
#[derive(Args, Debug, Clone)]
pub struct McSamples {
    /// Monte-Carlo samples per point (fisher-mc).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub samples: u64,
}

#[derive(Args, Debug)]
pub struct CurvatureArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub spec: CurvatureSpec,
    #[command(flatten)]
    pub mc: McSamples,
    /// Output safetensors: loss (1,) and H ((P, P) or (P,)), or kron.<block>.<factor>.
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum CurvatureArg {
    Ggn,
    FisherMc,
    Ef,
    Hessian,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructureArg {
    Full,
    Diag,
    /// Kronecker factors per parameter tensor (KFAC); keys kron.<block>.<factor>.
    Kron,
}

impl CurvatureSpec {
    pub fn kind(&self, mc_samples: u64) -> CurvatureKind {
        match self.curvature {
            CurvatureArg::Ggn => CurvatureKind::Ggn,
            CurvatureArg::FisherMc => CurvatureKind::FisherMc {
                samples: mc_samples as usize,
                seed: self.seed,
            },
            CurvatureArg::Ef => CurvatureKind::Ef,
            CurvatureArg::Hessian => CurvatureKind::Hessian,
        }
    }

    /// What a pass of this structure sums per batch, for the batch size.
    pub fn per_point(&self) -> PerPoint {
        match self.structure {
            StructureArg::Full => PerPoint::Matrix,
            StructureArg::Diag => PerPoint::Sums,
            StructureArg::Kron => PerPoint::Factors,
        }
    }

    /// The curvature object for `model`.
    pub fn curvature<'m>(&self, model: &'m Sequential, mc_samples: u64) -> laplace::Result<Curvature<'m>> {
        Curvature::new(model, self.likelihood, self.kind(mc_samples), &self.subset.subset(model)?)
    }

    /// Loss and curvature over `data`, as named output tensors, and the
    /// output's metadata (`kron_blocks`: the parameter names of each KFAC
    /// block, a JSON list of lists).
    pub fn compute(&self, curv: &Curvature, data: &Dataset, batch_size: usize) -> laplace::Result<(Named, Metadata)> {
        let (loss, h) = match self.structure {
            StructureArg::Full => curv.full_over(data, batch_size)?,
            StructureArg::Diag => curv.diag_over(data, batch_size)?,
            StructureArg::Kron => {
                let approx = self.kfac_approx;
                let n = match self.n_data {
                    Some(n) => n as usize,
                    None => curv.n_data(data)?,
                };
                let (loss, kron) = curv.kron_over(data, batch_size, n, approx)?;
                let mut out = vec![("loss".to_string(), loss)];
                for (b, fs) in kron.blocks.into_iter().enumerate() {
                    for (f, t) in fs.into_iter().enumerate() {
                        out.push((format!("kron.{b}.{f}"), t));
                    }
                }
                let names = serde_json::to_string(&curv.kron_block_names()).expect("names serialize");
                return Ok((out, vec![("kron_blocks".to_string(), names)]));
            }
        };
        Ok((vec![("loss".into(), loss), ("H".into(), h)], Vec::new()))
    }
}

pub fn run(a: &CurvatureArgs, job: &Job) -> laplace::Result<String> {
    job.agreed(|| crate::args::check_out(&a.out, &a.inputs.paths(Some(&a.spec.subset))))?;
    let (model, data) = a.inputs.load_on(job)?;
    let bar = crate::progress::TerminalBar::new(job.is_root());
    let curv = job.agreed(|| a.spec.curvature(&model, a.mc.samples))?.with_monitor(&bar).with_communicator(job.comm());
    let (out, metadata) = a.spec.compute(&curv, &data, a.inputs.batch_points(&curv, a.spec.per_point(), &data))?;
    job.on_root(|| laplace::io::write_results(&a.out, &out, &metadata))?;
    Ok(format!("{}; {} points", crate::summary::wrote(&a.out, &out), curv.n_data(&data)?))
}
