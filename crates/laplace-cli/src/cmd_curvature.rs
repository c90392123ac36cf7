//! `laplace curvature`: loss and curvature over a whole data set.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use laplace::{Curvature, CurvatureKind};

use crate::args::{Inputs, LikelihoodArg, SubsetArgs};

#[derive(Args, Debug)]
pub struct CurvatureArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub subset: SubsetArgs,
    #[arg(long, value_enum)]
    pub likelihood: LikelihoodArg,
    /// ggn: exact generalized Gauss-Newton; fisher-mc: Monte-Carlo Fisher; ef: empirical Fisher.
    #[arg(long, value_enum)]
    pub curvature: CurvatureArg,
    #[arg(long, value_enum)]
    pub structure: StructureArg,
    /// Monte-Carlo samples per point (fisher-mc).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub samples: u64,
    /// Seed of the Monte-Carlo draws (fisher-mc); each point has its own stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output safetensors: loss (1,) and H ((P, P) or (P,)).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum CurvatureArg {
    Ggn,
    FisherMc,
    Ef,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructureArg {
    Full,
    Diag,
}

impl CurvatureArgs {
    pub fn kind(&self) -> CurvatureKind {
        match self.curvature {
            CurvatureArg::Ggn => CurvatureKind::Ggn,
            CurvatureArg::FisherMc => CurvatureKind::FisherMc {
                samples: self.samples as usize,
                seed: self.seed,
            },
            CurvatureArg::Ef => CurvatureKind::Ef,
        }
    }
}

pub fn run(a: &CurvatureArgs) -> laplace::Result<()> {
    let (model, data) = a.inputs.load()?;
    let curv = Curvature::new(&model, a.likelihood.into(), a.kind(), &a.subset.subset()?)?;
    data.targets()?;
    let mut total: Option<(laplace::tensor::Tensor, laplace::tensor::Tensor)> = None;
    for (offset, len) in data.batch_ranges(a.inputs.batch_size()) {
        let batch = data.batch(offset, len)?;
        let (loss, h) = match a.structure {
            StructureArg::Full => curv.full(&batch)?,
            StructureArg::Diag => curv.diag(&batch)?,
        };
        total = Some(match total {
            None => (loss, h),
            Some((l0, h0)) => ((l0 + loss)?, (h0 + h)?),
        });
    }
    let (loss, h) = total.expect("a data set has at least one point");
    laplace::io::write_safetensors(&a.out, &[("loss".into(), loss), ("H".into(), h)])
}
