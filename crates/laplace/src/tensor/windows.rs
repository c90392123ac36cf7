//! Sliding-window gathers and scatters (im2col, col2im, max-pool argmax)
//! on an index table.
//!
//! A [`WindowTable`] has `outer × inner` entries; each is a flat position in
//! a per-sample input of length D, or D itself (the *sentinel*) where the
//! window lies in the padding. Convolution uses outer = I = C·kh·kw patch
//! rows and inner = R output positions; pooling uses outer = C·kh·kw too.
//!
//! Layout, and why: the gathered patches are `(outer, B, inner)`. As a
//! matrix `(outer, B·inner)` they are the right operand of the whole-batch
//! convolution product W U, whose result `(O, B, R)` becomes the sample-first
//! `(B, O, R)` by copying contiguous runs of R values; and per sample they are
//! the `(I, R)` matrix U_b that per-sample gradients need, as a strided view.
//! No element-wise transposes anywhere.
//!
//! On the CPU (f32, f64) these are candle custom ops: one pass over the
//! output, each sample's input row staying in L1. Elsewhere they fall back
//! to candle's `index_select` / `index_add` on a transposed copy.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, WithDType};
use rayon::prelude::*;

use super::{index_tensor, select, select_adjoint, transpose2d, DType, Device, Tensor};
use crate::error::{Error, Result};

/// An im2col index table (see the module documentation).
pub struct WindowTable {
    table: Arc<[u32]>,
    /// The same table compressed into runs, for the CPU gather and scatter.
    runs: Arc<Runs>,
    /// The same table as a device tensor, for the generic path.
    ids: Tensor,
    outer: usize,
    inner: usize,
    input_len: usize,
}

impl WindowTable {
    /// `table` laid out `(outer, inner)`, entries in `0..=input_len`.
    pub fn new(table: &[usize], outer: usize, inner: usize, input_len: usize, device: &Device) -> Result<Self> {
        assert_eq!(table.len(), outer * inner, "window table of the wrong length");
        debug_assert!(table.iter().all(|&t| t <= input_len));
        let ids = index_tensor(table, device)?;
        let runs = Arc::new(Runs::new(table, outer, inner, input_len));
        let table: Arc<[u32]> = table.iter().map(|&t| t as u32).collect();
        Ok(WindowTable {
            table,
            runs,
            ids,
            outer,
            inner,
            input_len,
        })
    }

