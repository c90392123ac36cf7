//! Laplace posteriors against laplace-torch 0.3 (`FullLaplace`,
//! `DiagLaplace`, `KronLaplace`, `LowRankLaplace` via its eigenpairs, the
//! last-layer and subnetwork variants), fixtures from
//! `tools/reference/make_posterior_fixtures.py`: evidence and its parts at
//! fixed hyperparameters, posterior precision and variances, the GLM
//! predictive for every link, regression predictive moments, all at 1e-8;
//! MC links and sampling within statistical bounds; optimized evidence at
//! least laplace-torch's.

mod common;

use std::collections::HashMap;

use common::{assert_close, Fixture};
use laplace::posterior::marglik::{MarglikOptions, PriorStructure};
use laplace::posterior::predict::Link;
use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{BatchSize, Dataset, Likelihood, Subset};

const TOL: f64 = 1e-8;

fn subsets(fx: &Fixture) -> Vec<(&'static str, Subset)> {
    let mut v = vec![("all", Subset::All), ("last_layer", Subset::LastLayer)];
    if let Some(idx) = &fx.subnetwork {
        v.push(("subnetwork", Subset::Subnetwork(idx.clone())));
    }
    v
}

fn scalar(t: &Tensor) -> f64 {
    tensor::scalar_f64(t).unwrap()
}

#[track_caller]
fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}: {a} vs {b}");
}

struct Case {
    fx: Fixture,
    exp: HashMap<String, Tensor>,
    test: Dataset,
    sigma: f64,
}

fn case(name: &str) -> Case {
    let fx = Fixture::load(name);
    let exp = laplace::io::read_safetensors(&fx.dir.join("posterior.safetensors"), &Device::Cpu).unwrap();
    let test = Dataset::load(&fx.dir.join("posterior_test.npz"), DType::F64, &Device::Cpu).unwrap();
    let sigma = if fx.likelihood == Likelihood::Regression { 0.6 } else { 1.0 };
    Case { fx, exp, test, sigma }
}

fn fit(c: &Case, subset: Subset, structure: Structure) -> Posterior {
    let opts = FitOptions {
        subset,
        structure,
        batch_size: BatchSize::Points(3),
        prior_precision: vec![0.7],
        sigma_noise: c.sigma,
       
        ..FitOptions::default()
    };
    let mut post = Posterior::fit(c.fx.model.try_clone().unwrap(), &c.fx.data, c.fx.likelihood, &opts).unwrap();
    if let Structure::LowRank { .. } = structure {
        // laplace-torch's eigenpairs; ours are compared separately.
        let u = c.exp["lowrank.all.eigenvectors"].clone();
        post.set_lowrank(tensor::to_vec_f64(&c.exp["lowrank.all.eigenvalues"]).unwrap(), &u).unwrap();
    }
    post
}

