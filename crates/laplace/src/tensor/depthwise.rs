//! Depthwise convolution computed directly, without unfolding the input.
//!
//! With one input channel per group (depthwise: groups = in_channels, and
//! out_channels a multiple of it), im2col writes every input element
//! kh·kw times and the product that follows is a batch of (1 × kh·kw)
//! rows: on MobileNet-style blocks the unfolding was 40 % of a forward pass.
//! Here each output plane is accumulated from its input plane, one kernel
//! tap at a time, and written in its final `(M, O, H', W')` layout. The
//! input plane is first zero-padded and split into its stride phases
//! ([`Phases`]), so that every tap, at any stride and dilation, is one
//! contiguous multiply-add over the whole plane.
//!
//! Used where no patches are kept: forward passes that save nothing (the
//! layers below a last-layer subset, predictions) and tangents (J ẋ). A
//! pass that keeps patches for the weight's curvature still unfolds once.
//!
//! The transpose ([`Depthwise::apply_transposed`], Jᵀ v for the backward
//! pass) runs the same offsets the other way: each input plane gathers its
//! output planes' taps directly, where im2col's transpose would write
//! Wᵀ V (kh·kw rows per channel) and then scatter it back.

use candle_core::{CpuStorage, Layout, Shape};

use super::fused::{filled, on_cpu_float, slice_of, Real};
use super::Tensor;
use crate::error::{bail, Result};

/// The geometry of a depthwise convolution: C input planes `(H, W)`, O = a
/// multiple of C output planes `(H', W')`, output channel o reading input
/// channel o / (O / C).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Depthwise {
    /// Input channels C (= groups).
    pub channels: usize,
    /// Output channels O, a multiple of C.
    pub out_channels: usize,
    /// Input plane (H, W).
    pub in_hw: [usize; 2],
    /// Kernel (kh, kw).
    pub kernel: [usize; 2],
    /// Stride (rows, columns).
    pub stride: [usize; 2],
    /// Zero padding before (top, left); padding after shows only in `out_hw`.
    pub pad_before: [usize; 2],
    /// Dilation (rows, columns).
    pub dilation: [usize; 2],
    /// Output plane (H', W').
    pub out_hw: [usize; 2],
}

