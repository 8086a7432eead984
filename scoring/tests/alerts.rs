//! Alerts end to end: policy decisions to signed webhooks through the durable outbox,
//! the head unit receiving them, and the API that service desks and head units use.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use voltcast_forecaster::{FailureRisk, Forecast, ModelKind};
use voltcast_headunit::{HeadUnit, HeadUnitConfig, Received};
use voltcast_scoring::alerts::{
    AlertConfig, AlertService, AlertStore, DeliveryStatus, DeliveryWorker, EpisodePolicy, Outbox,
    WebhookConfig,
};
use voltcast_scoring::forecasting::RiskUpdate;
use voltcast_scoring::metrics::Metrics;

const SECRET: &str = "shared-secret";

fn at_risk(battery: usize) -> RiskUpdate {
    RiskUpdate {
        battery_id: Arc::from(format!("B{battery:04}")),
        vehicle_id: Some(Arc::from(format!("V{battery:04}"))),
        day: 20_000,
        age: 1200,
        lifetime: 190.0,
        rated: 200.0,
        model: ModelKind::AutoEts,
        model_version: 1,
        risk: FailureRisk {
            probability: 0.97,
            expected_cycles: 12.0,
            sd_cycles: 1.0,
            remaining: 10.0,
            days_to_eol: Some(25),
            low_confidence: false,
            at_risk: true,
        },
        forecast: Forecast {
            mean: vec![0.4; 30],
            sd: vec![0.05; 30],
            sum_sd: vec![0.1; 30],
        }
        .into(),
        recent: vec![[0.4, 160.0, 5.0]; 30].into_iter().collect(),
        drivers: ["Driving time up 12% over the last 30 days"]
            .into_iter()
            .collect(),
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn webhook(port: u16, dir: &Path) -> WebhookConfig {
    WebhookConfig {
        url_template: format!("http://127.0.0.1:{port}/vehicles/{{vehicle_id}}/alerts"),
        secret: SECRET.into(),
        timeout_ms: 2_000,
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        concurrency: 8,
        outbox_path: dir.join("outbox"),
        ..Default::default()
    }
}

/// One incarnation of voltcast's alert side: store, outbox, delivery worker.
struct Incarnation {
    service: Arc<AlertService>,
    worker: tokio::task::JoinHandle<()>,
    stop: watch::Sender<Option<tokio::time::Instant>>,
}

fn incarnation(config: &WebhookConfig, dir: &Path) -> Incarnation {
    let metrics = Arc::new(Metrics::new(5));
    let store = AlertStore::open(&dir.join("alerts")).unwrap();
    let outbox = Arc::new(Outbox::open(&config.outbox_path).unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let service = Arc::new(AlertService::new(store, metrics).with_webhooks(
        config.clone(),
        tx,
        outbox.clone(),
    ));
    let (stop, stop_rx) = watch::channel(None);
    let worker = DeliveryWorker {
        config: config.clone(),
        outbox,
        service: service.clone(),
        client: reqwest::Client::new(),
    };
    let worker = tokio::spawn(worker.run(rx, stop_rx));
    Incarnation {
        service,
        worker,
        stop,
    }
}

/// Raises one alert per battery through the policy; returns their ids.
fn raise(service: &AlertService, batteries: usize) -> HashSet<String> {
    let mut policy = EpisodePolicy::new(AlertConfig::default());
    let mut ids = HashSet::new();
    for b in 0..batteries {
        for d in policy.observe(&at_risk(b), Utc::now()) {
            if let voltcast_scoring::alerts::Decision::Raise(a) = &d {
                ids.insert(a.alert_id.clone());
            }
            service.record(vec![d], Vec::new(), &[]);
        }
    }
    ids
}

async fn receive_until(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    n: usize,
    got: &mut Vec<String>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => got.push(r.alert_id),
            _ => break,
        }
    }
}

async fn head_unit(
    port: u16,
    delay: Option<Duration>,
) -> (HeadUnit, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut config = HeadUnitConfig::new(SECRET);
    config.response_delay = delay;
    let unit = HeadUnit::new(config, Some(tx));
    unit.clone()
        .spawn(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    (unit, rx)
}

/// A stop with a deadline ends the worker once nothing is queued, in flight or waiting in
/// its channel, not at the deadline. The service holds the channel's sender as long as it
/// lives, and `voltcast run` used to wait out the whole drain (10 s) at every SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_ends_once_drained_not_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_unit, mut received) = head_unit(port, None).await;
    let config = webhook(port, dir.path());
    let Incarnation {
        service,
        worker,
        stop,
    } = incarnation(&config, dir.path());
    let ids = raise(&service, 3);
    let mut got = Vec::new();
    receive_until(&mut received, ids.len(), &mut got).await;
    assert_eq!(
        got.len(),
        ids.len(),
        "every alert delivered before the stop"
    );
    stop.send(Some(tokio::time::Instant::now() + Duration::from_secs(600)))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker ended once drained, long before its 600 s deadline")
        .unwrap();
    assert!(
        Outbox::open(&config.outbox_path)
            .unwrap()
            .pending()
            .is_empty(),
        "nothing left in the outbox"
    );
    drop(service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_arrives_exactly_once_after_the_receiver_was_down() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = webhook(port, dir.path());
    let voltcast = incarnation(&config, dir.path());
    let ids = raise(&voltcast.service, 40);
    assert_eq!(ids.len(), 40);

    // Nobody listens yet: attempts fail and are retried with backoff.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let metrics = voltcast.service.metrics();
    let retried = metrics
        .webhook_deliveries
        .with_label_values(&["retried"])
        .get();
    assert!(retried >= 40, "retried {retried}");
    assert_eq!(metrics.outbox_depth.get(), 40);

    let (unit, mut rx) = head_unit(port, None).await;
    let mut got = Vec::new();
    receive_until(&mut rx, 40, &mut got).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: HashSet<String> = got.into_iter().collect();
    assert_eq!(got, ids, "every alert, each once");
    let stats = unit.stats();
    assert_eq!(stats.accepted, 40);
    let inboxes: usize = unit.vehicles().iter().map(|(_, n)| n).sum();
    assert_eq!(inboxes, 40);
    assert_eq!(metrics.outbox_depth.get(), 0);
    assert!(
        Outbox::open(&config.outbox_path)
            .unwrap()
            .pending()
            .is_empty()
    );
    let store = voltcast.service.store.lock().unwrap();
    assert!(
        store
            .alerts()
            .map(Result::unwrap)
            .all(|a| a.delivery == DeliveryStatus::Delivered)
    );
    drop(store);
    voltcast.worker.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_delivery_resumes_from_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = webhook(port, dir.path());
    config.concurrency = 1;
    let (unit, mut rx) = head_unit(port, Some(Duration::from_millis(25))).await;

    let first = incarnation(&config, dir.path());
    let ids = raise(&first.service, 60);
    let mut got = Vec::new();
    receive_until(&mut rx, 15, &mut got).await;
    // Killed: no shutdown, deliveries in flight cut off.
    first.worker.abort();
    let _ = first.worker.await;
    drop(first.stop);
    let left = Outbox::open(&config.outbox_path).unwrap().pending().len();
    assert!(left >= 30, "only {left} left in the outbox");

    let second = incarnation(&config, dir.path());
    receive_until(&mut rx, 60, &mut got).await;
    let unique: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(unique, ids, "every alert arrived");
    assert_eq!(unit.stats().accepted, 60, "each alert accepted once");
    // The restarted process knows the alerts from its store, not from memory.
    assert_eq!(second.service.store.lock().unwrap().len(), 60);
    let _ = second
        .stop
        .send(Some(tokio::time::Instant::now() + Duration::from_secs(5)));
    second.worker.await.unwrap();
    assert!(
        Outbox::open(&config.outbox_path)
            .unwrap()
            .pending()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_past_its_age_goes_to_the_dead_letter_list() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = webhook(free_port(), dir.path());
    config.give_up_after_seconds = 0;
    let voltcast = incarnation(&config, dir.path());
    let ids = raise(&voltcast.service, 3);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while voltcast.service.dead_letters().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = voltcast.service.dead_letters();
    let dead_ids: HashSet<String> = dead.iter().map(|d| d.alert_id.clone()).collect();
    assert_eq!(dead_ids, ids);
    assert!(dead.iter().all(|d| {
        d.last_error
            .as_deref()
            .is_some_and(|e| e.contains("connect"))
    }));
    let m = voltcast.service.metrics();
    assert_eq!(
        m.webhook_deliveries
            .with_label_values(&["dead_lettered"])
            .get(),
        3
    );
    let store = voltcast.service.store.lock().unwrap();
    assert!(
        store
            .alerts()
            .map(Result::unwrap)
            .all(|a| a.delivery == DeliveryStatus::DeadLettered)
    );
}

/// The whole chain on a replayed fleet: windows, forecasts, policy, outbox, head unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_fleet_alerts_its_worn_batteries_once_each_on_their_head_units() {
    use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, write_file};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("fleet.jsonl");
    let sim = SimulatorConfig {
        batteries: 150,
        days: 45,
        seed: 11,
        ..Default::default()
    };
    let mut sim = FleetSimulator::new(sim, WireFormat::Json).unwrap();
    write_file(&mut sim, &input, None).unwrap();

    let port = free_port();
    let (unit, _rx) = head_unit(port, None).await;
    let mut config = voltcast_scoring::VoltcastConfig {
        source: voltcast_scoring::SourceKind::File,
        ..Default::default()
    };
    config.file.path = input;
    config.api.listen = String::new();
    config.alerts.store_path = dir.path().join("alerts");
    config.archive.path = dir.path().join("archive");
    config.webhook = webhook(port, dir.path());
    config.check().unwrap();
    let report = voltcast_scoring::pipeline::run(&config, std::future::pending())
        .await
        .unwrap();
    assert_eq!(report.batteries_forecast, 150);
    let at_risk: HashSet<&str> = report.at_risk.iter().map(|id| &**id).collect();
    assert!(!at_risk.is_empty());

    let store = AlertStore::open(&dir.path().join("alerts")).unwrap();
    let alerts: Vec<_> = store.alerts().map(Result::unwrap).collect();
    assert!(!alerts.is_empty());
    // Every battery at risk at the end has an active alert; no battery more than one
    // per severity (no daily repeats over 45 days).
    for b in &at_risk {
        assert!(
            alerts
                .iter()
                .any(|a| *a.battery_id == **b && a.status.is_active()),
            "{b}"
        );
    }
    let mut seen = HashSet::new();
    for a in &alerts {
        assert!(
            seen.insert((a.battery_id.clone(), a.episode, a.severity)),
            "{a:?}"
        );
        assert!(!a.reasons.is_empty() && a.message().contains(&*a.battery_id));
        assert_eq!(a.delivery, DeliveryStatus::Delivered, "{a:?}");
    }
    // ...and each is on its vehicle's head unit exactly once.
    assert_eq!(unit.stats().accepted as usize, alerts.len());
    for a in &alerts {
        let inbox = unit.inbox(a.vehicle_id.as_deref().unwrap());
        assert_eq!(inbox.iter().filter(|x| x.alert_id == a.alert_id).count(), 1);
    }
}

/// Lifecycle events on the `battery-alerts` topic: keyed by battery, one per decision and
/// acknowledgement, through the idempotent producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_events_are_published_to_the_alerts_topic_keyed_by_battery() {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::mocking::MockCluster;

    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("battery-alerts", 3, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = voltcast_scoring::VoltcastConfig::default();
    config.kafka.brokers = cluster.bootstrap_servers();
    config.api.listen = String::new();
    config.alerts.store_path = dir.path().join("alerts");
    let services = voltcast_scoring::pipeline::Services::start(&config)
        .await
        .unwrap();
    let ids = raise(&services.alerts, 5);
    let acked = ids.iter().next().unwrap().clone();
    services.alerts.acknowledge(&acked, "test").unwrap();
    services.finish(Duration::from_secs(5)).await;

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "alerts-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["battery-alerts"]).unwrap();
    let mut events = Vec::new();
    while events.len() < 6 {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("six events within 20 s")
            .unwrap();
        let e: voltcast_scoring::alerts::AlertEvent =
            serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(m.key().unwrap(), e.alert.battery_id.as_bytes());
        events.push(e);
    }
    use voltcast_scoring::alerts::EventKind;
    let raised: HashSet<String> = events
        .iter()
        .filter(|e| e.event == EventKind::Raised)
        .map(|e| e.alert.alert_id.clone())
        .collect();
    assert_eq!(raised, ids);
    let ack: Vec<_> = events
        .iter()
        .filter(|e| e.event == EventKind::Acknowledged)
        .collect();
    assert_eq!(ack.len(), 1);
    assert_eq!(ack[0].alert.alert_id, acked);
    assert_eq!(ack[0].alert.acknowledged_by.as_deref(), Some("test"));
}

/// A crash mid-write leaves a fragment at the end of the alert log: the next start cuts
/// it off, so the next alert is a line of its own and survives the following replay.
#[test]
fn a_torn_last_line_is_cut_before_the_log_is_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts");
    let metrics = Arc::new(Metrics::new(10));
    let first = {
        let service = AlertService::new(AlertStore::open(&path).unwrap(), metrics.clone());
        raise(&service, 1)
    };
    let log = path.join("alerts.jsonl");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(br#"{"alert_id":"torn","battery_"#);
    std::fs::write(&log, &bytes).unwrap();

    let second = {
        let service = AlertService::new(AlertStore::open(&path).unwrap(), metrics.clone());
        let mut policy = EpisodePolicy::new(AlertConfig::default());
        let mut ids = HashSet::new();
        for d in policy.observe(&at_risk(7), Utc::now()) {
            if let voltcast_scoring::alerts::Decision::Raise(a) = &d {
                ids.insert(a.alert_id.clone());
            }
            service.record(vec![d], Vec::new(), &[]);
        }
        ids
    };
    let replayed = AlertStore::open(&path).unwrap();
    let ids: HashSet<String> = replayed.alerts().map(|a| a.unwrap().alert_id).collect();
    assert_eq!(ids, first.union(&second).cloned().collect());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("torn"), "the fragment is gone: {text}");
    assert!(text.ends_with('\n'));
}

