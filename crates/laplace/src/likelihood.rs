//! Likelihoods p(y | f) of one data point and the output-space quantities
//! every curvature is built from.
//!
//! | likelihood     | ℓ(f, y)                 | ∇_f ℓ       | Λ = ∇²_f ℓ       |
//! |----------------|-------------------------|-------------|------------------|
//! | regression     | ½‖y − f‖²               | f − y       | I                |
//! | classification | −log softmax(f)_y       | p − e_y     | diag(p) − p pᵀ   |
//!
//! (p = softmax(f); the regression likelihood is N(f, I) with its constant
//! dropped.) Losses are sums over the batch, never means.

use std::str::FromStr;

use crate::error::{bail, Error, Result};
use crate::rng::Rng;
use crate::tensor::{self, DType, Tensor, D};

/// The loss: cross-entropy on softmax outputs, or squared error (a
/// Gaussian with noise σ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Likelihood {
    /// Cross-entropy of integer class labels against softmax(f).
    Classification,
    /// ½‖y − f‖² (per point), a Gaussian likelihood with σ = 1.
    Regression,
}

impl FromStr for Likelihood {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "classification" => Ok(Likelihood::Classification),
            "regression" => Ok(Likelihood::Regression),
            other => bail!(Invalid, "unknown likelihood {other:?} (expected classification or regression)"),
        }
    }
}

