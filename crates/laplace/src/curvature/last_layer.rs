//! The full last-layer curvature from the features alone, using its
//! Kronecker structure.
//!
//! When the final Linear layer produces the output (nothing but identity
//! layers after it), its Jacobian is J_n = I_C ⊗ φ̃_nᵀ with φ̃ = [φ; 1] (the
//! 1 for the bias), so for output rows r_{n,k}
//!
//!   Σ_{n,k} (J_nᵀ r_{n,k})(J_nᵀ r_{n,k})ᵀ = Σ_n Λ̃_n ⊗ φ̃_n φ̃_nᵀ,   Λ̃_n = Σ_k r r ᵀ.
//!
//! Block (c, c') is Φ̃ᵀ diag(Λ̃[:, c, c']) Φ̃: C(C+1)/2 products of size
//! D̃ × N × D̃ instead of one (C·D̃) × (N·K) × (C·D̃) product — 2K times
//! fewer operations (K = C for the GGN).

use super::Curvature;
use crate::engine;
use crate::error::Result;
use crate::tensor::{self, Mm, Tensor};

/// Does the model end with its final Linear layer (identities after it)?
pub(crate) fn applies(curv: &Curvature) -> Result<Option<usize>> {
    let model = curv.model();
    let last = model.last_linear()?;
    let mut v = model.output_value();
    while let Some(j) = model.producer(v) {
        if j == last {
            return Ok(Some(last));
        }
        let node = &model.nodes()[j];
        if node.op.type_name() != "Identity" {
            break;
        }
        v = node.inputs[0];
    }
    Ok(None)
}

/// Add the batch's full last-layer curvature into `h (C·D [+ C], C·D [+ C])`
/// (the weight-then-bias layout), in place; returns its Σ_n ℓ_n.
pub(crate) fn add_full(curv: &Curvature, batch: &super::Batch, last: usize, h: &mut Tensor) -> Result<Tensor> {
    let model = curv.model();
    let y = curv.targets(&batch.y, &batch.x)?;
    let tape = engine::forward(model, &batch.x, &model.downstream_of(&[last]))?;
    let f = &tape.output;
    let loss = curv.likelihood().loss(f, &y)?;
    let rows = curv.output_rows(f, &y, batch.offset)?; // (M, K, C)
    let lam = rows.transpose(1, 2)?.contiguous()?.mm(&rows)?; // Λ̃ (M, C, C)
    let affine = model.nodes()[last].op.affine().expect("Linear is affine");
    let (c, d, _) = affine.affine_dims();
    let m = f.dim(0)?;
    let phi = affine.patches(tape.saved(last))?.reshape((m, d))?;
    let bias = affine.has_bias();
    let dt = if bias { d + 1 } else { d };
    let x = if bias { Tensor::cat(&[&phi, &Tensor::ones((m, 1), phi.dtype(), phi.device())?], 1)? } else { phi };
    let lam = lam.reshape((m, c * c))?;
    // H in θ order, added block by block (no permuted copy of the (P, P)
    // result): the weight (class-major, C·D) first, then the bias (C), so
    // feature k < D of class a is θ index a·D + k and its bias C·D + a.
    let (hr, hc) = h.dims2()?;
    if (hr, hc) != (c * dt, c * dt) {
        crate::error::bail!(Invalid, "last-layer curvature sum of shape ({hr}, {hc}), expected ({0}, {0})", c * dt);
    }
    let place = |h: &mut Tensor, block: &Tensor, a: usize, b: usize| -> Result<()> {
        tensor::add_block(h, &block.narrow(0, 0, d)?.narrow(1, 0, d)?, a * d, b * d)?;
        if bias {
            tensor::add_block(h, &block.narrow(0, 0, d)?.narrow(1, d, 1)?, a * d, c * d + b)?;
            tensor::add_block(h, &block.narrow(0, d, 1)?.narrow(1, 0, d)?, c * d + a, b * d)?;
            tensor::add_block(h, &block.narrow(0, d, 1)?.narrow(1, d, 1)?, c * d + a, c * d + b)?;
        }
        Ok(())
    };
    for a in 0..c {
        for b in a..c {
            let w = lam.narrow(1, a * c + b, 1)?; // (M, 1)
            let block = x.broadcast_mul(&w)?.t()?.mm(&x)?; // Σ_n Λ̃_ab φ̃φ̃ᵀ (D̃, D̃)
            place(h, &block, a, b)?;
            if a != b {
                place(h, &block.t()?, b, a)?;
            }
        }
    }
    Ok(loss)
}