    /// im2col: `x (B, D) → (outer, B, inner)`,
    /// out[j, b, r] = x[b, table[j, r]], or `fill` at the sentinel.
    pub fn gather(&self, x: &Tensor, fill: f64) -> Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.reshape((b, ()))?;
        self.check_input(&x)?;
        if is_cpu_float(&x) {
            let op = Gather {
                runs: self.runs.clone(),
                outer: self.outer,
                inner: self.inner,
                input_len: self.input_len,
                fill,
            };
            return Ok(x.contiguous()?.apply_op1_no_bwd(&op)?);
        }
        self.gather_generic(&x, fill)
    }

    /// [`WindowTable::gather`] by candle's `index_select`: inputs as
    /// columns `(D + 1, B)` with the fill row, rows gathered.
    fn gather_generic(&self, x: &Tensor, fill: f64) -> Result<Tensor> {
        let b = x.dim(0)?;
        let cols = transpose2d(x)?;
        let pad = Tensor::full(fill, (1, b), x.device())?.to_dtype(x.dtype())?;
        let cols = Tensor::cat(&[&cols, &pad], 0)?;
        let g = select(&cols, &self.ids, 0)?.reshape((self.outer, self.inner, b))?;
        Ok(g.transpose(1, 2)?.contiguous()?)
    }

    /// col2im, the adjoint of [`WindowTable::gather`] without the sentinel:
    /// `cols (outer, B, inner) → (B, D)`, out[b, table[j, r]] += cols[j, b, r].
    pub fn scatter(&self, cols: &Tensor) -> Result<Tensor> {
        let (outer, _, inner) = cols.dims3()?;
        if (outer, inner) != (self.outer, self.inner) {
            return Err(Error::Invalid(format!(
                "window scatter: columns {:?} do not match the table ({}, B, {})",
                cols.dims(),
                self.outer,
                self.inner
            )));
        }
        if is_cpu_float(cols) {
            let op = Scatter {
                runs: self.runs.clone(),
                outer,
                inner,
                input_len: self.input_len,
            };
            return Ok(cols.contiguous()?.apply_op1_no_bwd(&op)?);
        }
        self.scatter_generic(cols)
    }

    /// [`WindowTable::scatter`] of `cols (outer, B, inner)` added into rows
    /// `row0..row0 + B` of `dst (N, D)`: a backward pass in chunks of
    /// columns writes each chunk's col2im into its rows of one result,
    /// instead of concatenating per-chunk results (a copy of all of it).
    /// In place on the CPU (f32 / f64, `dst` contiguous); elsewhere the rows
    /// are replaced by their sum with a new tensor.
    pub fn scatter_add_into(&self, dst: &mut Tensor, cols: &Tensor, row0: usize) -> Result<()> {
        let (outer, b, inner) = cols.dims3()?;
        let (n, d) = dst.dims2()?;
        if (outer, inner, d) != (self.outer, self.inner, self.input_len) || row0 + b > n {
            return Err(Error::Invalid(format!(
                "window scatter: columns {:?} into rows {row0}.. of {:?} do not match the table ({}, B, {}) → (B, {})",
                cols.dims(),
                dst.dims(),
                self.outer,
                self.inner,
                self.input_len
            )));
        }
        if is_cpu_float(cols) && dst.dtype() == cols.dtype() && dst.is_contiguous() {
            let op = ScatterInto {
                scatter: Scatter { runs: self.runs.clone(), outer, inner, input_len: self.input_len },
                row0,
            };
            return Ok(dst.inplace_op2(&cols.contiguous()?, &op)?);
        }
        let sum = (dst.narrow(0, row0, b)? + self.scatter(cols)?)?;
        *dst = dst.slice_assign(&[row0..row0 + b, 0..d], &sum)?;
        Ok(())
    }

    /// [`WindowTable::scatter`] by candle's `index_add` on rows.
    fn scatter_generic(&self, cols: &Tensor) -> Result<Tensor> {
        let (outer, b, inner) = cols.dims3()?;
        let rows = cols.transpose(1, 2)?.contiguous()?.reshape((outer * inner, b))?;
        let full = select_adjoint(&rows, &self.ids, 0, self.input_len + 1)?;
        transpose2d(&full.narrow(0, 0, self.input_len)?)
    }

    /// Max pooling's choice: for a table laid out `(C, L, R)` (outer = C·L,
    /// L = `window_len` elements per window), the flat input position of the
    /// first maximal element of each window in scan order (torch's choice at
    /// ties), `(B, C·R)` u32. Padding never wins (it is −∞).
    pub fn argmax(&self, x: &Tensor, window_len: usize) -> Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.reshape((b, ()))?;
        self.check_input(&x)?;
        assert_eq!(self.outer % window_len, 0, "window length does not divide the table");
        let c = self.outer / window_len;
        if is_cpu_float(&x) {
            let op = Argmax {
                table: self.table.clone(),
                channels: c,
                window_len,
                positions: self.inner,
                input_len: self.input_len,
            };
            return Ok(x.contiguous()?.apply_op1_no_bwd(&op)?);
        }
        self.argmax_generic(&x, window_len)
    }

    /// [`WindowTable::argmax`] by candle's `argmax` over gathered windows.
    fn argmax_generic(&self, x: &Tensor, window_len: usize) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (c, l, r) = (self.outer / window_len, window_len, self.inner);
        let u = self.gather_generic(x, f64::NEG_INFINITY)?.reshape((c, l, b, r))?;
        let arg = u.argmax_keepdim(1)?; // (C, 1, B, R), index into L
        let table = self.ids.reshape((c, l, 1, r))?.broadcast_as((c, l, b, r))?;
        let pos = super::gather(&table, &arg, 1)?; // (C, 1, B, R)
        Ok(pos.reshape((c, b, r))?.transpose(0, 1)?.contiguous()?.reshape((b, c * r))?)
    }

    /// `x (B, D)` at flat positions `pos (B, J)` (u32) per sample:
    /// out[b, j] = x[b, pos[b, j]], e.g. the maxima found by
    /// [`WindowTable::argmax`].
    pub fn pick(x: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.reshape((b, ()))?;
        if is_cpu_float(&x) && pos.dtype() == DType::U32 {
            return Ok(x.contiguous()?.apply_op2_no_bwd(&pos.contiguous()?, &Pick)?);
        }
        super::gather(&x, pos, 1)
    }

    /// The adjoint of [`WindowTable::pick`] for K columns per sample:
    /// `v (B, K, J)`, `pos (B, J)` → `(B, K, D)` with
    /// out[b, k, pos[b, j]] += v[b, k, j] (max pooling's backward pass).
    pub fn unpick(v: &Tensor, pos: &Tensor, d: usize) -> Result<Tensor> {
        let (b, k, j) = v.dims3()?;
        if is_cpu_float(v) && pos.dtype() == DType::U32 {
            let op = Unpick { d };
            return Ok(v.contiguous()?.apply_op2_no_bwd(&pos.contiguous()?, &op)?);
        }
        let ids = pos.unsqueeze(1)?.broadcast_as((b, k, j))?;
        super::gather_adjoint(v, &ids, 2, &[b, k, d])
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let d = x.dim(1)?;
        if d != self.input_len {
            return Err(Error::Invalid(format!(
                "window gather: input of {d} values per sample, table built for {}",
                self.input_len
            )));
        }
        Ok(())
    }
}

