//! `torch.nn.LayerNorm` and `torch.nn.RMSNorm` over the trailing
//! `normalized_shape` axes (F features) at each of the R leading positions:
//!
//!   LayerNorm: x̂ = (x − mean x) / σ,  σ = √(var x + ε)  (biased variance),
//!   RMSNorm:   x̂ = x / σ,             σ = √(mean x² + ε),
//!   y = x̂ ⊙ w + b.
//!
//! Derivatives (per position; c = 1 for LayerNorm, 0 for RMSNorm; means
//! over the F features):
//!
//!   Jᵀ u = (1/σ) (u − c·mean u − x̂ mean(u ⊙ x̂)),   u = w ⊙ v,
//!   x̂̇ = (1/σ) (ẋ − c·mean ẋ − x̂ β),                β = mean(x̂ ⊙ ẋ),
//!
//! and, for the R-operator, with h = w ⊙ g, ĥ = h − c·mean h,
//! a = mean(h ⊙ x̂), ȧ = mean(h ⊙ x̂̇):
//!
//!   Σ_i g_i ∇²_x y_i · ẋ = (1/σ) (−(β/σ) (ĥ − a x̂) − a x̂̇ − x̂ ȧ)
//!
//! (∇_x Σ h_i x̂_i = (ĥ − a x̂)/σ differentiated along ẋ, with σ̇ = β).
//!
//! That term couples the features of a position, so the Hessian's exact
//! diagonal takes Hessian-vector products here ([`Residual::Coupled`]).
//!
//! Patch form (with `elementwise_affine`): like BatchNorm, a grouped affine
//! map with one group per feature, G = O = F, I = 1, patches x̂ `(M, F, R)`,
//! the output keeping F last.

use std::collections::HashMap;

use super::flatten::with_leading;
use super::{AffineLayer, LayerCtx, Op, OutputLayout, Residual, Saved};
use crate::error::Result;
use crate::spec::{LayerSpec, NormKind};
use crate::tensor::{DType, Tensor};

/// `torch.nn.LayerNorm` or RMSNorm over the last dimension, with its weight (and bias).
pub struct Norm {
    kind: NormKind,
    eps: f64,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    shape: Vec<usize>,
    /// (R, F).
    positions: usize,
    features: usize,
}

struct NormSaved {
    /// x̂ `(M, R, F)`.
    x_hat: Tensor,
    /// 1/σ `(M, R, 1)`.
    inv_std: Tensor,
}

impl Norm {
    pub(crate) fn build(ctx: &LayerCtx, in_shape: &[usize], weights: &mut HashMap<String, Tensor>, dtype: DType) -> Result<Self> {
        let LayerSpec::Norm { kind, ref normalized_shape, eps, elementwise_affine, bias } = *ctx.spec else {
            unreachable!("Norm::build called with another spec")
        };
        let k = normalized_shape.len();
        if in_shape.len() < k || in_shape[in_shape.len() - k..] != normalized_shape[..] {
            return Err(ctx.spec_err(format!(
                "its input has per-sample shape {in_shape:?}, which does not end with normalized_shape {normalized_shape:?}"
            )));
        }
        let eps = eps.unwrap_or(if dtype == DType::F32 { f32::EPSILON as f64 } else { f64::EPSILON });
        let (weight, bias) = if elementwise_affine {
            let w = ctx.take_param(weights, "weight", normalized_shape, dtype)?;
            let b = if bias { Some(ctx.take_param(weights, "bias", normalized_shape, dtype)?) } else { None };
            (Some(w), b)
        } else {
            (None, None)
        };
        let features = normalized_shape.iter().product();
        Ok(Norm {
            kind,
            eps,
            weight,
            bias,
            shape: in_shape.to_vec(),
            positions: in_shape[..in_shape.len() - k].iter().product(),
            features,
        })
    }

    /// c of the module docs: does the op center?
    fn centers(&self) -> bool {
        self.kind == NormKind::LayerNorm
    }

    /// `t (lead…, *shape)` as `(lead…, R, F)`.
    fn split(&self, t: &Tensor, lead: usize) -> Result<Tensor> {
        let mut shape = t.dims()[..lead].to_vec();
        shape.extend([self.positions, self.features]);
        Ok(t.reshape(shape)?)
    }

    fn join(&self, t: &Tensor, lead: usize) -> Result<Tensor> {
        Ok(t.reshape(with_leading(&t.dims()[..lead], &self.shape))?)
    }

    /// mean over the feature axis (the last), kept.
    fn mean(t: &Tensor) -> Result<Tensor> {
        let f = t.dim(t.rank() - 1)?;
        Ok((t.sum_keepdim(t.rank() - 1)? / f as f64)?)
    }

    /// The weight as `(1, 1, 1, F)` for `(M, K, R, F)` tensors.
    fn w4(&self) -> Option<Result<Tensor>> {
        self.weight.as_ref().map(|w| Ok(w.reshape((1, 1, 1, self.features))?))
    }

    /// Jᵀ of the normalization x ↦ x̂ for `u (M, K, R, F)`.
    fn norm_backward(&self, s: &NormSaved, u: &Tensor) -> Result<Tensor> {
        let x_hat = s.x_hat.unsqueeze(1)?;
        let mut t = u.broadcast_sub(&Self::mean(&u.broadcast_mul(&x_hat)?)?.broadcast_mul(&x_hat)?)?;
        if self.centers() {
            t = t.broadcast_sub(&Self::mean(u)?)?;
        }
        Ok(t.broadcast_mul(&s.inv_std.unsqueeze(1)?)?)
    }

