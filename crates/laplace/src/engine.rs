//! The propagation engine, in the style of BackPACK, over the model graph.
//!
//! A forward pass runs the nodes in order and keeps, for the *active* nodes
//! (those downstream of a selected parameter), what each needs for its
//! backward pass (a [`Tape`]). A backward pass starts from a batch of output
//! sensitivities `V (M, K, C)` and pulls it back node by node in reverse
//! order, `vⱼ ← Jⱼᵀ v` for every active input j, summing the contributions
//! where a value fans out to several nodes. At every node with parameters it
//! hands the visitor the node's patches U and its output sensitivities
//! reshaped to `(M, K, O, R)`; the visitor turns them into that node's share
//! of a quantity (per-sample gradients, a diagonal, Kronecker factors).
//! Nothing of size (M, C, P) is ever formed here.
//!
//! Every pass of the crate is one of three walks defined here: [`forward`],
//! [`backward_walk`] (reverse order, fan-out summed; the first-order
//! [`backward`], the R-operator's backward pass and the Hessian diagonal's
//! signed rows all run on it) and [`tangent_walk`] (forward-mode tangents of
//! the R-operator). A Sequential model is the chain graph, where no value
//! fans out and the walks reduce to the layer-by-layer loops.

use crate::error::Result;
use crate::inputs::Inputs;
use crate::model::Model;
use crate::nn::{AffineLayer, Saved};
use crate::tensor::Tensor;

/// What a forward pass kept for the backward passes.
pub struct Tape {
    saved: Vec<Option<Saved>>,
    active: Vec<bool>,
    /// The network output f `(M, C)`.
    pub output: Tensor,
}

impl Tape {
    /// What node `i` saved (`i` active).
    pub fn saved(&self, i: usize) -> &Saved {
        self.saved[i].as_ref().expect("the tape saves every active node")
    }

    /// Is node `i` downstream of a selected parameter?
    pub fn active(&self, i: usize) -> bool {
        self.active[i]
    }

    /// Which inputs of node `i` are active values (sensitivities flow back into them).
    pub fn needs(&self, model: &Model, i: usize) -> Vec<bool> {
        model.nodes()[i]
            .inputs
            .iter()
            .map(|&v| model.producer(v).is_some_and(|j| self.active[j]))
            .collect()
    }
}

/// One parameterized node as the backward pass meets it.
pub struct AffineView<'a> {
    /// The node index.
    pub layer: usize,
    /// The node as an affine layer (its weight layout, patches and products).
    pub affine: &'a dyn AffineLayer,
    /// What the node's forward pass saved (its patches come from it).
    pub saved: &'a Saved,
    /// Output sensitivities `(M, K, O, R)`.
    pub sensitivities: Tensor,
}

impl AffineView<'_> {
    /// The patches U `(M, G·I, R)`, formed on demand.
    pub fn patches(&self) -> Result<Tensor> {
        self.affine.patches(self.saved)
    }

    /// The indices of one-hot patches (Embedding), which the diagonal and
    /// KFAC use without forming U.
    pub fn one_hot(&self) -> Option<crate::nn::OneHot<'_>> {
        self.affine.one_hot(self.saved)
    }

    /// The number of groups G of the layer's patch form.
    pub fn groups(&self) -> usize {
        self.affine.groups()
    }
}

