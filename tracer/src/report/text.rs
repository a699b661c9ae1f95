//! `--format text`: what a person reads in a terminal.
//!
//! Input: a [`Report`]. Output: a header line (duration, totals, losses,
//! targets), the notes and Go runtime figures, then each stack in the
//! report's order with at most [`MAX_TEXT_FRAMES`] frames, innermost
//! first. Invariants: sizes in binary units ([`human_bytes`]); the same
//! report gives the same text.

use std::io::{self, Write};

use super::{Frame, Report};

pub fn human_bytes(b: f64) -> String {
    let neg = b < 0.0;
    let mut v = b.abs();
    let mut unit = "B";
    for u in ["KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    let sign = if neg { "-" } else { "" };
    if unit == "B" {
        format!("{sign}{v:.0} B")
    } else {
        format!("{sign}{v:.1} {unit}")
    }
}

fn frame_line(f: &Frame) -> String {
    let func = f.function.as_deref().unwrap_or("??");
    let mut s = func.to_string();
    if f.inlined {
        s.push_str(" (inlined)");
    }
    match (&f.file, f.line) {
        (Some(file), Some(line)) => s.push_str(&format!(" at {}:{line}", short_path(file))),
        (Some(file), None) => s.push_str(&format!(" at {}", short_path(file))),
        _ => {}
    }
    if let Some(m) = &f.module {
        let base = m.rsplit('/').next().unwrap_or(m);
        match (f.function.is_none(), f.offset) {
            (true, Some(off)) => s.push_str(&format!(" [{base}+{off:#x}]")),
            _ => s.push_str(&format!(" [{base}]")),
        }
    }
    s
}

/// Source paths shortened for a terminal: the Rust toolchain's
/// `/rustc/<hash>/` prefix and the build directory of distro packages go.
fn short_path(file: &str) -> &str {
    if let Some(rest) = file.strip_prefix("/rustc/") {
        return rest.split_once('/').map(|(_, r)| r).unwrap_or(rest);
    }
    file.strip_prefix("./").unwrap_or(file)
}

/// `go runtime: process P (go1.x): heap in use A (B at attach, +R/s),
/// N goroutines (M at attach)`, leaving out what could not be read.
fn go_runtime_line(g: &super::GoRuntime) -> String {
    let mut parts = Vec::new();
    if let Some(now) = g.now.heap_inuse_bytes {
        let mut p = format!("heap in use {}", human_bytes(now as f64));
        if let Some(then) = g.at_attach.heap_inuse_bytes {
            p.push_str(&format!(" ({} at attach", human_bytes(then as f64)));
            if g.elapsed_s > 0.0 {
                let rate = (now as f64 - then as f64) / g.elapsed_s;
                let sign = if rate < 0.0 { "-" } else { "+" };
                p.push_str(&format!(", {sign}{}/s", human_bytes(rate.abs())));
            }
            p.push(')');
        }
        parts.push(p);
    }
    if let Some(now) = g.now.goroutines {
        let mut p = format!("{now} goroutines");
        if let Some(then) = g.at_attach.goroutines {
            p.push_str(&format!(" ({then} at attach)"));
        }
        parts.push(p);
    }
    parts.extend(g.unavailable.iter().map(|u| format!("no {u}")));
    format!(
        "go runtime: process {} ({}): {}",
        g.pid,
        g.version,
        parts.join(", ")
    )
}

/// Frames shown per stack in text; JSON and the other formats keep all.
pub const MAX_TEXT_FRAMES: usize = 16;

pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    let pids: Vec<String> = report
        .targets
        .iter()
        .map(|t| format!("{} ({}, {})", t.pid, t.comm, t.status))
        .collect();
    writeln!(
        out,
        "leaktrace: {:.1}s, {} outstanding in {} allocations, {} events lost; targets: {}",
        report.duration_s,
        human_bytes(report.totals.outstanding_bytes as f64),
        report.totals.outstanding_allocs,
        report.totals.lost_events,
        pids.join(", ")
    )?;
    for note in &report.notes {
        writeln!(out, "note: {note}")?;
    }
    for g in &report.go_runtime {
        writeln!(out, "{}", go_runtime_line(g))?;
    }
    if report.stacks.is_empty() {
        writeln!(out, "no memory allocated since attach is outstanding")?;
    }
    for (i, s) in report.stacks.iter().enumerate() {
        writeln!(
            out,
            "\n#{} {} outstanding in {} allocations, growth {}/s ({}), {} allocated in all; pids {}",
            i + 1,
            human_bytes(s.outstanding_bytes as f64),
            s.outstanding_allocs,
            human_bytes(s.growth_bytes_per_s),
            s.trend.as_str(),
            human_bytes(s.allocated_bytes as f64),
            s.pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )?;
        for (n, f) in s.frames.iter().take(MAX_TEXT_FRAMES).enumerate() {
            writeln!(out, "    {n:>2} {}", frame_line(f))?;
        }
        if s.frames.len() > MAX_TEXT_FRAMES {
            writeln!(
                out,
                "       ... {} outer frames (all are in --format json)",
                s.frames.len() - MAX_TEXT_FRAMES
            )?;
        }
    }
    if report.stacks_omitted > 0 {
        writeln!(
            out,
            "\n({} more stacks not shown; raise --top)",
            report.stacks_omitted
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::test_support::{check_golden, sample_report};

    #[test]
    fn text_matches_golden() {
        let mut out = Vec::new();
        write(&sample_report(), &mut out).expect("writing to a Vec cannot fail");
        let text = String::from_utf8(out).expect("text is UTF-8");
        check_golden("text/report.txt", &text);
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(409600.0), "400.0 KiB");
        assert_eq!(human_bytes(-2.0 * 1024.0 * 1024.0), "-2.0 MiB");
    }

    #[test]
    fn go_runtime_figures_beside_the_stacks() {
        let mut r = sample_report();
        let mut out = Vec::new();
        write(&r, &mut out).expect("writing to a Vec cannot fail");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains(
                "go runtime: process 4244 (go1.19.8): heap in use 12.0 MiB (4.0 MiB at attach, \
                 +4.0 MiB/s), 106 goroutines (6 at attach)"
            ),
            "{text}"
        );
        // A stripped binary: the count is missing and says why.
        r.go_runtime[0].now.goroutines = None;
        r.go_runtime[0].unavailable = vec!["goroutine count: the binary is stripped".into()];
        let line = go_runtime_line(&r.go_runtime[0]);
        assert!(
            line.ends_with("+4.0 MiB/s), no goroutine count: the binary is stripped"),
            "{line}"
        );
    }
}
