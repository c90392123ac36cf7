//! Elementwise activations: y = σ(x), and the diagonal Jacobian σ'(x).
//!
//! Each formula follows PyTorch's definition exactly, including its branch
//! choices at kinks (σ'(0) of ReLU is 0, of LeakyReLU the slope, of ELU α)
//! and Softplus' switch to the identity above its threshold.

use super::{Layer, Saved};
use crate::error::Result;
use crate::spec::Activation;
use crate::tensor::{self, Real, Tensor, WithDerivative};

/// A parameter-free elementwise activation (ReLU, Tanh, GELU, ...).
pub struct Elementwise {
    act: Activation,
    shape: Vec<usize>,
}

/// Forward state: the input x and σ'(x).
struct ElementwiseSaved {
    input: Tensor,
    derivative: Tensor,
}

impl Elementwise {
    pub(crate) fn new(act: Activation, shape: &[usize]) -> Self {
        Elementwise {
            act,
            shape: shape.to_vec(),
        }
    }

    /// Which activation.
    pub fn activation(&self) -> Activation {
        self.act
    }
}

/// eˣ − 1 accurate near 0 (Kahan): with u = eˣ, (u − 1)·x / log u, = x where u == 1.
fn expm1(x: &Tensor) -> Result<Tensor> {
    let u = x.exp()?;
    let um1 = (&u - 1.0)?;
    let is_one = um1.eq(0.0)?;
    let logu = is_one.where_cond(&u.ones_like()?, &u.log()?)?;
    let general = (um1 * x)?.div(&logu)?;
    Ok(is_one.where_cond(x, &general)?)
}

/// σ(x) and σ'(x): one fused pass on the CPU (the scalar formulas below),
/// tensor ops elsewhere.
fn value_and_derivative(act: Activation, x: &Tensor) -> Result<(Tensor, Tensor)> {
    match fused(act, x)? {
        Some(pair) => Ok(pair),
        None => value_and_derivative_by_ops(act, x),
    }
}

/// `$body` with `$f` bound to the scalar formula of activation `$act` (one
/// type per activation, so that the kernel's loop is compiled for that
/// formula alone: a `match` on the activation inside the loop kept it from
/// vectorizing and cost a branch per element).
macro_rules! with_formula {
    ($act:expr, |$f:ident| $body:expr) => {
        match $act {
            Activation::ReLU => {
                let $f = &Relu;
                $body
            }
            Activation::LeakyReLU { negative_slope } => {
                let $f = &LeakyRelu(negative_slope);
                $body
            }
            Activation::Tanh => {
                let $f = &TanhFn;
                $body
            }
            Activation::Sigmoid => {
                let $f = &SigmoidFn;
                $body
            }
            Activation::Softplus { beta, threshold } => {
                let $f = &Softplus { beta, threshold };
                $body
            }
            Activation::ELU { alpha } => {
                let $f = &Elu(alpha);
                $body
            }
            Activation::GELU { tanh_approximation: false } => {
                let $f = &Gelu;
                $body
            }
            Activation::GELU { tanh_approximation: true } => {
                let $f = &GeluTanh;
                $body
            }
            Activation::ReLU6 => {
                let $f = &Relu6;
                $body
            }
            Activation::Hardsigmoid => {
                let $f = &Hardsigmoid;
                $body
            }
            Activation::Hardswish => {
                let $f = &Hardswish;
                $body
            }
            Activation::SiLU => {
                let $f = &Silu;
                $body
            }
        }
    };
}

/// [`value_and_derivative`] by the one-pass CPU kernel, or `None` where it
/// does not run.
fn fused(act: Activation, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    with_formula!(act, |f| tensor::map_with_derivative(f, x))
}

/// σ(x) alone (a forward pass that keeps nothing for a backward pass).
fn value(act: Activation, x: &Tensor) -> Result<Tensor> {
    match with_formula!(act, |f| tensor::map_value(f, x))? {
        Some(y) => Ok(y),
        None => Ok(value_and_derivative_by_ops(act, x)?.0),
    }
}

// The scalar formulas of `value_and_derivative_by_ops`, with the same
// branches at every kink.

fn sigmoid_of<T: Real>(z: T) -> T {
    T::of(1.0) / (T::of(1.0) + (-z).exp())
}

