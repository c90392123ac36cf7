//! `BatchSize::Auto`: the per-point working-memory estimate is an upper
//! bound of what a pass really allocates, the chosen batch is the largest
//! that fits half the budget, and the batch size changes results only by
//! summation order.
//!
//! Memory is measured by a counting global allocator (live bytes and their
//! high-water mark), so this file holds a single test: nothing else may
//! allocate while a pass is measured.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use laplace::budget::MemoryBudget;
use laplace::curvature::KfacApprox;
use laplace::tensor::{Device, Tensor};
use laplace::curvature::{auto_batch_bytes, MIN_UPDATE_ROWS};
use laplace::{BatchSize, Curvature, CurvatureKind, Dataset, Likelihood, PerPoint, Sequential, Subset};

use common::rel_err;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Allocations of at least this size are not counted: the `gemm` crate
/// (candle's matrix products, still the tests' oracle) reserves a packing
/// buffer per call sized by the L3 cache (2 × 260 MiB on the machine this
/// was written on), of which a product touches only what its operands
/// need. It does not depend on the batch size, and the data here is far too
/// small for any buffer of ours to come near it.
const UNCOUNTED: usize = 128 << 20;

/// Nor are page-aligned allocations: faer's x86 GEMM keeps one packing
/// buffer of 2 × L3 per thread, as 4096-aligned pages, made on that thread's
/// first product and kept for its lifetime (64 MiB on a 32 MiB-L3 machine,
/// under [`UNCOUNTED`]). Nothing of ours asks for that alignment.
const PACKING_ALIGN: usize = 4096;

