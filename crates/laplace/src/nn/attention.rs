//! `torch.matmul` of two activations and `scaled_dot_product_attention`.
//!
//! matmul, C = A B (leading per-sample axes broadcast):
//!   Aᵀ-side: v_A = V Bᵀ, v_B = Aᵀ V;  Ċ = Ȧ B + A Ḃ;
//!   second order (bilinear): to A: g Ḃᵀ, to B: Ȧᵀ g.
//!
//! Attention, O = P v with P = softmax(S), S = s · q kᵀ + mask (a boolean
//! or causal mask sets S to −∞ where not attended):
//!   backward of V_O: dP = V_O vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)),
//!     v_q = s dS k, v_k = s dSᵀ q, v_v = Pᵀ V_O;
//!   tangents: Ṡ = s (q̇ kᵀ + q k̇ᵀ), Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)), Ȯ = Ṗ v + P v̇;
//!   second order for the output gradient g (the derivative of the backward
//!   map along the tangents, g fixed): with dP = g vᵀ, dṖ = g v̇ᵀ,
//!     dṠ = Ṗ ⊙ (dP − rowsum(dP ⊙ P)) + P ⊙ (dṖ − rowsum(dṖ ⊙ P + dP ⊙ Ṗ)),
//!     to q: s (dṠ k + dS k̇), to k: s (dṠᵀ q + dSᵀ q̇), to v: Ṗᵀ g.

use super::discrete::broadcast_shapes;
use super::pointwise::softmax;
use super::{Op, Residual, Saved};
use crate::error::{bail, Result};
use crate::spec::MaskKind;
use crate::tensor::{Mm, Tensor};

/// Batched matrix products with the leading axes broadcast (both operands
/// of the same rank), on contiguous copies as the GEMM kernels need.
trait Bmm {
    fn bmm(&self, rhs: &Tensor) -> candle_core::Result<Tensor>;
}

impl Bmm for Tensor {
    fn bmm(&self, rhs: &Tensor) -> candle_core::Result<Tensor> {
        let r = self.rank();
        let lead: Vec<usize> = self.dims()[..r - 2].iter().zip(&rhs.dims()[..r - 2]).map(|(a, b)| *a.max(b)).collect();
        let (n, k, p) = (self.dim(r - 2)?, self.dim(r - 1)?, rhs.dim(r - 1)?);
        let batch: usize = lead.iter().product();
        // As 3-D products (candle's kernels, the fallback of `mm` off the CPU, take one batch axis).
        let a = self.broadcast_as([&lead[..], &[n, k]].concat())?.contiguous()?.reshape((batch, n, k))?;
        let b = rhs.broadcast_as([&lead[..], &[k, p]].concat())?.contiguous()?.reshape((batch, k, p))?;
        a.mm(&b).map_err(candle_core::Error::wrap)?.reshape([&lead[..], &[n, p]].concat())
    }
}

/// The last two axes swapped.
fn tr(t: &Tensor) -> candle_core::Result<Tensor> {
    let r = t.rank();
    t.transpose(r - 2, r - 1)
}

/// `t (M, K, *s)` summed to the (padded) per-sample shape `target` (same rank as s).
fn sum_to(t: &Tensor, target: &[usize], orig: &[usize]) -> Result<Tensor> {
    let lead = t.rank() - target.len();
    let axes: Vec<usize> = (0..target.len()).filter(|&a| target[a] == 1).map(|a| a + lead).collect();
    let t = crate::tensor::sum_keepdims(t, &axes)?;
    Ok(t.reshape([&t.dims()[..lead], orig].concat())?)
}

fn add_opt(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(a.broadcast_add(&b)?),
        (a, b) => a.or(b),
    })
}

/// `torch.matmul` of two values, per-sample ranks ≥ 2.
pub(crate) struct Matmul {
    /// A's and B's per-sample shapes, padded to the same rank.
    pa: Vec<usize>,
    pb: Vec<usize>,
    a: Vec<usize>,
    b: Vec<usize>,
    out: Vec<usize>,
}

struct MatmulSaved {
    a: Tensor,
    b: Tensor,
}

