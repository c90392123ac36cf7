//! Kronecker-factored matrices: laplace-torch's `Kron` and `KronDecomposed`.
//!
//! A [`Kron`] is block-diagonal with one block per parameter tensor; a block
//! is one or two factors and stands for their Kronecker product (first ⊗
//! second), acting on the row-major flattened tensor. A 1-D factor is a
//! diagonal matrix. For a Linear weight `(out, in)` the block is `[B, A]`,
//! B `(out, out)`, A `(in, in)`, and (B ⊗ A) vec(W) = vec(B W Aᵀ): products
//! with a block never form the Kronecker product.
//!
//! [`KronDecomposed`] holds the eigendecomposition of every factor, so that
//! adding a prior precision δ (to the eigenvalues of each block's product),
//! powers, inverses and log-determinants cost no new factorization:
//! B ⊗ A = (Q_B ⊗ Q_A) diag(λ_B ⊗ λ_A) (Q_B ⊗ Q_A)ᵀ.

use crate::error::{bail, Result};
use crate::linalg;
use crate::tensor::{self, Mm, Tensor};

/// One factor's size: rows of a square factor or length of a diagonal.
fn factor_len(f: &Tensor) -> Result<usize> {
    Ok(f.dim(0)?)
}

/// A factor as a dense matrix (a 1-D factor is a diagonal).
fn dense(f: &Tensor) -> Result<Tensor> {
    if f.rank() == 1 {
        let n = f.dim(0)?;
        let eye = Tensor::eye(n, f.dtype(), f.device())?;
        Ok(eye.broadcast_mul(&f.reshape((1, n))?)?)
    } else {
        Ok(f.clone())
    }
}

/// Kronecker product of two matrices `(p, p) ⊗ (q, q) → (pq, pq)`.
pub fn kron_product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p1, p2) = a.dims2()?;
    let (q1, q2) = b.dims2()?;
    let prod = a.reshape((p1, 1, p2, 1))?.broadcast_mul(&b.reshape((1, q1, 1, q2))?)?;
    Ok(prod.reshape((p1 * q1, p2 * q2))?)
}

