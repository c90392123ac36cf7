//! The functional ops of a model graph: elementwise arithmetic between
//! values or with a number, concatenation, reshapes, permutations,
//! reductions, slicing and selection.
//!
//! Axis conventions: `axis` below is a per-sample axis (0 = the first axis
//! after the batch); in a value `(M, *s)` it is tensor axis `axis + 1`, in a
//! sensitivity or tangent `(M, K, *s)` it is `axis + 2`. Every op except
//! `mul` / `div` of two values and `s / x` is linear in its inputs, so its
//! backward pass is its adjoint and it has no second-order term.

use super::flatten::with_leading;
use super::attention::{Attention, Matmul};
use super::discrete::{Discrete, DiscreteKind};
use super::gather::FlatGather;
use super::masking::Where;
use super::pointwise::{Cumsum, PointKind, Pointwise, Softmax};
use super::{Identity, Layer, Op, Residual, Saved};
use crate::error::{bail, Result};
use crate::spec::{BinaryOp, CastKind, OpSpec, ReduceOp};
use crate::tensor::{self, Arith, DType, Device, Tensor};

/// Build the op of a functional node for its inputs' per-sample shapes.
pub(crate) fn build(op: &OpSpec, label: &str, in_shapes: &[&[usize]], dtype: DType, device: &Device) -> Result<Box<dyn Op>> {
    let x = in_shapes[0];
    let err = |msg: String| crate::Error::Spec(format!("{label}: {msg}"));
    Ok(match *op {
        OpSpec::Matmul => Box::new(Matmul::build(in_shapes[0], in_shapes[1]).map_err(err)?),
        OpSpec::Softmax { dim, log } => Box::new(Softmax::build(dim, log, x).map_err(err)?),
        OpSpec::MaskedFill { value } => Box::new(Where::new_masked_fill(value, in_shapes).map_err(err)?),
        OpSpec::Where { a, b } => Box::new(Where::new_where(a, b, in_shapes).map_err(err)?),
        OpSpec::Compare { op, scalar, reverse } => {
            Box::new(Discrete::build(DiscreteKind::Compare { op, scalar, reverse }, in_shapes, dtype, device).map_err(err)?)
        }
        OpSpec::Logical(op) => Box::new(Discrete::build(DiscreteKind::Logical(op), in_shapes, dtype, device).map_err(err)?),
        OpSpec::Cast(CastKind::Float) => Box::new(Identity::new(x)),
        OpSpec::Cast(kind) => Box::new(Discrete::build(DiscreteKind::Cast(kind), in_shapes, dtype, device).map_err(err)?),
        OpSpec::Argmax { dim, keepdim } => {
            let axis = per_sample_axis(dim, x.len()).map_err(err)?;
            Box::new(Discrete::build(DiscreteKind::Argmax { axis, keepdim }, in_shapes, dtype, device).map_err(err)?)
        }
        OpSpec::Constant { ref shape, ref data } => {
            Box::new(Discrete::build(Discrete::constant(shape, data, dtype, device)?, in_shapes, dtype, device).map_err(err)?)
        }
        OpSpec::Pow { exponent } => Box::new(Pointwise::new(PointKind::Pow(exponent), x, label)),
        OpSpec::Math(m) => Box::new(Pointwise::new(PointKind::Math(m), x, label)),
        OpSpec::Cumsum { dim } => Box::new(Cumsum::build(dim, x).map_err(err)?),
        OpSpec::Attention { is_causal, scale, mask } => Box::new(Attention::build(in_shapes, is_causal, scale, mask, label).map_err(err)?),
        OpSpec::Index { dim } => Box::new(FlatGather::index(x, in_shapes[1], dim, label).map_err(err)?),
        OpSpec::Gather { dim } => Box::new(FlatGather::gather(x, in_shapes[1], dim, label).map_err(err)?),
        OpSpec::Expand { ref shape } => Box::new(FlatGather::expand(x, shape, label, device).map_err(err)?),
        OpSpec::Repeat { ref repeats } => Box::new(FlatGather::repeat(x, repeats, label, device).map_err(err)?),
        OpSpec::Module(_) => unreachable!("module ops are built by nn::build"),
        OpSpec::Binary(bop) => {
            // Per-sample shapes broadcast right-aligned (numpy): a lower-rank
            // operand (a mask (T,), a bias (D,)) gets leading axes of size 1.
            let (padded, out) = super::discrete::broadcast_shapes(&in_shapes[..2])
                .ok_or_else(|| err(format!("inputs of per-sample shapes {:?} and {:?} do not broadcast", in_shapes[0], in_shapes[1])))?;
            Box::new(Binary {
                op: bop,
                a: padded[0].clone(),
                b: padded[1].clone(),
                orig: [in_shapes[0].to_vec(), in_shapes[1].to_vec()],
                out,
            })
        }
        OpSpec::Scalar { op, scalar, reverse } => {
            if op == BinaryOp::Div && !reverse && scalar == 0.0 {
                return Err(err("division by the number 0".into()));
            }
            // A number the compute dtype cannot hold (torch.finfo(float64).min in a
            // float32 run) saturates to its largest finite value, as the mask
            // arithmetic `(1 − mask) · min` expects.
            let s = if dtype == DType::F32 { scalar.clamp(f32::MIN as f64, f32::MAX as f64) } else { scalar };
            Box::new(Scalar { op, s, reverse, shape: x.to_vec() })
        }
        OpSpec::Neg => Box::new(Scalar { op: BinaryOp::Mul, s: -1.0, reverse: false, shape: x.to_vec() }),
        OpSpec::Cat { dim } => {
            let axis = per_sample_axis(dim, x.len()).map_err(err)?;
            let mut out = x.to_vec();
            out[axis] = 0;
            for (j, s) in in_shapes.iter().enumerate() {
                let same = s.len() == x.len() && s.iter().zip(x).enumerate().all(|(d, (p, q))| d == axis || p == q);
                if !same {
                    return Err(err(format!(
                        "input {j} has per-sample shape {s:?}, which does not match {x:?} off axis {dim}"
                    )));
                }
                out[axis] += s[axis];
            }
            Box::new(Cat { axis, sizes: in_shapes.iter().map(|s| s[axis]).collect(), out })
        }
        OpSpec::Reshape { ref shape } => {
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if numel != Some(x.iter().product::<usize>()) {
                return Err(err(format!("cannot reshape per-sample shape {x:?} to {shape:?}")));
            }
            Box::new(Reshape { in_shape: x.to_vec(), out_shape: shape.clone() })
        }
        OpSpec::Permute { ref dims } => {
            if dims.len() != x.len() + 1 || dims[0] != 0 {
                return Err(err(format!(
                    "dims {dims:?} must permute all {} axes of the batched input and keep the batch axis 0 first",
                    x.len() + 1
                )));
            }
            let perm = dims[1..].iter().map(|&d| per_sample_axis(d, x.len())).collect::<std::result::Result<Vec<_>, _>>().map_err(err)?;
            let mut seen = perm.clone();
            seen.sort_unstable();
            if seen != (0..x.len()).collect::<Vec<_>>() {
                return Err(err(format!("dims {dims:?} is not a permutation")));
            }
            Box::new(Permute { out: perm.iter().map(|&p| x[p]).collect(), perm })
        }
        OpSpec::Reduce { op, ref dims, keepdim } => {
            let mut axes = dims.iter().map(|&d| per_sample_axis(d, x.len())).collect::<std::result::Result<Vec<_>, _>>().map_err(err)?;
            axes.sort_unstable();
            axes.dedup();
            let kept: Vec<usize> = x.iter().enumerate().map(|(a, &n)| if axes.contains(&a) { 1 } else { n }).collect();
            let out = if keepdim { kept.clone() } else { x.iter().enumerate().filter(|(a, _)| !axes.contains(a)).map(|(_, &n)| n).collect() };
            let count: usize = axes.iter().map(|&a| x[a]).product();
            let scale = if op == ReduceOp::Mean { 1.0 / count as f64 } else { 1.0 };
            Box::new(Reduce { axes, scale, in_shape: x.to_vec(), kept, out })
        }
        OpSpec::Slice { dim, start, end, step } => {
            let axis = per_sample_axis(dim, x.len()).map_err(err)?;
            let n = x[axis] as i64;
            // torch's clamping of slice bounds.
            let clamp = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
            let (s, e) = (clamp(start), clamp(end.unwrap_or(n)));
            let ids: Vec<usize> = (s..e.max(s)).step_by(step).map(|i| i as usize).collect();
            if ids.is_empty() {
                return Err(err(format!("slice {start}:{}:{step} of axis {dim} (length {n}) is empty", end.map_or(String::new(), |e| e.to_string()))));
            }
            let mut out = x.to_vec();
            out[axis] = ids.len();
            Box::new(Slice { axis, index: tensor::index_tensor(&ids, device)?, len: x[axis], out })
        }
        OpSpec::Select { dim, index } => {
            let axis = per_sample_axis(dim, x.len()).map_err(err)?;
            let n = x[axis] as i64;
            let i = if index < 0 { index + n } else { index };
            if !(0..n).contains(&i) {
                return Err(err(format!("index {index} is out of range for axis {dim} of length {n}")));
            }
            let mut out = x.to_vec();
            out.remove(axis);
            Box::new(Select { axis, index: i as usize, in_shape: x.to_vec(), out })
        }
    })
}

