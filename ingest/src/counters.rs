//! Ingest counters. Plain atomics, so that this crate needs no metrics library; the
//! streaming job exports them to Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::reject::RejectReason;

#[derive(Debug, Default)]
pub struct IngestCounters {
    received: AtomicU64,
    decoded: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    batches: AtomicU64,
    /// Nanoseconds the source waited for its next message with none ready.
    idle_nanos: AtomicU64,
    /// Consumer lag per (topic, partition), from librdkafka's statistics.
    lag: std::sync::Mutex<std::collections::BTreeMap<(String, i32), i64>>,
}

impl IngestCounters {
    pub fn record_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }
    pub fn record_decoded(&self) {
        self.decoded.fetch_add(1, Ordering::Relaxed);
    }
    pub fn record_rejected(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub fn record_batch(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }
    pub fn record_idle(&self, waited: std::time::Duration) {
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.idle_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
    /// Seconds the source waited for a message with none ready: on a backlog, how far
    /// the broker's fetches fall behind the pipeline.
    pub fn idle_seconds(&self) -> f64 {
        self.idle_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
    /// Messages read from the source, good or bad.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Records that passed decoding and validation.
    pub fn decoded(&self) -> u64 {
        self.decoded.load(Ordering::Relaxed)
    }
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }
    pub fn rejected_total(&self) -> u64 {
        RejectReason::ALL.iter().map(|r| self.rejected(*r)).sum()
    }
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    pub fn set_lag(&self, topic: &str, partition: i32, records: i64) {
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.insert((topic.to_string(), partition), records);
    }
    /// Latest known lag per (topic, partition).
    pub fn lag(&self) -> Vec<((String, i32), i64)> {
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}