fn is_cpu_float(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Each row j of a table as maximal runs of consecutive positions r whose
/// entries step through the input by a constant stride (sentinel entries
/// dropped): r, r + 1, … read t, t + step, …. A stride-s convolution has
/// one run per output row, of step s, so gathers and scatters become slice
/// copies (step 1) or strided loops, never one call per element.
struct Runs {
    /// (r, t, len, step) for every run, row after row.
    runs: Vec<Run>,
    /// Row j's runs are `runs[start[j]..start[j + 1]]`.
    start: Vec<usize>,
}

#[derive(Clone, Copy)]
struct Run {
    r: u32,
    t: u32,
    len: u32,
    step: u32,
}

impl Runs {
    fn new(table: &[usize], outer: usize, inner: usize, input_len: usize) -> Self {
        let mut runs = Vec::new();
        let mut start = Vec::with_capacity(outer + 1);
        for j in 0..outer {
            start.push(runs.len());
            let row = &table[j * inner..(j + 1) * inner];
            let live = |r: usize| r < inner && row[r] < input_len;
            let mut r = 0;
            while r < inner {
                if !live(r) {
                    r += 1;
                    continue;
                }
                // The step is set by the next entry (1 for a lone entry).
                let step = if live(r + 1) && row[r + 1] > row[r] { row[r + 1] - row[r] } else { 1 };
                let mut len = 1;
                while live(r + len) && row[r + len] == row[r] + len * step {
                    len += 1;
                }
                runs.push(Run { r: r as u32, t: row[r] as u32, len: len as u32, step: step as u32 });
                r += len;
            }
        }
        start.push(runs.len());
        Runs { runs, start }
    }

    /// Row j's runs as (r, t, len, step).
    fn row(&self, j: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        self.runs[self.start[j]..self.start[j + 1]]
            .iter()
            .map(|run| (run.r as usize, run.t as usize, run.len as usize, run.step as usize))
    }
}

struct Gather {
    runs: Arc<Runs>,
    outer: usize,
    inner: usize,
    input_len: usize,
    fill: f64,
}

/// Samples per block: their input rows (and output runs) stay in L1/L2
/// while every window row j visits them.
const SAMPLE_BLOCK: usize = 16;

fn gather_kernel<T: WithDType>(x: &[T], op: &Gather) -> Vec<T> {
    let (d, outer, inner) = (op.input_len, op.outer, op.inner);
    let b = x.len() / d;
    let n = outer * b * inner;
    if n == 0 {
        return Vec::new();
    }
    // Every element is written exactly once below (runs copied, the gaps
    // between them set to the fill value), so the buffer starts
    // uninitialized: no memset of an output 9× (3 × 3 kernel) to 25× the
    // input ahead of the copies.
    let fill = T::from_f64(op.fill);
    let mut out: Vec<T> = Vec::with_capacity(n);
    // Threads own ranges of window rows j (disjoint output slabs (j, B, inner)).
    let rows_per_task = outer.div_ceil(2 * rayon::current_num_threads()).max(1);
    let fill_slab = |task: usize, slab: &mut [std::mem::MaybeUninit<T>]| {
        let j0 = task * rows_per_task;
        let rows = slab.len() / (b * inner);
        for s0 in (0..b).step_by(SAMPLE_BLOCK) {
            let s1 = (s0 + SAMPLE_BLOCK).min(b);
            for jj in 0..rows {
                for s in s0..s1 {
                    let row = &x[s * d..(s + 1) * d];
                    let dst = &mut slab[(jj * b + s) * inner..(jj * b + s + 1) * inner];
                    // Runs come in increasing r; what lies between them is padding.
                    let mut at = 0;
                    for (r, t, len, step) in op.runs.row(j0 + jj) {
                        dst[at..r].iter_mut().for_each(|e| {
                            e.write(fill);
                        });
                        if step == 1 {
                            dst[r..r + len].write_copy_of_slice(&row[t..t + len]);
                        } else {
                            let src = row[t..=t + (len - 1) * step].iter().step_by(step);
                            dst[r..r + len].iter_mut().zip(src).for_each(|(e, &v)| {
                                e.write(v);
                            });
                        }
                        at = r + len;
                    }
                    dst[at..].iter_mut().for_each(|e| {
                        e.write(fill);
                    });
                }
            }
        }
    };
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(rows_per_task * b * inner)
        .enumerate()
        .for_each(|(task, slab)| fill_slab(task, slab));
    // SAFETY: for every (j, s), `fill_slab` wrote each of the `inner`
    // elements (a run's copy or the fill value), so all n are initialized.
    unsafe { out.set_len(n) };
    out
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "window-gather"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = layout.shape().dims()[0];
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("window gather needs a contiguous input")
        };
        let out = float_dispatch!("window gather"; storage => all; |Out| Out(gather_kernel(&all[start..end], self)));
        Ok((out, Shape::from((self.outer, b, self.inner))))
    }
}

