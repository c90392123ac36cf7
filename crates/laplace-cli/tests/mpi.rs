//! `mpirun -n R laplace ...` (the `mpi` feature) against the plain binary:
//! for R = 1, 2, 3 ranks on this machine every data-parallel subcommand writes
//! what a single process writes (1e-10 relative in float64), with shards of
//! unequal length (N = 7 and 8 over 2 and 3 ranks); a rank that fails or is
//! killed ends the job non-zero, naming the rank, with no output; more ranks
//! than points is an error, not a hang.
//!
//! Needs Open MPI's `mpirun` and, in `LAPLACE_PLAIN_BIN`, a `laplace` built
//! without the feature (the reference). `.ci/run` provides both:
//!
//! ```sh
//! cargo build --release -p laplace-cli && cp target/release/laplace target/laplace-plain
//! LAPLACE_PLAIN_BIN=target/laplace-plain cargo test --release -p laplace-cli --features mpi --test mpi
//! ```
#![cfg(feature = "mpi")]

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use laplace::tensor::{self, DType, Device, Tensor};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../laplace/tests/fixtures").join(case)
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("laplace-mpi-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn plain_bin() -> PathBuf {
    let p = std::env::var_os("LAPLACE_PLAIN_BIN").map(PathBuf::from).expect(
        "LAPLACE_PLAIN_BIN must name a laplace binary built without --features mpi (the reference; .ci/run sets it)",
    );
    assert!(p.exists(), "LAPLACE_PLAIN_BIN={} does not exist", p.display());
    p
}

/// Exit status (None: killed by a signal), stdout and stderr of a finished run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Start `cmd` with its output in files under `dir`.
fn spawn(mut cmd: Command, dir: &Path, tag: &str) -> (Child, PathBuf, PathBuf) {
    let (out, err) = (dir.join(format!("{tag}.stdout")), dir.join(format!("{tag}.stderr")));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("start the command (is mpirun installed?)");
    (child, out, err)
}

/// Wait for `child` at most `limit`: a hang is a failure, not a stuck test.
fn finish(mut child: Child, out: PathBuf, err: PathBuf, limit: Duration, what: &str) -> Run {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?} (a hang)\n{}", std::fs::read_to_string(&err).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run { code: status.code(), stdout: std::fs::read_to_string(out).unwrap(), stderr: std::fs::read_to_string(err).unwrap() }
}

fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-n", &ranks.to_string(), env!("CARGO_BIN_EXE_laplace")]);
    c
}

/// `laplace args` on `ranks` ranks (0: the plain binary, no MPI).
fn laplace(ranks: usize, args: &[String], dir: &Path, tag: &str) -> Run {
    let mut cmd = if ranks == 0 { Command::new(plain_bin()) } else { mpirun(ranks) };
    cmd.args(args);
    let (child, out, err) = spawn(cmd, dir, tag);
    finish(child, out, err, Duration::from_secs(120), tag)
}

fn model_args(case: &str) -> Vec<String> {
    let d = fixture(case);
    vec![
        "--model".into(),
        d.join("model.json").display().to_string(),
        "--weights".into(),
        d.join("weights.safetensors").display().to_string(),
    ]
}