impl Matmul {
    pub(crate) fn build(a: &[usize], b: &[usize]) -> std::result::Result<Self, String> {
        if a.len() < 2 || b.len() < 2 {
            return Err(format!("matmul needs per-sample ranks ≥ 2, got {a:?} and {b:?}"));
        }
        let (n, k1) = (a[a.len() - 2], a[a.len() - 1]);
        let (k2, p) = (b[b.len() - 2], b[b.len() - 1]);
        if k1 != k2 {
            return Err(format!("matmul of {a:?} and {b:?}: inner sizes {k1} and {k2} differ"));
        }
        let (pads, lead) = broadcast_shapes(&[&a[..a.len() - 2], &b[..b.len() - 2]])
            .ok_or_else(|| format!("matmul of {a:?} and {b:?}: leading axes do not broadcast"))?;
        Ok(Matmul {
            pa: [&pads[0][..], &[n, k1]].concat(),
            pb: [&pads[1][..], &[k2, p]].concat(),
            a: a.to_vec(),
            b: b.to_vec(),
            out: [&lead[..], &[n, p]].concat(),
        })
    }

    fn lift(t: &Tensor, lead: usize, shape: &[usize]) -> candle_core::Result<Tensor> {
        t.reshape([&t.dims()[..lead], shape].concat())
    }
}

impl Op for Matmul {
    fn type_name(&self) -> &'static str {
        "matmul"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let a = Self::lift(inputs[0], 1, &self.pa)?;
        let b = Self::lift(inputs[1], 1, &self.pb)?;
        let y = a.bmm(&b)?;
        Ok((y, save.then(|| Saved::new(MatmulSaved { a, b }))))
    }

    fn backward_all(&self, saved: &Saved, v: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let s = saved.get::<MatmulSaved>();
        let to_a = if needs[0] { Some(sum_to(&v.bmm(&tr(&s.b.unsqueeze(1)?)?)?, &self.pa, &self.a)?) } else { None };
        let to_b = if needs[1] { Some(sum_to(&tr(&s.a.unsqueeze(1)?)?.bmm(v)?, &self.pb, &self.b)?) } else { None };
        Ok(vec![to_a, to_b])
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let s = saved.get::<MatmulSaved>();
        let pa = x_dots[0].map(|t| Self::lift(t, 2, &self.pa)?.bmm(&s.b.unsqueeze(1)?)).transpose()?;
        let pb = x_dots[1].map(|t| s.a.unsqueeze(1)?.bmm(&Self::lift(t, 2, &self.pb)?)).transpose()?;
        add_opt(pa, pb)
    }

    fn second_order_all(&self, _saved: &Saved, g: &Tensor, x_dots: &[Option<&Tensor>], needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = g.unsqueeze(1)?;
        let to_a = match (needs[0], x_dots[1]) {
            (true, Some(bd)) => Some(sum_to(&g.bmm(&tr(&Self::lift(bd, 2, &self.pb)?)?)?, &self.pa, &self.a)?),
            _ => None,
        };
        let to_b = match (needs[1], x_dots[0]) {
            (true, Some(ad)) => Some(sum_to(&tr(&Self::lift(ad, 2, &self.pa)?)?.bmm(&g)?, &self.pb, &self.b)?),
            _ => None,
        };
        Ok(vec![to_a, to_b])
    }

    fn residual(&self, _saved: &Saved, _g: &Tensor) -> Result<Residual> {
        Ok(Residual::Coupled)
    }

    fn couples_inputs(&self) -> bool {
        true
    }
}

/// `F.scaled_dot_product_attention(q, k, v[, mask], is_causal, scale)`.
pub(crate) struct Attention {
    scale: f64,
    causal: bool,
    mask: Option<MaskKind>,
    /// The mask's per-sample shape padded to the scores' `(*B, L, S)`, and as given.
    mask_padded: Vec<usize>,
    out: Vec<usize>,
    label: String,
}

struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// P `(M, *B, L, S)`.
    p: Tensor,
}

