//! The exact Hessian and curvature-vector products: against laplace-torch
//! (`CurvlinopsHessian` / `AsdlHessian`, `tools/reference/make_hessian_fixtures.py`),
//! central differences of our exact gradients, and consistency laws.

mod common;

use common::{assert_close, cases, Fixture};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Subset};

const TOL: f64 = 1e-8;

fn whole(fx: &Fixture) -> Batch {
    fx.data.batch(0, fx.data.len()).unwrap()
}

fn hess_fixture(fx: &Fixture) -> std::collections::HashMap<String, Tensor> {
    laplace::io::read_safetensors(&fx.dir.join("hessian.safetensors"), &Device::Cpu).unwrap()
}

fn diagonal(m: &Tensor) -> Tensor {
    let p = m.dim(0).unwrap();
    (m * Tensor::eye(p, DType::F64, m.device()).unwrap()).unwrap().sum(1).unwrap()
}

#[test]
fn hessian_matches_laplace_torch() {
    for name in cases() {
        let fx = Fixture::load(&name);
        let exp = hess_fixture(&fx);
        let mut subsets = vec![("", Subset::All), ("last_layer.", Subset::LastLayer)];
        if let Some(idx) = &fx.subnetwork {
            subsets.push(("subnetwork.", Subset::Subnetwork(idx.clone())));
        }
        for (prefix, subset) in subsets {
            let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &subset).unwrap();
            let (loss, h) = c.full(&whole(&fx)).unwrap();
            assert_close(&h, &exp[&format!("{prefix}hessian.full")], TOL, &format!("{name} {prefix}hessian.full"));
            assert_close(&loss, &exp["hessian.loss"], TOL, &format!("{name} hessian loss"));
            let (_, d) = c.diag(&whole(&fx)).unwrap();
            assert_close(&d, &diagonal(&exp[&format!("{prefix}hessian.full")]), TOL, &format!("{name} {prefix}hessian diag"));
        }
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &Subset::All).unwrap();
        let (_, d) = c.diag(&whole(&fx)).unwrap();
        assert_close(&d, &exp["hessian.diag"], TOL, &format!("{name} hessian.diag"));
        let v = exp["hvp.v"].unsqueeze(0).unwrap();
        let (_, hv) = c.matmat(&whole(&fx), &v).unwrap();
        assert_close(&hv.squeeze(0).unwrap(), &exp["hvp.Hv"], TOL, &format!("{name} Hessian-vector product"));
    }
}

/// Column p of the Hessian by central differences of the exact gradient Σ_n G_n.
#[test]
fn hessian_matches_central_differences_of_gradients() {
    let h = 1e-5;
    for name in ["hess_smooth_cnn", "act_gelu", "act_gelu_tanh", "act_silu", "act_elu", "act_softplus", "act_sigmoid", "reg_multi"] {
        let fx = Fixture::load(name);
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &Subset::All).unwrap();
        let (_, hess) = c.full(&whole(&fx)).unwrap();
        let theta = tensor::to_vec_f64(&fx.model.parameter_vector().unwrap()).unwrap();
        let grad_at = |t: Vec<f64>| {
            let n = t.len();
            let m = fx.model.with_parameter_vector(&Tensor::from_vec(t, n, &Device::Cpu).unwrap()).unwrap();
            let c = Curvature::new(&m, fx.likelihood, CurvatureKind::Ef, &Subset::All).unwrap();
            c.gradients(&fx.data.x, fx.y()).unwrap().0.sum(0).unwrap()
        };
        let cols: Vec<Tensor> = (0..theta.len())
            .map(|p| {
                let (mut tp, mut tm) = (theta.clone(), theta.clone());
                tp[p] += h;
                tm[p] -= h;
                ((grad_at(tp) - grad_at(tm)).unwrap() / (2.0 * h)).unwrap()
            })
            .collect();
        let fd = Tensor::stack(&cols, 1).unwrap();
        assert_close(&hess, &fd, 1e-7, &format!("{name}: Hessian vs differences of gradients"));
    }
}

