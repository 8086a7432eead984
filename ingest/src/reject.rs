//! Why a record was refused. Every refusal has exactly one reason, a stable snake_case
//! name used as the dead-letter header value and as the metrics label.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Larger than `validation.max_message_bytes`.
    Oversize,
    /// Not parseable at all (broken JSON, wrong CSV field count, bad UTF-8).
    Malformed,
    /// A required field is absent or empty.
    MissingField,
    /// A field holds the wrong type (text where a number belongs, ...).
    BadType,
    /// NaN or infinity.
    NonFinite,
    /// A count, duration or cycle figure below zero.
    Negative,
    /// Above a sanity bound (cycles per report, minutes per report, rated cycles).
    OutOfRange,
    /// Unparseable, before 2000, or too far in the future.
    BadTime,
    /// Battery or vehicle id empty or too long.
    BadId,
    /// For a day window that has already closed (the streaming job decides this).
    Late,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        Self::Oversize,
        Self::Malformed,
        Self::MissingField,
        Self::BadType,
        Self::NonFinite,
        Self::Negative,
        Self::OutOfRange,
        Self::BadTime,
        Self::BadId,
        Self::Late,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::Malformed => "malformed",
            Self::MissingField => "missing_field",
            Self::BadType => "bad_type",
            Self::NonFinite => "non_finite",
            Self::Negative => "negative",
            Self::OutOfRange => "out_of_range",
            Self::BadTime => "bad_time",
            Self::BadId => "bad_id",
            Self::Late => "late",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the reason plus a sentence a person can act on.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}