impl Depthwise {
    /// z[m, o] = b[o] + Σ_{ky,kx} w[o, ky, kx] · x[m, o / (O/C)](y·s + ky·d − p, x·s + kx·d − p)
    /// (zero outside the plane), for `x (M, C, H, W)`, weight `(O, 1, kh, kw)`
    /// or `(O, kh·kw)`, bias `(O,)`: `(M, O, H', W')`. `None` off the CPU
    /// or for other dtypes than f32 / f64 (the caller unfolds instead).
    pub fn apply(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
        let [c, h, w] = [self.channels, self.in_hw[0], self.in_hw[1]];
        let o = self.out_channels;
        self.check_params(weight, bias)?;
        if x.rank() != 4 || x.dims()[1..] != [c, h, w] {
            bail!(Invalid, "depthwise convolution: input {:?} is not (M, {c}, {h}, {w})", x.dims());
        }
        let same_dtype = |t: &Tensor| t.dtype() == x.dtype();
        if !on_cpu_float(x) || !same_dtype(weight) || !bias.is_none_or(same_dtype) {
            return Ok(None);
        }
        let weight = weight.flatten_all()?;
        let params = match bias {
            Some(b) => Tensor::cat(&[&weight, b], 0)?,
            None => Tensor::cat(&[&weight, &Tensor::zeros(o, x.dtype(), x.device())?], 0)?,
        }; // (O·taps + O,)
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&params, self)?))
    }

    /// The geometry's channels, and a weight `(O, kh·kw)` (any shape of as
    /// many elements) and bias `(O,)` that fit it; shared by both directions.
    fn check_params(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let (c, o) = (self.channels, self.out_channels);
        let taps = self.kernel[0] * self.kernel[1];
        if c == 0 || o % c != 0 {
            bail!(Invalid, "depthwise convolution: {o} output channels are not a multiple of {c} input channels");
        }
        if weight.elem_count() != o * taps {
            bail!(Invalid, "depthwise convolution: weight {:?} does not fit {o} channels of {taps} taps", weight.dims());
        }
        if let Some(b) = bias.filter(|b| b.dims() != [o]) {
            bail!(Invalid, "depthwise convolution: bias {:?} does not fit {o} channels", b.dims());
        }
        Ok(())
    }

    /// Output planes `(H', W')` of `m` samples; every element written.
    /// Per plane: its input plane into the phase buffer (once for the
    /// O/C output channels that read it), then one multiply-add per tap
    /// into a wide output, whose rows are copied out.
    fn run<T: Real>(&self, x: &[T], params: &[T], m: usize) -> Vec<T> {
        let Some(ph) = Phases::of(self) else { return Vec::new() }; // H'·W' = 0
        let [oh, ow] = self.out_hw;
        let taps = self.kernel[0] * self.kernel[1];
        let (c, o) = (self.channels, self.out_channels);
        let per_input = o / c;
        let (weights, bias) = params.split_at(o * taps);
        let (in_plane, plane) = (self.in_hw[0] * self.in_hw[1], oh * ow);
        filled(m * o * plane, plane, taps, |start, out| {
            // Scratch per chunk. The slots no input element fills stay zero.
            let mut buf = vec![T::of(0.0); ph.size];
            let mut wide = vec![T::of(0.0); ph.len];
            let mut loaded = usize::MAX; // the input plane now in `buf`
            for (j, dst) in out.chunks_mut(plane).enumerate() {
                let (mi, oc) = ((start / plane + j) / o, (start / plane + j) % o);
                let from = mi * c + oc / per_input;
                if from != loaded {
                    let src = &x[from * in_plane..][..in_plane];
                    ph.for_each_run(self, |at, step, n, slot| copy_run(&src[at..], step, &mut buf[slot..][..n]));
                    loaded = from;
                }
                wide.fill(bias[oc]);
                for (&wv, &off) in weights[oc * taps..][..taps].iter().zip(&ph.offsets) {
                    axpy(&mut wide, wv, &buf[off..]);
                }
                for (yo, drow) in dst.chunks_mut(ow).enumerate() {
                    for (d, &z) in drow.iter_mut().zip(&wide[yo * ph.wq..][..ow]) {
                        d.write(z);
                    }
                }
            }
        })
    }
}

impl Depthwise {
    /// The transpose of [`Depthwise::apply`] without its bias, the input
    /// gradient of the backward pass:
    /// x̄[m, c](yi, xi) = Σ_{o ∈ c's outputs} Σ_{ky,kx : yi = y·s + ky·d − p, xi = x·s + kx·d − p} w[o, ky, kx] · v[m, o](y, x),
    /// for `v (M, O, H', W')`: `(M, C, H, W)`, every input element written
    /// (zero where no tap lands). `None` off the CPU or for other dtypes
    /// than f32 / f64.
    pub fn apply_transposed(&self, v: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
        let [o, oh, ow] = [self.out_channels, self.out_hw[0], self.out_hw[1]];
        self.check_params(weight, None)?;
        if v.rank() != 4 || v.dims()[1..] != [o, oh, ow] {
            bail!(Invalid, "depthwise convolution: output sensitivities {:?} are not (M, {o}, {oh}, {ow})", v.dims());
        }
        if !on_cpu_float(v) || weight.dtype() != v.dtype() {
            return Ok(None);
        }
        Ok(Some(v.contiguous()?.apply_op2_no_bwd(&weight.flatten_all()?, &Transposed(*self))?))
    }

