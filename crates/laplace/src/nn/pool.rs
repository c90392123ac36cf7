//! `torch.nn.MaxPool2d` and `torch.nn.AvgPool2d`, channel by channel, on
//! the same receptive-field tables as convolution ([`super::patches`]).

use super::patches::{check_window_size, window_table, Window};
use super::{merge_mk, split_mk, Layer, LayerCtx, Saved};
use crate::error::Result;
use crate::spec::LayerSpec;
use crate::tensor::{self, Tensor, WindowTable};

/// Shape checks and the window shared by both poolings.
fn pool_window(
    ctx: &LayerCtx,
    in_shape: &[usize],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
) -> Result<(usize, Window)> {
    let &[c, h, w] = in_shape else {
        return Err(ctx.spec_err(format!(
            "its input has per-sample shape {in_shape:?}, but 2-D pooling needs (channels, height, width)"
        )));
    };
    let mut out_hw = [0; 2];
    for a in 0..2 {
        let n = [h, w][a];
        out_hw[a] = Window::out_len(n, kernel[a], stride[a], padding[a], padding[a], dilation[a], ceil_mode)
            .ok_or_else(|| {
                ctx.spec_err(format!(
                    "input {h}×{w} (padding {padding:?}) is smaller than the kernel {kernel:?}"
                ))
            })?;
    }
    let window = Window {
        in_hw: [h, w],
        kernel,
        stride,
        pad_before: padding,
        dilation,
        out_hw,
    };
    check_window_size(ctx, &window, c)?;
    Ok((c, window))
}

/// `torch.nn.MaxPool2d`.
pub struct MaxPool2d {
    /// Windows: outer = C·kh·kw, inner = R positions.
    index: WindowTable,
    in_shape: [usize; 3],
    out_shape: [usize; 3],
    window_len: usize,
}

/// Forward state: for every output, the flat input position of its maximum, `(M, C·R)`.
struct MaxPoolSaved {
    argmax: Tensor,
}

impl MaxPool2d {
    pub(crate) fn build(ctx: &LayerCtx, in_shape: &[usize]) -> Result<Self> {
        let LayerSpec::MaxPool2d {
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
        } = *ctx.spec
        else {
            unreachable!("MaxPool2d::build called with another spec")
        };
        let (c, win) = pool_window(ctx, in_shape, kernel_size, stride, padding, dilation, ceil_mode)?;
        let [h, w] = win.in_hw;
        Ok(MaxPool2d {
            index: window_table(&win, c, ctx.device)?,
            in_shape: [c, h, w],
            out_shape: [c, win.out_hw[0], win.out_hw[1]],
            window_len: win.window_len(),
        })
    }
}

impl Layer for MaxPool2d {
    fn type_name(&self) -> &'static str {
        "MaxPool2d"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        // y = x at each window's first maximal element (torch's choice at
        // ties; padding counts as −∞), found as flat input positions (M, C·R).
        let m = x.dim(0)?;
        let [c, oh, ow] = self.out_shape;
        let argmax = self.index.argmax(x, self.window_len)?;
        let y = WindowTable::pick(x, &argmax)?;
        let saved = save.then(|| Saved::new(MaxPoolSaved { argmax }));
        Ok((y.reshape((m, c, oh, ow))?, saved))
    }

    fn backward(&self, saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Each output sensitivity goes to the input that was the maximum.
        let (m, k) = (v.dim(0)?, v.dim(1)?);
        let [c, h, w] = self.in_shape;
        let argmax = &saved.get::<MaxPoolSaved>().argmax;
        let len = argmax.dim(1)?;
        let vin = WindowTable::unpick(&v.reshape((m, k, len))?, argmax, c * h * w)?;
        Ok(vin.reshape((m, k, c, h, w))?)
    }

    fn jvp_input(&self, saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // The tangent of each window's maximum is the tangent of its argmax.
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        let [c, oh, ow] = self.out_shape;
        let argmax = &saved.get::<MaxPoolSaved>().argmax;
        let len = argmax.dim(1)?;
        let ids = argmax.unsqueeze(1)?.broadcast_as((m, k, len))?;
        let out = tensor::gather(&x_dot.reshape((m, k, ()))?, &ids, 2)?;
        Ok(out.reshape((m, k, c, oh, ow))?)
    }
}

