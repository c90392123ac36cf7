//! Every quantity against laplace-torch on the committed fixtures, chains
//! (`tools/reference/make_fixtures.py`) and graph models
//! (`make_graph_fixtures.py`: ResNet-style with BatchNorm, a MobileNet-style
//! block, a bias-free graph), at 1e-8 relative in float64.
//! Regression EF and gradients in the fixtures are already halved to the
//! negative log-likelihood convention of the spec.

mod common;

use common::{assert_close, cases, graph_cases, Fixture};
use laplace::{Batch, Curvature, CurvatureKind, Subset};

const TOL: f64 = 1e-8;

fn subsets(fx: &Fixture) -> Vec<(&'static str, Subset)> {
    let mut v = vec![("", Subset::All), ("last_layer.", Subset::LastLayer)];
    if let Some(idx) = &fx.subnetwork {
        v.push(("subnetwork.", Subset::Subnetwork(idx.clone())));
    }
    v
}

/// Every fixture: the Sequential cases, then the graph models.
fn all_cases() -> Vec<String> {
    cases().into_iter().chain(graph_cases()).collect()
}

fn whole(fx: &Fixture) -> Batch {
    fx.data.batch(0, fx.data.len()).unwrap()
}

#[test]
fn jacobians_match_laplace_torch() {
    for name in all_cases() {
        let fx = Fixture::load(&name);
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
        let (j, f) = c.jacobians(&fx.data.x).unwrap();
        assert_close(&j, fx.expect("jacobians.J"), TOL, &format!("{name} jacobians.J"));
        assert_close(&f, fx.expect("jacobians.f"), TOL, &format!("{name} jacobians.f"));
        let (j, f) = c.last_layer_jacobians(&fx.data.x).unwrap();
        assert_close(&j, fx.expect("last_layer_jacobians.J"), TOL, &format!("{name} last_layer_jacobians.J"));
        assert_close(&f, fx.expect("last_layer_jacobians.f"), TOL, &format!("{name} last_layer_jacobians.f"));
        if let Some(idx) = &fx.subnetwork {
            let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::Subnetwork(idx.clone()))
                .unwrap();
            let (j, _) = c.jacobians(&fx.data.x).unwrap();
            assert_close(&j, fx.expect("subnetwork.jacobians.J"), TOL, &format!("{name} subnetwork.jacobians.J"));
        }
    }
}

#[test]
fn gradients_and_loss_match_laplace_torch() {
    for name in all_cases() {
        let fx = Fixture::load(&name);
        for (prefix, subset) in subsets(&fx) {
            if prefix == "last_layer." {
                continue; // laplace-torch has no last-layer gradients fixture
            }
            let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ef, &subset).unwrap();
            let (g, loss) = c.gradients(&fx.data.x, fx.y()).unwrap();
            assert_close(&g, fx.expect(&format!("{prefix}gradients.G")), TOL, &format!("{name} {prefix}gradients.G"));
            assert_close(&loss, fx.expect("gradients.loss"), TOL, &format!("{name} gradients.loss"));
            assert_close(&loss, fx.expect("loss"), TOL, &format!("{name} loss"));
        }
    }
}

#[test]
fn ggn_and_ef_full_and_diag_match_laplace_torch() {
    for name in all_cases() {
        let fx = Fixture::load(&name);
        for (prefix, subset) in subsets(&fx) {
            for (kind, key) in [(CurvatureKind::Ggn, "ggn"), (CurvatureKind::Ef, "ef")] {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &subset).unwrap();
                let (loss, h) = c.full(&whole(&fx)).unwrap();
                assert_close(&h, fx.expect(&format!("{prefix}{key}.full")), TOL, &format!("{name} {prefix}{key}.full"));
                assert_close(&loss, fx.expect("loss"), TOL, &format!("{name} {prefix}{key}.full loss"));
                let (loss, d) = c.diag(&whole(&fx)).unwrap();
                assert_close(&d, fx.expect(&format!("{prefix}{key}.diag")), TOL, &format!("{name} {prefix}{key}.diag"));
                assert_close(&loss, fx.expect("loss"), TOL, &format!("{name} {prefix}{key}.diag loss"));
            }
        }
    }
}
