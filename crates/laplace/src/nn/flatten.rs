//! `torch.nn.Flatten(start_dim, end_dim)`: a reshape, so its backward pass
//! is the inverse reshape.

use super::{Layer, LayerCtx, Saved};
use crate::error::Result;
use crate::spec::LayerSpec;
use crate::tensor::Tensor;

/// `torch.nn.Flatten`: dimensions `start_dim..=end_dim` merged.
pub struct Flatten {
    in_shape: Vec<usize>,
    out_shape: Vec<usize>,
}

impl Flatten {
    pub(crate) fn build(ctx: &LayerCtx, in_shape: &[usize]) -> Result<Self> {
        let LayerSpec::Flatten { start_dim, end_dim } = *ctx.spec else {
            unreachable!("Flatten::build called with another spec")
        };
        // Dimensions count the batch axis, as in torch: rank = 1 + per-sample rank.
        let rank = in_shape.len() as i64 + 1;
        let norm = |d: i64| if d < 0 { d + rank } else { d };
        let (s, e) = (norm(start_dim), norm(end_dim));
        if s < 1 || e >= rank || s > e {
            return Err(ctx.spec_err(format!(
                "start_dim = {start_dim}, end_dim = {end_dim} do not select per-sample dimensions \
                 of an input of per-sample shape {in_shape:?} (the batch dimension 0 cannot be flattened)"
            )));
        }
        let (s, e) = (s as usize - 1, e as usize - 1);
        let mut out_shape = in_shape[..s].to_vec();
        out_shape.push(in_shape[s..=e].iter().product());
        out_shape.extend_from_slice(&in_shape[e + 1..]);
        Ok(Flatten {
            in_shape: in_shape.to_vec(),
            out_shape,
        })
    }
}

/// `leading` axes followed by `shape`.
pub(crate) fn with_leading(leading: &[usize], shape: &[usize]) -> Vec<usize> {
    leading.iter().chain(shape).copied().collect()
}

impl Layer for Flatten {
    fn type_name(&self) -> &'static str {
        "Flatten"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        let y = x.reshape(with_leading(&x.dims()[..1], &self.out_shape))?;
        Ok((y, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        Ok(v.reshape(with_leading(&v.dims()[..2], &self.in_shape))?)
    }

    fn linear_map(&self) -> bool {
        true
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        Ok(x_dot.reshape(with_leading(&x_dot.dims()[..2], &self.out_shape))?)
    }
}
