//! Curvature of a network's loss: laplace-torch's `CurvatureInterface`,
//! `GGNInterface` and `EFInterface` in one object.
//!
//! | method                  | returns                                        | shape          |
//! |-------------------------|------------------------------------------------|----------------|
//! | `jacobians`             | J[n, c, p] = ∂f_c(x_n)/∂θ_p, and f             | (M, C, P), (M, C) |
//! | `last_layer_jacobians`  | the same for the final Linear layer            | (M, C, P_ll)   |
//! | `gradients`             | G_n = ∇_θ ℓ(f(x_n), y_n), and Σ_n ℓ_n         | (M, P), (1,)   |
//! | `full`                  | Σ_n ℓ_n and H = Σ_n J_nᵀ Λ̃_n J_n                | (1,), (P, P)   |
//! | `diag`                  | Σ_n ℓ_n and diag(H)                            | (1,), (P,)     |
//!
//! with Λ̃_n = Λ_n (GGN), its Monte-Carlo estimate (1/S) Σ_s g_s g_sᵀ
//! (Fisher), or ∇_f ℓ_n ∇_f ℓ_nᵀ (empirical Fisher, H = Σ_n G_n G_nᵀ).
//! All of them are Gram matrices Σ_{n,k} g_{n,k} g_{n,k}ᵀ of per-sample
//! gradients g_{n,k} = J_nᵀ r_{n,k} for K output rows r_{n,k} with
//! Σ_k r_{n,k} r_{n,k}ᵀ = Λ̃_n; the rows are pushed back through the network
//! by the [`crate::engine`] and each layer turns them into its share.
//! P counts the selected parameters ([`Subset`]).

mod batch_grad;
mod batching;
mod diag;
pub mod kfac;
mod last_layer;
mod over_data;
mod products;
mod selection;

pub use batching::{auto_batch_bytes, BatchSize, PerPoint, MIN_UPDATE_ROWS};
pub use kfac::KfacApprox;
pub use selection::{LayerSelection, ParamSelection, Selected, SelectedTensor, Subset};

use std::str::FromStr;

use crate::distributed::Communicator;
use crate::engine::{self, Tape};
use crate::inputs::Inputs;
use crate::kron::Kron;
use crate::error::{bail, Error, Result};
use crate::likelihood::Likelihood;
use crate::model::Sequential;
use crate::pass::Monitor;
use crate::tensor::Tensor;

/// Which curvature: GGN, Monte-Carlo Fisher or empirical Fisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CurvatureKind {
    /// Exact generalized Gauss-Newton (= Fisher for these likelihoods).
    Ggn,
    /// Monte-Carlo Fisher with `samples` draws ỹ ~ p(y | f) per point.
    FisherMc {
        /// Targets drawn per point from p(y | f).
        samples: usize,
        /// Seed of the per-point random streams.
        seed: u64,
    },
    /// Empirical Fisher Σ_n G_n G_nᵀ.
    Ef,
    /// The exact Hessian ∇²_θ Σ_n ℓ_n (second-order terms included).
    Hessian,
}

impl FromStr for CurvatureKind {
    type Err = Error;
    /// `ggn`, `fisher-mc` (1 sample, seed 0; set them on the value), `ef`, `hessian`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ggn" => Ok(CurvatureKind::Ggn),
            "fisher-mc" | "fisher" => Ok(CurvatureKind::FisherMc { samples: 1, seed: 0 }),
            "ef" => Ok(CurvatureKind::Ef),
            "hessian" => Ok(CurvatureKind::Hessian),
            other => bail!(Invalid, "unknown curvature {other:?} (expected ggn, fisher-mc, ef or hessian)"),
        }
    }
}

/// A batch of data: inputs, targets, and the position of its first point
/// in the data set (which seeds the Monte-Carlo streams, so that MC results
/// do not depend on how the data set is batched).
#[derive(Clone, Debug)]
pub struct Batch {
    /// Inputs of the batch `(M, *input_shape)` (or one array per named input).
    pub x: Inputs,
    /// Targets: int64 class indices `(M,)` or floats `(M, C)`.
    pub y: Tensor,
    /// Global index of the batch's first point (keys the Monte-Carlo streams).
    pub offset: usize,
}

impl Batch {
    /// A batch at offset 0.
    pub fn new(x: impl Into<Inputs>, y: Tensor) -> Self {
        Batch { x: x.into(), y, offset: 0 }
    }
}

