//! Quantities over a whole [`Dataset`], batch by batch: curvatures and
//! losses are sums over batches, per-sample quantities are concatenated.

use super::{Curvature, KfacApprox};
use crate::kron::Kron;
use crate::data::Dataset;
use crate::error::Result;
use crate::tensor::Tensor;

/// Σ of `(loss, H)` pairs.
fn add(acc: Option<(Tensor, Tensor)>, next: (Tensor, Tensor)) -> Result<Option<(Tensor, Tensor)>> {
    Ok(Some(match acc {
        None => next,
        Some((l, h)) => ((l + next.0)?, (h + next.1)?),
    }))
}

impl Curvature<'_> {
    /// `full` summed over the data set in batches of `batch_size` points.
    pub fn full_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        data.targets()?;
        let mut acc = None;
        for (offset, len) in data.batch_ranges(batch_size) {
            acc = add(acc, self.full(&data.batch(offset, len)?)?)?;
        }
        Ok(acc.expect("a data set has at least one point"))
    }

    /// `diag` summed over the data set in batches of `batch_size` points.
    pub fn diag_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        data.targets()?;
        let mut acc = None;
        for (offset, len) in data.batch_ranges(batch_size) {
            acc = add(acc, self.diag(&data.batch(offset, len)?)?)?;
        }
        Ok(acc.expect("a data set has at least one point"))
    }

    /// `kron` over the data set: factor-wise sums over batches, A normalized
    /// by `n_data` (usually the number of points in `data`).
    pub fn kron_over(&self, data: &Dataset, batch_size: usize, n_data: usize, approx: KfacApprox) -> Result<(Tensor, Kron)> {
        data.targets()?;
        let mut acc: Option<(Tensor, Kron)> = None;
        for (offset, len) in data.batch_ranges(batch_size) {
            let (l, k) = self.kron(&data.batch(offset, len)?, n_data, approx)?;
            acc = Some(match acc {
                None => (l, k),
                Some((l0, k0)) => ((l0 + l)?, k0.add(&k)?),
            });
        }
        Ok(acc.expect("a data set has at least one point"))
    }

    /// `jacobians` (or `last_layer_jacobians` with `last_layer`) of every
    /// point: J `(N, C, P)` and f `(N, C)`.
    pub fn jacobians_over(&self, data: &Dataset, batch_size: usize, last_layer: bool) -> Result<(Tensor, Tensor)> {
        let ranges = data.batch_ranges(batch_size);
        let mut out: Option<Tensor> = None;
        let mut fs = Vec::new();
        for &(offset, len) in &ranges {
            let x = data.inputs(offset, len)?;
            let (j, f) = if last_layer {
                self.last_layer_jacobians(&x)?
            } else {
                self.jacobians(&x)?
            };
            fs.push(f);
            if ranges.len() == 1 {
                out = Some(j);
                break;
            }
            // Written into the result batch by batch: no second copy of (N, C, P).
            let dst = match out.take() {
                Some(d) => d,
                None => {
                    let (_, c, p) = j.dims3()?;
                    Tensor::zeros((data.len(), c, p), j.dtype(), j.device())?
                }
            };
            crate::tensor::write_rows(&dst, &j, offset)?;
            out = Some(dst);
        }
        Ok((out.expect("a data set has at least one point"), Tensor::cat(&fs, 0)?))
    }

    /// `gradients` of every point: G `(N, P)` and Σ_n ℓ_n `(1,)`.
    pub fn gradients_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        let y = data.targets()?;
        let ranges = data.batch_ranges(batch_size);
        let (mut out, mut loss): (Option<Tensor>, Option<Tensor>) = (None, None);
        for &(offset, len) in &ranges {
            let (g, l) = self.gradients(&data.inputs(offset, len)?, &y.narrow(0, offset, len)?)?;
            loss = Some(match loss {
                None => l,
                Some(l0) => (l0 + l)?,
            });
            if ranges.len() == 1 {
                out = Some(g);
                break;
            }
            let dst = match out.take() {
                Some(d) => d,
                None => Tensor::zeros((data.len(), g.dim(1)?), g.dtype(), g.device())?,
            };
            crate::tensor::write_rows(&dst, &g, offset)?;
            out = Some(dst);
        }
        Ok((out.expect("a data set has at least one point"), loss.expect("a data set has at least one point")))
    }
}
