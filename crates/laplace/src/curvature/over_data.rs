//! Quantities over a whole [`Dataset`], batch by batch: curvatures and
//! losses are sums over batches, per-sample quantities are concatenated.
//! Every pass is one [`fold_batches`], reported to the curvature's monitor.
//!
//! With a communicator of several ranks ([`Curvature::with_communicator`])
//! `data` is this rank's shard: each pass folds it with the batches' global
//! offsets (so Monte-Carlo draws do not depend on the split), [`agree`]s on the
//! outcome, and combines the parts: sums for curvatures, factors and losses,
//! row gathers for Jacobians and gradients.

use super::{Batch, Curvature, KfacApprox};
use crate::data::Dataset;
use crate::distributed::{self, agree, Shard};
use crate::error::Result;
use crate::kron::Kron;
use crate::pass::{accumulate, fold_batches};
use crate::tensor::Tensor;

/// `(loss, H) + (loss', H')`, element-wise.
fn add_pair((l, h): (Tensor, Tensor), (l2, h2): (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
    Ok(((l + l2)?, (h + h2)?))
}

/// Points `offset..offset + len` of this rank's shard, with their global offset.
fn shard_batch(data: &Dataset, shard: Shard, offset: usize, len: usize) -> Result<Batch> {
    let mut batch = data.batch(offset, len)?;
    batch.offset += shard.start;
    Ok(batch)
}

impl Curvature<'_> {
    /// Where `data` (this rank's shard) sits in the whole data set
    /// (collective across the curvature's communicator).
    pub fn shard(&self, data: &Dataset) -> Result<Shard> {
        distributed::shard_of(self.comm, data.len())
    }

    /// The number of points of the whole data set: `data.len()` summed over
    /// ranks (collective). The N of KFAC's input factors.
    pub fn n_data(&self, data: &Dataset) -> Result<usize> {
        Ok(self.shard(data)?.total)
    }

    /// This rank's pass over its shard, agreed across ranks.
    fn local_pass<T>(&self, data: &Dataset, pass: impl FnOnce(Shard) -> Result<T>) -> Result<T> {
        let shard = self.shard(data)?;
        agree(self.comm, pass(shard))
    }

    /// Loss and curvature of this rank's shard, summed over ranks.
    fn sum_pair(&self, (loss, h): (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
        let mut s = distributed::sum_tensors(self.comm, vec![loss, h])?;
        let h = s.pop().expect("two tensors");
        Ok((s.pop().expect("two tensors"), h))
    }

    /// `full` summed over the data set in batches of `batch_size` points,
    /// every batch added into one `(P, P)` sum.
    pub fn full_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        let local = self.local_pass(data, |shard| {
            data.targets()?;
            let mut sum = self.full_sum()?;
            let loss = fold_batches(data, batch_size, self.monitor, "full curvature", None, |loss, o, n| {
                let l = self.add_full(&shard_batch(data, shard, o, n)?, &mut sum)?;
                accumulate(loss, l, |a, b| Ok((a + b)?))
            })?;
            Ok((loss.expect("a data set has at least one point"), self.finish_full(sum)?))
        })?;
        self.sum_pair(local)
    }

    /// `diag` summed over the data set in batches of `batch_size` points.
    pub fn diag_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        let local = self.local_pass(data, |shard| {
            data.targets()?;
            let acc = fold_batches(data, batch_size, self.monitor, "curvature diagonal", None, |acc, o, n| {
                accumulate(acc, self.diag(&shard_batch(data, shard, o, n)?)?, add_pair)
            })?;
            Ok(acc.expect("a data set has at least one point"))
        })?;
        self.sum_pair(local)
    }

    /// `kron` over the data set: factor-wise sums over batches, A normalized
    /// by `n_data` (usually the number of points in the whole data set,
    /// [`Curvature::n_data`]).
    pub fn kron_over(&self, data: &Dataset, batch_size: usize, n_data: usize, approx: KfacApprox) -> Result<(Tensor, Kron)> {
        let (loss, kron) = self.local_pass(data, |shard| {
            data.targets()?;
            let acc = fold_batches(data, batch_size, self.monitor, "Kronecker factors", None, |acc, o, n| {
                // The first batch's factors are the sum: built fresh by
                // `kron` and owned here alone (but for the B that a layer's
                // weight and bias blocks share, which `add_assign` adds once).
                let part = self.kron(&shard_batch(data, shard, o, n)?, n_data, approx)?;
                accumulate(acc, part, |(l0, mut k0), (l, k)| {
                    k0.add_assign(&k)?;
                    Ok(((l0 + l)?, k0))
                })
            })?;
            Ok(acc.expect("a data set has at least one point"))
        })?;
        if self.comm.size() == 1 {
            return Ok((loss, kron));
        }
        // The loss and every factor, in one reduction.
        let shapes: Vec<usize> = kron.blocks.iter().map(Vec::len).collect();
        let flat: Vec<Tensor> = std::iter::once(loss).chain(kron.blocks.into_iter().flatten()).collect();
        let mut summed = distributed::sum_tensors(self.comm, flat)?.into_iter();
        let loss = summed.next().expect("the loss");
        let blocks = shapes.iter().map(|&k| summed.by_ref().take(k).collect()).collect();
        Ok((loss, Kron::new(blocks)?))
    }

    /// `jacobians` (or `last_layer_jacobians` with `last_layer`) of every
    /// point: J `(N, C, P)` and f `(N, C)`, on every rank.
    pub fn jacobians_over(&self, data: &Dataset, batch_size: usize, last_layer: bool) -> Result<(Tensor, Tensor)> {
        let (j, f) = self.jacobians_local(data, batch_size, last_layer)?;
        Ok((distributed::gather_rows(self.comm, j)?, distributed::gather_rows(self.comm, f)?))
    }

    /// [`jacobians_over`](Self::jacobians_over) assembled on rank 0 only
    /// (`None` on the other ranks): one copy of J travels, in its dtype,
    /// instead of one to every rank (what a result only rank 0 writes needs).
    pub fn jacobians_over_root(&self, data: &Dataset, batch_size: usize, last_layer: bool) -> Result<Option<(Tensor, Tensor)>> {
        let (j, f) = self.jacobians_local(data, batch_size, last_layer)?;
        let j = distributed::gather_rows_to_root(self.comm, j)?;
        Ok(j.zip(distributed::gather_rows_to_root(self.comm, f)?))
    }

    /// This rank's rows of J and f. One batch returns its own result; more
    /// write their rows into one `(N·C, P)` result, allocated once (no
    /// per-batch copy, no second `(N, C, P)`).
    fn jacobians_local(&self, data: &Dataset, batch_size: usize, last_layer: bool) -> Result<(Tensor, Tensor)> {
        self.local_pass(data, |shard| {
            // Rank 0 gathers every rank's rows.
            let (n, c, p) = (shard.total, self.model().n_outputs(), self.n_params());
            crate::budget::check(&format!("Jacobians J (N, C, P) = ({n}, {c}, {p})"), &[n, c, p], self.model().dtype().size_in_bytes())?;
            if data.len() <= batch_size.max(1) {
                let jf = fold_batches(data, batch_size, self.monitor, "Jacobians", None, |_, o, n| {
                    let x = data.inputs(o, n)?;
                    Ok(Some(if last_layer { self.last_layer_jacobians(&x)? } else { self.jacobians(&x)? }))
                })?;
                return Ok(jf.expect("one batch"));
            }
            let sel = self.jacobian_selection(last_layer)?;
            let (m, p) = (data.len(), sel.len());
            let mut out = Tensor::zeros((m * c, p), self.model().dtype(), self.model().device())?;
            let fs = fold_batches(data, batch_size, self.monitor, "Jacobians", Vec::new(), |mut fs, o, n| {
                fs.push(super::jacobians_into(self.model(), &sel, &data.inputs(o, n)?, self.chunk_elems(), &mut out, o)?);
                Ok(fs)
            })?;
            Ok((super::finish_jacobians(&sel, out, m, c)?, Tensor::cat(&fs, 0)?))
        })
    }

    /// `gradients` of every point: G `(N, P)` and Σ_n ℓ_n `(1,)`, on every rank.
    pub fn gradients_over(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        let (g, loss) = self.gradients_local(data, batch_size)?;
        Ok((distributed::gather_rows(self.comm, g)?, distributed::sum_tensor(self.comm, loss)?))
    }

    /// [`gradients_over`](Self::gradients_over) with G assembled on rank 0
    /// only (`None` on the other ranks; see [`jacobians_over_root`](Self::jacobians_over_root)).
    pub fn gradients_over_root(&self, data: &Dataset, batch_size: usize) -> Result<Option<(Tensor, Tensor)>> {
        let (g, loss) = self.gradients_local(data, batch_size)?;
        let loss = distributed::sum_tensor(self.comm, loss)?;
        Ok(distributed::gather_rows_to_root(self.comm, g)?.map(|g| (g, loss)))
    }

    /// This rank's rows of G, and its shard's summed loss. One batch
    /// returns its own result; more write their rows into one `(N, P)`
    /// result, allocated once.
    fn gradients_local(&self, data: &Dataset, batch_size: usize) -> Result<(Tensor, Tensor)> {
        self.local_pass(data, |shard| {
            let (n, p) = (shard.total, self.n_params());
            crate::budget::check(&format!("per-sample gradients G (N, P) = ({n}, {p})"), &[n, p], self.model().dtype().size_in_bytes())?;
            let y = data.targets()?;
            if data.len() <= batch_size.max(1) {
                let gl = fold_batches(data, batch_size, self.monitor, "gradients", None, |_, o, n| {
                    Ok(Some(self.gradients(&data.inputs(o, n)?, &y.narrow(0, o, n)?)?))
                })?;
                return Ok(gl.expect("one batch"));
            }
            let mut out = Tensor::zeros((data.len(), p), self.model().dtype(), self.model().device())?;
            let loss = fold_batches(data, batch_size, self.monitor, "gradients", None, |loss, o, n| {
                let l = self.gradients_into(&data.inputs(o, n)?, &y.narrow(0, o, n)?, &mut out, o)?;
                accumulate(loss, l, |a, b| Ok((a + b)?))
            })?;
            Ok((self.finish_gradients(out)?, loss.expect("a data set has at least one point")))
        })
    }
}
