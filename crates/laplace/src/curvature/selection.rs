//! Which parameters a quantity is computed for: all of θ, the last layer, or
//! a subnetwork given as indices into θ.
//!
//! Quantities are computed only for the selected coordinates, node by node
//! (a node with nothing selected contributes no work, and the backward pass
//! runs only through the nodes downstream of a selected parameter), in θ
//! order. A
//! subnetwork given in another order is permuted into that order at the end,
//! so that results match `quantity[..., subnetwork_indices]` of the full
//! object.

use std::collections::BTreeMap;

use crate::error::{bail, Result};
use crate::model::Model;
use crate::nn::WeightLayout;
use crate::tensor::{self, Tensor};

/// Where θ-local coordinate `local` of parameter `p` sits in the computed
/// layout: the patch form's W `(O, I)` row-major. A weight stored `(I, O)`
/// (HuggingFace `Conv1D`, `nn.Embedding`) is the transpose.
fn computed_local(model: &Model, p: &crate::model::ParamInfo, local: usize) -> usize {
    if !stored_transposed(model, p) {
        return local;
    }
    let (o, i, _) = model.nodes()[p.layer].op.affine().expect("a weight").affine_dims();
    // θ: (i', o') at i'·O + o'; computed: o'·I + i'.
    (local % o) * i + local / o
}

/// Is `p` a weight stored `(I, O)`?
pub(crate) fn stored_transposed(model: &Model, p: &crate::model::ParamInfo) -> bool {
    !p.is_bias() && model.nodes()[p.layer].op.affine().is_some_and(|a| a.weight_layout() == WeightLayout::InOut)
}

/// The parameters a curvature object works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subset {
    /// Every parameter (θ in `parameters()` order).
    All,
    /// The final Linear layer (weight and bias).
    LastLayer,
    /// Indices into θ; unique, any order.
    Subnetwork(Vec<i64>),
}

/// Selected coordinates of one parameter tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selected {
    /// Every element of the tensor.
    All,
    /// Sorted local (row-major) indices.
    Some(Vec<usize>),
}

impl Selected {
    /// Number of selected coordinates of a tensor of `numel` elements.
    pub fn len(&self, numel: usize) -> usize {
        match self {
            Selected::All => numel,
            Selected::Some(ids) => ids.len(),
        }
    }
}

/// A parameter tensor with something selected, and where its selected
/// coordinates sit among all selected ones (in θ order).
#[derive(Clone, Debug)]
pub struct SelectedTensor {
    /// Index of the node holding the tensor.
    pub layer: usize,
    /// The bias (else the weight).
    pub is_bias: bool,
    /// Elements of the whole tensor.
    pub numel: usize,
    /// Which of its coordinates.
    pub selected: Selected,
    /// First column of this tensor among the selected coordinates.
    pub column: usize,
    /// Number of selected coordinates.
    pub len: usize,
}

/// The selection within one layer: its weight and its bias.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerSelection {
    /// The selected coordinates of the weight, if any.
    pub weight: Option<Selected>,
    /// The selected coordinates of the bias, if any.
    pub bias: Option<Selected>,
}

/// A [`Subset`] resolved against a model: the selected coordinates of every
/// parameterized layer, and the order results come in.
#[derive(Clone, Debug)]
pub struct ParamSelection {
    layers: BTreeMap<usize, LayerSelection>,
    /// Output position j holds computed column `order[j]` (subnetworks in
    /// user order, weights stored `(I, O)`); `None` when the computed order
    /// is the output order.
    order: Option<Vec<usize>>,
    /// Is the output order a user's order (a subnetwork's index list) rather
    /// than θ order?
    user_order: bool,
    len: usize,
    /// Nodes downstream of a selected parameter: where the engine saves
    /// state and pulls sensitivities back.
    active: Vec<bool>,
}

