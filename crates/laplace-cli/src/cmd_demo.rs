//! `laplace demo`: what a Laplace approximation is for, on a real network.
//!
//! The example (`examples/digits/`, see its README for provenance and
//! license) is a small CNN trained on scikit-learn's digits to near-zero
//! training loss, as real networks are: its MAP predictions are
//! overconfident, on held-out digits and far more on inputs unlike any
//! digit. The demo first checks the curvature behind the posteriors against
//! laplace-torch, then compares MAP with a last-layer and an all-weights
//! Laplace posterior on held-out digits (accuracy, NLL, ECE, Brier) and on
//! out-of-distribution inputs (AUROC of in vs out by confidence, and the
//! mean confidence on them), says in a sentence why wherever a posterior
//! does worse than MAP, and draws the reliability diagrams and confidence
//! histograms. The example is compiled into the binary, so the demo runs
//! anywhere; every pass over data shows a progress bar on a terminal.

use std::time::Instant;

use clap::Args;
use laplace::inputs::Inputs;
use laplace::pass::{fold_batches, Monitor};
use laplace::posterior::marglik::{MarglikOptions, PriorStructure};
use laplace::posterior::metrics::{self, ClassificationMetrics};
use laplace::posterior::predict::Link;
use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{BatchSize, Curvature, CurvatureKind, Dataset, Likelihood, ModelSpec, Sequential, Subset};

use crate::args::DTypeArg;
use crate::plot::{self, ConfidenceHistograms, ConfidencePanel, Reliability, ReliabilityPanel};
use crate::progress::TerminalBar;

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

/// Points per predictive batch: the all-weights GLM predictive holds the
/// batch's Jacobians `(B, C, P)` in f64 (32 × 10 × 9,802 × 8 B = 25 MB); the
/// library's default chunk (2²⁵ elements, 256 MiB) is what made the demo
/// peak near 1 GB.
const PREDICT_BATCH: usize = 32;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Compute dtype (the example's weights are f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Points per batch of the curvature passes.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Where the figures, metrics.json and predictions.safetensors go.
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

pub fn run(a: &DemoArgs) -> laplace::Result<String> {
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
    let bar = TerminalBar::new(true);

    println!("laplace demo: what a Laplace posterior adds to a trained network");
    println!("  data   scikit-learn's digits (UCI Optical Recognition of Handwritten Digits, CC BY 4.0),");
    println!("         8×8 images: {} to train on, {} held out", train.len(), test.len());
    let layers: Vec<&str> = model.nodes().iter().map(|n| n.op.type_name()).collect();
    println!("  model  {}", layers.join(" → "));
    println!(
        "         {} parameters, trained to near-zero training loss (examples/digits/README.md); computing in {}\n",
        model.n_params(),
        tensor::dtype_name(dtype)
    );

    check_curvature(&model, &train, &test, a.batch_size, dtype, &bar)?;
    let written = compare_posteriors(a, model, &train, &test, &bar)?;
    let names: Vec<String> = written.iter().filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned())).collect();
    Ok(format!("wrote {}: {}", a.out_dir.display(), names.join(", ")))
}

