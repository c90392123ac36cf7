//! Curvature of a small CNN's loss with the library: the GGN diagonal, KFAC
//! factors, last-layer Jacobians and a subnetwork's full GGN.
//!
//! ```sh
//! cargo run --release -p laplace --example curvature [MODEL_JSON WEIGHTS DATA_NPZ]
//! ```
//!
//! Without arguments it runs on a committed test fixture (a classification
//! CNN with its data). The code between the README markers is the README's
//! library example, verbatim (a test checks).

use std::path::PathBuf;

use laplace::curvature::KfacApprox;
use laplace::tensor::{self, Device};
use laplace::{Curvature, CurvatureKind, Dataset, Likelihood, Sequential, Subset};

fn main() -> laplace::Result<()> {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cls_cnn");
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (model_json, weights, data_npz) = match args.as_slice() {
        [m, w, d] => (m.clone(), w.clone(), d.clone()),
        [] => (fixture.join("model.json"), fixture.join("weights.safetensors"), fixture.join("data.npz")),
        _ => {
            eprintln!("usage: curvature [MODEL_JSON WEIGHTS DATA_NPZ]");
            std::process::exit(2);
        }
    };
    // README: begin curvature
    let model = Sequential::load(&model_json, &weights, None, &Device::Cpu)?;
    let data = Dataset::load(&data_npz, model.dtype(), &Device::Cpu)?;
    let ggn = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All)?;
    let (loss, diag) = ggn.diag_over(&data, 256)?; // Σ_n ℓ_n (1,), diag (P,)
    let (_, kron) = ggn.kron_over(&data, 256, data.len(), KfacApprox::Expand)?; // one [B, A] / [B] per tensor
    let last = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::LastLayer)?;
    let (j, f) = last.jacobians_over(&data, 256, true)?; // (N, C, P_last), (N, C)
    // A subnetwork by parameter names (the CLI's --params), its full GGN:
    let head = Subset::Subnetwork(model.param_indices_matching(&["*.bias"])?);
    let (_, h) = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &head)?.full_over(&data, 256)?;
    // README: end curvature
    println!("{} points, P = {} parameters, loss Σ_n ℓ_n = {:.6}", data.len(), model.n_params(), tensor::scalar_f64(&loss)?);
    println!("GGN diagonal {:?}, trace {:.6}", diag.dims(), tensor::scalar_f64(&diag.sum_all()?)?);
    println!("KFAC: {} blocks, factor shapes {:?}", kron.blocks.len(), kron.blocks.iter().map(|b| b.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()).collect::<Vec<_>>());
    println!("last-layer Jacobians {:?}, outputs {:?}", j.dims(), f.dims());
    println!("full GGN of the biases {:?}", h.dims());
    Ok(())
}
