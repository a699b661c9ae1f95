//! The daemon: attach, follow processes as they fork, exec and exit, read
//! the kernel ledger on a timer, report periodically and once at the end
//! (duration, Ctrl-C, SIGTERM, or every target gone). Data flows one way:
//! probe -> events -> ledger -> trend -> symbolize -> report.

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
    ingest::ledger::{Ledger, Row},
    ingest::mmaps::MmapTracker,
    report::{self, Format, Report, Target},
    runtime::go::stats::GoFigures,
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

struct Session {
    probes: Probes,
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
    /// Go profile buckets seen, per `(tgid, bucket)`: their stack and
    /// bytes per object (`None`: the bucket could not be read).
    go_buckets: HashMap<(u32, u64), Option<(crate::ingest::ledger::StackIdx, u64)>>,
    /// Whether a syscall stack passes through an allocator function, per
    /// `(tgid, stack id)` (see `Probes::inside_allocator`).
    allocator_stacks: HashMap<(u32, tracer_common::StackId), bool>,
    /// The Go runtime's own figures per process at the latest sample
    /// (those at attach are the target's).
    go_figures: HashMap<u32, (Instant, GoFigures)>,
    /// Whether the pairing self-check has already warned on stderr.
    pairing_warned: bool,
}

impl Session {
    fn running(&self) -> usize {
        self.targets
            .values()
            .filter(|t| t.status == Status::Running)
            .count()
    }

    /// Attach to a process (new, forked, exec'd, or matched by name or
    /// cgroup). Failures are kept as the target's status.
    fn add(&mut self, pid: u32) -> Result<(), ProbeError> {
        let Some(id) = ProcId::current(pid) else {
            return Err(ProbeError::NoProcess { pid });
        };
        let comm = procfs::comm(pid).unwrap_or_else(|| "?".into());
        let res = self.probes.attach_process(pid);
        let status = match &res {
            Ok(att) => {
                for (object, funcs) in &att.objects {
                    let names: Vec<String> = funcs
                        .iter()
                        .map(|f| match f.offset {
                            0 => f.name.clone(),
                            off => format!("{}+{off}", f.name),
                        })
                        .collect();
                    log::debug!("pid {pid}: {object}: {}", names.join(" "));
                }
                if let Some(py) = self.probes.python_target(pid) {
                    self.normalizer.set_python(pid, py.clone());
                }
                if let Ok(maps) = procfs::read_maps(pid) {
                    if let Some(heap) = maps.iter().find(|m| m.pseudo.as_deref() == Some("[heap]"))
                    {
                        self.regions.set_initial_brk(pid, heap.end);
                    }
                    self.normalizer.remember_maps(pid, maps);
                }
                Status::Running
            }
            Err(e) => Status::NotAttached(e.to_string()),
        };
        self.targets.insert(pid, TargetState { id, comm, status });
        res.map(|_| ())
    }

    /// Forget everything about a process's address space: it exited, or
    /// exec'd into a new image whose addresses mean something else.
    fn drop_address_space(&mut self, pid: u32) {
        self.probes.detach_process(pid);
        if let Err(e) = self.probes.forget_process(pid) {
            log::warn!("{e}");
        }
        self.normalizer.forget_process(pid);
        self.go_buckets.retain(|(t, _), _| *t != pid);
        self.allocator_stacks.retain(|(t, _), _| *t != pid);
        self.go_figures.remove(&pid);
        self.regions.forget(pid);
    }

