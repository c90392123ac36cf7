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
use crate::tensor::{self, Mm, Tensor};

/// `(M, K, n)` gradients of the weight coordinates `ids` (local, row-major
/// p = o·I + i): the rows o of V and i of U gathered, contracted over r.
/// (A whole weight is written straight into its result instead:
/// [`tensor::write_outer_rows`] for Linear, [`tensor::write_products_rows`]
/// for weight sharing.)
///
/// In a grouped layer (G groups, U `(M, G·I, R)`) output o reads the patch
/// rows of its group: row (o / (O/G))·I + i.
pub fn weight_grads(u: &Tensor, v: &Tensor, ids: &[usize], groups: usize) -> Result<Tensor> {
    let i = u.dim(1)? / groups;
    let og = v.dim(2)? / groups;
    let os: Vec<usize> = ids.iter().map(|p| p / i).collect();
    let is: Vec<usize> = ids.iter().map(|p| (p / i / og) * i + p % i).collect();
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

/// (O/G)·I of a group below which [`grouped_weight_grads`] takes dot
/// products of rows instead of a batched GEMM.
const SMALL_GROUP: usize = 64;

/// `(M, K, O·I)` per-sample gradients of the whole weight of a grouped layer
/// (G > 1): group g's block is Σ_r V[n, k, g·O/G + o, r] U[n, g·I + i, r],
/// one batched product over (sample, group).
pub fn grouped_weight_grads(u: &Tensor, v: &Tensor, groups: usize) -> Result<Tensor> {
    let (m, gi, r) = u.dims3()?;
    let (_, k, o, _) = v.dims4()?;
    let (g, i, og) = (groups, gi / groups, o / groups);
    // Small groups (depthwise: O/G = 1, I = kh·kw): dot products of rows,
    // no copies. Above 64 outputs per group and patch row the batched GEMM
    // is faster (its register blocking reuses each loaded row).
    if og * i <= SMALL_GROUP {
        if let Some(g) = tensor::grouped_row_dots(u, v, groups)? {
            return Ok(g);
        }
    }
    // V (M, K, G, O/G, R) → (M, G, K·O/G, R); U (M, G, I, R) → (M, G, R, I).
    let vv = v.reshape((m, k, g, og, r))?.permute((0, 2, 1, 3, 4))?.contiguous()?.reshape((m, g, k * og, r))?;
    let uu = u.reshape((m, g, i, r))?.transpose(2, 3)?.contiguous()?;
    let prod = vv.mm(&uu)?; // (M, G, K·O/G, I)
    Ok(prod.reshape((m, g, k, og, i))?.permute((0, 2, 1, 3, 4))?.contiguous()?.reshape((m, k, o * i))?)
}
