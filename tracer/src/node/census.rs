//! Tier 0 of `leaktrace node`: every selected process's memory, and its
//! cgroup's, over time, read from `/proc` and the cgroup files each tick,
//! each series classified as growing, plateau, churn, steady or shrinking.
//!
//! Inputs: the pids the caller selects and the time of the tick
//! ([`Census::sample`]). Outputs: [`ProcessView`]s and [`CgroupView`]s,
//! sorted by growth; how long a process has been growing (the trigger for
//! a drill-down with probes); the last figures of processes that are gone
//! (an OOM victim is reaped before its kill is reported).
//!
//! What is read, and why it is cheap enough to run over every process of a
//! machine every second or two:
//! - `/proc/PID/statm`, held open and read again with `pread` at offset 0:
//!   `resident - shared` is exactly `RssAnon` (the kernel computes
//!   `shared` as file plus shmem pages), so `/proc/PID/status`, several
//!   times dearer to generate, is not needed. A held procfs file is bound
//!   to its process: once that process is reaped the read fails with
//!   `ESRCH`, even if the pid is reused, so pid reuse costs no read of
//!   `stat` per tick. Re-reading a held file skips the path walk, open and
//!   close, about ten times cheaper than opening it each tick. One file
//!   descriptor per watched process ([`CensusOptions::max_processes`]
//!   bounds them; [`raise_fd_limit`] lifts the soft limit); when none is
//!   left the process is read by path and its identity checked in `stat`.
//! - `/proc/PID/stat` once, for the start time (identity), the name, and
//!   to skip kernel threads and zombies; `/proc/PID/cgroup` once, then
//!   again only after an exec (a changed text size in `statm`, or
//!   [`Census::note_exec`]) and every minute or so in case the process was
//!   moved.
//! - per distinct cgroup of the watched processes: `memory.current` and
//!   `memory.stat` (`anon`), held open; `memory.max` at first sight and
//!   every minute. On a cgroup v1 host: `memory.usage_in_bytes`,
//!   `memory.stat` (`total_rss`) and `memory.limit_in_bytes`.
//!
//! How a series is classified (`classify`): anon bytes, because file
//! pages come and go with the page cache. Each series keeps
//! [`SLOTS`] slots across [`CensusOptions::window`]; a slot holds the
//! lowest reading in it (the floor), the highest, and the sum of the rises
//! between readings (turnover). The floors are fitted with
//! [`crate::report::trend::fit`]: a floor that keeps rising is a leak even
//! under a garbage collector's sawtooth, while a series that swings up and
//! down has a flat floor, so it is never growing. Turnover stands in for
//! the "bytes ever allocated" the fit takes for a stack: a process that
//! re-made more than its own peak within the window churns.
//!
//! Invariants: at most `max_processes` processes and `max_cgroups` cgroups
//! are tracked, each with at most [`SLOTS`] slots, and at most
//! [`LAST_KNOWN`] exited processes are remembered. Processes not selected
//! at a tick are aged out at once. Nothing here panics on odd procfs text;
//! a process that cannot be read is skipped.

use std::{
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use super::container::{self, Container};
use crate::{
    report::trend::{self, Trend},
    sys::cgroupfs::Mounts,
};

/// Slots per series: the window is cut into this many, each keeping the
/// floor, top and turnover of the readings in it (24 bytes each as
/// stored, about 2 KiB per process).
pub const SLOTS: usize = 64;

/// Exited processes whose last figures are kept for [`Census::last_known`].
pub const LAST_KNOWN: usize = 256;

/// A floor that moves less than this across the window is not moving: RSS
/// is page-granular, a thread's stack touches a few pages, and glibc grows
/// its heap by a 128 KiB top pad at a time.
pub const NOISE_BYTES: u64 = 256 << 10;

/// ... nor one that moves less than this share of the process's peak: a
/// few MiB of wander in a 2 GiB process is not a leak worth a drill-down.
pub const NOISE_FRACTION: f64 = 0.005;

/// Comm and cgroup are read again this often (plus up to half as much
/// again, spread by pid so the reads do not bunch up).
const REFRESH_S: f64 = 60.0;

/// A process refused by the bound displaces a tracked one only when it
/// holds this many times the smaller one's anon memory, so two processes
/// of about the same size do not take turns.
const EVICT_FACTOR: u64 = 2;

/// `PF_KTHREAD` in the flags of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Bounds and window of a [`Census`].
#[derive(Clone, Debug)]
pub struct CensusOptions {
    /// How much history each series keeps (e.g. 10 minutes).
    pub window: Duration,
    /// Most processes tracked at once (e.g. 4096); one file descriptor
    /// each.
    pub max_processes: usize,
    /// Most cgroups tracked at once; two file descriptors each.
    pub max_cgroups: usize,
}

impl Default for CensusOptions {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
            max_processes: 4096,
            max_cgroups: 1024,
        }
    }
}

