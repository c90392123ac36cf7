//! The propagation engine, in the style of BackPACK.
//!
//! A forward pass runs the network and keeps, for the layers from `first`
//! on, what each needs for its backward pass (a [`Tape`]). A backward pass
//! starts from a batch of output sensitivities `V (M, K, C)` and pulls it
//! back layer by layer, `V ← J_layerᵀ V`, stopping at `first`. At every
//! layer with parameters it hands the visitor the layer's patches U and its
//! output sensitivities reshaped to `(M, K, O, R)`; the visitor turns them
//! into that layer's share of a quantity (per-sample gradients, a diagonal,
//! Kronecker factors). Nothing of size (M, C, P) is ever formed here.

use crate::error::Result;
use crate::model::Sequential;
use crate::nn::{AffineLayer, Saved};
use crate::tensor::Tensor;

/// What a forward pass kept for the backward pass.
pub struct Tape {
    saved: Vec<Option<Saved>>,
    first: usize,
    /// The network output f `(M, C)`.
    pub output: Tensor,
}

impl Tape {
    /// What layer `i` saved (`i ≥ first`).
    pub fn saved(&self, i: usize) -> &Saved {
        self.saved[i]
            .as_ref()
            .expect("the tape saves every layer from `first` on")
    }

    /// The first layer with saved state.
    pub fn first(&self) -> usize {
        self.first
    }
}

/// One parameterized layer as the backward pass meets it.
pub struct AffineView<'a> {
    pub layer: usize,
    pub affine: &'a dyn AffineLayer,
    /// Patches `(M, I, R)`.
    pub patches: Tensor,
    /// Output sensitivities `(M, K, O, R)`.
    pub sensitivities: Tensor,
}

/// Run the network on `x (M, *input_shape)`, saving state for layers `first..`.
pub fn forward(model: &Sequential, x: &Tensor, first: usize) -> Result<Tape> {
    model.check_input(x)?;
    let mut h = x.clone();
    let mut saved = Vec::with_capacity(model.layers().len());
    for (i, layer) in model.layers().iter().enumerate() {
        let (out, s) = layer.forward(&h, i >= first)?;
        saved.push(s);
        h = out;
    }
    Ok(Tape {
        saved,
        first,
        output: h,
    })
}

/// Pull `v (M, K, C)` back from the output to layer `tape.first`, calling
/// `visit` at every layer with parameters, last layer first.
pub fn backward(
    model: &Sequential,
    tape: &Tape,
    v: Tensor,
    mut visit: impl FnMut(AffineView<'_>) -> Result<()>,
) -> Result<()> {
    let (m, k) = (v.dim(0)?, v.dim(1)?);
    let mut v = v;
    for i in (tape.first..model.layers().len()).rev() {
        let layer = &model.layers()[i];
        let saved = tape.saved[i]
            .as_ref()
            .expect("the tape saves every layer from `first` on");
        if let Some(affine) = layer.affine() {
            let (o, _, r) = affine.affine_dims();
            visit(AffineView {
                layer: i,
                affine,
                patches: affine.patches(saved)?,
                sensitivities: v.reshape((m, k, o, r))?,
            })?;
        }
        if i > tape.first {
            v = layer.backward(saved, &v)?;
        }
    }
    Ok(())
}
