//! Layers and graph ops: one file per `torch.nn` class (or family), each
//! knowing its forward pass, what that pass must save, and how to pull a
//! batch of output sensitivities back to its inputs.
//!
//! The engine sees every node of a model as an [`Op`] over all of its
//! inputs. Ops with one input (nearly all of them) implement the simpler
//! [`Layer`] trait and get [`Op`] from it; ops that read several values
//! (`add`, `mul`, `cat`) implement [`Op`] directly.
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
mod adaptive_pool;
mod attention;
mod batchnorm;
mod conv2d;
mod discrete;
mod embedding;
mod flatten;
mod gather;
mod graph_ops;
mod identity;
mod linear;
mod masking;
mod norm;
mod patches;
mod pointwise;
mod pool;

use std::any::Any;
use std::collections::HashMap;

use crate::error::Result;
use crate::spec::{LayerSpec, NodeSpec, OpSpec};
use crate::tensor::{DType, Device, Tensor};

pub use activation::Elementwise;
pub use conv2d::Conv2d;
pub use embedding::Embedding;
pub use norm::Norm;
pub use flatten::Flatten;
pub use identity::Identity;
pub use linear::Linear;
pub use pool::{AvgPool2d, MaxPool2d};
pub use adaptive_pool::AdaptiveAvgPool2d;
pub use batchnorm::BatchNorm;

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

/// An op with one input: a layer of a Sequential, or a unary graph node.
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

    /// Other state-dict tensors the layer reads (running statistics).
    fn buffers(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }

    /// The patch form, for layers with parameters.
    fn affine(&self) -> Option<&dyn AffineLayer> {
        None
    }

    /// Parameter-free and linear in the input (reshapes, slices, identities)?
    fn linear_map(&self) -> bool {
        false
    }
}

/// The second-order term of an op for the Hessian's exact diagonal.
pub enum Residual {
    /// Linear in its inputs almost everywhere: no term.
    None,
    /// Σ_i g_i ∇²_x y_i is diagonal, given as `(M, *in)`.
    Diagonal(Tensor),
    /// The term couples different inputs (a product of two values); the
    /// diagonal is computed from Hessian-vector products instead.
    Coupled,
}

/// One node of a model graph, as the engine sees it: a map from its input
/// values `(M, *in_j)` to one output `(M, *out)`.
pub trait Op: Send + Sync {
    /// The op's name as the spec spells it (`Linear`, `Conv2d`, `add`, ...).
    fn type_name(&self) -> &'static str;

    /// Per-sample output shape.
    fn out_shape(&self) -> &[usize];

    /// Forward pass of a batch; with `save`, also what the backward passes need.
    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)>;

    /// `Jⱼᵀ v` for every input j with `needs[j]` (`None` for the others), for
    /// output sensitivities `v (M, K, *out)`.
    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>>;

    /// Σ_j Jⱼ ẋⱼ for input tangents `(M, K, *in_j)` (`None`: zero tangent);
    /// `None` when every tangent is zero.
    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>>;

    /// The R-operator's second-order term for the output gradient `g (M, *out)`:
    /// for every input j with `needs[j]`, Σ_l (Σ_i g_i ∂²y_i/∂xⱼ∂x_l) ẋ_l
    /// `(M, K, *in_j)`. None for ops linear in their inputs (the default).
    fn second_order_all(
        &self,
        _saved: &Saved,
        _g: &Tensor,
        x_dots: &[Option<&Tensor>],
        _needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None; x_dots.len()])
    }

    /// The second-order term as the Hessian diagonal needs it (default: none).
    fn residual(&self, _saved: &Saved, _g: &Tensor) -> Result<Residual> {
        Ok(Residual::None)
    }

    /// Trainable tensors (roles and tensors), in `parameters()` order.
    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }

    /// Other tensors the op reads from the state dict (running statistics).
    fn buffers(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }

    /// The patch form, for ops with parameters.
    fn affine(&self) -> Option<&dyn AffineLayer> {
        None
    }

    /// Is the op parameter-free and linear in its input, so that the last
    /// Linear layer's output may pass through it (reshape, slice, select)?
    fn is_linear_map(&self) -> bool {
        false
    }

    /// Does the op's second-order term couple different inputs (a product
    /// or quotient of two values)? See [`Residual::Coupled`].
    fn couples_inputs(&self) -> bool {
        false
    }
}