/// Curvature of `model`'s loss under `likelihood`, for a parameter subset.
pub struct Curvature<'m> {
    model: &'m Sequential,
    subset: Subset,
    likelihood: Likelihood,
    kind: CurvatureKind,
    selection: ParamSelection,
    /// Bound on the elements of per-chunk temporaries (per-sample gradients
    /// of a batch chunk): the memory knob of `full` and `diag`.
    chunk_elems: usize,
    /// Told about every pass over a data set (`*_over`, the curvature operator).
    monitor: &'m dyn Monitor,
    /// The processes the data set is split over; every pass over a data set
    /// combines its part with theirs ([`crate::distributed`]).
    comm: &'m dyn Communicator,
}

/// Default bound on temporaries: 2^24 elements (128 MiB in f64).
const DEFAULT_CHUNK_ELEMS: usize = 1 << 24;

impl<'m> Curvature<'m> {
    /// The curvature `kind` of `likelihood` for `model`, over the parameters of `subset`.
    pub fn new(model: &'m Sequential, likelihood: Likelihood, kind: CurvatureKind, subset: &Subset) -> Result<Self> {
        if let CurvatureKind::FisherMc { samples, .. } = kind {
            if samples == 0 {
                bail!(Invalid, "the Monte-Carlo Fisher needs at least one sample");
            }
            // One point's K = samples output rows travel back through every
            // value of the graph and become K per-sample gradients of its
            // P parameters; the backward pass holds about three such
            // temporaries at once. Batches shrink to one point, no further.
            let (w, p) = (model.widest_value(), model.n_params());
            crate::budget::check(
                &format!("--samples {samples} (Monte-Carlo Fisher, one point: 3 × {samples} rows × ({w} values of the widest layer + {p} parameters))"),
                &[3, samples, w.saturating_add(p)],
                model.dtype().size_in_bytes(),
            )?;
        }
        Ok(Curvature {
            model,
            subset: subset.clone(),
            likelihood,
            kind,
            selection: ParamSelection::new(model, subset)?,
            chunk_elems: DEFAULT_CHUNK_ELEMS,
            monitor: &crate::pass::SILENT,
            comm: &crate::distributed::SINGLE_PROCESS,
        })
    }

    /// Report passes over data sets to `monitor` (progress; it may stop them).
    pub fn with_monitor(mut self, monitor: &'m dyn Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// The monitor of passes over data sets.
    pub fn monitor(&self) -> &'m dyn Monitor {
        self.monitor
    }

    /// Combine every pass over a data set (`*_over`, the curvature operator)
    /// across the ranks of `comm`: the data set given to a pass is then this
    /// rank's shard (rank r holds the r-th contiguous block of points), and the
    /// pass returns the result of the whole data set on every rank.
    pub fn with_communicator(mut self, comm: &'m dyn Communicator) -> Self {
        self.comm = comm;
        self
    }

