//! The window stage's cleansing rules, with hand-computed expectations.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Date32Type, Float64Type};
use voltcast_ingest::time::{MILLIS_PER_DAY, parse_timestamp};
use voltcast_ingest::{
    MicroBatch, RejectReason, SourcePosition, TelemetryBatchBuilder, TelemetryRecord,
};
use voltcast_scoring::windows::{DailyWindows, WindowConfig, daily};

fn report(
    battery: &str,
    at: &str,
    minutes: f64,
    cycles: f64,
    lifetime: f64,
    trips: impl Into<f64>,
) -> TelemetryRecord<'static> {
    let t = parse_timestamp(at).unwrap();
    TelemetryRecord {
        battery_id: battery.to_string().into(),
        vehicle_id: Some(format!("V-{battery}").into()),
        event_time: t,
        battery_age_days: (t / MILLIS_PER_DAY - 15_706),
        number_of_trips: trips.into(),
        daily_trip_duration: minutes,
        daily_cycles_used: cycles,
        lifetime_cycles_used: lifetime,
        battery_rated_cycles: 200.0,
        resting_voltage: Some(3.7),
        state_of_charge: None,
        temperature_c: None,
    }
}

fn batch(records: &[TelemetryRecord<'_>]) -> MicroBatch {
    let mut b = TelemetryBatchBuilder::with_capacity(records.len());
    records.iter().for_each(|r| b.append(r));
    let max = records.iter().map(|r| r.event_time).max();
    let rows = b.finish();
    MicroBatch {
        parts: vec![voltcast_ingest::PartitionRows {
            partition: (Arc::from("t"), 0),
            start: 0,
            len: rows.num_rows(),
        }],
        rows,
        positions: vec![SourcePosition {
            source: Arc::from("t"),
            partition: 0,
            first_offset: 0,
            next_offset: 1,
            max_event_time: max,
        }],
        dead_letters: 0,
        assigned: Vec::new(),
    }
}

/// Rows of closed batches for one battery: (day as YYYY-MM-DD, minutes, cycles, trips,
/// lifetime, imputed), rounded to 9 decimals.
fn series(batches: &[RecordBatch], battery: &str) -> Vec<(String, f64, f64, f64, f64, bool)> {
    let r9 = |v: f64| (v * 1e9).round() / 1e9;
    let mut out = Vec::new();
    for b in batches {
        let ids = b
            .column_by_name(daily::BATTERY_ID)
            .unwrap()
            .as_string::<i32>();
        let day = b
            .column_by_name(daily::DAY)
            .unwrap()
            .as_primitive::<Date32Type>();
        let f = |n| {
            b.column_by_name(n)
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone()
        };
        let (minutes, cycles, lifetime) = (f(daily::MINUTES), f(daily::CYCLES), f(daily::LIFETIME));
        let trips = f(daily::TRIPS);
        let imputed = b.column_by_name(daily::IMPUTED).unwrap().as_boolean();
        for i in 0..b.num_rows() {
            if ids.value(i) == battery {
                out.push((
                    voltcast_ingest::time::format_day(day.value(i) as i64),
                    r9(minutes.value(i)),
                    r9(cycles.value(i)),
                    r9(trips.value(i)),
                    r9(lifetime.value(i)),
                    imputed.value(i),
                ));
            }
        }
    }
    out
}

async fn run(
    batches: Vec<MicroBatch>,
) -> (
    DailyWindows,
    Vec<RecordBatch>,
    Vec<voltcast_ingest::DeadLetter>,
) {
    run_sharded(batches, 0).await
}

async fn run_sharded(
    batches: Vec<MicroBatch>,
    shards: usize,
) -> (
    DailyWindows,
    Vec<RecordBatch>,
    Vec<voltcast_ingest::DeadLetter>,
) {
    let config = WindowConfig {
        shards,
        ..Default::default()
    };
    let mut w = DailyWindows::new(config);
    let (mut closed, mut late) = (Vec::new(), Vec::new());
    for b in &batches {
        let out = w.apply(b, 0).unwrap();
        closed.extend(out.closed);
        late.extend(out.late);
    }
    closed.extend(w.close_all().unwrap());
    (w, closed, late)
}

#[tokio::test]
async fn twelve_hourly_reports_resample_to_daily_sums() {
    let (_, closed, _) = run(vec![batch(&[
        report("A", "2013-01-01T00:00:00Z", 30.0, 0.075, 0.075, 2),
        report("A", "2013-01-01T12:00:00Z", 40.0, 0.1, 0.175, 3),
        report("A", "2013-01-02T00:00:00Z", 10.0, 0.025, 0.2, 1),
        report("A", "2013-01-02T12:00:00Z", 20.0, 0.05, 0.25, 1),
    ])])
    .await;
    assert_eq!(
        series(&closed, "A"),
        vec![
            ("2013-01-01".into(), 70.0, 0.175, 5.0, 0.175, false),
            ("2013-01-02".into(), 30.0, 0.075, 2.0, 0.25, false),
        ]
    );
}

/// A resampled file splits a day's 3 trips into 1.5 and 1.5 (as pandas writes them): the
/// day keeps 3, and a lone half keeps 1.5 rather than losing the report.
#[tokio::test]
async fn fractional_trips_are_kept_and_summed() {
    let (_, closed, late) = run(vec![batch(&[
        report("A", "2013-01-01T00:00:00Z", 30.0, 0.075, 0.075, 1.5),
        report("A", "2013-01-01T12:00:00Z", 40.0, 0.1, 0.175, 1.5),
        report("A", "2013-01-02T12:00:00Z", 20.0, 0.05, 0.225, 1.5),
    ])])
    .await;
    assert!(late.is_empty());
    assert_eq!(
        series(&closed, "A"),
        vec![
            ("2013-01-01".into(), 70.0, 0.175, 3.0, 0.175, false),
            ("2013-01-02".into(), 20.0, 0.05, 1.5, 0.225, false),
        ]
    );
}

#[tokio::test]
async fn duplicates_count_once_within_and_across_batches() {
    let a1 = report("A", "2013-01-01", 60.0, 0.15, 0.15, 4);
    let a2 = report("A", "2013-01-02", 80.0, 0.2, 0.35, 5);
    let (w, closed, late) = run(vec![
        batch(&[a1.clone(), a1.clone(), a2.clone()]),
        batch(&[a2.clone(), a1.clone()]),
    ])
    .await;
    assert_eq!(
        series(&closed, "A"),
        vec![
            ("2013-01-01".into(), 60.0, 0.15, 4.0, 0.15, false),
            ("2013-01-02".into(), 80.0, 0.2, 5.0, 0.35, false)
        ]
    );
    assert_eq!(w.stats().duplicates, 3);
    assert!(late.is_empty());
}

#[tokio::test]
async fn a_three_day_gap_interpolates_linearly() {
    let (w, closed, _) = run(vec![batch(&[
        report("A", "2013-01-01", 40.0, 0.1, 10.1, 2),
        report("A", "2013-01-05", 120.0, 0.3, 10.8, 6),
    ])])
    .await;
    assert_eq!(
        series(&closed, "A"),
        vec![
            ("2013-01-01".into(), 40.0, 0.1, 2.0, 10.1, false),
            ("2013-01-02".into(), 60.0, 0.15, 3.0, 10.25, true),
            ("2013-01-03".into(), 80.0, 0.2, 4.0, 10.45, true),
            ("2013-01-04".into(), 100.0, 0.25, 5.0, 10.7, true),
            // Re-anchored to the car's own lifetime figure on the reported day.
            ("2013-01-05".into(), 120.0, 0.3, 6.0, 10.8, false),
        ]
    );
    assert_eq!(w.stats().days_imputed, 3);
}

#[tokio::test]
async fn a_record_for_a_closed_day_is_dead_lettered_as_late() {
    // Lateness 36 h: a report on Jan 4 12:00 moves the watermark to Jan 3 00:00, closing
    // Jan 1 and Jan 2. Then a report for Jan 1 arrives.
    let mut w = DailyWindows::new(WindowConfig::default());
    let first = w
        .apply(
            &batch(&[
                report("A", "2013-01-01", 40.0, 0.1, 0.1, 2),
                report("A", "2013-01-04T12:00:00Z", 40.0, 0.1, 0.2, 2),
            ]),
            0,
        )
        .unwrap();
    let closed = series(&first.closed.into_iter().collect::<Vec<_>>(), "A");
    assert_eq!(
        closed.len(),
        1,
        "only Jan 1 had data among the closed days: {closed:?}"
    );
    let late_row = report("B", "2013-01-01T18:00:00Z", 10.0, 0.02, 0.02, 1);
    let second = w.apply(&batch(std::slice::from_ref(&late_row)), 0).unwrap();
    assert_eq!(second.late.len(), 1);
    let dl = &second.late[0];
    assert_eq!(dl.reason, RejectReason::Late);
    assert!(dl.detail.contains("2013-01-01"), "{}", dl.detail);
    let payload: serde_json::Value = serde_json::from_slice(&dl.payload).unwrap();
    assert_eq!(payload["battery_id"], "B");
    assert_eq!(payload["daily_cycles_used"], 0.02);
    assert_eq!(w.stats().late, 1);
}

#[tokio::test]
async fn rolling_means_cover_the_trailing_week() {
    let records: Vec<_> = (0..10)
        .map(|d| {
            let day = voltcast_ingest::time::format_day(15_706 + d);
            report("A", &day, 10.0, (d + 1) as f64 * 0.01, 0.0, 1)
        })
        .collect();
    let (w, closed, _) = run(vec![batch(&records)]).await;
    // The watermark closes days 1-7 with the batch; close_all closes days 8-10.
    assert_eq!(
        closed.iter().map(|b| b.num_rows()).collect::<Vec<_>>(),
        vec![7, 3]
    );
    let b = closed.last().unwrap();
    let m7 = b
        .column_by_name(daily::MEAN_7D)
        .unwrap()
        .as_primitive::<Float64Type>();
    let m30 = b
        .column_by_name(daily::MEAN_30D)
        .unwrap()
        .as_primitive::<Float64Type>();
    // Day 10 (cycles 0.10): mean of 0.04..0.10 over 7 days, and of 0.01..0.10 over 10.
    let last = b.num_rows() - 1;
    assert!((m7.value(last) - 0.07).abs() < 1e-6, "{}", m7.value(last));
    assert!(
        (m30.value(last) - 0.055).abs() < 1e-6,
        "{}",
        m30.value(last)
    );
    assert!(!m7.is_null(0));
    // The stream's incremental means agree with DataFusion window functions over the
    // histories, whose half floats keep 11 significant bits.
    let sql = w.rolling_means_sql(b).await.unwrap();
    assert_eq!(sql.len(), b.num_rows());
    let close = |a: f64, b: f64| (a - b).abs() <= b.abs() * 2f64.powi(-11);
    for (i, (s7, s30)) in sql.iter().enumerate() {
        assert!(
            close(*s7, m7.value(i)) && close(*s30, m30.value(i)),
            "row {i}: {s7} {s30} against {} {}",
            m7.value(i),
            m30.value(i)
        );
    }
}

#[tokio::test]
async fn shards_on_their_own_threads_close_the_same_days_as_one() {
    // 400 batteries x 30 days with a duplicate and a 12-hourly pair every few rows, fed
    // in batches of 15 days (over 4,096 rows: each shard runs on its own thread).
    let ids: Vec<String> = (0..400).map(|b| format!("B{b:04}")).collect();
    let mut batches = Vec::new();
    for half in 0..2 {
        let mut records = Vec::new();
        for d in half * 15..(half + 1) * 15 {
            let day = voltcast_ingest::time::format_day(15_706 + d);
            for (b, id) in ids.iter().enumerate() {
                let cycles = 0.1 + (b % 7) as f64 * 0.01 + d as f64 * 0.001;
                let r = report(id, &day, 40.0, cycles, cycles * (d + 1) as f64, 3);
                if (b + d as usize).is_multiple_of(5) {
                    records.push(r.clone());
                }
                if (b + d as usize).is_multiple_of(11) {
                    let mut noon = report(id, &format!("{day}T12:00:00Z"), 5.0, 0.01, 0.0, 1);
                    noon.lifetime_cycles_used = r.lifetime_cycles_used;
                    records.push(noon);
                }
                records.push(r);
            }
        }
        batches.push(batch(&records));
    }
    assert!(batches.iter().all(|b| b.rows.num_rows() > 4_096));
    let (one, one_closed, _) = run_sharded(batches.clone(), 1).await;
    let (three, three_closed, _) = run_sharded(batches, 3).await;
    assert_eq!(one.state().shards.len(), 1);
    assert_eq!(three.state().shards.len(), 3);
    assert!(
        three.state().shards.iter().all(|s| s.fleet.len() > 50),
        "every shard holds batteries"
    );
    assert_eq!(three.state().battery_count(), 400);
    assert_eq!(one.stats(), three.stats());
    assert!(one.stats().duplicates > 1_000, "{:?}", one.stats());
    for id in &ids {
        let want = series(&one_closed, id);
        assert_eq!(want.len(), 30, "{id}");
        assert_eq!(series(&three_closed, id), want, "{id}");
    }
}

#[tokio::test]
async fn a_battery_moved_to_another_vehicle_is_reported_with_the_new_one() {
    let mut first = report("A", "2013-01-01", 60.0, 0.15, 0.15, 4);
    let mut second = report("A", "2013-01-02", 60.0, 0.15, 0.30, 4);
    first.vehicle_id = Some("V-1".into());
    second.vehicle_id = Some("V-2".into());
    let (w, closed, _) = run(vec![batch(&[first]), batch(&[second])]).await;
    let vehicles: Vec<Option<String>> = closed
        .iter()
        .flat_map(|b| {
            let v = b
                .column_by_name(daily::VEHICLE_ID)
                .unwrap()
                .as_string::<i32>();
            (0..b.num_rows())
                .map(|i| v.is_valid(i).then(|| v.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(vehicles.last(), Some(&Some("V-2".to_string())));
    let battery = w.state().battery("A").unwrap();
    assert_eq!(battery.vehicle.map(|v| &**v), Some("V-2"));
}

/// The stream's path: one partition's rows with its position.
fn apply_partition(
    w: &mut DailyWindows,
    records: &[TelemetryRecord<'_>],
) -> voltcast_scoring::windows::WindowOutput {
    let b = batch(records);
    w.apply_partition(&b.rows, &b.positions[0], 0).unwrap()
}

#[tokio::test]
async fn one_battery_with_a_clock_a_day_ahead_does_not_close_the_fleets_day() {
    // Jan 3 10:00: the fleet has reported up to now; battery X's clock is 26 h ahead
    // (reports up to 24 h in the future pass validation against a skewed receiver).
    // Its Jan 4 12:00 alone would put the watermark (minus 36 h) at Jan 3 00:00 and close
    // Jan 2 while A's on-time report for Jan 2 evening is still on its way.
    let mut w = DailyWindows::new(WindowConfig::default());
    let out = apply_partition(
        &mut w,
        &[
            report("A", "2013-01-03T10:00:00Z", 40.0, 0.1, 0.3, 2),
            report("B", "2013-01-03T10:00:00Z", 40.0, 0.1, 0.3, 2),
            report("X", "2013-01-04T12:00:00Z", 40.0, 0.1, 0.3, 2),
            report("C", "2013-01-03T10:00:00Z", 40.0, 0.1, 0.3, 2),
        ],
    );
    assert!(
        out.closed.iter().all(|b| b.num_rows() == 0),
        "nothing closes"
    );
    let out = apply_partition(
        &mut w,
        &[report("A", "2013-01-02T23:00:00Z", 10.0, 0.02, 0.25, 1)],
    );
    assert!(out.late.is_empty(), "A's Jan 2 report is on time");
    assert_eq!(w.stats().late, 0);

    // Once three batteries have reached Jan 4 12:00 the fleet has, and Jan 2 closes.
    let out = apply_partition(
        &mut w,
        &[
            report("A", "2013-01-04T12:00:00Z", 40.0, 0.1, 0.4, 2),
            report("B", "2013-01-04T12:00:00Z", 40.0, 0.1, 0.4, 2),
        ],
    );
    let closed = series(&out.closed, "A");
    assert_eq!(
        closed.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["2013-01-02"],
        "{closed:?}"
    );
    let out = apply_partition(
        &mut w,
        &[report("C", "2013-01-02T22:00:00Z", 10.0, 0.02, 0.25, 1)],
    );
    assert_eq!(out.late.len(), 1, "now Jan 2 has closed");
}

/// Batch scoring closes its input's days into the histories without making their rows:
/// the histories (gaps imputed, copies dropped) and the counts are those of a close that
/// makes them.
#[tokio::test]
async fn closing_into_the_histories_alone_keeps_what_closing_with_rows_keeps() {
    let records = [
        report("A", "2013-01-01T00:00:00Z", 30.0, 0.075, 0.075, 2),
        report("A", "2013-01-01T00:00:00Z", 30.0, 0.075, 0.075, 2),
        report("A", "2013-01-01T12:00:00Z", 40.0, 0.1, 0.175, 3),
        report("B", "2013-01-01T08:00:00Z", 50.0, 0.125, 0.125, 4),
        report("A", "2013-01-04T00:00:00Z", 10.0, 0.025, 0.2, 1),
        report("B", "2013-01-02T08:00:00Z", 20.0, 0.05, 0.175, 1),
    ];
    let histories = |w: &DailyWindows| {
        let mut all: Vec<(String, Vec<_>)> = w
            .state()
            .batteries()
            .map(|b| (b.id.to_string(), b.history.days().collect()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    };
    let (mut with_rows, mut without) = (
        DailyWindows::new(WindowConfig::default()),
        DailyWindows::new(WindowConfig::default()),
    );
    let count = |rows: &[RecordBatch]| rows.iter().map(|r| r.num_rows()).sum::<usize>();
    let mut before_the_end = 0;
    for w in [&mut with_rows, &mut without] {
        before_the_end = count(&w.apply(&batch(&records), 0).unwrap().closed);
    }
    let at_the_end = count(&with_rows.close_all().unwrap());
    without.close_all_into_histories().unwrap();
    assert!(at_the_end > 0, "the end closes days");
    assert_eq!(histories(&without), histories(&with_rows));
    assert_eq!(
        histories(&without)[0].1.len(),
        4,
        "A's two missing days imputed"
    );
    assert_eq!(without.stats(), with_rows.stats());
    let stats = without.stats();
    assert_eq!(stats.days_closed, (before_the_end + at_the_end) as u64);
    assert_eq!(
        (stats.days_closed, stats.days_imputed, stats.duplicates),
        (6, 2, 1)
    );
}
