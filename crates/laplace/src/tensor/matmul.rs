//! Matrix products, through faer on the CPU.
//!
//! candle's CPU products go through the `gemm` crate, whose AVX-512 kernels
//! are behind its nightly-only feature: on a stable compiler it runs AVX2
//! kernels on a machine that has AVX-512. faer's GEMM (`private-gemm-x86`)
//! picks AVX-512 at run time. Measured on this project's 2-core AVX-512 VM,
//! f32, 2 threads (`bench/MATMUL.md`): faer is 1.3–2.6× as fast on the
//! shapes the engine multiplies (im2col products of convolutions, MLP
//! layers and their gradients, square products), and within the run-to-run
//! noise on a batch of tiny per-sample products. On other devices and dtypes
//! [`matmul`] is candle's own product, so the result is the same op
//! everywhere; only its kernel differs.
//!
//! Operands keep their strides: faer reads any row and column stride, so a
//! transposed or sliced view is multiplied without a copy.
//!
//! Every faer product is followed by [`clear_simd_upper_state`]: faer's x86
//! microkernels are hand-written assembly that returns with the upper halves
//! of the vector registers in use, and until a `vzeroupper` each
//! legacy-SSE instruction on that thread pays a state-transition penalty.
//! The rest of the crate (and candle's elementwise kernels) is compiled for
//! baseline x86-64, which is SSE: measured, an im2col gather right after a
//! faer product ran 25× slower on the same two threads (15 ms instead of
//! 0.6 ms).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{DType, Device, Tensor};
use crate::error::Result;

/// Which threads a faer routine may have run its kernels on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SimdScope {
    /// Only the calling thread (`Par::Seq`).
    ThisThread,
    /// The calling thread and rayon's pool (`Par::rayon`).
    AllThreads,
}

/// Clear the upper halves of the vector registers (`vzeroupper`) on the
/// threads of `scope`, after a faer routine whose assembly kernels left
/// them in use (see the module documentation). A no-op off x86-64 and on
/// CPUs without AVX.
pub fn clear_simd_upper_state(scope: SimdScope) {
    #[cfg(target_arch = "x86_64")]
    {
        fn this_thread() {
            if std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: the CPU supports AVX (checked above); vzeroupper
                // only zeroes bits 128 and up of the vector registers, which
                // compiled code never keeps live across a call.
                unsafe { std::arch::x86_64::_mm256_zeroupper() }
            }
        }
        this_thread();
        if scope == SimdScope::AllThreads {
            // Queued, not waited for: a worker runs its broadcast jobs before
            // it takes or steals the next task.
            rayon::spawn_broadcast(|_| this_thread());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = scope;
}

/// Multiply-adds below which a product runs on one thread: the threading
/// threshold of the `gemm` crate (48 · 48 · 256), which candle's products
/// used; splitting a smaller product costs more in synchronization than it
/// saves.
pub const THREADING_THRESHOLD: usize = 48 * 48 * 256;

/// How a faer routine of `macs` multiply-adds runs, and which threads to
/// clear after it: on rayon's threads at or above the threading threshold,
/// on the calling thread below it.
pub fn faer_par(macs: usize) -> (Par, SimdScope) {
    if macs >= THREADING_THRESHOLD {
        (Par::rayon(0), SimdScope::AllThreads)
    } else {
        (Par::Seq, SimdScope::ThisThread)
    }
}

/// `a @ b` for `a (…, m, k)` and `b (…, k, n)` with the same leading
/// (batch) dimensions: `(…, m, n)`, as candle's `Tensor::matmul` (same
/// shapes, same errors). f32 and f64 CPU tensors go through faer; anything
/// else through candle.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let faer_path = matches!(a.device(), Device::Cpu)
        && matches!(b.device(), Device::Cpu)
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
        && product_dims(a.dims(), b.dims()).is_some();
    if !faer_path {
        // Also the path of every shape error: candle's message names both shapes.
        return Ok(a.matmul(b)?);
    }
    Ok(a.apply_op2_no_bwd(b, &FaerMatmul)?)
}

/// `a.mm(&b)` for [`matmul`]`(&a, &b)`, so that products chain like
/// candle's (`x.mm(&w)?.reshape(…)?`). The name is torch's.
pub trait Mm {
    /// [`matmul`]`(self, rhs)`.
    fn mm(&self, rhs: &Tensor) -> Result<Tensor>;
}

impl Mm for Tensor {
    fn mm(&self, rhs: &Tensor) -> Result<Tensor> {
        matmul(self, rhs)
    }
}