    fn on_proc_event(&mut self, ev: ProcEvent) {
        match ev {
            ProcEvent::Fork { parent, child } => {
                let traced_parent = self
                    .targets
                    .get(&parent)
                    .is_some_and(|t| t.status == Status::Running);
                if (traced_parent || self.selector.matches(child))
                    && !self.targets.contains_key(&child)
                {
                    match self.add(child) {
                        Ok(()) => log::info!("following child {child} of {parent}"),
                        Err(e) => log::warn!("not following child {child} of {parent}: {e}"),
                    }
                }
            }
            ProcEvent::Exec { pid } => {
                let traced = self
                    .targets
                    .get(&pid)
                    .is_some_and(|t| t.status == Status::Running);
                if traced {
                    self.drop_address_space(pid);
                    self.targets.remove(&pid);
                    if let Err(e) = self.add(pid) {
                        log::warn!(
                            "process {pid} exec'd into something leaktrace cannot trace: {e}"
                        );
                    } else {
                        log::info!("re-attached to {pid} after exec");
                    }
                } else if self.selector.matches(pid) {
                    self.targets.remove(&pid);
                    if let Err(e) = self.add(pid) {
                        log::warn!("not tracing {pid}: {e}");
                    }
                }
            }
            ProcEvent::Exit { pid } => self.on_exit(pid),
            ProcEvent::Comm { pid } => {
                // A worker that names itself after it was forked
                // (prctl(PR_SET_NAME)) now matches --comm.
                if !self.targets.contains_key(&pid) && self.selector.matches(pid) {
                    match self.add(pid) {
                        Ok(()) => log::info!("following {pid}: renamed to a traced name"),
                        Err(e) => log::warn!("not tracing {pid}: {e}"),
                    }
                }
            }
        }
    }

    fn on_exit(&mut self, pid: u32) {
        if !self.targets.contains_key(&pid) {
            return;
        }
        // An OOM kill's event may still be queued: its report needs the
        // rows this exit is about to drop.
        if let Err(e) = self.on_events() {
            log::warn!("{e:#}");
        }
        let Some(t) = self.targets.get_mut(&pid) else {
            return;
        };
        if t.status != Status::Running {
            return;
        }
        t.status = Status::Exited;
        log::info!("process {pid} ({}) exited", t.comm);
        // The last process of a fixed set keeps its data for the final
        // report; otherwise its memory is gone and so are its rows (a
        // recycled worker must not look like a leak, and its pid may be
        // reused).
        if self.running() > 0 || !self.closed_set {
            self.drop_address_space(pid);
        } else {
            self.probes.detach_process(pid);
        }
    }

