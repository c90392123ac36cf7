//! # laplace
//!
//! Curvature of neural-network losses — Jacobians, per-sample gradients, the
//! generalized Gauss-Newton (GGN), Monte-Carlo Fisher and empirical Fisher
//! (EF), as full matrices or diagonals, over all weights, the last layer or a
//! subnetwork — for PyTorch models (any `nn.Module` torch.fx or torch.export
//! traces: CNNs, ResNets, transformers and HuggingFace classifiers with dict
//! inputs; or an `nn.Sequential`) exported as a JSON graph plus safetensors
//! weights. The numbers match laplace-torch's
//! `laplace.curvature` module; see `shared/spec/curvature-conventions.md`
//! for every convention.
//!
//! ```no_run
//! use laplace::{Curvature, CurvatureKind, Likelihood, Sequential, Subset, Batch};
//! use laplace::tensor::Device;
//! # fn main() -> laplace::Result<()> {
//! let dev = Device::Cpu;
//! let model = Sequential::load("model.json", "weights.safetensors", None, &dev)?;
//! let data = laplace::Dataset::load("data.npz".as_ref(), model.dtype(), &dev)?;
//! let ggn = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All)?;
//! let (loss, diag) = ggn.diag(&data.batch(0, data.len())?)?;
//! # Ok(()) }
//! ```
//!
//! A model with several inputs (`input_ids`, `attention_mask`) takes an
//! [`Inputs`] batch of named tensors; a single tensor converts to one.
//!
//! Layout: [`spec`] parses the model description, [`nn`] holds one module
//! per op, [`model`] connects them into a graph, [`inputs`] binds a batch to
//! its inputs, [`engine`] walks it,
//! [`curvature`] turns them into quantities, [`likelihood`] supplies the
//! output-space pieces, [`pass`] is the one loop over a data set and
//! [`distributed`] combines its parts across processes (data parallelism). [`tensor`] and [`io`] are the only places that talk
//! to candle directly.

// Every public item says what it is (`cargo doc` is the API reference).
#![deny(missing_docs)]

pub mod budget;
pub mod curvature;
pub mod data;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod fuzzing;
pub mod inputs;
pub mod io;
pub mod kron;
pub mod likelihood;
pub mod linalg;
pub mod model;
pub mod nn;
pub mod operator;
pub mod pass;
pub mod posterior;
pub mod rng;
pub mod spec;
pub mod tensor;

pub use curvature::{Batch, BatchSize, Curvature, CurvatureKind, PerPoint, Subset};
pub use data::Dataset;
pub use error::{Error, Result};
pub use inputs::Inputs;
pub use likelihood::Likelihood;
pub use model::{Model, Sequential};
pub use spec::ModelSpec;
