//! `laplace bench`: time one quantity with model and data already loaded
//! (one warm-up run, then `--repeat` runs; the median is reported) and
//! report the process's peak resident memory. `bench/harness.py` runs it
//! side by side with laplace-torch.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use laplace::tensor::{self, Tensor};
use laplace::{Curvature, CurvatureKind, Dataset, Likelihood, PerPoint};

use crate::args::Inputs;
use crate::cmd_curvature::{CurvatureSpec, McSamples};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub spec: CurvatureSpec,
    #[command(flatten)]
    pub mc: McSamples,
    /// What to time: the curvature (default), Jacobians or per-sample gradients.
    #[arg(long, value_enum, default_value = "curvature")]
    pub quantity: QuantityArg,
    /// Timed runs after the warm-up.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeat: u64,
    /// Worker threads (sets RAYON_NUM_THREADS; default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the result (as `curvature` / `jacobians` / `gradients` would).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantityArg {
    Curvature,
    Jacobians,
    Gradients,
    /// One curvature-vector product (the Hessian's with --curvature hessian)
    /// over the data set, with a seeded standard-normal vector; writes v and Hv.
    Hvp,
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn compute(a: &BenchArgs, curv: &Curvature, data: &Dataset) -> laplace::Result<Vec<(String, Tensor)>> {
    let per_point = match a.quantity {
        QuantityArg::Jacobians => PerPoint::Jacobians,
        QuantityArg::Gradients => PerPoint::Gradients,
        _ => PerPoint::Sums,
    };
    let bs = a.inputs.batch_points(curv, per_point, data);
    Ok(match a.quantity {
        QuantityArg::Curvature => a.spec.compute(curv, data, bs)?.0,
        QuantityArg::Jacobians => {
            let (j, f) = curv.jacobians_over(data, bs, a.spec.subset.last_layer)?;
            vec![("J".into(), j), ("f".into(), f)]
        }
        QuantityArg::Gradients => {
            let (g, l) = curv.gradients_over(data, bs)?;
            vec![("G".into(), g), ("loss".into(), l)]
        }
        QuantityArg::Hvp => {
            let p = curv.n_params();
            let mut rng = laplace::rng::Rng::new(a.spec.seed);
            let v = tensor::from_f64((0..p).map(|_| rng.normal()).collect(), &[p], curv.model().dtype(), curv.model().device())?;
            let op = laplace::operator::CurvatureOperator::new(curv, data, bs)?;
            use laplace::operator::LinearOperator;
            let hv = op.matvec(&v)?;
            vec![("v".into(), v), ("Hv".into(), hv)]
        }
    })
}

pub fn run(a: &BenchArgs) -> laplace::Result<String> {
    if let Some(t) = a.threads {
        // Read by candle's matrix kernels and rayon when they first start.
        std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
    }
    if let Some(out) = &a.out {
        crate::args::check_out(out, &a.inputs.paths(Some(&a.spec.subset)))?;
    }
    let (model, data) = a.inputs.load()?;
    let kind = match a.quantity {
        QuantityArg::Curvature => a.spec.kind(a.mc.samples),
        QuantityArg::Jacobians => CurvatureKind::Ggn,
        QuantityArg::Gradients => CurvatureKind::Ef,
        QuantityArg::Hvp => a.spec.kind(a.mc.samples),
    };
    let lik: Likelihood = a.spec.likelihood;
    let curv = Curvature::new(&model, lik, kind, &a.spec.subset.subset(&model)?)?;
    let mut result = compute(a, &curv, &data)?; // warm-up
    let mut times = Vec::with_capacity(a.repeat as usize);
    for _ in 0..a.repeat {
        drop(std::mem::take(&mut result)); // do not hold two results at once
        let t0 = Instant::now();
        result = compute(a, &curv, &data)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let peak = peak_rss_bytes();
    let what = match a.quantity {
        QuantityArg::Curvature => format!("{:?} {:?}", a.spec.curvature, a.spec.structure).to_lowercase(),
        q => format!("{q:?}").to_lowercase(),
    };
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse::<usize>().ok());
    if a.json {
        let shapes: serde_json::Map<String, serde_json::Value> =
            result.iter().map(|(k, t)| (k.clone(), serde_json::json!(t.dims()))).collect();
        let obj = serde_json::json!({
            "quantity": what,
            "last_layer": a.spec.subset.last_layer,
            "median_s": median,
            "min_s": sorted[0],
            "times_s": times,
            "peak_rss_bytes": peak,
            "n_params": model.n_params(),
            "n_selected": curv.n_params(),
            "n_data": data.len(),
            "dtype": tensor::dtype_name(model.dtype()),
            "threads": threads,
            "shapes": shapes,
        });
        println!("{obj}");
    } else {
        println!(
            "{what}: median {median:.4} s over {} runs (min {:.4} s), peak RSS {:.1} MB, P = {}, N = {}",
            a.repeat,
            sorted[0],
            peak.unwrap_or(0) as f64 / 1e6,
            curv.n_params(),
            data.len()
        );
    }
    // The timing line above is the result; the summary only names a file.
    match &a.out {
        Some(out) => {
            laplace::io::write_results(out, &result, &[])?;
            Ok(crate::summary::wrote(out, &result))
        }
        None => Ok(String::new()),
    }
}
