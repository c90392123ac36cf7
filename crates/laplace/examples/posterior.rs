//! A Laplace posterior with the library: fit a last-layer KFAC posterior,
//! tune its prior precision by the marginal likelihood, predict with the GLM
//! predictive and compare with the MAP network.
//!
//! ```sh
//! cargo run --release -p laplace --example posterior [MODEL_JSON WEIGHTS TRAIN_NPZ TEST_NPZ]
//! ```
//!
//! Without arguments it runs on a committed test fixture (a classification
//! CNN; its data serve as both sets). The code between the README markers is
//! the README's posterior example, verbatim (a test checks).

use std::path::PathBuf;

use laplace::posterior::marglik::MarglikOptions;
use laplace::posterior::predict::Link;
use laplace::posterior::{metrics, FitOptions, Posterior, Structure};
use laplace::tensor::{self, Device};
use laplace::{Dataset, Likelihood, Sequential, Subset};

fn main() -> laplace::Result<()> {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cls_cnn");
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (model_json, weights, train_npz, test_npz) = match args.as_slice() {
        [m, w, tr, te] => (m.clone(), w.clone(), tr.clone(), te.clone()),
        [] => (fixture.join("model.json"), fixture.join("weights.safetensors"), fixture.join("data.npz"), fixture.join("data.npz")),
        _ => {
            eprintln!("usage: posterior [MODEL_JSON WEIGHTS TRAIN_NPZ TEST_NPZ]");
            std::process::exit(2);
        }
    };
    // README: begin posterior
    let model = Sequential::load(&model_json, &weights, None, &Device::Cpu)?;
    let train = Dataset::load(&train_npz, model.dtype(), &Device::Cpu)?;
    let test = Dataset::load(&test_npz, model.dtype(), &Device::Cpu)?;
    let opts = FitOptions { subset: Subset::LastLayer, structure: Structure::Kron, ..FitOptions::default() };
    let mut post = Posterior::fit(model.try_clone()?, &train, Likelihood::Classification, &opts)?;
    post.optimize_marglik(&MarglikOptions::default())?; // laplace-torch's Adam on log p, then a fixed point
    let x = test.inputs(0, test.len())?;
    let probs = post.predict_probs(&x, Link::Probit)?; // (N, C)
    let labels = tensor::to_vec_i64(test.targets()?)?;
    let laplace = metrics::classification(&probs, &labels)?;
    let map = metrics::classification(&laplace::likelihood::softmax(&model.forward(&x)?)?, &labels)?;
    // README: end posterior
    println!("{} parameters in the posterior, log marginal likelihood {:.6}, prior precision {:?}", post.n_params(), post.evidence()?, post.prior_precision);
    println!("{:>8} {:>9} {:>8} {:>8} {:>8}", "", "accuracy", "NLL", "ECE", "Brier");
    for (name, m) in [("MAP", &map), ("Laplace", &laplace)] {
        println!("{name:>8} {:>9.4} {:>8.4} {:>8.4} {:>8.4}", m.accuracy, m.nll, m.ece, m.brier);
    }
    Ok(())
}
