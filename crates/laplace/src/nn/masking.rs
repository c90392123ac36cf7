//! `torch.where(cond, a, b)` and `x.masked_fill(mask, value)` (=
//! `where(mask, value, x)`): linear in the selected operands, with
//! per-sample shapes broadcast right-aligned. The condition has no
//! derivative.

use super::discrete::broadcast_shapes;
use super::{Op, Saved};
use crate::error::Result;
use crate::tensor::Tensor;

/// Where each operand of `where` comes from.
#[derive(Clone, Copy)]
enum Operand {
    /// Input j.
    Value(usize),
    Number(f64),
}

pub(crate) struct Where {
    name: &'static str,
    cond: usize,
    a: Operand,
    b: Operand,
    /// Per-sample input shapes, padded to the output rank.
    padded: Vec<Vec<usize>>,
    shapes: Vec<Vec<usize>>,
    out: Vec<usize>,
}

/// The condition as 0 / 1 in the compute dtype, `(M, *out)`.
struct WhereSaved {
    c: Tensor,
}

impl Where {
    /// `where` with inputs `[cond, a?, b?]` (a number where absent).
    pub(crate) fn new_where(a: Option<f64>, b: Option<f64>, in_shapes: &[&[usize]]) -> std::result::Result<Self, String> {
        let mut next = 1;
        let mut take = |s: Option<f64>| match s {
            Some(x) => Operand::Number(x),
            None => {
                next += 1;
                Operand::Value(next - 1)
            }
        };
        let (a, b) = (take(a), take(b));
        Self::build("where", 0, a, b, in_shapes)
    }

    /// `masked_fill` with inputs `[x, mask]`.
    pub(crate) fn new_masked_fill(value: f64, in_shapes: &[&[usize]]) -> std::result::Result<Self, String> {
        let w = Self::build("masked_fill", 1, Operand::Number(value), Operand::Value(0), in_shapes)?;
        if w.out != in_shapes[0] {
            return Err(format!("the mask {:?} does not broadcast to the input's shape {:?}", in_shapes[1], in_shapes[0]));
        }
        Ok(w)
    }

    fn build(name: &'static str, cond: usize, a: Operand, b: Operand, in_shapes: &[&[usize]]) -> std::result::Result<Self, String> {
        let (padded, out) = broadcast_shapes(in_shapes).ok_or_else(|| format!("inputs of per-sample shapes {in_shapes:?} do not broadcast"))?;
        Ok(Where { name, cond, a, b, padded, shapes: in_shapes.iter().map(|s| s.to_vec()).collect(), out })
    }

    fn batched(&self, lead: &[usize]) -> Vec<usize> {
        [lead, &self.out].concat()
    }

    /// Input j as `(M, *out)`.
    fn widen(&self, x: &Tensor, j: usize) -> Result<Tensor> {
        let m = x.dim(0)?;
        Ok(x.reshape([&[m][..], &self.padded[j]].concat())?.broadcast_as(self.batched(&[m]))?)
    }

    /// `t (M, K, *out)` summed back to input j's shape `(M, K, *shape_j)`.
    fn narrow_to(&self, t: &Tensor, j: usize) -> Result<Tensor> {
        let axes: Vec<usize> = self.padded[j].iter().zip(&self.out).enumerate().filter(|(_, (&p, &o))| p == 1 && o != 1).map(|(a, _)| a + 2).collect();
        let t = crate::tensor::sum_keepdims(t, &axes)?;
        Ok(t.reshape([&t.dims()[..2], &self.shapes[j][..]].concat())?)
    }
}

impl Op for Where {
    fn type_name(&self) -> &'static str {
        self.name
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let c = self.widen(inputs[self.cond], self.cond)?.ne(0.0)?;
        let operand = |o: Operand| -> Result<Tensor> {
            match o {
                Operand::Value(j) => Ok(self.widen(inputs[j], j)?.contiguous()?),
                Operand::Number(x) => {
                    // A number the compute dtype cannot hold (torch.finfo(float64).min
                    // in a float32 run) saturates to its largest finite value.
                    let x = if inputs[0].dtype() == crate::tensor::DType::F32 { x.clamp(f32::MIN as f64, f32::MAX as f64) } else { x };
                    Ok((Tensor::zeros(self.batched(&[inputs[0].dim(0)?]), inputs[0].dtype(), inputs[0].device())? + x)?)
                }
            }
        };
        let y = c.where_cond(&operand(self.a)?, &operand(self.b)?)?;
        let dt = inputs[0].dtype();
        let saved = save.then(|| -> Result<Saved> { Ok(Saved::new(WhereSaved { c: c.to_dtype(dt)? })) }).transpose()?;
        Ok((y, saved))
    }

    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let c = saved.get::<WhereSaved>().c.unsqueeze(1)?;
        let mut out = vec![None; needs.len()];
        for (op, take_true) in [(self.a, true), (self.b, false)] {
            if let Operand::Value(j) = op {
                if needs[j] {
                    let sel = if take_true { v.broadcast_mul(&c)? } else { v.broadcast_sub(&v.broadcast_mul(&c)?)? };
                    out[j] = Some(self.narrow_to(&sel, j)?);
                }
            }
        }
        Ok(out)
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let c = saved.get::<WhereSaved>().c.unsqueeze(1)?;
        let mut acc: Option<Tensor> = None;
        for (op, take_true) in [(self.a, true), (self.b, false)] {
            let Operand::Value(j) = op else { continue };
            let Some(t) = x_dots[j] else { continue };
            let (m, k) = (t.dim(0)?, t.dim(1)?);
            let t = t.reshape([&[m, k][..], &self.padded[j]].concat())?.broadcast_as(self.batched(&[m, k]))?;
            let part = if take_true { t.broadcast_mul(&c)? } else { t.broadcast_sub(&t.broadcast_mul(&c)?)? };
            acc = Some(match acc {
                None => part,
                Some(a) => (a + part)?,
            });
        }
        Ok(acc)
    }

    fn is_linear_map(&self) -> bool {
        false
    }
}