/// A process as the census sees it.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessView {
    pub pid: u32,
    pub comm: String,
    /// The cgroup path as `/proc/PID/cgroup` gives it (the memory
    /// controller's on a cgroup v1 host).
    pub cgroup: String,
    pub container: Option<Container>,
    pub rss_bytes: u64,
    /// Anonymous resident memory (`RssAnon`): what the trend is about.
    pub anon_bytes: u64,
    /// Slope of the anon floor across the window (see the module docs).
    pub growth_bytes_per_s: f64,
    pub trend: Trend,
    /// When this process (this series, after an exec) was first read.
    pub first_seen_s: f64,
    /// `(seconds, bytes)`: the lowest anon reading of each slot of the
    /// window, oldest first; at most [`SLOTS`] points.
    #[serde(skip)]
    pub history: Vec<(f64, u64)>,
}

/// A cgroup that holds watched processes.
#[derive(Clone, Debug, Serialize)]
pub struct CgroupView {
    pub path: String,
    pub container: Option<Container>,
    /// `memory.current` (v1: `memory.usage_in_bytes`): all its memory,
    /// page cache included, descendants included.
    pub memory_current: u64,
    /// `memory.max` (v1: `memory.limit_in_bytes`); `None` when unlimited.
    pub memory_max: Option<u64>,
    /// `anon` of `memory.stat` (v1: `total_rss`), when readable. The trend
    /// follows this figure, else `memory_current`.
    pub anon_bytes: Option<u64>,
    pub growth_bytes_per_s: f64,
    pub trend: Trend,
    /// Watched processes in it (not in its descendants).
    pub processes: usize,
}

/// Tallies for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CensusCounts {
    /// Processes admitted since the start (a pid reused, or an exec, makes
    /// a new one).
    pub processes_seen: u64,
    /// Processes removed because they exited or were no longer selected.
    pub aged_out: u64,
    /// Processes refused or displaced because of `max_processes`.
    pub dropped: u64,
    /// Cgroups not tracked because of `max_cgroups`.
    pub cgroups_dropped: u64,
    /// Processes tracked now.
    pub processes: usize,
    /// Cgroups tracked now.
    pub cgroups: usize,
}

/// Per-process and per-cgroup memory over time. See the module docs.
pub struct Census {
    opts: CensusOptions,
    window_s: f64,
    slot_s: f64,
    reader: Reader,
    procs: HashMap<u32, Proc>,
    groups: HashMap<Arc<str>, Group>,
    /// Pids not worth tracking (kernel threads, zombies), by the tick they
    /// were last selected at.
    ignored: HashMap<u32, u64>,
    /// Pids refused by the bound, with their anon bytes, by tick.
    refused: HashMap<u32, Refused>,
    /// Cgroups refused by the bound, by tick.
    refused_groups: HashMap<Arc<str>, u64>,
    exited: VecDeque<ProcessView>,
    counts: CensusCounts,
    tick: u64,
    now_s: f64,
    scratch: Vec<(f64, f64)>,
    per_group: HashMap<Arc<str>, usize>,
}

struct Refused {
    anon_bytes: u64,
    tick: u64,
}

/// One anon (or cgroup) reading, as the pure part of the census takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Reading {
    rss_bytes: u64,
    anon_bytes: u64,
}

/// Who a newly admitted process is.
struct Ident {
    start_ticks: u64,
    comm: String,
    cgroup: Arc<str>,
    statm: Source,
    text_pages: u64,
}

/// Where a process's `statm` is read from.
enum Source {
    /// Held open; a read after the process is reaped fails with `ESRCH`.
    Held(File),
    /// No descriptor to spare: opened by path each tick, identity checked
    /// against the start time in `stat`.
    Path,
    /// Nothing to read (figures are injected: tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Injected,
}

struct Proc {
    start_ticks: u64,
    comm: String,
    cgroup: Arc<str>,
    container: Option<Container>,
    statm: Source,
    text_pages: u64,
    last: Reading,
    tracker: Tracker,
    refresh_at: f64,
    exec_noted: bool,
    tick: u64,
}

struct Group {
    container: Option<Container>,
    files: Option<GroupFiles>,
    /// When to try opening the files again after they failed.
    retry_at: f64,
    memory_current: u64,
    memory_max: Option<u64>,
    max_read_at: f64,
    anon_bytes: Option<u64>,
    tracker: Tracker,
    processes: usize,
    tick: u64,
}

struct GroupFiles {
    dir: PathBuf,
    current: File,
    stat: Option<File>,
}

