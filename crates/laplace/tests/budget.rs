//! The memory budget: sizes that come from input are checked before they
//! are allocated, and the error names the quantity and what it would need.
//! One test function, because the budget is process-wide.

use std::path::{Path, PathBuf};

use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::Device;
use laplace::{Curvature, CurvatureKind, Dataset, Likelihood, Sequential, Subset};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn err<T>(r: laplace::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sizes_from_input_meet_the_budget_before_allocation() {
    let dev = Device::Cpu;
    let fx = fixture("cls_cnn");
    let model = Sequential::load(fx.join("model.json"), fx.join("weights.safetensors"), None, &dev).unwrap();
    let data = Dataset::load(&fx.join("data.npz"), model.dtype(), &dev).unwrap();
    let p = model.n_params();

    // A budget below a (P, P) matrix: every full quantity is refused.
    laplace::budget::set_limit((p * p * 8 - 1) as u64);
    for (kind, name) in [(CurvatureKind::Ggn, "GGN"), (CurvatureKind::Hessian, "Hessian"), (CurvatureKind::Ef, "empirical Fisher")] {
        let curv = Curvature::new(&model, Likelihood::Classification, kind, &Subset::All).unwrap();
        let e = err(curv.full_over(&data, 4));
        assert!(e.contains(&format!("full {name} for P = {p} needs")) && e.contains("--memory-limit"), "{e}");
    }
    let opts = FitOptions { structure: Structure::Full, ..FitOptions::default() };
    let e = err(Posterior::fit(model.try_clone().unwrap(), &data, Likelihood::Classification, &opts));
    assert!(e.contains(&format!("a full posterior for P = {p}")), "{e}");
    // The diagonal still fits.
    let curv = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
    assert!(curv.diag_over(&data, 4).is_ok());
    // Jacobians (N, C, P) of the whole data set.
    laplace::budget::set_limit(1000);
    let e = err(curv.jacobians_over(&data, 4, false));
    assert!(e.contains(&format!("Jacobians J (N, C, P) = ({}, 3, {p})", data.len())), "{e}");

    // Sample counts: a million Monte-Carlo samples, 2^64 − 1, and 10^7
    // posterior samples.
    laplace::budget::set_limit(1 << 30);
    for samples in [1_000_000, usize::MAX] {
        let e = err(Curvature::new(&model, Likelihood::Classification, CurvatureKind::FisherMc { samples, seed: 0 }, &Subset::All));
        assert!(e.contains(&format!("--samples {samples}")) && e.contains("needs"), "{e}");
    }
    assert!(Curvature::new(&model, Likelihood::Classification, CurvatureKind::FisherMc { samples: 100, seed: 0 }, &Subset::All).is_ok());
    let opts = FitOptions { structure: Structure::Diag, ..FitOptions::default() };
    let post = Posterior::fit(model.try_clone().unwrap(), &data, Likelihood::Classification, &opts).unwrap();
    let e = err(post.nn_predictive(&data.x, 10_000_000, 0));
    assert!(e.contains(&format!("10000000 posterior samples of P = {p} parameters (4 copies while drawing) needs 73 GB")), "{e}");

    // Geometry: Conv2d padding 10^6 (asks for terabytes), in both model forms.
    let seq = r#"{"input_shape":[1,8,8],"layers":[{"type":"Conv2d","in_channels":1,"out_channels":2,"kernel_size":3,"padding":1000000}]}"#;
    let e = err(laplace::ModelSpec::from_json(seq).and_then(|s| Sequential::new(s, Default::default(), None, &dev)));
    assert!(e.contains("layer 0 (Conv2d)") && e.contains("[2000006, 2000006]"), "{e}");
    let wide = r#"{"input_shape":[1000000,1000000,1000],"layers":[{"type":"ReLU"}]}"#;
    let e = err(laplace::ModelSpec::from_json(wide).and_then(|s| Sequential::new(s, Default::default(), Some(laplace::tensor::DType::F32), &dev)));
    assert!(e.contains("[1000000, 1000000, 1000]") && e.contains("needs 4.0 PB"), "{e}");
    laplace::budget::set_limit(0);
    assert_eq!(laplace::budget::current().bytes, laplace::budget::default_limit());
    assert!(laplace::budget::default_limit() > 1 << 20, "the default budget is a real amount of memory");
}