impl Attention {
    pub(crate) fn build(in_shapes: &[&[usize]], causal: bool, scale: Option<f64>, mask: Option<MaskKind>, label: &str) -> std::result::Result<Self, String> {
        let (q, k, v) = (in_shapes[0], in_shapes[1], in_shapes[2]);
        let r = q.len();
        if r < 2 || k.len() != r || v.len() != r || q[..r - 2] != k[..r - 2] || q[..r - 2] != v[..r - 2] {
            return Err(format!("q, k, v must have per-sample shapes (*B, L, E), (*B, S, E), (*B, S, Ev); got {q:?}, {k:?}, {v:?}"));
        }
        let (l, e, s) = (q[r - 2], q[r - 1], k[r - 2]);
        if k[r - 1] != e || v[r - 2] != s {
            return Err(format!("q, k, v shapes {q:?}, {k:?}, {v:?} do not fit (*B, L, E), (*B, S, E), (*B, S, Ev)"));
        }
        let scores = [&q[..r - 2], &[l, s]].concat();
        let mask_padded = match in_shapes.get(3) {
            Some(ms) => {
                let (pads, out) = broadcast_shapes(&[ms, &scores]).ok_or_else(|| format!("the mask {ms:?} does not broadcast to the scores {scores:?}"))?;
                if out != scores {
                    return Err(format!("the mask {ms:?} does not broadcast to the scores {scores:?}"));
                }
                pads[0].clone()
            }
            None => vec![],
        };
        Ok(Attention {
            scale: scale.unwrap_or(1.0 / (e as f64).sqrt()),
            causal,
            mask,
            mask_padded,
            out: [&q[..r - 1], &[v[r - 1]]].concat(),
            label: label.to_string(),
        })
    }

    /// rowsum over the key axis, kept.
    fn rowsum(t: &Tensor) -> Result<Tensor> {
        Ok(t.sum_keepdim(t.rank() - 1)?)
    }

    /// Ṗ for tangents of q and k `(M, K, …)`.
    fn p_dot(&self, s: &AttentionSaved, qd: Option<&Tensor>, kd: Option<&Tensor>) -> Result<Option<Tensor>> {
        let q = s.q.unsqueeze(1)?;
        let k = s.k.unsqueeze(1)?;
        let sd = add_opt(
            qd.map(|t| t.bmm(&tr(&k)?)).transpose()?,
            kd.map(|t| q.bmm(&tr(t)?)).transpose()?,
        )?;
        let Some(sd) = sd else { return Ok(None) };
        let sd = (sd * self.scale)?;
        let p = s.p.unsqueeze(1)?;
        Ok(Some(p.broadcast_mul(&sd.broadcast_sub(&Self::rowsum(&p.broadcast_mul(&sd)?)?)?)?))
    }
}

