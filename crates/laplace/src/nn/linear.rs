//! `torch.nn.Linear`: z = W a + b, W `(out, in)`.

use std::collections::HashMap;

use super::{AffineLayer, Layer, LayerCtx, Saved};
use crate::error::Result;
use crate::spec::LayerSpec;
use crate::tensor::{DType, Tensor};

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    out_shape: [usize; 1],
}

/// Forward state: the layer input a `(M, in)`, which is also its patches.
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
        } = *ctx.spec
        else {
            unreachable!("Linear::build called with another spec")
        };
        if in_shape != [in_features] {
            return Err(ctx.spec_err(format!(
                "its input has per-sample shape {in_shape:?}, but in_features = {in_features} \
                 needs [{in_features}] (add a Flatten before it?)"
            )));
        }
        let weight = ctx.take_param(weights, "weight", &[out_features, in_features], dtype)?;
        let bias = if bias {
            Some(ctx.take_param(weights, "bias", &[out_features], dtype)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            out_shape: [out_features],
        })
    }

    /// The weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
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
        // z = x Wᵀ + b for the batch x (M, in).
        let mut z = x.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            z = z.broadcast_add(b)?;
        }
        let saved = save.then(|| Saved::new(LinearSaved { input: x.clone() }));
        Ok((z, saved))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Jᵀ v = Wᵀ v for every column: (M, K, out) @ (out, in) → (M, K, in).
        let (m, k, o) = v.dims3()?;
        let vin = v.reshape((m * k, o))?.matmul(&self.weight)?;
        Ok(vin.reshape((m, k, self.weight.dim(1)?))?)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // J ẋ = W ẋ for every column.
        let (m, k, i) = x_dot.dims3()?;
        let out = x_dot.reshape((m * k, i))?.matmul(&self.weight.t()?)?;
        Ok(out.reshape((m, k, self.out_shape[0]))?)
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
        let (o, i) = self.weight.dims2().expect("weight is 2-D");
        (o, i, 1)
    }

    fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    fn patches(&self, saved: &Saved) -> Result<Tensor> {
        let a = &saved.get::<LinearSaved>().input;
        let (m, i) = a.dims2()?;
        Ok(a.reshape((m, i, 1))?)
    }

    fn tangent_patches(&self, x_dot: &Tensor) -> Result<Tensor> {
        Ok(x_dot.unsqueeze(3)?)
    }

    fn backward_with_weights(&self, g: &Tensor, w: &Tensor) -> Result<Tensor> {
        // Column k: g W_k, (M, O) @ (K, O, I) → (K, M, I).
        let k = w.dim(0)?;
        Ok(g.broadcast_left(k)?.matmul(w)?.transpose(0, 1)?.contiguous()?)
    }
}
