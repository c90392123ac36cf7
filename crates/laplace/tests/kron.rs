//! Kronecker-factored curvature (KFAC): against laplace-torch / curvlinops
//! and BackPACK fixtures (`tools/reference/make_kron_fixtures.py`), the laws
//! of the spec, Monte-Carlo convergence, and the Kron algebra against its
//! dense equivalent.

mod common;

use common::{assert_close, cases, rel_err, Fixture};
use laplace::curvature::KfacApprox;
use laplace::kron::{Kron, KronDecomposed};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Subset};

const TOL: f64 = 1e-8;

fn kron_fixture(fx: &Fixture) -> std::collections::HashMap<String, Tensor> {
    laplace::io::read_safetensors(&fx.dir.join("kron.safetensors"), &Device::Cpu).unwrap()
}

/// Dense Kronecker product of every block.
fn products(k: &Kron) -> Vec<Tensor> {
    k.blocks
        .iter()
        .map(|fs| Kron::new(vec![fs.clone()]).unwrap().to_matrix().unwrap())
        .collect()
}

fn whole(fx: &Fixture) -> Batch {
    fx.data.batch(0, fx.data.len()).unwrap()
}

#[test]
fn kron_matches_curvlinops_and_backpack() {
    for name in cases() {
        let fx = Fixture::load(&name);
        if !fx.dir.join("kron.safetensors").exists() {
            continue;
        }
        let exp = kron_fixture(&fx);
        let n = fx.data.len();
        for (kind, key) in [(CurvatureKind::Ggn, "ggn"), (CurvatureKind::Ef, "ef")] {
            for (approx, akey) in [(KfacApprox::Expand, "expand"), (KfacApprox::Reduce, "reduce")] {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
                let (loss, k) = c.kron(&whole(&fx), n, approx).unwrap();
                assert_close(&loss, &exp[&format!("{key}.{akey}.loss")], TOL, &format!("{name} {key} loss"));
                assert_eq!(k.blocks.len(), fx.model.params().len(), "{name}: one block per parameter tensor");
                for (b, prod) in products(&k).iter().enumerate() {
                    let what = format!("{name} {key}.{akey} block {b}");
                    assert_close(prod, &exp[&format!("{key}.{akey}.{b}.product")], TOL, &what);
                    if key == "ggn" {
                        if let Some(kflr) = exp.get(&format!("kflr.{b}.product")) {
                            assert_close(prod, kflr, TOL, &format!("{what} vs BackPACK KFLR"));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn kron_over_batches_is_the_factorwise_sum() {
    for name in ["cls_cnn", "reg_multi", "cls_mlp"] {
        let fx = Fixture::load(name);
        let n = fx.data.len();
        for kind in [CurvatureKind::Ggn, CurvatureKind::Ef, CurvatureKind::FisherMc { samples: 3, seed: 2 }] {
            for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
                let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
                let (_, all) = c.kron(&whole(&fx), n, approx).unwrap();
                let (_, parts) = c.kron_over(&fx.data, 3, n, approx).unwrap();
                for (b, (x, y)) in all.blocks.iter().zip(&parts.blocks).enumerate() {
                    for (f, (p, q)) in x.iter().zip(y).enumerate() {
                        assert_close(q, p, 1e-12, &format!("{name} {kind:?} {approx:?} block {b} factor {f}"));
                    }
                }
            }
        }
    }
}

/// The backward pass in chunks of output rows (one row at a time with the
/// smallest bound on temporaries) gives the factors and diagonals of all
/// rows at once: B and the exact diagonals summed over the chunks, A formed
/// once. Convolutions, BatchNorm's exact-diagonal blocks, one-hot Embedding
/// factors and attention, with K > 1 rows (the exact GGN, an MC Fisher).
#[test]
fn kron_and_diag_in_chunks_of_rows_are_those_of_all_rows() {
    for name in ["cls_cnn", "reg_multi", "graph/resnet_bn", "transformer/encoder_mha"] {
        let fx = Fixture::load(name);
        let n = fx.data.len();
        for kind in [CurvatureKind::Ggn, CurvatureKind::FisherMc { samples: 3, seed: 5 }] {
            let all = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
            let rows = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap().with_chunk_elems(1);
            let (_, d_all) = all.diag(&whole(&fx)).unwrap();
            let (_, d_rows) = rows.diag(&whole(&fx)).unwrap();
            assert_close(&d_rows, &d_all, 1e-12, &format!("{name} {kind:?}: diag"));
            for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
                let (_, k_all) = all.kron(&whole(&fx), n, approx).unwrap();
                let (_, k_rows) = rows.kron(&whole(&fx), n, approx).unwrap();
                assert_eq!(k_all.blocks.len(), k_rows.blocks.len());
                for (b, (x, y)) in k_all.blocks.iter().zip(&k_rows.blocks).enumerate() {
                    assert_eq!(x.len(), y.len(), "{name} block {b}: factor count");
                    for (f, (p, q)) in x.iter().zip(y).enumerate() {
                        assert_close(q, p, 1e-12, &format!("{name} {kind:?} {approx:?} block {b} factor {f}"));
                    }
                }
            }
        }
    }
}

/// `7 · kron(x, N = 1)` equals `kron(x repeated 7 times, N = 7)` (as
/// Kronecker products: the scalar is split differently among the factors).
#[test]
fn kron_normalization_with_repeated_points() {
    for name in ["cls_cnn", "reg_multi"] {
        let fx = Fixture::load(name);
        let b = whole(&fx);
        let rep = |t: &Tensor| Tensor::cat(&vec![t.clone(); 7], 0).unwrap();
        let seven = Batch::new(b.x.map(|t| Ok(rep(t))).unwrap(), rep(&b.y));
        for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
            let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
            let (_, one) = c.kron(&b, 1, approx).unwrap();
            let (_, many) = c.kron(&seven, 7, approx).unwrap();
            let scaled = one.scale(7.0).unwrap();
            for (i, (x, y)) in products(&scaled).iter().zip(products(&many)).enumerate() {
                assert_close(&y, x, 1e-12, &format!("{name} {approx:?} block {i}"));
            }
        }
    }
}

/// One point, N = 1: a Linear layer's KFAC block is exact (its Kronecker
/// product is the GGN / EF block itself), so in particular the diagonal.
#[test]
fn single_point_linear_blocks_are_exact() {
    for name in ["reg_multi", "cls_mlp", "act_tanh", "cls_nobias"] {
        let fx = Fixture::load(name);
        for kind in [CurvatureKind::Ggn, CurvatureKind::Ef] {
            let c = Curvature::new(&fx.model, fx.likelihood, kind, &Subset::All).unwrap();
            for n in 0..fx.data.len() {
                let point = fx.data.batch(n, 1).unwrap();
                let (_, k) = c.kron(&point, 1, KfacApprox::Expand).unwrap();
                let (_, full) = c.full(&point).unwrap();
                let (_, diag) = c.diag(&point).unwrap();
                for (p, prod) in fx.model.params().iter().zip(products(&k)) {
                    let block = full.narrow(0, p.offset, p.numel).unwrap().narrow(1, p.offset, p.numel).unwrap();
                    let what = format!("{name} {kind:?} point {n} {}", p.name);
                    assert_close(&prod, &block, 1e-12, &what);
                    let d = diag.narrow(0, p.offset, p.numel).unwrap();
                    let kd = Kron::new(vec![k.blocks[fx.model.params().iter().position(|q| q == p).unwrap()].clone()])
                        .unwrap()
                        .diag()
                        .unwrap();
                    assert_close(&kd, &d, 1e-12, &format!("{what} diagonal"));
                }
            }
        }
    }
}

/// The MC-Fisher KFAC converges to the type-2 KFAC as S grows.
#[test]
fn monte_carlo_kron_converges_to_type2() {
    for name in ["cls_cnn", "reg_multi"] {
        let fx = Fixture::load(name);
        let n = fx.data.len();
        let exact = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
        let (_, k2) = exact.kron(&whole(&fx), n, KfacApprox::Expand).unwrap();
        let err = |s: usize| {
            let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::FisherMc { samples: s, seed: 9 }, &Subset::All)
                .unwrap();
            let (_, k) = c.kron(&whole(&fx), n, KfacApprox::Expand).unwrap();
            rel_err(&k.to_matrix().unwrap(), &k2.to_matrix().unwrap())
        };
        let (e8, e4096) = (err(8), err(4096));
        assert!(e4096 < 0.1, "{name}: MC KFAC with 4096 samples is {e4096:.3} from type-2");
        assert!(e4096 < e8 / 4.0, "{name}: no convergence: {e8:.3} (8 samples) vs {e4096:.3} (4096)");
    }
}

#[test]
fn kron_refuses_subnetworks_and_bad_n() {
    let fx = Fixture::load("cls_mlp");
    let idx = fx.subnetwork.clone().unwrap();
    let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::Subnetwork(idx)).unwrap();
    let e = c.kron(&whole(&fx), 8, KfacApprox::Expand).unwrap_err().to_string();
    assert!(e.contains("subnetwork"), "{e}");
    let c = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::All).unwrap();
    let e = c.kron(&whole(&fx), 0, KfacApprox::Expand).unwrap_err().to_string();
    assert!(e.contains("N ≥ 1"), "{e}");
    // The last layer alone: its two blocks, equal to the last blocks of the whole model.
    let ll = Curvature::new(&fx.model, fx.likelihood, CurvatureKind::Ggn, &Subset::LastLayer).unwrap();
    let (_, kl) = ll.kron(&whole(&fx), 8, KfacApprox::Expand).unwrap();
    let (_, ka) = c.kron(&whole(&fx), 8, KfacApprox::Expand).unwrap();
    assert_eq!(kl.blocks.len(), 2);
    let tail = &ka.blocks[ka.blocks.len() - 2..];
    for (x, y) in kl.blocks.iter().zip(tail) {
        for (f, g) in x.iter().zip(y) {
            assert_close(f, g, 1e-14, "last-layer KFAC");
        }
    }
}

// ---- Kron algebra against dense matrices ----

fn dev() -> Device {
    Device::Cpu
}

/// A random symmetric positive semi-definite `(n, n)` matrix of rank ≤ r.
fn spd(n: usize, r: usize, seed: u64) -> Tensor {
    let mut rng = laplace::rng::Rng::new(seed);
    let x: Vec<f64> = (0..n * r).map(|_| rng.normal()).collect();
    let x = Tensor::from_vec(x, (n, r), &dev()).unwrap();
    x.matmul(&x.t().unwrap()).unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = laplace::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), shape, &dev()).unwrap()
}

