//! The fast path of [`crate::decode::decode_json`]: a telemetry report in its usual shape
//! (one flat object of known keys, strings without escapes, plain JSON numbers), read by
//! hand.
//!
//! Why: on a backlog, serde's generic map visitor (key strings matched through a field
//! visitor, a visitor per value) was three fifths of the Kafka source's CPU, and the
//! source is the pipeline's critical path. This reader gives up (returns `None`) on
//! anything it does not fully understand: an unknown or repeated key, an escape, an id
//! or date written as a number, a value of the wrong type, a missing required field,
//! trailing bytes. serde then decodes the message as before, so what is accepted, what
//! is refused and every refusal's reason stay serde's; `decode::tests` compares the two
//! on dirty simulator output and on edge cases.

use std::borrow::Cow;

use crate::record::TelemetryRecord;
use crate::time::parse_timestamp;

/// The record in `payload` if it has the usual shape; `None` hands it to serde.
pub(crate) fn parse(payload: &[u8]) -> Option<TelemetryRecord<'_>> {
    // Checked once for the whole message (serde reads bad UTF-8 as an error anyway):
    // checking each string and number on its own was a tenth of the source's CPU.
    let text = std::str::from_utf8(payload).ok()?;
    let mut c = Cursor {
        s: text,
        b: payload,
        i: 0,
    };
    let mut f = Fields::default();
    c.expect(b'{')?;
    if c.peek()? == b'}' {
        return None;
    }
    loop {
        let key = c.string()?;
        c.expect(b':')?;
        f.take(key, &mut c)?;
        match c.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    if c.peek().is_some() {
        return None; // trailing bytes: serde says what is wrong
    }
    f.into_record()
}

#[derive(Default)]
struct Fields<'a> {
    seen: u16,
    date: Option<i64>,
    battery_id: Option<&'a str>,
    vehicle_id: Option<&'a str>,
    age: Option<i64>,
    trips: Option<f64>,
    minutes: Option<f64>,
    cycles: Option<f64>,
    lifetime: Option<f64>,
    rated: Option<f64>,
    voltage: Option<f64>,
    soc: Option<f64>,
    temperature: Option<f64>,
}

impl<'a> Fields<'a> {
    /// Reads the value of `key` (the same aliases as serde's `JsonReport`).
    fn take(&mut self, key: &str, c: &mut Cursor<'a>) -> Option<()> {
        let slot = match key {
            "date" | "Date" | "event_time" | "timestamp" => 0,
            "battery_id" | "Battery_ID" => 1,
            "vehicle_id" | "Vehicle_ID" => 2,
            "battery_age_days" | "Battery_Age_Days" => 3,
            "number_of_trips" | "Number_Of_Trips" => 4,
            "daily_trip_duration" | "Daily_Trip_Duration" => 5,
            "daily_cycles_used" | "Daily_Cycles_Used" => 6,
            "lifetime_cycles_used" | "Lifetime_Cycles_Used" => 7,
            "battery_rated_cycles" | "Battery_Rated_Cycles" => 8,
            "resting_voltage" | "Resting_Voltage" => 9,
            "state_of_charge" | "State_Of_Charge" => 10,
            "temperature_c" | "Temperature_C" => 11,
            _ => return None,
        };
        if self.seen & (1 << slot) != 0 {
            return None; // serde refuses a repeated field
        }
        self.seen |= 1 << slot;
        match slot {
            0 => self.date = Some(parse_timestamp(c.string()?)?),
            1 => self.battery_id = Some(c.string()?),
            2 => self.vehicle_id = if c.null() { None } else { Some(c.string()?) },
            3 => self.age = Some(c.integer()?),
            4 => self.trips = Some(c.float()?),
            5 => self.minutes = Some(c.float()?),
            6 => self.cycles = Some(c.float()?),
            7 => self.lifetime = Some(c.float()?),
            8 => self.rated = Some(c.float()?),
            9 => self.voltage = c.optional_float()?,
            10 => self.soc = c.optional_float()?,
            _ => self.temperature = c.optional_float()?,
        }
        Some(())
    }

    fn into_record(self) -> Option<TelemetryRecord<'a>> {
        Some(TelemetryRecord {
            battery_id: Cow::Borrowed(self.battery_id?),
            vehicle_id: self.vehicle_id.map(Cow::Borrowed),
            event_time: self.date?,
            battery_age_days: self.age?,
            number_of_trips: self.trips?,
            daily_trip_duration: self.minutes?,
            daily_cycles_used: self.cycles?,
            lifetime_cycles_used: self.lifetime?,
            battery_rated_cycles: self.rated?,
            resting_voltage: self.voltage,
            state_of_charge: self.soc,
            temperature_c: self.temperature,
        })
    }
}