#[test]
fn hessian_diag_is_the_diagonal_of_full() {
    for name in cases() {
        let fx = Fixture::load(&name);
        let mut subsets = vec![Subset::All, Subset::LastLayer];
        if let Some(idx) = &fx.subnetwork {
            subsets.push(Subset::Subnetwork(idx.clone()));
        }
        for subset in subsets {
            let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &subset)
                .unwrap()
                .with_chunk_elems(500);
            let (_, full) = c.full(&whole(&fx)).unwrap();
            let (_, d) = c.diag(&whole(&fx)).unwrap();
            assert_close(&d, &diagonal(&full), 1e-12, &format!("{name} {subset:?}"));
        }
    }
}

/// For networks whose only nonlinearities are piecewise linear, the output
/// is linear in each single layer's parameters, so every within-layer block
/// of the Hessian equals the GGN's (the cross-layer blocks do not: the
/// output is multilinear across layers). The last-layer Hessian equals the
/// last-layer GGN for every network.
#[test]
fn hessian_and_ggn_agree_where_the_network_is_linear() {
    for name in ["act_relu", "act_leakyrelu", "act_identity", "act_dropout"] {
        let fx = Fixture::load(name);
        let hc = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &Subset::All).unwrap();
        let gc = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
        let (_, h) = hc.full(&whole(&fx)).unwrap();
        let (_, g) = gc.full(&whole(&fx)).unwrap();
        for l in 0..fx.model.nodes().len() {
            let ps: Vec<_> = fx.model.params().iter().filter(|p| p.layer == l).collect();
            if ps.is_empty() {
                continue;
            }
            let (a, n) = (ps[0].offset, ps.iter().map(|p| p.numel).sum());
            let block = |m: &Tensor| m.narrow(0, a, n).unwrap().narrow(1, a, n).unwrap();
            assert_close(&block(&h), &block(&g), 1e-12, &format!("{name} layer {l} block"));
        }
        assert!(common::rel_err(&h, &g) > 1e-3, "{name}: cross-layer blocks are expected to differ");
    }
    for name in cases() {
        let fx = Fixture::load(&name);
        let hc = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &Subset::LastLayer).unwrap();
        let (_, h) = hc.full(&whole(&fx)).unwrap();
        assert_close(&h, fx.expect("last_layer.ggn.full"), 1e-10, &format!("{name} last-layer Hessian = GGN"));
    }
}

/// Products with every curvature equal the dense matrix times the directions.
#[test]
fn products_equal_matrix_times_directions() {
    let kinds = [
        CurvatureKind::Ggn,
        CurvatureKind::FisherMc { samples: 3, seed: 4 },
        CurvatureKind::Ef,
        CurvatureKind::Hessian,
    ];
    for name in ["cls_cnn", "reg_multi", "hess_smooth_cnn", "cls_mlp"] {
        let fx = Fixture::load(name);
        let mut subsets = vec![Subset::All, Subset::LastLayer];
        if let Some(idx) = &fx.subnetwork {
            subsets.push(Subset::Subnetwork(idx.clone()));
        }
        for subset in &subsets {
            for kind in kinds {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, subset).unwrap().with_chunk_elems(3000);
                let (_, full) = c.full(&whole(&fx)).unwrap();
                let p = c.n_params();
                let mut rng = laplace::rng::Rng::new(5);
                let v = Tensor::from_vec((0..3 * p).map(|_| rng.normal()).collect::<Vec<f64>>(), (3, p), &Device::Cpu).unwrap();
                let (_, hv) = c.matmat(&whole(&fx), &v).unwrap();
                let want = v.matmul(&full).unwrap();
                assert_close(&hv, &want, 1e-11, &format!("{name} {kind:?} {subset:?}: products"));
            }
        }
    }
}

#[test]
fn hessian_has_no_kron() {
    let fx = Fixture::load("act_tanh");
    let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &Subset::All).unwrap();
    let e = c.kron(&whole(&fx), 6, Default::default()).unwrap_err().to_string();
    assert!(e.contains("Hessian"), "{e}");
}