/// A torch axis of the batched tensor (negative from the end) as a per-sample axis.
pub(crate) fn per_sample_axis(dim: i64, rank: usize) -> std::result::Result<usize, String> {
    let batched = rank as i64 + 1;
    let d = if dim < 0 { dim + batched } else { dim };
    if d == 0 {
        return Err(format!("axis {dim} is the batch axis, which no op may reduce, move, slice or concatenate"));
    }
    if !(1..batched).contains(&d) {
        return Err(format!("axis {dim} is out of range for a per-sample rank of {rank}"));
    }
    Ok(d as usize - 1)
}

/// `(M, K, *out)` summed over the axes where `shape` broadcast: `(M, K, *shape)`.
fn unbroadcast(t: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let axes: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] == 1).map(|a| a + 2).collect();
    tensor::sum_keepdims(t, &axes)
}

/// Insert the column axis: `(M, *s) → (M, 1, *s)`.
fn col(t: &Tensor) -> Result<Tensor> {
    Ok(t.unsqueeze(1)?)
}

/// The kernel of a graph `BinaryOp`.
fn arith(op: BinaryOp) -> Arith {
    match op {
        BinaryOp::Add => Arith::Add,
        BinaryOp::Sub => Arith::Sub,
        BinaryOp::Mul => Arith::Mul,
        BinaryOp::Div => Arith::Div,
    }
}