struct Scatter {
    runs: Arc<Runs>,
    outer: usize,
    inner: usize,
    input_len: usize,
}

fn scatter_kernel<T: WithDType>(cols: &[T], op: &Scatter) -> Vec<T> {
    let b = cols.len() / (op.outer * op.inner);
    let mut out = vec![T::from_f64(0.0); b * op.input_len];
    scatter_add(cols, op, &mut out);
    out
}

/// out[b, table[j, r]] += cols[j, b, r] for `out` the `(B, D)` rows.
fn scatter_add<T: WithDType>(cols: &[T], op: &Scatter, out: &mut [T]) {
    let (d, outer, inner) = (op.input_len, op.outer, op.inner);
    let b = cols.len() / (outer * inner);
    debug_assert_eq!(out.len(), b * d);
    if out.is_empty() {
        return;
    }
    // Threads own blocks of samples (disjoint output rows); within a block
    // every window row j reads one contiguous run of the columns.
    out.par_chunks_mut(SAMPLE_BLOCK * d).enumerate().for_each(|(blk, rows)| {
        let s0 = blk * SAMPLE_BLOCK;
        let n = rows.len() / d;
        for j in 0..outer {
            for ds in 0..n {
                let src = &cols[(j * b + s0 + ds) * inner..(j * b + s0 + ds + 1) * inner];
                let row = &mut rows[ds * d..(ds + 1) * d];
                for (r, t, len, step) in op.runs.row(j) {
                    let src = &src[r..r + len];
                    if step == 1 {
                        // Slices, which the compiler vectorizes (step_by would not be).
                        for (o, &v) in row[t..t + len].iter_mut().zip(src) {
                            *o += v;
                        }
                    } else {
                        for (o, &v) in row[t..=t + (len - 1) * step].iter_mut().step_by(step).zip(src) {
                            *o += v;
                        }
                    }
                }
            }
        }
    });
}