impl Census {
    /// An empty census; reads the cgroup mounts of this process.
    pub fn new(opts: CensusOptions) -> Self {
        Self::with_mounts(opts, Mounts::current())
    }

    fn with_mounts(opts: CensusOptions, mounts: Mounts) -> Self {
        let window_s = opts.window.as_secs_f64().max(1.0);
        Self {
            window_s,
            slot_s: window_s / SLOTS as f64,
            reader: Reader::new(mounts),
            procs: HashMap::new(),
            groups: HashMap::new(),
            ignored: HashMap::new(),
            refused: HashMap::new(),
            refused_groups: HashMap::new(),
            exited: VecDeque::new(),
            counts: CensusCounts::default(),
            tick: 0,
            now_s: 0.0,
            scratch: Vec::with_capacity(SLOTS),
            per_group: HashMap::new(),
            opts,
        }
    }

    /// Read every pid in `pids` (the caller selects them: all, `--comm`,
    /// `--cgroup`) at time `now_s` (seconds since start, not decreasing):
    /// anon and total RSS from the held `statm`, name and cgroup when the
    /// process is new (or exec'd, or due for a refresh), then each
    /// distinct cgroup's `memory.current`, `memory.max` and `memory.stat`.
    /// Processes not in `pids` any more are aged out; a pid reused by a new
    /// process starts a new series.
    pub fn sample(&mut self, now_s: f64, pids: &[u32]) {
        self.begin(now_s);
        for &pid in pids {
            self.sample_pid(now_s, pid);
        }
        self.end(now_s);
        self.sample_groups(now_s);
    }

    /// The tracked processes, fastest growing first.
    pub fn processes(&self) -> Vec<ProcessView> {
        self.views(true)
    }

    /// As [`Census::processes`] without the histories: what the exposition
    /// needs every tick, without copying a few KiB per process.
    pub fn process_summaries(&self) -> Vec<ProcessView> {
        self.views(false)
    }

