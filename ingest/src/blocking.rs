//! Blocking work (fsync, serializing a checkpoint, a synchronous offset commit, a stage
//! that keeps the CPU for a whole micro-batch) called from async code.

/// Runs `f`, which blocks, from async code without stalling the runtime's other tasks
/// (the API, the webhook worker, the alert publisher): on a multi-threaded runtime the
/// worker first hands its queued tasks to another thread (`block_in_place`). Elsewhere (a
/// current-thread runtime, or no runtime) there is nobody to hand them to, and `f` just
/// runs.
pub fn off_runtime<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use super::off_runtime;

    /// Blocks until `ticks` has advanced 5 times (true), or gives up after 5 s (false).
    fn wait_for_ticks(ticks: &AtomicU64) -> bool {
        let (from, deadline) = (
            ticks.load(Ordering::SeqCst),
            Instant::now() + Duration::from_secs(5),
        );
        while Instant::now() < deadline {
            if ticks.load(Ordering::SeqCst) >= from + 5 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// One worker thread: a task blocking on it inline would starve every other task
    /// (here a ticker, in `voltcast run` the API and the webhook worker) until it is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn other_tasks_run_while_blocking_work_runs() {
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        // Spawned, so it runs on the worker (the test's own future does not).
        let blocked = tokio::spawn(async move { off_runtime(|| wait_for_ticks(&ticks)) });
        assert!(
            blocked.await.unwrap(),
            "the ticker starved while work blocked"
        );
        ticker.abort();
    }

    #[test]
    fn without_a_runtime_it_just_runs() {
        assert_eq!(off_runtime(|| 7), 7);
    }
}
