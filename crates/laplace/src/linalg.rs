//! Dense linear algebra through faer: symmetric eigendecompositions,
//! Cholesky factorizations, Gram matrices. (faer's matrix products for
//! tensors live in `tensor::matmul`.) Every faer routine here is followed
//! by `tensor::clear_simd_upper_state`, for the reason given there.

use faer::Side;

use crate::error::{bail, Result};
use crate::tensor::{self, Tensor};

fn square(a: &Tensor, what: &str) -> Result<faer::Mat<f64>> {
    let m = tensor::to_faer(a)?;
    if m.nrows() != m.ncols() {
        bail!(Invalid, "{what} needs a square matrix, got {:?}", a.dims());
    }
    Ok(m)
}

/// The rows (= columns) of a symmetric matrix that hold a nonzero entry.
///
/// An all-zero row i makes e_i an eigenvector with eigenvalue 0, so it can
/// be split off before the decomposition. KFAC factors of wide layers have
/// many (every patch row that ReLU or padding keeps at zero), and faer's
/// tridiagonal QR fails to converge on such matrices ("NoConvergence" on a
/// 4608 × 4608 input factor of resnet18 with 4222 zero rows); without them
/// it converges, and the decomposition is smaller.
fn live_rows(m: &faer::Mat<f64>) -> Vec<usize> {
    (0..m.nrows()).filter(|&i| (0..m.ncols()).any(|j| m[(i, j)] != 0.0)).collect()
}

/// `m[live][:, live]`.
fn restrict(m: &faer::Mat<f64>, live: &[usize]) -> faer::Mat<f64> {
    faer::Mat::from_fn(live.len(), live.len(), |i, j| m[(live[i], live[j])])
}

fn evd_error(e: impl std::fmt::Debug) -> crate::Error {
    crate::Error::NonFinite(format!("symmetric eigendecomposition failed: {e:?}"))
}

/// Eigenvalues of a symmetric `(n, n)` matrix, ascending.
pub fn symmetric_eigenvalues(a: &Tensor) -> Result<Vec<f64>> {
    let m = square(a, "eigenvalues")?;
    let live = live_rows(&m);
    let mut vals = if live.len() == m.nrows() {
        m.self_adjoint_eigenvalues(Side::Lower).map_err(evd_error)?
    } else {
        restrict(&m, &live).self_adjoint_eigenvalues(Side::Lower).map_err(evd_error)?
    };
    // faer's decompositions run its GEMM kernels (see clear_simd_upper_state).
    tensor::clear_simd_upper_state(tensor::SimdScope::AllThreads);
    vals.extend(std::iter::repeat_n(0.0, m.nrows() - live.len()));
    vals.sort_by(f64::total_cmp);
    Ok(vals)
}

/// Eigendecomposition A = Q diag(λ) Qᵀ of a symmetric `(n, n)` matrix:
/// λ ascending `(n,)` and Q `(n, n)` (columns are eigenvectors), in the
/// dtype and on the device of `a`. All-zero rows are split off first
/// (their eigenvectors are unit vectors with eigenvalue 0).
pub fn symmetric_eigen(a: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = square(a, "eigendecomposition")?;
    let n = m.nrows();
    let live = live_rows(&m);
    let (vals, vecs) = if live.len() == n {
        let evd = m.self_adjoint_eigen(Side::Lower).map_err(evd_error)?;
        ((0..n).map(|i| evd.S()[i]).collect::<Vec<f64>>(), evd.U().to_owned())
    } else {
        let evd = restrict(&m, &live).self_adjoint_eigen(Side::Lower).map_err(evd_error)?;
        // Columns: the sub-problem's eigenvectors embedded, and e_i for every
        // zero row i, ordered by eigenvalue.
        let mut is_live = vec![false; n];
        live.iter().for_each(|&i| is_live[i] = true);
        let dead: Vec<usize> = (0..n).filter(|&i| !is_live[i]).collect();
        let mut cols: Vec<(f64, Option<usize>, usize)> = (0..live.len()).map(|j| (evd.S()[j], Some(j), 0)).collect();
        cols.extend(dead.iter().map(|&i| (0.0, None, i)));
        cols.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut q = faer::Mat::<f64>::zeros(n, n);
        for (c, &(_, sub, unit)) in cols.iter().enumerate() {
            match sub {
                Some(j) => live.iter().enumerate().for_each(|(r, &i)| q[(i, c)] = evd.U()[(r, j)]),
                None => q[(unit, c)] = 1.0,
            }
        }
        (cols.iter().map(|c| c.0).collect(), q)
    };
    tensor::clear_simd_upper_state(tensor::SimdScope::AllThreads);
    let vals = tensor::from_f64(vals, &[n], a.dtype(), a.device())?;
    let vecs = tensor::from_faer(vecs.as_ref(), a.dtype(), a.device())?;
    Ok((vals, vecs))
}

