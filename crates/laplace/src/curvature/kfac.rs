//! Kronecker factors (KFAC) of the GGN, MC Fisher and EF, per layer from
//! its patches U `(M, I, R)` and output sensitivities V `(M, K, O, R)`.
//!
//! With N the total number of data points (the `kron` argument):
//!
//! * `expand` (default): A = (1/(N·R)) Σ_n Σ_r u_{n,r} u_{n,r}ᵀ,
//!   B = Σ_n Σ_k Σ_r v_{n,k,r} v_{n,k,r}ᵀ;
//! * `reduce`: ū_n = (1/R) Σ_r u_{n,r}, v̄_{n,k} = Σ_r v_{n,k,r},
//!   A = (1/N) Σ_n ū_n ū_nᵀ, B = Σ_n Σ_k v̄_{n,k} v̄_{n,k}ᵀ.
//!
//! For Linear layers (R = 1) both are the same. The rows k are those of the
//! curvature kind: √Λ (type-2 / KFLR), scaled MC gradients, or ∇_f ℓ (EF).
//! Blocks: weight `[B, A]` (a 1 × 1 weight: `[B·A]`), bias `[B]`.

use std::str::FromStr;

use crate::engine::AffineView;
use crate::error::{bail, Error, Result};
use crate::tensor::{self, Tensor};

/// How Conv2d weight-sharing positions enter the factors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KfacApprox {
    #[default]
    Expand,
    Reduce,
}

impl FromStr for KfacApprox {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "expand" => Ok(KfacApprox::Expand),
            "reduce" => Ok(KfacApprox::Reduce),
            other => bail!(Invalid, "unknown KFAC approximation {other:?} (expected expand or reduce)"),
        }
    }
}

/// `X Xᵀ` for X `(rows, cols)`: a symmetric rank-k update (half a product)
/// when the factor is large enough for that to pay, a plain product otherwise.
fn gram_rows(x: &Tensor) -> Result<Tensor> {
    if x.dim(0)? >= SYRK_MIN_DIM {
        crate::linalg::gram_rows(x)
    } else {
        Ok(x.matmul(&x.t()?)?)
    }
}

/// Smallest factor dimension computed by a triangular rank-k update.
const SYRK_MIN_DIM: usize = 64;

/// The input factor A `(I, I)`.
pub fn input_factor(u: &Tensor, n_data: usize, approx: KfacApprox) -> Result<Tensor> {
    let (m, i, r) = u.dims3()?;
    let a = if r == 1 {
        // Linear: U as (M, I), A ∝ Uᵀ U.
        gram_rows(&u.reshape((m, i))?.t()?)?
    } else {
        // U with the patch axis first, (I, M, R): free when the layer keeps
        // it that way (Conv2d does), a copy otherwise.
        let uimr = tensor::contiguous(&u.transpose(0, 1)?)?;
        match approx {
            // Σ_n Σ_r u uᵀ: every (n, r) is a column.
            KfacApprox::Expand => gram_rows(&uimr.reshape((i, m * r))?)?,
            // ū_n = (1/R) Σ_r u_{n,r}: (I, M).
            KfacApprox::Reduce => gram_rows(&(uimr.sum(2)? / r as f64)?)?,
        }
    };
    let scale = match approx {
        KfacApprox::Expand => n_data * r,
        KfacApprox::Reduce => n_data,
    };
    Ok((a / scale as f64)?)
}

/// The output factor B `(O, O)`.
pub fn output_factor(v: &Tensor, approx: KfacApprox) -> Result<Tensor> {
    let (m, k, o, r) = v.dims4()?;
    match approx {
        _ if r == 1 => gram_rows(&v.reshape((m * k, o))?.t()?),
        // Σ_n Σ_k Σ_r v vᵀ: V as (O, M·K·R).
        KfacApprox::Expand => gram_rows(&v.permute((2, 0, 1, 3))?.contiguous()?.reshape((o, m * k * r))?),
        KfacApprox::Reduce => gram_rows(&tensor::sum_dim(v, 3)?.reshape((m * k, o))?.t()?),
    }
}

/// The blocks of one layer: weight `[B, A]` (or `[B·A]` when 1 × 1), then bias `[B]`.
pub fn layer_blocks(view: &AffineView, n_data: usize, approx: KfacApprox) -> Result<Vec<Vec<Tensor>>> {
    let a = input_factor(&view.patches, n_data, approx)?;
    let b = output_factor(&view.sensitivities, approx)?;
    let mut blocks = Vec::with_capacity(2);
    let (o, i, _) = view.affine.affine_dims();
    if o == 1 && i == 1 {
        blocks.push(vec![(&b * &a)?]);
    } else {
        blocks.push(vec![b.clone(), a]);
    }
    if view.affine.has_bias() {
        blocks.push(vec![b]);
    }
    Ok(blocks)
}
