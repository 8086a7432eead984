//! Forecast accuracy and end-of-life alerts against the simulator's ground truth, on a
//! fleet small enough for CI (`voltcast bench forecast` reports the full-size figures).

use voltcast_ingest::simulate::SimulatorConfig;
use voltcast_scoring::evaluate::{EvaluationConfig, evaluate};
use voltcast_scoring::forecaster::ModelKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecasts_beat_seasonal_naive_and_alerts_meet_their_targets() {
    let config = EvaluationConfig {
        simulator: SimulatorConfig {
            // 1,000: about 150 crossings, so that one battery moves recall by under a
            // point (with 400, 59 crossings, a single early alert decided the test).
            batteries: 1000,
            days: 420,
            seed: 21,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = evaluate(&config).await.unwrap();
    eprintln!("{e:#?}");
    assert!(e.batteries > 990, "scored {}", e.batteries);
    assert!(
        e.selected.nrmse <= 0.75 * e.seasonal_naive.nrmse,
        "NRMSE selected {:.4} vs seasonal naive {:.4}",
        e.selected.nrmse,
        e.seasonal_naive.nrmse
    );
    assert!(
        e.selected.sum_error < e.seasonal_naive.sum_error,
        "30-day sum error {:.4} vs naive {:.4}",
        e.selected.sum_error,
        e.seasonal_naive.sum_error
    );
    assert!(
        e.positives >= 20,
        "too few crossings to judge: {}",
        e.positives
    );
    assert!(e.recall >= 0.95, "recall {:.3}", e.recall);
    assert!(e.precision >= 0.90, "precision {:.3}", e.precision);
    assert!(
        e.median_lead_days >= 20.0,
        "median lead {}",
        e.median_lead_days
    );
}

/// The fleet with seasons, usage regime changes and replacements: the 30-day sum's 90%
/// intervals cover 85-95% of held-out sums, and the alerts still meet their targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_fleet_with_seasons_intervals_are_calibrated_and_alerts_meet_their_targets() {
    let config = EvaluationConfig {
        simulator: SimulatorConfig {
            batteries: 1000,
            days: 450,
            seed: 22,
            ..Default::default()
        }
        .with_seasons(),
        ..Default::default()
    };
    let e = evaluate(&config).await.unwrap();
    eprintln!(
        "within 90%: {:.3}, above q90: {:.3}, Brier {:.4}, recall {:.3} ({}/{}), precision {:.3}, lead {}, winners {:?}",
        e.sum_within_90,
        e.sum_above_q90,
        e.brier,
        e.recall,
        e.detected,
        e.positives,
        e.precision,
        e.median_lead_days,
        e.winners
    );
    assert!(
        (0.85..=0.95).contains(&e.sum_within_90),
        "90% intervals of the 30-day sum cover {:.3}",
        e.sum_within_90
    );
    assert!(e.positives >= 30, "too few crossings: {}", e.positives);
    assert!(e.recall >= 0.95, "recall {:.3}", e.recall);
    assert!(e.precision >= 0.90, "precision {:.3}", e.precision);
    assert!(
        e.median_lead_days >= 25.0,
        "median lead {}",
        e.median_lead_days
    );
    assert!(e.brier < 0.02, "Brier score {:.4}", e.brier);
    assert!(
        e.winners
            .get(&ModelKind::TrendSeasonal)
            .copied()
            .unwrap_or(0)
            > e.batteries / 3,
        "the seasonal family should win on a seasonal fleet: {:?}",
        e.winners
    );
}
