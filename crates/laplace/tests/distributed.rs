//! Data-parallel passes without MPI: R ranks as R threads of this process,
//! joined by an in-memory communicator, each holding one contiguous shard of
//! a fixture's data set. Every quantity over the shards must equal the
//! single-process one over the whole data set (up to summation order), on
//! every rank, bit for bit the same; Monte-Carlo draws must not depend on R;
//! one rank's error must reach all of them; and a rank's shard read from a
//! file must be those rows of the file.

mod common;

use std::sync::{Barrier, Mutex};

use common::{assert_close, Fixture};
use laplace::curvature::KfacApprox;
use laplace::distributed::{self, Communicator};
use laplace::operator::{hutchinson_trace, lanczos_top_k, CurvatureOperator, LinearOperator};
use laplace::posterior::{FitOptions, Fitted, Posterior, Structure};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{BatchSize, Curvature, CurvatureKind, Dataset, Subset};

/// What a rank contributes to a collective: which one, and its data.
#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Empty,
    Sum(Vec<f64>),
    Gather(Vec<f64>),
    Bytes(Vec<u8>),
}

/// The shared side of R threads' collectives: every rank writes its slot,
/// all wait, all read every slot (in rank order, so every rank computes the
/// same bits), all wait again before the slots are reused.
struct Hub {
    barrier: Barrier,
    slots: Mutex<Vec<Slot>>,
}

struct Member<'a> {
    hub: &'a Hub,
    rank: usize,
    size: usize,
}

impl Member<'_> {
    fn exchange(&self, mine: Slot) -> Vec<Slot> {
        self.hub.slots.lock().unwrap()[self.rank] = mine;
        self.hub.barrier.wait();
        let all = self.hub.slots.lock().unwrap().clone();
        self.hub.barrier.wait();
        let kind = std::mem::discriminant(&all[0]);
        assert!(all.iter().all(|s| std::mem::discriminant(s) == kind), "ranks reached different collectives: {all:?}");
        all
    }
}

impl Communicator for Member<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn sum(&self, values: &mut [f64]) -> laplace::Result<()> {
        let all = self.exchange(Slot::Sum(values.to_vec()));
        values.iter_mut().for_each(|v| *v = 0.0);
        for s in all {
            let Slot::Sum(part) = s else { unreachable!() };
            assert_eq!(part.len(), values.len(), "sum over vectors of different lengths");
            values.iter_mut().zip(part).for_each(|(v, p)| *v += p);
        }
        Ok(())
    }

    fn gather(&self, local: &[f64]) -> laplace::Result<Vec<f64>> {
        let all = self.exchange(Slot::Gather(local.to_vec()));
        Ok(all.into_iter().flat_map(|s| if let Slot::Gather(v) = s { v } else { unreachable!() }).collect())
    }

    fn gather_bytes(&self, local: &[u8]) -> laplace::Result<Vec<Vec<u8>>> {
        let all = self.exchange(Slot::Bytes(local.to_vec()));
        Ok(all.into_iter().map(|s| if let Slot::Bytes(v) = s { v } else { unreachable!() }).collect())
    }
}