impl Op for Attention {
    fn type_name(&self) -> &'static str {
        "scaled_dot_product_attention"
    }

    fn out_shape(&self) -> &[usize] {
        &self.out
    }

    fn forward_all(&self, inputs: &[&Tensor], save: bool) -> Result<(Tensor, Option<Saved>)> {
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        let m = q.dim(0)?;
        let mut scores = (q.bmm(&tr(k)?)? * self.scale)?;
        let neg_inf = (scores.zeros_like()? + f64::NEG_INFINITY)?;
        if let (Some(kind), Some(mask)) = (self.mask, inputs.get(3)) {
            let mask = mask.reshape([&[m][..], &self.mask_padded].concat())?.broadcast_as(scores.dims())?;
            scores = match kind {
                MaskKind::Additive => scores.add(&mask)?,
                MaskKind::Bool => mask.ne(0.0)?.where_cond(&scores, &neg_inf)?,
            };
        }
        if self.causal {
            // Query i attends to keys j ≤ i (torch's top-left aligned tril).
            let (l, s) = (scores.dim(scores.rank() - 2)?, scores.dim(scores.rank() - 1)?);
            let keep: Vec<f64> = (0..l * s).map(|t| if t % s <= t / s { 1.0 } else { 0.0 }).collect();
            let keep = crate::tensor::from_f64(keep, &[l, s], scores.dtype(), scores.device())?.broadcast_as(scores.dims())?;
            scores = keep.ne(0.0)?.where_cond(&scores, &neg_inf)?;
        }
        let p = softmax(&scores, scores.rank() - 1)?;
        if let Some(pos) = crate::tensor::first_non_finite(&p)? {
            bail!(NonFinite, "{}: a query attends to no key (every score masked) at {:?}", self.label, crate::tensor::unravel(pos, p.dims()));
        }
        let y = p.bmm(v)?;
        let saved = save.then(|| Saved::new(AttentionSaved { q: q.clone(), k: k.clone(), v: v.clone(), p }));
        Ok((y, saved))
    }

    fn backward_all(&self, saved: &Saved, vo: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let s = saved.get::<AttentionSaved>();
        let mut out = vec![None; needs.len()];
        let p = s.p.unsqueeze(1)?;
        if needs[2] {
            out[2] = Some(tr(&p)?.bmm(vo)?);
        }
        if needs[0] || needs[1] {
            let dp = vo.bmm(&tr(&s.v.unsqueeze(1)?)?)?;
            let ds = (p.broadcast_mul(&dp.broadcast_sub(&Self::rowsum(&dp.broadcast_mul(&p)?)?)?)? * self.scale)?;
            if needs[0] {
                out[0] = Some(ds.bmm(&s.k.unsqueeze(1)?)?);
            }
            if needs[1] {
                out[1] = Some(tr(&ds)?.bmm(&s.q.unsqueeze(1)?)?);
            }
        }
        Ok(out)
    }

    fn jvp_all(&self, saved: &Saved, x_dots: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
        let s = saved.get::<AttentionSaved>();
        let from_p = self.p_dot(s, x_dots[0], x_dots[1])?.map(|pd| pd.bmm(&s.v.unsqueeze(1)?)).transpose()?;
        let from_v = x_dots[2].map(|vd| s.p.unsqueeze(1)?.bmm(vd)).transpose()?;
        add_opt(from_p, from_v)
    }

    fn second_order_all(&self, saved: &Saved, g: &Tensor, x_dots: &[Option<&Tensor>], needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let s = saved.get::<AttentionSaved>();
        let (qd, kd, vd) = (x_dots[0], x_dots[1], x_dots[2]);
        let g = g.unsqueeze(1)?;
        let p = s.p.unsqueeze(1)?;
        let p_dot = self.p_dot(s, qd, kd)?;
        let mut out = vec![None; needs.len()];
        if needs[2] {
            out[2] = p_dot.as_ref().map(|pd| tr(pd)?.bmm(&g)).transpose()?;
        }
        if !(needs[0] || needs[1]) {
            return Ok(out);
        }
        let dp = g.bmm(&tr(&s.v.unsqueeze(1)?)?)?; // (M, 1, …, L, S)
        let rho = Self::rowsum(&dp.broadcast_mul(&p)?)?;
        let ds = (p.broadcast_mul(&dp.broadcast_sub(&rho)?)? * self.scale)?;
        // dṠ (without the scale).
        let dp_dot = vd.map(|t| g.bmm(&tr(t)?)).transpose()?;
        let mut ds_dot: Option<Tensor> = None;
        if let Some(pd) = &p_dot {
            ds_dot = add_opt(ds_dot, Some(pd.broadcast_mul(&dp.broadcast_sub(&rho)?)?))?;
        }
        let inner = add_opt(
            dp_dot.as_ref().map(|t| t.broadcast_mul(&p)).transpose()?,
            p_dot.as_ref().map(|pd| dp.broadcast_mul(pd)).transpose()?,
        )?;
        if let Some(inner) = inner {
            let base = match &dp_dot {
                Some(t) => t.clone(),
                None => inner.zeros_like()?,
            };
            ds_dot = add_opt(ds_dot, Some(p.broadcast_mul(&base.broadcast_sub(&Self::rowsum(&inner)?)?)?))?;
        }
        let ds_dot = ds_dot.map(|t| t * self.scale).transpose()?;
        let (q, k) = (s.q.unsqueeze(1)?, s.k.unsqueeze(1)?);
        if needs[0] {
            out[0] = add_opt(
                ds_dot.as_ref().map(|t| t.bmm(&k)).transpose()?,
                kd.map(|t| ds.bmm(t)).transpose()?,
            )?;
        }
        if needs[1] {
            out[1] = add_opt(
                ds_dot.as_ref().map(|t| tr(t)?.bmm(&q)).transpose()?,
                qd.map(|t| tr(&ds)?.bmm(t)).transpose()?,
            )?;
        }
        Ok(out)
    }

    fn residual(&self, _saved: &Saved, _g: &Tensor) -> Result<Residual> {
        Ok(Residual::Coupled)
    }

    fn couples_inputs(&self) -> bool {
        true
    }
}