/// Elementwise `a ∘ b` of two values.
struct Binary {
    op: BinaryOp,
    /// The operands' per-sample shapes padded to the output's rank.
    a: Vec<usize>,
    b: Vec<usize>,
    /// ... and as given.
    orig: [Vec<usize>; 2],
    out: Vec<usize>,
}

/// The operands, for the products and quotients.
struct BinarySaved {
    a: Tensor,
    b: Tensor,
}

impl Binary {
    /// Tangents of operand j `(M, K, *orig_j)` as `(M, K, *padded_j)`.
    fn pad(&self, t: &Tensor, j: usize) -> Result<Tensor> {
        let shape = if j == 0 { &self.a } else { &self.b };
        Ok(t.reshape(with_leading(&t.dims()[..2], shape))?)
    }

    /// `(M, K, *padded_j)` back to operand j's `(M, K, *orig_j)`.
    fn unpad(&self, t: Tensor, j: usize) -> Result<Tensor> {
        Ok(t.reshape(with_leading(&t.dims()[..2], &self.orig[j]))?)
    }

    /// `t (M, K, *a or *b)` broadcast to `(M, K, *out)`.
    fn widen(&self, t: &Tensor) -> Result<Tensor> {
        let mut shape = t.dims()[..2].to_vec();
        shape.extend_from_slice(&self.out);
        Ok(t.broadcast_as(shape)?)
    }
}