struct Cursor<'a> {
    /// The message, valid UTF-8; `b` is its bytes.
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    /// The next byte that is not JSON whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.i;
        let len = self.b[start..]
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        if self.b[start + len] != b'"' {
            return None;
        }
        self.i = start + len + 1;
        // Both ends are ASCII quotes, so the slice is on character boundaries.
        self.s.get(start..start + len)
    }

    fn null(&mut self) -> bool {
        let null = self.peek().is_some() && self.b[self.i..].starts_with(b"null");
        if null {
            self.i += 4;
        }
        null
    }

    /// A number in JSON's grammar: its text, and whether it is written as an integer.
    fn number(&mut self) -> Option<(&'a str, bool)> {
        self.peek()?;
        let (b, start) = (self.b, self.i);
        let digits = |mut j: usize| {
            while b.get(j).is_some_and(u8::is_ascii_digit) {
                j += 1;
            }
            j
        };
        let mut j = start + usize::from(b.get(start) == Some(&b'-'));
        j = match b.get(j)? {
            b'0' => j + 1,
            b'1'..=b'9' => digits(j),
            _ => return None,
        };
        let mut integer = true;
        if b.get(j) == Some(&b'.') {
            integer = false;
            let end = digits(j + 1);
            if end == j + 1 {
                return None;
            }
            j = end;
        }
        if matches!(b.get(j), Some(b'e' | b'E')) {
            integer = false;
            j += 1;
            j += usize::from(matches!(b.get(j), Some(b'+' | b'-')));
            let end = digits(j);
            if end == j {
                return None;
            }
            j = end;
        }
        self.i = j;
        // ASCII by construction.
        Some((self.s.get(start..j)?, integer))
    }

    /// A finite number (serde refuses one out of range). Integers convert as serde's
    /// `u64 as f64` does: both round the exact value to the nearest double.
    fn float(&mut self) -> Option<f64> {
        let (text, _) = self.number()?;
        let v: f64 = match short_decimal(text) {
            Some(v) => v,
            None => text.parse().ok()?,
        };
        v.is_finite().then_some(v)
    }

    fn optional_float(&mut self) -> Option<Option<f64>> {
        if self.null() {
            return Some(None);
        }
        self.float().map(Some)
    }

    /// A whole number written as an integer of at most 18 digits (always an `i64`);
    /// anything else (`5.0`, which serde accepts, included) is left to serde.
    fn integer(&mut self) -> Option<i64> {
        let (text, integer) = self.number()?;
        if !integer || text.trim_start_matches('-').len() > 18 {
            return None;
        }
        text.parse().ok()
    }
}

/// Powers of ten a double holds exactly.
const EXACT_POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// A JSON number without exponent and with at most 15 digits, as `str::parse` reads it,
/// without its general parser: the digits make an integer a double holds exactly, and
/// dividing it by an exact power of ten rounds once, to the nearest double (Clinger's
/// fast path, which the standard parser takes for such numbers too). Telemetry values
/// are all like this; anything else returns `None` for `str::parse`.
fn short_decimal(text: &str) -> Option<f64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut mantissa = 0u64;
    let (mut count, mut fraction) = (0usize, None);
    for (i, b) in digits.bytes().enumerate() {
        match b {
            b'0'..=b'9' if count < 15 => {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                count += 1;
            }
            b'.' if fraction.is_none() => fraction = Some(digits.len() - i - 1),
            _ => return None,
        }
    }
    if count == 0 {
        return None;
    }
    let v = mantissa as f64 / EXACT_POWERS_OF_TEN[fraction.unwrap_or(0)];
    Some(if negative { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::short_decimal;

    /// The short path must give `str::parse`'s double bit for bit, or leave it the text.
    fn same_as_std(text: &str) {
        let std: f64 = text.parse().expect("a JSON number parses");
        if let Some(v) = short_decimal(text) {
            assert_eq!(v.to_bits(), std.to_bits(), "{text}: {v} vs {std}");
        }
    }

    #[test]
    fn short_decimals_read_as_the_standard_parser_reads_them() {
        for text in [
            "0",
            "-0",
            "-0.0",
            "0.1",
            "0.2",
            "0.3",
            "1.7976931348623",
            "9007199254740993",
            "123456789012345",
            "1234567890123456",
            "0.000000000000001",
            "-12.5",
            "5.0",
            "999999999999999",
            "0.1000000000000000",
            "3.14159265358979",
        ] {
            same_as_std(text);
        }
        // A pseudo-random sweep over digit counts and decimal point positions.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let digits = 1 + (x % 17) as usize;
            let whole = format!("{:017}", x >> 7);
            let mut text = whole[17 - digits..].trim_start_matches('0').to_string();
            if text.is_empty() {
                text.push('0');
            }
            let point = (x >> 3) as usize % (text.len() + 1);
            if point < text.len() {
                text.insert(text.len() - point, '.');
                if text.starts_with('.') {
                    text.insert(0, '0');
                }
            }
            if x & 1 == 1 {
                text.insert(0, '-');
            }
            same_as_std(&text);
        }
    }

    #[test]
    fn what_the_short_path_leaves_to_the_standard_parser() {
        for text in [
            "1234567890123456",
            "1e5",
            "1.5E-3",
            "",
            "-",
            "1.2.3",
            "0x10",
        ] {
            assert_eq!(short_decimal(text), None, "{text}");
        }
        assert_eq!(
            short_decimal("-0").map(f64::to_bits),
            Some((-0.0f64).to_bits())
        );
    }
}
