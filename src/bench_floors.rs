//! `voltcast bench pipeline --floors`: the ceilings the pipeline sits under on this
//! machine, read off the same produced topic before the pipeline runs.
//!
//! Why: a throughput target for the whole pipeline means little without knowing what
//! librdkafka alone, and the source alone, can deliver here. If consuming the backlog
//! with nothing done to it takes most of the time the target allows, no work on the
//! stages can meet it; the floors say where the remaining time can come from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use voltcast_scoring::VoltcastConfig;
use voltcast_scoring::ingest::batcher::{BatchSink, MicroBatch, SinkError};
use voltcast_scoring::ingest::{
    DeadLetterQueue, IngestCounters, KafkaConfig, KafkaSource, SourcePosition,
};
use voltcast_scoring::memory::process_cpu_seconds;

/// Polls `total` messages of the configured topics with the pipeline's consumer settings
/// (a group of its own) and drops them: what librdkafka and the broker cost alone.
pub fn librdkafka_alone(kafka: &KafkaConfig, total: u64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka
        .consumer_config()?
        .set("group.id", format!("{}-floor-librdkafka", kafka.group_id))
        .create()
        .context("creating the floor consumer")?;
    let topics = kafka.effective_topics()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let (mut read, mut bytes) = (0u64, 0usize);
    let mut first: Option<(Instant, f64)> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while read < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the floor consumer read {read} of {total} messages in 10 minutes"
        );
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = polled.context("floor consumer")?;
        first.get_or_insert_with(|| (Instant::now(), process_cpu_seconds()));
        bytes += msg.payload().map_or(0, <[u8]>::len);
        read += 1;
    }
    let (started, cpu_before) = first.unwrap_or((Instant::now(), process_cpu_seconds()));
    report(
        "librdkafka alone (polled and dropped)",
        read,
        started.elapsed(),
        process_cpu_seconds() - cpu_before,
    );
    println!(
        "bench pipeline floor: {:.0} payload bytes per message",
        bytes as f64 / read.max(1) as f64
    );
    Ok(())
}

/// Runs the Kafka source as `voltcast run` does (consume, decode, validate, micro-batch)
/// into a sink that drops each batch: the ceiling of the pipeline's source loop.
pub async fn source_alone(config: &VoltcastConfig, total: u64) -> anyhow::Result<()> {
    let mut kafka = config.kafka.clone();
    kafka.group_id = format!("{}-floor-source", kafka.group_id);
    let counters = Arc::new(IngestCounters::default());
    // Dead letters are kept in memory: the pipeline run that follows writes the topic's.
    let (dlq, _dead) = DeadLetterQueue::memory();
    let source = KafkaSource::with_dead_letters(
        &kafka,
        config.batch.clone(),
        config.validation.clone(),
        counters.clone(),
        dlq,
    )?;
    let all_read = {
        let counters = counters.clone();
        async move {
            while counters.received() < total {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    let mut sink = DroppingSink::default();
    let watch = {
        let counters = counters.clone();
        tokio::spawn(async move {
            while counters.received() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (Instant::now(), process_cpu_seconds())
        })
    };
    source.run(&mut sink, all_read).await?;
    let (started, cpu_before) = watch.await?;
    report(
        "the Kafka source alone (consume, decode, validate, batch; batches dropped)",
        counters.received(),
        started.elapsed(),
        process_cpu_seconds() - cpu_before,
    );
    println!(
        "bench pipeline floor: the source made {} batches of {} rows",
        sink.batches, sink.rows
    );
    Ok(())
}

fn report(what: &str, events: u64, wall: Duration, cpu: f64) {
    let seconds = wall.as_secs_f64().max(1e-9);
    println!(
        "bench pipeline floor, {what}: {events} events in {seconds:.2} s, {:.0} events/s; process CPU {cpu:.2} s ({:.2} us per event)",
        events as f64 / seconds,
        cpu * 1e6 / events.max(1) as f64,
    );
}

/// Takes batches and keeps nothing: no stage, no checkpoint, no offsets to commit.
#[derive(Default)]
struct DroppingSink {
    batches: u64,
    rows: usize,
}

impl BatchSink for DroppingSink {
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        self.batches += 1;
        self.rows += batch.rows.num_rows();
        Ok(Vec::new())
    }
}
