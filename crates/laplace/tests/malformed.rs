//! Malformed and extreme inputs through every reader of untrusted input,
//! generated (a deterministic mutator over valid seed files, and
//! generators of hostile headers and geometries): each must be read or
//! refused with an error naming the file, never panic or abort. Also checks
//! that the fuzz targets in `fuzz/` compile.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::rng::Rng;
use laplace::tensor::{DType, Device};
use laplace::{Dataset, Likelihood, Sequential};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("laplace-malformed-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Mutations of a valid file: bit flips, extreme bytes and integers
/// (little-endian sizes, header lengths), truncation, insertion, and for
/// text, numbers replaced by extreme ones.
struct Mutator {
    rng: Rng,
}

const EXTREME_NUMBERS: [&str; 12] =
    ["0", "-1", "1000000", "1000000000000", "18446744073709551615", "1e308", "-1e308", "1e-320", "0.5", "NaN", "4294967296", "\"x\""];

impl Mutator {
    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n.max(1) as u64) as usize
    }

    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut b = seed.to_vec();
        let rounds = 1 + self.below(3);
        for _ in 0..rounds {
            if b.is_empty() {
                b.push(0);
            }
            let at = self.below(b.len());
            match self.below(8) {
                0 => b[at] ^= 1 << self.below(8),
                1 => b[at] = [0u8, 0xff, 0x7f, 0x80, b'9', b'-'][self.below(6)],
                2 => {
                    let v: u64 = [u64::MAX, 1 << 40, 1_000_000_000_000, u32::MAX as u64, 0, 1 << 31][self.below(6)];
                    let width = [2, 4, 8][self.below(3)];
                    for (k, byte) in v.to_le_bytes().iter().take(width).enumerate() {
                        if let Some(x) = b.get_mut(at + k) {
                            *x = *byte;
                        }
                    }
                }
                3 => b.truncate(at),
                4 => {
                    let n = 1 + self.below(16);
                    let junk: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                    b.splice(at..at, junk);
                }
                5 => {
                    let end = (at + 1 + self.below(64)).min(b.len());
                    let chunk = b[at..end].to_vec();
                    b.splice(at..at, chunk);
                }
                _ => self.replace_number(&mut b),
            }
        }
        b
    }

    /// Replace one decimal number of the bytes by an extreme one.
    fn replace_number(&mut self, b: &mut Vec<u8>) {
        let starts: Vec<usize> =
            (0..b.len()).filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric())).collect();
        if starts.is_empty() {
            return;
        }
        let s = starts[self.below(starts.len())];
        let mut e = s;
        while e < b.len() && (b[e].is_ascii_digit() || b[e] == b'.') {
            e += 1;
        }
        let new = EXTREME_NUMBERS[self.below(EXTREME_NUMBERS.len())].as_bytes().to_vec();
        b.splice(s..e, new);
    }
}

/// A `.npy` with the given header text and `data_len` bytes of data.
fn npy(header: &str, data_len: usize) -> Vec<u8> {
    let mut h = header.to_string();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data_len));
    b
}

