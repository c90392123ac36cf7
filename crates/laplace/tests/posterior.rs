//! Laplace posteriors without reference library: every structure against
//! its dense equivalent, the evidence gradient against finite differences,
//! optimization, sampling statistics, save / load, and bad input.

mod common;

use common::{assert_close, Fixture};
use laplace::posterior::marglik::{MarglikOptions, PriorStructure};
use laplace::posterior::predict::{link_probs, Link};
use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{BatchSize, Subset};

fn fit(fx: &Fixture, subset: Subset, structure: Structure, prior: Vec<f64>, sigma: f64) -> Posterior {
    let opts = FitOptions {
        subset,
        structure,
        batch_size: BatchSize::Points(3),
        prior_precision: prior,
        sigma_noise: sigma,
       
        ..FitOptions::default()
    };
    Posterior::fit(fx.model.try_clone().unwrap(), &fx.data, fx.likelihood, &opts).unwrap()
}

fn sigma_of(fx: &Fixture) -> f64 {
    if fx.likelihood == laplace::Likelihood::Regression {
        0.6
    } else {
        1.0
    }
}

/// (case, subset, structure) combinations laplace-torch offers.
fn combos(fx: &Fixture) -> Vec<(Subset, Structure)> {
    let mut v = vec![
        (Subset::All, Structure::Full),
        (Subset::All, Structure::Diag),
        (Subset::All, Structure::Kron),
        (Subset::All, Structure::LowRank { rank: 6 }),
        (Subset::LastLayer, Structure::Full),
        (Subset::LastLayer, Structure::Diag),
        (Subset::LastLayer, Structure::Kron),
    ];
    if let Some(idx) = &fx.subnetwork {
        v.push((Subset::Subnetwork(idx.clone()), Structure::Full));
        v.push((Subset::Subnetwork(idx.clone()), Structure::Diag));
    }
    v
}

fn dense_inverse(p: &Tensor) -> Tensor {
    let ch = laplace::linalg::Cholesky::new(p).unwrap();
    tensor::from_faer(ch.inverse().as_ref(), DType::F64, &Device::Cpu).unwrap()
}

#[test]
fn every_structure_matches_its_dense_equivalent() {
    for name in ["reg_multi", "cls_mlp", "cls_cnn"] {
        let fx = Fixture::load(name);
        for (subset, structure) in combos(&fx) {
            let what = format!("{name} {subset:?} {structure:?}");
            let mut post = fit(&fx, subset.clone(), structure, vec![0.7], sigma_of(&fx));
            for prior in [vec![0.7], (0..post.n_groups()).map(|g| 0.3 + 0.2 * g as f64).collect::<Vec<_>>()] {
                post.prior_precision = prior.clone();
                let p = post.posterior_precision_dense().unwrap();
                let cov = dense_inverse(&p);
                // log det and marginal variances.
                let (logdet, var) = post.logdet_and_variance(&prior, post.h_factor(post.sigma_noise), true).unwrap();
                let want: f64 = laplace::linalg::symmetric_eigenvalues(&p).unwrap().iter().map(|l| l.ln()).sum();
                assert!((logdet - want).abs() <= 1e-9 * want.abs().max(1.0), "{what} {prior:?}: logdet {logdet} vs {want}");
                let n = p.dim(0).unwrap();
                let eye = Tensor::eye(n, DType::F64, &Device::Cpu).unwrap();
                let dvar = (&cov * &eye).unwrap().sum(1).unwrap();
                let var = Tensor::new(var.unwrap().as_slice(), &Device::Cpu).unwrap();
                assert_close(&var, &dvar, 1e-9, &format!("{what} {prior:?}: variances"));
                // Functional variance J P⁻¹ Jᵀ.
                let (j, _) = post.jacobians(&fx.data.x).unwrap();
                let fv = post.functional_variance(&j).unwrap();
                let want = j.broadcast_matmul(&cov).unwrap().matmul(&j.transpose(1, 2).unwrap()).unwrap();
                assert_close(&fv, &want, 1e-9, &format!("{what} {prior:?}: functional variance"));
            }
        }
    }
}

