//! `voltcast demo`: the whole product in one process, nothing to install.
//!
//! librdkafka's mock cluster is the broker (a real Kafka-protocol broker in-process), the
//! fleet simulator publishes to it on an accelerated clock, the full pipeline consumes
//! it, alerts go as signed webhooks to the head-unit simulator, and the API and metrics
//! are served as in production. Every part is the production code path; only the broker
//! and the cars are simulated.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use voltcast_headunit::{HeadUnit, HeadUnitConfig};
use voltcast_scoring::ingest::simulate::{
    FleetSimulator, SimulatorConfig, WireFormat, publish_kafka,
};
use voltcast_scoring::pipeline::{Services, run_with};
use voltcast_scoring::{SourceKind, VoltcastConfig};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Batteries in the simulated fleet.
    #[arg(long, default_value_t = 2_000)]
    batteries: usize,
    /// Simulated days per second of wall time.
    #[arg(long, default_value_t = 1.0)]
    days_per_second: f64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// voltcast's API and /metrics.
    #[arg(long, default_value = "127.0.0.1:8088")]
    api_listen: SocketAddr,
    /// The head-unit simulator's page and webhook receiver.
    #[arg(long, default_value = "127.0.0.1:8080")]
    head_unit_listen: SocketAddr,
    /// Folder for checkpoints, the alert log and the outbox (default: a fresh temporary
    /// folder, removed at exit).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const TELEMETRY: &str = "battery-telemetry";

