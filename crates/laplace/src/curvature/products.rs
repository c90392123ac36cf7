//! Matrix-free curvature products on one batch: H V for the exact Hessian
//! (Pearlmutter's R-operator through the graph engine) and for every Gram
//! curvature (GGN, MC Fisher, EF: the same passes without second-order
//! terms), for K directions at once.
//!
//! With z the output of a node, g = ∂L/∂z and "·̇" the directional
//! derivative along V (one direction per column k):
//!
//! * tangent forward ([`engine::tangent_walk`]): ż = Σⱼ Jⱼ ẋⱼ + J_θ θ̇;
//! * at the output: ġ_L = Λ̃ ż_L (Λ̃ = Λ for the Hessian and the GGN, the MC
//!   or empirical outer products otherwise);
//! * backward ([`engine::backward_walk`], fan-out summed): ġⱼ = Jⱼᵀ ġ +
//!   [R{Jⱼᵀ} g], where the bracket (Hessian only) is θ̇ᵀ-weighted for affine
//!   layers (V_Wᵀ g) plus the op's second-order term (σ''(x) ⊙ ẋ ⊙ g for
//!   activations, g ⊙ ḃ for a product a ⊙ b, ...);
//! * parameters: R{∇W} = Σ_n Σ_r ġ U ᵀ + [g U̇ᵀ], R{∇b} = Σ_n Σ_r ġ.
//!
//! The Hessian's exact diagonal comes from a second pass, [`hessian_diag`]:
//! the per-sample Hessian with respect to each value is kept as signed
//! rows, G = Σ p pᵀ − Σ q qᵀ, pulled back with Gⱼ = Jⱼᵀ G Jⱼ + diag(r)
//! (r the diagonal second-order residual of an activation, split into its
//! positive and negative parts), and every layer's diagonal is the signed sum
//! of squared per-row gradients (as BackPACK's DiagHessian). Rows carry the
//! node they were born at: where two branches meet, rows of the same origin
//! add and rows of different origins are distinct rows. Graphs whose
//! second-order terms couple two values (a product of two activations) take
//! the diagonal from Hessian-vector products with unit vectors instead.

use std::collections::{BTreeMap, HashMap};

use super::diag::diag_gram;
use super::selection::Selected;
use super::{Batch, Curvature, CurvatureKind};
use crate::engine::{self, AffineView};
use crate::error::Result;
use crate::nn::{AffineLayer, Residual};
use crate::tensor::{self, Mm, Tensor};

/// Directions per parameterized node: weight `(K, O, I)`, bias `(K, O)`.
type Directions = BTreeMap<usize, (Option<Tensor>, Option<Tensor>)>;

/// Split `v (K, P_sel)` (θ order) into per-node directions, zero where not selected.
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
        let affine = model.nodes()[t.layer].op.affine().expect("only affine ops have parameters");
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
    let coef = f_dot.mm(&rows.transpose(1, 2)?.contiguous()?)?; // (M, K, J)
    Ok(coef.mm(rows)?)
}

