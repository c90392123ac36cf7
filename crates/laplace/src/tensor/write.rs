//! In-place writes into large results (Jacobians, per-sample gradients):
//! per-layer pieces go straight to their block, without concatenations;
//! and in-place sums (a full curvature, Kronecker factors over batches).

use candle_core::IndexOp;

use super::{DType, Device, Mm, Tensor};
use crate::error::{bail, Result};

/// `dst[row.., col..] = src` for 2-D tensors, in place on the CPU (a candle
/// in-place custom op: assembling per-layer pieces this way avoids a
/// concatenation and a second copy of results as large as Jacobians), and
/// by `slice_assign` (a new tensor) elsewhere.
pub fn write_block(dst: &mut Tensor, src: &Tensor, row: usize, col: usize) -> Result<()> {
    block_op(dst, src, row, col, BlockWrite::Replace)
}

/// `dst[row.., col..] += src` for 2-D tensors, in place on the CPU (as
/// [`write_block`]; elsewhere a new tensor). The caller must own `dst`'s
/// storage alone (see [`add_assign`]).
pub fn add_block(dst: &mut Tensor, src: &Tensor, row: usize, col: usize) -> Result<()> {
    block_op(dst, src, row, col, BlockWrite::Add)
}

/// What a block write does with the values already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockWrite {
    Replace,
    Add,
}

fn block_op(dst: &mut Tensor, src: &Tensor, row: usize, col: usize, mode: BlockWrite) -> Result<()> {
    let (r, c) = src.dims2()?;
    let (dr, dc) = dst.dims2()?;
    if row + r > dr || col + c > dc {
        bail!(Invalid, "block ({r}, {c}) at ({row}, {col}) does not fit in ({dr}, {dc})");
    }
    if writes_in_place(dst) {
        let src = src.to_dtype(dst.dtype())?.contiguous()?;
        return Ok(dst.inplace_op2(&src, &WriteBlock { row, col, mode })?);
    }
    let ranges = [row..row + r, col..col + c];
    let src = match mode {
        BlockWrite::Replace => src.clone(),
        BlockWrite::Add => (dst.i((row..row + r, col..col + c))? + src)?,
    };
    *dst = dst.slice_assign(&ranges, &src)?;
    Ok(())
}

struct WriteBlock {
    row: usize,
    col: usize,
    mode: BlockWrite,
}

fn write_block_slices<T: Copy + std::ops::AddAssign>(dst: &mut [T], dst_cols: usize, src: &[T], rows: usize, cols: usize, row: usize, col: usize, mode: BlockWrite) {
    for i in 0..rows {
        let d = (row + i) * dst_cols + col;
        let (d, s) = (&mut dst[d..d + cols], &src[i * cols..(i + 1) * cols]);
        match mode {
            BlockWrite::Replace => d.copy_from_slice(s),
            BlockWrite::Add => d.iter_mut().zip(s).for_each(|(d, s)| *d += *s),
        }
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
        float_dispatch!("write_block"; s1 => d, s2 => s; |_Out| write_block_slices(&mut d[o1..e1], dc, &s[o2..e2], r, c, self.row, self.col, self.mode));
        Ok(())
    }
}

/// `dst += src` for two tensors of one shape, in place on the CPU (a
/// candle in-place op; elsewhere a new sum replaces `dst`). For running
/// sums as large as a full `(P, P)` curvature: `acc = acc + part` would
/// hold a third matrix, and fault in a fresh one, every batch.
///
/// The caller must own `dst`'s storage alone: candle tensors share storage
/// between clones, and all of them see the write.
pub fn add_assign(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    if dst.dims() != src.dims() {
        bail!(Invalid, "add_assign: shapes {:?} and {:?} differ", dst.dims(), src.dims());
    }
    if !writes_in_place(dst) {
        *dst = (&*dst + src)?;
        return Ok(());
    }
    // One (1, n) block over the whole tensor: the flat view shares `dst`'s
    // storage, so the in-place block add writes `dst` (which stays the same
    // tensor, clones included).
    let n = dst.elem_count();
    add_block(&mut dst.reshape((1, n))?, &src.reshape((1, n))?, 0, 0)
}

