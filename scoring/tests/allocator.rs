//! The allocator's arena cap, in a test binary of its own: arenas made by other tests'
//! threads before the cap would count against it.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::sync::{Arc, Barrier};

use voltcast_scoring::memory::{arena_cap, arena_count, tune_allocator};

/// Threads alive at once each allocate; glibc would give each its own arena (up to
/// eight per core) without the cap.
#[test]
fn many_threads_share_at_most_one_arena_per_core() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        eprintln!("MALLOC_ARENA_MAX is set: the operator's cap wins, nothing to check");
        return;
    }
    tune_allocator();
    let cap = arena_cap();
    let threads = 4 * cap + 4;
    let all_allocated = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let all_allocated = all_allocated.clone();
            std::thread::spawn(move || {
                let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![(t + i) as u8; 4096]).collect();
                // Keep the blocks (and so the thread's arena) until every thread has
                // allocated: an exited thread's arena would be handed to the next.
                all_allocated.wait();
                blocks.iter().map(|b| b[0] as usize).sum::<usize>()
            })
        })
        .collect();
    all_allocated.wait();
    let arenas = arena_count().expect("malloc_info lists the arenas");
    for h in handles {
        h.join().expect("allocating thread");
    }
    assert!(arenas >= 1, "malloc_info listed no arena");
    assert!(
        arenas <= cap,
        "{threads} threads made {arenas} arenas; the cap is {cap}"
    );
}
