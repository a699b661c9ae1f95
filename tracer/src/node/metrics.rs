//! The Prometheus exposition of `leaktrace node`, and the HTTP server that
//! hands it out.
//!
//! Input: a [`Snapshot`] of plain figures (from the census, the kernel
//! side's top growth stacks, and the daemon's own costs). Output: text
//! exposition format 0.0.4 ([`render`]), served on `GET /metrics` by
//! [`serve`] from a `watch` channel the caller refreshes each tick, so a
//! scrape never waits for a tick and never sees half of one.
//!
//! Invariant: the number of series is bounded whatever the machine does.
//! At most [`Snapshot::max_processes_series`] processes are exposed (the
//! growing ones first, fastest first, then the largest by anon memory), at
//! most [`Snapshot::max_cgroups_series`] cgroups (likewise) and
//! [`Snapshot::max_stacks_series`] stacks, labelled by rank `1..=N`, not by
//! an id that changes with every stack. Each process yields 4 series, each
//! cgroup at most 6, each stack 2, plus 8 of the daemon's own: with the
//! defaults (100, 100, 20) at most 1,048 series, however many short-lived
//! processes come and go. What the bound leaves out is counted in
//! `leaktrace_series_omitted`.
//!
//! Series:
//! - `leaktrace_process_{anon_bytes,rss_bytes,growth_bytes_per_second}` and
//!   `leaktrace_process_growing` (1 when growing, with the `trend` label),
//!   labels `pid, comm, cgroup, container, pod`;
//! - `leaktrace_cgroup_{memory_bytes,memory_max_bytes,anon_bytes,
//!   growth_bytes_per_second,processes}` and `leaktrace_cgroup_growing`,
//!   labels `cgroup, container, pod` (`memory_max` only when limited,
//!   `anon` only when known);
//! - `leaktrace_stack_bytes` and `leaktrace_stack_growth_bytes_per_second`,
//!   labels `rank, pid, comm, source, stack`;
//! - `leaktrace_self_cpu_seconds_total`, `leaktrace_self_rss_bytes`,
//!   `leaktrace_events_lost_total`, `leaktrace_drilldowns_total`,
//!   `leaktrace_watched_processes`, `leaktrace_series_omitted{kind}`.

use std::{
    fmt::Write as _,
    io,
    net::{SocketAddr, ToSocketAddrs},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};

use super::census::{CgroupView, ProcessView};
use crate::report::trend::Trend;

/// Default bound on processes exposed.
pub const DEFAULT_MAX_PROCESSES_SERIES: usize = 100;
/// Default bound on cgroups exposed.
pub const DEFAULT_MAX_CGROUPS_SERIES: usize = 100;
/// Default bound on stacks exposed.
pub const DEFAULT_MAX_STACKS_SERIES: usize = 20;
/// Longest `stack` label, in characters.
pub const STACK_LABEL_CHARS: usize = 120;
/// Frames in a `stack` label, leaf first.
pub const STACK_LABEL_FRAMES: usize = 3;

/// The content type of exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one exposition shows.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub processes: Vec<ProcessRow>,
    pub cgroups: Vec<CgroupRow>,
    /// Top growth stacks; exposed by `rank`, lowest first.
    pub stacks: Vec<StackRow>,
    pub own: SelfFigures,
    /// Most processes exposed (see the module docs).
    pub max_processes_series: usize,
    /// Most cgroups exposed.
    pub max_cgroups_series: usize,
    /// Most stacks exposed.
    pub max_stacks_series: usize,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            processes: Vec::new(),
            cgroups: Vec::new(),
            stacks: Vec::new(),
            own: SelfFigures::default(),
            max_processes_series: DEFAULT_MAX_PROCESSES_SERIES,
            max_cgroups_series: DEFAULT_MAX_CGROUPS_SERIES,
            max_stacks_series: DEFAULT_MAX_STACKS_SERIES,
        }
    }
}

impl Snapshot {
    /// A snapshot of the census's views (take them with
    /// `Census::process_summaries` and `Census::cgroups`), default bounds,
    /// no stacks, zero own figures.
    pub fn from_views(processes: &[ProcessView], cgroups: &[CgroupView]) -> Self {
        Self {
            processes: processes.iter().map(ProcessRow::from).collect(),
            cgroups: cgroups.iter().map(CgroupRow::from).collect(),
            ..Self::default()
        }
    }
}

/// One process.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessRow {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    /// The runtime's container id; empty outside containers.
    pub container: String,
    /// The Kubernetes pod uid; empty outside pods.
    pub pod_uid: String,
    pub anon_bytes: u64,
    pub rss_bytes: u64,
    pub growth_bytes_per_s: f64,
    pub trend: Trend,
}