/// (batch, m, k, n) of a product whose shapes agree (rank ≥ 2, equal
/// leading dimensions, equal inner dimension).
fn product_dims(a: &[usize], b: &[usize]) -> Option<(usize, usize, usize, usize)> {
    let r = a.len();
    if r < 2 || b.len() != r || a[..r - 2] != b[..r - 2] || a[r - 1] != b[r - 2] {
        return None;
    }
    Some((a[..r - 2].iter().product(), a[r - 2], a[r - 1], b[r - 1]))
}

/// Offset of every batch element of a layout (row-major over the leading
/// dimensions, any strides, broadcast ones included).
fn batch_offsets(layout: &Layout) -> Vec<usize> {
    let dims = layout.dims();
    let stride = layout.stride();
    let lead = dims.len() - 2;
    let mut offsets = vec![layout.start_offset()];
    for d in 0..lead {
        offsets = offsets.iter().flat_map(|&o| (0..dims[d]).map(move |i| o + i * stride[d])).collect();
    }
    offsets
}

/// (row stride, column stride) of a layout's last two dimensions.
fn mat_strides(layout: &Layout) -> (isize, isize) {
    let s = layout.stride();
    (s[s.len() - 2] as isize, s[s.len() - 1] as isize)
}

struct FaerMatmul;

/// One product per batch element into a row-major `(batch, m, n)` buffer.
/// A product above the threading threshold gets all of rayon's threads;
/// smaller ones run one per thread when there are enough of them.
fn kernel<T>(a: &[T], la: &Layout, b: &[T], lb: &Layout, (batch, m, k, n): (usize, usize, usize, usize)) -> Vec<T>
where
    T: faer::traits::ComplexField + candle_core::WithDType + Send + Sync,
{
    let zero = <T as candle_core::WithDType>::from_f64(0.0);
    let one = <T as candle_core::WithDType>::from_f64(1.0);
    let len = batch * m * n;
    if len == 0 || k == 0 {
        return vec![zero; len]; // an empty sum is 0
    }
    // The output is not zeroed first: every product overwrites its block
    // (`Accum::Replace` never reads it). Zeroing it was a memset of every
    // product's output, 20 % of MobileNet's KFAC GGN, whose outputs are
    // large and short-lived (Wᵀ V in a convolution's backward).
    let mut out: Vec<T> = Vec::with_capacity(len);
    let (oa, ob) = (batch_offsets(la), batch_offsets(lb));
    let ((ars, acs), (brs, bcs)) = (mat_strides(la), mat_strides(lb));
    let each = m * n * k;
    let product = |i: usize, c: &mut [MaybeUninit<T>], par: Par| {
        debug_assert_eq!(c.len(), m * n);
        // SAFETY: candle's layouts place batch element i of `a` at oa[i]
        // with strides (ars, acs) over (m, k), and of `b` at ob[i] with
        // (brs, bcs) over (k, n), inside their storage slices; `c` is this
        // product's own m·n block of the output, row-major, which faer only
        // writes (Replace).
        let (ai, bi, ci) = unsafe {
            (
                MatRef::from_raw_parts(a.as_ptr().add(oa[i]), m, k, ars, acs),
                MatRef::from_raw_parts(b.as_ptr().add(ob[i]), k, n, brs, bcs),
                MatMut::from_raw_parts_mut(c.as_mut_ptr() as *mut T, m, n, n as isize, 1),
            )
        };
        faer::linalg::matmul::matmul(ci, Accum::Replace, ai, bi, one, par);
    };
    let blocks = &mut out.spare_capacity_mut()[..len];
    if each >= THREADING_THRESHOLD {
        let (par, scope) = faer_par(each);
        blocks.chunks_mut(m * n).enumerate().for_each(|(i, c)| product(i, c, par));
        clear_simd_upper_state(scope);
    } else if batch > 1 && batch * each >= THREADING_THRESHOLD {
        // Contiguous runs of products per thread (one task each, not one per product).
        let per = batch.div_ceil(rayon::current_num_threads());
        blocks.par_chunks_mut(per * m * n).enumerate().for_each(|(t, cs)| {
            cs.chunks_mut(m * n).enumerate().for_each(|(j, c)| product(t * per + j, c, Par::Seq));
            clear_simd_upper_state(SimdScope::ThisThread);
        });
        clear_simd_upper_state(SimdScope::ThisThread);
    } else {
        blocks.chunks_mut(m * n).enumerate().for_each(|(i, c)| product(i, c, Par::Seq));
        clear_simd_upper_state(SimdScope::ThisThread);
    }
    // SAFETY: the batch's products wrote every one of the len elements.
    unsafe { out.set_len(len) };
    out
}

