//! Node mode's Markdown: the notes under the static nginx table about its
//! rows there (leaktrace's own figures, the drill-downs, the targets), and
//! the table of `leaktrace node` alone on the machine.
//!
//! Imports: `super` (results and labels), `harness` and `node` (result
//! types), `table`. Formats only.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    harness::{NodeFigures, NODE_DRILL_WAIT_S},
    nginx::NginxResult,
    node::{NodeIdle, WARMUP_S, WINDOW_S},
    table::{crowded_note, mib, thousands, Table},
    Row, NODE_TIERS01,
};

/// The targets: beside nginx, tiers 0-1 keep at least this share of the
/// untraced throughput and at most this multiple of the worker's CPU per
/// request; alone, node mode costs at most this share of one core and
/// this much memory.
const TARGET_THROUGHPUT: f64 = 0.99;
const TARGET_WORKER_CPU: f64 = 1.01;
const TARGET_SHARE: f64 = 0.01;
const TARGET_RSS_KIB: u64 = 100 * 1024;

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

fn pct(share: f64) -> String {
    format!("{:.2}%", share * 100.0)
}

/// One note per node mode row of the static nginx table.
pub(super) fn nginx_notes(rows: &[Row<NginxResult>]) -> Vec<String> {
    let base = rows
        .iter()
        .find(|r| r.label == "untraced")
        .and_then(|r| r.result.as_ref().ok());
    rows.iter()
        .filter_map(|r| {
            let n = r.result.as_ref().ok()?;
            let f = n.node.as_ref()?;
            let runs: Vec<String> = n.runs_rps.iter().map(|x| format!("{x:.0}")).collect();
            let mut note = format!(
                "- `{}`: requests/s of the runs {}.{} {}",
                r.label,
                runs.join(", "),
                per_request(n),
                own_figures(f)
            );
            match base {
                Some(b) if r.label == NODE_TIERS01 => {
                    let (tp, cpu) = (
                        n.rps / b.rps,
                        n.worker_ns_per_request / b.worker_ns_per_request,
                    );
                    note.push_str(&format!(
                        " Target: throughput ≥ {TARGET_THROUGHPUT}x untraced: {tp:.3}x, {}; worker \
                         CPU per request ≤ {TARGET_WORKER_CPU}x: {cpu:.3}x, {}.",
                        verdict(tp >= TARGET_THROUGHPUT),
                        verdict(cpu <= TARGET_WORKER_CPU)
                    ));
                }
                _ => {}
            }
            if r.label.contains("drill-down") && f.drilldowns.is_empty() {
                note.push_str(&format!(
                    " No drill-down began: one starts only at a reading under half the budget \
                     ({}), and none came within {NODE_DRILL_WAIT_S} s nor during the runs.",
                    pct(f.budget_share / 2.0)
                ));
            }
            if r.label.contains("drill-down") {
                note.push_str(&format!(
                    " The budget: cpu_share {} over the run against {}: {}.",
                    pct(f.cpu_share),
                    pct(f.budget_share),
                    if f.cpu_share <= f.budget_share {
                        "held"
                    } else {
                        "**exceeded**"
                    }
                ));
            }
            Some(note)
        })
        .collect()
}

/// What leaktrace's eBPF programs cost per request during the runs.
fn per_request(n: &NginxResult) -> String {
    match n.bpf {
        Some((ns, runs)) if runs > 0 && n.requests > 0 => format!(
            " During them its eBPF programs ran {:.1} times per request (at every syscall's exit \
             and user page fault of every process, the worker's, wrk's and the rest, and in a \
             drill-down at each probed allocator call), {:.0} ns a run, {:.2} µs per request in \
             all.",
            runs as f64 / n.requests as f64,
            ns as f64 / runs as f64,
            ns as f64 / n.requests as f64 / 1e3
        ),
        _ => String::new(),
    }
}

