//! The fleet simulator: telemetry shaped like the reference data set, with its defects.
//!
//! Each battery has a usage level (minutes per day) modulated by a weekly profile and a
//! season, and a cycles-per-minute ratio that drifts upward with age (the reference's
//! ~406 minutes per cycle when new). Starting ages are spread so that some batteries cross
//! their rating during a run. Defects come at configurable rates: 12-hourly stretches,
//! exact duplicates, missing days, and a few malformed messages whose expected
//! dead-letter reason is known, so tests can check every refusal.
//!
//! Ground truth (noise-free expected cycles per battery-day, the day each battery crosses
//! its rating) is returned beside the telemetry, never inside it.

use std::f64::consts::TAU;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal};
use serde::{Deserialize, Serialize};

use crate::mutate::{MessageMutator, Mutation};
use crate::record::TelemetryRecord;
use crate::reject::RejectReason;
use crate::time::{EpochMillis, MILLIS_PER_DAY, parse_timestamp};

/// Minutes of driving per cycle of a new battery in the reference data.
pub const MINUTES_PER_CYCLE_NEW: f64 = 406.45;

/// `[simulator]` in the config file, and the flags of `voltcast simulate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    pub batteries: usize,
    pub days: u32,
    pub seed: u64,
    /// First simulated day, `YYYY-MM-DD`.
    pub start_date: String,
    /// Share of battery-days reported as two 12-hourly rows.
    pub twelve_hourly_rate: f64,
    /// Share of reports sent twice.
    pub duplicate_rate: f64,
    /// Share of battery-days with no report.
    pub missing_day_rate: f64,
    /// Malformed messages per valid report.
    pub malformed_rate: f64,
    /// Seasons of driving: each battery's amplitude is drawn up to this (0.25: some drive
    /// a quarter more at the peak).
    pub season_amplitude_max: f64,
    /// The season peaks in winter for every battery (the reference's fleet), instead of
    /// at a random time of year.
    pub winter_peak: bool,
    /// Usage regime changes (a new driver: the day's minutes shift by a random factor)
    /// per battery-year.
    pub regime_changes_per_year: f64,
    /// Battery replacements (age, lifetime and cycles per minute start again) per
    /// battery-year, and always shortly after a battery passes its rating.
    pub replacements_per_year: f64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            batteries: 1000,
            days: 60,
            seed: 42,
            start_date: "2024-01-01".into(),
            twelve_hourly_rate: 0.05,
            duplicate_rate: 0.02,
            missing_day_rate: 0.02,
            malformed_rate: 0.002,
            season_amplitude_max: 0.2,
            winter_peak: false,
            regime_changes_per_year: 0.0,
            replacements_per_year: 0.0,
        }
    }
}

impl SimulatorConfig {
    /// The fleet the forecast evaluation needs beside the default one: winter driving up
    /// to 25% heavier, usage regimes that change (about one battery in three a year) and
    /// batteries replaced (one in twenty a year, and those past their rating).
    pub fn with_seasons(mut self) -> Self {
        self.season_amplitude_max = 0.25;
        self.winter_peak = true;
        self.regime_changes_per_year = 0.3;
        self.replacements_per_year = 0.05;
        self
    }
}

#[derive(Debug, thiserror::Error)]
#[error("simulator.{key}: {problem}")]
pub struct SimulatorConfigError {
    pub key: &'static str,
    pub problem: String,
}