/// Run the network on the inputs `x` (each `(M, *shape)`), saving state for
/// the nodes marked in `active`.
pub fn forward(model: &Model, x: &Inputs, active: &[bool]) -> Result<Tape> {
    let n_in = model.n_inputs();
    let mut values: Vec<Option<Tensor>> = vec![None; n_in + model.nodes().len()];
    for (v, t) in x.bind(model)?.into_iter().enumerate() {
        values[v] = Some(t);
    }
    let mut saved = Vec::with_capacity(model.nodes().len());
    for (i, node) in model.nodes().iter().enumerate() {
        let inputs: Vec<&Tensor> = node
            .inputs
            .iter()
            .map(|&v| values[v].as_ref().expect("a value is kept until its last use"))
            .collect();
        let (out, s) = node.op.forward_all(&inputs, active[i])?;
        saved.push(s);
        // Free what no later node reads.
        for &v in &node.inputs {
            if model.last_use(v) == Some(i) && v != model.output_value() {
                values[v] = None;
            }
        }
        values[n_in + i] = Some(out);
    }
    let output = values[model.output_value()].take().expect("the output value is computed");
    Ok(Tape { saved, active: active.to_vec(), output })
}

/// The reverse walk over the active nodes: `seed` is the state at the model
/// output; `step(i, s)` turns the summed state at node i's output into one
/// state per input (`None` where nothing flows back, and for inputs that are
/// not active); `add` sums two states that reach the same value.
pub fn backward_walk<S>(
    model: &Model,
    tape: &Tape,
    seed: S,
    mut add: impl FnMut(S, S) -> Result<S>,
    mut step: impl FnMut(usize, S) -> Result<Vec<Option<S>>>,
) -> Result<()> {
    let n_in = model.n_inputs();
    let mut pending: Vec<Option<S>> = (0..n_in + model.nodes().len()).map(|_| None).collect();
    pending[model.output_value()] = Some(seed);
    for i in (0..model.nodes().len()).rev() {
        if !tape.active[i] {
            continue;
        }
        let Some(s) = pending[n_in + i].take() else {
            continue; // no path from here to the output
        };
        let back = step(i, s)?;
        for (&v, b) in model.nodes()[i].inputs.iter().zip(back) {
            let (Some(b), Some(j)) = (b, model.producer(v)) else { continue };
            if !tape.active[j] {
                continue;
            }
            pending[v] = Some(match pending[v].take() {
                None => b,
                Some(a) => add(a, b)?,
            });
        }
    }
    Ok(())
}

/// Pull `v (M, K, C)` back from the output through the active nodes,
/// calling `visit` at every active node with parameters, in reverse order.
pub fn backward(model: &Model, tape: &Tape, v: Tensor, mut visit: impl FnMut(AffineView<'_>) -> Result<()>) -> Result<()> {
    backward_walk(
        model,
        tape,
        v,
        |a, b| Ok((a + b)?),
        |i, v| {
            let node = &model.nodes()[i];
            let saved = tape.saved(i);
            if let Some(affine) = node.op.affine() {
                visit(AffineView { layer: i, affine, saved, sensitivities: crate::nn::to_patch_form(affine, &v)? })?;
            }
            let needs = tape.needs(model, i);
            if !needs.iter().any(|&n| n) {
                return Ok(vec![None; needs.len()]);
            }
            node.op.backward_all(saved, &v, &needs)
        },
    )
}

/// Forward-mode tangents of every value through the active nodes: node i's
/// output tangent is Σⱼ Jⱼ ẋⱼ plus `source(i)` (the parameter term J_θ θ̇),
/// `(M, K, *out)`; `None` where the tangent is zero. Returns the tangents of
/// all values (graph inputs have none).
pub fn tangent_walk(model: &Model, tape: &Tape, mut source: impl FnMut(usize) -> Result<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    let n_in = model.n_inputs();
    let mut tangents: Vec<Option<Tensor>> = vec![None; n_in + model.nodes().len()];
    for (i, node) in model.nodes().iter().enumerate() {
        if !tape.active[i] {
            continue;
        }
        let x_dots: Vec<Option<&Tensor>> = node.inputs.iter().map(|&v| tangents[v].as_ref()).collect();
        let mut out = node.op.jvp_all(tape.saved(i), &x_dots)?;
        if let Some(t) = source(i)? {
            out = Some(match out {
                Some(o) => (o + t)?,
                None => t,
            });
        }
        tangents[n_in + i] = out;
    }
    Ok(tangents)
}
