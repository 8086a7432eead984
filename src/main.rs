//! `voltcast`: one binary for the whole pipeline. See `voltcast --help`.

mod bench;
mod bench_alerts;
mod bench_floors;
mod bench_fuzz;
mod bench_handoff;
mod bench_pipeline;
mod demo;
mod forecast;
mod plot;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use voltcast_scoring::config::default_config_path;
use voltcast_scoring::{SourceKind, VoltcastConfig};

#[derive(Parser)]
#[command(
    name = "voltcast",
    version,
    about = "Streaming battery-telemetry forecasting: Kafka in, 30-day end-of-life alerts out."
)]
struct Cli {
    /// Config file (TOML). Default: ./voltcast.toml if present. VOLTCAST_SECTION__KEY
    /// variables override it.
    #[arg(long, global = true, env = "VOLTCAST_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: in-process Kafka broker, simulated fleet, pipeline,
    /// head unit, API and metrics. Start here.
    Demo(demo::DemoArgs),
    /// Run the pipeline on the configured source (Kafka by default).
    Run {
        /// Replay a JSONL/CSV file or folder instead of consuming Kafka.
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Generate fleet telemetry into a file or a Kafka topic.
    Simulate(simulate::SimulateArgs),
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Batch scoring: forecast and failure risk for every battery in telemetry files.
    Forecast(forecast::ForecastArgs),
    /// The head-unit simulator: receives signed alert webhooks, shows an in-dash page.
    HeadUnit(HeadUnitArgs),
    /// Inspect the Parquet archive.
    Archive {
        #[command(subcommand)]
        action: ArchiveAction,
    },
    /// Measure throughput; prints its figures.
    Bench {
        #[command(subcommand)]
        what: bench::BenchTarget,
    },
}

#[derive(clap::Args)]
struct HeadUnitArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// The webhook signing secret shared with voltcast (`webhook.secret`).
    #[arg(long, env = "VOLTCAST_WEBHOOK__SECRET", hide_env_values = true)]
    secret: String,
    /// voltcast's API base URL, for "Book service" acknowledgements.
    #[arg(long, env = "VOLTCAST_URL")]
    voltcast_url: Option<String>,
    /// Bearer token for voltcast's API (`api.token`).
    #[arg(long, env = "VOLTCAST_API__TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Largest accepted difference between a request's timestamp and this clock.
    #[arg(long, default_value_t = 300)]
    tolerance_seconds: i64,
}

#[derive(Subcommand)]
enum ArchiveAction {
    /// One JSON line: per table (raw, daily) the files, rows, distinct keys and an
    /// order-independent digest of the rows; and the files still staged. Two archives of
    /// the same stream (one run killed and restarted, one not) print the same line.
    Summary {
        /// The archive root (`archive.path`); default: the configured one.
        path: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the effective configuration (secrets masked), or the first problem in it.
    Check,
}

fn main() -> ExitCode {
    // Before any thread exists: the arena cap applies to arenas made from now on.
    voltcast_scoring::memory::tune_allocator();
    let cli = Cli::parse();
    init_logging();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voltcast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VOLTCAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    // Colour only for a person at a terminal; logs piped to files or collectors stay plain.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load_config(cli_path: Option<PathBuf>) -> anyhow::Result<VoltcastConfig> {
    let path = cli_path.or_else(default_config_path);
    Ok(VoltcastConfig::load(path.as_deref())?)
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Run { input } => {
            let mut config = load_config(cli.config)?;
            if let Some(input) = input {
                config.source = SourceKind::File;
                config.file.path = input;
                config.check()?;
            }
            runtime.block_on(run(config))
        }
        Command::Demo(args) => {
            let config = load_config(cli.config)?;
            runtime.block_on(demo::run(args, config))
        }
        Command::Simulate(args) => runtime.block_on(simulate::run(args)),
        Command::Forecast(args) => {
            let config = load_config(cli.config)?;
            runtime.block_on(forecast::run(args, &config))
        }
        Command::Config {
            action: ConfigAction::Check,
        } => {
            let config = load_config(cli.config)?;
            print!("{}", config.to_masked_toml());
            eprintln!("voltcast: config ok");
            Ok(())
        }
        Command::Bench { what } => bench::run(what, &load_config(cli.config)?),
        Command::HeadUnit(args) => runtime.block_on(head_unit(args)),
        Command::Archive {
            action: ArchiveAction::Summary { path },
        } => {
            let path = match path {
                Some(p) => p,
                None => load_config(cli.config)?.archive.path,
            };
            let config = voltcast_scoring::archive::ArchiveConfig { path };
            let archive = voltcast_scoring::archive::ParquetArchive::new(&config)
                .context("archive.path is empty: the archive is off")?;
            println!("{}", serde_json::to_string(&archive.summary()?)?);
            Ok(())
        }
    }
}

async fn head_unit(args: HeadUnitArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.secret.is_empty(), "--secret must not be empty");
    let mut config = voltcast_headunit::HeadUnitConfig::new(args.secret);
    config.tolerance_seconds = args.tolerance_seconds;
    config.voltcast_url = args.voltcast_url;
    config.api_token = args.api_token.filter(|t| !t.is_empty());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    tracing::info!(url = %format!("http://{}/", listener.local_addr()?), "head unit listening");
    let shutdown = async {
        voltcast_scoring::pipeline::stop_signal().await;
    };
    voltcast_headunit::HeadUnit::new(config, None)
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

async fn run(config: VoltcastConfig) -> anyhow::Result<()> {
    let shutdown = async {
        voltcast_scoring::pipeline::stop_signal().await;
        tracing::info!("interrupted: finishing the open batch");
    };
    let report = voltcast_scoring::pipeline::run(&config, shutdown).await?;
    let t = &report.tally;
    tracing::info!(
        received = report.received,
        rows = t.rows,
        dead_letters = report.rejected,
        batteries = t.batteries.len(),
        batches = t.batches,
        days_closed = report.windows.days_closed,
        days_imputed = report.windows.days_imputed,
        duplicates = report.windows.duplicates,
        late = report.windows.late,
        seconds = format!("{:.2}", report.seconds),
        "run finished"
    );
    tracing::info!(
        batteries_forecast = report.batteries_forecast,
        at_risk = report.at_risk.len(),
        daily_updates = report.forecast.updates,
        selections = report.forecast.selections,
        alerts = report.alerts,
        "forecasts"
    );
    if config.source == SourceKind::File && report.rejected > 0 {
        tracing::info!(path = %config.file.default_dead_letters().display(), "dead letters written");
    }
    Ok(())
}