/// Ids go into the webhook URL as one percent-encoded path segment: a vehicle id with
/// `/`, `?` or `#` cannot change the path or add a query, and a dot segment is refused.
#[test]
fn webhook_urls_encode_ids_as_one_path_segment() {
    let config = WebhookConfig {
        url_template: "http://head-unit:8080/vehicles/{vehicle_id}/alerts".into(),
        ..WebhookConfig::default()
    };
    let alert_for = |vehicle: &str| {
        let mut update = at_risk(3);
        update.vehicle_id = Some(Arc::from(vehicle));
        let mut policy = EpisodePolicy::new(AlertConfig::default());
        match policy.observe(&update, Utc::now()).pop() {
            Some(voltcast_scoring::alerts::Decision::Raise(a)) => a,
            other => panic!("expected a raise, got {other:?}"),
        }
    };
    let url = |vehicle: &str| config.url_for(&alert_for(vehicle));
    assert_eq!(
        url("V0003").as_deref(),
        Some("http://head-unit:8080/vehicles/V0003/alerts")
    );
    assert_eq!(
        url("X/alerts/..").as_deref(),
        Some("http://head-unit:8080/vehicles/X%2Falerts%2F../alerts")
    );
    assert_eq!(
        url("V1?admin=1#x").as_deref(),
        Some("http://head-unit:8080/vehicles/V1%3Fadmin%3D1%23x/alerts")
    );
    assert_eq!(url(".."), None);
}

