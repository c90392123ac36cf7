//! `torch.nn.BatchNorm1d` / `BatchNorm2d` at evaluation: with the running
//! statistics μ, σ² and s = 1/√(σ² + ε) per channel c,
//!
//!   x̂ = (x − μ_c) s_c,     y = γ_c x̂ + β_c.
//!
//! The map is affine in (γ, β) over the patches x̂, one group per channel
//! (the grouped patch form of [`AffineLayer`] with O/G = I = 1 and R the
//! positions of a channel), so every curvature quantity handles it the way
//! it handles a depthwise convolution.

use std::collections::HashMap;

use super::{AffineLayer, Layer, LayerCtx, Saved};
use crate::error::Result;
use crate::spec::LayerSpec;
use crate::tensor::{self, DType, Tensor};

/// `torch.nn.BatchNorm1d` / `BatchNorm2d` in eval mode: running statistics, affine weight and bias.
pub struct BatchNorm {
    /// γ and β `(C,)`, when affine.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Tensor,
    running_var: Tensor,
    /// s = 1/√(σ² + ε) `(C,)`.
    inv_std: Tensor,
    /// ∂y/∂x = γ s (or s) `(C,)`.
    slope: Tensor,
    /// −μ s `(C,)`: x̂ = x s − μ s.
    centre_shift: Tensor,
    /// β − μ γ s (or −μ s) `(C,)`: y = x γ s + β − μ γ s, one map from x to y.
    output_shift: Tensor,
    shape: Vec<usize>,
}

/// Forward state: x̂ `(M, C, R)`.
struct BatchNormSaved {
    x_hat: Tensor,
}

impl BatchNorm {
    pub(crate) fn build(
        ctx: &LayerCtx,
        in_shape: &[usize],
        weights: &mut HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        let LayerSpec::BatchNorm { num_features, eps, affine, spatial } = *ctx.spec else {
            unreachable!("BatchNorm::build called with another spec")
        };
        let rank_ok = if spatial { in_shape.len() == 3 } else { matches!(in_shape.len(), 1 | 2) };
        if !rank_ok || in_shape[0] != num_features {
            let want = if spatial { "(C, H, W)" } else { "(C,) or (C, L)" };
            return Err(ctx.spec_err(format!(
                "its input has per-sample shape {in_shape:?}, but it needs {want} with C = num_features = {num_features}"
            )));
        }
        let c = num_features;
        let (weight, bias) = if affine {
            (Some(ctx.take_param(weights, "weight", &[c], dtype)?), Some(ctx.take_param(weights, "bias", &[c], dtype)?))
        } else {
            (None, None)
        };
        let running_mean = ctx.take_param(weights, "running_mean", &[c], dtype)?;
        let running_var = ctx.take_param(weights, "running_var", &[c], dtype)?;
        if let Some(pos) = crate::tensor::to_vec_f64(&running_var)?.iter().position(|&v| v + eps <= 0.0) {
            return Err(ctx.spec_err(format!(
                "running_var[{pos}] + eps is not positive: the channel cannot be normalized"
            )));
        }
        let inv_std = (running_var.affine(1.0, eps)?.sqrt()?.recip())?;
        let slope = match &weight {
            Some(g) => (g * &inv_std)?,
            None => inv_std.clone(),
        };
        let centre_shift = (&running_mean * &inv_std)?.neg()?;
        let output_shift = match &bias {
            Some(b) => (b - (&running_mean * &slope)?)?,
            None => (&running_mean * &slope)?.neg()?,
        };
        Ok(BatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            inv_std,
            slope,
            centre_shift,
            output_shift,
            shape: in_shape.to_vec(),
        })
    }

    fn positions(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

impl Layer for BatchNorm {
    fn type_name(&self) -> &'static str {
        if self.shape.len() == 3 {
            "BatchNorm2d"
        } else {
            "BatchNorm1d"
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        // x (M, C, *s): the channel is axis 1. Each map is one pass.
        if !save {
            // y = x γ s + (β − μ γ s).
            return Ok((tensor::channel_affine(x, 1, &self.slope, Some(&self.output_shift))?, None));
        }
        // x̂ = x s − μ s, kept as the patches; y = γ x̂ + β.
        let x_hat = tensor::channel_affine(x, 1, &self.inv_std, Some(&self.centre_shift))?;
        let y = match &self.weight {
            Some(g) => tensor::channel_affine(&x_hat, 1, g, self.bias.as_ref())?,
            None => x_hat.clone(),
        };
        let m = x.dim(0)?;
        let x_hat = x_hat.reshape((m, self.shape[0], self.positions()))?;
        Ok((y, Some(Saved::new(BatchNormSaved { x_hat }))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Jᵀ v = γ s ⊙ v per channel.
        scale_channels(v, &self.slope)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        scale_channels(x_dot, &self.slope)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        let mut p = Vec::new();
        if let Some(w) = &self.weight {
            p.push(("weight", w));
        }
        if let Some(b) = &self.bias {
            p.push(("bias", b));
        }
        p
    }

    fn buffers(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("running_mean", &self.running_mean), ("running_var", &self.running_var)]
    }

    fn affine(&self) -> Option<&dyn AffineLayer> {
        self.weight.is_some().then_some(self as &dyn AffineLayer)
    }
}

/// `t (M, K, C, ...)` times a per-channel `(C,)` vector.
fn scale_channels(t: &Tensor, per_channel: &Tensor) -> Result<Tensor> {
    tensor::channel_affine(t, 2, per_channel, None)
}

impl AffineLayer for BatchNorm {
    fn affine_dims(&self) -> (usize, usize, usize) {
        (self.shape[0], 1, self.positions())
    }

    fn groups(&self) -> usize {
        self.shape[0]
    }

    fn kron_factored(&self) -> bool {
        false
    }

    fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    fn patches(&self, saved: &Saved) -> Result<Tensor> {
        Ok(saved.get::<BatchNormSaved>().x_hat.clone())
    }

    fn tangent_patches(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // x̂̇ = s ⊙ ẋ, as (M, K, C, R).
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        let t = scale_channels(x_dot, &self.inv_std)?;
        Ok(t.reshape((m, k, self.shape[0], self.positions()))?)
    }

    fn backward_with_weights(&self, _saved: &Saved, g: &Tensor, w: &Tensor) -> Result<Tensor> {
        // Column k: (γ̇_k s) ⊙ g; w (K, C, 1).
        let m = g.dim(0)?;
        let k = w.dim(0)?;
        let (c, r) = (self.shape[0], self.positions());
        let coef = w.reshape((k, c))?.broadcast_mul(&self.inv_std.reshape((1, c))?)?; // (K, C)
        let out = g.reshape((m, 1, c, r))?.broadcast_mul(&coef.reshape((1, k, c, 1))?)?;
        let mut shape = vec![m, k];
        shape.extend_from_slice(&self.shape);
        Ok(out.reshape(shape)?)
    }
}
