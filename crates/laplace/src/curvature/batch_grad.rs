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

use super::selection::{LayerSelection, Selected};
use crate::engine::AffineView;
use crate::error::Result;
use crate::tensor::{self, Tensor};

/// `(M, K, n)` gradients of the selected coordinates of the layer in `view`:
/// the weight's, then the bias's, each in ascending local index.
pub fn batch_grads(view: &AffineView, sel: &LayerSelection) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(2);
    if let Some(s) = &sel.weight {
        parts.push(weight_grads(&view.patches, &view.sensitivities, s)?);
    }
    if let Some(s) = &sel.bias {
        parts.push(bias_grads(&view.sensitivities, s)?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

/// `(M, K, n)` weight gradients.
pub fn weight_grads(u: &Tensor, v: &Tensor, sel: &Selected) -> Result<Tensor> {
    let (m, k, o, r) = v.dims4()?;
    let i = u.dim(1)?;
    match sel {
        Selected::All if r == 1 => {
            // Outer products V[n, k] U[n]ᵀ: (M, K, O, 1) ⊙ (M, 1, 1, I).
            let g = v.broadcast_mul(&u.reshape((m, 1, 1, i))?)?;
            Ok(g.reshape((m, k, o * i))?)
        }
        Selected::All => {
            // (M, K·O, R) @ (M, R, I) → (M, K·O, I); U as the layer keeps it
            // (a strided view is fine for the product: it packs its operands).
            let g = v.reshape((m, k * o, r))?.matmul(&u.transpose(1, 2)?)?;
            Ok(g.reshape((m, k, o * i))?)
        }
        Selected::Some(ids) => {
            // Coordinate p = o·I + i: gather the rows o of V and i of U, contract over r.
            let os: Vec<usize> = ids.iter().map(|p| p / i).collect();
            let is: Vec<usize> = ids.iter().map(|p| p % i).collect();
            let vs = tensor::select(v, &tensor::index_tensor(&os, v.device())?, 2)?; // (M, K, S, R)
            let us = tensor::select(u, &tensor::index_tensor(&is, u.device())?, 1)?; // (M, S, R)
            tensor::sum_dim(&vs.broadcast_mul(&us.unsqueeze(1)?)?, 3)
        }
    }
}

/// `(M, K, n)` bias gradients.
pub fn bias_grads(v: &Tensor, sel: &Selected) -> Result<Tensor> {
    let g = tensor::sum_dim(v, 3)?; // (M, K, O)
    match sel {
        Selected::All => Ok(g),
        Selected::Some(ids) => tensor::select(&g, &tensor::index_tensor(ids, v.device())?, 2),
    }
}