    /// The processes passes over data sets are combined across.
    pub fn communicator(&self) -> &'m dyn Communicator {
        self.comm
    }

    /// Bound the temporaries of `full` and `diag` to about `elems` elements.
    pub fn with_chunk_elems(mut self, elems: usize) -> Self {
        self.chunk_elems = elems.max(1);
        self
    }

    /// The model whose curvature this is.
    pub fn model(&self) -> &Sequential {
        self.model
    }

    /// The loss.
    pub fn likelihood(&self) -> Likelihood {
        self.likelihood
    }

    /// GGN, Fisher, EF or Hessian.
    pub fn kind(&self) -> CurvatureKind {
        self.kind
    }

    /// The parameters asked for.
    pub fn subset(&self) -> &Subset {
        &self.subset
    }

    /// The resolved selection of parameter coordinates (θ order and output order).
    pub fn selection(&self) -> &ParamSelection {
        &self.selection
    }

    /// Number of parameters the quantities are computed for.
    pub fn n_params(&self) -> usize {
        self.selection.len()
    }

    /// Jacobians J `(M, C, P)` of the outputs with respect to the selected
    /// parameters, and the outputs f `(M, C)`.
    pub fn jacobians(&self, x: impl Into<Inputs>) -> Result<(Tensor, Tensor)> {
        jacobians_for(self.model, &self.selection, &x.into(), self.chunk_elems)
    }

    /// Jacobians with respect to the final Linear layer only `(M, C, C·D [+ C])`,
    /// computed from its input features φ alone, and f.
    pub fn last_layer_jacobians(&self, x: impl Into<Inputs>) -> Result<(Tensor, Tensor)> {
        let sel = ParamSelection::new(self.model, &Subset::LastLayer)?;
        jacobians_for(self.model, &sel, &x.into(), self.chunk_elems)
    }

    /// The Jacobians' selection: this curvature's, or the final Linear
    /// layer's with `last_layer`.
    pub(crate) fn jacobian_selection(&self, last_layer: bool) -> Result<std::borrow::Cow<'_, ParamSelection>> {
        Ok(if last_layer {
            std::borrow::Cow::Owned(ParamSelection::new(self.model, &Subset::LastLayer)?)
        } else {
            std::borrow::Cow::Borrowed(&self.selection)
        })
    }

    /// Per-sample gradients G `(M, P)` of ℓ(f(x_n), y_n), and Σ_n ℓ_n `(1,)`.
    pub fn gradients(&self, x: impl Into<Inputs>, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = &x.into();
        let m = x.len();
        if self.gradient_chunk(m) >= m {
            return self.gradients_chunk(x, y);
        }
        let mut out = Tensor::zeros((m, self.selection.len()), self.model.dtype(), self.model.device())?;
        let loss = self.gradients_into(x, y, &mut out, 0)?;
        Ok((self.finish_gradients(out)?, loss))
    }

    /// Samples per chunk of a gradient pass over `m` samples: as many
    /// `(·, P)` rows as `chunk_elems` holds.
    fn gradient_chunk(&self, m: usize) -> usize {
        (self.chunk_elems / self.selection.len().max(1)).clamp(1, m.max(1))
    }

    /// The per-sample gradients of `x` written into rows `row0..row0 + M`
    /// of `out (·, P)` (selection order, unchecked: see
    /// [`finish_gradients`](Self::finish_gradients)), a chunk of samples at
    /// a time; returns their Σ_n ℓ_n `(1,)`. A pass over data writes every
    /// batch into one result this way, with no per-batch copy.
    pub(crate) fn gradients_into(&self, x: &Inputs, y: &Tensor, out: &mut Tensor, row0: usize) -> Result<Tensor> {
        let m = x.len();
        let chunk = self.gradient_chunk(m);
        let y = self.targets(y, x)?;
        let mut loss: Option<Tensor> = None;
        let mut start = 0;
        while start < m {
            let len = chunk.min(m - start);
            let tape = engine::forward(self.model, &x.narrow(start, len)?, self.selection.active())?;
            let yc = y.narrow(0, start, len)?;
            let l = self.likelihood.loss(&tape.output, &yc)?;
            let rows = self.likelihood.gradient(&tape.output, &yc)?.unsqueeze(1)?;
            batch_grads_into(self.model, &self.selection, &tape, rows, out, row0 + start)?;
            loss = crate::pass::accumulate(loss, l, |a, b| Ok((a + b)?))?;
            start += len;
        }
        Ok(loss.expect("at least one sample"))
    }

    /// Gradients written by [`gradients_into`](Self::gradients_into), in θ
    /// order and checked finite.
    pub(crate) fn finish_gradients(&self, g: Tensor) -> Result<Tensor> {
        check_finite(self.selection.reorder(g, 1)?, "gradients")
    }

    fn gradients_chunk(&self, x: &Inputs, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let y = self.targets(y, x)?;
        let tape = engine::forward(self.model, x, self.selection.active())?;
        let loss = self.likelihood.loss(&tape.output, &y)?;
        let rows = self.likelihood.gradient(&tape.output, &y)?.unsqueeze(1)?;
        let g = batch_grads(self.model, &self.selection, &tape, rows)?.squeeze(1)?;
        Ok((self.finish_gradients(g)?, loss))
    }

    /// Σ_n ℓ_n `(1,)` and the dense curvature H `(P, P)`, accumulated from
    /// per-sample gradients a chunk of samples at a time.
    pub fn full(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let mut sum = self.full_sum()?;
        let loss = self.add_full(batch, &mut sum)?;
        Ok((loss, self.finish_full(sum)?))
    }

    /// An empty full-curvature sum for the kernel this curvature uses:
    /// one for a whole pass over data, so that its batches add into one
    /// `(P, P)` matrix instead of building one each.
    pub(crate) fn full_sum(&self) -> Result<FullSum> {
        self.check_full_size()?;
        let p = self.selection.len();
        let matrix = || Tensor::zeros((p, p), self.model.dtype(), self.model.device());
        if self.kind == CurvatureKind::Hessian {
            return Ok(FullSum::Matrix { h: matrix()?, kernel: MatrixKernel::HessianProducts });
        }
        if *self.subset() == Subset::LastLayer {
            if let Some(last) = last_layer::applies(self)? {
                return Ok(FullSum::Matrix { h: matrix()?, kernel: MatrixKernel::LastLayer(last) });
            }
        }
        Ok(FullSum::Gram(crate::linalg::GramAccumulator::new(p, self.model.dtype())))
    }

    /// Add the batch's curvature to `sum`; returns its Σ_n ℓ_n `(1,)`.
    pub(crate) fn add_full(&self, batch: &Batch, sum: &mut FullSum) -> Result<Tensor> {
        match sum {
            FullSum::Matrix { h, kernel: MatrixKernel::HessianProducts } => {
                // Hessian-vector products with identity columns, a block at a time.
                let p = self.selection.len();
                let (loss, hb) = products::full_by_products(self, batch, p.min(64))?;
                crate::tensor::add_assign(h, &hb)?;
                Ok(loss)
            }
            FullSum::Matrix { h, kernel: MatrixKernel::LastLayer(last) } => last_layer::add_full(self, batch, *last, h),
            FullSum::Gram(gram) => {
                let m = batch.x.len();
                let p = self.selection.len();
                let chunk = (self.chunk_elems / (self.rows_per_point() * p).max(1)).clamp(1, m.max(1));
                let targets = self.targets(&batch.y, &batch.x)?;
                let mut loss = Tensor::zeros(1, self.model.dtype(), self.model.device())?;
                let mut start = 0;
                while start < m {
                    let len = chunk.min(m - start);
                    let (x, y) = (batch.x.narrow(start, len)?, targets.narrow(0, start, len)?);
                    let tape = engine::forward(self.model, &x, self.selection.active())?;
                    loss = (loss + self.likelihood.loss(&tape.output, &y)?)?;
                    let rows = self.output_rows(&tape.output, &y, batch.offset + start)?;
                    let k = rows.dim(1)?;
                    // H += Aᵀ A, A = the (len·K, P) stacked per-sample gradients.
                    gram.add(&batch_grads(self.model, &self.selection, &tape, rows)?.reshape((len * k, p))?)?;
                    start += len;
                }
                Ok(loss)
            }
        }
    }

    /// The summed H `(P, P)`, in θ order and checked finite.
    pub(crate) fn finish_full(&self, sum: FullSum) -> Result<Tensor> {
        match sum {
            FullSum::Matrix { h, kernel: MatrixKernel::HessianProducts } => check_finite(h, "Hessian"),
            FullSum::Matrix { h, kernel: MatrixKernel::LastLayer(_) } => check_finite(h, "curvature"),
            FullSum::Gram(gram) => {
                let h = gram.finish(1.0, self.model.dtype(), self.model.device())?;
                check_finite(self.selection.reorder(self.selection.reorder(h, 0)?, 1)?, "curvature")
            }
        }
    }

    /// Σ_n ℓ_n `(1,)` and the diagonal of H `(P,)`, without per-sample
    /// gradients of the whole network.
    pub fn diag(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        if self.kind == CurvatureKind::Hessian {
            let (loss, d) = products::hessian_diag(self, batch)?;
            return Ok((loss, check_finite(d, "Hessian diagonal")?));
        }
        let y = self.targets(&batch.y, &batch.x)?;
        let tape = engine::forward(self.model, &batch.x, self.selection.active())?;
        let loss = self.likelihood.loss(&tape.output, &y)?;
        let rows = self.output_row_source(&tape.output, &y, batch.offset)?;
        let mut layers = std::collections::HashMap::new();
        self.backward_in_row_chunks(&tape, rows, |view, first| {
            if let Some(sel) = self.selection.layer(view.layer) {
                let part = diag::diag_part(&view, sel, self.chunk_elems)?;
                if first {
                    layers.insert(view.layer, part);
                } else if let Some(sum) = layers.get_mut(&view.layer) {
                    sum.add(part)?;
                }
            }
            Ok(())
        })?;
        let mut parts = std::collections::HashMap::new();
        for (layer, part) in layers {
            let (w, b) = part.finish()?;
            parts.extend(w.map(|w| ((layer, false), w)));
            parts.extend(b.map(|b| ((layer, true), b)));
        }
        let (dt, dev) = (self.model.dtype(), self.model.device());
        let parts = self.selection.in_theta_order(self.model, parts, |t| Ok(Tensor::zeros(t.len, dt, dev)?))?;
        let d = self.selection.reorder(Tensor::cat(&parts, 0)?, 0)?;
        Ok((loss, check_finite(d, "curvature diagonal")?))
    }

    /// Σ_n ℓ_n `(1,)` and the Kronecker-factored curvature (KFAC): one block
    /// per parameter tensor, with A normalized by `n_data` (the number of
    /// points of the whole data set, so that sums over batches add up).
    pub fn kron(&self, batch: &Batch, n_data: usize, approx: KfacApprox) -> Result<(Tensor, Kron)> {
        if n_data == 0 {
            bail!(Invalid, "KFAC needs the number of data points N ≥ 1");
        }
        if self.kind == CurvatureKind::Hessian {
            bail!(Invalid, "the exact Hessian has no Kronecker factorization (use ggn, fisher-mc or ef for kron)");
        }
        if !self.selection.whole_tensors() {
            bail!(
                Invalid,
                "KFAC is defined per parameter tensor; a subnetwork of single coordinates has no Kronecker \
                 factors (use the full or diagonal structure)"
            );
        }
        let y = self.targets(&batch.y, &batch.x)?;
        let tape = engine::forward(self.model, &batch.x, self.selection.active())?;
        let loss = self.likelihood.loss(&tape.output, &y)?;
        let rows = self.output_row_source(&tape.output, &y, batch.offset)?;
        let mut layers = std::collections::HashMap::new();
        self.backward_in_row_chunks(&tape, rows, |view, first| {
            if self.selection.layer(view.layer).is_some() {
                if first {
                    layers.insert(view.layer, kfac::LayerKfac::new(&view, n_data, approx, self.chunk_elems)?);
                } else if let Some(layer) = layers.get_mut(&view.layer) {
                    layer.add(&view, self.chunk_elems)?;
                }
            }
            Ok(())
        })?;
        let mut blocks = std::collections::HashMap::new();
        for (layer, factors) in layers {
            let transposed = self.model.nodes()[layer].op.affine().is_some_and(|a| a.weight_layout() == crate::nn::WeightLayout::InOut);
            for (is_bias, mut block) in factors.into_blocks()? {
                // W stored (I, O): [B, A] on W (O, I) is [A, B] on the stored tensor.
                if transposed && !is_bias && block.len() == 2 {
                    block.swap(0, 1);
                }
                blocks.insert((layer, is_bias), block);
            }
        }
        let (dt, dev) = (self.model.dtype(), self.model.device());
        let kron = Kron::new(self.selection.in_theta_order(self.model, blocks, |t| Ok(vec![Tensor::zeros(t.len, dt, dev)?]))?)?;
        for (b, fs) in kron.blocks.iter().enumerate() {
            for f in fs {
                check_finite(f.clone(), &format!("Kronecker factors of block {b}"))?;
            }
        }
        Ok((loss, kron))
    }

    /// The parameter names of each block of [`Curvature::kron`], in block
    /// order (one tensor per block): the `kron_blocks` metadata of outputs.
    pub fn kron_block_names(&self) -> Vec<Vec<String>> {
        let params = self.model.params();
        self.selection
            .tensors(self.model)
            .iter()
            .map(|t| {
                let p = params.iter().find(|p| p.layer == t.layer && p.is_bias() == t.is_bias).expect("a selected tensor");
                vec![p.name.clone()]
            })
            .collect()
    }

    /// Products with K directions: `v (K, P)` → Σ_n ℓ_n `(1,)` and `(K, P)`,
    /// row k = H v_k for the curvature H of this kind (the exact Hessian by
    /// Pearlmutter's R-operator, the others as J ᵀ Λ̃ J v), never forming H.
    pub fn matmat(&self, batch: &Batch, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (loss, hv) = products::matmat(self, batch, v)?;
        Ok((loss, check_finite(hv, "curvature-vector products")?))
    }

    /// Refuse a dense `(P, P)` result that does not fit the memory budget.
    pub fn check_full_size(&self) -> Result<()> {
        let p = self.selection.len();
        let what = match self.kind {
            CurvatureKind::Ggn => "GGN",
            CurvatureKind::FisherMc { .. } => "Fisher",
            CurvatureKind::Ef => "empirical Fisher",
            CurvatureKind::Hessian => "Hessian",
        };
        crate::budget::check(&format!("full {what} for P = {p}"), &[p, p], self.model.dtype().size_in_bytes())
    }

    /// The backward pass of the output rows `rows (M, K, C)`, in chunks of
    /// rows: `visit(view, first)` at every parameterized node of every
    /// chunk, `first` for the first chunk. The diagonals and KFAC's B are
    /// sums over the K rows, so the chunks' shares add up; what does not
    /// depend on the rows is formed once (KFAC's A with the first chunk, a
    /// Linear weight's product of Σ_k V² with U² after the last).
    ///
    /// A pass holds about three sensitivities `(M, K, W)` at its widest node
    /// output W: with many rows per point (the exact GGN has K = C) and
    /// feature maps (W in the thousands), or many outputs (K = C = 100),
    /// the largest buffers of the whole computation, each of them fresh
    /// memory. A chunk of K_c rows holds M·K_c·W ≤ `chunk_elems / 4` of them
    /// instead (the fewest such chunks, their sizes evened out). The exact
    /// GGN's rows are formed a chunk at a time ([`OutputRows::SqrtHessian`]);
    /// rows formed whole (Monte-Carlo samples) are copied per chunk
    /// (M·K_c·C), so where W < 8·C that copy is as large as what chunking
    /// saves, and all K go back at once.
    fn backward_in_row_chunks(&self, tape: &engine::Tape, rows: OutputRows<'_>, mut visit: impl FnMut(engine::AffineView<'_>, bool) -> Result<()>) -> Result<()> {
        let (m, k, c) = rows.dims()?;
        let model = self.model;
        let widest = model.widest_node_output();
        let most = ((self.chunk_elems / 4) / m.saturating_mul(widest).max(1)).clamp(1, k.max(1));
        // the fewest chunks of at most `most` rows, evened out (10 rows, at most 8: 5 + 5, not 8 + 2)
        let chunk = k.div_ceil(k.div_ceil(most).max(1)).max(1);
        let copies = matches!(rows, OutputRows::Formed(_));
        if chunk >= k || (copies && widest < 8 * c) {
            return engine::backward(model, tape, rows.range(0..k)?, |view| visit(view, true));
        }
        for start in (0..k).step_by(chunk) {
            let len = chunk.min(k - start);
            engine::backward(model, tape, rows.range(start..start + len)?, |view| visit(view, start == 0))?;
        }
        Ok(())
    }

    /// The bound on temporaries, in elements.
    pub(crate) fn chunk_elems(&self) -> usize {
        self.chunk_elems
    }

    /// Number of output rows K per data point for this kind.
    fn rows_per_point(&self) -> usize {
        match self.kind {
            CurvatureKind::Ggn | CurvatureKind::Hessian => self.model.n_outputs(),
            CurvatureKind::FisherMc { samples, .. } => samples,
            CurvatureKind::Ef => 1,
        }
    }

    /// The output rows of `output_rows`, as a source of any range of them:
    /// the exact GGN's are formed a range at a time, the others whole.
    fn output_row_source<'f>(&self, f: &'f Tensor, y: &Tensor, offset: usize) -> Result<OutputRows<'f>> {
        Ok(match self.kind {
            CurvatureKind::Ggn | CurvatureKind::Hessian => OutputRows::SqrtHessian(self.likelihood, f),
            CurvatureKind::FisherMc { .. } | CurvatureKind::Ef => OutputRows::Formed(self.output_rows(f, y, offset)?),
        })
    }

    /// Output rows `(M, K, C)` whose Gram matrix per point is Λ̃_n.
    pub(crate) fn output_rows(&self, f: &Tensor, y: &Tensor, offset: usize) -> Result<Tensor> {
        match self.kind {
            CurvatureKind::Ggn | CurvatureKind::Hessian => self.likelihood.sqrt_hessian(f),
            CurvatureKind::FisherMc { samples, seed } => self.likelihood.sampled_gradients(f, samples, seed, offset),
            CurvatureKind::Ef => Ok(self.likelihood.gradient(f, y)?.unsqueeze(1)?),
        }
    }

    /// Checked targets for the inputs `x`.
    pub(crate) fn targets(&self, y: &Tensor, x: &Inputs) -> Result<Tensor> {
        self.model.check_input(x)?;
        let m = x.len();
        self.likelihood.prepare_targets(y, m, self.model.n_outputs(), self.model.dtype())
    }
}

