//! `voltcast bench pipeline`: the whole pipeline as `voltcast run` runs it, on a backlog.
//!
//! Why a backlog: a restart, a consumer added or a replay of history all start with one,
//! and a stage benchmark in isolation missed the stall that `voltcast run` hit on its
//! first. The fleet is produced into a broker before the pipeline starts (librdkafka's
//! mock cluster in this process by default, `--brokers` for a real one), or read from a
//! file (`--input`), and `pipeline::run_with` consumes it with the configured defaults:
//! decode, validate, day windows, checkpoints, forecasts, alerts.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use voltcast_scoring::ingest::KafkaConfig;
use voltcast_scoring::ingest::simulate::{
    FleetSimulator, SimulatorConfig, WireFormat, publish_kafka,
};
use voltcast_scoring::pipeline::{RunReport, Services};
use voltcast_scoring::{SourceKind, VoltcastConfig};

#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    #[arg(long, default_value_t = 20_000)]
    batteries: usize,
    #[arg(long, default_value_t = 365)]
    days: u32,
    #[arg(long, default_value_t = 5)]
    seed: u64,
    /// A real broker to produce into and consume from (it must let the bench create a
    /// topic); default: librdkafka's mock cluster in this process.
    #[arg(long, conflicts_with = "input")]
    brokers: Option<String>,
    /// The mock cluster in a child process instead of this one, so that this process's
    /// memory is the pipeline's alone (the mock keeps the whole topic in memory: GBs for
    /// a 730-day fleet).
    #[arg(long, conflicts_with_all = ["brokers", "input"])]
    broker_process: bool,
    /// Partitions of the bench topic. 0: enough for the mock cluster, which keeps only
    /// 5 MiB per partition (8 on a real broker).
    #[arg(long, default_value_t = 0)]
    partitions: i32,
    /// Replay this JSONL/CSV file instead (`voltcast run --input`); the fleet options
    /// are then ignored.
    #[arg(long)]
    input: Option<PathBuf>,
    /// `batch.max_rows`.
    #[arg(long, default_value_t = 50_000)]
    batch_rows: usize,
    /// Also write the raw archive (Parquet), as `voltcast run` does by default.
    #[arg(long)]
    archive: bool,
    /// A librdkafka property for the pipeline's clients (`kafka.properties`), KEY=VALUE;
    /// repeatable.
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Before the pipeline, read the produced topic twice more to show the ceilings
    /// the pipeline sits under: librdkafka alone (messages polled and dropped), then the
    /// Kafka source alone (consume, decode, validate, batch; batches dropped).
    #[arg(long, conflicts_with = "input")]
    floors: bool,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Compressed bytes a message takes in the mock broker, generously (zstd of ~315-byte
/// JSON lines that share most of their text).
const MOCK_BYTES_PER_MESSAGE: usize = 64;
/// The bench producer's codec: zstd keeps the broker's copy of a 730-day fleet of
/// 100,000 batteries (80 M messages) within a few GB.
const COMPRESSION: &str = "zstd";
/// What the mock broker keeps per partition before it drops the oldest messages.
const MOCK_PARTITION_BYTES: usize = 5 << 20;

/// `models`: the loaded configuration, whose `[forecast]` and `[risk]` sections the bench
/// runs with (the rest is the bench's own: topics, paths, an API off).
pub fn run(args: PipelineArgs, models: &VoltcastConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match args.input.clone() {
            Some(path) => file(args, path, models).await,
            None => kafka(args, models).await,
        }
    })
}