fn counted(layout: Layout) -> usize {
    if layout.size() >= UNCOUNTED || layout.align() >= PACKING_ALIGN { 0 } else { layout.size() }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let size = counted(layout);
            let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(counted(layout), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            let (old, new) = (counted(layout), counted(Layout::from_size_align(new_size, layout.align()).unwrap()));
            let now = LIVE.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(now, Ordering::Relaxed);
            LIVE.fetch_sub(old, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes a pass allocated beyond what was live before it (its peak), and its result.
fn measured<T>(pass: impl FnOnce() -> T) -> (usize, T) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = pass();
    (PEAK.load(Ordering::Relaxed) - base, out)
}

fn bytes_of(ts: &[&Tensor]) -> usize {
    ts.iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
}

/// A fixture's points repeated `times` times.
fn repeated(case: &str, times: usize) -> (Sequential, Dataset) {
    let dir = common::fixtures_dir().join(case);
    let dev = Device::Cpu;
    let model = Sequential::load(dir.join("model.json"), dir.join("weights.safetensors"), None, &dev).unwrap();
    let data = Dataset::load(&dir.join("data.npz"), model.dtype(), &dev).unwrap();
    let x = data.x.first().clone();
    let y = data.y.clone().unwrap();
    let x = Tensor::cat(&vec![&x; times], 0).unwrap();
    let y = Tensor::cat(&vec![&y; times], 0).unwrap();
    (model, Dataset { x: x.into(), y: Some(y) })
}

/// Temporaries of the diagonal and full kernels are bounded by this many elements.
const CHUNK_ELEMS: usize = 1 << 12;

#[test]
fn auto_batches_fit_the_budget_and_the_estimate_bounds_the_pass() {
    for (case, likelihood) in [("cls_cnn", Likelihood::Classification), ("cls_mlp", Likelihood::Classification), ("reg_multi", Likelihood::Regression)] {
        let (model, data) = repeated(case, 100);
        let n = data.len();
        let kinds = [
            ("GGN", CurvatureKind::Ggn, model.n_outputs()),
            ("MC Fisher, 4 samples", CurvatureKind::FisherMc { samples: 4, seed: 3 }, 4),
            ("EF", CurvatureKind::Ef, 1),
        ];
        for (name, kind, rows) in kinds {
            for subset in [Subset::All, Subset::LastLayer] {
                let curv = Curvature::new(&model, likelihood, kind, &subset).unwrap().with_chunk_elems(CHUNK_ELEMS);
                let chunk_bytes = 4 * CHUNK_ELEMS * model.dtype().size_in_bytes();
                let what = format!("{case} {name} {subset:?}");

                // The batch `Auto` picks: the largest that fits half the budget
                // and the cache-sized ceiling.
                let per = curv.point_working_bytes(PerPoint::Sums).unwrap();
                let at = |bytes: u64| curv.batch_points(BatchSize::Auto, PerPoint::Sums, n, MemoryBudget { bytes });
                assert!(per * n as u64 <= auto_batch_bytes(), "{what}: the cases are meant to fit one Auto batch");
                assert_eq!(at(2 * per * n as u64), n, "{what}");
                assert_eq!(at(u64::MAX), n, "{what}");
                assert_eq!(at(2 * per * 37 + 1), 37, "{what}");
                assert_eq!(at(2 * per * 37 - 1), 36, "{what}");
                assert_eq!(at(0), 1, "{what}");
                // However large the budget, a batch's estimate stays under the ceiling.
                let many = 1 << 40;
                let ceiling = curv.batch_points(BatchSize::Auto, PerPoint::Sums, many, MemoryBudget { bytes: u64::MAX });
                assert_eq!(ceiling as u64, auto_batch_bytes() / per, "{what}");
                // The floor: MIN_UPDATE_ROWS rows of work for every value a
                // batch moves whatever its size, ⌈rows · S / F⌉: the weights
                // (S = Σ O·I, F = Σ (1 + K)·R·O·I), for Kronecker factors
                // also the factors (S = Σ I² + O², F = Σ R·I² + K·R·O²); a
                // full matrix MIN_UPDATE_ROWS points. Even above the ceiling,
                // never above half the budget.
                let floor_of = |factors: bool| {
                    let (moved, work) = model.nodes().iter().filter_map(|n| n.op.affine()).fold((0.0, 0.0), |(s, f), a| {
                        let (o, i, r) = a.affine_dims();
                        let (o, i, r, k) = (o as f64, i as f64, r as f64, rows as f64);
                        let (s1, f1) = if factors && a.kron_factored() { (i * i + o * o, r * i * i + k * r * o * o) } else { (0.0, 0.0) };
                        (s + o * i + s1, f + (1.0 + k) * r * o * i + f1)
                    });
                    ((MIN_UPDATE_ROWS as f64 * moved / work).ceil() as usize).max(1)
                };
                assert_eq!(curv.min_batch_points(PerPoint::Sums), floor_of(false), "{what}");
                assert!((1..=MIN_UPDATE_ROWS).contains(&floor_of(true)), "{what}: {}", floor_of(true));
                for (sum, floor) in [(PerPoint::Factors, floor_of(true)), (PerPoint::Matrix, MIN_UPDATE_ROWS)] {
                    assert_eq!(curv.min_batch_points(sum), floor, "{what} {sum:?}");
                    let per = curv.point_working_bytes(sum).unwrap();
                    let big = curv.batch_points(BatchSize::Auto, sum, many, MemoryBudget { bytes: u64::MAX });
                    assert_eq!(big, ((auto_batch_bytes() / per) as usize).max(floor), "{what} {sum:?}");
                    assert!(big >= floor, "{what} {sum:?}");
                    let tight = curv.batch_points(BatchSize::Auto, sum, many, MemoryBudget { bytes: 2 * per * 37 + 1 });
                    assert_eq!(tight, 37, "{what} {sum:?}: the budget bounds the floor");
                }
                assert_eq!(curv.batch_points(BatchSize::Points(1000 * n), PerPoint::Sums, n, MemoryBudget { bytes: 0 }), n);

                // Each pass in one batch of all n points allocates at most
                // n × the estimate, plus its result and the bounded chunk
                // temporaries; in batches of 37 it gives the same sums.
                let (peak, (loss, d)) = measured(|| curv.diag_over(&data, n).unwrap());
                let bound = n * per as usize + bytes_of(&[&loss, &d]) + chunk_bytes;
                assert!(peak <= bound, "{what} diagonal: {peak} B allocated, estimate {bound} B");
                let (_, d37) = curv.diag_over(&data, 37).unwrap();
                assert!(rel_err(&d37, &d) < 1e-13, "{what} diagonal: batches of 37 vs one: {:e}", rel_err(&d37, &d));

                let (peak, (loss, kron)) = measured(|| curv.kron_over(&data, n, n, KfacApprox::Expand).unwrap());
                let blocks: Vec<&Tensor> = kron.blocks.iter().flatten().collect();
                let bound = n * per as usize + bytes_of(&[&loss]) + 2 * bytes_of(&blocks) + chunk_bytes;
                assert!(peak <= bound, "{what} KFAC: {peak} B allocated, estimate {bound} B");
                // In batches of 37, added into the first batch's factors in
                // place (the weight's and bias's shared B once): the same sums.
                let (peak, (_, kron37)) = measured(|| curv.kron_over(&data, 37, n, KfacApprox::Expand).unwrap());
                let bound = 37 * per as usize + bytes_of(&[&loss]) + 2 * bytes_of(&blocks) + chunk_bytes;
                assert!(peak <= bound, "{what} KFAC in batches of 37: {peak} B allocated, estimate {bound} B");
                for (b, (x, y)) in kron37.blocks.iter().zip(&kron.blocks).enumerate() {
                    for (f37, f) in x.iter().zip(y) {
                        assert!(rel_err(f37, f) < 1e-13, "{what} KFAC block {b}: batches of 37 vs one: {:e}", rel_err(f37, f));
                    }
                }

                let (peak, (loss, h)) = measured(|| curv.full_over(&data, n).unwrap());
                let bound = n * per as usize + bytes_of(&[&loss]) + 2 * bytes_of(&[&h]) + chunk_bytes;
                assert!(peak <= bound, "{what} full: {peak} B allocated, estimate {bound} B");
                // In batches of 37 every batch adds into one sum: no more
                // (P, P) matrices at once than one batch holds.
                let (peak, (_, h37)) = measured(|| curv.full_over(&data, 37).unwrap());
                let bound = 37 * per as usize + bytes_of(&[&loss]) + 2 * bytes_of(&[&h]) + chunk_bytes;
                assert!(peak <= bound, "{what} full in batches of 37: {peak} B allocated, estimate {bound} B");
                assert!(rel_err(&h37, &h) < 1e-13, "{what} full: batches of 37 vs one");
            }
        }

        // Jacobians and per-sample gradients: the per-point rows are in the estimate.
        for subset in [Subset::All, Subset::LastLayer] {
            let curv = Curvature::new(&model, likelihood, CurvatureKind::Ef, &subset).unwrap().with_chunk_elems(CHUNK_ELEMS);
            let per = curv.point_working_bytes(PerPoint::Jacobians).unwrap() as usize;
            let (peak, (j, f)) = measured(|| curv.jacobians_over(&data, n, subset == Subset::LastLayer).unwrap());
            let bound = n * per + bytes_of(&[&j, &f]);
            assert!(peak <= bound, "{case} Jacobians {subset:?}: {peak} B allocated, estimate {bound} B");
            // In batches of 37, written into one result: the same rows.
            let (j37, f37) = curv.jacobians_over(&data, 37, subset == Subset::LastLayer).unwrap();
            assert!(rel_err(&j37, &j) < 1e-13 && rel_err(&f37, &f) < 1e-13, "{case} Jacobians {subset:?}: batches of 37 vs one");
            let per = curv.point_working_bytes(PerPoint::Gradients).unwrap() as usize;
            let (peak, (g, loss)) = measured(|| curv.gradients_over(&data, n).unwrap());
            let bound = n * per + bytes_of(&[&g, &loss]);
            assert!(peak <= bound, "{case} gradients {subset:?}: {peak} B allocated, estimate {bound} B");
            let (g37, _) = curv.gradients_over(&data, 37).unwrap();
            assert!(rel_err(&g37, &g) < 1e-13, "{case} gradients {subset:?}: batches of 37 vs one: {:e}", rel_err(&g37, &g));
        }
    }
}
