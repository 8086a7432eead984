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

/// Fixes glibc's thresholds for mapping and trimming, and caps its arenas at one per
/// core, for the streaming job. Called first thing in `main`, before the runtime's
/// threads exist, and again when a pipeline starts (for embedders and tests). An
/// operator's `MALLOC_ARENA_MAX` wins over the cap.
///
/// Thresholds: glibc raises its mmap threshold to the size of the largest mapped block
/// freed (up to 32 MB) and its trim threshold to twice that. A backlog frees fleet-sized
/// blocks (a day's windows, a batch's assessments: 8-17 MB at 100,000 batteries), so
/// from then on every arena kept up to 34 MB free at its top and the batch-sized buffers
/// went through the arenas: at 100,000 x 730, 169 MB free inside the allocator at the
/// peak against 748 MB in use. Fixed thresholds this high map only those few large
/// blocks per batch; a cap at glibc's default (128 KB) had mapped every column of every
/// batch and slowed the window stage by a third.
///
/// Arenas: glibc's default allows eight per core, and a Kafka run has more threads than
/// that (librdkafka's consumer and producers, the runtime, the selection pool), so each
/// got an arena of its own and each arena kept the free space of its thread's own peaks.
/// At 100,000 batteries x 30 days through a tansu broker (release), `malloc_info` at the
/// peak showed 16 arenas holding 350 MB free among them, and the process peaked at
/// 1,030-1,042 MB; a file replay of the same fleet, with fewer threads, at 730 MB. With
/// one arena per core: 834 MB, and the file replay unchanged (708-737 MB). One arena in
/// all (`MALLOC_ARENA_MAX=1`) made the threads queue on its lock: 30% fewer events/s.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's own parameters; any thread, any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_FROM_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_FROM_BYTES);
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, arena_cap() as i32);
        }
    }
}

/// The arenas [`tune_allocator`] allows: one per core, and two at least, since with one
/// every thread waits on the same lock.
pub fn arena_cap() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2)
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

/// What the allocator holds: bytes handed out, bytes free inside its arenas, and how
/// many arenas it has (glibc only; `None` elsewhere). The gap between resident memory
/// and `in_use` is what fragmentation costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorStats {
    pub in_use: usize,
    pub free_held: usize,
    pub arenas: usize,
}

pub fn allocator_stats() -> Option<AllocatorStats> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own bookkeeping.
        let m = unsafe { libc::mallinfo2() };
        return Some(AllocatorStats {
            in_use: m.uordblks + m.hblkhd,
            free_held: m.fordblks,
            arenas: arena_count().unwrap_or(0),
        });
    }
    #[allow(unreachable_code)]
    None
}

/// How many arenas glibc has made (`None` elsewhere or when it cannot say): the heaps
/// `malloc_info` lists. mallinfo2 sums over arenas and does not count them.
pub fn arena_count() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut buf: *mut libc::c_char = std::ptr::null_mut();
        let mut len: libc::size_t = 0;
        // SAFETY: open_memstream writes the buffer's address and length into the two
        // locals we own; the stream is closed before they are read, and the buffer it
        // allocated is freed once counted.
        unsafe {
            let stream = libc::open_memstream(&mut buf, &mut len);
            if stream.is_null() {
                return None;
            }
            let written = libc::malloc_info(0, stream) == 0;
            libc::fclose(stream);
            if buf.is_null() {
                return None;
            }
            let text = std::slice::from_raw_parts(buf.cast::<u8>(), len);
            let heaps = text.windows(9).filter(|w| w == b"<heap nr=").count();
            libc::free(buf.cast());
            return written.then_some(heaps);
        }
    }
    #[allow(unreachable_code)]
    None
}