impl From<&ProcessView> for ProcessRow {
    fn from(v: &ProcessView) -> Self {
        let (container, pod_uid) = ids(v.container.as_ref());
        Self {
            pid: v.pid,
            comm: v.comm.clone(),
            cgroup: v.cgroup.clone(),
            container,
            pod_uid,
            anon_bytes: v.anon_bytes,
            rss_bytes: v.rss_bytes,
            growth_bytes_per_s: v.growth_bytes_per_s,
            trend: v.trend,
        }
    }
}

/// One cgroup.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupRow {
    pub path: String,
    pub container: String,
    pub pod_uid: String,
    pub memory_current: u64,
    pub memory_max: Option<u64>,
    pub anon_bytes: Option<u64>,
    pub growth_bytes_per_s: f64,
    pub trend: Trend,
    pub processes: usize,
}

impl From<&CgroupView> for CgroupRow {
    fn from(v: &CgroupView) -> Self {
        let (container, pod_uid) = ids(v.container.as_ref());
        Self {
            path: v.path.clone(),
            container,
            pod_uid,
            memory_current: v.memory_current,
            memory_max: v.memory_max,
            anon_bytes: v.anon_bytes,
            growth_bytes_per_s: v.growth_bytes_per_s,
            trend: v.trend,
            processes: v.processes,
        }
    }
}

fn ids(c: Option<&super::container::Container>) -> (String, String) {
    match c {
        Some(c) => (c.id.clone(), c.pod_uid.clone().unwrap_or_default()),
        None => (String::new(), String::new()),
    }
}

/// One of the top growth stacks the kernel side found.
#[derive(Clone, Debug, PartialEq)]
pub struct StackRow {
    /// 1 is the fastest growing; only the order matters, the exposed rank
    /// is the position `1..=N` after sorting by it.
    pub rank: u32,
    /// The process, when the stack belongs to one.
    pub pid: Option<u32>,
    pub comm: String,
    /// Where the memory came from: `page_fault`, `mmap`, `allocator`,
    /// `go_runtime`.
    pub source: String,
    /// A short rendering, leaf first (see [`stack_label`]); cut to
    /// [`STACK_LABEL_CHARS`] when exposed.
    pub frames: String,
    /// Outstanding bytes.
    pub bytes: f64,
    pub growth_bytes_per_s: f64,
}

/// The daemon's own figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SelfFigures {
    /// User plus system CPU time (see [`own_usage`]).
    pub cpu_seconds_total: f64,
    pub rss_bytes: u64,
    /// Events the kernel side could not deliver or record.
    pub events_lost_total: u64,
    /// Drill-downs (probes attached to a growing process) started.
    pub drilldowns_total: u64,
    /// Processes watched now.
    pub watched_processes: u64,
}