/// The output rows `(M, K, C)` a backward pass pulls back, whole or a range
/// of rows at a time (see [`Curvature::backward_in_row_chunks`]).
enum OutputRows<'f> {
    /// Rows of the likelihood's square root of Λ at the outputs `f (M, C)`
    /// (the exact GGN: K = C), formed only when asked for.
    SqrtHessian(Likelihood, &'f Tensor),
    /// Rows formed whole (Monte-Carlo samples, the empirical Fisher's gradients).
    Formed(Tensor),
}

impl OutputRows<'_> {
    /// (M, K, C): points, rows per point, outputs.
    fn dims(&self) -> Result<(usize, usize, usize)> {
        Ok(match self {
            OutputRows::SqrtHessian(_, f) => {
                let (m, c) = f.dims2()?;
                (m, c, c)
            }
            OutputRows::Formed(rows) => (rows.dim(0)?, rows.dim(1)?, rows.dims()[2..].iter().product()),
        })
    }

    /// Rows `range` of every point, `(M, range.len(), C)` (contiguous).
    fn range(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        Ok(match self {
            OutputRows::SqrtHessian(likelihood, f) => likelihood.sqrt_hessian_rows(f, range)?,
            OutputRows::Formed(rows) if range.start == 0 && range.end == rows.dim(1)? => rows.clone(),
            OutputRows::Formed(rows) => rows.narrow(1, range.start, range.len())?.contiguous()?,
        })
    }
}

