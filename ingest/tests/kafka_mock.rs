//! The Kafka source against librdkafka's mock cluster: a real Kafka-protocol broker
//! running in this process.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::CollectingSink;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use voltcast_ingest::dead_letter::{HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_SOURCE};
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, publish_kafka};
use voltcast_ingest::{
    BatchConfig, IngestCounters, KafkaConfig, KafkaSource, RejectReason, ValidationConfig,
};

const TOPIC: &str = "battery-telemetry";
const DLQ: &str = "battery-telemetry-dlq";

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>, key: &str) -> &'a str {
    let h = m.headers().expect("dead letters carry headers");
    let v = h
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .expect(key);
    std::str::from_utf8(v).unwrap()
}

/// Runs the Kafka source until `total` messages are read (or two minutes pass) and
/// returns what it handed on.
async fn consume(
    kafka: KafkaConfig,
    batches: BatchConfig,
    counters: Arc<IngestCounters>,
    total: u64,
) -> Result<CollectingSink, voltcast_ingest::IngestError> {
    let source = KafkaSource::new(
        &kafka,
        batches,
        ValidationConfig::default(),
        counters.clone(),
    )
    .unwrap();
    let all_read = async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while counters.received() < total && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut sink = CollectingSink::default();
    source.run(&mut sink, all_read).await.map(|_| sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_arrives_once_and_every_defect_is_dead_lettered() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 3, 1).unwrap();
    cluster.create_topic(DLQ, 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();

    let sim_config = SimulatorConfig {
        batteries: 1000,
        days: 60,
        malformed_rate: 0.003,
        ..Default::default()
    };

    // What must arrive: computed from an identical (same seed) simulation.
    let mut expected_sim = FleetSimulator::new(sim_config.clone(), WireFormat::Json).unwrap();
    let mut want_per_battery: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut want_dead: HashMap<Vec<u8>, RejectReason> = HashMap::new();
    let mut total = 0u64;
    while let Some(day) = expected_sim.next_day() {
        for m in day.messages {
            total += 1;
            match (m.record, m.defect) {
                (Some(r), _) => {
                    let e = want_per_battery
                        .entry(r.battery_id.to_string())
                        .or_default();
                    e.0 += 1;
                    e.1 = e.1.wrapping_add(r.daily_cycles_used.to_bits());
                }
                (None, Some(reason)) => {
                    want_dead.insert(m.payload, reason);
                }
                (None, None) => unreachable!(),
            }
        }
    }
    assert!(
        want_dead.len() > 100,
        "too few malformed messages to be a test: {}",
        want_dead.len()
    );

    // The mock broker keeps only 5 MiB per partition (hard-coded in librdkafka), so the
    // consumer runs while the simulator publishes, as in a real stream.
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    };
    let counters = Arc::new(IngestCounters::default());
    let batches = BatchConfig {
        max_rows: 7_000,
        max_wait_ms: 200,
    };
    let consumer = tokio::spawn(consume(kafka.clone(), batches, counters.clone(), total));

    let producer = kafka
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut sim = FleetSimulator::new(sim_config, WireFormat::Json).unwrap();
    let summary = publish_kafka(&mut sim, &producer, TOPIC, 10.0, None)
        .await
        .unwrap();
    assert_eq!(summary.messages, total);
    let sink = consumer.await.unwrap().unwrap();
    assert_eq!(
        counters.received(),
        total,
        "not every message was consumed in time"
    );

    // Every valid record exactly once: counts and cycle checksums per battery.
    common::assert_same_tally(&sink.per_battery(), &want_per_battery);
    assert!(
        sink.batches.len() > 5,
        "expected several micro-batches, got {}",
        sink.batches.len()
    );

    // Every malformed one in the DLQ, with the right reason and its origin in headers.
    let dlq_reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "dlq-check")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    dlq_reader.subscribe(&[DLQ]).unwrap();
    let mut got_dead = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got_dead.len() < want_dead.len() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = dlq_reader.poll(Duration::from_millis(200)) {
            assert_eq!(header(&m, HEADER_SOURCE), TOPIC);
            let partition: i32 = header(&m, HEADER_PARTITION).parse().unwrap();
            let offset: i64 = header(&m, HEADER_OFFSET).parse().unwrap();
            assert!((0..3).contains(&partition) && offset >= 0);
            let reason = RejectReason::parse(header(&m, HEADER_REASON)).unwrap();
            got_dead.insert(m.payload().unwrap().to_vec(), reason);
        }
    }
    assert_eq!(got_dead, want_dead);
    let by_reason = |m: &HashMap<Vec<u8>, RejectReason>| {
        let mut c = BTreeMap::new();
        m.values().for_each(|r| *c.entry(*r).or_insert(0u64) += 1);
        c
    };
    for (reason, n) in by_reason(&want_dead) {
        assert_eq!(counters.rejected(reason), n, "{reason}");
    }

    // Committed offsets equal the end offsets of every partition.
    let probe: BaseConsumer = kafka.consumer_config().unwrap().create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(TOPIC, p);
    }
    let committed = probe
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    for p in 0..3 {
        let (_, high) = probe
            .fetch_watermarks(TOPIC, p, Duration::from_secs(10))
            .unwrap();
        let c = committed.find_partition(TOPIC, p).unwrap().offset();
        assert_eq!(c, Offset::Offset(high), "partition {p}");
        assert!(high > 0);
    }
}