/// A generated hostile `.npy`: shapes up to 10¹² and beyond 2⁶⁴ bytes,
/// odd dtypes and orders, data that does not match.
fn hostile_npy(m: &mut Mutator) -> Vec<u8> {
    let dims = [0usize, 1, 3, 1 << 20, 1_000_000_000_000, usize::MAX / 2, 1 << 33];
    let rank = m.below(4);
    let shape: Vec<String> = (0..rank).map(|_| dims[m.below(dims.len())].to_string()).collect();
    let shape = match rank {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let descr = ["<f8", "<f4", "<i8", "|b1", ">f8", "<c16", "|O", "<U3", "<f2", "<u4"][m.below(10)];
    let order = ["False", "True", "0", "None"][m.below(4)];
    let data_len = [0, 8, 24, 400][m.below(4)];
    let mut b = npy(&format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}"), data_len);
    if m.below(4) == 0 {
        // A header length of up to 4 GiB (format 2.0 has a 4-byte length).
        b[6] = 2;
        let len = [u32::MAX, 1 << 31, 100][m.below(3)];
        b.splice(8..10, len.to_le_bytes());
    }
    b
}

/// A zip of `members` (name, bytes), stored or deflated.
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

/// Run `f`, counting panics; an error must name `path`.
fn check<T>(stats: &mut Stats, what: &str, path: &Path, f: impl FnOnce() -> laplace::Result<T>) {
    stats.runs += 1;
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(_)) => stats.accepted += 1,
        Ok(Err(e)) => {
            stats.over_budget += usize::from(matches!(e, laplace::Error::Memory(_)));
            let msg = e.to_string();
            let name = path.file_name().unwrap().to_string_lossy();
            if !msg.contains(name.as_ref()) {
                stats.unnamed.push(format!("{what}: {msg}"));
            }
        }
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            stats.panics.push(format!("{what}: {msg:?}"));
        }
    }
}

#[derive(Default)]
struct Stats {
    runs: usize,
    accepted: usize,
    /// Refused by the memory budget (declared sizes, geometry).
    over_budget: usize,
    panics: Vec<String>,
    unnamed: Vec<String>,
}