impl<T: Layer> Op for T {
    fn type_name(&self) -> &'static str {
        Layer::type_name(self)
    }

    fn out_shape(&self) -> &[usize] {
        Layer::out_shape(self)
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        self.forward(inputs[0], save)
    }

    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![if needs[0] { Some(self.backward(saved, v)?) } else { None }])
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        x_dots[0].map(|t| self.jvp_input(saved, t)).transpose()
    }

    fn second_order_all(
        &self,
        saved: &Saved,
        g: &Tensor,
        x_dots: &[Option<&Tensor>],
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        // Unary: diag(r) ẋ with r = Σ_i g_i ∇²_x y_i.
        let (Some(t), true) = (x_dots[0], needs[0]) else {
            return Ok(vec![None]);
        };
        match self.input_residual(saved, g)? {
            Some(r) => Ok(vec![Some(t.broadcast_mul(&r.unsqueeze(1)?)?)]),
            None => Ok(vec![None]),
        }
    }

    fn residual(&self, saved: &Saved, g: &Tensor) -> Result<Residual> {
        Ok(match self.input_residual(saved, g)? {
            Some(r) => Residual::Diagonal(r),
            None => Residual::None,
        })
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        Layer::params(self)
    }

    fn buffers(&self) -> Vec<(&'static str, &Tensor)> {
        Layer::buffers(self)
    }

    fn affine(&self) -> Option<&dyn AffineLayer> {
        Layer::affine(self)
    }

    fn is_linear_map(&self) -> bool {
        self.linear_map()
    }
}

/// A layer that is affine in its parameters over "patches" of its input:
///
/// ```text
///   z[n, o, r] = Σ_i W[o, i] · U[n, i, r] + b[o],
/// ```
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
///
/// *Grouped* layers (grouped and depthwise Conv2d, BatchNorm's per-channel
/// scale) split the O outputs and the patch rows into G equal groups that
/// do not mix: W `(O, I)` holds G stacked blocks `(O/G, I)`, U `(M, G·I, R)`
/// holds the G groups' patches one after the other, and
///
///   z[n, g·O/G + o, r] = Σ_i W[g·O/G + o, i] · U[n, g·I + i, r] + b[·].
///
/// With G = 1 this is the plain form above.
pub trait AffineLayer {
    /// (O, I, R), I the patch length of one group.
    fn affine_dims(&self) -> (usize, usize, usize);

    /// The number of groups G (1 unless grouped).
    fn groups(&self) -> usize {
        1
    }

    /// Does KFAC factor the weight as `[B, A]` (Linear, Conv2d)? Otherwise
    /// each of the layer's tensors is a block holding its exact diagonal.
    fn kron_factored(&self) -> bool {
        true
    }

    /// Whether the layer has a bias parameter.
    fn has_bias(&self) -> bool;

    /// For one-hot patches (Embedding): the index of every (sample,
    /// position), so that the diagonal and KFAC (whose input factor is then
    /// diagonal, kept as a 1-D factor) never form U `(M, V, R)`.
    fn one_hot<'s>(&self, _saved: &'s Saved) -> Option<OneHot<'s>> {
        None
    }

    /// Where the output `(M, *out)` keeps the patch form's O axis.
    fn output_layout(&self) -> OutputLayout {
        OutputLayout::ChannelsFirst
    }

    /// How the weight tensor (and θ) stores W `(O, I)`.
    fn weight_layout(&self) -> WeightLayout {
        WeightLayout::OutIn
    }

    /// The patches U `(M, G·I, R)` of the batch this `saved` came from.
    fn patches(&self, saved: &Saved) -> Result<Tensor>;

    /// The patches of input tangents `x_dot (M, K, *in)`: `(M, K, G·I, R)`.
    fn tangent_patches(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor>;

    /// The output gradient `g (M, *out)` pulled back to `(M, K, *in)`
    /// through the layer with weight `w[k]` `(K, O, I)` in place of its own
    /// (and no bias),
    /// one column per k (the mixed parameter-input term V_Wᵀ g of
    /// Hessian-vector products).
    fn backward_with_weights(&self, _saved: &Saved, g: &Tensor, w: &Tensor) -> Result<Tensor>;
}

/// One-hot patches: U[n, v, r] = [ids[n·R + r] = Some(v)].
pub struct OneHot<'s> {
    /// Per (sample, position), row-major; `None` for a position with no
    /// gradient (padding_idx).
    pub ids: &'s [Option<usize>],
    /// V, the vocabulary size (rows of the embedding table).
    pub vocab: usize,
    /// R, positions per sample.
    pub positions: usize,
}

/// Where an affine layer's output keeps the O axis of its patch form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputLayout {
    /// `(O, *positions)`: Conv2d, BatchNorm, Linear on a vector (R = 1).
    ChannelsFirst,
    /// `(*positions, O)`: Linear over a sequence `(T, D)`, LayerNorm, Embedding.
    ChannelsLast,
}

