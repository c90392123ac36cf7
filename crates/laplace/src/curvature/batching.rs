//! Batch size by memory: how many points one step of a pass over data holds.
//!
//! Results are sums (or concatenations) over batches, so the batch size
//! changes only the summation order, never the quantity. It is a memory knob:
//! a larger batch means fewer, larger products, a smaller one bounds the
//! memory a pass holds. The default, [`BatchSize::Auto`], picks
//!
//! ```text
//! batch = min( max( ⌊ceiling / w⌋, floor ),  ⌊budget / 2 / w⌋,  N )      (at least 1)
//! ```
//!
//! for w the *estimated* working set of one point (below), N the points of
//! the pass, and:
//!
//! * **budget / 2**, half the memory budget ([`crate::budget`]): a hard
//!   bound, so a large problem never asks for more than the machine has.
//!   The other half is left for what a pass holds besides its batch: the
//!   model, the data set, the result and the per-chunk temporaries of the
//!   diagonal and full kernels, which are bounded on their own
//!   ([`Curvature::with_chunk_elems`]).
//! * **ceiling** ([`auto_batch_bytes`]): this machine's last-level cache
//!   (clamped to 8–512 MiB). Past the point where one batch's working set
//!   leaves the cache, a larger batch is no faster per point (its products
//!   are already as large as the kernels need) but every extra byte is a
//!   page the process must fault in and zero once, and hold. On the sweep's
//!   19 workloads (bench/BATCH.md), in the 27 cells this rule splits into
//!   batches, the whole command took 0.74–1.13× the time of one batch of all
//!   points (median 0.94×; the run's noise is 0.74–1.24×) with 0.12–1.00×
//!   its peak memory (median 0.47×).
//! * **floor** (`min_batch_points`): some values every batch reads or
//!   writes in full, whatever its size: the weights (every product reads
//!   them), and where a pass adds into dense sums (Kronecker factors, a
//!   full `(P, P)` matrix) those sums. A batch must bring at least
//!   [`MIN_UPDATE_ROWS`] rows of work for each such value. The update
//!   `S += Xᵀ X` of a `(d, d)` sum from `rows` rows costs d²·rows
//!   multiply-adds but also reads and writes the d² sum: with too few rows
//!   that traffic, paid per batch, dominates (a 4096-input Linear layer's
//!   KFAC factor in batches of 6 points took 2.8× the time of one batch;
//!   a 4096-wide MLP's EF diagonal in batches of 204, 1.3×). The floor
//!   weighs each of these by its size against the work a point does with
//!   it, so small factors beside a wide output (100 classes) or a
//!   convolution's few weights ask for few points. It may exceed the
//!   ceiling, never the budget.
//!
//! The estimate, per point, in elements of the compute dtype:
//!
//! ```text
//! tape         Σ_v |v|                 every value of the graph (inputs and node outputs),
//!                                      as if all were kept for the backward pass
//! patches      (2K + 1) · max G·I·R    the patch matrix U of one affine node, formed on
//!                                      demand, the K rows of patch-shaped sensitivities its
//!                                      input sensitivity is folded back from, and the K rows
//!                                      of per-sample products of the diagonal's contraction
//! sensitivity  3 · K · max_v |v|       K output rows pulled back; a node's input and output
//!                                      sensitivities and one product in flight
//! output       0, P or C·P             per-point gradients or Jacobians, where the pass returns them
//! ```
//!
//! with K the rows of the pass: C for the GGN and the Hessian, S samples
//! for the Monte-Carlo Fisher, 1 for the empirical Fisher and gradients.
//! Every term is an upper bound of what the engine holds at once, so the
//! estimate errs towards smaller batches.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::budget::MemoryBudget;
use crate::error::{bail, Error, Result};

use super::{Curvature, CurvatureKind};

/// The most estimated working memory one [`BatchSize::Auto`] batch holds
/// (unless the floor asks for more): the size of this machine's last-level
/// cache, clamped to 8–512 MiB; 32 MiB where the cache cannot be read. See
/// the module documentation for why. Read once.
pub fn auto_batch_bytes() -> u64 {
    static BYTES: OnceLock<u64> = OnceLock::new();
    *BYTES.get_or_init(|| last_level_cache_bytes().unwrap_or(32 << 20).clamp(8 << 20, 512 << 20))
}

