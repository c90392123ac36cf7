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

/// The one dtype dispatch of our CPU kernels (candle custom ops): match the
/// storages `$s` (all f32 or all f64), bind each one's values to `$v`, bind
/// `$wrap` to the matching `CpuStorage` variant (to wrap a result) and
/// evaluate `$body`, the same generic code for both dtypes. Anything else is
/// an error naming the op `$what`.
macro_rules! float_dispatch {
    ($what:expr; $($s:expr => $v:ident),+ ; |$wrap:ident| $body:expr) => {
        match ($($s,)+) {
            ($(candle_core::CpuStorage::F32($v),)+) => {
                #[allow(unused_imports)]
                use candle_core::CpuStorage::F32 as $wrap;
                $body
            }
            ($(candle_core::CpuStorage::F64($v),)+) => {
                #[allow(unused_imports)]
                use candle_core::CpuStorage::F64 as $wrap;
                $body
            }
            _ => candle_core::bail!("{} supports f32 and f64 tensors (all of one dtype)", $what),
        }
    };
}

mod depthwise;
mod elementwise;
mod fused;
mod matmul;
mod row_dots;
mod sum_sq;
mod transpose;
mod windows;
mod write;

pub use depthwise::Depthwise;
pub use elementwise::{heaviside, log1p, sigmoid, tanh};
pub use fused::{broadcast, channel_affine, map_value, map_with_derivative, mul_rows, sum_sq_dim, Arith, Real, WithDerivative};
pub use row_dots::grouped_row_dots;
pub use matmul::{clear_simd_upper_state, faer_par, matmul, Mm, SimdScope, THREADING_THRESHOLD};
pub use sum_sq::sum_sq_products;
pub use transpose::{contiguous, move_leading_back, transpose2d};
pub use windows::WindowTable;
pub use write::{add_assign, add_block, write_block, write_outer_rows, write_products_rows};

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
    let s = ones.mm(&t.reshape((lead, cols))?)?;
    Ok(s.reshape(rest)?)
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
        ones.mm(&t.reshape((k, right))?)?
    } else {
        ones.broadcast_left(left)?.mm(&t.reshape((left, k, right))?)?
    };
    Ok(s.reshape(out_shape)?)
}

/// Sum over `axes` (each listed once, any order), keeping them as length 1.
///
/// Each run of adjacent axes is merged into one and summed at once with
/// [`sum_dim`] (a trailing run as contiguous row sums, any other as a
/// product with a row of ones). candle's own reduction takes an index
/// division per element for every axis but the last; summed axis by axis
/// that was 12 % of MobileNet's KFAC GGN (squeeze-excitation's backward
/// over H and W).
pub fn sum_keepdims(t: &Tensor, axes: &[usize]) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    let mut axes: Vec<usize> = axes.iter().copied().filter(|&a| dims[a] != 1).collect();
    axes.sort_unstable();
    if axes.is_empty() {
        return Ok(t.clone());
    }
    // Runs [lo, hi) of adjacent axes, summed from the last back so that
    // earlier axes keep their positions.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &a in &axes {
        match runs.last_mut() {
            Some((_, hi)) if *hi == a => *hi = a + 1,
            _ => runs.push((a, a + 1)),
        }
    }
    let mut t = t.contiguous()?;
    for &(lo, hi) in runs.iter().rev() {
        let merged: Vec<usize> = dims[..lo].iter().copied().chain([dims[lo..hi].iter().product()]).chain(dims[hi..].iter().copied()).collect();
        t = sum_dim(&t.reshape(merged)?, lo)?;
        dims[lo..hi].fill(1);
        t = t.reshape(dims.as_slice())?;
    }
    Ok(t)
}

/// All elements, flattened row-major, converted to f64 on the host.
pub fn to_vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// All elements' bytes, row-major, in the tensor's dtype (little-endian, as
/// safetensors stores them): the inverse of `Tensor::from_raw_buffer`.
pub fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    macro_rules! le_bytes {
        ($($dtype:ident => $ty:ty),+) => {
            match t.dtype() {
                $(DType::$dtype => t.to_vec1::<$ty>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),)+
                other => bail!(Invalid, "no byte layout for dtype {other:?}"),
            }
        };
    }
    Ok(le_bytes!(F64 => f64, F32 => f32, I64 => i64, U32 => u32, U8 => u8))
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

/// The number of threads candle's matrix products use when
/// `RAYON_NUM_THREADS` is unset (its default: the physical cores this
/// process may run on). candle asks for it on every product, and with the
/// variable unset each ask reads `/proc/cpuinfo`; a program that resolves
/// it once and sets `RAYON_NUM_THREADS` saves that (the CLI does).
pub fn default_matmul_threads() -> usize {
    candle_core::utils::get_num_threads()
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

/// The flat index of the first element of `t` that is not an integer.
pub fn first_non_integer(t: &Tensor) -> Result<Option<usize>> {
    if !is_compute_dtype(t.dtype()) {
        return Ok(None);
    }
    Ok(with_host_slice::<f64, _>(&t.to_dtype(DType::F64)?, |v| v.iter().position(|x| x.fract() != 0.0))?)
}

/// max |t| as f64 (`None` for an empty tensor), for any element type.
pub fn max_abs_as_f64(t: &Tensor) -> Result<Option<f64>> {
    if t.elem_count() == 0 {
        return Ok(None);
    }
    let v = t.flatten_all()?.to_dtype(DType::F64)?.abs()?.max(0)?;
    Ok(Some(scalar_f64(&v)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `sum_keepdims` equals candle's axis-by-axis sums for every pattern of
    /// axes: one trailing run (squeeze-excitation's `(C, 1, 1)` operand), a
    /// leading run, two separate runs, the batch axis, all, none, unsorted,
    /// axes of length 1; on a contiguous tensor and on a strided view.
    #[test]
    fn sum_keepdims_matches_axis_by_axis_sums() -> Result<()> {
        let t = Tensor::randn(0f64, 1.0, (3, 2, 4, 5, 6), &Device::Cpu)?;
        let patterns: [&[usize]; 9] = [&[3, 4], &[2, 3], &[2, 4], &[2, 3, 4], &[], &[4, 2], &[0], &[0, 1, 2, 3, 4], &[1, 3]];
        for axes in patterns {
            let mut want = t.clone();
            for &a in axes {
                want = want.sum_keepdim(a)?;
            }
            for view in [t.clone(), t.transpose(0, 1)?.contiguous()?.transpose(0, 1)?] {
                let got = sum_keepdims(&view, axes)?;
                assert_eq!(got.dims(), want.dims(), "{axes:?}");
                let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-12, "{axes:?}: {err}");
            }
        }
        let ones = Tensor::randn(0f64, 1.0, (3, 1, 4), &Device::Cpu)?;
        assert_eq!(sum_keepdims(&ones, &[1])?.dims(), &[3, 1, 4]);
        Ok(())
    }
}
