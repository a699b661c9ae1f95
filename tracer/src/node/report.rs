//! The node report (`leaktrace.node/v1`): which processes and cgroups
//! grow (tier 0), which stacks make them grow (tiers 1 and 2, each stack
//! with its `source`), the drill-downs and OOM kills seen, and what
//! leaktrace itself cost.
//!
//! Input: the census's views, stacks in the process report's shape
//! (`report::StackReport`), counters and notes. Output: JSON (serde, one
//! trailing newline) or text for a terminal; the other formats (folded,
//! SVG, pprof) are the process report's writers over [`NodeReport::as_report`].

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use serde::Serialize;

use crate::{
    node::census::{CgroupView, ProcessView},
    report::{self, text::human_bytes, StackReport, Target, Totals},
};

pub const SCHEMA: &str = "leaktrace.node/v1";

/// One drill-down: a process that kept growing got sampled allocator
/// probes for a while; what they found.
#[derive(Clone, Debug, Serialize)]
pub struct Drilldown {
    pub pid: u32,
    pub comm: String,
    pub started_s: f64,
    pub ended_s: f64,
    /// Why it ended: `window` (its time was up), `budget` (the CPU budget
    /// was reached), `exited`, `running` (still on at this report).
    pub ended_by: String,
    /// The process's growth stacks the probes saw (`source: allocator`).
    pub stacks: Vec<StackReport>,
}

/// An OOM kill on the node.
#[derive(Clone, Debug, Serialize)]
pub struct OomKill {
    pub at_s: f64,
    pub pid: u32,
    pub comm: String,
    /// The victim's cgroup facts and memory figures, as sentences.
    pub facts: Vec<String>,
    /// Its anonymous memory over the census's window: `[[seconds since
    /// start, bytes], ...]`, oldest first.
    pub anon_history: Vec<(f64, u64)>,
    /// Where its report files are.
    pub files: Vec<String>,
}

/// What leaktrace cost, measured on itself and its programs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SelfFigures {
    /// leaktrace's own CPU (user + system), seconds.
    pub cpu_s: f64,
    /// Time inside its eBPF programs (the kernel's run-time statistics),
    /// seconds.
    pub bpf_s: f64,
    /// Uprobe traps (drill-downs), each ~0.5 µs not in `bpf_s`.
    pub uprobe_traps: u64,
    /// All of it, as a share of one core over the run so far.
    pub cpu_share: f64,
    /// The budget (`--budget-cpu`), as a share of one core.
    pub budget_share: f64,
    /// The largest share over one reading interval, start-up and the
    /// first reading left out.
    pub peak_share: f64,
    pub rss_bytes: u64,
    pub watched_processes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub schema: &'static str,
    pub duration_s: f64,
    /// Watched processes, growing first.
    pub processes: Vec<ProcessView>,
    pub cgroups: Vec<CgroupView>,
    /// Growth stacks, growing first, each with its `source` and `pids`.
    pub stacks: Vec<StackReport>,
    pub stacks_omitted: usize,
    pub drilldowns: Vec<Drilldown>,
    pub oom_kills: Vec<OomKill>,
    /// Every kernel counter by name, and the node's own (fault samples
    /// dropped, processes not watched).
    pub counters: BTreeMap<String, u64>,
    pub leaktrace: SelfFigures,
    pub notes: Vec<String>,
}

impl NodeReport {
    /// The stacks as a process report, for the writers that draw stacks
    /// (folded, SVG, pprof).
    pub fn as_report(&self) -> report::Report {
        report::Report {
            schema: report::SCHEMA,
            duration_s: self.duration_s,
            targets: self
                .processes
                .iter()
                .map(|p| Target {
                    pid: p.pid,
                    comm: p.comm.clone(),
                    status: "running".into(),
                })
                .collect(),
            totals: Totals {
                outstanding_bytes: self.stacks.iter().map(|s| s.outstanding_bytes).sum(),
                outstanding_allocs: self.stacks.iter().map(|s| s.outstanding_allocs).sum(),
                lost_events: 0,
            },
            counters: self.counters.clone(),
            stacks: self.stacks.clone(),
            stacks_omitted: self.stacks_omitted,
            notes: self.notes.clone(),
            go_runtime: Vec::new(),
        }
    }
}

pub fn write_json(r: &NodeReport, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, r).map_err(io::Error::from)?;
    writeln!(out)
}

fn rate(b: f64) -> String {
    if b < 0.0 {
        format!("-{}/s", human_bytes(-b))
    } else {
        format!("{}/s", human_bytes(b))
    }
}

/// For a terminal: the growing processes and cgroups, then the stacks.
pub fn write_text(r: &NodeReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "leaktrace node: {} processes watched for {:.0}s; leaktrace used {:.2}% of a core \
         (budget {:.2}%)",
        r.leaktrace.watched_processes,
        r.duration_s,
        r.leaktrace.cpu_share * 100.0,
        r.leaktrace.budget_share * 100.0
    )?;
    let shown: Vec<&ProcessView> = r.processes.iter().take(10).collect();
    if !shown.is_empty() {
        writeln!(out, "\nprocesses (anonymous memory):")?;
        for p in shown {
            writeln!(
                out,
                "  {:>7} {:<16} {:>10} {:>12} {:<9} {}",
                p.pid,
                p.comm,
                human_bytes(p.anon_bytes as f64),
                rate(p.growth_bytes_per_s),
                p.trend.as_str(),
                p.cgroup
            )?;
        }
    }
    let cgroups: Vec<&CgroupView> = r.cgroups.iter().take(5).collect();
    if !cgroups.is_empty() {
        writeln!(out, "\ncgroups:")?;
        for c in cgroups {
            writeln!(
                out,
                "  {:>10} {:>12} {:<9} {}",
                human_bytes(c.memory_current as f64),
                rate(c.growth_bytes_per_s),
                c.trend.as_str(),
                c.path
            )?;
        }
    }
    writeln!(out, "\ngrowth stacks:")?;
    if r.stacks.is_empty() {
        writeln!(out, "  none yet")?;
    }
    for (i, s) in r.stacks.iter().enumerate() {
        let source = s.source.map_or("?", |s| s.as_str());
        writeln!(
            out,
            "#{} {} ({}, {}, {}) pids {:?}",
            i + 1,
            human_bytes(s.outstanding_bytes as f64),
            rate(s.growth_bytes_per_s),
            s.trend.as_str(),
            source,
            s.pids
        )?;
        for f in s.frames.iter().take(8) {
            let at = match (&f.file, f.line) {
                (Some(file), Some(line)) => format!(" at {file}:{line}"),
                _ => String::new(),
            };
            let name = f.function.as_deref().unwrap_or("??");
            let module = f
                .module
                .as_deref()
                .map(|m| format!(" [{}]", m.rsplit('/').next().unwrap_or(m)))
                .unwrap_or_default();
            writeln!(out, "    {name}{at}{module}")?;
        }
    }
    for d in &r.drilldowns {
        writeln!(
            out,
            "\ndrill-down of {} ({}) from {:.0}s to {:.0}s ({}): {} stacks",
            d.pid,
            d.comm,
            d.started_s,
            d.ended_s,
            d.ended_by,
            d.stacks.len()
        )?;
    }
    for k in &r.oom_kills {
        writeln!(
            out,
            "\nOOM kill at {:.0}s: {} ({}); report in {}",
            k.at_s,
            k.pid,
            k.comm,
            k.files.join(", ")
        )?;
    }
    if !r.notes.is_empty() {
        writeln!(out, "\nnotes:")?;
        for n in &r.notes {
            writeln!(out, "  - {n}")?;
        }
    }
    Ok(())
}
