//! Model upkeep: full selections only within reach of the rating, refits elsewhere, and a
//! backtest whose ensemble score is what fitting the ensemble itself would give.

use voltcast_forecaster::select::{backtest, nrmse_of, relative_sum_error};
use voltcast_forecaster::{
    DailySeries, DayObservation, Model, ModelKind, SelectionConfig, Standing, Upkeep, refit, select,
};

/// A commuter's week with a slow drift and some wobble, deterministic.
fn series(days: usize) -> DailySeries {
    let mut s = DailySeries::default();
    for t in 0..days {
        let week = [1.15, 1.15, 1.1, 1.2, 1.15, 0.65, 0.55][t % 7];
        let wobble = 1.0 + 0.2 * ((t as f64 * 1.7).sin() * (t as f64 * 0.31).cos());
        let minutes = 60.0 * week * wobble * (1.0 + t as f64 / 2000.0);
        s.push(DayObservation {
            cycles: minutes / 406.0,
            minutes,
            trips: (minutes / 12.0).round().max(1.0),
        });
    }
    s
}

fn day() -> DayObservation {
    DayObservation {
        cycles: 0.15,
        minutes: 60.0,
        trips: 5.0,
    }
}

#[test]
fn the_backtest_scores_the_ensemble_as_fitting_it_would() {
    let s = series(300);
    let config = SelectionConfig::default();
    let folds = 3;
    let scores = backtest(&s, &config, folds);
    let h = config.horizon_days;
    let (mut nrmse, mut sum_error) = (0.0, 0.0);
    for f in 1..=folds {
        let origin = s.len() - f * h;
        let train = s.slice(origin.saturating_sub(config.fit_window_days), origin);
        let path = ModelKind::Ensemble.fit(&train).unwrap().mean_path(h);
        nrmse += nrmse_of(&s.cycles[origin..origin + h], &path);
        sum_error += relative_sum_error(&s.cycles[origin..origin + h], &path);
    }
    let ensemble = scores
        .iter()
        .find(|s| s.kind == ModelKind::Ensemble)
        .unwrap();
    assert!(
        (ensemble.nrmse - nrmse / folds as f64).abs() < 1e-12,
        "{scores:?}"
    );
    assert!((ensemble.sum_error - sum_error / folds as f64).abs() < 1e-12);
    assert!(scores.iter().all(|s| s.nrmse.is_finite()), "{scores:?}");
}

#[test]
fn the_pace_is_the_larger_of_the_last_week_and_the_last_four() {
    let quiet_then_busy = (0..28).map(|i| if i < 21 { 0.1 } else { 0.5 });
    let s = Standing::new(10.0, quiet_then_busy, 300);
    assert!((s.pace - 0.5).abs() < 1e-12, "{s:?}");
    let busy_then_quiet = (0..28).map(|i| if i < 21 { 0.5 } else { 0.1 });
    let s = Standing::new(10.0, busy_then_quiet, 300);
    assert!(
        (s.pace - (21.0 * 0.5 + 7.0 * 0.1) / 28.0).abs() < 1e-12,
        "{s:?}"
    );
    assert!(s.within(30) && !s.within(20));
    assert!(
        !Standing::new(-1.0, [1.0].into_iter(), 300).within(1000),
        "past the rating"
    );
    assert!(
        !Standing::new(1.0, [0.0].into_iter(), 300).within(1000),
        "parked"
    );
}