/// A full curvature being summed over batches (see [`Curvature::full_sum`]).
pub(crate) enum FullSum {
    /// The lower triangle of Σ Aᵀ A over the stacked per-sample gradients
    /// (the general kernel), in selection order.
    Gram(crate::linalg::GramAccumulator),
    /// A θ-ordered `(P, P)` sum that batches add into in place.
    Matrix { h: Tensor, kernel: MatrixKernel },
}

/// The kernels that add into a [`FullSum::Matrix`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum MatrixKernel {
    /// Hessian-vector products with identity columns.
    HessianProducts,
    /// The last-layer curvature from its features (the final Linear node).
    LastLayer(usize),
}

/// Jacobians over a selection: identity rows pushed back, a chunk of
/// samples at a time written into the output, so that temporaries stay
/// within `chunk_elems` beyond the `(M, C, P)` result itself.
fn jacobians_for(model: &Sequential, sel: &ParamSelection, x: &Inputs, chunk_elems: usize) -> Result<(Tensor, Tensor)> {
    let m = x.len();
    let c = model.n_outputs();
    if jacobian_chunk(model, sel, chunk_elems, m) >= m {
        return jacobians_chunk(model, sel, x);
    }
    let mut out = Tensor::zeros((m * c, sel.len()), model.dtype(), model.device())?;
    let f = jacobians_into(model, sel, x, chunk_elems, &mut out, 0)?;
    Ok((finish_jacobians(sel, out, m, c)?, f))
}

