//! The `laplace` command on hostile input and output paths: every defect
//! class of the robustness review ends in a clean error (exit 1, a message
//! naming the quantity or file, no output file), never an abort or a panic,
//! and outputs never replace an input or a non-regular file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use laplace::tensor::{DType, Device, Tensor};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../laplace/tests/fixtures").join(case)
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("laplace-robust-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn laplace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_laplace")).args(args).output().expect("run laplace")
}

/// `curvature` on the cls_cnn fixture with `extra` arguments.
fn curvature(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let fx = fixture("cls_cnn");
    let (m, w) = (fx.join("model.json"), fx.join("weights.safetensors"));
    let mut args = vec!["curvature", "--model", p(&m), "--weights", p(&w), "--data", p(data), "--likelihood", "classification"];
    args.extend(["--out", p(out)]);
    args.extend(extra);
    laplace(&args)
}

/// Exit status 1, no panic, stderr mentions every needle, and `out` (if
/// given) was not created.
#[track_caller]
fn assert_refused(o: &Output, needles: &[&str], out: Option<&Path>) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected a clean failure, got {:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr {err:?} does not mention {n:?}");
    }
    if let Some(out) = out {
        assert!(!out.exists(), "{} was written", out.display());
    }
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "laplace failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn npy(header: &str, n: usize) -> Vec<u8> {
    let mut h = header.to_string();
    while (11 + h.len()) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(std::iter::repeat_n(0u8, n));
    b
}

/// An archive of `members`, stored or deflated.
fn zip(members: &[(String, Vec<u8>)], deflate: bool) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in members {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// The members of a stored archive, as (name, bytes).
fn members(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().unwrap().to_string(), b)
        })
        .collect()
}

