//! `torch.nn.Linear`: z = W a + b, W `(out, in)`, applied at every leading
//! position of its input: a vector `(in,)`, or a sequence `(T, in)` (the
//! same weight at each of the T positions, as in a transformer), or any
//! `(*lead, in)`. HuggingFace's `Conv1D` is the same map with the weight
//! stored `(in, out)` ([`WeightLayout::InOut`]).
//!
//! Patch form: U `(M, in, R)` holds the R = ∏ lead positions' inputs as
//! columns; the output `(M, *lead, out)` keeps O last
//! ([`OutputLayout::ChannelsLast`] when R > 1).

use std::collections::HashMap;

use super::flatten::with_leading;
use super::{AffineLayer, Layer, LayerCtx, OutputLayout, Saved, WeightLayout};
use crate::error::Result;
use crate::spec::LayerSpec;
use crate::tensor::{DType, Mm, Tensor};

/// `torch.nn.Linear`: weight `(O, I)` (or `(I, O)` for HuggingFace `Conv1D`), optional bias `(O,)`.
pub struct Linear {
    /// The weight as stored (`(out, in)`, or `(in, out)` for `InOut`).
    weight: Tensor,
    /// W `(out, in)` for computing (a transposed copy for `InOut`).
    w: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
    in_shape: Vec<usize>,
    out_shape: Vec<usize>,
    /// R: the number of positions the weight is applied at.
    positions: usize,
}

/// Forward state: the layer input `(M, *lead, in)`, which holds its patches.
struct LinearSaved {
    input: Tensor,
}

impl Linear {
    pub(crate) fn build(
        ctx: &LayerCtx,
        in_shape: &[usize],
        weights: &mut HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        let LayerSpec::Linear {
            in_features,
            out_features,
            bias,
            weight_layout,
        } = *ctx.spec
        else {
            unreachable!("Linear::build called with another spec")
        };
        if in_shape.last() != Some(&in_features) {
            return Err(ctx.spec_err(format!(
                "its input has per-sample shape {in_shape:?}, but in_features = {in_features} \
                 needs (*, {in_features}) (add a Flatten before it?)"
            )));
        }
        let stored = match weight_layout {
            WeightLayout::OutIn => [out_features, in_features],
            WeightLayout::InOut => [in_features, out_features],
        };
        let weight = ctx.take_param(weights, "weight", &stored, dtype)?;
        let w = match weight_layout {
            WeightLayout::OutIn => weight.clone(),
            WeightLayout::InOut => weight.t()?.contiguous()?,
        };
        let bias = if bias {
            Some(ctx.take_param(weights, "bias", &[out_features], dtype)?)
        } else {
            None
        };
        let lead = &in_shape[..in_shape.len() - 1];
        let mut out_shape = lead.to_vec();
        out_shape.push(out_features);
        Ok(Linear {
            weight,
            w,
            bias,
            layout: weight_layout,
            in_shape: in_shape.to_vec(),
            out_shape,
            positions: lead.iter().product(),
        })
    }

    /// W `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    fn dims(&self) -> (usize, usize) {
        (self.out_shape[self.out_shape.len() - 1], self.in_shape[self.in_shape.len() - 1])
    }

    /// `t (lead…, I)` times Wᵀ over the last axis: `(lead…, O)`.
    fn apply(&self, t: &Tensor, lead: &[usize]) -> Result<Tensor> {
        let (_, i) = self.dims();
        let rows: usize = lead.iter().product::<usize>() * self.positions;
        let z = t.reshape((rows, i))?.mm(&self.w.t()?)?;
        Ok(z.reshape(with_leading(lead, &self.out_shape))?)
    }
}

impl Layer for Linear {
    fn type_name(&self) -> &'static str {
        "Linear"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        // z = x Wᵀ + b at every position.
        let mut z = self.apply(x, &x.dims()[..1])?;
        if let Some(b) = &self.bias {
            z = z.broadcast_add(b)?;
        }
        let saved = save.then(|| Saved::new(LinearSaved { input: x.clone() }));
        Ok((z, saved))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Jᵀ v = Wᵀ v at every position: (…, O) @ (O, I) → (…, I).
        let (o, _) = self.dims();
        let (m, k) = (v.dim(0)?, v.dim(1)?);
        let vin = v.reshape((m * k * self.positions, o))?.mm(&self.w)?;
        Ok(vin.reshape(with_leading(&[m, k], &self.in_shape))?)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // J ẋ = W ẋ at every position.
        self.apply(x_dot, &x_dot.dims()[..2])
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        let mut p = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            p.push(("bias", b));
        }
        p
    }

    fn affine(&self) -> Option<&dyn AffineLayer> {
        Some(self)
    }
}

impl AffineLayer for Linear {
    fn affine_dims(&self) -> (usize, usize, usize) {
        let (o, i) = self.dims();
        (o, i, self.positions)
    }

    fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    fn output_layout(&self) -> OutputLayout {
        if self.positions == 1 {
            OutputLayout::ChannelsFirst
        } else {
            OutputLayout::ChannelsLast
        }
    }

    fn weight_layout(&self) -> WeightLayout {
        self.layout
    }

    fn patches(&self, saved: &Saved) -> Result<Tensor> {
        // (M, R, I) → (M, I, R).
        let a = &saved.get::<LinearSaved>().input;
        let (_, i) = self.dims();
        let m = a.dim(0)?;
        if self.positions == 1 {
            return Ok(a.reshape((m, i, 1))?);
        }
        Ok(a.reshape((m, self.positions, i))?.transpose(1, 2)?.contiguous()?)
    }

    fn tangent_patches(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        let (_, i) = self.dims();
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        if self.positions == 1 {
            return Ok(x_dot.reshape((m, k, i, 1))?);
        }
        Ok(x_dot.reshape((m, k, self.positions, i))?.transpose(2, 3)?.contiguous()?)
    }

    fn backward_with_weights(&self, _saved: &Saved, g: &Tensor, w: &Tensor) -> Result<Tensor> {
        // Column k: g W_k at every position, (M·R, O) @ (K, O, I) → (K, M·R, I).
        let (o, i) = self.dims();
        let k = w.dim(0)?;
        let m = g.dim(0)?;
        let r = self.positions;
        let t = g.reshape((m * r, o))?.broadcast_left(k)?.mm(w)?; // (K, M·R, I)
        let t = t.reshape((k, m, r * i))?.transpose(0, 1)?.contiguous()?;
        Ok(t.reshape(with_leading(&[m, k], &self.in_shape))?)
    }
}
