//! One fleet-wide alert view from any instance: two `run` pipelines share a telemetry
//! topic's partitions (one consumer group) on librdkafka's mock cluster, each raising the
//! alerts of its own batteries, and each one's store (what its API serves) comes to list
//! the alerts of both, read from the alerts topic, and every battery's latest forecast,
//! read from the forecasts topic; and an acknowledgement taken by one reaches the
//! episode the other owns.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureRecord;
use voltcast_scoring::alerts::{AlertFilter, AlertStatus, Severity};
use voltcast_scoring::ingest::simulate::{
    FleetSimulator, SimDay, SimulatorConfig, WireFormat, publish_kafka,
};
use voltcast_scoring::pipeline::{RunReport, Services, run_with};
use voltcast_scoring::{ScoringError, VoltcastConfig};

/// A mock cluster with the telemetry, dead-letter, alerts and forecasts topics.
fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).unwrap();
    for (topic, partitions) in [
        ("battery-telemetry", 4),
        ("battery-telemetry-dlq", 1),
        ("battery-alerts", 4),
        ("battery-forecasts", 4),
    ] {
        cluster.create_topic(topic, partitions, 1).unwrap();
    }
    cluster
}

/// One instance's configuration: its own alert store under `dir/name`, a checkpoint
/// store shared with the other, the API on `api` (empty: none).
fn instance<C: rdkafka::ClientContext>(
    cluster: &MockCluster<'static, C>,
    dir: &std::path::Path,
    name: &str,
    api: &str,
) -> VoltcastConfig {
    let mut c = VoltcastConfig::default();
    c.kafka.brokers = cluster.bootstrap_servers();
    c.api.listen = api.to_string();
    c.alerts.store_path = dir.join(name).join("alerts");
    c.checkpoint.path = dir.join("checkpoint");
    c.archive.path = std::path::PathBuf::new();
    c.batch.max_rows = 2_000;
    c
}