#[test]
fn evidence_gradient_matches_finite_differences() {
    for name in ["reg_multi", "cls_cnn"] {
        let fx = Fixture::load(name);
        for (subset, structure) in combos(&fx) {
            let post = fit(&fx, subset.clone(), structure, vec![0.7], sigma_of(&fx));
            let prior: Vec<f64> = (0..post.n_groups()).map(|g| 0.4 + 0.3 * g as f64).collect();
            let with_sigma = fx.likelihood == laplace::Likelihood::Regression;
            let (_, grad) = post.marglik_and_gradient(&prior, post.sigma_noise, with_sigma).unwrap();
            let h = 1e-5;
            for j in 0..prior.len() {
                let (mut a, mut b) = (prior.clone(), prior.clone());
                a[j] *= f64::exp(h);
                b[j] *= f64::exp(-h);
                let fd = (post.log_marginal_likelihood(&a, post.sigma_noise).unwrap()
                    - post.log_marginal_likelihood(&b, post.sigma_noise).unwrap())
                    / (2.0 * h);
                assert!((grad[j] - fd).abs() <= 1e-5 * fd.abs().max(1e-3), "{name} {subset:?} {structure:?}: ∂/∂log p{j}: {} vs {fd}", grad[j]);
            }
            if with_sigma {
                let s = post.sigma_noise;
                let fd = (post.log_marginal_likelihood(&prior, s * f64::exp(h)).unwrap()
                    - post.log_marginal_likelihood(&prior, s * f64::exp(-h)).unwrap())
                    / (2.0 * h);
                let g = grad[prior.len()];
                assert!((g - fd).abs() <= 1e-5 * fd.abs().max(1e-3), "{name} {structure:?}: ∂/∂log σ {g} vs {fd}");
            }
        }
    }
}

#[test]
fn optimization_reaches_a_stationary_maximum_at_least_as_high_as_adam() {
    for name in ["reg_multi", "cls_mlp"] {
        let fx = Fixture::load(name);
        for (subset, structure) in combos(&fx) {
            for ps in [PriorStructure::Scalar, PriorStructure::Layerwise] {
                let mut post = fit(&fx, subset.clone(), structure, vec![1.0], sigma_of(&fx));
                let start = post.log_marginal_likelihood(&[1.0], post.sigma_noise).unwrap();
                let sig = fx.likelihood == laplace::Likelihood::Regression;
                let rep = post.optimize_marglik(&MarglikOptions { prior_structure: ps, optimize_sigma: sig, ..Default::default() }).unwrap();
                let what = format!("{name} {subset:?} {structure:?} {ps:?}");
                assert!(rep.log_marglik >= rep.adam_log_marglik - 1e-12, "{what}: below Adam");
                assert!(rep.log_marglik > start, "{what}: no improvement");
                assert!((post.evidence().unwrap() - rep.log_marglik).abs() < 1e-9 * rep.log_marglik.abs(), "{what}: not set");
                // Stationary: the gradient vanishes (relative to the evidence scale).
                let (_, g) = post.marglik_and_gradient(&post.prior_precision.clone(), post.sigma_noise, sig).unwrap();
                let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(gmax < 1e-4 * rep.log_marglik.abs().max(1.0), "{what}: gradient {g:?} at the optimum");
            }
        }
    }
}

#[test]
fn samples_have_the_posterior_mean_and_covariance() {
    let fx = Fixture::load("reg_multi");
    for (subset, structure) in combos(&fx) {
        let post = fit(&fx, subset.clone(), structure, vec![2.0], 0.6);
        let n = 20000;
        let s = post.sample(n, 3).unwrap();
        let p = post.n_params();
        let cov = dense_inverse(&post.posterior_precision_dense().unwrap());
        let mean = Tensor::new(post.mean(), &Device::Cpu).unwrap();
        let centered = s.broadcast_sub(&mean.unsqueeze(0).unwrap()).unwrap();
        let emp_mean = (centered.sum(0).unwrap() / n as f64).unwrap();
        let emp_cov = (centered.t().unwrap().matmul(&centered).unwrap() / n as f64).unwrap();
        // Mean: each coordinate within 5 standard errors.
        let sd = tensor::to_vec_f64(&(&cov * Tensor::eye(p, DType::F64, &Device::Cpu).unwrap()).unwrap().sum(1).unwrap()).unwrap();
        for (i, m) in tensor::to_vec_f64(&emp_mean).unwrap().iter().enumerate() {
            assert!(m.abs() <= 5.0 * (sd[i] / n as f64).sqrt(), "{subset:?} {structure:?}: mean coordinate {i}");
        }
        // Marginal variances: each within 5 standard errors, √(2/n) Σᵢᵢ.
        let ev = tensor::to_vec_f64(&(&emp_cov * Tensor::eye(p, DType::F64, &Device::Cpu).unwrap()).unwrap().sum(1).unwrap()).unwrap();
        for i in 0..p {
            assert!((ev[i] - sd[i]).abs() <= 5.0 * (2.0 / n as f64).sqrt() * sd[i], "{subset:?} {structure:?}: variance {i}: {} vs {}", ev[i], sd[i]);
        }
        // The whole covariance: E‖S − Σ‖²_F = (tr(Σ)² + ‖Σ‖²_F)/n for Gaussian samples.
        let tr: f64 = sd.iter().sum();
        let fro2: f64 = tensor::to_vec_f64(&cov).unwrap().iter().map(|v| v * v).sum();
        let expected = ((tr * tr + fro2) / n as f64).sqrt() / fro2.sqrt();
        let e = common::rel_err(&emp_cov, &cov);
        assert!(e < 2.0 * expected && expected < 0.2, "{subset:?} {structure:?}: sample covariance off by {e} (expected {expected})");
    }
}

