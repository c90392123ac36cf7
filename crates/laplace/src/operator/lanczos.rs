//! Top-k eigenpairs of a symmetric operator by the Lanczos iteration with
//! full reorthogonalization (the basis is kept in f64 on the host; every
//! new vector is orthogonalized twice against all previous ones, which
//! keeps the Ritz values free of spurious copies).

use faer::{Mat, Side};

use super::LinearOperator;
use crate::error::{bail, Result};
use crate::rng::Rng;
use crate::tensor::{self, Tensor};

/// Eigenvalues `(K,)` in descending order and eigenvectors `(K, P)` as rows.
#[derive(Clone, Debug)]
pub struct Eigenpairs {
    /// The eigenvalues, largest first.
    pub values: Vec<f64>,
    /// The eigenvectors, one `(P,)` per eigenvalue.
    pub vectors: Vec<Vec<f64>>,
    /// Residual norms ‖A x − λ x‖ estimated from the recurrence.
    pub residuals: Vec<f64>,
    /// Operator products used.
    pub iterations: usize,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// The `k` largest (algebraic) eigenpairs of `op`. Iterates until every one
/// has residual ≤ `tol`·max(|λ|, 1e-30), the Krylov space is exhausted, or
/// `max_iter` products were used. Seeded start vector.
pub fn lanczos_top_k(op: &dyn LinearOperator, k: usize, tol: f64, max_iter: usize, seed: u64) -> Result<Eigenpairs> {
    let p = op.dim();
    if k == 0 || k > p {
        bail!(Invalid, "top-k needs 1 ≤ k ≤ {p} (the number of parameters), got {k}");
    }
    crate::budget::check(&format!("the Lanczos basis ({} vectors of P = {p})", max_iter.clamp(1, p) + 1), &[max_iter.clamp(1, p) + 1, p], 8)?;
    let mut rng = Rng::new(seed);
    let mut q: Vec<f64> = (0..p).map(|_| rng.normal()).collect();
    let n0 = norm(&q);
    q.iter_mut().for_each(|x| *x /= n0);
    let mut basis: Vec<Vec<f64>> = vec![q];
    let (mut alpha, mut beta): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let max_iter = max_iter.clamp(1, p);
    let (dtype, device) = (op.dtype(), op.device().clone());
    loop {
        let j = basis.len() - 1;
        let qj = tensor::from_f64(basis[j].clone(), &[1, p], dtype, &device)?;
        let mut w = tensor::to_vec_f64(&op.matmat(&qj)?)?;
        let a = dot(&w, &basis[j]);
        alpha.push(a);
        // Full reorthogonalization, twice ("twice is enough").
        for _ in 0..2 {
            for b in &basis {
                let c = dot(&w, b);
                w.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
            }
        }
        let bnorm = norm(&w);
        let m = alpha.len();
        // Ritz pairs of the tridiagonal T_m.
        let t = Mat::<f64>::from_fn(m, m, |r, c| {
            if r == c {
                alpha[r]
            } else if r + 1 == c {
                beta[r]
            } else if c + 1 == r {
                beta[c]
            } else {
                0.0
            }
        });
        let evd = t
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| crate::Error::NonFinite(format!("Lanczos: tridiagonal eigensolver failed: {e:?}")));
        crate::tensor::clear_simd_upper_state(crate::tensor::SimdScope::AllThreads);
        let evd = evd?;
        let exhausted = bnorm <= 1e-12 * alpha.iter().map(|x| x.abs()).fold(1e-300, f64::max) || m >= p;
        let take = k.min(m);
        // Residual of Ritz pair i: β_m |last component of its eigenvector|.
        let res: Vec<f64> = (0..take).map(|i| bnorm * evd.U()[(m - 1, m - 1 - i)].abs()).collect();
        let vals: Vec<f64> = (0..take).map(|i| evd.S()[m - 1 - i]).collect();
        let converged = take == k && res.iter().zip(&vals).all(|(r, v)| *r <= tol * v.abs().max(1e-30));
        if converged || exhausted || m >= max_iter {
            if take < k {
                bail!(Invalid, "Lanczos found only {take} eigenpairs (Krylov space exhausted)");
            }
            let vectors = (0..k)
                .map(|i| {
                    let col = m - 1 - i;
                    let mut x = vec![0.0; p];
                    for (jj, b) in basis.iter().enumerate().take(m) {
                        let c = evd.U()[(jj, col)];
                        x.iter_mut().zip(b).for_each(|(xi, bi)| *xi += c * bi);
                    }
                    x
                })
                .collect();
            return Ok(Eigenpairs {
                values: vals,
                vectors,
                residuals: res,
                iterations: m,
            });
        }
        beta.push(bnorm);
        w.iter_mut().for_each(|x| *x /= bnorm);
        basis.push(w);
    }
}

impl Eigenpairs {
    /// Eigenvalues `(K,)` and eigenvectors `(K, P)` as tensors.
    pub fn to_tensors(&self, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.values.len();
        let p = self.vectors.first().map_or(0, Vec::len);
        let vals = tensor::from_f64(self.values.clone(), &[k], like.dtype(), like.device())?;
        let vecs = tensor::from_f64(self.vectors.concat(), &[k, p], like.dtype(), like.device())?;
        Ok((vals, vecs))
    }
}