/// Samples per chunk of a Jacobian pass over `m` samples: as many
/// `(C, P)` blocks as `chunk_elems` holds.
fn jacobian_chunk(model: &Sequential, sel: &ParamSelection, chunk_elems: usize, m: usize) -> usize {
    (chunk_elems / (model.n_outputs() * sel.len()).max(1)).clamp(1, m.max(1))
}

/// The Jacobians of `x` written into rows `row0·C..(row0 + M)·C` of `out
/// (·, P)` (selection order, unchecked: see [`finish_jacobians`]), a chunk
/// of samples at a time; returns the outputs f `(M, C)`. A pass over data
/// writes every batch into one result this way, with no per-batch copy.
pub(crate) fn jacobians_into(model: &Sequential, sel: &ParamSelection, x: &Inputs, chunk_elems: usize, out: &mut Tensor, row0: usize) -> Result<Tensor> {
    let m = x.len();
    let c = model.n_outputs();
    let chunk = jacobian_chunk(model, sel, chunk_elems, m);
    let mut fs = Vec::new();
    let mut start = 0;
    while start < m {
        let len = chunk.min(m - start);
        let tape = engine::forward(model, &x.narrow(start, len)?, sel.active())?;
        let rows = identity_rows(len, c, model)?;
        batch_grads_into(model, sel, &tape, rows, out, (row0 + start) * c)?;
        fs.push(tape.output);
        start += len;
    }
    Ok(Tensor::cat(&fs, 0)?)
}