fn structures() -> [(&'static str, Structure); 4] {
    [("full", Structure::Full), ("diag", Structure::Diag), ("kron", Structure::Kron), ("lowrank", Structure::LowRank { rank: 10 })]
}

fn check_case(name: &str) {
    let c = case(name);
    let lik = c.fx.likelihood;
    let mut checked = 0;
    for (sname, structure) in structures() {
        for (subname, subset) in subsets(&c.fx) {
            let pre = format!("{sname}.{subname}.");
            if !c.exp.contains_key(&format!("{pre}log_marglik")) {
                continue;
            }
            checked += 1;
            let what = |k: &str| format!("{name} {pre}{k}");
            let key = |k: &str| c.exp[&format!("{pre}{k}")].clone();
            let mut post = fit(&c, subset.clone(), structure);
            // Evidence and its parts at δ = 0.7, σ.
            let p0 = post.prior_diag(&[0.7]).unwrap();
            let s = post.h_factor(c.sigma);
            let (logdet, var) = post.logdet_and_variance(&[0.7], s, true).unwrap();
            close(post.evidence().unwrap(), scalar(&key("log_marglik")), TOL, &what("log_marglik"));
            close(post.log_likelihood(c.sigma), scalar(&key("log_likelihood")), TOL, &what("log_likelihood"));
            close(post.scatter(&p0), scalar(&key("scatter")), TOL, &what("scatter"));
            close(logdet, scalar(&key("log_det_posterior_precision")), TOL, &what("log_det_posterior_precision"));
            let var = Tensor::new(var.unwrap().as_slice(), &Device::Cpu).unwrap();
            assert_close(&var, &key("posterior_variance"), TOL, &what("posterior_variance"));
            // Another setting.
            let at_sigma = if lik == Likelihood::Regression { 0.45 } else { 1.0 };
            close(post.log_marginal_likelihood(&[1.9], at_sigma).unwrap(), scalar(&key("log_marglik_at")), TOL, &what("log_marglik_at"));
            for (k, input) in [("log_marglik_layerwise", "inputs.layerwise_prior_precision.all".to_string()), ("log_marglik_diagonal_prior", format!("inputs.diagonal_prior_precision.{subname}"))] {
                if let (Some(want), Some(prior)) = (c.exp.get(&format!("{pre}{k}")), c.exp.get(&input)) {
                    let prior = tensor::to_vec_f64(prior).unwrap();
                    close(post.log_marginal_likelihood(&prior, c.sigma).unwrap(), scalar(want), TOL, &what(k));
                }
            }
            // Dense posterior precision / covariance / Kronecker blocks.
            if let Some(want) = c.exp.get(&format!("{pre}posterior_precision")) {
                let dense = post.posterior_precision_dense().unwrap();
                let got = if want.rank() == 1 {
                    let n = dense.dim(0).unwrap();
                    (dense * Tensor::eye(n, DType::F64, &Device::Cpu).unwrap()).unwrap().sum(1).unwrap()
                } else {
                    dense
                };
                assert_close(&got, want, TOL, &what("posterior_precision"));
            }
            if let Some(want) = c.exp.get(&format!("{pre}posterior_covariance")) {
                let ch = laplace::linalg::Cholesky::new(&post.posterior_precision_dense().unwrap()).unwrap();
                let cov = tensor::from_faer(ch.inverse().as_ref(), DType::F64, &Device::Cpu).unwrap();
                assert_close(&cov, want, TOL, &what("posterior_covariance"));
            }
            if sname == "kron" {
                let dense = post.posterior_precision_dense().unwrap();
                let mut at = 0;
                for b in 0.. {
                    let Some(want) = c.exp.get(&format!("{pre}posterior_precision_block.{b}")) else { break };
                    let n = want.dim(0).unwrap();
                    let got = dense.narrow(0, at, n).unwrap().narrow(1, at, n).unwrap();
                    assert_close(&got, want, TOL, &what(&format!("posterior_precision_block.{b}")));
                    at += n;
                }
                assert_eq!(at, post.n_params(), "{name} {pre}: blocks cover the parameters");
            }
            // GLM predictive.
            let x = &c.test.x;
            let (f_mu, f_var) = post.glm_predictive(x).unwrap();
            assert_close(&f_mu, &key("glm.f_mu"), TOL, &what("glm.f_mu"));
            assert_close(&f_var, &key("glm.f_var"), TOL, &what("glm.f_var"));
            match lik {
                Likelihood::Classification => {
                    for (lname, link) in [("probit", Link::Probit), ("bridge", Link::Bridge), ("bridge_norm", Link::BridgeNorm)] {
                        let p = post.predict_probs(x, link).unwrap();
                        assert_close(&p, &key(&format!("glm.{lname}.probs")), TOL, &what(lname));
                    }
                    // Statistical: MC link and the sampling predictive.
                    let stat = |got: &Tensor, want: &Tensor, se: &Tensor, n_ours: f64, label: &str| {
                        let (g, w, s) = (tensor::to_vec_f64(got).unwrap(), tensor::to_vec_f64(want).unwrap(), tensor::to_vec_f64(se).unwrap());
                        for i in 0..g.len() {
                            // Our standard error ≈ sd/√n with sd ≤ ½ for a probability.
                            let bound = 5.0 * (s[i] * s[i] + 0.25 / n_ours).sqrt() + 1e-12;
                            assert!((g[i] - w[i]).abs() <= bound, "{}: entry {i}: {} vs {} (bound {bound})", what(label), g[i], w[i]);
                        }
                    };
                    let mc = post.predict_probs(x, Link::Mc { samples: 20000, seed: 5 }).unwrap();
                    stat(&mc, &key("glm.mc.probs"), &key("glm.mc.probs_se"), 20000.0, "glm.mc");
                    let (nn, _) = post.nn_predictive(x, 4000, 9).unwrap();
                    stat(&nn, &key("nn.probs"), &key("nn.probs_se"), 4000.0, "nn");
                }
                Likelihood::Regression => {
                    let (m, v) = post.predict_regression(x).unwrap();
                    assert_close(&m, &key("glm.f_mu"), TOL, &what("mean"));
                    let diag = tensor::to_vec_f64(&key("glm.f_var")).unwrap();
                    let cdim = m.dim(1).unwrap();
                    let want: Vec<f64> = (0..diag.len() / (cdim * cdim)).flat_map(|n| (0..cdim).map(move |a| (n, a))).map(|(n, a)| diag[n * cdim * cdim + a * cdim + a]).collect();
                    assert_close(&v, &Tensor::from_vec(want, m.dims(), &Device::Cpu).unwrap(), TOL, &what("var"));
                    assert_close(&post.functional_covariance(x).unwrap(), &key("glm.joint_f_cov"), TOL, &what("joint_f_cov"));
                    // Sampling predictive moments within statistical bounds.
                    let (nm, nv) = post.nn_predictive(x, 20000, 3).unwrap();
                    let (nm, nv, wm, wv) = (
                        tensor::to_vec_f64(&nm).unwrap(),
                        tensor::to_vec_f64(&nv.unwrap()).unwrap(),
                        tensor::to_vec_f64(&key("nn.f_mean")).unwrap(),
                        tensor::to_vec_f64(&key("nn.f_var")).unwrap(),
                    );
                    for i in 0..nm.len() {
                        let sd = wv[i].sqrt();
                        assert!((nm[i] - wm[i]).abs() <= 5.0 * sd * (1.0 / 20000.0f64 + 1.0 / 20000.0).sqrt() + 1e-12, "{}: nn mean {i}", what(""));
                        assert!((nv[i] - wv[i]).abs() <= 5.0 * wv[i] * (2.0 / 20000.0f64).sqrt() * 2.0 + 1e-12, "{}: nn var {i}: {} vs {}", what(""), nv[i], wv[i]);
                    }
                }
            }
            // Grid search's per-prior validation loss (classification: laplace-torch's NLL).
            if lik == Likelihood::Classification {
                let grid = tensor::to_vec_f64(&c.exp["inputs.gridsearch_grid"]).unwrap();
                let val = tensor::to_vec_f64(&key("gridsearch.val_loss")).unwrap();
                for i in [0, 37, 99] {
                    post.prior_precision = vec![grid[i]];
                    close(post.validation_nll(&c.test, 5).unwrap(), val[i], 1e-7, &what(&format!("grid val loss {i}")));
                }
                post.prior_precision = vec![0.7];
            }
            // Prior mean 0.1 enters the scatter.
            let mut pm = fit(&c, subset.clone(), structure);
            pm.prior_mean = vec![0.1; pm.n_params()];
            close(pm.evidence().unwrap(), scalar(&key("log_marglik_prior_mean")), TOL, &what("log_marglik_prior_mean"));
            // Optimized evidence ≥ laplace-torch's (scalar and, where it has it, layer-wise).
            for (k, ps) in [("optimized", PriorStructure::Scalar), ("optimized_layerwise", PriorStructure::Layerwise)] {
                if let Some(want) = c.exp.get(&format!("{pre}{k}.log_marglik")) {
                    let mut p = fit(&c, subset.clone(), structure);
                    let rep = p.optimize_marglik(&MarglikOptions { prior_structure: ps, ..Default::default() }).unwrap();
                    assert!(rep.log_marglik >= scalar(want) - 1e-9 * scalar(want).abs(), "{}: {} < laplace-torch's {}", what(k), rep.log_marglik, scalar(want));
                }
            }
        }
    }
    assert!(checked >= 7, "{name}: only {checked} posterior variants in the fixture");
}

#[test]
fn reg_multi_matches_laplace_torch() {
    check_case("reg_multi");
}

#[test]
fn reg_single_matches_laplace_torch() {
    check_case("reg_single");
}

#[test]
fn cls_mlp_matches_laplace_torch() {
    check_case("cls_mlp");
}

#[test]
fn cls_cnn_matches_laplace_torch() {
    check_case("cls_cnn");
}

/// Our Lanczos eigenpairs of the GGN equal laplace-torch's low-rank ones.
#[test]
fn lowrank_eigenpairs_match_laplace_torch() {
    for name in ["reg_multi", "cls_mlp", "cls_cnn"] {
        let c = case(name);
        let opts = FitOptions { structure: Structure::LowRank { rank: 10 }, prior_precision: vec![0.7], sigma_noise: c.sigma, ..FitOptions::default() };
        let post = Posterior::fit(c.fx.model.try_clone().unwrap(), &c.fx.data, c.fx.likelihood, &opts).unwrap();
        let laplace::posterior::Fitted::LowRank { values, .. } = post.fitted() else { panic!() };
        let mut want = tensor::to_vec_f64(&c.exp["lowrank.all.eigenvalues"]).unwrap();
        want.sort_by(|a, b| b.total_cmp(a));
        for (i, (a, b)) in values.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-8 * b.abs(), "{name}: eigenvalue {i}: {a} vs {b}");
        }
        close(post.evidence().unwrap(), scalar(&c.exp["lowrank.all.log_marglik"]), 1e-8, &format!("{name} lowrank evidence from our eigenpairs"));
    }
}