#[test]
fn ten_thousand_malformed_inputs_never_panic_and_errors_name_the_file() {
    // A small budget, so that every "allocates 8 TB" input meets it.
    laplace::budget::set_limit(256 << 20);
    std::panic::set_hook(Box::new(|_| {})); // panics are counted, not printed
    let dir = scratch("inputs");
    let dev = Device::Cpu;
    let mut m = Mutator { rng: Rng::new(15) };
    let mut stats = Stats::default();
    let fx = fixtures();

    // Seeds: valid files of every kind.
    let npz_seeds: Vec<Vec<u8>> = ["cls_cnn/data.npz", "act_tanh/data.npz", "npz/stored.npz", "npz/deflated.npz"]
        .iter()
        .map(|p| std::fs::read(fx.join(p)).unwrap())
        .collect();
    let st_seeds: Vec<Vec<u8>> = ["act_tanh/weights.safetensors", "cls_cnn/weights.safetensors"]
        .iter()
        .map(|p| std::fs::read(fx.join(p)).unwrap())
        .collect();
    let spec_seeds: Vec<(Vec<u8>, PathBuf)> = ["act_tanh", "cls_cnn", "graph/resnet_bn", "graph/mobilenet_block"]
        .iter()
        .map(|c| (std::fs::read(fx.join(c).join("model.json")).unwrap(), fx.join(c).join("weights.safetensors")))
        .collect();
    let npy_seed = std::fs::read(fx.join("cls_cnn/subnetwork.npy")).unwrap();
    // A posterior of each structure, written by save.
    let model = Sequential::load(fx.join("act_tanh/model.json"), fx.join("act_tanh/weights.safetensors"), None, &dev).unwrap();
    let data = Dataset::load(&fx.join("act_tanh/data.npz"), model.dtype(), &dev).unwrap();
    let mut post_seeds = Vec::new();
    for structure in [Structure::Diag, Structure::Full, Structure::Kron, Structure::LowRank { rank: 3 }] {
        let opts = FitOptions { structure, ..FitOptions::default() };
        let post = Posterior::fit(model.try_clone().unwrap(), &data, Likelihood::Classification, &opts).unwrap();
        let p = dir.join("seed.safetensors");
        post.save(&p).unwrap();
        post_seeds.push(std::fs::read(&p).unwrap());
    }

    for i in 0..2500 {
        let path = dir.join(format!("d{}.npz", i % 7));
        let bytes = match i % 3 {
            0 => m.mutate(&npz_seeds[i % npz_seeds.len()]),
            _ => {
                let members: Vec<(String, Vec<u8>)> =
                    (0..1 + m.below(2)).map(|k| (format!("{}.npy", ["x", "y"][k]), hostile_npy(&mut m))).collect();
                zip(&members, i % 3 == 2)
            }
        };
        std::fs::write(&path, &bytes).unwrap();
        check(&mut stats, "npz", &path, || laplace::io::read_npz(&path, &dev));
        check(&mut stats, "dataset", &path, || Dataset::load(&path, DType::F64, &dev));
        // The row reader of data-parallel runs (rank 1 of 2 reads its rows).
        check(&mut stats, "dataset shard", &path, || Dataset::load_part(&path, "y", 1, 2, DType::F64, &dev));
    }
    for i in 0..1500 {
        let path = dir.join(format!("i{}.npy", i % 7));
        let bytes = if i % 2 == 0 { m.mutate(&npy_seed) } else { hostile_npy(&mut m) };
        std::fs::write(&path, &bytes).unwrap();
        check(&mut stats, "npy", &path, || laplace::io::read_indices(&path));
    }
    for i in 0..1500 {
        let path = dir.join(format!("w{}.safetensors", i % 7));
        std::fs::write(&path, m.mutate(&st_seeds[i % st_seeds.len()])).unwrap();
        check(&mut stats, "safetensors", &path, || laplace::io::read_safetensors(&path, &dev));
        check(&mut stats, "safetensors shard", &path, || Dataset::load_part(&path, "y", 0, 2, DType::F64, &dev));
        let spec = fx.join(["act_tanh", "cls_cnn"][i % 2]).join("model.json");
        check(&mut stats, "weights", &path, || Sequential::load(&spec, &path, None, &dev));
    }
    for i in 0..2500 {
        let path = dir.join(format!("m{}.json", i % 7));
        let (seed, weights) = &spec_seeds[i % spec_seeds.len()];
        std::fs::write(&path, m.mutate(seed)).unwrap();
        check(&mut stats, "spec", &path, || Sequential::load(&path, weights, None, &dev));
    }
    // Graph specs with every op family (the op tests' literal models),
    // through the fuzz entry point: zero weights of the shapes they ask for.
    let mut graph_seeds = Vec::new();
    for file in ["graph_ops.rs", "transformer_ops.rs"] {
        let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(file)).unwrap();
        for chunk in src.split("r#\"").skip(1) {
            let lit = chunk.split("\"#").next().unwrap();
            if lit.starts_with("{\"format\": \"laplace-graph\"") && !lit.contains("{{") {
                graph_seeds.push(lit.as_bytes().to_vec());
            }
        }
    }
    assert!(graph_seeds.len() >= 5, "found {} graph specs", graph_seeds.len());
    for seed in &graph_seeds {
        assert!(laplace::fuzzing::spec(seed).is_ok(), "a seed spec builds");
    }
    let spec_path = Path::new("graph spec");
    for i in 0..2000 {
        let bytes = m.mutate(&graph_seeds[i % graph_seeds.len()]);
        stats.runs += 1;
        match catch_unwind(AssertUnwindSafe(|| laplace::fuzzing::spec(&bytes))) {
            Ok(Ok(())) => stats.accepted += 1,
            Ok(Err(e)) => stats.over_budget += usize::from(matches!(e, laplace::Error::Memory(_))),
            Err(_) => stats.panics.push(format!("{spec_path:?}: {}", String::from_utf8_lossy(&bytes))),
        }
    }
    let mut tampered_accepted = Vec::new();
    for i in 0..2000 {
        let path = dir.join(format!("p{}.safetensors", i % 7));
        let bytes = m.mutate(&post_seeds[i % post_seeds.len()]);
        std::fs::write(&path, &bytes).unwrap();
        let accepted_before = stats.accepted;
        check(&mut stats, "posterior", &path, || Posterior::load(&path));
        // Any change to a posterior file is refused (shapes, values, checksum).
        if stats.accepted > accepted_before && bytes != post_seeds[i % post_seeds.len()] {
            // Only padding of the JSON header may change harmlessly.
            let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let same_data = bytes.len() >= 8 + header_len && post_seeds.iter().any(|s| s.ends_with(&bytes[8 + header_len..]));
            if !same_data {
                tampered_accepted.push(i);
            }
        }
    }
    let _ = std::panic::take_hook();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "malformed inputs: {} runs, {} accepted, {} refused ({} by the memory budget), {} panics",
        stats.runs,
        stats.accepted,
        stats.runs - stats.accepted - stats.panics.len(),
        stats.over_budget,
        stats.panics.len()
    );
    assert!(stats.runs >= 10_000, "only {} runs", stats.runs);
    assert!(stats.panics.is_empty(), "{} panics, e.g. {:?}", stats.panics.len(), &stats.panics[..stats.panics.len().min(5)]);
    assert!(stats.unnamed.is_empty(), "{} errors do not name their file, e.g. {:?}", stats.unnamed.len(), &stats.unnamed[..stats.unnamed.len().min(5)]);
    assert!(tampered_accepted.is_empty(), "tampered posteriors accepted: {tampered_accepted:?}");
    // The generators reach both verdicts: the test is not vacuous.
    assert!(stats.accepted > 100 && stats.runs - stats.accepted > 5000, "accepted {}", stats.accepted);
    assert!(stats.over_budget >= 10, "only {} inputs met the memory budget", stats.over_budget);
}

