//! The day windows on a real stream: simulator -> mock Kafka cluster (3 partitions) ->
//! ingest consumer -> window stage, compared battery by battery with a straightforward
//! reference implementation of the same rules (hash maps and loops, no DataFusion).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Date32Type, Float64Type, Int32Type};
use rdkafka::mocking::MockCluster;
use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, publish_kafka};
use voltcast_ingest::time::MILLIS_PER_DAY;
use voltcast_ingest::{
    BatchConfig, DeadLetterQueue, IngestCounters, KafkaConfig, KafkaSource, ValidationConfig,
};
use voltcast_scoring::partition::{PartitionSet, PartitionSettings};
use voltcast_scoring::pipeline::PartitionStage;
use voltcast_scoring::windows::{WindowConfig, daily};

/// (day, trips, minutes, cycles, lifetime, age, imputed)
type Row = (i32, f64, f64, f64, f64, i32, bool);

#[derive(Default)]
struct Day {
    seen: HashSet<i64>,
    trips: f64,
    minutes: f64,
    cycles: f64,
    lifetime: f64,
    age: i32,
}

/// The reference's rules, written the obvious way.
fn reference(sim: SimulatorConfig) -> BTreeMap<String, Vec<Row>> {
    let mut days: BTreeMap<String, BTreeMap<i32, Day>> = BTreeMap::new();
    let mut sim = FleetSimulator::new(sim, WireFormat::Json).unwrap();
    while let Some(d) = sim.next_day() {
        for r in d.messages.into_iter().filter_map(|m| m.record) {
            let day = (r.event_time / MILLIS_PER_DAY) as i32;
            let e = days
                .entry(r.battery_id.to_string())
                .or_default()
                .entry(day)
                .or_insert(Day {
                    age: i32::MAX,
                    ..Default::default()
                });
            if !e.seen.insert(r.event_time) {
                continue; // exact duplicate
            }
            e.trips += r.number_of_trips;
            e.minutes += r.daily_trip_duration;
            e.cycles += r.daily_cycles_used;
            e.lifetime = e.lifetime.max(r.lifetime_cycles_used);
            e.age = e.age.min(r.battery_age_days as i32);
        }
    }
    days.into_iter()
        .map(|(id, by_day)| {
            let mut rows: Vec<Row> = Vec::new();
            for (day, d) in by_day {
                if let Some(&(
                    last_day,
                    last_trips,
                    last_minutes,
                    last_cycles,
                    last_lifetime,
                    last_age,
                    _,
                )) = rows.last()
                {
                    let gap = day - last_day;
                    let mut lifetime = last_lifetime;
                    for k in 1..gap {
                        let f = k as f64 / gap as f64;
                        let cycles = last_cycles + (d.cycles - last_cycles) * f;
                        lifetime += cycles;
                        let trips = last_trips + (d.trips - last_trips) * f;
                        let minutes = last_minutes + (d.minutes - last_minutes) * f;
                        rows.push((
                            last_day + k,
                            trips,
                            minutes,
                            cycles,
                            lifetime,
                            last_age + k,
                            true,
                        ));
                    }
                }
                rows.push((day, d.trips, d.minutes, d.cycles, d.lifetime, d.age, false));
            }
            (id, rows)
        })
        .collect()
}

