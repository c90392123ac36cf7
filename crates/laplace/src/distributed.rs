//! Data-parallel passes: the data set split over processes (ranks), each
//! computing its part, the parts combined by collective operations.
//!
//! Every quantity over a data set is a sum over points (curvatures, Kronecker
//! factors, losses, curvature-vector products) or a concatenation over points
//! (Jacobians, gradients). So the data set can be cut into contiguous shards,
//! one per rank, rank r holding the r-th block of points in data-set order
//! ([`split`]); each rank folds its shard exactly as a single process folds the
//! whole data set, and only the results travel: sums through
//! [`Communicator::sum`], concatenations through [`Communicator::gather`].
//!
//! The library knows no transport: a [`Communicator`] is whatever moves the
//! numbers (the `laplace` command's MPI build implements it on MPI; tests on
//! threads). [`SingleProcess`] is the communicator of one process, under which
//! every helper here is the identity, so single-process results are untouched.
//!
//! Three rules make the results independent of the number of ranks R beyond
//! floating-point summation order:
//!
//! - a shard knows its place in the data set ([`Shard`]): Monte-Carlo streams
//!   are keyed by a point's global index, and KFAC's input factors are
//!   normalized by the global number of points;
//! - sums are bit-identical on every rank (a reduction to one rank, then a
//!   broadcast), so algorithms that run replicated on top of them (Lanczos,
//!   Hutchinson, conjugate gradients, the evidence) take the same steps on
//!   every rank;
//! - a rank that fails does not leave the others waiting: every pass ends with
//!   [`agree`], a collective that every rank joins with its own outcome, so
//!   one rank's error becomes every rank's error, naming the rank.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::tensor::{self, Tensor};

/// The processes of a data-parallel job, and the collectives between them.
///
/// Every method is collective: all ranks call it, in the same order, with
/// arguments of matching sizes (where a method says so), and block until all
/// have. Implementations move f64 values and bytes; tensors are converted by
/// the helpers of this module.
pub trait Communicator: Sync {
    /// This process's index in `0..size()`.
    fn rank(&self) -> usize;

    /// The number of processes R.
    fn size(&self) -> usize;

    /// Element-wise sum over ranks of `values` (the same length on every
    /// rank), in place. Every rank must end with the same bits: the sum is
    /// formed once and shared (not formed on each rank in its own order).
    fn sum(&self, values: &mut [f64]) -> Result<()>;

    /// Every rank's `local` block (any lengths), concatenated in rank order,
    /// on every rank.
    fn gather(&self, local: &[f64]) -> Result<Vec<f64>>;

    /// Every rank's `local` bytes, one entry per rank in rank order, on every rank.
    fn gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Every rank's `local` bytes (any lengths) concatenated in rank order, on
    /// rank 0 only (`None` on the others): one copy travels, to the rank that
    /// writes. The default is [`gather_bytes`](Self::gather_bytes), kept on rank 0.
    fn gather_bytes_to_root(&self, local: &[u8]) -> Result<Option<Vec<u8>>> {
        let all = self.gather_bytes(local)?;
        Ok((self.rank() == 0).then(|| all.concat()))
    }
}

/// One process: no other ranks; every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn sum(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }

    fn gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![local.to_vec()])
    }
}

/// The [`SingleProcess`] communicator, as a `&'static dyn Communicator` default.
pub static SINGLE_PROCESS: SingleProcess = SingleProcess;

/// The points of rank `rank` of `size` in a data set of `n` points: contiguous
/// blocks in rank order, the first `n % size` ranks one point longer.
pub fn split(n: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Where this rank's data sits in the whole data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Global index of the shard's first point.
    pub start: usize,
    /// Points in the shard (the local data set's length).
    pub len: usize,
    /// Points in the whole data set (the sum over ranks).
    pub total: usize,
}

/// This rank's [`Shard`], from the local data set's length `len` (collective:
/// the lengths of all ranks, in rank order, give the start and the total).
pub fn shard_of(comm: &dyn Communicator, len: usize) -> Result<Shard> {
    if comm.size() == 1 {
        return Ok(Shard { start: 0, len, total: len });
    }
    let lens = comm.gather(&[len as f64])?;
    let start: f64 = lens[..comm.rank()].iter().sum();
    let total: f64 = lens.iter().sum();
    Ok(Shard { start: start as usize, len, total: total as usize })
}

