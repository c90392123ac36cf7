//! The one loop over a data set in batches, and what watches it.
//!
//! Every quantity over a [`Dataset`] (curvature sums, concatenated Jacobians
//! and gradients, losses, the curvature operator's products, a posterior fit)
//! is a fold over contiguous batches of points. [`fold_batches`] is that
//! fold, written once, so that progress reporting and interruption work the
//! same way everywhere: after every batch it tells the caller's [`Monitor`]
//! how far the pass has come, and the monitor may stop it. The library itself
//! never prints; the `laplace` command shows a progress bar on a terminal,
//! the Python package a tqdm bar and Ctrl-C, both through this trait.

use std::ops::ControlFlow;

use crate::data::Dataset;
use crate::error::{Error, Result};

/// Watches passes over data: progress, and the chance to stop.
///
/// Methods are called from the thread that runs the pass, between batches
/// (never inside a kernel), so a monitor may take locks or call into an
/// interpreter. All methods have do-nothing defaults.
pub trait Monitor: Sync {
    /// A pass of `batches` batches starts; `what` names it for a person
    /// ("GGN diagonal", "Jacobians").
    fn begin(&self, _what: &str, _batches: usize) {}

    /// `done` batches of the current pass are finished. `Break` stops the
    /// computation, which then returns [`Error::Interrupted`].
    fn progress(&self, _done: usize) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    /// The current pass ended (finished, failed or stopped).
    fn end(&self) {}
}

/// The monitor that watches nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Monitor for Silent {}

/// The [`Silent`] monitor, as a `&'static dyn Monitor` default.
pub static SILENT: Silent = Silent;

/// Calls `end` when dropped, so that a failing batch still ends the pass.
struct Ending<'a>(&'a dyn Monitor);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Fold `step(acc, offset, len)` over `data` in contiguous batches of at most
/// `batch_size` points (at least one), reporting to `monitor` after each.
///
/// The data set has at least one point (a [`Dataset`] cannot be empty), so
/// `step` runs at least once.
pub fn fold_batches<A>(
    data: &Dataset,
    batch_size: usize,
    monitor: &dyn Monitor,
    what: &str,
    init: A,
    mut step: impl FnMut(A, usize, usize) -> Result<A>,
) -> Result<A> {
    let ranges = data.batch_ranges(batch_size.max(1));
    monitor.begin(what, ranges.len());
    let _end = Ending(monitor);
    let mut acc = init;
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        acc = step(acc, offset, len)?;
        if monitor.progress(i + 1).is_break() {
            return Err(Error::Interrupted(format!("{what}: stopped after batch {} of {}", i + 1, ranges.len())));
        }
    }
    Ok(acc)
}

/// Add `next` to an optional running sum (the first batch starts it).
pub(crate) fn accumulate<T>(acc: Option<T>, next: T, add: impl FnOnce(T, T) -> Result<T>) -> Result<Option<T>> {
    Ok(Some(match acc {
        None => next,
        Some(a) => add(a, next)?,
    }))
}
