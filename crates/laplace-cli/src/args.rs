//! Arguments shared by the subcommands, and loading what they name.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use laplace::tensor::{DType, Device};
use laplace::{BatchSize, Curvature, Dataset, PerPoint, Sequential, Subset};

use crate::parallel::Job;

/// Model, weights and data.
#[derive(Args, Debug, Clone)]
pub struct Inputs {
    /// Model spec (JSON: a graph from tools/laplace_export.py, or input_shape and torch.nn layers).
    #[arg(long, value_name = "M.json")]
    pub model: PathBuf,
    /// Weights: safetensors with the module's state_dict names ("0.weight", "layer1.0.bn1.bias").
    #[arg(long, value_name = "W.safetensors")]
    pub weights: PathBuf,
    /// Data: .npz or .safetensors with x (N, *input_shape) and y; for a model
    /// with several inputs, one array per input under its name (input_ids,
    /// attention_mask, ...: int64 / int32 / bool).
    #[arg(long, value_name = "D.npz")]
    pub data: PathBuf,
    /// The data array holding the targets (HuggingFace batches call it "labels").
    #[arg(long, value_name = "KEY", default_value = "y")]
    pub label_key: String,
    /// Compute dtype (default: the dtype of the weights).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Points per batch, or auto: the largest batch whose estimated working
    /// memory fits the last-level cache (raised so that the weights, Kronecker
    /// factors or full matrix every batch reads and writes get enough work), and always half of
    /// --memory-limit. Results are sums (or
    /// concatenations) over batches: the batch size changes only the
    /// summation order.
    #[arg(long, value_name = "auto|N", default_value = "auto")]
    pub batch_size: BatchSize,
}

/// Which parameters.
#[derive(Args, Debug, Clone)]
pub struct SubsetArgs {
    /// Only the final Linear layer's parameters.
    #[arg(long, conflicts_with_all = ["subnetwork", "params"])]
    pub last_layer: bool,
    /// Only these parameter indices (int64 .npy, indices into θ in parameters() order).
    #[arg(long, value_name = "IDX.npy", conflicts_with = "params")]
    pub subnetwork: Option<PathBuf>,
    /// Only the parameter tensors whose names match these globs, comma-separated
    /// (named_parameters() names: 'fc.*,layer4.*').
    #[arg(long, value_name = "GLOBS")]
    pub params: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum DTypeArg {
    F32,
    F64,
}


impl Inputs {
    /// The input files, named by their flags (for [`check_out`]).
    pub fn paths<'a>(&'a self, subset: Option<&'a SubsetArgs>) -> Vec<(&'static str, &'a Path)> {
        let mut v = vec![("--model", self.model.as_path()), ("--weights", self.weights.as_path()), ("--data", self.data.as_path())];
        if let Some(p) = subset.and_then(|s| s.subnetwork.as_deref()) {
            v.push(("--subnetwork", p));
        }
        v
    }

    /// Load the model and the data (inputs in the compute dtype).
    pub fn load(&self) -> laplace::Result<(Sequential, Dataset)> {
        self.load_on(&Job::single())
    }

    /// Load the model and this rank's shard of the data, agreed across the
    /// job's ranks.
    pub fn load_on(&self, job: &Job) -> laplace::Result<(Sequential, Dataset)> {
        job.agreed(|| {
            let dev = Device::Cpu;
            let dtype = self.dtype.map(|d| match d {
                DTypeArg::F32 => DType::F32,
                DTypeArg::F64 => DType::F64,
            });
            let model = Sequential::load(&self.model, &self.weights, dtype, &dev)?;
            let data = job.load_data(&self.data, &self.label_key, model.dtype(), &dev)?;
            Ok((model, data))
        })
    }

    /// Points per batch of a pass of `curv` over `data` that returns
    /// `per_point` (`--batch-size auto` resolved against the memory budget).
    pub fn batch_points(&self, curv: &Curvature, per_point: PerPoint, data: &Dataset) -> usize {
        curv.batch_points(self.batch_size, per_point, data.len(), laplace::budget::current())
    }
}

/// The subnetwork of `--params 'fc.*,layer4.*'`: every tensor whose name
/// matches one of the comma-separated globs.
pub fn subset_from_globs(model: &Sequential, globs: &str) -> laplace::Result<Subset> {
    let patterns: Vec<&str> = globs.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    if patterns.is_empty() {
        return Err(laplace::Error::Invalid("--params needs at least one name pattern".into()));
    }
    Ok(Subset::Subnetwork(model.param_indices_matching(&patterns)?))
}

impl SubsetArgs {
    pub fn subset(&self, model: &Sequential) -> laplace::Result<Subset> {
        if let Some(globs) = &self.params {
            return subset_from_globs(model, globs);
        }
        Ok(match (&self.subnetwork, self.last_layer) {
            (Some(path), _) => Subset::Subnetwork(laplace::io::read_indices(path)?),
            (None, true) => Subset::LastLayer,
            (None, false) => Subset::All,
        })
    }
}

/// Refuse an `--out` that names one of the inputs or an existing file that
/// is not a regular file (a device, FIFO, directory), before any work.
pub fn check_out(out: &Path, inputs: &[(&str, &Path)]) -> laplace::Result<()> {
    laplace::io::output::check_output(out, inputs)
}