/// Run `f(comm, shard)` on `size` threads, rank r with its shard of `data`
/// (or of `shards(r)`), and return every rank's result in rank order.
fn on_ranks<T: Send>(size: usize, shard: impl Fn(usize) -> Dataset + Sync, f: impl Fn(&dyn Communicator, &Dataset) -> T + Sync) -> Vec<T> {
    let hub = Hub { barrier: Barrier::new(size), slots: Mutex::new(vec![Slot::Empty; size]) };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (hub, f, shard) = (&hub, &f, &shard);
                s.spawn(move || {
                    let comm = Member { hub, rank, size };
                    f(&comm, &shard(rank))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}

/// Rank `rank`'s contiguous shard of `data` when split over `size` ranks.
fn shard_of(data: &Dataset, rank: usize, size: usize) -> Dataset {
    let r = distributed::split(data.len(), rank, size);
    Dataset { x: data.x.narrow(r.start, r.len()).unwrap(), y: data.y.as_ref().map(|y| y.narrow(0, r.start, r.len()).unwrap()) }
}

/// Every rank returned the same bits.
#[track_caller]
fn same_on_every_rank(per_rank: &[Vec<f64>], what: &str) {
    for (r, v) in per_rank.iter().enumerate() {
        assert!(v == &per_rank[0], "{what}: rank {r} differs from rank 0");
    }
}

fn flat(ts: &[&Tensor]) -> Vec<f64> {
    ts.iter().flat_map(|t| tensor::to_vec_f64(t).unwrap()).collect()
}

/// Compare the concatenation of `got` with that of `want`, per tensor.
#[track_caller]
fn check(got: &[Vec<Tensor>], want: &[Tensor], what: &str) {
    let per_rank: Vec<Vec<f64>> = got.iter().map(|ts| flat(&ts.iter().collect::<Vec<_>>())).collect();
    same_on_every_rank(&per_rank, what);
    for (i, (g, w)) in got[0].iter().zip(want).enumerate() {
        assert_close(g, w, 1e-12, &format!("{what} [{i}]"));
    }
}

const CASES: [&str; 3] = ["cls_cnn_dilated", "reg_multi", "cls_mlp"];
const BATCH: usize = 2;

#[test]
fn curvature_over_shards_equals_the_whole_data_set() {
    for case in CASES {
        let fx = Fixture::load(case);
        let n = fx.data.len();
        for kind in [CurvatureKind::Ggn, CurvatureKind::Ef, CurvatureKind::FisherMc { samples: 3, seed: 5 }] {
            let whole = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
            let (l, d) = whole.diag_over(&fx.data, BATCH).unwrap();
            let (lf, h) = whole.full_over(&fx.data, 3).unwrap();
            let (lk, kron) = whole.kron_over(&fx.data, BATCH, n, KfacApprox::Expand).unwrap();
            let mut want_kron = vec![lk];
            want_kron.extend(kron.blocks.into_iter().flatten());
            for size in [1, 2, 3, n] {
                let what = format!("{case} {kind:?} R={size}");
                let got = on_ranks(size, |r| shard_of(&fx.data, r, size), |comm, shard| {
                    let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap().with_communicator(comm);
                    let (l, d) = c.diag_over(shard, BATCH).unwrap();
                    let (lf, h) = c.full_over(shard, BATCH).unwrap();
                    // KFAC's A is normalized by the global N, which the shard learns from the others.
                    let n_data = c.n_data(shard).unwrap();
                    let (lk, kron) = c.kron_over(shard, BATCH, n_data, KfacApprox::Expand).unwrap();
                    let mut k = vec![lk];
                    k.extend(kron.blocks.into_iter().flatten());
                    (vec![l, d], vec![lf, h], k, n_data)
                });
                assert!(got.iter().all(|g| g.3 == n), "{what}: global N");
                check(&got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(), &[l.clone(), d.clone()], &format!("{what} diag"));
                check(&got.iter().map(|g| g.1.clone()).collect::<Vec<_>>(), &[lf.clone(), h.clone()], &format!("{what} full"));
                check(&got.iter().map(|g| g.2.clone()).collect::<Vec<_>>(), &want_kron, &format!("{what} kron"));
            }
        }
    }
}

#[test]
fn jacobians_and_gradients_over_shards_are_the_whole_data_sets_rows() {
    for case in CASES {
        let fx = Fixture::load(case);
        let whole = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ef, &Subset::All).unwrap();
        let (j, f) = whole.jacobians_over(&fx.data, BATCH, false).unwrap();
        let (jl, fl) = whole.jacobians_over(&fx.data, BATCH, true).unwrap();
        let (g, l) = whole.gradients_over(&fx.data, BATCH).unwrap();
        for size in [2, 3] {
            let got = on_ranks(size, |r| shard_of(&fx.data, r, size), |comm, shard| {
                let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ef, &Subset::All).unwrap().with_communicator(comm);
                let (j, f) = c.jacobians_over(shard, BATCH, false).unwrap();
                let (jl, fl) = c.jacobians_over(shard, BATCH, true).unwrap();
                let (g, l) = c.gradients_over(shard, BATCH).unwrap();
                vec![j, f, jl, fl, g, l]
            });
            check(&got, &[j.clone(), f.clone(), jl.clone(), fl.clone(), g.clone(), l.clone()], &format!("{case} R={size} rows"));
        }
    }
}

