//! Dense linear algebra on small matrices through faer (the only place that
//! calls it): eigenvalues and eigenvectors of symmetric matrices, for now.

use faer::Side;

use crate::error::{bail, Result};
use crate::tensor::{self, Tensor};

/// Eigenvalues of a symmetric `(n, n)` matrix, ascending.
pub fn symmetric_eigenvalues(a: &Tensor) -> Result<Vec<f64>> {
    let m = tensor::to_faer(a)?;
    if m.nrows() != m.ncols() {
        bail!(Invalid, "eigenvalues need a square matrix, got {:?}", a.dims());
    }
    m.self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| crate::Error::NonFinite(format!("symmetric eigendecomposition failed: {e:?}")))
}
