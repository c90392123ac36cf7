//! Diagonal of a Gram matrix of per-sample gradients, without forming them
//! for the whole layer at once ("SumGradSquared" / "DiagGGN").
//!
//! diag(Σ_{n,k} g_{n,k} g_{n,k}ᵀ) = Σ_{n,k} g_{n,k}², with g_{n,k} the
//! per-sample, per-column gradient of [`super::batch_grad`]. For a Linear
//! layer (R = 1) g = V[n, k] ⊗ U[n], so the weight part is
//!
//!   Σ_{n,k} V[n,k,o]² U[n,i]² = ((Σ_k V²)ᵀ U²)[o, i],
//!
//! one (O × M) · (M × I) product and no per-sample gradients at all. For
//! Conv2d the sum over positions r does not factor: the per-sample
//! products are squared and summed as they are formed
//! ([`tensor::sum_sq_products`]); for a subset of a weight, its
//! per-sample gradients are formed a few samples at a time.

use super::batch_grad::{bias_grads, grouped_weight_grads, weight_grads};
use super::selection::{LayerSelection, Selected};
use crate::engine::AffineView;
use crate::error::Result;
use crate::tensor::{self, Mm, Tensor};

/// Diagonal entries for the selected coordinates of the layer in `view`:
/// the weight's and the bias's, each `(n,)`. `chunk_elems` bounds the size
/// of temporary per-sample gradients.
pub fn diag_gram(view: &AffineView, sel: &LayerSelection, chunk_elems: usize) -> Result<(Option<Tensor>, Option<Tensor>)> {
    diag_part(view, sel, chunk_elems)?.finish()
}

/// A layer's diagonal from some of the output rows, as it is summed over
/// chunks of rows: a sum of per-chunk diagonals, but for a Linear weight,
/// whose Σ_k V² `(M, O)` is what adds up over chunks (its product with U²
/// is formed once, by [`DiagPart::finish`], not once per chunk).
pub(crate) struct DiagPart {
    weight: Option<WeightPart>,
    bias: Option<Tensor>,
}

enum WeightPart {
    Diagonal(Tensor),
    /// Σ_k V² `(M, O)` and U² `(M, I)` of a Linear layer (R = 1).
    LinearRows { v2: Tensor, u2: Tensor },
}

impl DiagPart {
    /// Add the share of another chunk of rows of the same layer.
    pub(crate) fn add(&mut self, other: DiagPart) -> Result<()> {
        self.bias = match (self.bias.take(), other.bias) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
        self.weight = match (self.weight.take(), other.weight) {
            (Some(WeightPart::Diagonal(a)), Some(WeightPart::Diagonal(b))) => Some(WeightPart::Diagonal((a + b)?)),
            (Some(WeightPart::LinearRows { v2, u2 }), Some(WeightPart::LinearRows { v2: w2, .. })) => {
                Some(WeightPart::LinearRows { v2: (v2 + w2)?, u2 })
            }
            (a, None) => a,
            (None, b) => b,
            _ => crate::error::bail!(Invalid, "the chunks of one layer's diagonal differ in form"),
        };
        Ok(())
    }

    /// The weight's and the bias's diagonal entries, each `(n,)`.
    pub(crate) fn finish(self) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let weight = match self.weight {
            None => None,
            Some(WeightPart::Diagonal(w)) => Some(w),
            Some(WeightPart::LinearRows { v2, u2 }) => {
                let (o, i) = (v2.dim(1)?, u2.dim(1)?);
                Some(v2.t()?.mm(&u2)?.reshape(o * i)?) // (Σ_k V²)ᵀ U²  (O, I)
            }
        };
        Ok((weight, self.bias))
    }
}

