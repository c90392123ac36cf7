//! Pointwise math (`pow`, `sqrt`, `rsqrt`, `exp`, `log`, `abs`), softmax /
//! log-softmax and cumulative sums: the functional ops of attention blocks
//! and normalization layers written out by hand.

use super::graph_ops::per_sample_axis;
use super::{Layer, Op, Residual, Saved};
use crate::error::{bail, Result};
use crate::spec::MathOp;
use crate::tensor::{self, Tensor};

/// y = f(x) elementwise, with f' and f'' for the backward passes.
pub(crate) enum PointKind {
    Pow(f64),
    Math(MathOp),
}

pub(crate) struct Pointwise {
    kind: PointKind,
    shape: Vec<usize>,
    label: String,
}

struct PointSaved {
    x: Tensor,
    y: Tensor,
}

impl Pointwise {
    pub(crate) fn new(kind: PointKind, shape: &[usize], label: &str) -> Self {
        Pointwise { kind, shape: shape.to_vec(), label: label.to_string() }
    }

    /// f'(x) from x and y = f(x).
    fn first(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            PointKind::Pow(p) if p == 1.0 => x.ones_like()?,
            PointKind::Pow(p) => (x.powf(p - 1.0)? * p)?,
            // (√x)' = 1/(2√x); (x^-½)' = −½ x^-3/2 = −½ y³.
            PointKind::Math(MathOp::Sqrt) => (y.recip()? * 0.5)?,
            PointKind::Math(MathOp::Rsqrt) => (y.powf(3.0)? * -0.5)?,
            PointKind::Math(MathOp::Exp) => y.clone(),
            PointKind::Math(MathOp::Log) => x.recip()?,
            PointKind::Math(MathOp::Abs) => tensor::heaviside(x)?.affine(2.0, -1.0)?,
        })
    }

    /// f''(x), `None` where it is zero.
    fn second(&self, x: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.kind {
            PointKind::Pow(p) if p == 1.0 => return Ok(None),
            PointKind::Pow(p) if p == 2.0 => (x.ones_like()? * 2.0)?,
            PointKind::Pow(p) => (x.powf(p - 2.0)? * (p * (p - 1.0)))?,
            // (√x)'' = −¼ x^-3/2 = −¼ / y³; (x^-½)'' = ¾ x^-5/2 = ¾ y⁵.
            PointKind::Math(MathOp::Sqrt) => (y.powf(3.0)?.recip()? * -0.25)?,
            PointKind::Math(MathOp::Rsqrt) => (y.powf(5.0)? * 0.75)?,
            PointKind::Math(MathOp::Exp) => y.clone(),
            PointKind::Math(MathOp::Log) => x.sqr()?.recip()?.neg()?,
            PointKind::Math(MathOp::Abs) => return Ok(None),
        }))
    }
}

impl Layer for Pointwise {
    fn type_name(&self) -> &'static str {
        match self.kind {
            PointKind::Pow(_) => "pow",
            PointKind::Math(MathOp::Sqrt) => "sqrt",
            PointKind::Math(MathOp::Rsqrt) => "rsqrt",
            PointKind::Math(MathOp::Exp) => "exp",
            PointKind::Math(MathOp::Log) => "log",
            PointKind::Math(MathOp::Abs) => "abs",
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        let y = match self.kind {
            PointKind::Pow(p) if p == 2.0 => x.sqr()?,
            PointKind::Pow(p) => x.powf(p)?,
            PointKind::Math(MathOp::Sqrt) => x.sqrt()?,
            PointKind::Math(MathOp::Rsqrt) => x.sqrt()?.recip()?,
            PointKind::Math(MathOp::Exp) => x.exp()?,
            PointKind::Math(MathOp::Log) => x.log()?,
            PointKind::Math(MathOp::Abs) => x.abs()?,
        };
        if let Some(pos) = tensor::first_non_finite(&y)? {
            bail!(NonFinite, "{}: the result is not finite at index {:?} (outside the domain?)", self.label, tensor::unravel(pos, y.dims()));
        }
        Ok((y.clone(), save.then(|| Saved::new(PointSaved { x: x.clone(), y }))))
    }

    fn backward(&self, saved: &Saved, v: &Tensor) -> Result<Tensor> {
        let s = saved.get::<PointSaved>();
        Ok(v.broadcast_mul(&self.first(&s.x, &s.y)?.unsqueeze(1)?)?)
    }

    fn jvp_input(&self, saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        self.backward(saved, x_dot)
    }

    fn input_residual(&self, saved: &Saved, g: &Tensor) -> Result<Option<Tensor>> {
        let s = saved.get::<PointSaved>();
        Ok(self.second(&s.x, &s.y)?.map(|d2| d2.mul(g)).transpose()?)
    }
}

/// softmax or log-softmax along one per-sample axis.
pub(crate) struct Softmax {
    axis: usize,
    log: bool,
    shape: Vec<usize>,
}

