//! Prometheus metrics, named by Prometheus conventions: `voltcast_` prefix, `_total` for
//! counters, base units (`_seconds`). Labels are bounded sets (reason, model, severity,
//! outcome, partition); the only per-battery label is the top-K at-risk gauge, whose K
//! is configured, so a fleet of millions cannot blow up the series count.
//!
//! Counters the stages already keep as atomics (ingest counts, window stats) are copied
//! in at scrape time by [`Metrics::refresh`] rather than counted twice on the hot path.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use voltcast_ingest::{IngestCounters, RejectReason};

use crate::forecasting::RiskUpdate;
use voltcast_forecaster::ModelKind;

/// Upper bounds of the days-to-end-of-life histogram.
pub const EOL_BUCKETS: [f64; 9] = [7.0, 14.0, 30.0, 60.0, 90.0, 180.0, 365.0, 730.0, 1825.0];

pub struct Metrics {
    pub registry: Registry,
    pub records_consumed: IntCounter,
    pub records_decoded: IntCounter,
    pub records_dead_lettered: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub batch_rows: Histogram,
    pub batch_seconds: Histogram,
    pub windows_closed: IntCounter,
    pub days_imputed: IntCounter,
    pub late_records: IntCounter,
    pub duplicate_records: IntCounter,
    pub batteries_tracked: IntGauge,
    pub forecast_fits: IntCounterVec,
    pub fit_seconds: HistogramVec,
    pub model_selections: IntCounterVec,
    pub risk_updates: IntCounter,
    pub batteries_at_risk: IntGauge,
    pub top_at_risk: IntGaugeVec,
    pub fleet_daily_cycles: prometheus::Gauge,
    pub alerts_raised: IntCounterVec,
    pub alerts_resolved: IntCounterVec,
    pub alerts_acknowledged: IntCounter,
    pub alert_acks_applied: IntCounter,
    pub alert_events_published: IntCounterVec,
    pub webhook_deliveries: IntCounterVec,
    pub outbox_depth: IntGauge,
    pub checkpoint_seconds: Histogram,
    pub source_offsets_skipped: IntCounter,
    pub batteries_evicted: IntCounter,
    days_to_eol: DaysToEol,
    top_k: usize,
    /// What was last copied from the stages' own counters.
    copied: Mutex<Copied>,
}

#[derive(Default)]
struct Copied {
    received: u64,
    decoded: u64,
    rejected: Vec<u64>,
    windows: crate::windows::WindowStats,
}

/// Registers `c` and hands it back. The names are fixed in this file, so a clash or an
/// invalid name is a bug here, caught by any test that builds `Metrics`.
fn registered<C: Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    registered(r, IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    registered(r, IntGauge::new(name, help).expect("valid metric"))
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets));
    registered(r, h.expect("valid metric"))
}