#[test]
fn operator_products_lanczos_and_trace_over_shards() {
    let fx = Fixture::load("cls_cnn_dilated");
    let kind = CurvatureKind::FisherMc { samples: 2, seed: 3 };
    let whole = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
    let op = CurvatureOperator::new(&whole, &fx.data, BATCH).unwrap();
    let p = op.dim();
    let v = tensor::from_f64((0..3 * p).map(|i| ((i * 37 % 11) as f64) - 5.0).collect(), &[3, p], DType::F64, &Device::Cpu).unwrap();
    let hv = op.matmat(&v).unwrap();
    let ep = lanczos_top_k(&op, 3, 1e-10, 500, 7).unwrap();
    let tr = hutchinson_trace(&op, 5, 11).unwrap();
    for size in [2, 3] {
        let got = on_ranks(size, |r| shard_of(&fx.data, r, size), |comm, shard| {
            let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap().with_communicator(comm);
            let op = CurvatureOperator::new(&c, shard, BATCH).unwrap();
            let hv = op.matmat(&v).unwrap();
            let ep = lanczos_top_k(&op, 3, 1e-10, 500, 7).unwrap();
            let tr = hutchinson_trace(&op, 5, 11).unwrap();
            (hv, ep, tr)
        });
        let what = format!("R={size}");
        check(&got.iter().map(|g| vec![g.0.clone()]).collect::<Vec<_>>(), &[hv.clone()], &format!("{what} products"));
        let vals: Vec<Vec<f64>> = got.iter().map(|g| g.1.values.clone()).collect();
        same_on_every_rank(&vals, &format!("{what} eigenvalues"));
        for (a, b) in vals[0].iter().zip(&ep.values) {
            assert!((a - b).abs() <= 1e-11 * b.abs(), "{what}: eigenvalue {a} vs {b}");
        }
        assert!(got.iter().all(|g| g.1.iterations == got[0].1.iterations), "{what}: every rank took the same Lanczos steps");
        let traces: Vec<Vec<f64>> = got.iter().map(|g| vec![g.2]).collect();
        same_on_every_rank(&traces, &format!("{what} trace"));
        assert!((traces[0][0] - tr).abs() <= 1e-12 * tr.abs(), "{what}: trace {} vs {tr}", traces[0][0]);
    }
}

#[test]
fn monte_carlo_fisher_does_not_depend_on_the_number_of_ranks() {
    // The same draws whatever R and the batch size: at R = 1 with batch 4 the
    // per-point streams are those of R = 3 with batch 1 (to summation order).
    let fx = Fixture::load("cls_mlp");
    let kind = CurvatureKind::FisherMc { samples: 1, seed: 42 };
    let runs: Vec<Tensor> = [(1, 4), (2, 3), (3, 1)]
        .into_iter()
        .map(|(size, batch)| {
            on_ranks(size, |r| shard_of(&fx.data, r, size), |comm, shard| {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap().with_communicator(comm);
                c.diag_over(shard, batch).unwrap().1
            })
            .remove(0)
        })
        .collect();
    assert_close(&runs[1], &runs[0], 1e-13, "MC Fisher, R = 2 vs 1");
    assert_close(&runs[2], &runs[0], 1e-13, "MC Fisher, R = 3 vs 1");
    // A different seed draws differently: the comparison above could fail.
    let other = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::FisherMc { samples: 1, seed: 43 }, &Subset::All).unwrap();
    assert!(common::rel_err(&other.diag_over(&fx.data, 4).unwrap().1, &runs[0]) > 1e-3);
}