/// The probabilities p `(M, *s)` (softmax's output, exp of log-softmax's).
struct SoftmaxSaved {
    p: Tensor,
}

impl Softmax {
    pub(crate) fn build(dim: i64, log: bool, shape: &[usize]) -> std::result::Result<Self, String> {
        Ok(Softmax { axis: per_sample_axis(dim, shape.len())?, log, shape: shape.to_vec() })
    }

    /// Σ over the axis, kept, of a `(M, K, *s)` tensor.
    fn sum_k(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.sum_keepdim(self.axis + 2)?)
    }
}

/// softmax of `x` along tensor axis `axis`, stabilized by the maximum.
pub(crate) fn softmax(x: &Tensor, axis: usize) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(axis)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(axis)?)?)
}

impl Op for Softmax {
    fn type_name(&self) -> &'static str {
        if self.log {
            "log_softmax"
        } else {
            "softmax"
        }
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let x = inputs[0];
        let a = self.axis + 1;
        let p = softmax(x, a)?;
        let y = if self.log {
            // x − max − log Σ exp(x − max).
            let shifted = x.broadcast_sub(&x.max_keepdim(a)?)?;
            shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(a)?.log()?)?
        } else {
            p.clone()
        };
        Ok((y, save.then(|| Saved::new(SoftmaxSaved { p }))))
    }

    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if !needs[0] {
            return Ok(vec![None]);
        }
        let p = saved.get::<SoftmaxSaved>().p.unsqueeze(1)?;
        Ok(vec![Some(if self.log {
            // Jᵀ v = v − p Σ v.
            v.broadcast_sub(&p.broadcast_mul(&self.sum_k(v)?)?)?
        } else {
            // Jᵀ v = p ⊙ (v − Σ p ⊙ v).
            p.broadcast_mul(&v.broadcast_sub(&self.sum_k(&v.broadcast_mul(&p)?)?)?)?
        })])
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let Some(t) = x_dots[0] else { return Ok(None) };
        let p = saved.get::<SoftmaxSaved>().p.unsqueeze(1)?;
        let s = self.sum_k(&t.broadcast_mul(&p)?)?;
        Ok(Some(if self.log { t.broadcast_sub(&s)? } else { p.broadcast_mul(&t.broadcast_sub(&s)?)? }))
    }

    fn second_order_all(&self, saved: &Saved, g: &Tensor, x_dots: &[Option<&Tensor>], needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (Some(t), true) = (x_dots[0], needs[0]) else {
            return Ok(vec![None]);
        };
        let p = saved.get::<SoftmaxSaved>().p.unsqueeze(1)?;
        let g = g.unsqueeze(1)?;
        // ṗ = p ⊙ (ẋ − Σ p ẋ).
        let p_dot = p.broadcast_mul(&t.broadcast_sub(&self.sum_k(&t.broadcast_mul(&p)?)?)?)?;
        Ok(vec![Some(if self.log {
            // y = x − logsumexp x: Σ_i g_i ∇²y_i ẋ = −(Σ g) ṗ.
            p_dot.broadcast_mul(&self.sum_k(&g)?)?.neg()?
        } else {
            // g ⊙ ṗ − p (g · ṗ) − ṗ (g · p).
            let gp = self.sum_k(&g.broadcast_mul(&p)?)?;
            let gpd = self.sum_k(&p_dot.broadcast_mul(&g)?)?;
            p_dot
                .broadcast_mul(&g)?
                .broadcast_sub(&p.broadcast_mul(&gpd)?)?
                .broadcast_sub(&p_dot.broadcast_mul(&gp)?)?
        })])
    }

    fn residual(&self, _saved: &Saved, _g: &Tensor) -> Result<Residual> {
        Ok(Residual::Coupled)
    }

    fn couples_inputs(&self) -> bool {
        true
    }
}

/// Cumulative sum along one per-sample axis (linear).
pub(crate) struct Cumsum {
    axis: usize,
    shape: Vec<usize>,
}

impl Cumsum {
    pub(crate) fn build(dim: i64, shape: &[usize]) -> std::result::Result<Self, String> {
        Ok(Cumsum { axis: per_sample_axis(dim, shape.len())?, shape: shape.to_vec() })
    }
}

impl Layer for Cumsum {
    fn type_name(&self) -> &'static str {
        "cumsum"
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        Ok((x.cumsum(self.axis + 1)?, save.then(|| Saved::new(()))))
    }

    fn backward(&self, _saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // The adjoint is the reversed cumulative sum: Σ_{j ≥ i} v_j = Σ v − cumsum_i + v_i.
        let a = self.axis + 2;
        Ok(v.sub(&v.cumsum(a)?)?.broadcast_add(&v.sum_keepdim(a)?)?)
    }

    fn jvp_input(&self, _saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        Ok(x_dot.cumsum(self.axis + 2)?)
    }

    fn linear_map(&self) -> bool {
        true
    }
}
