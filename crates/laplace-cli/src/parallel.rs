//! The processes a subcommand runs on: one, or the ranks of an MPI job
//! (`mpirun -n R laplace ...` with the `mpi` feature).
//!
//! A [`Job`] owns the communicator the library's passes combine across
//! ([`laplace::distributed`]), loads this rank's shard of the data, and keeps
//! the rules that make a parallel run behave like a single process:
//!
//! - every step that may fail on one rank only (reading files, computing on a
//!   shard, writing the output) is [`Job::agreed`]: one rank's error becomes
//!   every rank's, naming the rank, and every rank exits non-zero;
//! - only rank 0 prints and writes output files, after every rank's
//!   computation succeeded (so a failed or killed rank leaves no output).
//!
//! The MPI build started without an MPI launcher runs as a single process.

use std::path::Path;

use laplace::distributed::{self, Communicator, SingleProcess};
use laplace::tensor::{DType, Device};
use laplace::{Dataset, Result};

pub struct Job {
    comm: Box<dyn Communicator>,
}

impl Job {
    /// This process's job: the MPI world when launched by an MPI launcher
    /// (with the `mpi` feature), else a single process.
    pub fn start() -> Result<Job> {
        #[cfg(feature = "mpi")]
        if launched_by_mpi() {
            share_cores();
            return Ok(Job { comm: Box::new(crate::mpi_comm::Mpi::init()?) });
        }
        Ok(Job { comm: Box::new(SingleProcess) })
    }

    /// One process, whatever the build.
    pub fn single() -> Job {
        Job { comm: Box::new(SingleProcess) }
    }

    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// Rank 0: the one that prints and writes.
    pub fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Run a step that may fail on one rank only, and agree on its outcome.
    pub fn agreed<T>(&self, step: impl FnOnce() -> Result<T>) -> Result<T> {
        distributed::agreed(self.comm(), step)
    }

    /// Run `write` on rank 0 only (outputs, printing), once every rank got
    /// here; every rank learns whether it succeeded.
    pub fn on_root(&self, write: impl FnOnce() -> Result<()>) -> Result<()> {
        self.agreed(|| if self.is_root() { write() } else { Ok(()) })
    }

    /// This rank's shard of a data file (the whole file for one process).
    pub fn load_data(&self, path: &Path, label_key: &str, dtype: DType, device: &Device) -> Result<Dataset> {
        match self.comm.size() {
            1 => Dataset::load_with_labels(path, label_key, dtype, device),
            size => Dataset::load_part(path, label_key, self.comm.rank(), size, dtype, device),
        }
    }
}

/// Started by `mpirun` / `mpiexec` (Open MPI, MPICH's Hydra) or `srun`,
/// in a build with the `mpi` feature.
pub fn launched_by_mpi() -> bool {
    cfg!(feature = "mpi") && ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

/// Ranks on one machine share its cores: unless `RAYON_NUM_THREADS` says
/// otherwise, each rank's matrix kernels get cores / (ranks on this machine).
#[cfg(feature = "mpi")]
fn share_cores() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let local = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string());
}
