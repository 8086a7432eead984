//! The run loop: source -> stages. Until the day windows exist, batches end in a
//! [`BatchTally`] that accounts for every row, battery and dead letter.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use voltcast_ingest::arrow::array::{Array, AsArray};
use voltcast_ingest::dead_letter::DeadLetterQueue;
use voltcast_ingest::{BatchSink, FileSource, IngestCounters, KafkaSource, MicroBatch, schema};

use crate::config::{SourceKind, VoltcastConfig};
use crate::error::ScoringError;

/// Counts what reached the end of the pipeline.
#[derive(Debug, Default)]
pub struct BatchTally {
    pub batches: u64,
    pub rows: u64,
    pub dead_letters: u64,
    pub batteries: HashSet<String>,
}

impl BatchSink for BatchTally {
    async fn accept(
        &mut self,
        batch: MicroBatch,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.batches += 1;
        self.rows += batch.rows.num_rows() as u64;
        self.dead_letters += batch.dead_letters as u64;
        let ids = batch
            .rows
            .column_by_name(schema::BATTERY_ID)
            .ok_or("batch has no battery_id column")?
            .as_string::<i32>();
        for i in 0..ids.len() {
            if !self.batteries.contains(ids.value(i)) {
                self.batteries.insert(ids.value(i).to_string());
            }
        }
        tracing::debug!(
            rows = batch.rows.num_rows(),
            dead_letters = batch.dead_letters,
            "batch"
        );
        Ok(())
    }
}

/// What a run did, for the closing log line.
#[derive(Debug)]
pub struct RunReport {
    pub tally: BatchTally,
    pub received: u64,
    pub rejected: u64,
    pub seconds: f64,
}

/// Runs the configured source until it ends (files) or `shutdown` fires (Kafka).
pub async fn run(
    config: &VoltcastConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, ScoringError> {
    let counters = Arc::new(IngestCounters::default());
    let mut tally = BatchTally::default();
    let started = Instant::now();
    match config.source {
        SourceKind::Kafka => {
            let source = KafkaSource::new(
                &config.kafka,
                config.batch.clone(),
                config.validation.clone(),
                counters.clone(),
            )?;
            source.run(&mut tally, shutdown).await?;
        }
        SourceKind::File => {
            let dlq = DeadLetterQueue::file(config.file.default_dead_letters());
            let source = FileSource::new(
                config.file.clone(),
                config.batch.clone(),
                config.validation.clone(),
                counters.clone(),
                dlq,
            );
            source.run(&mut tally).await?;
        }
    }
    Ok(RunReport {
        tally,
        received: counters.received(),
        rejected: counters.rejected_total(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