impl Metrics {
    pub fn new(top_k: usize) -> Self {
        let r = Registry::new();
        let seconds = prometheus::exponential_buckets(0.000_1, 4.0, 10).expect("buckets");
        let fit_seconds = registered(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "voltcast_forecast_fit_duration_seconds",
                    "Time to select and fit a battery's model, by the kind chosen.",
                )
                .buckets(seconds.clone()),
                &["model"],
            )
            .expect("valid metric"),
        );
        let top_at_risk = registered(
            &r,
            IntGaugeVec::new(
            Opts::new(
                "voltcast_top_at_risk_days_to_eol",
                "Days to expected end of life of the K batteries most likely to fail (K = metrics.top_k).",
            ),
            &["battery_id", "vehicle_id"],
        )
            .expect("valid metric"),
        );
        let consumer_lag = registered(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "voltcast_consumer_lag_records",
                    "Records between the consumer's position and the partition's end.",
                ),
                &["topic", "partition"],
            )
            .expect("valid metric"),
        );
        let fleet_daily_cycles = registered(
            &r,
            prometheus::Gauge::new(
                "voltcast_fleet_daily_cycles",
                "Sum over batteries of the cycles used on each battery's latest closed day.",
            )
            .expect("valid metric"),
        );
        let days_to_eol = registered(&r, DaysToEol::default());
        let m = Self {
            records_consumed: counter(
                &r,
                "voltcast_records_consumed_total",
                "Messages read from the source, good or bad.",
            ),
            records_decoded: counter(
                &r,
                "voltcast_records_decoded_total",
                "Records that passed decoding and validation.",
            ),
            records_dead_lettered: counter_vec(
                &r,
                "voltcast_records_dead_lettered_total",
                "Records sent to the dead-letter topic, by reason.",
                &["reason"],
            ),
            consumer_lag,
            batch_rows: histogram(
                &r,
                "voltcast_micro_batch_rows",
                "Rows per micro-batch.",
                prometheus::exponential_buckets(1.0, 4.0, 10).expect("buckets"),
            ),
            batch_seconds: histogram(
                &r,
                "voltcast_micro_batch_duration_seconds",
                "Time the window stage spent on a micro-batch.",
                seconds.clone(),
            ),
            windows_closed: counter(
                &r,
                "voltcast_windows_closed_total",
                "Battery-days closed by the window stage (imputed ones included).",
            ),
            days_imputed: counter(
                &r,
                "voltcast_days_imputed_total",
                "Missing battery-days filled by interpolation.",
            ),
            late_records: counter(
                &r,
                "voltcast_late_records_total",
                "Records that arrived after their day closed (dead-lettered as late).",
            ),
            duplicate_records: counter(
                &r,
                "voltcast_duplicate_records_total",
                "Exact duplicate reports dropped.",
            ),
            batteries_tracked: gauge(
                &r,
                "voltcast_batteries_tracked",
                "Batteries with state in the window stage.",
            ),
            forecast_fits: counter_vec(
                &r,
                "voltcast_forecast_fits_total",
                "Model fits (daily updates and full selections), by model kind.",
                &["model"],
            ),
            fit_seconds,
            model_selections: counter_vec(
                &r,
                "voltcast_model_selections_total",
                "Batteries whose current model is of this kind, counted at each selection.",
                &["model"],
            ),
            risk_updates: counter(
                &r,
                "voltcast_risk_updates_total",
                "Failure-risk assessments made.",
            ),
            batteries_at_risk: gauge(
                &r,
                "voltcast_batteries_at_risk",
                "Batteries whose latest risk is at or above the alert probability.",
            ),
            top_at_risk,
            fleet_daily_cycles,
            alerts_raised: counter_vec(
                &r,
                "voltcast_alerts_raised_total",
                "Alerts raised (escalations included), by severity.",
                &["severity"],
            ),
            alerts_resolved: counter_vec(
                &r,
                "voltcast_alerts_resolved_total",
                "Alerts resolved, by reason.",
                &["reason"],
            ),
            alerts_acknowledged: counter(
                &r,
                "voltcast_alerts_acknowledged_total",
                "Alerts acknowledged (service booked).",
            ),
            alert_acks_applied: counter(
                &r,
                "voltcast_alert_acks_applied_total",
                "Acknowledgements (taken by any instance) applied to the episode by the partition owning the battery.",
            ),
            alert_events_published: counter_vec(
                &r,
                "voltcast_alert_events_published_total",
                "Alert events sent to the alerts topic, by outcome.",
                &["outcome"],
            ),
            webhook_deliveries: counter_vec(
                &r,
                "voltcast_webhook_deliveries_total",
                "Webhook attempts, by outcome (delivered, retried, dead_lettered, no_vehicle).",
                &["outcome"],
            ),
            outbox_depth: gauge(
                &r,
                "voltcast_outbox_depth",
                "Webhook deliveries waiting in the outbox.",
            ),
            checkpoint_seconds: histogram(
                &r,
                "voltcast_checkpoint_duration_seconds",
                "Time to write a checkpoint.",
                prometheus::exponential_buckets(0.001, 4.0, 9).expect("buckets"),
            ),
            batteries_evicted: counter(
                &r,
                "voltcast_batteries_evicted_total",
                "Batteries forgotten (state, model, alert episode, API) after windows.retention_days without a report.",
            ),
            source_offsets_skipped: counter(
                &r,
                "voltcast_source_offsets_skipped_total",
                "Offsets a partition's records jumped over: records that never arrived \
                 (0 unless the topic is transactional or compacted, or the broker lost them).",
            ),
            days_to_eol,
            top_k,
            copied: Mutex::default(),
            registry: r,
        };
        m.zero_known_labels();
        m
    }

    /// Every series of a bounded label set exists from the start at 0, so dashboards
    /// and alert rules see 0 rather than "no data" before the first event.
    fn zero_known_labels(&self) {
        for reason in RejectReason::ALL {
            self.records_dead_lettered
                .with_label_values(&[reason.as_str()]);
        }
        let kinds = ModelKind::CANDIDATES
            .into_iter()
            .chain([ModelKind::AutoEts, ModelKind::Mean]);
        for model in kinds.map(ModelKind::name) {
            self.forecast_fits.with_label_values(&[model]);
            self.model_selections.with_label_values(&[model]);
            self.fit_seconds.with_label_values(&[model]);
        }
        for severity in ["warning", "critical"] {
            self.alerts_raised.with_label_values(&[severity]);
        }
        for reason in ["replaced", "risk_fell", "silent"] {
            self.alerts_resolved.with_label_values(&[reason]);
        }
        for outcome in ["published", "failed"] {
            self.alert_events_published.with_label_values(&[outcome]);
        }
        for outcome in ["delivered", "retried", "dead_lettered", "no_vehicle"] {
            self.webhook_deliveries.with_label_values(&[outcome]);
        }
    }

    /// Copies the ingest counters in (they are atomics on the hot path).
    pub fn refresh_ingest(&self, c: &IngestCounters) {
        let mut copied = self.copied.lock().unwrap_or_else(|e| e.into_inner());
        let add = |counter: &IntCounter, now: u64, before: &mut u64| {
            counter.inc_by(now.saturating_sub(*before));
            *before = now.max(*before);
        };
        add(&self.records_consumed, c.received(), &mut copied.received);
        add(&self.records_decoded, c.decoded(), &mut copied.decoded);
        copied.rejected.resize(RejectReason::ALL.len(), 0);
        for (i, reason) in RejectReason::ALL.iter().enumerate() {
            let c = c.rejected(*reason);
            let counter = self
                .records_dead_lettered
                .with_label_values(&[reason.as_str()]);
            add(&counter, c, &mut copied.rejected[i]);
        }
        for ((topic, partition), lag) in c.lag() {
            self.consumer_lag
                .with_label_values(&[topic.as_str(), &partition.to_string()])
                .set(lag);
        }
    }

    /// Copies the window stage's statistics in.
    pub fn refresh_windows(&self, w: &crate::windows::WindowStats, batteries: usize) {
        let mut copied = self.copied.lock().unwrap_or_else(|e| e.into_inner());
        let before = &mut copied.windows;
        self.windows_closed
            .inc_by(w.days_closed.saturating_sub(before.days_closed));
        self.days_imputed
            .inc_by(w.days_imputed.saturating_sub(before.days_imputed));
        self.duplicate_records
            .inc_by(w.duplicates.saturating_sub(before.duplicates));
        self.late_records.inc_by(w.late.saturating_sub(before.late));
        self.batteries_evicted
            .inc_by(w.evicted.saturating_sub(before.evicted));
        *before = w.clone();
        self.batteries_tracked.set(batteries as i64);
    }

    /// Recomputes the fleet gauges from every battery's latest assessment.
    pub fn refresh_fleet<'a>(&self, latest: impl Iterator<Item = &'a RiskUpdate>) {
        let mut at_risk = 0;
        let mut cycles = 0.0;
        let mut snapshot = EolSnapshot::default();
        let mut top: Vec<&RiskUpdate> = Vec::new();
        for u in latest {
            at_risk += i64::from(u.risk.at_risk);
            cycles += u.recent.last().map_or(0.0, |d| f64::from(d[0]));
            snapshot.observe(u.risk.days_to_eol);
            top.push(u);
        }
        // The K most at risk without sorting the fleet: this runs under the store's lock,
        // which every batch's alert decisions wait on. Ties go by id, so a scrape shows
        // the same K whatever the map's order.
        let most_at_risk = |a: &&RiskUpdate, b: &&RiskUpdate| {
            b.risk
                .probability
                .total_cmp(&a.risk.probability)
                .then_with(|| a.battery_id.cmp(&b.battery_id))
        };
        if top.len() > self.top_k && self.top_k > 0 {
            top.select_nth_unstable_by(self.top_k - 1, most_at_risk);
            top.truncate(self.top_k);
        }
        top.sort_unstable_by(most_at_risk);
        self.batteries_at_risk.set(at_risk);
        self.fleet_daily_cycles.set(cycles);
        *self.days_to_eol.0.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        self.top_at_risk.reset();
        for u in top
            .iter()
            .take(self.top_k)
            .filter(|u| u.risk.probability > 0.0)
        {
            let days = u.risk.days_to_eol.map_or(-1, i64::from);
            self.top_at_risk
                .with_label_values(&[&*u.battery_id, u.vehicle_id.as_deref().unwrap_or("")])
                .set(days);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("metrics encode");
        String::from_utf8(buf).expect("metrics are UTF-8")
    }
}