/// The store keeps where each alert's newest line is and reads the alert back from its
/// log: what it returns is what a store holding every alert whole returns, after
/// changes, after a torn line was cut off, and after a restart.
#[test]
fn the_store_reads_each_alert_back_from_its_newest_line_in_the_log() {
    use voltcast_scoring::alerts::{Alert, AlertFilter, AlertStatus, Decision};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts");
    let mut policy = EpisodePolicy::new(AlertConfig::default());
    let alerts: Vec<Alert> = (0..5)
        .flat_map(|b| policy.observe(&at_risk(b), Utc::now()))
        .filter_map(|d| match d {
            Decision::Raise(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(alerts.len(), 5);
    let (mut logged, mut held) = (AlertStore::open(&path).unwrap(), AlertStore::in_memory());
    let ack = |a: &mut Alert| {
        a.status = AlertStatus::Acknowledged;
        a.acknowledged_by = Some("service-desk".into());
    };
    let resolve = |a: &mut Alert| {
        a.status = AlertStatus::Resolved;
        a.resolution = Some("battery replaced".into());
    };
    for store in [&mut logged, &mut held] {
        for a in &alerts {
            store.put(a).unwrap();
        }
        store.update(&alerts[1].alert_id, ack).unwrap().unwrap();
        store.update(&alerts[3].alert_id, resolve).unwrap().unwrap();
    }
    let all = |s: &AlertStore| s.alerts().map(Result::unwrap).collect::<Vec<_>>();
    assert_eq!(all(&logged), all(&held));
    let resolved = AlertFilter {
        status: Some(AlertStatus::Resolved),
        ..Default::default()
    };
    let listed = logged.query(&resolved).unwrap();
    assert_eq!(listed, held.query(&resolved).unwrap());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].resolution.as_deref(), Some("battery replaced"));

    // Lines reach the log when written out (the service does so once per batch).
    logged.sync().unwrap();
    drop(logged);
    let log = path.join("alerts.jsonl");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(br#"{"alert_id":"torn","#);
    std::fs::write(&log, &bytes).unwrap();
    let mut reopened = AlertStore::open(&path).unwrap();
    let deliver = |a: &mut Alert| a.delivery = DeliveryStatus::Delivered;
    reopened.update(&alerts[4].alert_id, deliver).unwrap();
    held.update(&alerts[4].alert_id, deliver).unwrap();
    assert_eq!(all(&reopened), all(&held));
    let got = reopened.get(&alerts[4].alert_id).unwrap().unwrap();
    assert_eq!(got.delivery, DeliveryStatus::Delivered);
    assert_eq!(
        reopened.get(&alerts[1].alert_id).unwrap(),
        held.get(&alerts[1].alert_id).unwrap()
    );
    assert_eq!(reopened.len(), 5);
}
