//! Materialized transposes: candle copies a transposed view element by
//! element through a generic strided iterator; these cache-blocked kernels
//! (AVX 8 × 8 register transposes for f32) are several times faster.

use super::{DType, Device, Tensor};
use crate::error::Result;

/// The transpose of a 2-D tensor, materialized: `(a, b) → (b, a)`.
///
/// candle copies a transposed view element by element through a generic
/// strided iterator; this cache-blocked kernel (a candle custom op, with
/// candle's own copy on other devices and dtypes) is several times faster,
/// and every layout change of the convolution and pooling passes is such a
/// transpose.
pub fn transpose2d(t: &Tensor) -> Result<Tensor> {
    let (a, b) = t.dims2()?;
    if a == 1 || b == 1 {
        return Ok(t.reshape((b, a))?);
    }
    match (t.device(), t.dtype()) {
        (Device::Cpu, DType::F32 | DType::F64) => Ok(t.contiguous()?.apply_op1_no_bwd(&Transpose2d)?),
        _ => Ok(t.t()?.contiguous()?),
    }
}

/// `t` made contiguous; a view that is the transpose of a contiguous
/// matrix — axis 0 with stride 1, the other axes contiguous after it, as
/// left by a `permute` that moved the last axis first — goes through the fast
/// [`transpose2d`] instead of candle's element-wise strided copy.
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    let dims = t.dims();
    let strides = t.stride();
    let n = dims.len();
    if n >= 2 && strides[0] == 1 {
        let first = dims[0];
        let mut expect = first;
        let mut ok = true;
        for ax in (1..n).rev() {
            if dims[ax] > 1 && strides[ax] != expect {
                ok = false;
                break;
            }
            expect *= dims[ax];
        }
        if ok {
            let rest: usize = dims[1..].iter().product();
            let perm: Vec<usize> = (1..n).chain(std::iter::once(0)).collect();
            let source = t.permute(perm)?; // contiguous (dims[1..], dims[0])
            if source.is_contiguous() {
                return Ok(transpose2d(&source.reshape((rest, first))?)?.reshape(dims)?);
            }
        }
    }
    Ok(t.contiguous()?)
}

/// `t (…, a, b)` with the leading axes merged, transposed as `(x, y) → (y, x)`
/// where x = product of the axes before `split`: a row-major permutation that
/// moves a group of leading axes behind the rest.
pub fn move_leading_back(t: &Tensor, split: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let x: usize = dims[..split].iter().product();
    let y: usize = dims[split..].iter().product();
    let mut out_shape = dims[split..].to_vec();
    out_shape.extend_from_slice(&dims[..split]);
    Ok(transpose2d(&t.reshape((x, y))?)?.reshape(out_shape)?)
}

struct Transpose2d;

/// `src (a, b)` row-major → `(b, a)`, in 16 × 16 tiles (measured best among
/// 8–128 on this machine: each tile's rows stay in L1 while its columns are
/// written out contiguously).
fn transpose_blocked<T: Copy>(src: &[T], a: usize, b: usize) -> Vec<T> {
    const TILE: usize = 16;
    assert_eq!(src.len(), a * b);
    let mut dst: Vec<T> = Vec::with_capacity(a * b);
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    for i0 in (0..a).step_by(TILE) {
        let ie = (i0 + TILE).min(a);
        for j0 in (0..b).step_by(TILE) {
            let je = (j0 + TILE).min(b);
            for j in j0..je {
                for i in i0..ie {
                    // SAFETY: i < a and j < b, so i·b + j < a·b = src.len() and
                    // j·a + i < a·b = dst.capacity(); every dst slot is written once.
                    unsafe { d.add(j * a + i).write(*s.add(i * b + j)) };
                }
            }
        }
    }
    // SAFETY: all a·b elements were initialized above.
    unsafe { dst.set_len(a * b) };
    dst
}

/// f32 transpose with AVX 8 × 8 register transposes inside 64 × 64 cache
/// blocks (about 3× the scalar tiles); edges use the scalar path.
#[cfg(target_arch = "x86_64")]
fn transpose_f32(src: &[f32], a: usize, b: usize) -> Vec<f32> {
    if !std::arch::is_x86_feature_detected!("avx") || a < 8 || b < 8 {
        return transpose_blocked(src, a, b);
    }
    assert_eq!(src.len(), a * b);
    let mut dst: Vec<f32> = Vec::with_capacity(a * b);
    let (a8, b8) = (a / 8 * 8, b / 8 * 8);
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    const BLOCK: usize = 64;
    for i0 in (0..a8).step_by(BLOCK) {
        for j0 in (0..b8).step_by(BLOCK) {
            for i in (i0..(i0 + BLOCK).min(a8)).step_by(8) {
                for j in (j0..(j0 + BLOCK).min(b8)).step_by(8) {
                    // SAFETY: i + 8 ≤ a and j + 8 ≤ b; AVX is available (checked above).
                    unsafe { avx::transpose8x8(s.add(i * b + j), b, d.add(j * a + i), a) };
                }
            }
        }
    }
    // Edges: rows i ≥ a8 (all columns) and columns j ≥ b8 (rows < a8).
    for i in 0..a {
        let j_start = if i < a8 { b8 } else { 0 };
        for j in j_start..b {
            // SAFETY: in bounds as in `transpose_blocked`.
            unsafe { d.add(j * a + i).write(*s.add(i * b + j)) };
        }
    }
    // SAFETY: the tiles cover rows < a8 × columns < b8, the edge loop the rest.
    unsafe { dst.set_len(a * b) };
    dst
}