/// Cholesky factorization A = L Lᵀ of a symmetric positive definite matrix,
/// held in f64.
pub struct Cholesky {
    l: faer::Mat<f64>,
}

impl Cholesky {
    /// Factorize `a (n, n)`; an error names the failure if `a` is not positive definite.
    pub fn new(a: &Tensor) -> Result<Self> {
        Self::from_faer(square(a, "Cholesky factorization")?)
    }

    /// Factorize a faer matrix (see [`Cholesky::new`]).
    pub fn from_faer(m: faer::Mat<f64>) -> Result<Self> {
        let llt = m
            .llt(Side::Lower)
            .map_err(|e| crate::Error::NonFinite(format!("matrix is not positive definite ({e:?})")));
        tensor::clear_simd_upper_state(tensor::SimdScope::AllThreads);
        Ok(Cholesky { l: llt?.L().to_owned() })
    }

    /// n, the size of the factorized matrix.
    pub fn dim(&self) -> usize {
        self.l.nrows()
    }

    /// log det A = 2 Σ log L_ii.
    pub fn logdet(&self) -> f64 {
        (0..self.dim()).map(|i| 2.0 * self.l[(i, i)].ln()).sum()
    }

    /// L⁻¹ B for B `(n, k)`.
    pub fn solve_lower(&self, b: faer::Mat<f64>) -> faer::Mat<f64> {
        let mut x = b;
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(self.l.as_ref(), x.as_mut(), faer::Par::Seq);
        tensor::clear_simd_upper_state(tensor::SimdScope::ThisThread);
        x
    }

    /// L⁻ᵀ B for B `(n, k)`.
    pub fn solve_lower_transpose(&self, b: faer::Mat<f64>) -> faer::Mat<f64> {
        let mut x = b;
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(self.l.transpose(), x.as_mut(), faer::Par::Seq);
        tensor::clear_simd_upper_state(tensor::SimdScope::ThisThread);
        x
    }

    /// A⁻¹ B for B `(n, k)`.
    pub fn solve(&self, b: faer::Mat<f64>) -> faer::Mat<f64> {
        self.solve_lower_transpose(self.solve_lower(b))
    }

    /// The diagonal of A⁻¹: (A⁻¹)_ii = Σ_k (L⁻¹)_{ki}².
    pub fn inverse_diag(&self) -> Vec<f64> {
        let n = self.dim();
        let linv = self.solve_lower(faer::Mat::<f64>::identity(n, n));
        (0..n).map(|i| (0..n).map(|k| linv[(k, i)].powi(2)).sum()).collect()
    }

    /// A⁻¹ as a dense matrix.
    pub fn inverse(&self) -> faer::Mat<f64> {
        let n = self.dim();
        self.solve(faer::Mat::<f64>::identity(n, n))
    }
}

/// H = Σ AᵀA over row blocks A `(n, P)`, accumulated as symmetric rank-n
/// updates of the lower triangle only (half the operations of a full
/// product), in the dtype of the blocks. The Gram matrices of per-sample
/// gradients (full GGN, Fisher, EF) are built with it. (Measured: faer is
/// fastest with a column-major destination; writing straight into the
/// row-major result was 25% slower.) The result is that buffer itself, made
/// symmetric in place: one `(P, P)` allocation in all.
pub struct GramAccumulator(Accumulated);

/// The accumulator's buffer, in its dtype.
enum Accumulated {
    F32(LowerGram<f32>),
    F64(LowerGram<f64>),
}

