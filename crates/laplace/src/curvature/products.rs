//! Matrix-free curvature products on one batch: H V for the exact Hessian
//! (Pearlmutter's R-operator through the layer engine) and for every Gram
//! curvature (GGN, MC Fisher, EF: the same passes without second-order
//! terms), for K directions at once.
//!
//! With z_l the output of layer l, g_l = ∂L/∂z_l and "·̇" the directional
//! derivative along V (one direction per column k):
//!
//! * tangent forward: ż_l = J_x ż_{l−1} + J_θ θ̇_l;
//! * at the output: ġ_L = Λ̃ ż_L (Λ̃ = Λ for the Hessian and the GGN, the MC
//!   or empirical outer products otherwise);
//! * backward: ġ_{l−1} = J_xᵀ ġ_l + [R{J_xᵀ} g_l], where the bracket (Hessian
//!   only) is θ̇ᵀ-weighted for affine layers (V_Wᵀ g) and σ''(x) ⊙ ẋ ⊙ g for
//!   elementwise activations;
//! * parameters: R{∇W} = Σ_n Σ_r ġ U ᵀ + [g U̇ᵀ], R{∇b} = Σ_n Σ_r ġ.
//!
//! The Hessian's exact diagonal comes from a second pass, [`hessian_diag`]:
//! the per-sample Hessian with respect to each layer output is kept as signed
//! rows, G_l = Σ p pᵀ − Σ q qᵀ, pulled back with G_{l−1} = J_xᵀ G_l J_x +
//! diag(r_l) (r_l the diagonal second-order residual of an activation, split
//! into its positive and negative parts), and every layer's diagonal is the
//! signed sum of squared per-row gradients (as BackPACK's DiagHessian).

use std::collections::BTreeMap;

use super::diag::diag_gram;
use super::selection::Selected;
use super::{Batch, Curvature, CurvatureKind};
use crate::engine::{self, AffineView};
use crate::error::Result;
use crate::tensor::{self, Tensor};

/// Directions per parameterized layer: weight `(K, O, I)`, bias `(K, O)`.
type Directions = BTreeMap<usize, (Option<Tensor>, Option<Tensor>)>;

/// Split `v (K, P_sel)` (θ order) into per-layer directions, zero where not selected.
fn directions(curv: &Curvature, v: &Tensor) -> Result<Directions> {
    let model = curv.model();
    let k = v.dim(0)?;
    let mut dirs = Directions::new();
    for t in curv.selection().tensors(model) {
        let part = v.narrow(1, t.column, t.len)?;
        let full = match &t.selected {
            Selected::All => part,
            Selected::Some(ids) => tensor::select_adjoint(&part, &tensor::index_tensor(ids, v.device())?, 1, t.numel)?,
        };
        let affine = model.layers()[t.layer].affine().expect("only affine layers have parameters");
        let (o, i, _) = affine.affine_dims();
        let entry = dirs.entry(t.layer).or_default();
        if t.is_bias {
            entry.1 = Some(full.reshape((k, o))?);
        } else {
            entry.0 = Some(full.reshape((k, o, i))?);
        }
    }
    Ok(dirs)
}

/// Σ_j r_j (r_jᵀ ḟ) for rows r `(M, J, C)` and tangents ḟ `(M, K, C)`: `(M, K, C)`.
fn apply_rows(rows: &Tensor, f_dot: &Tensor) -> Result<Tensor> {
    let coef = f_dot.matmul(&rows.transpose(1, 2)?.contiguous()?)?; // (M, K, J)
    Ok(coef.matmul(rows)?)
}

/// Products of the curvature with the K directions `v (K, P_sel)` (rows, in
/// output order) on one batch: returns the loss `(1,)` and `(K, P_sel)`.
/// The batch is processed a chunk of samples at a time, so that the
/// tangents of all layers stay within the curvature's memory bound.
pub(crate) fn matmat(curv: &Curvature, batch: &Batch, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let model = curv.model();
    let first = curv.selection().first_layer();
    let width: usize = (first..=model.layers().len())
        .map(|i| model.shape_before(i).iter().product::<usize>())
        .sum();
    let k = v.dim(0)?;
    let m = batch.x.dim(0)?;
    let chunk = (curv.chunk_elems() / (k * width).max(1)).clamp(1, m.max(1));
    let mut acc: Option<(Tensor, Tensor)> = None;
    let mut start = 0;
    while start < m {
        let len = chunk.min(m - start);
        let sub = Batch {
            x: batch.x.narrow(0, start, len)?,
            y: batch.y.narrow(0, start, len)?,
            offset: batch.offset + start,
        };
        let (l, hv) = matmat_batch(curv, &sub, v)?;
        acc = Some(match acc {
            None => (l, hv),
            Some((l0, h0)) => ((l0 + l)?, (h0 + hv)?),
        });
        start += len;
    }
    Ok(acc.expect("a batch has at least one point"))
}