impl ParamSelection {
    /// Resolve `subset` against `model`: an error names a bad index or a model
    /// without a final Linear layer.
    pub fn new(model: &Model, subset: &Subset) -> Result<Self> {
        let mut layers: BTreeMap<usize, LayerSelection> = BTreeMap::new();
        let mut put = |layer: usize, p: &crate::model::ParamInfo, sel: Selected| {
            let entry = layers.entry(layer).or_default();
            if p.is_bias() {
                entry.bias = Some(sel);
            } else {
                entry.weight = Some(sel);
            }
        };
        let params = model.params();
        let mut order = None;
        match subset {
            Subset::All => {
                if params.is_empty() {
                    bail!(Invalid, "the model has no parameters");
                }
                for p in params {
                    put(p.layer, p, Selected::All);
                }
            }
            Subset::LastLayer => {
                let last = model.last_linear()?;
                for p in params.iter().filter(|p| p.layer == last) {
                    put(p.layer, p, Selected::All);
                }
            }
            Subset::Subnetwork(indices) => {
                let n_params = model.n_params();
                if indices.is_empty() {
                    bail!(Invalid, "the subnetwork index list is empty");
                }
                let mut seen = vec![usize::MAX; n_params];
                for (pos, &idx) in indices.iter().enumerate() {
                    if idx < 0 || idx as usize >= n_params {
                        bail!(
                            Invalid,
                            "subnetwork index {idx} (position {pos}) is out of range: the model has {n_params} parameters"
                        );
                    }
                    let idx = idx as usize;
                    if seen[idx] != usize::MAX {
                        bail!(
                            Invalid,
                            "subnetwork index {idx} appears twice (positions {} and {pos})",
                            seen[idx]
                        );
                    }
                    seen[idx] = pos;
                }
                let mut sorted: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
                sorted.sort_unstable();
                for p in params {
                    let mut local: Vec<usize> = sorted
                        .iter()
                        .filter(|&&i| i >= p.offset && i < p.offset + p.numel)
                        .map(|&i| computed_local(model, p, i - p.offset))
                        .collect();
                    local.sort_unstable();
                    if local.len() == p.numel {
                        put(p.layer, p, Selected::All);
                    } else if !local.is_empty() {
                        put(p.layer, p, Selected::Some(local));
                    }
                }
                order = Some(indices.iter().map(|&i| i as usize).collect::<Vec<_>>());
            }
        }
        let len = params
            .iter()
            .map(|p| {
                let sel = layers.get(&p.layer).and_then(|l| {
                    if p.is_bias() {
                        l.bias.as_ref()
                    } else {
                        l.weight.as_ref()
                    }
                });
                sel.map_or(0, |s| s.len(p.numel))
            })
            .sum();
        let sources: Vec<usize> = layers.keys().copied().collect();
        let active = model.downstream_of(&sources);
        // A subnetwork listed in θ order is computed in that order.
        let user_order = order.as_ref().is_some_and(|o: &Vec<usize>| o.windows(2).any(|w| w[0] > w[1]));
        let mut sel = ParamSelection { layers, order: None, user_order, len, active };
        // The computed column of every output coordinate, where the two orders differ.
        let permuted = params.iter().any(|p| sel.selected_of(p).is_some() && stored_transposed(model, p));
        if user_order || permuted {
            let outputs: Vec<usize> = match order {
                Some(o) => o,
                None => params
                    .iter()
                    .filter(|p| sel.selected_of(p).is_some())
                    .flat_map(|p| p.offset..p.offset + p.numel)
                    .collect(),
            };
            let ord = sel.computed_columns(model, &outputs);
            if ord.iter().enumerate().any(|(j, &c)| j != c) {
                sel.order = Some(ord);
            }
        }
        Ok(sel)
    }

    /// Does the selection consist of whole parameter tensors (all of θ or
    /// the last layer), as Kronecker factorizations need?
    pub fn whole_tensors(&self) -> bool {
        !self.user_order
            && self
                .layers
                .values()
                .all(|l| [&l.weight, &l.bias].iter().all(|s| !matches!(s, Some(Selected::Some(_)))))
    }

