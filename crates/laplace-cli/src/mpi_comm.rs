//! The library's [`Communicator`] on MPI (feature `mpi`): the processes
//! `mpirun` started, `MPI_COMM_WORLD`.
//!
//! - Sums are `MPI_Reduce` to rank 0 followed by `MPI_Bcast`, not
//!   `MPI_Allreduce`: one sum, formed once, so every rank holds the same bits
//!   and the algorithms replicated on top of them (Lanczos, Hutchinson, the
//!   evidence) cannot drift apart.
//! - Gathers are one broadcast per rank, of its block, in rank order; a
//!   gather to rank 0 (a result only rank 0 writes) is one send per rank.
//! - Messages go in chunks of at most 2^24 elements: MPI counts are `int`.
//! - Every collective starts with a handshake, a non-blocking all-gather of
//!   (operation, length) polled with short sleeps. A rank that waits for a
//!   slower one sleeps instead of spinning on a core the others need (ranks
//!   usually share a machine), and ranks that reach different collectives —
//!   a bug — abort the job with a message instead of exchanging garbage.

use std::time::Duration;

use laplace::distributed::Communicator;
use laplace::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
// rsmpi's own trait of that name (rank, size, process_at_rank, abort).
use mpi::topology::Communicator as _;

/// Elements per MPI call.
const CHUNK: usize = 1 << 24;

/// Which collective a handshake announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum Op {
    Sum = 1,
    Gather = 2,
    GatherBytes = 3,
    GatherToRoot = 4,
}

/// `MPI_COMM_WORLD`, and MPI itself (finalized on drop).
pub struct Mpi {
    world: SimpleCommunicator,
    /// Dropped after `world`: `MPI_Finalize`.
    _universe: Universe,
    /// The thread that initialized MPI (funneled: the only one that calls it).
    thread: std::thread::ThreadId,
}

// SAFETY: MPI is initialized with MPI_THREAD_FUNNELED and every method
// checks that it runs on the initializing thread before calling MPI.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialize MPI (`MPI_Init_thread`, funneled).
    pub fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Invalid("MPI was already initialized".into()))?;
        Ok(Mpi { world: universe.world(), _universe: universe, thread: std::thread::current().id() })
    }

    fn check_thread(&self) -> Result<()> {
        if std::thread::current().id() != self.thread {
            return Err(Error::Invalid("MPI collectives must run on the main thread".into()));
        }
        Ok(())
    }

    /// Every rank's `len` for collective `op`, once every rank has arrived.
    fn handshake(&self, op: Op, len: usize) -> Result<Vec<usize>> {
        self.check_thread()?;
        let send = [op as u64, len as u64];
        let mut recv = vec![0u64; 2 * self.size()];
        mpi::request::scope(|scope| {
            let mut request = self.world.immediate_all_gather_into(scope, &send[..], &mut recv[..]);
            let mut nap = Duration::from_micros(20);
            loop {
                match request.test() {
                    Ok(_) => break,
                    Err(pending) => {
                        request = pending;
                        std::thread::sleep(nap);
                        nap = (nap * 2).min(Duration::from_millis(5));
                    }
                }
            }
        });
        if let Some((r, _)) = recv.chunks(2).enumerate().find(|(_, c)| c[0] != op as u64) {
            eprintln!(
                "error: internal: rank {} reached collective {op:?} while rank {r} reached another ({}); aborting",
                self.rank(),
                recv[2 * r]
            );
            self.world.abort(70);
        }
        Ok(recv.chunks(2).map(|c| c[1] as usize).collect())
    }

    /// Broadcast `buf` from rank `root`, in chunks.
    fn broadcast<T: Equivalence>(&self, root: usize, buf: &mut [T]) {
        let root = self.world.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
    }

    /// Every rank's block, in rank order, given every rank's length.
    fn gather_blocks<T: Equivalence + Copy + Default>(&self, local: &[T], lens: &[usize]) -> Vec<T> {
        let mut out = vec![T::default(); lens.iter().sum()];
        let mut at = 0;
        for (r, &n) in lens.iter().enumerate() {
            let block = &mut out[at..at + n];
            if r == self.rank() {
                block.copy_from_slice(local);
            }
            self.broadcast(r, block);
            at += n;
        }
        out
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum(&self, values: &mut [f64]) -> Result<()> {
        let lens = self.handshake(Op::Sum, values.len())?;
        if lens.iter().any(|&l| l != values.len()) {
            // Every rank sees the same lengths, so every rank returns this.
            return Err(Error::Invalid(format!("a sum over ranks got vectors of different lengths {lens:?}")));
        }
        let root = self.world.process_at_rank(0);
        for chunk in values.chunks_mut(CHUNK) {
            if self.rank() == 0 {
                let mut total = vec![0.0; chunk.len()];
                root.reduce_into_root(&chunk[..], &mut total[..], SystemOperation::sum());
                chunk.copy_from_slice(&total);
            } else {
                root.reduce_into(&chunk[..], SystemOperation::sum());
            }
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    fn gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        let lens = self.handshake(Op::Gather, local.len())?;
        Ok(self.gather_blocks(local, &lens))
    }

    fn gather_bytes_to_root(&self, local: &[u8]) -> Result<Option<Vec<u8>>> {
        let lens = self.handshake(Op::GatherToRoot, local.len())?;
        if self.rank() != 0 {
            let root = self.world.process_at_rank(0);
            for chunk in local.chunks(CHUNK) {
                root.send(chunk);
            }
            return Ok(None);
        }
        let total: usize = lens.iter().sum();
        let mut out = laplace::budget::try_vec::<u8>(&format!("rows gathered from {} ranks ({total} bytes)", lens.len()), total)?;
        out.resize(total, 0);
        out[..local.len()].copy_from_slice(local);
        let mut at = local.len();
        for (r, &n) in lens.iter().enumerate().skip(1) {
            // The sender's chunks, in order: the same CHUNK boundaries.
            let source = self.world.process_at_rank(r as i32);
            for chunk in out[at..at + n].chunks_mut(CHUNK) {
                source.receive_into(chunk);
            }
            at += n;
        }
        Ok(Some(out))
    }

    fn gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lens = self.handshake(Op::GatherBytes, local.len())?;
        let all = self.gather_blocks(local, &lens);
        let mut at = 0;
        Ok(lens
            .iter()
            .map(|&n| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect())
    }
}
