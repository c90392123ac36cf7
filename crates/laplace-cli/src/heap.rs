//! How this process's memory comes from the kernel: the allocator policy of
//! the `laplace` binary (the library sets none; a program embedding it
//! chooses its own).
//!
//! A curvature pass allocates and frees large temporaries in every batch
//! (activations, patches, sensitivities `(M, K, *out)`), and a whole
//! command touches its working set once, fresh. Two things make that cheap:
//!
//! 1. **Freed memory stays in the process** ([`tune`]): glibc would give
//!    every large block its own `mmap` and `munmap` it on free, so each
//!    batch page-faulted its temporaries in again (measured: half the time
//!    of the conv-net GGN diagonal). With `mmap` off and no trimming the
//!    heap is reused; peak memory is unchanged.
//! 2. **Large blocks are backed by 2 MiB pages** ([`LargePages`]): the
//!    first touch of a 4 KiB page costs a fault (about 1.5 µs here, most of
//!    it kernel entry and bookkeeping, not zeroing), and ResNet's EF
//!    diagonal touches 112 MB: 28 k faults, more than the computation's own
//!    time outside `laplace bench`. Every block of at least [`LARGE`] bytes
//!    is marked `MADV_HUGEPAGE` on the 2 MiB-aligned part of it before
//!    anything writes there, so the kernel backs it with transparent huge
//!    pages (one fault per 2 MiB) where the system allows them
//!    (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise` or
//!    `always`; with `never` the advice does nothing). Small blocks, and
//!    the unaligned ends of large ones, keep 4 KiB pages, so no allocation
//!    rounds its resident memory up to a huge page.

use std::alloc::{GlobalAlloc, Layout, System};

/// Huge-page size of transparent huge pages on x86-64 and 4 KiB-page
/// aarch64 (a PMD). On kernels with larger base pages the advice covers
/// whole base pages all the same.
const HUGE_PAGE: usize = 2 << 20;

/// Blocks at least this large are advised. Below two huge pages the
/// aligned part of a block may be empty or a small share of it.
pub const LARGE: usize = 2 * HUGE_PAGE;

/// The system allocator, with the 2 MiB-aligned interior of every block of
/// at least [`LARGE`] bytes advised `MADV_HUGEPAGE` (see the module docs).
pub struct LargePages;