/// A block-diagonal matrix from square blocks.
pub fn block_diag(blocks: &[Tensor]) -> Result<Tensor> {
    if blocks.is_empty() {
        bail!(Invalid, "a block-diagonal matrix needs at least one block");
    }
    let n: usize = blocks.iter().map(|b| b.dim(0)).sum::<std::result::Result<_, _>>()?;
    let mut rows = Vec::with_capacity(blocks.len());
    let mut at = 0;
    for b in blocks {
        let k = b.dim(0)?;
        rows.push(b.pad_with_zeros(1, at, n - at - k)?);
        at += k;
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// `W (B, K, P)` from `(P)`, `(B, P)` or `(B, K, P)`, and how to undo it.
fn as_batched(w: &Tensor, p: usize) -> Result<(Tensor, Vec<usize>)> {
    let shape = w.dims().to_vec();
    if shape.last() != Some(&p) {
        bail!(Invalid, "the last axis of W must have the {p} parameters, got shape {shape:?}");
    }
    let w3 = match shape.len() {
        1 => w.reshape((1, 1, p))?,
        2 => w.unsqueeze(1)?,
        3 => w.clone(),
        _ => bail!(Invalid, "W must be (P), (B, P) or (B, K, P), got shape {shape:?}"),
    };
    Ok((w3, shape))
}

/// `Q W_b` for every `W_b` of `w (N, p, q)` with `q_mat (p, p)`.
fn left_mul(q_mat: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, p, q) = w.dims3()?;
    // (Q W_b) = (W_bᵀ Qᵀ)ᵀ, one GEMM over all b.
    let wt = w.transpose(1, 2)?.contiguous()?.reshape((n * q, p))?;
    Ok(wt.mm(&q_mat.t()?)?.reshape((n, q, p))?.transpose(1, 2)?.contiguous()?)
}

/// `W_b Qᵀ` for every `W_b` of `w (N, p, q)` with `q_mat (q, q)`.
fn right_mul_t(w: &Tensor, q_mat: &Tensor) -> Result<Tensor> {
    let (n, p, q) = w.dims3()?;
    Ok(w.reshape((n * p, q))?.mm(&q_mat.t()?)?.reshape((n, p, q))?)
}

/// Kronecker-factored block-diagonal matrix (laplace-torch `Kron`).
#[derive(Clone, Debug)]
pub struct Kron {
    /// Per block, one or two factors (square matrices or diagonals).
    pub blocks: Vec<Vec<Tensor>>,
}

impl Kron {
    /// Check shapes: every block has one or two factors, each square 2-D or 1-D.
    pub fn new(blocks: Vec<Vec<Tensor>>) -> Result<Self> {
        for (b, fs) in blocks.iter().enumerate() {
            if fs.is_empty() || fs.len() > 2 {
                bail!(Invalid, "Kronecker block {b} has {} factors; expected 1 or 2", fs.len());
            }
            for (i, f) in fs.iter().enumerate() {
                let ok = match f.dims() {
                    [_] => true,
                    [r, c] => r == c,
                    _ => false,
                };
                if !ok {
                    bail!(Invalid, "factor {i} of Kronecker block {b} has shape {:?}; expected (n, n) or (n,)", f.dims());
                }
            }
        }
        Ok(Kron { blocks })
    }

    /// Number of parameters of every block (the product of its factor sizes).
    pub fn block_sizes(&self) -> Result<Vec<usize>> {
        self.blocks
            .iter()
            .map(|fs| fs.iter().map(factor_len).product::<Result<usize>>())
            .collect()
    }

    /// Total number of parameters P.
    pub fn n_params(&self) -> Result<usize> {
        Ok(self.block_sizes()?.iter().sum())
    }

    /// Factor-wise sum (how laplace-torch accumulates over batches).
    pub fn add(&self, other: &Kron) -> Result<Kron> {
        self.check_summand(other)?;
        let blocks = self
            .blocks
            .iter()
            .zip(&other.blocks)
            .map(|(x, y)| x.iter().zip(y).map(|(f, g)| Ok((f + g)?)).collect::<Result<Vec<_>>>())
            .collect::<Result<_>>()?;
        Ok(Kron { blocks })
    }

    /// `other` has this Kron's blocks and factor shapes (both sums need it).
    fn check_summand(&self, other: &Kron) -> Result<()> {
        if self.blocks.len() != other.blocks.len() {
            bail!(Invalid, "cannot add Kron with {} blocks to one with {}", self.blocks.len(), other.blocks.len());
        }
        for (b, (x, y)) in self.blocks.iter().zip(&other.blocks).enumerate() {
            if x.len() != y.len() || x.iter().zip(y).any(|(f, g)| f.dims() != g.dims()) {
                bail!(Invalid, "Kronecker block {b} has different factor shapes in the two summands");
            }
        }
        Ok(())
    }

    /// `self += other`, factor by factor, in place (see
    /// [`tensor::add_assign`](crate::tensor::add_assign)): a pass over
    /// data adds each batch's factors into the first batch's, instead of
    /// building a third set every batch.
    ///
    /// A factor that is a clone of an earlier one (KFAC's weight and bias
    /// blocks hold one output factor B) shares its storage and is one sum:
    /// it is added once. `self` must own its factors alone otherwise.
    pub fn add_assign(&mut self, other: &Kron) -> Result<()> {
        self.check_summand(other)?;
        let mut added = std::collections::HashSet::new();
        for (x, y) in self.blocks.iter_mut().zip(&other.blocks) {
            for (f, g) in x.iter_mut().zip(y) {
                if added.insert(f.id()) {
                    crate::tensor::add_assign(f, g)?;
                }
            }
        }
        Ok(())
    }

    /// `s · K`: every factor of a block times s^(1/#factors).
    pub fn scale(&self, s: f64) -> Result<Kron> {
        let blocks = self
            .blocks
            .iter()
            .map(|fs| {
                let per = s.powf(1.0 / fs.len() as f64);
                fs.iter().map(|f| Ok((f * per)?)).collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        Ok(Kron { blocks })
    }

    /// Eigendecompose every factor (eigenvalues clamped at 0; a 1-D factor
    /// is its own eigenvalues with Q = I).
    pub fn decompose(&self, damping: bool) -> Result<KronDecomposed> {
        let mut eigvecs = Vec::with_capacity(self.blocks.len());
        let mut eigvals = Vec::with_capacity(self.blocks.len());
        for fs in &self.blocks {
            let (mut qs, mut ls) = (Vec::new(), Vec::new());
            for f in fs {
                if f.rank() == 1 {
                    ls.push(f.clamp(0.0, f64::INFINITY)?);
                    qs.push(None);
                } else {
                    let (l, q) = linalg::symmetric_eigen(f)?;
                    ls.push(l.clamp(0.0, f64::INFINITY)?);
                    qs.push(Some(q));
                }
            }
            eigvecs.push(qs);
            eigvals.push(ls);
        }
        let n = self.blocks.len();
        Ok(KronDecomposed {
            eigvecs,
            eigvals,
            deltas: vec![0.0; n],
            damping,
        })
    }

    /// log det of the whole matrix: Σ_blocks, with
    /// log det(B ⊗ A) = q·log det B + p·log det A for B `(p, p)`, A `(q, q)`.
    /// Errors if a factor is not positive definite (add a prior precision
    /// through [`KronDecomposed`] first).
    pub fn logdet(&self) -> Result<f64> {
        let mut total = 0.0;
        for (b, fs) in self.blocks.iter().enumerate() {
            let sizes: Vec<usize> = fs.iter().map(factor_len).collect::<Result<_>>()?;
            let n: usize = sizes.iter().product();
            for (i, f) in fs.iter().enumerate() {
                let eig = if f.rank() == 1 {
                    tensor::to_vec_f64(f)?
                } else {
                    linalg::symmetric_eigenvalues(f)?
                };
                if let Some(bad) = eig.iter().find(|&&l| l <= 0.0) {
                    bail!(
                        NonFinite,
                        "log-determinant: factor {i} of Kronecker block {b} is not positive definite (eigenvalue {bad:e}); \
                         add a prior precision to the decomposition first"
                    );
                }
                // The other factors' total size multiplies this factor's log det.
                let others = n / sizes[i];
                total += others as f64 * eig.iter().map(|l| l.ln()).sum::<f64>();
            }
        }
        Ok(total)
    }

    /// The diagonal `(P,)`.
    pub fn diag(&self) -> Result<Tensor> {
        let parts = self
            .blocks
            .iter()
            .map(|fs| {
                let d: Vec<Tensor> = fs
                    .iter()
                    .map(|f| if f.rank() == 1 { Ok(f.clone()) } else { diagonal(f) })
                    .collect::<Result<_>>()?;
                match d.as_slice() {
                    [a] => Ok(a.clone()),
                    [a, b] => Ok(outer(a, b)?.flatten_all()?),
                    _ => unreachable!("checked in new"),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The dense block-diagonal `(P, P)` matrix (for tests and small models).
    pub fn to_matrix(&self) -> Result<Tensor> {
        let p = self.n_params()?;
        crate::budget::check(&format!("the dense Kronecker matrix for P = {p}"), &[p, p], 8)?;
        let blocks = self
            .blocks
            .iter()
            .map(|fs| match fs.as_slice() {
                [a] => dense(a),
                [a, b] => kron_product(&dense(a)?, &dense(b)?),
                _ => unreachable!("checked in new"),
            })
            .collect::<Result<Vec<_>>>()?;
        block_diag(&blocks)
    }

    /// `K W` for W `(P)`, `(B, P)` or `(B, K, P)` (rows of W are vectors).
    pub fn bmm(&self, w: &Tensor) -> Result<Tensor> {
        let p = self.n_params()?;
        let (w3, shape) = as_batched(w, p)?;
        let (b, k, _) = w3.dims3()?;
        let w2 = w3.reshape((b * k, p))?;
        let mut parts = Vec::with_capacity(self.blocks.len());
        let mut at = 0;
        for fs in &self.blocks {
            let sizes: Vec<usize> = fs.iter().map(factor_len).collect::<Result<_>>()?;
            let n: usize = sizes.iter().product();
            let wp = w2.narrow(1, at, n)?;
            let out = match fs.as_slice() {
                [f] => {
                    if f.rank() == 1 {
                        wp.broadcast_mul(&f.reshape((1, n))?)?
                    } else {
                        wp.mm(&f.t()?)?
                    }
                }
                [f1, f2] => {
                    // (F1 ⊗ F2) vec(X) = vec(F1 X F2ᵀ), X (p1, p2) row-major.
                    let x = wp.reshape((b * k, sizes[0], sizes[1]))?;
                    let x = if f1.rank() == 1 {
                        x.broadcast_mul(&f1.reshape((1, sizes[0], 1))?)?
                    } else {
                        left_mul(f1, &x)?
                    };
                    let x = if f2.rank() == 1 {
                        x.broadcast_mul(&f2.reshape((1, 1, sizes[1]))?)?
                    } else {
                        right_mul_t(&x, f2)?
                    };
                    x.reshape((b * k, n))?
                }
                _ => unreachable!("checked in new"),
            };
            parts.push(out);
            at += n;
        }
        Ok(Tensor::cat(&parts, 1)?.reshape(shape)?)
    }
}

/// Diagonal of a square matrix.
fn diagonal(m: &Tensor) -> Result<Tensor> {
    let n = m.dim(0)?;
    let eye = Tensor::eye(n, m.dtype(), m.device())?;
    Ok((m * eye)?.sum(1)?)
}

/// Outer product of two vectors.
fn outer(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.unsqueeze(1)?.broadcast_mul(&b.unsqueeze(0)?)?)
}

/// Eigendecomposed Kronecker factors with a prior precision per block
/// (laplace-torch `KronDecomposed`).
#[derive(Clone, Debug)]
pub struct KronDecomposed {
    /// Per block and factor: eigenvectors (None for a diagonal factor: Q = I).
    eigvecs: Vec<Vec<Option<Tensor>>>,
    /// Per block and factor: eigenvalues, clamped at 0.
    eigvals: Vec<Vec<Tensor>>,
    /// δ per block, added to the eigenvalues of the block's product.
    deltas: Vec<f64>,
    /// With damping, a two-factor block's eigenvalues are
    /// (λ₁ + √δ) ⊗ (λ₂ + √δ) instead of λ₁ ⊗ λ₂ + δ.
    damping: bool,
}

impl KronDecomposed {
    /// Number of Kronecker blocks (parameter groups).
    pub fn n_blocks(&self) -> usize {
        self.eigvals.len()
    }

    /// The prior (and damping) term δ added to each block.
    pub fn deltas(&self) -> &[f64] {
        &self.deltas
    }

    /// Whether δ is added as damping (λ₁ + √δ)(λ₂ + √δ) rather than λ₁λ₂ + δ.
    pub fn damping(&self) -> bool {
        self.damping
    }

    /// Eigenvalues of every block's factors.
    pub fn eigenvalues(&self) -> &[Vec<Tensor>] {
        &self.eigvals
    }

    /// Add δ to every block: one value for all, or one per block.
    pub fn add_delta(&self, delta: &[f64]) -> Result<Self> {
        let n = self.n_blocks();
        let per_block: Vec<f64> = match delta.len() {
            1 => vec![delta[0]; n],
            l if l == n => delta.to_vec(),
            l => bail!(Invalid, "prior precision has {l} values; expected 1 or one per block ({n})"),
        };
        if let Some(bad) = per_block.iter().find(|d| !d.is_finite() || **d < 0.0) {
            bail!(Invalid, "prior precision must be finite and non-negative, got {bad}");
        }
        let mut out = self.clone();
        for (d, add) in out.deltas.iter_mut().zip(per_block) {
            *d += add;
        }
        Ok(out)
    }

    /// `s · K`: each block's eigenvalues times s^(1/#factors) per factor.
    pub fn scale(&self, s: f64) -> Result<Self> {
        let mut out = self.clone();
        for ls in &mut out.eigvals {
            let per = s.powf(1.0 / ls.len() as f64);
            for l in ls.iter_mut() {
                *l = (&*l * per)?;
            }
        }
        Ok(out)
    }

    /// The eigenvalues of block `b` including δ, as one tensor: `(n,)` for
    /// one factor, `(p, q)` for two.
    fn block_eigenvalues(&self, b: usize) -> Result<Tensor> {
        let delta = self.deltas[b];
        Ok(match self.eigvals[b].as_slice() {
            [l] => (l + delta)?,
            [l1, l2] if self.damping => {
                let s = delta.sqrt();
                outer(&(l1 + s)?, &(l2 + s)?)?
            }
            [l1, l2] => (outer(l1, l2)? + delta)?,
            _ => unreachable!("one or two factors"),
        })
    }

    /// log det of the whole matrix with δ: Σ log(eigenvalues).
    pub fn logdet(&self) -> Result<f64> {
        let mut total = 0.0;
        for b in 0..self.n_blocks() {
            let l = tensor::to_vec_f64(&self.block_eigenvalues(b)?)?;
            total += l.iter().map(|v| v.ln()).sum::<f64>();
        }
        if total.is_nan() {
            bail!(NonFinite, "log-determinant is NaN");
        }
        Ok(total)
    }

    /// `K^e W` for W `(P)`, `(B, P)` or `(B, K, P)`; e = 1, −1, −½, ...
    pub fn bmm(&self, w: &Tensor, exponent: f64) -> Result<Tensor> {
        let sizes: Vec<usize> = self.eigvals.iter().map(|ls| ls.iter().map(factor_len).product()).collect::<Result<_>>()?;
        let p: usize = sizes.iter().sum();
        let (w3, shape) = as_batched(w, p)?;
        let (b, k, _) = w3.dims3()?;
        let w2 = w3.reshape((b * k, p))?;
        let mut parts = Vec::with_capacity(self.n_blocks());
        let mut at = 0;
        for (blk, &n) in sizes.iter().enumerate() {
            let wp = w2.narrow(1, at, n)?;
            let lam = self.block_eigenvalues(blk)?.powf(exponent)?;
            let out = match self.eigvecs[blk].as_slice() {
                [q] => {
                    // Q diag(λ^e) Qᵀ w, rows of wp are vectors: wp Q diag Qᵀ.
                    let lam = lam.reshape((1, n))?;
                    match q {
                        Some(q) => wp.mm(q)?.broadcast_mul(&lam)?.mm(&q.t()?)?,
                        None => wp.broadcast_mul(&lam)?,
                    }
                }
                [q1, q2] => {
                    // (Q₁ ⊗ Q₂) diag(λ) (Q₁ ⊗ Q₂)ᵀ vec(X) = vec(Q₁ [(Q₁ᵀ X Q₂) ⊙ Λ] Q₂ᵀ).
                    let (p1, p2) = lam.dims2()?;
                    let mut x = wp.reshape((b * k, p1, p2))?;
                    if let Some(q1) = q1 {
                        x = left_mul(&q1.t()?, &x)?;
                    }
                    if let Some(q2) = q2 {
                        x = right_mul_t(&x, &q2.t()?)?;
                    }
                    x = x.broadcast_mul(&lam.unsqueeze(0)?)?;
                    if let Some(q1) = q1 {
                        x = left_mul(q1, &x)?;
                    }
                    if let Some(q2) = q2 {
                        x = right_mul_t(&x, q2)?;
                    }
                    x.reshape((b * k, n))?
                }
                _ => unreachable!("one or two factors"),
            };
            parts.push(out);
            at += n;
        }
        Ok(Tensor::cat(&parts, 1)?.reshape(shape)?)
    }

    /// `W K⁻¹ Wᵀ` for W `(B, K, P)` → `(B, K, K)` (or `(B, P)` → `(B, 1, 1)`).
    pub fn inv_square_form(&self, w: &Tensor) -> Result<Tensor> {
        let p: usize = self.eigvals.iter().map(|ls| ls.iter().map(factor_len).product::<Result<usize>>()).sum::<Result<usize>>()?;
        let (w3, _) = as_batched(w, p)?;
        let sw = self.bmm(&w3, -1.0)?;
        Ok(w3.mm(&sw.transpose(1, 2)?)?)
    }

    /// The diagonal of K^e `(P,)`, without forming blocks:
    /// d_{m,n} = Σ_{p,q} Q₁_{m,p}² Q₂_{n,q}² λ_{p,q}^e.
    pub fn diag(&self, exponent: f64) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.n_blocks());
        for blk in 0..self.n_blocks() {
            let lam = self.block_eigenvalues(blk)?.powf(exponent)?;
            let d = match self.eigvecs[blk].as_slice() {
                [q] => match q {
                    Some(q) => q.sqr()?.mm(&lam.unsqueeze(1)?)?.squeeze(1)?,
                    None => lam,
                },
                [q1, q2] => {
                    let mut m = lam;
                    if let Some(q1) = q1 {
                        m = q1.sqr()?.mm(&m)?;
                    }
                    if let Some(q2) = q2 {
                        m = m.mm(&q2.sqr()?.t()?)?;
                    }
                    m.flatten_all()?
                }
                _ => unreachable!("one or two factors"),
            };
            parts.push(d);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The dense block-diagonal K^e `(P, P)` (for tests and small models).
    pub fn to_matrix(&self, exponent: f64) -> Result<Tensor> {
        let mut blocks = Vec::with_capacity(self.n_blocks());
        for blk in 0..self.n_blocks() {
            let lam = self.block_eigenvalues(blk)?.powf(exponent)?.flatten_all()?;
            let n = lam.dim(0)?;
            let qs: Vec<Tensor> = self.eigvecs[blk]
                .iter()
                .zip(&self.eigvals[blk])
                .map(|(q, l)| match q {
                    Some(q) => Ok(q.clone()),
                    None => Ok(Tensor::eye(l.dim(0)?, l.dtype(), l.device())?),
                })
                .collect::<Result<_>>()?;
            let q = match qs.as_slice() {
                [q] => q.clone(),
                [q1, q2] => kron_product(q1, q2)?,
                _ => unreachable!("one or two factors"),
            };
            blocks.push(q.broadcast_mul(&lam.reshape((1, n))?)?.mm(&q.t()?)?);
        }
        block_diag(&blocks)
    }
}