fn data_args(case: &str) -> Vec<String> {
    let mut v = model_args(case);
    v.extend(["--data".into(), fixture(case).join("data.npz").display().to_string(), "--batch-size".into(), "2".into()]);
    v
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// Tensors of a safetensors output as f64, and its string metadata.
fn read(path: &Path) -> (HashMap<String, (Vec<usize>, Vec<f64>)>, HashMap<String, String>) {
    let ts = laplace::io::read_safetensors(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let meta = laplace::io::read_safetensors_metadata(path).unwrap();
    let ts = ts
        .into_iter()
        .map(|(k, t)| {
            let v = if tensor::is_int_dtype(t.dtype()) {
                tensor::to_vec_i64(&t).unwrap().into_iter().map(|x| x as f64).collect()
            } else {
                tensor::to_vec_f64(&t).unwrap()
            };
            (k, (t.dims().to_vec(), v))
        })
        .collect();
    (ts, meta)
}

/// max |a − b| / max |b|: 0 for equal tensors, whatever their scale.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

const TOL: f64 = 1e-10;

/// Rows of `v (k, p)` with each row's sign fixed by its largest entry
/// (eigenvectors are defined up to sign).
fn signed_rows(v: &[f64], p: usize) -> Vec<f64> {
    v.chunks(p)
        .flat_map(|row| {
            let big = row.iter().fold(0.0f64, |m, &x| if x.abs() > m.abs() { x } else { m });
            let s = if big < 0.0 { -1.0 } else { 1.0 };
            row.iter().map(move |x| s * x)
        })
        .collect()
}

/// V diag(λ) Vᵀ from eigenvalues `(P,)` and eigenvectors as columns `(P, P)`:
/// what a full posterior's eigenpairs stand for (a null space's basis is arbitrary).
fn reassemble(vals: &[f64], vecs: &[f64]) -> Vec<f64> {
    let p = vals.len();
    let mut m = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..p {
            m[i * p + j] = (0..p).map(|k| vecs[i * p + k] * vals[k] * vecs[j * p + k]).sum();
        }
    }
    m
}

/// Numbers equal to TOL, everything else exactly.
fn same_json(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Result<(), String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            let r = (x - y).abs() / y.abs().max(1e-300);
            if r > TOL && x != y {
                return Err(format!("{at}: {x} vs {y} (relative {r:.2e})"));
            }
            Ok(())
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().try_for_each(|(i, (x, y))| same_json(x, y, &format!("{at}[{i}]")))
        }
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
            x.iter().try_for_each(|(k, v)| same_json(v, y.get(k).ok_or(format!("{at}.{k} missing"))?, &format!("{at}.{k}")))
        }
        _ if a == b => Ok(()),
        _ => Err(format!("{at}: {a} vs {b}")),
    }
}

/// Assert an MPI output equals the plain one; the largest relative difference.
#[track_caller]
fn assert_same(got: &Path, want: &Path, what: &str) -> f64 {
    let ((g, gm), (w, wm)) = (read(got), read(want));
    let mut keys: Vec<&String> = w.keys().collect();
    keys.sort();
    assert_eq!(g.len(), w.len(), "{what}: keys {:?} vs {keys:?}", g.keys().collect::<Vec<_>>());
    assert_eq!(gm, wm, "{what}: metadata");
    let mut worst = 0.0f64;
    for k in keys {
        let ((gd, gv), (wd, wv)) = (&g[k], &w[k]);
        // (The JSON config's length may differ by a digit of a number.)
        assert!(gd == wd || k == "config", "{what}: shape of {k}: {gd:?} vs {wd:?}");
        let e = match k.as_str() {
            "config" => {
                let parse = |v: &[f64]| -> serde_json::Value { serde_json::from_slice(&v.iter().map(|&b| b as u8).collect::<Vec<u8>>()).unwrap() };
                same_json(&parse(gv), &parse(wv), "config").unwrap_or_else(|e| panic!("{what}: {e}"));
                0.0
            }
            // A CRC-32 of the posterior's bytes: it changes with the last bit
            // of any value (summation order); both files are checked on load.
            "checksum" => {
                laplace::posterior::Posterior::load(got).unwrap_or_else(|e| panic!("{what}: {e}"));
                0.0
            }
            "eigenvectors" => rel(&signed_rows(gv, gd[1]), &signed_rows(wv, wd[1])),
            "H.eigenvectors" => {
                let (gl, wl) = (&g["H.eigenvalues"].1, &w["H.eigenvalues"].1);
                rel(&reassemble(gl, gv), &reassemble(wl, wv))
            }
            _ => rel(gv, wv),
        };
        assert!(e <= TOL, "{what}: {k} differs by {e:.3e} relative (> {TOL:e})");
        worst = worst.max(e);
    }
    worst
}