/// The diagonal of the layer in `view` from its rows, as [`DiagPart`].
pub(crate) fn diag_part(view: &AffineView, sel: &LayerSelection, chunk_elems: usize) -> Result<DiagPart> {
    let v = &view.sensitivities;
    let bias = sel.bias.as_ref().map(|s| sum_sq_leading(&bias_grads(v, s)?)).transpose()?;
    if let (Some(oh), Some(s)) = (view.one_hot(), &sel.weight) {
        let w = one_hot_diag(&oh, v)?;
        let w = match s {
            Selected::All => w,
            Selected::Some(ids) => tensor::select(&w, &tensor::index_tensor(ids, w.device())?, 0)?,
        };
        return Ok(DiagPart { weight: Some(WeightPart::Diagonal(w)), bias });
    }
    let u = &view.patches()?;
    let groups = view.groups();
    let mut weight = None;
    if let Some(s) = &sel.weight {
        let (m, k, o, r) = v.dims4()?;
        let i = u.dim(1)? / groups;
        weight = Some(match s {
            // Grouped layers: per-sample gradients a chunk of samples at a time.
            Selected::All if groups > 1 => WeightPart::Diagonal(chunked_sum_sq(m, chunk_elems / (k * o * i).max(1), |start, len| {
                grouped_weight_grads(&u.narrow(0, start, len)?, &v.narrow(0, start, len)?, groups)
            })?),
            Selected::All if r == 1 => WeightPart::LinearRows {
                v2: tensor::sum_sq_dim(v, 1)?.reshape((m, o))?, // Σ_k V²  (M, O)
                u2: u.sqr()?.reshape((m, i))?,                  // U²  (M, I)
            },
            Selected::All => {
                // Σ_n Σ_k (V_{n,k} U_nᵀ)²: per-sample products summed as squares
                // on the fly, (K·O, I) → Σ_k → (O·I).
                let sq = tensor::sum_sq_products(&v.reshape((m, k * o, r))?, u)?;
                WeightPart::Diagonal(tensor::sum_leading(&sq.reshape((k, o * i))?, 1)?)
            }
            Selected::Some(ids) => {
                // Temporaries per sample: (K, S, R) gathered rows and their products.
                let per_sample = (v.dim(1)? * ids.len() * r).max(1);
                WeightPart::Diagonal(chunked_sum_sq(m, chunk_elems / per_sample, |start, len| {
                    weight_grads(&u.narrow(0, start, len)?, &v.narrow(0, start, len)?, ids, groups)
                })?)
            }
        });
    }
    Ok(DiagPart { weight, bias })
}

/// The weight diagonal `(O·V)` of a layer with one-hot patches (Embedding):
/// per sample and column, the gradient of table row v is the sum of the
/// sensitivities of the positions that read it, so
///
///   diag[o, v] = Σ_{n,k} (Σ_{r: id[n,r] = v} V[n, k, o, r])²,
///
/// at O·K·R work per sample and nothing of size V per sample.
fn one_hot_diag(oh: &crate::nn::OneHot, v: &Tensor) -> Result<Tensor> {
    let (m, k, o, r) = v.dims4()?;
    let vocab = oh.vocab;
    let mut out = vec![0.0f64; o * vocab];
    let vs = tensor::to_vec_f64(v)?;
    let mut sums: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for n in 0..m {
        sums.clear();
        for (pos, id) in oh.ids[n * r..(n + 1) * r].iter().enumerate() {
            let Some(id) = id else { continue };
            let acc = sums.entry(*id).or_insert_with(|| vec![0.0; k * o]);
            for kk in 0..k {
                let base = ((n * k + kk) * o) * r;
                for oo in 0..o {
                    acc[kk * o + oo] += vs[base + oo * r + pos];
                }
            }
        }
        for (&id, acc) in &sums {
            for kk in 0..k {
                for oo in 0..o {
                    out[oo * vocab + id] += acc[kk * o + oo].powi(2);
                }
            }
        }
    }
    tensor::from_f64(out, &[o * vocab], v.dtype(), v.device())
}

/// Σ over samples 0..m, in chunks of `chunk` samples, of Σ_k g², g = `grads(start, len)` `(len, K, n)`.
fn chunked_sum_sq(m: usize, chunk: usize, grads: impl Fn(usize, usize) -> Result<Tensor>) -> Result<Tensor> {
    let chunk = chunk.clamp(1, m.max(1));
    let mut acc: Option<Tensor> = None;
    let mut start = 0;
    while start < m {
        let len = chunk.min(m - start);
        let part = sum_sq_leading(&grads(start, len)?)?;
        acc = Some(match acc {
            None => part,
            Some(a) => (a + part)?,
        });
        start += len;
    }
    Ok(acc.expect("at least one sample"))
}

/// Σ_{n,k} g² of per-sample gradients `g (M, K, n)`: `(n,)`.
fn sum_sq_leading(g: &Tensor) -> Result<Tensor> {
    let (m, k, n) = g.dims3()?;
    Ok(tensor::sum_sq_dim(&g.reshape((1, m * k, n))?, 1)?.reshape(n)?)
}

