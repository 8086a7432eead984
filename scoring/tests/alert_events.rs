//! Alert events reach the `battery-alerts` topic at least once across crashes: decided
//! events wait in a durable outbox, so a crash after the alert store recorded a decision
//! but before the event was published still publishes it, once, on restart.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use voltcast_forecaster::{FailureRisk, ModelKind};
use voltcast_scoring::alerts::publish::{AlertPublisher, EventOutbox, HEADER_EVENT_ID};
use voltcast_scoring::alerts::{AlertConfig, AlertService, AlertStore, Decision, EpisodePolicy};
use voltcast_scoring::forecasting::RiskUpdate;
use voltcast_scoring::metrics::Metrics;

const TOPIC: &str = "battery-alerts";

fn assessed(day: i32, probability: f64) -> RiskUpdate {
    RiskUpdate {
        battery_id: Arc::from("B1"),
        vehicle_id: Some(Arc::from("V1")),
        day,
        age: 1200,
        lifetime: 190.0,
        rated: 200.0,
        model: ModelKind::AutoEts,
        model_version: 1,
        risk: FailureRisk {
            probability,
            expected_cycles: 12.0,
            sd_cycles: 1.0,
            remaining: 10.0,
            days_to_eol: Some(25),
            low_confidence: false,
            at_risk: probability >= 0.9,
        },
        forecast: Default::default(),
        recent: Default::default(),
        drivers: Default::default(),
    }
}

/// One run of voltcast's alert side; the publisher runs only when `brokers` is given.
fn service(dir: &Path) -> (Arc<AlertService>, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let outbox = Arc::new(EventOutbox::open(&dir.join("events")).unwrap());
    let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
    let store = AlertStore::open(&dir.join("alerts")).unwrap();
    let service =
        AlertService::new(store, Arc::new(Metrics::new(5))).with_events(outbox.clone(), wake);
    (Arc::new(service), woken)
}

/// Publishes what the outbox under `dir` holds, until it is empty.
async fn publish(dir: &Path, brokers: &str) {
    publish_within(dir, brokers, Duration::from_secs(30)).await
}

/// Publishes what the outbox under `dir` holds; fails unless it is done within `limit`.
async fn publish_within(dir: &Path, brokers: &str, limit: Duration) {
    let outbox = Arc::new(EventOutbox::open(&dir.join("events")).unwrap());
    let producer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let (wake, woken) = tokio::sync::mpsc::unbounded_channel::<()>();
    drop(wake); // nothing more will come: publish what is there and stop
    let publisher = AlertPublisher {
        producer,
        topic: TOPIC.into(),
        outbox,
    };
    tokio::time::timeout(limit, publisher.run(woken, Arc::new(Metrics::new(5))))
        .await
        .expect("the publisher finishes");
}

/// Every event on the topic: (event id header, event kind).
fn on_topic(brokers: &str) -> Vec<(String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "probe")
        .create()
        .unwrap();
    let (_, high) = consumer
        .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(TOPIC, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).unwrap();
    let mut events = Vec::new();
    while (events.len() as i64) < high {
        let Some(msg) = consumer.poll(Duration::from_secs(10)) else {
            panic!("read {} of {high} events", events.len());
        };
        let msg = msg.unwrap();
        let id = msg
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == HEADER_EVENT_ID))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        events.push((id, body["event"].as_str().unwrap_or_default().to_string()));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_decided_before_a_crash_is_published_once_after_it() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();

    // First run: the battery's alert is raised and resolved, both recorded in the
    // store; the process dies before its publisher sent either.
    let mut policy = EpisodePolicy::new(AlertConfig::default());
    let raised = policy.observe(&assessed(1, 0.97), Utc::now());
    let resolved = policy.observe(&assessed(2, 0.1), Utc::now());
    let alert_id = match &raised[..] {
        [Decision::Raise(a)] => a.alert_id.clone(),
        other => panic!("{other:?}"),
    };
    {
        let (alerts, _woken) = service(dir.path());
        alerts.record([raised.clone(), resolved].concat(), Vec::new(), &[]);
    }
    assert!(on_topic(&brokers).is_empty());

    // The restart replays the raise (the stream repeats its decisions after a crash):
    // the store knows it, so nothing is decided twice, and the publisher sends what the
    // first run left.
    {
        let (alerts, _woken) = service(dir.path());
        alerts.record(raised, Vec::new(), &[]);
        publish(dir.path(), &brokers).await;
    }
    let want = vec![
        (format!("{alert_id}:raised"), "raised".to_string()),
        (format!("{alert_id}:resolved"), "resolved".to_string()),
    ];
    assert_eq!(on_topic(&brokers), want);

    // Another restart: the outbox is empty, nothing goes out again.
    publish(dir.path(), &brokers).await;
    assert_eq!(on_topic(&brokers), want);
}

