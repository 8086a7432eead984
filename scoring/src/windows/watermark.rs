//! Event-time progress per source partition.
//!
//! Each partition's watermark is the latest event time it has shown minus the allowed
//! lateness. The stream's watermark is the minimum over partitions that are not idle: a
//! partition that has gone quiet (no new data for `idle_partition_ms` of wall time) would
//! otherwise hold every day window open forever. The watermark never moves backwards.
//!
//! A partition the source reads but that has not delivered anything yet also holds the
//! watermark back (until it is idle): on a backlog catch-up librdkafka may drain one
//! partition well ahead of another, and without this every row of the lagging partition
//! would arrive for a day that has already closed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use voltcast_ingest::time::EpochMillis;
use voltcast_ingest::{PartitionId, SourcePosition};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PartitionClock {
    /// None while the partition is assigned but has shown no event time yet.
    max_event_time: Option<EpochMillis>,
    /// Wall-clock time the partition last delivered data (or was first assigned).
    last_seen: EpochMillis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watermarks {
    lateness_ms: i64,
    idle_ms: i64,
    partitions: BTreeMap<String, PartitionClock>,
    current: Option<EpochMillis>,
    /// Partitions assigned to this process so far. Not checkpointed: after a restart or
    /// a rebalance, a partition's idle time counts from when this process got it, not
    /// from when a previous owner last read it.
    #[serde(skip)]
    owned: std::collections::HashSet<String>,
}

impl Watermarks {
    pub fn new(lateness_ms: i64, idle_ms: i64) -> Self {
        Self {
            lateness_ms,
            idle_ms,
            partitions: BTreeMap::new(),
            current: None,
            owned: Default::default(),
        }
    }

    /// Takes in how far each partition got in a micro-batch, and which partitions the
    /// source reads (`assigned`, possibly empty when the source cannot tell).
    pub fn observe(
        &mut self,
        positions: &[SourcePosition],
        assigned: &[PartitionId],
        now: EpochMillis,
    ) {
        for (source, partition) in assigned {
            let key = key(source, *partition);
            let clock = self
                .partitions
                .entry(key.clone())
                .or_insert(PartitionClock {
                    max_event_time: None,
                    last_seen: now,
                });
            if self.owned.insert(key) {
                clock.last_seen = now;
            }
        }
        for p in positions {
            let Some(t) = p.max_event_time else { continue };
            let clock = self
                .partitions
                .entry(key(&p.source, p.partition))
                .or_insert(PartitionClock {
                    max_event_time: Some(t),
                    last_seen: now,
                });
            clock.max_event_time = Some(clock.max_event_time.map_or(t, |m| m.max(t)));
            clock.last_seen = now;
        }
    }

    /// The stream's watermark at wall time `now`; None until any data has been seen.
    pub fn advance(&mut self, now: EpochMillis) -> Option<EpochMillis> {
        let active: Vec<Option<EpochMillis>> = self
            .partitions
            .values()
            .filter(|c| now - c.last_seen <= self.idle_ms)
            .map(|c| c.max_event_time)
            .collect();
        // An active partition that has shown nothing yet could still deliver anything.
        if active.contains(&None) {
            return self.current;
        }
        if let Some(min) = active.into_iter().flatten().min() {
            let candidate = min - self.lateness_ms;
            self.current = Some(self.current.map_or(candidate, |c| c.max(candidate)));
        }
        self.current
    }

    pub fn current(&self) -> Option<EpochMillis> {
        self.current
    }
}

/// How many batteries must have reached an event time before a partition's watermark
/// follows it.
pub const QUORUM: usize = 3;

/// The event time a quorum of batteries has reached: the [`QUORUM`]-th latest among the
/// batteries' latest event times (while fewer batteries were seen, the earliest of
/// theirs). One battery with a clock a day ahead (reports up to `max_future_hours` are
/// valid) cannot move a partition's watermark on its own and turn every on-time report of
/// the day before into a late one; a fleet moves it as soon as a few of its cars report.
///
/// Exact with a fixed footprint: a battery's latest time only grows, so one dropped from
/// the leaders (its time at most the new smallest) re-enters only by passing it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quorum {
    /// (battery id hash, latest event time), the first `len` in use.
    leaders: [(u64, EpochMillis); QUORUM],
    len: usize,
}

impl Quorum {
    /// Whether a report at `t` can change the quorum: cheap, so callers can skip hashing
    /// the battery id of reports that cannot.
    pub fn takes(&self, t: EpochMillis) -> bool {
        self.len < QUORUM || self.leaders.iter().any(|l| t > l.1)
    }

