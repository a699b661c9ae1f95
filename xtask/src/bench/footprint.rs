//! leaktrace's own cost when it holds many live allocations
//! (`bench/footprint.c`: N allocations from 10,000 stacks, kept): its
//! peak RSS, the kernel memory of its maps, and how long its final report
//! takes after SIGINT.
//!
//! Imports: `super` (configurations), `harness`, `procfs`.

use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, SystemTime},
};

use anyhow::Result;

use super::{
    harness::{read_report, LeaktraceReport, Proc, Tracer, Usage},
    procfs::{map_memlock_bytes, proc_status_kib},
    Ctx, FOOTPRINT_STACKS,
};

pub(super) struct Footprint {
    pub(super) usage: Usage,
    /// VmHWM just before SIGINT, before the final report.
    pub(super) hwm_before_report_kib: Option<u64>,
    pub(super) map_memlock_bytes: Option<u64>,
    /// SIGINT to the last write of the report file (its mtime).
    pub(super) report_written: Option<Duration>,
    /// SIGINT to exit: the report plus closing every probe.
    pub(super) exit_wall: Duration,
    pub(super) report: LeaktraceReport,
}

/// leaktrace attached to a program that makes `allocs` live allocations,
/// then stopped.
pub(super) fn measure(ctx: &Ctx, allocs: u64) -> Result<Footprint> {
    let mut target = Proc::start_ready(
        "footprint",
        Command::new(&ctx.footprint)
            .arg(allocs.to_string())
            .arg(FOOTPRINT_STACKS.to_string()),
    )?;
    let json = ctx.fresh_report(&format!("footprint-{allocs}.json"));
    let mut tracer = Tracer::leaktrace(
        ctx,
        target.pid(),
        &json,
        &["--max-allocs".into(), "2000000".into()],
    )?;
    target.send("go")?;
    target.wait_line(|l| l == "done", Duration::from_secs(300))?;
    // leaktrace reads the kernel ledger every second; let it catch up.
    thread::sleep(Duration::from_secs(3));
    let hwm = proc_status_kib(tracer.pid, "VmHWM");
    let memlock = map_memlock_bytes(tracer.pid);
    let cpu0 = tracer.cpu_s(ctx);
    let sigint_at = SystemTime::now();
    let (usage, exit_wall) = tracer.stop(Duration::from_secs(300))?;
    let report_written = fs::metadata(&json)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.duration_since(sigint_at).ok());
    let report = read_report(&json)?;
    target.finish(Duration::from_secs(10))?;
    Ok(Footprint {
        usage: Usage {
            phase_cpu_s: cpu0.map_or(f64::NAN, |c| usage.cpu_s - c),
            ..usage
        },
        hwm_before_report_kib: hwm,
        map_memlock_bytes: memlock,
        report_written,
        exit_wall,
        report,
    })
}