/// Whether the block writes here change `dst` in place (a contiguous f32 or
/// f64 tensor on the CPU) rather than replace it by a new tensor.
fn writes_in_place(dst: &Tensor) -> bool {
    matches!((dst.device(), dst.dtype()), (Device::Cpu, DType::F32 | DType::F64)) && dst.is_contiguous()
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
        float_dispatch!("write_outer_rows"; s1 => d, s2 => v, s3 => u; |_Out| write_outer_slices(&mut d[o1..e1], dc, &v[o2..e2], &u[o3..e3], (k, o, i), self));
        Ok(())
    }
}

/// `dst[row0 + n·K + k, col + o·I + i] = (V_{n,k} U_nᵀ)[o, i]` for
/// `v (M, K, O, R)` and `u (M, I, R)` (any strides): per-sample weight
/// gradients of a weight-sharing layer (Conv2d), each product computed by
/// faer straight into its place in the result, samples over threads (on the
/// CPU; a batched product and [`write_block`] elsewhere).
pub fn write_products_rows(dst: &mut Tensor, v: &Tensor, u: &Tensor, row0: usize, col: usize) -> Result<()> {
    let (m, k, o, r) = v.dims4()?;
    let (mu, i, ru) = u.dims3()?;
    let (dr, dc) = dst.dims2()?;
    if (mu, ru) != (m, r) || row0 + m * k > dr || col + o * i > dc {
        bail!(
            Invalid,
            "products of {:?} and {:?} at ({row0}, {col}) do not fit in ({dr}, {dc})",
            v.dims(),
            u.dims()
        );
    }
    match (dst.device(), dst.dtype()) {
        (Device::Cpu, DType::F32 | DType::F64) if dst.is_contiguous() && u.dtype() == dst.dtype() => {
            let v = v.to_dtype(dst.dtype())?.contiguous()?;
            Ok(dst.inplace_op3(&v, u, &WriteProducts { row0, col })?)
        }
        _ => {
            let g = v.reshape((m, k * o, r))?.mm(&u.transpose(1, 2)?)?;
            write_block(dst, &g.reshape((m * k, o * i))?, row0, col)
        }
    }
}

struct WriteProducts {
    row0: usize,
    col: usize,
}

/// Raw-slice kernel of [`write_products_rows`]: `v` contiguous
/// `(M, K, O, R)`, `u` from its first element with strides `us`.
fn write_products_slices<T>(dst: &mut [T], dc: usize, v: &[T], (k, o, r): (usize, usize, usize), u: &[T], i: usize, us: &[usize], w: &WriteProducts)
where
    T: faer::traits::ComplexField + candle_core::WithDType + Send + Sync,
{
    use faer::{Accum, MatMut, MatRef, Par};
    use rayon::prelude::*;
    let one = <T as candle_core::WithDType>::from_f64(1.0);
    let m = v.len() / (k * o * r);
    let (us0, us1, us2) = (us[0], us[1] as isize, us[2] as isize);
    let up = u.as_ptr() as usize; // shared read-only across threads
    dst[w.row0 * dc..(w.row0 + m * k) * dc]
        .par_chunks_mut(k * dc)
        .enumerate()
        .for_each(|(n, rows)| {
            // SAFETY: candle's layout guarantees sample n's (I, R) block of
            // u, at n·us0 with strides (us1, us2), lies inside `u`.
            let un = unsafe { MatRef::from_raw_parts((up as *const T).add(n * us0), i, r, us1, us2) };
            for kk in 0..k {
                let base = (n * k + kk) * o * r;
                let vk = MatRef::from_row_major_slice(&v[base..base + o * r], o, r);
                let out = &mut rows[kk * dc + w.col..kk * dc + w.col + o * i];
                let g = MatMut::from_row_major_slice_mut(out, o, i);
                faer::linalg::matmul::matmul(g, Accum::Replace, vk, un.transpose(), one, Par::Seq);
            }
            super::clear_simd_upper_state(super::SimdScope::ThisThread);
        });
}

