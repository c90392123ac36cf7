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

/// Cholesky factorization A = L Lᵀ of a symmetric positive definite matrix,
/// held in f64.
pub struct Cholesky {
    l: faer::Mat<f64>,
}

impl Cholesky {
    /// Factorize `a (n, n)`; an error names the failure if `a` is not positive definite.
    pub fn new(a: &Tensor) -> Result<Self> {
        Self::from_faer(square(a, "Cholesky factorization")?)
    }

    pub fn from_faer(m: faer::Mat<f64>) -> Result<Self> {
        let llt = m
            .llt(Side::Lower)
            .map_err(|e| crate::Error::NonFinite(format!("matrix is not positive definite ({e:?})")))?;
        Ok(Cholesky { l: llt.L().to_owned() })
    }

    pub fn dim(&self) -> usize {
        self.l.nrows()
    }

    /// log det A = 2 Σ log L_ii.
    pub fn logdet(&self) -> f64 {
        (0..self.dim()).map(|i| 2.0 * self.l[(i, i)].ln()).sum()
    }

    /// L⁻¹ B for B `(n, k)`.
    pub fn solve_lower(&self, b: faer::Mat<f64>) -> faer::Mat<f64> {
        let mut x = b;
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(self.l.as_ref(), x.as_mut(), faer::Par::Seq);
        x
    }

    /// L⁻ᵀ B for B `(n, k)`.
    pub fn solve_lower_transpose(&self, b: faer::Mat<f64>) -> faer::Mat<f64> {
        let mut x = b;
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(self.l.transpose(), x.as_mut(), faer::Par::Seq);
        x
    }

    /// A⁻¹ B for B `(n, k)`.
    pub fn solve(&self, b: faer::Mat<f64>) -> faer::Mat<f64> {
        self.solve_lower_transpose(self.solve_lower(b))
    }

    /// The diagonal of A⁻¹: (A⁻¹)_ii = Σ_k (L⁻¹)_{ki}².
    pub fn inverse_diag(&self) -> Vec<f64> {
        let n = self.dim();
        let linv = self.solve_lower(faer::Mat::<f64>::identity(n, n));
        (0..n).map(|i| (0..n).map(|k| linv[(k, i)].powi(2)).sum()).collect()
    }

    /// A⁻¹ as a dense matrix.
    pub fn inverse(&self) -> faer::Mat<f64> {
        let n = self.dim();
        self.solve(faer::Mat::<f64>::identity(n, n))
    }
}
