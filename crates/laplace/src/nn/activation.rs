//! Elementwise activations: y = σ(x), and the diagonal Jacobian σ'(x).
//!
//! Each formula follows PyTorch's definition exactly, including its branch
//! choices at kinks (σ'(0) of ReLU is 0, of LeakyReLU the slope, of ELU α)
//! and Softplus' switch to the identity above its threshold.

use super::{Layer, Saved};
use crate::error::Result;
use crate::spec::Activation;
use crate::tensor::{self, Tensor};

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

/// σ(x) and σ'(x).
pub(crate) fn value_and_derivative(act: Activation, x: &Tensor) -> Result<(Tensor, Tensor)> {
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
        let (y, d) = value_and_derivative(self.act, x)?;
        let saved = save.then(|| {
            Saved::new(ElementwiseSaved {
                input: x.clone(),
                derivative: d,
            })
        });
        Ok((y, saved))
    }

    fn backward(&self, saved: &Saved, v: &Tensor) -> Result<Tensor> {
        // Jᵀ v = σ'(x) ⊙ v, broadcast over the K columns.
        let d = saved.get::<ElementwiseSaved>().derivative.unsqueeze(1)?;
        Ok(v.broadcast_mul(&d)?)
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
