//! # voltcast-ingest
//!
//! Everything between the wire and an Arrow [`RecordBatch`](arrow::record_batch::RecordBatch)
//! of clean telemetry: the [schema], [decode]rs for JSON and CSV, [validate]ion, the
//! [dead_letter] queue, the [kafka] (and Azure Event Hubs) and [file] sources, and the
//! fleet [simulate]or.
//!
//! Why a crate of its own: ingestion is where dirty data meets the product. Keeping it
//! free of windows and models means every rule about what a record may look like lives in
//! one place, is tested on its own, and is shared by the stream, file replays and the
//! benchmarks. The promise it keeps is that nothing is lost silently: a message either
//! becomes a row or a dead letter with a reason, and a source commits offsets only after
//! both have been handed on.

pub mod batch;
pub mod batcher;
pub mod blocking;
pub mod counters;
pub mod dead_letter;
pub mod decode;
pub mod error;
pub mod file;
mod flat_json;
pub mod kafka;
pub mod mutate;
pub mod record;
pub mod reject;
pub mod schema;
pub mod simulate;
pub mod time;
pub mod validate;

pub use arrow;
pub use batch::TelemetryBatchBuilder;
pub use batcher::{
    BatchConfig, BatchSink, MicroBatch, MicroBatcher, PartitionId, PartitionRows, SinkError,
    SourcePosition,
};
pub use counters::IngestCounters;
pub use dead_letter::{DeadLetter, DeadLetterQueue, Origin};
pub use error::IngestError;
pub use file::{FileFormat, FileSource, FileSourceConfig};
pub use kafka::{EventHubsConnection, KafkaConfig, KafkaSource, PartitionListener};
pub use record::TelemetryRecord;
pub use reject::{RejectReason, Rejection};
pub use schema::telemetry_schema;
pub use validate::ValidationConfig;

/// Wall-clock milliseconds since the epoch (the "now" of the future-time rule).
pub fn now_millis() -> time::EpochMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
