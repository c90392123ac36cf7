//! `torch.nn.AdaptiveAvgPool2d(output_size)`: output (i, j) is the mean of
//! rows ⌊iH/oh⌋ .. ⌈(i+1)H/oh⌉ and columns ⌊jW/ow⌋ .. ⌈(j+1)W/ow⌉ (torch's
//! windows, which may overlap and differ in size). The map is linear and
//! the same for every channel, so it is kept as one dense pooling matrix
//! P `(H·W, oh·ow)`: y = x P per channel, Jᵀ v = v Pᵀ. With output size 1
//! (global average pooling) P is a column of 1/(H·W).

use super::{Layer, LayerCtx, Saved};
use crate::error::Result;
use crate::spec::LayerSpec;
use crate::tensor::{self, DType, Mm, Tensor};

/// Largest pooling matrix (2^26 entries, 512 MiB in f64).
const MAX_POOL_MATRIX: usize = 1 << 26;

/// `torch.nn.AdaptiveAvgPool2d`: average pooling to a fixed output size.
pub struct AdaptiveAvgPool2d {
    /// P `(H·W, oh·ow)` in f64; converted to the input dtype on use.
    pool: Tensor,
    in_shape: [usize; 3],
    out_shape: [usize; 3],
}

impl AdaptiveAvgPool2d {
    pub(crate) fn build(ctx: &LayerCtx, in_shape: &[usize]) -> Result<Self> {
        let LayerSpec::AdaptiveAvgPool2d { output_size } = *ctx.spec else {
            unreachable!("AdaptiveAvgPool2d::build called with another spec")
        };
        let &[c, h, w] = in_shape else {
            return Err(ctx.spec_err(format!(
                "its input has per-sample shape {in_shape:?}, but it needs (channels, height, width)"
            )));
        };
        let [oh, ow] = output_size;
        // The pooling matrix is dense (H·W, oh·ow): refuse sizes no network uses
        // rather than abort on the allocation.
        let cells = [h, w, oh, ow].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if cells.is_none_or(|n| n > MAX_POOL_MATRIX) {
            return Err(ctx.spec_err(format!(
                "output_size {output_size:?} on a {h}×{w} input needs a pooling matrix of more than \
                 {MAX_POOL_MATRIX} entries"
            )));
        }
        // Window of output index i along an axis of length n with `out` outputs.
        let window = |i: usize, n: usize, out: usize| ((i * n) / out, ((i + 1) * n).div_ceil(out));
        let mut p = vec![0.0; h * w * oh * ow];
        for i in 0..oh {
            let (r0, r1) = window(i, h, oh);
            for j in 0..ow {
                let (c0, c1) = window(j, w, ow);
                let share = 1.0 / ((r1 - r0) * (c1 - c0)) as f64;
                for r in r0..r1 {
                    for q in c0..c1 {
                        p[(r * w + q) * oh * ow + i * ow + j] = share;
                    }
                }
            }
        }
        Ok(AdaptiveAvgPool2d {
            pool: tensor::from_f64(p, &[h * w, oh * ow], DType::F64, ctx.device)?,
            in_shape: [c, h, w],
            out_shape: [c, oh, ow],
        })
    }

    /// `t (rows, H·W)` pooled: `(rows, oh·ow)`.
    fn apply(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.mm(&self.pool.to_dtype(t.dtype())?)?)
    }
}

impl Layer for AdaptiveAvgPool2d {
    fn type_name(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        let m = x.dim(0)?;
        let [c, h, w] = self.in_shape;
        let [_, oh, ow] = self.out_shape;
        let y = self.apply(&x.reshape((m * c, h * w))?)?.reshape((m, c, oh, ow))?;
        Ok((y, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        let (m, k) = (v.dim(0)?, v.dim(1)?);
        let [c, h, w] = self.in_shape;
        let [_, oh, ow] = self.out_shape;
        let pt = self.pool.to_dtype(v.dtype())?.t()?;
        let vin = v.reshape((m * k * c, oh * ow))?.mm(&pt)?;
        Ok(vin.reshape((m, k, c, h, w))?)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        let (m, k) = (x_dot.dim(0)?, x_dot.dim(1)?);
        let [c, h, w] = self.in_shape;
        let [_, oh, ow] = self.out_shape;
        Ok(self.apply(&x_dot.reshape((m * k * c, h * w))?)?.reshape((m, k, c, oh, ow))?)
    }

    fn linear_map(&self) -> bool {
        true
    }
}