impl CustomOp1 for Scatter {
    fn name(&self) -> &'static str {
        "window-scatter"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = layout.shape().dims()[1];
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("window scatter needs a contiguous input")
        };
        let out = float_dispatch!("window scatter"; storage => all; |Out| Out(scatter_kernel(&all[start..end], self)));
        Ok((out, Shape::from((b, self.input_len))))
    }
}

/// [`Scatter`] added into rows `row0..` of a `(N, D)` result, in place.
struct ScatterInto {
    scatter: Scatter,
    row0: usize,
}

impl candle_core::InplaceOp2 for ScatterInto {
    fn name(&self) -> &'static str {
        "window-scatter-into"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, cols: &CpuStorage, cl: &Layout) -> candle_core::Result<()> {
        let b = cl.shape().dims()[1];
        let d = self.scatter.input_len;
        let (Some((o1, _)), Some((o2, e2))) = (dl.contiguous_offsets(), cl.contiguous_offsets()) else {
            candle_core::bail!("window scatter-into needs contiguous tensors")
        };
        let rows = o1 + self.row0 * d..o1 + (self.row0 + b) * d;
        float_dispatch!("window scatter-into"; dst => out, cols => c; |_Out| scatter_add(&c[o2..e2], &self.scatter, &mut out[rows]));
        Ok(())
    }
}

struct Argmax {
    table: Arc<[u32]>,
    channels: usize,
    window_len: usize,
    positions: usize,
    input_len: usize,
}

/// Each window's argmax, over the (sample, channel) planes of positions in
/// parallel (a window costs about L comparisons).
fn argmax_kernel<T: WithDType>(x: &[T], op: &Argmax) -> Vec<u32> {
    let (d, c, l, r) = (op.input_len, op.channels, op.window_len, op.positions);
    let b = x.len() / d;
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    super::fused::filled(b * c * r, r.max(1), l, |start, planes| {
        for (j, arg) in planes.chunks_mut(r.max(1)).enumerate() {
            let (s, ch) = ((start / r + j) / c, (start / r + j) % c);
            let row = &x[s * d..(s + 1) * d];
            for (p, a) in arg.iter_mut().enumerate() {
                // Window of output p: entries table[(ch, e, p)], e = 0..L.
                let mut best_t = op.table[ch * l * r + p];
                let mut best_v = row.get(best_t as usize).copied().unwrap_or(neg_inf);
                for e in 1..l {
                    let t = op.table[(ch * l + e) * r + p];
                    // The sentinel (padding) reads as −∞ and never wins;
                    // strict > keeps the first maximum.
                    let v = row.get(t as usize).copied().unwrap_or(neg_inf);
                    let gt = v > best_v;
                    best_t = std::hint::select_unpredictable(gt, t, best_t);
                    best_v = std::hint::select_unpredictable(gt, v, best_v);
                }
                a.write(best_t);
            }
        }
    })
}

impl CustomOp1 for Argmax {
    fn name(&self) -> &'static str {
        "window-argmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("window argmax needs a contiguous input")
        };
        let out = float_dispatch!("window argmax"; storage => all; |_Out| argmax_kernel(&all[start..end], self));
        let b = layout.shape().dims()[0];
        Ok((CpuStorage::U32(out), Shape::from((b, self.channels * self.positions))))
    }
}

