//! The report: one aggregated model, several writers.
//!
//! [`Report`] is built once from the ledger, the trend fits and the
//! symbolized stacks; `text`, `json`, `folded` (collapsed stacks, also in
//! the two-column growth form), `svg` (flamegraphs) and `pprof` render it.
//! Writers are pure. The report owns its formats: [`Format`] names them
//! (the CLI's values and output file names come from it) and [`write`]
//! renders a report in any of them. `store` keeps `leaktrace node`'s
//! rendered intervals on disk within a byte bound.

pub mod folded;
pub mod format;
pub mod json;
pub mod live;
pub mod pprof;
pub mod store;
pub mod svg;
pub mod text;
pub mod trend;

pub use format::{write, Format};
use serde::Serialize;

use crate::report::trend::Trend;

pub const SCHEMA: &str = "leaktrace.report/v1";

/// Frames are what `symbolize` produces; the report carries them.
pub use crate::symbolize::{Frame, FrameKind};

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
    /// With byte sampling: the expected relative error of
    /// `outstanding_bytes` (about `sqrt(period / bytes)`); absent when exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate_rel_error: Option<f64>,
    /// Outstanding bytes at the first sample of the trace; 0 when the stack
    /// first showed up in a later sample.
    pub first_sample_bytes: i64,
    pub pids: Vec<u32>,
    pub per_pid: Vec<PidShare>,
    pub frames: Vec<Frame>,
    /// Node reports: what saw this memory grow (absent in process reports,
    /// where it is always the allocator, its mmaps and the runtimes' own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// `(seconds since start, outstanding bytes)` per sample, oldest first
    /// (thinned evenly on long traces); serialized as `[[t, bytes], ...]`.
    pub samples: Vec<(f64, i64)>,
}

impl StackReport {
    /// Outstanding bytes at the last sample (what the flamegraphs draw).
    pub fn last_sample_bytes(&self) -> i64 {
        self.samples
            .last()
            .map_or(self.outstanding_bytes, |(_, b)| *b)
    }

    /// Bytes gained between the first and the last sample.
    pub fn growth_bytes(&self) -> i64 {
        self.last_sample_bytes() - self.first_sample_bytes
    }
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
    /// The Go runtime's own figures, per traced Go process.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub go_runtime: Vec<GoRuntime>,
}

/// A Go process's runtime figures (`runtime::go`), in a report.
pub use crate::runtime::go::GoReport as GoRuntime;

/// What saw a stack's memory grow (node reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Sampled write faults on new anonymous pages: who touched new
    /// memory first.
    PageFault,
    /// Anonymous mmap and brk made outside a probed allocator.
    Mmap,
    /// Allocator probes (a drill-down).
    Allocator,
    /// The Go runtime's own heap profile.
    GoRuntime,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::PageFault,
        Source::Mmap,
        Source::Allocator,
        Source::GoRuntime,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::PageFault => "page_fault",
            Source::Mmap => "mmap",
            Source::Allocator => "allocator",
            Source::GoRuntime => "go_runtime",
        }
    }
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
    pub counters: &'a crate::ingest::events::Counters,
    pub ledger: &'a crate::ingest::ledger::Ledger,
    pub top: usize,
    pub sort: SortBy,
    pub notes: Vec<String>,
    /// Byte-sampling period (0: exact).
    pub sample_bytes: u64,
    /// The runtimes' own figures (`runtime::Runtime::figures`).
    pub figures: Vec<crate::runtime::Figures>,
}

