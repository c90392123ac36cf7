//! Predictions of a Laplace posterior.
//!
//! * GLM (linearized) predictive: f(x) ≈ f(x; θ*) + J(x)(θ − θ*), so the
//!   function values are Gaussian with mean f_μ = f(x; θ*) and covariance
//!   J P⁻¹ Jᵀ (per point `(C, C)`, or jointly over a batch). Classification
//!   maps them through a link approximation (probit, Laplace bridge with or
//!   without normalization, or Monte Carlo); regression returns mean and
//!   functional variance (add σ² for the predictive of y).
//! * Sampling ("nn") predictive: θ ~ N(θ*, P⁻¹), run the network.
//!
//! J P⁻¹ Jᵀ never forms P⁻¹ for the diagonal, Kronecker and low-rank
//! structures (and the last layer of a Kronecker posterior never forms a
//! P × P matrix).

use std::str::FromStr;

use faer::Mat;

use super::{Fitted, Posterior};
use crate::curvature::{Curvature, CurvatureKind, Subset};
use crate::error::{bail, Error, Result};
use crate::inputs::Inputs;
use crate::likelihood::{softmax, Likelihood};
use crate::linalg::Cholesky;
use crate::rng::Rng;
use crate::tensor::{self, DType, Mm, Tensor};

/// Link approximation of the classification GLM predictive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Link {
    /// The probit approximation: softmax(f / √(1 + π/8 · diag Σ)).
    Probit,
    /// The Laplace bridge (a Dirichlet matched to the Gaussian).
    Bridge,
    /// The Laplace bridge, normalized (laplace-torch's `bridge_norm`).
    BridgeNorm,
    /// Monte Carlo: the mean softmax of `samples` draws of f, seeded by `seed`.
    Mc {
        /// Draws of f.
        samples: usize,
        /// Seed of the draws.
        seed: u64,
    },
}

impl FromStr for Link {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "probit" => Ok(Link::Probit),
            "bridge" => Ok(Link::Bridge),
            "bridge_norm" => Ok(Link::BridgeNorm),
            "mc" => Ok(Link::Mc { samples: 100, seed: 0 }),
            other => bail!(Invalid, "unknown link approximation {other:?} (probit, bridge, bridge_norm, mc)"),
        }
    }
}

/// Elements of the Jacobians the GLM predictive forms at once (2^25: 256 MiB in f64).
const GLM_CHUNK_ELEMS: usize = 1 << 25;

/// `(N, C, P)` as f64 host rows `[n][c][p]`.
fn rows3(t: &Tensor) -> Result<(usize, usize, usize, Vec<f64>)> {
    let (n, c, p) = t.dims3()?;
    Ok((n, c, p, tensor::to_vec_f64(t)?))
}

impl Posterior {
    /// Jacobians of the subset `(N, C, P)` (in f64) and f_μ `(N, C)`.
    pub fn jacobians(&self, x: impl Into<Inputs>) -> Result<(Tensor, Tensor)> {
        let x = x.into();
        let curv = Curvature::new(&self.model, self.likelihood, CurvatureKind::Ggn, &self.subset)?;
        let (j, f) = match self.subset {
            Subset::LastLayer => curv.last_layer_jacobians(&x)?,
            _ => curv.jacobians(&x)?,
        };
        Ok((j.to_dtype(DType::F64)?, f))
    }

