//! Micro-batching shared by every source: decode, validate, dead-letter, accumulate, and
//! hand a batch on when it is full (rows) or due (time).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::batch::TelemetryBatchBuilder;
use crate::counters::IngestCounters;
use crate::dead_letter::{DeadLetter, DeadLetterQueue, Origin};
use crate::decode::{CsvLayout, decode_json};
use crate::error::IngestError;
use crate::record::TelemetryRecord;
use crate::reject::Rejection;
use crate::time::EpochMillis;
use crate::validate::ValidationConfig;

/// `[batch]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch is handed on once it holds this many valid rows...
    pub max_rows: usize,
    /// ...or once its first message is this old.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: 50_000,
            max_wait_ms: 500,
        }
    }
}

/// How far one source partition has been read in a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub source: Arc<str>,
    pub partition: i32,
    /// The offset of the first message this batch covers. Where it is past the offset
    /// the partition's state resumed from, the records between never arrived.
    #[serde(default)]
    pub first_offset: i64,
    /// The offset to resume from: one past the last message this batch covers.
    pub next_offset: i64,
    /// Latest event time among this partition's valid rows in the batch (watermarks).
    pub max_event_time: Option<EpochMillis>,
}

/// One micro-batch: valid rows as Arrow, and how far each source partition got. The
/// positions include messages that were dead-lettered, which are already recorded.
///
/// Rows are grouped by source partition, in offset order within each ([`Self::parts`]):
/// a partition's state is worked on by itself, in the order its records were written.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub rows: RecordBatch,
    pub positions: Vec<SourcePosition>,
    /// Where each partition's rows are in `rows`, in the order of `positions`' partitions
    /// that delivered rows.
    pub parts: Vec<PartitionRows>,
    pub dead_letters: usize,
    /// Every partition the source currently reads, including ones that delivered nothing
    /// in this batch: until such a partition has shown its event times it must hold the
    /// watermark back (on backlog catch-up it may simply not have been fetched yet).
    pub assigned: Vec<PartitionId>,
}

/// One partition's rows within a [`MicroBatch`]: `rows.slice(start, len)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRows {
    pub partition: PartitionId,
    pub start: usize,
    pub len: usize,
}

impl MicroBatch {
    /// Already-decoded records as one batch from a single pseudo-partition `source`:
    /// for simulations, benches and tests that start after decoding.
    pub fn from_records(records: &[TelemetryRecord<'_>], source: Arc<str>) -> Self {
        let mut builder = TelemetryBatchBuilder::with_capacity(records.len());
        records.iter().for_each(|r| builder.append(r));
        let rows = builder.finish();
        MicroBatch {
            parts: vec![PartitionRows {
                partition: (source.clone(), 0),
                start: 0,
                len: rows.num_rows(),
            }],
            rows,
            positions: vec![SourcePosition {
                source,
                partition: 0,
                first_offset: 0,
                next_offset: 0,
                max_event_time: records.iter().map(|r| r.event_time).max(),
            }],
            dead_letters: 0,
            assigned: Vec::new(),
        }
    }

    /// The rows of one partition (zero-copy).
    pub fn rows_of(&self, part: &PartitionRows) -> RecordBatch {
        self.rows.slice(part.start, part.len)
    }

    /// Where `partition` got to in this batch.
    pub fn position_of(&self, partition: &PartitionId) -> Option<&SourcePosition> {
        self.positions
            .iter()
            .find(|p| p.partition == partition.1 && p.source == partition.0)
    }
}

/// A source partition: topic (or file) and partition number.
pub type PartitionId = (Arc<str>, i32);

/// What a sink may fail with.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// The next stage. A source commits only what `accept` returns: the positions whose
/// records the sink has made durable. A stateless sink returns the batch's own
/// positions; a stateful one returns those covered by its last checkpoint (or nothing,
/// between checkpoints), so a crash never loses records that were committed.
pub trait BatchSink: Send {
    fn accept(
        &mut self,
        batch: MicroBatch,
    ) -> impl Future<Output = Result<Vec<SourcePosition>, SinkError>> + Send;

