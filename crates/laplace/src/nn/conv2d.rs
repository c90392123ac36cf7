//! `torch.nn.Conv2d` as a matrix product over unfolded receptive fields:
//! z[:, r] = W U[:, r] + b with W `(out_c, in_c/g·kh·kw)`. With g groups
//! (depthwise: g = in_c) the product is block diagonal: group j's outputs
//! read only the rows of its in_c/g input channels, which are the j-th
//! block of the im2col rows (the grouped patch form of [`AffineLayer`]).
//! A depthwise layer computes its forward passes that keep no patches, its
//! tangents and its backward pass directly instead ([`Depthwise`]); only a
//! pass that needs the patches for the weight's curvature unfolds.

use std::collections::HashMap;

use super::patches::{check_window_size, window_table, Window};
use super::{merge_mk, split_mk, AffineLayer, Layer, LayerCtx, Saved};
use crate::error::Result;
use crate::spec::{LayerSpec, Padding};
use crate::tensor::{DType, Depthwise, Mm, Tensor, WindowTable};

/// Elements of Wᵀ V per chunk of the backward pass (4 MiB in f32: the
/// product's output is still in cache when col2im reads it).
const COL2IM_CHUNK: usize = 1 << 20;

/// `torch.nn.Conv2d`: weight `(O, I/groups, kh, kw)`, optional bias `(O,)`.
pub struct Conv2d {
    /// The weight as PyTorch stores it, `(O, in_c, kh, kw)`.
    weight4: Tensor,
    /// The same weight flattened to `(O, I)`, I = in_c/g·kh·kw.
    weight: Tensor,
    groups: usize,
    bias: Option<Tensor>,
    /// im2col table: outer = I patch rows, inner = R positions.
    index: WindowTable,
    in_shape: [usize; 3],
    out_shape: [usize; 3],
    /// With one input channel per group: the direct kernel and its
    /// transpose, for passes that keep no patches and for Jᵀ v (see
    /// [`Depthwise`]).
    depthwise: Option<Depthwise>,
}

/// Forward state: the unfolded input in the layout the forward pass made it,
/// `(I, M, R)`; [`AffineLayer::patches`] hands out the `(M, I, R)` view
/// without copying (matrix products take strided operands), and KFAC's
/// Σ U Uᵀ is one product of the `(I, M·R)` matrix with itself.
struct ConvSaved {
    patches_imr: Tensor,
}

impl Conv2d {
    pub(crate) fn build(
        ctx: &LayerCtx,
        in_shape: &[usize],
        weights: &mut HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        let LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
        } = *ctx.spec
        else {
            unreachable!("Conv2d::build called with another spec")
        };
        let &[c, h, w] = in_shape else {
            return Err(ctx.spec_err(format!(
                "its input has per-sample shape {in_shape:?}, but Conv2d needs (channels, height, width)"
            )));
        };
        if c != in_channels {
            return Err(ctx.spec_err(format!(
                "its input has {c} channels (shape {in_shape:?}), but in_channels = {in_channels}"
            )));
        }
        // (before, after) padding per axis; "same" may be asymmetric, as in torch.
        let pads: [[usize; 2]; 2] = match padding {
            Padding::Explicit(p) => [[p[0], p[0]], [p[1], p[1]]],
            Padding::Valid => [[0, 0], [0, 0]],
            Padding::Same => std::array::from_fn(|a| {
                let total = dilation[a] * (kernel_size[a] - 1);
                [total / 2, total - total / 2]
            }),
        };
        let mut out_hw = [0; 2];
        for a in 0..2 {
            let n = [h, w][a];
            out_hw[a] = Window::out_len(n, kernel_size[a], stride[a], pads[a][0], pads[a][1], dilation[a], false)
                .ok_or_else(|| {
                    ctx.spec_err(format!(
                        "input {h}×{w} (padded by {pads:?}) is smaller than the dilated kernel {kernel_size:?} \
                         (dilation {dilation:?})"
                    ))
                })?;
        }
        let window = Window {
            in_hw: [h, w],
            kernel: kernel_size,
            stride,
            pad_before: [pads[0][0], pads[1][0]],
            dilation,
            out_hw,
        };
        check_window_size(ctx, &window, c)?;
        let wshape = [out_channels, in_channels / groups, kernel_size[0], kernel_size[1]];
        let weight4 = ctx.take_param(weights, "weight", &wshape, dtype)?;
        let weight = weight4.reshape((out_channels, ()))?;
        let bias = if bias {
            Some(ctx.take_param(weights, "bias", &[out_channels], dtype)?)
        } else {
            None
        };
        let index = window_table(&window, c, ctx.device)?;
        let depthwise = (in_channels == groups).then_some(Depthwise {
            channels: c,
            out_channels,
            in_hw: window.in_hw,
            kernel: window.kernel,
            stride: window.stride,
            pad_before: window.pad_before,
            dilation: window.dilation,
            out_hw: window.out_hw,
        });
        Ok(Conv2d {
            depthwise,
            weight4,
            weight,
            groups,
            bias,
            index,
            in_shape: [c, h, w],
            out_shape: [out_channels, out_hw[0], out_hw[1]],
        })
    }

    fn positions(&self) -> usize {
        self.out_shape[1] * self.out_shape[2]
    }

    /// The weight flattened to `(O, in_c/g·kh·kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// W X for W `(O, I)` in G blocks `(O/G, I)` and X `(G·I, N)`: block j of
