//! The malloc/free microbenchmark (`bench/mallocbench.c`), and the phase
//! protocol it shares with `bench/pyalloc.py` and `bench/goalloc.go`: the
//! program prints `ready`; each line `N` sent runs one phase of N
//! iterations per thread, answered by `ns_per_pair WALL CPU`; end of input
//! ends it.
//!
//! A row is one warm-up phase and `--reps` measured phases under one
//! tracer process; it reports the median thread CPU per iteration, the
//! tracer's CPU and RSS, and leaktrace's lost events.
//!
//! Imports: `super` (configurations), `harness`.

use std::{process::Command, time::Duration};

use anyhow::{bail, Result};

use super::{
    harness::{LeaktraceReport, Proc, Usage},
    median, Ctx, Kind, THREADS,
};

pub(super) struct Micro {
    /// Thread CPU time per pair (median over phases): immune to other load.
    pub(super) ns_per_pair: f64,
    /// Smallest and largest thread-CPU phase: the spread behind the median.
    pub(super) cpu_range: (f64, f64),
    pub(super) wall_ns_per_pair: f64,
    /// Pairs done by all threads while the tracer was attached and measured.
    pub(super) pairs_total: u64,
    pub(super) usage: Option<Usage>,
    pub(super) report: Option<LeaktraceReport>,
    /// Where leaktrace probed libc's `free` (`free+9`), from its log.
    pub(super) free_offset: Option<u64>,
    pub(super) note: Option<String>,
}

impl Micro {
    /// The row for measured phases: per phase (wall, thread CPU) ns per
    /// pair; the median and range of the CPU figures.
    pub(super) fn from_phases(
        mut wall: Vec<f64>,
        mut cpu: Vec<f64>,
        pairs_total: u64,
        usage: Option<Usage>,
        report: Option<LeaktraceReport>,
    ) -> Micro {
        Micro {
            cpu_range: (
                cpu.iter().copied().fold(f64::INFINITY, f64::min),
                cpu.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ),
            ns_per_pair: median(&mut cpu),
            wall_ns_per_pair: median(&mut wall),
            pairs_total,
            usage,
            report,
            free_offset: None,
            note: None,
        }
    }
}

/// One malloc/free row: `pairs` per thread and phase under `kind` (the
/// floor probes `free` at `floor_offset`).
pub(super) fn measure(
    ctx: &Ctx,
    kind: &Kind,
    pairs: u64,
    floor_offset: Option<u64>,
) -> Result<Micro> {
    let phases = Phases {
        program: "mallocbench",
        iters: pairs,
        us_per_iter: 200,
        threads: THREADS,
    };
    let mut cmd = Command::new(&ctx.mallocbench);
    cmd.arg(THREADS.to_string());
    run_phases(ctx, &mut cmd, &phases, kind, floor_offset)
}

/// How a program's phases run.
pub(super) struct Phases {
    /// The program's name, for messages and leaktrace's report file
    /// (`NAME.json` in the bench directory).
    pub(super) program: &'static str,
    /// Iterations per thread and phase.
    pub(super) iters: u64,
    /// Each phase may take a minute plus this per iteration.
    pub(super) us_per_iter: u64,
    /// Threads of the program, each doing `iters` per phase.
    pub(super) threads: u32,
}

/// Starts `program` and runs its phases under `kind`: one warm-up
/// (first-touch page faults, arena setup) and `ctx.reps` measured ones,
/// with the tracer's CPU read around the measured ones.
pub(super) fn run_phases(
    ctx: &Ctx,
    program: &mut Command,
    phases: &Phases,
    kind: &Kind,
    floor_offset: Option<u64>,
) -> Result<Micro> {
    let mut target = Proc::start_ready(phases.program, program)?;
    let json = ctx.fresh_report(&format!("{}.json", phases.program));
    let mut tracer = kind.attach(ctx, target.pid(), &json, floor_offset)?;
    let timeout =
        Duration::from_secs(60) + Duration::from_micros(phases.iters * phases.us_per_iter);
    phase(&mut target, phases.iters, timeout)?;
    let cpu0 = tracer.as_ref().and_then(|t| t.cpu_s(ctx));
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..ctx.reps {
        let (w, c) = phase(&mut target, phases.iters, timeout)?;
        wall.push(w);
        cpu.push(c);
    }
    let cpu1 = tracer.as_ref().and_then(|t| t.cpu_s(ctx));
    let free_offset = tracer
        .as_ref()
        .and_then(|t| t.proc.seen.iter().find_map(|l| free_offset_in(l)));
    let usage = tracer
        .as_mut()
        .map(|t| t.stop_measured((cpu0, cpu1)))
        .transpose()?;
    let report = kind.report(&json)?;
    target.finish(Duration::from_secs(10))?;
    let pairs_total = phases.iters * u64::from(phases.threads) * ctx.reps as u64;
    let mut m = Micro::from_phases(wall, cpu, pairs_total, usage, report);
    m.free_offset = free_offset;
    Ok(m)
}

/// One measured phase: (wall, thread CPU) ns per iteration.
fn phase(target: &mut Proc, iters: u64, timeout: Duration) -> Result<(f64, f64)> {
    target.send(&iters.to_string())?;
    let line = target.wait_line(|l| l.starts_with("ns_per_pair "), timeout)?;
    let f: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match f[..] {
        [wall, cpu] => Ok((wall, cpu)),
        _ => bail!("unexpected mallocbench line {line:?}"),
    }
}

/// `free+9` in leaktrace's debug line listing what it attached.
fn free_offset_in(line: &str) -> Option<u64> {
    if !line.contains("libc.so") {
        return None;
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("free+"))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_offset_from_log() {
        let l = "[DEBUG leaktrace::run] pid 1: /usr/lib/x86_64-linux-gnu/libc.so.6: malloc free+9";
        assert_eq!(free_offset_in(l), Some(9));
        assert_eq!(free_offset_in("pid 1: /x/libfoo.so: free+3"), None);
    }
}
