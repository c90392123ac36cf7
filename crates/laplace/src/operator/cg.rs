//! Conjugate gradients for (A + δI) x = b with a symmetric positive
//! (semi-)definite operator A and damping δ ≥ 0.

use super::LinearOperator;
use crate::error::{bail, Result};
use crate::tensor::{self, Tensor};

/// What conjugate gradients returns.
#[derive(Clone, Debug)]
pub struct CgResult {
    /// The solution `(P,)`.
    pub x: Tensor,
    /// Operator products used.
    pub iterations: usize,
    /// ‖b − (A + δI) x‖ / ‖b‖ at the end.
    pub relative_residual: f64,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solve (A + δI) x = b to relative residual `tol` (or `max_iter` products).
pub fn conjugate_gradients(op: &dyn LinearOperator, b: &Tensor, damping: f64, tol: f64, max_iter: usize) -> Result<CgResult> {
    let p = op.dim();
    if b.dims() != [p] {
        bail!(Invalid, "right-hand side must be ({p},), got {:?}", b.dims());
    }
    if !(damping >= 0.0 && damping.is_finite()) {
        bail!(Invalid, "damping must be finite and non-negative, got {damping}");
    }
    let (dtype, device) = (op.dtype(), op.device().clone());
    let apply = |v: &[f64]| -> Result<Vec<f64>> {
        let t = tensor::from_f64(v.to_vec(), &[1, p], dtype, &device)?;
        let mut av = tensor::to_vec_f64(&op.matmat(&t)?)?;
        av.iter_mut().zip(v).for_each(|(a, x)| *a += damping * x);
        Ok(av)
    };
    let bv = tensor::to_vec_f64(b)?;
    let bnorm = dot(&bv, &bv).sqrt();
    let mut x = vec![0.0; p];
    if bnorm == 0.0 {
        return Ok(CgResult { x: tensor::from_f64(x, &[p], dtype, &device)?, iterations: 0, relative_residual: 0.0 });
    }
    let mut r = bv.clone();
    let mut d = r.clone();
    let mut rr = dot(&r, &r);
    let mut it = 0;
    while it < max_iter && rr.sqrt() > tol * bnorm {
        let ad = apply(&d)?;
        let dad = dot(&d, &ad);
        if dad <= 0.0 {
            bail!(NonFinite, "conjugate gradients: the operator is not positive definite along a search direction (dᵀAd = {dad:e}); add damping");
        }
        let a = rr / dad;
        x.iter_mut().zip(&d).for_each(|(xi, di)| *xi += a * di);
        r.iter_mut().zip(&ad).for_each(|(ri, adi)| *ri -= a * adi);
        let rr_new = dot(&r, &r);
        let beta = rr_new / rr;
        d.iter_mut().zip(&r).for_each(|(di, ri)| *di = ri + beta * *di);
        rr = rr_new;
        it += 1;
    }
    // The true residual, not the recurrence's.
    let ax = apply(&x)?;
    let res: f64 = bv.iter().zip(&ax).map(|(b, a)| (b - a).powi(2)).sum::<f64>().sqrt() / bnorm;
    Ok(CgResult { x: tensor::from_f64(x, &[p], dtype, &device)?, iterations: it, relative_residual: res })
}