/// Combine every rank's outcome of a step (collective): `Ok` on every rank if
/// every rank succeeded; otherwise the same error on every rank. When all
/// ranks failed with the same message (bad input every rank read) that error
/// is returned as is; otherwise [`Error::Rank`] with the lowest failing rank
/// and its message.
pub fn agree<T>(comm: &dyn Communicator, local: Result<T>) -> Result<T> {
    if comm.size() == 1 {
        return local;
    }
    // One byte of status, then the message of a failure.
    let mine = match &local {
        Ok(_) => vec![0u8],
        Err(e) => std::iter::once(1u8).chain(e.to_string().into_bytes()).collect(),
    };
    let all = comm.gather_bytes(&mine)?;
    let failed: Vec<(usize, &[u8])> = all.iter().enumerate().filter(|(_, m)| m.first() != Some(&0)).map(|(r, m)| (r, m.get(1..).unwrap_or(&[]))).collect();
    let Some(&(rank, message)) = failed.first() else {
        return local;
    };
    if failed.len() == comm.size() && failed.iter().all(|(_, m)| *m == message) {
        return local;
    }
    Err(Error::Rank { rank, message: String::from_utf8_lossy(message).into_owned() })
}

/// Run `local` on this rank and [`agree`] on its outcome: the shape of every
/// step that may fail on one rank only.
pub fn agreed<T>(comm: &dyn Communicator, local: impl FnOnce() -> Result<T>) -> Result<T> {
    agree(comm, local())
}

/// Element-wise sums over ranks of tensors (any shapes, the same on every
/// rank), in one collective, reduced in f64 and returned in their dtypes.
pub fn sum_tensors(comm: &dyn Communicator, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if comm.size() == 1 {
        return Ok(tensors);
    }
    let mut flat = Vec::new();
    for t in &tensors {
        flat.extend(tensor::to_vec_f64(t)?);
    }
    comm.sum(&mut flat)?;
    let mut at = 0;
    tensors
        .iter()
        .map(|t| {
            let n = t.elem_count();
            let part = flat[at..at + n].to_vec();
            at += n;
            tensor::from_f64(part, t.dims(), t.dtype(), t.device())
        })
        .collect()
}

/// Sum of one tensor over ranks.
pub fn sum_tensor(comm: &dyn Communicator, t: Tensor) -> Result<Tensor> {
    Ok(sum_tensors(comm, vec![t])?.pop().expect("one tensor"))
}

/// Sum of one number over ranks.
pub fn sum_f64(comm: &dyn Communicator, x: f64) -> Result<f64> {
    let mut v = [x];
    comm.sum(&mut v)?;
    Ok(v[0])
}

/// Every rank's rows `(n_r, *rest)` concatenated in rank order `(Σ n_r, *rest)`
/// on every rank (the trailing shape is the same on every rank).
pub fn gather_rows(comm: &dyn Communicator, t: Tensor) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(t);
    }
    let dims = t.dims().to_vec();
    let row: usize = dims[1..].iter().product();
    let all = comm.gather(&tensor::to_vec_f64(&t)?)?;
    let mut out_dims = dims;
    out_dims[0] = if row == 0 { 0 } else { all.len() / row };
    tensor::from_f64(all, &out_dims, t.dtype(), t.device())
}

/// [`gather_rows`] on rank 0 only (`None` elsewhere), in the tensor's own
/// dtype: the rows travel once, as bytes, to the rank that writes them.
pub fn gather_rows_to_root(comm: &dyn Communicator, t: Tensor) -> Result<Option<Tensor>> {
    if comm.size() == 1 {
        return Ok(Some(t));
    }
    let mut dims = t.dims().to_vec();
    let row_bytes = dims[1..].iter().product::<usize>() * t.dtype().size_in_bytes();
    let all = comm.gather_bytes_to_root(&tensor::to_bytes(&t)?)?;
    let Some(all) = all else { return Ok(None) };
    dims[0] = if row_bytes == 0 { 0 } else { all.len() / row_bytes };
    Ok(Some(Tensor::from_raw_buffer(&all, t.dtype(), &dims, t.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_data_in_order() {
        for n in 1..20 {
            for size in 1..=n {
                let parts: Vec<Range<usize>> = (0..size).map(|r| split(n, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, n);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
                let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{n} over {size}: {lens:?}");
                assert!(lens.iter().all(|&l| l >= 1));
            }
        }
    }

    #[test]
    fn single_process_is_the_identity() {
        let s = &SINGLE_PROCESS;
        assert_eq!(shard_of(s, 7).unwrap(), Shard { start: 0, len: 7, total: 7 });
        let e: Result<()> = Err(Error::Invalid("bad".into()));
        assert_eq!(agree(s, e).unwrap_err().to_string(), "invalid argument: bad");
        let mut v = [1.0, 2.0];
        s.sum(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
    }
}
