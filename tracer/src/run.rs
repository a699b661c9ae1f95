//! The daemon: attach, read the kernel ledger on a timer, report
//! periodically and once at the end (duration, Ctrl-C, SIGTERM, or every
//! target gone). Data flows one way: probe -> events -> ledger -> trend
//! -> symbolize -> report.

use std::{
    fs::File,
    io::{self, Write},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracer_common::Counter;

use crate::{
    cli::{Config, Format},
    events::Counters,
    ledger::{Ledger, Row},
    preflight,
    probe::{MapSizes, ProbeError, ProbeOptions, Probes},
    procfs::{self, ProcId},
    report::{self, Report, Target},
    symbolize::{Normalizer, Symbolizer},
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

struct Session {
    probes: Probes,
    targets: Vec<TargetState>,
    ledger: Ledger,
    normalizer: Normalizer,
    symbolizer: Symbolizer,
    counters: Counters,
    started: Instant,
}

impl Session {
    /// One reading of the kernel ledger into the ledger's time series.
    fn sample(&mut self) -> anyhow::Result<()> {
        let reading = self.probes.read()?;
        let probes = &self.probes;
        let rows: Vec<Row> = reading
            .rows
            .iter()
            .map(|(key, totals)| Row {
                stack: self
                    .normalizer
                    .resolve(key.tgid, key.stack_id, || probes.stack(key.stack_id)),
                pid: key.tgid,
                totals: *totals,
            })
            .collect();
        self.ledger
            .ingest(self.started.elapsed().as_secs_f64(), &rows);
        self.counters = reading.counters;
        for t in &mut self.targets {
            if t.status == Status::Running && !t.id.alive() {
                t.status = Status::Exited;
                log::info!("process {} ({}) exited", t.id.pid, t.comm);
            }
        }
        Ok(())
    }

    fn all_gone(&self) -> bool {
        !self.targets.iter().any(|t| t.status == Status::Running)
    }

    fn report(&mut self, cfg: &Config) -> Report {
        let mut notes = Vec::new();
        let lost: Vec<String> = Counter::ALL
            .iter()
            .filter(|c| c.is_loss() && self.counters.get(**c) > 0)
            .map(|c| format!("{} {}", self.counters.get(*c), c.name()))
            .collect();
        if !lost.is_empty() {
            notes.push(format!("events lost: {}", lost.join(", ")));
        }
        for t in &self.targets {
            if let Status::NotAttached(why) = &t.status {
                notes.push(format!(
                    "process {} ({}) not traced: {why}",
                    t.id.pid, t.comm
                ));
            }
        }
        let targets = self
            .targets
            .iter()
            .map(|t| Target {
                pid: t.id.pid,
                comm: t.comm.clone(),
                status: match &t.status {
                    Status::Running => "running".into(),
                    Status::Exited => "exited".into(),
                    Status::NotAttached(why) => format!("not attached: {why}"),
                },
            })
            .collect();
        let (normalizer, symbolizer) = (&self.normalizer, &mut self.symbolizer);
        report::build(
            report::Inputs {
                duration_s: self.started.elapsed().as_secs_f64(),
                targets,
                counters: &self.counters,
                ledger: &self.ledger,
                top: cfg.top,
                sort: cfg.sort,
                notes,
            },
            &mut |idxs| symbolizer.symbolize(normalizer, idxs),
        )
    }
}

/// Write a report; a closed stdout (`leaktrace ... | head`) is not an error.
fn emit(report: &Report, format: Format, out: &mut dyn Write) -> io::Result<()> {
    let res = match format {
        Format::Text => report::text::write(report, out),
        Format::Json => report::json::write(report, out),
    }
    .and_then(|()| out.flush());
    match res {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
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

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    preflight::check()?;

    let mut demo = if cfg.demo { Some(spawn_demo()?) } else { None };
    let mut pids = cfg.pids.clone();
    if let Some(d) = &demo {
        pids.push(d.0.id());
    }
    let mut targets = Vec::new();
    for pid in pids {
        // A thread id names its process.
        let tgid = procfs::tgid(pid).ok_or(ProbeError::NoProcess { pid })?;
        let id = ProcId::current(tgid).ok_or(ProbeError::NoProcess { pid })?;
        if targets.iter().any(|t: &TargetState| t.id == id) {
            continue;
        }
        targets.push(TargetState {
            id,
            comm: procfs::comm(tgid).unwrap_or_else(|| "?".into()),
            status: Status::Running,
        });
    }

    let mut probes = Probes::load(
        MapSizes {
            max_allocs: cfg.max_allocs,
            max_stacks: cfg.max_stacks,
            max_threads: 1 << 14,
        },
        ProbeOptions {
            free_at_entry: cfg.free_probe_at_entry,
        },
    )?;
    let mut first_err = None;
    for t in &mut targets {
        match probes.attach_process(t.id.pid) {
            Ok(att) => {
                for (object, funcs) in &att.objects {
                    let names: Vec<String> = funcs
                        .iter()
                        .map(|f| {
                            if f.offset == 0 {
                                f.name.clone()
                            } else {
                                format!("{}+{}", f.name, f.offset)
                            }
                        })
                        .collect();
                    log::debug!("pid {}: {object}: {}", t.id.pid, names.join(" "));
                }
            }
            Err(e) => {
                t.status = Status::NotAttached(e.to_string());
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        if targets.len() == 1 || targets.iter().all(|t| t.status != Status::Running) {
            return Err(e.into());
        }
        eprintln!("leaktrace: warning: {e}");
    }
    let attached: Vec<String> = targets
        .iter()
        .filter(|t| t.status == Status::Running)
        .map(|t| format!("{} ({})", t.id.pid, t.comm))
        .collect();
    eprintln!(
        "leaktrace: attached to {}; {}",
        attached.join(", "),
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

    let mut session = Session {
        probes,
        targets,
        ledger: Ledger::default(),
        normalizer: Normalizer::default(),
        symbolizer: Symbolizer::new(),
        counters: Counters::default(),
        started: Instant::now(),
    };

    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut tick = tokio::time::interval(cfg.sample_every);
    let mut next_report = cfg.interval.map(|i| Instant::now() + i);
    let deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
    let periodic_ok = cfg.format == Format::Text || cfg.output.is_some();
    let why = loop {
        tokio::select! {
            _ = tick.tick() => {
                session.sample()?;
                if session.all_gone() {
                    break "every target exited";
                }
                if let (Some(at), Some(every)) = (next_report, cfg.interval) {
                    if Instant::now() >= at && periodic_ok {
                        let r = session.report(&cfg);
                        emit(&r, Format::Text, &mut io::stdout().lock())?;
                        next_report = Some(at + every);
                    }
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
    log::info!("stopping: {why}");
    let report = session.report(&cfg);
    match &cfg.output {
        Some(path) => {
            let mut f = File::create(path)
                .with_context(|| format!("failed to create report file {}", path.display()))?;
            emit(&report, cfg.format, &mut f)
                .with_context(|| format!("failed to write report file {}", path.display()))?;
            eprintln!("leaktrace: {why}; report written to {}", path.display());
        }
        None => {
            eprintln!("leaktrace: {why}; final report:");
            emit(&report, cfg.format, &mut io::stdout().lock())?;
        }
    }
    drop(demo);
    Ok(())
}
