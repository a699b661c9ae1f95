//! The test tally of `cargo xtask test`: runs each test command, passes
//! its output through, adds up cargo test's `test result:` lines per
//! suite, and names what a suite left running.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

mod reap;

pub(crate) use reap::become_subreaper;

/// How long the output pipe may stay open after its command exited and its
/// leftovers were killed.
const PIPE_GRACE: Duration = Duration::from_secs(30);

/// One suite's outcome.
struct Suite {
    name: String,
    passed: u64,
    failed: u64,
    /// The runner itself failed (a build error, a crash, a check).
    broken: Option<String>,
}

/// Adds up cargo test's `test result:` lines per test binary while passing
/// output through.
pub(crate) struct Tally {
    suites: Vec<Suite>,
    /// Processes the suites left running (`suite: pid command`).
    left_behind: Vec<String>,
    started: Instant,
    /// When the run must stop: what runs then is named, with its process
    /// tree, and killed, and what has not started is reported as not run.
    deadline: Option<Instant>,
    out_of_time: bool,
}

impl Tally {
    pub(crate) fn new(limit: Option<Duration>) -> Tally {
        let started = Instant::now();
        Tally {
            suites: Vec::new(),
            left_behind: Vec::new(),
            started,
            deadline: limit.map(|l| started + l),
            out_of_time: false,
        }
    }

    /// Minutes and seconds since the run began, for the log.
    fn clock(&self) -> String {
        let s = self.started.elapsed().as_secs();
        format!("{}:{:02}", s / 60, s % 60)
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// A check that is not a test runner (fmt, clippy).
    pub(crate) fn check(&mut self, name: &str, cmd: &mut Command, why: &str) {
        let broken = match cmd.status() {
            Ok(st) if st.success() => None,
            Ok(st) => Some(format!("{why} ({st})")),
            Err(e) => Some(format!("failed to start: {e}")),
        };
        self.suites.push(Suite {
            name: name.to_string(),
            passed: u64::from(broken.is_none()),
            failed: u64::from(broken.is_some()),
            broken,
        });
    }

    pub(crate) fn broken(&mut self, name: &str, why: String) {
        self.suites.push(Suite {
            name: name.to_string(),
            passed: 0,
            failed: 1,
            broken: Some(why),
        });
    }

    /// Runs a test command, passing its output through and counting its
    /// `test result:` lines. When it exits, whatever it left running is
    /// named and killed: a stray process holding the output pipe would
    /// otherwise keep this loop (and CI) waiting forever.
    pub(crate) fn run(&mut self, cmd: &mut Command) -> Result<()> {
        if self.out_of_time || self.past_deadline() {
            self.out_of_time = true;
            self.broken(&describe(cmd), "not run: out of time".to_string());
            return Ok(());
        }
        println!("xtask: [{}] {}", self.clock(), describe(cmd));
        // One pipe for both streams, so cargo's `Running tests/x.rs` (on
        // stderr) comes in order with that binary's `test result:` line.
        let (reader, writer) = std::io::pipe().context("failed to create a pipe")?;
        let mut child = cmd
            .stdout(writer.try_clone().context("failed to clone a pipe")?)
            .stderr(writer)
            .spawn()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        // The command keeps its copies of the write end: drop them, or the
        // read end never sees the end.
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let before = self.suites.len();
        let mut current = String::from("tests");
        let mut exited: Option<(ExitStatus, Instant)> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => self.line(&line, &mut current),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => match exited {
                    None => {
                        if let Some(st) = child.try_wait()? {
                            exited = Some((st, Instant::now()));
                            self.reap(&current);
                        } else if !self.out_of_time && self.past_deadline() {
                            self.out_of_time = true;
                            self.stop_for_time(&current);
                        }
                    }
                    // Something outside this process tree holds the pipe
                    // (a process that passed it on, or one in the kernel's
                    // uninterruptible sleep): stop waiting for it.
                    Some((_, at)) if at.elapsed() > PIPE_GRACE => {
                        println!(
                            "xtask: the output of {current} stayed open {} s after it \
                             exited; going on without it",
                            PIPE_GRACE.as_secs()
                        );
                        break;
                    }
                    Some(_) => {}
                },
            }
        }
        let st = match exited {
            Some((st, _)) => st,
            None => child.wait()?,
        };
        // Processes that closed the pipe but outlived the command.
        self.reap(&current);
        let failed_suites = self.suites[before..].iter().any(|s| s.failed > 0);
        if !st.success() && !failed_suites {
            self.suites.push(Suite {
                name: format!("{cmd:?}"),
                passed: 0,
                failed: 1,
                broken: Some(format!("exited with {st} before reporting")),
            });
        }
        Ok(())
    }

    /// One line of a test command's output.
    fn line(&mut self, line: &str, current: &mut String) {
        println!("{line}");
        // A VM's serial console ends its lines with "\r\n".
        let line = line.trim_end_matches('\r');
        let t = line.trim_start();
        if let Some(rest) = t
            .strip_prefix("Running ")
            .or_else(|| t.strip_prefix("Doc-tests "))
        {
            *current = suite_name(rest);
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(label))
                    .and_then(|n| n.trim().rsplit(' ').next().map(str::to_string))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            self.suites.push(Suite {
                name: current.clone(),
                passed: num(" passed"),
                failed: num(" failed"),
                broken: None,
            });
        }
    }

    /// The deadline passed with `suite` running: names every process below
    /// xtask with where it waits (the reason the run is slow or stuck), then
    /// kills them all.
    fn stop_for_time(&mut self, suite: &str) {
        println!(
            "xtask: [{}] out of time while {suite} runs; its processes:",
            self.clock()
        );
        for (_, line) in reap::descendants() {
            println!("xtask:   {line}");
        }
        reap::kill_descendants();
        self.broken(suite, "killed: out of time".to_string());
    }

    /// Kills what the last command left running and remembers it for the
    /// summary, under the suite that ran last.
    fn reap(&mut self, suite: &str) {
        for left in reap::kill_leftovers() {
            println!("xtask: {suite} left a process running, killed it: {left}");
            self.left_behind.push(format!("{suite}: {left}"));
        }
    }

    /// Prints one line per suite and the total; fails if anything did.
    pub(crate) fn finish(self) -> Result<()> {
        println!();
        println!("suite summary ({} in all):", self.clock());
        for s in &self.suites {
            match &s.broken {
                Some(why) => println!("  {:<34} FAILED: {why}", s.name),
                None => println!(
                    "  {:<34} {} passed, {} failed{}",
                    s.name,
                    s.passed,
                    s.failed,
                    if s.failed > 0 { "  <--" } else { "" }
                ),
            }
        }
        if !self.left_behind.is_empty() {
            println!("left running after their suite (killed):");
            for l in &self.left_behind {
                println!("  {l}");
            }
        }
        let passed: u64 = self.suites.iter().map(|s| s.passed).sum();
        let failed: u64 = self.suites.iter().map(|s| s.failed).sum();
        println!("{passed} passed, {failed} failed");
        if failed > 0 {
            bail!("tests failed");
        }
        if passed == 0 {
            bail!("no test ran");
        }
        Ok(())
    }
}

