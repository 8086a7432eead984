//! Decoders from wire bytes to [`TelemetryRecord`]s.
//!
//! JSON (one object per Kafka message or per JSONL line) and CSV both accept the reference
//! data set's column names verbatim (`Battery_ID`) and their snake_case forms
//! (`battery_id`). Each decoder refuses a bad record with a [`Rejection`] and never
//! affects its neighbours: one broken message costs exactly one dead letter.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::record::TelemetryRecord;
use crate::reject::{RejectReason, Rejection};
use crate::time::{EpochMillis, parse_timestamp};
use crate::validate::ValidationConfig;

/// The wire form of a JSON report; aliases take the reference CSV names.
#[derive(Deserialize)]
struct JsonReport<'a> {
    #[serde(
        alias = "Date",
        alias = "event_time",
        alias = "timestamp",
        deserialize_with = "event_time"
    )]
    date: EpochMillis,
    #[serde(borrow, alias = "Battery_ID", deserialize_with = "id")]
    battery_id: Cow<'a, str>,
    #[serde(
        borrow,
        default,
        alias = "Vehicle_ID",
        deserialize_with = "optional_id"
    )]
    vehicle_id: Option<Cow<'a, str>>,
    #[serde(alias = "Battery_Age_Days", deserialize_with = "whole_number")]
    battery_age_days: i64,
    #[serde(alias = "Number_Of_Trips")]
    number_of_trips: f64,
    #[serde(alias = "Daily_Trip_Duration")]
    daily_trip_duration: f64,
    #[serde(alias = "Daily_Cycles_Used")]
    daily_cycles_used: f64,
    #[serde(alias = "Lifetime_Cycles_Used")]
    lifetime_cycles_used: f64,
    #[serde(alias = "Battery_Rated_Cycles")]
    battery_rated_cycles: f64,
    #[serde(default, alias = "Resting_Voltage")]
    resting_voltage: Option<f64>,
    #[serde(default, alias = "State_Of_Charge")]
    state_of_charge: Option<f64>,
    #[serde(default, alias = "Temperature_C")]
    temperature_c: Option<f64>,
}

/// Prefix our own serde errors carry so they can be told apart from serde's.
const BAD_TIME: &str = "bad event time: ";

/// Decodes one JSON object and validates it.
pub fn decode_json<'a>(
    payload: &'a [u8],
    rules: &ValidationConfig,
    now: EpochMillis,
) -> Result<TelemetryRecord<'a>, Rejection> {
    if payload.len() > rules.max_message_bytes {
        return Err(oversize(payload.len(), rules));
    }
    let record = match crate::flat_json::parse(payload) {
        Some(record) => record,
        None => decode_json_with_serde(payload)?,
    };
    rules.check(&record, now)?;
    Ok(record)
}

/// Any JSON object serde can read as a report (aliases, escapes, numeric ids, unknown
/// keys); the reason when it cannot.
fn decode_json_with_serde(payload: &[u8]) -> Result<TelemetryRecord<'_>, Rejection> {
    let r: JsonReport<'_> = serde_json::from_slice(payload).map_err(classify_json_error)?;
    Ok(TelemetryRecord {
        battery_id: r.battery_id,
        vehicle_id: r.vehicle_id,
        event_time: r.date,
        battery_age_days: r.battery_age_days,
        number_of_trips: r.number_of_trips,
        daily_trip_duration: r.daily_trip_duration,
        daily_cycles_used: r.daily_cycles_used,
        lifetime_cycles_used: r.lifetime_cycles_used,
        battery_rated_cycles: r.battery_rated_cycles,
        resting_voltage: r.resting_voltage,
        state_of_charge: r.state_of_charge,
        temperature_c: r.temperature_c,
    })
}

fn oversize(len: usize, rules: &ValidationConfig) -> Rejection {
    Rejection::new(
        RejectReason::Oversize,
        format!(
            "message is {len} bytes, above the limit {}",
            rules.max_message_bytes
        ),
    )
}

fn classify_json_error(e: serde_json::Error) -> Rejection {
    let msg = e.to_string();
    let reason = match e.classify() {
        serde_json::error::Category::Data if msg.starts_with(BAD_TIME) => RejectReason::BadTime,
        serde_json::error::Category::Data if msg.starts_with("missing field") => {
            RejectReason::MissingField
        }
        serde_json::error::Category::Data if msg.starts_with("duplicate field") => {
            RejectReason::Malformed
        }
        serde_json::error::Category::Data if msg.starts_with("number out of range") => {
            RejectReason::NonFinite
        }
        serde_json::error::Category::Data => RejectReason::BadType,
        _ if msg.starts_with("number out of range") => RejectReason::NonFinite,
        _ => RejectReason::Malformed,
    };
    Rejection::new(reason, msg)
}

