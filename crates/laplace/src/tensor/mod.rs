//! The candle boundary.
//!
//! candle-core is our tensor library (CPU now, CUDA later), but its 0.x API
//! moves. Everything in the crate takes `Tensor`, `DType` and `Device` from
//! here, and every candle call that is not a plain arithmetic method
//! (index gathering and scattering, host transfers, conversions to faer,
//! file formats) goes through a function in this module or in [`crate::io`],
//! so that an API change is one edit in one place.

pub use candle_core::{DType, Device, Tensor, D};

use crate::error::{bail, Error, Result};

mod windows;
pub use windows::WindowTable;

/// An index tensor (u32) for `index_select` / `index_add` style operations.
pub fn index_tensor(ids: &[usize], device: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = ids
        .iter()
        .map(|&i| u32::try_from(i).map_err(|_| Error::Invalid(format!("index {i} exceeds u32"))))
        .collect::<Result<_>>()?;
    let n = ids.len();
    Ok(Tensor::from_vec(ids, n, device)?)
}

/// `src[..., ids[j], ...]` along `dim`: a gather of whole slices.
pub fn select(src: &Tensor, ids: &Tensor, dim: usize) -> Result<Tensor> {
    Ok(contiguous(src)?.index_select(ids, dim)?)
}

/// The adjoint of [`select`]: a zero tensor of length `len` along `dim`
/// into which slice `j` of `src` is added at position `ids[j]`.
pub fn select_adjoint(src: &Tensor, ids: &Tensor, dim: usize, len: usize) -> Result<Tensor> {
    if dim != 0 {
        // candle's CPU index_add walks the indexed axis in its outer loop;
        // with that axis first every index adds one contiguous row, instead
        // of one element per row with a stride (measured: 20× faster for
        // col2im of a convolution).
        let front = src.transpose(0, dim)?.contiguous()?;
        let out = select_adjoint(&front, ids, 0, len)?;
        return Ok(out.transpose(0, dim)?.contiguous()?);
    }
    let mut shape = src.dims().to_vec();
    shape[0] = len;
    let zeros = Tensor::zeros(shape, src.dtype(), src.device())?;
    Ok(zeros.index_add(ids, &src.contiguous()?, 0)?)
}

/// `src` gathered along `dim` with a full index tensor (same rank as `src`).
pub fn gather(src: &Tensor, ids: &Tensor, dim: usize) -> Result<Tensor> {
    Ok(src.contiguous()?.gather(&ids.contiguous()?, dim)?)
}

/// The adjoint of [`gather`] into a zero tensor of `shape`.
pub fn gather_adjoint(src: &Tensor, ids: &Tensor, dim: usize, shape: &[usize]) -> Result<Tensor> {
    let zeros = Tensor::zeros(shape, src.dtype(), src.device())?;
    Ok(zeros.scatter_add(&ids.contiguous()?, &src.contiguous()?, dim)?)
}

/// Sum over the leading `axes` axes: `(a₀, …, a_{n−1}, *rest) → (*rest)`,
/// as one matrix-vector product (candle's CPU reduction over leading axes
/// walks memory with a stride and is several times slower).
pub fn sum_leading(t: &Tensor, axes: usize) -> Result<Tensor> {
    let dims = t.dims();
    let lead: usize = dims[..axes].iter().product();
    let rest = dims[axes..].to_vec();
    let cols: usize = rest.iter().product();
    let ones = Tensor::ones((1, lead), t.dtype(), t.device())?;
    let s = ones.matmul(&t.reshape((lead, cols))?)?;
    Ok(s.reshape(rest)?)
}

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
        let out = match storage {
            candle_core::CpuStorage::F32(v) => candle_core::CpuStorage::F32(transpose_f32(&v[start..end], a, b)),
            candle_core::CpuStorage::F64(v) => candle_core::CpuStorage::F64(transpose_blocked(&v[start..end], a, b)),
            _ => candle_core::bail!("transpose2d supports f32 and f64"),
        };
        Ok((out, candle_core::Shape::from((b, a))))
    }
}