/// Jacobians written by [`jacobians_into`] as `(M·C, P)`: `(M, C, P)`, in
/// θ order and checked finite.
pub(crate) fn finish_jacobians(sel: &ParamSelection, j: Tensor, m: usize, c: usize) -> Result<Tensor> {
    check_finite(sel.reorder(j.reshape((m, c, sel.len()))?, 2)?, "Jacobians")
}

/// C identity rows for each of M points `(M, C, C)`.
fn identity_rows(m: usize, c: usize, model: &Sequential) -> Result<Tensor> {
    Ok(Tensor::eye(c, model.dtype(), model.device())?
        .unsqueeze(0)?
        .broadcast_as((m, c, c))?
        .contiguous()?)
}

fn jacobians_chunk(model: &Sequential, sel: &ParamSelection, x: &Inputs) -> Result<(Tensor, Tensor)> {
    let tape = engine::forward(model, x, sel.active())?;
    let (m, c) = tape.output.dims2()?;
    let j = batch_grads(model, sel, &tape, identity_rows(m, c, model)?)?;
    Ok((check_finite(sel.reorder(j, 2)?, "Jacobians")?, tape.output))
}

/// `(M, K, P)` per-sample gradients of the selected parameters for output rows `(M, K, C)`.
fn batch_grads(model: &Sequential, sel: &ParamSelection, tape: &Tape, rows: Tensor) -> Result<Tensor> {
    let (m, k) = (rows.dim(0)?, rows.dim(1)?);
    let mut out = Tensor::zeros((m * k, sel.len()), model.dtype(), model.device())?;
    batch_grads_into(model, sel, tape, rows, &mut out, 0)?;
    Ok(out.reshape((m, k, sel.len()))?)
}