/// Part 1: the curvatures behind the posteriors, checked against the
/// numbers laplace-torch computed for the same files (`reference.json`).
fn check_curvature(model: &Sequential, train: &Dataset, test: &Dataset, batch: usize, dtype: DType, bar: &dyn Monitor) -> laplace::Result<()> {
    let reference: serde_json::Value = serde_json::from_slice(REFERENCE).expect("reference.json is JSON");
    let lik = Likelihood::Classification;
    let timed = |f: &mut dyn FnMut() -> laplace::Result<(Tensor, Tensor)>| -> laplace::Result<(f64, Tensor, f64)> {
        let t0 = Instant::now();
        let (l, d) = f()?;
        Ok((tensor::scalar_f64(&l)?, d, t0.elapsed().as_secs_f64()))
    };
    let all = Subset::All;
    let ggn = Curvature::new(model, lik, CurvatureKind::Ggn, &all)?.with_monitor(bar);
    let (loss, ggn_diag, t_ggn) = timed(&mut || ggn.diag_over(train, batch))?;
    let mc = Curvature::new(model, lik, CurvatureKind::FisherMc { samples: 1, seed: 0 }, &all)?.with_monitor(bar);
    let (_, mc_diag, t_mc) = timed(&mut || mc.diag_over(train, batch))?;
    let ef = Curvature::new(model, lik, CurvatureKind::Ef, &all)?.with_monitor(bar);
    let (_, ef_diag, t_ef) = timed(&mut || ef.diag_over(train, batch))?;
    let ll = Curvature::new(model, lik, CurvatureKind::Ggn, &Subset::LastLayer)?.with_monitor(bar);
    let (_, ll_h, t_ll) = timed(&mut || ll.full_over(train, batch))?;
    let mut eig = laplace::linalg::symmetric_eigenvalues(&ll_h)?;
    eig.reverse();
    let ll_trace: f64 = eig.iter().sum();
    let t0 = Instant::now();
    let (j, _) = ggn.jacobians(&test.inputs(0, 8)?)?;
    let t_j = t0.elapsed().as_secs_f64();
    let mc_err = {
        let (m, g) = (tensor::to_vec_f64(&mc_diag)?, tensor::to_vec_f64(&ggn_diag)?);
        let num: f64 = m.iter().zip(&g).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
        num / g.iter().map(|y| y * y).sum::<f64>().sqrt()
    };

    let r = |path: &[&str]| path.iter().fold(&reference, |v, k| &v[*k]).as_f64().unwrap_or(f64::NAN);
    let top_ref = reference["last_layer_ggn_full"]["top5_eigenvalues"][0].as_f64().unwrap_or(f64::NAN);
    let rows: [(&str, f64, f64, f64); 6] = [
        ("loss Σ_n ℓ_n", loss, r(&["loss_sum"]), t_ggn),
        ("GGN diagonal (exact), sum", sum(&ggn_diag)?, r(&["diag_ggn_exact", "sum"]), t_ggn),
        ("empirical Fisher diagonal, sum", sum(&ef_diag)?, r(&["diag_ef", "sum"]), t_ef),
        ("last-layer GGN (330×330), trace", ll_trace, r(&["last_layer_ggn_full", "trace"]), t_ll),
        ("last-layer GGN, top eigenvalue", eig[0], top_ref, t_ll),
        ("MC Fisher diagonal (1 sample), sum", sum(&mc_diag)?, f64::NAN, t_mc),
    ];
    println!("  1. curvature over the {} training images, against laplace-torch 0.3 (float64, reference.json)", train.len());
    println!("     {:<36} {:>16} {:>16} {:>10} {:>9}", "quantity", "laplace-rs", "laplace-torch", "rel. diff", "seconds");
    let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
    let mut ok = true;
    for (what, ours, theirs, secs) in rows {
        if theirs.is_nan() {
            println!("     {what:<36} {ours:>16.6} {:>16} {:>10} {secs:>9.3}", "(random)", "");
            continue;
        }
        let e = rel(ours, theirs);
        ok &= e <= tol;
        println!("     {what:<36} {ours:>16.6} {theirs:>16.6} {e:>10.1e} {secs:>9.3}");
    }
    println!("     MC Fisher vs GGN diagonal: ‖·−GGN‖/‖GGN‖ = {mc_err:.3}; Jacobians of 8 test images {:?} in {t_j:.3} s", j.dims());
    if !ok {
        return Err(laplace::Error::NonFinite(format!("demo results disagree with the laplace-torch reference beyond {tol:.0e}")));
    }
    println!("     all agree within {tol:.0e} (relative)\n");
    Ok(())
}