/// Sum over axis `dim`, removing it. candle's CPU reduction is fast only
/// along the last axis (measured: 50× slower along a middle axis), so
/// other axes are summed as a batched product with a row of ones.
pub fn sum_dim(t: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let k = dims[dim];
    let mut out_shape = dims.clone();
    out_shape.remove(dim);
    if k == 1 {
        return Ok(t.reshape(out_shape)?);
    }
    if dim + 1 == dims.len() {
        return Ok(t.contiguous()?.sum(dim)?);
    }
    let left: usize = dims[..dim].iter().product();
    let right: usize = dims[dim + 1..].iter().product();
    let ones = Tensor::ones((1, k), t.dtype(), t.device())?;
    let s = if left == 1 {
        ones.matmul(&t.reshape((k, right))?)?
    } else {
        ones.broadcast_left(left)?.matmul(&t.reshape((left, k, right))?)?
    };
    Ok(s.reshape(out_shape)?)
}

/// All elements, flattened row-major, converted to f64 on the host.
pub fn to_vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// All elements of an integer tensor, flattened row-major, as i64 on the host.
pub fn to_vec_i64(t: &Tensor) -> Result<Vec<i64>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::I64 => t.to_vec1::<i64>()?,
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I16 => t.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
        other => bail!(Invalid, "expected an integer tensor, got dtype {other:?}"),
    })
}

/// The single value of a one-element tensor, as f64.
pub fn scalar_f64(t: &Tensor) -> Result<f64> {
    let v = to_vec_f64(t)?;
    if v.len() != 1 {
        bail!(Invalid, "expected one element, got shape {:?}", t.dims());
    }
    Ok(v[0])
}

/// A tensor of `shape` and `dtype` from row-major f64 data.
pub fn from_f64(data: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

/// Is `dtype` a floating-point type we compute in?
pub fn is_compute_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}

/// Is `dtype` an integer type (for class labels and indices)?
pub fn is_int_dtype(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64
    )
}

/// Short lowercase name of a dtype, as in numpy / safetensors ("f32", "i64").
pub fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// The position (row-major) of the first NaN or infinity in `t`, if any.
pub fn first_non_finite(t: &Tensor) -> Result<Option<usize>> {
    if !is_compute_dtype(t.dtype()) {
        return Ok(None);
    }
    // Cheap test without temporaries first: a finite sum means every element
    // is finite (a NaN or ±∞ anywhere makes the sum NaN or ±∞); only a
    // non-finite sum (or an overflowing one) needs the exact scan.
    if scalar_f64(&t.sum_all()?)?.is_finite() {
        return Ok(None);
    }
    Ok(to_vec_f64(t)?.iter().position(|v| !v.is_finite()))
}

/// `f` applied to the data of `t` as a host slice, in place when `t` is a
/// contiguous CPU tensor of element type `T` (no copy), else on a copy
/// converted to `T`. For handing tensors to faer kernels.
pub fn with_host_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    if t.is_contiguous() && t.dtype() == T::DTYPE {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<T>()?[start..end]));
        }
    }
    let v = t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?;
    Ok(f(&v))
}

/// `dst[row.., col..] = src` for 2-D tensors, in place on the CPU (a candle
/// in-place custom op: assembling per-layer pieces this way avoids a
/// concatenation and a second copy of results as large as Jacobians), and
/// by `slice_assign` (a new tensor) elsewhere.
pub fn write_block(dst: &mut Tensor, src: &Tensor, row: usize, col: usize) -> Result<()> {
    let (r, c) = src.dims2()?;
    let (dr, dc) = dst.dims2()?;
    if row + r > dr || col + c > dc {
        bail!(Invalid, "block ({r}, {c}) at ({row}, {col}) does not fit in ({dr}, {dc})");
    }
    match (dst.device(), dst.dtype()) {
        (Device::Cpu, DType::F32 | DType::F64) if dst.is_contiguous() => {
            let src = src.to_dtype(dst.dtype())?.contiguous()?;
            Ok(dst.inplace_op2(&src, &WriteBlock { row, col })?)
        }
        _ => {
            *dst = dst.slice_assign(&[row..row + r, col..col + c], src)?;
            Ok(())
        }
    }
}