impl Op for Binary {
    fn type_name(&self) -> &'static str {
        match self.op {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let m = inputs[0].dim(0)?;
        let a = &inputs[0].reshape(with_leading(&[m], &self.a))?;
        let b = &inputs[1].reshape(with_leading(&[m], &self.b))?;
        let y = tensor::broadcast(arith(self.op), a, b)?;
        if matches!(self.op, BinaryOp::Div) {
            if let Some(pos) = tensor::first_non_finite(&y)? {
                bail!(NonFinite, "div: the quotient is not finite at index {:?} (division by zero?)", tensor::unravel(pos, y.dims()));
            }
        }
        let saved = save.then(|| Saved::new(BinarySaved { a: a.clone(), b: b.clone() }));
        Ok((y, saved))
    }

    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let s = saved.get::<BinarySaved>();
        // ∂y/∂a and ∂y/∂b per element (None: 1).
        let (da, db): (Option<Tensor>, Option<Tensor>) = match self.op {
            BinaryOp::Add | BinaryOp::Sub => (None, None),
            BinaryOp::Mul => (Some(col(&s.b)?), Some(col(&s.a)?)),
            // a / b: 1/b and −a/b².
            BinaryOp::Div => {
                let inv = s.b.recip()?;
                (Some(col(&inv)?), Some(col(&s.a.neg()?.broadcast_mul(&inv.sqr()?)?)?))
            }
        };
        let pull = |d: &Option<Tensor>, shape: &[usize]| -> Result<Tensor> {
            let t = match d {
                None => v.clone(),
                Some(d) => tensor::broadcast(Arith::Mul, v, d)?,
            };
            unbroadcast(&t, shape)
        };
        let to_b = if needs[1] { Some(pull(&db, &self.b)?) } else { None };
        let to_b = match (self.op, to_b) {
            (BinaryOp::Sub, Some(t)) => Some(t.neg()?),
            (_, t) => t,
        };
        let to_a = if needs[0] { Some(self.unpad(pull(&da, &self.a)?, 0)?) } else { None };
        Ok(vec![to_a, to_b.map(|t| self.unpad(t, 1)).transpose()?])
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let s = saved.get::<BinarySaved>();
        let ta = x_dots[0].map(|t| self.pad(t, 0)).transpose()?;
        let tb = x_dots[1].map(|t| self.pad(t, 1)).transpose()?;
        let (ta, tb) = (ta.as_ref(), tb.as_ref());
        let part_a = match ta {
            None => None,
            Some(t) => Some(match self.op {
                BinaryOp::Add | BinaryOp::Sub => self.widen(t)?,
                BinaryOp::Mul => tensor::broadcast(Arith::Mul, &t, &col(&s.b)?)?,
                BinaryOp::Div => tensor::broadcast(Arith::Div, &t, &col(&s.b)?)?,
            }),
        };
        let part_b = match tb {
            None => None,
            Some(t) => Some(match self.op {
                BinaryOp::Add => self.widen(t)?,
                BinaryOp::Sub => self.widen(&t.neg()?)?,
                BinaryOp::Mul => tensor::broadcast(Arith::Mul, &t, &col(&s.a)?)?,
                BinaryOp::Div => tensor::broadcast(Arith::Mul, &t, &col(&s.a.neg()?.broadcast_div(&s.b.sqr()?)?)?)?,
            }),
        };
        Ok(match (part_a, part_b) {
            (Some(p), Some(q)) => Some(tensor::broadcast(Arith::Add, &p, &q)?),
            (Some(p), None) | (None, Some(p)) => Some(self.widen(&p)?),
            (None, None) => None,
        })
    }

    fn second_order_all(&self, saved: &Saved, g: &Tensor, x_dots: &[Option<&Tensor>], needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let s = saved.get::<BinarySaved>();
        let g = col(g)?;
        let ta = x_dots[0].map(|t| self.pad(t, 0)).transpose()?;
        let tb = x_dots[1].map(|t| self.pad(t, 1)).transpose()?;
        let (ta, tb) = (ta.as_ref(), tb.as_ref());
        let (to_a, to_b) = match self.op {
            BinaryOp::Add | BinaryOp::Sub => (None, None),
            // ∂²y/∂a∂b = 1.
            BinaryOp::Mul => (
                tb.map(|t| tensor::broadcast(Arith::Mul, &g, t)).transpose()?,
                ta.map(|t| tensor::broadcast(Arith::Mul, &g, t)).transpose()?,
            ),
            // y = a/b: ∂²y/∂a∂b = −1/b², ∂²y/∂b² = 2a/b³, ∂²y/∂a² = 0.
            BinaryOp::Div => {
                let inv = s.b.recip()?;
                let cross = col(&inv.sqr()?.neg()?)?;
                let bb = col(&(&s.a * 2.0)?.broadcast_mul(&inv.powf(3.0)?)?)?;
                let to_a = tb.map(|t| tensor::broadcast(Arith::Mul, &tensor::broadcast(Arith::Mul, &g, &cross)?, t)).transpose()?;
                let from_a = ta.map(|t| tensor::broadcast(Arith::Mul, &tensor::broadcast(Arith::Mul, &g, &cross)?, t)).transpose()?;
                let from_b = tb.map(|t| tensor::broadcast(Arith::Mul, &tensor::broadcast(Arith::Mul, &g, &bb)?, t)).transpose()?;
                let to_b = match (from_a, from_b) {
                    (Some(p), Some(q)) => Some(tensor::broadcast(Arith::Add, &p, &q)?),
                    (p, q) => p.or(q),
                };
                (to_a, to_b)
            }
        };
        Ok(vec![
            match (needs[0], to_a) {
                (true, Some(t)) => Some(self.unpad(unbroadcast(&self.widen(&t)?, &self.a)?, 0)?),
                _ => None,
            },
            match (needs[1], to_b) {
                (true, Some(t)) => Some(self.unpad(unbroadcast(&self.widen(&t)?, &self.b)?, 1)?),
                _ => None,
            },
        ])
    }

    fn residual(&self, _saved: &Saved, _g: &Tensor) -> Result<Residual> {
        Ok(if self.couples_inputs() { Residual::Coupled } else { Residual::None })
    }

    fn couples_inputs(&self) -> bool {
        matches!(self.op, BinaryOp::Mul | BinaryOp::Div)
    }
}