/// the result's rows is W_j X_j, `(O, N)`.
fn group_mm(w: &Tensor, x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(w.mm(x)?);
    }
    let (o, i) = w.dims2()?;
    let n = x.dim(1)?;
    let y = w.reshape((groups, o / groups, i))?.mm(&x.reshape((groups, i, n))?)?;
    Ok(y.reshape((o, n))?)
}

/// Wᵀ Y per group for Y `(O, N)`: `(G·I, N)`.
fn group_mm_t(w: &Tensor, y: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(w.t()?.mm(y)?);
    }
    let (o, i) = w.dims2()?;
    let n = y.dim(1)?;
    let wt = w.reshape((groups, o / groups, i))?.transpose(1, 2)?;
    Ok(wt.mm(&y.reshape((groups, o / groups, n))?)?.reshape((groups * i, n))?)
}

impl Layer for Conv2d {
    fn type_name(&self) -> &'static str {
        "Conv2d"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        if let (false, Some(dw)) = (save, &self.depthwise) {
            if let Some(z) = dw.apply(x, &self.weight, self.bias.as_ref())? {
                return Ok((z, None));
            }
        }
        let m = x.dim(0)?;
        let (o, i) = self.weight.dims2()?;
        let gi = i * self.groups;
        let r = self.positions();
        // U = im2col(x), (G·I, M, R); z = W U + b for all samples at once:
        // (O, I) @ (I, M·R) → (O, M, R) per group, then sample-first by runs of R.
        let u = self.index.gather(x, 0.0)?;
        let mut z = group_mm(&self.weight, &u.reshape((gi, m * r))?, self.groups)?;
        if let Some(b) = &self.bias {
            z = z.broadcast_add(&b.reshape((o, 1))?)?;
        }
        let z = z.reshape((o, m, r))?.transpose(0, 1)?.contiguous()?;
        let z = z.reshape((m, self.out_shape[0], self.out_shape[1], self.out_shape[2]))?;
        let saved = save.then(|| Saved::new(ConvSaved { patches_imr: u }));
        Ok((z, saved))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Jᵀ v = col2im(Wᵀ V) for all M·K columns:
        // V as (O, M·K, R); Wᵀ V (I, M·K, R); col2im → (M·K, C·H·W).
        let (m, k) = (v.dim(0)?, v.dim(1)?);
        let (o, i) = self.weight.dims2()?;
        if let Some(dw) = &self.depthwise {
            // One input plane per group: the transposed convolution directly.
            let [_, oh, ow] = self.out_shape;
            if let Some(vin) = dw.apply_transposed(&v.reshape((m * k, o, oh, ow))?, &self.weight)? {
                return split_mk(&vin, m, k);
            }
        }
        let gi = i * self.groups;
        let r = self.positions();
        // In chunks of columns whose Wᵀ V (G·I·R per column) stays in cache
        // between the product and the scatter.
        // Each chunk's col2im is added into its rows of one zeroed result.
        let v3 = v.reshape((m * k, o, r))?;
        let chunk = (COL2IM_CHUNK / (gi * r)).clamp(1, m * k);
        let [c, h, w] = self.in_shape;
        let mut vin = Tensor::zeros((m * k, c * h * w), v.dtype(), v.device())?;
        for start in (0..m * k).step_by(chunk) {
            let n = chunk.min(m * k - start);
            // The chunk's columns as (O, n, R): one copy of V in all.
            let vc = v3.narrow(0, start, n)?.transpose(0, 1)?.contiguous()?.reshape((o, n * r))?;
            let cols = group_mm_t(&self.weight, &vc, self.groups)?;
            self.index.scatter_add_into(&mut vin, &cols.reshape((gi, n, r))?, start)?;
        }
        split_mk(&vin.reshape((m * k, c, h, w))?, m, k)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // J ẋ = W im2col(ẋ): the convolution without bias, on all M·K tangents.
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        if let Some(dw) = &self.depthwise {
            if let Some(z) = dw.apply(&merge_mk(x_dot)?, &self.weight, None)? {
                return split_mk(&z, m, k);
            }
        }
        let (o, i) = self.weight.dims2()?;
        let r = self.positions();
        let u = self.index.gather(&merge_mk(x_dot)?, 0.0)?; // (G·I, M·K, R)
        let z = group_mm(&self.weight, &u.reshape((i * self.groups, m * k * r))?, self.groups)?;
        let z = z.reshape((o, m * k, r))?.transpose(0, 1)?.contiguous()?;
        split_mk(&z.reshape((m * k, o, self.out_shape[1], self.out_shape[2]))?, m, k)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        let mut p = vec![("weight", &self.weight4)];
        if let Some(b) = &self.bias {
            p.push(("bias", b));
        }
        p
    }

    fn affine(&self) -> Option<&dyn AffineLayer> {
        Some(self)
    }
}

