//! Dense linear algebra through faer (the only module that calls it):
//! symmetric eigendecompositions, for now.

use faer::Side;

use crate::error::{bail, Result};
use crate::tensor::{self, Tensor};

fn square(a: &Tensor, what: &str) -> Result<faer::Mat<f64>> {
    let m = tensor::to_faer(a)?;
    if m.nrows() != m.ncols() {
        bail!(Invalid, "{what} needs a square matrix, got {:?}", a.dims());
    }
    Ok(m)
}

/// Eigenvalues of a symmetric `(n, n)` matrix, ascending.
pub fn symmetric_eigenvalues(a: &Tensor) -> Result<Vec<f64>> {
    square(a, "eigenvalues")?
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| crate::Error::NonFinite(format!("symmetric eigendecomposition failed: {e:?}")))
}

/// Eigendecomposition A = Q diag(λ) Qᵀ of a symmetric `(n, n)` matrix:
/// λ ascending `(n,)` and Q `(n, n)` (columns are eigenvectors), in the
/// dtype and on the device of `a`.
pub fn symmetric_eigen(a: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = square(a, "eigendecomposition")?;
    let evd = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| crate::Error::NonFinite(format!("symmetric eigendecomposition failed: {e:?}")))?;
    let n = m.nrows();
    let vals: Vec<f64> = (0..n).map(|i| evd.S()[i]).collect();
    let vals = tensor::from_f64(vals, &[n], a.dtype(), a.device())?;
    let vecs = tensor::from_faer(evd.U(), a.dtype(), a.device())?;
    Ok((vals, vecs))
}