fn clamp<T: Real>(v: T, lo: T, hi: T) -> T {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

struct Relu;
impl WithDerivative for Relu {
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let pos = x > T::of(0.0);
        (if pos { x } else { T::of(0.0) }, if pos { T::of(1.0) } else { T::of(0.0) })
    }
}

struct LeakyRelu(f64);
impl WithDerivative for LeakyRelu {
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let d = if x > T::of(0.0) { T::of(1.0) } else { T::of(self.0) };
        (x * d, d)
    }
}

struct TanhFn;
impl WithDerivative for TanhFn {
    const COST: usize = 8;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let y = x.tanh();
        (y, T::of(1.0) - y * y)
    }
}

struct SigmoidFn;
impl WithDerivative for SigmoidFn {
    const COST: usize = 16;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let y = sigmoid_of(x);
        (y, y * (T::of(1.0) - y))
    }
}

/// log(1 + e^z)/β with z = βx, = max(z, 0) + log1p(e^{−|z|}); x itself above the threshold.
struct Softplus {
    beta: f64,
    threshold: f64,
}
impl WithDerivative for Softplus {
    const COST: usize = 32;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let z = x * T::of(self.beta);
        let relu = if z > T::of(0.0) { z } else { T::of(0.0) };
        let soft = (relu + (-z.abs()).exp().ln_1p()) / T::of(self.beta);
        if z > T::of(self.threshold) {
            (x, T::of(1.0))
        } else {
            (soft, sigmoid_of(z))
        }
    }
}

struct Elu(f64);
impl WithDerivative for Elu {
    const COST: usize = 32;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let alpha = T::of(self.0);
        let (neg, slope) = (x.exp_m1() * alpha, x.exp() * alpha);
        if x > T::of(0.0) {
            (x, T::of(1.0))
        } else {
            (neg, slope)
        }
    }
}

/// x Φ(x), Φ(x) = ½(1 + erf(x/√2)); σ' = Φ(x) + x φ(x).
struct Gelu;
impl WithDerivative for Gelu {
    const COST: usize = 32;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let cdf = ((x / T::of(std::f64::consts::SQRT_2)).erf() + T::of(1.0)) * T::of(0.5);
        let pdf =
            (x * x * T::of(-0.5)).exp() * T::of(0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2);
        (x * cdf, cdf + x * pdf)
    }
}

/// ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³).
struct GeluTanh;
impl WithDerivative for GeluTanh {
    const COST: usize = 8;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let c = T::of((2.0 / std::f64::consts::PI).sqrt());
        let x2 = x * x;
        let t = ((x * (x2 * T::of(0.044715)) + x) * c).tanh();
        let half_one_plus_t = (t + T::of(1.0)) * T::of(0.5);
        let du = (x2 * T::of(3.0 * 0.044715) + T::of(1.0)) * c;
        (x * half_one_plus_t, half_one_plus_t + x * T::of(0.5) * (T::of(1.0) - t * t) * du)
    }
}

struct Relu6;
impl WithDerivative for Relu6 {
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let (zero, six) = (T::of(0.0), T::of(6.0));
        let inside = x > zero && six - x > zero;
        (clamp(x, zero, six), if inside { T::of(1.0) } else { zero })
    }
}

struct Hardsigmoid;
impl WithDerivative for Hardsigmoid {
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let (zero, three, six) = (T::of(0.0), T::of(3.0), T::of(6.0));
        let inside = x + three > zero && three - x > zero;
        (clamp(x + three, zero, six) / six, if inside { T::of(1.0) / six } else { zero })
    }
}

/// x ReLU6(x + 3)/6; σ' = 0 below −3, x/3 + ½ on [−3, 3], 1 above.
struct Hardswish;
impl WithDerivative for Hardswish {
    const COST: usize = 2;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let (zero, three, six) = (T::of(0.0), T::of(3.0), T::of(6.0));
        let y = x * (clamp(x + three, zero, six) / six);
        let mid = x / three + T::of(0.5);
        let d = if x > three { T::of(1.0) } else if x >= -three { mid } else { zero };
        (y, d)
    }
}

/// x s(x); σ' = s (1 + x (1 − s)).
struct Silu;
impl WithDerivative for Silu {
    const COST: usize = 16;
    fn eval<T: Real>(&self, x: T) -> (T, T) {
        let s = sigmoid_of(x);
        (x * s, s * (x * (T::of(1.0) - s) + T::of(1.0)))
    }
}