    /// Without the process connector: find new children and matches in
    /// `/proc`, and exits by polling.
    fn rescan(&mut self) {
        let exited: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, t)| t.status == Status::Running && !t.id.alive())
            .map(|(p, _)| *p)
            .collect();
        for pid in exited {
            self.on_exit(pid);
        }
        for pid in procfs::all_pids() {
            if self.targets.contains_key(&pid) {
                continue;
            }
            let parent_traced = procfs::ppid(pid).is_some_and(|pp| {
                self.targets
                    .get(&pp)
                    .is_some_and(|t| t.status == Status::Running)
            });
            if parent_traced || self.selector.matches(pid) {
                let _ = self.add(pid);
            }
        }
    }

    /// Libraries loaded since the last look (dlopen) get their probes.
    fn refresh_objects(&mut self) {
        let pids: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, t)| t.status == Status::Running)
            .map(|(p, _)| *p)
            .collect();
        for pid in pids {
            match self.probes.attach_process(pid) {
                // A libpython loaded late (an embedding host) is found now.
                Ok(_) => {
                    if let Some(py) = self.probes.python_target(pid) {
                        self.normalizer.set_python(pid, py.clone());
                    }
                }
                Err(e) => log::debug!("refresh of {pid}: {e}"),
            }
        }
    }

    /// Apply queued kernel events; returns the OOM victims among them.
    fn drain_events(&mut self) -> Vec<u32> {
        self.syscall_buf.clear();
        self.probes.drain_syscalls(&mut self.syscall_buf);
        let mut victims = Vec::new();
        for ev in &self.syscall_buf {
            if ev.nr == sys::OOM_VICTIM {
                victims.push(ev.tgid);
                continue;
            }
            let mut ev = *ev;
            if ev.flags & SYSCALL_IN_ALLOCATOR == 0 && ev.nr != sys::MUNMAP {
                let probes = &self.probes;
                let inside = *self
                    .allocator_stacks
                    .entry((ev.tgid, ev.stack_id))
                    .or_insert_with(|| {
                        probes
                            .stack(ev.stack_id)
                            .is_some_and(|s| probes.inside_allocator(ev.tgid, &s.ips))
                    });
                if inside {
                    ev.flags |= SYSCALL_IN_ALLOCATOR;
                }
            }
            apply_syscall(&mut self.regions, &ev);
        }
        victims
    }

    /// Events arrived: apply them, and on an OOM kill freeze the victim's
    /// view into a report at once.
    fn on_events(&mut self) -> anyhow::Result<()> {
        let victims = self.drain_events();
        if !victims.is_empty() {
            self.ingest()?;
            for v in victims {
                self.write_oom_report(v);
            }
        }
        Ok(())
    }

    /// One reading of the kernel ledger into the ledger's time series.
    fn sample(&mut self) -> anyhow::Result<()> {
        let victims = self.drain_events();
        self.ingest()?;
        self.read_go_figures();
        for v in victims {
            self.write_oom_report(v);
        }
        Ok(())
    }

    fn ingest(&mut self) -> anyhow::Result<()> {
        let reading = self.probes.read()?;
        let kernel_rows = match self.min_age_ns {
            Some(age) => self.probes.read_aged(age)?,
            None => reading.rows,
        };
        // A Go runtime that samples its heap is accounted through its
        // profile buckets; its heap's mmaps would count the same memory
        // again. Without sampling, the mmaps (with Go stacks) are the
        // attribution that needs no help from the runtime.
        let go_sampling: std::collections::HashSet<u32> = self
            .probes
            .go_targets()
            .filter(|(pid, t)| t.rate(*pid).is_ok_and(|r| r > 0))
            .map(|(pid, _)| pid)
            .collect();
        let probes = &self.probes;
        let normalizer = &mut self.normalizer;
        let mut rows: Vec<Row> = kernel_rows
            .iter()
            .map(|(key, totals)| Row {
                stack: normalizer.resolve(key.tgid, key.stack_id, || probes.stack(key.stack_id)),
                pid: key.tgid,
                totals: *totals,
            })
            .collect();
        let region_totals = match self.min_age_ns {
            Some(age) => self
                .regions
                .totals_older_than(crate::ingest::events::monotonic_ns().saturating_sub(age)),
            None => self.regions.totals(),
        };
        for r in region_totals {
            if go_sampling.contains(&r.tgid) {
                continue;
            }
            let bytes = i64::try_from(r.bytes).unwrap_or(i64::MAX);
            rows.push(Row {
                stack: normalizer.resolve(r.tgid, r.stack_id, || probes.stack(r.stack_id)),
                pid: r.tgid,
                totals: StackTotals {
                    outstanding_bytes: bytes,
                    outstanding_allocs: r.regions as i64,
                    total_bytes: r.bytes,
                    total_allocs: r.regions,
                },
            });
        }
        self.go_rows(&mut rows)?;
        self.ledger
            .ingest(self.started.elapsed().as_secs_f64(), &rows);
        self.counters = reading.counters;
        if !self.pairing_warned {
            if let Some(problem) = self.counters.pairing_problem(&procfs::kernel_release()) {
                eprintln!("leaktrace: {problem}");
                self.pairing_warned = true;
            }
        }
        Ok(())
    }

    /// Rows for the Go runtime's sampled heap objects: one per profile
    /// bucket, its stack read from the process on first sight, its bytes
    /// and counts scaled as `go tool pprof -inuse_space` scales them.
    /// Objects allocated before attach and freed since debit a bucket
    /// below zero; such rows count as zero.
    fn go_rows(&mut self, rows: &mut Vec<Row>) -> anyhow::Result<()> {
        // Probe counts since attach, plus what each bucket held at attach
        // (walked then; see `GoTarget::walk`).
        let mut raw: HashMap<(u32, u64), StackTotals> = self
            .probes
            .read_go()?
            .into_iter()
            .map(|(k, t)| ((k.tgid, k.bucket), t))
            .collect();
        for (pid, target) in self.probes.go_targets() {
            for b in &target.baseline {
                let t = raw.entry((pid, b.addr)).or_default();
                t.outstanding_bytes += b.live_bytes;
                t.outstanding_allocs += b.live_objects;
                t.total_bytes += b.alloc_bytes;
                t.total_allocs += b.alloc_objects;
                let normalizer = &mut self.normalizer;
                self.go_buckets.entry((pid, b.addr)).or_insert_with(|| {
                    Some((
                        normalizer.intern_go(pid, &b.bucket.pcs),
                        b.bucket.size_bytes,
                    ))
                });
            }
        }
        if raw.is_empty() {
            return Ok(());
        }
        let mut rates: HashMap<u32, i64> = HashMap::new();
        for ((pid, bucket), totals) in raw {
            let normalizer = &mut self.normalizer;
            let Some((stack, size)) = *self.go_buckets.entry((pid, bucket)).or_insert_with(|| {
                match crate::runtime::go::read_bucket(pid, bucket) {
                    Ok(b) => Some((normalizer.intern_go(pid, &b.pcs), b.size_bytes)),
                    Err(e) => {
                        log::debug!("go bucket {bucket:#x} of {pid}: {e}");
                        None
                    }
                }
            }) else {
                continue;
            };
            let rate = *rates.entry(pid).or_insert_with(|| {
                self.probes
                    .go_targets()
                    .find(|(p, _)| *p == pid)
                    .and_then(|(_, t)| t.rate(pid).ok())
                    .unwrap_or(0)
            });
            let avg = if totals.total_allocs > 0 {
                totals.total_bytes as f64 / totals.total_allocs as f64
            } else {
                size as f64
            };
            let f = crate::runtime::go::scale(avg, rate);
            let scaled = |v: i64| (v.max(0) as f64 * f).round() as i64;
            rows.push(Row {
                stack,
                pid,
                totals: StackTotals {
                    outstanding_bytes: scaled(totals.outstanding_bytes),
                    outstanding_allocs: scaled(totals.outstanding_allocs),
                    total_bytes: (totals.total_bytes as f64 * f).round() as u64,
                    total_allocs: (totals.total_allocs as f64 * f).round() as u64,
                },
            });
        }
        Ok(())
    }

    /// Read each running Go process's runtime figures.
    fn read_go_figures(&mut self) {
        for (pid, target) in self.probes.go_targets() {
            if self.targets.get(&pid).map(|t| &t.status) != Some(&Status::Running) {
                continue;
            }
            let f = crate::runtime::go::stats::read(pid, &target.stats);
            if f != GoFigures::default() {
                self.go_figures.insert(pid, (Instant::now(), f));
            }
        }
    }

    /// The Go runtime figures of the Go processes traced (of `only` when
    /// given), for a report: at attach and at the last sample.
    fn go_runtime(&self, only: Option<u32>) -> Vec<report::GoRuntime> {
        let mut out: Vec<report::GoRuntime> = self
            .probes
            .go_targets()
            .filter(|(pid, _)| only.is_none_or(|o| o == *pid))
            .map(|(pid, t)| {
                let (then, first) = t.at_attach;
                let (now, last) = self.go_figures.get(&pid).copied().unwrap_or(t.at_attach);
                report::GoRuntime {
                    pid,
                    version: t.version.clone(),
                    at_attach: first,
                    now: last,
                    elapsed_s: now.saturating_duration_since(then).as_secs_f64(),
                    unavailable: t.stats.missing.clone(),
                }
            })
            .collect();
        out.sort_by_key(|g| g.pid);
        out
    }

    /// The OOM black box: the victim's outstanding stacks, its cgroup and
    /// memory figures, as JSON and folded stacks in `--oom-dir`.
    fn write_oom_report(&mut self, pid: u32) {
        let comm = self
            .targets
            .get(&pid)
            .map(|t| t.comm.clone())
            .or_else(|| procfs::comm(pid))
            .unwrap_or_else(|| "?".into());
        let mut notes = vec![format!("the OOM killer chose process {pid} ({comm})")];
        notes.extend(crate::oom::victim_facts(pid));
        let ledger = self.ledger.only_pid(pid);
        let go_runtime = self.go_runtime(Some(pid));
        let (normalizer, symbolizer) = (&self.normalizer, &mut self.symbolizer);
        let report = report::build(
            report::Inputs {
                duration_s: self.started.elapsed().as_secs_f64(),
                targets: vec![Target {
                    pid,
                    comm: comm.clone(),
                    status: "oom-killed".into(),
                }],
                counters: &self.counters,
                ledger: &ledger,
                top: self.top,
                sort: self.sort,
                notes,
                sample_bytes: self.sample_bytes,
                go_runtime,
            },
            &mut |idxs| symbolizer.symbolize(normalizer, idxs),
        );
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = self.oom_dir.join(format!("leaktrace-oom-{pid}-{stamp}"));
        let json = base.with_extension("json");
        let folded = base.with_extension("folded");
        let res = std::fs::create_dir_all(&self.oom_dir)
            .and_then(|()| {
                let mut f = io::BufWriter::new(File::create(&json)?);
                report::json::write(&report, &mut f)?;
                f.flush()
            })
            .and_then(|()| {
                let mut f = io::BufWriter::new(File::create(&folded)?);
                report::folded::write(&report, &mut f)?;
                f.flush()
            });
        match res {
            Ok(()) => eprintln!(
                "leaktrace: the OOM killer chose process {pid} ({comm}); its report is in {} and {}",
                json.display(),
                folded.display()
            ),
            Err(e) => eprintln!(
                "leaktrace: the OOM killer chose process {pid} ({comm}) but its report could not be written to {}: {e}",
                self.oom_dir.display()
            ),
        }
    }

    fn done(&self) -> bool {
        self.closed_set && self.running() == 0
    }

    fn report(&mut self, cfg: &Config) -> Report {
        self.report_top(cfg, cfg.top)
    }

    fn report_top(&mut self, cfg: &Config, top: usize) -> Report {
        let mut notes = Vec::new();
        if let Some(problem) = self.counters.pairing_problem(&procfs::kernel_release()) {
            notes.push(problem);
        }
        let repeated = self.counters.get(Counter::RepeatedReturns);
        if repeated > 0 {
            notes.push(format!(
                "this kernel runs the return probe of every traced process that maps an \
                 allocator for each return ({repeated} repeated runs, not losses): tracing many \
                 processes that share a library costs more per allocation here than on newer \
                 kernels (Linux 6.18 runs only the process's own)"
            ));
        }
        let lost: Vec<String> = Counter::ALL
            .iter()
            .filter(|c| c.is_loss() && self.counters.get(**c) > 0)
            .map(|c| {
                format!(
                    "{} {} ({})",
                    self.counters.get(*c),
                    c.name(),
                    crate::ingest::events::loss_meaning(*c)
                )
            })
            .collect();
        if !lost.is_empty() {
            notes.push(format!("events lost: {}", lost.join("; ")));
        }
        if self.regions.dropped() > 0 {
            notes.push(format!(
                "{} mmap/brk regions not tracked (region table full)",
                self.regions.dropped()
            ));
        }
        if cfg.sample_bytes > 0 {
            notes.push(format!(
                "allocations sampled by bytes (mean period {} bytes): bytes and counts are \
                 estimates; each stack's relative error is about sqrt(period / bytes)",
                cfg.sample_bytes
            ));
        }
        if let Err(why) = &self.probes.oom {
            notes.push(format!("OOM black box unavailable: {why}"));
        }
        let un = &self.probes.unwind_notes;
        if !un.table_full.is_empty() {
            notes.push(format!(
                "unwind table full (raise --max-unwind-rows); frame pointers used for: {}",
                un.table_full.join(", ")
            ));
        }
        if !un.unreadable.is_empty() {
            notes.push(format!(
                "unwind info unreadable: {}",
                un.unreadable.join("; ")
            ));
        }
        notes.extend(self.probes.python_notes.iter().cloned());
        notes.extend(self.probes.go_notes.iter().cloned());
        let mut go: Vec<(u32, &crate::runtime::go::GoTarget)> = self.probes.go_targets().collect();
        go.sort_by_key(|(p, _)| *p);
        for (pid, target) in go {
            if target.rate(pid) == Ok(0) {
                notes.push(crate::runtime::go::rate_zero_note(pid, target));
            }
        }
        if let Some(age) = self.min_age_ns {
            notes.push(format!(
                "only allocations older than {:.1}s are counted (--min-age)",
                age as f64 / 1e9
            ));
        }
        let mut pids: Vec<&u32> = self.targets.keys().collect();
        pids.sort();
        for pid in &pids {
            if let Some(TargetState {
                status: Status::NotAttached(why),
                comm,
                ..
            }) = self.targets.get(pid)
            {
                notes.push(format!("process {pid} ({comm}) not traced: {why}"));
            }
        }
        let targets = pids
            .iter()
            .filter_map(|pid| self.targets.get(pid).map(|t| (**pid, t)))
            .map(|(pid, t)| Target {
                pid,
                comm: t.comm.clone(),
                status: match &t.status {
                    Status::Running => "running".into(),
                    Status::Exited => "exited".into(),
                    Status::NotAttached(why) => format!("not attached: {why}"),
                },
            })
            .collect();
        let go_runtime = self.go_runtime(None);
        let (normalizer, symbolizer) = (&self.normalizer, &mut self.symbolizer);
        report::build(
            report::Inputs {
                duration_s: self.started.elapsed().as_secs_f64(),
                targets,
                counters: &self.counters,
                ledger: &self.ledger,
                top,
                sort: cfg.sort,
                notes,
                sample_bytes: cfg.sample_bytes,
                go_runtime,
            },
            &mut |idxs| symbolizer.symbolize(normalizer, idxs),
        )
    }
}