impl GramAccumulator {
    /// A zero `(p, p)` accumulator in `dtype` (f32 or f64).
    pub fn new(p: usize, dtype: crate::tensor::DType) -> Self {
        match dtype {
            crate::tensor::DType::F32 => GramAccumulator(Accumulated::F32(LowerGram::zeros(p))),
            _ => GramAccumulator(Accumulated::F64(LowerGram::zeros(p))),
        }
    }

    /// H += AᵀA. `a` is read in place when it is contiguous (row-major) or
    /// the transpose of a contiguous matrix (column-major), copied otherwise.
    pub fn add(&mut self, a: &Tensor) -> Result<()> {
        let (n, p) = a.dims2()?;
        let own = match &self.0 {
            Accumulated::F32(h) => h.p,
            Accumulated::F64(h) => h.p,
        };
        if p != own {
            bail!(Invalid, "Gram update with {p} columns, accumulator has {own}");
        }
        let at = a.t()?;
        let (data, col_major) = if !a.is_contiguous() && at.is_contiguous() {
            (at, true)
        } else {
            (crate::tensor::contiguous(a)?, false)
        };
        fn update<T: GramScalar>(h: &mut LowerGram<T>, v: &[T], n: usize, p: usize, col_major: bool) {
            let m = if col_major {
                faer::MatRef::from_column_major_slice(v, n, p)
            } else {
                faer::MatRef::from_row_major_slice(v, n, p)
            };
            h.add(m);
        }
        match &mut self.0 {
            Accumulated::F32(h) => crate::tensor::with_host_slice(&data, |v: &[f32]| update(h, v, n, p, col_major))?,
            Accumulated::F64(h) => crate::tensor::with_host_slice(&data, |v: &[f64]| update(h, v, n, p, col_major))?,
        }
        Ok(())
    }

    /// `scale · H`, the symmetric matrix `(P, P)`, as a tensor of `dtype` on
    /// `device`: the accumulator's own buffer (no copy where `dtype` is the
    /// accumulator's).
    pub fn finish(self, scale: f64, dtype: crate::tensor::DType, device: &crate::tensor::Device) -> Result<Tensor> {
        let t = match self.0 {
            Accumulated::F32(h) => {
                let p = h.p;
                Tensor::from_vec(h.into_symmetric(scale as f32), (p, p), device)?
            }
            Accumulated::F64(h) => {
                let p = h.p;
                Tensor::from_vec(h.into_symmetric(scale), (p, p), device)?
            }
        };
        Ok(t.to_dtype(dtype)?)
    }
}

/// `scale · X Xᵀ` for `x (p, n)`, symmetric, as a rank-n update of one
/// triangle (half the operations of `x.matmul(x.t())`): KFAC's factors
/// A ∝ Σ u uᵀ and B = Σ v vᵀ are such products with n ≫ p. The scale is
/// applied in place (KFAC's 1/(N·R)), not as a second `(p, p)` tensor.
pub fn gram_rows(x: &Tensor, scale: f64) -> Result<Tensor> {
    let mut gram = GramAccumulator::new(x.dim(0)?, x.dtype());
    gram.add(&x.t()?)?;
    gram.finish(scale, x.dtype(), x.device())
}

