//! Metrics of predictive distributions: accuracy, negative log-likelihood,
//! expected calibration error (15 equal-width confidence bins), Brier score
//! for classification; RMSE and Gaussian NLL for regression. All are means
//! over points.

use crate::error::{bail, Result};
use crate::tensor::{self, Tensor};

/// Metrics of class probabilities against labels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassificationMetrics {
    /// Fraction of points whose most probable class is the label.
    pub accuracy: f64,
    /// Mean negative log-likelihood of the labels.
    pub nll: f64,
    /// Expected calibration error (15 equal-width confidence bins).
    pub ece: f64,
    /// Brier score: mean Σ_c (p_c − [y = c])².
    pub brier: f64,
}

/// Metrics of a Gaussian predictive against regression targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegressionMetrics {
    /// Root mean squared error of the mean.
    pub rmse: f64,
    /// Mean Gaussian negative log-likelihood.
    pub nll: f64,
}

/// Metrics of class probabilities `(N, C)` against labels.
pub fn classification(probs: &Tensor, labels: &[i64]) -> Result<ClassificationMetrics> {
    let (n, c) = probs.dims2()?;
    check_labels(labels, n, c)?;
    let p = tensor::to_vec_f64(probs)?;
    let (mut correct, mut nll, mut brier) = (0usize, 0.0, 0.0);
    let mut conf = Vec::with_capacity(n);
    for (i, &y) in labels.iter().enumerate() {
        let row = &p[i * c..(i + 1) * c];
        let y = y as usize;
        let (arg, &mx) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("C ≥ 1");
        correct += usize::from(arg == y);
        nll -= row[y].max(f64::MIN_POSITIVE).ln();
        brier += row.iter().enumerate().map(|(k, q)| (q - f64::from(u8::from(k == y))).powi(2)).sum::<f64>();
        conf.push((mx, arg == y));
    }
    let nf = n as f64;
    Ok(ClassificationMetrics { accuracy: correct as f64 / nf, nll: nll / nf, ece: ece(&conf, 15), brier: brier / nf })
}

/// One label per prediction, each a class index in [0, C).
fn check_labels(labels: &[i64], n: usize, c: usize) -> Result<()> {
    if labels.len() != n {
        bail!(Data, "{} labels for {n} predictions", labels.len());
    }
    if c == 0 {
        bail!(Data, "predictions have no classes");
    }
    if let Some(i) = labels.iter().position(|&y| y < 0 || y as u64 >= c as u64) {
        bail!(Data, "label y[{i}] = {} is not a class index in [0, {c})", labels[i]);
    }
    Ok(())
}

/// Expected calibration error: Σ_bins (|bin|/N) |accuracy(bin) − confidence(bin)|,
/// bins (k/B, (k+1)/B] of the top-class confidence.
pub fn ece(conf: &[(f64, bool)], bins: usize) -> f64 {
    let bins = bins.max(1);
    let mut count = vec![0usize; bins];
    let mut acc = vec![0.0; bins];
    let mut cs = vec![0.0; bins];
    for &(c, ok) in conf {
        let b = ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        count[b] += 1;
        acc[b] += f64::from(u8::from(ok));
        cs[b] += c;
    }
    let n = conf.len() as f64;
    (0..bins).filter(|&b| count[b] > 0).map(|b| (acc[b] - cs[b]).abs() / n).sum()
}

/// Per-bin (confidence, accuracy, count) of a reliability diagram.
pub fn reliability(probs: &Tensor, labels: &[i64], bins: usize) -> Result<Vec<(f64, f64, usize)>> {
    let (n, c) = probs.dims2()?;
    check_labels(labels, n, c)?;
    if bins == 0 {
        bail!(Invalid, "a reliability diagram needs at least one bin");
    }
    let p = tensor::to_vec_f64(probs)?;
    let mut count = vec![0usize; bins];
    let mut acc = vec![0.0; bins];
    let mut cs = vec![0.0; bins];
    for i in 0..n {
        let row = &p[i * c..(i + 1) * c];
        let (arg, &mx) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("C ≥ 1");
        let b = ((mx * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        count[b] += 1;
        acc[b] += f64::from(u8::from(arg == labels[i] as usize));
        cs[b] += mx;
    }
    Ok((0..bins)
        .map(|b| if count[b] > 0 { (cs[b] / count[b] as f64, acc[b] / count[b] as f64, count[b]) } else { (0.0, 0.0, 0) })
        .collect())
}

/// RMSE of `mean` and the Gaussian NLL with predictive variance `var` (N, C).
pub fn regression(mean: &Tensor, var: &Tensor, y: &Tensor) -> Result<RegressionMetrics> {
    let (n, c) = mean.dims2()?;
    if y.dims() != [n, c] || var.dims() != [n, c] {
        bail!(Data, "targets {:?} / variances {:?} do not match predictions ({n}, {c})", y.dims(), var.dims());
    }
    let (m, v, t) = (tensor::to_vec_f64(mean)?, tensor::to_vec_f64(var)?, tensor::to_vec_f64(y)?);
    let mut se = 0.0;
    let mut nll = 0.0;
    for i in 0..n * c {
        let r = t[i] - m[i];
        se += r * r;
        nll += 0.5 * ((2.0 * std::f64::consts::PI * v[i]).ln() + r * r / v[i]);
    }
    Ok(RegressionMetrics { rmse: (se / (n * c) as f64).sqrt(), nll: nll / n as f64 })
}