fn event_time<'de, D: Deserializer<'de>>(d: D) -> Result<EpochMillis, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = EpochMillis;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an RFC 3339 date-time, a YYYY-MM-DD date or epoch milliseconds")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<EpochMillis, E> {
            parse_timestamp(s).ok_or_else(|| E::custom(format!("{BAD_TIME}{s:?} is not a date")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<EpochMillis, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<EpochMillis, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{BAD_TIME}{v} is out of range")))
        }
    }
    d.deserialize_any(V)
}

struct IdVisitor;
impl<'de> Visitor<'de> for IdVisitor {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or integer id")
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

fn id<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'de, str>, D::Error> {
    d.deserialize_any(IdVisitor)
}

fn optional_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or integer id, or null")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(IdVisitor).map(Some)
        }
    }
    d.deserialize_option(V)
}

/// Counts are integers, but some producers write `5.0`: accept integral floats.
fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            if v.fract() == 0.0 && v.abs() < 9e15 {
                Ok(v as i64)
            } else {
                Err(E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(V)
}

/// The CSV columns voltcast understands, in schema order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CsvColumn {
    Date,
    BatteryId,
    VehicleId,
    Age,
    Trips,
    Minutes,
    Cycles,
    Lifetime,
    Rated,
    Voltage,
    Soc,
    Temperature,
}

const REQUIRED: [CsvColumn; 8] = [
    CsvColumn::Date,
    CsvColumn::BatteryId,
    CsvColumn::Age,
    CsvColumn::Trips,
    CsvColumn::Minutes,
    CsvColumn::Cycles,
    CsvColumn::Lifetime,
    CsvColumn::Rated,
];

impl CsvColumn {
    fn from_header(h: &str) -> Option<Self> {
        Some(match h.trim().to_ascii_lowercase().as_str() {
            "date" | "event_time" | "timestamp" => Self::Date,
            "battery_id" => Self::BatteryId,
            "vehicle_id" => Self::VehicleId,
            "battery_age_days" => Self::Age,
            "number_of_trips" => Self::Trips,
            "daily_trip_duration" => Self::Minutes,
            "daily_cycles_used" => Self::Cycles,
            "lifetime_cycles_used" => Self::Lifetime,
            "battery_rated_cycles" => Self::Rated,
            "resting_voltage" => Self::Voltage,
            "state_of_charge" => Self::Soc,
            "temperature_c" => Self::Temperature,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Date => "Date",
            Self::BatteryId => "Battery_ID",
            Self::VehicleId => "Vehicle_ID",
            Self::Age => "Battery_Age_Days",
            Self::Trips => "Number_Of_Trips",
            Self::Minutes => "Daily_Trip_Duration",
            Self::Cycles => "Daily_Cycles_Used",
            Self::Lifetime => "Lifetime_Cycles_Used",
            Self::Rated => "Battery_Rated_Cycles",
            Self::Voltage => "Resting_Voltage",
            Self::Soc => "State_Of_Charge",
            Self::Temperature => "Temperature_C",
        }
    }
}

/// A CSV header that lacks a required column, or names one twice.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("CSV header {problem}")]
pub struct CsvHeaderError {
    pub problem: String,
}

/// Maps CSV rows to records by header name; unknown columns are ignored.
#[derive(Debug, Clone)]
pub struct CsvLayout {
    /// For each known column, its field index in the row.
    index: [Option<usize>; 12],
    width: usize,
}

impl CsvLayout {
    pub fn from_header<'h>(
        header: impl IntoIterator<Item = &'h str>,
    ) -> Result<Self, CsvHeaderError> {
        let mut index = [None; 12];
        let mut width = 0;
        for (i, h) in header.into_iter().enumerate() {
            width = i + 1;
            if let Some(col) = CsvColumn::from_header(h)
                && index[col as usize].replace(i).is_some()
            {
                return Err(CsvHeaderError {
                    problem: format!("names column {} twice", col.name()),
                });
            }
        }
        let missing: Vec<_> = REQUIRED
            .iter()
            .filter(|c| index[**c as usize].is_none())
            .map(|c| c.name())
            .collect();
        if !missing.is_empty() {
            return Err(CsvHeaderError {
                problem: format!("lacks required column(s) {}", missing.join(", ")),
            });
        }
        Ok(Self { index, width })
    }