/// Σ_b V_b V_bᵀ `(O, O)` for the blocks V_b `(O, R)` of `v (B, O, R)`: the
/// Gram matrix of every column of every block (KFAC's output factor of a
/// convolution, B = Σ_{n,k,r} v vᵀ), read in place. As one product it
/// needed V permuted to `(O, B·R)` first, a copy of all of V (42 MB for a
/// CIFAR CNN's first layer with K = 10). Blocks are split over rayon's
/// threads, each accumulating its own triangle, when one block is too small
/// to thread by itself.
pub fn gram_of_blocks(v: &Tensor) -> Result<Tensor> {
    let (b, o, r) = v.dims3()?;
    let v = tensor::contiguous(v)?;
    fn sum<T: GramScalar>(v: &[T], b: usize, o: usize, r: usize) -> Vec<T> {
        use rayon::prelude::*;
        // Block V_b as the column-major (R, O) matrix V_bᵀ: H += (V_bᵀ)ᵀ V_bᵀ.
        let block = |i: usize| faer::MatRef::from_column_major_slice(&v[i * o * r..(i + 1) * o * r], r, o);
        let per_block = o * o * r / 2;
        let h = if b <= 1 || per_block >= tensor::THREADING_THRESHOLD {
            let mut h = LowerGram::zeros(o);
            (0..b).for_each(|i| h.add(block(i)));
            h
        } else {
            let tasks = rayon::current_num_threads().min(b);
            let per = b.div_ceil(tasks);
            (0..tasks)
                .into_par_iter()
                .map(|t| {
                    let mut h = LowerGram::zeros(o);
                    (t * per..((t + 1) * per).min(b)).for_each(|i| h.add(block(i)));
                    h
                })
                .reduce(|| LowerGram::zeros(o), LowerGram::sum)
        };
        h.into_symmetric(T::from(1u8))
    }
    let out = match v.dtype() {
        tensor::DType::F32 => Tensor::from_vec(tensor::with_host_slice(&v, |s: &[f32]| sum(s, b, o, r))?, (o, o), v.device())?,
        _ => Tensor::from_vec(tensor::with_host_slice(&v, |s: &[f64]| sum(s, b, o, r))?, (o, o), v.device())?.to_dtype(v.dtype())?,
    };
    Ok(out)
}

/// The element types a [`LowerGram`] holds.
trait GramScalar: faer::traits::ComplexField + Copy + Default + Send + Sync + From<u8> + std::ops::MulAssign + std::ops::AddAssign {}
impl GramScalar for f32 {}
impl GramScalar for f64 {}

/// A column-major `(p, p)` buffer whose lower triangle (i ≥ j, at
/// `j·p + i`) accumulates rank-k updates; the upper part stays zero until
/// [`LowerGram::into_symmetric`] mirrors it.
struct LowerGram<T> {
    p: usize,
    buf: Vec<T>,
}

impl<T: GramScalar> LowerGram<T> {
    /// All zero. (`vec![0; n]` of a float is a zeroed allocation: the
    /// kernel's fresh pages, no memset.)
    fn zeros(p: usize) -> Self {
        LowerGram { p, buf: vec![T::default(); p * p] }
    }

    /// Lower triangle += mᵀm for `m (n, p)` in any layout.
    fn add(&mut self, m: faer::MatRef<'_, T>) {
        let p = self.p;
        syrk_lower(faer::MatMut::from_column_major_slice_mut(&mut self.buf, p, p), m);
    }

    /// The element-wise sum of two accumulators (a reduction's step).
    fn sum(mut self, other: Self) -> Self {
        self.buf.iter_mut().zip(&other.buf).for_each(|(a, &b)| *a += b);
        self
    }

    /// `scale ·` the symmetric matrix, row-major (which, symmetric, is the
    /// same buffer as column-major), made in place: the lower triangle
    /// scaled, then copied into the upper one.
    ///
    /// Threads own blocks of 8 columns. Column j's upper entries (i < j, at
    /// `j·p + i`) are the lower entries (j, i) of the columns i < j, at
    /// `i·p + j`; for a block j0..j0+8 those are 8 adjacent entries of each
    /// column i. Writes go only to upper entries, reads only to lower
    /// ones, so no two threads touch the same element.
    fn into_symmetric(mut self, scale: T) -> Vec<T> {
        use rayon::prelude::*;
        const COLS: usize = 8;
        let p = self.p;
        if p == 0 {
            return self.buf;
        }
        if scale != T::from(1u8) {
            self.buf.par_chunks_mut(p).enumerate().for_each(|(j, col)| col[j..].iter_mut().for_each(|x| *x *= scale));
        }
        struct Shared<T>(*mut T);
        // SAFETY: the pointer is only used as described above: disjoint
        // writes, and reads of elements no thread writes.
        unsafe impl<T: Send> Sync for Shared<T> {}
        let base = Shared(self.buf.as_mut_ptr());
        let base = &base;
        (0..p.div_ceil(COLS)).into_par_iter().for_each(|blk| {
            let j0 = blk * COLS;
            let j1 = (j0 + COLS).min(p);
            for i in 0..j1 - 1 {
                for j in (j0.max(i + 1))..j1 {
                    // SAFETY: i < j < p, so both offsets are in the p·p
                    // buffer; (j, i) at i·p + j is lower (read only), (i, j)
                    // at j·p + i is upper and written by this block alone.
                    unsafe { *base.0.add(j * p + i) = *base.0.add(i * p + j) };
                }
            }
        });
        self.buf
    }
}

