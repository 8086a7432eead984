//! End-to-end tests of the `voltcast` binary: what a person typing the commands gets.

use std::path::Path;
use std::process::{Command, Output};

fn voltcast(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_voltcast"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("VOLTCAST_CONFIG")
        .env("VOLTCAST_LOG", "info")
        // Tests run side by side: each API on a free port.
        .env("VOLTCAST_API__LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("voltcast runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn simulate_then_replay_accounts_for_every_message() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["fleet.jsonl", "fleet.csv"] {
        let out = voltcast(
            &[
                "simulate",
                "--batteries",
                "50",
                "--days",
                "30",
                "--malformed-rate",
                "0.02",
                "--output",
                file,
                "--truth",
                "truth.csv",
            ],
            dir.path(),
            &[],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let said = text(&out.stderr);
        let number = |label: &str| -> u64 {
            let at = said
                .find(label)
                .unwrap_or_else(|| panic!("{label} in {said}"));
            said[..at]
                .split_whitespace()
                .last()
                .unwrap()
                .trim_start_matches('(')
                .parse()
                .unwrap()
        };
        let (valid, malformed) = (number("valid reports"), number("malformed"));
        assert!(malformed > 0);

        let truth = std::fs::read_to_string(dir.path().join("truth.csv")).unwrap();
        assert!(truth.starts_with("battery_id,date,expected_cycles"));
        assert_eq!(
            truth.lines().count(),
            1 + 50 * 30,
            "one truth row per battery-day"
        );

        let out = voltcast(&["run", "--input", file], dir.path(), &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let log = text(&out.stderr);
        assert!(log.contains(&format!("rows={valid}")), "{log}");
        assert!(log.contains(&format!("dead_letters={malformed}")), "{log}");
        assert!(log.contains("batteries_forecast=50"), "{log}");
        let dead = std::fs::read_to_string(dir.path().join(format!("{file}.dlq.jsonl"))).unwrap();
        assert_eq!(dead.lines().count() as u64, malformed);
    }
}

/// docker-compose.yml's fallback signing secret is public: `run` refuses to start with it
/// and says how to set one.
#[test]
fn run_refuses_the_compose_placeholder_secret() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("VOLTCAST_WEBHOOK__SECRET", "change-me-in-production"),
        (
            "VOLTCAST_WEBHOOK__URL_TEMPLATE",
            "http://head-unit:8080/vehicles/{vehicle_id}/alerts",
        ),
        ("VOLTCAST_KAFKA__BROKERS", "127.0.0.1:1"),
    ];
    let out = voltcast(&["run"], dir.path(), &env);
    let said = text(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("webhook.secret") && said.contains("VOLTCAST_WEBHOOK_SECRET"),
        "{said}"
    );
    let own = [
        ("VOLTCAST_WEBHOOK__SECRET", "s3cret-of-our-own"),
        env[1],
        env[2],
    ];
    let out = voltcast(&["config", "check"], dir.path(), &own);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn config_check_prints_masked_config_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ok = voltcast(
        &["config", "check"],
        dir.path(),
        &[
            ("VOLTCAST_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ("VOLTCAST_BATCH__MAX_ROWS", "1234"),
        ],
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let shown = text(&ok.stdout);
    assert!(
        shown.contains("max_rows = 1234") && !shown.contains("hunter2"),
        "{shown}"
    );

    let bad = voltcast(
        &["config", "check"],
        dir.path(),
        &[("VOLTCAST_BATCH__MAX_ROWS", "lots")],
    );
    assert!(!bad.status.success());
    let err = text(&bad.stderr);
    assert!(
        err.contains("batch.max_rows") && err.contains("VOLTCAST_BATCH__MAX_ROWS"),
        "{err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one line a person can act on: {err}"
    );

    std::fs::write(
        dir.path().join("voltcast.toml"),
        "[kafka]\ntopic = \"typo\"\n",
    )
    .unwrap();
    let bad = voltcast(&["run"], dir.path(), &[]);
    assert!(!bad.status.success());
    let err = text(&bad.stderr);
    assert!(
        err.contains("kafka.topic") && err.contains("voltcast.toml"),
        "{err}"
    );
}

#[test]
fn bad_input_path_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = voltcast(&["run", "--input", "missing.jsonl"], dir.path(), &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("file.path") && err.contains("missing.jsonl"),
        "{err}"
    );
}

#[test]
fn forecast_scores_every_battery_from_csv_and_from_the_parquet_archive_alike() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = voltcast(args, dir.path(), &[]);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stderr)
    };
    run(&[
        "simulate",
        "--batteries",
        "40",
        "--days",
        "120",
        "--output",
        "fleet.csv",
    ]);
    let said = run(&[
        "forecast",
        "--input",
        "fleet.csv",
        "--output",
        "from_csv.csv",
    ]);
    assert!(said.contains("40 batteries forecast"), "{said}");
    let table = std::fs::read_to_string(dir.path().join("from_csv.csv")).unwrap();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for column in [
        "battery_id",
        "forecast_date",
        "cycles_mean",
        "cycles_lower_90",
        "cycles_upper_90",
        "model",
        "failure_probability_30d",
        "days_to_eol",
        "at_risk",
    ] {
        assert!(header.contains(&column), "{column} missing from {header:?}");
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 40 * 30, "30 forecast days per battery");
    let at = |name: &str| header.iter().position(|h| *h == name).unwrap();
    for r in &rows {
        let p: f64 = r[at("failure_probability_30d")].parse().unwrap();
        assert!((0.0..=1.0).contains(&p));
        let (lo, mean, hi): (f64, f64, f64) = (
            r[at("cycles_lower_90")].parse().unwrap(),
            r[at("cycles_mean")].parse().unwrap(),
            r[at("cycles_upper_90")].parse().unwrap(),
        );
        assert!(lo <= mean && mean <= hi, "{r:?}");
    }

    // The stream's raw archive, read back through DataFusion, gives the same forecasts.
    run(&["run", "--input", "fleet.csv"]);
    run(&[
        "forecast",
        "--input",
        "data/archive/raw",
        "--output",
        "from_parquet.csv",
    ]);
    let again = std::fs::read_to_string(dir.path().join("from_parquet.csv")).unwrap();
    let sorted = |t: &str| {
        let mut lines: Vec<String> = t.lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    let (a, b) = (sorted(&again), sorted(&table));
    assert_eq!(a.len(), b.len());
    let first = a.iter().zip(&b).find(|(x, y)| x != y);
    assert!(first.is_none(), "first difference: {first:?}");

    // The archive's summary: every decoded row once, each battery-day once; a second
    // archive of the same input summarizes the same.
    let summary = |path: &str| {
        let out = voltcast(&["archive", "summary", path], dir.path(), &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = summary("data/archive");
    let csv_rows = std::fs::read_to_string(dir.path().join("fleet.csv"))
        .unwrap()
        .lines()
        .count() as u64
        - 1;
    let raw_rows = first["raw"]["rows"].as_u64().unwrap();
    assert!(
        raw_rows > csv_rows * 95 / 100 && raw_rows <= csv_rows,
        "{first}"
    );
    assert_eq!(first["daily"]["rows"], first["daily"]["keys"], "{first}");
    assert!(
        first["daily"]["rows"].as_u64().unwrap() >= 40 * 119,
        "{first}"
    );
    assert_eq!(first["staged_files"], 0);
    let out = voltcast(
        &["run", "--input", "fleet.csv"],
        dir.path(),
        &[("VOLTCAST_ARCHIVE__PATH", "second")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = summary("second");
    assert_eq!(first["raw"]["digest"], second["raw"]["digest"]);
    assert_eq!(first["daily"]["digest"], second["daily"]["digest"]);

    // A chart of one battery.
    run(&[
        "forecast",
        "--input",
        "fleet.csv",
        "--output",
        "again.csv",
        "--plot",
        "B000003",
        "--plot-out",
        "b3.png",
    ]);
    let png = std::fs::read(dir.path().join("b3.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    let out = voltcast(
        &[
            "forecast",
            "--input",
            "fleet.csv",
            "--output",
            "x.csv",
            "--plot",
            "NOPE",
            "--plot-out",
            "x.png",
        ],
        dir.path(),
        &[],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--plot NOPE: no such battery"));

    let out = voltcast(
        &["forecast", "--input", "missing.csv", "--output", "x.csv"],
        dir.path(),
        &[],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("missing.csv") && err.lines().count() == 1,
        "{err}"
    );
}

/// `voltcast demo`: the embedded stack starts, raises alerts that reach the head units,
/// and stops cleanly on Ctrl-C (SIGINT) with its summary.
#[test]
fn demo_raises_alerts_and_stops_cleanly_on_ctrl_c() {
    demo_stops_cleanly_on("-INT");
}

/// SIGTERM (`docker stop`, Kubernetes) stops it the same way: batch finished, partitions
/// checkpointed, exit 0.
#[test]
fn demo_stops_cleanly_on_sigterm() {
    demo_stops_cleanly_on("-TERM");
}

fn demo_stops_cleanly_on(signal: &str) {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_voltcast"))
        .args([
            "demo",
            "--batteries",
            "300",
            "--days-per-second",
            "4",
            "--api-listen",
            "127.0.0.1:0",
            "--head-unit-listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .env_remove("VOLTCAST_CONFIG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = Vec::new();
    let mut interrupted = false;
    for line in stderr.lines() {
        let line = line.unwrap();
        // Interrupt once the status line reports alerts.
        if !interrupted && line.contains(" alerts") && !line.contains("| 0 alerts") {
            let pid = child.id().to_string();
            Command::new("kill").args([signal, &pid]).status().unwrap();
            interrupted = true;
        }
        lines.push(line);
        assert!(lines.len() < 10_000, "runaway output");
    }
    let status = child.wait().unwrap();
    let log = lines.join("\n");
    assert!(interrupted, "{log}");
    assert!(status.success(), "{log}");
    let summary = lines
        .iter()
        .find(|l| l.starts_with("voltcast demo finished"))
        .unwrap_or_else(|| panic!("{log}"));
    let number_before = |word: &str| -> u64 {
        let at = summary.find(word).unwrap();
        summary[..at]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(number_before(" alerts raised") > 0, "{summary}");
    assert_eq!(
        number_before(" alerts raised"),
        number_before(" delivered"),
        "{summary}"
    );
}

/// `voltcast bench pipeline` on both of its sources: a backlog produced into the mock
/// cluster, and the same kind of fleet replayed from a file. Every message is accounted
/// for and the figures it promises are printed.
#[test]
fn bench_pipeline_runs_the_whole_pipeline_on_a_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = ["--batteries", "200", "--days", "40", "--seed", "9"];
    let out = voltcast(
        &[&["simulate"][..], &fleet, &["--output", "fleet.jsonl"]].concat(),
        dir.path(),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for source in [&fleet[..], &["--input", "fleet.jsonl"][..]] {
        let args = [&["bench", "pipeline", "--batch-rows", "2000"][..], source].concat();
        let out = voltcast(&args, dir.path(), &[]);
        let said = text(&out.stdout);
        assert!(out.status.success(), "{said}{}", text(&out.stderr));
        for figure in [
            "bench build:",
            "events/s first message -> last closed day",
            "the rest (consume, decode, validate",
            "forecast daily updates",
            "bytes per battery",
        ] {
            assert!(said.contains(figure), "{figure:?} in {said}");
        }
        // "N events, R rows, D dead letters": every message is a row or a dead letter.
        let line = said.lines().find(|l| l.contains(" events, ")).unwrap();
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|t| t.parse().ok())
            .collect();
        assert!(numbers[0] > 8_000, "{line}");
        assert_eq!(numbers[0], numbers[1] + numbers[2], "{line}");
        let polls = said
            .lines()
            .find(|l| l.contains("day aggregation"))
            .unwrap();
        let counts: Vec<u64> = polls
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|t| t.parse().ok())
            .collect();
        assert!(counts[0] > 0 && counts[0] == counts[1], "{polls}");
    }
}

/// `voltcast bench fuzz` on a smaller count (the e2e script runs a million): damaged
/// messages of every kind through Kafka and the whole pipeline, and the books balance.
#[test]
fn bench_fuzz_accounts_for_every_damaged_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = voltcast(
        &["bench", "fuzz", "--messages", "30000", "--seed", "11"],
        dir.path(),
        &[],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    let damage = said.lines().find(|l| l.contains("fuzz damage:")).unwrap();
    for kind in [
        "unchanged",
        "bit_flip",
        "truncate",
        "huge_number",
        "non_finite",
        "wrong_type",
        "deep_nesting",
        "invalid_utf8",
        "duplicate_key",
        "oversize",
    ] {
        assert!(damage.contains(&format!("{kind} ")), "{kind} in {damage}");
    }
    // "N received, R rows, D dead letters": checked by the bench and again here.
    let line = said.lines().find(|l| l.contains(" received, ")).unwrap();
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    assert!(n[0] >= 30_000, "{line}");
    assert_eq!(n[0], n[1] + n[2], "{line}");
    assert!(n[1] > 0 && n[2] > 0, "{line}");
    assert!(said.contains("books balance"), "{said}");
}

/// `voltcast bench handoff` on a small partition: the state built the stream's way, every
/// battery with a model, handed to a new owner that continues it.
#[test]
fn bench_handoff_moves_a_partition_with_its_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = voltcast(
        &[
            "bench",
            "handoff",
            "--batteries",
            "300",
            "--days",
            "60",
            "--forecast-days",
            "20",
        ],
        dir.path(),
        &[],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("300 batteries, 300 with a model"), "{said}");
    for figure in ["per battery (state, models", "processed its first batch"] {
        assert!(said.contains(figure), "{figure:?} in {said}");
    }
}
