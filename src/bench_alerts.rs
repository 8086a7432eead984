//! `voltcast bench alerts`: webhook deliveries per second to a local head unit, and the
//! end-to-end latency from a day's window closing to its alert arriving on the head unit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use voltcast_headunit::{HeadUnit, HeadUnitConfig, Received};
use voltcast_scoring::alerts::{
    AlertConfig, AlertService, AlertStore, Delivery, DeliveryWorker, EpisodePolicy, Outbox,
    WebhookConfig,
};
use voltcast_scoring::forecaster::{RiskConfig, SelectionConfig};
use voltcast_scoring::forecasting::ForecastSettings;
use voltcast_scoring::ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat};
use voltcast_scoring::ingest::{BatchSink, DeadLetterQueue, MicroBatch};
use voltcast_scoring::metrics::Metrics;
use voltcast_scoring::partition::{PartitionSet, PartitionSettings};
use voltcast_scoring::pipeline::PartitionStage;
use voltcast_scoring::windows::WindowConfig;

const SECRET: &str = "bench-secret";

struct Chain {
    service: Arc<AlertService>,
    received: mpsc::UnboundedReceiver<Received>,
    stop: watch::Sender<Option<tokio::time::Instant>>,
    /// Not started until [`Chain::start`]: the deliveries bench fills the outbox first.
    idle: Option<IdleWorker>,
    worker: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

type IdleWorker = (
    DeliveryWorker,
    mpsc::UnboundedReceiver<Delivery>,
    watch::Receiver<Option<tokio::time::Instant>>,
);

impl Chain {
    /// Starts delivering; with `fresh`, as a restarted process would (from the outbox
    /// on disk only, not from the deliveries queued in memory).
    fn start(&mut self, fresh: bool) {
        if let Some((worker, rx, stop)) = self.idle.take() {
            let rx = if fresh {
                mpsc::unbounded_channel().1
            } else {
                rx
            };
            self.worker = Some(tokio::spawn(worker.run(rx, stop)));
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(Some(tokio::time::Instant::now()));
        if let Some(w) = self.worker {
            let _ = w.await;
        }
    }
}

/// Head unit on a free port, and an alert service delivering to it via an outbox.
async fn chain(concurrency: usize) -> anyhow::Result<Chain> {
    let dir = tempfile::tempdir()?;
    let (tx, received) = mpsc::unbounded_channel();
    let unit = HeadUnit::new(HeadUnitConfig::new(SECRET), Some(tx));
    let addr = unit.spawn("127.0.0.1:0".parse()?).await?;
    let config = WebhookConfig {
        url_template: format!("http://{addr}/vehicles/{{vehicle_id}}/alerts"),
        secret: SECRET.into(),
        concurrency,
        outbox_path: dir.path().join("outbox"),
        ..Default::default()
    };
    let outbox = Arc::new(Outbox::open(&config.outbox_path)?);
    let (dtx, drx) = mpsc::unbounded_channel();
    let store = AlertStore::open(&dir.path().join("alerts"))?;
    let service = Arc::new(
        AlertService::new(store, Arc::new(Metrics::new(10))).with_webhooks(
            config.clone(),
            dtx,
            outbox.clone(),
        ),
    );
    let (stop, stop_rx) = watch::channel(None);
    let worker = DeliveryWorker {
        config,
        outbox,
        service: service.clone(),
        client: reqwest::Client::new(),
    };
    Ok(Chain {
        service,
        received,
        stop,
        idle: Some((worker, drx, stop_rx)),
        worker: None,
        _dir: dir,
    })
}

/// A battery the policy raises an alert for at once.
fn at_risk(b: usize) -> voltcast_scoring::forecasting::RiskUpdate {
    use voltcast_scoring::forecaster::{FailureRisk, ModelKind};
    voltcast_scoring::forecasting::RiskUpdate {
        battery_id: Arc::from(format!("B{b:06}")),
        vehicle_id: Some(Arc::from(format!("V{b:06}"))),
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
        forecast: Default::default(),
        recent: Default::default(),
        drivers: ["10.0 of 200 rated cycles left"].into_iter().collect(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(
    alerts: usize,
    concurrency: usize,
    batteries: usize,
    days: u32,
    day_ms: u64,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        deliveries(alerts, concurrency).await?;
        latency(batteries, days, day_ms, concurrency).await
    })
}

async fn deliveries(n: usize, concurrency: usize) -> anyhow::Result<()> {
    let mut c = chain(concurrency).await?;
    let mut policy = EpisodePolicy::new(AlertConfig::default());
    let started = Instant::now();
    for b in 0..n {
        for d in policy.observe(&at_risk(b), chrono::Utc::now()) {
            c.service.record(vec![d], Vec::new(), &[]);
        }
    }
    let queued = started.elapsed().as_secs_f64();
    // Delivery alone: a process starting with a full outbox.
    let started = Instant::now();
    c.start(true);
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(60), c.received.recv()).await {
            Ok(Some(_)) => got += 1,
            _ => break,
        }
    }
    let total = started.elapsed().as_secs_f64();
    println!(
        "bench alerts deliveries: {got}/{n} signed webhooks from the outbox to a local head unit in {total:.2} s = {:.0} deliveries/s (concurrency {concurrency}); raising an alert (policy, outbox file fsynced, alert log) {:.0}/s",
        got as f64 / total,
        n as f64 / queued
    );
    c.stop().await;
    Ok(())
}

/// Closed days flow through forecasts and the alert stage; a day closes every `day_ms`.
async fn latency(
    batteries: usize,
    days: u32,
    day_ms: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut c = chain(concurrency).await?;
    c.start(false);
    let sim = SimulatorConfig {
        batteries,
        days,
        seed: 3,
        ..Default::default()
    };
    let mut sim = FleetSimulator::new(sim, WireFormat::Json)?.without_payloads();
    let settings = PartitionSettings {
        windows: WindowConfig::default(),
        forecast: Some(ForecastSettings::new(
            SelectionConfig::default(),
            RiskConfig::default(),
        )),
        alerts: AlertConfig::default(),
        archive: None,
    };
    let partitions = Arc::new(PartitionSet::on_sight(settings, None));
    let (tap, closed) = std::sync::mpsc::channel();
    let mut stage = PartitionStage::new(partitions, DeadLetterQueue::memory().0)
        .with_alerts(c.service.clone())
        .with_closed_tap(tap);
    // When each telemetry day's windows closed: the start of the batch that closed it
    // (the stage decides and sends its alerts before the batch returns).
    let mut closed_at: HashMap<i32, Instant> = HashMap::new();
    let mut received: Vec<Received> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(day_ms));
    while let Some(day) = sim.next_day() {
        tick.tick().await;
        let records: Vec<_> = day.messages.into_iter().filter_map(|m| m.record).collect();
        let batch = MicroBatch::from_records(&records, Arc::from("bench"));
        let started = Instant::now();
        stage
            .accept(batch)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for batch in closed.try_iter() {
            if let Some(rows) = voltcast_scoring::windows::daily::closed_rows(&batch) {
                for r in rows {
                    closed_at.entry(r.day).or_insert(started);
                }
            }
        }
        while let Ok(r) = c.received.try_recv() {
            received.push(r);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let expected = c.service.store.lock().map(|s| s.len()).unwrap_or(0);
    while received.len() < expected {
        match tokio::time::timeout_at(deadline, c.received.recv()).await {
            Ok(Some(r)) => received.push(r),
            _ => break,
        }
    }
    let day_of: HashMap<String, i32> = {
        let store = c
            .service
            .store
            .lock()
            .map_err(|_| anyhow::anyhow!("store lock"))?;
        store
            .alerts()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter_map(|a| {
                let d = chrono::NaiveDate::parse_from_str(&a.as_of_day, "%Y-%m-%d").ok()?;
                Some((
                    a.alert_id.clone(),
                    (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?).num_days() as i32,
                ))
            })
            .collect()
    };
    let mut ms: Vec<f64> = received
        .iter()
        .filter_map(|r| {
            let closed = closed_at.get(day_of.get(&r.alert_id)?)?;
            Some(r.at.saturating_duration_since(*closed).as_secs_f64() * 1e3)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "bench alerts latency: {batteries} batteries x {days} days, a day closing every {day_ms} ms: {} alerts, window close -> webhook received p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );
    c.stop().await;
    Ok(())
}
