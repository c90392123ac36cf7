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
use crate::cmd_curvature::{CurvatureArg, CurvatureSpec, McSamples, StructureArg};

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
    /// Also measure this machine's GEMM rate (faer, square N × N, same dtype
    /// and threads) and report it next to the quantity's achieved GFLOP/s
    /// (dense models only; see `dense_flops`).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "1024")]
    pub yardstick: Option<usize>,
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

/// Compute the quantity once, in batches of `bs` points.
fn compute(a: &BenchArgs, curv: &Curvature, data: &Dataset, bs: usize) -> laplace::Result<Vec<(String, Tensor)>> {
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

/// The multiply-add work of a quantity on a dense model (every parameterized
/// node a Linear on vectors: patch form G = 1, R = 1), counted as a
/// textbook implementation must do it, in floating-point operations; `None`
/// for other models. For M points, K output rows per point (C for the GGN
/// and Jacobians, S for the MC Fisher, 1 for the EF and gradients) and each
/// selected layer of O × I weights (the bias adds a column, I + 1):
///
/// ```text
/// forward                 2·M·O·I       every layer
/// backward                2·M·K·O·I     every layer after the first selected one
/// diag                    2·M·O·I       Σ_m (Σ_k s²)ᵀ u²
/// kron                    M·I² + M·K·O² the Gram matrices A = UᵀU, B = SᵀS (one triangle)
/// jacobians / gradients   M·K·O·I       the per-sample outer products
/// ```
///
/// Full matrices are left out: how little work they need depends on
/// structure (a single layer's GGN is Σ_n Λ_n ⊗ u_n u_nᵀ, C times less than
/// the Gram of its per-sample gradients), so no one count is fair.
fn dense_flops(a: &BenchArgs, curv: &Curvature, m: usize) -> Option<f64> {
    let model = curv.model();
    let mut layers = Vec::new();
    for (i, node) in model.nodes().iter().enumerate() {
        if let Some(aff) = node.op.affine() {
            let (o, inp, r) = aff.affine_dims();
            if r != 1 || aff.groups() != 1 {
                return None;
            }
            let has_bias = model.params().iter().any(|p| p.layer == i && p.is_bias());
            layers.push((i, o as f64, inp as f64, has_bias));
        }
    }
    let selected: Vec<bool> = layers.iter().map(|&(i, ..)| curv.selection().layer(i).is_some()).collect();
    let first = selected.iter().position(|&s| s)?;
    let (m, c) = (m as f64, model.n_outputs() as f64);
    let k = match a.quantity {
        QuantityArg::Jacobians => c,
        QuantityArg::Gradients => 1.0,
        QuantityArg::Curvature => match a.spec.curvature {
            CurvatureArg::Ggn => c,
            CurvatureArg::FisherMc => a.mc.samples as f64,
            CurvatureArg::Ef => 1.0,
            CurvatureArg::Hessian => return None,
        },
        QuantityArg::Hvp => return None,
    };
    let mut flops = 0.0;
    for (j, &(_, o, i, bias)) in layers.iter().enumerate() {
        flops += 2.0 * m * o * i;
        if j > first {
            flops += 2.0 * m * k * o * i;
        }
        if !selected[j] {
            continue;
        }
        let ib = if bias { i + 1.0 } else { i };
        flops += match (a.quantity, a.spec.structure) {
            (QuantityArg::Curvature, StructureArg::Diag) => 2.0 * m * o * ib,
            (QuantityArg::Curvature, StructureArg::Kron) => m * ib * ib + m * k * o * o,
            (QuantityArg::Curvature, StructureArg::Full) => return None,
            _ => m * k * o * ib,
        };
    }
    Some(flops)
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
    // The batch size is resolved once, outside the timed runs.
    let per_point = match a.quantity {
        QuantityArg::Jacobians => PerPoint::Jacobians,
        QuantityArg::Gradients => PerPoint::Gradients,
        QuantityArg::Curvature => a.spec.per_point(),
        QuantityArg::Hvp => PerPoint::Sums,
    };
    let bs = a.inputs.batch_points(&curv, per_point, &data);
    let mut result = compute(a, &curv, &data, bs)?; // warm-up
    let mut times = Vec::with_capacity(a.repeat as usize);
    for _ in 0..a.repeat {
        drop(std::mem::take(&mut result)); // do not hold two results at once
        let t0 = Instant::now();
        result = compute(a, &curv, &data, bs)?;
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
    let achieved = dense_flops(a, &curv, data.len()).map(|f| f / median / 1e9);
    let peak_gflops = a.yardstick.map(|n| laplace::linalg::gemm_gflops(n, model.dtype(), 5)).transpose()?;
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
            "batch_points": bs,
            "point_working_bytes": curv.point_working_bytes(per_point),
            "dtype": tensor::dtype_name(model.dtype()),
            "threads": threads,
            "shapes": shapes,
            "gflops": achieved,
            "gemm_peak_gflops": peak_gflops,
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
        if let Some(g) = achieved {
            match peak_gflops {
                Some(peak) => println!("  {g:.1} GFLOP/s of dense work, {:.0} % of the measured GEMM rate {peak:.1} GFLOP/s", 100.0 * g / peak),
                None => println!("  {g:.1} GFLOP/s of dense work (--yardstick: against this machine's GEMM rate)"),
            }
        }
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