/// Advise the huge-page-aligned interior of `[ptr, ptr + len)`. The advice
/// is a hint: if the kernel refuses it (THP compiled out, an old kernel)
/// the block is still valid memory with 4 KiB pages, so the result of
/// `madvise` is ignored.
#[cfg(target_os = "linux")]
fn advise(ptr: *mut u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside a block the allocator just handed
        // out; MADV_HUGEPAGE changes only how its pages are backed, never
        // their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *mut u8, _len: usize) {}

/// The program break up to which the main heap has been advised (0: not
/// tracking, before [`tune`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static ADVISED_BREAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Advise the part of glibc's main heap that the last allocation grew, so
/// that the small blocks carved from it (most of a batch's activations and
/// patches: many are under [`LARGE`]) share huge pages too. Growth is seen
/// by the break moving: `sbrk(0)` reads glibc's cached break, no system call.
/// Memory already touched keeps its 4 KiB pages; only new pages change.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn advise_heap_growth() {
    use std::sync::atomic::Ordering::Relaxed;
    let seen = ADVISED_BREAK.load(Relaxed);
    if seen == 0 {
        return;
    }
    // SAFETY: sbrk(0) only reports the current break.
    let brk = unsafe { libc::sbrk(0) } as usize;
    if brk > seen && ADVISED_BREAK.compare_exchange(seen, brk, Relaxed, Relaxed).is_ok() {
        let start = seen / 4096 * 4096;
        // SAFETY: [start, brk) is the heap glibc just extended (and the
        // page it started in); the advice changes no contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, brk - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn advise_heap_growth() {}

// SAFETY: every method forwards to `System` with the same arguments and
// returns its result; `advise` only adds a paging hint on memory `System`
// just returned.
unsafe impl GlobalAlloc for LargePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        advise_heap_growth();
        if layout.size() >= LARGE && !p.is_null() {
            advise(p, layout.size());
        }
        p
    }

    /// glibc's `calloc` leaves memory fresh from the kernel untouched (it is
    /// zero already) and clears only reused memory, which is faulted in
    /// anyway: advising after it still precedes the first touch of new pages.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        advise_heap_growth();
        if layout.size() >= LARGE && !p.is_null() {
            advise(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    /// A grown block's old contents were copied or kept; its new tail is
    /// untouched, and the advice covers it.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise_heap_growth();
        if new_size >= LARGE && new_size > layout.size() && !p.is_null() {
            advise(p, new_size);
        }
        p
    }
}

/// Keep freed memory in the process instead of returning it to the kernel
/// (point 1 of the module docs). Call before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        let brk = libc::sbrk(0) as usize;
        if brk != usize::MAX {
            ADVISED_BREAK.store(brk, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The system's THP mode, e.g. "madvise" (the bracketed word of
    /// `/sys/kernel/mm/transparent_hugepage/enabled`).
    fn thp_mode() -> Option<String> {
        let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
        Some(s.split('[').nth(1)?.split(']').next()?.to_string())
    }

    /// Sum of one `/proc/self/smaps` field (kB) over the mappings that
    /// overlap `[lo, hi)`.
    fn smaps_kb_in(field: &str, lo: usize, hi: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let (mut inside, mut total) = (false, 0);
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = head.split_once('-').filter(|_| !head.ends_with(':')) {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                    inside = a < hi && b > lo;
                    continue;
                }
            }
            if inside && line.starts_with(field) {
                total += line.split_whitespace().nth(1).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            }
        }
        total
    }

    /// Blocks from every method hold what was written and keep their
    /// contents through `realloc`; zeroed blocks are zero. Sizes on both
    /// sides of `LARGE`, so advised and plain blocks are both exercised.
    #[test]
    fn blocks_are_ordinary_memory() {
        for size in [64, LARGE - 1, LARGE, 3 * LARGE + 4096 + 8] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            unsafe {
                let z = LargePages.alloc_zeroed(layout);
                assert!(!z.is_null());
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0), "{size}: alloc_zeroed is not zero");
                LargePages.dealloc(z, layout);
                let p = LargePages.alloc(layout);
                assert!(!p.is_null() && p as usize % 64 == 0);
                for i in 0..size {
                    *p.add(i) = (i % 251) as u8;
                }
                let q = LargePages.realloc(p, layout, 2 * size + LARGE);
                assert!(!q.is_null());
                assert!((0..size).all(|i| *q.add(i) == (i % 251) as u8), "{size}: realloc lost the contents");
                LargePages.dealloc(q, Layout::from_size_align(2 * size + LARGE, 64).unwrap());
            }
        }
    }

    /// Where the system allows transparent huge pages, a large block from
    /// `LargePages` is backed by them once touched (smaps' AnonHugePages
    /// over its mapping: without `tune`, glibc maps a 32 MiB block alone),
    /// and under `madvise` the same block from `System` is not.
    #[test]
    fn large_blocks_get_huge_pages_where_the_system_allows_them() {
        let Some(mode) = thp_mode() else {
            eprintln!("no /sys/kernel/mm/transparent_hugepage: nothing to check");
            return;
        };
        if mode == "never" {
            eprintln!("transparent huge pages are off on this system: nothing to check");
            return;
        }
        let size = 16 * HUGE_PAGE;
        let layout = Layout::from_size_align(size, 64).unwrap();
        unsafe {
            let p = LargePages.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 1, size);
            let huge_kb = smaps_kb_in("AnonHugePages:", p as usize, p as usize + size);
            LargePages.dealloc(p, layout);
            // The kernel may fall back to small pages when it has no free
            // 2 MiB block; with 32 MiB asked for, at least one huge page is
            // expected on any machine with memory to spare.
            assert!(huge_kb >= HUGE_PAGE / 1024, "THP mode {mode}: no huge page backs a {size}-byte advised block (AnonHugePages {huge_kb} kB)");
            // The control: under `madvise`, the same block from `System`
            // (not advised) gets none, so the advice is what made the difference.
            if mode == "madvise" {
                let q = System.alloc(layout);
                assert!(!q.is_null());
                std::ptr::write_bytes(q, 1, size);
                let plain_kb = smaps_kb_in("AnonHugePages:", q as usize, q as usize + size);
                System.dealloc(q, layout);
                assert_eq!(plain_kb, 0, "a block nobody advised has huge pages under THP mode madvise");
            }
        }
    }
}