    /// Makes everything accepted so far durable (a clean shutdown); returns the positions
    /// that covers. A stateless sink has nothing to save.
    fn checkpoint(
        &mut self,
    ) -> impl Future<Output = Result<Vec<SourcePosition>, SinkError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// The source has nothing to hand on (an idle stream): a stateful sink checkpoints
    /// if one is due, so the last batches before a quiet spell become durable and
    /// committed (lag 0) rather than waiting for the next record or a shutdown.
    fn idle(&mut self) -> impl Future<Output = Result<Vec<SourcePosition>, SinkError>> + Send {
        async { Ok(Vec::new()) }
    }
}

/// Rows a partition's part of the open batch has room for at first; its columns double
/// as it fills. Why so few: a batch draws on every partition the consumer fetched, and
/// with 1,400 partitions a backlog's batch held about 36 rows of each, yet each part had
/// reserved 4,096 (430 KB): 600 MB of a 1.5 GB process at 100,000 batteries x 730 days.
/// A partition that fills the whole batch doubles its way there in ten steps.
const PARTITION_ROWS_RESERVED: usize = 64;

pub struct MicroBatcher {
    config: BatchConfig,
    rules: ValidationConfig,
    counters: Arc<IngestCounters>,
    /// The partitions the open batch has read from, each with its own rows, so each
    /// partition's rows leave together and in order.
    open: OpenPartitions,
    rows: usize,
    dead_letters: usize,
    opened: Option<Instant>,
    /// Where a checkpoint says each partition resumes: older messages are skipped.
    resume: BTreeMap<PartitionId, i64>,
    /// The last partition looked up in `resume`, and what it said.
    resume_hit: Option<(PartitionId, Option<i64>)>,
}

/// One partition's part of the open batch.
struct OpenPartition {
    position: SourcePosition,
    /// Its valid rows; `None` while it has delivered only dead letters.
    rows: Option<TelemetryBatchBuilder>,
}

/// The open batch's partitions, found by id. Why not a map alone: librdkafka hands over
/// a fetched partition's messages in a run, so the partition of the previous message is
/// tried first, and on a backlog nearly every message skips the ordered lookup (two per
/// message were a tenth of the source loop's own CPU).
#[derive(Default)]
struct OpenPartitions {
    slots: Vec<OpenPartition>,
    index: BTreeMap<PartitionId, usize>,
    last: usize,
}

impl OpenPartitions {
    /// The open part of `origin`'s partition, opened at its offset if new.
    fn slot(&mut self, origin: &Origin) -> &mut OpenPartition {
        let hit = self
            .slots
            .get(self.last)
            .is_some_and(|s| is_origin(&s.position.source, s.position.partition, origin));
        if !hit {
            let key = (origin.source.clone(), origin.partition);
            self.last = *self.index.entry(key).or_insert_with(|| {
                self.slots.push(OpenPartition {
                    position: SourcePosition {
                        source: origin.source.clone(),
                        partition: origin.partition,
                        first_offset: origin.offset,
                        next_offset: origin.offset + 1,
                        max_event_time: None,
                    },
                    rows: None,
                });
                self.slots.len() - 1
            });
        }
        &mut self.slots[self.last]
    }

    fn forget(&mut self, partition: &PartitionId) -> Option<OpenPartition> {
        let i = self.index.remove(partition)?;
        let gone = self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            let id = (moved.position.source.clone(), moved.position.partition);
            self.index.insert(id, i);
        }
        self.last = usize::MAX;
        Some(gone)
    }

    /// Every open part, in partition order, leaving none open.
    fn take(&mut self) -> Vec<OpenPartition> {
        self.index.clear();
        self.last = usize::MAX;
        let mut slots = std::mem::take(&mut self.slots);
        slots.sort_by(|a, b| {
            (&a.position.source, a.position.partition)
                .cmp(&(&b.position.source, b.position.partition))
        });
        slots
    }
}

/// Whether (`source`, `partition`) is the partition `origin` is in. Sources share one
/// name per topic, so the pointers usually settle it.
fn is_origin(source: &Arc<str>, partition: i32, origin: &Origin) -> bool {
    partition == origin.partition
        && (Arc::ptr_eq(source, &origin.source) || *source == origin.source)
}

