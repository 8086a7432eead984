//! A forecast with its uncertainty, in the form the failure-risk rule needs.
//!
//! Every model here is (or is driven by) a linear innovations state-space model: the
//! forecast error `h` days ahead is a weighted sum of the future one-step errors,
//! `e(t+h) + c_1 e(t+h-1) + ... + c_{h-1} e(t+1)`, with the model's impulse weights
//! `c_j`. That gives the variance of each day's forecast and, what the end-of-life rule
//! needs, the variance of the *sum* of the next H days, analytically and in O(H):
//! `Var(S_H) = sigma^2 * sum_{m=0}^{H-1} (1 + C_m)^2` with `C_m = c_1 + ... + c_m`.
//! Summing the per-day variances instead would ignore that a level error persists across
//! all 30 days, and understate the risk.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// Expected daily cycles, day 1..=h.
    pub mean: Vec<f64>,
    /// Standard deviation of each day's value.
    pub sd: Vec<f64>,
    /// Standard deviation of the sum of days 1..=k, for k = 1..=h.
    pub sum_sd: Vec<f64>,
}

impl Forecast {
    /// From a mean path, the one-step error sd and the impulse weights c_1..c_{h-1}
    /// (`weights[j-1]` is c_j).
    pub fn from_impulse(mean: Vec<f64>, sigma: f64, weights: impl Fn(usize) -> f64) -> Self {
        let h = mean.len();
        let (mut sd, mut sum_sd) = (Vec::with_capacity(h), Vec::with_capacity(h));
        let (mut sq, mut cum, mut sum_var) = (0.0, 0.0, 0.0);
        for k in 0..h {
            if k > 0 {
                let c = weights(k);
                sq += c * c;
                cum += c;
            }
            sd.push(sigma * (1.0 + sq).sqrt());
            sum_var += (1.0 + cum) * (1.0 + cum);
            sum_sd.push(sigma * sum_var.sqrt());
        }
        Self { mean, sd, sum_sd }
    }

    /// A forecast of ln(1 + x) back on the scale of x. Each day's expected value takes the
    /// lognormal mean correction exp(s^2 / 2), s being that day's log-scale sd, and its sd
    /// is (mean + 1) * sqrt(exp(s^2) - 1). The sum's sd scales the log-scale sum sd by the
    /// mean level so far (delta method).
    pub fn from_log1p(log: &Forecast) -> Forecast {
        let h = log.horizon();
        let mean: Vec<f64> = (0..h)
            .map(|k| (log.mean[k] + log.sd[k] * log.sd[k] / 2.0).exp() - 1.0)
            .collect();
        let sd = (0..h)
            .map(|k| {
                let s = log.sd[k];
                (mean[k] + 1.0) * ((s * s).exp() - 1.0).sqrt()
            })
            .collect();
        let mut level = 0.0;
        let sum_sd = (0..h)
            .map(|k| {
                level += mean[k] + 1.0;
                level / (k + 1) as f64 * log.sum_sd[k]
            })
            .collect();
        Self { mean, sd, sum_sd }
    }

    pub fn horizon(&self) -> usize {
        self.mean.len()
    }

    /// Expected sum of the first `k` days.
    pub fn sum(&self, k: usize) -> f64 {
        self.mean[..k.min(self.mean.len())].iter().sum()
    }

    /// How many sds of the 30-day (whole-horizon) sum `actual_sum` lies above the
    /// forecast's: what interval calibration is measured by.
    pub fn sum_z(&self, actual_sum: f64) -> f64 {
        let sd = self.sum_sd.last().copied().unwrap_or(0.0).max(1e-12);
        (actual_sum - self.sum(self.horizon())) / sd
    }

    /// Central interval at `level` (e.g. 0.9) for day `i` (0-based).
    pub fn interval(&self, i: usize, level: f64) -> (f64, f64) {
        let z = central_z(level);
        (self.mean[i] - z * self.sd[i], self.mean[i] + z * self.sd[i])
    }

    /// Every day's central interval at `level`, lower bounds then upper bounds (the
    /// quantile, a bisection, worked out once rather than per day).
    pub fn intervals(&self, level: f64) -> (Vec<f64>, Vec<f64>) {
        let z = central_z(level);
        let lower = self.mean.iter().zip(&self.sd).map(|(m, s)| m - z * s);
        let upper = self.mean.iter().zip(&self.sd).map(|(m, s)| m + z * s);
        (lower.collect(), upper.collect())
    }
}

/// The half-width in sds of the central interval holding `level` of a normal.
fn central_z(level: f64) -> f64 {
    normal_quantile(0.5 + level / 2.0)
}

/// Standard normal CDF (erfc by Numerical Recipes' Chebyshev fit, |error| < 1.2e-7).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Inverse of [`normal_cdf`] by bisection: only used for interval levels, never hot.
pub fn normal_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0, 10.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_known_values() {
        for (x, p) in [
            (0.0, 0.5),
            (1.0, 0.841_344_746),
            (-1.959_964, 0.025),
            (3.0, 0.998_650_1),
        ] {
            assert!((normal_cdf(x) - p).abs() < 1e-6, "{x}: {}", normal_cdf(x));
        }
        assert!((normal_quantile(0.95) - 1.644_853_6).abs() < 1e-5);
    }

    #[test]
    fn random_walk_sum_variance_grows_cubically() {
        // c_j = 1 for all j (a random walk): Var(S_H) = sigma^2 * sum_{m=1}^{H} m^2.
        let f = Forecast::from_impulse(vec![0.0; 30], 2.0, |_| 1.0);
        let want: f64 = (1..=30).map(|m| (m * m) as f64).sum::<f64>().sqrt() * 2.0;
        assert!((f.sum_sd[29] - want).abs() < 1e-9);
        assert!((f.sd[29] - 2.0 * 30f64.sqrt()).abs() < 1e-9);
        // White noise: the sum's sd grows as sqrt(H).
        let w = Forecast::from_impulse(vec![0.0; 30], 2.0, |_| 0.0);
        assert!((w.sum_sd[29] - 2.0 * 30f64.sqrt()).abs() < 1e-9);
    }
}
