//! `cargo xtask bench`: what tracing costs a process, as a table.
//!
//! Inputs: the release `leaktrace` binary, the C programs in `bench/`
//! (built here with gcc -O2), Debian's nginx and its Lua module, wrk and
//! bcc's memleak.
//! Output: Markdown tables on stdout and, between the `bench:begin` and
//! `bench:end` markers, in `docs/benchmarks.md` (text outside the markers is
//! kept, so the interpretation written by hand survives a re-run).
//!
//! Rows, one tracer process per row:
//! - `bench/mallocbench.c`: 2 threads of malloc/free pairs (16..4096
//!   bytes), untraced, under leaktrace (default `free` probe point, the
//!   single-stepped entry point, sampled mode when the binary has it), under
//!   bcc memleak, and under `bench/floor.py` (empty eBPF programs on the three
//!   probe points: the trap cost alone). Median of `--reps` phases after one
//!   warm-up phase.
//! - `bench/footprint.c`: leaktrace's peak RSS holding 1,000,000 live
//!   allocations from 10,000 stacks, and the wall time of its final report
//!   (SIGINT to exit) for 100,000 live allocations from 10,000 stacks.
//! - `bench/pyalloc.py` and `bench/goalloc.go`: the cost per allocation in
//!   a Python and a Go program.
//! - nginx (1 worker, loopback, own config and pid file in
//!   `target/bench/nginx`) under `wrk`: requests/s untraced and traced.
//! - nginx with its Lua module (`target/bench/nginx-lua`): a location whose
//!   `content_by_lua_block` runs `bench/luabench.lua` (a record of 20 fields
//!   and a few strings per request, concatenated into the answer, kept in a
//!   cache bounded to 1,000 records) under `wrk`: requests/s and worker CPU
//!   per request untraced, under leaktrace exact (every allocation, LuaJIT's
//!   `lj_alloc_*` included) and under `--sample-bytes 524288`.
//! - node mode (`leaktrace node`, not attached to the worker: it watches
//!   the machine), in the static nginx table: tiers 0-1 (`--no-drill`,
//!   every process), and a drill-down forced onto the worker
//!   (`--drill-pid`) under the default 1% budget and under a budget that
//!   never ends it; then, on its own, `leaktrace node --no-drill` on a
//!   machine without a workload: its CPU over a steady window after a
//!   warm-up, and its memory (`node`).
//!
//! `--only SECTION` measures some sections and prints their tables
//! without writing `docs/benchmarks.md` (whose block is a whole run).
//!
//! bcc tools run through `bench/bcc_refctr0.py`, which fixes the
//! ref_ctr_offset their Python binding leaves to chance (iovisor/bcc#5236)
//! so they coexist with other tracers of libc.
//!
//! Every tracer runs under GNU time, which reports its CPU time and peak RSS
//! once it has exited. Every child sits in a guard that kills it on drop;
//! Ctrl-C reaches the children directly (same process group), and each of
//! them exits on SIGINT.
//!
//! This file runs the measurements in order and holds the table of
//! configurations (which rows, with which flags and sizes). The others:
//! - `workloads`: builds leaktrace, the C programs and the Go program.
//! - `harness`: a child read line by line and a tracer under GNU time, on
//!   leaktrace-tests' harness; leaktrace's JSON report.
//! - `procfs`, `watch`: figures from /proc; other tracers on the machine.
//! - `micro` (the phase protocol and the malloc/free rows), `footprint`,
//!   `nginx`, `memleak` (bcc: memleak, the floor, their kernel setup),
//!   `runtimes` (Python, Go), `node` (node mode on a quiet machine): the
//!   measurements. They import this file, `harness` and `procfs`, never
//!   the rendering.
//! - `render`, `render_runtimes`, `render_node`, `table`: the Markdown.
//!   They import the result types and this file's constants, and measure
//!   nothing.

mod footprint;
mod harness;
mod memleak;
mod micro;
mod nginx;
mod node;
mod procfs;
mod render;
mod render_node;
mod render_runtimes;
mod runtimes;
mod table;
mod watch;
mod workloads;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{ensure_packages, is_root, output, setup, workspace_root};
use footprint::Footprint;
use harness::{read_node_report, read_report, LeaktraceReport, NodeFigures, Tracer};
use micro::Micro;
use nginx::{NginxResult, Site};
use node::NodeIdle;
use watch::Watch;