/// leaktrace node's figures about itself and its drill-downs, in words.
fn own_figures(f: &NodeFigures) -> String {
    let drills: Vec<String> = f
        .drilldowns
        .iter()
        .map(|d| {
            format!(
                "{} ({}) from {:.1} s to {:.1} s, ended by `{}`, {} stacks",
                d.pid, d.comm, d.started_s, d.ended_s, d.ended_by, d.stacks
            )
        })
        .collect();
    format!(
        "Its report (over its {:.0} s, start-up included): cpu_share **{}** of one core (budget {}), \
         peak_share {} over one reading; its CPU {:.2} s, its eBPF programs {:.2} s, {} uprobe \
         traps; {} processes watched at the end; {} events lost. Drill-downs: {}.",
        f.duration_s,
        pct(f.cpu_share),
        pct(f.budget_share),
        pct(f.peak_share),
        f.cpu_s,
        f.bpf_s,
        thousands(f.uprobe_traps),
        f.watched_processes,
        thousands(f.lost),
        if drills.is_empty() {
            "none".to_string()
        } else {
            drills.join("; ")
        }
    )
}

/// The table of `leaktrace node --no-drill` alone on the machine.
pub(super) fn render_idle(s: &mut String, row: &Row<NodeIdle>) -> Result<()> {
    let end = WARMUP_S + WINDOW_S;
    writeln!(
        s,
        "### Node mode alone: `leaktrace node --no-drill`, every process watched, no bench workload"
    )?;
    writeln!(s)?;
    let window = format!("{WARMUP_S}-{end} s");
    let header = [
        "configuration".to_string(),
        format!("leaktrace CPU, {window}"),
        format!("its eBPF programs, {window}"),
        format!(
            "share of one core, {window} (target ≤ {})",
            pct(TARGET_SHARE)
        ),
        format!("VmHWM; VmRSS at {end} s (target ≤ {})", mib(TARGET_RSS_KIB)),
        "peak RSS, whole run (GNU time)".to_string(),
        "its report, whole run: cpu_share; peak_share; CPU + eBPF".to_string(),
        "watched processes".to_string(),
        format!("processes started on the machine, {window}"),
    ];
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = Table::new(s, &header)?;
    table.measured(row, |n| {
        let share = n.share();
        let kib = |k: Option<u64>| k.map_or("n/a".into(), mib);
        let share_of = |secs: f64| pct(secs / n.window_s);
        let f = &n.figures;
        vec![
            format!("{:.2} s ({})", n.cpu_s, share_of(n.cpu_s)),
            match (n.bpf_s, n.bpf_runs) {
                (Some(b), Some(runs)) => format!(
                    "{b:.2} s ({}); {} runs, {:.0} ns each",
                    share_of(b),
                    thousands(runs),
                    b * 1e9 / runs.max(1) as f64
                ),
                _ => "n/a".into(),
            },
            format!("**{}**: {}", pct(share), verdict(share <= TARGET_SHARE)),
            format!(
                "**{}**; {}: {}",
                kib(n.hwm_kib),
                kib(n.rss_kib),
                verdict(n.hwm_kib.is_some_and(|k| k <= TARGET_RSS_KIB))
            ),
            mib(n.usage.max_rss_kib),
            format!(
                "{}; {}; {:.2} s + {:.2} s over {:.0} s",
                pct(f.cpu_share),
                pct(f.peak_share),
                f.cpu_s,
                f.bpf_s,
                f.duration_s
            ),
            f.watched_processes.to_string(),
            n.forks.map_or("n/a".into(), thousands),
        ]
    })?;
    let crowded = table.finish()?;
    writeln!(
        s,
        "- leaktrace node with `--no-drill` (tiers 0-1) and nothing else asked of it. {WARMUP_S} s \
         after it said it was watching, its utime + stime (/proc/PID/stat) and the run time of its \
         eBPF programs (`run_time_ns` in each program's fdinfo: the kernel's statistics, on while \
         node mode runs) were read, and again {WINDOW_S} s later, then VmHWM and VmRSS \
         (/proc/PID/status); then SIGINT and its final report. Its programs run in the context of \
         every process (at each syscall's exit and each user page fault), so their run time \
         is what watching costs the machine, wherever it lands."
    )?;
    if let Ok(n) = &row.result {
        writeln!(
            s,
            "- Quiet for the bench only: others share the machine. Load average (1, 5, 15 min) at \
             the window's start {}, at its end {}; the processes started meanwhile were each read \
             (maps, unwind tables) and watched by node mode.",
            n.load.0, n.load.1
        )?;
    }
    writeln!(
        s,
        "- Its report's figures cover its whole run, start-up (reading every process at start) \
         included; peak_share is its largest share over one reading interval."
    )?;
    crowded_note(s, &crowded)
}