    /// The cgroups of the tracked processes that could be read, fastest
    /// growing first.
    pub fn cgroups(&self) -> Vec<CgroupView> {
        let mut out: Vec<CgroupView> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.tracker.series.slots.is_empty())
            .map(|(path, g)| CgroupView {
                path: path.to_string(),
                container: g.container.clone(),
                memory_current: g.memory_current,
                memory_max: g.memory_max,
                anon_bytes: g.anon_bytes,
                growth_bytes_per_s: g.tracker.slope,
                trend: g.tracker.trend,
                processes: g.processes,
            })
            .collect();
        out.sort_by(|a, b| {
            b.growth_bytes_per_s
                .total_cmp(&a.growth_bytes_per_s)
                .then(b.memory_current.cmp(&a.memory_current))
                .then_with(|| a.path.cmp(&b.path))
        });
        out
    }

    /// One tracked process, with its history.
    pub fn process(&self, pid: u32) -> Option<ProcessView> {
        self.procs.get(&pid).map(|p| view(pid, p, true))
    }

    /// Seconds the process has been classified growing without a break, as
    /// of the last sample (the trigger for a drill-down); 0 if not growing
    /// or not tracked.
    pub fn growing_for_s(&self, pid: u32) -> f64 {
        self.procs
            .get(&pid)
            .and_then(|p| p.tracker.growing_since)
            .map_or(0.0, |since| (self.now_s - since).max(0.0))
    }

    /// The figures read at the last sample before `pid` went away (exited,
    /// reaped, or no longer selected); the newest such process with that
    /// pid among the last [`LAST_KNOWN`].
    pub fn last_known(&self, pid: u32) -> Option<ProcessView> {
        self.exited.iter().rev().find(|v| v.pid == pid).cloned()
    }

    /// Tallies: processes seen, aged out, dropped because of the bound.
    pub fn counts(&self) -> CensusCounts {
        CensusCounts {
            processes: self.procs.len(),
            cgroups: self.groups.len(),
            ..self.counts
        }
    }

    /// The caller saw `pid` exec (a process connector event): its name and
    /// cgroup are read again at the next sample and its series restarts,
    /// since the new program's memory has nothing to do with the old one's.
    /// Without this hint an exec is noticed when the text size changes.
    pub fn note_exec(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.exec_noted = true;
        }
    }

    fn views(&self, history: bool) -> Vec<ProcessView> {
        let mut out: Vec<ProcessView> = self
            .procs
            .iter()
            .map(|(&pid, p)| view(pid, p, history))
            .collect();
        out.sort_by(|a, b| {
            b.growth_bytes_per_s
                .total_cmp(&a.growth_bytes_per_s)
                .then(b.anon_bytes.cmp(&a.anon_bytes))
                .then(a.pid.cmp(&b.pid))
        });
        out
    }

    fn begin(&mut self, now_s: f64) {
        self.tick += 1;
        self.now_s = now_s;
    }

    /// Age out what this tick did not select, then let refused processes
    /// into the room that left, or displace much smaller ones.
    fn end(&mut self, now_s: f64) {
        let tick = self.tick;
        let gone: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.tick != tick)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            self.retire(pid);
        }
        self.ignored.retain(|_, t| *t == tick);
        self.refused.retain(|_, r| r.tick == tick);
        self.refused_groups.retain(|_, t| *t == tick);
        self.readmit(now_s);
    }

    fn sample_pid(&mut self, now_s: f64, pid: u32) {
        let tick = self.tick;
        if let Some(p) = self.procs.get_mut(&pid) {
            if p.tick == tick {
                return; // listed twice
            }
            match self.reader.statm(pid, p) {
                Read::Figures(r, text_pages) => {
                    p.tick = tick;
                    if text_pages != p.text_pages || p.exec_noted {
                        // A new program: a new series under a new name.
                        p.text_pages = text_pages;
                        p.exec_noted = false;
                        p.refresh_at = now_s;
                        p.tracker = Tracker::new(now_s);
                        self.counts.processes_seen += 1;
                    }
                    if now_s >= p.refresh_at {
                        self.reader.refresh(pid, p, &self.groups);
                        p.refresh_at = now_s + refresh_period(pid);
                    }
                    self.record(now_s, pid, r);
                    return;
                }
                Read::Skip => {
                    p.tick = tick;
                    return;
                }
                Read::Gone => self.retire(pid),
            }
        }
        if let Some(t) = self.ignored.get_mut(&pid) {
            *t = tick;
            return;
        }
        if let Some(r) = self.refused.get_mut(&pid) {
            r.tick = tick;
            if let Some((reading, _)) = self.reader.statm_by_path(pid) {
                r.anon_bytes = reading.anon_bytes;
            }
            return;
        }
        if self.procs.len() >= self.opts.max_processes {
            // Its size decides whether it may displace a smaller one when
            // this tick ends.
            let anon_bytes = self
                .reader
                .statm_by_path(pid)
                .map_or(0, |(r, _)| r.anon_bytes);
            self.refused.insert(pid, Refused { anon_bytes, tick });
            self.counts.dropped += 1;
            return;
        }
        self.open(now_s, pid);
    }

    /// Read a new process's identity and first figures and track it.
    fn open(&mut self, now_s: f64, pid: u32) {
        match self.reader.ident(pid, &self.groups) {
            Admit::Track(ident, reading) => {
                self.admit(now_s, pid, ident);
                self.record(now_s, pid, reading);
            }
            Admit::Ignore => {
                self.ignored.insert(pid, self.tick);
            }
            Admit::Gone => {}
        }
    }

    /// Start tracking a process (the bound is the caller's business).
    fn admit(&mut self, now_s: f64, pid: u32, ident: Ident) {
        self.counts.processes_seen += 1;
        let container = container::from_cgroup_path(&ident.cgroup);
        self.procs.insert(
            pid,
            Proc {
                start_ticks: ident.start_ticks,
                comm: ident.comm,
                cgroup: ident.cgroup,
                container,
                statm: ident.statm,
                text_pages: ident.text_pages,
                last: Reading::default(),
                tracker: Tracker::new(now_s),
                refresh_at: now_s + refresh_period(pid),
                exec_noted: false,
                tick: self.tick,
            },
        );
    }

    /// The pure step: one reading of a tracked process.
    fn record(&mut self, now_s: f64, pid: u32, reading: Reading) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.last = reading;
        p.tick = self.tick;
        p.tracker.push(
            now_s,
            reading.anon_bytes,
            self.window_s,
            self.slot_s,
            &mut self.scratch,
        );
    }

    fn retire(&mut self, pid: u32) {
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        self.counts.aged_out += 1;
        if self.exited.len() >= LAST_KNOWN {
            self.exited.pop_front();
        }
        self.exited.push_back(view(pid, &p, true));
    }

    /// Fill free room with refused processes, largest first, then let a
    /// refused process displace a tracked one with a fraction of its anon
    /// memory that is not growing (a leak keeps its place).
    fn readmit(&mut self, now_s: f64) {
        if self.refused.is_empty() {
            return;
        }
        let mut waiting: Vec<(u32, u64)> = self
            .refused
            .iter()
            .map(|(&pid, r)| (pid, r.anon_bytes))
            .collect();
        waiting.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut victims: Vec<(u32, u64)> = Vec::new();
        if self.procs.len() + waiting.len() > self.opts.max_processes {
            victims = self
                .procs
                .iter()
                .filter(|(_, p)| p.tracker.trend != Trend::Growing)
                .map(|(&pid, p)| (pid, p.last.anon_bytes))
                .collect();
            victims.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        }
        let mut victims = victims.into_iter();
        for (pid, anon) in waiting {
            if self.procs.len() >= self.opts.max_processes {
                let Some((victim, small)) = victims.next() else {
                    break;
                };
                if anon <= small.saturating_mul(EVICT_FACTOR) {
                    break; // sorted: no later pair does better
                }
                self.procs.remove(&victim);
                self.refused.insert(
                    victim,
                    Refused {
                        anon_bytes: small,
                        tick: self.tick,
                    },
                );
                self.counts.dropped += 1;
            }
            self.refused.remove(&pid);
            self.open(now_s, pid);
        }
    }

    /// Count the tracked processes per cgroup, then read and classify each
    /// of those cgroups; forget cgroups that hold none any more.
    fn sample_groups(&mut self, now_s: f64) {
        let tick = self.tick;
        self.per_group.clear();
        for p in self.procs.values() {
            *self.per_group.entry(p.cgroup.clone()).or_insert(0) += 1;
        }
        for (path, &n) in &self.per_group {
            if !self.groups.contains_key(path) {
                if self.groups.len() >= self.opts.max_cgroups {
                    if self.refused_groups.insert(path.clone(), tick).is_none() {
                        self.counts.cgroups_dropped += 1;
                    }
                    continue;
                }
                self.groups.insert(
                    path.clone(),
                    Group {
                        container: container::from_cgroup_path(path),
                        files: None,
                        retry_at: now_s,
                        memory_current: 0,
                        memory_max: None,
                        max_read_at: f64::NEG_INFINITY,
                        anon_bytes: None,
                        tracker: Tracker::new(now_s),
                        processes: 0,
                        tick,
                    },
                );
            }
            let Some(g) = self.groups.get_mut(path) else {
                continue;
            };
            g.tick = tick;
            g.processes = n;
            if let Some(value) = self.reader.group(path, g, now_s) {
                g.tracker
                    .push(now_s, value, self.window_s, self.slot_s, &mut self.scratch);
            }
        }
        self.groups.retain(|_, g| g.tick == tick);
    }
}

