//! The Python and Go sections of the document: cost per iteration against
//! the untraced run, and what it means per recorded allocation, per
//! Python frame and per sampled Go object.
//!
//! Imports: `super` (results and constants), `table`. Formats only.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    micro::Micro,
    table::{crowded_note, lost_cell, Table},
    Row, PYTHON, PY_DEEP, PY_SHALLOW,
};

/// Bytes per object of `bench/goalloc.go`.
const GO_OBJECT: u64 = 1024;

/// Thread or process CPU per iteration, wall in parentheses, and the
/// spread of the CPU figure over the phases.
fn cpu_cell(m: &Micro) -> String {
    format!(
        "{:.0} ({:.0}); {:.0}-{:.0}",
        m.ns_per_pair, m.wall_ns_per_pair, m.cpu_range.0, m.cpu_range.1
    )
}

/// The measured row labelled `label`, if it succeeded.
fn ok(rows: &[Row<Micro>], label: impl Fn(&str) -> bool) -> Option<&Micro> {
    rows.iter()
        .find(|r| label(&r.label))
        .and_then(|r| r.result.as_ref().ok())
}

pub(super) fn render_python(s: &mut String, rows: &[Row<Micro>], reps: usize) -> Result<()> {
    writeln!(
        s,
        "### Python ({PYTHON}): one 1,000-byte bytes object (malloc) and one small tuple \
         (pymalloc) per iteration"
    )?;
    writeln!(s)?;
    let mut table = Table::new(
        s,
        &[
            "configuration",
            "ns per iteration: thread CPU (wall), median; CPU range",
            "vs untraced",
            "allocations recorded per iteration",
            "events lost",
        ],
    )?;
    let base = ok(rows, |l| l.starts_with("untraced")).map(|m| m.ns_per_pair);
    for r in rows {
        table.measured(r, |m| {
            vec![
                cpu_cell(m),
                base.map_or("n/a".into(), |b| format!("{:.1}x", m.ns_per_pair / b)),
                m.report
                    .as_ref()
                    .and_then(|rep| rep.allocs)
                    .map_or("—".into(), |a| {
                        // The warm-up phase ran under the tracer too.
                        let iters = m.pairs_total as f64 * (reps as f64 + 1.0) / reps as f64;
                        format!("{:.2}", a as f64 / iters)
                    }),
                m.report.as_ref().map_or("—".into(), lost_cell),
            ]
        })?;
    }
    let crowded = table.finish()?;
    python_notes(s, rows)?;
    crowded_note(s, &crowded)
}

fn python_notes(s: &mut String, rows: &[Row<Micro>]) -> Result<()> {
    let shallow_label = format!("leaktrace, {PY_SHALLOW} frames");
    let deep_label = format!("leaktrace, {PY_DEEP} frames");
    let shallow = ok(rows, |l| l.starts_with(&shallow_label));
    let deep = ok(rows, |l| l.starts_with(&deep_label));
    if let (Some(a), Some(b)) = (shallow, deep) {
        writeln!(
            s,
            "- Python frames: {} more frames below the loop cost {:.0} ns more per iteration \
             under leaktrace, **{:.0} ns per Python frame** per recorded allocation (the \
             kernel reads each frame's code object and instruction; the untraced interpreter \
             pays for the deeper recursion only once per phase).",
            PY_DEEP - PY_SHALLOW,
            b.ns_per_pair - a.ns_per_pair,
            (b.ns_per_pair - a.ns_per_pair) / f64::from(PY_DEEP - PY_SHALLOW)
        )?;
    }
    writeln!(
        s,
        "- `--pymalloc` also probes `PyObject_Malloc`/`PyObject_Free`, whose first instruction \
         the kernel single-steps; Debian's LTO build inlines pymalloc's fast path, so it sees \
         few of the interpreter's own allocations but still pays on `PyObject_Free`."
    )?;
    Ok(())
}

pub(super) fn render_go(s: &mut String, rows: &[Row<Micro>]) -> Result<()> {
    writeln!(
        s,
        "### Go (`bench/goalloc.go`): one 1,024-byte object per iteration, kept in a ring \
         of 4,096 (the collector frees it later)"
    )?;
    writeln!(s)?;
    let mut table = Table::new(
        s,
        &[
            "configuration",
            "ns per object: process CPU (wall), median; CPU range",
            "vs untraced at the same rate",
            "sampled objects per object (1,024 / rate)",
            "ns per sampled object (probes on setprofilebucket and mProf_Free)",
        ],
    )?;
    for r in rows {
        let rate: u64 = r
            .label
            .rsplit(' ')
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or(524_288);
        let sampled = (GO_OBJECT as f64 / rate as f64).min(1.0);
        let go = r.label.split(": ").next().unwrap_or("");
        let untraced = format!("{go}: untraced, rate {rate}");
        let base = ok(rows, |l| l == untraced).map(|m| m.ns_per_pair);
        table.measured(r, |m| {
            vec![
                cpu_cell(m),
                base.map_or("n/a".into(), |b| format!("{:.2}x", m.ns_per_pair / b)),
                format!("{sampled:.4}"),
                // At the default rate the difference is below the noise.
                match (r.label.contains(": leaktrace"), base, rate <= 65_536) {
                    (true, Some(b), true) => format!("{:.0}", (m.ns_per_pair - b) / sampled),
                    _ => "—".into(),
                },
            ]
        })?;
    }
    let crowded = table.finish()?;
    writeln!(
        s,
        "- Process CPU (getrusage) over the phase, so the collector's threads count; \
         the untraced row at the same rate pays the runtime's own sampling. leaktrace \
         probes only the sampled objects (entry uprobes, no return probes), so at the \
         default rate its cost is within the noise; the dense rate shows it per sampled \
         object (two probe hits each: its bucket charge and its free).\n\
         - Probe points: from Go 1.21 both probes sit on the `PUSHQ BP` after the stack \
         check, which the kernel emulates; Go 1.19's prologue has no such instruction, so \
         its probes stay on the single-stepped entry (docs/design.md, Probe points)."
    )?;
    crowded_note(s, &crowded)
}