    /// A factor A `(N, C, Q)` with A Aᵀ = J P⁻¹ Jᵀ per point, for the
    /// structures that have one cheaply (full, diag); `None` otherwise.
    fn variance_factor(&self, j: &Tensor) -> Result<Option<Tensor>> {
        let s = self.h_factor(self.sigma_noise);
        let p0 = self.prior_diag(&self.prior_precision)?;
        let (n, c, p) = j.dims3()?;
        let dev = j.device();
        Ok(match &self.fitted {
            Fitted::Diag { h } => {
                let sd: Vec<f64> = h.iter().zip(&p0).map(|(h, p)| 1.0 / (s * h + p).sqrt()).collect();
                let sd = tensor::from_f64(sd, &[1, 1, p], DType::F64, dev)?;
                Some(j.broadcast_mul(&sd)?)
            }
            Fitted::Full { h, eigvals, eigvecs } => {
                if p0.iter().all(|v| *v == p0[0]) {
                    // P⁻¹ = Q diag(1/(sλ + δ)) Qᵀ: A = J Q diag(1/√(sλ + δ)).
                    let scale: Vec<f64> = inverse_sqrt_precision(eigvals, s, p0[0])?;
                    let q = tensor::from_faer(eigvecs.as_ref(), DType::F64, dev)?;
                    let scale = tensor::from_f64(scale, &[1, p], DType::F64, dev)?;
                    let a = j.reshape((n * c, p))?.mm(&q)?.broadcast_mul(&scale)?;
                    Some(a.reshape((n, c, p))?)
                } else {
                    // P = L Lᵀ: A = (L⁻¹ Jᵀ)ᵀ.
                    let hm = tensor::to_faer(h)?;
                    let pm = Mat::from_fn(p, p, |a, b| s * hm[(a, b)] + if a == b { p0[a] } else { 0.0 });
                    let ch = Cholesky::from_faer(pm)?;
                    let jt = tensor::to_faer(&j.reshape((n * c, p))?.t()?.contiguous()?)?;
                    let z = ch.solve_lower(jt); // (P, N·C)
                    let a = tensor::from_faer(z.as_ref(), DType::F64, dev)?.t()?.contiguous()?;
                    Some(a.reshape((n, c, p))?)
                }
            }
            _ => None,
        })
    }

    /// J P⁻¹ Jᵀ per point: `j (N, C, P)` → `(N, C, C)`.
    pub fn functional_variance(&self, j: &Tensor) -> Result<Tensor> {
        let (n, c, p) = j.dims3()?;
        if p != self.n_params() {
            bail!(Invalid, "Jacobians have {p} parameters, the posterior {}", self.n_params());
        }
        if let Some(a) = self.variance_factor(j)? {
            return Ok(a.mm(&a.transpose(1, 2)?)?);
        }
        match &self.fitted {
            Fitted::Kron { .. } => {
                let post = self.kron_posterior_precision(&self.prior_precision, self.sigma_noise)?;
                let jk = j.to_dtype(post.eigenvalues()[0][0].dtype())?;
                Ok(post.inv_square_form(&jk)?.to_dtype(DType::F64)?)
            }
            Fitted::LowRank { values, vectors } => {
                // J P⁻¹ Jᵀ = A₁A₁ᵀ − (G L⁻ᵀ)(G L⁻ᵀ)ᵀ with A₁ = J D^{-1/2}, G = A₁ Bᵀ, K = I + BBᵀ = LLᵀ.
                let s = self.h_factor(self.sigma_noise);
                let p0 = self.prior_diag(&self.prior_precision)?;
                let k = values.len();
                let b = Mat::from_fn(k, p, |a, i| (s * values[a]).sqrt() * vectors[(a, i)] / p0[i].sqrt());
                let kmat = Mat::from_fn(k, k, |a, cc| (0..p).map(|i| b[(a, i)] * b[(cc, i)]).sum::<f64>() + if a == cc { 1.0 } else { 0.0 });
                let ch = Cholesky::from_faer(kmat)?;
                let dev = j.device();
                let isd = tensor::from_f64(p0.iter().map(|d| 1.0 / d.sqrt()).collect(), &[1, 1, p], DType::F64, dev)?;
                let a1 = j.broadcast_mul(&isd)?; // (N, C, P)
                let bt = tensor::from_faer(b.as_ref(), DType::F64, dev)?; // (k, P)
                let g = a1.reshape((n * c, p))?.mm(&bt.t()?)?; // (NC, k)
                let gl = ch.solve_lower(tensor::to_faer(&g.t()?.contiguous()?)?); // L⁻¹ Gᵀ (k, NC)
                let gl = tensor::from_faer(gl.as_ref(), DType::F64, dev)?.t()?.contiguous()?.reshape((n, c, k))?;
                Ok((a1.mm(&a1.transpose(1, 2)?)? - gl.mm(&gl.transpose(1, 2)?)?)?)
            }
            _ => unreachable!("full and diag have a variance factor"),
        }
    }

