//! Elementwise functions candle lacks or computes slowly on the CPU.

use super::{DType, Device, Tensor};
use crate::error::Result;

/// `log(1 + u)` accurate also for tiny `u` (Goldberg's trick), elementwise
/// with tensor ops so that it runs on any device: with w = 1 + u (rounded),
/// log1p(u) = log(w) · u / (w − 1), and = u where w == 1.
pub fn log1p(u: &Tensor) -> Result<Tensor> {
    let w = (u + 1.0)?;
    let wm1 = (&w - 1.0)?;
    let is_one = wm1.eq(0.0)?;
    // Avoid 0/0 in the branch that is not taken.
    let safe = is_one.where_cond(&wm1.ones_like()?, &wm1)?;
    let ratio = (u / &safe)?;
    let general = (w.log()? * ratio)?;
    Ok(is_one.where_cond(u, &general)?)
}

/// tanh, elementwise. In f32 on the CPU a vectorizable rational
/// approximation (Eigen's `generic_fast_tanh_float`: odd degree-13 over even
/// degree-6 polynomial on [−7.9, 7.9], within a few ulp) instead of libm's
/// scalar `tanhf`, which dominated the forward pass of tanh networks; f64
/// and other devices use candle's (exact to the last bit for the
/// conformance tests).
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32) => map_cpu::<FastTanh>(x),
        _ => Ok(x.tanh()?),
    }
}

#[inline(always)]
pub(super) fn fast_tanh_f32(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525e-3;
    const B2: f32 = 2.268_434_7e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    if x.abs() < 4e-4 {
        return x;
    }
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let p = ((((((A13 * x2 + A11) * x2 + A9) * x2 + A7) * x2 + A5) * x2 + A3) * x2 + A1) * x;
    let q = ((B6 * x2 + B4) * x2 + B2) * x2 + B0;
    p / q
}

/// tanh by [`fast_tanh_f32`] in f32 (f64 keeps libm's, through candle).
struct FastTanh;

impl ElementwiseMap for FastTanh {
    const NAME: &'static str = "fast_tanh";
    fn f32(x: f32) -> f32 {
        fast_tanh_f32(x)
    }
    fn f64(x: f64) -> f64 {
        x.tanh()
    }
}

/// An elementwise map with one kernel per float type, run by [`map_cpu`].
trait ElementwiseMap {
    const NAME: &'static str;
    fn f32(x: f32) -> f32;
    fn f64(x: f64) -> f64;
}

/// `M` applied to every element of `x` (a CPU tensor) in one pass, as a
/// candle custom op; monomorphized, so the map inlines and vectorizes.
fn map_cpu<M: ElementwiseMap>(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1_no_bwd(&MapOp::<M>(std::marker::PhantomData))?)
}

struct MapOp<M>(std::marker::PhantomData<M>);

impl<M: ElementwiseMap> candle_core::CustomOp1 for MapOp<M> {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{} needs a contiguous input", M::NAME)
        };
        // Not `float_dispatch!`: each dtype has its own function (M::f32, M::f64).
        let out = match storage {
            candle_core::CpuStorage::F32(v) => candle_core::CpuStorage::F32(v[start..end].iter().map(|&x| M::f32(x)).collect()),
            candle_core::CpuStorage::F64(v) => candle_core::CpuStorage::F64(v[start..end].iter().map(|&x| M::f64(x)).collect()),
            _ => candle_core::bail!("{} supports f32 and f64", M::NAME),
        };
        Ok((out, layout.shape().clone()))
    }
}

#[cfg(test)]
mod fast_tanh_tests {
    #[test]
    fn close_to_libm_everywhere() {
        let mut worst = 0.0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let (a, b) = (super::fast_tanh_f32(x) as f64, (x as f64).tanh());
            worst = worst.max((a - b).abs() / b.abs().max(1e-30));
            x += 1e-3;
        }
        for &x in &[1e-7f32, -3e-5, 4e-4, 1e-3, 0.1] {
            let (a, b) = (super::fast_tanh_f32(x) as f64, (x as f64).tanh());
            worst = worst.max((a - b).abs() / b.abs());
        }
        assert!(worst < 1e-6, "relative error {worst}");
    }
}

/// The Heaviside step 𝟙(x > 0) in the dtype of `x`: ReLU's derivative.
///
/// One pass on the CPU; candle's `gt` against a scalar broadcasts the scalar
/// to a full tensor, compares into u8 and needs a conversion pass after.
pub fn heaviside(x: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32 | DType::F64) => map_cpu::<Heaviside>(x),
        _ => Ok(x.gt(0.0)?.to_dtype(x.dtype())?),
    }
}

struct Heaviside;

impl ElementwiseMap for Heaviside {
    const NAME: &'static str = "heaviside";
    fn f32(x: f32) -> f32 {
        if x > 0.0 { 1.0 } else { 0.0 }
    }
    fn f64(x: f64) -> f64 {
        if x > 0.0 { 1.0 } else { 0.0 }
    }
}

/// The logistic sigmoid 1 / (1 + e^(−x)), elementwise.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}