/// The largest data or unified cache of CPU 0 (`/sys/devices/system/cpu/cpu0/cache`), in bytes.
fn last_level_cache_bytes() -> Option<u64> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).ok();
        if read("type")?.trim() == "Instruction" {
            return None;
        }
        parse_cache_size(&read("size")?)
    })
    .max()
}

/// A sysfs cache size ("32768K", "1M", "512") in bytes.
fn parse_cache_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// Rows of work a batch brings, at least, to every value it must read or
/// write whatever its size (the floor of the module documentation).
/// Updating a `(d, d)` sum from r rows takes d²·r multiply-adds and moves
/// about 3·d² values (the batch's product written, then added into the
/// sum); on this machine (faer's f32 GEMM at about 210 GFLOP/s on 2
/// threads, bench/YARDSTICK.md; a streaming add at about 30 GB/s) that
/// model puts the traffic at 42/r of the update's time. Measured, the
/// per-batch costs are larger (packing, small products at the edges of
/// the sums, allocation): at 1024 rows the sweep's widest MLP paid 16–18 %
/// for batches of 94–155 points over one batch (bench/BATCH.md), so the
/// floor asks for four times that.
pub const MIN_UPDATE_ROWS: usize = 4096;

/// How many points one batch of a pass over data holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchSize {
    /// The largest batch whose estimated working set fits the cache-sized
    /// ceiling ([`auto_batch_bytes`]), or the floor of a dense accumulator,
    /// and half the memory budget (see the module documentation).
    #[default]
    Auto,
    /// At most this many points (at least 1).
    Points(usize),
}

impl FromStr for BatchSize {
    type Err = Error;
    /// `auto`, or a positive number of points.
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(BatchSize::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(BatchSize::Points(n)),
            _ => bail!(Invalid, "batch size {s:?}: expected \"auto\" or a number of points ≥ 1"),
        }
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Auto => f.write_str("auto"),
            BatchSize::Points(n) => write!(f, "{n}"),
        }
    }
}

/// What a pass returns per point, besides its sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerPoint {
    /// Nothing but vector sums: curvature diagonals, losses,
    /// curvature-vector products.
    Sums,
    /// Kronecker factors: each batch adds its products into dense `(d, d)`
    /// factors (which sets a floor on the batch, see the module documentation).
    Factors,
    /// A full `(P, P)` curvature: each batch adds its Gram matrix into it.
    Matrix,
    /// Per-sample gradients, P values per point.
    Gradients,
    /// Jacobians, C·P values per point (also what a GLM predictive forms).
    Jacobians,
}

