//! Work spread over a few threads, each taking the next item when it is done with one.
//!
//! Why a queue rather than equal shares: items cost unevenly (a partition with a due
//! selection, a battery with a long history), and a worker that finished its share early
//! would sit idle while another still had a queue of its own.

use std::sync::Mutex;

/// `work` applied to every item on at most `threads` threads; the results in the items'
/// order.
pub fn in_order<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let workers = threads.clamp(1, items.len().max(1));
    if workers == 1 {
        // No thread to spawn for one worker: this one is free.
        return items.into_iter().map(work).collect();
    }
    let queue = Mutex::new(items.into_iter().enumerate());
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while let Some((i, item)) = next(&queue) {
                        done.push((i, work(item)));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread panicked"))
            .collect()
    });
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The next item, the lock held only to take it.
fn next<I: Iterator>(queue: &Mutex<I>) -> Option<I::Item> {
    queue.lock().unwrap_or_else(|e| e.into_inner()).next()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_item_once_in_order_whatever_the_threads() {
        for threads in [0, 1, 2, 7, 100] {
            let out = super::in_order((0..50).collect(), threads, |i: u32| i * 2);
            assert_eq!(out, (0..50).map(|i| i * 2).collect::<Vec<_>>(), "{threads}");
        }
        assert!(super::in_order(Vec::<u32>::new(), 4, |i| i).is_empty());
    }
}