/// The fuzz targets (`fuzz/`, their own workspace) compile on stable.
#[test]
fn fuzz_targets_build() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = root.join("target").join("fuzz-check");
    let out = std::process::Command::new(env!("CARGO"))
        .args(["check", "--locked", "--bins", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "the fuzz targets do not build:\n{}", String::from_utf8_lossy(&out.stderr));
    for t in ["spec", "safetensors", "npz", "npy", "posterior"] {
        let src = std::fs::read_to_string(root.join("fuzz/fuzz_targets").join(format!("{t}.rs"))).unwrap();
        assert!(src.contains(&format!("laplace::fuzzing::{t}(")), "fuzz target {t} does not call laplace::fuzzing::{t}");
    }
}

/// The fuzzing entry points themselves, on a few hostile byte strings.
#[test]
fn fuzzing_entry_points_refuse_hostile_bytes() {
    laplace::budget::set_limit(256 << 20);
    let huge = npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }", 400);
    let e = laplace::fuzzing::npy(&huge).unwrap_err().to_string();
    assert!(e.contains("fuzz.npy") && e.contains("1000000000000"), "{e}");
    let e = laplace::fuzzing::npz(&zip(&[("x.npy".into(), huge.clone())], true)).unwrap_err().to_string();
    assert!(e.contains("\"x.npy\""), "{e}");
    assert!(laplace::fuzzing::safetensors(&[0xff; 16]).is_err());
    assert!(laplace::fuzzing::posterior(b"").is_err());
    let pad = br#"{"input_shape":[1,8,8],"layers":[{"type":"Conv2d","in_channels":1,"out_channels":1,"kernel_size":3,"padding":1000000}]}"#;
    let e = laplace::fuzzing::spec(pad).unwrap_err().to_string();
    assert!(e.contains("sliding window") && e.contains("1000000"), "{e}");
    // expand and repeat build an index map of their output while the model is built.
    for (op, attrs) in [("expand", r#"{"shape": [-1, 100000000, -1]}"#), ("repeat", r#"{"repeats": [1, 100000000, 1]}"#)] {
        let g = format!(
            r#"{{"format": "laplace-graph", "version": 1, "inputs": [{{"name": "x", "shape": [3, 4], "dtype": "float"}}], "parameters": [],
              "nodes": [{{"name": "r", "op": "reshape", "inputs": ["x"], "attrs": {{"shape": [3, 1, 4]}}}},
                        {{"name": "e", "op": "{op}", "inputs": ["r"], "attrs": {attrs}}}], "output": "e"}}"#
        );
        let e = laplace::fuzzing::spec(g.as_bytes()).unwrap_err().to_string();
        assert!(e.contains(&format!("{op} to per-sample shape [3, 100000000, 4] needs 9.6 GB")), "{e}");
    }
}
