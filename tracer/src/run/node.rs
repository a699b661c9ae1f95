//! Node mode (`leaktrace node`): every process on the machine (or those
//! of `--comm`/`--cgroup`) watched until stopped.
//!
//! - Tier 0: the census reads each process's and cgroup's memory every
//!   reading (`node::census`) and classifies its trend.
//! - Tier 1: each watched process is registered with the unwinder and the
//!   runtimes' walkers, but not probed; its anonymous mmap/brk calls and
//!   about one in `--fault-period` of its write faults on new pages are
//!   recorded with a stack (`ingest::faults`), one ledger per source.
//! - Tier 2: a process the census has seen growing for `--drill-after`
//!   gets the sampled allocator probes for `--drill-for`, one process at a
//!   time, while leaktrace's measured cost (its own CPU, its programs' run
//!   time from the kernel's statistics, and a trap per uprobe run) stays
//!   under `--budget-cpu`; a drill-down ends early when it does not.
//!
//! Outputs: `/metrics` (`--listen`), a JSON report and a pprof profile per
//! interval in `--out`, an OOM report per OOM kill in `--oom-dir`, and the
//! final report on stdout or in `-o` files.

use std::{collections::BTreeMap, sync::Arc};

use super::*;
use crate::{
    attach::probe::ProgramCost,
    cli::NodeConfig,
    node::{
        census::{Census, CensusOptions, ProcessView},
        metrics,
        report::{self as node_report, Drilldown, NodeReport, OomKill, SelfFigures},
    },
    report::{store::Store, StackReport},
};

/// A uprobe trap's cost on top of its program's run time (measured here:
/// ~490 ns; the statistics do not include it).
const TRAP_NS: u64 = 500;

/// Readings between two looks for libraries loaded since (dlopen): maps
/// of every watched process are read then.
const REFRESH_EVERY: u32 = 5;

/// Seconds a newly watched process is looked at again at every reading.
const RECENT_S: u64 = 10;

/// How often a running drill-down's cost is checked against the budget.
const DRILL_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Once drilled, a process waits this long before another drill-down.
const DRILL_COOLDOWN_S: f64 = 600.0;

/// Processes whose cgroups are read again at each reading, for the OOM
/// black box: the growing ones, then the largest.
const OOM_WATCH: usize = 64;

/// Stacks per growing process added to a report beyond the top ones.
const PER_PROCESS_STACKS: usize = 3;

/// What leaktrace costs, measured.
struct Meter {
    start: Instant,
    start_cpu_ns: u64,
    start_cost: ProgramCost,
    last: Instant,
    last_cpu_ns: u64,
    last_cost: ProgramCost,
    /// The share of one core over the last reading.
    pub last_share: f64,
    /// The largest `last_share` since start-up: the start-up and the first
    /// reading (each reads every process once) are left out.
    pub peak_share: f64,
    windows: u32,
}

fn own_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn own_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn cost_ns(cpu_ns: u64, c: ProgramCost) -> u64 {
    cpu_ns + c.run_time_ns + c.uprobe_runs * TRAP_NS
}

impl Meter {
    fn new(cost: ProgramCost) -> Self {
        let now = Instant::now();
        let cpu = own_cpu_ns();
        Self {
            start: now,
            start_cpu_ns: cpu,
            start_cost: cost,
            last: now,
            last_cpu_ns: cpu,
            last_cost: cost,
            last_share: 0.0,
            peak_share: 0.0,
            windows: 0,
        }
    }

    fn tick(&mut self, cost: ProgramCost) {
        let now = Instant::now();
        // A share over a few milliseconds says nothing (the reading's own
        // work fills them): shorter windows add up to the next.
        if now.duration_since(self.last) < DRILL_CHECK / 2 {
            return;
        }
        let cpu = own_cpu_ns();
        let wall = now.duration_since(self.last).as_nanos() as f64;
        if wall > 0.0 {
            let spent =
                cost_ns(cpu, cost).saturating_sub(cost_ns(self.last_cpu_ns, self.last_cost));
            self.last_share = spent as f64 / wall;
            self.windows = self.windows.saturating_add(1);
            if self.windows > 1 {
                self.peak_share = self.peak_share.max(self.last_share);
            }
        }
        self.last = now;
        self.last_cpu_ns = cpu;
        self.last_cost = cost;
    }

