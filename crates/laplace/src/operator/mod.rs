//! Curvature as linear operators, and the algorithms that need only
//! products: Lanczos eigenpairs, conjugate gradients, trace and diagonal
//! estimators (curvlinops' job in the Python world).
//!
//! Convention: a batch of K vectors is a `(K, P)` tensor whose rows are the
//! vectors, and `matmat` returns the K products as rows. Every curvature
//! operator has exactly the scaling and parameter layout of the matrices
//! of [`crate::Curvature`] (a data set's operator is the sum over its
//! batches), so applying it to the identity gives the matrix.
//!
//! Over several ranks ([`crate::distributed`]) a [`CurvatureOperator`]'s
//! products are sums over the ranks' shards, identical on every rank, so the
//! algorithms here run replicated: every rank takes the same steps with the
//! same seed and ends with the same result.

mod cg;
mod lanczos;
mod trace;

pub use cg::{conjugate_gradients, CgResult};
pub use lanczos::{lanczos_top_k, Eigenpairs};
pub use trace::{hutchinson_diag, hutchinson_trace, hutchpp_trace};

use crate::curvature::Curvature;
use crate::data::Dataset;
use crate::distributed::{self, Shard};
use crate::error::{bail, Result};
use crate::kron::{Kron, KronDecomposed};
use crate::tensor::{DType, Device, Mm, Tensor};

/// A symmetric linear map on R^P.
pub trait LinearOperator {
    /// P.
    fn dim(&self) -> usize;

    /// `(K, P)` → `(K, P)`: row k of the result is A v_k.
    fn matmat(&self, v: &Tensor) -> Result<Tensor>;

    /// The dtype of the vectors it takes and returns.
    fn dtype(&self) -> DType;

    /// The device of those vectors.
    fn device(&self) -> &Device;

    /// A v for one vector `(P,)`.
    fn matvec(&self, v: &Tensor) -> Result<Tensor> {
        Ok(self.matmat(&v.unsqueeze(0)?)?.squeeze(0)?)
    }

    /// The dense matrix, by products with the identity (for tests and small P).
    fn to_matrix(&self) -> Result<Tensor> {
        let eye = Tensor::eye(self.dim(), self.dtype(), self.device())?;
        self.matmat(&eye)
    }
}

/// A curvature (GGN, MC Fisher, EF, Hessian) summed over a data set (over
/// every rank's shard, with the curvature's communicator).
pub struct CurvatureOperator<'a> {
    curvature: &'a Curvature<'a>,
    data: &'a Dataset,
    batch_size: usize,
    shard: Shard,
}

impl<'a> CurvatureOperator<'a> {
    /// Collective across the curvature's communicator.
    pub fn new(curvature: &'a Curvature<'a>, data: &'a Dataset, batch_size: usize) -> Result<Self> {
        let shard = curvature.shard(data)?;
        distributed::agree(curvature.communicator(), data.targets().map(|_| ()))?;
        Ok(CurvatureOperator {
            curvature,
            data,
            batch_size: batch_size.max(1),
            shard,
        })
    }
}

impl LinearOperator for CurvatureOperator<'_> {
    fn dim(&self) -> usize {
        self.curvature.n_params()
    }

    /// Collective across the curvature's communicator: every rank's shard
    /// contributes, and every rank gets the sum.
    fn matmat(&self, v: &Tensor) -> Result<Tensor> {
        let comm = self.curvature.communicator();
        let local = distributed::agreed(comm, || {
            check_rows(v, self.dim())?;
            let v = v.to_dtype(self.dtype())?;
            let monitor = self.curvature.monitor();
            let acc = crate::pass::fold_batches(self.data, self.batch_size, monitor, "curvature product", None, |acc, o, n| {
                let mut batch = self.data.batch(o, n)?;
                batch.offset += self.shard.start;
                let (_, hv) = self.curvature.matmat(&batch, &v)?;
                crate::pass::accumulate(acc, hv, |a, b| Ok((a + b)?))
            })?;
            Ok(acc.expect("a data set has at least one point"))
        })?;
        distributed::sum_tensor(comm, local)
    }

    fn dtype(&self) -> DType {
        self.curvature.model().dtype()
    }

    fn device(&self) -> &Device {
        self.curvature.model().device()
    }
}

/// A Kronecker-factored curvature as an operator.
pub struct KronOperator {
    kron: Kron,
    p: usize,
    dtype: DType,
    device: Device,
}

impl KronOperator {
    /// The operator of `kron` (at least one block).
    pub fn new(kron: Kron) -> Result<Self> {
        let p = kron.n_params()?;
        let first = kron.blocks.first().and_then(|b| b.first()).ok_or_else(|| crate::Error::Invalid("empty Kron".into()))?;
        let (dtype, device) = (first.dtype(), first.device().clone());
        Ok(KronOperator { kron, p, dtype, device })
    }
}

impl LinearOperator for KronOperator {
    fn dim(&self) -> usize {
        self.p
    }

    fn matmat(&self, v: &Tensor) -> Result<Tensor> {
        check_rows(v, self.p)?;
        self.kron.bmm(&v.to_dtype(self.dtype)?)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// A decomposed Kronecker curvature (with prior precision) to a power `exponent`.
pub struct KronDecomposedOperator {
    kron: KronDecomposed,
    exponent: f64,
    p: usize,
    dtype: DType,
    device: Device,
}

impl KronDecomposedOperator {
    /// The operator of the eigendecomposed `kron` raised to `exponent` (−1: its inverse), on `dtype`, `device` vectors.
    pub fn new(kron: KronDecomposed, exponent: f64, dtype: DType, device: Device) -> Result<Self> {
        let p = kron.eigenvalues().iter().map(|ls| ls.iter().map(|l| l.dim(0)).product::<std::result::Result<usize, _>>()).sum::<std::result::Result<usize, _>>()?;
        Ok(KronDecomposedOperator { kron, exponent, p, dtype, device })
    }
}

impl LinearOperator for KronDecomposedOperator {
    fn dim(&self) -> usize {
        self.p
    }

    fn matmat(&self, v: &Tensor) -> Result<Tensor> {
        check_rows(v, self.p)?;
        self.kron.bmm(&v.to_dtype(self.dtype)?, self.exponent)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// A dense symmetric matrix as an operator.
pub struct DenseOperator {
    matrix: Tensor,
    device: Device,
}

impl DenseOperator {
    /// The operator of a symmetric `(P, P)` matrix.
    pub fn new(matrix: Tensor) -> Result<Self> {
        let (r, c) = matrix.dims2()?;
        if r != c {
            bail!(Invalid, "an operator needs a square matrix, got ({r}, {c})");
        }
        let device = matrix.device().clone();
        Ok(DenseOperator { matrix, device })
    }
}

impl LinearOperator for DenseOperator {
    fn dim(&self) -> usize {
        self.matrix.dim(0).expect("2-D")
    }

    fn matmat(&self, v: &Tensor) -> Result<Tensor> {
        check_rows(v, self.dim())?;
        // Rows of V A = (A Vᵀ)ᵀ for symmetric A.
        Ok(v.to_dtype(self.matrix.dtype())?.mm(&self.matrix)?)
    }

    fn dtype(&self) -> DType {
        self.matrix.dtype()
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

fn check_rows(v: &Tensor, p: usize) -> Result<()> {
    match v.dims() {
        [_, q] if *q == p => Ok(()),
        d => bail!(Invalid, "operator input must be (K, {p}) rows, got shape {d:?}"),
    }
}