#[test]
fn hostile_sizes_end_in_clean_errors() {
    let dir = scratch("sizes");
    let out = dir.join("out.safetensors");
    // A 400-byte .npz whose header declares N = 10^12.
    let huge = dir.join("huge.npz");
    std::fs::write(&huge, zip(&[("x.npy".into(), npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 2, 9, 9), }", 200))], false)).unwrap();
    assert!(std::fs::metadata(&huge).unwrap().len() < 1000);
    assert_refused(&curvature(&huge, &out, &[]), &["huge.npz", "1000000000000"], Some(&out));
    // Conv2d padding 10^6.
    let fx = fixture("cls_cnn");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(fx.join("model.json")).unwrap()).unwrap();
    spec["layers"][0]["padding"] = serde_json::json!([1000000, 1000000]);
    let pad = dir.join("pad.json");
    std::fs::write(&pad, spec.to_string()).unwrap();
    let (w, d) = (fx.join("weights.safetensors"), fx.join("data.npz"));
    let o = laplace(&["curvature", "--model", p(&pad), "--weights", p(&w), "--data", p(&d), "--likelihood", "classification", "--out", p(&out)]);
    assert_refused(&o, &["pad.json", "layer 0 (Conv2d)", "padding [1000000, 1000000]"], Some(&out));
    // Sample counts: --samples 10^6 and 2^64 − 1, and predict --samples 10^7.
    for s in ["1000000", "18446744073709551615"] {
        let o = curvature(&d, &out, &["--curvature", "fisher-mc", "--samples", s, "--memory-limit", "1G"]);
        assert_refused(&o, &[&format!("--samples {s}"), "needs", "memory limit of 1.1 GB"], Some(&out));
    }
    let post = dir.join("post.safetensors");
    let model = fx.join("model.json");
    let fit = |extra: &[&str]| {
        let mut a = vec!["fit", "--model", p(&model), "--weights", p(&w), "--data", p(&d), "--likelihood", "classification", "--out", p(&post)];
        a.extend(extra);
        laplace(&a)
    };
    assert_ok(&fit(&["--structure", "diag"]));
    let o = laplace(&["predict", "--posterior", p(&post), "--data", p(&d), "--pred-type", "nn", "--samples", "10000000", "--memory-limit", "4G", "--out", p(&out)]);
    assert_refused(&o, &["10000000 posterior samples", "needs 73 GB"], Some(&out));
    // A full GGN larger than --memory-limit.
    let o = curvature(&d, &out, &["--structure", "full", "--memory-limit", "100K"]);
    assert_refused(&o, &["full GGN for P = 228 needs 416 kB", "--memory-limit"], Some(&out));
    let o = laplace(&["curvature", "--memory-limit", "lots", "--model", "m", "--weights", "w", "--data", "d", "--likelihood", "regression", "--out", "o"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("lots"));
    // A subnormal prior precision.
    let o = fit(&["--structure", "diag", "--prior-precision", "1e-320"]);
    let post_before = std::fs::read(&post).unwrap();
    assert_refused(&o, &["prior precision 1e-320 underflows", "use ≥ 1e-30"], None);
    assert_eq!(std::fs::read(&post).unwrap(), post_before, "a failed fit left the old posterior untouched");
    // Labels out of range for evaluate.
    let mut m = members(&d);
    for (name, bytes) in &mut m {
        if name == "y.npy" {
            let n = bytes.len();
            bytes[n - 8..].copy_from_slice(&99i64.to_le_bytes());
        }
    }
    let bad_labels = dir.join("labels.npz");
    std::fs::write(&bad_labels, zip(&m, false)).unwrap();
    let o = laplace(&["evaluate", "--posterior", p(&post), "--data", p(&bad_labels)]);
    assert_refused(&o, &["= 99", "[0, 3)"], Some(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn npz_checksums_and_deflate() {
    let dir = scratch("npz");
    let fx = fixture("cls_cnn");
    let d = fx.join("data.npz");
    let (stored_out, deflated_out) = (dir.join("stored.safetensors"), dir.join("deflated.safetensors"));
    // A deflated copy (np.savez_compressed's layout) gives the same result.
    let deflated = dir.join("deflated.npz");
    std::fs::write(&deflated, zip(&members(&d), true)).unwrap();
    assert_ok(&curvature(&d, &stored_out, &[]));
    assert_ok(&curvature(&deflated, &deflated_out, &[]));
    let read = |p: &Path| laplace::io::read_safetensors(p, &Device::Cpu).unwrap();
    let (a, b) = (read(&stored_out), read(&deflated_out));
    assert_eq!(a["H"].to_vec1::<f64>().unwrap(), b["H"].to_vec1::<f64>().unwrap());
    // One flipped bit in a stored member's data: refused, naming the member.
    let mut raw = std::fs::read(&d).unwrap();
    let at = {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(&raw[..])).unwrap();
        let f = z.by_name("x.npy").unwrap();
        (f.data_start().unwrap() + f.size() - 3) as usize
    };
    raw[at] ^= 0x04;
    let flipped = dir.join("flipped.npz");
    std::fs::write(&flipped, &raw).unwrap();
    let out = dir.join("out.safetensors");
    assert_refused(&curvature(&flipped, &out, &[]), &["flipped.npz", "\"x.npy\"", "CRC-32 mismatch"], Some(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn posterior_files_that_do_not_fit_are_refused() {
    let dir = scratch("posterior");
    let fx = fixture("cls_cnn");
    let (m, w, d) = (fx.join("model.json"), fx.join("weights.safetensors"), fx.join("data.npz"));
    let post = dir.join("lowrank.safetensors");
    let o = laplace(&["fit", "--model", p(&m), "--weights", p(&w), "--data", p(&d), "--likelihood", "classification", "--structure", "lowrank", "--rank", "3", "--out", p(&post)]);
    assert_ok(&o);
    let out = dir.join("pred.safetensors");
    assert_ok(&laplace(&["predict", "--posterior", p(&post), "--data", p(&d), "--out", p(&out)]));
    std::fs::remove_file(&out).unwrap();
    // lowrank.values and lowrank.vectors disagree.
    let mut t = laplace::io::read_safetensors(&post, &Device::Cpu).unwrap();
    t.insert("lowrank.values".into(), Tensor::ones(2, DType::F64, &Device::Cpu).unwrap());
    let bad = dir.join("mismatch.safetensors");
    laplace::io::write_safetensors(&bad, &t.clone().into_iter().collect::<Vec<_>>()).unwrap();
    let o = laplace(&["predict", "--posterior", p(&bad), "--data", p(&d), "--out", p(&out)]);
    assert_refused(&o, &["mismatch.safetensors", "low-rank values (2,)"], Some(&out));
    // A tampered number (temperature 0) and a swapped likelihood.
    let cfg: serde_json::Value = serde_json::from_slice(&t["config"].to_vec1::<u8>().unwrap()).unwrap();
    for (key, value, needle) in [("temperature", serde_json::json!(0.0), "temperature must be positive"), ("likelihood", serde_json::json!("regression"), "checksum mismatch")] {
        let mut c = cfg.clone();
        c[key] = value;
        let mut t2 = laplace::io::read_safetensors(&post, &Device::Cpu).unwrap();
        let bytes = c.to_string().into_bytes();
        let n = bytes.len();
        t2.insert("config".into(), Tensor::from_vec(bytes, n, &Device::Cpu).unwrap());
        laplace::io::write_safetensors(&bad, &t2.into_iter().collect::<Vec<_>>()).unwrap();
        assert_refused(&laplace(&["evaluate", "--posterior", p(&bad), "--data", p(&d)]), &[needle], Some(&out));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn outputs_never_replace_inputs_or_special_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("outputs");
    let fx = fixture("cls_cnn");
    // A copy of the data, so that a failure cannot damage the fixture.
    let data = dir.join("data.npz");
    std::fs::copy(fx.join("data.npz"), &data).unwrap();
    let before = std::fs::read(&data).unwrap();
    // --out names the input, directly or through another spelling.
    for out in [data.clone(), dir.join(".").join("data.npz")] {
        let o = curvature(&data, &out, &[]);
        assert_refused(&o, &["is the input --data", "data.npz"], None);
        assert_eq!(std::fs::read(&data).unwrap(), before, "the input was changed");
    }
    // A device node and a FIFO.
    let o = curvature(&data, Path::new("/dev/null"), &[]);
    assert_refused(&o, &["/dev/null", "not a regular file"], None);
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    assert_refused(&curvature(&data, &fifo, &[]), &["fifo", "not a regular file"], None);
    assert!(!std::fs::metadata(&fifo).unwrap().is_file(), "the FIFO was replaced");
    // Modes follow the umask, as for any shell redirection.
    let out = dir.join("out.safetensors");
    for (umask, mode) in [("022", 0o644), ("077", 0o600)] {
        let _ = std::fs::remove_file(&out);
        let fx = fixture("cls_cnn");
        let cmd = format!(
            "umask {umask} && exec '{}' curvature --model '{}' --weights '{}' --data '{}' --likelihood classification --out '{}'",
            env!("CARGO_BIN_EXE_laplace"),
            p(&fx.join("model.json")),
            p(&fx.join("weights.safetensors")),
            p(&data),
            p(&out)
        );
        assert_ok(&Command::new("sh").arg("-c").arg(&cmd).output().unwrap());
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, mode, "umask {umask}");
    }
    // Errors name the user's path, not a temporary file.
    let missing = dir.join("no-such-dir").join("out.safetensors");
    let o = curvature(&data, &missing, &[]);
    assert_refused(&o, &[p(&missing)], Some(&missing));
    assert!(!String::from_utf8_lossy(&o.stderr).contains(".tmp-"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    let _ = std::fs::remove_dir_all(&dir);
}