/// Lower triangle of `h (p, p)` += mᵀm for `m (n, p)` in any layout.
fn syrk_lower<T: faer::traits::ComplexField + Copy + From<u8>>(h: faer::MatMut<'_, T>, m: faer::MatRef<'_, T>) {
    use faer::linalg::matmul::triangular::{matmul, BlockStructure};
    // n·p²/2 multiply-adds (one triangle).
    let (par, scope) = tensor::faer_par(m.nrows() * m.ncols() * m.ncols() / 2);
    matmul(
        h,
        BlockStructure::TriangularLower,
        faer::Accum::Add,
        m.transpose(),
        BlockStructure::Rectangular,
        m,
        BlockStructure::Rectangular,
        T::from(1u8),
        par,
    );
    tensor::clear_simd_upper_state(scope);
}

/// The measured GEMM rate of this machine: C = A B for square `n × n`
/// matrices of `dtype` with faer on rayon's threads (`RAYON_NUM_THREADS`),
/// one warm-up and then `repeat` runs; the best run's 2n³ / t in GFLOP/s.
/// The yardstick for the matmul-bound quantities of `laplace bench`.
pub fn gemm_gflops(n: usize, dtype: crate::tensor::DType, repeat: usize) -> Result<f64> {
    fn rate<T: faer::traits::ComplexField + Copy + From<u8>>(n: usize, repeat: usize) -> f64 {
        let a = faer::Mat::<T>::from_fn(n, n, |i, j| T::from(((i * 7 + j * 3) % 11) as u8));
        let b = faer::Mat::<T>::from_fn(n, n, |i, j| T::from(((i * 5 + j) % 13) as u8));
        let mut c = faer::Mat::<T>::zeros(n, n);
        let mut best = f64::INFINITY;
        for run in 0..=repeat.max(1) {
            let t0 = std::time::Instant::now();
            faer::linalg::matmul::matmul(c.as_mut(), faer::Accum::Replace, a.as_ref(), b.as_ref(), T::from(1u8), faer::Par::rayon(0));
            let t = t0.elapsed().as_secs_f64();
            tensor::clear_simd_upper_state(tensor::SimdScope::AllThreads);
            if run > 0 {
                best = best.min(t);
            }
        }
        std::hint::black_box(&c);
        2.0 * (n as f64).powi(3) / best / 1e9
    }
    crate::budget::check(&format!("the GEMM yardstick with n = {n}"), &[3, n, n], dtype.size_in_bytes())?;
    match dtype {
        crate::tensor::DType::F32 => Ok(rate::<f32>(n, repeat)),
        crate::tensor::DType::F64 => Ok(rate::<f64>(n, repeat)),
        other => bail!(Invalid, "the GEMM yardstick runs in float32 or float64, not {other:?}"),
    }
}

#[cfg(test)]
mod gram_tests {
    use crate::tensor::{DType, Device, Tensor};

    /// `gram_rows(x, s)` equals s · X Xᵀ for contiguous X and for the
    /// transpose of a contiguous matrix (both layouts it reads without
    /// copying), f32 and f64, and is exactly symmetric (the upper triangle
    /// mirrored in place, across the 8-column blocks and a partial last one).
    #[test]
    fn gram_rows_is_scaled_x_xt() {
        let dev = Device::Cpu;
        for (p, n) in [(70, 130), (1, 5), (8, 3), (17, 40)] {
            let a = Tensor::randn(0f64, 1.0, (p, n), &dev).unwrap();
            for x in [a.clone(), a.t().unwrap().contiguous().unwrap().t().unwrap()] {
                for scale in [1.0, 0.37] {
                    let want = (x.matmul(&x.t().unwrap()).unwrap() * scale).unwrap();
                    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                        let got = super::gram_rows(&x.to_dtype(dtype).unwrap(), scale).unwrap();
                        assert_eq!(got.dtype(), dtype);
                        let got = got.to_dtype(DType::F64).unwrap();
                        let asym = (&got - got.t().unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                        assert_eq!(asym, 0.0, "({p}, {n}) {dtype:?}: not symmetric");
                        let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                        let size = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                        assert!(err <= tol * size, "({p}, {n}) {dtype:?} scale {scale}: {err}");
                    }
                }
            }
        }
    }

