//! The report: one aggregated model, several writers.
//!
//! [`Report`] is built once from the ledger, the trend fits and the
//! symbolized stacks; `text` and `json` render it. Writers are pure.

pub mod json;
pub mod text;

use serde::Serialize;

use crate::trend::Trend;

pub const SCHEMA: &str = "leaktrace.report/v1";

/// What kind of code a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FrameKind {
    Native,
    Python,
    Lua,
    Go,
    Kernel,
}

/// One frame, innermost first within a stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// Plain function name (demangled, no `+offset`), `null` if unknown.
    pub function: Option<String>,
    /// Object path as the traced process sees it.
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub kind: FrameKind,
    /// True for a call that the compiler inlined into the next frame.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// File offset in `module` (or the raw address when there is no
    /// module) when the function is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    /// `running`, `exited`, or `not attached: <why>`.
    pub status: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub outstanding_bytes: i64,
    pub outstanding_allocs: i64,
    /// Events that could not be recorded (every loss counter together).
    pub lost_events: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PidShare {
    pub pid: u32,
    pub outstanding_bytes: i64,
    pub outstanding_allocs: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StackReport {
    pub outstanding_bytes: i64,
    pub outstanding_allocs: i64,
    /// Bytes ever allocated from this stack since attach (freed or not).
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub growth_bytes_per_s: f64,
    pub trend: Trend,
    /// Goodness of the growth line's fit (R²).
    pub growth_r2: f64,
    pub pids: Vec<u32>,
    pub per_pid: Vec<PidShare>,
    pub frames: Vec<Frame>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub duration_s: f64,
    pub targets: Vec<Target>,
    pub totals: Totals,
    /// Every kernel counter by name: allocations, frees, and each kind of
    /// loss.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Stacks with memory outstanding, most important first.
    pub stacks: Vec<StackReport>,
    /// Stacks with memory outstanding that did not fit in `--top`.
    pub stacks_omitted: usize,
    /// What leaktrace could not see, in words.
    pub notes: Vec<String>,
}

/// How stacks are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Fastest-growing first (the default: leaks before caches).
    Growth,
    /// Most outstanding bytes first.
    Outstanding,
}

/// Everything a report is made of, before symbolization.
pub struct Inputs<'a> {
    pub duration_s: f64,
    pub targets: Vec<Target>,
    pub counters: &'a crate::events::Counters,
    pub ledger: &'a crate::ledger::Ledger,
    pub top: usize,
    pub sort: SortBy,
    pub notes: Vec<String>,
}

/// Build the report: fit each stack, order, cut to `top`, then symbolize
/// only the stacks shown (`symbolize` gets them in one batch).
pub fn build(
    inputs: Inputs<'_>,
    symbolize: &mut dyn FnMut(&[crate::ledger::StackIdx]) -> Vec<Vec<Frame>>,
) -> Report {
    let mut rows: Vec<(
        crate::ledger::StackIdx,
        &crate::ledger::StackState,
        crate::trend::Fit,
    )> = inputs
        .ledger
        .stacks
        .iter()
        .filter(|(_, s)| s.outstanding_bytes() > 0)
        .map(|(idx, s)| {
            let pts: Vec<(f64, f64)> = s.series.iter().map(|(t, b)| (*t, *b as f64)).collect();
            let mut fit = crate::trend::fit(&pts, s.total_bytes() as f64);
            if pts.len() < crate::trend::MIN_SAMPLES && inputs.duration_s > 0.0 {
                // Too short to fit a line: growth since attach.
                fit.slope_bytes_per_s = s.outstanding_bytes() as f64 / inputs.duration_s;
            }
            (*idx, s, fit)
        })
        .collect();
    let totals = Totals {
        outstanding_bytes: rows.iter().map(|r| r.1.outstanding_bytes()).sum(),
        outstanding_allocs: rows.iter().map(|r| r.1.outstanding_allocs()).sum(),
        lost_events: inputs.counters.lost(),
    };
    rows.sort_by(|a, b| {
        let key = |r: &(_, &crate::ledger::StackState, crate::trend::Fit)| match inputs.sort {
            SortBy::Growth => (r.2.slope_bytes_per_s, r.1.outstanding_bytes() as f64),
            SortBy::Outstanding => (r.1.outstanding_bytes() as f64, r.2.slope_bytes_per_s),
        };
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    let omitted = rows.len().saturating_sub(inputs.top);
    rows.truncate(inputs.top);
    let idxs: Vec<_> = rows.iter().map(|r| r.0).collect();
    let frames = symbolize(&idxs);
    let stacks = rows
        .iter()
        .zip(frames)
        .map(|((_, s, fit), frames)| StackReport {
            outstanding_bytes: s.outstanding_bytes(),
            outstanding_allocs: s.outstanding_allocs(),
            allocated_bytes: s.total_bytes(),
            allocated_count: s.total_allocs(),
            growth_bytes_per_s: fit.slope_bytes_per_s,
            trend: fit.trend,
            growth_r2: fit.r2,
            pids: s.pids(),
            per_pid: s
                .per_pid
                .iter()
                .filter(|(_, t)| t.outstanding_allocs > 0)
                .map(|(pid, t)| PidShare {
                    pid: *pid,
                    outstanding_bytes: t.outstanding_bytes,
                    outstanding_allocs: t.outstanding_allocs,
                })
                .collect(),
            frames,
        })
        .collect();
    Report {
        schema: SCHEMA,
        duration_s: inputs.duration_s,
        targets: inputs.targets,
        totals,
        counters: inputs
            .counters
            .0
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
        stacks,
        stacks_omitted: omitted,
        notes: inputs.notes,
    }
}