struct WriteBlock {
    row: usize,
    col: usize,
}

fn write_block_slices<T: Copy>(dst: &mut [T], dst_cols: usize, src: &[T], rows: usize, cols: usize, row: usize, col: usize) {
    for i in 0..rows {
        let d = (row + i) * dst_cols + col;
        dst[d..d + cols].copy_from_slice(&src[i * cols..(i + 1) * cols]);
    }
}

impl candle_core::InplaceOp2 for WriteBlock {
    fn name(&self) -> &'static str {
        "write_block"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (_, dc) = l1.shape().dims2()?;
        let (r, c) = l2.shape().dims2()?;
        let (Some((o1, e1)), Some((o2, e2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("write_block needs contiguous tensors")
        };
        match (s1, s2) {
            (candle_core::CpuStorage::F32(d), candle_core::CpuStorage::F32(s)) => {
                write_block_slices(&mut d[o1..e1], dc, &s[o2..e2], r, c, self.row, self.col)
            }
            (candle_core::CpuStorage::F64(d), candle_core::CpuStorage::F64(s)) => {
                write_block_slices(&mut d[o1..e1], dc, &s[o2..e2], r, c, self.row, self.col)
            }
            _ => candle_core::bail!("write_block supports matching f32 or f64 tensors"),
        }
        Ok(())
    }
}

/// `dst[row0 + n·K + k, col + o·I + i] = v[n, k, o] · u[n, i]` for
/// `v (M, K, O)`, `u (M, I)`: the per-sample weight gradients of a Linear
/// layer (outer products), written in place without forming the `(M·K, O·I)`
/// block first (on the CPU; by [`write_block`] elsewhere). Rows in parallel:
/// the block is as large as the result and this is bandwidth-bound.
pub fn write_outer_rows(dst: &mut Tensor, v: &Tensor, u: &Tensor, row0: usize, col: usize) -> Result<()> {
    let (m, k, o) = v.dims3()?;
    let i = u.dim(1)?;
    let (dr, dc) = dst.dims2()?;
    if u.dims2()? != (m, i) || row0 + m * k > dr || col + o * i > dc {
        bail!(
            Invalid,
            "outer products of {:?} and {:?} at ({row0}, {col}) do not fit in ({dr}, {dc})",
            v.dims(),
            u.dims()
        );
    }
    match (dst.device(), dst.dtype()) {
        (Device::Cpu, DType::F32 | DType::F64) if dst.is_contiguous() => {
            let v = v.to_dtype(dst.dtype())?.contiguous()?;
            let u = u.to_dtype(dst.dtype())?.contiguous()?;
            Ok(dst.inplace_op3(&v, &u, &WriteOuter { row0, col })?)
        }
        _ => {
            let g = v.unsqueeze(3)?.broadcast_mul(&u.reshape((m, 1, 1, i))?)?;
            write_block(dst, &g.reshape((m * k, o * i))?, row0, col)
        }
    }
}

struct WriteOuter {
    row0: usize,
    col: usize,
}

fn write_outer_slices<T: candle_core::WithDType>(dst: &mut [T], dc: usize, v: &[T], u: &[T], (k, o, i): (usize, usize, usize), w: &WriteOuter) {
    use rayon::prelude::*;
    let rows = v.len() / o;
    dst[w.row0 * dc..(w.row0 + rows) * dc]
        .par_chunks_mut(dc)
        .enumerate()
        .for_each(|(row, out)| {
            let (n, vrow) = (row / k, &v[row * o..(row + 1) * o]);
            let urow = &u[n * i..(n + 1) * i];
            for (oo, &scale) in vrow.iter().enumerate() {
                let d = &mut out[w.col + oo * i..w.col + (oo + 1) * i];
                for (x, &y) in d.iter_mut().zip(urow) {
                    *x = scale * y;
                }
            }
        });
}

impl candle_core::InplaceOp3 for WriteOuter {
    fn name(&self) -> &'static str {
        "write_outer_rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (_, dc) = l1.shape().dims2()?;
        let (_, k, o) = l2.shape().dims3()?;
        let (_, i) = l3.shape().dims2()?;
        let (Some((o1, e1)), Some((o2, e2)), Some((o3, e3))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("write_outer_rows needs contiguous tensors")
        };
        match (s1, s2, s3) {
            (candle_core::CpuStorage::F32(d), candle_core::CpuStorage::F32(v), candle_core::CpuStorage::F32(u)) => {
                write_outer_slices(&mut d[o1..e1], dc, &v[o2..e2], &u[o3..e3], (k, o, i), self)
            }
            (candle_core::CpuStorage::F64(d), candle_core::CpuStorage::F64(v), candle_core::CpuStorage::F64(u)) => {
                write_outer_slices(&mut d[o1..e1], dc, &v[o2..e2], &u[o3..e3], (k, o, i), self)
            }
            _ => candle_core::bail!("write_outer_rows supports matching f32 or f64 tensors"),
        }
        Ok(())
    }
}

