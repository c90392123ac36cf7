//! The `laplace` command end to end: results through the CLI equal the
//! laplace-torch fixtures, and bad input exits non-zero with a message that
//! names the problem and writes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use laplace::tensor::{self, DType, Device, Tensor};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../laplace/tests/fixtures").join(case)
}

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("laplace-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn laplace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_laplace")).args(args).output().expect("run laplace")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    laplace::io::read_safetensors(path, &Device::Cpu).unwrap()
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    read(&fixture(case).join("expected.safetensors"))
}

#[track_caller]
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a = tensor::to_vec_f64(a).unwrap();
    let b = tensor::to_vec_f64(b).unwrap();
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    assert!(num / den <= 1e-8, "{what}: relative error {:.2e}", num / den);
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(out.status.success(), "laplace failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Base arguments for a fixture.
fn base<'a>(cmd: &'a str, dir: &'a Path) -> Vec<String> {
    vec![
        cmd.to_string(),
        "--model".into(),
        p(&dir.join("model.json")).into(),
        "--weights".into(),
        p(&dir.join("weights.safetensors")).into(),
        "--data".into(),
        p(&dir.join("data.npz")).into(),
    ]
}

fn run(args: Vec<String>) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    laplace(&refs)
}

#[test]
fn curvature_through_the_cli_matches_laplace_torch() {
    let tmp = scratch("curvature");
    for (case, lik) in [("cls_cnn", "classification"), ("reg_multi", "regression"), ("act_gelu", "classification")] {
        let dir = fixture(case);
        let exp = expected(case);
        let mut subsets: Vec<(&str, Vec<String>)> = vec![("", vec![]), ("last_layer.", vec!["--last-layer".into()])];
        if dir.join("subnetwork.npy").exists() {
            subsets.push(("subnetwork.", vec!["--subnetwork".into(), p(&dir.join("subnetwork.npy")).into()]));
        }
        for (prefix, extra) in &subsets {
            for curvature in ["ggn", "ef"] {
                for structure in ["full", "diag"] {
                    let out = tmp.join(format!("{case}-{curvature}-{structure}.safetensors"));
                    let mut args = base("curvature", &dir);
                    args.extend(["--likelihood", lik, "--curvature", curvature, "--structure", structure, "--batch-size", "4"].map(String::from));
                    args.extend(extra.iter().cloned());
                    args.extend(["--out".to_string(), p(&out).to_string()]);
                    assert_ok(&run(args));
                    let got = read(&out);
                    let what = format!("{case} {prefix}{curvature}.{structure}");
                    assert_close(&got["H"], &exp[&format!("{prefix}{curvature}.{structure}")], &what);
                    assert_close(&got["loss"], &exp["loss"], &format!("{what} loss"));
                    assert_eq!(got["H"].dtype(), DType::F64, "{what}: dtype follows the weights");
                }
            }
        }
        // Jacobians and gradients.
        let out = tmp.join(format!("{case}-jac.safetensors"));
        let mut args = base("jacobians", &dir);
        args.extend(["--batch-size", "4", "--out", p(&out)].map(String::from));
        assert_ok(&run(args));
        let got = read(&out);
        assert_close(&got["J"], &exp["jacobians.J"], &format!("{case} J"));
        assert_close(&got["f"], &exp["jacobians.f"], &format!("{case} f"));
        let mut args = base("jacobians", &dir);
        args.extend(["--last-layer", "--out", p(&out)].map(String::from));
        assert_ok(&run(args));
        assert_close(&read(&out)["J"], &exp["last_layer_jacobians.J"], &format!("{case} last-layer J"));
        let out = tmp.join(format!("{case}-grad.safetensors"));
        let mut args = base("gradients", &dir);
        args.extend(["--likelihood", lik, "--batch-size", "3", "--out", p(&out)].map(String::from));
        assert_ok(&run(args));
        let got = read(&out);
        assert_close(&got["G"], &exp["gradients.G"], &format!("{case} G"));
        assert_close(&got["loss"], &exp["gradients.loss"], &format!("{case} gradients loss"));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn monte_carlo_fisher_is_reproducible_and_batch_independent() {
    let tmp = scratch("mc");
    let dir = fixture("cls_mlp");
    let go = |bs: &str, seed: &str, out: &Path| {
        let mut args = base("curvature", &dir);
        args.extend(
            ["--likelihood", "classification", "--curvature", "fisher-mc", "--structure", "diag", "--samples", "5"]
                .map(String::from),
        );
        args.extend(["--seed", seed, "--batch-size", bs, "--out", p(out)].map(String::from));
        assert_ok(&run(args));
        read(out)["H"].clone()
    };
    let a = go("8", "3", &tmp.join("a.safetensors"));
    let b = go("3", "3", &tmp.join("b.safetensors"));
    let c = go("8", "4", &tmp.join("c.safetensors"));
    let auto = go("auto", "3", &tmp.join("auto.safetensors"));
    // Same draws whatever the batching (sums in another order: rounding only).
    let diff = |x: &Tensor, y: &Tensor| {
        let (x, y) = (tensor::to_vec_f64(x).unwrap(), tensor::to_vec_f64(y).unwrap());
        x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    };
    assert!(diff(&a, &b) < 1e-12, "batch size changed the MC draws: {}", diff(&a, &b));
    assert!(diff(&a, &auto) < 1e-12, "--batch-size auto changed the MC draws: {}", diff(&a, &auto));
    assert!(diff(&a, &c) > 1e-3, "the seed had no effect");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn float32_on_request() {
    let tmp = scratch("f32");
    let dir = fixture("act_tanh");
    let out = tmp.join("h.safetensors");
    let mut args = base("curvature", &dir);
    args.extend(
        ["--likelihood", "classification", "--curvature", "ggn", "--structure", "full", "--dtype", "f32", "--out", p(&out)]
            .map(String::from),
    );
    assert_ok(&run(args));
    let h = read(&out)["H"].clone();
    assert_eq!(h.dtype(), DType::F32);
    let e = expected("act_tanh")["ggn.full"].clone();
    let (a, b) = (tensor::to_vec_f64(&h).unwrap(), tensor::to_vec_f64(&e).unwrap());
    let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(err < 1e-5, "f32 GGN off by {err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Write `x`, `y` data to a safetensors file.
fn write_data(path: &Path, x: Tensor, y: Tensor) {
    laplace::io::write_safetensors(path, &[("x".into(), x), ("y".into(), y)]).unwrap();
}

#[test]
fn bad_input_exits_non_zero_names_the_problem_and_writes_nothing() {
    let tmp = scratch("errors");
    let dir = fixture("act_tanh"); // 3 → 5 → 3, classification
    let dev = Device::Cpu;
    let out = tmp.join("out.safetensors");

    // Spec problems.
    let bad_spec = tmp.join("bad.json");
    std::fs::write(&bad_spec, r#"{"input_shape":[3],"layers":[{"type":"Linear","in_features":3,"out_features":5},{"type":"Tanhh"},{"type":"Linear","in_features":5,"out_features":3}]}"#).unwrap();
    let shape_spec = tmp.join("shape.json");
    std::fs::write(&shape_spec, r#"{"input_shape":[4],"layers":[{"type":"Linear","in_features":3,"out_features":5},{"type":"Tanh"},{"type":"Linear","in_features":5,"out_features":3}]}"#).unwrap();
    // Weight problems.
    let w = read(&dir.join("weights.safetensors"));
    let save = |name: &str, map: &HashMap<String, Tensor>| {
        let path = tmp.join(name);
        let v: Vec<(String, Tensor)> = map.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        laplace::io::write_safetensors(&path, &v).unwrap();
        path
    };
    let mut m = w.clone();
    m.remove("2.weight");
    let missing = save("missing.safetensors", &m);
    let mut m = w.clone();
    m.insert("3.weight".into(), Tensor::zeros(2, DType::F64, &dev).unwrap());
    let unexpected = save("unexpected.safetensors", &m);
    let mut m = w.clone();
    m.insert("0.weight".into(), Tensor::zeros((3, 5), DType::F64, &dev).unwrap());
    let misshaped = save("misshaped.safetensors", &m);
    // Data problems.
    let x = Tensor::zeros((4, 3), DType::F64, &dev).unwrap();
    let bad_label = tmp.join("label.safetensors");
    write_data(&bad_label, x.clone(), Tensor::new(&[0i64, 1, 3, 2], &dev).unwrap());
    let bad_x = tmp.join("xshape.safetensors");
    write_data(&bad_x, Tensor::zeros((4, 2), DType::F64, &dev).unwrap(), Tensor::new(&[0i64, 1, 2, 2], &dev).unwrap());
    let nan_x = tmp.join("nan.safetensors");
    let xs = Tensor::new(&[[0.0f64, 1.0, 2.0], [f64::NAN, 0.0, 0.0]], &dev).unwrap();
    write_data(&nan_x, xs, Tensor::new(&[0i64, 1], &dev).unwrap());
    let reg_y = tmp.join("regy.safetensors");
    write_data(&reg_y, x.clone(), Tensor::zeros((4, 2), DType::F64, &dev).unwrap());
    // Subnetwork problems.
    let sub_range = tmp.join("range.npy");
    Tensor::new(&[1i64, 38], &dev).unwrap().write_npy(&sub_range).unwrap();
    let sub_dup = tmp.join("dup.npy");
    Tensor::new(&[1i64, 5, 1], &dev).unwrap().write_npy(&sub_dup).unwrap();
    let sub_float = tmp.join("float.npy");
    Tensor::new(&[1.0f64, 2.0], &dev).unwrap().write_npy(&sub_float).unwrap();

    let model = dir.join("model.json");
    let weights = dir.join("weights.safetensors");
    let data = dir.join("data.npz");
    let curv = |m: &Path, w: &Path, d: &Path, lik: &str, extra: &[&str]| {
        let mut a: Vec<String> = ["curvature", "--model", p(m), "--weights", p(w), "--data", p(d), "--likelihood", lik]
            .map(String::from)
            .to_vec();
        a.extend(["--curvature", "ggn", "--structure", "diag", "--out", p(&out)].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let cls = "classification";
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (curv(&bad_spec, &weights, &data, cls, &[]), vec!["layer 1", "unknown layer type \"Tanhh\""]),
        (curv(&shape_spec, &weights, &data, cls, &[]), vec!["layer 0 (Linear)", "[4]", "in_features = 3"]),
        (curv(&model, &missing, &data, cls, &[]), vec!["missing tensor \"2.weight\""]),
        (curv(&model, &unexpected, &data, cls, &[]), vec!["unexpected", "\"3.weight\""]),
        (curv(&model, &misshaped, &data, cls, &[]), vec!["\"0.weight\"", "[3, 5]", "[5, 3]"]),
        (curv(&model, &weights, &bad_label, cls, &[]), vec!["y[2] = 3", "[0, 3)"]),
        (curv(&model, &weights, &bad_x, cls, &[]), vec!["[4, 2]", "(N, 3)"]),
        (curv(&model, &weights, &nan_x, cls, &[]), vec!["non-finite", "[1, 0]"]),
        (curv(&model, &weights, &reg_y, "regression", &[]), vec!["[4, 2]", "(4, 3)"]),
        (curv(&model, &weights, &data, cls, &["--subnetwork", p(&sub_range)]), vec!["index 38", "38 parameters"]),
        (curv(&model, &weights, &data, cls, &["--subnetwork", p(&sub_dup)]), vec!["index 1 appears twice"]),
        (curv(&model, &weights, &data, cls, &["--subnetwork", p(&sub_float)]), vec!["integers", "f64"]),
        (curv(&model, &weights, &tmp.join("nope.npz"), cls, &[]), vec!["nope.npz"]),
        (curv(&model, &weights, &data, "poisson", &[]), vec!["poisson"]),
        (curv(&model, &weights, &data, cls, &["--samples", "0"]), vec!["samples"]),
    ];
    for (args, needles) in cases {
        let o = run(args.clone());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: stderr {err:?} does not mention {n:?}");
        }
        assert!(!out.exists(), "{args:?} wrote an output file");
    }
    // A failing run leaves an existing output untouched.
    std::fs::write(&out, b"previous").unwrap();
    assert!(!run(curv(&model, &weights, &bad_label, cls, &[])).status.success());
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// P(in > out) + ½ P(tie), by counting pairs: an independent AUROC.
fn auroc_by_pairs(inside: &[f64], outside: &[f64]) -> f64 {
    let mut wins = 0.0;
    for a in inside {
        for b in outside {
            wins += if a > b { 1.0 } else if a == b { 0.5 } else { 0.0 };
        }
    }
    wins / (inside.len() * outside.len()) as f64
}

fn top_confidences(probs: &Tensor) -> Vec<f64> {
    let (n, c) = probs.dims2().unwrap();
    let p = tensor::to_vec_f64(probs).unwrap();
    (0..n).map(|i| p[i * c..(i + 1) * c].iter().cloned().fold(0.0, f64::max)).collect()
}

#[test]
fn demo_agrees_with_laplace_torch_and_its_table_is_what_the_library_computes() {
    let tmp = scratch("demo");
    let o = laplace(&["demo", "--out-dir", p(&tmp)]);
    assert_ok(&o);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("all agree within"), "{s}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.join("metrics.json")).unwrap()).unwrap();
    let methods = json["methods"].as_array().unwrap();
    let keys: Vec<&str> = methods.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["map", "last_layer", "all_weights"]);

    // Every number of the table, recomputed from the saved probabilities.
    let pred = read(&tmp.join("predictions.safetensors"));
    let labels = tensor::to_vec_i64(&pred["labels"]).unwrap();
    assert_eq!(labels.len(), 360);
    for m in methods {
        let key = m["key"].as_str().unwrap();
        let probs = &pred[&format!("{key}.test")];
        let rows = tensor::to_vec_f64(&probs.sum(1).unwrap()).unwrap();
        assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-9), "{key}: probabilities sum to 1");
        let got = laplace::posterior::metrics::classification(probs, &labels).unwrap();
        for (name, v) in [("accuracy", got.accuracy), ("nll", got.nll), ("ece", got.ece), ("brier", got.brier)] {
            assert!((m[name].as_f64().unwrap() - v).abs() <= 1e-12, "{key} {name}: {} vs {v}", m[name]);
        }
        let label = m["label"].as_str().unwrap();
        let line = s.lines().find(|l| l.trim_start().starts_with(label) && l.contains('|')).unwrap_or_else(|| panic!("no table row {label}:\n{s}"));
        assert!(line.contains(&format!("{:.4}", got.nll)) && line.contains(&format!("{:.4}", got.ece)), "{line}");
        let inside = top_confidences(probs);
        for set in ["rotated", "noise"] {
            let outside = top_confidences(&pred[&format!("{key}.{set}")]);
            let auc = auroc_by_pairs(&inside, &outside);
            let reported = m["ood"][set]["auroc"].as_f64().unwrap();
            assert!(reported > 0.0 && reported <= 1.0, "{key} {set}: AUROC {reported}");
            assert!((reported - auc).abs() < 1e-12, "{key} {set}: AUROC {reported} vs {auc}");
            let mean = outside.iter().sum::<f64>() / outside.len() as f64;
            assert!((m["ood"][set]["mean_confidence"].as_f64().unwrap() - mean).abs() < 1e-12);
            assert!(line.contains(&format!("{auc:.3}")), "{line}");
        }
    }
    // The MAP network is near-certain on noise; a posterior is less so.
    let noise_conf = |i: usize| methods[i]["ood"]["noise"]["mean_confidence"].as_f64().unwrap();
    assert!(noise_conf(1) < noise_conf(0) && noise_conf(2) < noise_conf(0), "{s}");

    // The one-line summary on stderr: what was written where, and the time.
    let err = String::from_utf8_lossy(&o.stderr);
    let summary = err.lines().last().unwrap_or_default().to_string();
    assert!(summary.starts_with(&format!("wrote {}: metrics.json, predictions.safetensors", tmp.display())) && summary.ends_with(" s"), "{summary:?}");
    for f in ["reliability.png", "confidence.png", "reliability.svg", "confidence.svg"] {
        let bytes = std::fs::read(tmp.join(f)).unwrap();
        if f.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f} is a PNG");
        } else {
            assert!(bytes.starts_with(b"<svg"), "{f} is an SVG");
        }
        // Compressed: the old uncompressed PNGs were 1.4 and 2.5 MB.
        assert!(bytes.len() < 200_000, "{f}: {} bytes", bytes.len());
        assert!(summary.contains(f), "the demo's summary names {f}: {summary:?}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn kron_through_the_cli_matches_curvlinops() {
    let tmp = scratch("kron");
    for (case, lik) in [("cls_cnn", "classification"), ("reg_multi", "regression")] {
        let dir = fixture(case);
        let exp = read(&dir.join("kron.safetensors"));
        let n_blocks = read(&dir.join("weights.safetensors")).len();
        for (curvature, approx) in [("ggn", "expand"), ("ef", "reduce")] {
            let out = tmp.join(format!("{case}-{curvature}-{approx}.safetensors"));
            let mut args = base("curvature", &dir);
            args.extend(["--likelihood", lik, "--curvature", curvature, "--structure", "kron", "--kfac-approx", approx, "--batch-size", "3", "--out", p(&out)].map(String::from));
            assert_ok(&run(args));
            let got = read(&out);
            assert_close(&got["loss"], &exp[&format!("{curvature}.{approx}.loss")], &format!("{case} loss"));
            for b in 0..n_blocks {
                let factors: Vec<Tensor> = (0..2).filter_map(|f| got.get(&format!("kron.{b}.{f}")).cloned()).collect();
                let k = laplace::kron::Kron::new(vec![factors]).unwrap();
                let what = format!("{case} {curvature}.{approx} block {b}");
                assert_close(&k.to_matrix().unwrap(), &exp[&format!("{curvature}.{approx}.{b}.product")], &what);
            }
            assert!(!got.contains_key(&format!("kron.{n_blocks}.0")), "{case}: one block per parameter tensor");
        }
    }
    // --n-data rescales A only: the products scale by N / n_data.
    let dir = fixture("act_tanh");
    let go = |extra: &[&str], out: &Path| {
        let mut args = base("curvature", &dir);
        args.extend(["--likelihood", "classification", "--structure", "kron", "--out", p(out)].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        assert_ok(&run(args));
        read(out)
    };
    let a = go(&[], &tmp.join("a.safetensors"));
    let b = go(&["--n-data", "18"], &tmp.join("b.safetensors"));
    assert_close(&(&b["kron.0.1"] * 3.0).unwrap(), &a["kron.0.1"], "A with N = 18 vs N = 6");
    assert_close(&b["kron.0.0"], &a["kron.0.0"], "B does not depend on N");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn hessian_eigen_and_trace_through_the_cli() {
    let tmp = scratch("hessian");
    let dir = fixture("hess_smooth_cnn");
    let exp = read(&dir.join("hessian.safetensors"));
    for structure in ["full", "diag"] {
        let out = tmp.join(format!("h-{structure}.safetensors"));
        let mut args = base("curvature", &dir);
        args.extend(["--likelihood", "classification", "--curvature", "hessian", "--structure", structure, "--batch-size", "3", "--out", p(&out)].map(String::from));
        assert_ok(&run(args));
        let key = if structure == "full" { "hessian.full" } else { "hessian.diag" };
        assert_close(&read(&out)["H"], &exp[key], &format!("CLI {key}"));
    }
    // Top eigenvalues of the GGN against the dense fixture matrix.
    let ggn = expected("cls_cnn")["ggn.full"].clone();
    let mut dense = laplace::linalg::symmetric_eigenvalues(&ggn).unwrap();
    dense.reverse();
    let dir = fixture("cls_cnn");
    let out = tmp.join("eig.safetensors");
    let mut args = base("eigen", &dir);
    args.extend(["--likelihood", "classification", "--curvature", "ggn", "--top-k", "4", "--tol", "1e-10", "--out", p(&out)].map(String::from));
    assert_ok(&run(args));
    let got = read(&out);
    let vals = tensor::to_vec_f64(&got["eigenvalues"]).unwrap();
    assert_eq!(got["eigenvectors"].dims(), [4, 228]);
    for (i, (a, b)) in vals.iter().zip(&dense).enumerate() {
        assert!((a - b).abs() <= 1e-8 * b.abs(), "eigenvalue {i}: {a} vs {b}");
    }
    // Exact trace = trace of the fixture GGN.
    let mut args = base("trace", &dir);
    args.extend(["--likelihood", "classification", "--curvature", "ggn", "--estimator", "exact", "--json"].map(String::from));
    let o = run(args);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want: f64 = laplace::linalg::symmetric_eigenvalues(&ggn).unwrap().iter().sum();
    let got = v["trace"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-9 * want, "trace {got} vs {want}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Graph models through the CLI: the diagonal GGN, KFAC with its block
/// names in the output's metadata, a subnetwork by parameter-name globs, and
/// a KFAC posterior fitted, evaluated and used for predictions.
#[test]
fn graph_models_through_the_cli() {
    let tmp = scratch("graph");
    let dir = fixture("graph/resnet_bn");
    let exp = expected("graph/resnet_bn");
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    let params: Vec<String> = spec["parameters"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();

    let out = tmp.join("diag.safetensors");
    let mut args = base("curvature", &dir);
    args.extend(["--likelihood", "classification", "--structure", "diag", "--out", p(&out)].map(String::from));
    assert_ok(&run(args));
    assert_close(&read(&out)["H"], &exp["ggn.diag"], "resnet_bn GGN diagonal");

    let out = tmp.join("kron.safetensors");
    let mut args = base("curvature", &dir);
    args.extend(["--likelihood", "classification", "--structure", "kron", "--out", p(&out)].map(String::from));
    assert_ok(&run(args));
    let meta = laplace::io::read_safetensors_metadata(&out).unwrap();
    let blocks: Vec<Vec<String>> = serde_json::from_str(&meta["kron_blocks"]).unwrap();
    assert_eq!(blocks, params.iter().map(|n| vec![n.clone()]).collect::<Vec<_>>(), "one block per θ tensor, in θ order");
    let kron = read(&out);
    assert_eq!(kron.keys().filter(|k| k.starts_with("kron.")).count(), 7 * 2 + 13, "7 Conv/Linear weights [B, A], 13 other tensors [·]");

    // The head by name is the last layer.
    let out = tmp.join("fc.safetensors");
    let mut args = base("curvature", &dir);
    args.extend(["--likelihood", "classification", "--structure", "full", "--params", "fc.*", "--out", p(&out)].map(String::from));
    assert_ok(&run(args));
    assert_close(&read(&out)["H"], &exp["last_layer.ggn.full"], "resnet_bn --params 'fc.*' GGN");
    let mut args = base("curvature", &dir);
    args.extend(["--likelihood", "classification", "--params", "head.*", "--out", p(&tmp.join("none.safetensors"))].map(String::from));
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("\"head.*\"") && err.contains("layer1.conv1.weight"), "{err}");
    assert!(!tmp.join("none.safetensors").exists());

    let post = tmp.join("post.safetensors");
    let mut args = base("fit", &dir);
    args.extend(["--likelihood", "classification", "--structure", "kron", "--optimize-prior", "marglik", "--out", p(&post)].map(String::from));
    assert_ok(&run(args));
    let o = laplace(&["evaluate", "--posterior", p(&post), "--data", p(&dir.join("data.npz"))]);
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Laplace"));
    let pred = tmp.join("pred.safetensors");
    assert_ok(&laplace(&["predict", "--posterior", p(&post), "--data", p(&dir.join("data.npz")), "--out", p(&pred)]));
    let probs = tensor::to_vec_f64(&read(&pred)["probs"]).unwrap();
    assert_eq!(probs.len(), 5 * 3);
    for row in probs.chunks(3) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-6 && row.iter().all(|&q| q > 0.0), "{row:?}");
    }
}

/// HuggingFace classifiers with dict inputs through the CLI: the data file
/// holds `input_ids`, `attention_mask` (int64) and the targets, here under
/// `labels` (`--label-key`); the GGN diagonal and the classifier head by
/// name match laplace-torch, and a last-layer KFAC posterior with the
/// evidence-tuned prior fits, predicts and evaluates.
#[test]
fn huggingface_models_through_the_cli() {
    let tmp = scratch("hf");
    for (case, head) in [("transformer/hf_bert", "classifier.*"), ("transformer/hf_gpt2", "score.*")] {
        let dir = fixture(case);
        let exp = expected(case);
        // The same data with the targets renamed.
        let arrays = laplace::io::read_tensors(&dir.join("data.npz"), &Device::Cpu).unwrap();
        let data = tmp.join("hf.safetensors");
        let renamed: Vec<(String, Tensor)> =
            arrays.into_iter().map(|(k, t)| (if k == "y" { "labels".to_string() } else { k }, t)).collect();
        laplace::io::write_safetensors(&data, &renamed).unwrap();
        let with_data = |cmd: &str| -> Vec<String> {
            let mut a = base(cmd, &dir);
            let n = a.len();
            a[n - 1] = p(&data).into();
            a.extend(["--label-key", "labels", "--likelihood", "classification"].map(String::from));
            a
        };
        let out = tmp.join("diag.safetensors");
        let mut args = with_data("curvature");
        args.extend(["--structure", "diag", "--batch-size", "2", "--out", p(&out)].map(String::from));
        assert_ok(&run(args));
        assert_close(&read(&out)["H"], &exp["ggn.diag"], &format!("{case} GGN diagonal"));

        let out = tmp.join("head.safetensors");
        let mut args = with_data("curvature");
        args.extend(["--structure", "full", "--params", head, "--out", p(&out)].map(String::from));
        assert_ok(&run(args));
        assert_close(&read(&out)["H"], &exp["params_glob.ggn.full"], &format!("{case} --params {head} GGN"));

        // Without --label-key the targets are missing, and the error says so.
        let mut args = base("curvature", &dir);
        let n = args.len();
        args[n - 1] = p(&data).into();
        args.extend(["--likelihood", "classification", "--out", p(&tmp.join("none.safetensors"))].map(String::from));
        let o = run(args);
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("\"y\""), "{}", String::from_utf8_lossy(&o.stderr));

        let post = tmp.join("post.safetensors");
        let mut args = with_data("fit");
        args.extend(["--subset", "last-layer", "--structure", "kron", "--optimize-prior", "marglik", "--out", p(&post)].map(String::from));
        assert_ok(&run(args));
        let pred = tmp.join("pred.safetensors");
        assert_ok(&laplace(&["predict", "--posterior", p(&post), "--data", p(&data), "--label-key", "labels", "--out", p(&pred)]));
        let probs = read(&pred)["probs"].clone();
        let rows = tensor::to_vec_f64(&probs.sum(1).unwrap()).unwrap();
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-9), "{case}: probabilities sum to 1: {rows:?}");
        let o = laplace(&["evaluate", "--posterior", p(&post), "--data", p(&data), "--label-key", "labels"]);
        assert_ok(&o);
        assert!(String::from_utf8_lossy(&o.stdout).contains("Laplace"));
    }
}

/// Every subcommand ends with one summary line on stderr (what it wrote,
/// with shapes, and the time); `--quiet` leaves stderr empty and the results
/// (files, stdout) unchanged.
#[test]
fn every_subcommand_summarizes_its_result_and_quiet_silences_it() {
    let tmp = scratch("summary");
    let dir = fixture("cls_cnn");
    let out = |name: &str| p(&tmp.join(name)).to_string();
    let with = |cmd: &str, extra: &[&str]| {
        let mut a = base(cmd, &dir);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let post = out("post.safetensors");
    let data = p(&dir.join("data.npz")).to_string();
    let cases: Vec<(Vec<String>, String)> = vec![
        (with("curvature", &["--likelihood", "classification", "--out", &out("h.safetensors")]), format!("wrote {}: loss (1,), H (", out("h.safetensors"))),
        (with("jacobians", &["--out", &out("j.safetensors")]), format!("wrote {}: J (", out("j.safetensors"))),
        (with("gradients", &["--likelihood", "classification", "--out", &out("g.safetensors")]), format!("wrote {}: G (", out("g.safetensors"))),
        (with("eigen", &["--likelihood", "classification", "--top-k", "2", "--out", &out("e.safetensors")]), format!("wrote {}: eigenvalues (2,), eigenvectors (2, ", out("e.safetensors"))),
        (with("trace", &["--likelihood", "classification"]), "trace over ".into()),
        (with("fit", &["--likelihood", "classification", "--structure", "diag", "--out", &post]), format!("wrote {post}: diag posterior over ")),
        (
            vec!["predict".into(), "--posterior".into(), post.clone(), "--data".into(), data.clone(), "--out".into(), out("p.safetensors")],
            format!("wrote {}: probs (", out("p.safetensors")),
        ),
        (vec!["evaluate".into(), "--posterior".into(), post.clone(), "--data".into(), data.clone()], "evaluated the diag posterior of ".into()),
    ];
    for (args, start) in cases {
        let o = run(args.clone());
        assert_ok(&o);
        let err = String::from_utf8_lossy(&o.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with(&start) && last.ends_with(" s") && last.contains(" in "), "{args:?}: summary {last:?}, expected {start:?}…");
        let mut quiet = args.clone();
        quiet.insert(1, "--quiet".into());
        let q = run(quiet);
        assert_ok(&q);
        assert!(q.stderr.is_empty(), "{args:?} --quiet printed {:?}", String::from_utf8_lossy(&q.stderr));
        assert_eq!(q.stdout, o.stdout, "{args:?}: --quiet changes stdout");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