/// This process's CPU seconds (user plus system) and resident bytes, from
/// `/proc/self/stat` and `/proc/self/statm`.
pub fn own_usage() -> Option<(f64, u64)> {
    // SAFETY: sysconf has no preconditions.
    let (tck, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut f = after.split_whitespace();
    // utime and stime are fields 14 and 15, the 12th and 13th after comm.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let cpu = (utime + stime) as f64 / (tck.max(1) as f64);
    Some((cpu, resident * u64::try_from(page).unwrap_or(4096)))
}

/// A `stack` label: up to [`STACK_LABEL_FRAMES`] frames, leaf first,
/// joined by ` ← `, cut to [`STACK_LABEL_CHARS`] characters.
pub fn stack_label(frames_leaf_first: &[&str]) -> String {
    let joined = frames_leaf_first
        .iter()
        .take(STACK_LABEL_FRAMES)
        .copied()
        .collect::<Vec<_>>()
        .join(" ← ");
    cut(&joined, STACK_LABEL_CHARS)
}

/// At most `max` characters, the last an ellipsis when cut.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Write the exposition (format 0.0.4) of `snapshot` to `out` (appended).
pub fn render(snapshot: &Snapshot, out: &mut String) {
    let procs = pick(&snapshot.processes, snapshot.max_processes_series, |r| {
        (r.trend, r.growth_bytes_per_s, r.anon_bytes)
    });
    let groups = pick(&snapshot.cgroups, snapshot.max_cgroups_series, |r| {
        (r.trend, r.growth_bytes_per_s, r.memory_current)
    });
    let mut stacks: Vec<&StackRow> = snapshot.stacks.iter().collect();
    stacks.sort_by_key(|s| s.rank);
    stacks.truncate(snapshot.max_stacks_series);

    // Labels once per row, shared by its families.
    let proc_labels: Vec<String> = procs
        .iter()
        .map(|r| {
            labels(&[
                ("pid", &r.pid.to_string()),
                ("comm", &r.comm),
                ("cgroup", &r.cgroup),
                ("container", &r.container),
                ("pod", &r.pod_uid),
            ])
        })
        .collect();
    let group_labels: Vec<String> = groups
        .iter()
        .map(|r| {
            labels(&[
                ("cgroup", &r.path),
                ("container", &r.container),
                ("pod", &r.pod_uid),
            ])
        })
        .collect();
    let stack_labels: Vec<String> = stacks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            labels(&[
                ("rank", &(i + 1).to_string()),
                ("pid", &s.pid.map(|p| p.to_string()).unwrap_or_default()),
                ("comm", &s.comm),
                ("source", &s.source),
                ("stack", &cut(&s.frames, STACK_LABEL_CHARS)),
            ])
        })
        .collect();

    let mut w = Writer { out };
    w.family(
        "leaktrace_process_anon_bytes",
        "gauge",
        "Anonymous resident memory of a process (RssAnon), the figure its trend follows.",
    );
    for (r, l) in procs.iter().zip(&proc_labels) {
        w.sample("leaktrace_process_anon_bytes", l, r.anon_bytes as f64);
    }
    w.family(
        "leaktrace_process_rss_bytes",
        "gauge",
        "Resident memory of a process, file pages included.",
    );
    for (r, l) in procs.iter().zip(&proc_labels) {
        w.sample("leaktrace_process_rss_bytes", l, r.rss_bytes as f64);
    }
    w.family(
        "leaktrace_process_growth_bytes_per_second",
        "gauge",
        "Slope of the process's anon memory floor across the census window.",
    );
    for (r, l) in procs.iter().zip(&proc_labels) {
        w.sample(
            "leaktrace_process_growth_bytes_per_second",
            l,
            r.growth_bytes_per_s,
        );
    }
    w.family(
        "leaktrace_process_growing",
        "gauge",
        "1 when the process's anon memory keeps growing; trend names the classification.",
    );
    for (r, l) in procs.iter().zip(&proc_labels) {
        let l = with_trend(l, r.trend);
        w.sample("leaktrace_process_growing", &l, growing(r.trend));
    }

    w.family(
        "leaktrace_cgroup_memory_bytes",
        "gauge",
        "Memory charged to a cgroup of watched processes (memory.current), page cache included.",
    );
    for (r, l) in groups.iter().zip(&group_labels) {
        w.sample("leaktrace_cgroup_memory_bytes", l, r.memory_current as f64);
    }
    w.family(
        "leaktrace_cgroup_memory_max_bytes",
        "gauge",
        "Memory limit of the cgroup (memory.max); absent when unlimited.",
    );
    for (r, l) in groups.iter().zip(&group_labels) {
        if let Some(max) = r.memory_max {
            w.sample("leaktrace_cgroup_memory_max_bytes", l, max as f64);
        }
    }
    w.family(
        "leaktrace_cgroup_anon_bytes",
        "gauge",
        "Anonymous memory of the cgroup (anon in memory.stat), the figure its trend follows.",
    );
    for (r, l) in groups.iter().zip(&group_labels) {
        if let Some(anon) = r.anon_bytes {
            w.sample("leaktrace_cgroup_anon_bytes", l, anon as f64);
        }
    }
    w.family(
        "leaktrace_cgroup_growth_bytes_per_second",
        "gauge",
        "Slope of the cgroup's anon memory floor across the census window.",
    );
    for (r, l) in groups.iter().zip(&group_labels) {
        w.sample(
            "leaktrace_cgroup_growth_bytes_per_second",
            l,
            r.growth_bytes_per_s,
        );
    }
    w.family(
        "leaktrace_cgroup_growing",
        "gauge",
        "1 when the cgroup's anon memory keeps growing; trend names the classification.",
    );
    for (r, l) in groups.iter().zip(&group_labels) {
        let l = with_trend(l, r.trend);
        w.sample("leaktrace_cgroup_growing", &l, growing(r.trend));
    }
    w.family(
        "leaktrace_cgroup_processes",
        "gauge",
        "Watched processes in the cgroup itself.",
    );
    for (r, l) in groups.iter().zip(&group_labels) {
        w.sample("leaktrace_cgroup_processes", l, r.processes as f64);
    }

    w.family(
        "leaktrace_stack_bytes",
        "gauge",
        "Outstanding bytes of a top growth stack, by rank.",
    );
    for (s, l) in stacks.iter().zip(&stack_labels) {
        w.sample("leaktrace_stack_bytes", l, s.bytes);
    }
    w.family(
        "leaktrace_stack_growth_bytes_per_second",
        "gauge",
        "Growth of a top growth stack's outstanding bytes, by rank.",
    );
    for (s, l) in stacks.iter().zip(&stack_labels) {
        w.sample(
            "leaktrace_stack_growth_bytes_per_second",
            l,
            s.growth_bytes_per_s,
        );
    }

    let own = &snapshot.own;
    w.single(
        "leaktrace_self_cpu_seconds_total",
        "counter",
        "CPU time leaktrace used, user plus system.",
        own.cpu_seconds_total,
    );
    w.single(
        "leaktrace_self_rss_bytes",
        "gauge",
        "Resident memory of leaktrace itself.",
        own.rss_bytes as f64,
    );
    w.single(
        "leaktrace_events_lost_total",
        "counter",
        "Events the kernel side could not deliver or record.",
        own.events_lost_total as f64,
    );
    w.single(
        "leaktrace_drilldowns_total",
        "counter",
        "Drill-downs started: probes attached to a growing process.",
        own.drilldowns_total as f64,
    );
    w.single(
        "leaktrace_watched_processes",
        "gauge",
        "Processes the census watches now.",
        own.watched_processes as f64,
    );
    w.family(
        "leaktrace_series_omitted",
        "gauge",
        "Rows left out of this exposition by its series bound.",
    );
    for (kind, shown, all) in [
        ("process", procs.len(), snapshot.processes.len()),
        ("cgroup", groups.len(), snapshot.cgroups.len()),
        ("stack", stacks.len(), snapshot.stacks.len()),
    ] {
        w.sample(
            "leaktrace_series_omitted",
            &labels(&[("kind", kind)]),
            all.saturating_sub(shown) as f64,
        );
    }
}

