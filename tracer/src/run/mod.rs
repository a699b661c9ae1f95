//! The daemon: attach, follow processes as they fork, exec and exit, read
//! the kernel ledger on a timer, report periodically and once at the end
//! (duration, Ctrl-C, SIGTERM, or every target gone). Data flows one way:
//! probe -> events -> ledger -> trend -> symbolize -> report.

mod kernel;
mod lifecycle;
mod node;
mod reporting;
mod sample;

use kernel::Kernel;
use std::{
    collections::HashMap,
    fs::File,
    io::{self, Write},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracer_common::{sys, Counter, StackTotals, SyscallEvent, SYSCALL_IN_ALLOCATOR};

use crate::{
    attach::preflight,
    attach::probe::{MapSizes, ProbeError, ProbeOptions, Probes},
    attach::proc_events::{ProcConnector, ProcEvent},
    attach::targets::Selector,
    cli::Config,
    ingest::events::Counters,
    ingest::faults::FaultTracker,
    ingest::ledger::{Ledger, Row},
    ingest::mmaps::MmapTracker,
    report::{self, Format, Report, Source, Target},
    runtime::{RuntimeOptions, Runtimes},
    symbolize::{Normalizer, Symbolizer},
    sys::procfs::{self, ProcId},
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Running,
    Exited,
    NotAttached(String),
}

struct TargetState {
    id: ProcId,
    comm: String,
    status: Status,
    /// `/proc/PID/cgroup` at attach, for the OOM report of a victim
    /// reaped before its event is read.
    cgroups: Option<String>,
}

/// Kills the demo target when the trace ends, however it ends.
struct DemoChild(Child);

impl Drop for DemoChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Regions tracked at most (mmap/brk), per trace.
const MAX_REGIONS: usize = 1 << 20;

/// Sampled fault pages kept at most (node mode): about 60 bytes each.
const MAX_FAULT_PAGES: usize = 1 << 18;

struct Session<K: Kernel = Probes> {
    probes: K,
    selector: Selector,
    targets: HashMap<u32, TargetState>,
    ledger: Ledger,
    normalizer: Normalizer,
    symbolizer: Symbolizer,
    regions: MmapTracker,
    counters: Counters,
    started: Instant,
    min_age_ns: Option<u64>,
    /// Whether the trace ends when no target is left.
    closed_set: bool,
    syscall_buf: Vec<SyscallEvent>,
    oom_dir: std::path::PathBuf,
    top: usize,
    sort: crate::report::SortBy,
    sample_bytes: u64,
    /// The runtimes (`runtime::Runtimes::registry`): what each attached
    /// per process, and what it read.
    runtimes: Runtimes,
    /// Stacks of the runtimes' own rows, per `(tgid, key)`.
    runtime_stacks: HashMap<(u32, u64), crate::ingest::ledger::StackIdx>,
    /// Whether a syscall stack passes through an allocator function, per
    /// `(tgid, stack id)` (see `Probes::inside_allocator`).
    allocator_stacks: HashMap<(u32, tracer_common::StackId), bool>,
    /// Whether the pairing self-check has already warned on stderr.
    pairing_warned: bool,
    /// Whether children of traced processes are traced, existing and
    /// forked later (not `--no-children`).
    follow_children: bool,
    /// How many descendants each `--pid` had that were attached at start.
    descendants_at_start: std::collections::BTreeMap<u32, usize>,
    /// Node mode: processes are watched (syscalls, page faults, runtime
    /// walkers), not probed; a drill-down probes one for a while.
    watch_only: bool,
    /// Processes probed by a drill-down now (node mode).
    drilling: std::collections::HashSet<u32>,
    /// Sampled page faults (node mode).
    faults: FaultTracker,
    /// Node mode: one ledger per source, so a report can say what saw
    /// each stack grow.
    by_source: Option<std::collections::BTreeMap<Source, Ledger>>,
    /// Node mode: most processes watched at once, and how many were not
    /// watched because of it.
    max_targets: usize,
    over_limit: u64,
    /// Node mode: OOM victims whose reports the node writes (with its
    /// census); their rows are still in the ledgers.
    node_victims: Vec<node::Victim>,
    /// Processes whose kernel rows go at the next reading.
    pending_forget: std::collections::HashSet<u32>,
    /// Node mode: processes added lately, looked at again at each reading
    /// (an exec'd image maps its libraries after the exec event; without
    /// the syscall programs nothing says when).
    recent: Vec<(u32, Instant)>,
    /// Processes met between their exec and their loader, tried again at
    /// each tick (`retry_late`).
    late: Vec<(u32, Instant)>,
}

impl<K: Kernel> Session<K> {
    fn new(probes: K, runtimes: Runtimes, selector: Selector, cfg: &Config) -> Self {
        let closed_set = !selector.is_open();
        Session {
            probes,
            selector,
            targets: HashMap::new(),
            ledger: Ledger::default(),
            normalizer: Normalizer::default(),
            symbolizer: Symbolizer::new(),
            regions: MmapTracker::with_limit(MAX_REGIONS),
            counters: Counters::default(),
            started: Instant::now(),
            min_age_ns: cfg.min_age.map(|d| d.as_nanos() as u64),
            closed_set,
            syscall_buf: Vec::new(),
            oom_dir: cfg.oom_dir.clone(),
            top: cfg.top,
            sort: cfg.sort,
            sample_bytes: cfg.sample_bytes,
            runtimes,
            runtime_stacks: HashMap::new(),
            allocator_stacks: HashMap::new(),
            pairing_warned: false,
            follow_children: cfg.follow_children,
            descendants_at_start: Default::default(),
            watch_only: false,
            drilling: Default::default(),
            faults: FaultTracker::with_limit(MAX_FAULT_PAGES),
            by_source: None,
            max_targets: usize::MAX,
            over_limit: 0,
            node_victims: Vec::new(),
            pending_forget: Default::default(),
            recent: Vec::new(),
            late: Vec::new(),
        }
    }

    fn running(&self) -> usize {
        self.targets
            .values()
            .filter(|t| t.status == Status::Running)
            .count()
    }

    /// Events arrived: apply them, and on an OOM kill freeze the victim's
    /// view into a report at once.
    fn on_events(&mut self) -> anyhow::Result<()> {
        let victims = self.drain_events();
        if !victims.is_empty() {
            self.ingest()?;
            for v in victims {
                self.on_victim(v);
            }
        }
        Ok(())
    }

    /// The OOM killer chose `pid`: its report now (node mode: by the node,
    /// which adds what its census knows).
    fn on_victim(&mut self, pid: u32) {
        if self.watch_only {
            let v = self.freeze_victim(pid);
            self.node_victims.push(v);
        } else {
            self.write_oom_report(pid);
        }
    }

    fn done(&self) -> bool {
        self.closed_set && self.running() == 0
    }
}

/// Feed one memory syscall (or sampled fault) into the region and fault
/// trackers.
fn apply_syscall(regions: &mut MmapTracker, faults: &mut FaultTracker, ev: &SyscallEvent) {
    regions.set_now(ev.ts_ns);
    match ev.nr {
        sys::PAGE_FAULT => faults.fault(ev.tgid, ev.ret, ev.args[1], ev.stack_id),
        sys::MUNMAP => faults.unmap(ev.tgid, ev.args[0], ev.args[1]),
        sys::MREMAP => faults.remap(ev.tgid, ev.args[0], ev.args[1], ev.ret, ev.args[2]),
        sys::BRK => faults.brk(ev.tgid, ev.ret),
        _ => {}
    }
    match ev.nr {
        // The allocator's own mappings (an arena made inside `free`) hold
        // the blocks it serves, which are counted already.
        sys::MMAP | sys::MREMAP if ev.flags & SYSCALL_IN_ALLOCATOR != 0 => {}
        sys::MMAP if ev.args[1] & sys::MAP_SHARED != 0 => {
            regions.mmap_shared(ev.tgid, ev.ret, ev.args[0], ev.stack_id)
        }
        sys::MMAP => regions.mmap(ev.tgid, ev.ret, ev.args[0], ev.stack_id),
        sys::MUNMAP => regions.munmap(ev.tgid, ev.args[0], ev.args[1]),
        sys::MREMAP => regions.mremap(
            ev.tgid,
            ev.args[0],
            ev.args[1],
            ev.ret,
            ev.args[2],
            ev.stack_id,
        ),
        sys::BRK if ev.flags & SYSCALL_IN_ALLOCATOR != 0 => regions.move_brk(ev.tgid, ev.ret),
        sys::BRK => regions.brk(ev.tgid, ev.ret, ev.stack_id),
        _ => {}
    }
}

fn spawn_demo() -> anyhow::Result<DemoChild> {
    let exe = std::env::current_exe().context("failed to find leaktrace's own executable")?;
    let child = Command::new(exe)
        .arg("--demo-target")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("failed to start the demo target")?;
    Ok(DemoChild(child))
}

/// Forward the eBPF programs' log records to leaktrace's log as they come.
fn spawn_bpf_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's descriptor, which lives
    // exactly as long as the AsyncFd that wraps it.
    match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(mut fd) => {
            tokio::spawn(async move {
                while let Ok(mut guard) = fd.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => log::warn!("--debug-bpf: cannot wait on the eBPF log: {e}"),
    }
}

/// Many processes mean many probe links (one descriptor each).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer, then the same struct back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    if cfg.node.is_some() {
        return node::run(cfg).await;
    }
    // A bad pid is named whoever runs leaktrace; then the privilege; then
    // the outputs, before tracing starts: a typo must not cost the trace.
    let mut roots = Vec::new();
    for &pid in &cfg.pids {
        // A thread id names its process.
        let tgid = procfs::tgid(pid).ok_or(ProbeError::NoProcess { pid })?;
        roots.push(tgid);
    }
    roots.sort_unstable();
    roots.dedup();
    let mut pids = Vec::new();
    preflight::check()?;
    cfg.check_paths()?;
    // Handlers first: once "attached" is printed, Ctrl-C must give a report.
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    raise_fd_limit();

    let mut demo = if cfg.demo { Some(spawn_demo()?) } else { None };
    let selector = Selector::new(&cfg.comms, &cfg.cgroups);
    for missing in selector.missing_cgroups() {
        eprintln!(
            "leaktrace: cgroup {missing} does not exist under any cgroup mount; waiting for it \
             to appear"
        );
    }
    if let Some(d) = &demo {
        pids.push(d.0.id());
    }
    if selector.is_open() {
        let me = std::process::id();
        pids.extend(
            procfs::all_pids()
                .into_iter()
                .filter(|p| *p != me && selector.matches(*p)),
        );
    }
    pids.sort_unstable();
    pids.dedup();

    let probes = Probes::load(
        MapSizes {
            max_allocs: cfg.max_allocs,
            max_stacks: cfg.max_stacks,
            max_unwind_rows: cfg.max_unwind_rows,
            max_processes: 1 << 11,
        },
        ProbeOptions {
            free_at_entry: cfg.free_probe_at_entry,
            extra_prefixes: cfg.allocator_prefixes.clone(),
            syscalls: cfg.syscalls,
            oom_any: cfg.oom_any,
            sample_bytes: cfg.sample_bytes,
            pymalloc: cfg.pymalloc,
            debug_bpf: cfg.debug_bpf,
            fault_period: 0,
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
            log::warn!(
                "process events unavailable ({e}); following forks and exits by scanning /proc"
            );
            None
        }
    };
    let runtimes = Runtimes::registry(&RuntimeOptions {
        go_enable_profiling: cfg.go_enable_profiling,
    });
    let mut session = Session::new(probes, runtimes, selector.clone(), &cfg);
    let mut first_err = None;
    // After the connector is open: a fork during the walk is either found
    // by it or reported as an event of a parent traced by then.
    for &pid in &roots {
        if let Err(e) = session.add_tree(pid) {
            first_err.get_or_insert(e);
        }
    }
    for &pid in &pids {
        if session.targets.contains_key(&pid) {
            continue;
        }
        if let Err(e) = session.add(pid) {
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        if session.running() == 0 && !selector.is_open() {
            return Err(e.into());
        }
        eprintln!("leaktrace: warning: {e}");
    }
    let mut attached: Vec<String> = session
        .targets
        .iter()
        .filter(|(_, t)| t.status == Status::Running)
        .map(|(p, t)| format!("{p} ({})", t.comm))
        .collect();
    attached.sort();
    if attached.len() > 8 {
        let n = attached.len();
        attached.truncate(8);
        attached.push(format!("and {} more", n - 8));
    }
    let what = match (attached.is_empty(), selector.is_open()) {
        (true, _) => "no process yet (waiting for matching processes)".to_string(),
        (false, true) => format!(
            "{} (and matching processes as they start)",
            attached.join(", ")
        ),
        (false, false) => attached.join(", "),
    };
    eprintln!(
        "leaktrace: attached to {what}; {}",
        match cfg.duration {
            Some(d) => format!("tracing for {:.0}s (Ctrl-C ends early)", d.as_secs_f64()),
            None => "tracing until Ctrl-C".into(),
        }
    );
    if let Some(d) = &mut demo {
        if let Some(stdin) = d.0.stdin.as_mut() {
            writeln!(stdin, "go").context("failed to start the demo target")?;
        }
    }

    let events_fd = session.probes.events_fd().and_then(|fd| {
        // SAFETY: the duplicated descriptor is owned by the AsyncFd.
        unsafe { AsyncFd::register(fd) }.ok()
    });
    let mut tick = tokio::time::interval(cfg.sample_every);
    let mut next_report = cfg.interval.map(|i| Instant::now() + i);
    let deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
    let periodic_ok = cfg.format == Format::Text || !cfg.outputs.is_empty();
    // SAFETY: isatty has no preconditions.
    let stdout_is_tty = unsafe { libc::isatty(1) } == 1;
    let mut proc_events = Vec::new();
    let why = loop {
        tokio::select! {
            _ = tick.tick() => {
                if connector.is_none() {
                    session.rescan();
                }
                session.retry_late();
                session.refresh_objects();
                session.sample()?;
                if session.done() {
                    break "every target exited";
                }
                if let (Some(at), Some(every)) = (next_report, cfg.interval) {
                    if Instant::now() >= at && periodic_ok {
                        let r = session.report(&cfg);
                        if stdout_is_tty {
                            let res = report::live::write(&r, &mut io::stdout().lock());
                            if let Err(e) = res {
                                if e.kind() != io::ErrorKind::BrokenPipe {
                                    return Err(e.into());
                                }
                            }
                        } else {
                            let out = &mut io::stdout().lock();
                            report::write(Format::Text, &r, &Default::default(), out)?;
                        }
                        next_report = Some(at + every);
                    }
                }
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
                if session.done() {
                    break "every target exited";
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
    log::info!("stopping: {why}");
    let report = session.report(&cfg);
    // Flamegraphs and profiles show every stack, not only the top ones.
    let full = if cfg.outputs.iter().any(|o| o.format.shows_every_stack())
        || cfg.format.shows_every_stack()
    {
        session.report_top(&cfg, usize::MAX)
    } else {
        report.clone()
    };
    let build_ids = session.normalizer.build_ids();
    if cfg.outputs.is_empty() {
        eprintln!("leaktrace: {why}; final report:");
        let r = if cfg.format.shows_every_stack() {
            &full
        } else {
            &report
        };
        report::write(cfg.format, r, &build_ids, &mut io::stdout().lock())?;
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
            let r = if out.format.shows_every_stack() {
                &full
            } else {
                &report
            };
            report::write(out.format, r, &build_ids, &mut f)
                .with_context(|| format!("failed to write report file {}", out.path.display()))?;
            written.push(out.path.display().to_string());
        }
        eprintln!("leaktrace: {why}; report written to {}", written.join(", "));
    }
    drop(demo);
    Ok(())
}

#[cfg(test)]
mod tests;