/// Seconds until a process's name and cgroup are read again, spread by pid
/// so the reads of processes that started together do not bunch up.
fn refresh_period(pid: u32) -> f64 {
    REFRESH_S + f64::from(pid % 31) / 30.0 * REFRESH_S / 2.0
}

fn view(pid: u32, p: &Proc, history: bool) -> ProcessView {
    ProcessView {
        pid,
        comm: p.comm.clone(),
        cgroup: p.cgroup.to_string(),
        container: p.container.clone(),
        rss_bytes: p.last.rss_bytes,
        anon_bytes: p.last.anon_bytes,
        growth_bytes_per_s: p.tracker.slope,
        trend: p.tracker.trend,
        first_seen_s: p.tracker.first_seen_s,
        history: if history {
            p.tracker
                .series
                .slots
                .iter()
                .map(|s| (s.t, s.floor))
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// A series and what it was last classified as.
struct Tracker {
    series: Series,
    slope: f64,
    trend: Trend,
    growing_since: Option<f64>,
    first_seen_s: f64,
}

impl Tracker {
    fn new(now_s: f64) -> Self {
        Self {
            series: Series::default(),
            slope: 0.0,
            trend: Trend::Unknown,
            growing_since: None,
            first_seen_s: now_s,
        }
    }

    fn push(
        &mut self,
        now_s: f64,
        bytes: u64,
        window_s: f64,
        slot_s: f64,
        scratch: &mut Vec<(f64, f64)>,
    ) {
        self.series.push(now_s, bytes, window_s, slot_s);
        let (slope, trend) = classify(&self.series.slots, scratch);
        self.slope = slope;
        self.trend = trend;
        self.growing_since = match (trend, self.growing_since) {
            (Trend::Growing, Some(since)) => Some(since),
            (Trend::Growing, None) => Some(now_s),
            _ => None,
        };
    }
}

/// Readings folded into at most [`SLOTS`] time slots.
#[derive(Default)]
struct Series {
    slots: VecDeque<Slot>,
    last: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Slot {
    /// Time of the slot's first reading.
    t: f64,
    /// Lowest reading in the slot.
    floor: u64,
    /// Highest reading in the slot.
    top: u64,
    /// Sum of the rises from one reading to the next, ending in the slot.
    rises: u64,
}

impl Series {
    fn push(&mut self, now_s: f64, bytes: u64, window_s: f64, slot_s: f64) {
        let rise = self.last.map_or(0, |l| bytes.saturating_sub(l));
        self.last = Some(bytes);
        match self.slots.back_mut() {
            Some(s) if now_s - s.t < slot_s => {
                s.floor = s.floor.min(bytes);
                s.top = s.top.max(bytes);
                s.rises += rise;
            }
            _ => self.slots.push_back(Slot {
                t: now_s,
                floor: bytes,
                top: bytes,
                rises: rise,
            }),
        }
        while self.slots.len() > 1
            && (self.slots.len() > SLOTS
                || self.slots.front().is_some_and(|s| s.t < now_s - window_s))
        {
            self.slots.pop_front();
        }
    }
}

/// Slope (bytes/s) and trend of a series of slots, oldest first.
///
/// The floors, less their lowest (so [`trend::fit`]'s "2% of the level"
/// applies to the part that moves, not to a process's resident baseline),
/// go through `trend::fit`, with the turnover (sum of rises) as the bytes
/// ever allocated. Its verdict must then agree with the floors themselves,
/// which a swinging series cannot fake:
/// - growing: the floor of the second half of the window is above that of
///   the first by more than the noise, and the last quarter's above the
///   third's by half as much (still rising at the end); else plateau if
///   only the halves agree;
/// - plateau: the halves agree;
/// - shrinking: the highest floor of the second half is below the first
///   half's by more than the noise.
///
/// Anything else, and any series whose floor moves less than the noise
/// ([`NOISE_BYTES`], or [`NOISE_FRACTION`] of the peak), is churn when
/// its turnover exceeds its peak (it re-made more than its size within the
/// window), else steady. Fewer than [`trend::MIN_SAMPLES`] slots: unknown.
/// A swing slower than half the window cannot be told from growth until
/// the window sees it come down.
fn classify(slots: &VecDeque<Slot>, scratch: &mut Vec<(f64, f64)>) -> (f64, Trend) {
    let n = slots.len();
    if n < 2 {
        return (0.0, Trend::Unknown);
    }
    let base = slots.iter().map(|s| s.floor).min().unwrap_or(0);
    let high = slots.iter().map(|s| s.floor).max().unwrap_or(0);
    let peak = slots.iter().map(|s| s.top).max().unwrap_or(0) as f64;
    let turnover = slots.iter().map(|s| s.rises as f64).sum::<f64>();
    scratch.clear();
    scratch.extend(slots.iter().map(|s| (s.t, (s.floor - base) as f64)));
    let fit = trend::fit(scratch, turnover);
    if n < trend::MIN_SAMPLES {
        return (fit.slope_bytes_per_s, Trend::Unknown);
    }
    let noise = (NOISE_BYTES as f64).max(NOISE_FRACTION * peak);
    let flat = if turnover > peak {
        Trend::Churn
    } else {
        Trend::Steady
    };
    if ((high - base) as f64) < noise {
        return (fit.slope_bytes_per_s, flat);
    }
    let floor = |from: usize, to: usize| {
        slots
            .range(from..to)
            .map(|s| s.floor as f64)
            .fold(f64::INFINITY, f64::min)
    };
    let ceiling = |from: usize, to: usize| {
        slots
            .range(from..to)
            .map(|s| s.floor as f64)
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let (half, quarter) = (n / 2, 3 * n / 4);
    let halves_rise = floor(half, n) - floor(0, half);
    let quarters_rise = floor(quarter, n) - floor(half, quarter);
    let halves_fall = ceiling(0, half) - ceiling(half, n);
    let trend = match fit.trend {
        Trend::Growing if halves_rise > noise && quarters_rise > noise / 2.0 => Trend::Growing,
        Trend::Growing | Trend::Plateau if halves_rise > noise => Trend::Plateau,
        Trend::Shrinking if halves_fall > noise => Trend::Shrinking,
        _ => flat,
    };
    (fit.slope_bytes_per_s, trend)
}

/// Whether to track a new process, and with what.
enum Admit {
    Track(Ident, Reading),
    /// A kernel thread or a zombie: no memory of its own.
    Ignore,
    Gone,
}

/// A tracked process's `statm`.
enum Read {
    /// Figures, and the text size in pages (a change means an exec).
    Figures(Reading, u64),
    /// Could not read it this time (out of descriptors...): keep it.
    Skip,
    Gone,
}

/// The file reading half: reused buffers, the cgroup layout.
struct Reader {
    buf: Buf,
    path: String,
    page_bytes: u64,
    mounts: Mounts,
    /// Cgroup v1 memory controller (hybrid or v1 host), else v2.
    v1: bool,
}

impl Reader {
    fn new(mounts: Mounts) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self {
            buf: Buf::new(),
            path: String::with_capacity(64),
            page_bytes: u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096),
            v1: mounts.v1_memory.is_some(),
            mounts,
        }
    }

    fn proc_path(&mut self, pid: u32, file: &str) -> &str {
        self.path.clear();
        let _ = write!(self.path, "/proc/{pid}/{file}");
        &self.path
    }

    fn read_path(&mut self, pid: u32, file: &str) -> io::Result<&[u8]> {
        self.proc_path(pid, file);
        let f = File::open(&self.path)?;
        self.buf.fill(&f)
    }

    fn figures(&self, statm: &Statm) -> Reading {
        Reading {
            rss_bytes: statm.resident * self.page_bytes,
            anon_bytes: statm.resident.saturating_sub(statm.shared) * self.page_bytes,
        }
    }

    fn statm(&mut self, pid: u32, p: &Proc) -> Read {
        let text = match &p.statm {
            Source::Held(f) => self.buf.fill(f),
            Source::Path => {
                let same = self
                    .read_path(pid, "stat")
                    .ok()
                    .and_then(parse_stat)
                    .is_some_and(|s| s.start_ticks == p.start_ticks);
                if !same {
                    return Read::Gone;
                }
                self.read_path(pid, "statm")
            }
            Source::Injected => return Read::Skip,
        };
        match text {
            Ok(text) => match parse_statm(text) {
                // No memory map: a zombie, its memory already freed.
                Some(s) if s.size == 0 => Read::Gone,
                Some(s) => Read::Figures(self.figures(&s), s.text),
                None => Read::Skip,
            },
            Err(e) if gone(&e) => Read::Gone,
            Err(_) => Read::Skip,
        }
    }

    fn statm_by_path(&mut self, pid: u32) -> Option<(Reading, u64)> {
        let s = self.read_path(pid, "statm").ok().and_then(parse_statm)?;
        Some((self.figures(&s), s.text))
    }

    fn ident(&mut self, pid: u32, groups: &HashMap<Arc<str>, Group>) -> Admit {
        let Some(stat) = self.read_path(pid, "stat").ok().and_then(parse_stat) else {
            return Admit::Gone;
        };
        if stat.flags & PF_KTHREAD != 0 || matches!(stat.state, b'Z' | b'X' | b'x') {
            return Admit::Ignore;
        }
        self.proc_path(pid, "statm");
        let statm = match File::open(&self.path) {
            Ok(f) => Source::Held(f),
            Err(e) if descriptors_exhausted(&e) => Source::Path,
            Err(_) => return Admit::Gone,
        };
        let text = match &statm {
            Source::Held(f) => self.buf.fill(f).ok().and_then(parse_statm),
            _ => self.read_path(pid, "statm").ok().and_then(parse_statm),
        };
        let Some(s) = text else {
            return Admit::Gone;
        };
        if s.size == 0 {
            return Admit::Ignore;
        }
        let reading = self.figures(&s);
        let cgroup = self.cgroup(pid, groups).unwrap_or_else(|| Arc::from(""));
        Admit::Track(
            Ident {
                start_ticks: stat.start_ticks,
                comm: stat.comm,
                cgroup,
                statm,
                text_pages: s.text,
            },
            reading,
        )
    }

    /// The process's cgroup path, sharing the string of a known cgroup.
    fn cgroup(&mut self, pid: u32, groups: &HashMap<Arc<str>, Group>) -> Option<Arc<str>> {
        let v1 = self.v1;
        let text = self.read_path(pid, "cgroup").ok()?;
        let path = parse_cgroup(text, v1)?;
        Some(match groups.get_key_value(path) {
            Some((known, _)) => known.clone(),
            None => Arc::from(path),
        })
    }

    /// Name and cgroup again (after an exec, or now and then: a process may
    /// be moved to another cgroup).
    fn refresh(&mut self, pid: u32, p: &mut Proc, groups: &HashMap<Arc<str>, Group>) {
        if let Ok(text) = self.read_path(pid, "comm") {
            p.comm = String::from_utf8_lossy(text).trim_end().to_string();
        }
        if let Some(cgroup) = self.cgroup(pid, groups) {
            if cgroup != p.cgroup {
                p.container = container::from_cgroup_path(&cgroup);
                p.cgroup = cgroup;
            }
        }
    }

    /// Read a cgroup's figures; the value its trend follows (anon, else
    /// current), or `None` when its files cannot be read.
    fn group(&mut self, path: &str, g: &mut Group, now_s: f64) -> Option<u64> {
        let (current_name, max_name, anon_key) = if self.v1 {
            (
                "memory.usage_in_bytes",
                "memory.limit_in_bytes",
                "total_rss",
            )
        } else {
            ("memory.current", "memory.max", "anon")
        };
        if g.files.is_none() {
            if now_s < g.retry_at {
                return None;
            }
            g.retry_at = now_s + REFRESH_S;
            let dir = if self.v1 {
                self.mounts.v1_memory_dir(path)
            } else {
                self.mounts.v2_dir(path)
            }?;
            // The root cgroup has no memory.current: not tracked.
            let current = File::open(dir.join(current_name)).ok()?;
            let stat = File::open(dir.join("memory.stat")).ok();
            g.files = Some(GroupFiles { dir, current, stat });
        }
        let files = g.files.as_ref()?;
        let current = match self.buf.fill(&files.current).map(parse_u64) {
            Ok(Some(v)) => v,
            _ => {
                // Removed (ENODEV), or odd: open again later.
                g.files = None;
                return None;
            }
        };
        g.memory_current = current;
        g.anon_bytes = files
            .stat
            .as_ref()
            .and_then(|f| self.buf.fill(f).ok())
            .and_then(|t| parse_key(t, anon_key));
        if now_s - g.max_read_at >= REFRESH_S {
            g.max_read_at = now_s;
            g.memory_max =
                read_file(&files.dir.join(max_name), &mut self.buf).and_then(parse_limit);
        }
        Some(g.anon_bytes.unwrap_or(current))
    }
}

fn read_file(path: &Path, buf: &mut Buf) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    buf.fill(&f).ok().map(<[u8]>::to_vec)
}

/// The process is gone: reaped (`ESRCH` on a held file), or no such pid.
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT))
}