fn streamed(batches: &[RecordBatch]) -> BTreeMap<String, Vec<Row>> {
    let mut out: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for b in batches {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (ids, day, trips) = (col(daily::BATTERY_ID), col(daily::DAY), col(daily::TRIPS));
        let (minutes, cycles, lifetime) = (
            col(daily::MINUTES),
            col(daily::CYCLES),
            col(daily::LIFETIME),
        );
        let (age, imputed) = (col(daily::AGE), col(daily::IMPUTED));
        for i in 0..b.num_rows() {
            out.entry(ids.as_string::<i32>().value(i).to_string())
                .or_default()
                .push((
                    day.as_primitive::<Date32Type>().value(i),
                    trips.as_primitive::<Float64Type>().value(i),
                    minutes.as_primitive::<Float64Type>().value(i),
                    cycles.as_primitive::<Float64Type>().value(i),
                    lifetime.as_primitive::<Float64Type>().value(i),
                    age.as_primitive::<Int32Type>().value(i),
                    imputed.as_boolean().value(i),
                ));
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn same(a: &Row, b: &Row) -> bool {
    a.0 == b.0
        && close(a.1, b.1)
        && close(a.2, b.2)
        && close(a.3, b.3)
        && close(a.4, b.4)
        && a.5 == b.5
        && a.6 == b.6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_daily_series_equal_the_reference_battery_by_battery() {
    let sim = SimulatorConfig {
        batteries: 1000,
        days: 120,
        seed: 7,
        ..Default::default()
    };
    let want = reference(sim.clone());
    let imputed: usize = want.values().flatten().filter(|r| r.6).count();
    assert!(
        imputed > 100,
        "the simulation should have missing days to fill: {imputed}"
    );

    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("battery-telemetry", 3, 1).unwrap();
    cluster.create_topic("battery-telemetry-dlq", 1, 1).unwrap();
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        ..Default::default()
    };

    let mut total = 0;
    let mut count = FleetSimulator::new(sim.clone(), WireFormat::Json).unwrap();
    while let Some(d) = count.next_day() {
        total += d.messages.len() as u64;
    }

    let counters = Arc::new(IngestCounters::default());
    let source = KafkaSource::new(
        &kafka,
        BatchConfig {
            max_rows: 20_000,
            max_wait_ms: 200,
        },
        ValidationConfig::default(),
        counters.clone(),
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (late_queue, late) = DeadLetterQueue::memory();
    // The topic's partitions each have their own task, on threads of their own for the
    // larger batches of the backlog.
    let partitions = Arc::new(PartitionSet::on_sight(
        PartitionSettings::windows_only(WindowConfig::default()),
        None,
    ));
    let mut stage = PartitionStage::new(partitions, late_queue).with_closed_tap(tx);
    let seen = counters.clone();
    let consumer = tokio::spawn(async move {
        let all_read = async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
            while seen.received() < total && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        source.run(&mut stage, all_read).await.unwrap();
        stage.finish().await.unwrap();
        stage
    });
    let producer = kafka
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // Paced so the consumer keeps within the mock broker's 5 MiB per partition.
    publish_kafka(
        &mut FleetSimulator::new(sim, WireFormat::Json).unwrap(),
        &producer,
        "battery-telemetry",
        12.0,
        None,
    )
    .await
    .unwrap();
    let stage = consumer.await.unwrap();
    assert_eq!(counters.received(), total);

    let mut closed = Vec::new();
    for b in rx.try_iter() {
        closed.push(b);
    }
    assert!(
        closed.len() > 10,
        "days should close as the stream goes, not only at the end"
    );
    let got = streamed(&closed);
    assert_eq!(got.len(), want.len());
    let mut mismatches = Vec::new();
    for (id, rows) in &want {
        let g = &got[id];
        if g.len() != rows.len() || g.iter().zip(rows).any(|(a, b)| !same(a, b)) {
            let first = g.iter().zip(rows).find(|(a, b)| !same(a, b));
            mismatches.push(format!(
                "{id}: {} vs {} rows, first difference {first:?}",
                g.len(),
                rows.len()
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} batteries differ: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(3)]
    );
    let stats = stage.report().work.windows;
    assert!(
        stats.duplicates > 500,
        "duplicates in the stream: {}",
        stats.duplicates
    );
    assert_eq!(stats.late, 0);
    assert!(late.lock().unwrap().is_empty());
}

/// Every closed-day row, every column rendered, sorted: two runs closed the same days
/// with the same values when these are equal.
fn rendered(batches: &[RecordBatch]) -> Vec<String> {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let mut rows = Vec::new();
    for b in batches {
        let options = FormatOptions::default();
        let columns: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            let row: Vec<String> = columns.iter().map(|c| c.value(i).to_string()).collect();
            rows.push(row.join("|"));
        }
    }
    rows.sort();
    rows
}

/// A micro-batch spread over many partitions goes through one day aggregation, not one
/// per partition (a backlog over 1,400 partitions gave each tens of rows per batch, and
/// the runs cost more than their rows), and each partition still closes exactly the
/// days, with the values, that it closes worked on alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_many_partitions_is_aggregated_once_and_closes_what_each_would_alone() {
    use voltcast_ingest::batcher::MicroBatcher;
    use voltcast_ingest::dead_letter::Origin;
    use voltcast_ingest::{BatchSink, MicroBatch};

    const PARTITIONS: usize = 40;
    let sim = SimulatorConfig {
        batteries: 500,
        days: 30,
        seed: 17,
        malformed_rate: 0.0,
        ..Default::default()
    };
    // Keyed as Kafka does it: a battery's reports in one partition, in offset order.
    let partition_of = |key: &str| {
        let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        (hash % PARTITIONS as u64) as i32
    };
    let mut batcher = MicroBatcher::new(
        BatchConfig {
            max_rows: 4_500,
            max_wait_ms: 60_000,
        },
        ValidationConfig::default(),
        Arc::new(IngestCounters::default()),
    );
    let (mut dlq, _) = DeadLetterQueue::memory();
    let source: Arc<str> = Arc::from("battery-telemetry");
    let mut offsets = [0i64; PARTITIONS];
    let mut batches: Vec<MicroBatch> = Vec::new();
    let mut fleet = FleetSimulator::new(sim, WireFormat::Json).unwrap();
    // Batches of 4,500 rows (partitions in parallel), and now and then a day's end
    // closes a smaller one (partitions one after another).
    let mut days = 0;
    while let Some(day) = fleet.next_day() {
        days += 1;
        if days % 7 == 0 {
            batches.extend(batcher.take());
        }
        for m in day.messages {
            let partition = partition_of(&m.key);
            let origin = Origin {
                source: source.clone(),
                partition,
                offset: offsets[partition as usize],
            };
            offsets[partition as usize] += 1;
            let now = voltcast_ingest::now_millis();
            batcher
                .push_json(&m.payload, &origin, now, &mut dlq)
                .unwrap();
            if batcher.is_full() {
                batches.extend(batcher.take());
            }
        }
    }
    batches.extend(batcher.take());
    let spread = batches.iter().map(|b| b.parts.len()).min().unwrap();
    assert!(
        batches.len() >= 5 && spread >= PARTITIONS / 2,
        "{} batches, each over {spread} partitions at least",
        batches.len()
    );

    let settings = PartitionSettings::windows_only(WindowConfig::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let partitions = Arc::new(PartitionSet::on_sight(settings.clone(), None));
    let mut stage =
        PartitionStage::new(partitions, DeadLetterQueue::memory().0).with_closed_tap(tx);
    let alone = PartitionSet::on_sight(settings.clone(), None);
    let mut tasks = BTreeMap::new();
    let mut closed_alone = Vec::new();
    for batch in &batches {
        for part in &batch.parts {
            let key = voltcast_scoring::checkpoint::PartitionKey {
                topic: part.partition.0.clone(),
                partition: part.partition.1,
            };
            let task = tasks
                .entry(part.partition.1)
                .or_insert_with(|| alone.fresh_task(key));
            let position = batch.position_of(&part.partition).unwrap();
            let now = voltcast_ingest::now_millis();
            let rows = batch.rows_of(part);
            let out = task.apply(&rows, position, now, &settings, None, None);
            closed_alone.extend(out.unwrap().closed);
        }
        stage.accept(batch.clone()).await.unwrap();
    }
    let closed_together: Vec<RecordBatch> = rx.try_iter().collect();

    let (together, alone) = (rendered(&closed_together), rendered(&closed_alone));
    assert!(
        together.len() > 500 * 25,
        "days closed as the batches went: {}",
        together.len()
    );
    assert_eq!(together.len(), alone.len(), "as many days closed");
    assert!(together == alone, "the same days with the same values");
    let work = stage.report().work;
    assert!(
        work.aggregate.plans_run <= batches.len() as u64 + 1,
        "one aggregation per batch (and at most one plan made), not one per partition: \
         {} for {} batches over {PARTITIONS} partitions",
        work.aggregate.plans_run,
        batches.len()
    );
    assert_eq!(work.aggregate.polls, work.aggregate.plans_run);
    assert_eq!(
        work.windows.rows_in,
        batches
            .iter()
            .map(|b| b.rows.num_rows() as u64)
            .sum::<u64>()
    );
}