/// σ(x) and σ'(x) in tensor ops (any device and dtype).
fn value_and_derivative_by_ops(act: Activation, x: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok(match act {
        Activation::ReLU => (x.relu()?, tensor::heaviside(x)?),
        Activation::LeakyReLU { negative_slope } => {
            // y = x for x > 0, slope·x otherwise; σ' = 1 or slope.
            let pos = tensor::heaviside(x)?;
            let d = ((&pos * (1.0 - negative_slope))? + negative_slope)?;
            ((x * &d)?, d)
        }
        Activation::Tanh => {
            let y = tensor::tanh(x)?;
            let d = (1.0 - y.sqr()?)?;
            (y, d)
        }
        Activation::Sigmoid => {
            let y = tensor::sigmoid(x)?;
            let d = (&y * (1.0 - &y)?)?;
            (y, d)
        }
        Activation::Softplus { beta, threshold } => {
            // y = log(1 + e^{βx}) / β, or x where βx > threshold;
            // σ' = sigmoid(βx), or 1 there. log(1 + e^z) = max(z, 0) + log1p(e^{−|z|}).
            let z = (x * beta)?;
            let above = z.gt(threshold)?;
            let soft = ((z.relu()? + tensor::log1p(&z.abs()?.neg()?.exp()?)?)? / beta)?;
            let y = above.where_cond(x, &soft)?;
            let d = above.where_cond(&x.ones_like()?, &tensor::sigmoid(&z)?)?;
            (y, d)
        }
        Activation::ELU { alpha } => {
            // y = x for x > 0, α(eˣ − 1) otherwise; σ' = 1 or α eˣ.
            let pos = x.gt(0.0)?;
            let neg_part = (expm1(x)? * alpha)?;
            let y = pos.where_cond(x, &neg_part)?;
            let d = pos.where_cond(&x.ones_like()?, &(x.exp()? * alpha)?)?;
            (y, d)
        }
        Activation::GELU {
            tanh_approximation: false,
        } => {
            // y = x Φ(x), Φ(x) = ½(1 + erf(x/√2)); σ' = Φ(x) + x φ(x).
            let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
            let cdf = cdf?;
            let pdf = ((x.sqr()? * -0.5)?.exp()? * (0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2))?;
            let y = (x * &cdf)?;
            let d = (cdf + (x * pdf)?)?;
            (y, d)
        }
        Activation::GELU {
            tanh_approximation: true,
        } => {
            // y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
            // σ' = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²).
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let x2 = x.sqr()?;
            let u = ((x * (&x2 * 0.044715)?)? + x)?;
            let t = (u * c)?.tanh()?;
            let half_one_plus_t = ((&t + 1.0)? * 0.5)?;
            let du = (((&x2 * (3.0 * 0.044715))? + 1.0)? * c)?;
            let y = (x * &half_one_plus_t)?;
            let d = (half_one_plus_t + ((x * 0.5)? * (1.0 - t.sqr()?)?)?.mul(&du)?)?;
            (y, d)
        }
        Activation::ReLU6 => {
            // y = min(max(x, 0), 6); σ' = 1 on (0, 6), 0 elsewhere (torch's hardtanh at the kinks).
            let inside = (tensor::heaviside(x)? * tensor::heaviside(&(6.0 - x)?)?)?;
            (x.clamp(0.0, 6.0)?, inside)
        }
        Activation::Hardsigmoid => {
            // y = ReLU6(x + 3)/6; σ' = 1/6 on (−3, 3), 0 elsewhere.
            let inside = (tensor::heaviside(&(x + 3.0)?)? * tensor::heaviside(&(3.0 - x)?)?)?;
            (((x + 3.0)?.clamp(0.0, 6.0)? / 6.0)?, (inside / 6.0)?)
        }
        Activation::Hardswish => {
            // y = x ReLU6(x + 3)/6; σ' = 0 for x < −3, x/3 + ½ for −3 ≤ x ≤ 3, 1 above
            // (torch's hardswish_backward, including its choice at both kinks).
            let y = (x * ((x + 3.0)?.clamp(0.0, 6.0)? / 6.0)?)?;
            let lo = x.ge(-3.0)?.to_dtype(x.dtype())?; // x ≥ −3
            let hi = x.gt(3.0)?.to_dtype(x.dtype())?; // x > 3
            let mid = (&lo - &hi)?;
            let d = ((mid * ((x / 3.0)? + 0.5)?)? + hi)?;
            (y, d)
        }
        Activation::SiLU => {
            // y = x s(x), s the logistic sigmoid; σ' = s (1 + x (1 − s)).
            let s = tensor::sigmoid(x)?;
            let y = (x * &s)?;
            let d = (&s * ((x * (1.0 - &s)?)? + 1.0)?)?;
            (y, d)
        }
    })
}