/// `x ∘ s` or `s ∘ x` with a number s (and `neg` as `x · (−1)`).
struct Scalar {
    op: BinaryOp,
    s: f64,
    reverse: bool,
    shape: Vec<usize>,
}

impl Scalar {
    /// The op as y = slope·x + offset, when it is affine (everything but s / x).
    fn as_affine_map(&self) -> Option<(f64, f64)> {
        let (s, rev) = (self.s, self.reverse);
        Some(match self.op {
            BinaryOp::Add => (1.0, s),
            BinaryOp::Sub if rev => (-1.0, s),
            BinaryOp::Sub => (1.0, -s),
            BinaryOp::Mul => (s, 0.0),
            BinaryOp::Div if rev => return None,
            BinaryOp::Div => (1.0 / s, 0.0),
        })
    }
}

/// s / x keeps x for its derivatives −s/x² and 2s/x³.
struct ScalarSaved {
    x: Option<Tensor>,
}

impl Layer for Scalar {
    fn type_name(&self) -> &'static str {
        match self.op {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        let y = match self.as_affine_map() {
            Some((a, b)) => x.affine(a, b)?,
            None => {
                let y = (x.recip()? * self.s)?;
                if let Some(pos) = tensor::first_non_finite(&y)? {
                    bail!(NonFinite, "div: {} / x is not finite at index {:?} (x = 0?)", self.s, tensor::unravel(pos, y.dims()));
                }
                y
            }
        };
        let keep = self.as_affine_map().is_none().then(|| x.clone());
        Ok((y, save.then(|| Saved::new(ScalarSaved { x: keep }))))
    }

    fn backward(&self, saved: &Saved, v: &Tensor) -> Result<Tensor> {
        match self.as_affine_map() {
            Some((a, _)) => Ok((v * a)?),
            None => {
                let x = saved.get::<ScalarSaved>().x.as_ref().expect("s / x saves x");
                Ok(v.broadcast_mul(&col(&(x.sqr()?.recip()? * -self.s)?)?)?)
            }
        }
    }

    fn jvp_input(&self, saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        self.backward(saved, x_dot)
    }

    fn input_residual(&self, saved: &Saved, g: &Tensor) -> Result<Option<Tensor>> {
        // (s/x)'' = 2s/x³.
        match &saved.get::<ScalarSaved>().x {
            Some(x) => Ok(Some((x.powf(3.0)?.recip()? * (2.0 * self.s))?.mul(g)?)),
            None => Ok(None),
        }
    }

    fn linear_map(&self) -> bool {
        matches!(self.as_affine_map(), Some((_, b)) if b == 0.0)
    }
}

/// Concatenation of several values along one axis.
struct Cat {
    axis: usize,
    sizes: Vec<usize>,
    out: Vec<usize>,
}

impl Op for Cat {
    fn type_name(&self) -> &'static str {
        "cat"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((Tensor::cat(inputs, self.axis + 1)?, save.then(|| Saved::new(()))))
    }

    fn backward_all(&self, _saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(self.sizes.len());
        for (j, &n) in self.sizes.iter().enumerate() {
            out.push(if needs[j] { Some(v.narrow(self.axis + 2, start, n)?.contiguous()?) } else { None });
            start += n;
        }
        Ok(out)
    }

    fn jvp_all(&self, _saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let Some(any) = x_dots.iter().flatten().next() else {
            return Ok(None);
        };
        let parts = x_dots
            .iter()
            .zip(&self.sizes)
            .map(|(t, &n)| match t {
                Some(t) => Ok((*t).clone()),
                None => {
                    let mut shape = any.dims().to_vec();
                    shape[self.axis + 2] = n;
                    Ok(Tensor::zeros(shape, any.dtype(), any.device())?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, self.axis + 2)?))
    }
}

