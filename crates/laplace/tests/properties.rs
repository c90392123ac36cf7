//! Properties that need no reference library: finite differences,
//! consistency between structures, additivity over batches, and the
//! statistics of the Monte-Carlo Fisher.

mod common;

use common::{assert_close, cases, rel_err, Fixture};
use laplace::tensor::{self, DType, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Subset};

fn whole(fx: &Fixture) -> Batch {
    fx.data.batch(0, fx.data.len()).unwrap()
}

fn subsets(fx: &Fixture) -> Vec<Subset> {
    let mut v = vec![Subset::All, Subset::LastLayer];
    if let Some(idx) = &fx.subnetwork {
        v.push(Subset::Subnetwork(idx.clone()));
    }
    v
}

/// θ with coordinate p moved by `h`.
fn shifted(theta: &[f64], p: usize, h: f64) -> Tensor {
    let mut t = theta.to_vec();
    t[p] += h;
    let n = t.len();
    Tensor::from_vec(t, n, &laplace::tensor::Device::Cpu).unwrap()
}

/// Central differences of the network outputs: (f(θ + h e_p) − f(θ − h e_p)) / 2h.
#[test]
fn jacobians_match_central_differences() {
    let h = 1e-6;
    for name in cases() {
        let fx = Fixture::load(&name);
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
        let (j, _) = c.jacobians(&fx.data.x).unwrap();
        let theta = tensor::to_vec_f64(&fx.model.parameter_vector().unwrap()).unwrap();
        let cols: Vec<Tensor> = (0..theta.len())
            .map(|p| {
                let fp = fx.model.with_parameter_vector(&shifted(&theta, p, h)).unwrap().forward(&fx.data.x).unwrap();
                let fm = fx.model.with_parameter_vector(&shifted(&theta, p, -h)).unwrap().forward(&fx.data.x).unwrap();
                ((fp - fm).unwrap() / (2.0 * h)).unwrap()
            })
            .collect();
        let fd = Tensor::stack(&cols, 2).unwrap();
        assert_close(&j, &fd, 1e-6, &format!("{name}: Jacobians vs central differences"));
    }
}

/// Σ_n G_n = ∇_θ Σ_n ℓ_n, the latter by central differences of the loss.
#[test]
fn gradients_match_central_differences_of_the_loss() {
    let h = 1e-6;
    for name in ["reg_multi", "cls_cnn", "act_gelu", "act_softplus"] {
        let fx = Fixture::load(name);
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ef, &Subset::All).unwrap();
        let (g, _) = c.gradients(&fx.data.x, fx.y()).unwrap();
        let theta = tensor::to_vec_f64(&fx.model.parameter_vector().unwrap()).unwrap();
        let loss_at = |t: Tensor| {
            let m = fx.model.with_parameter_vector(&t).unwrap();
            let c = Curvature::new(&m, fx.likelihood, CurvatureKind::Ef, &Subset::All).unwrap();
            tensor::scalar_f64(&c.gradients(&fx.data.x, fx.y()).unwrap().1).unwrap()
        };
        let fd: Vec<f64> = (0..theta.len())
            .map(|p| (loss_at(shifted(&theta, p, h)) - loss_at(shifted(&theta, p, -h))) / (2.0 * h))
            .collect();
        let fd = Tensor::from_vec(fd, theta.len(), &laplace::tensor::Device::Cpu).unwrap();
        assert_close(&g.sum(0).unwrap(), &fd, 1e-6, &format!("{name}: Σ gradients vs central differences"));
    }
}

/// Every diagonal is the diagonal of the matching full matrix, for every
/// kind (the Monte-Carlo Fisher with the same seed) and every subset.
#[test]
fn diag_is_the_diagonal_of_full() {
    let kinds = [
        CurvatureKind::Ggn,
        CurvatureKind::FisherMc { samples: 3, seed: 5 },
        CurvatureKind::Ef,
    ];
    for name in cases() {
        let fx = Fixture::load(&name);
        for subset in subsets(&fx) {
            for kind in kinds {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &subset).unwrap();
                let (_, full) = c.full(&whole(&fx)).unwrap();
                let (_, diag) = c.diag(&whole(&fx)).unwrap();
                let p = full.dim(0).unwrap();
                let eye = Tensor::eye(p, DType::F64, full.device()).unwrap();
                let dfull = (full * eye).unwrap().sum(1).unwrap();
                assert_close(&diag, &dfull, 1e-12, &format!("{name} {kind:?} {subset:?}: diag vs diag(full)"));
            }
        }
    }
}

/// The EF is the Gram matrix of the per-sample gradients.
#[test]
fn ef_is_the_gram_matrix_of_gradients() {
    for name in cases() {
        let fx = Fixture::load(&name);
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ef, &Subset::All).unwrap();
        let (g, _) = c.gradients(&fx.data.x, fx.y()).unwrap();
        let (_, ef) = c.full(&whole(&fx)).unwrap();
        assert_close(&ef, &g.t().unwrap().matmul(&g).unwrap(), 1e-12, &format!("{name}: EF vs GᵀG"));
    }
}