/// Blocks: two dense factors (one rank-deficient), dense × diagonal,
/// a single dense factor, a single diagonal factor.
fn example() -> Kron {
    let diag = |v: &[f64]| Tensor::new(v, &dev()).unwrap();
    Kron::new(vec![
        vec![spd(3, 3, 1), spd(4, 2, 2)],
        vec![spd(2, 2, 3), diag(&[0.5, 2.0, 1.5])],
        vec![spd(5, 5, 4)],
        vec![diag(&[0.3, 1.0, 4.0, 0.0])],
    ])
    .unwrap()
}

fn dense_logdet(m: &Tensor) -> f64 {
    laplace::linalg::symmetric_eigenvalues(m).unwrap().iter().map(|l| l.ln()).sum()
}

/// Dense K^e by eigendecomposition.
fn dense_pow(m: &Tensor, e: f64) -> Tensor {
    let (l, q) = laplace::linalg::symmetric_eigen(m).unwrap();
    let l = l.clamp(0.0, f64::INFINITY).unwrap().powf(e).unwrap();
    let n = l.dim(0).unwrap();
    q.broadcast_mul(&l.reshape((1, n)).unwrap()).unwrap().matmul(&q.t().unwrap()).unwrap()
}

/// δ per block on the dense matrix: K + blockdiag(δ_b I) (no damping).
fn dense_plus(k: &Kron, deltas: &[f64]) -> Tensor {
    let sizes = k.block_sizes().unwrap();
    let mut d = Vec::new();
    for (s, &delta) in sizes.iter().zip(deltas) {
        d.extend(std::iter::repeat_n(delta, *s));
    }
    let p = d.len();
    let dm = Tensor::from_vec(d, p, &dev()).unwrap();
    let eye = Tensor::eye(p, DType::F64, &dev()).unwrap();
    (k.to_matrix().unwrap() + eye.broadcast_mul(&dm.reshape((1, p)).unwrap()).unwrap()).unwrap()
}

