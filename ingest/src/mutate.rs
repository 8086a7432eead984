//! A seeded mutator of telemetry messages, for fuzzing the source end to end: it takes a
//! valid JSON report and damages it the ways real producers and networks do (flipped
//! bits, cut-off messages, numbers no sensor reports, the wrong types, nesting deep
//! enough to overflow a recursive parser, bytes that are not UTF-8, a key given twice,
//! messages far over the size limit). Whatever comes out, the pipeline must either take
//! the record in or dead-letter it with a reason, and never panic.
//!
//! Seeded, so a failure found at message 734,211 is found again at 734,211.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One way of damaging a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mutation {
    /// Left as it was: valid messages keep flowing between the damaged ones.
    Unchanged,
    /// One to eight bits flipped anywhere.
    BitFlip,
    /// Cut off at a random byte.
    Truncate,
    /// A number replaced by one out of every range (1e308, -1e300, 9.2e18, 1e400...).
    HugeNumber,
    /// A number replaced by NaN or an infinity, spelled as JSON has no way to.
    NonFinite,
    /// A value replaced by another JSON type (text, array, object, boolean, null).
    WrongType,
    /// A value wrapped in thousands of nested arrays.
    DeepNesting,
    /// Bytes that are not UTF-8 inside a string.
    InvalidUtf8,
    /// A key given twice with different values.
    DuplicateKey,
    /// A string field padded far past the message size limit.
    Oversize,
}

impl Mutation {
    pub const ALL: [Mutation; 10] = [
        Self::Unchanged,
        Self::BitFlip,
        Self::Truncate,
        Self::HugeNumber,
        Self::NonFinite,
        Self::WrongType,
        Self::DeepNesting,
        Self::InvalidUtf8,
        Self::DuplicateKey,
        Self::Oversize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unchanged => "unchanged",
            Self::BitFlip => "bit_flip",
            Self::Truncate => "truncate",
            Self::HugeNumber => "huge_number",
            Self::NonFinite => "non_finite",
            Self::WrongType => "wrong_type",
            Self::DeepNesting => "deep_nesting",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::DuplicateKey => "duplicate_key",
            Self::Oversize => "oversize",
        }
    }
}

const HUGE: [&str; 8] = [
    "1e308",
    "-1e308",
    "1e400",
    "-1e300",
    "9223372036854775808",
    "-9223372036854775809",
    "3e9",
    "123456789012345678901234567890",
];
const NON_FINITE: [&str; 5] = ["NaN", "Infinity", "-Infinity", "nan", "inf"];
const WRONG_TYPES: [&str; 7] = [
    "\"12\"",
    "[1,2]",
    "{\"v\":1}",
    "true",
    "null",
    "\"\"",
    "\"2024-13-45T99:00:00Z\"",
];

/// Damages messages, reproducibly from its seed.
pub struct MessageMutator {
    rng: StdRng,
    /// Size an oversize message is padded to (above `validation.max_message_bytes`).
    oversize_bytes: usize,
}

