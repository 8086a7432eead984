//! Handing freed memory back to the operating system, and reading a thread's CPU time.
//!
//! glibc keeps freed pages inside its arenas. The window stage frees in a pattern that
//! leaves many such pages behind: a fleet's history rings grow in step (every battery
//! of a young fleet reallocates its ring on the same day), and each micro-batch's
//! DataFusion buffers are allocated and freed between them. At 100,000 batteries x 730
//! days about 650 bytes per battery stayed resident for nothing. `malloc_trim` returns
//! those pages in about 30 ms at that size, so the stage calls it after every
//! checkpoint, a step that already takes seconds. Capping glibc's mmap threshold at its
//! default (128 KB) instead kept the pages out of the arenas too, but slowed the stage
//! by a third; [`tune_allocator`] fixes it higher, for the few fleet-sized blocks.

/// Returns free pages held by the allocator to the operating system (glibc only; other
/// allocators release on their own).
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no
    // pointer of ours and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations of at least this many bytes are mapped on their own and unmapped when
/// freed.
const MMAP_FROM_BYTES: i32 = 4 << 20;
/// Free memory at the top of an arena past this is handed back at once.
const TRIM_FROM_BYTES: i32 = 8 << 20;

/// Fixes glibc's thresholds for mapping and trimming, for the streaming job.
///
/// glibc raises its mmap threshold to the size of the largest mapped block freed (up to
/// 32 MB) and its trim threshold to twice that. A backlog frees fleet-sized blocks (a
/// day's windows, a batch's assessments: 8-17 MB at 100,000 batteries), so from then on
/// every arena kept up to 34 MB free at its top and the batch-sized buffers went
/// through the arenas: at 100,000 x 730, 169 MB free inside the allocator at the peak
/// against 748 MB in use. Fixed thresholds this high map only those few large blocks per
/// batch; a cap at glibc's default (128 KB) had mapped every column of every batch and
/// slowed the window stage by a third.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's own parameters; any thread, any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_FROM_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_FROM_BYTES);
    }
}

/// CPU time this thread has used. The pipeline's stages share two cores with each
/// other and with selection threads, so wall time inside a stage counts the time it
/// waited to be scheduled; `voltcast bench pipeline` reports this instead. Read only
/// around synchronous work, since a task may move threads at an await.
pub fn thread_cpu_time() -> std::time::Duration {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we own and reads nothing else.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    std::time::Duration::ZERO
}

/// CPU seconds (user + system) of the whole process so far, every thread included.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes the struct we own and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The CPU time `work` took on this thread.
pub fn on_cpu<T>(spent: &mut std::time::Duration, work: impl FnOnce() -> T) -> T {
    let started = thread_cpu_time();
    let out = work();
    *spent += thread_cpu_time().saturating_sub(started);
    out
}

/// What the allocator holds: bytes handed out and bytes free inside its arenas (glibc
/// only; `None` elsewhere). The gap between resident memory and `in_use` is what
/// fragmentation costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorStats {
    pub in_use: usize,
    pub free_held: usize,
}

pub fn allocator_stats() -> Option<AllocatorStats> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own bookkeeping.
        let m = unsafe { libc::mallinfo2() };
        return Some(AllocatorStats {
            in_use: m.uordblks + m.hblkhd,
            free_held: m.fordblks,
        });
    }
    #[allow(unreachable_code)]
    None
}
