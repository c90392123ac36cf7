//! `torch.nn.Identity`, and `Dropout` at evaluation time (curvature is
//! computed for the deterministic network).

use super::{Layer, Saved};
use crate::error::Result;
use crate::tensor::Tensor;

/// `torch.nn.Identity` (and `Dropout` in eval mode): the input unchanged.
pub struct Identity {
    shape: Vec<usize>,
}

impl Identity {
    pub(crate) fn new(shape: &[usize]) -> Self {
        Identity {
            shape: shape.to_vec(),
        }
    }
}

impl Layer for Identity {
    fn type_name(&self) -> &'static str {
        "Identity"
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((x.clone(), save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        Ok(v.clone())
    }

    fn linear_map(&self) -> bool {
        true
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        Ok(x_dot.clone())
    }
}
