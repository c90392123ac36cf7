//! Per-sample gradients of a grouped layer's weight as dot products of
//! rows, for groups whose products are too small for a GEMM.
//!
//! Group g of a grouped layer (G groups, O/G outputs and I patch rows each)
//! has the per-sample, per-column gradient
//!
//!   out[m, k, o, i] = Σ_r V[m, k, o, r] · U[m, (o / (O/G))·I + i, r],
//!
//! a dot product of two contiguous rows of length R: V `(M, K, O, R)` and U
//! `(M, G·I, R)` both keep r innermost (U's rows may be a strided view). A depthwise
//! convolution (O/G = 1, I = kh·kw) is M·G products of (K × R)·(R × 9)
//! that way; as a batched GEMM it needed both operands transposed into
//! copies and its result permuted back, three strided copies that were the
//! largest part of a MobileNet's EF diagonal. Here nothing is copied.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};

use super::fused::{filled, Real};
use super::{DType, Device, Tensor};
use crate::error::Result;

/// `(M, K, O·I)` per-sample gradients of a grouped weight (see the module
/// documentation), or `None` when the operands are not contiguous CPU
/// f32/f64 tensors.
pub fn grouped_row_dots(u: &Tensor, v: &Tensor, groups: usize) -> Result<Option<Tensor>> {
    let ((m, gi, r), (mv, k, o, rv)) = (u.dims3()?, v.dims4()?);
    if m != mv || r != rv || groups == 0 || gi % groups != 0 || o % groups != 0 {
        crate::error::bail!(Invalid, "grouped row products: U {:?} and V {:?} do not fit {groups} groups", u.dims(), v.dims());
    }
    let cpu_float = |t: &Tensor| matches!(t.device(), Device::Cpu) && matches!(t.dtype(), DType::F32 | DType::F64);
    // U's rows may lie anywhere (patches are kept as (I, M, R) views), but
    // each must be contiguous.
    let rows_contiguous = |t: &Tensor| t.stride().last() == Some(&1) || r <= 1;
    if !cpu_float(u) || u.dtype() != v.dtype() || !rows_contiguous(u) || !v.is_contiguous() {
        return Ok(None);
    }
    let (su, sr) = (u.stride()[0], u.stride()[1]);
    let op = RowDots { k, o, i: gi / groups, og: o / groups, r, u_sample: su, u_row: sr };
    let out = v.apply_op2_no_bwd(u, &op)?;
    Ok(Some(out))
}

struct RowDots {
    k: usize,
    o: usize,
    i: usize,
    og: usize,
    r: usize,
    /// U's strides over samples and rows (its r stride is 1).
    u_sample: usize,
    u_row: usize,
}

/// Σ_j a[j] b[j] with eight partial sums (so that the loop vectorizes
/// without reassociating one accumulator).
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 8;
    let zero = T::of(0.0);
    let mut acc = [zero; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: T = ac.remainder().iter().zip(bc.remainder()).fold(zero, |s, (&x, &y)| s + x * y);
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

impl RowDots {
    fn run<T: Real>(&self, v: &[T], u: &[T]) -> Vec<T> {
        let RowDots { k, o, i, og, r, u_sample, u_row } = *self;
        let per_sample = k * o * i;
        let n = (v.len() / (k * o * r).max(1)) * per_sample;
        // Work per output element: one dot of length R.
        filled(n, per_sample.max(1), r.max(1), |start, out| {
            for (j, block) in out.chunks_mut(per_sample.max(1)).enumerate() {
                let m = start / per_sample.max(1) + j;
                let vm = &v[m * k * o * r..(m + 1) * k * o * r];
                let um = &u[m * u_sample..];
                for (row, dst) in block.chunks_mut(i.max(1)).enumerate() {
                    // row = kk·O + oo; the patch rows of its group.
                    let oo = row % o;
                    let vrow = &vm[row * r..(row + 1) * r];
                    let base = (oo / og) * i;
                    for (ii, e) in dst.iter_mut().enumerate() {
                        let at = (base + ii) * u_row;
                        e.write(dot(vrow, &um[at..at + r]));
                    }
                }
            }
        })
    }
}

impl CustomOp2 for RowDots {
    fn name(&self) -> &'static str {
        "grouped-row-dots"
    }

    fn cpu_fwd(&self, vs: &CpuStorage, vl: &Layout, us: &CpuStorage, ul: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((v0, v1)) = vl.contiguous_offsets() else {
            candle_core::bail!("grouped row products need a contiguous V")
        };
        let u0 = ul.start_offset();
        let m = vl.shape().dims()[0];
        let out = float_dispatch!("grouped row products"; vs => v, us => u; |Out| Out(self.run(&v[v0..v1], &u[u0..])));
        Ok((out, Shape::from((m, self.k, self.o * self.i))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition as a broadcast product summed over r, for
    /// depthwise, grouped and single-group layouts, K = 1 and K > 1, R not a
    /// multiple of the eight lanes, and enough samples for parallel chunks.
    #[test]
    fn agrees_with_the_definition() {
        for dtype in [DType::F64, DType::F32] {
            for (m, k, g, og, i, r) in [(3, 1, 4, 1, 9, 13), (2, 3, 2, 3, 5, 8), (5, 2, 1, 4, 6, 7), (300, 1, 16, 1, 9, 64), (4, 10, 8, 2, 9, 1)] {
                let o = g * og;
                let u = Tensor::randn(0f64, 1.0, (m, g * i, r), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let v = Tensor::randn(0f64, 1.0, (m, k, o, r), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let got = grouped_row_dots(&u, &v, g).unwrap().expect("contiguous CPU operands");
                // U as the engine keeps patches: an (G·I, M, R) buffer viewed as (M, G·I, R).
                let u_view = u.transpose(0, 1).unwrap().contiguous().unwrap().transpose(0, 1).unwrap();
                assert!(!u_view.is_contiguous());
                let got_view = grouped_row_dots(&u_view, &v, g).unwrap().expect("rows of U are contiguous");
                assert_eq!(super::super::to_vec_f64(&got_view).unwrap(), super::super::to_vec_f64(&got).unwrap());
                // out[m, k, (g, o'), i] = Σ_r V[m, k, (g, o'), r] U[m, (g, i), r]
                let vv = v.reshape((m, k, g, og, 1, r)).unwrap();
                let uu = u.reshape((m, 1, g, 1, i, r)).unwrap();
                let want = vv.broadcast_mul(&uu).unwrap().sum(5).unwrap().reshape((m, k, o * i)).unwrap();
                assert_eq!(got.dims(), want.dims());
                let (a, b) = (super::super::to_vec_f64(&got).unwrap(), super::super::to_vec_f64(&want).unwrap());
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= tol * y.abs().max(1.0), "{x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_the_groups_are_an_error() {
        let u = Tensor::zeros((2, 9, 4), DType::F64, &Device::Cpu).unwrap();
        let v = Tensor::zeros((2, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
        assert!(grouped_row_dots(&u, &v, 2).is_err());
        let u = Tensor::zeros((2, 8, 4), DType::F64, &Device::Cpu).unwrap();
        assert!(grouped_row_dots(&u, &v.narrow(3, 0, 3).unwrap(), 2).is_err());
        let strided = Tensor::zeros((2, 4, 8), DType::F64, &Device::Cpu).unwrap().transpose(1, 2).unwrap(); // (2, 8, 4), r stride 8
        assert!(grouped_row_dots(&strided, &v, 2).unwrap().is_none());
    }
}
