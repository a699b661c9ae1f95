//! Node mode on a quiet machine: `leaktrace node --no-drill` watching
//! every process while the bench runs no workload. What it costs itself
//! once started, measured from outside over a steady window after a
//! warm-up: its CPU (/proc/PID/stat) and its eBPF programs' run time (the
//! kernel's statistics in their fdinfo); its memory at the end of the
//! window (VmHWM, VmRSS); and, beside them, the figures of its own JSON
//! report, which cover the whole run.
//!
//! "Quiet" is the bench's part only: others may be using the machine, so
//! the processes started on it during the window and the load are kept
//! with the figures.
//!
//! Imports: `super` (`Ctx`), `harness`, `procfs`.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    harness::{read_node_report, NodeFigures, Tracer, Usage},
    procfs, Ctx,
};

/// Seconds after start before the window (start-up and the first
/// readings settle), and the window's length.
pub(super) const WARMUP_S: u64 = 10;
pub(super) const WINDOW_S: u64 = 60;

pub(super) struct NodeIdle {
    /// Wall time between the two readings.
    pub(super) window_s: f64,
    /// leaktrace's CPU (user + system) over the window.
    pub(super) cpu_s: f64,
    /// Its eBPF programs' run time and runs over the window.
    pub(super) bpf_s: Option<f64>,
    pub(super) bpf_runs: Option<u64>,
    /// Processes and threads started on the machine over the window.
    pub(super) forks: Option<u64>,
    /// /proc/loadavg at the start and the end of the window.
    pub(super) load: (String, String),
    /// VmHWM and VmRSS at the end of the window.
    pub(super) hwm_kib: Option<u64>,
    pub(super) rss_kib: Option<u64>,
    /// GNU time: the whole run, the final report included.
    pub(super) usage: Usage,
    pub(super) figures: NodeFigures,
}

impl NodeIdle {
    /// leaktrace's CPU and its programs' over the window, as a share of
    /// one core.
    pub(super) fn share(&self) -> f64 {
        (self.cpu_s + self.bpf_s.unwrap_or(0.0)) / self.window_s
    }
}

/// One reading of the tracer and the machine.
struct Reading {
    at: Instant,
    cpu_s: f64,
    bpf: Option<(u64, u64)>,
    forks: Option<u64>,
    load: String,
}

impl Reading {
    fn take(ctx: &Ctx, t: &Tracer) -> Result<Reading> {
        Ok(Reading {
            at: Instant::now(),
            cpu_s: t
                .cpu_s(ctx)
                .with_context(|| format!("leaktrace node exited early{}", t.proc.tail()))?,
            bpf: procfs::bpf_run_stats(t.pid),
            forks: procfs::forks(),
            load: procfs::loadavg(),
        })
    }
}

pub(super) fn measure(ctx: &Ctx) -> Result<NodeIdle> {
    let json = ctx.fresh_report("node-idle.json");
    let mut t = Tracer::node(ctx, &json, &["--no-drill".to_string()], None)?;
    let t0 = Instant::now();
    sleep_until(t0 + Duration::from_secs(WARMUP_S));
    let a = Reading::take(ctx, &t)?;
    sleep_until(t0 + Duration::from_secs(WARMUP_S + WINDOW_S));
    let b = Reading::take(ctx, &t)?;
    let hwm_kib = procfs::proc_status_kib(t.pid, "VmHWM");
    let rss_kib = procfs::proc_status_kib(t.pid, "VmRSS");
    let (usage, _) = t.stop(Duration::from_secs(120))?;
    let delta = |x: Option<u64>, y: Option<u64>| Some(y?.saturating_sub(x?));
    Ok(NodeIdle {
        window_s: b.at.duration_since(a.at).as_secs_f64(),
        cpu_s: b.cpu_s - a.cpu_s,
        bpf_s: delta(a.bpf.map(|b| b.0), b.bpf.map(|b| b.0)).map(|ns| ns as f64 / 1e9),
        bpf_runs: delta(a.bpf.map(|b| b.1), b.bpf.map(|b| b.1)),
        forks: delta(a.forks, b.forks),
        load: (a.load, b.load),
        hwm_kib,
        rss_kib,
        usage,
        figures: read_node_report(&json)?,
    })
}

fn sleep_until(t: Instant) {
    thread::sleep(t.saturating_duration_since(Instant::now()));
}