/// Always needed: the compiler, GNU time (tracer CPU and RSS), kill.
const CORE_PACKAGES: &[&str] = &["gcc", "libc6-dev", "time", "procps"];
/// The realistic workload.
const NGINX_PACKAGES: &[&str] = &["nginx", "wrk"];
/// nginx's Lua module (with LuaJIT and lua-resty-core), for the Lua rows.
const LUA_PACKAGES: &[&str] = &["libnginx-mod-http-lua"];

/// A part of the run, for `cargo xtask bench --only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Section {
    /// malloc/free pairs (leaktrace, bcc memleak, the floor) and
    /// leaktrace's footprint.
    Malloc,
    /// Python allocations.
    Python,
    /// Go allocations (builds bench/goalloc.go with two toolchains).
    Go,
    /// nginx serving a static page, under the process-mode tracers.
    Nginx,
    /// nginx with its Lua module.
    Lua,
    /// Node mode: its rows of the nginx table (beside the untraced row)
    /// and `leaktrace node` on a quiet machine.
    Node,
}

/// The sections a run measures: every one unless `--only` named some.
#[derive(Clone, Debug)]
pub(crate) struct Sections(Vec<Section>);

impl Sections {
    pub(crate) fn new(only: &[Section]) -> Sections {
        Sections(only.to_vec())
    }

    fn has(&self, s: Section) -> bool {
        self.0.is_empty() || self.0.contains(&s)
    }

    /// A whole run, the only kind that rewrites docs/benchmarks.md.
    fn all(&self) -> bool {
        self.0.is_empty()
    }
}

pub(crate) fn bench(reps: usize, sections: Sections) -> Result<()> {
    if reps == 0 {
        bail!("--reps must be at least 1");
    }
    if !is_root() {
        bail!("the benchmark loads eBPF programs and installs packages; run it as root");
    }
    let started = Instant::now();
    setup(false)?;
    ensure_packages(CORE_PACKAGES)?;
    let wants_nginx = [Section::Nginx, Section::Lua, Section::Node]
        .into_iter()
        .any(|s| sections.has(s));
    let nginx_ready = if wants_nginx {
        ensure_packages(NGINX_PACKAGES).map_err(|e| format!("{e:#}"))
    } else {
        Err("not asked for".into())
    };
    let lua_ready = if sections.has(Section::Lua) {
        nginx_ready
            .clone()
            .and_then(|()| ensure_packages(LUA_PACKAGES).map_err(|e| format!("{e:#}")))
    } else {
        Err("not asked for".into())
    };
    let bcc_ready = if sections.has(Section::Malloc) || sections.has(Section::Nginx) {
        memleak::ready()
    } else {
        Err("not asked for".into())
    };
    let ctx = Ctx::prepare(reps, sections)?;
    let results = measure_all(&ctx, nginx_ready, lua_ready, &bcc_ready);
    let doc = render::render(&ctx, &results, started.elapsed())?;
    println!("{doc}");
    if ctx.sections.all() {
        let path = workspace_root().join("docs").join("benchmarks.md");
        render::write_doc(&path, &doc)?;
        eprintln!(
            "xtask: bench: wrote {} ({:.0} s)",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "xtask: bench: measured {:?} only ({:.0} s); docs/benchmarks.md is written by a whole run",
            ctx.sections.0,
            started.elapsed().as_secs_f64()
        );
    }
    results.fail_on_leaktrace_errors()
}

/// leaktrace's footprint: live allocations held for the peak RSS, live
/// allocations at the timed final report, and the stacks they come from.
const FOOTPRINT_ALLOCS: u64 = 1_000_000;
const REPORT_ALLOCS: u64 = 100_000;
const FOOTPRINT_STACKS: u64 = 10_000;