/// Products of the curvature with the K directions `v (K, P_sel)` (rows, in
/// output order) on one batch: returns the loss `(1,)` and `(K, P_sel)`.
/// The batch is processed a chunk of samples at a time, so that the
/// tangents of all active values stay within the curvature's memory bound.
pub(crate) fn matmat(curv: &Curvature, batch: &Batch, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let model = curv.model();
    let active = curv.selection().active();
    let width: usize = (0..model.nodes().len())
        .filter(|&i| active[i])
        .map(|i| model.value_shape(model.node_value(i)).iter().product::<usize>())
        .sum();
    let k = v.dim(0)?;
    let m = batch.x.len();
    let chunk = (curv.chunk_elems() / (k * width).max(1)).clamp(1, m.max(1));
    let mut acc: Option<(Tensor, Tensor)> = None;
    let mut start = 0;
    while start < m {
        let len = chunk.min(m - start);
        let sub = Batch {
            x: batch.x.narrow(start, len)?,
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

/// J_θ θ̇ = V_W U + v_b of one affine node, `(M, K, O, R)`.
fn parameter_tangent(aff: &dyn AffineLayer, u: &Tensor, wd: Option<&Tensor>, bd: Option<&Tensor>, m: usize, k: usize) -> Result<Tensor> {
    let (o, ii, r) = aff.affine_dims();
    let groups = aff.groups();
    let mut term = match wd {
        // One GEMM over all samples: (K·O, I) @ (I, M·R) → (K, O, M, R).
        Some(w) if groups == 1 => {
            let ut = tensor::contiguous(&u.permute((1, 0, 2))?)?.reshape((ii, m * r))?;
            let t = w.reshape((k * o, ii))?.mm(&ut)?.reshape((k, o, m, r))?;
            tensor::contiguous(&t.permute((2, 0, 1, 3))?)?
        }
        // Per group: (G, K·O/G, I) @ (G, I, M·R) → (M, K, O, R).
        Some(w) => {
            let og = o / groups;
            let wg = w.reshape((k, groups, og, ii))?.permute((1, 0, 2, 3))?.contiguous()?.reshape((groups, k * og, ii))?;
            let ug = u.reshape((m, groups, ii, r))?.permute((1, 2, 0, 3))?.contiguous()?.reshape((groups, ii, m * r))?;
            let t = wg.mm(&ug)?.reshape((groups, k, og, m, r))?;
            t.permute((3, 1, 0, 2, 4))?.contiguous()?.reshape((m, k, o, r))?
        }
        None => Tensor::zeros((m, k, o, r), u.dtype(), u.device())?,
    };
    if let Some(b) = bd {
        term = term.broadcast_add(&b.reshape((1, k, o, 1))?)?;
    }
    Ok(term)
}

/// Σ_n ġ_{n,k} U_nᵀ `(K, O, I)` for ġ `(M, K, O, R)` and U `(M, G·I, R)`.
fn weight_product(gd: &Tensor, u: &Tensor, groups: usize) -> Result<Tensor> {
    let (m, k, o, r) = gd.dims4()?;
    let ii = u.dim(1)? / groups;
    if groups > 1 {
        // Per group: (G, K·O/G, M·R) @ (G, M·R, I).
        let og = o / groups;
        let gg = gd.reshape((m, k, groups, og, r))?.permute((2, 1, 3, 0, 4))?.contiguous()?.reshape((groups, k * og, m * r))?;
        let ug = u.reshape((m, groups, ii, r))?.permute((1, 0, 3, 2))?.contiguous()?.reshape((groups, m * r, ii))?;
        let w = gg.mm(&ug)?.reshape((groups, k, og, ii))?;
        return Ok(w.permute((1, 0, 2, 3))?.contiguous()?.reshape((k, o, ii))?);
    }
    // One GEMM: (K·O, M·R) @ (M·R, I) → (K, O, I).
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
    Ok(gdt.mm(&um)?.reshape((k, o, ii))?)
}

/// The mixed term Σ_n g_n U̇_{n,k}ᵀ `(K, O, I)` for g `(M, O·R)` and U̇ `(M, K, G·I, R)`.
fn mixed_product(g: &Tensor, ud: &Tensor, o: usize, groups: usize) -> Result<Tensor> {
    let (m, k, gi, r) = ud.dims4()?;
    let (ii, og) = (gi / groups, o / groups);
    // (G, O/G, M·R) @ (K, G, M·R, I) → (K, G, O/G, I).
    let gt = g.reshape((m, groups, og, r))?.permute((1, 2, 0, 3))?.contiguous()?.reshape((1, groups, og, m * r))?;
    let udt = ud.reshape((m, k, groups, ii, r))?.permute((1, 2, 0, 4, 3))?.contiguous()?.reshape((k, groups, m * r, ii))?;
    let mixed = gt.broadcast_as((k, groups, og, m * r))?.contiguous()?.mm(&udt)?;
    Ok(mixed.reshape((k, o, ii))?)
}

/// Sum two optional tensors.
fn add_opt(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or(b),
    })
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
    let tape = engine::forward(model, &batch.x, sel.active())?;
    let m = batch.x.len();
    let nodes = model.nodes();

    // Tangent forward pass.
    let tangents = engine::tangent_walk(model, &tape, |i| {
        let (Some(aff), Some((wd, bd))) = (nodes[i].op.affine(), dirs.get(&i)) else {
            return Ok(None);
        };
        let u = aff.patches(tape.saved(i))?;
        let term = parameter_tangent(aff, &u, wd.as_ref(), bd.as_ref(), m, k)?;
        Ok(Some(crate::nn::from_patch_form(aff, &term, nodes[i].op.out_shape())?))
    })?;
    // No tangent reaches the output when the selected parameters do not.
    let f_dot = match tangents[model.output_value()].clone() {
        Some(t) => t,
        None => Tensor::zeros((m, k, model.n_outputs()), v.dtype(), v.device())?,
    };

    // Output: ġ = Λ̃ ḟ, g = ∇_f ℓ.
    let f = &tape.output;
    let loss = curv.likelihood().loss(f, &y)?;
    let rows = if hessian { curv.likelihood().sqrt_hessian(f)? } else { curv.output_rows(f, &y, batch.offset)? };
    let g_dot = apply_rows(&rows, &f_dot)?;
    let g = if hessian { Some(curv.likelihood().gradient(f, &y)?) } else { None };

    // Backward pass of (ġ, g).
    let mut pieces = HashMap::new();
    engine::backward_walk(
        model,
        &tape,
        (g_dot, g),
        |a, b| Ok(((a.0 + b.0)?, add_opt(a.1, b.1)?)),
        |i, (g_dot, g)| {
            let node = &nodes[i];
            let saved = tape.saved(i);
            let x_dots: Vec<Option<&Tensor>> = node.inputs.iter().map(|&v| tangents[v].as_ref()).collect();
            if let (Some(aff), Some(lsel)) = (node.op.affine(), sel.layer(i)) {
                let (o, _, r) = aff.affine_dims();
                let groups = aff.groups();
                let gd = crate::nn::to_patch_form(aff, &g_dot)?;
                let u = aff.patches(saved)?;
                let mut w_grad = weight_product(&gd, &u, groups)?;
                if let (Some(g), Some(td)) = (&g, x_dots[0]) {
                    // + Σ_n g_n U̇_{n,k}ᵀ.
                    w_grad = (w_grad + mixed_product(&crate::nn::to_patch_form(aff, &g.unsqueeze(1)?)?.reshape((m, o * r))?, &aff.tangent_patches(saved, td)?, o, groups)?)?;
                }
                let ii = w_grad.dim(2)?;
                if let Some(s) = &lsel.weight {
                    pieces.insert((i, false), select_cols(&w_grad.reshape((k, o * ii))?, s)?);
                }
                if let Some(s) = &lsel.bias {
                    let b_grad = tensor::sum_leading(&tensor::sum_dim(&gd, 3)?, 1)?; // (K, O)
                    pieces.insert((i, true), select_cols(&b_grad, s)?);
                }
            }
            let needs = tape.needs(model, i);
            if !needs.iter().any(|&n| n) {
                return Ok(vec![None; needs.len()]);
            }
            let mut next = node.op.backward_all(saved, &g_dot, &needs)?;
            let Some(gy) = g else {
                return Ok(next.into_iter().map(|t| t.map(|t| (t, None))).collect());
            };
            if let (Some(aff), Some((Some(wd), _)), true) = (node.op.affine(), dirs.get(&i), needs[0]) {
                next[0] = add_opt(next[0].take(), Some(aff.backward_with_weights(saved, &gy, wd)?))?;
            }
            let second = node.op.second_order_all(saved, &gy, &x_dots, &needs)?;
            let grads = node.op.backward_all(saved, &gy.unsqueeze(1)?, &needs)?;
            next.into_iter()
                .zip(second)
                .zip(grads)
                .map(|((n, s), gr)| {
                    Ok(match add_opt(n, s)? {
                        Some(t) => Some((t, gr.map(|gr| gr.squeeze(1)).transpose()?)),
                        None => None,
                    })
                })
                .collect()
        },
    )?;
    let pieces = sel.in_theta_order(model, pieces, |t| Ok(Tensor::zeros((k, t.len), v.dtype(), v.device())?))?;
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
    let mut rows = Vec::new();
    let loss = by_identity_blocks(curv, batch, columns, |_, h| {
        rows.push(h);
        Ok(())
    })?;
    Ok((loss, Tensor::cat(&rows, 0)?))
}

/// Products with the identity's rows `start..start + len`, `columns` at a
/// time, each handed to `take(start, H[start..start + len])`; returns the loss.
fn by_identity_blocks(curv: &Curvature, batch: &Batch, columns: usize, mut take: impl FnMut(usize, Tensor) -> Result<()>) -> Result<Tensor> {
    let p = curv.selection().len();
    let model = curv.model();
    let eye = Tensor::eye(p, model.dtype(), model.device())?;
    let mut loss = None;
    let mut start = 0;
    while start < p {
        let len = columns.max(1).min(p - start);
        let (l, h) = matmat(curv, batch, &eye.narrow(0, start, len)?)?;
        loss.get_or_insert(l);
        take(start, h)?;
        start += len;
    }
    Ok(loss.expect("at least one parameter"))
}

/// Rows of one sign: one tensor `(M, K, *shape)` whose K rows are the
/// segments `(origin, length)` one after the other.
#[derive(Clone)]
struct Rows {
    rows: Tensor,
    segs: Vec<(usize, usize)>,
}

impl Rows {
    /// Rows of the same origin add; rows of different origins are distinct rows.
    fn add(self, other: Rows) -> Result<Rows> {
        if self.segs == other.segs {
            return Ok(Rows { rows: (self.rows + other.rows)?, segs: self.segs });
        }
        // (origin, first row, rows) of every segment.
        let starts = |segs: &[(usize, usize)]| {
            let mut s = 0;
            segs.iter()
                .map(|&(id, n)| {
                    s += n;
                    (id, s - n, n)
                })
                .collect::<Vec<_>>()
        };
        let (mine, theirs) = (starts(&self.segs), starts(&other.segs));
        let find = |list: &[(usize, usize, usize)], id: usize| list.iter().find(|x| x.0 == id).map(|x| x.1);
        let mut parts = Vec::new();
        let mut segs = self.segs.clone();
        for &(id, s, n) in &mine {
            let mut part = self.rows.narrow(1, s, n)?;
            if let Some(t) = find(&theirs, id) {
                part = (part + other.rows.narrow(1, t, n)?)?;
            }
            parts.push(part);
        }
        for &(id, t, n) in &theirs {
            if find(&mine, id).is_none() {
                parts.push(other.rows.narrow(1, t, n)?);
                segs.push((id, n));
            }
        }
        Ok(Rows { rows: Tensor::cat(&parts, 1)?, segs })
    }

    fn append(self, id: usize, new: Tensor) -> Result<Rows> {
        let n = new.dim(1)?;
        let mut segs = self.segs;
        segs.push((id, n));
        Ok(Rows { rows: Tensor::cat(&[&self.rows, &new], 1)?, segs })
    }
}

/// The Hessian diagonal's state at a value: the gradient g `(M, *shape)`
/// and the signed rows of ∇²_z L.
struct DiagState {
    g: Tensor,
    pos: Rows,
    neg: Option<Rows>,
}

/// Σ_n ℓ_n and the exact diagonal of the Hessian on one batch (see the module docs).
pub(crate) fn hessian_diag(curv: &Curvature, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let model = curv.model();
    let sel = curv.selection();
    let coupled = model.nodes().iter().enumerate().any(|(i, n)| sel.active()[i] && n.op.couples_inputs());
    if coupled {
        return hessian_diag_by_products(curv, batch);
    }
    let y = curv.targets(&batch.y, &batch.x)?;
    let tape = engine::forward(model, &batch.x, sel.active())?;
    let f = &tape.output;
    let loss = curv.likelihood().loss(f, &y)?;
    let g = curv.likelihood().gradient(f, &y)?; // ∂L/∂z, (M, *out)
    let seed = curv.likelihood().sqrt_hessian(f)?; // rows with G = Σ p pᵀ − Σ q qᵀ
    let pos = Rows { segs: vec![(0, seed.dim(1)?)], rows: seed };
    let chunk = curv.chunk_elems();
    let mut parts = HashMap::new();
    engine::backward_walk(
        model,
        &tape,
        DiagState { g, pos, neg: None },
        |a, b| {
            let neg = match (a.neg, b.neg) {
                (Some(p), Some(q)) => Some(p.add(q)?),
                (p, q) => p.or(q),
            };
            Ok(DiagState { g: (a.g + b.g)?, pos: a.pos.add(b.pos)?, neg })
        },
        |i, st| {
            let node = &model.nodes()[i];
            let saved = tape.saved(i);
            if let (Some(aff), Some(lsel)) = (node.op.affine(), sel.layer(i)) {
                let signed = |rows: &Tensor| -> Result<(Option<Tensor>, Option<Tensor>)> {
                    let view = AffineView { layer: i, affine: aff, saved, sensitivities: crate::nn::to_patch_form(aff, rows)? };
                    diag_gram(&view, lsel, chunk)
                };
                let (mut w, mut b) = signed(&st.pos.rows)?;
                if let Some(q) = &st.neg {
                    let (wn, bn) = signed(&q.rows)?;
                    w = w.map(|w| w - wn.expect("same selection")).transpose()?;
                    b = b.map(|b| b - bn.expect("same selection")).transpose()?;
                }
                parts.extend(w.map(|w| ((i, false), w)));
                parts.extend(b.map(|b| ((i, true), b)));
            }
            let needs = tape.needs(model, i);
            if !needs.iter().any(|&n| n) {
                return Ok(needs.iter().map(|_| None).collect());
            }
            let pull = |rows: &Rows| -> Result<Vec<Option<Rows>>> {
                Ok(node
                    .op
                    .backward_all(saved, &rows.rows, &needs)?
                    .into_iter()
                    .map(|t| t.map(|rows_j| Rows { rows: rows_j, segs: rows.segs.clone() }))
                    .collect())
            };
            let pos = pull(&st.pos)?;
            let neg = match &st.neg {
                Some(q) => pull(q)?,
                None => vec![None; needs.len()],
            };
            let gs = node.op.backward_all(saved, &st.g.unsqueeze(1)?, &needs)?;
            // diag(r) = diag(√r₊)² − diag(√r₋)²: one new row per unit, born here.
            let residual = match node.op.residual(saved, &st.g)? {
                Residual::Diagonal(r) => Some(r),
                Residual::None => None,
                Residual::Coupled => unreachable!("coupled graphs take the product path"),
            };
            let mut out = Vec::with_capacity(needs.len());
            for (j, ((p, q), gj)) in pos.into_iter().zip(neg).zip(gs).enumerate() {
                let (Some(mut p), Some(gj)) = (p, gj) else {
                    out.push(None);
                    continue;
                };
                let mut q = q;
                if let (Some(res), 0) = (&residual, j) {
                    let (rp, rn) = (res.relu()?.sqrt()?, res.neg()?.relu()?.sqrt()?);
                    p = p.append(2 * i + 1, one_hot_rows(&rp)?)?;
                    let rows_n = one_hot_rows(&rn)?;
                    q = Some(match q {
                        Some(q) => q.append(2 * i + 2, rows_n)?,
                        None => Rows { segs: vec![(2 * i + 2, rows_n.dim(1)?)], rows: rows_n },
                    });
                }
                out.push(Some(DiagState { g: gj.squeeze(1)?, pos: p, neg: q }));
            }
            Ok(out)
        },
    )?;
    let parts = sel.in_theta_order(model, parts, |t| Ok(Tensor::zeros(t.len, model.dtype(), model.device())?))?;
    Ok((loss, sel.reorder(Tensor::cat(&parts, 0)?, 0)?))
}

/// The exact Hessian diagonal from products with unit vectors, 64 at a time:
/// for graphs whose second-order terms couple two values.
fn hessian_diag_by_products(curv: &Curvature, batch: &Batch) -> Result<(Tensor, Tensor)> {
    let p = curv.selection().len();
    let mut diag = vec![0.0; p];
    let loss = by_identity_blocks(curv, batch, 64, |start, h| {
        let len = h.dim(0)?;
        let block = tensor::to_vec_f64(&h)?;
        for j in 0..len {
            diag[start + j] = block[j * p + start + j];
        }
        Ok(())
    })?;
    let model = curv.model();
    Ok((loss, tensor::from_f64(diag, &[p], model.dtype(), model.device())?))
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
