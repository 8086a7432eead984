//! `voltcast bench fuzz`: a million damaged messages through the path `voltcast run`
//! takes (Kafka source, decode, validation, dead letters, day windows, forecasts), then
//! the books are checked: every message became a row or a dead letter, every dead letter
//! is on the dead-letter topic with a reason, and nothing panicked (a panic ends the run
//! with an error). Exits with an error when the books do not balance.
//!
//! Why through Kafka and the whole pipeline rather than the decoder alone: a damaged
//! record that passes validation still has to get through the window stage, and a dead
//! letter that is refused by the producer is lost where a decoder test cannot see it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use voltcast_scoring::VoltcastConfig;
use voltcast_scoring::ingest::dead_letter::HEADER_REASON;
use voltcast_scoring::ingest::mutate::MessageMutator;
use voltcast_scoring::ingest::simulate::{
    FleetSimulator, SimulatorConfig, WireFormat, publish_kafka,
};
use voltcast_scoring::ingest::{KafkaConfig, RejectReason};
use voltcast_scoring::pipeline::Services;

#[derive(Args, Debug, Clone)]
pub struct FuzzArgs {
    /// Damaged messages to send, at least (whole simulated days are sent).
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Seeds the fleet and the damage: a failure repeats with the same seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Days of the simulated fleet; the battery count follows from `--messages`.
const DAYS: u32 = 120;
/// What the mock broker keeps per partition before dropping the oldest messages, and a
/// generous size per message there: a damaged message averages ~0.8 KB (the deeply nested
/// and oversize ones weigh in), and its dead letter adds headers and is not compressed.
const MOCK_PARTITION_BYTES: u64 = 5 << 20;
const BYTES_PER_MESSAGE: u64 = 2_500;

pub fn run(args: FuzzArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(fuzz(args))
}

async fn fuzz(args: FuzzArgs) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    let mut config = VoltcastConfig::default();
    config.kafka.brokers = cluster.bootstrap_servers();
    let partitions = (args.messages * BYTES_PER_MESSAGE).div_ceil(MOCK_PARTITION_BYTES) as i32;
    let partitions = partitions.clamp(4, 1024);
    let topic = config.kafka.topics[0].clone();
    let dlq = config.kafka.dead_letter_topic.clone();
    cluster.create_topic(&topic, partitions, 1)?;
    cluster.create_topic(&dlq, partitions, 1)?;
    cluster.create_topic(&config.alerts.topic, 1, 1)?;
    cluster.create_topic(&config.alerts.forecasts_topic, 1, 1)?;
    // Keyless dead letters spread over every partition, so none passes the mock's limit.
    config
        .kafka
        .properties
        .insert("sticky.partitioning.linger.ms".into(), "0".into());

    let batteries = (args.messages.div_ceil(u64::from(DAYS)) as usize).max(1);
    let sim = SimulatorConfig {
        batteries,
        days: DAYS,
        seed: args.seed,
        ..Default::default()
    };
    // Four times the size limit: refused before parsing, yet within the broker's 1 MB.
    let oversize = config.validation.max_message_bytes * 4;
    let mut fleet = FleetSimulator::new(sim, WireFormat::Json)?
        .with_mutator(MessageMutator::new(args.seed, oversize));
    let producer = config
        .kafka
        .producer_config()?
        .set("linger.ms", "50")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .context("creating the fuzz producer")?;
    let producing = Instant::now();
    let total = publish_kafka(&mut fleet, &producer, &topic, 0.0, None)
        .await?
        .messages;
    println!("bench build: {}", crate::bench::build_profile());
    println!(
        "bench fuzz: {total} damaged messages ({batteries} batteries x {DAYS} days, seed {}) into {partitions} partitions in {:.1} s",
        args.seed,
        producing.elapsed().as_secs_f64()
    );
    let damage: Vec<String> = fleet
        .mutations()
        .iter()
        .map(|(m, n)| format!("{} {n}", m.as_str()))
        .collect();
    println!("bench fuzz damage: {}", damage.join(", "));
    let kept = crate::bench_pipeline::held_messages(&config.kafka, &topic, partitions)?;
    ensure!(
        kept == total,
        "the mock broker holds {kept} of {total} messages"
    );

    let dir = tempfile::tempdir()?;
    config.api.listen = String::new();
    config.alerts.store_path = dir.path().join("alerts");
    config.checkpoint.path = dir.path().join("checkpoint");
    config.archive.path = std::path::PathBuf::new();
    let services = Services::start(&config).await?;
    let counters = services.counters.clone();
    let started = Instant::now();
    let all_read = async move {
        while counters.received() < total {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let report = voltcast_scoring::pipeline::run_with(&config, &services, all_read).await?;
    services.finish(Duration::from_secs(5)).await;
    let seconds = started.elapsed().as_secs_f64();
    let rows = report.tally.rows;
    println!(
        "bench fuzz: {} received, {rows} rows, {} dead letters ({} late), {:.0} messages/s ({seconds:.1} s)",
        report.received,
        report.rejected,
        report.windows.late,
        total as f64 / seconds
    );

    let letters = dead_letters(&config.kafka, &dlq, partitions)?;
    let reasons: Vec<String> = letters
        .by_reason
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    println!("bench fuzz dead letters by reason: {}", reasons.join(", "));
    let mut unbalanced = Vec::new();
    if report.received != total {
        unbalanced.push(format!("{} of {total} messages read", report.received));
    }
    if rows + report.rejected != report.received {
        unbalanced.push(format!(
            "{rows} rows + {} dead letters != {} messages",
            report.rejected, report.received
        ));
    }
    let expected_letters = report.rejected + report.windows.late;
    if letters.total != expected_letters {
        unbalanced.push(format!(
            "the dead-letter topic holds {} letters, the pipeline refused {expected_letters}",
            letters.total
        ));
    }
    if letters.without_reason > 0 {
        unbalanced.push(format!(
            "{} dead letters without a known reason",
            letters.without_reason
        ));
    }
    if unbalanced.is_empty() {
        println!(
            "bench fuzz: books balance: rows + dead letters = messages, each letter with a reason, no panic"
        );
        Ok(())
    } else {
        anyhow::bail!("bench fuzz: {}", unbalanced.join("; "))
    }
}

fn probe(kafka: &KafkaConfig) -> anyhow::Result<BaseConsumer> {
    Ok(kafka
        .consumer_config()?
        .set("group.id", "voltcast-fuzz-check")
        .set("enable.auto.commit", "false")
        .create()?)
}

#[derive(Default)]
struct Letters {
    total: u64,
    without_reason: u64,
    by_reason: BTreeMap<String, u64>,
}

/// Reads the whole dead-letter topic back and tallies each letter's reason header.
fn dead_letters(kafka: &KafkaConfig, topic: &str, partitions: i32) -> anyhow::Result<Letters> {
    let expected = crate::bench_pipeline::held_messages(kafka, topic, partitions)?;
    let consumer = probe(kafka)?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut letters = Letters::default();
    let deadline = Instant::now() + Duration::from_secs(300);
    while letters.total < expected {
        ensure!(
            Instant::now() < deadline,
            "read {} of {expected} dead letters back in 300 s",
            letters.total
        );
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        letters.total += 1;
        let reason = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == HEADER_REASON)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(RejectReason::parse)
        });
        match reason {
            Some(r) => *letters.by_reason.entry(r.to_string()).or_default() += 1,
            None => letters.without_reason += 1,
        }
    }
    Ok(letters)
}
