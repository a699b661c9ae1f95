//! The live terminal view: redrawn in place every interval when stdout is
//! a terminal. One line per stack: bytes, growth, trend, a sparkline of its
//! outstanding bytes over the trace, and where it allocates.

use std::io::{self, Write};

use super::{text::human_bytes, Report, StackReport};

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// A sparkline of `width` cells over the samples (last `width` buckets).
pub fn sparkline(samples: &[(f64, i64)], width: usize) -> String {
    if samples.is_empty() || width == 0 {
        return String::new();
    }
    let start = samples.len().saturating_sub(width);
    let tail = &samples[start..];
    let max = tail.iter().map(|s| s.1).max().unwrap_or(0).max(1) as f64;
    tail.iter()
        .map(|s| {
            let i = ((s.1.max(0) as f64 / max) * 7.0).round() as usize;
            BARS[i.min(7)]
        })
        .collect()
}

/// The first frame that names a function outside the allocator, with its
/// location: what a person looks for first.
fn site(s: &StackReport) -> String {
    let f = s
        .frames
        .iter()
        .find(|f| f.function.as_deref().is_some_and(|n| !n.starts_with('[')))
        .or_else(|| s.frames.first());
    match f {
        Some(f) => {
            let name = f.function.as_deref().unwrap_or("??");
            match (&f.file, f.line) {
                (Some(file), Some(line)) => {
                    let base = file.rsplit('/').next().unwrap_or(file);
                    format!("{name} ({base}:{line})")
                }
                _ => name.to_string(),
            }
        }
        None => "??".into(),
    }
}

/// Clear the screen and draw the report.
pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    write!(out, "\x1b[H\x1b[2J")?;
    writeln!(
        out,
        "leaktrace  {:>6.0}s  {} outstanding in {} allocations  lost {}  targets {}",
        report.duration_s,
        human_bytes(report.totals.outstanding_bytes as f64),
        report.totals.outstanding_allocs,
        report.totals.lost_events,
        report.targets.len()
    )?;
    writeln!(
        out,
        "{:>10} {:>11} {:>9} {:<16} {:>5}  where",
        "bytes", "growth/s", "trend", "history", "pids"
    )?;
    for s in &report.stacks {
        writeln!(
            out,
            "{:>10} {:>11} {:>9} {:<16} {:>5}  {}",
            human_bytes(s.outstanding_bytes as f64),
            human_bytes(s.growth_bytes_per_s),
            s.trend.as_str(),
            sparkline(&s.samples, 16),
            s.pids.len(),
            site(s)
        )?;
    }
    for n in &report.notes {
        writeln!(out, "note: {n}")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_the_peak() {
        let s: Vec<(f64, i64)> = (0..8).map(|i| (i as f64, i)).collect();
        assert_eq!(sparkline(&s, 8), "▁▂▃▄▅▆▇█");
        assert_eq!(sparkline(&s, 3).chars().count(), 3);
        assert_eq!(sparkline(&[], 5), "");
        assert_eq!(sparkline(&[(0.0, 0), (1.0, 0)], 4), "▁▁");
    }
}