#[test]
fn within_reach_a_battery_is_reselected_weekly_and_out_of_reach_refitted() {
    let config = SelectionConfig {
        reselect_every_days: 7,
        reach_days: 60,
        refit_every_days: 91,
        ..Default::default()
    };
    let mut record = select(&series(200), &config, None).unwrap();
    assert_eq!(record.days_since_backtest, Some(0));
    let near = Standing {
        remaining: 20.0,
        pace: 0.5,
        history_days: 200,
    };
    let far = Standing {
        remaining: 200.0,
        ..near
    };
    let past = Standing {
        remaining: -1.0,
        ..near
    };
    for _ in 0..6 {
        record.observe(&day());
    }
    assert_eq!(config.upkeep(Some(&record), near, true), Upkeep::Keep);
    record.observe(&day());
    assert_eq!(config.upkeep(Some(&record), near, true), Upkeep::Select);
    assert_eq!(
        config.upkeep(Some(&record), near, false),
        Upkeep::Keep,
        "not its turn"
    );
    assert_eq!(config.upkeep(Some(&record), far, true), Upkeep::Keep);
    assert_eq!(config.upkeep(Some(&record), past, true), Upkeep::Keep);
    // Fitted on 200 days: out of reach it is refitted every 91 days at most.
    for _ in 7..91 {
        record.observe(&day());
    }
    assert_eq!(config.upkeep(Some(&record), far, true), Upkeep::Refit);
    assert_eq!(config.upkeep(Some(&record), past, true), Upkeep::Refit);
    assert_eq!(
        config.upkeep(None, far, false),
        Upkeep::Select,
        "no model yet"
    );

    // A refit keeps the family and the backtest that chose it, and counts as a fit.
    let s = series(291);
    let refitted = refit(&s, &config, &record).unwrap();
    assert_eq!(refitted.kind(), record.kind());
    assert_eq!(refitted.scores, record.scores);
    assert_eq!(refitted.version, record.version + 1);
    assert_eq!(refitted.days_since_backtest, Some(91));
    assert_eq!(refitted.days_since_selection, 0);
    assert_eq!(refitted.fitted_days(), 291);
    assert_eq!(config.upkeep(Some(&refitted), far, true), Upkeep::Keep);
    assert_eq!(config.upkeep(Some(&refitted), near, true), Upkeep::Select);
}

#[test]
fn a_short_history_within_reach_waits_for_a_backtest_it_can_run() {
    let config = SelectionConfig {
        reselect_every_days: 7,
        ..Default::default()
    };
    let first = select(&series(5), &config, None).unwrap();
    assert_eq!(first.kind(), ModelKind::Mean);
    assert_eq!(first.days_since_backtest, None);
    let mut record = first;
    for _ in 0..7 {
        record.observe(&day());
    }
    let near = |history_days| Standing {
        remaining: 5.0,
        pace: 0.5,
        history_days,
    };
    // 12 days: too short for a backtest (28 training days + a 30-day fold).
    assert_eq!(config.upkeep(Some(&record), near(12), true), Upkeep::Refit);
    let refitted = refit(&series(12), &config, &record).unwrap();
    assert_eq!(
        refitted.kind(),
        ModelKind::Mean,
        "still under min_history_days"
    );
    // 30 days: past min_history_days, enough for the default family.
    let refitted = refit(&series(30), &config, &record).unwrap();
    assert_eq!(refitted.kind(), voltcast_forecaster::UNSCORED_FAMILY);
    assert!(refitted.low_confidence);
    assert_eq!(config.upkeep(Some(&record), near(58), true), Upkeep::Select);
}

/// Daily from within reach of the rating to a week past it (the crossing is seen the day
/// it comes); far from it and well past it, on the weekly turn or when the model changed.
#[test]
fn a_battery_is_assessed_daily_from_near_its_rating_to_a_week_past_it() {
    let config = SelectionConfig {
        reach_days: 60,
        ..Default::default()
    };
    // A pace of 2 cycles a day; `remaining` cycles left.
    let at = |remaining: f64| Standing::new(remaining, [2.0; 28].into_iter(), 300);
    let daily = |remaining: f64| config.assessed(at(remaining), Upkeep::Keep, false);
    assert!(!daily(500.0), "far from the rating");
    assert!(daily(100.0), "within reach");
    assert!(daily(0.0) && daily(-1.0), "the day it passes");
    assert!(daily(-13.0), "six and a half days past");
    assert!(!daily(-15.0), "seven and a half days past");
    assert!(
        config.assessed(at(-15.0), Upkeep::Keep, true),
        "its weekly turn"
    );
    assert!(
        config.assessed(at(-15.0), Upkeep::Refit, false),
        "a new fit"
    );
    let parked = Standing::new(-1.0, [0.0; 28].into_iter(), 300);
    assert!(
        !config.assessed(parked, Upkeep::Keep, false),
        "past it and parked"
    );
}