#[test]
fn kron_products_diag_logdet_and_sums_match_dense() {
    let k = example();
    let m = k.to_matrix().unwrap();
    let p = k.n_params().unwrap();
    assert_eq!(m.dims(), [p, p]);
    // to_matrix: block 0 is B ⊗ A acting on row-major X: (B ⊗ A) vec X = vec(B X Aᵀ).
    let x = randn(&[3, 4], 7);
    let lhs = m.narrow(0, 0, 12).unwrap().narrow(1, 0, 12).unwrap().matmul(&x.reshape((12, 1)).unwrap()).unwrap();
    let rhs = k.blocks[0][0].matmul(&x).unwrap().matmul(&k.blocks[0][1].t().unwrap()).unwrap();
    assert_close(&lhs.reshape(12).unwrap(), &rhs.reshape(12).unwrap(), 1e-13, "(B ⊗ A) vec X = vec(B X Aᵀ)");
    // bmm for (P), (B, P), (B, K, P).
    for shape in [vec![p], vec![3, p], vec![2, 3, p]] {
        let w = randn(&shape, 11);
        let got = k.bmm(&w).unwrap();
        let w2 = w.reshape(((), p)).unwrap();
        let want = w2.matmul(&m).unwrap().reshape(shape.as_slice()).unwrap();
        assert_close(&got, &want, 1e-13, &format!("Kron.bmm {shape:?}"));
    }
    // diag.
    let eye = Tensor::eye(p, DType::F64, &dev()).unwrap();
    assert_close(&k.diag().unwrap(), &(&m * &eye).unwrap().sum(1).unwrap(), 1e-13, "Kron.diag");
    // Sum and scalar product.
    let k2 = k.scale(2.5).unwrap();
    assert_close(&k2.to_matrix().unwrap(), &(&m * 2.5).unwrap(), 1e-13, "2.5 · Kron");
    // Kron + Kron is factor-wise (not the sum of the matrices).
    let sum = k.add(&k2).unwrap();
    for (b, fs) in sum.blocks.iter().enumerate() {
        for (f, t) in fs.iter().enumerate() {
            let want = (&k.blocks[b][f] + &k2.blocks[b][f]).unwrap();
            assert_close(t, &want, 1e-15, &format!("Kron + Kron block {b} factor {f}"));
        }
    }
    assert!(k.add(&Kron::new(k.blocks[..2].to_vec()).unwrap()).is_err());
    // logdet of a positive definite Kron.
    let pd = Kron::new(vec![vec![spd(3, 3, 1), spd(4, 4, 5)], vec![spd(2, 2, 6)], vec![Tensor::new(&[0.5f64, 2.0], &dev()).unwrap()]]).unwrap();
    let want = dense_logdet(&pd.to_matrix().unwrap());
    let got = pd.logdet().unwrap();
    assert!((got - want).abs() < 1e-10 * want.abs().max(1.0), "Kron.logdet {got} vs {want}");
    // A singular factor is an error, not NaN.
    assert!(k.logdet().is_err());
}

