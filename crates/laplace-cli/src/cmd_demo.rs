//! `laplace demo`: the main job on the bundled example, with a readable
//! summary. The example (`examples/digits/`, see its README for provenance
//! and license) is compiled into the binary, so the demo runs anywhere.

use std::time::Instant;

use clap::Args;
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Curvature, CurvatureKind, Dataset, Likelihood, ModelSpec, Sequential, Subset};

use crate::args::DTypeArg;

macro_rules! example_file {
    ($name:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/digits/", $name))
    };
}

const MODEL_JSON: &[u8] = example_file!("model.json");
const WEIGHTS: &[u8] = example_file!("weights.safetensors");
const TRAIN: &[u8] = example_file!("train.npz");
const TEST: &[u8] = example_file!("test.npz");
const REFERENCE: &[u8] = example_file!("reference.json");

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Compute dtype (the example's weights are f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Points per batch.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
}

/// Load an embedded .npz through a temporary file (numpy archives are read from paths).
fn load_npz(bytes: &[u8], name: &str, dtype: DType) -> laplace::Result<Dataset> {
    let dir = std::env::temp_dir().join(format!("laplace-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| laplace::Error::Io { path: dir.clone(), source: e })?;
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| laplace::Error::Io { path: path.clone(), source: e })?;
    let data = Dataset::load(&path, dtype, &Device::Cpu);
    let _ = std::fs::remove_dir_all(&dir);
    data
}

fn sum(t: &Tensor) -> laplace::Result<f64> {
    Ok(tensor::to_vec_f64(t)?.iter().sum())
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// A curvature diagonal and the loss over the data set, timed.
fn diag_over(curv: &Curvature, data: &Dataset, batch: usize) -> laplace::Result<(f64, Tensor, f64)> {
    let t0 = Instant::now();
    let (l, d) = curv.diag_over(data, batch)?;
    Ok((tensor::scalar_f64(&l)?, d, t0.elapsed().as_secs_f64()))
}

pub fn run(a: &DemoArgs) -> laplace::Result<()> {
    let dtype = match a.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F64 => DType::F64,
    };
    let dev = Device::Cpu;
    let spec = ModelSpec::from_json(std::str::from_utf8(MODEL_JSON).expect("model.json is UTF-8"))?;
    let weights = laplace::io::read_safetensors_bytes(WEIGHTS, &dev)?;
    let model = Sequential::new(spec, weights, Some(dtype), &dev)?;
    let train = load_npz(TRAIN, "train.npz", dtype)?;
    let test = load_npz(TEST, "test.npz", dtype)?;
    let reference: serde_json::Value = serde_json::from_slice(REFERENCE).expect("reference.json is JSON");
    let lik = Likelihood::Classification;

    println!("laplace demo: curvature of a small CNN trained on scikit-learn's digits");
    println!("  (examples/digits: UCI Optical Recognition of Handwritten Digits, CC BY 4.0)");
    let layers: Vec<&str> = model.layers().iter().map(|l| l.type_name()).collect();
    println!("  model  {}", layers.join(" → "));
    println!(
        "         {} parameters, input {:?}, {} classes, computing in {}",
        model.n_params(),
        model.input_shape(),
        model.n_outputs(),
        tensor::dtype_name(dtype)
    );
    println!("  data   {} training images, {} test images\n", train.len(), test.len());

    // MAP accuracy on the test set, as a sanity check of the loaded model.
    let f = model.forward(&test.x)?;
    let pred = tensor::to_vec_i64(&f.argmax(1)?)?;
    let truth = tensor::to_vec_i64(test.targets()?)?;
    let correct = pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
    println!("  test accuracy of the MAP network: {:.2}%\n", 100.0 * correct as f64 / test.len() as f64);

    let all = Subset::All;
    let ggn = Curvature::new(&model, lik, CurvatureKind::Ggn, &all)?;
    let (loss, ggn_diag, t_ggn) = diag_over(&ggn, &train, a.batch_size)?;
    let mc = Curvature::new(&model, lik, CurvatureKind::FisherMc { samples: 1, seed: 0 }, &all)?;
    let (_, mc_diag, t_mc) = diag_over(&mc, &train, a.batch_size)?;
    let ef = Curvature::new(&model, lik, CurvatureKind::Ef, &all)?;
    let (_, ef_diag, t_ef) = diag_over(&ef, &train, a.batch_size)?;

    let t0 = Instant::now();
    let ll = Curvature::new(&model, lik, CurvatureKind::Ggn, &Subset::LastLayer)?;
    let (_, ll_h) = ll.full_over(&train, a.batch_size)?;
    let t_ll = t0.elapsed().as_secs_f64();
    let mut eig = laplace::linalg::symmetric_eigenvalues(&ll_h)?;
    eig.reverse();
    let ll_trace: f64 = eig.iter().sum();

    let t0 = Instant::now();
    let (j, _) = ggn.jacobians(&test.inputs(0, 8)?)?;
    let t_j = t0.elapsed().as_secs_f64();

    let mc_err = {
        let (a, b) = (tensor::to_vec_f64(&mc_diag)?, tensor::to_vec_f64(&ggn_diag)?);
        let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
        num / b.iter().map(|y| y * y).sum::<f64>().sqrt()
    };

    println!("  quantity over the {} training images              value      seconds", train.len());
    println!("  loss Σ_n ℓ_n                                 {:>14.6}", loss);
    println!("  GGN diagonal (exact, √Λ pushed back), sum    {:>14.4}   {t_ggn:>8.3}", sum(&ggn_diag)?);
    println!(
        "  MC Fisher diagonal (1 sample), sum           {:>14.4}   {t_mc:>8.3}   (‖·−GGN‖/‖GGN‖ = {mc_err:.3})",
        sum(&mc_diag)?
    );
    println!("  empirical Fisher diagonal, sum              {:>14.4}   {t_ef:>8.3}", sum(&ef_diag)?);
    println!(
        "  last-layer GGN, full {}×{}: trace           {:>14.4}   {t_ll:>8.3}",
        ll_h.dim(0)?,
        ll_h.dim(1)?,
        ll_trace
    );
    println!(
        "      top eigenvalues {}",
        eig.iter().take(5).map(|e| format!("{e:.3}")).collect::<Vec<_>>().join(", ")
    );
    println!("  Jacobians of 8 test images: shape {:?}                {t_j:>8.3}", j.dims());

    println!("\n  GGN diagonal per parameter tensor (sum, mean):");
    let d = tensor::to_vec_f64(&ggn_diag)?;
    for p in model.params() {
        let s: f64 = d[p.offset..p.offset + p.numel].iter().sum();
        println!("    {:<10} {:>16} {:>12.4} {:>12.4e}", p.name, format!("{:?}", p.shape), s, s / p.numel as f64);
    }

    // Against laplace-torch (float64, computed by tools/examples/train_digits.py).
    let r = |path: &[&str]| -> f64 {
        let mut v = &reference;
        for k in path {
            v = &v[*k];
        }
        v.as_f64().unwrap_or(f64::NAN)
    };
    let checks = [
        ("loss", loss, r(&["loss_sum"])),
        ("GGN diagonal sum", sum(&ggn_diag)?, r(&["diag_ggn_exact", "sum"])),
        ("EF diagonal sum", sum(&ef_diag)?, r(&["diag_ef", "sum"])),
        ("last-layer GGN trace", ll_trace, r(&["last_layer_ggn_full", "trace"])),
        ("last-layer GGN top eigenvalue", eig[0], reference["last_layer_ggn_full"]["top5_eigenvalues"][0].as_f64().unwrap_or(f64::NAN)),
    ];
    println!("\n  against laplace-torch 0.3 (float64, examples/digits/reference.json):");
    let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
    let mut ok = true;
    for (what, ours, theirs) in checks {
        let e = rel(ours, theirs);
        ok &= e <= tol;
        println!("    {what:<30} ours {ours:>16.8}  laplace-torch {theirs:>16.8}  rel. diff {e:.1e}");
    }
    println!(
        "  {}",
        if ok {
            format!("all agree within {tol:.0e} (relative)")
        } else {
            format!("DISAGREEMENT beyond {tol:.0e}")
        }
    );
    if !ok {
        return Err(laplace::Error::NonFinite("demo results disagree with the laplace-torch reference".into()));
    }
    Ok(())
}