    /// x̂̇ `(M, K, R, F)` for ẋ `(M, K, R, F)` and β = mean(x̂ ⊙ ẋ).
    fn norm_jvp(&self, s: &NormSaved, x_dot: &Tensor) -> Result<(Tensor, Tensor)> {
        let x_hat = s.x_hat.unsqueeze(1)?;
        let beta = Self::mean(&x_dot.broadcast_mul(&x_hat)?)?;
        let mut t = x_dot.broadcast_sub(&x_hat.broadcast_mul(&beta)?)?;
        if self.centers() {
            t = t.broadcast_sub(&Self::mean(x_dot)?)?;
        }
        Ok((t.broadcast_mul(&s.inv_std.unsqueeze(1)?)?, beta))
    }
}

impl Op for Norm {
    fn type_name(&self) -> &'static str {
        match self.kind {
            NormKind::LayerNorm => "LayerNorm",
            NormKind::RmsNorm => "RMSNorm",
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let x = self.split(inputs[0], 1)?;
        let c = if self.centers() { x.broadcast_sub(&Self::mean(&x)?)? } else { x };
        let inv_std = (Self::mean(&c.sqr()?)? + self.eps)?.sqrt()?.recip()?;
        let x_hat = c.broadcast_mul(&inv_std)?;
        let mut y = x_hat.clone();
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(&w.reshape((1, 1, self.features))?)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.reshape((1, 1, self.features))?)?;
        }
        Ok((self.join(&y, 1)?, save.then(|| Saved::new(NormSaved { x_hat, inv_std }))))
    }

    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if !needs[0] {
            return Ok(vec![None]);
        }
        let mut u = self.split(v, 2)?;
        if let Some(w) = self.w4() {
            u = u.broadcast_mul(&w?)?;
        }
        Ok(vec![Some(self.join(&self.norm_backward(saved.get(), &u)?, 2)?)])
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let Some(t) = x_dots[0] else { return Ok(None) };
        let (mut y, _) = self.norm_jvp(saved.get(), &self.split(t, 2)?)?;
        if let Some(w) = self.w4() {
            y = y.broadcast_mul(&w?)?;
        }
        Ok(Some(self.join(&y, 2)?))
    }

    fn second_order_all(&self, saved: &Saved, g: &Tensor, x_dots: &[Option<&Tensor>], needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (Some(t), true) = (x_dots[0], needs[0]) else {
            return Ok(vec![None]);
        };
        // (1/σ)(−(β/σ)(ĥ − a x̂) − a x̂̇ − x̂ ȧ), h = w ⊙ g.
        let s: &NormSaved = saved.get();
        let mut h = self.split(g, 1)?.unsqueeze(1)?; // (M, 1, R, F)
        if let Some(w) = self.w4() {
            h = h.broadcast_mul(&w?)?;
        }
        let x_hat = s.x_hat.unsqueeze(1)?;
        let (xd_hat, beta) = self.norm_jvp(s, &self.split(t, 2)?)?;
        let h_c = if self.centers() { h.broadcast_sub(&Self::mean(&h)?)? } else { h.clone() };
        let a = Self::mean(&h.broadcast_mul(&x_hat)?)?; // (M, 1, R, 1)
        let a_dot = Self::mean(&h.broadcast_mul(&xd_hat)?)?; // (M, K, R, 1)
        let inv_std = s.inv_std.unsqueeze(1)?;
        let grad = h_c.broadcast_sub(&x_hat.broadcast_mul(&a)?)?; // σ ∇φ
        let r = grad
            .broadcast_mul(&beta.broadcast_mul(&inv_std)?)?
            .neg()?
            .broadcast_sub(&xd_hat.broadcast_mul(&a)?)?
            .broadcast_sub(&x_hat.broadcast_mul(&a_dot)?)?
            .broadcast_mul(&inv_std)?;
        Ok(vec![Some(self.join(&r, 2)?)])
    }

    fn residual(&self, _saved: &Saved, _g: &Tensor) -> Result<Residual> {
        Ok(Residual::Coupled)
    }

    fn couples_inputs(&self) -> bool {
        true
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

    fn affine(&self) -> Option<&dyn AffineLayer> {
        self.weight.is_some().then_some(self as &dyn AffineLayer)
    }
}

impl AffineLayer for Norm {
    fn affine_dims(&self) -> (usize, usize, usize) {
        (self.features, 1, self.positions)
    }

    fn groups(&self) -> usize {
        self.features
    }

    fn kron_factored(&self) -> bool {
        false
    }

    fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    fn output_layout(&self) -> OutputLayout {
        OutputLayout::ChannelsLast
    }

    fn patches(&self, saved: &Saved) -> Result<Tensor> {
        // x̂ (M, R, F) → (M, F, R).
        Ok(saved.get::<NormSaved>().x_hat.transpose(1, 2)?.contiguous()?)
    }

    fn tangent_patches(&self, saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // x̂̇ (M, K, R, F) → (M, K, F, R).
        let (t, _) = self.norm_jvp(saved.get(), &self.split(x_dot, 2)?)?;
        Ok(t.transpose(2, 3)?.contiguous()?)
    }

    fn backward_with_weights(&self, saved: &Saved, g: &Tensor, w: &Tensor) -> Result<Tensor> {
        // Column k: the normalization's Jᵀ of ẇ_k ⊙ g; w (K, F, 1).
        let k = w.dim(0)?;
        let u = self.split(g, 1)?.unsqueeze(1)?.broadcast_mul(&w.reshape((1, k, 1, self.features))?)?;
        self.join(&self.norm_backward(saved.get(), &u)?, 2)
    }
}
