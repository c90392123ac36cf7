//! Quantities over a whole [`Dataset`], batch by batch: curvatures and
//! losses are sums over batches, per-sample quantities are concatenated.
//! Every pass is one [`fold_batches`], reported to the curvature's monitor.

use super::{Curvature, KfacApprox};
use crate::data::Dataset;
use crate::error::Result;
use crate::kron::Kron;
use crate::pass::{accumulate, fold_batches};
use crate::tensor::Tensor;

/// `(loss, H) + (loss', H')`, element-wise.
fn add_pair((l, h): (Tensor, Tensor), (l2, h2): (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
    Ok(((l + l2)?, (h + h2)?))
}

/// Rows `offset..offset + len` of an `(N, *)` result, written in place: a
/// one-batch pass keeps its batch's tensor, a longer one allocates the whole
/// result once (no second copy of `(N, C, P)` Jacobians).
fn write_batch_rows(out: Option<Tensor>, part: Tensor, offset: usize, n: usize, single: bool) -> Result<Option<Tensor>> {
    if single {
        return Ok(Some(part));
    }
    let dst = match out {
        Some(d) => d,
        None => {
            let mut dims = part.dims().to_vec();
            dims[0] = n;
            Tensor::zeros(dims, part.dtype(), part.device())?
        }
    };
    crate::tensor::write_rows(&dst, &part, offset)?;
    Ok(Some(dst))
}

impl Curvature<'_> {
    /// `full` summed over the data set in batches of `batch_size` points.
    pub fn full_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        data.targets()?;
        self.check_full_size()?;
        let acc = fold_batches(data, batch_size, self.monitor, "full curvature", None, |acc, o, n| {
            accumulate(acc, self.full(&data.batch(o, n)?)?, add_pair)
        })?;
        Ok(acc.expect("a data set has at least one point"))
    }

    /// `diag` summed over the data set in batches of `batch_size` points.
    pub fn diag_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        data.targets()?;
        let acc = fold_batches(data, batch_size, self.monitor, "curvature diagonal", None, |acc, o, n| {
            accumulate(acc, self.diag(&data.batch(o, n)?)?, add_pair)
        })?;
        Ok(acc.expect("a data set has at least one point"))
    }

    /// `kron` over the data set: factor-wise sums over batches, A normalized
    /// by `n_data` (usually the number of points in `data`).
    pub fn kron_over(&self, data: &Dataset, batch_size: usize, n_data: usize, approx: KfacApprox) -> Result<(Tensor, Kron)> {
        data.targets()?;
        let acc = fold_batches(data, batch_size, self.monitor, "Kronecker factors", None, |acc, o, n| {
            accumulate(acc, self.kron(&data.batch(o, n)?, n_data, approx)?, |(l0, k0), (l, k)| Ok(((l0 + l)?, k0.add(&k)?)))
        })?;
        Ok(acc.expect("a data set has at least one point"))
    }

    /// `jacobians` (or `last_layer_jacobians` with `last_layer`) of every
    /// point: J `(N, C, P)` and f `(N, C)`.
    pub fn jacobians_over(&self, data: &Dataset, batch_size: usize, last_layer: bool) -> Result<(Tensor, Tensor)> {
        let (n, c, p) = (data.len(), self.model().n_outputs(), self.n_params());
        crate::budget::check(&format!("Jacobians J (N, C, P) = ({n}, {c}, {p})"), &[n, c, p], self.model().dtype().size_in_bytes())?;
        let single = data.batch_ranges(batch_size.max(1)).len() == 1;
        let (j, fs) = fold_batches(data, batch_size, self.monitor, "Jacobians", (None, Vec::new()), |(out, mut fs), o, n| {
            let x = data.inputs(o, n)?;
            let (j, f) = if last_layer { self.last_layer_jacobians(&x)? } else { self.jacobians(&x)? };
            fs.push(f);
            Ok((write_batch_rows(out, j, o, data.len(), single)?, fs))
        })?;
        Ok((j.expect("a data set has at least one point"), Tensor::cat(&fs, 0)?))
    }

    /// `gradients` of every point: G `(N, P)` and Σ_n ℓ_n `(1,)`.
    pub fn gradients_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        let y = data.targets()?;
        let (n, p) = (data.len(), self.n_params());
        crate::budget::check(&format!("per-sample gradients G (N, P) = ({n}, {p})"), &[n, p], self.model().dtype().size_in_bytes())?;
        let single = data.batch_ranges(batch_size.max(1)).len() == 1;
        let (g, loss) = fold_batches(data, batch_size, self.monitor, "gradients", (None, None), |(out, loss), o, n| {
            let (g, l) = self.gradients(&data.inputs(o, n)?, &y.narrow(0, o, n)?)?;
            let loss = accumulate(loss, l, |a, b| Ok((a + b)?))?;
            Ok((write_batch_rows(out, g, o, data.len(), single)?, loss))
        })?;
        Ok((g.expect("a data set has at least one point"), loss.expect("a data set has at least one point")))
    }
}
