//! `laplace jacobians` and `laplace gradients`: per-sample quantities,
//! concatenated over batches.

use std::path::PathBuf;

use clap::Args;
use laplace::{Curvature, CurvatureKind, Likelihood, PerPoint, Subset};

use crate::args::{Inputs, SubsetArgs};
use crate::parallel::Job;

#[derive(Args, Debug)]
pub struct JacobiansArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// Output safetensors: J (N, C, P) and f (N, C).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct GradientsArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// The loss whose per-sample gradients are taken.
    #[arg(long, value_enum)]
    pub likelihood: laplace::Likelihood,
    /// Output safetensors: G (N, P) and loss (1,).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

pub fn run_jacobians(a: &JacobiansArgs, job: &Job) -> laplace::Result<String> {
    job.agreed(|| crate::args::check_out(&a.out, &a.inputs.paths(Some(&a.subset))))?;
    let (model, data) = a.inputs.load_on(job)?;
    let subset = job.agreed(|| a.subset.subset(&model))?;
    // The likelihood plays no part in Jacobians.
    let curv = Curvature::new(&model, Likelihood::Regression, CurvatureKind::Ggn, &subset)?.with_communicator(job.comm());
    // Assembled on rank 0, which writes it.
    let out = curv.jacobians_over_root(&data, a.inputs.batch_points(&curv, PerPoint::Jacobians, &data), subset == Subset::LastLayer)?.map(|(j, f)| [("J".into(), j), ("f".into(), f)]);
    write_on_root(job, &a.out, out)
}

pub fn run_gradients(a: &GradientsArgs, job: &Job) -> laplace::Result<String> {
    job.agreed(|| crate::args::check_out(&a.out, &a.inputs.paths(Some(&a.subset))))?;
    let (model, data) = a.inputs.load_on(job)?;
    let subset = job.agreed(|| a.subset.subset(&model))?;
    let curv = Curvature::new(&model, a.likelihood, CurvatureKind::Ef, &subset)?.with_communicator(job.comm());
    let out = curv.gradients_over_root(&data, a.inputs.batch_points(&curv, PerPoint::Gradients, &data))?.map(|(g, loss)| [("G".into(), g), ("loss".into(), loss)]);
    write_on_root(job, &a.out, out)
}

/// Write the rows rank 0 assembled (`None` on the other ranks); the summary.
fn write_on_root(job: &Job, path: &std::path::Path, out: Option<[(String, laplace::tensor::Tensor); 2]>) -> laplace::Result<String> {
    job.on_root(|| laplace::io::write_results(path, out.as_ref().expect("rank 0 holds the gathered rows"), &[]))?;
    Ok(out.map_or(String::new(), |o| crate::summary::wrote(path, &o)))
}