impl SimulatorConfig {
    pub fn validate(&self) -> Result<EpochMillis, SimulatorConfigError> {
        let rate = |key, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(SimulatorConfigError {
                    key,
                    problem: format!("{v} is not a rate in [0, 1)"),
                })
            }
        };
        rate("twelve_hourly_rate", self.twelve_hourly_rate)?;
        rate("duplicate_rate", self.duplicate_rate)?;
        rate("missing_day_rate", self.missing_day_rate)?;
        rate("malformed_rate", self.malformed_rate)?;
        let per_year = |key, v: f64| {
            if (0.0..=365.0).contains(&v) {
                Ok(())
            } else {
                Err(SimulatorConfigError {
                    key,
                    problem: format!("{v} is not a number of events per year in [0, 365]"),
                })
            }
        };
        per_year("regime_changes_per_year", self.regime_changes_per_year)?;
        per_year("replacements_per_year", self.replacements_per_year)?;
        if !(0.0..1.0).contains(&self.season_amplitude_max) {
            return Err(SimulatorConfigError {
                key: "season_amplitude_max",
                problem: format!("{} is not in [0, 1)", self.season_amplitude_max),
            });
        }
        if self.batteries == 0 {
            return Err(SimulatorConfigError {
                key: "batteries",
                problem: "must be at least 1".into(),
            });
        }
        parse_timestamp(&self.start_date).ok_or_else(|| SimulatorConfigError {
            key: "start_date",
            problem: format!("{:?} is not a YYYY-MM-DD date", self.start_date),
        })
    }
}

/// One message as it goes on the wire.
#[derive(Debug, Clone)]
pub struct SimMessage {
    /// The battery id (Kafka key), also for malformed messages.
    pub key: String,
    pub payload: Vec<u8>,
    /// For a malformed message, the reason voltcast must give when refusing it.
    pub defect: Option<RejectReason>,
    /// The valid report this message carries, if any (duplicates carry theirs too).
    pub record: Option<TelemetryRecord<'static>>,
}

/// One battery-day as it truly was.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TruthRow {
    pub battery_id: String,
    pub date: String,
    /// Noise-free expectation of the day's cycles: the best any forecast can do.
    pub expected_cycles: f64,
    pub actual_cycles: f64,
    pub lifetime_cycles: f64,
    pub rated_cycles: f64,
    /// True on the first day lifetime cycles exceed the rating.
    pub crosses_rating: bool,
    /// False when the day went unreported (a missing day).
    pub reported: bool,
    /// Usage regime changes and battery replacements so far. The noise-free expectation
    /// knows of a change on the day it happens; a forecast made before it cannot.
    pub usage_changes: u32,
}

/// A day of fleet telemetry.
pub struct SimDay {
    pub day: i64,
    pub messages: Vec<SimMessage>,
    pub truth: Vec<TruthRow>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WireFormat {
    Json,
    Csv,
}

/// The CSV header the simulator writes: the reference names verbatim, then extras.
pub const CSV_HEADER: &str = "Date,Battery_ID,Vehicle_ID,Battery_Age_Days,Number_Of_Trips,Daily_Trip_Duration,Daily_Cycles_Used,Lifetime_Cycles_Used,Battery_Rated_Cycles,Resting_Voltage,State_Of_Charge,Temperature_C";

struct Battery {
    id: String,
    vehicle: String,
    rated: f64,
    age: i64,
    lifetime: f64,
    minutes_per_day: f64,
    weekly: [f64; 7],
    season_amplitude: f64,
    season_phase: f64,
    minutes_per_cycle_new: f64,
    /// Relative rise of cycles per minute per year of age.
    drift_per_year: f64,
    minutes_per_trip: f64,
    twelve_hourly: bool,
    missing: bool,
    crossed: bool,
    /// Regime changes and replacements so far (truth only).
    changes: u32,
}

impl Battery {
    /// A new battery in the same vehicle, under the same id (as the reference's data
    /// shows a replacement: age and lifetime start again).
    fn replace(&mut self, rng: &mut StdRng) {
        self.age = 0;
        self.lifetime = 0.0;
        self.crossed = false;
        self.minutes_per_cycle_new = MINUTES_PER_CYCLE_NEW * rng.random_range(0.9..1.1);
    }

    fn cycles_per_minute(&self) -> f64 {
        (1.0 + self.drift_per_year * self.age as f64 / 365.0) / self.minutes_per_cycle_new
    }