/// p = softmax(f) along the last axis, computed stably.
pub fn softmax(f: &Tensor) -> Result<Tensor> {
    let shifted = f.broadcast_sub(&f.max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// log Σ_c exp(f_c) along the last axis, computed stably: `(M,)`.
fn logsumexp(f: &Tensor) -> Result<Tensor> {
    let m = f.max_keepdim(D::Minus1)?;
    let s = f.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok((m + s)?.squeeze(D::Minus1)?)
}

impl Likelihood {
    /// The lower-case name (`classification`, `regression`).
    pub fn name(&self) -> &'static str {
        match self {
            Likelihood::Classification => "classification",
            Likelihood::Regression => "regression",
        }
    }

    /// Check targets for `m` points and `c` outputs and bring them into the
    /// form the other methods take: class indices as u32 `(M,)`, regression
    /// targets in the compute dtype `(M, C)`.
    pub fn prepare_targets(&self, y: &Tensor, m: usize, c: usize, dtype: DType) -> Result<Tensor> {
        match self {
            Likelihood::Classification => {
                if !tensor::is_int_dtype(y.dtype()) {
                    bail!(
                        Data,
                        "classification targets y must be integer class indices (int64), got dtype {}",
                        tensor::dtype_name(y.dtype())
                    );
                }
                if y.dims() != [m] {
                    bail!(Data, "classification targets y have shape {:?}, expected ({m},)", y.dims());
                }
                let labels = tensor::to_vec_i64(y)?;
                if let Some((n, &bad)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l >= c as i64) {
                    bail!(Data, "y[{n}] = {bad} is not a class index in [0, {c}) (the model has {c} outputs)");
                }
                let labels: Vec<u32> = labels.into_iter().map(|l| l as u32).collect();
                Ok(Tensor::from_vec(labels, m, y.device())?)
            }
            Likelihood::Regression => {
                if !tensor::is_compute_dtype(y.dtype()) {
                    bail!(Data, "regression targets y must be floats, got dtype {}", tensor::dtype_name(y.dtype()));
                }
                if y.dims() != [m, c] {
                    bail!(Data, "regression targets y have shape {:?}, expected ({m}, {c}) (N, outputs)", y.dims());
                }
                if let Some(pos) = tensor::first_non_finite(y)? {
                    bail!(Data, "y holds a non-finite value at index {:?}", tensor::unravel(pos, y.dims()));
                }
                Ok(y.to_dtype(dtype)?)
            }
        }
    }

    /// Σ_n ℓ(f_n, y_n) as a `(1,)` tensor.
    pub fn loss(&self, f: &Tensor, y: &Tensor) -> Result<Tensor> {
        let per_point = match self {
            // ℓ = logsumexp(f) − f_y
            Likelihood::Classification => {
                let fy = f.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?;
                (logsumexp(f)? - fy)?
            }
            // ℓ = ½‖y − f‖²
            Likelihood::Regression => ((f - y)?.sqr()?.sum(1)? * 0.5)?, // last axis: fast
        };
        Ok(per_point.sum_all()?.reshape(1)?)
    }

    /// ∇_f ℓ(f_n, y_n) for every point `(M, C)`.
    pub fn gradient(&self, f: &Tensor, y: &Tensor) -> Result<Tensor> {
        match self {
            // p − e_y
            Likelihood::Classification => {
                let c = f.dim(1)?;
                let onehot = one_hot(y, c, f.dtype())?;
                Ok((softmax(f)? - onehot)?)
            }
            // f − y
            Likelihood::Regression => Ok((f - y)?),
        }
    }

    /// Λ_n = ∇²_f ℓ(f_n) for every point `(M, C, C)`.
    pub fn hessian(&self, f: &Tensor) -> Result<Tensor> {
        let (m, c) = f.dims2()?;
        match self {
            // diag(p) − p pᵀ
            Likelihood::Classification => {
                let p = softmax(f)?;
                let outer = p.unsqueeze(2)?.broadcast_mul(&p.unsqueeze(1)?)?;
                Ok((diag_embed(&p)? - outer)?)
            }
            Likelihood::Regression => Ok(eye_batch(m, c, f)?),
        }
    }

    /// A square root of Λ_n, as rows: `(M, C, C)` with Λ_n = Σ_k L[n, k] L[n, k]ᵀ.
    /// These rows are what the exact GGN pushes back through the network.
    pub fn sqrt_hessian(&self, f: &Tensor) -> Result<Tensor> {
        self.sqrt_hessian_rows(f, 0..f.dim(1)?)
    }

    /// Rows `rows` of [`sqrt_hessian`](Self::sqrt_hessian), `(M, rows.len(), C)`,
    /// formed without the others: a pass over many outputs pulls its rows
    /// back a range at a time, and never holds all `(M, C, C)` of them (a
    /// 100-class batch of 512 has 20 MB).
    pub fn sqrt_hessian_rows(&self, f: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let (m, c) = f.dims2()?;
        if rows.start > rows.end || rows.end > c {
            bail!(Invalid, "rows {rows:?} of the square root of Λ: it has {c}");
        }
        let (start, len) = (rows.start, rows.len());
        let eye = Tensor::eye(c, f.dtype(), f.device())?.narrow(0, start, len)?.unsqueeze(0)?; // (1, len, C)
        match self {
            // Row k = √p_k (e_k − p): L = diag(√p) − √p pᵀ, and
            // Lᵀ L = diag(p) − 2ppᵀ + (Σ_k p_k) ppᵀ = diag(p) − ppᵀ.
            // Formed as √p_k · (e_k − p)_j: two (M, len, C) buffers at once.
            Likelihood::Classification => {
                let p = softmax(f)?;
                let centred = eye.broadcast_sub(&p.reshape((m, 1, c))?)?;
                let sqrt_p = p.narrow(1, start, len)?.sqrt()?.reshape((m, len, 1))?;
                Ok(centred.broadcast_mul(&sqrt_p)?)
            }
            // L = I: row k is e_k
            Likelihood::Regression => Ok(eye.broadcast_as((m, len, c))?.contiguous()?),
        }
    }

    /// Monte-Carlo rows `(M, S, C)`: g_s/√S with g_s = ∇_f ℓ(f_n, ỹ_s),
    /// ỹ_s ~ p(y | f_n), so that E[Σ_s g_s g_sᵀ / S] = Λ_n. Point n of the
    /// batch draws from stream `offset + n` of `seed`.
    pub fn sampled_gradients(&self, f: &Tensor, samples: usize, seed: u64, offset: usize) -> Result<Tensor> {
        if samples == 0 {
            bail!(Invalid, "the Monte-Carlo Fisher needs at least one sample");
        }
        let (m, c) = f.dims2()?;
        let scale = 1.0 / (samples as f64).sqrt();
        let mut rows = crate::budget::try_vec::<f64>(&format!("{samples} Monte-Carlo samples of {m} points × {c} outputs"), m.saturating_mul(samples).saturating_mul(c))?;
        match self {
            // g = p − e_ỹ, ỹ ~ Categorical(p)
            Likelihood::Classification => {
                let p = tensor::to_vec_f64(&softmax(f)?)?;
                for n in 0..m {
                    let pn = &p[n * c..(n + 1) * c];
                    let mut rng = Rng::for_point(seed, (offset + n) as u64);
                    for _ in 0..samples {
                        let yk = rng.categorical(pn);
                        rows.extend((0..c).map(|j| scale * (pn[j] - f64::from(u8::from(j == yk)))));
                    }
                }
            }
            // g = f − ỹ = −ε, ỹ = f + ε, ε ~ N(0, I)
            Likelihood::Regression => {
                for n in 0..m {
                    let mut rng = Rng::for_point(seed, (offset + n) as u64);
                    for _ in 0..samples * c {
                        rows.push(-scale * rng.normal());
                    }
                }
            }
        }
        tensor::from_f64(rows, &[m, samples, c], f.dtype(), f.device())
    }
}

/// One-hot rows `(M, C)` for class indices `(M,)`.
fn one_hot(y: &Tensor, c: usize, dtype: DType) -> Result<Tensor> {
    let m = y.dim(0)?;
    let zeros = Tensor::zeros((m, c), dtype, y.device())?;
    let ones = Tensor::ones((m, 1), dtype, y.device())?;
    Ok(zeros.scatter_add(&y.unsqueeze(1)?.contiguous()?, &ones, 1)?)
}

/// Batched diagonal matrices `(M, C, C)` from `(M, C)`.
fn diag_embed(d: &Tensor) -> Result<Tensor> {
    let (m, c) = d.dims2()?;
    let eye = Tensor::eye(c, d.dtype(), d.device())?;
    Ok(eye.unsqueeze(0)?.broadcast_mul(&d.reshape((m, 1, c))?)?)
}

/// Identity matrices `(M, C, C)`.
fn eye_batch(m: usize, c: usize, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::eye(c, like.dtype(), like.device())?
        .unsqueeze(0)?
        .broadcast_as((m, c, c))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of Λ's square root, whole and in ranges: their Gram matrix per
    /// point is Λ = diag(p) − ppᵀ (classification) or I (regression), in
    /// closed form, and ranges of rows are the whole's rows.
    #[test]
    fn square_root_rows_have_the_hessian_as_gram_matrix_in_any_range() {
        let (m, c) = (3, 5);
        let vals: Vec<f64> = (0..m * c).map(|i| ((i * 7919) % 13) as f64 / 4.0 - 1.5).collect();
        let f = tensor::from_f64(vals.clone(), &[m, c], DType::F64, &tensor::Device::Cpu).unwrap();
        for lik in [Likelihood::Classification, Likelihood::Regression] {
            let l = tensor::to_vec_f64(&lik.sqrt_hessian(&f).unwrap()).unwrap();
            for n in 0..m {
                let row = &vals[n * c..(n + 1) * c];
                let z: f64 = row.iter().map(|v| v.exp()).sum();
                let p: Vec<f64> = row.iter().map(|v| v.exp() / z).collect();
                for i in 0..c {
                    for j in 0..c {
                        let gram: f64 = (0..c).map(|k| l[(n * c + k) * c + i] * l[(n * c + k) * c + j]).sum();
                        let want = match lik {
                            Likelihood::Classification => f64::from(u8::from(i == j)) * p[i] - p[i] * p[j],
                            Likelihood::Regression => f64::from(u8::from(i == j)),
                        };
                        assert!((gram - want).abs() < 1e-14, "{lik:?} point {n} ({i}, {j}): {gram} vs {want}");
                    }
                }
            }
            let parts = [0..2, 2..2, 2..5].map(|r| lik.sqrt_hessian_rows(&f, r).unwrap());
            let joined = tensor::to_vec_f64(&Tensor::cat(&parts, 1).unwrap()).unwrap();
            assert_eq!(joined, l, "{lik:?}: rows in ranges are not the whole's rows");
            let e = lik.sqrt_hessian_rows(&f, 4..6).unwrap_err().to_string();
            assert!(e.contains("4..6") && e.contains('5'), "{e}");
        }
    }
}