/// The first `lead` axes of `t` (`(M,)` or `(M, K)`) followed by `shape`.
fn lead_then(t: &Tensor, lead: usize, shape: &[usize]) -> Vec<usize> {
    with_leading(&t.dims()[..lead], shape)
}

/// view / reshape / flatten / squeeze / unsqueeze.
struct Reshape {
    in_shape: Vec<usize>,
    out_shape: Vec<usize>,
}

impl Layer for Reshape {
    fn type_name(&self) -> &'static str {
        "reshape"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((x.reshape(lead_then(x, 1, &self.out_shape))?, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        Ok(v.reshape(lead_then(v, 2, &self.in_shape))?)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        Ok(x_dot.reshape(lead_then(x_dot, 2, &self.out_shape))?)
    }

    fn linear_map(&self) -> bool {
        true
    }
}

/// permute / transpose of per-sample axes: output axis a is input axis `perm[a]`.
struct Permute {
    perm: Vec<usize>,
    out: Vec<usize>,
}

impl Permute {
    fn apply(&self, t: &Tensor, lead: usize, perm: &[usize]) -> Result<Tensor> {
        let dims: Vec<usize> = (0..lead).chain(perm.iter().map(|&p| p + lead)).collect();
        Ok(t.permute(dims)?.contiguous()?)
    }
}

impl Layer for Permute {
    fn type_name(&self) -> &'static str {
        "permute"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((self.apply(x, 1, &self.perm)?, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        let mut inverse = vec![0; self.perm.len()];
        for (a, &p) in self.perm.iter().enumerate() {
            inverse[p] = a;
        }
        self.apply(v, 2, &inverse)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        self.apply(x_dot, 2, &self.perm)
    }

    fn linear_map(&self) -> bool {
        true
    }
}

/// mean / sum over per-sample axes.
struct Reduce {
    axes: Vec<usize>,
    scale: f64,
    in_shape: Vec<usize>,
    /// The input shape with the reduced axes kept as 1.
    kept: Vec<usize>,
    out: Vec<usize>,
}

impl Reduce {
    fn apply(&self, t: &Tensor, lead: usize) -> Result<Tensor> {
        let axes: Vec<usize> = self.axes.iter().map(|&a| a + lead).collect();
        let t = tensor::sum_keepdims(t, &axes)?;
        let shape = lead_then(&t, lead, &self.out);
        Ok((t * self.scale)?.reshape(shape)?)
    }
}

impl Layer for Reduce {
    fn type_name(&self) -> &'static str {
        if self.scale == 1.0 {
            "sum"
        } else {
            "mean"
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((self.apply(x, 1)?, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Every reduced element receives scale · v.
        let kept = v.reshape(lead_then(v, 2, &self.kept))?;
        Ok((kept.broadcast_as(lead_then(v, 2, &self.in_shape))? * self.scale)?.contiguous()?)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        self.apply(x_dot, 2)
    }

    fn linear_map(&self) -> bool {
        true
    }
}

/// `x[..., start:end:step, ...]` as a gather of the kept indices.
struct Slice {
    axis: usize,
    index: Tensor,
    len: usize,
    out: Vec<usize>,
}

impl Layer for Slice {
    fn type_name(&self) -> &'static str {
        "slice"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((tensor::select(x, &self.index, self.axis + 1)?, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        tensor::select_adjoint(v, &self.index, self.axis + 2, self.len)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        tensor::select(x_dot, &self.index, self.axis + 2)
    }

    fn linear_map(&self) -> bool {
        true
    }
}

/// `x[..., index, ...]`: one position of an axis, the axis removed.
struct Select {
    axis: usize,
    index: usize,
    in_shape: Vec<usize>,
    out: Vec<usize>,
}

impl Layer for Select {
    fn type_name(&self) -> &'static str {
        "select"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((x.narrow(self.axis + 1, self.index, 1)?.squeeze(self.axis + 1)?.contiguous()?, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        let ids = tensor::index_tensor(&[self.index], v.device())?;
        tensor::select_adjoint(&v.unsqueeze(self.axis + 2)?, &ids, self.axis + 2, self.in_shape[self.axis])
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        Ok(x_dot.narrow(self.axis + 2, self.index, 1)?.squeeze(self.axis + 2)?.contiguous()?)
    }

    fn linear_map(&self) -> bool {
        true
    }
}
