//! Micro-benchmarks of the hot kernels, so a regression shows without the
//! Python harness: `cargo bench -p laplace --bench kernels`.
//!
//! Shapes are those of the `mlp_mnist` and `cnn_mnist` workloads of
//! `bench/` (float32, one batch).

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion};
use laplace::curvature::kfac::{input_factor, output_factor, KfacApprox};
use laplace::rng::Rng;
use laplace::tensor::{DType, Device, Tensor};
use laplace::{Batch, Curvature, CurvatureKind, Likelihood, ModelSpec, Sequential, Subset};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.1).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn model(spec: &str, seed: u64) -> Sequential {
    let spec = ModelSpec::from_json(spec).unwrap();
    let mut weights = HashMap::new();
    for (i, l) in spec.layers().expect("a Sequential spec").into_iter().enumerate() {
        match l {
            laplace::spec::LayerSpec::Linear { in_features, out_features, bias, .. } => {
                weights.insert(format!("{i}.weight"), randn(&[*out_features, *in_features], seed + i as u64));
                if *bias {
                    weights.insert(format!("{i}.bias"), randn(&[*out_features], seed + 100 + i as u64));
                }
            }
            laplace::spec::LayerSpec::Conv2d { in_channels, out_channels, kernel_size, bias, .. } => {
                weights.insert(
                    format!("{i}.weight"),
                    randn(&[*out_channels, *in_channels, kernel_size[0], kernel_size[1]], seed + i as u64),
                );
                if *bias {
                    weights.insert(format!("{i}.bias"), randn(&[*out_channels], seed + 100 + i as u64));
                }
            }
            _ => {}
        }
    }
    Sequential::new(spec, weights, Some(DType::F32), &Device::Cpu).unwrap()
}

const MLP: &str = r#"{"input_shape":[784],"layers":[{"type":"Linear","in_features":784,"out_features":100},
  {"type":"Tanh"},{"type":"Linear","in_features":100,"out_features":100},{"type":"Tanh"},
  {"type":"Linear","in_features":100,"out_features":10}]}"#;
const CNN: &str = r#"{"input_shape":[1,28,28],"layers":[{"type":"Conv2d","in_channels":1,"out_channels":8,"kernel_size":5},
  {"type":"ReLU"},{"type":"MaxPool2d","kernel_size":2},{"type":"Conv2d","in_channels":8,"out_channels":16,"kernel_size":5},
  {"type":"ReLU"},{"type":"MaxPool2d","kernel_size":2},{"type":"Flatten"},{"type":"Linear","in_features":256,"out_features":10}]}"#;

fn labels(n: usize) -> Tensor {
    Tensor::from_vec((0..n).map(|i| (i % 10) as i64).collect::<Vec<_>>(), n, &Device::Cpu).unwrap()
}

fn layer_backward(c: &mut Criterion) {
    for (name, spec, input, m) in [("mlp", MLP, vec![784], 256), ("cnn", CNN, vec![1, 28, 28], 64)] {
        let net = model(spec, 1);
        let mut shape = vec![m];
        shape.extend(input);
        let x = randn(&shape, 2);
        // Forward with saving, then the backward of 10 columns through every layer.
        let mut h = x.clone();
        let mut saved = Vec::new();
        for n in net.nodes() {
            let (out, s) = n.op.forward_all(&[&h], true).unwrap();
            saved.push(s.unwrap());
            h = out;
        }
        let v0 = randn(&[m, 10, 10], 3);
        c.bench_function(&format!("backward 10 columns through {name} (M = {m})"), |b| {
            b.iter(|| {
                let mut v = v0.clone();
                for (n, s) in net.nodes().iter().zip(&saved).rev() {
                    v = n.op.backward_all(s, &v, &[true]).unwrap().pop().flatten().unwrap();
                }
                v
            })
        });
    }
}

fn quantities(c: &mut Criterion) {
    for (name, spec, input, m) in [("mlp", MLP, vec![784], 256), ("cnn", CNN, vec![1, 28, 28], 64)] {
        let net = model(spec, 1);
        let mut shape = vec![m];
        shape.extend(input);
        let batch = Batch::new(randn(&shape, 2), labels(m));
        let ggn = Curvature::new(&net, Likelihood::Classification, CurvatureKind::Ggn, &Subset::All).unwrap();
        c.bench_function(&format!("GGN diagonal {name} (M = {m})"), |b| b.iter(|| ggn.diag(&batch).unwrap()));
        c.bench_function(&format!("GGN KFAC {name} (M = {m})"), |b| {
            b.iter(|| ggn.kron(&batch, m, KfacApprox::Expand).unwrap())
        });
    }
}

fn kfac_factors(c: &mut Criterion) {
    // Conv2d(8, 16, 5) on 12×12: U (M, 200, 64), V (M, 10, 16, 64).
    let u = randn(&[64, 200, 64], 5);
    let v = randn(&[64, 10, 16, 64], 6);
    for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
        c.bench_function(&format!("KFAC factors conv {approx:?}"), |b| {
            b.iter(|| (input_factor(&u, 64, approx).unwrap(), output_factor(&v, approx).unwrap()))
        });
    }
}

/// The direct depthwise kernels, both directions: an MNIST first layer
/// (one input channel, eight outputs, 5 × 5), a MobileNet block's 3 × 3
/// "same" layer and its stride-2 form (four phases), and a shape no
/// workload has (7 × 7, padding 3, dilation 2, multiplier 4). Both
/// directions on M planes per channel, so that the buffers stay below
/// glibc's mmap threshold and the time is the kernel's, not the first touch
/// of fresh pages.
fn depthwise(c: &mut Criterion) {
    use laplace::tensor::Depthwise;
    let g = |c, o, in_hw, kernel, stride, pad_before, dilation, out_hw| Depthwise { channels: c, out_channels: o, in_hw, kernel, stride, pad_before, dilation, out_hw };
    for (name, m, geo) in [
        ("mnist 1→8 5×5 28×28", 256, g(1, 8, [28, 28], [5, 5], [1, 1], [0, 0], [1, 1], [24, 24])),
        ("mobilenet 32 3×3 16×16", 128, g(32, 32, [16, 16], [3, 3], [1, 1], [1, 1], [1, 1], [16, 16])),
        ("mobilenet 32 3×3 stride 2", 128, g(32, 32, [16, 16], [3, 3], [2, 2], [1, 1], [1, 1], [8, 8])),
        ("untuned 3→12 7×7 dil 2 20×20", 64, g(3, 12, [20, 20], [7, 7], [1, 1], [3, 3], [2, 2], [14, 14])),
    ] {
        let x = randn(&[m, geo.channels, geo.in_hw[0], geo.in_hw[1]], 7);
        let w = randn(&[geo.out_channels, 1, geo.kernel[0], geo.kernel[1]], 8);
        let b = randn(&[geo.out_channels], 9);
        let v = randn(&[m, geo.out_channels, geo.out_hw[0], geo.out_hw[1]], 10);
        c.bench_function(&format!("depthwise {name} (M = {m})"), |bn| bn.iter(|| geo.apply(&x, &w, Some(&b)).unwrap()));
        c.bench_function(&format!("depthwise transposed {name} (M = {m})"), |bn| {
            bn.iter(|| geo.apply_transposed(&v, &w).unwrap())
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = layer_backward, quantities, kfac_factors, depthwise
}
criterion_main!(benches);
