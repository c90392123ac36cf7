//! Fused elementwise kernels on the CPU: one pass where a chain of candle
//! ops would make several.
//!
//! candle's CPU binary and unary ops are one single-threaded pass each, and
//! a broadcast binary op goes element by element. A Hardswish with its
//! derivative was ten such passes, a BatchNorm four; on the MobileNet- and
//! ResNet-style models of the sweep they were most of the forward pass.
//! Here each of those is one pass, split over rayon's threads when it is
//! large enough. Every function falls back to the same math in candle ops
//! on other devices and dtypes, and the tests check the two against each
//! other.

use std::mem::MaybeUninit;
use std::ops::{Add, Div, Mul, Neg, Sub};

use candle_core::{CpuStorage, Layout, Shape};
use rayon::prelude::*;

use super::{DType, Device, Tensor};
use crate::error::Result;

/// The float types of the CPU kernels, with the scalar functions that
/// activation formulas need. Formulas are written once, generic over it.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + candle_core::WithDType
{
    /// A constant, rounded to this type.
    fn of(v: f64) -> Self;
    /// eˣ.
    fn exp(self) -> Self;
    /// eˣ − 1, accurate near 0.
    fn exp_m1(self) -> Self;
    /// log(1 + x), accurate near 0.
    fn ln_1p(self) -> Self;
    /// tanh; in f32 the vectorizable rational approximation of [`super::tanh`].
    fn tanh(self) -> Self;
    /// The error function (candle's, so that GELU agrees with its `erf`).
    fn erf(self) -> Self;
    /// |x|.
    fn abs(self) -> Self;
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn exp_m1(self) -> Self {
        f32::exp_m1(self)
    }
    fn ln_1p(self) -> Self {
        f32::ln_1p(self)
    }
    fn tanh(self) -> Self {
        super::elementwise::fast_tanh_f32(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn exp_m1(self) -> Self {
        f64::exp_m1(self)
    }
    fn ln_1p(self) -> Self {
        f64::ln_1p(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
}

/// A scalar function f and its derivative f', evaluated together.
pub trait WithDerivative: Sync {
    /// Its cost per element, relative to a comparison and a select (1); a
    /// call of `exp` or `erf` is about 16. Sets how many elements make a
    /// parallel task worth its start.
    const COST: usize = 1;

    /// (f(x), f'(x)).
    fn eval<T: Real>(&self, x: T) -> (T, T);
}

/// Elements of the cheapest pass (a multiply-add or a select per element)
/// per parallel task: below this a pass runs on the calling thread. Waking
/// a rayon worker costs 10–15 µs on the 2-core machine of `bench/`, the time
/// such a pass takes for about 10⁵ elements (measured: a ReLU with its
/// derivative, 0.14 ns per element on one thread).
const ELEMENTS_PER_TASK: usize = 1 << 17;

/// The chunk length that splits `n` elements of relative cost `cost` over
/// rayon's threads, at least [`ELEMENTS_PER_TASK`]` / cost` and a multiple
/// of `unit` (so chunks start on a row).
fn chunk_len(n: usize, unit: usize, cost: usize) -> usize {
    let least = ELEMENTS_PER_TASK / cost.max(1);
    let per_thread = n.div_ceil(rayon::current_num_threads()).max(least).max(1);
    per_thread.div_ceil(unit.max(1)) * unit.max(1)
}

/// A buffer of `n` elements written by `fill(start, chunk)` over disjoint
/// chunks of whole `unit`s (in parallel when `n` times the relative `cost`
/// per element is large); `fill` must write every element of its chunk.
pub(super) fn filled<T: Send>(n: usize, unit: usize, cost: usize, fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(n);
    let len = chunk_len(n, unit, cost);
    out.spare_capacity_mut()[..n].par_chunks_mut(len).enumerate().for_each(|(i, c)| fill(i * len, c));
    // SAFETY: `fill` wrote every element of every chunk, and the chunks cover 0..n.
    unsafe { out.set_len(n) };
    out
}

/// Is `t` a tensor these kernels run on (CPU, f32 or f64)?
pub(super) fn on_cpu_float(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// `kernel` applied to the values of `x` (made contiguous), for a CPU f32 or
/// f64 tensor; `None` for other devices and dtypes.
fn on_host<R>(x: &Tensor, kernel: impl FnOnce(HostSlice<'_>) -> R) -> Result<Option<R>> {
    if !on_cpu_float(x) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    Ok(match cpu {
        CpuStorage::F32(v) => slice_of(v, layout).map(|v| kernel(HostSlice::F32(v))),
        CpuStorage::F64(v) => slice_of(v, layout).map(|v| kernel(HostSlice::F64(v))),
        _ => None,
    })
}

/// The values of a CPU tensor, by dtype.
enum HostSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// (f(x), f'(x)) elementwise in one pass, for a CPU f32/f64 tensor; `None`
/// elsewhere (the caller computes them with tensor ops).
pub fn map_with_derivative<F: WithDerivative>(f: &F, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    fn run<T: Real, F: WithDerivative>(f: &F, x: &[T]) -> (Vec<T>, Vec<T>) {
        let n = x.len();
        let (mut values, mut slopes) = (Vec::<T>::with_capacity(n), Vec::<T>::with_capacity(n));
        let len = chunk_len(n, 1, F::COST);
        let (ys, ds) = (&mut values.spare_capacity_mut()[..n], &mut slopes.spare_capacity_mut()[..n]);
        ys.par_chunks_mut(len).zip(ds.par_chunks_mut(len)).enumerate().for_each(|(i, (ys, ds))| {
            for ((y, d), &xv) in ys.iter_mut().zip(ds.iter_mut()).zip(&x[i * len..]) {
                let (fy, fd) = f.eval(xv);
                y.write(fy);
                d.write(fd);
            }
        });
        // SAFETY: the zipped chunks cover 0..n of both, and every element was written.
        unsafe {
            values.set_len(n);
            slopes.set_len(n);
        }
        (values, slopes)
    }
    let pair = on_host(x, |v| match v {
        HostSlice::F32(v) => {
            let (y, d) = run(f, v);
            (Tensor::from_vec(y, x.shape(), x.device()), Tensor::from_vec(d, x.shape(), x.device()))
        }
        HostSlice::F64(v) => {
            let (y, d) = run(f, v);
            (Tensor::from_vec(y, x.shape(), x.device()), Tensor::from_vec(d, x.shape(), x.device()))
        }
    })?;
    Ok(match pair {
        Some((y, d)) => Some((y?, d?)),
        None => None,
    })
}

/// f(x) alone, elementwise in one pass (the derivative is not computed),
/// for a CPU f32/f64 tensor; `None` elsewhere.
pub fn map_value<F: WithDerivative>(f: &F, x: &Tensor) -> Result<Option<Tensor>> {
    fn run<T: Real, F: WithDerivative>(f: &F, x: &[T]) -> Vec<T> {
        filled(x.len(), 1, F::COST, |start, out| {
            for (y, &xv) in out.iter_mut().zip(&x[start..]) {
                y.write(f.eval(xv).0);
            }
        })
    }
    let y = on_host(x, |v| match v {
        HostSlice::F32(v) => Tensor::from_vec(run(f, v), x.shape(), x.device()),
        HostSlice::F64(v) => Tensor::from_vec(run(f, v), x.shape(), x.device()),
    })?;
    Ok(y.transpose()?)
}

/// Σ over axis `dim` of `t²`, removing the axis: `(…, K, …) → (…, …)`, in
/// one pass on the CPU (the diagonals' Σ_k V² and Σ_n g²; squaring and then
/// summing were two passes, and a sum over a middle axis a third through a
/// product with a row of ones).
pub fn sum_sq_dim(t: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let mut out_shape = dims.clone();
    out_shape.remove(dim);
    let (l, k, r) = (dims[..dim].iter().product::<usize>(), dims[dim], dims[dim + 1..].iter().product::<usize>());
    /// out[a, j] = Σ_k v[a, k, j]², for the flat output range of each chunk
    /// (chunks may split a row: each piece sums its own columns).
    fn run<T: Real>(v: &[T], l: usize, k: usize, r: usize) -> Vec<T> {
        filled(l * r, 1, k.max(1), |start, out| {
            let mut pos = start;
            let mut rest = out;
            while !rest.is_empty() {
                let (a, j) = (pos / r, pos % r);
                let len = (r - j).min(rest.len());
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                let row = |kk: usize| &v[(a * k + kk) * r + j..(a * k + kk) * r + j + len];
                match k {
                    0 => piece.iter_mut().for_each(|o| {
                        o.write(T::of(0.0));
                    }),
                    _ => piece.iter_mut().zip(row(0)).for_each(|(o, &x)| {
                        o.write(x * x);
                    }),
                }
                // SAFETY: every element of `piece` was written just above.
                let piece = unsafe { &mut *(piece as *mut [MaybeUninit<T>] as *mut [T]) };
                for kk in 1..k {
                    piece.iter_mut().zip(row(kk)).for_each(|(o, &x)| *o = *o + x * x);
                }
                pos += len;
                rest = tail;
            }
        })
    }
    let y = on_host(t, |v| match v {
        HostSlice::F32(v) => Tensor::from_vec(run(v, l, k, r), out_shape.as_slice(), t.device()),
        HostSlice::F64(v) => Tensor::from_vec(run(v, l, k, r), out_shape.as_slice(), t.device()),
    })?;
    match y {
        Some(y) => Ok(y?),
        None => super::sum_dim(&t.sqr()?, dim),
    }
}

/// `v ⊙ d` with `v (M, K, *s)` and `d (M, *s)`: every one of the K rows of
/// sample m times that sample's `d` (the backward pass of a diagonal
/// Jacobian, Jᵀv = σ'(x) ⊙ v, on K sensitivity rows at once).
pub fn mul_rows(v: &Tensor, d: &Tensor) -> Result<Tensor> {
    broadcast(Arith::Mul, v, &d.unsqueeze(1)?)
}

/// An elementwise arithmetic operation of [`broadcast`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Arith {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a · b.
    Mul,
    /// a / b.
    Div,
}

impl Arith {
    #[inline(always)]
    fn apply<T: Real>(self, a: T, b: T) -> T {
        match self {
            Arith::Add => a + b,
            Arith::Sub => a - b,
            Arith::Mul => a * b,
            Arith::Div => a / b,
        }
    }
}

/// `a ∘ b` with numpy broadcasting, as candle's `broadcast_add` / `_sub` /
/// `_mul` / `_div` (same shapes, same errors): on the CPU one pass over
/// the operands' strides (no copy of a broadcast or strided operand),
/// vectorized where the innermost run is contiguous or broadcast, split
/// over rayon's threads when large.
pub fn broadcast(op: Arith, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fast = on_cpu_float(a) && a.dtype() == b.dtype() && matches!(b.device(), Device::Cpu);
    let shape = match fast.then(|| a.shape().broadcast_shape_binary_op(b.shape(), "broadcast")) {
        Some(Ok(shape)) => shape,
        // Other devices and dtypes, and every shape error: candle's op.
        _ => {
            return Ok(match op {
                Arith::Add => a.broadcast_add(b)?,
                Arith::Sub => a.broadcast_sub(b)?,
                Arith::Mul => a.broadcast_mul(b)?,
                Arith::Div => a.broadcast_div(b)?,
            })
        }
    };
    let (a, b) = (a.broadcast_as(&shape)?, b.broadcast_as(&shape)?);
    Ok(a.apply_op2_no_bwd(&b, &Broadcast(op))?)
}

struct Broadcast(Arith);

/// The iteration space of a broadcast binary op after merging axes that
/// are contiguous in both operands: `outer` axes walked by index, then one
/// innermost run of `len` elements with strides `inner`.
struct Walk {
    outer: Vec<usize>,
    outer_strides: [Vec<usize>; 2],
    offsets: [usize; 2],
    len: usize,
    inner: [usize; 2],
}

impl Walk {
    fn new(dims: &[usize], layouts: [&Layout; 2]) -> Walk {
        // Merge axis i into i + 1 (from the right) where both operands step
        // over axis i by exactly axis i + 1's extent.
        let mut merged: Vec<(usize, [usize; 2])> = Vec::new();
        for (i, &n) in dims.iter().enumerate().rev() {
            let st = [layouts[0].stride()[i], layouts[1].stride()[i]];
            if n == 1 {
                continue;
            }
            match merged.last_mut() {
                Some((len, inner)) if (0..2).all(|j| st[j] == inner[j] * *len) => *len *= n,
                _ => merged.push((n, st)),
            }
        }
        merged.reverse();
        let (len, inner) = merged.pop().unwrap_or((1, [0, 0]));
        Walk {
            outer: merged.iter().map(|m| m.0).collect(),
            outer_strides: [merged.iter().map(|m| m.1[0]).collect(), merged.iter().map(|m| m.1[1]).collect()],
            offsets: [layouts[0].start_offset(), layouts[1].start_offset()],
            len,
            inner,
        }
    }

    /// The operands' offsets at outer position `pos` (row-major over `outer`).
    fn offsets_at(&self, mut pos: usize) -> [usize; 2] {
        let mut off = self.offsets;
        for (i, &n) in self.outer.iter().enumerate().rev() {
            let idx = pos % n;
            pos /= n;
            off[0] += idx * self.outer_strides[0][i];
            off[1] += idx * self.outer_strides[1][i];
        }
        off
    }
}

/// One run of `out.len()` results: the innermost loop, specialized to the
/// stride patterns that vectorize.
#[inline(always)]
fn run<T: Real>(op: Arith, out: &mut [MaybeUninit<T>], a: &[T], b: &[T], [sa, sb]: [usize; 2]) {
    let n = out.len();
    macro_rules! each {
        ($f:expr) => {
            match op {
                Arith::Add => out.iter_mut().enumerate().for_each(|(i, o)| { o.write($f(i, Arith::Add)); }),
                Arith::Sub => out.iter_mut().enumerate().for_each(|(i, o)| { o.write($f(i, Arith::Sub)); }),
                Arith::Mul => out.iter_mut().enumerate().for_each(|(i, o)| { o.write($f(i, Arith::Mul)); }),
                Arith::Div => out.iter_mut().enumerate().for_each(|(i, o)| { o.write($f(i, Arith::Div)); }),
            }
        };
    }
    match (sa, sb) {
        (1, 1) => {
            let (a, b) = (&a[..n], &b[..n]);
            each!(|i: usize, op: Arith| op.apply(a[i], b[i]))
        }
        (1, 0) => {
            let (a, b0) = (&a[..n], b[0]);
            each!(|i: usize, op: Arith| op.apply(a[i], b0))
        }
        (0, 1) => {
            let (a0, b) = (a[0], &b[..n]);
            each!(|i: usize, op: Arith| op.apply(a0, b[i]))
        }
        _ => each!(|i: usize, op: Arith| op.apply(a[i * sa], b[i * sb])),
    }
}

impl candle_core::CustomOp2 for Broadcast {
    fn name(&self) -> &'static str {
        "broadcast-arith"
    }

    fn cpu_fwd(&self, sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = la.shape().clone();
        let walk = Walk::new(shape.dims(), [la, lb]);
        let op = self.0;
        fn kernel<T: Real>(op: Arith, walk: &Walk, a: &[T], b: &[T], n: usize) -> Vec<T> {
            let len = walk.len;
            filled(n, len, 1, |start, out| {
                let mut pos = start / len.max(1);
                for o in out.chunks_mut(len.max(1)) {
                    let [oa, ob] = walk.offsets_at(pos);
                    run(op, o, &a[oa..], &b[ob..], walk.inner);
                    pos += 1;
                }
            })
        }
        let n = shape.elem_count();
        let out = float_dispatch!("broadcast arithmetic"; sa => a, sb => b; |Out| Out(kernel(op, &walk, a, b, n)));
        Ok((out, shape))
    }
}

/// The contiguous part of `v` that `layout` covers.
pub(super) fn slice_of<'a, T>(v: &'a [T], layout: &Layout) -> Option<&'a [T]> {
    let (start, end) = layout.contiguous_offsets()?;
    Some(&v[start..end])
}

/// `x · scale_c + shift_c` per channel c, where c indexes axis `axis` of
/// `x` (`scale`, `shift` of shape `(C,)`; no shift: 0), in one pass: the
/// per-channel affine maps of BatchNorm, forward (axis 1 of `(M, C, *s)`)
/// and backward (axis 2 of `(M, K, C, *s)`).
pub fn channel_affine(x: &Tensor, axis: usize, scale: &Tensor, shift: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let c = dims[axis];
    let (a, r) = (dims[..axis].iter().product::<usize>(), dims[axis + 1..].iter().product::<usize>());
    let fits = |t: &Tensor| t.dims() == [c] && t.dtype() == x.dtype();
    if !on_cpu_float(x) || !fits(scale) || !shift.is_none_or(fits) || r == 0 {
        let mut y = x.reshape((a, c, r))?.broadcast_mul(&scale.reshape((1, c, 1))?)?;
        if let Some(s) = shift {
            y = y.broadcast_add(&s.reshape((1, c, 1))?)?;
        }
        return Ok(y.reshape(dims)?);
    }
    let params = match shift {
        Some(s) => Tensor::stack(&[scale, s], 0)?,
        None => Tensor::stack(&[scale, &scale.zeros_like()?], 0)?,
    }; // (2, C)
    Ok(x.contiguous()?.apply_op2_no_bwd(&params, &ChannelAffine { channels: c, run: r })?)
}

struct ChannelAffine {
    channels: usize,
    run: usize,
}

impl candle_core::CustomOp2 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ps: &CpuStorage, pl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, r) = (self.channels, self.run);
        fn run<T: Real>(x: &[T], p: &[T], c: usize, r: usize) -> Vec<T> {
            let (scale, shift) = p.split_at(c);
            filled(x.len(), r, 1, |start, out| {
                for (j, (o, xx)) in out.chunks_mut(r).zip(x[start..].chunks(r)).enumerate() {
                    let ch = (start / r + j) % c;
                    let (a, b) = (scale[ch], shift[ch]);
                    for (o, &v) in o.iter_mut().zip(xx) {
                        o.write(v * a + b);
                    }
                }
            })
        }
        let out = float_dispatch!("channel-affine"; xs => x, ps => p; |Out| {
            let (Some(x), Some(p)) = (slice_of(x, xl), slice_of(p, pl)) else {
                candle_core::bail!("channel-affine needs contiguous inputs")
            };
            Out(run(x, p, c, r))
        });
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (super::super::to_vec_f64(a).unwrap(), super::super::to_vec_f64(b).unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
        }
    }

    /// Σ_k t² over every axis, with parallel chunks that split rows, and
    /// K = 1 and K = 0, against squaring and summing in candle.
    #[test]
    fn sum_sq_dim_is_the_sum_of_squares() {
        for dtype in [DType::F64, DType::F32] {
            for (dims, dim) in [(vec![3, 4, 5], 1), (vec![3, 4, 5], 0), (vec![3, 4, 5], 2), (vec![1, 640, 4096], 1), (vec![256, 10, 300], 1), (vec![5, 1, 7], 1), (vec![4, 0, 3], 1)] {
                let t = Tensor::randn(0f64, 1.0, dims.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let want = t.sqr().unwrap().sum(dim).unwrap();
                close(&sum_sq_dim(&t, dim).unwrap(), &want);
            }
        }
    }

    /// Shapes small and large (the large ones split into parallel chunks
    /// that do not start on a sample or channel boundary of their own).
    #[test]
    fn mul_rows_is_a_broadcast_product() {
        for dtype in [DType::F64, DType::F32] {
            for (m, k, s) in [(2, 3, vec![2, 2]), (1, 1, vec![5]), (37, 4, vec![3, 31, 29]), (300, 1, vec![1000]), (3, 2, vec![])] {
                let mut vd = vec![m, k];
                vd.extend(&s);
                let mut dd = vec![m];
                dd.extend(&s);
                let v = Tensor::randn(0f64, 1.0, vd.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let d = Tensor::randn(0f64, 1.0, dd.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let want = v.broadcast_mul(&d.unsqueeze(1).unwrap()).unwrap();
                close(&mul_rows(&v, &d).unwrap(), &want);
            }
        }
        // A strided view of v (made contiguous first) and a shape that does not fit (candle's error).
        let v = Tensor::randn(0f64, 1.0, (4, 3, 5), &Device::Cpu).unwrap();
        let d = Tensor::randn(0f64, 1.0, (3, 4), &Device::Cpu).unwrap();
        let vt = v.transpose(0, 2).unwrap(); // (5, 3, 4)
        let dt = Tensor::randn(0f64, 1.0, (5, 4), &Device::Cpu).unwrap();
        close(&mul_rows(&vt, &dt).unwrap(), &vt.broadcast_mul(&dt.unsqueeze(1).unwrap()).unwrap());
        assert!(mul_rows(&v, &d).is_err());
    }

    /// Every op on every broadcast pattern the graph ops make (same shape,
    /// per-sample (M, 1, *s) columns, per-channel (C, 1, 1) scales, scalars,
    /// rank-padded operands), on strided views and on sizes that split into
    /// parallel chunks, against candle's broadcast ops.
    #[test]
    fn broadcast_agrees_with_candle() {
        let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![2, 3, 4], vec![2, 3, 4]),
            (vec![4, 3, 2, 5, 5], vec![4, 1, 2, 5, 5]),
            (vec![8, 16, 6, 6], vec![8, 16, 1, 1]),
            (vec![8, 16, 6, 6], vec![16, 1, 1]),
            (vec![1], vec![5, 7]),
            (vec![5, 7], vec![1]),
            (vec![3, 1, 4], vec![1, 5, 1]),
            (vec![64, 32, 24, 24], vec![64, 1, 24, 24]),
            (vec![64, 32, 24, 24], vec![64, 32, 1, 1]),
            (vec![0, 3], vec![1, 3]),
        ];
        for dtype in [DType::F64, DType::F32] {
            for (da, db) in &cases {
                let a = Tensor::randn(0f64, 1.0, da.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let b = (Tensor::randn(0f64, 1.0, db.as_slice(), &Device::Cpu).unwrap().abs().unwrap() + 0.5)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                for op in [Arith::Add, Arith::Sub, Arith::Mul, Arith::Div] {
                    let want = match op {
                        Arith::Add => a.broadcast_add(&b),
                        Arith::Sub => a.broadcast_sub(&b),
                        Arith::Mul => a.broadcast_mul(&b),
                        Arith::Div => a.broadcast_div(&b),
                    }
                    .unwrap();
                    close(&broadcast(op, &a, &b).unwrap(), &want);
                    close(&broadcast(op, &b, &a).unwrap(), &match op {
                        Arith::Add => b.broadcast_add(&a),
                        Arith::Sub => b.broadcast_sub(&a),
                        Arith::Mul => b.broadcast_mul(&a),
                        Arith::Div => b.broadcast_div(&a),
                    }
                    .unwrap());
                }
            }
        }
        // Strided views: a transposed operand and a narrowed one.
        let a = Tensor::randn(0f64, 1.0, (6, 5, 4), &Device::Cpu).unwrap();
        let at = a.transpose(0, 2).unwrap(); // (4, 5, 6)
        let b = Tensor::randn(0f64, 1.0, (4, 9, 6), &Device::Cpu).unwrap().narrow(1, 2, 5).unwrap();
        close(&broadcast(Arith::Mul, &at, &b).unwrap(), &at.broadcast_mul(&b).unwrap());
        close(&broadcast(Arith::Sub, &b, &at.narrow(1, 0, 1).unwrap()).unwrap(), &b.broadcast_sub(&at.narrow(1, 0, 1).unwrap()).unwrap());
        // Shapes that do not broadcast: candle's error.
        assert!(broadcast(Arith::Add, &a, &b).is_err());
    }

    #[test]
    fn channel_affine_is_a_broadcast_affine_map() {
        for dtype in [DType::F64, DType::F32] {
            for (dims, axis) in [(vec![2, 3, 4, 4], 1), (vec![2, 5, 3, 4, 4], 2), (vec![7, 6], 1), (vec![64, 24, 32, 32], 1), (vec![16, 10, 24, 16, 16], 2)] {
                let c = dims[axis];
                let x = Tensor::randn(0f64, 1.0, dims.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let a = Tensor::randn(0f64, 1.0, c, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let b = Tensor::randn(0f64, 1.0, c, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let mut bshape = vec![1; dims.len()];
                bshape[axis] = c;
                let (ab, bb) = (a.reshape(bshape.as_slice()).unwrap(), b.reshape(bshape.as_slice()).unwrap());
                let want = x.broadcast_mul(&ab).unwrap().broadcast_add(&bb).unwrap();
                close(&channel_affine(&x, axis, &a, Some(&b)).unwrap(), &want);
                close(&channel_affine(&x, axis, &a, None).unwrap(), &x.broadcast_mul(&ab).unwrap());
            }
        }
    }

    /// A non-CPU-float tensor takes candle's ops: f32 parameters on an f64
    /// tensor are a dtype error there, not a wrong answer here.
    #[test]
    fn mismatched_dtypes_go_to_candle() {
        let x = Tensor::randn(0f64, 1.0, (2, 3, 4), &Device::Cpu).unwrap();
        let a = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert!(channel_affine(&x, 1, &a, None).is_err());
    }
}