    /// Decodes and validates one row.
    pub fn decode<'r>(
        &self,
        row: &'r csv::StringRecord,
        rules: &ValidationConfig,
        now: EpochMillis,
    ) -> Result<TelemetryRecord<'r>, Rejection> {
        if row.len() != self.width {
            return Err(Rejection::new(
                RejectReason::Malformed,
                format!(
                    "row has {} fields, the header has {}",
                    row.len(),
                    self.width
                ),
            ));
        }
        let byte_len: usize = row.iter().map(|f| f.len() + 1).sum();
        if byte_len > rules.max_message_bytes {
            return Err(oversize(byte_len, rules));
        }
        let field = |c: CsvColumn| {
            self.index[c as usize]
                .map(|i| row[i].trim())
                .filter(|s| !s.is_empty())
        };
        let required = |c: CsvColumn| {
            field(c).ok_or_else(|| {
                Rejection::new(RejectReason::MissingField, format!("{} is empty", c.name()))
            })
        };
        let number = |c: CsvColumn| -> Result<f64, Rejection> {
            let s = required(c)?;
            s.parse::<f64>().map_err(|_| {
                Rejection::new(
                    RejectReason::BadType,
                    format!("{} is {s:?}, not a number", c.name()),
                )
            })
        };
        let whole = |c: CsvColumn| -> Result<i64, Rejection> {
            let v = number(c)?;
            if !v.is_finite() {
                return Err(Rejection::new(
                    RejectReason::NonFinite,
                    format!("{} is {v}", c.name()),
                ));
            }
            if v.fract() != 0.0 {
                return Err(Rejection::new(
                    RejectReason::BadType,
                    format!("{} is {v}, not a whole number", c.name()),
                ));
            }
            Ok(v as i64)
        };
        let optional = |c: CsvColumn| -> Result<Option<f64>, Rejection> {
            field(c)
                .map(|s| {
                    s.parse::<f64>().map_err(|_| {
                        Rejection::new(
                            RejectReason::BadType,
                            format!("{} is {s:?}, not a number", c.name()),
                        )
                    })
                })
                .transpose()
        };
        let date = required(CsvColumn::Date)?;
        let event_time = parse_timestamp(date).ok_or_else(|| {
            Rejection::new(
                RejectReason::BadTime,
                format!("Date {date:?} is not a date"),
            )
        })?;
        let record = TelemetryRecord {
            battery_id: Cow::Borrowed(required(CsvColumn::BatteryId)?),
            vehicle_id: field(CsvColumn::VehicleId).map(Cow::Borrowed),
            event_time,
            battery_age_days: whole(CsvColumn::Age)?,
            number_of_trips: number(CsvColumn::Trips)?,
            daily_trip_duration: number(CsvColumn::Minutes)?,
            daily_cycles_used: number(CsvColumn::Cycles)?,
            lifetime_cycles_used: number(CsvColumn::Lifetime)?,
            battery_rated_cycles: number(CsvColumn::Rated)?,
            resting_voltage: optional(CsvColumn::Voltage)?,
            state_of_charge: optional(CsvColumn::Soc)?,
            temperature_c: optional(CsvColumn::Temperature)?,
        };
        rules.check(&record, now)?;
        Ok(record)
    }

    /// The row re-encoded as one CSV line, the payload of its dead letter.
    pub fn raw_line(row: &csv::StringRecord) -> Vec<u8> {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(Vec::new());
        let _ = w.write_record(row);
        let mut out = w.into_inner().unwrap_or_default();
        if out.last() == Some(&b'\n') {
            out.pop();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::{MessageMutator, Mutation};
    use crate::simulate::{FleetSimulator, SimulatorConfig, WireFormat};

    /// The fast path reads `payload` exactly as serde does, or leaves it to serde.
    fn agrees(payload: &[u8]) -> bool {
        let Some(fast) = crate::flat_json::parse(payload) else {
            return false;
        };
        let slow = decode_json_with_serde(payload);
        let same = |a: Option<f64>, b: Option<f64>| a.map(f64::to_bits) == b.map(f64::to_bits);
        match &slow {
            Ok(slow) => {
                assert_eq!(&fast, slow, "{}", String::from_utf8_lossy(payload));
                for (a, b) in [
                    (fast.number_of_trips, slow.number_of_trips),
                    (fast.daily_trip_duration, slow.daily_trip_duration),
                    (fast.daily_cycles_used, slow.daily_cycles_used),
                    (fast.lifetime_cycles_used, slow.lifetime_cycles_used),
                    (fast.battery_rated_cycles, slow.battery_rated_cycles),
                ] {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{}",
                        String::from_utf8_lossy(payload)
                    );
                }
                assert!(same(fast.resting_voltage, slow.resting_voltage));
                assert!(same(fast.state_of_charge, slow.state_of_charge));
                assert!(same(fast.temperature_c, slow.temperature_c));
            }
            Err(why) => panic!(
                "the fast path took what serde refuses ({why:?}): {}",
                String::from_utf8_lossy(payload)
            ),
        }
        true
    }

    #[test]
    fn the_fast_path_reads_what_serde_reads_and_leaves_the_rest_to_it() {
        let config = SimulatorConfig {
            batteries: 300,
            days: 20,
            malformed_rate: 0.05,
            ..SimulatorConfig::default()
        };
        let mut sim = FleetSimulator::new(config, WireFormat::Json).unwrap();
        let mut mutator = MessageMutator::new(7, 70_000);
        let (mut clean, mut fast, mut mutated, mut fast_mutated) = (0, 0, 0, 0);
        while let Some(day) = sim.next_day() {
            for m in day.messages {
                clean += 1;
                if agrees(&m.payload) {
                    fast += 1;
                } else {
                    assert!(
                        m.defect.is_some(),
                        "{}",
                        String::from_utf8_lossy(&m.payload)
                    );
                }
                for mutation in Mutation::ALL {
                    mutated += 1;
                    fast_mutated += usize::from(agrees(&mutator.apply(mutation, &m.payload)));
                }
            }
        }
        // Every good report takes the fast path; damaged ones mostly do not.
        assert!(fast * 100 >= clean * 90, "{fast} of {clean}");
        assert!(fast_mutated < mutated / 2, "{fast_mutated} of {mutated}");
        assert!(fast_mutated > 0);
    }

    #[test]
    fn edge_cases_agree_with_serde_or_go_to_it() {
        let good = r#"{"date":"2025-06-01T12:00:00Z","battery_id":"B1","vehicle_id":"V1","battery_age_days":10,"number_of_trips":3,"daily_trip_duration":40.5,"daily_cycles_used":0.1,"lifetime_cycles_used":1.5,"battery_rated_cycles":200}"#;
        assert!(agrees(good.as_bytes()));
        let with = |from: &str, to: &str| {
            assert!(good.contains(from), "{from}");
            good.replacen(from, to, 1)
        };
        let fast = [
            with(":3,", ":-0,"),
            with(":3,", ":-0.0,"),
            with(":3,", ":1e-400,"),
            with(":3,", ":18446744073709551616,"),
            with(":3,", ":12345678901234567890123,"),
            with(":3,", ":2.5E+3,"),
            with(":10,", ":-5,"),
            with(":10,", ":-0,"),
            with("\"V1\"", "null"),
            with("\"vehicle_id\":\"V1\",", ""),
            with("\"date\"", "\"Date\""),
            with("\"battery_id\"", "\"Battery_ID\""),
            format!(" \n{} \r\t", with(",\"", " ,\t\"")),
            with("}", ",\"temperature_c\":null}"),
            with("}", ",\"resting_voltage\":3.7,\"state_of_charge\":55}"),
        ];
        for p in &fast {
            assert!(agrees(p.as_bytes()), "not on the fast path: {p}");
        }
        let to_serde = [
            with(":3,", ":03,"),
            with(":3,", ":+3,"),
            with(":3,", ":3.,"),
            with(":3,", ":.5,"),
            with(":3,", ":1e400,"),
            with(":3,", ":NaN,"),
            with(":3,", ":null,"),
            with(":3,", ":\"3\","),
            with(":10,", ":10.0,"),
            with(":10,", ":9223372036854775808,"),
            with("\"B1\"", "17"),
            with("\"B1\"", "\"B\\u0031\""),
            with("\"2025-06-01T12:00:00Z\"", "1748779200000"),
            with("\"2025-06-01T12:00:00Z\"", "\"June\""),
            with("\"date\"", "\"timestamp\":1,\"date\""),
            with("\"date\"", "\"date\":\"2025-06-01\",\"Date\""),
            with("}", ",\"extra\":1}"),
            with("}", ",}"),
            with("}", "}x"),
            with(",\"battery_rated_cycles\":200", ""),
            with("\"V1\"", "nullx"),
            "{}".to_string(),
            "[]".to_string(),
            String::new(),
        ];
        for p in &to_serde {
            assert!(!agrees(p.as_bytes()), "took the fast path: {p}");
        }
    }
}