    /// Start the next window now, leaving the work done since the last
    /// one out of the per-window share (it still counts in the run's).
    fn restart(&mut self, cost: ProgramCost) {
        self.last = Instant::now();
        self.last_cpu_ns = own_cpu_ns();
        self.last_cost = cost;
    }

    fn figures(&self, budget: f64, watched: usize) -> SelfFigures {
        let c = self.last_cost;
        let s = self.start_cost;
        let cpu_ns = self.last_cpu_ns.saturating_sub(self.start_cpu_ns);
        let bpf_ns = c.run_time_ns.saturating_sub(s.run_time_ns);
        let traps = c.uprobe_runs.saturating_sub(s.uprobe_runs);
        let wall = self.last.duration_since(self.start).as_nanos().max(1) as f64;
        SelfFigures {
            cpu_s: cpu_ns as f64 / 1e9,
            bpf_s: bpf_ns as f64 / 1e9,
            uprobe_traps: traps,
            cpu_share: (cpu_ns + bpf_ns + traps * TRAP_NS) as f64 / wall,
            budget_share: budget,
            peak_share: self.peak_share,
            rss_bytes: own_rss_bytes(),
            watched_processes: 0,
        }
        .with_watched(watched)
    }
}

impl SelfFigures {
    fn with_watched(mut self, n: usize) -> Self {
        self.watched_processes = n;
        self
    }
}

/// A drill-down in progress.
struct Drill {
    pid: u32,
    comm: String,
    started: Instant,
    started_s: f64,
}

/// The node's state beside the session.
struct Node {
    cfg: NodeConfig,
    census: Census,
    meter: Meter,
    drill: Option<Drill>,
    drilled_at: HashMap<u32, f64>,
    drilldowns: Vec<Drilldown>,
    oom_kills: Vec<OomKill>,
    /// Processes not watched because `--max-processes` were.
    over_limit: u64,
}

impl<K: Kernel> Session<K> {
    /// Processes added in the last few seconds are looked at again: the
    /// loader maps an exec'd image's libraries after the exec event, and
    /// their unwind tables are wanted before the process grows.
    fn refresh_recent(&mut self) {
        self.recent
            .retain(|(_, at)| at.elapsed() < std::time::Duration::from_secs(RECENT_S));
        let pids: Vec<u32> = self.recent.iter().map(|(p, _)| *p).collect();
        for pid in pids {
            self.refresh_process(pid);
        }
    }

    /// Sampled fault pages the processes no longer map go (node mode has
    /// no syscall events to say so).
    fn release_unmapped_faults(&mut self) {
        for pid in self.faults.pids() {
            let Ok(maps) = procfs::read_maps(pid) else {
                continue;
            };
            let mut mapped: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
            mapped.sort_unstable();
            self.faults.retain_mapped(pid, &mapped);
        }
    }

