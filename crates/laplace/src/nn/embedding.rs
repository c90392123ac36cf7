//! `torch.nn.Embedding`: a table W `(V, D)` read at integer indices,
//! z[n, s] = W[id[n, s]].
//!
//! The lookup is a Linear map of one-hot inputs, z = Wᵀ e_id, with the
//! table stored `(in, out)` = `(V, D)` ([`WeightLayout::InOut`]); its patch
//! form has I = V, O = D and one position per index (R = ∏ S), the patches
//! U `(M, V, R)` being the one-hot columns. So every first-order quantity
//! (Jacobians, gradients, GGN / Fisher / EF, their diagonals) comes from the
//! same code as for Linear. The indices are integers: they have no
//! derivative, and nothing flows back into them.
//!
//! KFAC: one-hot inputs make the input factor diagonal,
//! A = diag(a) with a_v = (1/(N·R)) · (number of positions reading row v),
//! kept as a 1-D factor; the block is `[diag(a), B]` on the `(V, D)` table
//! (row-major), B = Σ_n Σ_k Σ_r g gᵀ over positions as for `expand`. That
//! block is used with both KFAC approximations (`reduce` would average
//! one-hot vectors over the sequence, which is no longer diagonal).
//!
//! `padding_idx`: that row gets no gradient in torch, so its one-hot column
//! is zero here (its curvature is zero).

use std::collections::HashMap;

use super::flatten::with_leading;
use super::{AffineLayer, Layer, LayerCtx, OneHot, OutputLayout, Saved, WeightLayout};
use crate::error::{bail, Result};
use crate::spec::LayerSpec;
use crate::tensor::{self, DType, Tensor};

/// `torch.nn.Embedding`: a lookup table `(V, D)` of integer inputs.
pub struct Embedding {
    /// The table `(V, D)`.
    weight: Tensor,
    padding_idx: Option<usize>,
    in_shape: Vec<usize>,
    out_shape: Vec<usize>,
    label: String,
}

/// The indices of the batch, `(M·R)` in row-major order (`None` for padding_idx).
struct EmbeddingSaved {
    ids: Vec<Option<usize>>,
}

impl Embedding {
    pub(crate) fn build(ctx: &LayerCtx, in_shape: &[usize], weights: &mut HashMap<String, Tensor>, dtype: DType) -> Result<Self> {
        let LayerSpec::Embedding { num_embeddings, embedding_dim, padding_idx } = *ctx.spec else {
            unreachable!("Embedding::build called with another spec")
        };
        let weight = ctx.take_param(weights, "weight", &[num_embeddings, embedding_dim], dtype)?;
        Ok(Embedding {
            weight,
            padding_idx,
            in_shape: in_shape.to_vec(),
            out_shape: [in_shape, &[embedding_dim]].concat(),
            label: ctx.label.to_string(),
        })
    }

    fn vocab(&self) -> usize {
        self.weight.dims()[0]
    }

    fn dim(&self) -> usize {
        self.weight.dims()[1]
    }

    fn positions(&self) -> usize {
        self.in_shape.iter().product()
    }

    /// The indices of `x`, checked to be integers in `0..V`.
    fn indices(&self, x: &Tensor) -> Result<Vec<usize>> {
        let v = self.vocab();
        tensor::to_vec_f64(x)?
            .into_iter()
            .enumerate()
            .map(|(pos, f)| {
                if f.fract() != 0.0 || f < 0.0 || f >= v as f64 {
                    bail!(
                        Data,
                        "{}: index {f} at {:?} is not a row of the {v}-row table",
                        self.label,
                        tensor::unravel(pos, x.dims())
                    );
                }
                Ok(f as usize)
            })
            .collect()
    }

    /// Zeros shaped like the input with a column axis: `(M, K, *S)`.
    fn zero_input(&self, like: &Tensor, m: usize, k: usize) -> Result<Tensor> {
        Ok(Tensor::zeros(with_leading(&[m, k], &self.in_shape), like.dtype(), like.device())?)
    }
}

impl Layer for Embedding {
    fn type_name(&self) -> &'static str {
        "Embedding"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        let m = x.dim(0)?;
        let ids = self.indices(x)?;
        let idx = tensor::index_tensor(&ids, x.device())?;
        let z = self.weight.index_select(&idx, 0)?.reshape(with_leading(&[m], &self.out_shape))?;
        let ids = ids.into_iter().map(|i| (Some(i) != self.padding_idx).then_some(i)).collect();
        Ok((z, save.then(|| Saved::new(EmbeddingSaved { ids }))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Indices have no derivative.
        self.zero_input(v, v.dim(0)?, v.dim(1)?)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        let mut shape = x_dot.dims()[..2].to_vec();
        shape.extend_from_slice(&self.out_shape);
        Ok(Tensor::zeros(shape, x_dot.dtype(), x_dot.device())?)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("weight", &self.weight)]
    }

    fn affine(&self) -> Option<&dyn AffineLayer> {
        Some(self)
    }
}

impl AffineLayer for Embedding {
    fn affine_dims(&self) -> (usize, usize, usize) {
        (self.dim(), self.vocab(), self.positions())
    }

    fn has_bias(&self) -> bool {
        false
    }

    fn output_layout(&self) -> OutputLayout {
        OutputLayout::ChannelsLast
    }

    fn weight_layout(&self) -> WeightLayout {
        WeightLayout::InOut
    }

    fn one_hot<'s>(&self, saved: &'s Saved) -> Option<OneHot<'s>> {
        Some(OneHot { ids: &saved.get::<EmbeddingSaved>().ids, vocab: self.vocab(), positions: self.positions() })
    }

    fn patches(&self, saved: &Saved) -> Result<Tensor> {
        // One-hot columns U[n, v, r] = [id[n, r] = v] (zero for padding_idx).
        let ids = &saved.get::<EmbeddingSaved>().ids;
        let (v, r) = (self.vocab(), self.positions());
        let m = ids.len() / r;
        let mut u = vec![0.0f64; m * v * r];
        for (j, id) in ids.iter().enumerate() {
            if let Some(id) = id {
                let (n, pos) = (j / r, j % r);
                u[(n * v + id) * r + pos] = 1.0;
            }
        }
        tensor::from_f64(u, &[m, v, r], self.weight.dtype(), self.weight.device())
    }

    fn tangent_patches(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        Ok(Tensor::zeros((m, k, self.vocab(), self.positions()), x_dot.dtype(), x_dot.device())?)
    }

    fn backward_with_weights(&self, _saved: &Saved, g: &Tensor, w: &Tensor) -> Result<Tensor> {
        self.zero_input(g, g.dim(0)?, w.dim(0)?)
    }
}