/// Quantities over a data set are sums over its batches, whatever the
/// batch size and the internal chunking; the MC Fisher too, since every
/// point draws from its own stream.
#[test]
fn quantities_add_up_over_batches() {
    let kinds = [
        CurvatureKind::Ggn,
        CurvatureKind::FisherMc { samples: 2, seed: 11 },
        CurvatureKind::Ef,
    ];
    for name in ["reg_multi", "cls_cnn", "cls_mlp", "reg_single"] {
        let fx = Fixture::load(name);
        for subset in subsets(&fx) {
            for kind in kinds {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &subset).unwrap();
                let (l_all, f_all) = c.full(&whole(&fx)).unwrap();
                let (_, d_all) = c.diag(&whole(&fx)).unwrap();
                for bs in [1, 3] {
                    // Tiny chunks too: the accumulation inside `full` and `diag`.
                    let c = Curvature::new(&fx.model, fx.likelihood, kind, &subset).unwrap().with_chunk_elems(7);
                    let (mut l, mut f, mut d) = (0.0, None::<Tensor>, None::<Tensor>);
                    for (o, n) in fx.data.batch_ranges(bs) {
                        let b = fx.data.batch(o, n).unwrap();
                        let (lb, fb) = c.full(&b).unwrap();
                        let (_, db) = c.diag(&b).unwrap();
                        l += tensor::scalar_f64(&lb).unwrap();
                        f = Some(f.map_or(fb.clone(), |f0| (f0 + fb).unwrap()));
                        d = Some(d.map_or(db.clone(), |d0| (d0 + db).unwrap()));
                    }
                    let what = format!("{name} {kind:?} {subset:?} batch size {bs}");
                    assert_close(&f.unwrap(), &f_all, 1e-12, &format!("{what}: full"));
                    assert_close(&d.unwrap(), &d_all, 1e-12, &format!("{what}: diag"));
                    let l_all = tensor::scalar_f64(&l_all).unwrap();
                    assert!((l - l_all).abs() <= 1e-12 * l_all.abs(), "{what}: loss {l} vs {l_all}");
                }
            }
        }
    }
}

/// The Monte-Carlo Fisher is an unbiased estimate of the GGN: over R
/// independent seeds, every diagonal entry's mean lies within 5 standard
/// errors of the exact value (a wrong sampling distribution or a missing
/// 1/S fails this), and with many samples the estimate converges.
#[test]
fn monte_carlo_fisher_is_unbiased_and_converges() {
    for name in ["act_tanh", "reg_multi", "cls_cnn"] {
        let fx = Fixture::load(name);
        let ggn = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
        let exact = tensor::to_vec_f64(&ggn.diag(&whole(&fx)).unwrap().1).unwrap();
        let runs = 300;
        let samples = 4;
        let draws: Vec<Vec<f64>> = (0..runs)
            .map(|seed| {
                let kind = CurvatureKind::FisherMc { samples, seed };
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
                tensor::to_vec_f64(&c.diag(&whole(&fx)).unwrap().1).unwrap()
            })
            .collect();
        let scale = exact.iter().cloned().fold(0.0, f64::max);
        for (p, &e) in exact.iter().enumerate() {
            let xs: Vec<f64> = draws.iter().map(|d| d[p]).collect();
            let mean = xs.iter().sum::<f64>() / runs as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (runs - 1) as f64;
            let se = (var / runs as f64).sqrt();
            assert!(
                (mean - e).abs() <= 5.0 * se + 1e-12 * scale,
                "{name}: entry {p}: MC mean {mean} vs exact {e} (standard error {se})"
            );
        }
        // Convergence: the relative error shrinks like 1/√S.
        let err = |s: usize| {
            let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::FisherMc { samples: s, seed: 1 }, &Subset::All)
                .unwrap();
            let (_, full) = c.full(&whole(&fx)).unwrap();
            let (_, exact_full) = ggn.full(&whole(&fx)).unwrap();
            rel_err(&full, &exact_full)
        };
        let (e16, e4096) = (err(16), err(4096));
        assert!(e4096 < 0.1, "{name}: MC Fisher with 4096 samples is {e4096:.3} away from the GGN");
        assert!(e4096 < e16 / 4.0, "{name}: MC error does not shrink with S: {e16:.3} (16) vs {e4096:.3} (4096)");
    }
}

/// The f32 path agrees with the f64 path to single precision.
#[test]
fn float32_agrees_with_float64() {
    for name in ["cls_cnn", "reg_multi", "act_gelu"] {
        let f64x = Fixture::load(name);
        let f32x = Fixture::load_as(name, DType::F32);
        for kind in [CurvatureKind::Ggn, CurvatureKind::Ef] {
            let c64 = Curvature::new(&f64x.model, f64x.likelihood, kind, &Subset::All).unwrap();
            let c32 = Curvature::new(&f32x.model, f32x.likelihood, kind, &Subset::All).unwrap();
            let (_, h64) = c64.full(&whole(&f64x)).unwrap();
            let (_, h32) = c32.full(&whole(&f32x)).unwrap();
            assert_eq!(h32.dtype(), DType::F32);
            assert_close(&h32.to_dtype(DType::F64).unwrap(), &h64, 1e-5, &format!("{name} {kind:?} f32"));
        }
    }
}

