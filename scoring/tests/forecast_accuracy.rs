//! Forecast accuracy and end-of-life alerts against the simulator's ground truth, on a
//! fleet small enough for CI (`voltcast bench forecast` reports the full-size figures).

use voltcast_ingest::simulate::SimulatorConfig;
use voltcast_scoring::evaluate::{EvaluationConfig, evaluate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecasts_beat_seasonal_naive_and_alerts_meet_their_targets() {
    let config = EvaluationConfig {
        simulator: SimulatorConfig {
            batteries: 400,
            days: 420,
            seed: 21,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = evaluate(&config).await.unwrap();
    eprintln!("{e:#?}");
    assert!(e.batteries > 390, "scored {}", e.batteries);
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
