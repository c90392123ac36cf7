//! Receptive fields of 2-D sliding windows (convolution and pooling) as
//! index tables into a flattened input.
//!
//! A per-sample input `(C, H, W)` is flattened to length C·H·W and one extra
//! *sentinel* slot is appended at position C·H·W; it holds the padding value
//! (0 for convolution and average pooling, −∞ for max pooling). Every window
//! element that falls into the padding points at the sentinel. Gathering with
//! the table unfolds the input (im2col); adding back with the same table is
//! the adjoint (col2im), after which the sentinel slot is dropped.

use crate::error::Result;
use crate::tensor::{self, Device, Tensor};

/// The geometry of a sliding window over one `(H, W)` plane.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub in_hw: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Padding before (top, left); padding after only shows in `out_hw`.
    pub pad_before: [usize; 2],
    pub dilation: [usize; 2],
    pub out_hw: [usize; 2],
}

impl Window {
    /// torch's output length along one axis:
    /// ⌊(n + p_before + p_after − d(k − 1) − 1) / s⌋ + 1, or with ⌈·⌉ in
    /// ceil mode, where a last window starting in the right padding is dropped.
    /// `None` when the kernel does not fit.
    pub fn out_len(
        n: usize,
        kernel: usize,
        stride: usize,
        pad_before: usize,
        pad_after: usize,
        dilation: usize,
        ceil_mode: bool,
    ) -> Option<usize> {
        let span = dilation * (kernel - 1) + 1;
        let padded = n + pad_before + pad_after;
        if padded < span {
            return None;
        }
        let room = padded - span;
        let mut out = if ceil_mode {
            room.div_ceil(stride) + 1
        } else {
            room / stride + 1
        };
        if ceil_mode && (out - 1) * stride >= n + pad_before {
            out -= 1;
        }
        Some(out)
    }

    /// Number of output positions R.
    pub fn positions(&self) -> usize {
        self.out_hw[0] * self.out_hw[1]
    }

    /// Number of window elements kh·kw.
    pub fn window_len(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }

    /// Input row/column of window element `k` at output `o` along `axis`, or
    /// `None` in the padding.
    fn input_coord(&self, axis: usize, o: usize, k: usize) -> Option<usize> {
        let pos = o * self.stride[axis] + k * self.dilation[axis];
        let pos = pos.checked_sub(self.pad_before[axis])?;
        (pos < self.in_hw[axis]).then_some(pos)
    }

    /// The index table for `channels` planes, laid out `(C, kh, kw, R)`:
    /// entry = c·H·W + h·W + w, or the sentinel C·H·W in the padding.
    pub fn index_table(&self, channels: usize) -> Vec<usize> {
        let [h, w] = self.in_hw;
        let sentinel = channels * h * w;
        let [oh, ow] = self.out_hw;
        let mut ids = Vec::with_capacity(channels * self.window_len() * oh * ow);
        for c in 0..channels {
            for ki in 0..self.kernel[0] {
                for kj in 0..self.kernel[1] {
                    for r in 0..oh {
                        for s in 0..ow {
                            let id = match (self.input_coord(0, r, ki), self.input_coord(1, s, kj)) {
                                (Some(y), Some(x)) => c * h * w + y * w + x,
                                _ => sentinel,
                            };
                            ids.push(id);
                        }
                    }
                }
            }
        }
        ids
    }
}

/// Inputs as columns with the sentinel row: `(M, C, H, W) → (C·H·W + 1, M)`.
///
/// The index axis comes first so that gathering and scattering move whole
/// contiguous rows of M (or M·K) values, and the convolution becomes one
/// large matrix product over all samples instead of M small ones.
pub fn columns_with_sentinel(x: &Tensor, pad_value: f64) -> Result<Tensor> {
    let m = x.dim(0)?;
    let cols = tensor::transpose2d(&x.reshape((m, ()))?)?;
    let pad = Tensor::full(pad_value, (1, m), x.device())?.to_dtype(x.dtype())?;
    Ok(Tensor::cat(&[&cols, &pad], 0)?)
}

/// A gathered index table, ready for [`PatchIndex::unfold`] / [`PatchIndex::fold`].
pub struct PatchIndex {
    ids: Tensor,
    /// Length of the flattened input, C·H·W (the sentinel is one past it).
    input_len: usize,
}

impl PatchIndex {
    pub fn new(table: &[usize], input_len: usize, device: &Device) -> Result<Self> {
        Ok(PatchIndex {
            ids: tensor::index_tensor(table, device)?,
            input_len,
        })
    }

    /// im2col: `(C·H·W + 1, B)` with sentinel row → `(table length, B)`.
    pub fn unfold(&self, x_cols: &Tensor) -> Result<Tensor> {
        tensor::select(x_cols, &self.ids, 0)
    }

    /// col2im, the adjoint of `unfold` without the sentinel:
    /// `(table length, B)` → `(C·H·W, B)`.
    pub fn fold(&self, cols: &Tensor) -> Result<Tensor> {
        let full = tensor::select_adjoint(cols, &self.ids, 0, self.input_len + 1)?;
        Ok(full.narrow(0, 0, self.input_len)?)
    }
}
