//! The episode policy: when a battery's risk becomes an alert, and when it stops being one.
//!
//! An episode opens when the probability reaches `raise_probability` and stays open,
//! without repeating, until the battery is replaced (its age resets or its lifetime
//! drops) or the probability falls below `clear_probability`. The gap between the two
//! thresholds is the hysteresis: a battery at 0.89 / 0.91 on alternate days keeps one
//! alert. Within an episode a rise in severity (expected end of life within
//! `critical_days`) is a new alert, so the driver hears that it became urgent.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    Alert, AlertConfig, AlertStatus, DeliveryStatus, PendingAck, Severity, alert_id, iso_day,
};
use crate::forecasting::RiskUpdate;

/// Lifetime may fall a little when late telemetry corrects a day; a fall this large
/// means the battery was swapped.
const REPLACEMENT_LIFETIME_DROP: f64 = 1.0;

#[derive(Debug, Clone, PartialEq)]
pub enum ResolveReason {
    Replaced,
    RiskFell {
        probability: f64,
    },
    /// No report for longer than the retention: the battery was forgotten.
    Silent {
        days: usize,
    },
}

impl ResolveReason {
    /// A bounded metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ResolveReason::Replaced => "replaced",
            ResolveReason::RiskFell { .. } => "risk_fell",
            ResolveReason::Silent { .. } => "silent",
        }
    }
}

impl std::fmt::Display for ResolveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveReason::Replaced => write!(f, "battery replaced"),
            ResolveReason::RiskFell { probability } => {
                write!(f, "risk fell to {probability:.2}")
            }
            ResolveReason::Silent { days } => {
                write!(f, "no report for over {days} days: battery forgotten")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Raise(Alert),
    /// A more severe alert of the open episode; `previous` is superseded.
    Escalate {
        previous: String,
        alert: Alert,
    },
    Resolve {
        alert_id: String,
        reason: ResolveReason,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct BatteryEpisode {
    /// Episodes so far (the open one included).
    episode: u32,
    /// The open episode's current alert.
    open: Option<(Severity, String)>,
    /// Service booked for the open episode (its alert acknowledged, on any instance).
    booked: Option<Booking>,
    lifetime: Option<f64>,
    age: Option<i32>,
}

/// An acknowledgement as the episode keeps it: who booked service, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Booking {
    pub at: DateTime<Utc>,
    pub by: String,
}

/// What an acknowledgement did to a policy's episodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The battery is not this policy's (another partition's, or another instance's).
    NotHere,
    /// The open episode now carries the booking.
    Applied,
    /// Nothing to do: the alert's episode is over, or already carries this booking.
    Settled,
}

/// Where each battery's episodes stand: part of its partition's checkpoint, so a replay
/// after a crash continues the same episode (same alert ids) instead of opening a new one.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episodes {
    batteries: HashMap<Arc<str>, BatteryEpisode, foldhash::fast::RandomState>,
}

impl Episodes {
    pub fn len(&self) -> usize {
        self.batteries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batteries.is_empty()
    }
}

pub struct EpisodePolicy {
    config: AlertConfig,
    batteries: HashMap<Arc<str>, BatteryEpisode, foldhash::fast::RandomState>,
}

impl EpisodePolicy {
    pub fn new(config: AlertConfig) -> Self {
        Self::with_episodes(config, Episodes::default())
    }

    /// Continues from checkpointed episodes.
    pub fn with_episodes(config: AlertConfig, episodes: Episodes) -> Self {
        Self {
            config,
            batteries: episodes.batteries,
        }
    }