#[cfg(not(target_arch = "x86_64"))]
fn transpose_f32(src: &[f32], a: usize, b: usize) -> Vec<f32> {
    transpose_blocked(src, a, b)
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// Transpose the 8 × 8 block at `src` (row stride `ss`) into `dst` (row stride `ds`).
    #[target_feature(enable = "avx")]
    pub unsafe fn transpose8x8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        let r0 = _mm256_loadu_ps(src);
        let r1 = _mm256_loadu_ps(src.add(ss));
        let r2 = _mm256_loadu_ps(src.add(2 * ss));
        let r3 = _mm256_loadu_ps(src.add(3 * ss));
        let r4 = _mm256_loadu_ps(src.add(4 * ss));
        let r5 = _mm256_loadu_ps(src.add(5 * ss));
        let r6 = _mm256_loadu_ps(src.add(6 * ss));
        let r7 = _mm256_loadu_ps(src.add(7 * ss));
        let t0 = _mm256_unpacklo_ps(r0, r1);
        let t1 = _mm256_unpackhi_ps(r0, r1);
        let t2 = _mm256_unpacklo_ps(r2, r3);
        let t3 = _mm256_unpackhi_ps(r2, r3);
        let t4 = _mm256_unpacklo_ps(r4, r5);
        let t5 = _mm256_unpackhi_ps(r4, r5);
        let t6 = _mm256_unpacklo_ps(r6, r7);
        let t7 = _mm256_unpackhi_ps(r6, r7);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        _mm256_storeu_ps(dst, _mm256_permute2f128_ps::<0x20>(u0, u4));
        _mm256_storeu_ps(dst.add(ds), _mm256_permute2f128_ps::<0x20>(u1, u5));
        _mm256_storeu_ps(dst.add(2 * ds), _mm256_permute2f128_ps::<0x20>(u2, u6));
        _mm256_storeu_ps(dst.add(3 * ds), _mm256_permute2f128_ps::<0x20>(u3, u7));
        _mm256_storeu_ps(dst.add(4 * ds), _mm256_permute2f128_ps::<0x31>(u0, u4));
        _mm256_storeu_ps(dst.add(5 * ds), _mm256_permute2f128_ps::<0x31>(u1, u5));
        _mm256_storeu_ps(dst.add(6 * ds), _mm256_permute2f128_ps::<0x31>(u2, u6));
        _mm256_storeu_ps(dst.add(7 * ds), _mm256_permute2f128_ps::<0x31>(u3, u7));
    }
}

#[cfg(test)]
mod transpose_tests {
    #[test]
    fn transposes_agree_with_the_definition() {
        for (a, b) in [(1, 1), (3, 17), (8, 8), (9, 23), (64, 64), (70, 130), (257, 31)] {
            let src: Vec<f32> = (0..a * b).map(|x| x as f32).collect();
            let want: Vec<f32> = (0..b).flat_map(|j| (0..a).map(move |i| (i * b + j) as f32)).collect();
            assert_eq!(super::transpose_f32(&src, a, b), want, "({a}, {b})");
            let src64: Vec<f64> = src.iter().map(|&x| x as f64).collect();
            let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            assert_eq!(super::transpose_blocked(&src64, a, b), want64, "f64 ({a}, {b})");
        }
    }
}

impl candle_core::CustomOp1 for Transpose2d {
    fn name(&self) -> &'static str {
        "transpose2d"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (a, b) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("transpose2d needs a contiguous input")
        };
        // Not `float_dispatch!`: f32 has its own (SIMD-friendly) kernel.
        let out = match storage {
            candle_core::CpuStorage::F32(v) => candle_core::CpuStorage::F32(transpose_f32(&v[start..end], a, b)),
            candle_core::CpuStorage::F64(v) => candle_core::CpuStorage::F64(transpose_blocked(&v[start..end], a, b)),
            _ => candle_core::bail!("transpose2d supports f32 and f64"),
        };
        Ok((out, candle_core::Shape::from((b, a))))
    }
}