    /// GLM predictive: f_μ `(N, C)` and J P⁻¹ Jᵀ `(N, C, C)` (f64), a chunk
    /// of points at a time so that their Jacobians `(chunk, C, P)` stay
    /// within `GLM_CHUNK_ELEMS` (one point at a time for large networks).
    pub fn glm_predictive(&self, x: impl Into<Inputs>) -> Result<(Tensor, Tensor)> {
        let x = x.into();
        let m = x.len();
        let per_point = (self.n_outputs * self.n_params()).max(1);
        let chunk = (GLM_CHUNK_ELEMS / per_point).clamp(1, m.max(1));
        let (mut fs, mut vars) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < m {
            let len = chunk.min(m - start);
            let (j, f) = self.jacobians(&x.narrow(start, len)?)?;
            fs.push(f.to_dtype(DType::F64)?);
            vars.push(self.functional_variance(&j)?);
            start += len;
        }
        Ok((Tensor::cat(&fs, 0)?, Tensor::cat(&vars, 0)?))
    }

    /// The joint functional covariance over a batch `(N·C, N·C)` (regression GP view).
    pub fn functional_covariance(&self, x: impl Into<Inputs>) -> Result<Tensor> {
        let (j, _) = self.jacobians(x)?;
        let (n, c, p) = j.dims3()?;
        let flat = j.reshape((1, n * c, p))?;
        Ok(self.functional_variance(&flat)?.squeeze(0)?)
    }

    /// Class probabilities `(N, C)` of the GLM predictive under `link`.
    pub fn predict_probs(&self, x: impl Into<Inputs>, link: Link) -> Result<Tensor> {
        if self.likelihood != Likelihood::Classification {
            bail!(Invalid, "class probabilities need a classification posterior");
        }
        let (f_mu, f_var) = self.glm_predictive(x)?;
        link_probs(&f_mu, &f_var, link)
    }

    /// Regression: mean `(N, C)` and functional variance `(N, C)` (without σ²).
    pub fn predict_regression(&self, x: impl Into<Inputs>) -> Result<(Tensor, Tensor)> {
        if self.likelihood != Likelihood::Regression {
            bail!(Invalid, "mean and variance need a regression posterior");
        }
        let (f_mu, f_var) = self.glm_predictive(x)?;
        let c = f_mu.dim(1)?;
        let eye = Tensor::eye(c, DType::F64, f_var.device())?;
        Ok((f_mu, f_var.broadcast_mul(&eye)?.sum(2)?))
    }