/// A command as the log names it: program and arguments, shortened.
fn describe(cmd: &Command) -> String {
    let mut words = vec![Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let line = words.join(" ");
    match line.char_indices().nth(100) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line,
    }
}

/// `tests/accounting.rs (target/debug/deps/accounting-1234)` -> `accounting`;
/// `unittests src/lib.rs (target/debug/deps/leaktrace-1234)` -> `leaktrace (unit)`.
fn suite_name(running: &str) -> String {
    // The kernel matrix labels its suites itself (`vm-6.1/native`).
    if running.starts_with("vm-") {
        return running
            .split_once(" (")
            .map(|(p, _)| p)
            .unwrap_or(running)
            .trim()
            .to_string();
    }
    let (path, bin) = match running.split_once(" (") {
        Some((p, b)) => (p.trim(), b.trim_end_matches(')')),
        None => (running.trim(), ""),
    };
    let bin = Path::new(bin)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .rsplit_once('-')
        .map(|(n, _)| n)
        .unwrap_or("");
    if let Some(p) = path.strip_prefix("unittests ") {
        return format!("{} (unit {})", bin, p.trim());
    }
    if bin.is_empty() {
        return path.to_string();
    }
    Path::new(path)
        .file_stem()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .unwrap_or_else(|| bin.to_string())
}

#[cfg(test)]
mod tests {
    use super::suite_name;

    #[test]
    fn suites_are_named_by_their_binary() {
        assert_eq!(
            suite_name("tests/accounting.rs (target/debug/deps/accounting-eb8d0dd2088341fe)"),
            "accounting"
        );
        assert_eq!(
            suite_name("unittests src/lib.rs (target/debug/deps/leaktrace-1234)"),
            "leaktrace (unit src/lib.rs)"
        );
        assert_eq!(
            suite_name("vm-6.1/native (/w/target/debug/deps/native-1234)"),
            "vm-6.1/native"
        );
    }
}
