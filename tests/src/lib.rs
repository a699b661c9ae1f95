//! Harness for the privileged end-to-end suite: build-time fixtures, real
//! processes that wait until the tracer has attached, and a tracer process
//! driven the way a user drives it (flags, Ctrl-C, its JSON report).
//!
//! Every child is killed on drop. Waits have generous deadlines that only
//! guard against hangs; no test asserts on time.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const HANG_GUARD: Duration = Duration::from_secs(120);

/// The leaktrace binary under test.
pub fn leaktrace_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LEAKTRACE_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/leaktrace")
}

/// A fixture built by `build.rs`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join(name)
}

/// Whether this test can load BPF programs. Without root it is skipped
/// with a message, except under `LEAKTRACE_REQUIRE_BPF=1` (CI), where it
/// fails.
pub fn require_bpf(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    let reason = if !root {
        "not running as root"
    } else if !btf {
        "kernel has no BTF"
    } else {
        return true;
    };
    if std::env::var("LEAKTRACE_REQUIRE_BPF").as_deref() == Ok("1") {
        panic!("{test}: BPF is required (LEAKTRACE_REQUIRE_BPF=1) but {reason}");
    }
    eprintln!("skipping {test}: {reason}");
    false
}

/// Kills the child on drop.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fixture process that follows the ready/go/done protocol.
pub struct Fixture {
    pub guard: Guard,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

fn line_reader<R: Read + Send + 'static>(r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, what: &str, seen: &mut Vec<String>) -> bool {
    wait_for_within(rx, what, seen, HANG_GUARD).is_some()
}

/// The first line containing `what` (every line read is kept in `seen`),
/// or `None` when the stream ends or `guard` passes first.
fn wait_for_within(
    rx: &mpsc::Receiver<String>,
    what: &str,
    seen: &mut Vec<String>,
    guard: Duration,
) -> Option<String> {
    let deadline = Instant::now() + guard;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(what);
                seen.push(line.clone());
                if hit {
                    return Some(line);
                }
            }
            Err(_) => return None,
        }
    }
}

impl Fixture {
    /// Start `path args...` and wait for it to print "ready".
    pub fn start(path: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start fixture {}: {e}", path.display()));
        let stdout: ChildStdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let lines = line_reader(stdout);
        let mut f = Self {
            guard: Guard(child),
            stdin,
            lines,
        };
        let mut seen = Vec::new();
        assert!(
            wait_for(&f.lines, "ready", &mut seen),
            "fixture {} never said ready: {seen:?}",
            path.display()
        );
        f.stdin.as_mut().expect("stdin").flush().expect("flush");
        f
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// Send one line (the fixture proceeds).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("fixture stdin open");
        writeln!(stdin, "{line}").expect("write to fixture");
        stdin.flush().expect("flush fixture stdin");
    }

    /// Wait until the fixture prints a line containing `what`.
    pub fn expect(&mut self, what: &str) {
        let mut seen = Vec::new();
        assert!(
            wait_for(&self.lines, what, &mut seen),
            "fixture never said {what:?}: {seen:?}"
        );
    }

    /// Wait until the fixture prints a line containing `what`, and return
    /// that line (to read pids and figures out of it).
    pub fn expect_line(&mut self, what: &str) -> String {
        let mut seen = Vec::new();
        wait_for_within(&self.lines, what, &mut seen, HANG_GUARD)
            .unwrap_or_else(|| panic!("fixture never said {what:?}: {seen:?}"))
    }

    /// Wait for the fixture to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.guard.0.wait().expect("wait for fixture")
    }
}

/// A running leaktrace.
pub struct Tracer {
    pub guard: Guard,
    stderr: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
    stdout: thread::JoinHandle<String>,
}

