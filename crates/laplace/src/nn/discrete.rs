//! Ops whose values are integers or truth values: comparisons, logical
//! ops, casts, argmax, and constants (arange, position ids, causal masks the
//! exporter folded). They compute masks and indices from integer inputs;
//! their derivative is zero (almost everywhere), so nothing flows back
//! through them and their tangent is zero.

use super::{Op, Saved};
use crate::error::Result;
use crate::spec::{CastKind, CompareOp, LogicalOp};
use crate::tensor::{self, DType, Device, Tensor};

pub(crate) enum DiscreteKind {
    /// With a number (`x ∘ s`, or `s ∘ x` when reversed) or two values.
    Compare { op: CompareOp, scalar: Option<f64>, reverse: bool },
    Logical(LogicalOp),
    Cast(CastKind),
    Argmax { axis: usize, keepdim: bool },
    /// The same tensor `(1, *shape)` for every sample.
    Constant(Tensor),
}

pub(crate) struct Discrete {
    kind: DiscreteKind,
    /// Per-sample input shapes padded to the output rank (two-value ops).
    padded: Vec<Vec<usize>>,
    out: Vec<usize>,
}

/// Right-aligned (numpy) broadcasting of per-sample shapes; the padded
/// shapes of every operand and the result, or `None`.
pub(crate) fn broadcast_shapes(shapes: &[&[usize]]) -> Option<(Vec<Vec<usize>>, Vec<usize>)> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let padded: Vec<Vec<usize>> = shapes.iter().map(|s| [vec![1; rank - s.len()], s.to_vec()].concat()).collect();
    let mut out = vec![1; rank];
    for s in &padded {
        for (o, &d) in out.iter_mut().zip(s) {
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return None;
            }
        }
    }
    Some((padded, out))
}

impl Discrete {
    pub(crate) fn build(kind: DiscreteKind, in_shapes: &[&[usize]], dtype: DType, device: &Device) -> std::result::Result<Self, String> {
        let x = in_shapes[0];
        let (padded, out) = match &kind {
            DiscreteKind::Compare { .. } | DiscreteKind::Logical(_) | DiscreteKind::Cast(_) => broadcast_shapes(in_shapes)
                .ok_or_else(|| format!("inputs of per-sample shapes {in_shapes:?} do not broadcast"))?,
            DiscreteKind::Argmax { axis, keepdim } => {
                let mut out = x.to_vec();
                if *keepdim {
                    out[*axis] = 1;
                } else {
                    out.remove(*axis);
                }
                (vec![x.to_vec()], out)
            }
            DiscreteKind::Constant(t) => (vec![], t.dims()[1..].to_vec()),
        };
        let kind = match kind {
            DiscreteKind::Constant(t) => DiscreteKind::Constant(t.to_dtype(dtype).map_err(|e| e.to_string())?.to_device(device).map_err(|e| e.to_string())?),
            k => k,
        };
        Ok(Discrete { kind, padded, out })
    }

    /// A constant from the spec's data, `(1, *shape)`.
    pub(crate) fn constant(shape: &[usize], data: &[f64], dtype: DType, device: &Device) -> Result<DiscreteKind> {
        let dims = [&[1][..], shape].concat();
        Ok(DiscreteKind::Constant(tensor::from_f64(data.to_vec(), &dims, dtype, device)?))
    }

    /// Input j as `(M, *padded_j)`.
    fn operand(&self, x: &Tensor, j: usize) -> Result<Tensor> {
        Ok(x.reshape([&[x.dim(0)?][..], &self.padded[j]].concat())?)
    }
}

fn compare(op: CompareOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = a.dtype();
    let (a, b) = (a.broadcast_as(broadcast_dims(a, b))?, b.broadcast_as(broadcast_dims(a, b))?);
    Ok(match op {
        CompareOp::Eq => a.eq(&b)?,
        CompareOp::Ne => a.ne(&b)?,
        CompareOp::Lt => a.lt(&b)?,
        CompareOp::Le => a.le(&b)?,
        CompareOp::Gt => a.gt(&b)?,
        CompareOp::Ge => a.ge(&b)?,
    }
    .to_dtype(dt)?)
}

fn broadcast_dims(a: &Tensor, b: &Tensor) -> Vec<usize> {
    a.dims().iter().zip(b.dims()).map(|(&p, &q)| p.max(q)).collect()
}

impl Op for Discrete {
    fn type_name(&self) -> &'static str {
        match &self.kind {
            DiscreteKind::Compare { op, .. } => match op {
                CompareOp::Eq => "eq",
                CompareOp::Ne => "ne",
                CompareOp::Lt => "lt",
                CompareOp::Le => "le",
                CompareOp::Gt => "gt",
                CompareOp::Ge => "ge",
            },
            DiscreteKind::Logical(LogicalOp::And) => "logical_and",
            DiscreteKind::Logical(LogicalOp::Or) => "logical_or",
            DiscreteKind::Logical(LogicalOp::Not) => "logical_not",
            DiscreteKind::Cast(_) => "to",
            DiscreteKind::Argmax { .. } => "argmax",
            DiscreteKind::Constant(_) => "constant",
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let x = inputs[0];
        let m = x.dim(0)?;
        let y = match &self.kind {
            DiscreteKind::Compare { op, scalar, reverse } => {
                let a = self.operand(x, 0)?;
                match scalar {
                    Some(s) => {
                        let b = (a.zeros_like()? + *s)?;
                        if *reverse {
                            compare(*op, &b, &a)?
                        } else {
                            compare(*op, &a, &b)?
                        }
                    }
                    None => compare(*op, &a, &self.operand(inputs[1], 1)?)?,
                }
            }
            DiscreteKind::Logical(op) => {
                let a = self.operand(x, 0)?.ne(0.0)?;
                let t = match op {
                    LogicalOp::Not => self.operand(x, 0)?.eq(0.0)?,
                    LogicalOp::And | LogicalOp::Or => {
                        let b = self.operand(inputs[1], 1)?.ne(0.0)?;
                        let dims = broadcast_dims(&a, &b);
                        let s = (a.to_dtype(DType::F32)?.broadcast_as(dims.clone())? + b.to_dtype(DType::F32)?.broadcast_as(dims)?)?;
                        if *op == LogicalOp::And {
                            s.ge(2.0)?
                        } else {
                            s.ge(1.0)?
                        }
                    }
                };
                t.to_dtype(x.dtype())?
            }
            DiscreteKind::Cast(CastKind::Float) => x.clone(),
            // Truncation toward zero: floor for x ≥ 0, ceil below.
            DiscreteKind::Cast(CastKind::Int) => x.ge(0.0)?.where_cond(&x.floor()?, &x.ceil()?)?,
            DiscreteKind::Cast(CastKind::Bool) => x.ne(0.0)?.to_dtype(x.dtype())?,
            DiscreteKind::Argmax { axis, keepdim } => {
                let i = x.argmax_keepdim(axis + 1)?.to_dtype(x.dtype())?;
                if *keepdim {
                    i
                } else {
                    i.squeeze(axis + 1)?
                }
            }
            DiscreteKind::Constant(c) => c.broadcast_as([&[m][..], &self.out].concat())?.contiguous()?,
        };
        Ok((y, save.then(|| Saved::new(()))))
    }

    fn backward_all(&self, _saved: &Saved, _v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None; needs.len()])
    }

    fn jvp_all(&self, _saved: &Saved, _x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