    /// What is selected of parameter `p`.
    fn selected_of(&self, p: &crate::model::ParamInfo) -> Option<&Selected> {
        let l = self.layers.get(&p.layer)?;
        if p.is_bias() {
            l.bias.as_ref()
        } else {
            l.weight.as_ref()
        }
    }

    /// The computed column of each θ index in `theta` (all selected).
    fn computed_columns(&self, model: &Model, theta: &[usize]) -> Vec<usize> {
        let tensors = self.tensors(model);
        let params = model.params();
        // Parameters by offset, for finding the tensor of a θ index.
        let starts: Vec<usize> = params.iter().map(|p| p.offset).collect();
        theta
            .iter()
            .map(|&s| {
                let pi = starts.partition_point(|&o| o <= s) - 1;
                let p = &params[pi];
                let t = tensors.iter().find(|t| t.layer == p.layer && t.is_bias == p.is_bias()).expect("a selected index");
                let local = computed_local(model, p, s - p.offset);
                t.column
                    + match &t.selected {
                        Selected::All => local,
                        Selected::Some(ids) => ids.binary_search(&local).expect("a selected coordinate"),
                    }
            })
            .collect()
    }

    /// Number of selected coordinates.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing selected.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The nodes downstream of a selected parameter (the engine's active set).
    pub fn active(&self) -> &[bool] {
        &self.active
    }

    /// Per-tensor pieces `(node, is_bias) → piece` in θ order. A tensor
    /// without a piece (its node does not reach the model output, so the
    /// backward pass never met it) gets `missing(tensor)`: its zero.
    pub fn in_theta_order<T>(
        &self,
        model: &Model,
        mut pieces: std::collections::HashMap<(usize, bool), T>,
        missing: impl Fn(&SelectedTensor) -> Result<T>,
    ) -> Result<Vec<T>> {
        self.tensors(model)
            .iter()
            .map(|t| match pieces.remove(&(t.layer, t.is_bias)) {
                Some(p) => Ok(p),
                None => missing(t),
            })
            .collect()
    }

    /// The selection within `layer`, if any.
    pub fn layer(&self, layer: usize) -> Option<&LayerSelection> {
        self.layers.get(&layer)
    }

    /// The selected tensors in θ order, with their columns in the θ-ordered
    /// (sorted) layout of selected coordinates.
    pub fn tensors(&self, model: &Model) -> Vec<SelectedTensor> {
        let mut out = Vec::new();
        let mut col = 0;
        for p in model.params() {
            let is_bias = p.is_bias();
            let sel = self.layers.get(&p.layer).and_then(|l| if is_bias { l.bias.clone() } else { l.weight.clone() });
            if let Some(selected) = sel {
                let len = selected.len(p.numel);
                out.push(SelectedTensor {
                    layer: p.layer,
                    is_bias,
                    numel: p.numel,
                    selected,
                    column: col,
                    len,
                });
                col += len;
            }
        }
        out
    }

    /// The inverse of [`ParamSelection::reorder`]: output order to θ order.
    pub fn to_theta_order(&self, t: Tensor, dim: usize) -> Result<Tensor> {
        match &self.order {
            None => Ok(t),
            Some(ord) => {
                let mut inv = vec![0; ord.len()];
                for (j, &r) in ord.iter().enumerate() {
                    inv[r] = j;
                }
                tensor::select(&t, &tensor::index_tensor(&inv, t.device())?, dim)
            }
        }
    }

    /// Put the parameter axis `dim` of `t` (computed in θ order) into output order.
    pub fn reorder(&self, t: Tensor, dim: usize) -> Result<Tensor> {
        match &self.order {
            None => Ok(t),
            Some(ord) => tensor::select(&t, &tensor::index_tensor(ord, t.device())?, dim),
        }
    }
}
