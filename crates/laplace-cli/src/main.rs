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
#[cfg(feature = "mpi")]
mod mpi_comm;
mod parallel;
mod plot;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "laplace", version, about = "Curvature of neural-network losses (GGN, Fisher, EF, Jacobians) for PyTorch-exported models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    let result = match cli.command {
        Command::Curvature(a) => on_job(|job| cmd_curvature::run(&a, job)),
        Command::Jacobians(a) => on_job(|job| cmd_jacobians::run_jacobians(&a, job)),
        Command::Gradients(a) => on_job(|job| cmd_jacobians::run_gradients(&a, job)),
        Command::Eigen(a) => on_job(|job| cmd_operator::run_eigen(&a, job)),
        Command::Trace(a) => on_job(|job| cmd_operator::run_trace(&a, job)),
        Command::Fit(a) => on_job(|job| cmd_posterior::run_fit(&a, job)),
        Command::Predict(a) => report(cmd_posterior::run_predict(&a)),
        Command::Evaluate(a) => report(cmd_posterior::run_evaluate(&a)),
        Command::Demo(a) => report(cmd_demo::run(&a)),
        Command::Bench(a) => report(cmd_bench::run(&a)),
    };
    if result {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Print an error on stderr; whether the command succeeded.
fn report(result: laplace::Result<()>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            eprintln!("error: {e}");
            false
        }
    }
}

/// Run a data-parallel subcommand on this process's [`parallel::Job`]. Its
/// errors are agreed across ranks, so rank 0 reports them for all; every
/// rank fails. Rank 0 reports before the job (MPI) ends: the others cannot
/// leave `MPI_Finalize` before rank 0 enters it, and once one rank has exited
/// non-zero `mpirun` stops the rest.
fn on_job(run: impl FnOnce(&parallel::Job) -> laplace::Result<()>) -> bool {
    let job = match parallel::Job::start() {
        Ok(job) => job,
        Err(e) => return report(Err(e)),
    };
    let result = run(&job);
    let ok = match result {
        Err(_) if !job.is_root() => false,
        other => report(other),
    };
    drop(job);
    ok
}
