//! The memory budget: every allocation whose size comes from input (a
//! shape in a file header, a model's geometry, a sample count, a full
//! `(P, P)` matrix) is checked against it *before* it is made, so a hostile
//! or mistaken input ends in an error naming the quantity and the bytes it
//! would need, never in an abort, a panic or the OOM killer.
//!
//! The budget is process-wide ([`set_limit`], the CLI's `--memory-limit`);
//! by default it is 3/4 of the memory this process may use: the smallest of
//! `MemAvailable` (`/proc/meminfo`), the cgroup limit less its current use,
//! and the address-space rlimit. It bounds each single allocation, not the
//! sum of all live ones: a check that cannot fail for an input the machine
//! could process, and that stops every input it could not. A
//! [`MemoryBudget`] value carries the same limit for code (batch-size
//! selection) that wants to plan within it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// A number of bytes one allocation may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes one allocation may take.
    pub bytes: u64,
}

/// 0: not set, use [`default_limit`].
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Fallback when no system figure can be read: 4 GiB.
const FALLBACK: u64 = 4 << 30;

/// Set the process-wide budget (bytes); 0 restores the default.
pub fn set_limit(bytes: u64) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// The budget in force.
pub fn current() -> MemoryBudget {
    match LIMIT.load(Ordering::Relaxed) {
        0 => MemoryBudget { bytes: default_limit() },
        b => MemoryBudget { bytes: b },
    }
}

/// 3/4 of the memory available to this process (read once).
pub fn default_limit() -> u64 {
    static DEFAULT: OnceLock<u64> = OnceLock::new();
    *DEFAULT.get_or_init(|| available_memory().map_or(FALLBACK, |b| b / 4 * 3))
}

/// The memory this process may still use, in bytes: the smallest of
/// `MemAvailable`, the cgroup (v2 or v1) limit less its usage, and
/// `RLIMIT_AS` (from `/proc/self/limits`). `None` off Linux.
pub fn available_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let mut best: Option<u64> = None;
    let mut take = |v: Option<u64>| {
        if let Some(v) = v {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    };
    take(read("/proc/meminfo").and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }));
    for (limit, usage) in [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ] {
        if let Some(l) = num(read(limit)) {
            take(Some(l.saturating_sub(num(read(usage)).unwrap_or(0))));
        }
    }
    take(read("/proc/self/limits").and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("Max address space"))?;
        line.split_whitespace().nth(3)?.parse::<u64>().ok()
    }));
    best
}

impl MemoryBudget {
    /// Ok if `bytes` (None: the size overflowed) fits; otherwise an error
    /// "`what` needs N GB, more than the memory limit M GB".
    pub fn check(&self, what: &dyn std::fmt::Display, bytes: Option<u64>) -> Result<()> {
        match bytes {
            Some(b) if b <= self.bytes => Ok(()),
            Some(b) => Err(Error::Memory(format!(
                "{what} needs {}, more than the memory limit of {} (--memory-limit)",
                human(b),
                human(self.bytes)
            ))),
            None => Err(Error::Memory(format!(
                "{what} needs more than 2^64 bytes, more than the memory limit of {} (--memory-limit)",
                human(self.bytes)
            ))),
        }
    }
}

/// The number of elements of `dims`, `None` on overflow.
pub fn numel(dims: &[usize]) -> Option<u64> {
    dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64))
}

/// Bytes of `dims` elements of `elem_bytes` each, `None` on overflow.
pub fn bytes(dims: &[usize], elem_bytes: usize) -> Option<u64> {
    numel(dims)?.checked_mul(elem_bytes as u64)
}

/// Check `dims` elements of `elem_bytes` against the current budget.
pub fn check(what: &dyn std::fmt::Display, dims: &[usize], elem_bytes: usize) -> Result<()> {
    current().check(what, bytes(dims, elem_bytes))
}

/// A `Vec` of `len` elements reserved fallibly, after the budget check: the
/// way to allocate a buffer whose length comes from input.
pub fn try_vec<T>(what: &dyn std::fmt::Display, len: usize) -> Result<Vec<T>> {
    check(what, &[len], std::mem::size_of::<T>())?;
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::Memory(format!("{what}: cannot allocate {}", human((len as u64).saturating_mul(std::mem::size_of::<T>() as u64)))))?;
    Ok(v)
}

/// "387 GB", "1.5 MB", "512 B" (decimal units, as `ls -h --si`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        v /= 1000.0;
        unit = u;
        if v < 1000.0 {
            break;
        }
    }
    if v < 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

/// Parse a size: bytes, or a number with a suffix K, M, G, T (binary, as
/// `8G` = 8 GiB; `KB`/`KiB` spellings too).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(Error::Invalid(format!("memory size {s:?}: unknown unit {unit:?} (use K, M, G or T)"))),
    };
    let v: f64 = num.parse().map_err(|_| Error::Invalid(format!("memory size {s:?} is not a number with an optional unit (8G, 512M)")))?;
    let b = v * (1u64 << shift) as f64;
    if !(b.is_finite() && b >= 1.0 && b < u64::MAX as f64) {
        return Err(Error::Invalid(format!("memory size {s:?} is out of range")));
    }
    Ok(b as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("8X").is_err() && parse_size("").is_err() && parse_size("0").is_err());
        assert_eq!(human(220_004u64 * 220_004 * 8), "387 GB");
        assert_eq!(human(1500), "1.5 kB");
    }

    #[test]
    fn a_budget_names_the_quantity() {
        let b = MemoryBudget { bytes: 1 << 20 };
        assert!(b.check(&"small", Some(1 << 20)).is_ok());
        let e = b.check(&"full GGN for P = 220004", bytes(&[220_004, 220_004], 8)).unwrap_err().to_string();
        assert!(e.contains("full GGN for P = 220004 needs 387 GB"), "{e}");
        assert!(b.check(&"x", bytes(&[usize::MAX, 2], 8)).is_err());
    }
}
