//! Decoding and validation through the public entry points (decoders and the file source).

mod common;

use std::sync::Arc;

use common::CollectingSink;
use voltcast_ingest::decode::{CsvLayout, decode_json};
use voltcast_ingest::file::{FileFormat, FileSourceConfig};
use voltcast_ingest::time::parse_timestamp;
use voltcast_ingest::{
    BatchConfig, DeadLetterQueue, FileSource, IngestCounters, RejectReason, ValidationConfig,
};

const REFERENCE_CSV: &str = "\
Date,Battery_ID,Battery_Age_Days,Number_Of_Trips,Daily_Trip_Duration,Daily_Cycles_Used,Lifetime_Cycles_Used,Battery_Rated_Cycles
2013-01-01,0,0,5,67.84560758,0.166920318,0.166920318,200
2013-01-02,0,1,5,53.45079793,0.131504817,0.298425135,200
2013-01-03,0,2,5,58.84143294,0.144767378,0.443192512,200
2013-01-04,0,3,5,60.63840306,0.149188457,0.592380970,200
2013-01-05,0,4,5,62.64690998,0.154129980,0.746510950,200
";

fn reference_json(names: &dyn Fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut lines = REFERENCE_CSV.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let pairs: Vec<String> = header
            .iter()
            .zip(&fields)
            .map(|(h, v)| match *h {
                "Date" => format!("\"{}\":\"{v}\"", names(h)),
                _ => format!("\"{}\":{v}", names(h)),
            })
            .collect();
        out.push_str(&format!("{{{}}}\n", pairs.join(",")));
    }
    out
}

async fn replay(text: &str, ext: &str) -> (CollectingSink, Vec<voltcast_ingest::DeadLetter>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("input.{ext}"));
    std::fs::write(&path, text).unwrap();
    let (dlq, dead) = DeadLetterQueue::memory();
    let config = FileSourceConfig {
        path,
        format: FileFormat::Auto,
        dead_letter_path: None,
    };
    let source = FileSource::new(
        config,
        BatchConfig {
            max_rows: 2,
            max_wait_ms: 1000,
        },
        ValidationConfig::default(),
        Arc::new(IngestCounters::default()),
        dlq,
    );
    let mut sink = CollectingSink::default();
    source.run(&mut sink).await.unwrap();
    let dead = dead.lock().unwrap().clone();
    (sink, dead)
}

#[tokio::test]
async fn reference_rows_decode_identically_from_csv_and_json() {
    let (csv, csv_dead) = replay(REFERENCE_CSV, "csv").await;
    let (json, json_dead) = replay(&reference_json(&|h| h.to_ascii_lowercase()), "jsonl").await;
    let (json_ref_names, ref_dead) = replay(&reference_json(&|h| h.to_string()), "jsonl").await;
    assert!(csv_dead.is_empty() && json_dead.is_empty() && ref_dead.is_empty());
    let (a, b, c) = (csv.concat(), json.concat(), json_ref_names.concat());
    assert_eq!(a.num_rows(), 5);
    assert_eq!(a, b);
    assert_eq!(a, c);
    // A spot check against the reference table itself.
    let cycles = a.column_by_name("daily_cycles_used").unwrap();
    let cycles = cycles
        .as_any()
        .downcast_ref::<voltcast_ingest::arrow::array::Float64Array>()
        .unwrap();
    assert_eq!(cycles.value(4), 0.154129980);
    let ids = a.column_by_name("battery_id").unwrap();
    let ids = ids
        .as_any()
        .downcast_ref::<voltcast_ingest::arrow::array::StringArray>()
        .unwrap();
    assert_eq!(ids.value(0), "0");
    // Small batches were used: positions advance to the line after the last row.
    assert_eq!(csv.batches.last().unwrap().positions[0].next_offset, 7);
}

fn reason(payload: &str) -> Result<(), RejectReason> {
    let now = parse_timestamp("2026-01-01").unwrap();
    decode_json(payload.as_bytes(), &ValidationConfig::default(), now)
        .map(|_| ())
        .map_err(|r| r.reason)
}

const GOOD: &str = r#"{"date":"2025-06-01T12:00:00Z","battery_id":"B1","vehicle_id":"V1","battery_age_days":10,"number_of_trips":3,"daily_trip_duration":40.5,"daily_cycles_used":0.1,"lifetime_cycles_used":1.5,"battery_rated_cycles":200}"#;

fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn each_defect_gets_its_reason() {
    assert_eq!(reason(GOOD), Ok(()));
    assert_eq!(
        reason(&with(
            "\"date\":\"2025-06-01T12:00:00Z\"",
            "\"date\":1748779200000"
        )),
        Ok(())
    );
    assert_eq!(
        reason(&with("\"battery_id\":\"B1\"", "\"battery_id\":17")),
        Ok(())
    );
    assert_eq!(
        reason(&with("\"number_of_trips\":3", "\"number_of_trips\":3.0")),
        Ok(())
    );
    // A resampled file's half of 3 trips.
    assert_eq!(
        reason(&with("\"number_of_trips\":3", "\"number_of_trips\":1.5")),
        Ok(())
    );
    assert_eq!(reason(&with("\"vehicle_id\":\"V1\",", "")), Ok(()));
    assert_eq!(reason(&with("}", ",\"unknown_extra\":[1,2]}")), Ok(()));
    // Past its rating, within reason: kept.
    assert_eq!(
        reason(&with(
            "\"lifetime_cycles_used\":1.5",
            "\"lifetime_cycles_used\":1999"
        )),
        Ok(())
    );

    let cases = [
        (with("}", ""), RejectReason::Malformed),
        ("not json".to_string(), RejectReason::Malformed),
        (String::new(), RejectReason::Malformed),
        (
            with("\"battery_id\":\"B1\",", ""),
            RejectReason::MissingField,
        ),
        (
            with("\"daily_cycles_used\":0.1,", ""),
            RejectReason::MissingField,
        ),
        (
            with("\"number_of_trips\":3", "\"number_of_trips\":\"3\""),
            RejectReason::BadType,
        ),
        (
            with("\"number_of_trips\":3", "\"number_of_trips\":5000"),
            RejectReason::OutOfRange,
        ),
        (
            with(
                "\"daily_trip_duration\":40.5",
                "\"daily_trip_duration\":null",
            ),
            RejectReason::BadType,
        ),
        (
            with("\"daily_cycles_used\":0.1", "\"daily_cycles_used\":1e999"),
            RejectReason::NonFinite,
        ),
        (
            with("\"daily_trip_duration\":40.5", "\"daily_trip_duration\":-1"),
            RejectReason::Negative,
        ),
        (
            with("\"number_of_trips\":3", "\"number_of_trips\":-2"),
            RejectReason::Negative,
        ),
        (
            with("\"daily_cycles_used\":0.1", "\"daily_cycles_used\":1000"),
            RejectReason::OutOfRange,
        ),
        (
            with(
                "\"daily_trip_duration\":40.5",
                "\"daily_trip_duration\":2000",
            ),
            RejectReason::OutOfRange,
        ),
        (
            with("\"battery_rated_cycles\":200", "\"battery_rated_cycles\":0"),
            RejectReason::OutOfRange,
        ),
        (
            with(
                "\"lifetime_cycles_used\":1.5",
                "\"lifetime_cycles_used\":1e300",
            ),
            RejectReason::OutOfRange,
        ),
        (
            // More than 10 times its rating of 200.
            with(
                "\"lifetime_cycles_used\":1.5",
                "\"lifetime_cycles_used\":2000.5",
            ),
            RejectReason::OutOfRange,
        ),
        (
            with("\"battery_age_days\":10", "\"battery_age_days\":3000000000"),
            RejectReason::OutOfRange,
        ),
        (
            with("2025-06-01T12:00:00Z", "1999-12-31"),
            RejectReason::BadTime,
        ),
        (
            with("2025-06-01T12:00:00Z", "2026-01-03T00:00:00Z"),
            RejectReason::BadTime,
        ),
        (
            with("2025-06-01T12:00:00Z", "yesterday"),
            RejectReason::BadTime,
        ),
        (
            with("\"battery_id\":\"B1\"", "\"battery_id\":\"\""),
            RejectReason::BadId,
        ),
        (
            with(
                "\"battery_id\":\"B1\"",
                &format!("\"battery_id\":\"{}\"", "x".repeat(65)),
            ),
            RejectReason::BadId,
        ),
        (
            with("\"vehicle_id\":\"V1\"", "\"vehicle_id\":\" \""),
            RejectReason::BadId,
        ),
        (
            with("\"vehicle_id\":\"V1\"", "\"vehicle_id\":\"V1\\nX\""),
            RejectReason::BadId,
        ),
        (
            with("\"battery_id\":\"B1\"", "\"battery_id\":\"B\\u001b1\""),
            RejectReason::BadId,
        ),
        (
            with("\"vehicle_id\":\"V1\"", "\"vehicle_id\":\"..\""),
            RejectReason::BadId,
        ),
        (
            with("}", &format!(",\"pad\":\"{}\"}}", "x".repeat(20_000))),
            RejectReason::Oversize,
        ),
    ];
    for (payload, want) in cases {
        let shown: String = payload.chars().take(120).collect();
        assert_eq!(reason(&payload), Err(want), "{shown}");
    }
}

