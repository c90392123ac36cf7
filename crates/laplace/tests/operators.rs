//! Curvature operators and the algorithms on them: operators applied to the
//! identity equal the matrices; Lanczos against faer's dense eigensolver;
//! CG residuals; trace and diagonal estimators unbiased within statistical
//! bounds.

mod common;

use common::{assert_close, Fixture};
use laplace::curvature::KfacApprox;
use laplace::operator::{
    conjugate_gradients, hutchinson_diag, hutchinson_trace, hutchpp_trace, lanczos_top_k, CurvatureOperator,
    DenseOperator, KronOperator, LinearOperator,
};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Curvature, CurvatureKind, Subset};

fn kinds() -> [CurvatureKind; 4] {
    [
        CurvatureKind::Ggn,
        CurvatureKind::FisherMc { samples: 2, seed: 3 },
        CurvatureKind::Ef,
        CurvatureKind::Hessian,
    ]
}

#[test]
fn operators_applied_to_the_identity_are_the_matrices() {
    for name in ["cls_cnn", "reg_multi", "hess_smooth_cnn"] {
        let fx = Fixture::load(name);
        for kind in kinds() {
            for subset in [Subset::All, Subset::LastLayer] {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &subset).unwrap();
                let op = CurvatureOperator::new(&c, &fx.data, 3).unwrap();
                let (_, full) = c.full_over(&fx.data, 4).unwrap();
                assert_close(&op.to_matrix().unwrap(), &full, 1e-11, &format!("{name} {kind:?} {subset:?} operator"));
            }
        }
        let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
        let (_, k) = c.kron_over(&fx.data, 4, fx.data.len(), KfacApprox::Expand).unwrap();
        let op = KronOperator::new(k.clone()).unwrap();
        assert_close(&op.to_matrix().unwrap(), &k.to_matrix().unwrap(), 1e-12, &format!("{name} KFAC operator"));
    }
}

/// Dense eigenvalues (descending) and eigenvectors as rows.
fn dense_eigen(m: &Tensor) -> (Vec<f64>, Vec<Vec<f64>>) {
    let (l, q) = laplace::linalg::symmetric_eigen(m).unwrap();
    let l = tensor::to_vec_f64(&l).unwrap();
    let p = l.len();
    let q = tensor::to_vec_f64(&q).unwrap();
    let mut idx: Vec<usize> = (0..p).collect();
    idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    (idx.iter().map(|&i| l[i]).collect(), idx.iter().map(|&i| (0..p).map(|r| q[r * p + i]).collect()).collect())
}

#[test]
fn lanczos_matches_the_dense_eigensolver() {
    for (name, kind) in [("cls_cnn", CurvatureKind::Ggn), ("hess_smooth_cnn", CurvatureKind::Hessian), ("reg_multi", CurvatureKind::Ef)] {
        let fx = Fixture::load(name);
        let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
        let op = CurvatureOperator::new(&c, &fx.data, 8).unwrap();
        let (_, full) = c.full_over(&fx.data, 8).unwrap();
        let (vals, vecs) = dense_eigen(&full);
        let k = 5;
        let ep = lanczos_top_k(&op, k, 1e-10, 400, 7).unwrap();
        for i in 0..k {
            let (got, want) = (ep.values[i], vals[i]);
            assert!((got - want).abs() <= 1e-8 * want.abs().max(1e-12), "{name}: eigenvalue {i}: {got} vs {want}");
            // Eigenvectors up to sign, where the eigenvalue is separated.
            let gap = (vals[i] - vals[i + 1]).abs().min(if i > 0 { (vals[i - 1] - vals[i]).abs() } else { f64::INFINITY });
            if gap > 1e-3 * want.abs() {
                let c: f64 = ep.vectors[i].iter().zip(&vecs[i]).map(|(a, b)| a * b).sum();
                assert!((c.abs() - 1.0).abs() < 1e-6, "{name}: eigenvector {i}: |cos| = {}", c.abs());
            }
        }
        assert!(ep.residuals.iter().zip(&ep.values).all(|(r, v)| *r <= 1e-10 * v.abs().max(1e-30)));
    }
}