impl MessageMutator {
    /// `oversize_bytes`: what an [`Mutation::Oversize`] message grows to.
    pub fn new(seed: u64, oversize_bytes: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            oversize_bytes,
        }
    }

    /// A damaged copy of `message` (a JSON object), and how it was damaged. Oversize
    /// messages are rare (1 in 500), so a million of them stay a reasonable volume.
    pub fn mutate(&mut self, message: &[u8]) -> (Mutation, Vec<u8>) {
        let mutation = if self.rng.random_ratio(1, 500) {
            Mutation::Oversize
        } else {
            // Everything but Oversize, evenly.
            Mutation::ALL[self.rng.random_range(0..Mutation::ALL.len() - 1)]
        };
        (mutation, self.apply(mutation, message))
    }

    /// `message` damaged by `mutation`.
    pub fn apply(&mut self, mutation: Mutation, message: &[u8]) -> Vec<u8> {
        let mut out = message.to_vec();
        match mutation {
            Mutation::Unchanged => {}
            Mutation::BitFlip => {
                for _ in 0..self.rng.random_range(1..=8) {
                    let i = self.rng.random_range(0..out.len().max(1));
                    if let Some(b) = out.get_mut(i) {
                        *b ^= 1 << self.rng.random_range(0..8);
                    }
                }
            }
            Mutation::Truncate => out.truncate(self.rng.random_range(0..out.len().max(1))),
            Mutation::HugeNumber => out = self.replace_value(&out, &HUGE, true),
            Mutation::NonFinite => out = self.replace_value(&out, &NON_FINITE, true),
            Mutation::WrongType => out = self.replace_value(&out, &WRONG_TYPES, false),
            Mutation::DeepNesting => {
                let depth = self.rng.random_range(200..4_000);
                let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
                out = self.replace_value(&out, &[nested.as_str()], false);
            }
            Mutation::InvalidUtf8 => {
                // Into the first string value: after the opening quote of a value.
                if let Some(at) = find(&out, b":\"") {
                    let bad: &[u8] = match self.rng.random_range(0..4) {
                        0 => &[0xff],
                        1 => &[0xc3, 0x28],
                        2 => &[0xed, 0xa0, 0x80],
                        _ => &[0xf8, 0x88, 0x80, 0x80, 0x80],
                    };
                    out.splice(at + 2..at + 2, bad.iter().copied());
                }
            }
            Mutation::DuplicateKey => {
                if let Some(key) = self.pick_key(&out)
                    && let Some(open) = out.iter().position(|b| *b == b'{')
                {
                    let extra = format!("\"{key}\":0,");
                    out.splice(open + 1..open + 1, extra.bytes());
                }
            }
            Mutation::Oversize => {
                if let Some(at) = find(&out, b":\"") {
                    let pad = self.oversize_bytes.saturating_sub(out.len());
                    out.splice(at + 2..at + 2, std::iter::repeat_n(b'x', pad));
                }
            }
        }
        out
    }

    /// Where each top-level value of a flat JSON object starts and ends.
    fn value_spans(message: &[u8]) -> Vec<(usize, usize)> {
        // (start of the value, end of the value) for each `"key":value`.
        let mut spans = Vec::new();
        let mut i = 0;
        while let Some(colon) = find(&message[i..], b"\":").map(|c| c + i) {
            let start = colon + 2;
            let end = value_end(message, start);
            spans.push((start, end));
            i = end.max(start);
        }
        spans
    }

    fn pick_key(&mut self, message: &[u8]) -> Option<String> {
        let spans = Self::value_spans(message);
        let (start, _) = *spans.get(self.rng.random_range(0..spans.len().max(1)))?;
        let colon = start - 2;
        let open = message[..colon].iter().rposition(|b| *b == b'"')?;
        String::from_utf8(message[open + 1..colon].to_vec()).ok()
    }

    /// Replaces one value (a number's, when `numbers_only`) with one of `choices`.
    fn replace_value(&mut self, message: &[u8], choices: &[&str], numbers_only: bool) -> Vec<u8> {
        let spans: Vec<_> = Self::value_spans(message)
            .into_iter()
            .filter(|(s, _)| !numbers_only || message.get(*s).is_some_and(|b| *b != b'"'))
            .collect();
        let Some(&(start, end)) = spans.get(self.rng.random_range(0..spans.len().max(1))) else {
            return message.to_vec();
        };
        let with = choices[self.rng.random_range(0..choices.len())];
        let mut out = message[..start].to_vec();
        out.extend_from_slice(with.as_bytes());
        out.extend_from_slice(&message[end..]);
        out
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where the value starting at `start` ends: after its closing quote for a string,
/// before the next `,` or `}` otherwise.
fn value_end(message: &[u8], start: usize) -> usize {
    if message.get(start) == Some(&b'"') {
        let mut i = start + 1;
        while i < message.len() {
            match message[i] {
                b'\\' => i += 2,
                b'"' => return i + 1,
                _ => i += 1,
            }
        }
        return message.len();
    }
    message[start..]
        .iter()
        .position(|b| *b == b',' || *b == b'}')
        .map_or(message.len(), |p| start + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &[u8] = br#"{"battery_id":"B1","vehicle_id":"V1","event_time":"2024-01-01T00:00:00Z","battery_age_days":10,"number_of_trips":2,"daily_trip_duration":30.5,"daily_cycles_used":0.5,"lifetime_cycles_used":12.5,"battery_rated_cycles":1000}"#;

    #[test]
    fn every_mutation_damages_the_message_and_the_seed_repeats_it() {
        for m in Mutation::ALL {
            let (mut a, mut b) = (
                MessageMutator::new(3, 20_000),
                MessageMutator::new(3, 20_000),
            );
            let out = a.apply(m, REPORT);
            assert_eq!(out, b.apply(m, REPORT), "{m:?} is not reproducible");
            let parsed = serde_json::from_slice::<serde_json::Value>(&out);
            match m {
                Mutation::Unchanged => assert_eq!(out, REPORT),
                Mutation::Oversize => assert!(out.len() >= 20_000),
                Mutation::DuplicateKey => {
                    let text = String::from_utf8(out).unwrap();
                    let key = text[2..text.find("\":0,").unwrap()].to_string();
                    assert_eq!(text.matches(&format!("\"{key}\":")).count(), 2, "{text}");
                }
                Mutation::InvalidUtf8 => assert!(std::str::from_utf8(&out).is_err()),
                Mutation::DeepNesting => assert!(parsed.is_err(), "serde_json stops at 128"),
                _ => assert_ne!(out, REPORT, "{m:?} left the message as it was"),
            }
        }
    }

    #[test]
    fn numbers_are_replaced_whole() {
        let mut m = MessageMutator::new(1, 0);
        for _ in 0..50 {
            let out = String::from_utf8(m.apply(Mutation::NonFinite, REPORT)).unwrap();
            assert!(
                NON_FINITE
                    .iter()
                    .any(|n| out.contains(&format!(":{n},")) || out.contains(&format!(":{n}}}"))),
                "{out}"
            );
        }
    }
}