/// The demo's configuration: the user's, pointed at the embedded parts.
fn demo_config(
    mut config: VoltcastConfig,
    args: &DemoArgs,
    brokers: String,
    data: &std::path::Path,
    head_unit: SocketAddr,
) -> anyhow::Result<VoltcastConfig> {
    config.source = SourceKind::File; // checked below as Kafka, once brokers are set
    config.kafka.brokers = brokers;
    config.kafka.topics = vec![TELEMETRY.into()];
    config.kafka.event_hubs_connection_string = None;
    config.checkpoint.path = data.join("checkpoint");
    config.alerts.store_path = data.join("alerts");
    config.webhook.url_template = format!("http://{head_unit}/vehicles/{{vehicle_id}}/alerts");
    config.webhook.outbox_path = data.join("outbox");
    if config.webhook.secret.is_empty() {
        config.webhook.secret = format!("demo-{:016x}", rand_u64());
    }
    config.api.listen = args.api_listen.to_string();
    // A simulated day passes every second: re-select monthly rather than weekly so that
    // model selection for a few thousand batteries fits on a laptop's cores.
    config.forecast.reselect_every_days = config.forecast.reselect_every_days.max(30);
    config.source = SourceKind::Kafka;
    config.check()?;
    Ok(config)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

pub async fn run(args: DemoArgs, config: VoltcastConfig) -> anyhow::Result<()> {
    anyhow::ensure!(args.batteries > 0, "--batteries must be at least 1");
    anyhow::ensure!(
        args.days_per_second > 0.0,
        "--days-per-second must be positive"
    );
    let temp = match &args.data {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("voltcast-demo-")
                .tempdir()?,
        ),
    };
    let data = args.data.clone().unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });

    let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    for (topic, partitions) in [
        (TELEMETRY, 3),
        (config.alerts.topic.as_str(), 3),
        (config.alerts.forecasts_topic.as_str(), 3),
        (config.kafka.dead_letter_topic.as_str(), 1),
    ] {
        cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("creating topic {topic}"))?;
    }
    let head_unit_listener = tokio::net::TcpListener::bind(args.head_unit_listen)
        .await
        .with_context(|| format!("--head-unit-listen {}", args.head_unit_listen))?;
    let head_unit_addr = head_unit_listener.local_addr()?;
    let config = demo_config(
        config,
        &args,
        cluster.bootstrap_servers(),
        &data,
        head_unit_addr,
    )?;

    let services = Services::start(&config).await?;
    let api = services.api_addr.context("the demo needs the API")?;
    let mut unit_config = HeadUnitConfig::new(config.webhook.secret.clone());
    unit_config.voltcast_url = Some(format!("http://{api}"));
    unit_config.api_token = (!config.api.token.is_empty()).then(|| config.api.token.clone());
    let unit = HeadUnit::new(unit_config, None);
    tokio::spawn(
        unit.clone()
            .serve(head_unit_listener, std::future::pending()),
    );

    let producer = config
        .kafka
        .producer_config()?
        .set("linger.ms", "20")
        .create()
        .context("creating the simulator's producer")?;
    let sim = SimulatorConfig {
        batteries: args.batteries,
        days: 3650,
        seed: args.seed,
        ..Default::default()
    };
    let mut sim = FleetSimulator::new(sim, WireFormat::Json)?;
    let dps = args.days_per_second;
    let simulator = tokio::spawn(async move {
        if let Err(e) = publish_kafka(&mut sim, &producer, TELEMETRY, dps, None).await {
            tracing::error!(error = %e, "simulator stopped");
        }
    });

    eprintln!(
        "voltcast demo: {} batteries, {} simulated day(s) per second, broker: librdkafka mock cluster ({})\n  head unit:  http://{head_unit_addr}/\n  API:        http://{api}/api/alerts\n  metrics:    http://{api}/metrics\n  state:      {}\n{}",
        args.batteries,
        args.days_per_second,
        cluster.bootstrap_servers(),
        data.display(),
        match args.duration {
            Some(s) => format!("Stopping after {s} s (Ctrl-C stops sooner)."),
            None => "Ctrl-C to stop.".into(),
        }
    );
    let status = tokio::spawn(status_line(
        services.counters.clone(),
        services.alerts.clone(),
    ));
    let duration = args.duration;
    let shutdown = async move {
        match duration {
            Some(s) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(s)) => {}
                    _ = voltcast_scoring::pipeline::stop_signal() => {}
                }
            }
            None => {
                voltcast_scoring::pipeline::stop_signal().await;
            }
        }
    };
    let report = run_with(&config, &services, shutdown).await;
    simulator.abort();
    status.abort();
    let alerts = Arc::clone(&services.alerts);
    services.finish(Duration::from_secs(5)).await;
    let report = report?;
    let (raised, delivered) = {
        let store = alerts
            .store
            .lock()
            .map_err(|_| anyhow::anyhow!("alert store lock"))?;
        let all = store.alerts().collect::<Result<Vec<_>, _>>()?;
        let delivered = all
            .iter()
            .filter(|a| a.delivery == voltcast_scoring::alerts::DeliveryStatus::Delivered)
            .count();
        (all.len(), delivered)
    };
    let vehicles = unit.vehicles();
    eprintln!(
        "\nvoltcast demo finished: {} records, {} dead letters, {} battery-days closed, {} batteries forecast, {} alerts raised, {} delivered to {} head units",
        report.received,
        report.rejected,
        report.windows.days_closed,
        report.batteries_forecast,
        raised,
        delivered,
        vehicles.len()
    );
    if let Some((v, _)) = vehicles.first() {
        eprintln!("  e.g. http://{head_unit_addr}/vehicles/{v}");
    }
    drop(cluster);
    Ok(())
}

/// One line a second: what a person watching wants to know.
async fn status_line(
    counters: Arc<voltcast_scoring::ingest::IngestCounters>,
    alerts: Arc<voltcast_scoring::alerts::AlertService>,
) {
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last = (counters.received(), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(if terminal { 1 } else { 5 }));
    tick.tick().await;
    loop {
        tick.tick().await;
        let received = counters.received();
        let rate = (received - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (received, Instant::now());
        let (batteries, at_risk, raised) = {
            let Ok(store) = alerts.store.lock() else {
                return;
            };
            let batteries = store.latest_all().count();
            let at_risk = store.latest_all().filter(|u| u.risk.at_risk).count();
            (batteries, at_risk, store.len())
        };
        let line = format!(
            "[{:>4} s] {rate:>7.0} events/s | {batteries} batteries forecast | {at_risk} at risk | {raised} alerts",
            started.elapsed().as_secs()
        );
        if terminal {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}