/// Write `src` into `dst` (both contiguous) at row `offset` of axis 0, in place.
pub fn write_rows(dst: &Tensor, src: &Tensor, offset: usize) -> Result<()> {
    Ok(dst.slice_set(&src.contiguous()?, 0, offset)?)
}

/// Multi-index of row-major position `pos` in `shape` (for error messages).
pub fn unravel(mut pos: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = pos % d;
            pos /= d;
        }
    }
    idx
}

/// A `(rows, cols)` tensor as a faer matrix (f64).
pub fn to_faer(t: &Tensor) -> Result<faer::Mat<f64>> {
    let (r, c) = t.dims2()?;
    let v = to_vec_f64(t)?;
    Ok(faer::Mat::from_fn(r, c, |i, j| v[i * c + j]))
}

/// A faer matrix as a `(rows, cols)` tensor.
pub fn from_faer(m: faer::MatRef<'_, f64>, dtype: DType, device: &Device) -> Result<Tensor> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut v = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            v.push(m[(i, j)]);
        }
    }
    from_f64(v, &[r, c], dtype, device)
}

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
        (Device::Cpu, DType::F32) => Ok(x.contiguous()?.apply_op1_no_bwd(&FastTanhF32)?),
        _ => Ok(x.tanh()?),
    }
}

struct FastTanhF32;

#[inline(always)]
fn fast_tanh_f32(x: f32) -> f32 {
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

impl candle_core::CustomOp1 for FastTanhF32 {
    fn name(&self) -> &'static str {
        "fast_tanh_f32"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fast_tanh needs a contiguous input")
        };
        match storage {
            candle_core::CpuStorage::F32(v) => Ok((
                candle_core::CpuStorage::F32(v[start..end].iter().map(|&x| fast_tanh_f32(x)).collect()),
                layout.shape().clone(),
            )),
            _ => candle_core::bail!("fast_tanh_f32 needs f32"),
        }
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

/// The Heaviside step 1[x > 0] in the dtype of `x`: ReLU's derivative.
///
/// One pass on the CPU; candle's `gt` against a scalar broadcasts the scalar
/// to a full tensor, compares into u8 and needs a conversion pass after.
pub fn heaviside(x: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32 | DType::F64) => Ok(x.contiguous()?.apply_op1_no_bwd(&Heaviside)?),
        _ => Ok(x.gt(0.0)?.to_dtype(x.dtype())?),
    }
}

struct Heaviside;

impl candle_core::CustomOp1 for Heaviside {
    fn name(&self) -> &'static str {
        "heaviside"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("heaviside needs a contiguous input")
        };
        let out = match storage {
            candle_core::CpuStorage::F32(v) => {
                candle_core::CpuStorage::F32(v[start..end].iter().map(|&x| if x > 0.0 { 1.0 } else { 0.0 }).collect())
            }
            candle_core::CpuStorage::F64(v) => {
                candle_core::CpuStorage::F64(v[start..end].iter().map(|&x| if x > 0.0 { 1.0 } else { 0.0 }).collect())
            }
            _ => candle_core::bail!("heaviside supports f32 and f64"),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// The logistic sigmoid 1 / (1 + e^(−x)), elementwise.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}