#[test]
fn save_load_predict_is_identical() {
    let dir = std::env::temp_dir().join(format!("laplace-posterior-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["cls_cnn", "reg_multi"] {
        let fx = Fixture::load(name);
        for (k, (subset, structure)) in combos(&fx).into_iter().enumerate() {
            let mut post = fit(&fx, subset.clone(), structure, vec![0.9], sigma_of(&fx));
            post.prior_precision = (0..post.n_groups()).map(|g| 0.5 + g as f64).collect();
            let path = dir.join(format!("{name}-{k}.safetensors"));
            post.save(&path).unwrap();
            let back = Posterior::load(&path).unwrap();
            let what = format!("{name} {subset:?} {structure:?}");
            assert_eq!(back.evidence().unwrap(), post.evidence().unwrap(), "{what}: evidence");
            let (m1, v1) = post.glm_predictive(&fx.data.x).unwrap();
            let (m2, v2) = back.glm_predictive(&fx.data.x).unwrap();
            assert_eq!(tensor::to_vec_f64(&m1).unwrap(), tensor::to_vec_f64(&m2).unwrap(), "{what}: mean");
            assert_eq!(tensor::to_vec_f64(&v1).unwrap(), tensor::to_vec_f64(&v2).unwrap(), "{what}: variance");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn links_behave() {
    // Zero variance: every link is the softmax; MC converges to probit-free E[softmax].
    let dev = Device::Cpu;
    let mu = Tensor::new(&[[1.0f64, -0.5, 0.3], [0.0, 2.0, -1.0]], &dev).unwrap();
    let zero = Tensor::zeros((2, 3, 3), DType::F64, &dev).unwrap();
    let sm = laplace::likelihood::softmax(&mu).unwrap();
    for link in [Link::Probit, Link::Mc { samples: 10, seed: 0 }] {
        assert_close(&link_probs(&mu, &zero, link).unwrap(), &sm, 1e-12, &format!("{link:?} at zero variance"));
    }
    // A diagonal covariance: MC with many samples is close to the exact expectation,
    // and every link returns probability vectors.
    let var = Tensor::new(&[[[0.5f64, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 1.0]], [[0.1, 0.05, 0.0], [0.05, 0.3, 0.0], [0.0, 0.0, 0.2]]], &dev).unwrap();
    for link in [Link::Probit, Link::Bridge, Link::BridgeNorm, Link::Mc { samples: 1000, seed: 1 }] {
        let p = link_probs(&mu, &var, link).unwrap();
        let s = tensor::to_vec_f64(&p.sum(1).unwrap()).unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-12), "{link:?}: rows sum to {s:?}");
    }
    let a = link_probs(&mu, &var, Link::Mc { samples: 200_000, seed: 2 }).unwrap();
    let b = link_probs(&mu, &var, Link::Mc { samples: 200_000, seed: 3 }).unwrap();
    assert_close(&a, &b, 5e-3, "MC link: two seeds");
}

#[test]
fn bad_input_is_refused() {
    let fx = Fixture::load("cls_mlp");
    let mut post = fit(&fx, Subset::All, Structure::Diag, vec![1.0], 1.0);
    for bad in [vec![0.0], vec![-1.0], vec![f64::NAN], vec![1.0, 2.0, 3.0]] {
        let e = post.log_marginal_likelihood(&bad, 1.0).unwrap_err().to_string();
        assert!(e.contains("prior precision"), "{bad:?}: {e}");
    }
    let e = post.log_marginal_likelihood(&[1.0], 0.5).unwrap_err().to_string();
    assert!(e.contains("sigma_noise"), "{e}");
    let opts = FitOptions { sigma_noise: 0.5, ..FitOptions::default() };
    assert!(Posterior::fit(fx.model.try_clone().unwrap(), &fx.data, fx.likelihood, &opts).is_err());
    // Wrong input shape for predictions.
    let x = Tensor::zeros((2, 7), DType::F64, &Device::Cpu).unwrap();
    let e = post.predict_probs(&x, Link::Probit).unwrap_err().to_string();
    assert!(e.contains("[2, 7]"), "{e}");
    // A posterior file whose parts do not fit: the curvature of another model.
    let dir = std::env::temp_dir().join(format!("laplace-bad-posterior-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.safetensors");
    post.save(&path).unwrap();
    let mut t = laplace::io::read_safetensors(&path, &Device::Cpu).unwrap();
    t.insert("H".into(), Tensor::ones(5, DType::F64, &Device::Cpu).unwrap());
    let v: Vec<(String, Tensor)> = t.into_iter().collect();
    laplace::io::write_safetensors(&path, &v).unwrap();
    let e = Posterior::load(&path).err().expect("a mismatched file is refused").to_string();
    assert!(e.contains("H has 5 entries"), "{e}");
    post.prior_precision = vec![1.0];
    let _ = std::fs::remove_dir_all(&dir);
}

