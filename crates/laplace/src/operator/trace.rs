//! Randomized trace and diagonal estimators (seeded, reproducible):
//!
//! * Hutchinson: tr(A) ≈ (1/S) Σ_s v_sᵀ A v_s, v_s Rademacher (unbiased);
//! * Hutch++ (Meyer, Musco, Musco, Woodruff 2021): S products split in
//!   thirds: Q = orth(A Ω) captures the top of the spectrum exactly,
//!   tr(A) ≈ tr(Qᵀ A Q) + Hutchinson on (I − QQᵀ) A (I − QQᵀ) (unbiased,
//!   variance O(1/S²) instead of O(1/S));
//! * diagonal: diag(A) ≈ (1/S) Σ_s v_s ⊙ A v_s (unbiased).
//!
//! All S probe vectors go through the operator as one `(S, P)` product.

use faer::Mat;

use super::LinearOperator;
use crate::error::{bail, Result};
use crate::rng::Rng;
use crate::tensor::{self, Tensor};

/// `(s, p)` Rademacher rows.
fn rademacher(s: usize, p: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..s * p).map(|_| rng.sign()).collect()
}

fn products(op: &dyn LinearOperator, rows: &[f64], s: usize) -> Result<Vec<f64>> {
    let p = op.dim();
    let v = tensor::from_f64(rows.to_vec(), &[s, p], op.dtype(), op.device())?;
    tensor::to_vec_f64(&op.matmat(&v)?)
}

/// Hutchinson's trace estimate from `samples` probes.
pub fn hutchinson_trace(op: &dyn LinearOperator, samples: usize, seed: u64) -> Result<f64> {
    if samples == 0 {
        bail!(Invalid, "the trace estimator needs at least one sample");
    }
    let p = op.dim();
    // The probes, their products and a copy: three (samples, P) arrays.
    crate::budget::check(&format!("{samples} probe vectors of P = {p}"), &[3, samples, p], 8)?;
    let v = rademacher(samples, p, seed);
    let av = products(op, &v, samples)?;
    Ok(v.iter().zip(&av).map(|(a, b)| a * b).sum::<f64>() / samples as f64)
}

/// Hutchinson's estimate of the diagonal `(P,)` from `samples` probes.
pub fn hutchinson_diag(op: &dyn LinearOperator, samples: usize, seed: u64) -> Result<Tensor> {
    if samples == 0 {
        bail!(Invalid, "the diagonal estimator needs at least one sample");
    }
    let p = op.dim();
    // The probes, their products and a copy: three (samples, P) arrays.
    crate::budget::check(&format!("{samples} probe vectors of P = {p}"), &[3, samples, p], 8)?;
    let v = rademacher(samples, p, seed);
    let av = products(op, &v, samples)?;
    let mut d = vec![0.0; p];
    for s in 0..samples {
        for i in 0..p {
            d[i] += v[s * p + i] * av[s * p + i];
        }
    }
    d.iter_mut().for_each(|x| *x /= samples as f64);
    tensor::from_f64(d, &[p], op.dtype(), op.device())
}

/// Hutch++ trace estimate with `samples` ≥ 3 operator products in total.
pub fn hutchpp_trace(op: &dyn LinearOperator, samples: usize, seed: u64) -> Result<f64> {
    if samples < 3 {
        bail!(Invalid, "Hutch++ needs at least 3 samples (products), got {samples}");
    }
    let p = op.dim();
    // The probes, their products and a copy: three (samples, P) arrays.
    crate::budget::check(&format!("{samples} probe vectors of P = {p}"), &[3, samples, p], 8)?;
    let k = (samples / 3).min(p);
    let g = samples - 2 * k;
    // Sketch: Q = orth(A Ω), Ω Rademacher (k, p).
    let omega = rademacher(k, p, seed);
    let y = products(op, &omega, k)?; // rows: (A ω_i)ᵀ
    let ym = Mat::<f64>::from_fn(p, k, |i, j| y[j * p + i]);
    let qr = ym.qr();
    let q = qr.compute_thin_Q();
    crate::tensor::clear_simd_upper_state(crate::tensor::SimdScope::AllThreads);
    let qrows: Vec<f64> = (0..k).flat_map(|j| (0..p).map(move |i| (j, i))).map(|(j, i)| q[(i, j)]).collect();
    // tr(Qᵀ A Q).
    let aq = products(op, &qrows, k)?;
    let top: f64 = qrows.iter().zip(&aq).map(|(a, b)| a * b).sum();
    // Hutchinson on the deflated operator with g probes: w = (I − QQᵀ) v.
    let mut w = rademacher(g, p, seed ^ 0x9E37_79B9_7F4A_7C15);
    for s in 0..g {
        let row = &mut w[s * p..(s + 1) * p];
        for j in 0..k {
            let qj = &qrows[j * p..(j + 1) * p];
            let c: f64 = row.iter().zip(qj).map(|(a, b)| a * b).sum();
            row.iter_mut().zip(qj).for_each(|(a, b)| *a -= c * b);
        }
    }
    let rest = if g > 0 {
        let aw = products(op, &w, g)?;
        w.iter().zip(&aw).map(|(a, b)| a * b).sum::<f64>() / g as f64
    } else {
        0.0
    };
    Ok(top + rest)
}
