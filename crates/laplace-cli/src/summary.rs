//! The one line a subcommand prints on success: what it wrote (or found),
//! with shapes, and how long it took. It goes to stderr, so that stdout
//! keeps only results (`trace`'s number, `evaluate`'s table, `--json`), and
//! `--quiet` silences it.

use std::path::Path;
use std::time::Duration;

use laplace::tensor::Tensor;

/// `wrote OUT: loss (1,), H (10, 10)`: an output file and its tensors.
/// More than four tensors (KFAC's factors) are counted, not listed.
pub fn wrote(path: &Path, tensors: &[(String, Tensor)]) -> String {
    let list = if tensors.len() <= 4 {
        tensors.iter().map(|(k, t)| format!("{k} {}", shape(t.dims()))).collect::<Vec<_>>().join(", ")
    } else {
        let elements: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
        format!("{} tensors ({} values)", tensors.len(), elements)
    };
    format!("wrote {}: {list}", path.display())
}

/// `(10, 10)`, `(1,)`: a shape as Python prints it.
pub fn shape(dims: &[usize]) -> String {
    match dims {
        [d] => format!("({d},)"),
        _ => format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// The summary line with its wall-clock time.
pub fn line(summary: &str, elapsed: Duration) -> String {
    format!("{summary} in {:.2} s", elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use laplace::tensor::{DType, Device};

    #[test]
    fn lists_shapes_and_counts_many_tensors() {
        let t = |d: &[usize]| Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
        let two = [("loss".to_string(), t(&[1])), ("H".to_string(), t(&[3, 3]))];
        assert_eq!(wrote(Path::new("o.safetensors"), &two), "wrote o.safetensors: loss (1,), H (3, 3)");
        let many: Vec<_> = (0..5).map(|i| (format!("kron.{i}.0"), t(&[2, 2]))).collect();
        assert_eq!(wrote(Path::new("k"), &many), "wrote k: 5 tensors (20 values)");
        assert_eq!(line("done", Duration::from_millis(1234)), "done in 1.23 s");
    }
}
