//! `laplace demo`: the main job on the bundled example, with a readable
//! summary. The example (`examples/digits/`, see its README for provenance
//! and license) is compiled into the binary, so the demo runs anywhere.

use std::time::Instant;

use clap::Args;
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Curvature, CurvatureKind, Dataset, Likelihood, ModelSpec, Sequential, Subset};

use crate::args::DTypeArg;
use crate::plot::{self, Canvas, Panel};
use laplace::posterior::marglik::{MarglikOptions, PriorStructure};
use laplace::posterior::metrics::{self, ClassificationMetrics};
use laplace::posterior::predict::Link;
use laplace::posterior::{FitOptions, Posterior, Structure};

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
    /// Where the figures go.
    #[arg(long, default_value = "demo-output")]
    pub out_dir: std::path::PathBuf,
}

/// Load an embedded .npz through a temporary file (numpy archives are read from paths).
fn load_npz(bytes: &[u8], name: &str, dtype: DType) -> laplace::Result<Dataset> {
    // A fresh directory with a random name, created exclusively (mode 0700):
    // a predictable name could be pre-planted as a symlink. Removed on drop.
    let dir = tempfile::Builder::new()
        .prefix("laplace-demo-")
        .tempdir()
        .map_err(|e| laplace::Error::Io { path: std::env::temp_dir(), source: e })?;
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).map_err(|e| laplace::Error::Io { path: path.clone(), source: e })?;
    Dataset::load(&path, dtype, &Device::Cpu)
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
    let layers: Vec<&str> = model.nodes().iter().map(|n| n.op.type_name()).collect();
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
    laplace_part(a, model, &train, &test)
}

/// Out-of-distribution inputs: images of uniform noise, seeded.
fn noise_images(n: usize, like: &Dataset) -> laplace::Result<Tensor> {
    let mut rng = laplace::rng::Rng::new(1);
    let shape = like.x.first().dims()[1..].to_vec();
    let per: usize = shape.iter().product();
    let mut dims = vec![n];
    dims.extend(shape);
    tensor::from_f64((0..n * per).map(|_| rng.uniform()).collect(), &dims, like.x.first().dtype(), like.x.first().device())
}

/// Top-class confidence of every row.
fn confidences(probs: &Tensor) -> laplace::Result<Vec<f64>> {
    let (n, c) = probs.dims2()?;
    let p = tensor::to_vec_f64(probs)?;
    Ok((0..n).map(|i| p[i * c..(i + 1) * c].iter().cloned().fold(0.0, f64::max)).collect())
}

/// Posteriors, evidence-tuned priors, MAP vs Laplace on held-out data, figures.
fn laplace_part(a: &DemoArgs, model: Sequential, train: &Dataset, test: &Dataset) -> laplace::Result<()> {
    let lik = Likelihood::Classification;
    let labels = tensor::to_vec_i64(test.targets()?)?;
    let ood = noise_images(test.len(), test)?;
    let map_probs = laplace::likelihood::softmax(&model.forward(&test.x)?.to_dtype(DType::F64)?)?;
    let map_ood = laplace::likelihood::softmax(&model.forward(&ood)?.to_dtype(DType::F64)?)?;
    let mut rows: Vec<(String, ClassificationMetrics, Tensor, Tensor, String)> = vec![(
        "MAP".into(),
        metrics::classification(&map_probs, &labels)?,
        map_probs,
        map_ood,
        String::new(),
    )];
    println!("\n  Laplace posteriors (GGN; prior precision per parameter tensor, tuned by the marginal likelihood)");
    for (name, subset, structure) in [("Laplace KFAC", Subset::All, Structure::Kron), ("Laplace last layer", Subset::LastLayer, Structure::Full)] {
        let t0 = Instant::now();
        let opts = FitOptions { subset, structure, batch_size: a.batch_size, ..FitOptions::default() };
        let mut post = Posterior::fit(model.try_clone()?, train, lik, &opts)?;
        let before = post.evidence()?;
        let rep = post.optimize_marglik(&MarglikOptions { prior_structure: PriorStructure::Layerwise, ..MarglikOptions::default() })?;
        let probs = post.predict_probs(&test.x, Link::Probit)?;
        let ood_probs = post.predict_probs(&ood, Link::Probit)?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "    {name:<20} {:>6} parameters  log evidence {before:>10.2} -> {:>10.2} (laplace-torch's Adam alone: {:>10.2})  {secs:.1} s",
            post.n_params(),
            rep.log_marglik,
            rep.adam_log_marglik
        );
        let prec: Vec<String> = rep.prior_precision.iter().map(|p| format!("{p:.3}")).collect();
        rows.push((name.into(), metrics::classification(&probs, &labels)?, probs, ood_probs, prec.join(", ")));
    }
    println!("\n  held-out digits ({} images) and uniform-noise images (out of distribution)", test.len());
    println!("    {:<20} {:>9} {:>8} {:>8} {:>8} {:>22}", "", "accuracy", "NLL", "ECE", "Brier", "mean confidence (OOD)");
    for (name, m, _, ood, _) in &rows {
        let c = confidences(ood)?;
        let mc = c.iter().sum::<f64>() / c.len() as f64;
        println!("    {name:<20} {:>9.4} {:>8.4} {:>8.4} {:>8.4} {:>22.4}", m.accuracy, m.nll, m.ece, m.brier, mc);
    }
    std::fs::create_dir_all(&a.out_dir).map_err(|e| laplace::Error::Io { path: a.out_dir.clone(), source: e })?;
    let rel = a.out_dir.join("reliability.png");
    let unc = a.out_dir.join("uncertainty.png");
    reliability_figure(&rows, &labels, &rel)?;
    uncertainty_figure(&rows, &unc)?;
    println!("\n  figures: {}\n           {}", rel.display(), unc.display());
    Ok(())
}

