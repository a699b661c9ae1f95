//! Is a stack's outstanding memory growing? A least-squares line through
//! its time series, and a classification that tells a leak (keeps rising)
//! from a cache (rose, then flattened) and from churn (allocated and freed
//! at a steady level).
//!
//! Pure: input is `(seconds, outstanding bytes)` samples plus the bytes
//! ever allocated; output is a [`Fit`].

use serde::Serialize;

/// What a stack's outstanding bytes do over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Trend {
    /// Keeps rising through the end of the trace.
    Growing,
    /// Rose, then flattened: a cache or a pool that reached its size.
    Plateau,
    /// Allocated and freed at a steady level.
    Churn,
    /// Not moving: allocated before the window and held.
    Steady,
    /// Falling.
    Shrinking,
    /// Too few samples to say.
    Unknown,
}

impl Trend {
    pub fn as_str(self) -> &'static str {
        match self {
            Trend::Growing => "growing",
            Trend::Plateau => "plateau",
            Trend::Churn => "churn",
            Trend::Steady => "steady",
            Trend::Shrinking => "shrinking",
            Trend::Unknown => "unknown",
        }
    }
}

/// The result of fitting one series.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Least-squares slope over the whole series, bytes per second.
    pub slope_bytes_per_s: f64,
    /// Goodness of fit of that line (R², 0..=1; 0 for a flat series).
    pub r2: f64,
    pub trend: Trend,
}

/// Samples needed before a stack is classified.
pub const MIN_SAMPLES: usize = 4;

fn line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx == 0.0 {
        return (0.0, 0.0);
    }
    let slope = sxy / sxx;
    let r2 = if syy == 0.0 {
        0.0
    } else {
        (sxy * sxy) / (sxx * syy)
    };
    (slope, r2)
}

/// Fit a series of `(seconds, outstanding bytes)` samples, oldest first.
/// `total_bytes` is what the stack allocated in all (freed or not), which
/// tells churn from memory that simply sits.
pub fn fit(points: &[(f64, f64)], total_bytes: f64) -> Fit {
    if points.len() < 2 {
        return Fit {
            slope_bytes_per_s: 0.0,
            r2: 0.0,
            trend: Trend::Unknown,
        };
    }
    let (slope, r2) = line(points);
    if points.len() < MIN_SAMPLES {
        return Fit {
            slope_bytes_per_s: slope,
            r2,
            trend: Trend::Unknown,
        };
    }
    let first = points[0].1;
    let last = points[points.len() - 1].1;
    let peak = points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let span_s = points[points.len() - 1].0 - points[0].0;
    let level = peak.max(1.0);
    // The later part of the trace decides between "still rising" and
    // "flattened": a cache fills, then stops.
    let tail = &points[points.len() / 2..];
    let (tail_slope, _) = line(tail);
    // A change smaller than 2% of the level over the window is noise.
    let rise = slope * span_s;
    let tail_rise = tail_slope * (tail[tail.len() - 1].0 - tail[0].0);
    let significant = |delta: f64| delta.abs() > 0.02 * level;

    let trend = if significant(rise) && slope > 0.0 {
        if significant(tail_rise) && tail_slope > 0.0 && tail_slope >= 0.25 * slope {
            Trend::Growing
        } else {
            Trend::Plateau
        }
    } else if significant(rise) && slope < 0.0 && significant(last - first) {
        Trend::Shrinking
    } else if total_bytes > 2.0 * level {
        // Flat, and most of what it allocated was freed again.
        Trend::Churn
    } else if last > first + 0.02 * level && r2 < 0.5 {
        Trend::Plateau
    } else {
        Trend::Steady
    };
    Fit {
        slope_bytes_per_s: slope,
        r2,
        trend,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..20).map(|i| (i as f64, f(i as f64))).collect()
    }

    #[test]
    fn steady_leak_is_growing_with_its_rate() {
        let s = series(|t| 4096.0 * 10.0 * t);
        let f = fit(&s, 4096.0 * 200.0);
        assert_eq!(f.trend, Trend::Growing);
        assert!((f.slope_bytes_per_s - 40960.0).abs() < 1.0);
        assert!(f.r2 > 0.99);
    }

    #[test]
    fn capped_cache_is_a_plateau() {
        let s = series(|t| (t * 1000.0).min(6000.0));
        assert_eq!(fit(&s, 6000.0).trend, Trend::Plateau);
    }

    #[test]
    fn churn_at_a_level_is_churn() {
        let s = series(|t| {
            1000.0
                + if (t as u64).is_multiple_of(2) {
                    8.0
                } else {
                    0.0
                }
        });
        assert_eq!(fit(&s, 1_000_000.0).trend, Trend::Churn);
    }

    #[test]
    fn held_memory_is_steady() {
        let s = series(|_| 5000.0);
        assert_eq!(fit(&s, 5000.0).trend, Trend::Steady);
    }

    #[test]
    fn too_few_samples_is_unknown() {
        assert_eq!(fit(&[(0.0, 1.0), (1.0, 2.0)], 2.0).trend, Trend::Unknown);
        assert_eq!(fit(&[], 0.0).trend, Trend::Unknown);
    }

    #[test]
    fn freeing_is_shrinking() {
        let s = series(|t| 20000.0 - 900.0 * t);
        assert_eq!(fit(&s, 20000.0).trend, Trend::Shrinking);
    }
}
