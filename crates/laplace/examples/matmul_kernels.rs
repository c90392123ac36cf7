//! Benchmark (not a usage example): candle's CPU matrix product against
//! `laplace::tensor::matmul` (faer) on the shapes the engine multiplies,
//! and what a faer product does to the SSE code that runs after it when the
//! vector registers' upper halves are left dirty.
//!
//! `cargo run --release -p laplace --example matmul_kernels`
//! (threads: `RAYON_NUM_THREADS`, as the CLI sets them). bench/MATMUL.md
//! holds a run.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use laplace::tensor::{clear_simd_upper_state, matmul, SimdScope, WindowTable};

/// Best of `runs` wall times of `f`, in seconds.
fn best(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The im2col table of a 3 × 3, padding-1, stride-1 convolution over `(c, h, h)`.
fn conv_table(c: usize, h: usize) -> WindowTable {
    let d = c * h * h;
    let mut t = Vec::with_capacity(c * 9 * h * h);
    for ci in 0..c {
        for ki in 0..3 {
            for kj in 0..3 {
                for y in 0..h {
                    for x in 0..h {
                        let (iy, ix) = ((y + ki) as isize - 1, (x + kj) as isize - 1);
                        let inside = iy >= 0 && ix >= 0 && iy < h as isize && ix < h as isize;
                        t.push(if inside { ci * h * h + iy as usize * h + ix as usize } else { d });
                    }
                }
            }
        }
    }
    WindowTable::new(&t, c * 9, h * h, d, &Device::Cpu).expect("a valid table")
}

fn main() -> laplace::Result<()> {
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!("| a | b | candle | faer (tensor::matmul) | faer ÷ candle |");
    println!("|---|---|---|---|---|");
    // (a dims, b dims, a given as a transposed view)
    let cases: [(&[usize], &[usize], bool); 10] = [
        (&[16, 144], &[144, 32768], false), // conv 16→16, 3×3, 16×16, 128 samples
        (&[32, 288], &[288, 8192], false),  // conv 32→32, 3×3, 8×8
        (&[16, 1, 9], &[16, 9, 32768], false), // depthwise conv
        (&[128, 10, 64], &[128, 64, 144], false), // per-sample products
        (&[512, 4, 16], &[512, 16, 16], false),
        (&[1000, 784], &[784, 100], false), // MLP layer
        (&[100, 1000], &[1000, 784], true), // its weight gradient, a transposed
        (&[10, 128], &[128, 1000], false),
        (&[512, 512], &[512, 512], false),
        (&[64, 64], &[64, 64], false),
    ];
    for (sa, sb, transposed) in cases {
        let b = Tensor::randn(0f32, 1.0, sb, &dev)?;
        let a = if transposed {
            Tensor::randn(0f32, 1.0, (sa[1], sa[0]), &dev)?.t()?
        } else {
            Tensor::randn(0f32, 1.0, sa, &dev)?
        };
        let candle = best(9, || {
            std::hint::black_box(a.matmul(&b).expect("candle product"));
        });
        let faer = best(9, || {
            std::hint::black_box(matmul(&a, &b).expect("faer product"));
        });
        let t = if transposed { " (view of a transpose)" } else { "" };
        println!("| {sa:?}{t} | {sb:?} | {:.3} ms | {:.3} ms | {:.2}× |", candle * 1e3, faer * 1e3, faer / candle);
    }

    // An im2col gather (SSE code) right after a faer product on the same
    // threads, with and without clearing the registers' upper halves.
    let table = conv_table(32, 8);
    let x = Tensor::randn(0f32, 1.0, (128, 32 * 64), &dev)?;
    let (w, u) = (Tensor::randn(0f32, 1.0, (32, 288), &dev)?, Tensor::randn(0f32, 1.0, (288, 8192), &dev)?);
    let gather_after = |clear: bool| -> laplace::Result<f64> {
        let mut t = f64::INFINITY;
        for _ in 0..9 {
            // tensor::matmul clears after itself; a raw faer product does not.
            let (wv, uv) = (w.flatten_all()?.to_vec1::<f32>()?, u.flatten_all()?.to_vec1::<f32>()?);
            let mut out = vec![0f32; 32 * 8192];
            faer::linalg::matmul::matmul(
                faer::MatMut::from_row_major_slice_mut(&mut out, 32, 8192),
                faer::Accum::Replace,
                faer::MatRef::from_row_major_slice(&wv, 32, 288),
                faer::MatRef::from_row_major_slice(&uv, 288, 8192),
                1.0,
                faer::Par::rayon(0),
            );
            if clear {
                clear_simd_upper_state(SimdScope::AllThreads);
            }
            let t0 = Instant::now();
            std::hint::black_box(table.gather(&x, 0.0)?);
            t = t.min(t0.elapsed().as_secs_f64());
        }
        Ok(t)
    };
    let (dirty, clean) = (gather_after(false)?, gather_after(true)?);
    println!();
    println!(
        "im2col gather (32 channels, 8 × 8, 3 × 3, 128 samples, {} MB) after a faer product: \
         {:.3} ms with the upper halves dirty, {:.3} ms cleared ({:.0}×)",
        32 * 9 * 64 * 128 * DType::F32.size_in_bytes() / 1_000_000,
        dirty * 1e3,
        clean * 1e3,
        dirty / clean
    );
    Ok(())
}