impl candle_core::InplaceOp3 for WriteProducts {
    fn name(&self) -> &'static str {
        "write_products_rows"
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
        let (_, k, o, r) = l2.shape().dims4()?;
        let (_, i, _) = l3.shape().dims3()?;
        let (Some((o1, e1)), Some((o2, e2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("write_products_rows needs a contiguous destination and V")
        };
        let (us, u0) = (l3.stride(), l3.start_offset());
        float_dispatch!("write_products_rows"; s1 => d, s2 => v, s3 => u; |_Out| write_products_slices(&mut d[o1..e1], dc, &v[o2..e2], (k, o, r), &u[u0..], i, us, self));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `add_assign` equals candle's sum: in place for contiguous f32 and
    /// f64 tensors (with a strided or other-dtype operand), by a new sum
    /// for a strided destination; shapes that differ are refused.
    #[test]
    fn add_assign_matches_candles_sum() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let a = Tensor::randn(0f64, 1.0, (7, 5), &dev)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f64, 1.0, (5, 7), &dev)?.to_dtype(dtype)?.t()?; // strided
            let want = crate::tensor::to_vec_f64(&(&a + &b)?)?;
            let mut dst = a.copy()?;
            let alias = dst.clone();
            add_assign(&mut dst, &b)?;
            assert_eq!(crate::tensor::to_vec_f64(&dst)?, want, "{dtype:?}");
            // In place: `dst` stays the same tensor, and its clones see the sum
            // (what Kron::add_assign's once-per-shared-factor rule relies on).
            assert_eq!(dst.id(), alias.id(), "{dtype:?}");
            assert_eq!(crate::tensor::to_vec_f64(&alias)?, want, "{dtype:?} clone");
            // The other dtype as the operand is converted first.
            let mut dst = a.copy()?;
            add_assign(&mut dst, &b.to_dtype(DType::F64)?.to_dtype(if dtype == DType::F32 { DType::F64 } else { DType::F32 })?)?;
            let got = crate::tensor::to_vec_f64(&dst)?;
            assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6), "{dtype:?} mixed");
            // A strided destination is replaced by a new sum.
            let mut dst = a.t()?.contiguous()?.t()?;
            assert!(!dst.is_contiguous());
            add_assign(&mut dst, &b)?;
            assert_eq!(crate::tensor::to_vec_f64(&dst)?, want, "{dtype:?} strided");
        }
        let mut dst = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let e = add_assign(&mut dst, &Tensor::zeros((3, 2), DType::F32, &dev)?).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        Ok(())
    }

    /// `add_block` adds into its block only, in place and on a strided
    /// destination alike, and refuses a block that does not fit.
    #[test]
    fn add_block_adds_into_its_block_only() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (6, 5), &dev)?;
        let b = Tensor::randn(0f64, 1.0, (2, 3), &dev)?;
        let want: Vec<f64> = {
            let (av, bv) = (crate::tensor::to_vec_f64(&a)?, crate::tensor::to_vec_f64(&b)?);
            (0..30).map(|p| {
                let (r, c) = (p / 5, p % 5);
                av[p] + if (3..5).contains(&r) && (1..4).contains(&c) { bv[(r - 3) * 3 + c - 1] } else { 0.0 }
            }).collect()
        };
        for dst in [a.copy()?, a.t()?.contiguous()?.t()?] {
            let mut dst = dst;
            add_block(&mut dst, &b, 3, 1)?;
            assert_eq!(crate::tensor::to_vec_f64(&dst)?, want);
        }
        let e = add_block(&mut a.copy()?, &b, 5, 1).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        Ok(())
    }
}