/// Feed one memory syscall into the region tracker.
fn apply_syscall(regions: &mut MmapTracker, ev: &SyscallEvent) {
    regions.set_now(ev.ts_ns);
    match ev.nr {
        // The allocator's own mappings (an arena made inside `free`) hold
        // the blocks it serves, which are counted already.
        sys::MMAP | sys::MREMAP if ev.flags & SYSCALL_IN_ALLOCATOR != 0 => {}
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
    // A bad pid is named whoever runs leaktrace; then the privilege; then
    // the outputs, before tracing starts: a typo must not cost the trace.
    let mut pids = Vec::new();
    for &pid in &cfg.pids {
        // A thread id names its process.
        let tgid = procfs::tgid(pid).ok_or(ProbeError::NoProcess { pid })?;
        pids.push(tgid);
    }
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
            go_enable_profiling: cfg.go_enable_profiling,
            pymalloc: cfg.pymalloc,
        },
    )?;
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
    let mut session = Session {
        probes,
        selector: selector.clone(),
        targets: HashMap::new(),
        ledger: Ledger::default(),
        normalizer: Normalizer::default(),
        symbolizer: Symbolizer::new(),
        regions: MmapTracker::with_limit(MAX_REGIONS),
        counters: Counters::default(),
        started: Instant::now(),
        min_age_ns: cfg.min_age.map(|d| d.as_nanos() as u64),
        closed_set: !selector.is_open(),
        syscall_buf: Vec::new(),
        oom_dir: cfg.oom_dir.clone(),
        top: cfg.top,
        sort: cfg.sort,
        sample_bytes: cfg.sample_bytes,
        go_buckets: HashMap::new(),
        allocator_stacks: HashMap::new(),
        go_figures: HashMap::new(),
        pairing_warned: false,
    };
    let mut first_err = None;
    for &pid in &pids {
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
                match res.map(|b| b.overrun) {
                    Ok(false) => {}
                    // Overrun: events were dropped; catch up from /proc.
                    Ok(true) => {
                        log::warn!("process events overrun; rescanning /proc");
                        session.rescan();
                    }
                    Err(e) => {
                        log::warn!("process events failed ({e}); rescanning /proc");
                        session.rescan();
                    }
                }
                for ev in proc_events.drain(..) {
                    session.on_proc_event(ev);
                }
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