impl MicroBatcher {
    pub fn new(
        config: BatchConfig,
        rules: ValidationConfig,
        counters: Arc<IngestCounters>,
    ) -> Self {
        Self {
            config,
            rules,
            counters,
            open: OpenPartitions::default(),
            rows: 0,
            dead_letters: 0,
            opened: None,
            resume: BTreeMap::new(),
            resume_hit: None,
        }
    }

    /// Skips messages a checkpoint already covers. Kafka re-delivers from the last
    /// committed offset, which may be behind the checkpoint if the process died between
    /// saving the checkpoint and committing.
    pub fn resume_from(&mut self, positions: &[SourcePosition]) {
        for p in positions {
            self.resume
                .insert((p.source.clone(), p.partition), p.next_offset);
        }
        self.resume_hit = None;
    }

    /// Where `partition` resumes now (a new owner's checkpoint), or, with `None`, that
    /// nothing of it is skipped.
    pub fn resume_at(&mut self, partition: PartitionId, next_offset: Option<i64>) {
        match next_offset {
            Some(next) => self.resume.insert(partition, next),
            None => self.resume.remove(&partition),
        };
        self.resume_hit = None;
    }

    /// Drops what the open batch holds of `partitions` (revoked: their new owner reads
    /// them again from its checkpoint). Their dead letters are already sent and may be
    /// sent again by the new owner: the dead-letter topic is at least once.
    pub fn forget(&mut self, partitions: &[PartitionId]) {
        for p in partitions {
            if let Some(rows) = self.open.forget(p).and_then(|gone| gone.rows) {
                self.rows -= rows.len();
            }
        }
        if self.open.slots.is_empty() {
            self.opened = None;
        }
    }

    /// True when the message at `origin` was already covered by the checkpoint resumed
    /// from; the caller drops it.
    fn covered(&mut self, origin: &Origin) -> bool {
        if self.resume.is_empty() {
            return false;
        }
        let next = match &self.resume_hit {
            Some(((source, partition), next)) if is_origin(source, *partition, origin) => *next,
            _ => {
                let id = (origin.source.clone(), origin.partition);
                let next = self.resume.get(&id).copied();
                self.resume_hit = Some((id, next));
                next
            }
        };
        next.is_some_and(|next| origin.offset < next)
    }

    pub fn counters(&self) -> &Arc<IngestCounters> {
        &self.counters
    }

    /// Decodes one JSON message; a bad one goes to `dlq`.
    pub fn push_json(
        &mut self,
        payload: &[u8],
        origin: &Origin,
        now: EpochMillis,
        dlq: &mut DeadLetterQueue,
    ) -> Result<(), IngestError> {
        if self.covered(origin) {
            return Ok(());
        }
        let outcome = decode_json(payload, &self.rules, now);
        self.settle(outcome, || payload.to_vec(), origin, dlq)
    }

    /// Decodes one CSV row; a bad one goes to `dlq` as its CSV line.
    pub fn push_csv(
        &mut self,
        layout: &CsvLayout,
        row: &csv::StringRecord,
        origin: &Origin,
        now: EpochMillis,
        dlq: &mut DeadLetterQueue,
    ) -> Result<(), IngestError> {
        if self.covered(origin) {
            return Ok(());
        }
        let outcome = layout.decode(row, &self.rules, now);
        self.settle(outcome, || CsvLayout::raw_line(row), origin, dlq)
    }

    /// Records a message that could not even be read as text (bad UTF-8 in a CSV file).
    pub fn push_unreadable(
        &mut self,
        payload: Vec<u8>,
        rejection: Rejection,
        origin: &Origin,
        dlq: &mut DeadLetterQueue,
    ) -> Result<(), IngestError> {
        self.settle(Err(rejection), || payload, origin, dlq)
    }