impl AffineLayer for Conv2d {
    fn affine_dims(&self) -> (usize, usize, usize) {
        let (o, i) = self.weight.dims2().expect("weight is 2-D");
        (o, i, self.positions())
    }

    fn groups(&self) -> usize {
        self.groups
    }

    fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    fn patches(&self, saved: &Saved) -> Result<Tensor> {
        Ok(saved.get::<ConvSaved>().patches_imr.transpose(0, 1)?)
    }

    fn tangent_patches(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        let (_, i) = self.weight.dims2()?;
        let r = self.positions();
        let u = self.index.gather(&merge_mk(x_dot)?, 0.0)?; // (G·I, M·K, R)
        Ok(u.transpose(0, 1)?.contiguous()?.reshape((m, k, i * self.groups, r))?)
    }

    fn backward_with_weights(&self, _saved: &Saved, g: &Tensor, w: &Tensor) -> Result<Tensor> {
        // Column k: col2im(W_kᵀ g); (K, I, O) @ (O, M·R) → (K, I, M, R).
        let m = g.dim(0)?;
        let k = w.dim(0)?;
        let (o, i) = self.weight.dims2()?;
        let (gs, og) = (self.groups, o / self.groups);
        let r = self.positions();
        let gt = g.reshape((m, o, r))?.transpose(0, 1)?.contiguous()?.reshape((gs, og, m * r))?;
        // Per group: (K, G, I, O/G) @ (G, O/G, M·R) → (K, G·I, M·R).
        let wt = w.reshape((k, gs, og, i))?.transpose(2, 3)?.contiguous()?;
        let cols = wt.mm(&gt.unsqueeze(0)?.broadcast_as((k, gs, og, m * r))?.contiguous()?)?;
        let gi = gs * i;
        // (K, G·I, M, R) → (G·I, M, K, R): the columns of sample-major (M·K).
        let cols = cols.reshape((k, gi, m, r))?.permute((1, 2, 0, 3))?.contiguous()?;
        let vin = self.index.scatter(&cols.reshape((gi, m * k, r))?)?;
        let [c, h, ww] = self.in_shape;
        split_mk(&vin.reshape((m * k, c, h, ww))?, m, k)
    }
}