    /// The episodes as they stand, to checkpoint.
    pub fn episodes(&self) -> EpisodesRef<'_> {
        EpisodesRef {
            batteries: &self.batteries,
        }
    }

    /// Rebuilds episode counts and open episodes from stored alerts.
    pub fn restore<'a>(&mut self, alerts: impl IntoIterator<Item = &'a Alert>) {
        for a in alerts {
            let e = self.batteries.entry(a.battery_id.clone()).or_default();
            e.episode = e.episode.max(a.episode);
            if a.status.is_active() {
                let newer = e.open.as_ref().is_none_or(|(s, _)| a.severity >= *s);
                if newer {
                    e.open = Some((a.severity, a.alert_id.clone()));
                }
                e.lifetime = Some(a.lifetime_cycles);
            }
        }
    }

    /// Forgets an evicted battery (silent for over `days`): its open alert is resolved.
    /// The episode count stays for a battery that ever alerted, so if the id comes back
    /// its alerts do not reuse the old ids (receivers dedupe by id).
    pub fn evict(&mut self, battery: &str, days: usize) -> Option<Decision> {
        let e = self.batteries.get_mut(battery)?;
        let open = e.open.take();
        e.booked = None;
        if e.episode == 0 {
            self.batteries.remove(battery);
        } else {
            (e.lifetime, e.age) = (None, None);
        }
        let (_, alert_id) = open?;
        Some(Decision::Resolve {
            alert_id,
            reason: ResolveReason::Silent { days },
        })
    }

    /// Applies an acknowledgement of `alert_id` to the battery's episode, if that alert
    /// is the one the episode has open: its next escalation then says service is booked.
    pub fn acknowledge(&mut self, battery: &str, alert_id: &str, booking: &Booking) -> AckOutcome {
        let Some(e) = self.batteries.get_mut(battery) else {
            return AckOutcome::NotHere;
        };
        let open = e.open.as_ref().is_some_and(|(_, id)| id == alert_id);
        if !open || e.booked.as_ref() == Some(booking) {
            return AckOutcome::Settled;
        }
        e.booked = Some(booking.clone());
        AckOutcome::Applied
    }

    /// Applies the acknowledgements that concern this policy's batteries; returns the
    /// alert ids it settled (applied, or their episode is over) and how many it applied.
    pub fn settle(&mut self, acks: &[PendingAck]) -> (Vec<String>, u64) {
        let (mut settled, mut applied) = (Vec::new(), 0);
        for ack in acks {
            match self.acknowledge(&ack.battery_id, &ack.alert_id, &ack.booking) {
                AckOutcome::NotHere => continue,
                AckOutcome::Applied => applied += 1,
                AckOutcome::Settled => {}
            }
            settled.push(ack.alert_id.clone());
        }
        (settled, applied)
    }

    /// Open episodes right now.
    pub fn open_episodes(&self) -> usize {
        self.batteries.values().filter(|e| e.open.is_some()).count()
    }

    fn severity(&self, u: &RiskUpdate) -> Severity {
        let critical = u.risk.remaining <= 0.0
            || u.risk
                .days_to_eol
                .is_some_and(|d| d <= self.config.critical_days);
        if critical {
            Severity::Critical
        } else {
            Severity::Warning
        }
    }

    pub fn observe(&mut self, u: &RiskUpdate, now: DateTime<Utc>) -> Vec<Decision> {
        let severity = self.severity(u);
        let (raise, clear) = (self.config.raise_probability, self.config.clear_probability);
        let e = match self.batteries.get_mut(&u.battery_id) {
            Some(e) => e,
            None => self.batteries.entry(u.battery_id.clone()).or_default(),
        };
        let replaced = e.age.is_some_and(|a| u.age < a)
            || e.lifetime
                .is_some_and(|l| u.lifetime < l - REPLACEMENT_LIFETIME_DROP);
        (e.age, e.lifetime) = (Some(u.age), Some(u.lifetime));
        let mut out = Vec::new();
        // The open episode's id is taken out only when a decision needs it: most days
        // change nothing, and cloning it for each would allocate per battery-day.
        if let Some(open_severity) = e.open.as_ref().map(|(s, _)| *s) {
            let reason = if replaced {
                Some(ResolveReason::Replaced)
            } else if u.risk.probability < clear {
                Some(ResolveReason::RiskFell {
                    probability: u.risk.probability,
                })
            } else {
                None
            };
            if let Some(reason) = reason {
                let (_, alert_id) = e.open.take().expect("open above");
                e.booked = None;
                out.push(Decision::Resolve { alert_id, reason });
            } else if severity > open_severity {
                let alert = build_alert(u, e.episode, severity, now, e.booked.as_ref());
                let (_, previous) = e
                    .open
                    .replace((severity, alert.alert_id.clone()))
                    .expect("open above");
                out.push(Decision::Escalate { previous, alert });
                return out;
            } else {
                return out;
            }
        }
        if u.risk.probability >= raise {
            e.episode += 1;
            let alert = build_alert(u, e.episode, severity, now, None);
            e.open = Some((severity, alert.alert_id.clone()));
            out.push(Decision::Raise(alert));
        }
        out
    }
}

/// [`Episodes`], borrowed: a checkpoint must not clone the state it saves.
#[derive(Serialize)]
pub struct EpisodesRef<'a> {
    batteries: &'a HashMap<Arc<str>, BatteryEpisode, foldhash::fast::RandomState>,
}