#[test]
fn csv_rows_get_reasons_too() {
    let layout = CsvLayout::from_header(REFERENCE_CSV.lines().next().unwrap().split(',')).unwrap();
    let now = parse_timestamp("2026-01-01").unwrap();
    let rules = ValidationConfig::default();
    let row = |s: &str| csv::StringRecord::from(s.split(',').collect::<Vec<_>>());
    let check = |s: &str| {
        layout
            .decode(&row(s), &rules, now)
            .map(|_| ())
            .map_err(|r| r.reason)
    };
    assert_eq!(check("2013-01-01,0,0,5,67.8,0.16,0.16,200"), Ok(()));
    assert_eq!(
        check("2013-01-01,0,0,5,67.8,0.16,0.16"),
        Err(RejectReason::Malformed)
    );
    assert_eq!(
        check("2013-01-01,,0,5,67.8,0.16,0.16,200"),
        Err(RejectReason::MissingField)
    );
    assert_eq!(
        check("2013-01-01,0,0,five,67.8,0.16,0.16,200"),
        Err(RejectReason::BadType)
    );
    assert_eq!(
        check("2013-01-01,0,0,5,NaN,0.16,0.16,200"),
        Err(RejectReason::NonFinite)
    );
    assert_eq!(
        check("2013-01-01,0,inf,5,67.8,0.16,0.16,200"),
        Err(RejectReason::NonFinite)
    );
    assert_eq!(
        check("2013-01-01,0,0,5,67.8,-0.16,0.16,200"),
        Err(RejectReason::Negative)
    );
    assert_eq!(
        check("13/01/01,0,0,5,67.8,0.16,0.16,200"),
        Err(RejectReason::BadTime)
    );

    let err = CsvLayout::from_header("Date,Battery_ID,Daily_Cycles_Used".split(',')).unwrap_err();
    assert!(err.to_string().contains("Lifetime_Cycles_Used"), "{err}");
}

#[tokio::test]
async fn file_replay_dead_letters_every_simulated_defect_with_its_reason() {
    use voltcast_ingest::simulate::{FleetSimulator, SimulatorConfig, WireFormat, write_file};
    for (format, ext) in [(WireFormat::Json, "jsonl"), (WireFormat::Csv, "csv")] {
        let config = SimulatorConfig {
            batteries: 200,
            days: 20,
            malformed_rate: 0.02,
            ..Default::default()
        };
        let mut expected = FleetSimulator::new(config.clone(), format).unwrap();
        let mut want_reasons = std::collections::BTreeMap::new();
        let mut want_rows = 0;
        while let Some(day) = expected.next_day() {
            for m in &day.messages {
                match m.defect {
                    Some(r) => *want_reasons.entry(r).or_insert(0) += 1,
                    None => want_rows += 1,
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("fleet.{ext}"));
        write_file(
            &mut FleetSimulator::new(config, format).unwrap(),
            &path,
            None,
        )
        .unwrap();
        let dlq_path = dir.path().join("dead.jsonl");
        let counters = Arc::new(IngestCounters::default());
        let source = FileSource::new(
            FileSourceConfig {
                path,
                format: FileFormat::Auto,
                dead_letter_path: None,
            },
            BatchConfig {
                max_rows: 1000,
                max_wait_ms: 1000,
            },
            ValidationConfig::default(),
            counters.clone(),
            DeadLetterQueue::file(&dlq_path),
        );
        let mut sink = CollectingSink::default();
        source.run(&mut sink).await.unwrap();
        assert_eq!(sink.rows(), want_rows, "{ext}");
        let mut got_reasons = std::collections::BTreeMap::new();
        for line in std::fs::read_to_string(&dlq_path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let r = RejectReason::parse(v["reason"].as_str().unwrap()).unwrap();
            *got_reasons.entry(r).or_insert(0) += 1;
            assert!(v["origin"]["offset"].as_i64().unwrap() > 1);
            assert!(!v["detail"].as_str().unwrap().is_empty());
        }
        assert!(
            want_reasons.len() >= 6,
            "the simulator should exercise most reasons: {want_reasons:?}"
        );
        assert_eq!(got_reasons, want_reasons, "{ext}");
        for (r, n) in &want_reasons {
            assert_eq!(counters.rejected(*r), *n as u64);
        }
    }
}