/// The same, written into rows `row0..row0 + M·K` of `dst (·, P)` tensor by
/// tensor (no per-layer concatenation), in θ order.
fn batch_grads_into(model: &Sequential, sel: &ParamSelection, tape: &Tape, rows: Tensor, dst: &mut Tensor, row0: usize) -> Result<()> {
    let (m, k) = (rows.dim(0)?, rows.dim(1)?);
    let columns: std::collections::HashMap<(usize, bool), usize> =
        sel.tensors(model).iter().map(|t| ((t.layer, t.is_bias), t.column)).collect();
    engine::backward(model, tape, rows, |view| {
        if let Some(s) = sel.layer(view.layer) {
            // The weight's columns, then the bias's, each written in place.
            let (u, v) = (&view.patches()?, &view.sensitivities);
            let (_, gi, r) = u.dims3()?;
            let o = v.dim(2)?;
            let groups = view.groups();
            if let Some(w) = &s.weight {
                let col = columns[&(view.layer, false)];
                match w {
                    // Grouped layers: one batched product per (sample, group).
                    Selected::All if groups > 1 => {
                        let g = batch_grad::grouped_weight_grads(u, v, groups)?;
                        crate::tensor::write_block(dst, &g.reshape((m * k, o * gi / groups))?, row0, col)?
                    }
                    // Linear: outer products V[n, k] ⊗ U[n].
                    Selected::All if r == 1 => {
                        crate::tensor::write_outer_rows(dst, &v.reshape((m, k, o))?, &u.reshape((m, gi))?, row0, col)?
                    }
                    // Weight sharing: per-sample products V_{n,k} U_nᵀ.
                    Selected::All => crate::tensor::write_products_rows(dst, v, u, row0, col)?,
                    Selected::Some(ids) => {
                        let g = batch_grad::weight_grads(u, v, ids, groups)?;
                        crate::tensor::write_block(dst, &g.reshape((m * k, ids.len()))?, row0, col)?
                    }
                }
            }
            if let Some(b) = &s.bias {
                let g = batch_grad::bias_grads(v, b)?;
                crate::tensor::write_block(dst, &g.reshape((m * k, b.len(o)))?, row0, columns[&(view.layer, true)])?;
            }
        }
        Ok(())
    })
}

/// Refuse to return NaN or infinity.
fn check_finite(t: Tensor, what: &str) -> Result<Tensor> {
    if let Some(pos) = crate::tensor::first_non_finite(&t)? {
        bail!(
            NonFinite,
            "the {what} hold a non-finite value at index {:?} (overflow in the network or its inputs?)",
            crate::tensor::unravel(pos, t.dims())
        );
    }
    Ok(t)
}

