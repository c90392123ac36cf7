//! Batch size by memory: how many points one step of a pass over data holds.
//!
//! Results are sums (or concatenations) over batches, so the batch size
//! changes only the summation order, never the quantity. It is a memory knob:
//! a larger batch means fewer, larger products (faster, until the working set
//! leaves the caches), a smaller one bounds the memory a pass holds. The
//! default, [`BatchSize::Auto`], picks the largest batch whose *estimated*
//! working set fits both half of the memory budget ([`crate::budget`]) and
//! [`AUTO_BATCH_BYTES`], so a small problem runs in one pass and a large one
//! never asks for more than the machine has. The other half of the budget is
//! left for what a pass holds besides its batch: the model, the data set, the
//! result and the per-chunk temporaries of the diagonal and full kernels,
//! which are bounded on their own ([`Curvature::with_chunk_elems`]).
//!
//! Why a fixed ceiling as well: past a few hundred points per batch the time
//! per point stops falling (the per-batch costs are paid off, and the products
//! are as large as the kernels need), while every extra byte of working set is
//! a page the process must fault in once, and give back at exit. Measured on
//! four shapes (a 784-100-100-10 MLP, a 3072-1024-1024-10 MLP, a CIFAR-shaped
//! CNN and an 8×32 regression MLP; GGN and EF diagonals, KFAC), batches whose
//! estimate is 512 MiB were as fast as one batch of all points, within the
//! run-to-run noise (±10 %), with a fifth to a half of the peak memory (the
//! CNN: 320 MB instead of 2.1 GB).
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

use crate::budget::MemoryBudget;
use crate::error::{bail, Error, Result};

use super::{Curvature, CurvatureKind};

/// The most estimated working memory one [`BatchSize::Auto`] batch holds,
/// whatever the budget (see the module documentation for why).
pub const AUTO_BATCH_BYTES: u64 = 512 << 20;

/// How many points one batch of a pass over data holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchSize {
    /// The largest batch whose estimated working set fits half the memory
    /// budget and [`AUTO_BATCH_BYTES`] (see the module documentation).
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
    /// Nothing: curvature sums (diagonal, Kronecker factors, full matrix),
    /// losses, curvature-vector products.
    Sums,
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
            PerPoint::Sums => match self.kind() {
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
            PerPoint::Sums => 0,
            PerPoint::Gradients => self.n_params() as u64,
            PerPoint::Jacobians => crate::budget::numel(&[model.n_outputs(), self.n_params()])?,
        };
        values
            .checked_add(patches)?
            .checked_add(sensitivity)?
            .checked_add(output)?
            .checked_mul(model.dtype().size_in_bytes() as u64)
    }

    /// The number of points per batch for a pass over `n_points` points
    /// that returns `per_point`: `size` itself, or for [`BatchSize::Auto`]
    /// the largest batch whose estimated working set is at most half of
    /// `budget` and at most [`AUTO_BATCH_BYTES`] (at least 1, at most
    /// `n_points`).
    pub fn batch_points(&self, size: BatchSize, per_point: PerPoint, n_points: usize, budget: MemoryBudget) -> usize {
        let n = n_points.max(1);
        match size {
            BatchSize::Points(p) => p.clamp(1, n),
            BatchSize::Auto => {
                let per = self.point_working_bytes(per_point).unwrap_or(u64::MAX).max(1);
                let fit = (budget.bytes / 2).min(AUTO_BATCH_BYTES) / per;
                usize::try_from(fit).unwrap_or(usize::MAX).clamp(1, n)
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
}