/// Build the report: fit each stack, order, cut to `top`, then symbolize
/// only the stacks shown (`symbolize` gets them in one batch).
pub fn build(
    inputs: Inputs<'_>,
    symbolize: &mut dyn FnMut(&[crate::ingest::ledger::StackIdx]) -> Vec<Vec<Frame>>,
) -> Report {
    let mut rows: Vec<(
        crate::ingest::ledger::StackIdx,
        &crate::ingest::ledger::StackState,
        crate::report::trend::Fit,
    )> = inputs
        .ledger
        .stacks
        .iter()
        .filter(|(_, s)| s.outstanding_bytes() > 0)
        .map(|(idx, s)| {
            let pts: Vec<(f64, f64)> = s.series.iter().map(|(t, b)| (*t, *b as f64)).collect();
            let mut fit = crate::report::trend::fit(&pts, s.total_bytes() as f64);
            if pts.len() < crate::report::trend::MIN_SAMPLES && inputs.duration_s > 0.0 {
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
        // By growth: stacks whose fit says `growing` first, then the rest,
        // each by slope. A stack seen in fewer samples than a fit needs
        // only has the average since attach as its slope, and one mapping
        // made late (a thread's stack) must not outrank a steady leak.
        let key = |r: &(
            _,
            &crate::ingest::ledger::StackState,
            crate::report::trend::Fit,
        )| match inputs.sort {
            SortBy::Growth => (
                f64::from(u8::from(r.2.trend == Trend::Growing)),
                r.2.slope_bytes_per_s,
                r.1.outstanding_bytes() as f64,
            ),
            SortBy::Outstanding => (r.1.outstanding_bytes() as f64, r.2.slope_bytes_per_s, 0.0),
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
            estimate_rel_error: (inputs.sample_bytes > 0)
                .then(|| (inputs.sample_bytes as f64 / s.outstanding_bytes().max(1) as f64).sqrt()),
            // The ledger starts a stack first seen late with a (0.0, 0)
            // point, so the first point is the first sample of the trace.
            first_sample_bytes: s.series.first().map_or(0, |(_, b)| *b),
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
            source: None,
            samples: s.series.clone(),
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
        go_runtime: inputs
            .figures
            .into_iter()
            .map(|f| match f {
                crate::runtime::Figures::Go(g) => g,
            })
            .collect(),
    }
}

/// A hand-built report and golden-file checks shared by the writers' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        io::{self, Write},
        path::{Path, PathBuf},
    };

    use super::*;

    /// A reader that went away: every write fails with `BrokenPipe`.
    pub(crate) struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    fn frame(function: Option<&str>, module: Option<&str>, kind: FrameKind) -> Frame {
        Frame {
            function: function.map(str::to_string),
            module: module.map(str::to_string),
            file: None,
            line: None,
            kind,
            inlined: false,
            offset: None,
        }
    }

    fn at(mut f: Frame, file: &str, line: u32) -> Frame {
        f.file = Some(file.to_string());
        f.line = Some(line);
        f
    }

    fn stack(
        frames: Vec<Frame>,
        samples: Vec<(f64, i64)>,
        allocs: i64,
        allocated_bytes: u64,
        trend: Trend,
        pid: u32,
    ) -> StackReport {
        let outstanding_bytes = samples.last().map_or(0, |s| s.1);
        StackReport {
            outstanding_bytes,
            outstanding_allocs: allocs,
            allocated_bytes,
            allocated_count: allocs as u64 * 2,
            growth_bytes_per_s: 0.0,
            trend,
            growth_r2: 1.0,
            estimate_rel_error: None,
            first_sample_bytes: samples.first().map_or(0, |s| s.1),
            pids: vec![pid],
            per_pid: vec![PidShare {
                pid,
                outstanding_bytes,
                outstanding_allocs: allocs,
            }],
            frames,
            source: None,
            samples,
        }
    }

    /// Four stacks covering every frame kind: a native leak with an inlined
    /// call, a Python cache under an unsymbolized libpython frame (first
    /// seen after the first sample), a Go stack entering the kernel, and a
    /// Lua table.
    pub(crate) fn sample_report() -> Report {
        const LEAKY: &str = "/opt/leaky/bin/leaky";
        const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        const LIBPY: &str = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0";
        const SVC: &str = "/srv/svc/svc";
        const LIBLUA: &str = "/usr/lib/x86_64-linux-gnu/liblua5.4.so.0";
        let mut make_node = at(
            frame(Some("make_node"), Some(LEAKY), FrameKind::Native),
            "/src/leaky/list.c",
            12,
        );
        make_node.inlined = true;
        let mut unknown = frame(None, Some(LIBPY), FrameKind::Native);
        unknown.offset = Some(0x1a2b3c);
        let stacks = vec![
            stack(
                vec![
                    make_node,
                    at(
                        frame(Some("list_push"), Some(LEAKY), FrameKind::Native),
                        "/src/leaky/list.c",
                        30,
                    ),
                    at(
                        frame(Some("main"), Some(LEAKY), FrameKind::Native),
                        "/src/leaky/main.c",
                        55,
                    ),
                    frame(
                        Some("__libc_start_call_main"),
                        Some(LIBC),
                        FrameKind::Native,
                    ),
                ],
                vec![
                    (0.5, 102_400),
                    (1.0, 204_800),
                    (1.5, 307_200),
                    (2.0, 409_600),
                ],
                100,
                819_200,
                Trend::Growing,
                4242,
            ),
            stack(
                vec![
                    unknown,
                    at(
                        frame(Some("Cache.put"), None, FrameKind::Python),
                        "/app/cache.py",
                        40,
                    ),
                    at(
                        frame(Some("<module>"), None, FrameKind::Python),
                        "/app/cache.py",
                        88,
                    ),
                ],
                vec![(0.0, 0), (1.5, 65_536), (2.0, 65_536)],
                16,
                65_536,
                Trend::Plateau,
                4243,
            ),
            stack(
                vec![
                    frame(Some("__x64_sys_mmap"), None, FrameKind::Kernel),
                    at(
                        frame(Some("runtime.sysAlloc"), Some(SVC), FrameKind::Go),
                        "/usr/lib/go/src/runtime/malloc.go",
                        700,
                    ),
                    at(
                        frame(Some("main.(*Server).handle"), Some(SVC), FrameKind::Go),
                        "/srv/svc/server.go",
                        120,
                    ),
                ],
                vec![(0.5, 8_192), (1.0, 8_192), (1.5, 12_288), (2.0, 16_384)],
                4,
                16_384,
                Trend::Growing,
                4244,
            ),
            stack(
                vec![
                    frame(Some("luaM_malloc_"), Some(LIBLUA), FrameKind::Native),
                    at(frame(Some("grow"), None, FrameKind::Lua), "game.lua", 7),
                    at(
                        frame(Some("main chunk"), None, FrameKind::Lua),
                        "game.lua",
                        1,
                    ),
                ],
                vec![(0.5, 3_000), (1.0, 2_000), (1.5, 1_000), (2.0, 1_000)],
                10,
                9_000,
                Trend::Shrinking,
                4245,
            ),
        ];
        Report {
            schema: SCHEMA,
            duration_s: 2.0,
            targets: vec![
                Target {
                    pid: 4242,
                    comm: "leaky".into(),
                    status: "running".into(),
                },
                Target {
                    pid: 4243,
                    comm: "python3".into(),
                    status: "exited".into(),
                },
            ],
            totals: Totals {
                outstanding_bytes: stacks.iter().map(|s| s.outstanding_bytes).sum(),
                outstanding_allocs: stacks.iter().map(|s| s.outstanding_allocs).sum(),
                lost_events: 3,
            },
            counters: Default::default(),
            stacks,
            stacks_omitted: 0,
            notes: vec!["lua frames come from the interpreter's own stack".into()],
            go_runtime: vec![GoRuntime {
                pid: 4244,
                version: "go1.19.8".into(),
                at_attach: crate::runtime::go::stats::GoFigures {
                    heap_inuse_bytes: Some(4_194_304),
                    goroutines: Some(6),
                },
                now: crate::runtime::go::stats::GoFigures {
                    heap_inuse_bytes: Some(12_582_912),
                    goroutines: Some(106),
                },
                elapsed_s: 2.0,
                unavailable: Vec::new(),
            }],
        }
    }

    /// `tests/data/<rel>` in the workspace.
    pub(crate) fn golden_path(rel: &str) -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data")).join(rel)
    }

    pub(crate) fn blessing() -> bool {
        std::env::var_os("LEAKTRACE_BLESS").is_some_and(|v| v == "1")
    }

    /// Compare `actual` with the golden file `tests/data/<rel>`, or rewrite
    /// the file when `LEAKTRACE_BLESS=1`.
    pub(crate) fn check_golden(rel: &str, actual: &str) {
        let path = golden_path(rel);
        if blessing() {
            bless(&path, actual.as_bytes());
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read golden file {}: {e}; create it with LEAKTRACE_BLESS=1",
                path.display()
            )
        });
        if expected != actual {
            panic!(
                "output differs from golden file {} (- expected, + actual):\n{}\n\
                 if the change is intended, rerun with LEAKTRACE_BLESS=1 and review the diff",
                path.display(),
                line_diff(&expected, actual)
            );
        }
    }

    /// Write a golden file (only when blessing).
    pub(crate) fn bless(path: &Path, bytes: &[u8]) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        std::fs::write(path, bytes)
            .unwrap_or_else(|e| panic!("cannot write golden file {}: {e}", path.display()));
    }

    /// A line diff (longest common subsequence) with a little context.
    fn line_diff(expected: &str, actual: &str) -> String {
        let a: Vec<&str> = expected.lines().collect();
        let b: Vec<&str> = actual.lines().collect();
        let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i][j] = if a[i] == b[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let mut ops = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                ops.push((' ', a[i]));
                i += 1;
                j += 1;
            } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
                ops.push(('-', a[i]));
                i += 1;
            } else {
                ops.push(('+', b[j]));
                j += 1;
            }
        }
        const CONTEXT: usize = 2;
        let near_change = |k: usize| {
            ops[k.saturating_sub(CONTEXT)..(k + CONTEXT + 1).min(ops.len())]
                .iter()
                .any(|(op, _)| *op != ' ')
        };
        let mut out = String::new();
        let mut skipped = false;
        for (k, (op, line)) in ops.iter().enumerate() {
            if near_change(k) {
                if skipped {
                    out.push_str("  ...\n");
                    skipped = false;
                }
                out.push_str(&format!("{op} {line}\n"));
            } else {
                skipped = true;
            }
        }
        if expected.ends_with('\n') != actual.ends_with('\n') {
            out.push_str("(the files differ in their final newline)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::ledger::{Ledger, Row};

    fn row(stack: u32, bytes: i64) -> Row {
        Row {
            stack,
            pid: 7,
            totals: tracer_common::StackTotals {
                outstanding_bytes: bytes,
                outstanding_allocs: 1,
                total_bytes: bytes as u64,
                total_allocs: 1,
            },
        }
    }

    #[test]
    fn stacks_carry_their_series_and_first_sample() {
        let mut ledger = Ledger::default();
        ledger.ingest(1.0, &[row(1, 100)]);
        ledger.ingest(2.0, &[row(1, 300), row(2, 50)]);
        let counters = crate::ingest::events::Counters(Default::default());
        let report = build(
            Inputs {
                duration_s: 2.0,
                targets: vec![],
                counters: &counters,
                ledger: &ledger,
                top: 10,
                sort: SortBy::Outstanding,
                notes: vec![],
                sample_bytes: 0,
                figures: vec![],
            },
            &mut |idxs| idxs.iter().map(|_| Vec::new()).collect(),
        );
        let early = &report.stacks[0];
        assert_eq!(early.first_sample_bytes, 100);
        assert_eq!(early.samples, vec![(1.0, 100), (2.0, 300)]);
        assert_eq!(early.growth_bytes(), 200);
        let late = &report.stacks[1];
        assert_eq!(
            late.first_sample_bytes, 0,
            "first seen in the second sample"
        );
        assert_eq!(late.samples, vec![(0.0, 0), (2.0, 50)]);

        let json = serde_json::to_value(&report).expect("report serializes");
        assert_eq!(
            json["stacks"][0]["samples"],
            serde_json::json!([[1.0, 100], [2.0, 300]])
        );
        assert_eq!(json["stacks"][1]["first_sample_bytes"], 0);
    }
}