fn matmat_batch(curv: &Curvature, batch: &Batch, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let model = curv.model();
    let sel = curv.selection();
    let hessian = curv.kind() == CurvatureKind::Hessian;
    let (k, p) = v.dims2()?;
    if p != sel.len() {
        crate::error::bail!(Invalid, "directions have {p} coordinates, the curvature has {}", sel.len());
    }
    let dirs = directions(curv, &sel.to_theta_order(v.clone(), 1)?)?;
    let y = curv.targets(&batch.y, &batch.x)?;
    let first = sel.first_layer();
    let tape = engine::forward(model, &batch.x, first)?;
    let m = batch.x.dim(0)?;
    let layers = model.layers();

    // Tangent forward pass; tangents[i] is the input tangent of layer i.
    let mut tangents: Vec<Option<Tensor>> = vec![None; layers.len()];
    let mut x_dot: Option<Tensor> = None;
    for (i, layer) in layers.iter().enumerate().skip(first) {
        let saved = tape.saved(i);
        let mut out = match &x_dot {
            Some(t) => Some(layer.jvp_input(saved, t)?),
            None => None,
        };
        if let (Some(aff), Some((wd, bd))) = (layer.affine(), dirs.get(&i)) {
            // J_θ θ̇ = V_W U + v_b: (K·O, I) @ (M, I, R) → (M, K, O, R).
            let (o, ii, r) = aff.affine_dims();
            let u = aff.patches(saved)?;
            let mut term = match wd {
                // One GEMM over all samples: (K·O, I) @ (I, M·R) → (K, O, M, R).
                Some(w) => {
                    let ut = tensor::contiguous(&u.permute((1, 0, 2))?)?.reshape((ii, m * r))?;
                    let t = w.reshape((k * o, ii))?.matmul(&ut)?.reshape((k, o, m, r))?;
                    tensor::contiguous(&t.permute((2, 0, 1, 3))?)?
                }
                None => Tensor::zeros((m, k, o, r), u.dtype(), u.device())?,
            };
            if let Some(b) = bd {
                term = term.broadcast_add(&b.reshape((1, k, o, 1))?)?;
            }
            let mut shape = vec![m, k];
            shape.extend_from_slice(layer.out_shape());
            let term = term.reshape(shape)?;
            out = Some(match out {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        tangents[i] = x_dot.take();
        x_dot = out;
    }
    let f_dot = x_dot.expect("a selection has at least one parameterized layer");

    // Output: ġ = Λ̃ ḟ, g = ∇_f ℓ.
    let f = &tape.output;
    let loss = curv.likelihood().loss(f, &y)?;
    let rows = if hessian {
        curv.likelihood().sqrt_hessian(f)?
    } else {
        curv.output_rows(f, &y, batch.offset)?
    };
    let mut g_dot = apply_rows(&rows, &f_dot)?;
    let mut g = if hessian { Some(curv.likelihood().gradient(f, &y)?) } else { None };

    // Backward pass.
    let mut pieces = Vec::new();
    for i in (first..layers.len()).rev() {
        let layer = &layers[i];
        let saved = tape.saved(i);
        if let (Some(aff), Some(lsel)) = (layer.affine(), sel.layer(i)) {
            let (o, ii, r) = aff.affine_dims();
            let gd = g_dot.reshape((m, k, o, r))?;
            let u = aff.patches(saved)?;
            // Σ_n ġ_{n,k} U_nᵀ as one GEMM: (K·O, M·R) @ (M·R, I) → (K, O, I).
            let gdt = if r == 1 {
                tensor::transpose2d(&gd.reshape((m, k * o))?)?
            } else {
                gd.permute((1, 2, 0, 3))?.contiguous()?.reshape((k * o, m * r))?
            };
            let um = if r == 1 {
                u.reshape((m, ii))?
            } else {
                // U as (I, M·R) (Conv2d keeps it so), used transposed.
                tensor::contiguous(&u.transpose(0, 1)?)?.reshape((ii, m * r))?.t()?
            };
            let mut w_grad = gdt.matmul(&um)?.reshape((k, o, ii))?;
            if let (Some(g), Some(td)) = (&g, &tangents[i]) {
                // + Σ_n g_n U̇_{n,k}ᵀ: (O, M·R) @ (K, M·R, I) → (K, O, I).
                let ud = aff.tangent_patches(td)?; // (M, K, I, R)
                let udt = ud.permute((1, 0, 3, 2))?.contiguous()?.reshape((k, m * r, ii))?;
                let gt = tensor::contiguous(&g.reshape((m, o, r))?.permute((1, 0, 2))?)?.reshape((o, m * r))?;
                let mixed = gt.broadcast_left(k)?.matmul(&udt)?;
                w_grad = (w_grad + mixed)?;
            }
            let b_grad = tensor::sum_leading(&tensor::sum_dim(&gd, 3)?, 1)?; // (K, O)
            let mut part = Vec::with_capacity(2);
            if let Some(s) = &lsel.weight {
                part.push(select_cols(&w_grad.reshape((k, o * ii))?, s)?);
            }
            if let Some(s) = &lsel.bias {
                part.push(select_cols(&b_grad, s)?);
            }
            pieces.push(Tensor::cat(&part, 1)?);
        }
        if i > first {
            let mut next = layer.backward(saved, &g_dot)?;
            if let Some(gy) = &g {
                if let (Some(aff), Some((Some(wd), _))) = (layer.affine(), dirs.get(&i)) {
                    next = (next + aff.backward_with_weights(gy, wd)?)?;
                }
                if let (Some(res), Some(td)) = (layer.input_residual(saved, gy)?, &tangents[i]) {
                    next = (next + td.broadcast_mul(&res.unsqueeze(1)?)?)?;
                }
                g = Some(layer.backward(saved, &gy.unsqueeze(1)?)?.squeeze(1)?);
            }
            g_dot = next;
        }
    }
    pieces.reverse();
    let out = sel.reorder(Tensor::cat(&pieces, 1)?, 1)?;
    Ok((loss, out))
}

/// Columns `s` of `(K, numel)`.
fn select_cols(t: &Tensor, s: &Selected) -> Result<Tensor> {
    match s {
        Selected::All => Ok(t.clone()),
        Selected::Some(ids) => tensor::select(t, &tensor::index_tensor(ids, t.device())?, 1),
    }
}

/// The dense curvature by products with identity columns, `columns` at a time.
pub(crate) fn full_by_products(curv: &Curvature, batch: &Batch, columns: usize) -> Result<(Tensor, Tensor)> {
    let p = curv.selection().len();
    let model = curv.model();
    let eye = Tensor::eye(p, model.dtype(), model.device())?;
    let mut rows = Vec::new();
    let mut loss = None;
    let mut start = 0;
    while start < p {
        let len = columns.max(1).min(p - start);
        let (l, h) = matmat(curv, batch, &eye.narrow(0, start, len)?)?;
        loss.get_or_insert(l);
        rows.push(h);
        start += len;
    }
    Ok((loss.expect("at least one parameter"), Tensor::cat(&rows, 0)?))
}

/// Σ_n ℓ_n and the exact diagonal of the Hessian on one batch (see the module docs).
pub(crate) fn hessian_diag(curv: &Curvature, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let model = curv.model();
    let sel = curv.selection();
    let y = curv.targets(&batch.y, &batch.x)?;
    let first = sel.first_layer();
    let tape = engine::forward(model, &batch.x, first)?;
    let f = &tape.output;
    let loss = curv.likelihood().loss(f, &y)?;
    let m = f.dim(0)?;
    let mut g = curv.likelihood().gradient(f, &y)?; // ∂L/∂z, (M, *out)
    let mut pos = curv.likelihood().sqrt_hessian(f)?; // rows with G = Σ p pᵀ − Σ q qᵀ
    let mut neg: Option<Tensor> = None;
    let chunk = curv.chunk_elems();
    let mut parts = Vec::new();
    for i in (first..model.layers().len()).rev() {
        let layer = &model.layers()[i];
        let saved = tape.saved(i);
        if let (Some(aff), Some(lsel)) = (layer.affine(), sel.layer(i)) {
            let (o, _, r) = aff.affine_dims();
            let u = aff.patches(saved)?;
            let signed = |rows: &Tensor| -> Result<Tensor> {
                let kk = rows.dim(1)?;
                let view = AffineView {
                    layer: i,
                    affine: aff,
                    patches: u.clone(),
                    sensitivities: rows.reshape((m, kk, o, r))?,
                };
                diag_gram(&view, lsel, chunk)
            };
            let mut d = signed(&pos)?;
            if let Some(q) = &neg {
                d = (d - signed(q)?)?;
            }
            parts.push(d);
        }
        if i > first {
            pos = layer.backward(saved, &pos)?;
            neg = neg.map(|q| layer.backward(saved, &q)).transpose()?;
            if let Some(res) = layer.input_residual(saved, &g)? {
                // diag(r) = diag(√r₊)² − diag(√r₋)²: one new row per unit.
                let (rp, rn) = (res.relu()?.sqrt()?, res.neg()?.relu()?.sqrt()?);
                pos = Tensor::cat(&[&pos, &one_hot_rows(&rp)?], 1)?;
                let rows_n = one_hot_rows(&rn)?;
                neg = Some(match neg {
                    Some(q) => Tensor::cat(&[&q, &rows_n], 1)?,
                    None => rows_n,
                });
            }
            g = layer.backward(saved, &g.unsqueeze(1)?)?.squeeze(1)?;
        }
    }
    parts.reverse();
    Ok((loss, sel.reorder(Tensor::cat(&parts, 0)?, 0)?))
}

/// Rows `(M, D, *shape)`: row d of sample n is s[n, d] e_d, for s `(M, *shape)`.
fn one_hot_rows(s: &Tensor) -> Result<Tensor> {
    let m = s.dim(0)?;
    let shape = s.dims()[1..].to_vec();
    let d: usize = shape.iter().product();
    let eye = Tensor::eye(d, s.dtype(), s.device())?;
    let rows = eye.unsqueeze(0)?.broadcast_mul(&s.reshape((m, 1, d))?)?;
    let mut out_shape = vec![m, d];
    out_shape.extend(shape);
    Ok(rows.reshape(out_shape)?)
}
