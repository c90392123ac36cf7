//! Σ_n (V_n U_nᵀ)⊙²: the diagonal of a Gram matrix of per-sample
//! gradients of a weight-sharing layer, without forming those gradients
//! for the whole batch.
//!
//! On the CPU the samples are split over threads; each computes V_n U_nᵀ
//! with faer into a buffer of its own and adds its square to a running sum.
//! That replaces a batched product (one small GEMM call per sample, each
//! synchronizing the thread pool), a `(M, A, I)` temporary, and a squaring
//! and a reduction pass over it.

use faer::{Accum, MatRef, Par};
use rayon::prelude::*;

use super::{sum_leading, DType, Device, Mm, Tensor};
use crate::error::{bail, Result};

/// `(A, I)` = Σ_n (V_n U_nᵀ)⊙² for `v (M, A, R)` and `u (M, I, R)` (any
/// strides; Conv2d's patches are a strided view).
pub fn sum_sq_products(v: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (m, _, r) = v.dims3()?;
    let (mu, _, ru) = u.dims3()?;
    if (mu, ru) != (m, r) {
        bail!(Invalid, "sum of squared products: V {:?} and U {:?} do not match", v.dims(), u.dims());
    }
    let cpu = matches!(v.device(), Device::Cpu) && matches!(v.dtype(), DType::F32 | DType::F64);
    if !cpu || u.dtype() != v.dtype() {
        let g = v.mm(&u.transpose(1, 2)?)?; // (M, A, I)
        return sum_leading(&g.sqr()?, 1);
    }
    Ok(v.contiguous()?.apply_op2_no_bwd(u, &SumSqProducts)?)
}

struct SumSqProducts;

/// The kernel on raw slices: `v` contiguous `(M, A, R)`, `u` with strides
/// `us` (sample, row, column) from `u[0]`.
fn kernel<T>(v: &[T], (m, a, r): (usize, usize, usize), u: &[T], i: usize, us: [usize; 3]) -> Vec<T>
where
    T: faer::traits::ComplexField + candle_core::WithDType + Send + Sync,
{
    let zero = <T as candle_core::WithDType>::from_f64(0.0);
    let one = <T as candle_core::WithDType>::from_f64(1.0);
    // Per thread: the running sum, column-major like faer's product buffer.
    let init = || (vec![zero; a * i], faer::Mat::<T>::zeros(a, i));
    let acc = (0..m)
        .into_par_iter()
        .fold(init, |(mut acc, mut g), n| {
            let vn = MatRef::from_row_major_slice(&v[n * a * r..(n + 1) * a * r], a, r);
            // SAFETY: u holds sample n's (I, R) block at n·us[0] with row
            // stride us[1] and column stride us[2]; candle's layout
            // guarantees these elements lie inside the slice.
            let un = unsafe {
                MatRef::from_raw_parts(u.as_ptr().add(n * us[0]), i, r, us[1] as isize, us[2] as isize)
            };
            faer::linalg::matmul::matmul(g.as_mut(), Accum::Replace, vn, un.transpose(), one, Par::Seq);
            super::clear_simd_upper_state(super::SimdScope::ThisThread);
            for col in 0..i {
                let gc = g.col(col).try_as_col_major().expect("faer columns are contiguous").as_slice();
                for (s, &x) in acc[col * a..(col + 1) * a].iter_mut().zip(gc) {
                    *s += x * x;
                }
            }
            (acc, g)
        })
        .map(|(acc, _)| acc)
        .reduce(|| vec![zero; a * i], |mut x, y| {
            x.iter_mut().zip(&y).for_each(|(p, &q)| *p += q);
            x
        });
    // Column-major (A, I) → row-major.
    (0..a).flat_map(|row| (0..i).map(move |col| (row, col))).map(|(row, col)| acc[col * a + row]).collect()
}

impl candle_core::CustomOp2 for SumSqProducts {
    fn name(&self) -> &'static str {
        "sum-sq-products"
    }

    fn cpu_fwd(
        &self,
        vs: &candle_core::CpuStorage,
        vl: &candle_core::Layout,
        us: &candle_core::CpuStorage,
        ul: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (m, a, r) = vl.shape().dims3()?;
        let (_, i, _) = ul.shape().dims3()?;
        let Some((v0, v1)) = vl.contiguous_offsets() else {
            candle_core::bail!("sum-sq-products needs a contiguous V")
        };
        let st = ul.stride();
        let strides = [st[0], st[1], st[2]];
        let start = ul.start_offset();
        let out = float_dispatch!("sum-sq-products"; vs => v, us => u; |Out| Out(kernel(&v[v0..v1], (m, a, r), &u[start..], i, strides)));
        Ok((out, candle_core::Shape::from((a, i))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_batched_product() -> Result<()> {
        let dev = Device::Cpu;
        let v = Tensor::randn(0f64, 1.0, (7, 6, 5), &dev)?;
        // U as Conv2d keeps it: an (I, M, R) buffer viewed as (M, I, R).
        let u = Tensor::randn(0f64, 1.0, (4, 7, 5), &dev)?.transpose(0, 1)?;
        let want = (v.matmul(&u.transpose(1, 2)?)?.sqr()?).sum(0)?;
        for dtype in [DType::F64, DType::F32] {
            let got = sum_sq_products(&v.to_dtype(dtype)?, &u.to_dtype(dtype)?)?;
            let err = (got.to_dtype(DType::F64)? - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
            assert!(err <= tol * want.abs()?.max_all()?.to_scalar::<f64>()?, "{dtype:?}: {err}");
        }
        Ok(())
    }
}