    /// The running watched pids.
    fn watched(&self) -> Vec<u32> {
        self.targets
            .iter()
            .filter(|(_, t)| t.status == Status::Running)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Stacks of one source's ledger (all processes, or one), as the
    /// process report shapes them, tagged with the source.
    pub(super) fn source_stacks(
        &mut self,
        source: Source,
        pid: Option<u32>,
        top: usize,
    ) -> (Vec<StackReport>, usize) {
        let Some(ledger) = self.by_source.as_ref().and_then(|l| l.get(&source)) else {
            return (Vec::new(), 0);
        };
        let only;
        let ledger = match pid {
            Some(p) => {
                only = ledger.only_pid(p);
                &only
            }
            None => ledger,
        };
        let counters = Counters::default();
        let (normalizer, symbolizer) = (&self.normalizer, &mut self.symbolizer);
        let r = report::build(
            report::Inputs {
                duration_s: self.started.elapsed().as_secs_f64(),
                targets: Vec::new(),
                counters: &counters,
                ledger,
                top,
                sort: crate::report::SortBy::Growth,
                notes: Vec::new(),
                sample_bytes: 0,
                figures: Vec::new(),
            },
            &mut |idxs| symbolizer.symbolize(normalizer, idxs),
        );
        let mut stacks = r.stacks;
        for s in &mut stacks {
            s.source = Some(source);
        }
        (stacks, r.stacks_omitted)
    }

    /// The node's growth stacks: the top ones over every source, then a
    /// few per growing process, so each grower's own code is named even
    /// when another process dominates.
    fn node_stacks(&mut self, top: usize, growing: &[u32]) -> (Vec<StackReport>, usize) {
        let mut all = Vec::new();
        let mut omitted = 0;
        for source in Source::ALL {
            let (s, o) = self.source_stacks(source, None, top);
            all.extend(s);
            omitted += o;
        }
        sort_by_growth(&mut all);
        omitted += all.len().saturating_sub(top);
        all.truncate(top);
        let key = |s: &StackReport| {
            (
                s.source,
                s.frames
                    .iter()
                    .map(|f| (f.function.clone(), f.module.clone(), f.offset))
                    .collect::<Vec<_>>(),
            )
        };
        let mut seen: std::collections::HashSet<_> = all.iter().map(key).collect();
        for &pid in growing {
            let mut mine = Vec::new();
            for source in Source::ALL {
                mine.extend(self.source_stacks(source, Some(pid), PER_PROCESS_STACKS).0);
            }
            sort_by_growth(&mut mine);
            for s in mine.into_iter().take(PER_PROCESS_STACKS) {
                if seen.insert(key(&s)) {
                    all.push(s);
                }
            }
        }
        (all, omitted)
    }

    /// An OOM kill in node mode: what the session knows of the victim
    /// (name, cgroups, stacks from every source), frozen before its exit
    /// drops it.
    pub(super) fn freeze_victim(&mut self, pid: u32) -> Victim {
        let mut stacks = Vec::new();
        for source in Source::ALL {
            stacks.extend(self.source_stacks(source, Some(pid), self.top).0);
        }
        sort_by_growth(&mut stacks);
        stacks.truncate(self.top);
        let t = self.targets.get(&pid);
        Victim {
            pid,
            comm: t.map(|t| t.comm.clone()),
            stacks,
            facts: crate::oom::victim_facts(pid, t.and_then(|t| t.cgroups.as_deref())),
        }
    }
}

/// An OOM victim as the session saw it when its event was read.
pub(super) struct Victim {
    pid: u32,
    comm: Option<String>,
    stacks: Vec<StackReport>,
    facts: Vec<String>,
}

fn sort_by_growth(stacks: &mut [StackReport]) {
    stacks.sort_by(|a, b| {
        let k = |s: &StackReport| {
            (
                u8::from(s.trend == crate::report::trend::Trend::Growing),
                s.growth_bytes_per_s,
                s.outstanding_bytes,
            )
        };
        let (ka, kb) = (k(a), k(b));
        kb.0.cmp(&ka.0)
            .then(kb.1.partial_cmp(&ka.1).unwrap_or(std::cmp::Ordering::Equal))
            .then(kb.2.cmp(&ka.2))
    });
}

impl Node {
    fn figures(&self, watched: usize) -> SelfFigures {
        self.meter.figures(self.cfg.budget_cpu, watched)
    }
}

fn build_report<K: Kernel>(s: &mut Session<K>, n: &Node, top: usize) -> NodeReport {
    let processes = n.census.processes();
    let growing: Vec<u32> = processes
        .iter()
        .filter(|p| p.trend == crate::report::trend::Trend::Growing)
        .map(|p| p.pid)
        .collect();
    let (stacks, stacks_omitted) = s.node_stacks(top, &growing);
    let mut counters: BTreeMap<String, u64> = s
        .counters
        .0
        .iter()
        .map(|(k, v)| ((*k).to_string(), *v))
        .collect();
    counters.insert("fault_samples_dropped".into(), s.faults.dropped);
    counters.insert("fault_pages_kept".into(), s.faults.kept() as u64);
    counters.insert("processes_not_watched".into(), n.over_limit);
    let mut notes = Vec::new();
    if let Some(problem) = s.counters.pairing_problem(&procfs::kernel_release()) {
        notes.push(problem);
    }
    if s.counters.lost() > 0 {
        notes.push(format!(
            "{} events could not be recorded (see counters)",
            s.counters.lost()
        ));
    }
    if n.over_limit > 0 {
        notes.push(format!(
            "{} processes were not watched: --max-processes {} were watched already",
            n.over_limit, n.cfg.max_processes
        ));
    }
    notes.extend(s.runtimes.notes());
    let mut drilldowns = n.drilldowns.clone();
    if let Some(d) = &n.drill {
        drilldowns.push(Drilldown {
            pid: d.pid,
            comm: d.comm.clone(),
            started_s: d.started_s,
            ended_s: s.started.elapsed().as_secs_f64(),
            ended_by: "running".into(),
            stacks: s.source_stacks(Source::Allocator, Some(d.pid), 10).0,
        });
    }
    let watched = s.running();
    NodeReport {
        schema: node_report::SCHEMA,
        duration_s: s.started.elapsed().as_secs_f64(),
        processes,
        cgroups: n.census.cgroups(),
        stacks,
        stacks_omitted,
        drilldowns,
        oom_kills: n.oom_kills.clone(),
        counters,
        leaktrace: n.figures(watched),
        notes,
    }
}

/// The Prometheus view of a report (bounded by the renderer).
fn snapshot(r: &NodeReport, lost: u64) -> metrics::Snapshot {
    let mut s = metrics::Snapshot::from_views(&r.processes, &r.cgroups);
    let comm = |pid: u32| {
        r.processes
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| p.comm.clone())
            .unwrap_or_default()
    };
    s.stacks = r
        .stacks
        .iter()
        .take(s.max_stacks_series)
        .enumerate()
        .map(|(i, st)| {
            // The runtime's frames name the code best; else native ones.
            let named: Vec<&str> = st
                .frames
                .iter()
                .filter(|f| f.kind != crate::report::FrameKind::Native)
                .filter_map(|f| f.function.as_deref())
                .collect();
            let native: Vec<&str> = st
                .frames
                .iter()
                .filter_map(|f| f.function.as_deref())
                .collect();
            let frames = if named.is_empty() { native } else { named };
            let pid = (st.pids.len() == 1).then(|| st.pids[0]);
            metrics::StackRow {
                rank: u32::try_from(i + 1).unwrap_or(u32::MAX),
                pid,
                comm: pid.map(comm).unwrap_or_default(),
                source: st.source.map_or("", |s| s.as_str()).to_string(),
                frames: metrics::stack_label(&frames),
                bytes: st.outstanding_bytes as f64,
                growth_bytes_per_s: st.growth_bytes_per_s,
            }
        })
        .collect();
    let me = &r.leaktrace;
    s.own = metrics::SelfFigures {
        cpu_seconds_total: me.cpu_s + me.bpf_s,
        rss_bytes: me.rss_bytes,
        events_lost_total: lost,
        drilldowns_total: r.drilldowns.len() as u64,
        watched_processes: me.watched_processes as u64,
    };
    s
}