    /// Input planes `(H, W)` of `m` samples from output planes `v`; every
    /// element written. [`Self::run`]'s offsets the other way: each of the
    /// plane's O/C output planes, widened (zero in the scratch columns), is
    /// added into the phase buffer at every tap's offset, and the input
    /// gradient is read back out of the phases.
    fn run_transposed<T: Real>(&self, v: &[T], weights: &[T], m: usize) -> Vec<T> {
        let in_plane = self.in_hw[0] * self.in_hw[1];
        let Some(ph) = Phases::of(self) else { return vec![T::of(0.0); m * self.channels * in_plane] };
        let [oh, ow] = self.out_hw;
        let taps = self.kernel[0] * self.kernel[1];
        let (c, o) = (self.channels, self.out_channels);
        let per_input = o / c;
        let out_plane = oh * ow;
        filled(m * c * in_plane, in_plane.max(1), per_input * taps, |start, out| {
            let mut buf = vec![T::of(0.0); ph.size];
            // The scratch columns stay zero: only the first W' of each row are written.
            let mut wide = vec![T::of(0.0); ph.len];
            for (j, dst) in out.chunks_mut(in_plane.max(1)).enumerate() {
                let (mi, ci) = ((start / in_plane + j) / c, (start / in_plane + j) % c);
                buf.fill(T::of(0.0));
                for oc in ci * per_input..(ci + 1) * per_input {
                    let src = &v[(mi * o + oc) * out_plane..][..out_plane];
                    for (yo, row) in src.chunks(ow).enumerate() {
                        wide[yo * ph.wq..][..ow].copy_from_slice(row);
                    }
                    for (&wv, &off) in weights[oc * taps..][..taps].iter().zip(&ph.offsets) {
                        axpy(&mut buf[off..][..ph.len], wv, &wide);
                    }
                }
                for d in dst.iter_mut() {
                    d.write(T::of(0.0));
                }
                // SAFETY: every element of `dst` was written just above.
                let dst = unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
                ph.for_each_run(self, |at, step, n, slot| {
                    let run = &buf[slot..][..n];
                    if step == 1 {
                        dst[at..][..n].copy_from_slice(run);
                    } else {
                        for (k, &g) in run.iter().enumerate() {
                            dst[at + k * step] = g;
                        }
                    }
                });
            }
        })
    }
}

/// The zero-padded input plane split into its stride phases, where every
/// tap is one contiguous multiply-add.
///
/// With P the plane zero-padded by (py, px) before, P[i, j] = x[i − py, j − px],
/// the output is z(yo, xo) = b + Σ_{ky,kx} w[ky, kx] · P[yo·sy + ky·dy, xo·sx + kx·dx].
/// Split P into its sy·sx phases Φ_{a,b}[u, v] = P[u·sy + a, v·sx + b],
/// each (Hq, Wq) = (H' + ⌊(kh−1)·dy / sy⌋, W' + ⌊(kw−1)·dx / sx⌋). Writing
/// ky·dy = qy·sy + a and kx·dx = qx·sx + b, tap (ky, kx) reads
/// Φ_{a,b}[yo + qy, xo + qx]. In a wide output of row length Wq, at
/// t = yo·Wq + xo, the tap is one multiply-add of `len` = (H'−1)·Wq + W'
/// elements, z[t] += w · Φ_{a,b}[t + qy·Wq + qx]; the columns xo ≥ W' of
/// the wide rows are scratch, dropped when the rows are copied out. At
/// stride 1 there is one phase, the padded plane itself.
///
/// Against a walk over (tap, output row) pairs, which sets up a loop per
/// pair (a 28 × 28 MNIST plane, 5 × 5 kernel: 600 multiply-adds of 24
/// elements), this does one per tap (25 of 668).
struct Phases {
    /// Rows and columns of one phase.
    hq: usize,
    wq: usize,
    /// Elements of the phase buffer, sy·sx·Hq·Wq.
    size: usize,
    /// Elements of a wide output, (H'−1)·Wq + W'.
    len: usize,
    /// Each tap's start in the phase buffer, in weight order (ky·kw + kx):
    /// phase (a, b) at row qy, column qx.
    offsets: Vec<usize>,
}

