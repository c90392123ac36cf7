//! Layers: one file per `torch.nn` class (or family), each knowing its
//! forward pass, what that pass must save, and how to pull a batch of output
//! sensitivities back to its input.
//!
//! Shapes: a batch of M inputs is `(M, *in)`; a batch of sensitivities
//! carries an extra column axis K right after the batch axis,
//! `(M, K, *out)`: K = C columns of an identity (Jacobians), of √Λ (GGN),
//! S Monte-Carlo samples (Fisher) or 1 gradient (EF, per-sample gradients).
//!
//! Layers with parameters expose them in *patch form* through
//! [`AffineLayer`]; the curvature quantities in [`crate::curvature`] are
//! written once against that form, so a new quantity does not touch the
//! layers and a new layer does not touch the quantities.

mod activation;
mod conv2d;
mod flatten;
mod identity;
mod linear;
mod patches;
mod pool;

use std::any::Any;
use std::collections::HashMap;

use crate::error::Result;
use crate::spec::LayerSpec;
use crate::tensor::{DType, Device, Tensor};

pub use activation::Elementwise;
pub use conv2d::Conv2d;
pub use flatten::Flatten;
pub use identity::Identity;
pub use linear::Linear;
pub use pool::{AvgPool2d, MaxPool2d};

/// What a layer's forward pass saved for its backward pass. Each layer
/// stores its own type and downcasts it back.
pub struct Saved(Box<dyn Any + Send + Sync>);

impl Saved {
    pub(crate) fn new<T: Any + Send + Sync>(value: T) -> Self {
        Saved(Box::new(value))
    }

    pub(crate) fn get<T: Any>(&self) -> &T {
        self.0
            .downcast_ref::<T>()
            .expect("a layer received the saved state of another layer type")
    }
}

/// One layer of a [`crate::Sequential`].
pub trait Layer: Send + Sync {
    /// The `torch.nn` class name, for messages.
    fn type_name(&self) -> &'static str;

    /// Per-sample output shape.
    fn out_shape(&self) -> &[usize];

    /// Forward pass of a batch `(M, *in) → (M, *out)`. With `save`, also
    /// returns what [`Layer::backward`] needs.
    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)>;

    /// Pull sensitivities back through the layer: `v (M, K, *out)` becomes
    /// `(M, K, *in)` with column `[n, k]` equal to `J_nᵀ v[n, k]`, J_n the
    /// Jacobian of the layer's output with respect to its input at sample n.
    fn backward(&self, saved: &Saved, v: &Tensor) -> Result<Tensor>;

    /// Forward-mode derivative with respect to the input: output tangents
    /// `(M, K, *out)` = J_n ẋ[n, k] for input tangents `x_dot (M, K, *in)`.
    fn jvp_input(&self, saved: &Saved, x_dot: &Tensor) -> Result<Tensor>;

    /// The second-order term of the input-output map for an output
    /// gradient g `(M, *out)`: r = Σ_i g_i ∇²_x y_i, when it is diagonal,
    /// as `(M, *in)`. `None` for layers linear in their input almost
    /// everywhere (affine layers, pooling, ReLU and LeakyReLU: their second
    /// derivative is zero except on a set of measure zero, where it does
    /// not exist).
    fn input_residual(&self, _saved: &Saved, _g: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Trainable tensors in PyTorch `parameters()` order, with their names
    /// within the layer ("weight", "bias").
    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }

    /// The patch form, for layers with parameters.
    fn affine(&self) -> Option<&dyn AffineLayer> {
        None
    }
}

/// A layer that is affine in its parameters over "patches" of its input:
///
///   z[n, o, r] = Σ_i W[o, i] · U[n, i, r] + b[o],
///
/// with W the weight flattened to `(O, I)` row-major (exactly PyTorch's
/// flattening) and U `(M, I, R)` the patches: the input itself for Linear
/// (R = 1), the unfolded receptive fields for Conv2d (R = output positions).
/// The output `(M, *out)` is z reshaped, so output sensitivities
/// `(M, K, *out)` reshape to `(M, K, O, R)`.
///
/// Everything a first-order curvature quantity needs of the parameters
/// follows from U and the output sensitivities V:
/// per-sample gradient of column k, `∂/∂W = V[n, k] U[n]ᵀ` and
/// `∂/∂b = Σ_r V[n, k, :, r]`.
pub trait AffineLayer {
    /// (O, I, R).
    fn affine_dims(&self) -> (usize, usize, usize);

    fn has_bias(&self) -> bool;