    /// `gram_of_blocks` is V as (O, B·R) times its transpose, for blocks
    /// threaded one at a time (large) and split over threads (small), f32
    /// and f64.
    #[test]
    fn gram_of_blocks_is_the_gram_of_all_columns() {
        let dev = Device::Cpu;
        for (b, o, r) in [(1, 3, 5), (37, 16, 64), (4, 200, 300), (0, 4, 4)] {
            let v = Tensor::randn(0f64, 1.0, (b, o, r), &dev).unwrap();
            let flat = v.permute((1, 0, 2)).unwrap().contiguous().unwrap().reshape((o, b * r)).unwrap();
            let want = flat.matmul(&flat.t().unwrap()).unwrap();
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
                let got = super::gram_of_blocks(&v.to_dtype(dtype).unwrap()).unwrap();
                assert_eq!(got.dtype(), dtype);
                let err = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
                assert!(err <= tol * scale, "({b}, {o}, {r}) {dtype:?}: {err}");
            }
        }
    }
}

#[cfg(test)]
mod eigen_tests {
    use crate::tensor::{self, DType, Device, Tensor};

    /// A Gram matrix with zero rows (as KFAC factors of ReLU networks have):
    /// Q diag(λ) Qᵀ = A, Q orthogonal, λ ascending and equal to the
    /// eigenvalues alone, with one zero eigenvalue per zero row.
    #[test]
    fn zero_rows_are_split_off_exactly() {
        let dev = Device::Cpu;
        let n = 40;
        let u = Tensor::randn(0f64, 1.0, (n, 7), &dev).unwrap();
        // Zero every third row of U: those rows and columns of U Uᵀ vanish.
        let mask: Vec<f64> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect();
        let u = u.broadcast_mul(&Tensor::from_vec(mask, (n, 1), &dev).unwrap()).unwrap();
        let a = u.matmul(&u.t().unwrap()).unwrap();
        let (l, q) = super::symmetric_eigen(&a).unwrap();
        let lv = tensor::to_vec_f64(&l).unwrap();
        assert!(lv.windows(2).all(|w| w[0] <= w[1]), "ascending");
        assert_eq!(super::symmetric_eigenvalues(&a).unwrap().len(), n);
        for (x, y) in super::symmetric_eigenvalues(&a).unwrap().iter().zip(&lv) {
            assert!((x - y).abs() < 1e-10);
        }
        assert!(lv.iter().filter(|&&x| x.abs() < 1e-10).count() >= n - 7);
        let rec = q.broadcast_mul(&l.unsqueeze(0).unwrap()).unwrap().matmul(&q.t().unwrap()).unwrap();
        let err = (rec - &a).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(err < 1e-10, "reconstruction error {err}");
        let eye = Tensor::eye(n, DType::F64, &dev).unwrap();
        let err = (q.t().unwrap().matmul(&q).unwrap() - eye).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f64>().unwrap() < 1e-10);
    }
}

#[cfg(test)]
mod gemm_tests {
    use crate::tensor::DType;

    /// The yardstick measures a positive, finite rate in both float dtypes
    /// and refuses the others by name.
    #[test]
    fn gemm_rate_is_measured() {
        for dtype in [DType::F32, DType::F64] {
            let r = super::gemm_gflops(64, dtype, 2).unwrap();
            assert!(r.is_finite() && r > 0.0, "{dtype:?}: {r}");
        }
        let e = super::gemm_gflops(64, DType::I64, 1).unwrap_err().to_string();
        assert!(e.contains("float32 or float64"), "{e}");
    }
}