/// What a finished leaktrace left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "leaktrace's stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl Tracer {
    /// Start `leaktrace args...` without waiting for anything.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_cmd(Command::new(leaktrace_bin()).args(args))
    }

    pub fn spawn_cmd(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LEAKTRACE_LOG", "info")
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {cmd:?}: {e}"));
        let mut out = child.stdout.take().expect("stdout");
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let stderr = line_reader(child.stderr.take().expect("stderr"));
        Self {
            guard: Guard(child),
            stderr,
            stderr_seen: Vec::new(),
            stdout,
        }
    }

    /// Start leaktrace and wait until it says it has attached.
    pub fn attach(args: &[&str]) -> Self {
        let mut t = Self::spawn(args);
        if !wait_for(&t.stderr, "attached to", &mut t.stderr_seen) {
            let f = t.finish();
            panic!("leaktrace never attached: {f:?}");
        }
        t
    }

    /// Wait until leaktrace writes a stderr line containing `what` (its
    /// log says "following child PID of PARENT", "process PID (comm)
    /// exited", ...) and return it; `None` if `guard` passes first. Lines
    /// read are kept for [`Tracer::finish`].
    pub fn wait_stderr(&mut self, what: &str, guard: Duration) -> Option<String> {
        if let Some(line) = self.stderr_seen.iter().find(|l| l.contains(what)) {
            return Some(line.clone());
        }
        wait_for_within(&self.stderr, what, &mut self.stderr_seen, guard)
    }

    /// Every stderr line read so far.
    pub fn stderr_lines(&self) -> &[String] {
        &self.stderr_seen
    }

    /// Ctrl-C, then collect the final report.
    pub fn interrupt(self) -> Finished {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.guard.0.id() as i32, libc::SIGINT) };
        self.finish()
    }

    /// Wait for leaktrace to exit by itself.
    pub fn finish(mut self) -> Finished {
        let deadline = Instant::now() + HANG_GUARD;
        let status = loop {
            if let Some(st) = self.guard.0.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.guard.0.kill();
                panic!("leaktrace did not exit: {:?}", self.stderr_seen);
            }
            thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            self.stderr_seen.push(l);
        }
        let stdout = std::mem::replace(&mut self.stdout, thread::spawn(String::new))
            .join()
            .unwrap_or_default();
        Finished {
            status,
            stdout,
            stderr: self.stderr_seen.join("\n"),
        }
    }
}

/// Stacks of a report whose innermost frame is `function`.
pub fn stacks_from<'a>(report: &'a Value, function: &str) -> Vec<&'a Value> {
    report["stacks"]
        .as_array()
        .expect("stacks array")
        .iter()
        .filter(|s| s["frames"][0]["function"].as_str() == Some(function))
        .collect()
}

/// Stacks of a report with a frame whose function is `function`,
/// anywhere in the stack (syscall stacks start inside libc: `__mmap`,
/// `__brk`, ... and reach the caller further out).
pub fn stacks_through<'a>(report: &'a Value, function: &str) -> Vec<&'a Value> {
    report["stacks"]
        .as_array()
        .expect("stacks array")
        .iter()
        .filter(|s| functions(s).iter().any(|f| f == function))
        .collect()
}

/// Sum of a numeric field over stacks.
pub fn sum(stacks: &[&Value], field: &str) -> i64 {
    stacks
        .iter()
        .map(|s| s[field].as_i64().expect("numeric field"))
        .sum()
}

/// Function names of a stack, innermost first.
pub fn functions(stack: &Value) -> Vec<String> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("??").to_string())
        .collect()
}

/// Compile `tests/fixtures/NAME.c` with gcc (`-O0 -g`) into `dir/NAME`, for
/// fixtures built at test time rather than by `build.rs`.
pub fn compile_c_fixture(name: &str, dir: &std::path::Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/{name}.c"));
    let out = dir.join(name);
    let st = Command::new("gcc")
        .args(["-O0", "-g", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc (cargo xtask setup installs it)");
    assert!(st.success(), "gcc failed on {}", src.display());
    out
}