/// Every row of the sections asked for: malloc/free, footprint, Python,
/// Go, then nginx and nginx with Lua when their packages could be
/// installed, then node mode on a quiet machine.
fn measure_all(
    ctx: &Ctx,
    nginx_ready: Result<(), String>,
    lua_ready: Result<(), String>,
    bcc_ready: &Result<(), String>,
) -> Results {
    let has = |s| ctx.sections.has(s);
    let micro = if has(Section::Malloc) {
        micro_rows(ctx, bcc_ready)
    } else {
        Vec::new()
    };
    let footprint = has(Section::Malloc).then(|| {
        [
            (FOOTPRINT_ALLOCS, "leaktrace footprint"),
            (REPORT_ALLOCS, "leaktrace final report"),
        ]
        .map(|(allocs, section)| {
            let label = format!("{allocs} live allocations");
            measure_row(ctx, section, label, || footprint::measure(ctx, allocs))
        })
    });
    let python = if has(Section::Python) {
        eprintln!("xtask: bench: python ({PYTHON})");
        py_specs(ctx)
            .into_iter()
            .map(|(label, depth, kind, iters)| {
                measure_row(ctx, "python", label, || {
                    runtimes::measure_python(ctx, depth, &kind, iters)
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let go = if has(Section::Go) {
        eprintln!("xtask: bench: go (bench/goalloc.go)");
        go_specs(ctx)
            .into_iter()
            .map(|(label, toolchain, rate, kind, iters)| {
                measure_row(ctx, "go", label, || {
                    runtimes::measure_go(ctx, toolchain, rate, &kind, iters)
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let nginx = (has(Section::Nginx) || has(Section::Node)).then(|| {
        nginx_ready.and_then(|()| {
            eprintln!("xtask: bench: nginx under wrk");
            nginx::measure(ctx, Site::Static, nginx_specs(ctx), bcc_ready)
                .map_err(|e| format!("{e:#}"))
        })
    });
    let nginx_lua = has(Section::Lua).then(|| {
        lua_ready.and_then(|()| {
            eprintln!("xtask: bench: nginx with Lua under wrk");
            nginx::measure(ctx, Site::Lua, lua_specs(ctx), bcc_ready).map_err(|e| format!("{e:#}"))
        })
    });
    let node_idle = has(Section::Node).then(|| {
        let label = "leaktrace node --no-drill".to_string();
        measure_row(ctx, "node mode, quiet machine", label, || {
            node::measure(ctx)
        })
    });
    Results {
        micro,
        footprint,
        nginx,
        nginx_lua,
        python,
        go,
        node_idle,
    }
}

/// The malloc/free rows. The floor probes `free` where leaktrace did, so
/// it runs after the leaktrace rows and learns the offset from them.
fn micro_rows(ctx: &Ctx, bcc_ready: &Result<(), String>) -> Vec<(Spec, Row<Micro>)> {
    let mut free_offset = None;
    let mut rows = Vec::new();
    for spec in micro_specs(ctx) {
        let row = measure_row(ctx, "mallocbench", spec.label.clone(), || {
            match (&spec.kind, bcc_ready) {
                (Kind::Unavailable(why), _) | (Kind::Memleak | Kind::Floor, Err(why)) => {
                    bail!("{why}")
                }
                (Kind::Floor, Ok(())) => memleak::measure_floor(ctx, spec.pairs, free_offset),
                (kind, _) => micro::measure(ctx, kind, spec.pairs, None),
            }
        });
        if let (Kind::Leaktrace { .. }, Ok(m)) = (&spec.kind, &row.result) {
            free_offset = free_offset.or(m.free_offset);
        }
        rows.push((spec, row));
    }
    rows
}

/// Measures one row once other tracers have finished (within the
/// watch's budget), and notes those that ran alongside anyway.
fn measure_row<T>(
    ctx: &Ctx,
    section: &str,
    label: String,
    measure: impl FnOnce() -> Result<T>,
) -> Row<T> {
    eprintln!("xtask: bench: {section}, {label}");
    ctx.watch.wait_quiet();
    let started = Instant::now();
    let result = measure().map_err(|e| format!("{e:#}"));
    if let Err(e) = &result {
        eprintln!("xtask: bench: {section}, {label}: {e}");
    }
    Row {
        label,
        result,
        others: ctx.watch.seen_since(started),
    }
}

/// One measured row: its label, what it measured or why not, and the
/// other eBPF tracers seen on the machine while it ran.
struct Row<T> {
    label: String,
    result: Result<T, String>,
    others: Vec<String>,
}

/// Everything the document shows; a section not measured (`--only`) is
/// empty or `None`.
struct Results {
    micro: Vec<(Spec, Row<Micro>)>,
    /// 1,000,000 live allocations (peak RSS), then 100,000 (final report).
    footprint: Option<[Row<Footprint>; 2]>,
    nginx: Option<Result<Vec<Row<NginxResult>>, String>>,
    /// The same nginx serving `bench/luabench.lua`.
    nginx_lua: Option<Result<Vec<Row<NginxResult>>, String>>,
    python: Vec<Row<Micro>>,
    go: Vec<Row<Micro>>,
    /// `leaktrace node --no-drill` on a quiet machine.
    node_idle: Option<Row<NodeIdle>>,
}

impl Results {
    /// The run fails when a leaktrace row did (the others depend on what
    /// the machine has).
    fn fail_on_leaktrace_errors(&self) -> Result<()> {
        let footprint = self.footprint.iter().flat_map(|[big, small]| {
            [
                big.result.is_err().then_some("footprint"),
                small.result.is_err().then_some("final report"),
            ]
        });
        let node_idle = self.node_idle.iter().filter(|r| r.result.is_err());
        let failed: Vec<&str> = self
            .micro
            .iter()
            .filter(|(s, r)| matches!(s.kind, Kind::Leaktrace { .. }) && r.result.is_err())
            .map(|(s, _)| s.label.as_str())
            .chain(footprint.flatten())
            .chain(node_idle.map(|_| "node mode on a quiet machine"))
            .collect();
        if !failed.is_empty() {
            bail!("leaktrace rows failed: {}", failed.join(", "));
        }
        Ok(())
    }
}

/// Paths and facts shared by every measurement.
struct Ctx {
    reps: usize,
    sections: Sections,
    dir: PathBuf,
    leaktrace: PathBuf,
    mallocbench: PathBuf,
    footprint: PathBuf,
    floor_py: PathBuf,
    pyalloc: PathBuf,
    /// The Lua rows' module, copied next to their nginx config.
    luabench: PathBuf,
    /// `bench/goalloc.go` built with Debian's `go` and with the newest
    /// official toolchain of the test matrix: (label, build or why not).
    goalloc: Vec<(String, workloads::GoBuild)>,
    /// Runs a bcc tool with uprobes attached with ref_ctr_offset 0.
    bcc_refctr0: PathBuf,
    has_sample_bytes: bool,
    clk_tck: f64,
    /// /proc/loadavg when the measurements began: others may be compiling
    /// on the same cores.
    load_before: String,
    watch: Watch,
}

impl Ctx {
    fn prepare(reps: usize, sections: Sections) -> Result<Ctx> {
        let root = workspace_root();
        let dir = root.join("target").join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        let leaktrace = workloads::leaktrace(&dir)?;
        let help = output(Command::new(&leaktrace).arg("--help"))?;
        let src = root.join("bench");
        let [mallocbench, footprint] = workloads::compile_c(&src, &dir)?;
        let goalloc = if sections.has(Section::Go) {
            workloads::build_goalloc(&src)
        } else {
            Vec::new()
        };
        Ok(Ctx {
            reps,
            sections,
            dir,
            leaktrace,
            mallocbench,
            footprint,
            floor_py: src.join("floor.py"),
            pyalloc: src.join("pyalloc.py"),
            luabench: src.join("luabench.lua"),
            goalloc,
            bcc_refctr0: src.join("bcc_refctr0.py"),
            has_sample_bytes: help.contains("--sample-bytes"),
            clk_tck: procfs::clk_tck(),
            load_before: procfs::loadavg(),
            watch: Watch::start(),
        })
    }

    /// Where leaktrace writes the report called `name`, with last run's
    /// removed (a row that fails must not read an old one).
    fn fresh_report(&self, name: &str) -> PathBuf {
        let json = self.dir.join(name);
        let _ = fs::remove_file(&json);
        json
    }
}

/// How a row's program is traced.
#[derive(Clone)]
enum Kind {
    Untraced,
    Leaktrace {
        extra: Vec<String>,
    },
    /// `leaktrace node` with `extra` flags, watching the machine rather
    /// than attached to the row's process; with `drill`, it drills down
    /// into that process at once (`--drill-pid`).
    Node {
        extra: Vec<String>,
        drill: bool,
    },
    Memleak,
    Floor,
    /// A row that cannot run, with the reason.
    Unavailable(String),
}

impl Kind {
    fn leaktrace(extra: &[&str]) -> Kind {
        Kind::Leaktrace {
            extra: extra.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn node(extra: &[&str], drill: bool) -> Kind {
        Kind::Node {
            extra: extra.iter().map(|e| e.to_string()).collect(),
            drill,
        }
    }

    /// The tracer of this configuration attached to `pid` (none when
    /// untraced); leaktrace writes its report to `json`, the floor probes
    /// `free` at `floor_offset` (9 when not known).
    fn attach(
        &self,
        ctx: &Ctx,
        pid: u32,
        json: &Path,
        floor_offset: Option<u64>,
    ) -> Result<Option<Tracer>> {
        Ok(Some(match self {
            Kind::Untraced => return Ok(None),
            Kind::Unavailable(why) => bail!("{why}"),
            Kind::Leaktrace { extra } => Tracer::leaktrace(ctx, pid, json, extra)?,
            Kind::Node { extra, drill } => Tracer::node(ctx, json, extra, drill.then_some(pid))?,
            Kind::Memleak => memleak::memleak(ctx, pid)?,
            Kind::Floor => memleak::floor(ctx, pid, floor_offset.unwrap_or(9))?,
        }))
    }

    /// leaktrace's report of a finished row (other tracers write none).
    fn report(&self, json: &Path) -> Result<Option<LeaktraceReport>> {
        matches!(self, Kind::Leaktrace { .. })
            .then(|| read_report(json))
            .transpose()
    }

    /// The figures of `leaktrace node`'s report of a finished row.
    fn node_report(&self, json: &Path) -> Result<Option<NodeFigures>> {
        matches!(self, Kind::Node { .. })
            .then(|| read_node_report(json))
            .transpose()
    }
}

/// Threads of mallocbench.
const THREADS: u32 = 2;
/// Pairs per thread and phase, sized for about a second per phase.
const UNTRACED_PAIRS: u64 = 20_000_000;
const TRACED_PAIRS: u64 = 300_000;
/// For tracers that cost 20-40 µs per pair.
const SLOW_PAIRS: u64 = 30_000;
const SAMPLE_BYTES: &str = "524288";

/// A malloc/free row: its label, configuration, and pairs per thread
/// and phase.
struct Spec {
    label: String,
    kind: Kind,
    pairs: u64,
}

fn micro_specs(ctx: &Ctx) -> Vec<Spec> {
    let spec = |label: &str, kind: Kind, pairs| Spec {
        label: label.to_string(),
        kind,
        pairs,
    };
    vec![
        spec("untraced", Kind::Untraced, UNTRACED_PAIRS),
        spec(
            "leaktrace (free probe at free+9)",
            Kind::leaktrace(&[]),
            TRACED_PAIRS,
        ),
        spec(
            "leaktrace --free-probe-at-entry",
            Kind::leaktrace(&["--free-probe-at-entry"]),
            SLOW_PAIRS,
        ),
        spec(
            "leaktrace --sample-bytes 524288",
            if ctx.has_sample_bytes {
                Kind::leaktrace(&["--sample-bytes", SAMPLE_BYTES])
            } else {
                Kind::Unavailable("n/a: this leaktrace has no --sample-bytes".into())
            },
            TRACED_PAIRS,
        ),
        spec("bcc memleak-bpfcc", Kind::Memleak, SLOW_PAIRS),
        spec("floor: 3 empty probes (bcc)", Kind::Floor, TRACED_PAIRS),
    ]
}

/// The nginx rows: the malloc/free configurations that make sense for a
/// server (no floor; the sampled mode only when the binary has it), then
/// node mode's (section `node`).
fn nginx_specs(ctx: &Ctx) -> Vec<(&'static str, Kind)> {
    let mut specs = vec![("untraced", Kind::Untraced)];
    if ctx.sections.has(Section::Nginx) {
        specs.extend([
            ("leaktrace (free probe at free+9)", Kind::leaktrace(&[])),
            (
                "leaktrace --free-probe-at-entry",
                Kind::leaktrace(&["--free-probe-at-entry"]),
            ),
        ]);
        if ctx.has_sample_bytes {
            specs.push((
                "leaktrace --sample-bytes 524288",
                Kind::leaktrace(&["--sample-bytes", SAMPLE_BYTES]),
            ));
        }
        specs.push(("bcc memleak-bpfcc", Kind::Memleak));
    }
    if ctx.sections.has(Section::Node) {
        specs.extend(node_specs());
    }
    specs
}

/// The label of node mode's row without drill-downs (its targets are
/// checked under the table).
const NODE_TIERS01: &str = "node mode (tiers 0-1)";

/// A drill-down longer than any row, so that only the budget (or the
/// end of the row) ends it.
const NODE_DRILL_FOR: &str = "600";

/// Node mode beside nginx: tiers 0-1 watching every process; a
/// drill-down forced onto the worker (it does not grow, so the census
/// would never pick it) under the default budget of 1% of one core; and
/// the same drill-down under a budget it cannot reach, for what the
/// probes cost while they stay on.
fn node_specs() -> [(&'static str, Kind); 3] {
    let drill = |budget| {
        Kind::node(
            &["--drill-for", NODE_DRILL_FOR, "--budget-cpu", budget],
            true,
        )
    };
    [
        (NODE_TIERS01, Kind::node(&["--no-drill"], false)),
        ("node mode, drill-down on nginx", drill("1")),
        (
            "node mode, drill-down on nginx, --budget-cpu 100",
            drill("100"),
        ),
    ]
}

/// The Lua rows: exact (the default) and sampled, the modes a Lua
/// server would run under (the sampled one only when the binary has it).
fn lua_specs(ctx: &Ctx) -> Vec<(&'static str, Kind)> {
    let mut specs = vec![
        ("untraced", Kind::Untraced),
        ("leaktrace (exact)", Kind::leaktrace(&[])),
    ];
    if ctx.has_sample_bytes {
        specs.push((
            "leaktrace --sample-bytes 524288",
            Kind::leaktrace(&["--sample-bytes", SAMPLE_BYTES]),
        ));
    }
    specs
}

/// The interpreter of the Python rows (Debian's, installed with the tests).
const PYTHON: &str = "/usr/bin/python3.11";
/// Python frames below the loop in the shallow and the deep rows.
const PY_SHALLOW: u32 = 5;
const PY_DEEP: u32 = 25;

/// (label, depth, configuration, iterations per phase).
fn py_specs(ctx: &Ctx) -> Vec<(String, u32, Kind, u64)> {
    let lt = Kind::leaktrace;
    let mut v = vec![
        (
            format!("untraced, {PY_SHALLOW} frames"),
            PY_SHALLOW,
            Kind::Untraced,
            2_000_000,
        ),
        (
            format!("leaktrace, {PY_SHALLOW} frames"),
            PY_SHALLOW,
            lt(&[]),
            200_000,
        ),
        (
            format!("leaktrace, {PY_DEEP} frames"),
            PY_DEEP,
            lt(&[]),
            200_000,
        ),
    ];
    if ctx.has_sample_bytes {
        v.push((
            format!("leaktrace --sample-bytes {SAMPLE_BYTES}, {PY_SHALLOW} frames"),
            PY_SHALLOW,
            lt(&["--sample-bytes", SAMPLE_BYTES]),
            200_000,
        ));
    }
    v.push((
        format!("leaktrace --pymalloc, {PY_SHALLOW} frames"),
        PY_SHALLOW,
        lt(&["--pymalloc"]),
        5_000,
    ));
    v
}

/// The runtime's default sampling rate, and a dense one that samples
/// about one object in four, to show the cost per sampled object.
const GO_RATES: [u64; 2] = [524_288, 4096];

/// (label, toolchain index in `Ctx::goalloc`, MemProfileRate,
/// configuration, objects per phase).
fn go_specs(ctx: &Ctx) -> Vec<(String, usize, u64, Kind, u64)> {
    let mut v = Vec::new();
    for (i, (go, _)) in ctx.goalloc.iter().enumerate() {
        for rate in GO_RATES {
            let label = |what: &str| format!("{go}: {what}, rate {rate}");
            v.push((label("untraced"), i, rate, Kind::Untraced, 2_000_000));
            v.push((label("leaktrace"), i, rate, Kind::leaktrace(&[]), 1_000_000));
        }
    }
    v
}

/// `s` on one line for a table cell or a log line, at most about 300
/// characters.
fn one_line(s: &str) -> String {
    // Errors name the action first and the cause last: keep both ends.
    let s = s.replace(['\n', '|'], " ");
    let chars: Vec<char> = s.chars().collect();
    if chars.len() > 320 {
        let head: String = chars[..120].iter().collect();
        let tail: String = chars[chars.len() - 180..].iter().collect();
        format!("{head} … {tail}")
    } else {
        s
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_default_to_all() {
        let all = Sections::new(&[]);
        assert!(all.all() && all.has(Section::Node) && all.has(Section::Malloc));
        let node = Sections::new(&[Section::Node]);
        assert!(!node.all() && node.has(Section::Node) && !node.has(Section::Nginx));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