const COLORS: [plot::Rgb; 3] = [plot::BLUE, plot::ORANGE, plot::GREEN];

fn io_err(path: &std::path::Path) -> impl Fn(std::io::Error) -> laplace::Error + '_ {
    move |e| laplace::Error::Io { path: path.to_path_buf(), source: e }
}

/// Accuracy against confidence per bin (10 bins), one line per method.
fn reliability_figure(rows: &[(String, ClassificationMetrics, Tensor, Tensor, String)], labels: &[i64], path: &std::path::Path) -> laplace::Result<()> {
    let mut cv = Canvas::new(760, 620);
    let panel = Panel { x0: 130, y0: 70, w: 560, h: 440 };
    panel.axes(&mut cv, "RELIABILITY (HELD-OUT DIGITS)", "CONFIDENCE", "ACCURACY", 1.0);
    cv.line(panel.px(0.0), panel.py(0.0), panel.px(1.0), panel.py(1.0), plot::BLACK, 1);
    for (k, (name, m, probs, _, _)) in rows.iter().enumerate() {
        let bins = metrics::reliability(probs, labels, 10)?;
        let pts: Vec<(i64, i64)> = bins.iter().filter(|b| b.2 > 0).map(|b| (panel.px(b.0), panel.py(b.1))).collect();
        for w in pts.windows(2) {
            cv.line(w[0].0, w[0].1, w[1].0, w[1].1, COLORS[k], 3);
        }
        for p in &pts {
            cv.rect(p.0 - 4, p.1 - 4, p.0 + 4, p.1 + 4, COLORS[k]);
        }
        let label = format!("{name} ECE {:.3}", m.ece);
        let y = panel.y0 + 20 + 22 * k as i64;
        cv.rect(panel.x0 + 20, y, panel.x0 + 34, y + 12, COLORS[k]);
        cv.text(panel.x0 + 42, y, 2, plot::BLACK, &label);
    }
    cv.save_png(path).map_err(io_err(path))
}

/// Histograms of the top-class confidence on test digits and on noise, per method.
fn uncertainty_figure(rows: &[(String, ClassificationMetrics, Tensor, Tensor, String)], path: &std::path::Path) -> laplace::Result<()> {
    let n = rows.len() as i64;
    let mut cv = Canvas::new((n * 460 + 100) as usize, 560);
    let bins = 10;
    for (k, (name, _, probs, ood, _)) in rows.iter().enumerate() {
        let panel = Panel { x0: 120 + 460 * k as i64, y0: 70, w: 340, h: 400 };
        panel.axes(&mut cv, &name.to_uppercase(), "CONFIDENCE", "FRACTION", 1.0);
        for (series, data) in [(0, confidences(probs)?), (1, confidences(ood)?)] {
            let mut h = vec![0usize; bins];
            for c in &data {
                h[((c * bins as f64).ceil() as usize).clamp(1, bins) - 1] += 1;
            }
            for (b, &cnt) in h.iter().enumerate() {
                let frac = cnt as f64 / data.len() as f64;
                let x0 = panel.px(b as f64 / bins as f64) + 2 + series * 15;
                cv.rect(x0, panel.py(frac), x0 + 13, panel.py(0.0) - 1, if series == 0 { plot::BLUE } else { plot::RED });
            }
        }
        if k == 0 {
            cv.rect(panel.x0 + 20, panel.y0 + 20, panel.x0 + 34, panel.y0 + 32, plot::BLUE);
            cv.text(panel.x0 + 42, panel.y0 + 20, 2, plot::BLACK, "DIGITS");
            cv.rect(panel.x0 + 20, panel.y0 + 42, panel.x0 + 34, panel.y0 + 54, plot::RED);
            cv.text(panel.x0 + 42, panel.y0 + 42, 2, plot::BLACK, "NOISE (OOD)");
        }
    }
    cv.save_png(path).map_err(io_err(path))
}