    fn settle(
        &mut self,
        outcome: Result<TelemetryRecord<'_>, Rejection>,
        payload: impl FnOnce() -> Vec<u8>,
        origin: &Origin,
        dlq: &mut DeadLetterQueue,
    ) -> Result<(), IngestError> {
        self.opened.get_or_insert_with(Instant::now);
        self.counters.record_received();
        let record = match outcome {
            Ok(record) => Some(record),
            Err(rejection) => {
                self.counters.record_rejected(rejection.reason);
                self.dead_letters += 1;
                dlq.send(DeadLetter {
                    payload: payload(),
                    reason: rejection.reason,
                    detail: rejection.detail,
                    origin: origin.clone(),
                })?;
                None
            }
        };
        // One lookup of the partition for both its rows and its position.
        let part = self.open.slot(origin);
        if let Some(record) = &record {
            let max_rows = self.config.max_rows;
            part.rows
                .get_or_insert_with(|| {
                    TelemetryBatchBuilder::with_capacity(max_rows.min(PARTITION_ROWS_RESERVED))
                })
                .append(record);
            self.rows += 1;
            self.counters.record_decoded();
        }
        let pos = &mut part.position;
        pos.next_offset = pos.next_offset.max(origin.offset + 1);
        if let Some(t) = record.map(|r| r.event_time) {
            pos.max_event_time = Some(pos.max_event_time.map_or(t, |m| m.max(t)));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.open.slots.is_empty()
    }

    /// Rows the open batch's partitions have room for (see [`PARTITION_ROWS_RESERVED`]).
    pub fn reserved_rows(&self) -> usize {
        let parts = self.open.slots.iter().filter_map(|p| p.rows.as_ref());
        parts.map(TelemetryBatchBuilder::reserved_rows).sum()
    }

    /// Rows and dead letters together: a flood of bad messages fills batches too, so the
    /// dead letters are flushed (their delivery awaited) every `max_rows` messages rather
    /// than piling up in the producer's queue until it refuses them.
    pub fn is_full(&self) -> bool {
        self.rows + self.dead_letters >= self.config.max_rows
    }

    /// Time left until the open batch is due; `None` when nothing is open.
    pub fn time_left(&self) -> Option<Duration> {
        let wait = Duration::from_millis(self.config.max_wait_ms);
        self.opened.map(|t| wait.saturating_sub(t.elapsed()))
    }

    pub fn is_due(&self) -> bool {
        self.time_left().is_some_and(|d| d.is_zero())
    }

    /// Closes the open batch (possibly with zero rows when every message was refused).
    pub fn take(&mut self) -> Option<MicroBatch> {
        self.take_assigned(Vec::new())
    }

    /// Closes the open batch, naming every partition the source reads (see
    /// [`MicroBatch::assigned`]).
    pub fn take_assigned(&mut self, assigned: Vec<PartitionId>) -> Option<MicroBatch> {
        if self.open.slots.is_empty() {
            return None;
        }
        self.opened = None;
        self.counters.record_batch();
        let open = self.open.take();
        let mut positions = Vec::with_capacity(open.len());
        let mut builders = Vec::with_capacity(open.len());
        for part in open {
            if let Some(rows) = part.rows {
                builders.push((
                    (part.position.source.clone(), part.position.partition),
                    rows,
                ));
            }
            positions.push(part.position);
        }
        let (rows, parts) = self.finish_rows(builders);
        Some(MicroBatch {
            rows,
            parts,
            positions,
            dead_letters: std::mem::take(&mut self.dead_letters),
            assigned,
        })
    }
}

impl MicroBatcher {
    /// The partitions' rows one after another (a single partition's without a copy).
    fn finish_rows(
        &mut self,
        builders: Vec<(PartitionId, TelemetryBatchBuilder)>,
    ) -> (RecordBatch, Vec<PartitionRows>) {
        self.rows = 0;
        let mut parts = Vec::with_capacity(builders.len());
        let mut batches = Vec::with_capacity(builders.len());
        let mut start = 0;
        for (partition, builder) in builders {
            let rows = builder.finish();
            if rows.num_rows() == 0 {
                continue;
            }
            parts.push(PartitionRows {
                partition,
                start,
                len: rows.num_rows(),
            });
            start += rows.num_rows();
            batches.push(rows);
        }
        let rows = match batches.len() {
            0 => RecordBatch::new_empty(crate::schema::telemetry_schema()),
            1 => batches.pop().expect("one batch"),
            _ => arrow::compute::concat_batches(&crate::schema::telemetry_schema(), &batches)
                .expect("every partition's rows have the telemetry schema"),
        };
        (rows, parts)
    }
}

/// Hands a batch on: dead letters first (so none is lost if the sink then fails), then
/// the sink. Returns the positions the caller may commit.
pub async fn hand_on<S: BatchSink>(
    batch: MicroBatch,
    dlq: &mut DeadLetterQueue,
    sink: &mut S,
) -> Result<Vec<SourcePosition>, IngestError> {
    dlq.flush().await?;
    sink.accept(batch).await.map_err(IngestError::Sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(source: &Arc<str>, partition: i32, offset: i64) -> Origin {
        Origin {
            source: source.clone(),
            partition,
            offset,
        }
    }

    const JSON: &[u8] = br#"{"battery_id":"B1","event_time":"2024-01-01T00:00:00Z","battery_age_days":1,"number_of_trips":1,"daily_trip_duration":10,"daily_cycles_used":0.5,"lifetime_cycles_used":1,"battery_rated_cycles":1000}"#;

    /// A backlog spread over many partitions gives each a few rows per batch: the
    /// room reserved must follow the rows, not the batch size times the partitions.
    #[test]
    fn a_batch_over_many_partitions_reserves_room_by_its_rows() {
        let mut b = MicroBatcher::new(
            BatchConfig::default(),
            ValidationConfig::default(),
            Arc::new(IngestCounters::default()),
        );
        let (mut dlq, _letters) = DeadLetterQueue::memory();
        let source: Arc<str> = Arc::from("t");
        let (partitions, rows_each) = (1_000, 3);
        for partition in 0..partitions {
            for offset in 0..rows_each {
                let origin = origin(&source, partition, offset);
                b.push_json(JSON, &origin, crate::now_millis(), &mut dlq)
                    .unwrap();
            }
        }
        let reserved = b.reserved_rows();
        let held = partitions as usize * rows_each as usize;
        assert!(
            reserved <= held * 32,
            "{reserved} rows reserved for {held} held"
        );
        let batch = b.take().unwrap();
        assert_eq!(batch.rows.num_rows(), held);
        assert_eq!(batch.parts.len(), partitions as usize);
        assert_eq!(
            b.reserved_rows(),
            0,
            "nothing open after the batch is taken"
        );

        // One partition filling a whole batch grows to it.
        for offset in 0..10_000 {
            let origin = origin(&source, 0, 100 + offset);
            b.push_json(JSON, &origin, crate::now_millis(), &mut dlq)
                .unwrap();
        }
        assert!(b.reserved_rows() >= 10_000);
        assert_eq!(b.take().unwrap().rows.num_rows(), 10_000);
    }

    #[test]
    fn messages_a_checkpoint_covers_are_skipped_on_resume() {
        let counters = Arc::new(IngestCounters::default());
        let mut b = MicroBatcher::new(
            BatchConfig::default(),
            ValidationConfig::default(),
            counters.clone(),
        );
        let source: Arc<str> = Arc::from("t");
        b.resume_from(&[SourcePosition {
            source: source.clone(),
            partition: 0,
            first_offset: 0,
            next_offset: 5,
            max_event_time: None,
        }]);
        let (mut dlq, _letters) = DeadLetterQueue::memory();
        for (partition, offset) in [(0, 3), (0, 4), (0, 5), (1, 0)] {
            let origin = origin(&source, partition, offset);
            b.push_json(JSON, &origin, crate::now_millis(), &mut dlq)
                .unwrap();
        }
        let batch = b.take().unwrap();
        assert_eq!(
            batch.rows.num_rows(),
            2,
            "offsets 3 and 4 of partition 0 skipped"
        );
        assert_eq!(counters.received(), 2);
        let covered: Vec<_> = batch
            .positions
            .iter()
            .map(|p| (p.partition, p.first_offset, p.next_offset))
            .collect();
        assert_eq!(covered, vec![(0, 5, 6), (1, 0, 1)]);
    }
}
