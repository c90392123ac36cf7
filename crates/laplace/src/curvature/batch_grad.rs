//! Per-sample, per-column parameter gradients of one layer ("BatchGrad").
//!
//! For output sensitivities V `(M, K, O, R)` and patches U `(M, I, R)`,
//! column k of sample n has the gradient
//!
//!   ∂/∂W[o, i] = Σ_r V[n, k, o, r] U[n, i, r],     ∂/∂b[o] = Σ_r V[n, k, o, r],
//!
//! i.e. row (n, k) of J_nᵀ v_{n,k} restricted to this layer. With V the
//! identity this is the Jacobian, with V the rows of √Λ the factor whose
//! Gram matrix is the GGN, with V = ∇_f ℓ the per-sample gradient.

use super::selection::Selected;
use crate::error::Result;
use crate::tensor::{self, Tensor};

/// `(M, K, n)` gradients of the weight coordinates `ids` (local, row-major
/// p = o·I + i): the rows o of V and i of U gathered, contracted over r.
/// (A whole weight is written straight into its result instead:
/// [`tensor::write_outer_rows`] for Linear, [`tensor::write_products_rows`]
/// for weight sharing.)
pub fn weight_grads(u: &Tensor, v: &Tensor, ids: &[usize]) -> Result<Tensor> {
    let i = u.dim(1)?;
    let os: Vec<usize> = ids.iter().map(|p| p / i).collect();
    let is: Vec<usize> = ids.iter().map(|p| p % i).collect();
    let vs = tensor::select(v, &tensor::index_tensor(&os, v.device())?, 2)?; // (M, K, S, R)
    let us = tensor::select(u, &tensor::index_tensor(&is, u.device())?, 1)?; // (M, S, R)
    tensor::sum_dim(&vs.broadcast_mul(&us.unsqueeze(1)?)?, 3)
}

/// `(M, K, n)` bias gradients.
pub fn bias_grads(v: &Tensor, sel: &Selected) -> Result<Tensor> {
    let g = tensor::sum_dim(v, 3)?; // (M, K, O)
    match sel {
        Selected::All => Ok(g),
        Selected::Some(ids) => tensor::select(&g, &tensor::index_tensor(ids, v.device())?, 2),
    }
}
