//! Shared helpers of the integration tests: fixtures and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Dataset, Likelihood, Sequential};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// Every fixture case (a directory with a meta.json), sorted.
pub fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures directory")
        .filter_map(|e| {
            let e = e.ok()?;
            e.path().join("meta.json").exists().then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    assert!(v.len() >= 10, "expected the committed fixtures, found {v:?}");
    v
}

/// Every graph-model fixture case (`fixtures/graph/<case>`), as `graph/<case>`, sorted.
pub fn graph_cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures_dir().join("graph"))
        .expect("graph fixtures directory")
        .filter_map(|e| {
            let e = e.ok()?;
            e.path().join("meta.json").exists().then(|| format!("graph/{}", e.file_name().to_string_lossy()))
        })
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected the committed graph fixtures, found {v:?}");
    v
}

pub struct Fixture {
    pub name: String,
    pub dir: PathBuf,
    pub model: Sequential,
    pub data: Dataset,
    pub likelihood: Likelihood,
    pub expected: HashMap<String, Tensor>,
    pub subnetwork: Option<Vec<i64>>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        Self::load_as(name, DType::F64)
    }

    pub fn load_as(name: &str, dtype: DType) -> Fixture {
        let dir = fixtures_dir().join(name);
        let dev = Device::Cpu;
        let model = Sequential::load(dir.join("model.json"), dir.join("weights.safetensors"), Some(dtype), &dev)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let data = Dataset::load(&dir.join("data.npz"), dtype, &dev).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let likelihood = meta["likelihood"].as_str().unwrap().parse().unwrap();
        let expected = laplace::io::read_safetensors(&dir.join("expected.safetensors"), &dev).unwrap();
        let sub = dir.join("subnetwork.npy");
        let subnetwork = sub.exists().then(|| laplace::io::read_indices(&sub).unwrap());
        Fixture {
            name: name.to_string(),
            dir,
            model,
            data,
            likelihood,
            expected,
            subnetwork,
        }
    }

    pub fn expect(&self, key: &str) -> &Tensor {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("{}: fixture has no key {key:?}", self.name))
    }

    pub fn y(&self) -> &Tensor {
        self.data.y.as_ref().unwrap()
    }
}

/// ‖a − b‖ / ‖b‖ (Frobenius), with shapes required equal.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = tensor::to_vec_f64(a).unwrap();
    let b = tensor::to_vec_f64(b).unwrap();
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Assert `a ≈ b` within `tol` relative (Frobenius).
#[track_caller]
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape {:?} vs expected {:?}", a.dims(), b.dims());
    let e = rel_err(a, b);
    // LAPLACE_TEST_SHOW_ERR=1 prints every comparison (with --nocapture).
    if std::env::var_os("LAPLACE_TEST_SHOW_ERR").is_some() {
        eprintln!("{what}: {e:.2e}");
    }
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}
