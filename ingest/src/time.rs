//! Event-time parsing on the hot path.
//!
//! Cars send RFC 3339 date-times, plain dates (the reference data set) or epoch
//! milliseconds. chrono's general parsers cost several times more than this hand-written
//! one, and time parsing is a large share of decoding a 200-byte message.

/// Milliseconds since 1970-01-01T00:00:00Z.
pub type EpochMillis = i64;

pub const MILLIS_PER_DAY: i64 = 86_400_000;

/// Days since the epoch for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The calendar date of a day number, inverse of [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD` of a UTC day number.
pub fn format_day(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// RFC 3339 (`2013-01-01T12:00:00Z`, `...T12:00:00.250+02:00`), a space instead of `T`,
/// a date-time with no offset (taken as UTC) or a plain date (midnight UTC).
pub fn parse_timestamp(s: &str) -> Option<EpochMillis> {
    let b = s.trim().as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = digits(&b[0..4])? as i64;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let mut ms = days_from_civil(year, month, day) * MILLIS_PER_DAY;
    let rest = &b[10..];
    if rest.is_empty() {
        return Some(ms);
    }
    if rest.len() < 9 || !(rest[0] == b'T' || rest[0] == b't' || rest[0] == b' ') {
        return None;
    }
    if rest[3] != b':' || rest[6] != b':' {
        return None;
    }
    let (h, mi, sec) = (
        digits(&rest[1..3])?,
        digits(&rest[4..6])?,
        digits(&rest[7..9])?,
    );
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    ms += (h as i64 * 3600 + mi as i64 * 60 + sec as i64) * 1000;
    let mut tail = &rest[9..];
    if let Some(frac) = tail.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        let mut millis = 0u32;
        for (i, c) in frac[..n.min(3)].iter().enumerate() {
            millis += (c - b'0') as u32 * [100, 10, 1][i];
        }
        ms += millis as i64;
        tail = &frac[n..];
    }
    match tail {
        [] | [b'Z'] | [b'z'] => Some(ms),
        [sign @ (b'+' | b'-'), oh1, oh2, b':', om1, om2] => {
            let oh = digits(&[*oh1, *oh2])? as i64;
            let om = digits(&[*om1, *om2])? as i64;
            let offset = (oh * 60 + om) * 60_000;
            Some(if *sign == b'+' {
                ms - offset
            } else {
                ms + offset
            })
        }
        _ => None,
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + (c - b'0') as u32)
    })
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// RFC 3339 with millisecond precision, UTC.
pub fn format_timestamp(ms: EpochMillis) -> String {
    let day = ms.div_euclid(MILLIS_PER_DAY);
    let in_day = ms.rem_euclid(MILLIS_PER_DAY);
    let (h, rem) = (in_day / 3_600_000, in_day % 3_600_000);
    let (mi, rem) = (rem / 60_000, rem % 60_000);
    let (s, milli) = (rem / 1000, rem % 1000);
    if milli == 0 {
        format!("{}T{h:02}:{mi:02}:{s:02}Z", format_day(day))
    } else {
        format!("{}T{h:02}:{mi:02}:{s:02}.{milli:03}Z", format_day(day))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for day in [-800_000, -1, 0, 1, 15_706, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(days_from_civil(2013, 1, 1), 15_706);
    }

    #[test]
    fn parses_accepted_forms() {
        let midnight = 15_706 * MILLIS_PER_DAY;
        assert_eq!(parse_timestamp("2013-01-01"), Some(midnight));
        assert_eq!(parse_timestamp("2013-01-01T00:00:00Z"), Some(midnight));
        assert_eq!(
            parse_timestamp("2013-01-01 12:00:00"),
            Some(midnight + 43_200_000)
        );
        assert_eq!(
            parse_timestamp("2013-01-01T12:00:00.25Z"),
            Some(midnight + 43_200_250)
        );
        assert_eq!(parse_timestamp("2013-01-01T02:00:00+02:00"), Some(midnight));
        assert_eq!(parse_timestamp("2012-12-31T22:00:00-02:00"), Some(midnight));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "2013-13-01",
            "2013-02-30",
            "2013/01/01",
            "2013-01-01T25:00:00Z",
            "2013-01-01T00:00",
            "2013-01-01Tab:00:00Z",
            "2013-01-01T00:00:00+0200",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn format_round_trips() {
        for s in [
            "2013-01-01T00:00:00Z",
            "1999-12-31T23:59:59.999Z",
            "2024-02-29T12:00:00Z",
        ] {
            assert_eq!(format_timestamp(parse_timestamp(s).unwrap()), s);
        }
    }
}