    /// `n` samples θ ~ N(θ*, P⁻¹) of the subset `(n, P)` (f64), seeded.
    pub fn sample(&self, n: usize, seed: u64) -> Result<Tensor> {
        let p = self.n_params();
        let mut rng = Rng::new(seed);
        // The draws, their tensor, the scaled samples and their host copy
        // (nn_predictive) live at once: four (n, P) arrays of f64.
        crate::budget::check(&format!("{n} posterior samples of P = {p} parameters (4 copies while drawing)"), &[4, n, p], 8)?;
        let mut z = crate::budget::try_vec::<f64>(&format!("{n} posterior samples of P = {p} parameters"), n.saturating_mul(p))?;
        z.extend((0..n * p).map(|_| rng.normal()));
        let dev = self.model.device().clone();
        let z = tensor::from_f64(z, &[n, p], DType::F64, &dev)?;
        let s = self.h_factor(self.sigma_noise);
        let p0 = self.prior_diag(&self.prior_precision)?;
        let dev = &dev;
        let delta = match &self.fitted {
            Fitted::Diag { h } => {
                let sd: Vec<f64> = h.iter().zip(&p0).map(|(h, q)| 1.0 / (s * h + q).sqrt()).collect();
                z.broadcast_mul(&tensor::from_f64(sd, &[1, p], DType::F64, dev)?)?
            }
            Fitted::Full { h, eigvals, eigvecs } => {
                if p0.iter().all(|v| *v == p0[0]) {
                    // θ − θ* = Q diag(1/√(sλ + δ)) z.
                    let sd: Vec<f64> = inverse_sqrt_precision(eigvals, s, p0[0])?;
                    let q = tensor::from_faer(eigvecs.as_ref(), DType::F64, dev)?;
                    z.broadcast_mul(&tensor::from_f64(sd, &[1, p], DType::F64, dev)?)?.mm(&q.t()?)?
                } else {
                    // θ − θ* = L⁻ᵀ z.
                    let hm = tensor::to_faer(h)?;
                    let pm = Mat::from_fn(p, p, |a, b| s * hm[(a, b)] + if a == b { p0[a] } else { 0.0 });
                    let ch = Cholesky::from_faer(pm)?;
                    let x = ch.solve_lower_transpose(tensor::to_faer(&z.t()?.contiguous()?)?);
                    tensor::from_faer(x.as_ref(), DType::F64, dev)?.t()?.contiguous()?
                }
            }
            Fitted::Kron { .. } => {
                let post = self.kron_posterior_precision(&self.prior_precision, self.sigma_noise)?;
                let dt = post.eigenvalues()[0][0].dtype();
                post.bmm(&z.to_dtype(dt)?, -0.5)?.to_dtype(DType::F64)?
            }
            Fitted::LowRank { values, vectors } => {
                // P⁻¹ = D^{-1/2} (I + BᵀB)⁻¹ D^{-1/2}; with BBᵀ = V diag(e) Vᵀ,
                // (I + BᵀB)^{-1/2} = I + Bᵀ V diag(((1 + e)^{-1/2} − 1)/e) Vᵀ B.
                let k = values.len();
                let b = Mat::from_fn(k, p, |a, i| (s * values[a]).sqrt() * vectors[(a, i)] / p0[i].sqrt());
                let bbt = Mat::from_fn(k, k, |a, c| (0..p).map(|i| b[(a, i)] * b[(c, i)]).sum::<f64>());
                let evd = bbt.self_adjoint_eigen(faer::Side::Lower).map_err(|e| Error::NonFinite(format!("{e:?}")));
                tensor::clear_simd_upper_state(tensor::SimdScope::AllThreads);
                let evd = evd?;
                let coef: Vec<f64> = (0..k)
                    .map(|i| {
                        let e = evd.S()[i].max(0.0);
                        if e > 1e-300 { ((1.0 + e).powf(-0.5) - 1.0) / e } else { -0.5 }
                    })
                    .collect();
                let bt = tensor::from_faer(b.as_ref(), DType::F64, dev)?; // (k, P)
                let v = tensor::from_faer(evd.U(), DType::F64, dev)?; // (k, k)
                let w = v.t()?.mm(&bt)?; // Vᵀ B (k, P)
                let coef = tensor::from_f64(coef, &[1, k], DType::F64, dev)?;
                let inner = z.mm(&w.t()?)?.broadcast_mul(&coef)?; // (n, k)
                let corrected = (&z + inner.mm(&w)?)?;
                let isd = tensor::from_f64(p0.iter().map(|d| 1.0 / d.sqrt()).collect(), &[1, p], DType::F64, dev)?;
                corrected.broadcast_mul(&isd)?
            }
        };
        let mean = tensor::from_f64(self.mean.clone(), &[1, p], DType::F64, dev)?;
        Ok(delta.broadcast_add(&mean)?)
    }