/// σ''(x), or `None` where it is zero almost everywhere (ReLU, LeakyReLU,
/// ReLU6, Hardsigmoid).
pub(crate) fn second_derivative(act: Activation, x: &Tensor) -> Result<Option<Tensor>> {
    Ok(Some(match act {
        Activation::ReLU | Activation::LeakyReLU { .. } | Activation::ReLU6 | Activation::Hardsigmoid => {
            return Ok(None)
        }
        // 1/3 on (−3, 3) (torch's derivative of hardswish_backward), 0 elsewhere
        Activation::Hardswish => {
            let inside = (tensor::heaviside(&(x + 3.0)?)? * tensor::heaviside(&(3.0 - x)?)?)?;
            (inside / 3.0)?
        }
        // tanh'' = −2 y (1 − y²)
        Activation::Tanh => {
            let y = x.tanh()?;
            ((&y * -2.0)? * (1.0 - y.sqr()?)?)?
        }
        // s'' = s (1 − s)(1 − 2s)
        Activation::Sigmoid => {
            let s = tensor::sigmoid(x)?;
            ((&s * (1.0 - &s)?)? * (1.0 - (&s * 2.0)?)?)?
        }
        // β s(βx)(1 − s(βx)) below the threshold, 0 where softplus is the identity
        Activation::Softplus { beta, threshold } => {
            let z = (x * beta)?;
            let s = tensor::sigmoid(&z)?;
            let d2 = ((&s * (1.0 - &s)?)? * beta)?;
            z.gt(threshold)?.where_cond(&x.zeros_like()?, &d2)?
        }
        // 0 for x > 0, α eˣ otherwise (torch's branch at 0)
        Activation::ELU { alpha } => {
            let pos = x.gt(0.0)?;
            pos.where_cond(&x.zeros_like()?, &(x.exp()? * alpha)?)?
        }
        // (xΦ(x))'' = φ(x)(2 − x²)
        Activation::GELU {
            tanh_approximation: false,
        } => {
            let x2 = x.sqr()?;
            let pdf = ((&x2 * -0.5)?.exp()? * (0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2))?;
            (pdf * (2.0 - x2)?)?
        }
        // (1 − t²)[u' + ½x(u'' − 2t u'²)], t = tanh u, u = c(x + a x³)
        Activation::GELU {
            tanh_approximation: true,
        } => {
            let (c, a) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
            let x2 = x.sqr()?;
            let u = ((x * (&x2 * a)?)? + x)?;
            let t = (u * c)?.tanh()?;
            let du = (((&x2 * (3.0 * a))? + 1.0)? * c)?;
            let ddu = (x * (6.0 * a * c))?;
            let inner = (ddu - ((&t * 2.0)? * du.sqr()?)?)?;
            let bracket = (du + ((x * 0.5)? * inner)?)?;
            ((1.0 - t.sqr()?)? * bracket)?
        }
        // (x s)'' = s(1 − s)(2 + x(1 − 2s))
        Activation::SiLU => {
            let s = tensor::sigmoid(x)?;
            let inner = ((x * (1.0 - (&s * 2.0)?)?)? + 2.0)?;
            ((&s * (1.0 - &s)?)? * inner)?
        }
    }))
}