/// The fleet's days to end of life right now, as a histogram rebuilt at each refresh
/// (a prometheus `Histogram` only accumulates; this is a distribution of current state).
#[derive(Clone, Default)]
struct DaysToEol(std::sync::Arc<Mutex<EolSnapshot>>);

#[derive(Default, Clone)]
struct EolSnapshot {
    buckets: [u64; EOL_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl EolSnapshot {
    fn observe(&mut self, days: Option<u32>) {
        // Beyond the cap counts in +Inf only, with the cap as its value in the sum.
        let d = days.map_or(EOL_BUCKETS[EOL_BUCKETS.len() - 1] + 1.0, f64::from);
        for (b, le) in self.buckets.iter_mut().zip(EOL_BUCKETS) {
            *b += u64::from(d <= le);
        }
        self.count += 1;
        self.sum += d;
    }
}

const EOL_NAME: &str = "voltcast_battery_days_to_eol";
const EOL_HELP: &str = "Batteries by days to expected end of life, as of their latest assessment.";

impl Collector for DaysToEol {
    fn desc(&self) -> Vec<&Desc> {
        static DESC: std::sync::LazyLock<Desc> = std::sync::LazyLock::new(|| {
            Desc::new(EOL_NAME.into(), EOL_HELP.into(), vec![], Default::default())
                .expect("valid metric")
        });
        vec![&DESC]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut h = proto::Histogram::default();
        h.set_sample_count(s.count);
        h.set_sample_sum(s.sum);
        let buckets = s
            .buckets
            .iter()
            .zip(EOL_BUCKETS)
            .map(|(n, le)| {
                let mut b = proto::Bucket::default();
                b.set_cumulative_count(*n);
                b.set_upper_bound(le);
                b
            })
            .collect();
        h.set_bucket(buckets);
        let mut m = proto::Metric::default();
        m.set_histogram(h);
        let mut f = MetricFamily::default();
        f.set_name(EOL_NAME.into());
        f.set_help(EOL_HELP.into());
        f.set_field_type(proto::MetricType::HISTOGRAM);
        f.mut_metric().push(m);
        vec![f]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use voltcast_forecaster::{FailureRisk, ModelKind};

    use super::*;

    fn assessed(battery: &str, probability: f64, days: u32) -> RiskUpdate {
        RiskUpdate {
            battery_id: Arc::from(battery),
            vehicle_id: None,
            day: 0,
            age: 100,
            lifetime: 10.0,
            rated: 200.0,
            model: ModelKind::AutoEts,
            model_version: 1,
            risk: FailureRisk {
                probability,
                expected_cycles: 1.0,
                sd_cycles: 0.1,
                remaining: 190.0,
                days_to_eol: Some(days),
                low_confidence: false,
                at_risk: probability >= 0.9,
            },
            forecast: Default::default(),
            recent: Default::default(),
            drivers: Default::default(),
        }
    }

    #[test]
    fn the_top_at_risk_gauge_holds_the_k_most_likely_to_fail() {
        let m = Metrics::new(3);
        // 50 batteries, probabilities 0.00 .. 0.98 in a scrambled order.
        let fleet: Vec<_> = (0..50)
            .map(|i| (i * 17) % 50)
            .map(|i| assessed(&format!("B{i:02}"), i as f64 / 50.0, 100 - i))
            .collect();
        m.refresh_fleet(fleet.iter());
        let text = m.render();
        let shown: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("voltcast_top_at_risk_days_to_eol{"))
            .collect();
        assert_eq!(shown.len(), 3, "{shown:?}");
        for (id, days) in [("B49", 51), ("B48", 52), ("B47", 53)] {
            assert!(
                shown
                    .iter()
                    .any(|l| l.contains(&format!("battery_id=\"{id}\""))
                        && l.ends_with(&format!(" {days}"))),
                "{id} in {shown:?}"
            );
        }
        assert!(text.contains("voltcast_batteries_at_risk 5"), "{text}");
    }
}