/// At most `max` rows: growing ones first, fastest first, then the rest
/// by size, largest first.
fn pick<T>(rows: &[T], max: usize, key: impl Fn(&T) -> (Trend, f64, u64)) -> Vec<&T> {
    let mut out: Vec<&T> = rows.iter().collect();
    out.sort_by(|a, b| {
        let (ta, ga, sa) = key(a);
        let (tb, gb, sb) = key(b);
        let (growing_a, growing_b) = (ta == Trend::Growing, tb == Trend::Growing);
        growing_b.cmp(&growing_a).then_with(|| {
            if growing_a {
                gb.total_cmp(&ga)
            } else {
                sb.cmp(&sa)
            }
        })
    });
    out.truncate(max);
    out
}

fn growing(t: Trend) -> f64 {
    if t == Trend::Growing {
        1.0
    } else {
        0.0
    }
}

/// `{a="x",b="y"}` with values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        escape_label(v, &mut s);
        s.push('"');
    }
    s.push('}');
    s
}

fn with_trend(labels: &str, t: Trend) -> String {
    let inner = labels.strip_suffix('}').unwrap_or(labels);
    format!("{inner},trend=\"{}\"}}", t.as_str())
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // HELP text escapes backslash and newline (ours have neither).
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        self.out.push_str(name);
        self.out.push_str(labels);
        self.out.push(' ');
        push_value(self.out, value);
        self.out.push('\n');
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
}

/// Go's float syntax as Prometheus parses it: `NaN`, `+Inf`, `-Inf`, and
/// integers without a fraction.
fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Why the exposition cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("failed to listen on {addr}: address already in use; pick another port with --listen")]
    InUse { addr: String },
    #[error(
        "failed to listen on {addr}: permission denied; ports below 1024 need root or \
         CAP_NET_BIND_SERVICE, pick a port above 1023 with --listen"
    )]
    PermissionDenied { addr: String },
    #[error(
        "failed to listen on {addr}: no such address on this machine; give one of its \
         addresses, or 127.0.0.1 or 0.0.0.0, with --listen"
    )]
    NotAvailable { addr: String },
    #[error("invalid listen address {addr:?}: {reason}; give HOST:PORT, e.g. 127.0.0.1:9464")]
    Invalid { addr: String, reason: String },
    #[error("failed to listen on {addr}: {source}")]
    Other { addr: String, source: io::Error },
}

