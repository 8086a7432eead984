//! # voltcast-scoring
//!
//! The streaming job. It owns the run loop that connects a source (Kafka, Event Hubs or
//! files, from `voltcast-ingest`) to the stages after it, and the configuration that
//! assembles every stage's settings.
//!
//! Why the binary goes through this crate rather than using `ingest` directly: records
//! flow one way, ingest -> windows -> forecasts -> alerts, and the job is the one place
//! that knows the whole order. `ingest` is re-exported for the commands (`simulate`,
//! `bench ingest`) that need only the first stage.

pub mod alerts;
pub mod api;
pub mod archive;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod evaluate;
pub mod forecasting;
pub mod lines;
pub mod memory;
pub mod metrics;
pub mod overlap;
pub mod partition;
pub mod pipeline;
pub mod windows;
pub mod workers;

pub use config::{SourceKind, VoltcastConfig};
pub use error::ScoringError;
pub use voltcast_forecaster as forecaster;
pub use voltcast_ingest as ingest;