    fn expected_minutes(&self, day: i64) -> f64 {
        let dow = (day + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
        let season =
            1.0 + self.season_amplitude * (TAU * (day as f64 / 365.25) + self.season_phase).sin();
        self.minutes_per_day * self.weekly[dow] * season
    }
}

pub struct FleetSimulator {
    config: SimulatorConfig,
    format: WireFormat,
    rng: StdRng,
    batteries: Vec<Battery>,
    first_day: i64,
    next: u32,
    noise: LogNormal<f64>,
    render: bool,
    /// Damages every payload, for fuzzing ([`Self::with_mutator`]).
    mutator: Option<MessageMutator>,
    /// How many payloads each mutation damaged so far.
    mutations: std::collections::BTreeMap<Mutation, u64>,
}

impl FleetSimulator {
    pub fn new(config: SimulatorConfig, format: WireFormat) -> Result<Self, SimulatorConfigError> {
        let start = config.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let usage = LogNormal::new(60f64.ln(), 0.35).expect("valid");
        let batteries = (0..config.batteries)
            .map(|i| new_battery(i, &mut rng, &usage, &config))
            .collect();
        let sigma = 0.2;
        Ok(Self {
            format,
            rng,
            batteries,
            first_day: start.div_euclid(MILLIS_PER_DAY),
            next: 0,
            noise: LogNormal::new(-sigma * sigma / 2.0, sigma).expect("valid"),
            render: true,
            mutator: None,
            mutations: Default::default(),
            config,
        })
    }

    pub fn config(&self) -> &SimulatorConfig {
        &self.config
    }

    /// Records only, no wire payloads (benchmarks that start from decoded rows).
    pub fn without_payloads(mut self) -> Self {
        self.render = false;
        self
    }

    /// Every message's payload damaged by `mutator` (JSON only): a message then says
    /// nothing of what it carries (no record, no defect), only of how it was damaged
    /// ([`Self::mutations`]).
    pub fn with_mutator(mut self, mutator: MessageMutator) -> Self {
        self.mutator = Some(mutator);
        self
    }

    /// How many payloads each mutation damaged so far.
    pub fn mutations(&self) -> &std::collections::BTreeMap<Mutation, u64> {
        &self.mutations
    }

