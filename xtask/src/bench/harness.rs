//! The processes a measurement runs, and what they leave behind.
//!
//! - [`Proc`]: a child whose stdout and stderr lines are read with
//!   deadlines; built on leaktrace-tests' harness (its kill-on-drop
//!   [`Guard`], [`forward_lines`] and [`wait_line`]), but reporting
//!   failures as errors, since a failed row is a table cell, not a panic.
//! - [`Tracer`]: a tracer under GNU time, for its CPU time and peak RSS.
//! - [`read_report`], [`read_node_report`]: the figures the tables need
//!   from leaktrace's JSON and from `leaktrace node`'s.
//!
//! Imports: `super` (`Ctx`), `procfs`, leaktrace-tests, tracer-common (the
//! counters that mean a loss). Knows no measurement.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use leaktrace_tests::{forward_lines, wait_line, Guard};

use super::{procfs, Ctx};

/// A child whose stdout and stderr lines arrive on a channel; killed on
/// drop.
pub(super) struct Proc {
    name: String,
    guard: Guard,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line received so far (for errors and for log parsing).
    pub(super) seen: Vec<String>,
}

impl Proc {
    pub(super) fn spawn(name: &str, cmd: &mut Command, stdin: bool) -> Result<Proc> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to start {name} ({cmd:?})"))?;
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            forward_lines(out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, tx);
        }
        Ok(Proc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            guard: Guard(child),
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// Starts a program of the ready/go/done protocol (`bench/*.c`,
    /// `pyalloc.py`, `goalloc.go`) and waits for its "ready".
    pub(super) fn start_ready(name: &str, cmd: &mut Command) -> Result<Proc> {
        let mut p = Proc::spawn(name, cmd, true)?;
        p.wait_line(|l| l == "ready", Duration::from_secs(10))?;
        Ok(p)
    }

    pub(super) fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    pub(super) fn wait_line(
        &mut self,
        want: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        match wait_line(&self.lines, want, &mut self.seen, timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => bail!(
                "{} gave no expected line within {timeout:?}{}",
                self.name,
                self.tail()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let st = self
                    .guard
                    .0
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                bail!("{} exited ({st}){}", self.name, self.tail())
            }
        }
    }

    /// The last few lines, for an error message.
    pub(super) fn tail(&self) -> String {
        let n = self.seen.len();
        let tail: Vec<&str> = self.seen[n.saturating_sub(6)..]
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {}", tail.join(" | "))
        }
    }

    pub(super) fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin not piped")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("failed to write to {}{}", self.name, self.tail()))
    }

    /// Closes stdin and waits for a clean exit.
    pub(super) fn finish(&mut self, timeout: Duration) -> Result<()> {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.guard.0.try_wait()? {
                self.seen.extend(self.lines.try_iter());
                if !st.success() {
                    bail!("{} failed ({st}){}", self.name, self.tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What a tracer cost, from GNU time and /proc.
#[derive(Clone, Copy)]
pub(super) struct Usage {
    pub(super) cpu_s: f64,
    /// CPU spent while the measured phases ran.
    pub(super) phase_cpu_s: f64,
    pub(super) max_rss_kib: u64,
}

/// Seconds a node mode row waits for its drill-down to begin.
pub(super) const NODE_DRILL_WAIT_S: u64 = 60;

/// A tracer running under GNU time (for its CPU time and peak RSS).
/// Drop kills the tracer itself, then time.
pub(super) struct Tracer {
    pub(super) proc: Proc,
    /// The tracer's own pid (time's child).
    pub(super) pid: u32,
    time_file: PathBuf,
}

impl Tracer {
    /// Starts `cmd` under GNU time and waits for the line that says it
    /// has attached.
    pub(super) fn spawn(
        ctx: &Ctx,
        name: &str,
        cmd: &mut Command,
        ready: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<Tracer> {
        let time_file = ctx.dir.join(format!("{}.time", name.replace(' ', "_")));
        let _ = fs::remove_file(&time_file);
        let proc = Proc::spawn(name, &mut timed(cmd, &time_file), false)?;
        let mut t = Tracer {
            pid: time_child(&proc, name)?,
            proc,
            time_file,
        };
        t.proc.wait_line(ready, timeout)?;
        Ok(t)
    }

    pub(super) fn leaktrace(ctx: &Ctx, pid: u32, json: &Path, extra: &[String]) -> Result<Tracer> {
        Tracer::spawn(
            ctx,
            "leaktrace",
            Command::new(&ctx.leaktrace)
                .args(["-p", &pid.to_string(), "-i", "0", "-d", "900"])
                .args(["--format", "json", "-o"])
                .arg(json)
                .args(extra)
                // The line naming the probe points (`free+9`) is at debug.
                .env("LEAKTRACE_LOG", "warn,leaktrace::run=debug"),
            |l| l.starts_with("leaktrace: attached to"),
            Duration::from_secs(60),
        )
    }

    /// `leaktrace node` with `extra` flags, watching the machine (every
    /// process unless `extra` says otherwise), its final report in
    /// `json`; ready once it says how many processes it watches. With
    /// `drill`, it drills down into that process at once (`--drill-pid`),
    /// and this returns once the drill-down has begun.
    pub(super) fn node(
        ctx: &Ctx,
        json: &Path,
        extra: &[String],
        drill: Option<u32>,
    ) -> Result<Tracer> {
        let mut cmd = Command::new(&ctx.leaktrace);
        // -d: a bound should the bench die without stopping it.
        cmd.args(["node", "-i", "0", "-d", "900", "--format", "json", "-o"])
            .arg(json)
            .arg("--oom-dir")
            .arg(&ctx.dir)
            .args(extra)
            // Drill-downs starting and ending are logged at info.
            .env("LEAKTRACE_LOG", "warn,leaktrace::run::node=info");
        if let Some(pid) = drill {
            cmd.args(["--drill-pid", &pid.to_string()]);
        }
        // Watching every process starts by reading each one's mappings
        // and unwind tables: allow for a busy machine.
        let mut t = Tracer::spawn(
            ctx,
            "leaktrace node",
            &mut cmd,
            |l| l.starts_with("leaktrace: watching"),
            Duration::from_secs(180),
        )?;
        if let Some(pid) = drill {
            // The first reading, taken at start, carries the start's cost;
            // a drill-down waits for a reading under half the budget,
            // which on a busy machine may never come: then the row is
            // measured without one, and its report says so.
            let began = format!("drilling down into {pid} ");
            let waited = t.proc.wait_line(
                |l| l.contains(&began) || l.contains("no drill-down into"),
                Duration::from_secs(NODE_DRILL_WAIT_S),
            );
            match waited {
                Ok(line) if line.contains(&began) => {}
                Ok(line) => bail!(
                    "leaktrace node did not drill down into {pid}: {}",
                    line.trim()
                ),
                Err(e) if t.cpu_s(ctx).is_none() => return Err(e),
                Err(_) => eprintln!(
                    "xtask: bench: leaktrace node has not begun a drill-down into {pid} within \
                     {NODE_DRILL_WAIT_S} s (no reading under half its budget); measuring anyway"
                ),
            }
        }
        Ok(t)
    }

    /// CPU seconds the tracer has used so far.
    pub(super) fn cpu_s(&self, ctx: &Ctx) -> Option<f64> {
        procfs::proc_cpu_s(self.pid, ctx.clk_tck)
    }

    /// SIGINT, wait for the exit; returns the tracer's usage and the time
    /// from SIGINT to exit.
    pub(super) fn stop(&mut self, timeout: Duration) -> Result<(Usage, Duration)> {
        let t0 = Instant::now();
        signal(self.pid, "INT");
        self.wait_exit(t0, timeout)?;
        let wall = t0.elapsed();
        // Readers see EOF once the tracer is gone; keep its last words.
        thread::sleep(Duration::from_millis(50));
        self.proc.seen.extend(self.proc.lines.try_iter());
        Ok((self.read_time()?, wall))
    }

    /// Stops the tracer and charges it the CPU it used between the two
    /// readings of [`Tracer::cpu_s`] that bracket the measured phases.
    pub(super) fn stop_measured(&mut self, cpu: (Option<f64>, Option<f64>)) -> Result<Usage> {
        let (u, _) = self.stop(Duration::from_secs(120))?;
        Ok(Usage {
            phase_cpu_s: match cpu {
                (Some(a), Some(b)) => b - a,
                _ => f64::NAN,
            },
            ..u
        })
    }

    /// Waits for the exit after SIGINT; SIGTERM after `timeout`, and an
    /// error either way when SIGINT was not enough.
    fn wait_exit(&mut self, t0: Instant, timeout: Duration) -> Result<()> {
        let proc = &mut self.proc;
        let mut term_sent: Option<Instant> = None;
        while proc.guard.0.try_wait()?.is_none() {
            match term_sent {
                None if t0.elapsed() > timeout => {
                    eprintln!(
                        "xtask: bench: {} ignored SIGINT; sending SIGTERM",
                        proc.name
                    );
                    signal(self.pid, "TERM");
                    term_sent = Some(Instant::now());
                }
                // Drop sends SIGKILL.
                Some(t) if t.elapsed() > Duration::from_secs(10) => {
                    bail!("{} ignored SIGINT and SIGTERM", proc.name)
                }
                _ => {}
            }
            thread::sleep(Duration::from_millis(2));
        }
        if term_sent.is_some() {
            bail!(
                "{} did not exit within {timeout:?} of SIGINT (SIGTERM ended it)",
                proc.name
            );
        }
        Ok(())
    }

    /// CPU time and peak RSS from GNU time's file.
    fn read_time(&self) -> Result<Usage> {
        let times = fs::read_to_string(&self.time_file)
            .with_context(|| format!("failed to read {}", self.time_file.display()))?;
        // GNU time writes "Command exited with non-zero status N" first.
        let last = times.lines().last().unwrap_or_default();
        let f: Vec<f64> = last
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [user, sys, rss] = f[..] else {
            bail!("unexpected GNU time output {times:?}");
        };
        if !times.starts_with(last) {
            eprintln!(
                "xtask: bench: {}: {}{}",
                self.proc.name,
                times.lines().next().unwrap_or_default(),
                self.proc.tail()
            );
        }
        Ok(Usage {
            cpu_s: user + sys,
            phase_cpu_s: f64::NAN,
            max_rss_kib: rss as u64,
        })
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // While time runs, its child is the tracer (not a reused pid).
        if self.pid != 0 {
            if let Ok(None) = self.proc.guard.0.try_wait() {
                signal(self.pid, "KILL");
            }
        }
    }
}

/// `cmd` under GNU time, writing "user system maxrss" to `time_file`.
fn timed(cmd: &Command, time_file: &Path) -> Command {
    let mut timed = Command::new("/usr/bin/time");
    // `env --default-signal=INT`: a shell's background job starts with
    // SIGINT ignored, and Python then never turns SIGINT into
    // KeyboardInterrupt; stop() relies on SIGINT.
    timed
        .args(["-f", "%U %S %M", "-o"])
        .arg(time_file)
        .args(["env", "--default-signal=INT"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            timed.env(k, v);
        }
    }
    timed
}

/// The pid of the tracer GNU time started (its only child).
fn time_child(time: &Proc, name: &str) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = procfs::children(time.pid()).into_iter().next() {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("{name} did not start under /usr/bin/time");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `sig` (a name: INT, TERM, KILL, QUIT) to `pid`; a process
/// already gone is no error.
pub(super) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The figures the tables need from leaktrace's JSON report.
#[derive(Default)]
pub(super) struct LeaktraceReport {
    pub(super) lost_events: Option<u64>,
    pub(super) allocs: Option<u64>,
    /// Reported stacks with at least one Lua frame, and all reported
    /// stacks.
    pub(super) lua_stacks: (usize, usize),
}

/// Found by key rather than parsed (two numbers; the keys are unique
/// where they are looked up).
pub(super) fn read_report(path: &Path) -> Result<LeaktraceReport> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("leaktrace wrote no report to {}", path.display()))?;
    let counters = text.find("\"counters\"").map_or("", |i| &text[i..]);
    Ok(LeaktraceReport {
        lost_events: json_u64(&text, "lost_events"),
        allocs: json_u64(counters, "allocs"),
        lua_stacks: lua_stacks(&text),
    })
}

/// Stacks of the report with a Lua frame, of all its stacks. A frame
/// holds no array, so a stack's frames end at the first `]`.
fn lua_stacks(text: &str) -> (usize, usize) {
    let stacks: Vec<&str> = text
        .split("\"frames\":")
        .skip(1)
        .map(|rest| rest.split(']').next().unwrap_or_default())
        .collect();
    let lua = stacks
        .iter()
        .filter(|frames| frames.contains("\"kind\": \"lua\""))
        .count();
    (lua, stacks.len())
}

/// `leaktrace node`'s figures about itself (the `leaktrace` object of its
/// JSON report), its drill-downs and its losses.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct NodeFigures {
    pub(super) duration_s: f64,
    pub(super) cpu_s: f64,
    pub(super) bpf_s: f64,
    pub(super) uprobe_traps: u64,
    /// Shares of one core: over the run (startup included), the budget,
    /// and the largest over one reading.
    pub(super) cpu_share: f64,
    pub(super) budget_share: f64,
    pub(super) peak_share: f64,
    pub(super) rss_bytes: u64,
    pub(super) watched_processes: u64,
    /// The kernel counters that mean a loss, summed.
    pub(super) lost: u64,
    pub(super) drilldowns: Vec<NodeDrill>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct NodeDrill {
    pub(super) pid: u64,
    pub(super) comm: String,
    pub(super) started_s: f64,
    pub(super) ended_s: f64,
    /// window, budget, exited or running.
    pub(super) ended_by: String,
    pub(super) stacks: usize,
}

/// The figures of a `leaktrace.node/v1` report.
pub(super) fn read_node_report(path: &Path) -> Result<NodeFigures> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("leaktrace node wrote no report to {}", path.display()))?;
    node_figures(&text).with_context(|| format!("unexpected node report {}", path.display()))
}

fn node_figures(text: &str) -> Result<NodeFigures> {
    let v: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    if v["schema"] != "leaktrace.node/v1" {
        bail!("schema {} instead of leaktrace.node/v1", v["schema"]);
    }
    let me = &v["leaktrace"];
    let f = |o: &serde_json::Value, k: &str| o[k].as_f64().with_context(|| format!("no {k}"));
    let u = |o: &serde_json::Value, k: &str| o[k].as_u64().with_context(|| format!("no {k}"));
    let lost = tracer_common::Counter::ALL
        .iter()
        .filter(|c| c.is_loss())
        .filter_map(|c| v["counters"][c.name()].as_u64())
        .sum();
    let drilldowns = v["drilldowns"]
        .as_array()
        .context("no drilldowns")?
        .iter()
        .map(|d| {
            Ok(NodeDrill {
                pid: u(d, "pid")?,
                comm: d["comm"].as_str().unwrap_or_default().to_string(),
                started_s: f(d, "started_s")?,
                ended_s: f(d, "ended_s")?,
                ended_by: d["ended_by"].as_str().context("no ended_by")?.to_string(),
                stacks: d["stacks"].as_array().map_or(0, Vec::len),
            })
        })
        .collect::<Result<_>>()?;
    Ok(NodeFigures {
        duration_s: f(&v, "duration_s")?,
        cpu_s: f(me, "cpu_s")?,
        bpf_s: f(me, "bpf_s")?,
        uprobe_traps: u(me, "uprobe_traps")?,
        cpu_share: f(me, "cpu_share")?,
        budget_share: f(me, "budget_share")?,
        peak_share: f(me, "peak_share")?,
        rss_bytes: u(me, "rss_bytes")?,
        watched_processes: u(me, "watched_processes")?,
        lost,
        drilldowns,
    })
}

fn json_u64(text: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let rest = text[text.find(&pat)? + pat.len()..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers() {
        let t = r#"{"totals": {"outstanding_allocs": 4, "lost_events": 12},
            "counters": {"allocs": 800002, "allocs_map_full": 0}}"#;
        assert_eq!(json_u64(t, "lost_events"), Some(12));
        let c = &t[t.find("\"counters\"").unwrap()..];
        assert_eq!(json_u64(c, "allocs"), Some(800002));
        assert_eq!(json_u64(t, "missing"), None);
    }

    #[test]
    fn stacks_with_lua_frames() {
        let t = r#"{"stacks": [
            {"pids": [7], "frames": [{"function": "f", "kind": "native"}]},
            {"pids": [7], "frames": [
              {"function": "lj_alloc_malloc", "kind": "native"},
              {"function": "handle", "kind": "lua"}]},
            {"pids": [7], "frames": []}]}"#;
        assert_eq!(lua_stacks(t), (1, 3));
    }

    #[test]
    fn node_report_figures() {
        let t = r#"{"schema": "leaktrace.node/v1", "duration_s": 20.5,
            "processes": [], "stacks": [],
            "drilldowns": [{"pid": 7, "comm": "nginx", "started_s": 2.0,
                "ended_s": 4.1, "ended_by": "budget", "stacks": [{}, {}]}],
            "counters": {"allocs": 9, "syscall_events_lost": 3, "stacks_lost": 2},
            "leaktrace": {"cpu_s": 0.5, "bpf_s": 0.25, "uprobe_traps": 1000,
                "cpu_share": 0.009, "budget_share": 0.01, "peak_share": 0.2,
                "rss_bytes": 4096, "watched_processes": 12}}"#;
        let f = node_figures(t).unwrap();
        assert_eq!(
            f,
            NodeFigures {
                duration_s: 20.5,
                cpu_s: 0.5,
                bpf_s: 0.25,
                uprobe_traps: 1000,
                cpu_share: 0.009,
                budget_share: 0.01,
                peak_share: 0.2,
                rss_bytes: 4096,
                watched_processes: 12,
                lost: 5,
                drilldowns: vec![NodeDrill {
                    pid: 7,
                    comm: "nginx".into(),
                    started_s: 2.0,
                    ended_s: 4.1,
                    ended_by: "budget".into(),
                    stacks: 2,
                }],
            }
        );
        let other = t.replace("leaktrace.node/v1", "leaktrace/v1");
        assert!(node_figures(&other).is_err());
    }
}
