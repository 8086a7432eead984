//! Handing freed memory back to the operating system.
//!
//! glibc keeps freed pages inside its arenas. The window stage frees in a pattern that
//! leaves many such pages behind: a fleet's history rings grow in step (every battery
//! of a young fleet reallocates its ring on the same day), and each micro-batch's
//! DataFusion buffers are allocated and freed between them. At 100,000 batteries x 730
//! days about 650 bytes per battery stayed resident for nothing. `malloc_trim` returns
//! those pages in about 30 ms at that size, so the stage calls it after every
//! checkpoint, a step that already takes seconds. Capping glibc's mmap threshold
//! instead kept the pages out of the arenas too, but slowed the stage by a third.

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
