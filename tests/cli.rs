//! End-to-end tests of the `voltcast` binary: what a person typing the commands gets.

use std::path::Path;
use std::process::{Command, Output};

fn voltcast(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_voltcast"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("VOLTCAST_CONFIG")
        .env("VOLTCAST_LOG", "info");
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
        let dead = std::fs::read_to_string(dir.path().join(format!("{file}.dlq.jsonl"))).unwrap();
        assert_eq!(dead.lines().count() as u64, malformed);
    }
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