#[test]
fn posterior_fit_over_shards_equals_the_single_process_fit() {
    for (case, structure) in [("cls_cnn_dilated", Structure::Kron), ("reg_multi", Structure::Full), ("cls_mlp", Structure::Diag), ("cls_mlp", Structure::LowRank { rank: 3 })] {
        let fx = Fixture::load(case);
        let opts = FitOptions { structure, batch_size: BatchSize::Points(BATCH), prior_precision: vec![0.5], ..FitOptions::default() };
        let whole = Posterior::fit(fx.model.try_clone().unwrap(), &fx.data, fx.likelihood, &opts).unwrap();
        let summary = |p: &Posterior| -> Vec<f64> {
            let mut v = vec![p.loss, p.n_data as f64, p.evidence().unwrap()];
            match p.fitted() {
                Fitted::Full { h, .. } => v.extend(tensor::to_vec_f64(h).unwrap()),
                Fitted::Diag { h } => v.extend(h),
                Fitted::Kron { kron, .. } => kron.blocks.iter().flatten().for_each(|f| v.extend(tensor::to_vec_f64(f).unwrap())),
                Fitted::LowRank { values, .. } => v.extend(values),
            }
            v
        };
        let want = summary(&whole);
        for size in [2, 3] {
            let got = on_ranks(size, |r| shard_of(&fx.data, r, size), |comm, shard| {
                let post = Posterior::fit_distributed(fx.model.try_clone().unwrap(), shard, fx.likelihood, &opts, &laplace::pass::SILENT, comm).unwrap();
                summary(&post)
            });
            let what = format!("{case} {} R={size}", structure.name());
            same_on_every_rank(&got, &what);
            assert_eq!(got[0][1], fx.data.len() as f64, "{what}: n_data is the whole data set's");
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for (i, (a, b)) in got[0].iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-11 * scale.max(b.abs()), "{what}: value {i}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn one_ranks_error_is_every_ranks_error_naming_it() {
    let fx = Fixture::load("cls_mlp");
    let size = 3;
    // Rank 1's shard holds a label the model has no class for.
    let shards = |r: usize| {
        let mut s = shard_of(&fx.data, r, size);
        if r == 1 {
            let y = tensor::to_vec_i64(s.y.as_ref().unwrap()).unwrap().iter().map(|_| 99i64).collect::<Vec<_>>();
            s.y = Some(Tensor::from_vec(y.clone(), y.len(), &Device::Cpu).unwrap());
        }
        s
    };
    let errors = on_ranks(size, shards, |comm, shard| {
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap().with_communicator(comm);
        let diag = c.diag_over(shard, BATCH).unwrap_err().to_string();
        // The ranks are still in step afterwards: a later pass works on the good shards.
        let grads = c.gradients_over(shard, BATCH).unwrap_err().to_string();
        (diag, grads)
    });
    for (r, (diag, grads)) in errors.iter().enumerate() {
        assert!(diag.starts_with("rank 1: data: y[0] = 99 is not a class index"), "rank {r}: {diag}");
        assert!(grads.starts_with("rank 1: "), "rank {r}: {grads}");
    }
    // Every rank failing alike (no targets at all) is that error, without a rank.
    let errors = on_ranks(size, |r| Dataset { y: None, ..shard_of(&fx.data, r, size) }, |comm, shard| {
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap().with_communicator(comm);
        c.full_over(shard, BATCH).unwrap_err().to_string()
    });
    assert!(errors.iter().all(|e| e.starts_with("data: the data file has no targets")), "{errors:?}");
}

#[test]
fn a_shard_read_from_a_file_is_those_rows() {
    let dir = std::env::temp_dir().join(format!("laplace-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The committed .npz (stored members), and the same arrays as safetensors
    // in other dtypes (f32 inputs, i64 labels).
    let npz = common::fixtures_dir().join("cls_cnn_dilated/data.npz");
    let arrays = laplace::io::read_npz(&npz, &Device::Cpu).unwrap();
    let st = dir.join("data.safetensors");
    let named: Vec<(String, Tensor)> = vec![("x".into(), arrays["x"].to_dtype(DType::F32).unwrap()), ("y".into(), arrays["y"].clone())];
    laplace::io::write_safetensors(&st, &named).unwrap();
    for path in [&npz, &st] {
        let whole = Dataset::load(path, DType::F64, &Device::Cpu).unwrap();
        let n = whole.len();
        for size in [1, 2, 3, n] {
            for rank in 0..size {
                let part = Dataset::load_part(path, "y", rank, size, DType::F64, &Device::Cpu).unwrap();
                let want = shard_of(&whole, rank, size);
                let what = format!("{} rank {rank} of {size}", path.display());
                assert_eq!(part.len(), want.len(), "{what}");
                assert_eq!(flat(&[part.x.first()]), flat(&[want.x.first()]), "{what}: x");
                assert_eq!(tensor::to_vec_i64(part.y.as_ref().unwrap()).unwrap(), tensor::to_vec_i64(want.y.as_ref().unwrap()).unwrap(), "{what}: y");
            }
        }
        let e = Dataset::load_part(path, "y", 0, n + 1, DType::F64, &Device::Cpu).err().expect("more ranks than points").to_string();
        assert!(e.contains(&format!("{n} points cannot be split over {} processes", n + 1)), "{e}");
    }
    // Stored members are read by rows, a Fortran-ordered one (w) and
    // deflated ones through the whole-file reader: the same rows either way.
    for name in ["stored.npz", "deflated.npz"] {
        let path = common::fixtures_dir().join("npz").join(name);
        let whole = laplace::io::read_npz(&path, &Device::Cpu).unwrap();
        let reader = laplace::io::rows::RowReader::open(&path).unwrap();
        let shapes = reader.shapes().unwrap();
        assert_eq!(shapes.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["mask", "w", "x", "y"], "{name}");
        let rows = reader.read(1..2, &Device::Cpu).unwrap();
        for (k, t) in &whole {
            let want = t.narrow(0, 1, 1).unwrap();
            assert_eq!(rows[k].dims(), want.dims(), "{name} {k}");
            assert_eq!(rows[k].dtype(), t.dtype(), "{name} {k}");
            let as_f64 = |t: &Tensor| tensor::to_vec_f64(&t.to_dtype(DType::F64).unwrap()).unwrap();
            assert_eq!(as_f64(&rows[k]), as_f64(&want), "{name} {k}");
        }
        let e = reader.read(1..3, &Device::Cpu).err().expect("w has 2 rows").to_string();
        assert!(e.contains(name) && e.contains("\"w\"") && e.contains("no rows 1..3"), "{e}");
    }
    // A flipped byte in a stored member's data fails its CRC-32, as in the whole-file reader.
    let mut bytes = std::fs::read(common::fixtures_dir().join("npz/stored.npz")).unwrap();
    let at = bytes.windows(6).position(|w| w == b"\x93NUMPY").unwrap() + 150;
    bytes[at] ^= 0x40;
    let corrupt = dir.join("corrupt.npz");
    std::fs::write(&corrupt, &bytes).unwrap();
    let e = laplace::io::rows::RowReader::open(&corrupt).err().expect("a CRC mismatch").to_string();
    assert!(e.contains("corrupt.npz") && e.contains("CRC-32 mismatch"), "{e}");
    // Arrays that disagree on N are refused from the headers.
    let bad = dir.join("bad.safetensors");
    laplace::io::write_safetensors(&bad, &[("x".into(), arrays["x"].clone()), ("y".into(), arrays["y"].narrow(0, 0, 3).unwrap())]).unwrap();
    let e = Dataset::load_part(&bad, "y", 0, 2, DType::F64, &Device::Cpu).err().expect("mismatched N").to_string();
    assert!(e.contains("targets \"y\" has shape [3]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