/// Start, run and end the drill-downs (tier 2).
fn drill<K: Kernel>(s: &mut Session<K>, n: &mut Node) {
    let now_s = s.started.elapsed().as_secs_f64();
    if let Some(d) = &n.drill {
        let alive = s
            .targets
            .get(&d.pid)
            .is_some_and(|t| t.status == Status::Running);
        let ended_by = if !alive {
            Some("exited")
        } else if n.meter.last_share > n.cfg.budget_cpu {
            Some("budget")
        } else if d.started.elapsed() >= n.cfg.drill_for {
            Some("window")
        } else {
            None
        };
        if let Some(why) = ended_by {
            let (pid, comm, started_s) = (d.pid, d.comm.clone(), d.started_s);
            let stacks = s.source_stacks(Source::Allocator, Some(pid), 10).0;
            n.drilldowns.push(Drilldown {
                pid,
                comm: comm.clone(),
                started_s,
                ended_s: now_s,
                ended_by: why.into(),
                stacks,
            });
            n.drill = None;
            n.drilled_at.insert(pid, now_s);
            s.drilling.remove(&pid);
            log::info!("drill-down of {pid} ({comm}) ended: {why}");
            if alive {
                // Probes off, rows gone; watched as before.
                s.probes.detach_process(pid, &mut s.runtimes);
                if let Err(e) = s.probes.forget_process(pid) {
                    log::warn!("{e}");
                }
                if let Err(e) = s.probes.watch_process(pid, &mut s.runtimes) {
                    log::debug!("watching {pid} again: {e}");
                }
            }
        }
        return;
    }
    let Some(after) = n.cfg.drill_after else {
        return;
    };
    // Room in the budget for probes: the watch itself must leave at least
    // half of it.
    if n.meter.last_share > n.cfg.budget_cpu / 2.0 {
        return;
    }
    let running = |pid: u32| {
        s.targets
            .get(&pid)
            .is_some_and(|t| t.status == Status::Running)
    };
    // `--drill-pid`: that process first, once, growing or not.
    let forced = n
        .cfg
        .drill_pid
        .filter(|pid| !n.drilled_at.contains_key(pid))
        .and_then(|pid| {
            if running(pid) {
                let comm = s.targets.get(&pid).map(|t| t.comm.clone());
                return Some((pid, comm.unwrap_or_default(), "--drill-pid".to_string()));
            }
            log::warn!("no drill-down into --drill-pid {pid}: it is not a watched running process");
            n.drilled_at.insert(pid, now_s);
            None
        });
    let candidate = forced.or_else(|| {
        n.census
            .processes()
            .into_iter()
            .filter(|p| n.census.growing_for_s(p.pid) >= after.as_secs_f64())
            .filter(|p| {
                n.drilled_at
                    .get(&p.pid)
                    .is_none_or(|t| now_s - t >= DRILL_COOLDOWN_S)
            })
            .filter(|p| running(p.pid))
            .max_by(|a, b| {
                a.growth_bytes_per_s
                    .partial_cmp(&b.growth_bytes_per_s)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|p| {
                let why = format!("growing for {:.0}s", n.census.growing_for_s(p.pid));
                (p.pid, p.comm, why)
            })
    });
    let Some((pid, comm, why)) = candidate else {
        return;
    };
    s.drilling.insert(pid);
    match s.probes.attach_process(pid, &mut s.runtimes) {
        Ok(_) => {
            log::info!("drilling down into {pid} ({comm}): {why}");
            n.drill = Some(Drill {
                pid,
                comm,
                started: Instant::now(),
                started_s: now_s,
            });
            // The attach's own work (reading the objects, placing the
            // probes) is a one-off: the checks that follow measure what
            // the probes cost while they run.
            n.meter.restart(s.probes.cost());
        }
        Err(e) => {
            s.drilling.remove(&pid);
            n.drilled_at.insert(pid, now_s);
            log::info!("no drill-down into {pid}: {e}");
        }
    }
}

/// Write an OOM victim's report (node schema, and folded stacks).
fn oom_report<K: Kernel>(s: &mut Session<K>, n: &mut Node, victim: Victim) {
    let Victim {
        pid,
        comm,
        stacks,
        mut facts,
    } = victim;
    let comm = comm
        .or_else(|| n.census.last_known(pid).map(|p| p.comm))
        .unwrap_or_else(|| "?".into());
    let view: Option<ProcessView> = n.census.process(pid).or_else(|| n.census.last_known(pid));
    if let Some(v) = &view {
        facts.push(format!(
            "anonymous memory last read {} bytes, growing {:.0} bytes/s ({})",
            v.anon_bytes,
            v.growth_bytes_per_s,
            v.trend.as_str()
        ));
    }
    let at_s = s.started.elapsed().as_secs_f64();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = s.oom_dir.join(format!("leaktrace-oom-{pid}-{stamp}"));
    let json = base.with_extension("json");
    let folded = base.with_extension("folded");
    let kill = OomKill {
        at_s,
        pid,
        comm: comm.clone(),
        facts: facts.clone(),
        anon_history: view.as_ref().map(|v| v.history.clone()).unwrap_or_default(),
        files: vec![json.display().to_string(), folded.display().to_string()],
    };
    let report = NodeReport {
        schema: node_report::SCHEMA,
        duration_s: at_s,
        processes: view.into_iter().collect(),
        cgroups: Vec::new(),
        stacks,
        stacks_omitted: 0,
        drilldowns: Vec::new(),
        oom_kills: vec![kill.clone()],
        counters: BTreeMap::new(),
        leaktrace: n.figures(s.running()),
        notes: facts,
    };
    let res = std::fs::create_dir_all(&s.oom_dir)
        .and_then(|()| {
            let mut f = io::BufWriter::new(File::create(&json)?);
            node_report::write_json(&report, &mut f)?;
            f.flush()
        })
        .and_then(|()| {
            let mut f = io::BufWriter::new(File::create(&folded)?);
            report::folded::write(&report.as_report(), &mut f)?;
            f.flush()
        });
    match res {
        Ok(()) => eprintln!(
            "leaktrace: the OOM killer chose process {pid} ({comm}); its report is in {}",
            json.display()
        ),
        Err(e) => eprintln!(
            "leaktrace: the OOM killer chose process {pid} ({comm}) but its report could not be \
             written to {}: {e}",
            s.oom_dir.display()
        ),
    }
    n.oom_kills.push(kill);
}

/// Write the final or periodic report in `format`.
fn write_any(
    format: Format,
    r: &NodeReport,
    build_ids: &BTreeMap<String, String>,
    out: &mut dyn Write,
) -> io::Result<()> {
    match format {
        Format::Json => node_report::write_json(r, out),
        Format::Text => node_report::write_text(r, out),
        other => report::write(other, &r.as_report(), build_ids, out),
    }
}

pub(super) async fn run(cfg: Config) -> anyhow::Result<()> {
    let node_cfg = cfg
        .node
        .clone()
        .context("node mode without its configuration")?;
    preflight::check()?;
    cfg.check_paths()?;
    let selector = Selector::node(&cfg.comms, &cfg.cgroups);
    if let Some(missing) = selector.missing_cgroups().first() {
        anyhow::bail!(
            "cgroup {missing} does not exist under any cgroup mount; name a directory under \
             /sys/fs/cgroup or a path as /proc/PID/cgroup shows it"
        );
    }
    // Outputs before tracing starts: a taken port or an unwritable
    // directory must not cost the watch.
    let listener = match &node_cfg.listen {
        Some(addr) => Some(metrics::bind(addr)?),
        None => None,
    };
    let mut store = match &node_cfg.out {
        Some(dir) => Some(Store::open(dir, node_cfg.out_max_bytes)?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    raise_fd_limit();
    let probes = Probes::load(
        MapSizes {
            max_allocs: cfg.max_allocs,
            max_stacks: cfg.max_stacks,
            max_unwind_rows: cfg.max_unwind_rows,
            max_processes: u32::try_from(node_cfg.max_processes).unwrap_or(u32::MAX),
        },
        ProbeOptions {
            free_at_entry: false,
            extra_prefixes: Vec::new(),
            // Not the syscall programs: `sys_exit` runs on every syscall
            // of every task (nginx's worker paid 12-28% more CPU per
            // request for it). Page faults cost only when memory grows;
            // the memory maps say which pages went back.
            syscalls: false,
            oom_any: true,
            sample_bytes: cfg.sample_bytes,
            pymalloc: false,
            debug_bpf: cfg.debug_bpf,
            fault_period: node_cfg.fault_period,
        },
    )?;
    let mut probes = probes;
    if let Some(logger) = probes.take_bpf_logger() {
        spawn_bpf_log(logger);
    }
    let connector = match ProcConnector::open().and_then(|c| {
        // SAFETY: the connector owns its descriptor, which lives exactly as
        // long as the AsyncFd that wraps it.
        unsafe { AsyncFd::register(c) }.map_err(|e| io::Error::other(e.to_string()))
    }) {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn!("process events unavailable ({e}); finding processes by scanning /proc");
            None
        }
    };
    let runtimes = Runtimes::registry(&RuntimeOptions {
        go_enable_profiling: None,
    });
    let start_cost = probes.cost();
    let mut session = Session::new(probes, runtimes, selector.clone(), &cfg);
    session.watch_only = true;
    session.max_targets = node_cfg.max_processes;
    session.by_source = Some(BTreeMap::new());
    let mut node = Node {
        census: Census::new(CensusOptions {
            window: node_cfg.window,
            max_processes: node_cfg.max_processes,
            max_cgroups: 1024,
        }),
        meter: Meter::new(start_cost),
        drill: None,
        drilled_at: HashMap::new(),
        drilldowns: Vec::new(),
        oom_kills: Vec::new(),
        over_limit: 0,
        cfg: node_cfg.clone(),
    };
    for pid in procfs::all_pids() {
        if selector.matches(pid) && !session.targets.contains_key(&pid) {
            if let Err(e) = session.add(pid) {
                log::debug!("not watching {pid}: {e}");
            }
        }
    }
    if let Some(pid) = node_cfg.drill_pid {
        if !session.targets.contains_key(&pid) {
            anyhow::bail!(
                "--drill-pid {pid} is not a watched process; check the pid with `ps -p {pid}` and \
                 that it matches --comm and --cgroup"
            );
        }
    }
    eprintln!(
        "leaktrace: watching {} processes{}; {}",
        session.running(),
        if selector.everything {
            " (every process on this node, and new ones as they start)"
        } else {
            " (and matching processes as they start)"
        },
        match cfg.duration {
            Some(d) => format!("for {:.0}s (SIGTERM or Ctrl-C ends early)", d.as_secs_f64()),
            None => "until SIGTERM or Ctrl-C".into(),
        }
    );
    // Start-up read every process once: the first window starts now (the
    // run's share still counts it).
    node.meter.restart(session.probes.cost());
    // Each reading renders /metrics only while a receiver lives: the
    // server's, with --listen. Without it the receiver must go, or every
    // reading would build (and symbolize) a report nobody reads.
    let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(Arc::new(String::new()));
    match listener {
        Some(l) => {
            l.set_nonblocking(true)
                .context("failed to set up the metrics listener")?;
            let l = tokio::net::TcpListener::from_std(l)
                .context("failed to set up the metrics listener")?;
            tokio::spawn(metrics::serve(l, metrics_rx));
        }
        None => drop(metrics_rx),
    }
    let events_fd = session.probes.events_fd().and_then(|fd| {
        // SAFETY: the duplicated descriptor is owned by the AsyncFd.
        unsafe { AsyncFd::register(fd) }.ok()
    });
    let mut tick = tokio::time::interval(cfg.sample_every);
    // While a drill-down runs its cost is checked four times a second: a
    // process that allocates fast must not cost a whole reading over the
    // budget before its probes go.
    let mut drill_tick = tokio::time::interval(DRILL_CHECK);
    drill_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks: u32 = 0;
    let mut next_report = cfg.interval.map(|i| Instant::now() + i);
    let deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
    let mut proc_events = Vec::new();
    let why = loop {
        tokio::select! {
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                if connector.is_none() {
                    session.rescan();
                }
                session.retry_late();
                if ticks.is_multiple_of(REFRESH_EVERY) {
                    session.refresh_objects();
                    session.release_unmapped_faults();
                } else {
                    session.refresh_recent();
                }
                session.sample()?;
                node.over_limit = session.over_limit;
                let now_s = session.started.elapsed().as_secs_f64();
                let pids = session.watched();
                node.census.sample(now_s, &pids);
                // Cgroups as of now for the OOM black box: the likeliest
                // victims (growing, largest), processes seen in the last
                // 30 s (moved into a container's cgroup after they
                // started), and, in turn, a slice of the others.
                let mut views = node.census.process_summaries();
                views.sort_by_key(|p| std::cmp::Reverse(p.anon_bytes));
                let mut likely: Vec<u32> = views
                    .iter()
                    .filter(|p| p.trend == crate::report::trend::Trend::Growing)
                    .chain(views.iter())
                    .map(|p| p.pid)
                    .take(OOM_WATCH)
                    .collect();
                likely.extend(views.iter().filter(|p| now_s - p.first_seen_s < 30.0).map(|p| p.pid));
                if !pids.is_empty() {
                    let from = (ticks as usize * OOM_WATCH) % pids.len();
                    likely.extend(pids.iter().cycle().skip(from).take(OOM_WATCH.min(pids.len())));
                }
                likely.sort_unstable();
                likely.dedup();
                session.refresh_cgroups(&likely);
                node.meter.tick(session.probes.cost());
                drill(&mut session, &mut node);
                for v in std::mem::take(&mut session.node_victims) {
                    oom_report(&mut session, &mut node, v);
                }
                let want_metrics = metrics_tx.receiver_count() > 0;
                let due = match (next_report, cfg.interval) {
                    (Some(at), Some(_)) => Instant::now() >= at,
                    _ => false,
                };
                if want_metrics || due {
                    let r = build_report(&mut session, &node, cfg.top);
                    if want_metrics {
                        let mut body = String::new();
                        metrics::render(&snapshot(&r, session.counters.lost()), &mut body);
                        let _ = metrics_tx.send(Arc::new(body));
                    }
                    if due {
                        if let (Some(at), Some(every)) = (next_report, cfg.interval) {
                            next_report = Some(at + every);
                        }
                        periodic(&mut session, &mut store, &r);
                    }
                }
            }
            _ = drill_tick.tick(), if node.drill.is_some() => {
                node.meter.tick(session.probes.cost());
                drill(&mut session, &mut node);
            }
            ready = async {
                match &connector {
                    Some(c) => c.readable().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = ready.context("process event socket failed")?;
                proc_events.clear();
                let res = guard.get_inner().read_batch(&mut proc_events);
                if !res.as_ref().is_ok_and(|b| !b.drained) {
                    guard.clear_ready();
                }
                session.on_proc_batch(res, &mut proc_events);
                for v in std::mem::take(&mut session.node_victims) {
                    oom_report(&mut session, &mut node, v);
                }
            }
            ready = async {
                match &events_fd {
                    Some(f) => f.readable().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = ready.context("event ring buffer failed")?;
                guard.clear_ready();
                session.on_events()?;
                for v in std::mem::take(&mut session.node_victims) {
                    oom_report(&mut session, &mut node, v);
                }
            }
            _ = async { match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            } } => break "duration reached",
            _ = sigint.recv() => break "interrupted",
            _ = sigterm.recv() => break "terminated",
        }
    };
    session.sample()?;
    node.census
        .sample(session.started.elapsed().as_secs_f64(), &session.watched());
    node.meter.tick(session.probes.cost());
    log::info!("stopping: {why}");
    let report = build_report(&mut session, &node, cfg.top);
    let build_ids = session.normalizer.build_ids();
    if let Some(store) = &mut store {
        write_store(store, &report, &build_ids);
    }
    if cfg.outputs.is_empty() {
        eprintln!("leaktrace: {why}; final report:");
        write_any(cfg.format, &report, &build_ids, &mut io::stdout().lock())?;
    } else {
        let mut written = Vec::new();
        for out in &cfg.outputs {
            if let Some(dir) = out.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("failed to create directory {}", dir.display()))?;
            }
            let mut f =
                io::BufWriter::new(File::create(&out.path).with_context(|| {
                    format!("failed to create report file {}", out.path.display())
                })?);
            write_any(out.format, &report, &build_ids, &mut f)
                .and_then(|()| f.flush())
                .with_context(|| format!("failed to write report file {}", out.path.display()))?;
            written.push(out.path.display().to_string());
        }
        eprintln!("leaktrace: {why}; report written to {}", written.join(", "));
    }
    Ok(())
}

/// One interval: files in `--out`, or text on stdout when nothing else
/// keeps the reports.
fn periodic<K: Kernel>(session: &mut Session<K>, store: &mut Option<Store>, r: &NodeReport) {
    let build_ids = session.normalizer.build_ids();
    match store {
        Some(store) => write_store(store, r, &build_ids),
        None => {
            let _ = node_report::write_text(r, &mut io::stdout().lock());
        }
    }
}

fn write_store(store: &mut Store, r: &NodeReport, build_ids: &BTreeMap<String, String>) {
    let mut json = Vec::new();
    let mut pprof = Vec::new();
    let res = node_report::write_json(r, &mut json)
        .and_then(|()| report::write(Format::Pprof, &r.as_report(), build_ids, &mut pprof));
    if let Err(e) = res {
        log::warn!("failed to render the interval's report: {e}");
        return;
    }
    let unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Err(e) = store.write_interval(unix_s, &[("json", &json), ("pb.gz", &pprof)]) {
        eprintln!("leaktrace: {e}");
    }
}
