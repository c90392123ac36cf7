//! Reading and writing files defensively: `.npz` checksums and deflated
//! members, hostile declared sizes, non-finite results, posterior files
//! checked on load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Dataset, Likelihood, Sequential};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("laplace-files-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err<T>(r: laplace::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn deflated_npz_reads_as_the_stored_one() {
    let dev = Device::Cpu;
    let stored = laplace::io::read_npz(&fixtures().join("npz/stored.npz"), &dev).unwrap();
    let deflated = laplace::io::read_npz(&fixtures().join("npz/deflated.npz"), &dev).unwrap();
    let mut keys: Vec<&String> = stored.keys().collect();
    keys.sort();
    assert_eq!(keys, ["mask", "w", "x", "y"]);
    for k in keys {
        let (a, b) = (&stored[k], &deflated[k]);
        assert_eq!((a.dims(), a.dtype()), (b.dims(), b.dtype()), "{k}");
        assert_eq!(tensor::to_vec_f64(a).unwrap(), tensor::to_vec_f64(b).unwrap(), "{k}");
    }
    assert_eq!(stored["x"].dims(), [5, 3]);
    assert_eq!(stored["y"].dtype(), DType::I64);
    assert_eq!(stored["mask"].dtype(), DType::U8);
    // w was saved in Fortran order: its stored bytes (the member's last 32)
    // are column-major, and it must read back transposed from them.
    let vals = stored["w"].to_vec2::<f64>().unwrap();
    let raw = std::fs::read(fixtures().join("npz/stored.npz")).unwrap();
    let (start, size) = member_data(&raw, "w.npy");
    let col_major: Vec<f64> = raw[start + size - 32..start + size].chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(col_major, [vals[0][0], vals[1][0], vals[0][1], vals[1][1]]);
    assert_ne!(vals[0][1], vals[1][0], "a symmetric w would not tell the orders apart");
}

/// Offset of member `name`'s data in a stored archive.
fn member_data(raw: &[u8], name: &str) -> (usize, usize) {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(raw)).unwrap();
    let f = zip.by_name(name).unwrap();
    (f.data_start().unwrap() as usize, f.size() as usize)
}