    pub fn observe(&mut self, battery: u64, t: EpochMillis) {
        let n = self.len;
        if let Some(leader) = self.leaders[..n].iter_mut().find(|l| l.0 == battery) {
            leader.1 = leader.1.max(t);
        } else if n < QUORUM {
            self.leaders[n] = (battery, t);
            self.len += 1;
        } else if let Some(last) = self.leaders.iter_mut().min_by_key(|l| l.1)
            && t > last.1
        {
            *last = (battery, t);
        }
    }

    /// None until a battery was seen.
    pub fn time(&self) -> Option<EpochMillis> {
        self.leaders[..self.len].iter().map(|l| l.1).min()
    }
}

fn key(source: &str, partition: i32) -> String {
    format!("{source}/{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pos(partition: i32, t: EpochMillis) -> SourcePosition {
        SourcePosition {
            source: Arc::from("t"),
            partition,
            first_offset: 0,
            next_offset: 1,
            max_event_time: Some(t),
        }
    }

    #[test]
    fn one_battery_ahead_does_not_move_the_quorum_time_a_few_do() {
        let mut q = Quorum::default();
        assert_eq!(q.time(), None);
        q.observe(1, 100);
        assert_eq!(q.time(), Some(100));
        q.observe(2, 90);
        q.observe(3, 95);
        assert_eq!(q.time(), Some(90));
        // Battery 4's clock is far ahead: the quorum time moves only to the third latest.
        q.observe(4, 10_000);
        assert_eq!(q.time(), Some(95));
        q.observe(4, 20_000);
        assert_eq!(
            q.time(),
            Some(95),
            "the same battery again is still one battery"
        );
        // Two more batteries reach a later time: now three have, and it moves.
        q.observe(5, 200);
        q.observe(6, 210);
        assert_eq!(q.time(), Some(200));
        // A dropped battery re-enters only by passing the smallest leader.
        q.observe(1, 150);
        assert_eq!(q.time(), Some(200));
        q.observe(1, 300);
        assert_eq!(q.time(), Some(210));
    }

    #[test]
    fn slowest_active_partition_sets_the_watermark_and_idle_ones_are_skipped() {
        let mut w = Watermarks::new(10, 1_000);
        w.observe(&[pos(0, 100), pos(1, 50)], &[], 0);
        assert_eq!(w.advance(0), Some(40));
        w.observe(&[pos(0, 200)], &[], 500);
        assert_eq!(
            w.advance(500),
            Some(40),
            "partition 1 still active and behind"
        );
        // Partition 1 goes quiet for longer than the idle timeout.
        w.observe(&[pos(0, 300)], &[], 1_600);
        assert_eq!(w.advance(1_600), Some(290));
        // It comes back behind: the watermark does not move backwards.
        w.observe(&[pos(1, 60)], &[], 1_700);
        assert_eq!(w.advance(1_700), Some(290));
    }

    #[test]
    fn an_assigned_partition_that_has_shown_nothing_holds_the_watermark_until_idle() {
        let mut w = Watermarks::new(10, 1_000);
        let both = [(Arc::from("t"), 0), (Arc::from("t"), 1)];
        // Partition 0 is drained far ahead while partition 1 has not been fetched yet.
        w.observe(&[pos(0, 5_000)], &both, 0);
        assert_eq!(w.advance(0), None);
        w.observe(&[pos(0, 9_000)], &both, 900);
        assert_eq!(w.advance(900), None);
        // Partition 1 delivers: the slower of the two now sets the watermark.
        w.observe(&[pos(1, 100)], &both, 950);
        assert_eq!(w.advance(950), Some(90));
        // A partition assigned later, that never delivers, stops counting once idle.
        let three = [both[0].clone(), both[1].clone(), (Arc::from("t"), 2)];
        w.observe(&[pos(1, 200)], &three, 1_000);
        assert_eq!(w.advance(1_000), Some(90));
        w.observe(&[pos(0, 9_100), pos(1, 300)], &three, 2_001);
        assert_eq!(w.advance(2_001), Some(290));
    }

    #[test]
    fn after_a_restart_idle_time_counts_from_the_new_assignment() {
        let mut w = Watermarks::new(10, 1_000);
        let both = [(Arc::from("t"), 0), (Arc::from("t"), 1)];
        w.observe(&[pos(0, 5_000), pos(1, 100)], &both, 0);
        assert_eq!(w.advance(0), Some(90));
        // Restored from a checkpoint long after partition 1 was last read: it is not idle
        // yet, because this process only just got it.
        let json = serde_json::to_string(&w).unwrap();
        let mut restored: Watermarks = serde_json::from_str(&json).unwrap();
        restored.observe(&[pos(0, 6_000)], &both, 50_000);
        assert_eq!(restored.advance(50_000), Some(90));
        restored.observe(&[pos(0, 7_000)], &both, 51_001);
        assert_eq!(restored.advance(51_001), Some(6_990));
    }
}
