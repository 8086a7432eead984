//! Event-time progress per source partition.
//!
//! Each partition's watermark is the latest event time it has shown minus the allowed
//! lateness. The stream's watermark is the minimum over partitions that are not idle: a
//! partition that has gone quiet (no new data for `idle_partition_ms` of wall time) would
//! otherwise hold every day window open forever. The watermark never moves backwards.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use voltcast_ingest::SourcePosition;
use voltcast_ingest::time::EpochMillis;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PartitionClock {
    max_event_time: EpochMillis,
    /// Wall-clock time the partition last delivered data.
    last_seen: EpochMillis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watermarks {
    lateness_ms: i64,
    idle_ms: i64,
    partitions: BTreeMap<String, PartitionClock>,
    current: Option<EpochMillis>,
}

impl Watermarks {
    pub fn new(lateness_ms: i64, idle_ms: i64) -> Self {
        Self {
            lateness_ms,
            idle_ms,
            partitions: BTreeMap::new(),
            current: None,
        }
    }

    /// Takes in how far each partition got in a micro-batch.
    pub fn observe(&mut self, positions: &[SourcePosition], now: EpochMillis) {
        for p in positions {
            let Some(t) = p.max_event_time else { continue };
            let key = format!("{}/{}", p.source, p.partition);
            let clock = self.partitions.entry(key).or_insert(PartitionClock {
                max_event_time: t,
                last_seen: now,
            });
            clock.max_event_time = clock.max_event_time.max(t);
            clock.last_seen = now;
        }
    }

    /// The stream's watermark at wall time `now`; None until any data has been seen.
    pub fn advance(&mut self, now: EpochMillis) -> Option<EpochMillis> {
        let active = self
            .partitions
            .values()
            .filter(|c| now - c.last_seen <= self.idle_ms);
        if let Some(min) = active.map(|c| c.max_event_time).min() {
            let candidate = min - self.lateness_ms;
            self.current = Some(self.current.map_or(candidate, |c| c.max(candidate)));
        }
        self.current
    }

    pub fn current(&self) -> Option<EpochMillis> {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pos(partition: i32, t: EpochMillis) -> SourcePosition {
        SourcePosition {
            source: Arc::from("t"),
            partition,
            next_offset: 1,
            max_event_time: Some(t),
        }
    }

    #[test]
    fn slowest_active_partition_sets_the_watermark_and_idle_ones_are_skipped() {
        let mut w = Watermarks::new(10, 1_000);
        w.observe(&[pos(0, 100), pos(1, 50)], 0);
        assert_eq!(w.advance(0), Some(40));
        w.observe(&[pos(0, 200)], 500);
        assert_eq!(
            w.advance(500),
            Some(40),
            "partition 1 still active and behind"
        );
        // Partition 1 goes quiet for longer than the idle timeout.
        w.observe(&[pos(0, 300)], 1_600);
        assert_eq!(w.advance(1_600), Some(290));
        // It comes back behind: the watermark does not move backwards.
        w.observe(&[pos(1, 60)], 1_700);
        assert_eq!(w.advance(1_700), Some(290));
    }
}