impl CustomOp2 for FaerMatmul {
    fn name(&self) -> &'static str {
        "faer-matmul"
    }

    fn cpu_fwd(&self, sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(dims) = product_dims(la.dims(), lb.dims()) else {
            candle_core::bail!("faer matmul: shapes {:?} and {:?} do not multiply", la.dims(), lb.dims())
        };
        let (_, m, _, n) = dims;
        let mut shape = la.dims()[..la.dims().len() - 2].to_vec();
        shape.extend([m, n]);
        let out = float_dispatch!("faer matmul"; sa => a, sb => b; |Out| Out(kernel(a, la, b, lb, dims)));
        Ok((out, Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
        let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
        let scale = want.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale.max(1e-300)
    }

    /// Every layout the engine hands to a product (contiguous, transposed,
    /// sliced, permuted batch dimensions, broadcast batch dimensions, empty
    /// and threaded sizes) agrees with candle's product.
    #[test]
    fn matches_candles_product_on_every_layout() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-5 };
            let r = |s: &[usize]| Tensor::randn(0f64, 1.0, s, &dev).unwrap().to_dtype(dtype).unwrap();
            let mut cases: Vec<(Tensor, Tensor)> = vec![
                (r(&[3, 4]), r(&[4, 5])),
                (r(&[1, 1]), r(&[1, 1])),
                (r(&[300, 200]), r(&[200, 100])), // above the threading threshold
                (r(&[4, 3]).t()?, r(&[5, 4]).t()?),
                (r(&[2, 3, 4]), r(&[2, 4, 6])),
                (r(&[64, 9, 30]), r(&[64, 30, 20])), // many small products over threads
                (r(&[4, 2, 3]).transpose(0, 1)?, r(&[2, 3, 5])),
                (r(&[2, 3, 7, 4]).narrow(2, 2, 3)?, r(&[2, 3, 4, 2])),
                (r(&[3, 4]).unsqueeze(0)?.broadcast_as((5, 3, 4))?, r(&[5, 4, 2])),
                (r(&[0, 4]), r(&[4, 3])),
                (r(&[3, 0]), r(&[0, 2])),
            ];
            cases.push((r(&[6, 8]).narrow(1, 1, 5)?, r(&[5, 9]).narrow(1, 2, 4)?));
            for (a, b) in &cases {
                let got = matmul(a, b)?;
                let want = a.contiguous()?.matmul(&b.contiguous()?)?;
                assert_eq!(got.dims(), want.dims(), "{:?} @ {:?}", a.dims(), b.dims());
                assert_eq!(got.dtype(), dtype);
                if want.elem_count() > 0 {
                    let e = max_rel(&got, &want);
                    assert!(e <= tol, "{dtype:?} {:?} @ {:?}: relative error {e}", a.dims(), b.dims());
                }
            }
        }
        Ok(())
    }

    /// The output buffer is not zeroed first, so every element must be
    /// written by the products: with the allocator's last freed block of
    /// the same size full of NaN (which it hands out again), each branch
    /// (one threaded product, many small ones over threads, one small one)
    /// still gives candle's finite result.
    #[test]
    fn every_output_element_is_written() -> Result<()> {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f64, 1.0, s, &dev).unwrap().to_dtype(DType::F32).unwrap();
        for (a, b) in [(r(&[300, 200]), r(&[200, 100])), (r(&[64, 9, 30]), r(&[64, 30, 20])), (r(&[7, 5]), r(&[5, 3]))] {
            let want = a.matmul(&b)?;
            for _ in 0..3 {
                drop(std::hint::black_box(vec![f32::NAN; want.elem_count()]));
                let got = matmul(&a, &b)?;
                let v = got.flatten_all()?.to_vec1::<f32>()?;
                assert!(v.iter().all(|x| x.is_finite()), "{:?} @ {:?}: an element was left unwritten", a.dims(), b.dims());
                assert!(max_rel(&got, &want) <= 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_get_candles_error() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((5, 2), DType::F32, &dev).unwrap();
        let e = matmul(&a, &b).unwrap_err().to_string();
        assert!(e.contains("[3, 4]") && e.contains("[5, 2]"), "{e}");
    }

    #[test]
    fn other_dtypes_take_candles_product() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 3), &dev)?.to_dtype(DType::BF16)?;
        let b = Tensor::randn(0f32, 1.0, (3, 2), &dev)?.to_dtype(DType::BF16)?;
        let (got, want) = (matmul(&a, &b)?, a.matmul(&b)?);
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(got.to_dtype(DType::F32)?.to_vec2::<f32>()?, want.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        Ok(())
    }
}