async fn kafka(args: PipelineArgs, models: &VoltcastConfig) -> anyhow::Result<()> {
    let sim = SimulatorConfig {
        batteries: args.batteries,
        days: args.days,
        seed: args.seed,
        ..Default::default()
    };
    let expected = sim.batteries * sim.days as usize * 11 / 10;
    let partitions = match (args.partitions, &args.brokers) {
        (n, _) if n > 0 => n,
        (_, Some(_)) => 8,
        (_, None) => {
            let auto = (expected * MOCK_BYTES_PER_MESSAGE).div_ceil(MOCK_PARTITION_BYTES);
            auto.clamp(4, 4096) as i32
        }
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let topic = format!("bench-telemetry-{stamp}");
    let mut config = VoltcastConfig::default();
    config.kafka.topics = vec![topic.clone()];
    config.kafka.group_id = format!("bench-{stamp}");
    config.kafka.dead_letter_topic = format!("{topic}-dlq");
    config.alerts.topic = format!("{topic}-alerts");
    config.alerts.forecasts_topic = format!("{topic}-forecasts");
    let topics: Vec<(String, i32)> = [
        &topic,
        &config.kafka.dead_letter_topic,
        &config.alerts.topic,
        &config.alerts.forecasts_topic,
    ]
    .into_iter()
    .map(|t| (t.clone(), if *t == topic { partitions } else { 1 }))
    .collect();
    let broker = BenchBroker::start(&args, &topics).await?;
    config.kafka.brokers = broker.bootstrap();

    let producer = config
        .kafka
        .producer_config()?
        .set("linger.ms", "1000")
        .set("batch.num.messages", "100000")
        .set("compression.type", COMPRESSION)
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .context("creating the bench producer")?;
    let producing = Instant::now();
    let mut fleet = FleetSimulator::new(sim.clone(), WireFormat::Json)?;
    let summary = publish_kafka(&mut fleet, &producer, &topic, 0.0, None).await?;
    let produce_seconds = producing.elapsed().as_secs_f64();
    let total = summary.messages;
    drop(producer);
    if !matches!(broker, BenchBroker::External(_)) {
        ensure_nothing_dropped(&config.kafka, &topic, partitions, total)?;
    }
    println!(
        "bench pipeline: kafka ({}), topic of {partitions} partitions ({COMPRESSION}), {} batteries x {} days: {total} messages produced in {produce_seconds:.1} s",
        broker.describe(),
        sim.batteries,
        sim.days
    );
    let dir = tempfile::tempdir()?;
    configure(&mut config, &args, dir.path(), models);
    if args.floors {
        crate::bench_floors::librdkafka_alone(&config.kafka, total)?;
        crate::bench_floors::source_alone(&config, total).await?;
    }
    measure(config, Some(total)).await?;
    broker.stop()
}

type Mock = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// Where the bench's topic lives.
enum BenchBroker {
    /// librdkafka's mock cluster in this process: its copy of the topic is in this
    /// process's memory, before the pipeline starts.
    InProcess(Mock),
    /// The mock cluster in a child process (`voltcast bench mock-broker`), which ends
    /// when its stdin closes.
    Child {
        child: std::process::Child,
        bootstrap: String,
    },
    /// A broker of the user's (`--brokers`).
    External(String),
}

impl BenchBroker {
    /// Starts the broker (or names the user's) with `topics` created on it.
    async fn start(args: &PipelineArgs, topics: &[(String, i32)]) -> anyhow::Result<Self> {
        if let Some(brokers) = &args.brokers {
            let kafka = KafkaConfig {
                brokers: brokers.clone(),
                ..Default::default()
            };
            for (topic, partitions) in topics {
                create_topic(&kafka, topic, *partitions).await?;
            }
            return Ok(Self::External(brokers.clone()));
        }
        if args.broker_process {
            return spawn_mock_broker(topics);
        }
        let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
        create_mock_topics(&cluster, topics)?;
        Ok(Self::InProcess(cluster))
    }

    fn bootstrap(&self) -> String {
        match self {
            Self::InProcess(cluster) => cluster.bootstrap_servers(),
            Self::Child { bootstrap, .. } | Self::External(bootstrap) => bootstrap.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::InProcess(_) => "librdkafka mock cluster in this process".into(),
            Self::Child { child, bootstrap } => format!(
                "librdkafka mock cluster in child process {} at {bootstrap}, {:.0} MB resident",
                child.id(),
                crate::bench::resident_bytes_of(child.id()) as f64 / 1e6
            ),
            Self::External(brokers) => brokers.clone(),
        }
    }

    /// Ends a child broker: its stdin closes, so it returns and exits.
    fn stop(self) -> anyhow::Result<()> {
        if let Self::Child { mut child, .. } = self {
            drop(child.stdin.take());
            child
                .wait()
                .context("waiting for the mock broker process")?;
        }
        Ok(())
    }
}

fn create_mock_topics(cluster: &Mock, topics: &[(String, i32)]) -> anyhow::Result<()> {
    for (topic, partitions) in topics {
        cluster
            .create_topic(topic, *partitions, 1)
            .with_context(|| format!("creating {topic} on the mock cluster"))?;
    }
    Ok(())
}

/// Starts `voltcast bench mock-broker` with `topics` and reads the address it prints.
fn spawn_mock_broker(topics: &[(String, i32)]) -> anyhow::Result<BenchBroker> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["bench", "mock-broker"]);
    for (topic, partitions) in topics {
        command.arg("--topic").arg(format!("{topic}:{partitions}"));
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the mock broker process")?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("the mock broker's stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let Some(bootstrap) = line.trim().strip_prefix("bootstrap ") else {
        let _ = child.kill();
        bail!("the mock broker process printed {line:?}, not its address");
    };
    let bootstrap = bootstrap.to_string();
    Ok(BenchBroker::Child { child, bootstrap })
}

