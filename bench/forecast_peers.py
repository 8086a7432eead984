"""voltcast forecast side by side with statsforecast (AutoETS, AutoARIMA) and Prophet.

One simulated fleet with seasons (`voltcast simulate --seasons`: winter driving up to
25% heavier, usage regimes that change, batteries replaced; the reference's defects),
the last 30 days held out:
- voltcast gets the defective CSV (duplicates, 12-hourly rows, missing days, malformed
  lines) through `voltcast forecast`, one thread;
- the peers get each battery's clean daily cycles from the simulator's truth file (an
  advantage: no cleansing to do), one process;
- the noise-free limit is the simulator's expected cycles.
Prints per forecaster: daily NRMSE (RMSE over the range of the actuals, the reference's),
the relative error of the 30-day sum (what the end-of-life rule uses), and seconds per
battery. Run through bench/forecast_peers.sh, which prepares the Python environment.
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pandas as pd

H = 30


def nrmse(actual, predicted):
    actual, predicted = np.asarray(actual), np.asarray(predicted)
    rmse = np.sqrt(np.mean((actual - predicted) ** 2))
    spread = actual.max() - actual.min()
    scale = spread if spread > 1e-12 else max(abs(actual.mean()), 1e-12)
    return rmse / scale


def sum_error(actual, predicted):
    return abs(np.sum(predicted) - np.sum(actual)) / max(abs(np.sum(actual)), 1e-12)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--voltcast", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--batteries", type=int, default=300)
    p.add_argument("--days", type=int, default=730)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--skip-prophet", action="store_true")
    a = p.parse_args()
    fleet, truth_path = os.path.join(a.work, "fleet.csv"), os.path.join(a.work, "truth.csv")
    subprocess.run([a.voltcast, "simulate", "--batteries", str(a.batteries), "--days", str(a.days),
                    "--seed", str(a.seed), "--seasons", "--output", fleet, "--truth", truth_path],
                   check=True, stdout=subprocess.DEVNULL)
    truth = pd.read_csv(truth_path)
    dates = sorted(truth["date"].unique())
    cutoff = dates[-H]
    held = truth[truth["date"] >= cutoff].sort_values(["battery_id", "date"])
    train_truth = truth[truth["date"] < cutoff].sort_values(["battery_id", "date"])

    # voltcast: the defective telemetry up to the cutoff.
    train_csv = os.path.join(a.work, "train.csv")
    with open(fleet) as src, open(train_csv, "w") as dst:
        header = src.readline()
        dst.write(header)
        for line in src:
            if line[:10] < cutoff:
                dst.write(line)
    out = os.path.join(a.work, "voltcast.csv")
    started = time.perf_counter()
    subprocess.run([a.voltcast, "forecast", "--input", train_csv, "--output", out, "--threads", "1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = {"voltcast forecast (defective CSV)": time.perf_counter() - started}
    predictions = defaultdict(dict)
    vc = pd.read_csv(out).sort_values(["battery_id", "horizon_day"])
    for b, g in vc.groupby("battery_id"):
        predictions["voltcast forecast (defective CSV)"][b] = g["cycles_mean"].to_numpy()[:H]

    # The peers: clean daily cycles.
    df = pd.DataFrame({
        "unique_id": train_truth["battery_id"],
        "ds": pd.to_datetime(train_truth["date"]),
        "y": train_truth["actual_cycles"],
    })
    from statsforecast import StatsForecast
    from statsforecast.models import AutoARIMA, AutoETS, SeasonalNaive

    for name, model in [("statsforecast AutoETS(7)", AutoETS(season_length=7)),
                        ("statsforecast AutoARIMA(7)", AutoARIMA(season_length=7)),
                        ("seasonal naive (7)", SeasonalNaive(season_length=7))]:
        started = time.perf_counter()
        fc = StatsForecast(models=[model], freq="D", n_jobs=1).forecast(df=df, h=H)
        seconds[name] = time.perf_counter() - started
        fc = fc.reset_index() if "unique_id" not in fc.columns else fc
        col = [c for c in fc.columns if c not in ("unique_id", "ds")][0]
        for b, g in fc.groupby("unique_id"):
            predictions[name][b] = g.sort_values("ds")[col].to_numpy()
    if not a.skip_prophet:
        import logging
        import warnings
        from prophet import Prophet
        # Prophet and cmdstanpy log every fit (and warn of yearly terms on under two years,
        # which is the point here): quiet, so the table is readable.
        for name in ("cmdstanpy", "prophet"):
            logging.getLogger(name).disabled = True
        warnings.filterwarnings("ignore")
        name = "Prophet (weekly + yearly)"
        started = time.perf_counter()
        for b, g in df.groupby("unique_id"):
            m = Prophet(weekly_seasonality=True, yearly_seasonality=True, daily_seasonality=False)
            m.fit(g[["ds", "y"]])
            future = m.make_future_dataframe(periods=H, include_history=False)
            predictions[name][b] = m.predict(future)["yhat"].to_numpy()
        seconds[name] = time.perf_counter() - started

    for b, g in held.groupby("battery_id"):
        predictions["noise-free expected value (the limit)"][b] = g["expected_cycles"].to_numpy()
    actual = {b: g["actual_cycles"].to_numpy() for b, g in held.groupby("battery_id")}

    print(f"forecast peers: {a.batteries} batteries x {a.days} days (seed {a.seed}, --seasons), "
          f"last {H} days held out (from {cutoff})")
    print("| forecaster | daily NRMSE | error of the 30-day sum | seconds per battery |")
    print("|---|---|---|---|")
    rows = []
    for name, by_battery in predictions.items():
        scored = [(nrmse(actual[b], p), sum_error(actual[b], p))
                  for b, p in by_battery.items() if b in actual and len(p) == H]
        n, s = np.mean([x[0] for x in scored]), np.mean([x[1] for x in scored])
        per = seconds.get(name)
        rows.append((s, name, n, per, len(scored)))
    for s, name, n, per, count in sorted(rows, key=lambda r: r[0]):
        per_text = f"{per / a.batteries:.5f}" if per is not None else "-"
        print(f"| {name} | {n:.4f} | {100 * s:.1f}% | {per_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
