//! Kronecker factors (KFAC) of the GGN, MC Fisher and EF, per layer from
//! its patches U `(M, I, R)` and output sensitivities V `(M, K, O, R)`.
//!
//! With N the total number of data points (the `kron` argument):
//!
//! * `expand` (default): A = (1/(N·R)) Σ_n Σ_r u_{n,r} u_{n,r}ᵀ,
//!   B = Σ_n Σ_k Σ_r v_{n,k,r} v_{n,k,r}ᵀ;
//! * `reduce`: ū_n = (1/R) Σ_r u_{n,r}, v̄_{n,k} = Σ_r v_{n,k,r},
//!   A = (1/N) Σ_n ū_n ū_nᵀ, B = Σ_n Σ_k v̄_{n,k} v̄_{n,k}ᵀ.
//!
//! For Linear layers (R = 1) both are the same. The rows k are those of the
//! curvature kind: √Λ (type-2 / KFLR), scaled MC gradients, or ∇_f ℓ (EF).
//! Blocks: weight `[B, A]` (a 1 × 1 weight: `[B·A]`), bias `[B]`.
//!
//! A grouped convolution (G groups) takes A from its patches averaged over
//! the groups, ū_{n,r} = (1/G) Σ_g u_{n,g,r} of length in_c/G·kh·kw, and B
//! over all output channels (curvlinops' convention). Any other
//! parameterized op (BatchNorm's scale and shift) has one block per tensor
//! holding a single 1-D factor: the exact diagonal of the same curvature.

use std::str::FromStr;

use super::diag::{diag_part, DiagPart};
use super::selection::{LayerSelection, Selected};
use crate::engine::AffineView;
use crate::error::{bail, Error, Result};
use crate::tensor::{self, Mm, Tensor};

/// How Conv2d weight-sharing positions enter the factors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum KfacApprox {
    /// Every spatial position is a data point of the factors (KFAC-expand).
    #[default]
    Expand,
    /// Positions are summed (inputs averaged) first (KFAC-reduce).
    Reduce,
}

impl FromStr for KfacApprox {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "expand" => Ok(KfacApprox::Expand),
            "reduce" => Ok(KfacApprox::Reduce),
            other => bail!(Invalid, "unknown KFAC approximation {other:?} (expected expand or reduce)"),
        }
    }
}

/// `scale · X Xᵀ` for X `(rows, cols)`: a symmetric rank-k update (half a
/// product, scaled in place) when the factor is large enough for that to
/// pay, a plain product otherwise.
fn gram_rows(x: &Tensor, scale: f64) -> Result<Tensor> {
    if x.dim(0)? >= SYRK_MIN_DIM {
        crate::linalg::gram_rows(x, scale)
    } else {
        let g = x.mm(&x.t()?)?;
        Ok(if scale == 1.0 { g } else { (g * scale)? })
    }
}

/// Smallest factor dimension computed by a triangular rank-k update.
const SYRK_MIN_DIM: usize = 64;

/// The input factor A `(I, I)`.
pub fn input_factor(u: &Tensor, n_data: usize, approx: KfacApprox) -> Result<Tensor> {
    let (m, i, r) = u.dims3()?;
    let scale = 1.0
        / match approx {
            KfacApprox::Expand => n_data * r,
            KfacApprox::Reduce => n_data,
        } as f64;
    if r == 1 {
        // Linear: U as (M, I), A ∝ Uᵀ U.
        return gram_rows(&u.reshape((m, i))?.t()?, scale);
    }
    // U with the patch axis first, (I, M, R): free when the layer keeps
    // it that way (Conv2d does), a copy otherwise.
    let uimr = tensor::contiguous(&u.transpose(0, 1)?)?;
    match approx {
        // Σ_n Σ_r u uᵀ: every (n, r) is a column.
        KfacApprox::Expand => gram_rows(&uimr.reshape((i, m * r))?, scale),
        // ū_n = (1/R) Σ_r u_{n,r}: (I, M).
        KfacApprox::Reduce => gram_rows(&(uimr.sum(2)? / r as f64)?, scale),
    }
}

/// The output factor B `(O, O)`.
pub fn output_factor(v: &Tensor, approx: KfacApprox) -> Result<Tensor> {
    let (m, k, o, r) = v.dims4()?;
    match approx {
        _ if r == 1 => gram_rows(&v.reshape((m * k, o))?.t()?, 1.0),
        // Σ_n Σ_k Σ_r v vᵀ: the Gram matrix of the columns of the M·K blocks (O, R).
        KfacApprox::Expand => crate::linalg::gram_of_blocks(&v.reshape((m * k, o, r))?),
        KfacApprox::Reduce => gram_rows(&tensor::sum_dim(v, 3)?.reshape((m * k, o))?.t()?, 1.0),
    }
}