pub use crate::spec::WeightLayout;

/// Output sensitivities `(M, K, *out)` in patch form `(M, K, O, R)`.
pub(crate) fn to_patch_form(aff: &dyn AffineLayer, v: &Tensor) -> Result<Tensor> {
    let (o, _, r) = aff.affine_dims();
    let (m, k) = (v.dim(0)?, v.dim(1)?);
    Ok(match aff.output_layout() {
        OutputLayout::ChannelsFirst => v.reshape((m, k, o, r))?,
        OutputLayout::ChannelsLast => v.reshape((m, k, r, o))?.transpose(2, 3)?.contiguous()?,
    })
}

/// The inverse of [`to_patch_form`]: `(M, K, O, R)` as `(M, K, *out)`.
pub(crate) fn from_patch_form(aff: &dyn AffineLayer, t: &Tensor, out_shape: &[usize]) -> Result<Tensor> {
    let (m, k) = (t.dim(0)?, t.dim(1)?);
    let shape = [&[m, k][..], out_shape].concat();
    Ok(match aff.output_layout() {
        OutputLayout::ChannelsFirst => t.reshape(shape)?,
        OutputLayout::ChannelsLast => t.transpose(2, 3)?.contiguous()?.reshape(shape)?,
    })
}

/// Builds the op of `node` for the per-sample shapes of its inputs, taking
/// its tensors out of `weights`.
pub(crate) fn build(
    node: &NodeSpec,
    label: &str,
    in_shapes: &[&[usize]],
    weights: &mut HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Op>> {
    let spec = match &node.op {
        OpSpec::Module(l) => l,
        other => return graph_ops::build(other, label, in_shapes, dtype, device),
    };
    let ctx = LayerCtx {
        label,
        node,
        spec,
        device,
    };
    let in_shape = in_shapes[0];
    Ok(match spec {
        LayerSpec::Linear { .. } => Box::new(Linear::build(&ctx, in_shape, weights, dtype)?),
        LayerSpec::Conv2d { .. } => Box::new(Conv2d::build(&ctx, in_shape, weights, dtype)?),
        LayerSpec::BatchNorm { .. } => Box::new(BatchNorm::build(&ctx, in_shape, weights, dtype)?),
        LayerSpec::Embedding { .. } => Box::new(Embedding::build(&ctx, in_shape, weights, dtype)?),
        LayerSpec::Norm { .. } => Box::new(Norm::build(&ctx, in_shape, weights, dtype)?),
        LayerSpec::Flatten { .. } => Box::new(Flatten::build(&ctx, in_shape)?),
        LayerSpec::Identity => Box::new(Identity::new(in_shape)),
        LayerSpec::Activation(a) => Box::new(Elementwise::new(*a, in_shape)),
        LayerSpec::MaxPool2d { .. } => Box::new(MaxPool2d::build(&ctx, in_shape)?),
        LayerSpec::AvgPool2d { .. } => Box::new(AvgPool2d::build(&ctx, in_shape)?),
        LayerSpec::AdaptiveAvgPool2d { .. } => Box::new(AdaptiveAvgPool2d::build(&ctx, in_shape)?),
    })
}

/// Which node is being built, for error messages and state-dict names.
pub(crate) struct LayerCtx<'a> {
    /// "layer 3 (Conv2d)" or "node \"conv1\" (Conv2d)".
    pub label: &'a str,
    pub node: &'a NodeSpec,
    pub spec: &'a LayerSpec,
    pub device: &'a Device,
}

impl LayerCtx<'_> {
    /// "layer 3 (Conv2d): {msg}" as a spec error.
    pub fn spec_err(&self, msg: impl std::fmt::Display) -> crate::Error {
        crate::Error::Spec(format!("{}: {msg}", self.label))
    }

    /// Take the tensor in `role` of this node out of `weights`, checking its
    /// shape and converting it to the compute dtype.
    pub fn take_param(
        &self,
        weights: &mut HashMap<String, Tensor>,
        role: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let Some(key) = self.node.param_key(role) else {
            return Err(crate::Error::Spec(format!(
                "{}: no tensor is named for its {role} (give \"params\": {{\"{role}\": ...}} or a \"module\")",
                self.label
            )));
        };
        let Some(t) = weights.remove(&key) else {
            return Err(crate::Error::Weights(format!(
                "missing tensor {key:?} (the {role} of {}, shape {shape:?})",
                self.label
            )));
        };
        if t.dims() != shape {
            return Err(crate::Error::Weights(format!(
                "tensor {key:?} has shape {:?}, but {} needs {shape:?}",
                t.dims(),
                self.label
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