/// The last-layer GGN has the closed form Σ_n Λ_n ⊗ [φ_n; 1][φ_n; 1]ᵀ
/// (in the weight-then-bias layout), computed here from φ directly.
#[test]
fn last_layer_ggn_has_the_kronecker_closed_form() {
    for name in ["cls_mlp", "cls_cnn", "reg_multi"] {
        let fx = Fixture::load(name);
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::LastLayer).unwrap();
        let (_, h) = c.full(&whole(&fx)).unwrap();
        // φ: the input of the final Linear layer.
        let last = fx.model.last_linear().unwrap();
        let mut phi = fx.data.x.first().clone();
        for n in &fx.model.nodes()[..last] {
            phi = n.op.forward_all(&[&phi], false).unwrap().0;
        }
        let f = fx.model.forward(&fx.data.x).unwrap();
        let lam = fx.likelihood.hessian(&f).unwrap();
        let (m, d) = phi.dims2().unwrap();
        let cdim = f.dim(1).unwrap();
        let (phi, lam) = (tensor::to_vec_f64(&phi).unwrap(), tensor::to_vec_f64(&lam).unwrap());
        // Coordinates: weight (c, i) ↦ c·D + i, bias c ↦ C·D + c, feature of the bias = 1.
        let p = cdim * d + cdim;
        let feat = |n: usize, q: usize| if q < cdim * d { phi[n * d + q % d] } else { 1.0 };
        let class = |q: usize| if q < cdim * d { q / d } else { q - cdim * d };
        let mut expect = vec![0.0; p * p];
        for n in 0..m {
            for a in 0..p {
                for b in 0..p {
                    expect[a * p + b] += lam[n * cdim * cdim + class(a) * cdim + class(b)] * feat(n, a) * feat(n, b);
                }
            }
        }
        let expect = Tensor::from_vec(expect, (p, p), h.device()).unwrap();
        assert_close(&h, &expect, 1e-12, &format!("{name}: last-layer GGN closed form"));
    }
}

/// A CNN large enough that Conv2d's backward pass splits its columns into
/// several cache-sized chunks (I·R = 27·400 values per column, M·K = 40·5
/// columns) and max pooling with padding scatters into shared inputs: the
/// whole batch must give what single points (one chunk each) add up to.
#[test]
fn chunked_conv_backward_matches_single_points() {
    use laplace::{Likelihood, ModelSpec, Sequential};
    let spec = ModelSpec::from_json(
        r#"{"input_shape": [2, 20, 20], "layers": [
            {"type": "Conv2d", "in_channels": 2, "out_channels": 3, "kernel_size": 3, "padding": 1},
            {"type": "Tanh"},
            {"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
            {"type": "ReLU"},
            {"type": "MaxPool2d", "kernel_size": 3, "stride": 2, "padding": 1},
            {"type": "Flatten"},
            {"type": "Linear", "in_features": 400, "out_features": 5}]}"#,
    )
    .unwrap();
    let dev = tensor::Device::Cpu;
    let mut weights = std::collections::HashMap::new();
    for (key, shape) in [
        ("0.weight", vec![3, 2, 3, 3]),
        ("0.bias", vec![3]),
        ("2.weight", vec![4, 3, 3, 3]),
        ("2.bias", vec![4]),
        ("6.weight", vec![5, 400]),
        ("6.bias", vec![5]),
    ] {
        weights.insert(key.to_string(), Tensor::randn(0f64, 0.3, shape, &dev).unwrap());
    }
    let model = Sequential::new(spec, weights, None, &dev).unwrap();
    let n = 40;
    let x = Tensor::randn(0f64, 1.0, (n, 2, 20, 20), &dev).unwrap();
    let y = Tensor::from_vec((0..n as i64).map(|i| i % 5).collect::<Vec<_>>(), n, &dev).unwrap();
    let c = Curvature::new(&model, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
    let (_, whole) = c.diag(&Batch::new(x.clone(), y.clone())).unwrap();
    let mut sum: Option<Tensor> = None;
    for i in 0..n {
        let b = Batch::new(x.narrow(0, i, 1).unwrap(), y.narrow(0, i, 1).unwrap());
        let d = c.diag(&b).unwrap().1;
        sum = Some(sum.map_or(d.clone(), |s| (s + d).unwrap()));
    }
    assert_close(&whole, &sum.unwrap(), 1e-12, "GGN diag: batch of 40 vs single points");
    let (jac, _) = c.jacobians(&x).unwrap();
    for i in [0, 17, 39] {
        let (ji, _) = c.jacobians(&x.narrow(0, i, 1).unwrap()).unwrap();
        assert_close(&jac.narrow(0, i, 1).unwrap(), &ji, 1e-12, &format!("Jacobian of point {i}"));
    }
}