    /// The network with the subset's parameters set to `values` `(P_sel,)`.
    fn model_with(&self, values: &[f64]) -> Result<crate::model::Sequential> {
        let mut theta = tensor::to_vec_f64(&self.model.parameter_vector()?)?;
        match &self.subset {
            Subset::All => theta.copy_from_slice(values),
            Subset::LastLayer => {
                let last = self.model.last_linear()?;
                let start = self.model.params().iter().find(|p| p.layer == last).expect("last layer has parameters").offset;
                theta[start..start + values.len()].copy_from_slice(values);
            }
            Subset::Subnetwork(idx) => {
                for (&i, &v) in idx.iter().zip(values) {
                    theta[i as usize] = v;
                }
            }
        }
        let n = theta.len();
        let t = tensor::from_f64(theta, &[n], self.model.dtype(), self.model.device())?;
        self.model.with_parameter_vector(&t)
    }

    /// Sampling predictive: `samples` networks θ ~ N(θ*, P⁻¹). Returns class
    /// probabilities `(N, C)` averaged over samples (classification), or the
    /// mean and variance of f over samples `(N, C)` each (regression).
    pub fn nn_predictive(&self, x: impl Into<Inputs>, samples: usize, seed: u64) -> Result<(Tensor, Option<Tensor>)> {
        if samples == 0 {
            bail!(Invalid, "the sampling predictive needs at least one sample");
        }
        let x = x.into();
        let thetas = tensor::to_vec_f64(&self.sample(samples, seed)?)?;
        let p = self.n_params();
        let (mut sum, mut sum2): (Option<Tensor>, Option<Tensor>) = (None, None);
        for s in 0..samples {
            let m = self.model_with(&thetas[s * p..(s + 1) * p])?;
            let f = m.forward(&x)?.to_dtype(DType::F64)?;
            let v = if self.likelihood == Likelihood::Classification { softmax(&f)? } else { f };
            sum2 = Some(match sum2 {
                None => v.sqr()?,
                Some(a) => (a + v.sqr()?)?,
            });
            sum = Some(match sum {
                None => v,
                Some(a) => (a + v)?,
            });
        }
        let n = samples as f64;
        let mean = (sum.expect("samples ≥ 1") / n)?;
        if self.likelihood == Likelihood::Classification {
            return Ok((mean, None));
        }
        let var = ((sum2.expect("samples ≥ 1") / n)? - mean.sqr()?)?.relu()?;
        Ok((mean, Some(var)))
    }
}