#[derive(Args, Debug, Clone)]
pub struct MockBrokerArgs {
    /// A topic to create, NAME:PARTITIONS; repeatable.
    #[arg(long = "topic", value_parser = parse_topic)]
    topics: Vec<(String, i32)>,
}

fn parse_topic(s: &str) -> Result<(String, i32), String> {
    let (name, partitions) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:PARTITIONS"))?;
    let partitions = partitions
        .parse()
        .map_err(|e| format!("{s:?}: partitions: {e}"))?;
    Ok((name.to_string(), partitions))
}

/// `voltcast bench mock-broker`: the mock cluster with `args.topics`, until stdin closes
/// (the bench's end, or its death: the broker never outlives it).
pub fn mock_broker(args: MockBrokerArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    create_mock_topics(&cluster, &args.topics)?;
    let mut out = std::io::stdout();
    writeln!(out, "bootstrap {}", cluster.bootstrap_servers())?;
    out.flush()?;
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    Ok(())
}

/// Creates `topic` through the admin API of a real broker.
async fn create_topic(kafka: &KafkaConfig, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = kafka.connection()?.create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .with_context(|| format!("creating {topic}"))?;
    for r in results {
        if let Err((name, code)) = r {
            bail!("creating topic {name}: {code}");
        }
    }
    Ok(())
}

/// The mock broker silently drops a partition's oldest messages past 5 MiB: a bench
/// that lost part of its backlog would measure nothing true.
fn ensure_nothing_dropped(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    total: u64,
) -> anyhow::Result<()> {
    let held = held_messages(kafka, topic, partitions).context("raise --partitions")?;
    anyhow::ensure!(held == total, "the topic holds {held} of {total} messages");
    Ok(())
}

/// Messages `topic` holds, after checking that the mock broker dropped none (it keeps
/// 5 MiB per partition).
pub(crate) fn held_messages(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = kafka
        .consumer_config()?
        .set("group.id", "voltcast-bench-check")
        .create()?;
    let mut held = 0;
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if low > 0 {
            bail!(
                "the mock broker dropped the oldest {low} messages of {topic}/{p} (it keeps 5 MiB per partition)"
            );
        }
        held += high as u64;
    }
    Ok(held)
}

async fn file(args: PipelineArgs, path: PathBuf, models: &VoltcastConfig) -> anyhow::Result<()> {
    let bytes = std::fs::metadata(&path)
        .with_context(|| format!("--input {}", path.display()))?
        .len();
    println!(
        "bench pipeline: file replay of {} ({:.0} MB)",
        path.display(),
        bytes as f64 / 1e6
    );
    let dir = tempfile::tempdir()?;
    let mut config = VoltcastConfig {
        source: SourceKind::File,
        ..Default::default()
    };
    config.file.path = path;
    configure(&mut config, &args, dir.path(), models);
    config.file.dead_letter_path = Some(dir.path().join("dead-letters.jsonl"));
    measure(config, None).await
}