/// Listen on `addr` (`HOST:PORT`). The listener is non-blocking, ready
/// for `tokio::net::TcpListener::from_std` inside the runtime.
pub fn bind(addr: &str) -> Result<std::net::TcpListener, BindError> {
    let invalid = |reason: String| BindError::Invalid {
        addr: addr.to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| invalid(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(invalid("resolves to no address".to_string()));
    }
    let addr = addr.to_string();
    let listener = std::net::TcpListener::bind(&addrs[..]).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => BindError::InUse { addr: addr.clone() },
        io::ErrorKind::PermissionDenied => BindError::PermissionDenied { addr: addr.clone() },
        io::ErrorKind::AddrNotAvailable => BindError::NotAvailable { addr: addr.clone() },
        _ => BindError::Other {
            addr: addr.clone(),
            source: e,
        },
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| BindError::Other { addr, source })?;
    Ok(listener)
}

/// Largest request head read; a longer one gets 431.
const MAX_HEAD_BYTES: usize = 8192;
/// A client has this long to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// ... and this long to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once, so a flood cannot
/// take the daemon's file descriptors.
const MAX_CONNECTIONS: usize = 64;
/// Most of an oversized request read and dropped after the 431.
const DRAIN_BYTES: usize = 64 << 10;

const INDEX: &str = "leaktrace node: memory growth of every process on this machine\n\
                     \n\
                     GET /metrics  Prometheus text exposition (format 0.0.4)\n";

/// Serve `GET /metrics` (the body `current` holds when the request
/// arrives) and `GET /` on `listener`, HTTP/1.1, one task per connection,
/// each closed after its response. Returns when the sender of `current`
/// is dropped (the daemon is stopping).
pub async fn serve(listener: TcpListener, current: watch::Receiver<Arc<String>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut closed = current.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            changed = closed.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    log::debug!("metrics: too many connections, closing one from {peer}");
                    continue;
                };
                let body = current.clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, body).await {
                        log::debug!("metrics: connection from {peer}: {e}");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of descriptors, or a connection reset before accept:
                // wait a little rather than spin.
                log::warn!("metrics: failed to accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, current: watch::Receiver<Arc<String>>) -> io::Result<()> {
    let mut head = vec![0u8; MAX_HEAD_BYTES];
    let head_len = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut head)).await
    {
        Err(_) => return Ok(()), // too slow: just close
        Ok(r) => r?,
    };
    let (status, content_type, body): (&str, &str, Arc<String>) = match head_len {
        None => return Ok(()), // closed before a full head
        Some(Err(TooLarge)) => (
            "431 Request Header Fields Too Large",
            "text/plain",
            Arc::new("request head too large\n".to_string()),
        ),
        Some(Ok(len)) => route(&head[..len], &current),
    };
    let head_only = head.starts_with(b"HEAD ");
    let unread = status.starts_with("431");
    let mut out = String::with_capacity(160);
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let write = async {
        stream.write_all(out.as_bytes()).await?;
        if !head_only {
            stream.write_all(body.as_bytes()).await?;
        }
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client too slow to take the response",
            ))
        }
    }
    if unread {
        // Closing with the rest of the request unread would send a reset,
        // which can destroy the response before the client reads it.
        let drain = async {
            let mut sink = [0u8; 4096];
            let mut left = DRAIN_BYTES;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(HEAD_TIMEOUT, drain).await;
    }
    Ok(())
}

struct TooLarge;

/// Read up to the blank line that ends a request head: `Some(Ok(len))`,
/// `Some(Err(TooLarge))` when it does not fit, `None` when the client
/// closed first.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut [u8],
) -> io::Result<Option<Result<usize, TooLarge>>> {
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Ok(Some(Err(TooLarge)));
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        // Look again only where the end can be: the new bytes and the
        // three before them.
        let from = len.saturating_sub(3);
        len += n;
        let window = &buf[from..len];
        if window.windows(4).any(|w| w == b"\r\n\r\n") || window.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(Ok(len)));
        }
    }
}

fn route(
    head: &[u8],
    current: &watch::Receiver<Arc<String>>,
) -> (&'static str, &'static str, Arc<String>) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return (
            "400 Bad Request",
            "text/plain",
            Arc::new("bad request line\n".to_string()),
        );
    };
    if !version.starts_with("HTTP/1.") {
        return (
            "505 HTTP Version Not Supported",
            "text/plain",
            Arc::new("HTTP/1.0 or HTTP/1.1 only\n".to_string()),
        );
    }
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            Arc::new("GET or HEAD only\n".to_string()),
        );
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => ("200 OK", CONTENT_TYPE, current.borrow().clone()),
        "/" => (
            "200 OK",
            "text/plain; charset=utf-8",
            Arc::new(INDEX.to_string()),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            Arc::new("not found; the metrics are at /metrics\n".to_string()),
        ),
    }
}

#[cfg(test)]
mod tests;