struct Pick;

fn pick_kernel<T: WithDType>(x: &[T], d: usize, pos: &[u32], j: usize) -> candle_core::Result<Vec<T>> {
    let mut out = Vec::with_capacity(pos.len());
    for (row, ids) in x.chunks_exact(d).zip(pos.chunks_exact(j)) {
        for &t in ids {
            match row.get(t as usize) {
                Some(&v) => out.push(v),
                None => candle_core::bail!("pick: position {t} outside a row of {d}"),
            }
        }
    }
    Ok(out)
}

impl candle_core::CustomOp2 for Pick {
    fn name(&self) -> &'static str {
        "window-pick"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        pos: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, d) = xl.shape().dims2()?;
        let (pb, j) = pl.shape().dims2()?;
        if pb != b {
            candle_core::bail!("pick: {b} rows of values, {pb} rows of positions")
        }
        let (Some((xs, xe)), Some((ps, pe))) = (xl.contiguous_offsets(), pl.contiguous_offsets()) else {
            candle_core::bail!("pick needs contiguous inputs")
        };
        let CpuStorage::U32(p) = pos else { candle_core::bail!("pick: positions must be u32") };
        let p = &p[ps..pe];
        let out = float_dispatch!("window pick"; x => v; |Out| Out(pick_kernel(&v[xs..xe], d, p, j)?));
        Ok((out, Shape::from((b, j))))
    }
}

struct Unpick {
    d: usize,
}

fn unpick_kernel<T: WithDType>(v: &[T], j: usize, k: usize, pos: &[u32], d: usize) -> candle_core::Result<Vec<T>> {
    let mut out = vec![T::from_f64(0.0); v.len() / j * d];
    for ((vs, outs), ids) in v.chunks_exact(k * j).zip(out.chunks_exact_mut(k * d)).zip(pos.chunks_exact(j)) {
        for (vrow, orow) in vs.chunks_exact(j).zip(outs.chunks_exact_mut(d)) {
            for (&x, &t) in vrow.iter().zip(ids) {
                match orow.get_mut(t as usize) {
                    Some(o) => *o += x,
                    None => candle_core::bail!("unpick: position {t} outside a row of {d}"),
                }
            }
        }
    }
    Ok(out)
}