/// `torch.nn.AvgPool2d`.
pub struct AvgPool2d {
    /// Windows: outer = C·kh·kw, inner = R positions.
    index: WindowTable,
    /// 1 / divisor per output position `(1, R)`, as torch computes it.
    inv_divisor: Tensor,
    in_shape: [usize; 3],
    out_shape: [usize; 3],
    window_len: usize,
}

impl AvgPool2d {
    pub(crate) fn build(ctx: &LayerCtx, in_shape: &[usize]) -> Result<Self> {
        let LayerSpec::AvgPool2d {
            kernel_size,
            stride,
            padding,
            ceil_mode,
            count_include_pad,
            divisor_override,
        } = *ctx.spec
        else {
            unreachable!("AvgPool2d::build called with another spec")
        };
        let (c, win) = pool_window(ctx, in_shape, kernel_size, stride, padding, [1, 1], ceil_mode)?;
        let [h, w] = win.in_hw;
        // torch: the window clipped to the padded input counts when
        // count_include_pad, the window clipped to the input otherwise.
        let mut inv = Vec::with_capacity(win.positions());
        for oy in 0..win.out_hw[0] {
            for ox in 0..win.out_hw[1] {
                let span = |o: usize, a: usize, n: usize| {
                    let start = (o * stride[a]) as i64 - padding[a] as i64;
                    let end = (start + kernel_size[a] as i64).min((n + padding[a]) as i64);
                    let padded = end - start;
                    let inner = end.min(n as i64) - start.max(0);
                    (padded, inner)
                };
                let (ph, ih) = span(oy, 0, h);
                let (pw, iw) = span(ox, 1, w);
                let divisor = match divisor_override {
                    Some(d) => d as i64,
                    None if count_include_pad => ph * pw,
                    None => ih * iw,
                };
                inv.push(1.0 / divisor as f64);
            }
        }
        let device = ctx.device;
        let n = inv.len();
        Ok(AvgPool2d {
            index: window_table(&win, c, device)?,
            inv_divisor: Tensor::from_vec(inv, (1, n), device)?,
            in_shape: [c, h, w],
            out_shape: [c, win.out_hw[0], win.out_hw[1]],
            window_len: win.window_len(),
        })
    }
}

impl Layer for AvgPool2d {
    fn type_name(&self) -> &'static str {
        "AvgPool2d"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        // y[c, r] = (Σ_window x) / divisor[r], padding at 0: windows
        // (C, kh·kw, M·R), summed over the window, then sample-first.
        let m = x.dim(0)?;
        let [c, oh, ow] = self.out_shape;
        let r = oh * ow;
        let u = self.index.gather(x, 0.0)?.reshape((c, self.window_len, m * r))?;
        let inv = self.inv_divisor.to_dtype(x.dtype())?.reshape((1, 1, r))?;
        let y = tensor::sum_dim(&u, 1)?.reshape((c, m, r))?.broadcast_mul(&inv)?;
        let y = y.transpose(0, 1)?.contiguous()?;
        Ok((y.reshape((m, c, oh, ow))?, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Every window element receives v[c, r] / divisor[r]: columns
        // (C, kh·kw, M·K, R), then col2im.
        let (m, k) = (v.dim(0)?, v.dim(1)?);
        let [c, oh, ow] = self.out_shape;
        let r = oh * ow;
        let inv = self.inv_divisor.to_dtype(v.dtype())?.reshape((1, 1, r))?;
        let vt = v.reshape((m * k, c, r))?.transpose(0, 1)?.contiguous()?.broadcast_mul(&inv)?; // (C, MK, R)
        let cols = vt.unsqueeze(1)?.broadcast_as((c, self.window_len, m * k, r))?.contiguous()?;
        let vin = self.index.scatter(&cols.reshape((c * self.window_len, m * k, r))?)?;
        let [ci, h, w] = self.in_shape;
        split_mk(&vin.reshape((m * k, ci, h, w))?, m, k)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // Average pooling is linear: its tangent map is the pooling itself.
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        let (y, _) = self.forward(&merge_mk(x_dot)?, false)?;
        split_mk(&y, m, k)
    }
}