fn producer(config: &VoltcastConfig) -> rdkafka::producer::FutureProducer {
    config
        .kafka
        .producer_config()
        .unwrap()
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

/// The pipeline of one instance until `stop` fires.
async fn run_until(
    config: &VoltcastConfig,
    services: &Services,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<RunReport, ScoringError> {
    run_with(config, services, async {
        let _ = stop.await;
    })
    .await
}

fn ids(services: &Services) -> BTreeSet<String> {
    services
        .alerts
        .query(&AlertFilter::default())
        .unwrap()
        .into_iter()
        .map(|a| a.alert_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_lists_the_alerts_of_every_instance() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| instance(&cluster, dir.path(), name, "");
    let (a_config, b_config) = (config("a"), config("b"));
    let producer = producer(&a_config);
    let sim = SimulatorConfig {
        batteries: 240,
        days: 150,
        seed: 3,
        ..Default::default()
    };
    let mut fleet = FleetSimulator::new(sim, WireFormat::Json).unwrap();
    let total = publish_kafka(&mut fleet, &producer, "battery-telemetry", 0.0, None)
        .await
        .unwrap()
        .messages;

    let a = Services::start(&a_config).await.unwrap();
    let b = Services::start(&b_config).await.unwrap();
    let read = |s: &Services| s.counters.clone();
    let (a_read, b_read) = (read(&a), read(&b));
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let (a_run, b_run, ()) = tokio::join!(
        run_until(&a_config, &a, stopped_a),
        run_until(&b_config, &b, stopped_b),
        async {
            let deadline = Instant::now() + Duration::from_secs(120);
            while a_read.received() + b_read.received() < total && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Both have joined and split the partitions by now; let the last days close.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = stop_a.send(());
            let _ = stop_b.send(());
        }
    );
    a_run.unwrap();
    b_run.unwrap();
    assert!(
        a_read.received() > 0 && b_read.received() > 0,
        "both instances consumed"
    );

    // Each instance raised its own batteries' alerts and assessed its own batteries;
    // within a bound, each lists all alerts and shows every battery's latest forecast.
    let batteries: Vec<String> = (0..240).map(|i| format!("B{i:06}")).collect();
    let assessed = |s: &Services| {
        batteries
            .iter()
            .filter(|b| s.alerts.latest(b).is_some())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (in_a, in_b) = (ids(&a), ids(&b));
        if in_a == in_b && !in_a.is_empty() && assessed(&a) == 240 && assessed(&b) == 240 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "views differ: {} alerts in A only, {} in B only; batteries with a forecast: {} in A, {} in B",
            in_a.difference(&in_b).count(),
            in_b.difference(&in_a).count(),
            assessed(&a),
            assessed(&b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let own = |name: &str| {
        std::fs::read_to_string(dir.path().join(name).join("alerts/alerts.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["alert_id"].as_str().unwrap().to_string())
            .collect::<BTreeSet<_>>()
    };
    let (own_a, own_b) = (own("a"), own("b"));
    assert!(!own_a.is_empty() && !own_b.is_empty(), "both raised alerts");
    let union: BTreeSet<_> = own_a.union(&own_b).cloned().collect();
    assert_eq!(ids(&a), union, "A lists every alert, its own and B's");
    own_assessments_are_skipped(&a_config, &a, &b).await;
    a.finish(Duration::from_secs(1)).await;
    b.finish(Duration::from_secs(1)).await;
}

/// Each instance tags its assessments with its origin and its view skips them unread
/// (it holds them already), while it reads every other origin's. Shown with forged
/// copies of a published assessment dated later: one under the publisher's own origin,
/// which only the other instance takes, then an older one under a third origin, which
/// only the publisher takes.
async fn own_assessments_are_skipped(config: &VoltcastConfig, a: &Services, b: &Services) {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use voltcast_scoring::alerts::publish::HEADER_ORIGIN;

    let consumer: StreamConsumer = config
        .kafka
        .consumer_config()
        .unwrap()
        .set("group.id", "fleet-view-test-reader")
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..4 {
        list.add_partition_offset("battery-forecasts", p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    // Messages until both instances' origins are seen; the last one is forged below.
    let mut origins = BTreeSet::new();
    let mut last = None;
    while origins.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("both instances published assessments")
            .unwrap();
        let origin = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == HEADER_ORIGIN))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
            .expect("every assessment names its origin");
        let payload: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        origins.insert(origin.clone());
        last = Some((origin, m.key().unwrap().to_vec(), payload));
    }
    let (origin, key, mut forged) = last.unwrap();
    let battery = String::from_utf8(key.clone()).unwrap();
    let day = forged["day"].as_i64().unwrap();
    let producer = producer(config);
    let day_in = |s: &Services| s.alerts.latest(&battery).map_or(0, |u| i64::from(u.day));

    // First 2,000 days on under the publisher's origin, then 1,000 under a third's, in
    // the same partition: an instance that reads the first ignores the second (older).
    for (days_on, from) in [(2000, origin.as_str()), (1000, "a-third-instance")] {
        forged["day"] = (day + days_on).into();
        let payload = serde_json::to_vec(&forged).unwrap();
        let headers = OwnedHeaders::new().insert(Header {
            key: HEADER_ORIGIN,
            value: Some(from),
        });
        let record = FutureRecord::to("battery-forecasts")
            .key(&key)
            .payload(&payload)
            .headers(headers);
        producer.send(record, Duration::from_secs(5)).await.unwrap();
    }
    wait_for("both views past the forged assessments", 20, || {
        day_in(a) >= day + 1000 && day_in(b) >= day + 1000
    })
    .await;
    let mut days = [day_in(a) - day, day_in(b) - day];
    days.sort();
    assert_eq!(
        days,
        [1000, 2000],
        "the publisher skipped its own origin's assessment and read the third's; the other read both"
    );
}

/// Sends the days' messages and waits for their delivery; returns how many.
async fn send_days(producer: &rdkafka::producer::FutureProducer, days: &[SimDay]) -> usize {
    let mut in_flight = Vec::new();
    for m in days.iter().flat_map(|d| &d.messages) {
        let record = FutureRecord::to("battery-telemetry")
            .key(&m.key)
            .payload(&m.payload);
        in_flight.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    let n = in_flight.len();
    for f in in_flight {
        f.await.unwrap().unwrap();
    }
    n
}

async fn wait_for(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {seconds} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /api/alerts/{id}/ack` on instance A for alerts of batteries B owns: B's view
/// lists them acknowledged, B applies the bookings to its episodes, and B's next
/// escalation of each such episode says service is booked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_any_instance_reaches_the_owners_episode() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, api: &str| instance(&cluster, dir.path(), name, api);
    let (a_config, b_config) = (config("a", "127.0.0.1:0"), config("b", ""));
    let producer = producer(&a_config);
    let sim = SimulatorConfig {
        batteries: 240,
        days: 200,
        seed: 3,
        ..Default::default()
    };
    let mut fleet = FleetSimulator::new(sim, WireFormat::Json).unwrap();
    let days: Vec<SimDay> = std::iter::from_fn(|| fleet.next_day()).collect();
    let (first, rest) = days.split_at(140);
    let sent_first = send_days(&producer, first).await;

    let a = Services::start(&a_config).await.unwrap();
    let b = Services::start(&b_config).await.unwrap();
    let (a_read, b_read) = (a.counters.clone(), b.counters.clone());
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let api = format!("http://{}", a.api_addr.unwrap());
    let (a_run, b_run, acked) = tokio::join!(
        run_until(&a_config, &a, stopped_a),
        run_until(&b_config, &b, stopped_b),
        async {
            let consumed = || a_read.received() + b_read.received();
            wait_for("the first days consumed", 120, || {
                consumed() >= sent_first as u64
            })
            .await;
            // B's open warnings, once A's view lists them too.
            let b_open = || -> Vec<String> {
                let store = b.alerts.store.lock().unwrap();
                store
                    .alerts()
                    .map(Result::unwrap)
                    .filter(|x| x.status == AlertStatus::Open && x.severity == Severity::Warning)
                    .filter(|x| store.recorded(&x.alert_id).is_some())
                    .map(|x| x.alert_id.clone())
                    .collect()
            };
            tokio::time::sleep(Duration::from_secs(2)).await;
            let targets = b_open();
            assert!(!targets.is_empty(), "B has open warnings to acknowledge");
            wait_for("A's view of B's alerts", 20, || {
                let in_a = ids(&a);
                targets.iter().all(|t| in_a.contains(t))
            })
            .await;
            let client = reqwest::Client::new();
            for id in &targets {
                let r = client
                    .post(format!("{api}/api/alerts/{id}/ack"))
                    .json(&serde_json::json!({ "by": "service-desk-a" }))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "ack {id} on A: {}", r.status());
            }
            wait_for("B's view of the acknowledgements", 20, || {
                targets.iter().all(|id| {
                    b.alerts
                        .store
                        .lock()
                        .unwrap()
                        .get(id)
                        .unwrap()
                        .is_some_and(|x| x.status != AlertStatus::Open)
                })
            })
            .await;
            let sent_rest = send_days(&producer, rest).await;
            wait_for("every day consumed", 120, || {
                consumed() >= (sent_first + sent_rest) as u64
            })
            .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = stop_a.send(());
            let _ = stop_b.send(());
            targets
        }
    );
    a_run.unwrap();
    b_run.unwrap();

    // B, the owner, applied the bookings (A's ack reached its episodes, not only its
    // store), and every escalation of a booked episode in B's own log says so.
    let applied = b.alerts.metrics().alert_acks_applied.get();
    assert!(applied >= 1, "B applied {applied} bookings");
    let escalations = {
        let store = b.alerts.store.lock().unwrap();
        let mut escalations = 0;
        for id in &acked {
            let warning = store.get(id).unwrap().unwrap();
            let next = store.alerts().map(Result::unwrap).find(|x| {
                x.battery_id == warning.battery_id
                    && x.episode == warning.episode
                    && x.severity == Severity::Critical
                    && store.recorded(&x.alert_id).is_some()
            });
            if let Some(critical) = next {
                escalations += 1;
                assert!(
                    critical.service_booked_at.is_some() && critical.message().contains("booked"),
                    "escalation of a booked episode: {critical:?}"
                );
            }
        }
        escalations
    };
    assert!(
        escalations > 0,
        "no booked episode escalated: pick more days"
    );
    a.finish(Duration::from_secs(1)).await;
    b.finish(Duration::from_secs(1)).await;
}

/// A round of the forecasts publisher sends every changed assessment, a fleet far larger
/// than its chunk (1,024) and its deliveries in flight (8,192) included, each once, and
/// leaves none marked changed: the chunks, not one copy of the whole fleet, are what
/// bound its memory on a backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishing_round_sends_every_changed_assessment_in_chunks() {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use voltcast_scoring::alerts::publish::ForecastPublisher;
    use voltcast_scoring::alerts::{AlertService, AlertStore};
    use voltcast_scoring::metrics::Metrics;

    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let config = instance(&cluster, dir.path(), "a", "");
    let store = AlertStore::open(&dir.path().join("alerts")).unwrap();
    let service = std::sync::Arc::new(AlertService::new(
        store,
        std::sync::Arc::new(Metrics::new(10)),
    ));
    service.track_latest_changes();
    let fleet = 10_000;
    let template = assessment_template();
    let updates: Vec<_> = (0..fleet)
        .map(|i| {
            let mut u = template.clone();
            u.battery_id = format!("B{i:06}").into();
            u
        })
        .collect();
    service.set_latest(updates);
    assert_eq!(service.changed_latest_count(), fleet);

    let publisher = ForecastPublisher {
        producer: producer(&config),
        topic: "battery-forecasts".into(),
        origin: "test".into(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let round = tokio::spawn(publisher.run(service.clone(), stopped));
    stop.send(true).unwrap();
    round.await.unwrap();
    assert_eq!(
        service.changed_latest_count(),
        0,
        "nothing left marked changed"
    );

    let consumer: StreamConsumer = config
        .kafka
        .consumer_config()
        .unwrap()
        .set("group.id", "publisher-test-reader")
        .create()
        .unwrap();
    consumer.subscribe(&["battery-forecasts"]).unwrap();
    let (mut keys, mut messages) = (BTreeSet::new(), 0);
    while keys.len() < fleet {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("every assessment published")
            .unwrap();
        keys.insert(m.key().unwrap().to_vec());
        messages += 1;
    }
    assert_eq!(messages, fleet, "each assessment published once");
}

/// A published-shape assessment, read back from JSON so this test needs no model.
fn assessment_template() -> voltcast_scoring::forecasting::RiskUpdate {
    serde_json::from_value(serde_json::json!({
        "battery_id": "B0", "vehicle_id": null, "day": 20000, "age": 900,
        "lifetime": 150.0, "rated": 200.0, "model": "auto_ets", "model_version": 1,
        "risk": {"probability": 0.1, "expected_cycles": 10.0, "sd_cycles": 1.0,
                 "remaining": 50.0, "days_to_eol": null, "low_confidence": false,
                 "at_risk": false},
        "forecast": {"mean": [0.3, 0.3], "sd": [0.05, 0.05], "sum_sd": [0.05, 0.07]},
        "recent": [[0.3, 120.0, 4.0]],
        "drivers": []
    }))
    .unwrap()
}