/// One layer's KFAC, summed over chunks of output rows (see
/// `Curvature::kron`): what depends on the rows (B, and the exact diagonals
/// of ops that are not Kronecker factored) adds up over the chunks; A is the
/// inputs' alone and is formed once, with the first chunk.
pub(crate) enum LayerKfac {
    /// A `(I, I)` (one-hot patches: its diagonal `(V,)`) and B `(O, O)`.
    Factored {
        a: Tensor,
        b: Tensor,
        /// How B is formed: the layer's approximation (`expand` for one-hot patches).
        b_approx: KfacApprox,
        /// A 1 × 1 weight, whose single block is the product B·A.
        scalar_weight: bool,
        has_bias: bool,
    },
    /// The exact diagonals of the weight and the bias (ops that are not
    /// Kronecker factored: BatchNorm's scale and shift), summed over chunks
    /// as the diagonal curvature sums them.
    Diagonal(DiagPart),
}

impl LayerKfac {
    /// The first chunk's share: A and B, or the diagonals.
    pub(crate) fn new(view: &AffineView, n_data: usize, approx: KfacApprox, chunk_elems: usize) -> Result<Self> {
        let has_bias = view.affine.has_bias();
        if !view.affine.kron_factored() {
            return Ok(LayerKfac::Diagonal(exact_diagonals(view, chunk_elems)?));
        }
        let (o, i, _) = view.affine.affine_dims();
        let scalar_weight = o == 1 && i == 1;
        if let Some(oh) = view.one_hot() {
            // One-hot patches (Embedding): A = diag(a), a_v = (1/(N·R)) · #{(n, r): id = v},
            // with B as for `expand`, whichever the approximation.
            let mut counts = vec![0.0; oh.vocab];
            for id in oh.ids.iter().flatten() {
                counts[*id] += 1.0;
            }
            let r = oh.positions as f64;
            let s = &view.sensitivities;
            let a = tensor::from_f64(counts.iter().map(|c| c / (n_data as f64 * r)).collect(), &[oh.vocab], s.dtype(), s.device())?;
            let b = output_factor(s, KfacApprox::Expand)?;
            return Ok(LayerKfac::Factored { a, b, b_approx: KfacApprox::Expand, scalar_weight, has_bias });
        }
        let groups = view.groups();
        let patches = if groups > 1 {
            // ū = (1/G) Σ_g u_g, averaged over the G groups of U's rows. Summed
            // as (G, I·M·R) over its leading axis: Conv2d keeps U as a
            // contiguous (G·I, M, R) buffer, so this reads it in place, where
            // a (M, G, I, R) view needed a copy and a strided reduction.
            let u = view.patches()?;
            let (m, gi, r) = u.dims3()?;
            let rows_first = u.transpose(0, 1)?.contiguous()?.reshape((groups, gi / groups * m * r))?;
            let mean = (tensor::sum_dim(&rows_first, 0)? / groups as f64)?;
            mean.reshape((gi / groups, m, r))?.transpose(0, 1)?
        } else {
            view.patches()?
        };
        let a = input_factor(&patches, n_data, approx)?;
        let b = output_factor(&view.sensitivities, approx)?;
        Ok(LayerKfac::Factored { a, b, b_approx: approx, scalar_weight, has_bias })
    }

    /// A later chunk's share added: B, or the diagonals.
    pub(crate) fn add(&mut self, view: &AffineView, chunk_elems: usize) -> Result<()> {
        match self {
            LayerKfac::Factored { b, b_approx, .. } => *b = (&*b + output_factor(&view.sensitivities, *b_approx)?)?,
            LayerKfac::Diagonal(sum) => sum.add(exact_diagonals(view, chunk_elems)?)?,
        }
        Ok(())
    }

    /// The layer's blocks, each tagged "is the bias": weight `[B, A]` (or
    /// `[B·A]` when 1 × 1), then bias `[B]`; for ops that are not
    /// Kronecker factored, one 1-D exact-diagonal block per tensor.
    pub(crate) fn into_blocks(self) -> Result<Vec<(bool, Vec<Tensor>)>> {
        let mut blocks = Vec::with_capacity(2);
        match self {
            LayerKfac::Factored { a, b, scalar_weight, has_bias, .. } => {
                blocks.push((false, if scalar_weight { vec![(&b * &a)?] } else { vec![b.clone(), a] }));
                if has_bias {
                    blocks.push((true, vec![b]));
                }
            }
            LayerKfac::Diagonal(sum) => {
                let (weight, bias) = sum.finish()?;
                blocks.push((false, vec![weight.expect("the weight is selected")]));
                blocks.extend(bias.map(|b| (true, vec![b])));
            }
        }
        Ok(blocks)
    }
}

/// The exact curvature diagonals of a layer's weight and bias, from this
/// chunk of rows.
fn exact_diagonals(view: &AffineView, chunk_elems: usize) -> Result<DiagPart> {
    let all = LayerSelection { weight: Some(Selected::All), bias: view.affine.has_bias().then_some(Selected::All) };
    diag_part(view, &all, chunk_elems)
}