/// Run `args` (ending in `--out <dir>/<tag>.safetensors`) plainly and on 1, 2, 3 ranks; compare.
fn same_on_1_2_3_ranks(test: &str, args: Vec<String>, out_flag: &str) {
    let dir = scratch(test);
    let with_out = |tag: &str| {
        let mut a = args.clone();
        a.extend([out_flag.to_string(), dir.join(format!("{tag}.safetensors")).display().to_string()]);
        a
    };
    let plain = laplace(0, &with_out("plain"), &dir, "plain");
    assert!(plain.ok(), "{test}: plain binary failed: {}", plain.text());
    for ranks in [1, 2, 3] {
        let tag = format!("r{ranks}");
        let run = laplace(ranks, &with_out(&tag), &dir, &tag);
        assert!(run.ok(), "{test}: {ranks} ranks failed: {}", run.text());
        // Rank 0 alone prints (trace, fit): the same lines as one process.
        assert_eq!(run.stdout.lines().count(), plain.stdout.lines().count(), "{test}: {ranks} ranks printed {:?}", run.stdout);
        let e = assert_same(&dir.join(format!("{tag}.safetensors")), &dir.join("plain.safetensors"), &format!("{test} R={ranks}"));
        eprintln!("{test} R={ranks}: max relative difference {e:.1e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn curvature(case: &str, likelihood: &str, extra: &[&str]) -> Vec<String> {
    let mut a = strings(&["curvature"]);
    a.extend(data_args(case));
    a.extend(strings(&["--likelihood", likelihood]));
    a.extend(strings(extra));
    a
}

#[test]
fn ggn_diagonal() {
    same_on_1_2_3_ranks("ggn-diag", curvature("cls_cnn_dilated", "classification", &["--structure", "diag"]), "--out");
}

#[test]
fn kfac() {
    // Every factor and the loss; A normalized by the whole data set's N.
    same_on_1_2_3_ranks("kfac", curvature("cls_cnn_dilated", "classification", &["--structure", "kron"]), "--out");
    same_on_1_2_3_ranks("kfac-ef-reduce", curvature("reg_multi", "regression", &["--structure", "kron", "--curvature", "ef", "--kfac-approx", "reduce"]), "--out");
}

#[test]
fn full_ggn_and_ef() {
    same_on_1_2_3_ranks("ggn-full", curvature("reg_multi", "regression", &["--structure", "full"]), "--out");
    same_on_1_2_3_ranks("ef-full", curvature("cls_cnn_dilated", "classification", &["--structure", "full", "--curvature", "ef"]), "--out");
}

#[test]
fn monte_carlo_fisher_draws_do_not_depend_on_ranks() {
    let args = curvature("cls_cnn_dilated", "classification", &["--structure", "diag", "--curvature", "fisher-mc", "--samples", "3", "--seed", "7"]);
    same_on_1_2_3_ranks("fisher-mc", args, "--out");
}

#[test]
fn jacobians_and_gradients() {
    let mut j = strings(&["jacobians"]);
    j.extend(data_args("cls_cnn_dilated"));
    same_on_1_2_3_ranks("jacobians", j.clone(), "--out");
    j.push("--last-layer".into());
    same_on_1_2_3_ranks("jacobians-last-layer", j, "--out");
    let mut g = strings(&["gradients"]);
    g.extend(data_args("reg_multi"));
    g.extend(strings(&["--likelihood", "regression"]));
    same_on_1_2_3_ranks("gradients", g, "--out");
}

#[test]
fn fit_with_marglik() {
    let fit = |case: &str, likelihood: &str, extra: &[&str]| {
        let mut a = strings(&["fit"]);
        a.extend(data_args(case));
        a.extend(strings(&["--likelihood", likelihood, "--optimize-prior", "marglik", "--json"]));
        a.extend(strings(extra));
        a
    };
    same_on_1_2_3_ranks("fit-kron", fit("cls_cnn_dilated", "classification", &["--structure", "kron", "--prior-structure", "layerwise"]), "--out");
    same_on_1_2_3_ranks("fit-full-sigma", fit("reg_multi", "regression", &["--structure", "full", "--optimize-sigma"]), "--out");
    same_on_1_2_3_ranks("fit-lowrank", fit("cls_mlp", "classification", &["--structure", "lowrank", "--rank", "4"]), "--out");
}

#[test]
fn lanczos_eigenvalues_and_trace_estimators() {
    let mut e = strings(&["eigen"]);
    e.extend(data_args("cls_cnn_dilated"));
    e.extend(strings(&["--likelihood", "classification", "--top-k", "3", "--seed", "1"]));
    same_on_1_2_3_ranks("eigen", e, "--out");
    for estimator in ["exact", "hutchinson", "hutchpp"] {
        let mut t = strings(&["trace"]);
        t.extend(data_args("cls_mlp"));
        t.extend(strings(&["--likelihood", "classification", "--estimator", estimator, "--samples", "9", "--json"]));
        same_on_1_2_3_ranks(&format!("trace-{estimator}"), t, "--out");
    }
}

/// A classification data set for the `cls_mlp` model (6 inputs, 4 classes),
/// labels from `label(n)`, as safetensors.
fn mlp_data(path: &Path, n: usize, label: impl Fn(usize) -> i64) {
    let x: Vec<f64> = (0..n * 6).map(|i| ((i * 7919 % 1000) as f64) / 500.0 - 1.0).collect();
    let y: Vec<i64> = (0..n).map(label).collect();
    let dev = Device::Cpu;
    let x = tensor::from_f64(x, &[n, 6], DType::F64, &dev).unwrap();
    let y = Tensor::from_vec(y, n, &dev).unwrap();
    laplace::io::write_safetensors(path, &[("x".into(), x), ("y".into(), y)]).unwrap();
}

fn no_output(dir: &Path, name: &str) {
    let left: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|f| f.contains(name)).collect();
    assert!(left.is_empty(), "output (or a temporary of it) left behind: {left:?}");
}

#[test]
fn a_failing_rank_fails_every_rank_naming_it() {
    let dir = scratch("bad-shard");
    let data = dir.join("data.safetensors");
    // Points 6..9 (rank 2's shard of 3) carry a class the model does not have.
    mlp_data(&data, 9, |i| if i >= 6 { 9 } else { (i % 4) as i64 });
    let mut args = model_args("cls_mlp");
    args.extend(["--data".into(), data.display().to_string(), "--likelihood".into(), "classification".into()]);
    for cmd in ["curvature", "gradients", "fit"] {
        let mut a = vec![cmd.to_string()];
        a.extend(args.clone());
        if cmd == "fit" {
            a.extend(strings(&["--structure", "diag"]));
        }
        a.extend(["--out".into(), dir.join("out.safetensors").display().to_string()]);
        let run = laplace(3, &a, &dir, cmd);
        assert!(!run.ok(), "{cmd}: succeeded on a bad shard");
        assert!(run.stderr.contains("error: rank 2: data: y[0] = 9 is not a class index"), "{cmd}: {}", run.text());
        no_output(&dir, "out.safetensors");
        // The plain binary refuses the same data (without a rank).
        let plain = laplace(0, &a, &dir, "plain");
        assert!(!plain.ok() && plain.stderr.contains("is not a class index"), "{}", plain.text());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn more_ranks_than_points_is_an_error() {
    let dir = scratch("too-many");
    let mut a = curvature("cls_cnn_dilated", "classification", &[]);
    a.extend(["--out".into(), dir.join("out.safetensors").display().to_string()]);
    let run = laplace(8, &a, &dir, "r8");
    assert!(!run.ok());
    assert!(run.stderr.contains("7 points cannot be split over 8 processes (run at most 7)"), "{}", run.text());
    no_output(&dir, "out.safetensors");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The pids of the `laplace` processes of rank `rank` started with `mark` in
/// their environment.
fn ranks_pids(mark: &str, rank: usize) -> Vec<i32> {
    let want_rank = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            let has = |s: &str| vars.iter().any(|v| *v == s.as_bytes());
            (has(mark) && has(&want_rank)).then_some(pid)
        })
        .collect()
}

#[test]
fn a_killed_rank_ends_the_job_without_output() {
    let dir = scratch("killed");
    let data = dir.join("data.safetensors");
    mlp_data(&data, 2000, |i| (i % 4) as i64);
    // A long job: Lanczos to the end of the Krylov space, a point per batch.
    let out = dir.join("out.safetensors");
    let mut cmd = mpirun(2);
    cmd.args(["eigen"]).args(model_args("cls_mlp")).args([
        "--data",
        data.to_str().unwrap(),
        "--likelihood",
        "classification",
        "--batch-size",
        "1",
        "--top-k",
        "3",
        "--tol",
        "0",
        "--max-iter",
        "194",
        "--out",
        out.to_str().unwrap(),
    ]);
    let mark = format!("LAPLACE_TEST_MARK={}", std::process::id());
    cmd.env("LAPLACE_TEST_MARK", std::process::id().to_string());
    let (child, o, e) = spawn(cmd, &dir, "killed");
    // Wait for rank 1, let it compute a little, then kill it.
    let start = Instant::now();
    let pid = loop {
        if let Some(&pid) = ranks_pids(&mark, 1).first() {
            break pid;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "rank 1 never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: a plain kill(2) of a process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill rank 1 (pid {pid})");
    let killed_at = Instant::now();
    let run = finish(child, o, e, Duration::from_secs(60), "killed job");
    assert!(killed_at.elapsed() < Duration::from_secs(30), "the job took {:?} to end after the kill", killed_at.elapsed());
    assert!(!run.ok(), "the job succeeded with a killed rank: {}", run.text());
    let text = run.text();
    assert!(text.contains("rank 1") && (text.contains("signal 9") || text.contains("Killed")), "the message names neither the rank nor the cause:\n{text}");
    no_output(&dir, "out.safetensors");
    // No rank outlives the job.
    std::thread::sleep(Duration::from_millis(200));
    assert!(ranks_pids(&mark, 0).is_empty() && ranks_pids(&mark, 1).is_empty(), "ranks left running");
    std::fs::remove_dir_all(&dir).unwrap();
}