    /// The patches U `(M, I, R)` of the batch this `saved` came from.
    fn patches(&self, saved: &Saved) -> Result<Tensor>;

    /// The patches of input tangents `x_dot (M, K, *in)`: `(M, K, I, R)`.
    fn tangent_patches(&self, x_dot: &Tensor) -> Result<Tensor>;

    /// The output gradient `g (M, *out)` pulled back to `(M, K, *in)`
    /// through the layer with weight `w[k]` `(K, O, I)` in place of its own,
    /// one column per k (the mixed parameter-input term V_Wᵀ g of
    /// Hessian-vector products).
    fn backward_with_weights(&self, g: &Tensor, w: &Tensor) -> Result<Tensor>;
}

/// Builds the layer at `index` for per-sample input shape `in_shape`,
/// taking its parameters out of `weights` (keys `"{index}.weight"`, ...).
pub(crate) fn build(
    index: usize,
    spec: &LayerSpec,
    in_shape: &[usize],
    weights: &mut HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Layer>> {
    let ctx = LayerCtx {
        index,
        spec,
        device,
    };
    Ok(match spec {
        LayerSpec::Linear { .. } => Box::new(Linear::build(&ctx, in_shape, weights, dtype)?),
        LayerSpec::Conv2d { .. } => Box::new(Conv2d::build(&ctx, in_shape, weights, dtype)?),
        LayerSpec::Flatten { .. } => Box::new(Flatten::build(&ctx, in_shape)?),
        LayerSpec::Identity => Box::new(Identity::new(in_shape)),
        LayerSpec::Activation(a) => Box::new(Elementwise::new(*a, in_shape)),
        LayerSpec::MaxPool2d { .. } => Box::new(MaxPool2d::build(&ctx, in_shape)?),
        LayerSpec::AvgPool2d { .. } => Box::new(AvgPool2d::build(&ctx, in_shape)?),
    })
}

/// Which layer is being built, for error messages.
pub(crate) struct LayerCtx<'a> {
    pub index: usize,
    pub spec: &'a LayerSpec,
    pub device: &'a Device,
}

impl LayerCtx<'_> {
    /// "layer 3 (Conv2d): {msg}" as a spec error.
    pub fn spec_err(&self, msg: impl std::fmt::Display) -> crate::Error {
        crate::Error::Spec(format!(
            "layer {} ({}): {msg}",
            self.index,
            self.spec.type_name()
        ))
    }

    /// Take parameter `name` of this layer out of `weights`, checking its shape
    /// and converting it to the compute dtype.
    pub fn take_param(
        &self,
        weights: &mut HashMap<String, Tensor>,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let key = format!("{}.{name}", self.index);
        let Some(t) = weights.remove(&key) else {
            return Err(crate::Error::Weights(format!(
                "missing tensor {key:?} (the {name} of layer {} ({}), shape {shape:?})",
                self.index,
                self.spec.type_name()
            )));
        };
        if t.dims() != shape {
            return Err(crate::Error::Weights(format!(
                "tensor {key:?} has shape {:?}, but layer {} ({}) needs {shape:?}",
                t.dims(),
                self.index,
                self.spec.type_name()
            )));
        }
        if !crate::tensor::is_compute_dtype(t.dtype()) {
            return Err(crate::Error::Weights(format!(
                "tensor {key:?} has dtype {}, expected f32 or f64",
                crate::tensor::dtype_name(t.dtype())
            )));
        }
        if let Some(pos) = crate::tensor::first_non_finite(&t)? {
            return Err(crate::Error::Weights(format!(
                "tensor {key:?} holds a non-finite value at index {:?}",
                crate::tensor::unravel(pos, shape)
            )));
        }
        Ok(t.to_dtype(dtype)?.to_device(self.device)?)
    }
}

/// Merge the batch and column axes: `(M, K, *rest) → (M·K, *rest)`.
pub(crate) fn merge_mk(v: &Tensor) -> Result<Tensor> {
    let d = v.dims();
    let mut shape = vec![d[0] * d[1]];
    shape.extend_from_slice(&d[2..]);
    Ok(v.reshape(shape)?)
}

/// Split the batch and column axes again: `(M·K, *rest) → (M, K, *rest)`.
pub(crate) fn split_mk(v: &Tensor, m: usize, k: usize) -> Result<Tensor> {
    let d = v.dims();
    let mut shape = vec![m, k];
    shape.extend_from_slice(&d[1..]);
    Ok(v.reshape(shape)?)
}