impl Phases {
    /// The phase form of a geometry with a non-empty output.
    fn of(g: &Depthwise) -> Option<Phases> {
        let ([oh, ow], [kh, kw], [sy, sx], [dy, dx]) = (g.out_hw, g.kernel, g.stride, g.dilation);
        if oh == 0 || ow == 0 || sy == 0 || sx == 0 {
            return None;
        }
        let (hq, wq) = (oh + (kh - 1) * dy / sy, ow + (kw - 1) * dx / sx);
        let phase = hq * wq;
        let offsets = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| (ky * dy, kx * dx)))
            .map(|(ry, rx)| ((ry % sy) * sx + rx % sx) * phase + (ry / sy) * wq + rx / sx)
            .collect();
        Some(Phases { hq, wq, size: sy * sx * phase, len: (oh - 1) * wq + ow, offsets })
    }

    /// Every run of input elements that lie side by side in one phase row,
    /// as `visit(at, step, n, slot)`: the input elements at, at + step, …
    /// (n of them, in an input plane `(H, W)`) are the phase buffer's
    /// slot, slot + 1, …. Input elements no tap reads are in no run.
    fn for_each_run(&self, g: &Depthwise, mut visit: impl FnMut(usize, usize, usize, usize)) {
        let ([h, w], [sy, sx], [py, px]) = (g.in_hw, g.stride, g.pad_before);
        let phase = self.hq * self.wq;
        for yi in 0..h {
            let (a, u) = ((yi + py) % sy, (yi + py) / sy);
            if u >= self.hq {
                break; // later rows lie further down
            }
            for b in 0..sx {
                // The input columns xi with (xi + px) mod sx = b, from xi0.
                let xi0 = (b + sx - px % sx) % sx;
                let v0 = (xi0 + px) / sx;
                if xi0 >= w || v0 >= self.wq {
                    continue;
                }
                let n = (w - xi0).div_ceil(sx).min(self.wq - v0);
                visit(yi * w + xi0, sx, n, (a * sx + b) * phase + u * self.wq + v0);
            }
        }
    }
}

/// `dst[k] = src[k · step]` for every k of `dst`.
#[inline]
fn copy_run<T: Copy>(src: &[T], step: usize, dst: &mut [T]) {
    if step == 1 {
        dst.copy_from_slice(&src[..dst.len()]);
    } else {
        for (k, d) in dst.iter_mut().enumerate() {
            *d = src[k * step];
        }
    }
}

/// `acc[t] += w · src[t]` over the shorter of the two. The build targets
/// baseline x86-64, whose vectors are SSE2's 128 bits; where the CPU has
/// AVX2 the same loop runs compiled for it (256-bit vectors, twice the
/// lanes), chosen at run time.
#[inline]
fn axpy<T: Real>(acc: &mut [T], w: T, src: &[T]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the one feature `axpy_avx2` is compiled for.
        return unsafe { axpy_avx2(acc, w, src) };
    }
    axpy_portable(acc, w, src)
}

