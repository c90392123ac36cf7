//! Receptive fields of 2-D sliding windows (convolution and pooling) as
//! index tables into a flattened input.
//!
//! A per-sample input `(C, H, W)` is flattened to length C·H·W; one more,
//! the *sentinel* position C·H·W, stands for the padding value (0 for
//! convolution and average pooling, −∞ for max pooling): every window
//! element that falls into the padding points at it. Gathering with the
//! table unfolds the input (im2col); adding back with the same table is the
//! adjoint (col2im). The kernels are in [`crate::tensor::WindowTable`].

use crate::error::Result;
use crate::tensor::{Device, WindowTable};

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
        // Checked: sizes come from the spec (an overflow is "does not fit").
        let span = dilation.checked_mul(kernel - 1)?.checked_add(1)?;
        let padded = n.checked_add(pad_before)?.checked_add(pad_after)?;
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

/// Most entries of an index table (C·kh·kw·R per sample): u32 indices, and
/// patches of that many elements per sample.
const MAX_WINDOW_TABLE: usize = 1 << 31;

/// Refuse a window whose index table (and patches) would exceed
/// [`MAX_WINDOW_TABLE`] entries, before anything is allocated.
pub(crate) fn check_window_size(ctx: &super::LayerCtx, window: &Window, channels: usize) -> Result<()> {
    let dims = [channels, window.kernel[0], window.kernel[1], window.out_hw[0], window.out_hw[1]];
    match dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= MAX_WINDOW_TABLE => crate::budget::check(
            &format!("its sliding-window index table ({channels} channels × {:?} kernel × {:?} positions)", window.kernel, window.out_hw),
            &[n],
            std::mem::size_of::<usize>(),
        )
        .map_err(|e| ctx.spec_err(e.to_string())),
        _ => Err(ctx.spec_err(format!(
            "its sliding window needs {channels} channels × {:?} kernel × {:?} output positions of patch \
             entries per sample, more than {MAX_WINDOW_TABLE} (padding {:?}, stride {:?})",
            window.kernel, window.out_hw, window.pad_before, window.stride
        ))),
    }
}

/// The window's index table for `channels` planes as a [`WindowTable`]:
/// outer = C·kh·kw (a patch row each), inner = R output positions.
pub fn window_table(window: &Window, channels: usize, device: &Device) -> Result<WindowTable> {
    let [h, w] = window.in_hw;
    WindowTable::new(
        &window.index_table(channels),
        channels * window.window_len(),
        window.positions(),
        channels * h * w,
        device,
    )
}