#[test]
fn decomposed_kron_matches_dense_with_prior_and_damping() {
    let k = example();
    let n_blocks = k.blocks.len();
    let p = k.n_params().unwrap();
    let eye = Tensor::eye(p, DType::F64, &dev()).unwrap();
    let per_block = [0.7, 1.3, 0.2, 2.0];
    for deltas in [vec![0.9], per_block.to_vec()] {
        let full_deltas: Vec<f64> = if deltas.len() == 1 { vec![deltas[0]; n_blocks] } else { deltas.clone() };
        let dec: KronDecomposed = k.decompose(false).unwrap().add_delta(&deltas).unwrap();
        let dense = dense_plus(&k, &full_deltas);
        assert_close(&dec.to_matrix(1.0).unwrap(), &dense, 1e-12, "decomposed to_matrix(1) + δ");
        let got = dec.logdet().unwrap();
        let want = dense_logdet(&dense);
        assert!((got - want).abs() < 1e-10 * want.abs(), "logdet {got} vs {want} (δ {deltas:?})");
        for e in [1.0, -1.0, -0.5] {
            let de = dense_pow(&dense, e);
            assert_close(&dec.to_matrix(e).unwrap(), &de, 1e-11, &format!("to_matrix({e})"));
            assert_close(&dec.diag(e).unwrap(), &(&de * &eye).unwrap().sum(1).unwrap(), 1e-11, &format!("diag({e})"));
            for shape in [vec![p], vec![4, p], vec![2, 3, p]] {
                let w = randn(&shape, 13);
                let want = w.reshape(((), p)).unwrap().matmul(&de).unwrap().reshape(shape.as_slice()).unwrap();
                assert_close(&dec.bmm(&w, e).unwrap(), &want, 1e-11, &format!("bmm exponent {e} {shape:?}"));
            }
        }
        // W H⁻¹ Wᵀ.
        let w = randn(&[2, 3, p], 17);
        let hinv = dense_pow(&dense, -1.0);
        let want = w.broadcast_matmul(&hinv).unwrap().matmul(&w.transpose(1, 2).unwrap()).unwrap();
        assert_close(&dec.inv_square_form(&w).unwrap(), &want, 1e-11, "inv_square_form");
    }
    // Damping: a two-factor block's eigenvalues are (λ₁ + √δ) ⊗ (λ₂ + √δ),
    // i.e. (B + √δ I) ⊗ (A + √δ I); one-factor blocks get + δ.
    let delta = 0.49;
    let dec = k.decompose(true).unwrap().add_delta(&[delta]).unwrap();
    let s = delta.sqrt();
    let shifted = Kron::new(
        k.blocks
            .iter()
            .map(|fs| {
                if fs.len() == 2 {
                    fs.iter()
                        .map(|f| {
                            if f.rank() == 1 {
                                (f + s).unwrap()
                            } else {
                                let n = f.dim(0).unwrap();
                                (f + (Tensor::eye(n, DType::F64, &dev()).unwrap() * s).unwrap()).unwrap()
                            }
                        })
                        .collect()
                } else {
                    fs.clone()
                }
            })
            .collect(),
    )
    .unwrap();
    let deltas: Vec<f64> = k.blocks.iter().map(|fs| if fs.len() == 2 { 0.0 } else { delta }).collect();
    let dense = dense_plus(&shifted, &deltas);
    assert_close(&dec.to_matrix(1.0).unwrap(), &dense, 1e-12, "damped to_matrix");
    let (got, want) = (dec.logdet().unwrap(), dense_logdet(&dense));
    assert!((got - want).abs() < 1e-10 * want.abs(), "damped logdet {got} vs {want}");
    let w = randn(&[3, p], 19);
    let want = w.matmul(&dense_pow(&dense, -1.0)).unwrap();
    assert_close(&dec.bmm(&w, -1.0).unwrap(), &want, 1e-11, "damped bmm(-1)");
    // Scaling a decomposition scales the matrix.
    let sc = k.decompose(false).unwrap().scale(3.0).unwrap();
    assert_close(&sc.to_matrix(1.0).unwrap(), &(k.to_matrix().unwrap() * 3.0).unwrap(), 1e-12, "3 · KronDecomposed");
    // Bad priors.
    assert!(k.decompose(false).unwrap().add_delta(&[1.0, 2.0]).is_err());
    assert!(k.decompose(false).unwrap().add_delta(&[-1.0]).is_err());
    let _ = tensor::to_vec_f64(&dec.diag(1.0).unwrap()).unwrap();
}