#[inline(always)]
fn axpy_portable<T: Real>(acc: &mut [T], w: T, src: &[T]) {
    for (a, &x) in acc.iter_mut().zip(src) {
        *a = *a + w * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2<T: Real>(acc: &mut [T], w: T, src: &[T]) {
    axpy_portable(acc, w, src)
}

/// The transposed convolution as a candle op: inputs `v (M, O, H', W')` and
/// the flat weight `(O·kh·kw,)`.
struct Transposed(Depthwise);

impl candle_core::CustomOp2 for Transposed {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-transposed"
    }

    fn cpu_fwd(&self, vs: &CpuStorage, vl: &Layout, ws: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let m = vl.shape().dims()[0];
        let out = float_dispatch!("depthwise-conv2d-transposed"; vs => v, ws => w; |Out| {
            let (Some(v), Some(w)) = (slice_of(v, vl), slice_of(w, wl)) else {
                candle_core::bail!("depthwise-conv2d-transposed needs contiguous inputs")
            };
            Out(g.run_transposed(v, w, m))
        });
        Ok((out, Shape::from((m, g.channels, g.in_hw[0], g.in_hw[1]))))
    }
}

impl candle_core::CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ps: &CpuStorage, pl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let m = xl.shape().dims()[0];
        let out = float_dispatch!("depthwise-conv2d"; xs => x, ps => p; |Out| {
            let (Some(x), Some(p)) = (slice_of(x, xl), slice_of(p, pl)) else {
                candle_core::bail!("depthwise-conv2d needs contiguous inputs")
            };
            Out(self.run(x, p, m))
        });
        Ok((out, Shape::from((m, self.out_channels, self.out_hw[0], self.out_hw[1]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, Device};

    /// torch's definition term by term, independently of the kernels' walk:
    /// every (output element, tap, input element) triple of one plane pair,
    /// as (yo·W' + xo, ky·kw + kx, yi·W + xi), where the tap lands inside.
    fn landings(g: &Depthwise) -> Vec<(usize, usize, usize)> {
        let ([h, w], [oh, ow], [kh, kw]) = (g.in_hw, g.out_hw, g.kernel);
        let mut all = Vec::new();
        for (yo, xo, ky, kx) in (0..oh).flat_map(|a| (0..ow).flat_map(move |b| (0..kh).flat_map(move |p| (0..kw).map(move |q| (a, b, p, q))))) {
            let yi = (yo * g.stride[0] + ky * g.dilation[0]) as isize - g.pad_before[0] as isize;
            let xi = (xo * g.stride[1] + kx * g.dilation[1]) as isize - g.pad_before[1] as isize;
            if (0..h as isize).contains(&yi) && (0..w as isize).contains(&xi) {
                all.push((yo * ow + xo, ky * kw + kx, yi as usize * w + xi as usize));
            }
        }
        all
    }

    /// The reference forward pass, summed in f64 over [`landings`].
    fn reference(g: &Depthwise, x: &[f64], wt: &[f64], b: &[f64], m: usize) -> Vec<f64> {
        let (plane, out_plane, taps) = (g.in_hw[0] * g.in_hw[1], g.out_hw[0] * g.out_hw[1], g.kernel[0] * g.kernel[1]);
        let (c, o, mult) = (g.channels, g.out_channels, g.out_channels / g.channels);
        let mut out = vec![0.0; m * o * out_plane];
        for (plane_out, chunk) in out.chunks_mut(out_plane.max(1)).enumerate() {
            chunk.fill(b[plane_out % o]);
        }
        for mi in 0..m {
            for oc in 0..o {
                for &(at, tap, from) in &landings(g) {
                    out[(mi * o + oc) * out_plane + at] += wt[oc * taps + tap] * x[(mi * c + oc / mult) * plane + from];
                }
            }
        }
        out
    }

    /// The reference transpose, each output element's taps scattered back
    /// over [`landings`], summed in f64.
    fn reference_transposed(g: &Depthwise, v: &[f64], wt: &[f64], m: usize) -> Vec<f64> {
        let (plane, out_plane, taps) = (g.in_hw[0] * g.in_hw[1], g.out_hw[0] * g.out_hw[1], g.kernel[0] * g.kernel[1]);
        let (c, o, mult) = (g.channels, g.out_channels, g.out_channels / g.channels);
        let mut out = vec![0.0; m * c * plane];
        for mi in 0..m {
            for oc in 0..o {
                for &(at, tap, from) in &landings(g) {
                    out[(mi * c + oc / mult) * plane + from] += wt[oc * taps + tap] * v[(mi * o + oc) * out_plane + at];
                }
            }
        }
        out
    }

    /// (samples, geometry): 3×3 "same" padding, stride 2 with asymmetric
    /// padding, dilation, a channel multiplier of 2, a kernel wider than the
    /// padding reaches (taps that never land; one case with an empty
    /// output), a 1×1 kernel, a size that runs on several threads, stride 1
    /// with dilation, asymmetric padding and a multiplier, one input channel with eight
    /// outputs (an MNIST first layer), stride 2 down the rows only, and
    /// strides 3 × 2 with dilation, padding and a multiplier (six phases,
    /// taps in several of them).
    fn cases() -> [(usize, Depthwise); 11] {
        let g = |c, o, in_hw, kernel, stride, pad_before, dilation, out_hw| Depthwise { channels: c, out_channels: o, in_hw, kernel, stride, pad_before, dilation, out_hw };
        [
            (2, g(3, 3, [5, 6], [3, 3], [1, 1], [1, 1], [1, 1], [5, 6])),
            (2, g(3, 3, [7, 8], [3, 3], [2, 2], [1, 0], [1, 1], [4, 3])),
            (3, g(2, 4, [6, 6], [3, 2], [1, 2], [2, 1], [2, 1], [6, 3])),
            (1, g(2, 2, [4, 4], [5, 5], [1, 1], [0, 0], [1, 1], [0, 0])),
            (1, g(2, 2, [3, 3], [5, 5], [1, 1], [1, 1], [1, 1], [1, 1])),
            (2, g(4, 4, [3, 5], [1, 1], [1, 1], [0, 0], [1, 1], [3, 5])),
            (64, g(32, 32, [16, 16], [3, 3], [1, 1], [1, 1], [1, 1], [16, 16])),
            (2, g(2, 4, [6, 7], [3, 3], [1, 1], [2, 1], [2, 2], [6, 4])),
            (3, g(1, 8, [12, 12], [5, 5], [1, 1], [0, 0], [1, 1], [8, 8])),
            (2, g(2, 2, [7, 6], [3, 3], [2, 1], [1, 1], [1, 1], [4, 6])),
            (2, g(2, 4, [11, 10], [3, 4], [3, 2], [2, 1], [2, 1], [4, 5])),
        ]
    }

    /// Against the definition, in f64 and f32, on every geometry of [`cases`].
    #[test]
    fn matches_the_definition() -> Result<()> {
        let dev = Device::Cpu;
        let cases = cases();
        for (m, geo) in cases {
            let taps = geo.kernel[0] * geo.kernel[1];
            let x = Tensor::randn(0f64, 1.0, (m, geo.channels, geo.in_hw[0], geo.in_hw[1]), &dev)?;
            let wt = Tensor::randn(0f64, 1.0, (geo.out_channels, 1, geo.kernel[0], geo.kernel[1]), &dev)?;
            let b = Tensor::randn(0f64, 1.0, geo.out_channels, &dev)?;
            let xs = crate::tensor::to_vec_f64(&x)?;
            let ws = crate::tensor::to_vec_f64(&wt)?;
            let want = reference(&geo, &xs, &ws, &crate::tensor::to_vec_f64(&b)?, m);
            let want0 = reference(&geo, &xs, &ws, &vec![0.0; geo.out_channels], m);
            assert_eq!(ws.len(), geo.out_channels * taps);
            for dtype in [DType::F64, DType::F32] {
                let (xd, wd, bd) = (x.to_dtype(dtype)?, wt.to_dtype(dtype)?, b.to_dtype(dtype)?);
                for (bias, want) in [(Some(&bd), &want), (None, &want0)] {
                    let got = geo.apply(&xd, &wd, bias)?.expect("CPU float runs the kernel");
                    assert_eq!(got.dims(), &[m, geo.out_channels, geo.out_hw[0], geo.out_hw[1]]);
                    let got = crate::tensor::to_vec_f64(&got)?;
                    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                    let err = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                    assert!(err < tol, "{geo:?} {dtype:?} bias {}: {err}", bias.is_some());
                }
            }
        }
        Ok(())
    }

    /// The transpose against the definition (each output element's taps
    /// scattered back, summed in f64) and against the forward kernel by
    /// adjointness, ⟨apply(x), v⟩ = ⟨x, apply_transposed(v)⟩, on every
    /// geometry of [`cases`] (taps that never land leave
    /// zeros; an empty output gives an all-zero input gradient).
    #[test]
    fn transpose_matches_the_definition_and_is_the_adjoint() -> Result<()> {
        let dev = Device::Cpu;
        let cases = cases();
        for (m, geo) in cases {
            let ([h, w], [oh, ow], [kh, kw]) = (geo.in_hw, geo.out_hw, geo.kernel);
            let (c, o) = (geo.channels, geo.out_channels);
            let x = Tensor::randn(0f64, 1.0, (m, c, h, w), &dev)?;
            let v = Tensor::randn(0f64, 1.0, (m, o, oh, ow), &dev)?;
            let wt = Tensor::randn(0f64, 1.0, (o, 1, kh, kw), &dev)?;
            let want = reference_transposed(&geo, &crate::tensor::to_vec_f64(&v)?, &crate::tensor::to_vec_f64(&wt)?, m);
            for dtype in [DType::F64, DType::F32] {
                let (xd, vd, wd) = (x.to_dtype(dtype)?, v.to_dtype(dtype)?, wt.to_dtype(dtype)?);
                let got = geo.apply_transposed(&vd, &wd)?.expect("CPU float runs the kernel");
                assert_eq!(got.dims(), &[m, c, h, w]);
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                let got64 = crate::tensor::to_vec_f64(&got)?;
                let err = got64.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                // relative to the largest element: an input element sums up to O/C·kh·kw terms
                let scale = want.iter().fold(1.0f64, |a, b| a.max(b.abs()));
                assert!(err < tol * scale, "{geo:?} {dtype:?}: {err} (largest element {scale})");
                let fwd = geo.apply(&xd, &wd, None)?.expect("CPU float runs the kernel");
                let lhs: f64 = fwd.to_dtype(DType::F64)?.mul(&v)?.sum_all()?.to_scalar()?;
                let rhs: f64 = x.mul(&got.to_dtype(DType::F64)?)?.sum_all()?.to_scalar()?;
                assert!((lhs - rhs).abs() <= tol * (1.0 + lhs.abs()) * 10.0, "{geo:?} {dtype:?}: ⟨Ax, v⟩ = {lhs}, ⟨x, Aᵀv⟩ = {rhs}");
            }
        }
        let geo = cases[0].1;
        let w = Tensor::zeros((3, 1, 3, 3), DType::F32, &dev)?;
        let e = geo.apply_transposed(&Tensor::zeros((1, 3, 5, 5), DType::F32, &dev)?, &w).unwrap_err().to_string();
        assert!(e.contains("are not (M, 3, 5, 6)"), "{e}");
        Ok(())
    }

    /// Shapes that do not fit the geometry are errors that say so.
    #[test]
    fn refuses_shapes_that_do_not_fit() {
        let dev = Device::Cpu;
        let geo = Depthwise { channels: 2, out_channels: 2, in_hw: [4, 4], kernel: [3, 3], stride: [1, 1], pad_before: [1, 1], dilation: [1, 1], out_hw: [4, 4] };
        let w = Tensor::zeros((2, 1, 3, 3), DType::F32, &dev).unwrap();
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let e = geo.apply(&x, &w, None).unwrap_err().to_string();
        assert!(e.contains("is not (M, 2, 4, 4)"), "{e}");
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
        let e = geo.apply(&x, &w.narrow(0, 0, 1).unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("does not fit 2 channels"), "{e}");
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let e = geo.apply(&x, &w, Some(&b)).unwrap_err().to_string();
        assert!(e.contains("bias [3] does not fit 2 channels"), "{e}");
    }
}