/// `voltcast run`'s defaults, with its files in `dir` and the API off.
fn configure(
    config: &mut VoltcastConfig,
    args: &PipelineArgs,
    dir: &std::path::Path,
    models: &VoltcastConfig,
) {
    config.forecast = models.forecast.clone();
    config.risk = models.risk.clone();
    config.batch.max_rows = args.batch_rows;
    config
        .kafka
        .properties
        .extend(args.properties.iter().cloned());
    config.api.listen = String::new();
    config.alerts.store_path = dir.join("alerts");
    config.checkpoint.path = dir.join("checkpoint");
    config.archive.path = if args.archive {
        dir.join("archive")
    } else {
        PathBuf::new()
    };
}

/// Runs the pipeline until `total` messages are read (Kafka) or the input ends (file),
/// and prints what it did and where the time and memory went.
async fn measure(config: VoltcastConfig, total: Option<u64>) -> anyhow::Result<()> {
    println!(
        "bench build: {}; batch.max_rows {}, archive {}",
        crate::bench::build_profile(),
        config.batch.max_rows,
        if config.archive.path.as_os_str().is_empty() {
            "off"
        } else {
            "on"
        }
    );
    voltcast_scoring::memory::release_free_pages();
    let rss_before = crate::bench::resident_bytes();
    let services = Services::start(&config).await?;
    let counters = services.counters.clone();
    let cpu_before = voltcast_scoring::memory::process_cpu_seconds();
    let started = Instant::now();
    // Milliseconds after `started` of the first message, and the most memory seen.
    let first_ms = Arc::new(AtomicU64::new(u64::MAX));
    let peak = Arc::new(AtomicU64::new(rss_before as u64));
    let heap = Arc::new(std::sync::Mutex::new(HeapSample::default()));
    let watch = {
        let (counters, first_ms, peak) = (counters.clone(), first_ms.clone(), peak.clone());
        let heap = heap.clone();
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                if counters.received() > 0 && first_ms.load(Ordering::Relaxed) == u64::MAX {
                    first_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                peak.fetch_max(crate::bench::resident_bytes() as u64, Ordering::Relaxed);
                if tick.is_multiple_of(200) {
                    heap.lock().expect("heap sample").offer();
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let all_read = {
        let counters = counters.clone();
        async move {
            match total {
                Some(total) => {
                    while counters.received() < total {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                None => std::future::pending().await,
            }
        }
    };
    let report = voltcast_scoring::pipeline::run_with(&config, &services, all_read).await?;
    let end = started.elapsed().as_secs_f64();
    let cpu = voltcast_scoring::memory::process_cpu_seconds() - cpu_before;
    watch.abort();
    services.finish(Duration::from_secs(5)).await;
    let first = match first_ms.load(Ordering::Relaxed) {
        u64::MAX => 0.0,
        ms => ms as f64 / 1000.0,
    };
    print_report(
        &report,
        (first, end, cpu),
        rss_before,
        peak.load(Ordering::Relaxed) as usize,
    );
    if config.source == SourceKind::Kafka {
        println!(
            "bench pipeline source idle: {:.2} s with no message ready (waiting for the broker's fetches)",
            counters.idle_seconds()
        );
    }
    let heap = *heap.lock().expect("heap sample");
    if let Some(stats) = heap.stats {
        println!(
            "bench pipeline heap at the most resident of the once-a-second samples ({:.0} MB): {:.0} MB in use ({:.0} bytes per battery), {:.0} MB free inside the allocator's {} arenas",
            heap.resident as f64 / 1e6,
            stats.in_use as f64 / 1e6,
            stats.in_use as f64 / report.tally.batteries.len().max(1) as f64,
            stats.free_held as f64 / 1e6,
            stats.arenas,
        );
    }
    Ok(())
}

/// The allocator's split (in use, free inside it) at the most resident moment sampled:
/// whether a peak is live data or fragmentation.
#[derive(Debug, Default, Clone, Copy)]
struct HeapSample {
    resident: usize,
    stats: Option<voltcast_scoring::memory::AllocatorStats>,
}

impl HeapSample {
    fn offer(&mut self) {
        let resident = crate::bench::resident_bytes();
        if resident >= self.resident {
            *self = Self {
                resident,
                stats: voltcast_scoring::memory::allocator_stats(),
            };
        }
    }
}

/// `times`: seconds after the start of the first message and of the end, and the
/// process's CPU seconds over the run.
fn print_report(r: &RunReport, times: (f64, f64, f64), rss_before: usize, peak: usize) {
    let (first, end, cpu) = times;
    let events = r.received;
    // The source loop ends once the last batch's days have closed.
    let consumed = (r.source_seconds - first).max(1e-9);
    let whole = (end - first).max(1e-9);
    let batteries = r.tally.batteries.len().max(1);
    let t = &r.window_times;
    println!(
        "bench pipeline: {events} events, {} rows, {} dead letters, {} duplicates, {} late, {} battery-days closed ({} imputed), {} batteries",
        r.tally.rows,
        r.rejected,
        r.windows.duplicates,
        r.windows.late,
        r.windows.days_closed,
        r.windows.days_imputed,
        batteries
    );
    println!(
        "bench pipeline throughput: {:.0} events/s first message -> last closed day ({consumed:.2} s); {:.0} events/s to forecasts and alerts drained ({whole:.2} s)",
        events as f64 / consumed,
        events as f64 / whole,
    );
    let windows = t.windows.as_secs_f64();
    let f = &r.forecast;
    // The stages' figures are CPU time of the threads that ran them (partitions and
    // batteries run in parallel); what the process spent beyond them is the source loop
    // (consume, decode, validate, batch) and librdkafka's own threads.
    let stages = windows
        + (t.archive + t.dead_letters + t.checkpoint + t.alerts + t.policy).as_secs_f64()
        + f.update_seconds
        + f.selection_seconds
        + f.refit_seconds;
    println!(
        "bench pipeline CPU: {cpu:.2} s for the process ({:.2} cores busy on average); stages {stages:.2} s; the rest (consume, decode, validate, librdkafka) {:.2} s",
        cpu / whole,
        (cpu - stages).max(0.0),
    );
    println!(
        "bench pipeline stages (CPU s): windows {windows:.2}, archive {:.2}, dead letters {:.2}, checkpoints {:.2}, alert carry-out {:.2}; forecast daily updates {:.2} ({} risks, {} quiet days), selections {:.2} ({}), refits {:.2} ({}), alert policy {:.2} ({} stored)",
        t.archive.as_secs_f64(),
        t.dead_letters.as_secs_f64(),
        t.checkpoint.as_secs_f64(),
        t.alerts.as_secs_f64(),
        f.update_seconds,
        f.updates,
        f.quiet_days,
        f.selection_seconds,
        f.selections,
        f.refit_seconds,
        f.refits,
        t.policy.as_secs_f64(),
        r.alerts,
    );
    println!(
        "bench pipeline wall: source loop {:.2} s, of which {:.2} s waiting for the stage; the stage busy {:.2} s (beside the source)",
        r.source_seconds,
        r.source_waited,
        t.accepting.as_secs_f64(),
    );
    println!(
        "bench pipeline day aggregation: {} plans in {} polls",
        r.aggregate.plans_run, r.aggregate.polls
    );
    let grown = peak.saturating_sub(rss_before);
    println!(
        "bench pipeline memory: {:.0} MB resident before the pipeline, {:.0} MB at the peak of the run: {:.0} bytes per battery; process peak (VmHWM) {:.0} MB",
        rss_before as f64 / 1e6,
        peak as f64 / 1e6,
        grown as f64 / batteries as f64,
        peak_resident_bytes() as f64 / 1e6
    );
}

/// The process's peak resident size (`VmHWM`), which sampling can miss between polls.
fn peak_resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kb * 1024
}
