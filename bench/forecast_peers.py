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
battery; then the same over the batteries whose usage did not change inside the held-out
month. The limit knows of a new driver or a replaced battery on the day it comes; no
forecaster can, and on such a battery the month's sum is off by a fifth or so. Run
through bench/forecast_peers.sh, which prepares the Python environment.
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


KNOWN_CHANGES = "log-linear fit told the true change days (a reference, not a forecaster)"


def with_known_changes(g, cutoff):
    """What knowing the past well is worth: least squares of log cycles on weekday
    dummies, a yearly wave, a linear trend (cycles per minute rise with age), and a level
    step on each day the simulator changed the driver or the battery, all before the
    cutoff. No forecaster is told those days; the error left is what estimating the
    level since the last change and the month's noise cost."""
    g = g[g["reported"] & (g["actual_cycles"] > 0)]
    day0 = pd.Timestamp("1970-01-01")
    days = ((pd.to_datetime(g["date"]) - day0).dt.days).to_numpy()
    changes = g["usage_changes"].to_numpy()
    steps = [days[i] for i in range(1, len(days)) if changes[i] != changes[i - 1]]
    future = np.arange(H) + (pd.Timestamp(cutoff) - day0).days

    def design(d):
        cols = [((d + 3) % 7 == k).astype(float) for k in range(7)]
        wave = 2 * np.pi * d / 365.25
        cols += [np.sin(wave), np.cos(wave), np.minimum(d, days[-1]) / 365.0]
        cols += [(d >= s).astype(float) for s in steps]
        return np.column_stack(cols)

    log = np.log(g["actual_cycles"].to_numpy())
    coef = np.linalg.lstsq(design(days), log, rcond=None)[0]
    residual_var = np.var(log - design(days) @ coef)
    return np.exp(design(future) @ coef + residual_var / 2)


def bounds(truth, cutoff, seed=0):
    """The 30-day sum error no forecaster can beat in expectation, in two steps. First
    the noise-free expectation carried on from the cutoff as if nothing changed inside
    the held-out month (what perfect knowledge of the past gives: a change to come is
    unknowable): after a change day, the expectation is divided by its jump against the
    same weekday a week before. Then with the level since the newest change before the
    cutoff known only from the days since, as an efficient estimate would: off by a
    normal error of sd (the day's log noise) / sqrt(days) on the log scale, averaged
    over draws. Returns both means over the batteries."""
    rng = np.random.default_rng(seed)
    past, level = [], []
    for _, g in truth.sort_values(["battery_id", "date"]).groupby("battery_id"):
        n0 = int((g["date"] < cutoff).sum())
        expected = g["expected_cycles"].to_numpy().copy()
        changes = g["usage_changes"].to_numpy()
        for c in range(max(n0, 7), len(g)):
            if changes[c] != changes[c - 1]:
                expected[c:] /= expected[c] / expected[c - 7]
        carried = expected[n0:].sum()
        actual = g["actual_cycles"].to_numpy()
        held = actual[n0:].sum()
        past.append(abs(carried - held) / held)
        before = g.iloc[:n0]
        seen = before[before["reported"] & (before["actual_cycles"] > 0)]
        noise = np.std(np.log(seen["actual_cycles"] / seen["expected_cycles"]))
        since = np.flatnonzero(np.diff(seen["usage_changes"].to_numpy()))
        days = len(seen) - (since[-1] + 1 if len(since) else 0)
        draws = carried * np.exp(rng.normal(0.0, noise / np.sqrt(max(days, 1)), 2000))
        level.append(np.abs(draws - held).mean() / held)
    return float(np.mean(past)), float(np.mean(level))


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
    for b, g in train_truth.groupby("battery_id"):
        predictions[KNOWN_CHANGES][b] = with_known_changes(g, cutoff)
    actual = {b: g["actual_cycles"].to_numpy() for b, g in held.groupby("battery_id")}

    print(f"forecast peers: {a.batteries} batteries x {a.days} days (seed {a.seed}, --seasons), "
          f"last {H} days held out (from {cutoff})")
    print_table(predictions, actual, seconds, a.batteries)
    past, level = bounds(truth, cutoff)
    print(f"\nbounds on the 30-day sum error (no forecaster can know a change to come): "
          f"{100 * past:.2f}% knowing the past perfectly; {100 * level:.2f}% with the level "
          f"since the newest change estimated from its days (log noise sd / sqrt(days))")
    # A change on the held-out month's first day counts too: the last training day's
    # count is the one a forecast could know.
    known = train_truth.groupby("battery_id")["usage_changes"].last()
    final = held.groupby("battery_id")["usage_changes"].last()
    steady = {b for b in actual if final[b] == known[b]}
    print(f"\nthe {len(steady)} batteries whose usage did not change in the held-out month "
          f"(no new driver, no battery replaced; {len(actual) - len(steady)} did):")
    print_table(predictions, {b: v for b, v in actual.items() if b in steady}, {}, a.batteries)


def print_table(predictions, actual, seconds, batteries):
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
        per_text = f"{per / batteries:.5f}" if per is not None else "-"
        print(f"| {name} | {n:.4f} | {100 * s:.1f}% | {per_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