impl Curvature<'_> {
    /// Output rows K one point sends back through the network in a pass
    /// that returns `per_point`.
    fn rows(&self, per_point: PerPoint) -> usize {
        let c = self.model().n_outputs();
        match per_point {
            PerPoint::Jacobians => c,
            PerPoint::Gradients => 1,
            PerPoint::Sums | PerPoint::Factors | PerPoint::Matrix => match self.kind() {
                CurvatureKind::Ggn | CurvatureKind::Hessian => c,
                CurvatureKind::FisherMc { samples, .. } => samples,
                CurvatureKind::Ef => 1,
            },
        }
    }

    /// Estimated working memory of one point in a pass that returns
    /// `per_point`, in bytes (the formula of the module documentation);
    /// `None` if it overflows.
    pub fn point_working_bytes(&self, per_point: PerPoint) -> Option<u64> {
        let model = self.model();
        let values: u64 = (0..model.n_inputs() + model.nodes().len())
            .map(|v| crate::budget::numel(model.value_shape(v)))
            .try_fold(0u64, |a, n| a.checked_add(n?))?;
        let patches = model
            .nodes()
            .iter()
            .filter_map(|node| node.op.affine())
            .map(|a| {
                let (_, i, r) = a.affine_dims();
                crate::budget::numel(&[a.groups(), i, r])
            })
            .try_fold(0u64, |m, n| Some(m.max(n?)))?;
        let rows = self.rows(per_point);
        let patches = patches.checked_mul(2 * rows as u64 + 1)?;
        let sensitivity = crate::budget::numel(&[3, rows, model.widest_value()])?;
        let output = match per_point {
            PerPoint::Sums | PerPoint::Factors | PerPoint::Matrix => 0,
            PerPoint::Gradients => self.n_params() as u64,
            PerPoint::Jacobians => crate::budget::numel(&[model.n_outputs(), self.n_params()])?,
        };
        values
            .checked_add(patches)?
            .checked_add(sensitivity)?
            .checked_add(output)?
            .checked_mul(model.dtype().size_in_bytes() as u64)
    }

    /// The fewest points an Auto batch holds (the floor of the module
    /// documentation): enough that every value a batch must read or write
    /// whatever its size gets [`MIN_UPDATE_ROWS`] rows of work,
    ///
    /// ```text
    /// floor = ⌈MIN_UPDATE_ROWS · S / F⌉,   S the values every batch moves,
    ///                                      F the multiply-adds one point does with them.
    /// ```
    ///
    /// Every pass reads the weights: S = Σ O·I, F = Σ (1 + K)·R·O·I over the
    /// affine layers (the forward product and K rows pulled back), so a
    /// wide MLP's batch holds at least MIN_UPDATE_ROWS / (1 + K) points, a
    /// convolution's, whose weights are few next to its positions R, far
    /// fewer. Kronecker factors add S = Σ (I² + O²) and F = Σ (R·I² +
    /// K·R·O²) over the factored layers (A from M·R patch columns, B from
    /// M·K·R rows). A full matrix needs MIN_UPDATE_ROWS points: S = P² and
    /// F = P² (the last-layer kernel's work per point once its K rows are
    /// folded into a C × C weight; the general kernel does K times more,
    /// the bound stays safe).
    pub fn min_batch_points(&self, per_point: PerPoint) -> usize {
        if per_point == PerPoint::Matrix {
            return MIN_UPDATE_ROWS;
        }
        let k = self.rows(per_point) as f64;
        let factors = per_point == PerPoint::Factors;
        let (moved, work) = self
            .model()
            .nodes()
            .iter()
            .filter_map(|node| node.op.affine())
            .map(|a| {
                let (o, i, r) = a.affine_dims();
                let (o, i, r) = (o as f64, i as f64, r as f64);
                let (mut s, mut f) = (o * i, (1.0 + k) * r * o * i);
                if factors && a.kron_factored() {
                    s += i * i + o * o;
                    f += r * i * i + k * r * o * o;
                }
                (s, f)
            })
            .fold((0.0, 0.0), |(s, f), (s1, f1)| (s + s1, f + f1));
        if work > 0.0 { (MIN_UPDATE_ROWS as f64 * moved / work).ceil().clamp(1.0, usize::MAX as f64) as usize } else { 1 }
    }

    /// The number of points per batch for a pass over `n_points` points
    /// that returns `per_point`: `size` itself, or for [`BatchSize::Auto`]
    /// the rule of the module documentation: the most points whose
    /// estimated working set fits [`auto_batch_bytes`], raised to the floor
    /// (`min_batch_points`),
    /// and lowered to what fits half of `budget` (at least 1, at most
    /// `n_points`).
    pub fn batch_points(&self, size: BatchSize, per_point: PerPoint, n_points: usize, budget: MemoryBudget) -> usize {
        let n = n_points.max(1);
        match size {
            BatchSize::Points(p) => p.clamp(1, n),
            BatchSize::Auto => {
                let per = self.point_working_bytes(per_point).unwrap_or(u64::MAX).max(1);
                let points = |bytes: u64| usize::try_from(bytes / per).unwrap_or(usize::MAX);
                let floor = self.min_batch_points(per_point);
                points(auto_batch_bytes()).max(floor).min(points(budget.bytes / 2)).clamp(1, n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_parse() {
        assert_eq!("auto".parse::<BatchSize>().unwrap(), BatchSize::Auto);
        assert_eq!("AUTO".parse::<BatchSize>().unwrap(), BatchSize::Auto);
        assert_eq!("64".parse::<BatchSize>().unwrap(), BatchSize::Points(64));
        for bad in ["0", "-1", "", "1.5", "big"] {
            let e = bad.parse::<BatchSize>().unwrap_err().to_string();
            assert!(e.contains("auto") && e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(BatchSize::Points(7).to_string(), "7");
    }

    #[test]
    fn cache_sizes_parse() {
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(parse_cache_size("2G"), Some(2 << 30));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("K"), None);
        assert_eq!(parse_cache_size("big"), None);
        let b = auto_batch_bytes();
        assert!((8 << 20..=512 << 20).contains(&b), "{b}");
    }
}