/// The data sets predictions are made on: held-out digits, then the
/// out-of-distribution sets.
struct EvalSets {
    names: [&'static str; 3],
    keys: [&'static str; 3],
    data: [Dataset; 3],
}

/// The test digits turned by 90° (counter-clockwise, like `torch.rot90`):
/// still digit-like strokes, but no digit the network has seen.
fn rotated(test: &Dataset) -> laplace::Result<Dataset> {
    let x = test.x.first();
    let dims = x.dims().to_vec();
    let (n, h, w) = (dims[0], dims[2], dims[3]);
    if dims[1] != 1 || h != w {
        return Err(laplace::Error::Invalid(format!("rotating needs square one-channel images, got {dims:?}")));
    }
    let v = tensor::to_vec_f64(x)?;
    let mut out = vec![0.0; v.len()];
    for i in 0..n {
        for r in 0..h {
            for c in 0..w {
                out[i * h * w + r * w + c] = v[i * h * w + c * w + (w - 1 - r)];
            }
        }
    }
    Ok(Dataset { x: Inputs::from(tensor::from_f64(out, &dims, x.dtype(), x.device())?), y: None })
}

/// Images of uniform noise in [0, 1], seeded, as many as the test set.
fn noise(test: &Dataset) -> laplace::Result<Dataset> {
    let x = test.x.first();
    let mut rng = laplace::rng::Rng::new(1);
    let n: usize = x.dims().iter().product();
    Ok(Dataset { x: Inputs::from(tensor::from_f64((0..n).map(|_| rng.uniform()).collect(), x.dims(), x.dtype(), x.device())?), y: None })
}

/// Top-class confidence of every row of `(N, C)` probabilities.
fn confidences(probs: &Tensor) -> laplace::Result<Vec<f64>> {
    let (n, c) = probs.dims2()?;
    let p = tensor::to_vec_f64(probs)?;
    Ok((0..n).map(|i| p[i * c..(i + 1) * c].iter().cloned().fold(0.0, f64::max)).collect())
}

/// Area under the ROC curve for telling `inside` from `outside` points by
/// their score (higher = inside): P(score_in > score_out), ties counted
/// half (Mann–Whitney U with average ranks). 1 separates perfectly, 0.5 is
/// chance.
pub fn auroc(inside: &[f64], outside: &[f64]) -> f64 {
    let mut all: Vec<(f64, bool)> = inside.iter().map(|&s| (s, true)).chain(outside.iter().map(|&s| (s, false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0; // mean of ranks i+1 ..= j
        rank_sum += avg * all[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    let (n_in, n_out) = (inside.len() as f64, outside.len() as f64);
    (rank_sum - n_in * (n_in + 1.0) / 2.0) / (n_in * n_out)
}

/// One row of the comparison.
struct Row {
    key: &'static str,
    label: &'static str,
    n_params: usize,
    /// Class probabilities (f64) on each evaluation set.
    probs: Vec<Tensor>,
    metrics: ClassificationMetrics,
    /// Top-class confidences on each evaluation set.
    conf: Vec<Vec<f64>>,
    /// Per out-of-distribution set: AUROC (test vs it) and mean confidence.
    ood: Vec<(f64, f64)>,
    seconds: f64,
    /// Prior precision and log evidence (posteriors only).
    prior: Vec<f64>,
    log_evidence: Option<f64>,
}

impl Row {
    fn new(key: &'static str, label: &'static str, n_params: usize, probs: Vec<Tensor>, labels: &[i64], seconds: f64) -> laplace::Result<Self> {
        let conf = probs.iter().map(confidences).collect::<laplace::Result<Vec<_>>>()?;
        let ood = conf[1..].iter().map(|c| (auroc(&conf[0], c), mean(c))).collect();
        let metrics = metrics::classification(&probs[0], labels)?;
        Ok(Row { key, label, n_params, probs, metrics, conf, ood, seconds, prior: Vec::new(), log_evidence: None })
    }

    fn mean_confidence(&self) -> f64 {
        mean(&self.conf[0])
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Probabilities `(N, C)` on every point of `data`, `PREDICT_BATCH` points at a time.
fn predict_over(data: &Dataset, what: &str, bar: &dyn Monitor, f: impl Fn(&Inputs) -> laplace::Result<Tensor>) -> laplace::Result<Tensor> {
    let parts = fold_batches(data, PREDICT_BATCH, bar, what, Vec::new(), |mut parts, o, n| {
        parts.push(f(&data.inputs(o, n)?)?);
        Ok(parts)
    })?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// The posteriors compared with MAP.
struct Method {
    key: &'static str,
    label: &'static str,
    subset: Subset,
    structure: Structure,
    prior: PriorStructure,
}

///
/// Both with a scalar prior: its evidence maximum is found in milliseconds.
/// All weights with KFAC, or per-tensor priors, took 20–90 s in
/// `optimize_marglik` on the demo's 2 shared cores (every evidence
/// evaluation refactors the curvature), and KFAC's GLM predictive cost ~10×
/// the diagonal's: over the demo's 20 s budget.
fn methods() -> [Method; 2] {
    [
        Method { key: "last_layer", label: "last layer, full", subset: Subset::LastLayer, structure: Structure::Full, prior: PriorStructure::Scalar },
        Method { key: "all_weights", label: "all weights, diag", subset: Subset::All, structure: Structure::Diag, prior: PriorStructure::Scalar },
    ]
}

/// Part 2: MAP vs Laplace on held-out digits and on inputs unlike any digit.
fn compare_posteriors(a: &DemoArgs, model: Sequential, train: &Dataset, test: &Dataset, bar: &dyn Monitor) -> laplace::Result<Vec<std::path::PathBuf>> {
    let labels = tensor::to_vec_i64(test.targets()?)?;
    let sets = EvalSets {
        names: ["held-out digits", "rotated digits", "uniform noise"],
        keys: ["test", "rotated", "noise"],
        data: [Dataset { x: test.x.clone(), y: None }, rotated(test)?, noise(test)?],
    };
    let predict_all = |label: &str, f: &dyn Fn(&Inputs) -> laplace::Result<Tensor>| -> laplace::Result<Vec<Tensor>> {
        sets.data.iter().zip(sets.names).map(|(d, n)| predict_over(d, &format!("{label}: predicting {n}"), bar, f)).collect()
    };

    let t0 = Instant::now();
    let map_probs = predict_all("MAP", &|x| laplace::likelihood::softmax(&model.forward(x)?.to_dtype(DType::F64)?))?;
    let mut rows = vec![Row::new("map", "MAP", 0, map_probs, &labels, t0.elapsed().as_secs_f64())?];

    println!("  2. Laplace posteriors: GGN at the MAP, prior precision maximizing the marginal likelihood,");
    println!("     linearized (GLM) predictive with the probit link");
    for m in methods() {
        let t0 = Instant::now();
        let opts = FitOptions { subset: m.subset.clone(), structure: m.structure, batch_size: BatchSize::Points(a.batch_size), ..FitOptions::default() };
        let mut post = Posterior::fit_monitored(model.try_clone()?, train, Likelihood::Classification, &opts, bar)?;
        let rep = post.optimize_marglik(&MarglikOptions { prior_structure: m.prior, ..MarglikOptions::default() })?;
        let probs = predict_all(m.label, &|x| post.predict_probs(x, Link::Probit))?;
        let mut row = Row::new(m.key, m.label, post.n_params(), probs, &labels, t0.elapsed().as_secs_f64())?;
        row.prior = rep.prior_precision.clone();
        row.log_evidence = Some(rep.log_marglik);
        let prior: Vec<String> = rep.prior_precision.iter().map(|p| format!("{p:.3}")).collect();
        println!(
            "     {:<18} {:>5} parameters, log evidence {:>9.2}, prior precision {} ({:.1} s)",
            m.label,
            post.n_params(),
            rep.log_marglik,
            if prior.len() == 1 { prior[0].clone() } else { format!("per tensor [{}]", prior.join(", ")) },
            row.seconds
        );
        rows.push(row);
    }

    print_table(&rows, &sets, test.len());
    explain(&rows, &sets);
    write_outputs(a, &rows, &sets, &labels)
}

fn print_table(rows: &[Row], sets: &EvalSets, n_test: usize) {
    println!("\n     {:<18} {:<35} | {:<18} | {:<18}", "", format!("{} ({n_test})", sets.names[0]), sets.names[1], sets.names[2]);
    println!("     {:<18} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>9} | {:>8} {:>9}", "", "accuracy", "NLL", "ECE", "Brier", "AUROC", "mean conf", "AUROC", "mean conf");
    for r in rows {
        let m = &r.metrics;
        println!(
            "     {:<18} {:>8.4} {:>8.4} {:>8.4} {:>8.4} | {:>8.3} {:>9.3} | {:>8.3} {:>9.3}",
            r.label, m.accuracy, m.nll, m.ece, m.brier, r.ood[0].0, r.ood[0].1, r.ood[1].0, r.ood[1].1
        );
    }
    println!("     (lower is better for NLL, ECE, Brier and mean confidence out of distribution; higher for accuracy and AUROC:");
    println!("      the chance that a held-out digit gets a higher confidence than an out-of-distribution image)");
}

/// One sentence for every metric on which a posterior does worse than MAP.
fn explain(rows: &[Row], sets: &EvalSets) {
    let map = &rows[0];
    let mut lines = Vec::new();
    for r in &rows[1..] {
        let (m, b) = (&r.metrics, &map.metrics);
        let conf = r.mean_confidence();
        if m.accuracy < b.accuracy {
            let changed = changed_predictions(&map.probs[0], &r.probs[0]).unwrap_or(0);
            lines.push(format!(
                "{}: lower accuracy, because the probit link shrinks each logit by its own predictive variance, \
                 which changes the top class of {changed} held-out digit(s) whose two largest logits were close.",
                r.label
            ));
        }
        let worse: Vec<&str> = [("NLL", m.nll > b.nll), ("ECE", m.ece > b.ece), ("Brier", m.brier > b.brier)]
            .iter()
            .filter(|w| w.1)
            .map(|w| w.0)
            .collect();
        if !worse.is_empty() {
            let why = if conf < m.accuracy {
                format!(
                    "it is underconfident on held-out digits (mean confidence {conf:.3} against accuracy {:.3}): \
                     at near-zero training loss the GGN is tiny (p(1 − p) ≈ 0 on every training image), so in \
                     most directions the posterior is the broad evidence-optimal prior, and its predictive \
                     variance lowers the confidence of correct predictions as well as of wrong ones",
                    m.accuracy
                )
            } else {
                format!(
                    "it is still overconfident on held-out digits (mean confidence {conf:.3} against accuracy {:.3}), \
                     and its extra variance moves probability onto the wrong classes of some points",
                    m.accuracy
                )
            };
            lines.push(format!("{}: worse {} than MAP, because {why}.", r.label, worse.join(", ")));
        }
        for (k, ((auc, _), (map_auc, _))) in r.ood.iter().zip(&map.ood).enumerate() {
            if auc < map_auc {
                lines.push(format!(
                    "{}: lower AUROC on {} than MAP, because it lowers the confidence of held-out digits \
                     about as much as that of these images, so ranking by confidence separates them less well.",
                    r.label,
                    sets.names[k + 1]
                ));
            }
        }
        for (k, ((_, c), (_, map_c))) in r.ood.iter().zip(&map.ood).enumerate() {
            if c > map_c {
                lines.push(format!(
                    "{}: more confident than MAP on {}, because its weight uncertainty barely reaches these inputs' features.",
                    r.label,
                    sets.names[k + 1]
                ));
            }
        }
    }
    if lines.is_empty() {
        println!("\n     Every posterior does at least as well as MAP on every metric.");
    } else {
        println!("\n     Where a posterior does worse than MAP:");
        for l in lines {
            println!("     - {l}");
        }
    }
}

/// Points whose top class differs between two `(N, C)` predictions.
fn changed_predictions(a: &Tensor, b: &Tensor) -> laplace::Result<usize> {
    let (pa, pb) = (tensor::to_vec_i64(&a.argmax(1)?)?, tensor::to_vec_i64(&b.argmax(1)?)?);
    Ok(pa.iter().zip(&pb).filter(|(x, y)| x != y).count())
}

/// `metrics.json` (the table), `predictions.safetensors` (every method's
/// probabilities on every set, and the labels: the table can be recomputed
/// from it) and the figures.
fn write_outputs(a: &DemoArgs, rows: &[Row], sets: &EvalSets, labels: &[i64]) -> laplace::Result<Vec<std::path::PathBuf>> {
    let dir = &a.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| laplace::Error::Io { path: dir.clone(), source: e })?;
    let json = serde_json::json!({
        "description": "laplace demo: MAP vs Laplace on examples/digits; probabilities in predictions.safetensors",
        "n_test": labels.len(),
        "ece_bins": 15,
        "sets": sets.keys,
        "methods": rows.iter().map(|r| serde_json::json!({
            "key": r.key,
            "label": r.label,
            "n_params": r.n_params,
            "accuracy": r.metrics.accuracy,
            "nll": r.metrics.nll,
            "ece": r.metrics.ece,
            "brier": r.metrics.brier,
            "mean_confidence": r.mean_confidence(),
            "ood": sets.keys[1..].iter().zip(&r.ood).map(|(k, (auc, c))| (k.to_string(), serde_json::json!({"auroc": auc, "mean_confidence": c})))
                .collect::<serde_json::Map<_, _>>(),
            "prior_precision": r.prior,
            "log_evidence": r.log_evidence,
            "seconds": r.seconds,
        })).collect::<Vec<_>>(),
    });
    let metrics_path = dir.join("metrics.json");
    let text = serde_json::to_string_pretty(&json).expect("JSON values serialize");
    std::fs::write(&metrics_path, text + "\n").map_err(|e| laplace::Error::Io { path: metrics_path.clone(), source: e })?;

    let mut tensors = vec![("labels".to_string(), Tensor::new(labels, &Device::Cpu)?)];
    for r in rows {
        for (k, p) in sets.keys.iter().zip(&r.probs) {
            tensors.push((format!("{}.{k}", r.key), p.clone()));
        }
    }
    let pred_path = dir.join("predictions.safetensors");
    laplace::io::write_safetensors(&pred_path, &tensors)?;

    let reliability = Reliability {
        title: format!("Reliability on {} held-out digits: accuracy against confidence, 10 bins", labels.len()),
        panels: rows
            .iter()
            .map(|r| {
                Ok(ReliabilityPanel { title: format!("{}  (ECE {:.3})", r.label, r.metrics.ece), bins: metrics::reliability(&r.probs[0], labels, 10)? })
            })
            .collect::<laplace::Result<_>>()?,
    };
    let histograms = ConfidenceHistograms {
        title: "Top-class confidence: held-out digits against inputs unlike any digit".into(),
        set_names: sets.names.iter().map(|s| s.to_string()).collect(),
        panels: rows
            .iter()
            .map(|r| ConfidencePanel { title: format!("{}  (AUROC: rotated {:.2}, noise {:.2})", r.label, r.ood[0].0, r.ood[1].0), sets: r.conf.clone() })
            .collect(),
        bins: 10,
    };
    let mut written = vec![metrics_path, pred_path];
    written.extend(plot::save(&reliability, &dir.join("reliability"))?);
    written.extend(plot::save(&histograms, &dir.join("confidence"))?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::auroc;

    #[test]
    fn auroc_counts_pairs_and_half_ties() {
        assert_eq!(auroc(&[0.9, 0.8], &[0.1, 0.2]), 1.0);
        assert_eq!(auroc(&[0.1], &[0.9]), 0.0);
        // pairs (0.5 vs 0.5) tie → ½; (0.9 vs 0.5) wins → 1: mean ¾.
        assert_eq!(auroc(&[0.5, 0.9], &[0.5]), 0.75);
    }
}