#[test]
fn a_flipped_byte_in_an_npz_is_refused_as_numpy_does() {
    let dir = scratch("crc");
    for name in ["stored.npz", "deflated.npz"] {
        let mut raw = std::fs::read(fixtures().join("npz").join(name)).unwrap();
        let (start, size) = member_data(&raw, "x.npy");
        let compressed = name == "deflated.npz";
        // The last data byte: a float of x (stored) or the deflate stream's end.
        let at = if compressed { start + 10 } else { start + size - 1 };
        raw[at] ^= 0x10;
        let path = dir.join(name);
        std::fs::write(&path, &raw).unwrap();
        let e = err(laplace::io::read_npz(&path, &Device::Cpu));
        assert!(e.contains(&path.display().to_string()) && e.contains("x.npy"), "{e}");
        if !compressed {
            assert!(e.contains("CRC-32 mismatch"), "{e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An `.npy` with header `h` and `n` data bytes.
fn npy(h: &str, n: usize) -> Vec<u8> {
    let mut h = h.to_string();
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

fn stored_zip(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        w.start_file(*name, opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

#[test]
fn declared_sizes_are_checked_before_allocation() {
    let dir = scratch("sizes");
    // A 400-byte array claiming N = 10^12.
    let huge = stored_zip(&[("x.npy", npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 3), }", 336))]);
    assert!(huge.len() < 1000);
    let path = dir.join("huge.npz");
    std::fs::write(&path, &huge).unwrap();
    let e = err(Dataset::load(&path, DType::F64, &Device::Cpu));
    assert!(e.contains("huge.npz") && e.contains("[1000000000000, 3]") && e.contains("336 bytes"), "{e}");
    // A header length of 4 GiB (format 2.0).
    let mut long = npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", 24);
    long[6] = 2;
    long.splice(8..10, u32::MAX.to_le_bytes());
    let path = dir.join("long.npy");
    std::fs::write(&path, &long).unwrap();
    let e = err(laplace::io::read_indices(&path));
    assert!(e.contains("long.npy") && e.contains("declares 4294967295 bytes"), "{e}");
    // A shape whose byte count overflows.
    let path = dir.join("overflow.npz");
    std::fs::write(&path, stored_zip(&[("x.npy", npy("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", 0))])).unwrap();
    let e = err(laplace::io::read_npz(&path, &Device::Cpu));
    assert!(e.contains("overflow.npz") && e.contains("more than 2^64 bytes"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn results_with_nan_are_not_written() {
    let dir = scratch("nan");
    let path = dir.join("out.safetensors");
    let t = Tensor::new(&[[1.0f64, 2.0], [f64::NAN, 0.0]], &Device::Cpu).unwrap();
    let e = laplace::io::write_results(&path, &[("ok".into(), t.ones_like().unwrap()), ("probs".into(), t)], &[]).unwrap_err();
    assert!(matches!(e, laplace::Error::NonFinite(_)), "{e}");
    let e = e.to_string();
    assert!(e.contains("\"probs\"") && e.contains("[1, 0]"), "{e}");
    assert!(!path.exists());
    let leftovers = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(leftovers, 0, "temporary files left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fitted posterior of the act_tanh fixture (classification, 38 parameters).
fn posterior(structure: Structure) -> Posterior {
    let dev = Device::Cpu;
    let fx = fixtures().join("act_tanh");
    let model = Sequential::load(fx.join("model.json"), fx.join("weights.safetensors"), None, &dev).unwrap();
    let data = Dataset::load(&fx.join("data.npz"), model.dtype(), &dev).unwrap();
    let opts = FitOptions { structure, ..FitOptions::default() };
    Posterior::fit(model, &data, Likelihood::Classification, &opts).unwrap()
}

/// Save `post`, let `edit` change its tensors, write them back as they are.
fn tampered(post: &Posterior, dir: &Path, name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let path = dir.join(name);
    post.save(&path).unwrap();
    let mut t = laplace::io::read_safetensors(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    let v: Vec<(String, Tensor)> = t.into_iter().collect();
    laplace::io::write_safetensors(&path, &v).unwrap();
    path
}

fn edit_config(t: &mut HashMap<String, Tensor>, f: impl FnOnce(&mut serde_json::Value)) {
    let mut cfg: serde_json::Value = serde_json::from_slice(&t["config"].to_vec1::<u8>().unwrap()).unwrap();
    f(&mut cfg);
    let bytes = cfg.to_string().into_bytes();
    let n = bytes.len();
    t.insert("config".into(), Tensor::from_vec(bytes, n, &Device::Cpu).unwrap());
}

#[test]
fn posterior_files_are_checked_on_load() {
    let dir = scratch("posterior");
    let diag = posterior(Structure::Diag);
    // Untouched: loads, and predicts as before.
    let path = dir.join("ok.safetensors");
    diag.save(&path).unwrap();
    let back = Posterior::load(&path).unwrap();
    assert_eq!(back.n_data, diag.n_data);
    let cases: Vec<(&str, Box<dyn FnOnce(&mut HashMap<String, Tensor>)>, &str)> = vec![
        ("t0", Box::new(|t| edit_config(t, |c| c["temperature"] = 0.0.into())), "temperature must be positive"),
        ("v1", Box::new(|t| edit_config(t, |c| c["version"] = 1.into())), "format version 1"),
        ("sigma0", Box::new(|t| edit_config(t, |c| c["sigma_noise"] = 0.0.into())), "sigma_noise must be positive"),
        ("sigma2", Box::new(|t| edit_config(t, |c| c["sigma_noise"] = 2.0.into())), "only defined for regression"),
        ("ndata", Box::new(|t| edit_config(t, |c| c["n_data"] = (-4).into())), "n_data -4 must be an integer ≥ 1"),
        ("prior", Box::new(|t| edit_config(t, |c| c["prior_precision"] = serde_json::json!([1e-320]))), "underflows"),
        ("likelihood", Box::new(|t| edit_config(t, |c| c["likelihood"] = "regression".into())), "checksum mismatch"),
        ("outputs", Box::new(|t| edit_config(t, |c| c["n_outputs"] = 4.into())), "n_outputs 4"),
        ("nan", Box::new(|t| {
            let h = t["H"].to_vec1::<f64>().unwrap();
            let mut h2 = h.clone();
            h2[3] = f64::NAN;
            t.insert("H".into(), Tensor::from_vec(h2, h.len(), &Device::Cpu).unwrap());
        }), "H[3] = NaN is not finite"),
        ("negative", Box::new(|t| {
            let mut h = t["H"].to_vec1::<f64>().unwrap();
            h[0] = -1.0;
            let n = h.len();
            t.insert("H".into(), Tensor::from_vec(h, n, &Device::Cpu).unwrap());
        }), "H[0] = -1 is negative"),
        ("value", Box::new(|t| {
            let mut h = t["H"].to_vec1::<f64>().unwrap();
            h[0] *= 1.5;
            let n = h.len();
            t.insert("H".into(), Tensor::from_vec(h, n, &Device::Cpu).unwrap());
        }), "checksum mismatch"),
        ("mean", Box::new(|t| {
            let mut m = t["mean"].to_vec1::<f64>().unwrap();
            m[1] += 1.0;
            let n = m.len();
            t.insert("mean".into(), Tensor::from_vec(m, n, &Device::Cpu).unwrap());
        }), "mean[1]"),
        ("extra", Box::new(|t| {
            t.insert("kron.0.0".into(), Tensor::ones(2, DType::F64, &Device::Cpu).unwrap());
        }), "unexpected tensors [\"kron.0.0\"]"),
        ("nosum", Box::new(|t| {
            t.remove("checksum");
        }), "no checksum"),
    ];
    for (name, edit, needle) in cases {
        let path = tampered(&diag, &dir, &format!("{name}.safetensors"), edit);
        let e = err(Posterior::load(&path));
        assert!(e.contains(&path.display().to_string()), "{name}: {e}");
        assert!(e.contains(needle), "{name}: {e:?} does not say {needle:?}");
    }
    // A low-rank posterior whose values and vectors disagree.
    let lr = posterior(Structure::LowRank { rank: 3 });
    let path = tampered(&lr, &dir, "lowrank.safetensors", |t| {
        let v = t["lowrank.values"].to_vec1::<f64>().unwrap();
        t.insert("lowrank.values".into(), Tensor::from_vec(v[..2].to_vec(), 2, &Device::Cpu).unwrap());
    });
    let e = err(Posterior::load(&path));
    assert!(e.contains("low-rank values (2,) and vectors [3, 38]"), "{e}");
    // A full posterior whose eigenvectors are missing a row.
    let full = posterior(Structure::Full);
    let path = tampered(&full, &dir, "full.safetensors", |t| {
        let v = t["H.eigenvectors"].narrow(0, 0, 37).unwrap();
        t.insert("H.eigenvectors".into(), v);
    });
    let e = err(Posterior::load(&path));
    assert!(e.contains("H.eigenvectors [37, 38]"), "{e}");
    // The curvature of another model: Kronecker factors of other sizes.
    let kron = posterior(Structure::Kron);
    let path = tampered(&kron, &dir, "kron.safetensors", |t| {
        let a = Tensor::eye(4, DType::F64, &Device::Cpu).unwrap();
        t.insert("kron.0.1".into(), a);
    });
    let e = err(Posterior::load(&path));
    assert!(e.contains("Kronecker blocks cover [20,"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn degenerate_settings_are_refused_with_what_to_change() {
    let dev = Device::Cpu;
    let fx = fixtures().join("act_tanh");
    let model = Sequential::load(fx.join("model.json"), fx.join("weights.safetensors"), None, &dev).unwrap();
    let data = Dataset::load(&fx.join("data.npz"), model.dtype(), &dev).unwrap();
    for bad in [1e-320, 1e-31, 0.0, -1.0, f64::NAN, f64::INFINITY] {
        let opts = FitOptions { structure: Structure::Diag, prior_precision: vec![bad], ..FitOptions::default() };
        let e = err(Posterior::fit(model.try_clone().unwrap(), &data, Likelihood::Classification, &opts));
        assert!(e.contains("prior precision") && e.contains("1e-30"), "{bad}: {e}");
    }
    let opts = FitOptions { structure: Structure::Diag, prior_precision: vec![1e-30], ..FitOptions::default() };
    let post = Posterior::fit(model, &data, Likelihood::Classification, &opts).unwrap();
    let probs = post.predict_probs(&data.x, laplace::posterior::predict::Link::Probit).unwrap();
    assert!(tensor::first_non_finite(&probs).unwrap().is_none(), "the smallest accepted prior gives finite predictions");
    // Labels out of range are an error, not an index out of bounds.
    let mut labels = vec![0i64; probs.dim(0).unwrap()];
    labels[2] = 7;
    let e = err(laplace::posterior::metrics::classification(&probs, &labels));
    assert!(e.contains("y[2] = 7") && e.contains("[0, 3)"), "{e}");
    let e = err(laplace::posterior::metrics::reliability(&probs, &vec![-1; probs.dim(0).unwrap()], 10));
    assert!(e.contains("y[0] = -1"), "{e}");
}
