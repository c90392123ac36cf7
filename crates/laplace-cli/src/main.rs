//! The `laplace` command: curvature of a PyTorch-exported `nn.Sequential`
//! from the shell. Every subcommand reads a model spec (JSON), weights
//! (safetensors) and data (.npz / .safetensors) and writes its result as
//! safetensors; errors go to stderr with a non-zero exit status and no
//! output file.

mod args;
mod cmd_bench;
mod cmd_curvature;
mod cmd_demo;
mod cmd_jacobians;
mod cmd_operator;
mod cmd_posterior;
mod plot;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "laplace", version, about = "Curvature of neural-network losses (GGN, Fisher, EF, Jacobians) for PyTorch-exported models")]
struct Cli {
    /// Most memory any one allocation that an input asks for may take (8G,
    /// 512M, bytes; default 3/4 of the available memory: MemAvailable, the
    /// cgroup limit or the address-space limit, whichever is lowest). Larger
    /// requests (a file header's shape, a full (P, P) matrix, --samples) are
    /// refused with an error naming the quantity and its size.
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_memory_limit)]
    memory_limit: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

fn parse_memory_limit(s: &str) -> Result<u64, String> {
    laplace::budget::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Curvature of the loss over a data set: GGN, Monte-Carlo Fisher or empirical Fisher, full or diagonal.
    Curvature(cmd_curvature::CurvatureArgs),
    /// Jacobians J (N, C, P) of the network outputs and the outputs f (N, C).
    Jacobians(cmd_jacobians::JacobiansArgs),
    /// Per-sample gradients G (N, P) of the loss, and the summed loss.
    Gradients(cmd_jacobians::GradientsArgs),
    /// Top-k eigenpairs of a curvature (Lanczos with full reorthogonalization, matrix-free).
    Eigen(cmd_operator::EigenArgs),
    /// Trace of a curvature: exact (from its diagonal), Hutchinson or Hutch++.
    Trace(cmd_operator::TraceArgs),
    /// Fit a Laplace posterior (full, diag, kron, lowrank; all weights, last layer or subnetwork).
    Fit(cmd_posterior::FitArgs),
    /// Predict with a saved posterior: probs (classification) or mean, var (regression).
    Predict(cmd_posterior::PredictArgs),
    /// MAP vs Laplace metrics of a saved posterior on a test set.
    Evaluate(cmd_posterior::EvaluateArgs),
    /// Run the main job on the bundled digits example and print a summary.
    Demo(cmd_demo::DemoArgs),
    /// Time one quantity (model and data loaded; warm-up, then median of --repeat runs) and report peak memory.
    Bench(cmd_bench::BenchArgs),
}

/// Keep freed memory in the process instead of returning it to the kernel.
/// A curvature pass allocates and frees large temporaries in every batch;
/// with glibc's defaults each of them is a fresh `mmap`, page-faulted in
/// again (measured: half the time of the conv-net GGN diagonal). Peak
/// memory is unchanged; the heap is simply reused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    // candle runs elementwise kernels on its own spin-barrier pool; on a
    // small machine the spinning costs more than it saves (measured on 2
    // cores: the MLP GGN diagonal 91 ms with 2 threads, 20 ms with 1).
    // Matrix products keep their threads (RAYON_NUM_THREADS).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    if let Some(bytes) = cli.memory_limit {
        laplace::budget::set_limit(bytes);
    }
    let result = match cli.command {
        Command::Curvature(a) => cmd_curvature::run(&a),
        Command::Jacobians(a) => cmd_jacobians::run_jacobians(&a),
        Command::Gradients(a) => cmd_jacobians::run_gradients(&a),
        Command::Eigen(a) => cmd_operator::run_eigen(&a),
        Command::Trace(a) => cmd_operator::run_trace(&a),
        Command::Fit(a) => cmd_posterior::run_fit(&a),
        Command::Predict(a) => cmd_posterior::run_predict(&a),
        Command::Evaluate(a) => cmd_posterior::run_evaluate(&a),
        Command::Demo(a) => cmd_demo::run(&a),
        Command::Bench(a) => cmd_bench::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
