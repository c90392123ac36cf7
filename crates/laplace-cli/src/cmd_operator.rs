//! `laplace eigen` and `laplace trace`: matrix-free algorithms on a
//! curvature operator over the data set.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use laplace::operator::{hutchinson_trace, hutchpp_trace, lanczos_top_k, CurvatureOperator};
use laplace::tensor::{self, Tensor};
use laplace::PerPoint;

use crate::args::Inputs;
use crate::cmd_curvature::{CurvatureSpec, McSamples};
use crate::parallel::Job;

#[derive(Args, Debug)]
pub struct EigenArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub spec: CurvatureSpec,
    #[command(flatten)]
    pub mc: McSamples,
    /// Number of largest eigenvalues.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub top_k: u64,
    /// Relative residual at which a Ritz pair counts as converged.
    #[arg(long, default_value_t = 1e-8)]
    pub tol: f64,
    /// Most operator products.
    #[arg(long, default_value_t = 1000)]
    pub max_iter: usize,
    /// Output safetensors: eigenvalues (K,) descending, eigenvectors (K, P).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub spec: CurvatureSpec,
    /// exact: the sum of the exact diagonal; hutchinson / hutchpp: matrix-free estimates from --samples probes.
    #[arg(long, value_enum, default_value = "exact")]
    pub estimator: EstimatorArg,
    /// Probe vectors (operator products) of the randomized estimators.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub samples: u64,
    /// Monte-Carlo samples per point (fisher-mc).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub mc_samples: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write trace (1,) to safetensors.
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EstimatorArg {
    /// Sum of the exact diagonal.
    Exact,
    Hutchinson,
    Hutchpp,
}

pub fn run_eigen(a: &EigenArgs, job: &Job) -> laplace::Result<String> {
    job.agreed(|| crate::args::check_out(&a.out, &a.inputs.paths(Some(&a.spec.subset))))?;
    let (model, data) = a.inputs.load_on(job)?;
    let curv = job.agreed(|| a.spec.curvature(&model, a.mc.samples))?.with_communicator(job.comm());
    let op = CurvatureOperator::new(&curv, &data, a.inputs.batch_points(&curv, PerPoint::Sums, &data))?;
    // Replicated on every rank: the products are sums over ranks, the same bits everywhere.
    let ep = lanczos_top_k(&op, a.top_k as usize, a.tol, a.max_iter, a.spec.seed)?;
    let like = model.parameter_vector()?;
    let (vals, vecs) = ep.to_tensors(&like)?;
    let iters = Tensor::new(&[ep.iterations as i64], model.device())?;
    let out = [("eigenvalues".into(), vals), ("eigenvectors".into(), vecs), ("iterations".into(), iters)];
    job.on_root(|| laplace::io::write_results(&a.out, &out, &[]))?;
    Ok(format!("{}; {} Lanczos iterations", crate::summary::wrote(&a.out, &out), ep.iterations))
}

pub fn run_trace(a: &TraceArgs, job: &Job) -> laplace::Result<String> {
    if let Some(out) = &a.out {
        job.agreed(|| crate::args::check_out(out, &a.inputs.paths(Some(&a.spec.subset))))?;
    }
    let (model, data) = a.inputs.load_on(job)?;
    let curv = job.agreed(|| a.spec.curvature(&model, a.mc_samples))?.with_communicator(job.comm());
    let samples = a.samples as usize;
    let trace = match a.estimator {
        EstimatorArg::Exact => {
            let (_, d) = curv.diag_over(&data, a.inputs.batch_points(&curv, PerPoint::Sums, &data))?;
            tensor::to_vec_f64(&d)?.iter().sum()
        }
        EstimatorArg::Hutchinson => {
            let op = CurvatureOperator::new(&curv, &data, a.inputs.batch_points(&curv, PerPoint::Sums, &data))?;
            hutchinson_trace(&op, samples, a.spec.seed)?
        }
        EstimatorArg::Hutchpp => {
            let op = CurvatureOperator::new(&curv, &data, a.inputs.batch_points(&curv, PerPoint::Sums, &data))?;
            hutchpp_trace(&op, samples, a.spec.seed)?
        }
    };
    // The same bits on every rank (the products are sums over ranks).
    if !trace.is_finite() {
        return Err(laplace::Error::NonFinite(format!("the trace estimate is {trace}")));
    }
    job.on_root(|| {
        if let Some(out) = &a.out {
            let t = tensor::from_f64(vec![trace], &[1], model.dtype(), model.device())?;
            laplace::io::write_results(out, &[("trace".into(), t)], &[])?;
        }
        if a.json {
            println!("{}", serde_json::json!({"trace": trace, "estimator": format!("{:?}", a.estimator).to_lowercase(), "n_params": curv.n_params()}));
        } else {
            println!("{trace}");
        }
        Ok(())
    })?;
    let estimator = format!("{:?}", a.estimator).to_lowercase();
    let wrote = a.out.as_ref().map_or(String::new(), |o| format!("; wrote {}", o.display()));
    Ok(format!("trace over {} parameters by {estimator}{wrote}", curv.n_params()))
}
