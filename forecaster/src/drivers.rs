//! What drives a battery's forecast, in words a driver or a service desk can act on.
//!
//! Daily cycles are driving minutes times cycles per minute (the reference data has them
//! proportional), so a rising forecast comes from driving more, from each minute costing
//! more cycles (wear, climate, harder driving), or from more trips. Each is compared over
//! the last 30 days against the 30 before; the largest changes are named first.

/// One day as the drivers read it: cycles, minutes, trips.
pub type DayUse = [f32; 3];

/// Smallest change worth naming, as a fraction.
const NOTABLE: f64 = 0.05;

/// Up to `max` reasons, strongest first, after a capacity line. `days` oldest first.
pub fn drivers(
    days: &[DayUse],
    remaining: f64,
    rated: f64,
    expected_30d: f64,
    max: usize,
) -> Vec<String> {
    let mut out = vec![if remaining > 0.0 {
        format!(
            "{remaining:.1} of {rated:.0} rated cycles left; about {expected_30d:.1} expected in the next 30 days"
        )
    } else {
        format!(
            "{:.1} cycles past its rating of {rated:.0}; about {expected_30d:.1} more expected in the next 30 days",
            -remaining
        )
    }];
    let span = (days.len() / 2).min(30);
    if span < 7 {
        return out;
    }
    let (before, recent) = (
        &days[days.len() - 2 * span..days.len() - span],
        &days[days.len() - span..],
    );
    let total = |d: &[DayUse], i: usize| d.iter().map(|x| x[i] as f64).sum::<f64>();
    let change = |new: f64, old: f64| (old > 0.0).then(|| new / old - 1.0);
    let per_minute = |d: &[DayUse]| {
        let m = total(d, 1);
        (m > 0.0).then(|| total(d, 0) / m)
    };
    let mut found: Vec<(f64, String)> = Vec::new();
    let mut push = |c: Option<f64>, what: &str| {
        if let Some(c) = c.filter(|c| c.abs() >= NOTABLE) {
            let dir = if c > 0.0 { "up" } else { "down" };
            found.push((
                c.abs(),
                format!(
                    "{what} {dir} {:.0}% over the last {span} days",
                    c.abs() * 100.0
                ),
            ));
        }
    };
    push(change(total(recent, 1), total(before, 1)), "Driving time");
    push(
        per_minute(recent)
            .zip(per_minute(before))
            .and_then(|(a, b)| change(a, b)),
        "Cycles per driving minute",
    );
    push(change(total(recent, 2), total(before, 2)), "Trips");
    found.sort_by(|a, b| b.0.total_cmp(&a.0));
    out.extend(
        found
            .into_iter()
            .take(max.saturating_sub(1))
            .map(|(_, s)| s),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_largest_change_first() {
        // 30 days at 50 min, then 30 at 65 min (+30%); cycles per minute up 10%.
        let mut days = vec![[0.125f32, 50.0, 4.0]; 30];
        days.extend(vec![[0.125f32 * 1.3 * 1.1, 65.0, 4.0]; 30]);
        let r = drivers(&days, 3.0, 200.0, 4.2, 3);
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(r[0].starts_with("3.0 of 200 rated cycles left"), "{r:?}");
        assert_eq!(r[1], "Driving time up 30% over the last 30 days");
        assert_eq!(
            r[2],
            "Cycles per driving minute up 10% over the last 30 days"
        );
    }

    #[test]
    fn steady_use_names_only_capacity() {
        let days = vec![[0.1f32, 40.0, 3.0]; 60];
        assert_eq!(drivers(&days, 1.0, 200.0, 3.0, 3).len(), 1);
        assert_eq!(drivers(&days[..10], 1.0, 200.0, 3.0, 3).len(), 1);
    }
}