/// `booked`: the episode's service booking, which a more severe alert may need brought
/// forward.
fn build_alert(
    u: &RiskUpdate,
    episode: u32,
    severity: Severity,
    now: DateTime<Utc>,
    booked: Option<&Booking>,
) -> Alert {
    let days = u.risk.days_to_eol;
    let eol = days.map(|d| iso_day(u.day + d as i32));
    let mut reasons = u.drivers.clone();
    if let Some(b) = booked {
        let on = b.at.date_naive();
        reasons.push(&format!("service booked on {on} by {}", b.by));
    }
    Alert {
        alert_id: alert_id(&u.battery_id, episode, severity),
        battery_id: u.battery_id.clone(),
        vehicle_id: u.vehicle_id.clone(),
        episode,
        severity,
        status: AlertStatus::Open,
        probability: u.risk.probability,
        expected_eol_date: eol,
        days_remaining: days,
        lifetime_cycles: u.lifetime,
        rated_cycles: u.rated,
        forecast_30d_cycles: u.risk.expected_cycles,
        model: u.model.name().to_string(),
        model_version: u.model_version,
        as_of_day: iso_day(u.day),
        created_at: now,
        reasons,
        service_booked_at: booked.map(|b| b.at),
        acknowledged_at: None,
        acknowledged_by: None,
        resolved_at: None,
        resolution: None,
        delivery: DeliveryStatus::NotSent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voltcast_forecaster::{FailureRisk, ModelKind};

    /// One scripted day of battery "B1": probability and days to end of life.
    fn day(day: i32, age: i32, lifetime: f64, probability: f64, days_to_eol: u32) -> RiskUpdate {
        RiskUpdate {
            battery_id: Arc::from("B1"),
            vehicle_id: Some(Arc::from("V1")),
            day,
            age,
            lifetime,
            rated: 200.0,
            model: ModelKind::AutoEts,
            model_version: 1,
            risk: FailureRisk {
                probability,
                expected_cycles: 4.5,
                sd_cycles: 0.5,
                remaining: 200.0 - lifetime,
                days_to_eol: Some(days_to_eol),
                low_confidence: false,
                at_risk: probability >= 0.9,
            },
            forecast: Default::default(),
            recent: Default::default(),
            drivers: ["driving up"].into_iter().collect(),
        }
    }

    fn kinds(d: &[Decision]) -> Vec<&'static str> {
        d.iter()
            .map(|d| match d {
                Decision::Raise(_) => "raise",
                Decision::Escalate { .. } => "escalate",
                Decision::Resolve { .. } => "resolve",
            })
            .collect()
    }

    #[test]
    fn an_alerts_message_is_written_from_its_fields_and_reads_back_the_same() {
        let now = Utc::now();
        let booking = Booking {
            at: "2026-03-02T08:00:00Z".parse().unwrap(),
            by: "head-unit:V1".into(),
        };
        let cases = [
            (
                day(3, 900, 190.0, 0.95, 12),
                Severity::Warning,
                None,
                "Battery B1 is expected to reach its rated 200 cycles in about 12 days. Please book a service appointment.",
            ),
            (
                day(4, 900, 199.0, 0.99, 1),
                Severity::Critical,
                Some(&booking),
                "Battery B1 will reach the end of its rated life in about 1 day. Book service now. Service was booked on 2026-03-02: bring the appointment forward if it is later.",
            ),
            (
                day(5, 900, 201.0, 1.0, 0),
                Severity::Critical,
                None,
                "Battery B1 has used its rated 200 cycles. Book service now.",
            ),
        ];
        for (update, severity, booked, message) in cases {
            let alert = build_alert(&update, 1, severity, now, booked);
            assert_eq!(alert.message(), message);
            let json: serde_json::Value = serde_json::to_value(&alert).unwrap();
            assert_eq!(json["message"], alert.message().as_str());
            assert_eq!(
                json["service_booked_at"].is_null(),
                alert.service_booked_at.is_none()
            );
            let back: Alert = serde_json::from_value(json).unwrap();
            assert_eq!(back, alert);
        }
    }

    #[test]
    fn one_alert_per_episode_escalation_and_resolution_after_replacement() {
        let mut p = EpisodePolicy::new(AlertConfig::default());
        let now = Utc::now();
        let mut log = Vec::new();
        // Days 0-9 quiet, 10-19 at risk hovering around the threshold, then critical,
        // then a new battery (age and lifetime reset), then a second episode.
        for d in 0..40 {
            let u = match d {
                0..10 => day(d, 900 + d, 170.0 + d as f64, 0.2, 60),
                10..20 => {
                    let p = if d % 2 == 0 { 0.93 } else { 0.6 };
                    day(d, 900 + d, 180.0 + d as f64, p, 20 - (d as u32 - 10))
                }
                20..25 => day(d, 900 + d, 199.5 + (d - 20) as f64 * 0.1, 0.99, 5),
                25..35 => day(d, d - 25, (d - 25) as f64 * 0.2, 0.0, 1500),
                _ => day(d, d - 25, 196.0, 0.95, 12),
            };
            let decisions = p.observe(&u, now);
            for k in kinds(&decisions) {
                log.push((d, k));
            }
            if let Some(Decision::Raise(a)) = decisions.first() {
                assert_eq!(a.vehicle_id.as_deref(), Some("V1"));
                assert_eq!(a.reasons.iter().collect::<Vec<_>>(), vec!["driving up"]);
            }
        }
        // Raised once on day 10 (0.6 on odd days is above clear_probability 0.5: no
        // flapping), escalated on day 20, resolved by the replacement on day 25, and a
        // second episode on day 35.
        assert_eq!(
            log,
            vec![
                (10, "raise"),
                (20, "escalate"),
                (25, "resolve"),
                (35, "raise")
            ]
        );
    }

    #[test]
    fn risk_falling_below_the_clear_threshold_ends_the_episode() {
        let mut p = EpisodePolicy::new(AlertConfig::default());
        let now = Utc::now();
        let first = p.observe(&day(1, 100, 150.0, 0.95, 20), now);
        let Some(Decision::Raise(a1)) = first.first() else {
            panic!("{first:?}")
        };
        assert!(p.observe(&day(2, 101, 150.1, 0.95, 20), now).is_empty());
        let resolved = p.observe(&day(3, 102, 150.2, 0.3, 60), now);
        assert!(
            matches!(&resolved[..], [Decision::Resolve { alert_id, reason: ResolveReason::RiskFell { .. } }] if *alert_id == a1.alert_id),
            "{resolved:?}"
        );
        // A new episode has a new, deterministic id.
        let again = p.observe(&day(4, 103, 150.3, 0.97, 18), now);
        let Some(Decision::Raise(a2)) = again.first() else {
            panic!("{again:?}")
        };
        assert_eq!(a2.episode, 2);
        assert_ne!(a2.alert_id, a1.alert_id);
        assert_eq!(a2.alert_id, alert_id("B1", 2, Severity::Warning));
    }

    #[test]
    fn a_restored_policy_does_not_raise_the_open_episode_again() {
        let mut p = EpisodePolicy::new(AlertConfig::default());
        let now = Utc::now();
        let Some(Decision::Raise(a)) = p.observe(&day(1, 100, 150.0, 0.95, 20), now).pop() else {
            panic!()
        };
        let mut restarted = EpisodePolicy::new(AlertConfig::default());
        restarted.restore([a].iter());
        assert_eq!(restarted.open_episodes(), 1);
        assert!(
            restarted
                .observe(&day(2, 101, 150.1, 0.96, 19), now)
                .is_empty()
        );
    }

    #[test]
    fn a_booking_reaches_the_next_escalation_and_ends_with_the_episode() {
        let mut p = EpisodePolicy::new(AlertConfig::default());
        let now = Utc::now();
        let Some(Decision::Raise(warning)) = p.observe(&day(1, 100, 150.0, 0.95, 20), now).pop()
        else {
            panic!()
        };
        let booking = Booking {
            at: "2026-03-02T10:00:00Z".parse().unwrap(),
            by: "head-unit:V1".into(),
        };
        assert_eq!(
            p.acknowledge("B9", &warning.alert_id, &booking),
            AckOutcome::NotHere
        );
        assert_eq!(
            p.acknowledge("B1", "al-other", &booking),
            AckOutcome::Settled
        );
        assert_eq!(
            p.acknowledge("B1", &warning.alert_id, &booking),
            AckOutcome::Applied
        );
        assert_eq!(
            p.acknowledge("B1", &warning.alert_id, &booking),
            AckOutcome::Settled
        );
        // The booking is part of the checkpointed episodes.
        let saved = postcard::to_allocvec(&p.episodes()).unwrap();
        let restored: Episodes = postcard::from_bytes(&saved).unwrap();
        let mut p = EpisodePolicy::with_episodes(AlertConfig::default(), restored);

        let escalated = p.observe(&day(2, 101, 190.0, 0.99, 5), now);
        let [Decision::Escalate { previous, alert }] = &escalated[..] else {
            panic!("{escalated:?}")
        };
        assert_eq!(previous, &warning.alert_id);
        assert_eq!(alert.service_booked_at, Some(booking.at));
        assert!(
            alert.message().contains("booked on 2026-03-02"),
            "{}",
            alert.message()
        );
        assert!(
            alert.reasons.iter().any(|r| r.contains("head-unit:V1")),
            "{:?}",
            alert.reasons
        );
        // A new episode starts unbooked.
        p.observe(&day(3, 0, 0.0, 0.0, 900), now);
        let Some(Decision::Raise(next)) = p.observe(&day(4, 1, 195.0, 0.99, 5), now).pop() else {
            panic!()
        };
        assert_eq!(next.service_booked_at, None);
        assert!(!warning.message().contains("booked"));
    }
}