fn descriptors_exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A read buffer kept across reads, so a tick allocates nothing per file.
struct Buf {
    bytes: Vec<u8>,
}

impl Buf {
    fn new() -> Self {
        Self {
            bytes: vec![0; 8192],
        }
    }

    /// The whole file, read from offset 0. procfs and cgroupfs generate
    /// these small files in one go, so a read that does not fill the
    /// buffer has it all and no second read (for end of file) is spent.
    fn fill(&mut self, f: &File) -> io::Result<&[u8]> {
        let mut len = 0;
        loop {
            if len == self.bytes.len() {
                self.bytes.resize(len * 2, 0);
            }
            match f.read_at(&mut self.bytes[len..], len as u64) {
                Ok(n) => {
                    len += n;
                    if n == 0 || len < self.bytes.len() {
                        return Ok(&self.bytes[..len]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Figures of `/proc/PID/statm`, in pages.
#[derive(Debug, PartialEq, Eq)]
struct Statm {
    size: u64,
    resident: u64,
    /// File-backed plus shmem resident pages.
    shared: u64,
    text: u64,
}

fn parse_statm(text: &[u8]) -> Option<Statm> {
    let mut it = text
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .map(parse_u64);
    Some(Statm {
        size: it.next()??,
        resident: it.next()??,
        shared: it.next()??,
        text: it.next()??,
    })
}

#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: u8,
    flags: u64,
    start_ticks: u64,
}

/// `/proc/PID/stat`: `pid (comm) state ppid ...`; comm may hold spaces and
/// parentheses, so fields are counted after the last `)`.
fn parse_stat(text: &[u8]) -> Option<Stat> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let comm = String::from_utf8_lossy(text.get(open + 1..close)?).into_owned();
    let rest = text.get(close + 1..)?;
    let fields: Vec<&[u8]> = rest
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .collect();
    // After comm: state is field 3 overall, flags 9, start time 22.
    Some(Stat {
        comm,
        state: *fields.first()?.first()?,
        flags: parse_u64(fields.get(6)?)?,
        start_ticks: parse_u64(fields.get(19)?)?,
    })
}

/// The cgroup path of `/proc/PID/cgroup` text: the memory controller's
/// line on a v1 host, else the unified (`0::`) line.
fn parse_cgroup(text: &[u8], v1: bool) -> Option<&str> {
    let text = std::str::from_utf8(text).ok()?;
    let mut unified = None;
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if v1 && controllers.split(',').any(|c| c == "memory") {
            return Some(path);
        }
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        }
    }
    unified
}

/// The value of `key` in `memory.stat`-style `key value` lines.
fn parse_key(text: &[u8], key: &str) -> Option<u64> {
    text.split(|&b| b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(key.as_bytes())?;
        parse_u64(rest.strip_prefix(b" ")?)
    })
}

/// A memory limit: `max` (v2) or a value near `i64::MAX` (v1, rounded
/// down to a page) means none.
fn parse_limit(text: Vec<u8>) -> Option<u64> {
    parse_u64(&text).filter(|&v| v < 1 << 62)
}

fn parse_u64(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}

/// Raise this process's soft limit on open files to at least `want` (up to
/// the hard limit), for the descriptors the census holds (one per
/// process, two per cgroup) beside the tracer's own. Returns the soft
/// limit now in force.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = want.min(lim.rlim_max);
    if lim.rlim_cur >= target {
        return Ok(lim.rlim_cur);
    }
    lim.rlim_cur = target;
    // SAFETY: `lim` is a valid rlimit, the soft limit within the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

#[cfg(test)]
mod tests;