/// 200,000 malformed messages ahead of valid ones: every bad one dead-lettered (the
/// producer's queue holds 100,000, so they must be flushed as they come), every valid one
/// taken in, and the source never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_messages_is_dead_lettered_and_the_valid_ones_follow() {
    const BAD: u64 = 200_000;
    const PARTITIONS: i32 = 8;
    const DLQ_PARTITIONS: i32 = 32;
    let cluster = MockCluster::new(1).unwrap();
    // The mock broker keeps 5 MiB per partition: spread the flood and its dead letters
    // (~200 bytes each with their headers).
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    cluster.create_topic(DLQ, DLQ_PARTITIONS, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let fleet_side = KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    };
    // The source's side: a producer queue far smaller than the flood (librdkafka's default
    // is 100,000 messages; a slow broker fills it the same way).
    let mut kafka = fleet_side.clone();
    kafka
        .properties
        .insert("queue.buffering.max.messages".into(), "2000".into());
    // Keyless dead letters spread over every partition (not stuck to one), so that none
    // passes the mock broker's 5 MiB.
    kafka
        .properties
        .insert("sticky.partitioning.linger.ms".into(), "0".into());
    let producer: rdkafka::producer::FutureProducer = fleet_side
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let mut deliveries = Vec::new();
    for i in 0..BAD {
        let payload = format!("{{\"battery_id\": \"B{i}\", \"oops\": ");
        let key = format!("k{i}");
        let record = rdkafka::producer::FutureRecord::to(TOPIC)
            .key(&key)
            .payload(&payload);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        if deliveries.len() == 50_000 {
            for d in deliveries.drain(..) {
                d.await.unwrap().unwrap();
            }
        }
    }
    for d in deliveries.drain(..) {
        d.await.unwrap().unwrap();
    }
    let mut sim = FleetSimulator::new(
        SimulatorConfig {
            batteries: 50,
            days: 10,
            malformed_rate: 0.0,
            ..Default::default()
        },
        WireFormat::Json,
    )
    .unwrap();
    let valid = publish_kafka(&mut sim, &producer, TOPIC, 0.0, None)
        .await
        .unwrap()
        .messages;
    let total = BAD + valid;

    let counters = Arc::new(IngestCounters::default());
    // A long batch deadline, as on a fast backlog: only the batch size flushes.
    let batches = BatchConfig {
        max_rows: 50_000,
        max_wait_ms: 60_000,
    };
    let sink = consume(kafka.clone(), batches, counters.clone(), total)
        .await
        .expect("the source keeps running through the flood");
    assert_eq!(counters.received(), total, "not every message was consumed");
    assert_eq!(counters.rejected_total(), BAD);
    let rows: u64 = sink.per_battery().values().map(|(n, _)| n).sum();
    assert_eq!(rows, valid, "every valid message after the flood taken in");

    // Every bad message is on the dead-letter topic, once.
    let probe: BaseConsumer = kafka.consumer_config().unwrap().create().unwrap();
    let mut on_dlq = 0;
    for p in 0..DLQ_PARTITIONS {
        let (low, high) = probe
            .fetch_watermarks(DLQ, p, Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            low, 0,
            "the mock broker dropped dead letters of partition {p}"
        );
        on_dlq += (high - low) as u64;
    }
    assert_eq!(on_dlq, BAD);
}

/// Producers pick their own codec (zstd is the usual choice today). librdkafka built
/// without one reports an error and skips the whole batch, so a codec the source cannot
/// read would lose every record in it: each of Kafka's four is read, nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_every_compression_codec_are_read() {
    const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];
    let cluster = MockCluster::new(1).unwrap();
    let topics: Vec<String> = CODECS.iter().map(|c| format!("{TOPIC}-{c}")).collect();
    for t in &topics {
        cluster.create_topic(t, 2, 1).unwrap();
    }
    cluster.create_topic(DLQ, 1, 1).unwrap();
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topics: topics.clone(),
        ..Default::default()
    };
    let sim_config = SimulatorConfig {
        batteries: 100,
        days: 20,
        malformed_rate: 0.0,
        ..Default::default()
    };
    let mut total = 0;
    for (codec, topic) in CODECS.iter().zip(&topics) {
        let producer = kafka
            .producer_config()
            .unwrap()
            .set("linger.ms", "5")
            .set("compression.type", *codec)
            .create()
            .unwrap_or_else(|e| panic!("a {codec} producer: {e}"));
        let mut sim = FleetSimulator::new(sim_config.clone(), WireFormat::Json).unwrap();
        total += publish_kafka(&mut sim, &producer, topic, 0.0, None)
            .await
            .unwrap()
            .messages;
    }
    let counters = Arc::new(IngestCounters::default());
    let batches = BatchConfig {
        max_rows: 5_000,
        max_wait_ms: 200,
    };
    let sink = consume(kafka, batches, counters.clone(), total)
        .await
        .unwrap();
    assert_eq!(counters.received(), total, "batches were skipped");
    assert_eq!(counters.rejected_total(), 0);
    let per_battery = sink.per_battery();
    assert_eq!(per_battery.len(), 100);
    let rows: u64 = per_battery.values().map(|(n, _)| n).sum();
    assert_eq!(rows, total, "every record of every codec taken in");
}
