//! `laplace jacobians` and `laplace gradients`: per-sample quantities,
//! concatenated over batches.

use std::path::PathBuf;

use clap::Args;
use laplace::tensor::Tensor;
use laplace::{Curvature, CurvatureKind, Likelihood, Subset};

use crate::args::{Inputs, LikelihoodArg, SubsetArgs};

#[derive(Args, Debug)]
pub struct JacobiansArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// Output safetensors: J (N, C, P) and f (N, C).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct GradientsArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub subset: SubsetArgs,
    #[arg(long, value_enum)]
    pub likelihood: LikelihoodArg,
    /// Output safetensors: G (N, P) and loss (1,).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

pub fn run_jacobians(a: &JacobiansArgs) -> laplace::Result<()> {
    let (model, data) = a.inputs.load()?;
    let subset = a.subset.subset()?;
    // The likelihood plays no part in Jacobians.
    let curv = Curvature::new(&model, Likelihood::Regression, CurvatureKind::Ggn, &subset)?;
    let (mut js, mut fs) = (Vec::new(), Vec::new());
    for (offset, len) in data.batch_ranges(a.inputs.batch_size()) {
        let x = data.inputs(offset, len)?;
        let (j, f) = match subset {
            Subset::LastLayer => curv.last_layer_jacobians(&x)?,
            _ => curv.jacobians(&x)?,
        };
        js.push(j);
        fs.push(f);
    }
    let out = [("J".to_string(), Tensor::cat(&js, 0)?), ("f".to_string(), Tensor::cat(&fs, 0)?)];
    laplace::io::write_safetensors(&a.out, &out)
}

pub fn run_gradients(a: &GradientsArgs) -> laplace::Result<()> {
    let (model, data) = a.inputs.load()?;
    let curv = Curvature::new(&model, a.likelihood.into(), CurvatureKind::Ef, &a.subset.subset()?)?;
    let (mut gs, mut loss) = (Vec::new(), None::<Tensor>);
    for (offset, len) in data.batch_ranges(a.inputs.batch_size()) {
        let b = data.batch(offset, len)?;
        let (g, l) = curv.gradients(&b.x, &b.y)?;
        gs.push(g);
        loss = Some(match loss {
            None => l,
            Some(l0) => (l0 + l)?,
        });
    }
    let out = [("G".to_string(), Tensor::cat(&gs, 0)?), ("loss".to_string(), loss.expect("data is non-empty"))];
    laplace::io::write_safetensors(&a.out, &out)
}