/// Class probabilities from f_μ `(N, C)` and f_var `(N, C, C)` (laplace-torch's formulas).
pub fn link_probs(f_mu: &Tensor, f_var: &Tensor, link: Link) -> Result<Tensor> {
    let (n, c) = f_mu.dims2()?;
    let mu = tensor::to_vec_f64(f_mu)?;
    let (_, _, _, var) = rows3(f_var)?;
    let v = |i: usize, a: usize, b: usize| var[i * c * c + a * c + b];
    let mut out = vec![0.0; n * c];
    let kk = c as f64;
    for i in 0..n {
        let m = &mu[i * c..(i + 1) * c];
        let row = &mut out[i * c..(i + 1) * c];
        match link {
            // softmax(κ ⊙ f_μ), κ = 1/√(1 + π/8 diag f_var)
            Link::Probit => {
                let z: Vec<f64> = (0..c).map(|a| m[a] / (1.0 + std::f64::consts::PI / 8.0 * v(i, a, a)).sqrt()).collect();
                softmax_row(&z, row);
            }
            // Laplace bridge (Hobbhahn et al.): remove the sum direction, then
            // Dirichlet α_a = (1 − 2/K + e^{μ_a}/K² Σ_b e^{−μ_b}) / Σ_aa.
            Link::Bridge | Link::BridgeNorm => {
                let row_sum: Vec<f64> = (0..c).map(|a| (0..c).map(|b| v(i, a, b)).sum()).collect();
                let total: f64 = row_sum.iter().sum();
                let mu_sum: f64 = m.iter().sum();
                let mut mu2: Vec<f64> = (0..c).map(|a| m[a] - row_sum[a] * mu_sum / total).collect();
                let mut d: Vec<f64> = (0..c).map(|a| v(i, a, a) - row_sum[a] * row_sum[a] / total).collect();
                if link == Link::BridgeNorm {
                    let dm = d.iter().sum::<f64>() / kk / (kk / 2.0).sqrt();
                    mu2.iter_mut().for_each(|x| *x /= dm.sqrt());
                    d.iter_mut().for_each(|x| *x /= dm);
                }
                let sum_exp: f64 = mu2.iter().map(|x| (-x).exp()).sum();
                let alpha: Vec<f64> = (0..c).map(|a| (1.0 - 2.0 / kk + mu2[a].exp() / (kk * kk) * sum_exp) / d[a]).collect();
                let s: f64 = alpha.iter().sum();
                for a in 0..c {
                    let p = alpha[a] / s;
                    row[a] = if p.is_nan() { 1.0 } else { p };
                }
            }
            // E[softmax(f)], f ~ N(f_μ, f_var), by sampling.
            Link::Mc { samples, seed } => {
                if samples == 0 {
                    bail!(Invalid, "the MC link needs at least one sample");
                }
                let cov = Tensor::from_vec((0..c * c).map(|k| v(i, k / c, k % c)).collect::<Vec<f64>>(), (c, c), f_mu.device())?;
                let l = psd_sqrt(&cov)?;
                let mut rng = Rng::for_point(seed, i as u64);
                let mut acc = vec![0.0; c];
                let mut z = vec![0.0; c];
                let mut f = vec![0.0; c];
                let mut p = vec![0.0; c];
                for _ in 0..samples {
                    z.iter_mut().for_each(|x| *x = rng.normal());
                    for a in 0..c {
                        f[a] = m[a] + (0..c).map(|b| l[(a, b)] * z[b]).sum::<f64>();
                    }
                    softmax_row(&f, &mut p);
                    acc.iter_mut().zip(&p).for_each(|(x, y)| *x += y);
                }
                row.iter_mut().zip(&acc).for_each(|(r, a)| *r = a / samples as f64);
            }
        }
    }
    tensor::from_f64(out, &[n, c], DType::F64, f_mu.device())
}

fn softmax_row(z: &[f64], out: &mut [f64]) {
    let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for (o, v) in out.iter_mut().zip(z) {
        *o = (v - mx).exp();
        s += *o;
    }
    out.iter_mut().for_each(|o| *o /= s);
}

/// A square root S (S Sᵀ = A) of a symmetric positive semi-definite matrix
/// (eigenvalues clamped at 0).
fn psd_sqrt(a: &Tensor) -> Result<Mat<f64>> {
    let (l, q) = crate::linalg::symmetric_eigen(a)?;
    let l = tensor::to_vec_f64(&l)?;
    let q = tensor::to_faer(&q)?;
    let n = l.len();
    Ok(Mat::from_fn(n, n, |i, j| q[(i, j)] * l[j].max(0.0).sqrt()))
}

/// 1/√(sλ + δ) for the eigenvalues λ of H, or an error if the posterior
/// precision is not positive definite (an exact Hessian with negative
/// curvature, or a prior too weak to lift round-off below zero).
fn inverse_sqrt_precision(eigvals: &[f64], s: f64, delta: f64) -> Result<Vec<f64>> {
    eigvals
        .iter()
        .map(|l| {
            let e = s * l + delta;
            if e > 0.0 && e.is_finite() {
                Ok(1.0 / e.sqrt())
            } else {
                bail!(NonFinite, "the posterior precision is not positive definite (eigenvalue {e:e}); increase the prior precision")
            }
        })
        .collect()
}