impl candle_core::CustomOp2 for Unpick {
    fn name(&self) -> &'static str {
        "window-unpick"
    }

    fn cpu_fwd(
        &self,
        v: &CpuStorage,
        vl: &Layout,
        pos: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, k, j) = vl.shape().dims3()?;
        if pl.shape().dims2()? != (b, j) {
            candle_core::bail!("unpick: positions {:?} for values {:?}", pl.shape(), vl.shape())
        }
        let (Some((vs, ve)), Some((ps, pe))) = (vl.contiguous_offsets(), pl.contiguous_offsets()) else {
            candle_core::bail!("unpick needs contiguous inputs")
        };
        let CpuStorage::U32(p) = pos else { candle_core::bail!("unpick: positions must be u32") };
        let p = &p[ps..pe];
        let out = float_dispatch!("window unpick"; v => x; |Out| Out(unpick_kernel(&x[vs..ve], j, k, p, self.d)?));
        Ok((out, Shape::from((b, k, self.d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small table with padding: 2 windows of 3 elements over D = 4, R = 2.
    fn table() -> (Vec<usize>, usize, usize, usize) {
        // outer = 3 (window elements), inner = 2 (positions); 4 = sentinel.
        (vec![0, 1, 4, 2, 3, 4], 3, 2, 4)
    }

    fn diff_f64(a: Tensor, b: Tensor) -> Result<f64> {
        Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.sum_all()?.to_scalar::<f64>()?)
    }

    #[test]
    fn gather_scatter_and_argmax_match_the_generic_path_and_are_adjoint() -> Result<()> {
        let (t, outer, inner, d) = table();
        let wt = WindowTable::new(&t, outer, inner, d, &Device::Cpu)?;
        let x = Tensor::new(&[[1.0f64, 5.0, -2.0, 3.0], [7.0, 0.25, 7.0, 7.0]], &Device::Cpu)?;
        let g = wt.gather(&x, -9.0)?;
        // out[j, b, r] = x[b, t[j, r]]
        let got = g.to_vec3::<f64>()?;
        for j in 0..outer {
            for b in 0..2 {
                for r in 0..inner {
                    let id = t[j * inner + r];
                    let want = if id == d { -9.0 } else { x.to_vec2::<f64>()?[b][id] };
                    assert_eq!(got[j][b][r], want);
                }
            }
        }
        // ⟨gather(x), c⟩ = ⟨x, scatter(c)⟩ for a zero fill.
        let c = Tensor::arange(0.0f64, (outer * 2 * inner) as f64, &Device::Cpu)?.reshape((outer, 2, inner))?;
        let lhs = (wt.gather(&x, 0.0)? * &c)?.sum_all()?.to_scalar::<f64>()?;
        let rhs = (&x * wt.scatter(&c)?)?.sum_all()?.to_scalar::<f64>()?;
        assert!((lhs - rhs).abs() < 1e-12);
        // One channel, window_len 3: maxima positions; ties go to the first.
        let a = wt.argmax(&x, 3)?.to_vec2::<u32>()?;
        assert_eq!(a, vec![vec![3, 1], vec![0, 2]]);
        // A table without padding (runs only, no gaps to fill) too.
        let dense = WindowTable::new(&[0, 1, 2, 3, 1, 2], 3, 2, d, &Device::Cpu)?;
        assert_eq!(diff_f64(dense.gather(&x, -9.0)?, dense.gather_generic(&x, -9.0)?)?, 0.0);
        // The fast kernels agree with candle's generic ops, f32 and f64.
        for dtype in [DType::F64, DType::F32] {
            let x = x.to_dtype(dtype)?;
            let c = c.to_dtype(dtype)?;
            let diff = |a: Tensor, b: Tensor| -> Result<f64> {
                Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.sum_all()?.to_scalar::<f64>()?)
            };
            assert_eq!(diff(wt.gather(&x, -9.0)?, wt.gather_generic(&x, -9.0)?)?, 0.0);
            assert_eq!(diff(wt.scatter(&c)?, wt.scatter_generic(&c)?)?, 0.0);
            assert_eq!(wt.argmax(&x, 3)?.to_vec2::<u32>()?, wt.argmax_generic(&x, 3)?.to_vec2::<u32>()?);
            let a = wt.argmax(&x, 3)?;
            assert_eq!(diff(WindowTable::pick(&x, &a)?, crate::tensor::gather(&x, &a, 1)?)?, 0.0);
            let v = Tensor::arange(1.0, 9.0, &Device::Cpu)?.to_dtype(dtype)?.reshape((2, 2, 2))?;
            let ids = a.unsqueeze(1)?.broadcast_as((2, 2, 2))?;
            let want = crate::tensor::gather_adjoint(&v, &ids, 2, &[2, 2, d])?;
            assert_eq!(diff(WindowTable::unpick(&v, &a, d)?, want)?, 0.0);
        }
        Ok(())
    }

    /// im2col tables of real convolutions (strides 1–3, padding, dilation)
    /// and one with repeated entries: the run-based kernels (strided runs,
    /// gaps written with the fill value) agree exactly with the generic path.
    #[test]
    fn strided_and_padded_tables_match_the_generic_path() -> Result<()> {
        let dev = Device::Cpu;
        let (c, h, w) = (2usize, 7usize, 6usize);
        let d = c * h * w;
        for (k, s, p, dil) in [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 3, 2, 1), (2, 2, 1, 2), (5, 1, 2, 1)] {
            let out = |n: usize| (n + 2 * p - dil * (k - 1) - 1) / s + 1;
            let (oh, ow) = (out(h), out(w));
            let mut t = Vec::new();
            for ci in 0..c {
                for ki in 0..k {
                    for kj in 0..k {
                        for y in 0..oh {
                            for x in 0..ow {
                                let (iy, ix) = ((y * s + ki * dil) as isize - p as isize, (x * s + kj * dil) as isize - p as isize);
                                let inside = iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize;
                                t.push(if inside { ci * h * w + iy as usize * w + ix as usize } else { d });
                            }
                        }
                    }
                }
            }
            let wt = WindowTable::new(&t, c * k * k, oh * ow, d, &dev)?;
            let x = Tensor::randn(0f64, 1.0, (5, d), &dev)?;
            let cols = Tensor::randn(0f64, 1.0, (c * k * k, 5, oh * ow), &dev)?;
            let case = format!("kernel {k}, stride {s}, padding {p}, dilation {dil}");
            assert_eq!(diff_f64(wt.gather(&x, -3.0)?, wt.gather_generic(&x, -3.0)?)?, 0.0, "{case}");
            let e = diff_f64(wt.scatter(&cols)?, wt.scatter_generic(&cols)?)?;
            assert!(e < 1e-12, "{case}: {e}");
        }
        // Repeated and decreasing entries (no constant step) split into runs correctly.
        let wt = WindowTable::new(&[2, 2, 3, 1, 0, 4, 2, 0], 2, 4, 4, &dev)?;
        let x = Tensor::randn(0f64, 1.0, (3, 4), &dev)?;
        assert_eq!(diff_f64(wt.gather(&x, 7.0)?, wt.gather_generic(&x, 7.0)?)?, 0.0);
        let cols = Tensor::randn(0f64, 1.0, (2, 3, 4), &dev)?;
        assert!(diff_f64(wt.scatter(&cols)?, wt.scatter_generic(&cols)?)? < 1e-12);
        Ok(())
    }

    /// Chunks of columns added into their rows of one result equal the
    /// scatter of all columns at once, in place (f32, f64) and on the path
    /// for a result that is not contiguous; rows outside a chunk keep what
    /// they held; columns that do not fit are refused.
    #[test]
    fn scatter_add_into_rows_equals_one_scatter() -> Result<()> {
        let dev = Device::Cpu;
        let (t, outer, inner, d) = table();
        let wt = WindowTable::new(&t, outer, inner, d, &dev)?;
        let b = 2 * SAMPLE_BLOCK + 3; // several threads' blocks
        for dtype in [DType::F64, DType::F32] {
            let cols = Tensor::randn(0f64, 1.0, (outer, b, inner), &dev)?.to_dtype(dtype)?;
            let want = wt.scatter(&cols)?;
            let mut dst = Tensor::zeros((b, d), dtype, &dev)?;
            for (start, n) in [(0, 5), (5, SAMPLE_BLOCK), (5 + SAMPLE_BLOCK, b - 5 - SAMPLE_BLOCK)] {
                wt.scatter_add_into(&mut dst, &cols.narrow(1, start, n)?, start)?;
            }
            assert!(diff_f64(dst.clone(), want.clone())? < 1e-5, "{dtype:?}");
            // Adding into rows that already hold values; a transposed result.
            let base = Tensor::randn(0f64, 1.0, (d, b), &dev)?.to_dtype(dtype)?;
            let mut strided = base.t()?;
            wt.scatter_add_into(&mut strided, &cols.narrow(1, 3, 4)?, 3)?;
            let rows = (base.t()?.narrow(0, 3, 4)? + wt.scatter(&cols.narrow(1, 3, 4)?)?)?;
            assert!(diff_f64(strided.narrow(0, 3, 4)?, rows)? < 1e-5, "{dtype:?} strided");
            assert_eq!(diff_f64(strided.narrow(0, 0, 3)?, base.t()?.narrow(0, 0, 3)?)?, 0.0);
        }
        let mut small = Tensor::zeros((3, d), DType::F64, &dev)?;
        let e = wt.scatter_add_into(&mut small, &Tensor::zeros((outer, 2, inner), DType::F64, &dev)?, 2).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
        Ok(())
    }
}
