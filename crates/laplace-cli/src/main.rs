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
mod heap;
#[cfg(feature = "mpi")]
mod mpi_comm;
mod parallel;
mod plot;
mod progress;
mod summary;

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
    /// Print nothing on success but the results themselves (no summary line,
    /// no progress bars); errors are still printed.
    #[arg(long, short, global = true)]
    quiet: bool,
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

/// Large blocks on 2 MiB pages; see [`heap`].
#[global_allocator]
static ALLOCATOR: heap::LargePages = heap::LargePages;

fn main() -> ExitCode {
    heap::tune();
    // candle runs elementwise kernels on its own spin-barrier pool; on a
    // small machine the spinning costs more than it saves (measured on 2
    // cores: the MLP GGN diagonal 91 ms with 2 threads, 20 ms with 1).
    // Matrix products keep their threads (RAYON_NUM_THREADS).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // candle asks for its matrix-product thread count on every product, and
    // with RAYON_NUM_THREADS unset each ask reads /proc/cpuinfo (13 reads,
    // about 4 ms, in one MLP GGN diagonal). Resolve it once. An MPI job
    // instead shares the cores among its ranks (parallel::Job::start).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() && !parallel::launched_by_mpi() {
        std::env::set_var("RAYON_NUM_THREADS", laplace::tensor::default_matmul_threads().to_string());
    }
    let cli = Cli::parse();
    if let Some(bytes) = cli.memory_limit {
        laplace::budget::set_limit(bytes);
    }
    let start = std::time::Instant::now();
    let quiet = cli.quiet;
    if quiet {
        progress::silence();
    }
    let done = |result: laplace::Result<String>| report(result, quiet, start);
    let ok = match cli.command {
        Command::Curvature(a) => on_job(|job| cmd_curvature::run(&a, job), quiet, start),
        Command::Jacobians(a) => on_job(|job| cmd_jacobians::run_jacobians(&a, job), quiet, start),
        Command::Gradients(a) => on_job(|job| cmd_jacobians::run_gradients(&a, job), quiet, start),
        Command::Eigen(a) => on_job(|job| cmd_operator::run_eigen(&a, job), quiet, start),
        Command::Trace(a) => on_job(|job| cmd_operator::run_trace(&a, job), quiet, start),
        Command::Fit(a) => on_job(|job| cmd_posterior::run_fit(&a, job), quiet, start),
        Command::Predict(a) => done(cmd_posterior::run_predict(&a)),
        Command::Evaluate(a) => done(cmd_posterior::run_evaluate(&a)),
        Command::Demo(a) => done(cmd_demo::run(&a)),
        Command::Bench(a) => done(cmd_bench::run(&a)),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Print the summary line (unless `quiet`) or the error on stderr; whether
/// the command succeeded.
fn report(result: laplace::Result<String>, quiet: bool, start: std::time::Instant) -> bool {
    match result {
        Ok(summary) => {
            if !quiet && !summary.is_empty() {
                eprintln!("{}", summary::line(&summary, start.elapsed()));
            }
            true
        }
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
/// non-zero `mpirun` stops the rest. Only rank 0 prints the summary.
fn on_job(run: impl FnOnce(&parallel::Job) -> laplace::Result<String>, quiet: bool, start: std::time::Instant) -> bool {
    let job = match parallel::Job::start() {
        Ok(job) => job,
        Err(e) => return report(Err(e), quiet, start),
    };
    let result = run(&job);
    let ok = match result {
        Err(_) if !job.is_root() => false,
        other => report(other, quiet || !job.is_root(), start),
    };
    drop(job);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` of every subcommand describes every flag, and flags and their
    /// values are spelled one way: kebab-case (`--bridge-norm`, never `_`).
    #[test]
    fn every_flag_has_help_text_and_kebab_case_spellings() {
        let kebab = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        let cli = Cli::command();
        let (mut missing, mut badly_spelled) = (Vec::new(), Vec::new());
        let globals: Vec<_> = cli.get_arguments().map(|a| (String::new(), a)).collect();
        let subs = cli.get_subcommands().flat_map(|s| s.get_arguments().map(move |a| (s.get_name().to_string(), a)));
        for (sub, arg) in globals.into_iter().chain(subs) {
            let id = arg.get_id().as_str();
            if arg.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            let name = format!("{sub} --{}", arg.get_long().unwrap_or(id));
            if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                missing.push(name.clone());
            }
            if !arg.get_long().is_some_and(kebab) || !arg.get_possible_values().iter().all(|v| kebab(v.get_name())) {
                badly_spelled.push(name);
            }
        }
        assert!(missing.is_empty(), "flags without help text: {missing:?}");
        assert!(badly_spelled.is_empty(), "flags or values not in kebab-case: {badly_spelled:?}");
    }
}