#[test]
fn conjugate_gradients_solves_the_damped_system() {
    let fx = Fixture::load("cls_mlp");
    let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
    let op = CurvatureOperator::new(&c, &fx.data, 8).unwrap();
    let p = op.dim();
    let mut rng = laplace::rng::Rng::new(3);
    let b = Tensor::from_vec((0..p).map(|_| rng.normal()).collect::<Vec<f64>>(), p, &Device::Cpu).unwrap();
    let delta = 0.1;
    let r = conjugate_gradients(&op, &b, delta, 1e-10, 2000).unwrap();
    assert!(r.relative_residual <= 1e-10, "CG residual {:e}", r.relative_residual);
    // Against a dense solve.
    let (_, full) = c.full(&fx.data.batch(0, fx.data.len()).unwrap()).unwrap();
    let eye = Tensor::eye(p, DType::F64, &Device::Cpu).unwrap();
    let a = (full + (eye * delta).unwrap()).unwrap();
    let ax = a.matmul(&r.x.unsqueeze(1).unwrap()).unwrap().squeeze(1).unwrap();
    assert_close(&ax, &b, 1e-9, "A x = b");
    // An indefinite operator without damping is reported, not solved wrongly.
    let h = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Hessian, &Subset::All).unwrap();
    let hop = CurvatureOperator::new(&h, &fx.data, 8).unwrap();
    assert!(conjugate_gradients(&hop, &b, 0.0, 1e-10, 2000).is_err());
}

/// Mean over seeds within 5 standard errors of the exact value.
#[track_caller]
fn assert_unbiased(xs: &[f64], exact: f64, what: &str) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let se = (var / n).sqrt();
    assert!((mean - exact).abs() <= 5.0 * se + 1e-12 * exact.abs(), "{what}: mean {mean} vs exact {exact} (se {se})");
    var
}

#[test]
fn trace_and_diagonal_estimators_are_unbiased() {
    let fx = Fixture::load("cls_cnn");
    let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
    let (_, full) = c.full_over(&fx.data, 8).unwrap();
    let op = DenseOperator::new(full.clone()).unwrap();
    let p = op.dim();
    let eye = Tensor::eye(p, DType::F64, &Device::Cpu).unwrap();
    let diag = tensor::to_vec_f64(&(&full * &eye).unwrap().sum(1).unwrap()).unwrap();
    let exact: f64 = diag.iter().sum();
    let runs = 200;
    let hutch: Vec<f64> = (0..runs).map(|s| hutchinson_trace(&op, 9, s).unwrap()).collect();
    let hpp: Vec<f64> = (0..runs).map(|s| hutchpp_trace(&op, 9, s).unwrap()).collect();
    let v_h = assert_unbiased(&hutch, exact, "Hutchinson");
    let v_pp = assert_unbiased(&hpp, exact, "Hutch++");
    assert!(v_pp < v_h, "Hutch++ variance {v_pp} not below Hutchinson's {v_h}");
    // With all P products Hutch++ is exact.
    let all = hutchpp_trace(&op, 3 * p, 1).unwrap();
    assert!((all - exact).abs() < 1e-9 * exact, "Hutch++ with 3P products: {all} vs {exact}");
    // Diagonal, per entry.
    let ds: Vec<Vec<f64>> = (0..runs).map(|s| tensor::to_vec_f64(&hutchinson_diag(&op, 4, 100 + s).unwrap()).unwrap()).collect();
    for i in 0..p {
        let xs: Vec<f64> = ds.iter().map(|d| d[i]).collect();
        assert_unbiased(&xs, diag[i], &format!("diagonal entry {i}"));
    }
    // The curvature operator itself gives the same estimates as its dense matrix.
    let cop = CurvatureOperator::new(&c, &fx.data, 8).unwrap();
    let (a, b) = (hutchinson_trace(&cop, 5, 3).unwrap(), hutchinson_trace(&op, 5, 3).unwrap());
    assert!((a - b).abs() < 1e-10 * b.abs(), "{a} vs {b}");
}
