//! Ops that read their input at computed positions: `index` (per-sample
//! `index_select`, and `x[arange(B), idx]` as GPT-2 picks the last
//! non-padded token), `gather`, `expand` and `repeat`.
//!
//! Each is linear in x: y[n] = x[n][map[n]] for a flat map from output
//! elements to input elements (the same for every sample for `expand` /
//! `repeat`, computed from the integer input `idx` per sample otherwise).
//! The backward pass scatter-adds into the map's positions; indices have
//! no derivative.

use super::graph_ops::per_sample_axis;
use super::{Op, Saved};
use crate::error::{bail, Result};
use crate::tensor::{self, Device, Tensor};

pub(crate) enum MapKind {
    /// The same map for every sample `(1, N_out)`.
    Fixed(Tensor),
    /// `index` along `axis` by idx[n] (per-sample shape S).
    Index { axis: usize, idx_shape: Vec<usize> },
    /// `torch.gather` along `axis` (idx has x's rank).
    Gather { axis: usize, idx_shape: Vec<usize> },
}

pub(crate) struct FlatGather {
    name: &'static str,
    kind: MapKind,
    in_shape: Vec<usize>,
    out: Vec<usize>,
    label: String,
}

/// The flat map `(M, N_out)` of the batch.
struct GatherSaved {
    map: Tensor,
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        s[a] = s[a + 1] * shape[a + 1];
    }
    s
}

/// The row-major multi-index of flat position `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for a in (0..shape.len()).rev() {
        idx[a] = i % shape[a];
        i /= shape[a];
    }
    idx
}

impl FlatGather {
    /// `expand` to the per-sample `shape` (-1 keeps a size; new leading axes allowed).
    pub(crate) fn expand(x: &[usize], shape: &[i64], label: &str, device: &Device) -> std::result::Result<Self, String> {
        if shape.len() < x.len() {
            return Err(format!("cannot expand per-sample shape {x:?} to {shape:?} (fewer axes)"));
        }
        let pad = shape.len() - x.len();
        let xp: Vec<usize> = [vec![1; pad], x.to_vec()].concat();
        let out: Vec<usize> = shape
            .iter()
            .zip(&xp)
            .map(|(&s, &d)| match s {
                -1 => Ok(d),
                s if s > 0 && (d == 1 || d == s as usize) => Ok(s as usize),
                _ => Err(format!("cannot expand per-sample shape {x:?} to {shape:?}")),
            })
            .collect::<std::result::Result<_, _>>()?;
        check_map_size("expand", &out)?;
        let st = strides(&xp);
        let map: Vec<usize> = (0..out.iter().product())
            .map(|o| unravel(o, &out).iter().zip(&xp).zip(&st).map(|((&i, &d), &s)| if d == 1 { 0 } else { i * s }).sum())
            .collect();
        Self::fixed("expand", x, out, map, label, device)
    }

    /// `repeat` with per-sample `repeats` (as many as, or more than, the axes).
    pub(crate) fn repeat(x: &[usize], repeats: &[usize], label: &str, device: &Device) -> std::result::Result<Self, String> {
        if repeats.len() < x.len() || repeats.contains(&0) {
            return Err(format!("repeats {repeats:?} must be positive, one per per-sample axis of {x:?} (or more)"));
        }
        let xp: Vec<usize> = [vec![1; repeats.len() - x.len()], x.to_vec()].concat();
        let out: Vec<usize> = xp
            .iter()
            .zip(repeats)
            .map(|(&d, &r)| d.checked_mul(r).ok_or_else(|| format!("repeats {repeats:?} of per-sample shape {x:?} overflow")))
            .collect::<std::result::Result<_, _>>()?;
        check_map_size("repeat", &out)?;
        let st = strides(&xp);
        let map: Vec<usize> = (0..out.iter().product())
            .map(|o| unravel(o, &out).iter().zip(&xp).zip(&st).map(|((&i, &d), &s)| (i % d) * s).sum())
            .collect();
        Self::fixed("repeat", x, out, map, label, device)
    }

    fn fixed(name: &'static str, x: &[usize], out: Vec<usize>, map: Vec<usize>, label: &str, device: &Device) -> std::result::Result<Self, String> {
        let n = map.len();
        let map = tensor::index_tensor(&map, device).and_then(|t| Ok(t.reshape((1, n))?)).map_err(|e| e.to_string())?;
        Ok(FlatGather { name, kind: MapKind::Fixed(map), in_shape: x.to_vec(), out, label: label.to_string() })
    }

    /// `index` (x, idx) along `dim`.
    pub(crate) fn index(x: &[usize], idx: &[usize], dim: i64, label: &str) -> std::result::Result<Self, String> {
        let axis = per_sample_axis(dim, x.len())?;
        let out = [&x[..axis], idx, &x[axis + 1..]].concat();
        Ok(FlatGather { name: "index", kind: MapKind::Index { axis, idx_shape: idx.to_vec() }, in_shape: x.to_vec(), out, label: label.to_string() })
    }