impl Layer for Elementwise {
    fn type_name(&self) -> &'static str {
        self.act.type_name()
    }

    fn out_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<Saved>)> {
        if !save {
            return Ok((value(self.act, x)?, None));
        }
        let (y, d) = value_and_derivative(self.act, x)?;
        let saved = Saved::new(ElementwiseSaved {
            input: x.clone(),
            derivative: d,
        });
        Ok((y, Some(saved)))
    }

    fn backward(&self, saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Jᵀ v = σ'(x) ⊙ v, broadcast over the K columns.
        tensor::mul_rows(v, &saved.get::<ElementwiseSaved>().derivative)
    }

    fn jvp_input(&self, saved: &Saved, x_dot: &Tensor) -> Result<Tensor> {
        // J is diagonal: the same product as the backward pass.
        self.backward(saved, x_dot)
    }

    fn input_residual(&self, saved: &Saved, g: &Tensor) -> Result<Option<Tensor>> {
        // Σ_i g_i ∇²_x y_i = diag(σ''(x) ⊙ g).
        match second_derivative(self.act, &saved.get::<ElementwiseSaved>().input)? {
            Some(d2) => Ok(Some((d2 * g)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, Device};

    fn every_activation() -> Vec<Activation> {
        vec![
            Activation::ReLU,
            Activation::LeakyReLU { negative_slope: 0.1 },
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::Softplus { beta: 2.0, threshold: 5.0 },
            Activation::ELU { alpha: 0.7 },
            Activation::GELU { tanh_approximation: false },
            Activation::GELU { tanh_approximation: true },
            Activation::ReLU6,
            Activation::Hardsigmoid,
            Activation::Hardswish,
            Activation::SiLU,
        ]
    }

    /// A grid over [−9, 9] with every kink of the activations above on it
    /// (0, ±3, 6, Softplus' switch at βx = 5), their neighbours, and enough
    /// points for the parallel chunks of the kernel.
    fn grid() -> Vec<f64> {
        let mut x: Vec<f64> = (0..40_001).map(|i| -9.0 + 18.0 * i as f64 / 40_000.0).collect();
        for k in [0.0, -3.0, 3.0, 6.0, 2.5, -0.0, 1e-9, -1e-9, 1e-300] {
            x.extend([k, k + 1e-7, k - 1e-7]);
        }
        x
    }

    #[test]
    fn fused_kernel_agrees_with_tensor_ops() {
        let xs = grid();
        for dtype in [DType::F64, DType::F32] {
            let x = crate::tensor::from_f64(xs.clone(), &[xs.len()], dtype, &Device::Cpu).unwrap();
            for act in every_activation() {
                let (y, d) = fused(act, &x).unwrap().expect("a CPU float tensor");
                assert_eq!(tensor::to_vec_f64(&value(act, &x).unwrap()).unwrap(), tensor::to_vec_f64(&y).unwrap());
                let (y_ref, d_ref) = value_and_derivative_by_ops(act, &x).unwrap();
                // f32: within rounding of the saturated tanh (its 1 − t² is a
                // difference of numbers near 1, so an ulp of t is 1e-7 absolute).
                let tol = if dtype == DType::F64 { 1e-14 } else { 1e-5 };
                for (what, got, want) in [("value", &y, &y_ref), ("derivative", &d, &d_ref)] {
                    let (g, w) = (tensor::to_vec_f64(got).unwrap(), tensor::to_vec_f64(want).unwrap());
                    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                        assert!(
                            (a - b).abs() <= tol * b.abs().max(1.0),
                            "{act:?} {dtype:?} {what} at x = {}: fused {a}, tensor ops {b}",
                            xs[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn backward_is_the_derivative_times_every_row() {
        // Jᵀ v on K = 3 rows of M = 2 samples of shape (2, 2): σ'(x) ⊙ v per row.
        let x = Tensor::new(&[[[0.5f64, -1.0], [2.0, -4.0]], [[3.5, 0.0], [-2.5, 1.0]]], &Device::Cpu).unwrap();
        let layer = Elementwise::new(Activation::Hardswish, &[2, 2]);
        let (_, saved) = layer.forward(&x, true).unwrap();
        let v = Tensor::arange(0.0f64, 24.0, &Device::Cpu).unwrap().reshape((2, 3, 2, 2)).unwrap();
        let got = layer.backward(&saved.unwrap(), &v).unwrap();
        let (_, d) = value_and_derivative_by_ops(Activation::Hardswish, &x).unwrap();
        let want = v.broadcast_mul(&d.unsqueeze(1).unwrap()).unwrap();
        assert_eq!(got.dims(), want.dims());
        // Equal up to rounding (candle divides by 3 as a multiplication by 1/3).
        for (a, b) in tensor::to_vec_f64(&got).unwrap().iter().zip(tensor::to_vec_f64(&want).unwrap()) {
            assert!((a - b).abs() <= 1e-15 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
