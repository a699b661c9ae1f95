//! Figures the measurements read from /proc (and getconf): a process's
//! CPU time, peak RSS, eBPF map memory, eBPF programs' run time and
//! children; a thread's scheduler time; the machine's cores, load and
//! processes started.
//!
//! Imports: `crate::output` only. Pure reads: a figure that cannot be
//! read is `None` (or a placeholder), never an error.

use std::{fs, process::Command};

use crate::output;

/// Clock ticks per second, the unit of /proc/PID/stat's CPU times.
pub(super) fn clk_tck() -> f64 {
    output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a live process, in seconds.
pub(super) fn proc_cpu_s(pid: u32, clk_tck: f64) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14, 15.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck)
}

/// A `kB` figure of /proc/PID/status (`VmHWM`, ...).
pub(super) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Kernel memory charged to the process's eBPF maps (not part of its RSS).
pub(super) fn map_memlock_bytes(pid: u32) -> Option<u64> {
    let mut total = 0;
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?.flatten() {
        let Ok(info) = fs::read_to_string(e.path()) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// Run time (ns) and runs of the eBPF programs `pid` holds, each program
/// counted once: the kernel's statistics (`run_time_ns` and `run_cnt` of
/// each program's fdinfo), which grow only while someone holds them
/// enabled (`leaktrace node` does, with BPF_ENABLE_STATS).
pub(super) fn bpf_run_stats(pid: u32) -> Option<(u64, u64)> {
    let mut seen = std::collections::HashSet::new();
    let (mut ns, mut runs) = (0, 0);
    for e in fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if !fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog") {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
        let Ok(info) = fs::read_to_string(fdinfo) else {
            continue;
        };
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // Several descriptors may hold one program.
        if seen.insert(field("prog_id:")) {
            ns += field("run_time_ns:").unwrap_or(0);
            runs += field("run_cnt:").unwrap_or(0);
        }
    }
    Some((ns, runs))
}

/// Processes (and threads) created on the machine since boot:
/// `processes` of /proc/stat.
pub(super) fn forks() -> Option<u64> {
    fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("processes "))?
        .trim()
        .parse()
        .ok()
}

/// CPU time of one thread, in ns (scheduler accounting, exact).
pub(super) fn schedstat_ns(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(super) fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The parent of `pid`, from /proc/PID/stat.
pub(super) fn parent(pid: u32) -> Option<u32> {
    let st = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow
    // the last `)`.
    let rest = &st[st.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

pub(super) fn cores() -> usize {
    fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
}

pub(super) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