/// An alert id already announced on the topic (another deployment sharing it, or another
/// instance before a handoff) does not stop the battery's owner from carrying out its
/// own decision: its log records it and its event (and webhook) go out.
#[tokio::test]
async fn an_alert_seen_on_the_topic_is_still_carried_out_by_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let mut policy = EpisodePolicy::new(AlertConfig::default());
    let raised = policy.observe(&assessed(1, 0.97), Utc::now());
    let Decision::Raise(alert) = raised[0].clone() else {
        panic!("{raised:?}")
    };
    let (alerts, _woken) = service(dir.path());
    alerts.merge_event(&voltcast_scoring::alerts::AlertEvent {
        event: voltcast_scoring::alerts::EventKind::Raised,
        alert: alert.clone(),
    });
    assert_eq!(
        alerts.query(&Default::default()).unwrap().len(),
        1,
        "listed from the topic"
    );
    assert!(
        EventOutbox::open(&dir.path().join("events"))
            .unwrap()
            .pending()
            .is_empty()
    );
    alerts.record(raised, Vec::new(), &[]);
    let log = std::fs::read_to_string(dir.path().join("alerts/alerts.jsonl")).unwrap();
    assert!(log.contains(&alert.alert_id), "the owner's log records it");
    let pending = EventOutbox::open(&dir.path().join("events"))
        .unwrap()
        .pending();
    assert_eq!(pending.len(), 1, "and its event goes out");
}

/// A batch of decisions makes one outbox segment (one file, one fsync), its events in
/// decision order, sealed by the time the batch's lines are in the log; an event file
/// left by an earlier version (one event per `.json` file) is still read, ahead of it.
#[test]
fn a_batch_of_decisions_is_one_segment_in_decision_order() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    std::fs::create_dir_all(&events).unwrap();
    let mut policy = EpisodePolicy::new(AlertConfig::default());
    let raised = policy.observe(&assessed(1, 0.97), Utc::now());
    let resolved = policy.observe(&assessed(2, 0.1), Utc::now());
    let [Decision::Raise(first)] = &raised[..] else {
        panic!("{raised:?}")
    };
    let first = first.clone();
    let old = voltcast_scoring::alerts::AlertEvent {
        event: voltcast_scoring::alerts::EventKind::Raised,
        alert: first.clone(),
    };
    std::fs::write(
        events.join(format!("{:020}.json", 7)),
        serde_json::to_vec(&old).unwrap(),
    )
    .unwrap();
    let raised_again = policy.observe(&assessed(30, 0.98), Utc::now());
    assert!(matches!(&raised_again[..], [Decision::Raise(_)]));

    let (alerts, mut woken) = service(dir.path());
    alerts.record([raised, resolved, raised_again].concat(), Vec::new(), &[]);
    assert!(woken.try_recv().is_ok(), "the publisher is woken");
    assert!(woken.try_recv().is_err(), "once for the batch");

    let mut files: Vec<String> = std::fs::read_dir(&events)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [format!("{:020}.json", 7), format!("{:020}.jsonl", 8)],
        "one segment for the batch, numbered after the old file"
    );
    let pending = EventOutbox::open(&events).unwrap().pending();
    let ids: Vec<String> = pending.iter().map(|(_, e)| e.id()).collect();
    let segment = std::fs::read_to_string(events.join(format!("{:020}.jsonl", 8))).unwrap();
    assert_eq!(segment.lines().count(), 3);
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[0], format!("{}:raised", first.alert_id));
    assert_eq!(ids[1], format!("{}:raised", first.alert_id));
    assert_eq!(ids[2], format!("{}:resolved", first.alert_id));
    assert!(ids[3].ends_with(":raised") && ids[3] != ids[0]);

    let log = std::fs::read_to_string(dir.path().join("alerts/alerts.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "raise, resolve, raise: {log}");
}

/// A backlog's alerts go out many at a time, not one broker round trip each. Why: one
/// at a time, the 25,000 alerts of a 100,000-battery backlog reached the topic two
/// minutes after their days closed. With the broker's round trip held at 100 ms, 400
/// events one at a time need more than 40 s, whatever the host; the limit is 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_events_is_published_without_a_round_trip_each() {
    const EVENTS: usize = 400;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    cluster
        .broker_round_trip_time(1, Duration::from_millis(100))
        .unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    {
        let (alerts, _woken) = service(dir.path());
        let mut decisions = Vec::new();
        for b in 0..EVENTS {
            let mut policy = EpisodePolicy::new(AlertConfig::default());
            let mut update = assessed(1, 0.97);
            update.battery_id = Arc::from(format!("B{b}"));
            decisions.extend(policy.observe(&update, Utc::now()));
        }
        assert_eq!(decisions.len(), EVENTS, "one raise per battery");
        alerts.record(decisions, Vec::new(), &[]);
    }
    publish_within(dir.path(), &brokers, Duration::from_secs(20)).await;
    let events = on_topic(&brokers);
    assert_eq!(events.len(), EVENTS);
    let ids: std::collections::HashSet<_> = events.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), EVENTS, "each event once");
    assert!(
        events.iter().all(|(_, kind)| kind == "raised"),
        "{events:?}"
    );
    let outbox = EventOutbox::open(&dir.path().join("events")).unwrap();
    assert!(
        outbox.pending().is_empty(),
        "published events leave the outbox"
    );
}