    /// `gather` (x, idx) along `dim`.
    pub(crate) fn gather(x: &[usize], idx: &[usize], dim: i64, label: &str) -> std::result::Result<Self, String> {
        let axis = per_sample_axis(dim, x.len())?;
        if idx.len() != x.len() || idx.iter().zip(x).enumerate().any(|(a, (&i, &d))| a != axis && i > d) {
            return Err(format!("gather: index per-sample shape {idx:?} does not fit input shape {x:?} off axis {dim}"));
        }
        Ok(FlatGather { name: "gather", kind: MapKind::Gather { axis, idx_shape: idx.to_vec() }, in_shape: x.to_vec(), out: idx.to_vec(), label: label.to_string() })
    }

    /// The flat map `(M, N_out)` for a batch of `m` samples.
    fn map(&self, m: usize, idx: Option<&Tensor>) -> Result<Tensor> {
        let (axis, idx_shape, gather) = match &self.kind {
            MapKind::Fixed(t) => return Ok(t.broadcast_as((m, t.dim(1)?))?.contiguous()?),
            MapKind::Index { axis, idx_shape } => (*axis, idx_shape, false),
            MapKind::Gather { axis, idx_shape } => (*axis, idx_shape, true),
        };
        let idx = tensor::to_vec_f64(idx.expect("index ops read an index input"))?;
        let len = self.in_shape[axis] as i64;
        let st = strides(&self.in_shape);
        let per: usize = idx_shape.iter().product();
        let n_out: usize = self.out.iter().product();
        let mut map = Vec::with_capacity(m * n_out);
        for n in 0..m {
            for o in 0..n_out {
                let oi = unravel(o, &self.out);
                // The index element this output reads, and the input position.
                let (j, rest): (usize, Vec<usize>) = if gather {
                    (oi.iter().zip(strides(idx_shape)).map(|(&i, s)| i * s).sum(), oi.clone())
                } else {
                    let s = &oi[axis..axis + idx_shape.len()];
                    let j = s.iter().zip(strides(idx_shape)).map(|(&i, st)| i * st).sum();
                    let rest = [&oi[..axis], &[0][..], &oi[axis + idx_shape.len()..]].concat();
                    (j, rest)
                };
                let v = idx[n * per + j];
                let k = if v < 0.0 { v as i64 + len } else { v as i64 };
                if v.fract() != 0.0 || !(0..len).contains(&k) {
                    bail!(Data, "{}: index {v} is out of range for an axis of length {len}", self.label);
                }
                let mut pos = rest;
                pos[axis] = k as usize;
                map.push(pos.iter().zip(&st).map(|(&i, &s)| i * s).sum::<usize>());
            }
        }
        // Built on the host; the forward pass moves it to the data's device.
        Ok(tensor::index_tensor(&map, &Device::Cpu)?.reshape((m, n_out))?)
    }
}

impl Op for FlatGather {
    fn type_name(&self) -> &'static str {
        self.name
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let x = inputs[0];
        let m = x.dim(0)?;
        let map = self.map(m, inputs.get(1).copied())?.to_device(x.device())?;
        let n_in: usize = self.in_shape.iter().product();
        let y = x.reshape((m, n_in))?.contiguous()?.gather(&map, 1)?;
        let y = y.reshape([&[m][..], &self.out].concat())?;
        Ok((y, save.then(|| Saved::new(GatherSaved { map }))))
    }

    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut out = vec![None; needs.len()];
        if needs[0] {
            let map = &saved.get::<GatherSaved>().map;
            let (m, k) = (v.dim(0)?, v.dim(1)?);
            let (n_in, n_out) = (self.in_shape.iter().product::<usize>(), map.dim(1)?);
            let ids = map.unsqueeze(1)?.broadcast_as((m, k, n_out))?.contiguous()?;
            let z = Tensor::zeros((m, k, n_in), v.dtype(), v.device())?;
            let back = z.scatter_add(&ids, &v.reshape((m, k, n_out))?.contiguous()?, 2)?;
            out[0] = Some(back.reshape([&[m, k][..], &self.in_shape].concat())?);
        }
        Ok(out)
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let Some(t) = x_dots[0] else { return Ok(None) };
        let map = &saved.get::<GatherSaved>().map;
        let (m, k) = (t.dim(0)?, t.dim(1)?);
        let (n_in, n_out) = (self.in_shape.iter().product::<usize>(), map.dim(1)?);
        let ids = map.unsqueeze(1)?.broadcast_as((m, k, n_out))?.contiguous()?;
        let y = t.reshape((m, k, n_in))?.contiguous()?.gather(&ids, 2)?;
        Ok(Some(y.reshape([&[m, k][..], &self.out].concat())?))
    }

    fn is_linear_map(&self) -> bool {
        true
    }
}

/// Refuse an index map of `out` (one `usize` per element) beyond the memory
/// budget, before it is built.
fn check_map_size(op: &str, out: &[usize]) -> std::result::Result<(), String> {
    crate::budget::check(&format!("{op} to per-sample shape {out:?}"), out, std::mem::size_of::<usize>()).map_err(|e| e.to_string())
}
