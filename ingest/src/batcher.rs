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
    /// The offset to resume from: one past the last message this batch covers.
    pub next_offset: i64,
    /// Latest event time among this partition's valid rows in the batch (watermarks).
    pub max_event_time: Option<EpochMillis>,
}

/// One micro-batch: valid rows as Arrow, and how far each source partition got. The
/// positions include messages that were dead-lettered, which are already recorded.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub rows: RecordBatch,
    pub positions: Vec<SourcePosition>,
    pub dead_letters: usize,
}

/// The next stage. A source commits a batch's positions only after `accept` returns Ok.
pub trait BatchSink: Send {
    fn accept(
        &mut self,
        batch: MicroBatch,
    ) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send;
}

pub struct MicroBatcher {
    config: BatchConfig,
    rules: ValidationConfig,
    counters: Arc<IngestCounters>,
    builder: TelemetryBatchBuilder,
    positions: BTreeMap<(Arc<str>, i32), SourcePosition>,
    dead_letters: usize,
    opened: Option<Instant>,
}

impl MicroBatcher {
    pub fn new(
        config: BatchConfig,
        rules: ValidationConfig,
        counters: Arc<IngestCounters>,
    ) -> Self {
        let builder = TelemetryBatchBuilder::with_capacity(config.max_rows.min(1 << 20));
        Self {
            config,
            rules,
            counters,
            builder,
            positions: BTreeMap::new(),
            dead_letters: 0,
            opened: None,
        }
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
        let event_time = match outcome {
            Ok(record) => {
                self.builder.append(&record);
                self.counters.record_decoded();
                Some(record.event_time)
            }
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
        self.advance(origin, event_time);
        Ok(())
    }

    fn advance(&mut self, origin: &Origin, event_time: Option<EpochMillis>) {
        let key = (origin.source.clone(), origin.partition);
        let pos = self.positions.entry(key).or_insert_with(|| SourcePosition {
            source: origin.source.clone(),
            partition: origin.partition,
            next_offset: origin.offset + 1,
            max_event_time: None,
        });
        pos.next_offset = pos.next_offset.max(origin.offset + 1);
        if let Some(t) = event_time {
            pos.max_event_time = Some(pos.max_event_time.map_or(t, |m| m.max(t)));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.builder.len() >= self.config.max_rows
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
        if self.positions.is_empty() {
            return None;
        }
        self.opened = None;
        self.counters.record_batch();
        Some(MicroBatch {
            rows: self.builder.finish(),
            positions: std::mem::take(&mut self.positions).into_values().collect(),
            dead_letters: std::mem::take(&mut self.dead_letters),
        })
    }
}

/// Hands a batch on: dead letters first (so none is lost if the sink then fails), then
/// the sink. The caller commits positions only after this returns Ok.
pub async fn hand_on<S: BatchSink>(
    batch: MicroBatch,
    dlq: &mut DeadLetterQueue,
    sink: &mut S,
) -> Result<(), IngestError> {
    dlq.flush().await?;
    sink.accept(batch).await.map_err(IngestError::Sink)
}