    /// The next day's messages (in report order) and truth, or None after the last day.
    pub fn next_day(&mut self) -> Option<SimDay> {
        if self.next >= self.config.days {
            return None;
        }
        let day = self.first_day + self.next as i64;
        self.next += 1;
        let mut messages = Vec::with_capacity(self.batteries.len() * 11 / 10);
        let mut duplicates = Vec::new();
        let mut truth = Vec::with_capacity(self.batteries.len());
        let c = &self.config;
        // Markov stretches: mean length L days, stationary share equal to the rate.
        let (start_12h, end_12h) = stretch_probabilities(c.twelve_hourly_rate, 10.0);
        let (start_missing, end_missing) = stretch_probabilities(c.missing_day_rate, 2.0);
        for b in &mut self.batteries {
            b.twelve_hourly = toggle(&mut self.rng, b.twelve_hourly, start_12h, end_12h);
            b.missing = toggle(&mut self.rng, b.missing, start_missing, end_missing);
            if c.regime_changes_per_year > 0.0
                && self.rng.random_bool(c.regime_changes_per_year / 365.0)
            {
                // A new driver: half to twice the minutes (log-uniform: as likely less as more).
                let factor = self.rng.random_range(-1.0f64..1.0).exp2();
                b.minutes_per_day = (b.minutes_per_day * factor).clamp(10.0, 300.0);
                b.changes += 1;
            }
            let replace = c.replacements_per_year > 0.0
                && (self.rng.random_bool(c.replacements_per_year / 365.0)
                    || (b.crossed && b.lifetime > b.rated * 1.05));
            if replace {
                b.replace(&mut self.rng);
                b.changes += 1;
            }
            let expected_minutes = b.expected_minutes(day);
            let ratio = b.cycles_per_minute();
            let minutes = expected_minutes * self.noise.sample(&mut self.rng);
            let cycles = minutes * ratio;
            b.lifetime += cycles;
            let crosses = !b.crossed && b.lifetime > b.rated;
            b.crossed |= crosses;
            truth.push(TruthRow {
                battery_id: b.id.clone(),
                date: crate::time::format_day(day),
                expected_cycles: expected_minutes * ratio,
                actual_cycles: cycles,
                lifetime_cycles: b.lifetime,
                rated_cycles: b.rated,
                crosses_rating: crosses,
                reported: !b.missing,
                usage_changes: b.changes,
            });
            if !b.missing {
                let trips = ((minutes / b.minutes_per_trip).round() as i64).max(1);
                let parts: &[(f64, i64)] = if b.twelve_hourly {
                    let share = self.rng.random_range(0.3..0.7);
                    &[(share, 0), (1.0 - share, MILLIS_PER_DAY / 2)]
                } else {
                    &[(1.0, 0)]
                };
                let mut lifetime = b.lifetime - cycles;
                let mut trips_left = trips;
                for (i, (share, at)) in parts.iter().enumerate() {
                    let part_trips = if i + 1 == parts.len() {
                        trips_left
                    } else {
                        (trips as f64 * share).round() as i64
                    };
                    trips_left -= part_trips;
                    lifetime += cycles * share;
                    // Cars report with finite precision, as the reference data does (8-9
                    // decimals); full f64 digits would make messages a third larger.
                    let record = TelemetryRecord {
                        battery_id: b.id.clone().into(),
                        vehicle_id: Some(b.vehicle.clone().into()),
                        event_time: day * MILLIS_PER_DAY + at,
                        battery_age_days: b.age,
                        number_of_trips: part_trips.max(0) as f64,
                        daily_trip_duration: round_to(minutes * share, 6),
                        daily_cycles_used: round_to(cycles * share, 9),
                        lifetime_cycles_used: round_to(lifetime, 9),
                        battery_rated_cycles: b.rated,
                        resting_voltage: Some(round_to(
                            3.75 - 0.25 * (b.lifetime / b.rated).min(1.5)
                                + self.rng.random_range(-0.02..0.02),
                            3,
                        )),
                        state_of_charge: Some(round_to(self.rng.random_range(20.0..95.0), 1)),
                        temperature_c: Some(round_to(
                            15.0 + 10.0 * (TAU * day as f64 / 365.25 - 1.9).sin()
                                + self.rng.random_range(-3.0..3.0),
                            1,
                        )),
                    };
                    let msg = SimMessage {
                        key: b.id.clone(),
                        payload: if self.render {
                            render(self.format, &record)
                        } else {
                            Vec::new()
                        },
                        defect: None,
                        record: Some(record),
                    };
                    if self.rng.random_bool(c.duplicate_rate) {
                        duplicates.push(msg.clone());
                    }
                    messages.push(msg);
                    if c.malformed_rate > 0.0 && self.rng.random_bool(c.malformed_rate) {
                        let kind = self.rng.random_range(0..MALFORMED_KINDS);
                        messages.push(malformed(
                            kind,
                            self.format,
                            messages.last().expect("just pushed"),
                        ));
                    }
                }
            }
            b.age += 1;
        }
        // Exact duplicates arrive late in the day's stream, often in another micro-batch.
        messages.extend(duplicates);
        if let Some(mutator) = &mut self.mutator {
            for m in &mut messages {
                let (mutation, payload) = mutator.mutate(&m.payload);
                *self.mutations.entry(mutation).or_default() += 1;
                m.payload = payload;
                m.record = None;
                m.defect = None;
            }
        }
        Some(SimDay {
            day,
            messages,
            truth,
        })
    }
}

fn round_to(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

fn stretch_probabilities(rate: f64, mean_len: f64) -> (f64, f64) {
    let end = 1.0 / mean_len;
    (rate * end / (1.0 - rate).max(1e-9), end)
}

fn toggle(rng: &mut StdRng, on: bool, start: f64, end: f64) -> bool {
    if on {
        !rng.random_bool(end.min(1.0))
    } else {
        rng.random_bool(start.min(1.0))
    }
}

fn new_battery(
    i: usize,
    rng: &mut StdRng,
    usage: &LogNormal<f64>,
    config: &SimulatorConfig,
) -> Battery {
    let rated = match rng.random_range(0..10) {
        0 => 150.0,
        1 => 300.0,
        _ => 200.0,
    };
    let minutes_per_day = usage.sample(rng).clamp(10.0, 300.0);
    let weekly = if rng.random_bool(0.6) {
        [1.15, 1.15, 1.15, 1.15, 1.15, 0.65, 0.55] // commuter
    } else {
        [0.85, 0.85, 0.85, 0.85, 0.95, 1.3, 1.35] // leisure
    };
    let mut b = Battery {
        id: format!("B{i:06}"),
        vehicle: format!("V{i:06}"),
        rated,
        age: 0,
        lifetime: 0.0,
        minutes_per_day,
        weekly,
        season_amplitude: rng.random_range(0.0..config.season_amplitude_max.max(1e-9)),
        // sin peaks at a quarter turn and day 0 (1970-01-01) is a January 1st, so a phase
        // of TAU/4 (give or take a fortnight) puts the peak around New Year.
        season_phase: if config.winter_peak {
            TAU / 4.0 + rng.random_range(-0.25..0.25)
        } else {
            rng.random_range(0.0..TAU)
        },
        minutes_per_cycle_new: MINUTES_PER_CYCLE_NEW * rng.random_range(0.9..1.1),
        drift_per_year: rng.random_range(0.0..0.15),
        minutes_per_trip: rng.random_range(9.0..16.0),
        twelve_hourly: false,
        missing: false,
        crossed: false,
        changes: 0,
    };
    // Spread starting ages so that a share of the fleet is near its rating: start at a
    // random fraction of the expected life, a little past it for a few.
    let expected_life_days = rated / (minutes_per_day * b.cycles_per_minute());
    b.age = (expected_life_days * rng.random_range(0.0..1.02)) as i64;
    let wear = Normal::new(1.0, 0.03).expect("valid").sample(rng);
    b.lifetime = b.age as f64 * minutes_per_day * b.cycles_per_minute() * wear;
    b.crossed = b.lifetime > b.rated;
    b
}

/// Renders a record in the wire format.
pub fn render(format: WireFormat, r: &TelemetryRecord<'_>) -> Vec<u8> {
    match format {
        WireFormat::Json => r.to_json().into_bytes(),
        WireFormat::Csv => csv_line(r).into_bytes(),
    }
}

/// One CSV row under [`CSV_HEADER`].
pub fn csv_line(r: &TelemetryRecord<'_>) -> String {
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{}",
        crate::time::format_timestamp(r.event_time),
        r.battery_id,
        r.vehicle_id.as_deref().unwrap_or(""),
        r.battery_age_days,
        r.number_of_trips,
        r.daily_trip_duration,
        r.daily_cycles_used,
        r.lifetime_cycles_used,
        r.battery_rated_cycles,
        opt(r.resting_voltage),
        opt(r.state_of_charge),
        opt(r.temperature_c),
    )
}

const MALFORMED_KINDS: u32 = 8;

/// A broken copy of a good message, and the reason voltcast must give for refusing it.
fn malformed(kind: u32, format: WireFormat, good: &SimMessage) -> SimMessage {
    let r = good
        .record
        .as_ref()
        .expect("malformed copies are made of valid reports");
    let mut bad = r.clone();
    let (reason, payload) = match kind {
        0 => (RejectReason::Negative, {
            bad.daily_trip_duration = -bad.daily_trip_duration - 1.0;
            render(format, &bad)
        }),
        1 => (RejectReason::OutOfRange, {
            bad.daily_cycles_used = 1e6;
            render(format, &bad)
        }),
        2 => (RejectReason::BadTime, {
            bad.event_time = 86_400_000;
            render(format, &bad)
        }),
        3 => (RejectReason::BadId, {
            bad.battery_id = "B".repeat(200).into();
            render(format, &bad)
        }),
        4 => (RejectReason::Malformed, {
            let mut p = render(format, r);
            match format {
                WireFormat::Json => p.truncate(p.len() / 2),
                WireFormat::Csv => p.extend_from_slice(b",extra,fields"),
            }
            p
        }),
        5 => (
            RejectReason::BadType,
            match format {
                WireFormat::Json => r
                    .to_json()
                    .replacen(
                        "\"number_of_trips\":",
                        "\"number_of_trips\":\"many\",\"x\":",
                        1,
                    )
                    .into_bytes(),
                WireFormat::Csv => csv_line(r)
                    .replacen(&format!(",{},", r.number_of_trips), ",many,", 1)
                    .into_bytes(),
            },
        ),
        6 => (
            RejectReason::MissingField,
            match format {
                WireFormat::Json => r
                    .to_json()
                    .replacen("\"daily_cycles_used\":", "\"unknown_cycles\":", 1)
                    .into_bytes(),
                WireFormat::Csv => {
                    bad.battery_rated_cycles = f64::NAN;
                    csv_line(&bad).replacen(",NaN,", ",,", 1).into_bytes()
                }
            },
        ),
        _ => (
            RejectReason::NonFinite,
            match format {
                WireFormat::Json => r
                    .to_json()
                    .replacen(
                        "\"lifetime_cycles_used\":",
                        "\"lifetime_cycles_used\":1e999,\"old_lifetime\":",
                        1,
                    )
                    .into_bytes(),
                WireFormat::Csv => {
                    bad.lifetime_cycles_used = f64::INFINITY;
                    csv_line(&bad).into_bytes()
                }
            },
        ),
    };
    SimMessage {
        key: good.key.clone(),
        payload,
        defect: Some(reason),
        record: None,
    }
}

/// What a simulation run emitted.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct SimulationSummary {
    pub days: u32,
    pub messages: u64,
    pub valid_reports: u64,
    pub malformed: u64,
}

impl SimulationSummary {
    fn count(&mut self, day: &SimDay) {
        self.days += 1;
        self.messages += day.messages.len() as u64;
        self.malformed += day.messages.iter().filter(|m| m.defect.is_some()).count() as u64;
        self.valid_reports += day.messages.iter().filter(|m| m.record.is_some()).count() as u64;
    }
}

/// Ground truth as CSV, one row per battery-day.
pub struct TruthWriter(csv::Writer<std::fs::File>);

impl TruthWriter {
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self(csv::Writer::from_path(path)?))
    }

    pub fn write(&mut self, day: &SimDay) -> std::io::Result<()> {
        for row in &day.truth {
            self.0.serialize(row)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The wire format a file name implies: `.csv` is CSV, anything else JSON lines.
pub fn format_for_path(path: &std::path::Path) -> WireFormat {
    match path.extension() {
        Some(e) if e.eq_ignore_ascii_case("csv") => WireFormat::Csv,
        _ => WireFormat::Json,
    }
}

/// Writes the whole simulation to `out` (JSON lines, or CSV with [`CSV_HEADER`]).
pub fn write_file(
    sim: &mut FleetSimulator,
    out: &std::path::Path,
    mut truth: Option<TruthWriter>,
) -> std::io::Result<SimulationSummary> {
    use std::io::Write;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    if sim.format == WireFormat::Csv {
        writeln!(w, "{CSV_HEADER}")?;
    }
    let mut summary = SimulationSummary::default();
    while let Some(day) = sim.next_day() {
        for m in &day.messages {
            w.write_all(&m.payload)?;
            w.write_all(b"\n")?;
        }
        if let Some(t) = truth.as_mut() {
            t.write(&day)?;
        }
        summary.count(&day);
    }
    w.flush()?;
    if let Some(t) = truth {
        t.finish()?;
    }
    Ok(summary)
}

/// Publishes the simulation to a Kafka topic, keyed by battery id. With
/// `days_per_second > 0` each simulated day is spread over `1 / days_per_second` seconds
/// of wall time (an accelerated clock); with 0 it publishes as fast as the broker takes it.
pub async fn publish_kafka(
    sim: &mut FleetSimulator,
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    days_per_second: f64,
    mut truth: Option<TruthWriter>,
) -> Result<SimulationSummary, crate::IngestError> {
    use rdkafka::producer::FutureRecord;
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    let failed = |m: String| crate::IngestError::Publish {
        topic: topic.to_string(),
        message: m,
    };
    let mut in_flight = VecDeque::new();
    let mut summary = SimulationSummary::default();
    let started = Instant::now();
    while let Some(day) = sim.next_day() {
        let day_index = summary.days;
        for (i, m) in day.messages.iter().enumerate() {
            if days_per_second > 0.0 {
                let due =
                    (day_index as f64 + i as f64 / day.messages.len() as f64) / days_per_second;
                let wait = Duration::from_secs_f64(due).saturating_sub(started.elapsed());
                if wait > Duration::from_millis(5) {
                    tokio::time::sleep(wait).await;
                }
            }
            loop {
                let record = FutureRecord::to(topic).key(&m.key).payload(&m.payload);
                match producer.send_result(record) {
                    Ok(fut) => {
                        in_flight.push_back(fut);
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        _,
                    )) => match in_flight.pop_front() {
                        Some(fut) => check_delivery(fut.await).map_err(failed)?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Err((e, _)) => return Err(failed(e.to_string())),
                }
            }
            while in_flight.len() > 100_000 {
                check_delivery(in_flight.pop_front().expect("non-empty").await).map_err(failed)?;
            }
        }
        if let Some(t) = truth.as_mut() {
            t.write(&day).map_err(|e| crate::IngestError::Io {
                path: "truth file".into(),
                source: e,
            })?;
        }
        summary.count(&day);
    }
    for fut in in_flight {
        check_delivery(fut.await).map_err(failed)?;
    }
    if let Some(t) = truth {
        t.finish().map_err(|e| crate::IngestError::Io {
            path: "truth file".into(),
            source: e,
        })?;
    }
    Ok(summary)
}

fn check_delivery(
    outcome: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<(), String> {
    match outcome {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("producer dropped a message".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per battery, its truth rows in day order.
    fn truth_by_battery(config: SimulatorConfig) -> Vec<Vec<TruthRow>> {
        let batteries = config.batteries;
        let mut sim = FleetSimulator::new(config, WireFormat::Json)
            .unwrap()
            .without_payloads();
        let mut rows = vec![Vec::new(); batteries];
        while let Some(day) = sim.next_day() {
            for (i, t) in day.truth.into_iter().enumerate() {
                rows[i].push(t);
            }
        }
        rows
    }

    #[test]
    fn truth_counts_every_replacement_and_regime_change() {
        let config = SimulatorConfig {
            batteries: 200,
            days: 730,
            ..SimulatorConfig::default()
        };
        let seasons = truth_by_battery(config.clone().with_seasons());
        let (mut replaced, mut changed) = (0, 0);
        for days in &seasons {
            for pair in days.windows(2) {
                let (before, today) = (&pair[0], &pair[1]);
                let step = today.usage_changes - before.usage_changes;
                assert!(step <= 2, "{} on {}", today.battery_id, today.date);
                // A replacement starts the lifetime again.
                if today.lifetime_cycles < before.lifetime_cycles {
                    assert!(step >= 1, "{} replaced on {}", today.battery_id, today.date);
                    replaced += 1;
                }
                changed += step;
            }
        }
        // About 0.35 changes per battery-year: some 140 in 400 battery-years.
        assert!(
            replaced > 0 && changed > replaced,
            "{replaced} replaced, {changed} changes"
        );
        assert!((60..=260).contains(&changed), "{changed} changes");
        // Without regime changes and replacements, the count stays 0.
        let plain = truth_by_battery(config);
        assert!(plain.iter().flatten().all(|t| t.usage_changes == 0));
    }
}
