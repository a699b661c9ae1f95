//! End-to-end: user stacks through code built the way distributions build
//! it, without frame pointers, so every frame comes from `.eh_frame` CFI.
//!
//! Inputs: C fixtures (`fixtures/unw_*.c`, compiled here with gcc into
//! `$TMPDIR/leaktrace-unw-<pid>`), Debian's `/usr/bin/python3.11` running
//! `fixtures/unw_leak.py`, and Debian's `nginx` with its own config.
//! Ground truth is gdb: it attaches to a second copy of the same program,
//! stops at the same allocation, and its `bt` (frames 1.., above the
//! allocator) must equal leaktrace's frames (0.., the walk starts at the
//! call site) one for one: the same function, the same file:line where gdb
//! has one, and the same `(module, file offset)` where neither has a name.
//!
//! Every process is killed on drop; waits only guard against hangs.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use leaktrace_tests::{functions, require_bpf, stacks_from, sum, Fixture, Guard, Tracer};
use serde_json::Value;

/// Must match `UNW_LEAK_BYTES` / `UNW_LEAK_COUNT` in `fixtures/unw_main.c`.
const C_LEAK_BYTES: i64 = 24680;
const C_LEAK_COUNT: i64 = 8;
/// `bytearray(4096)` mallocs its buffer plus the trailing NUL.
const PY_LEAK_BYTES: i64 = 4097;
/// Must match `load_author_profiles(200)` in `fixtures/unw_leak.py`.
const PY_LEAK_COUNT: i64 = 200;
/// nginx's default `request_pool_size`: the pool a request's headers are
/// read into, created by `ngx_http_create_request`.
const NGINX_REQUEST_POOL_BYTES: u64 = 4096;

const HANG_GUARD: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Fixtures and tools

fn fixture_source(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// This test binary's scratch directory; every test of the binary shares it.
fn work_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("leaktrace-unw-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", dir.display()));
        dir
    })
}

/// Panics with the package to install when `tool` is not on PATH.
fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is needed by this test; install it with `apt-get install {package}`"
    );
}

fn gcc(args: &[&str]) {
    let out = Command::new("gcc").args(args).output().expect(
        "gcc is needed to build the unwinding fixtures; install it with `apt-get install gcc`",
    );
    assert!(
        out.status.success(),
        "gcc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `e_type` of an ELF file: 2 = ET_EXEC (fixed address), 3 = ET_DYN (PIE).
fn elf_type(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", path.display());
    u16::from_le_bytes([bytes[16], bytes[17]])
}

struct CFixtures {
    pie: PathBuf,
    non_pie: PathBuf,
}

/// main -> a1 -> a2 -> a3 (PIE or not) -> b1 -> b2 -> b3 (shared library)
/// -> malloc, everything built like a distro: optimized, no frame pointers.
fn c_fixtures() -> &'static CFixtures {
    static BUILT: OnceLock<CFixtures> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = work_dir();
        let d = dir.display().to_string();
        let flags = [
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
        ];
        let lib = dir.join("libunw_lib.so").display().to_string();
        let lib_src = fixture_source("unw_lib.c").display().to_string();
        let mut args: Vec<&str> = flags.to_vec();
        args.extend(["-shared", "-fPIC", "-o", &lib, &lib_src]);
        gcc(&args);

        let main_src = fixture_source("unw_main.c").display().to_string();
        let ldir = format!("-L{d}");
        let rpath = format!("-Wl,-rpath,{d}");
        let build = |name: &str, pic: [&str; 2]| {
            let out = dir.join(name);
            let o = out.display().to_string();
            let mut args: Vec<&str> = flags.to_vec();
            args.extend(pic);
            args.extend(["-o", &o, &main_src, &ldir, "-lunw_lib", &rpath]);
            gcc(&args);
            out
        };
        let pie = build("unw_pie", ["-fPIE", "-pie"]);
        let non_pie = build("unw_non_pie", ["-fno-pie", "-no-pie"]);
        assert_eq!(elf_type(&pie), 3, "{} is not PIE", pie.display());
        assert_eq!(elf_type(&non_pie), 2, "{} is PIE", non_pie.display());
        CFixtures { pie, non_pie }
    })
}

fn c_fixture(pie: bool) -> &'static Path {
    let f = c_fixtures();
    if pie {
        &f.pie
    } else {
        &f.non_pie
    }
}

const PYTHON: &str = "/usr/bin/python3.11";

fn start_python() -> Fixture {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is needed by this test; install it with `apt-get install python3.11`"
    );
    let script = fixture_source("unw_leak.py").display().to_string();
    Fixture::start(Path::new(PYTHON), &[&script])
}

// ---------------------------------------------------------------------------
// leaktrace

/// Start leaktrace and wait until it has attached and catches SIGINT.
///
/// leaktrace prints "attached to" before it installs its SIGINT handler,
/// so a Ctrl-C right after that line kills it without a report (seen with
/// these fast fixtures). Waiting for the handler (SigCgt in
/// /proc/PID/status) keeps that race out of the stack checks here.
fn attach(args: &[&str]) -> Tracer {
    let tracer = Tracer::attach(args);
    let pid = tracer.guard.0.id();
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if caught & (1 << (libc::SIGINT - 1)) != 0 {
            return tracer;
        }
        if Instant::now() > deadline {
            drop(tracer);
            panic!("leaktrace {pid} never installed its SIGINT handler");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Trace a ready fixture from "go" to "done" and return the final report.
fn trace(fx: &mut Fixture) -> Value {
    let pid = fx.pid().to_string();
    let tracer = attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "100"]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    out.json()
}

fn frames(stack: &Value) -> &Vec<Value> {
    stack["frames"].as_array().expect("frames array")
}

fn assert_not_truncated(stack: &Value) {
    let names = functions(stack);
    assert!(
        !names.iter().any(|n| n.starts_with("[truncated")),
        "stack was cut short: {names:?}\n{stack:#}"
    );
}

/// Positions of `want` in `names`, in order (each searched after the last).
fn in_order(names: &[String], want: &[&str]) -> Result<Vec<usize>, String> {
    let mut at = Vec::new();
    let mut from = 0;
    for w in want {
        match names[from..].iter().position(|n| n == w) {
            Some(i) => {
                at.push(from + i);
                from += i + 1;
            }
            None => return Err(format!("{w:?} missing (after {:?})", &names[..from])),
        }
    }
    Ok(at)
}

// ---------------------------------------------------------------------------
// gdb

#[derive(Debug)]
struct GdbFrame {
    pc: Option<u64>,
    function: Option<String>,
    /// Source file and line, when gdb has debug info for the frame.
    source: Option<(String, u64)>,
}

#[derive(Debug)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    path: String,
}

#[derive(Debug)]
struct GdbStop {
    frames: Vec<GdbFrame>,
    mappings: Vec<Mapping>,
    output: String,
}

const GDB_READY: &str = "leaktrace-unw: gdb continues";

/// Attach gdb to `pid`, break at `breakpoint`, run `trigger` once gdb is
/// about to resume the process, and return gdb's `bt` at the first stop
/// with the process's mappings. gdb detaches afterwards.
fn gdb_backtrace(pid: u32, breakpoint: &str, trigger: impl FnOnce()) -> GdbStop {
    require_tool("gdb", "gdb");
    let pid_s = pid.to_string();
    let break_cmd = format!("break {breakpoint}");
    let echo = format!("echo {GDB_READY}\\n");
    let mut args = vec!["-batch", "-nx", "-p", &pid_s];
    for ex in [
        "set pagination off",
        "set width 0",
        "set confirm off",
        "set debuginfod enabled off",
        "set backtrace past-main on",
        "set backtrace past-entry off",
        "set print frame-arguments none",
        &break_cmd,
        &echo,
        "continue",
        "bt",
        "info proc mappings",
        "detach",
    ] {
        args.extend(["-ex", ex]);
    }
    let mut child = Command::new("gdb")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start gdb: {e}"));
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("gdb stdout");
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().expect("gdb stderr");
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut gdb = Guard(child);

    let deadline = Instant::now() + HANG_GUARD;
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let ready = line.contains(GDB_READY);
                lines.push(line);
                if ready {
                    break;
                }
            }
            Err(_) => {
                drop(gdb);
                panic!(
                    "gdb never got ready to continue {pid}:\n{}\n{}",
                    lines.join("\n"),
                    err.join().unwrap_or_default()
                );
            }
        }
    }
    // The breakpoint is inserted when gdb resumes the process; until then
    // the process is stopped, so whatever the trigger sends waits for it.
    trigger();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                drop(gdb);
                panic!(
                    "gdb never stopped at {breakpoint} in {pid}:\n{}",
                    lines.join("\n")
                );
            }
        }
    }
    let status = gdb.0.wait().expect("wait for gdb");
    let output = format!(
        "{}\n--- stderr ---\n{}",
        lines.join("\n"),
        err.join().unwrap_or_default()
    );
    assert!(status.success(), "gdb failed ({status}):\n{output}");
    let frames: Vec<GdbFrame> = lines.iter().filter_map(|l| parse_gdb_frame(l)).collect();
    let mappings = lines.iter().filter_map(|l| parse_mapping(l)).collect();
    assert!(
        frames.len() > 1,
        "gdb printed no backtrace at {breakpoint}:\n{output}"
    );
    GdbStop {
        frames,
        mappings,
        output,
    }
}

/// One `bt` line: `#3  0x00007f.. in name (...) at file.c:12`,
/// `#0  name (...) at file.c:12`, `#7  0x.. in ?? ()`,
/// `#2  0x.. in name () from /lib/x.so`.
fn parse_gdb_frame(line: &str) -> Option<GdbFrame> {
    let rest = line.strip_prefix('#')?;
    let (num, rest) = rest.split_once(char::is_whitespace)?;
    num.parse::<u32>().ok()?;
    let rest = rest.trim_start();
    let (pc, rest) = match rest.strip_prefix("0x") {
        Some(hex) => {
            let (addr, after) = hex.split_once(" in ")?;
            (Some(u64::from_str_radix(addr, 16).ok()?), after)
        }
        None => (None, rest),
    };
    let name = rest.split(" (").next()?.trim();
    let function = (name != "??").then(|| name.to_string());
    let source = rest.rsplit_once(" at ").and_then(|(_, loc)| {
        let (file, line) = loc.trim().rsplit_once(':')?;
        Some((file.to_string(), line.parse().ok()?))
    });
    Some(GdbFrame {
        pc,
        function,
        source,
    })
}

/// One `info proc mappings` row: start end size offset [perms] objfile.
fn parse_mapping(line: &str) -> Option<Mapping> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let path = cols.last()?;
    if cols.len() < 5 || !path.starts_with('/') {
        return None;
    }
    Some(Mapping {
        start: hex(cols[0])?,
        end: hex(cols[1])?,
        offset: hex(cols[3])?,
        path: path.to_string(),
    })
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// What a frame must agree on: the function, else `(module, file offset)`;
/// plus file:line where there is one.
fn render(
    function: Option<&str>,
    place: impl FnOnce() -> String,
    source: Option<(&str, u64)>,
) -> String {
    let mut s = match function {
        Some(f) => f.to_string(),
        None => format!("?? {}", place()),
    };
    if let Some((file, line)) = source {
        s.push_str(&format!(" at {}:{line}", basename(file)));
    }
    s
}

fn render_gdb(f: &GdbFrame, maps: &[Mapping]) -> String {
    render(
        f.function.as_deref(),
        || match f.pc {
            Some(pc) => maps
                .iter()
                .find(|m| m.start <= pc && pc < m.end)
                .map(|m| format!("{}+{:#x}", m.path, pc - m.start + m.offset))
                .unwrap_or_else(|| format!("{pc:#x} (unmapped)")),
            None => "(no pc)".into(),
        },
        f.source.as_ref().map(|(file, line)| (file.as_str(), *line)),
    )
}

fn render_leaktrace(f: &Value) -> String {
    render(
        f["function"].as_str(),
        || {
            format!(
                "{}+{:#x}",
                f["module"].as_str().unwrap_or("(no module)"),
                f["offset"].as_u64().unwrap_or(u64::MAX)
            )
        },
        f["file"].as_str().zip(f["line"].as_u64()),
    )
}

/// gdb's frames above the allocator (1..) against leaktrace's native frames
/// (0..), all of them, past `main` down to `_start`.
fn assert_matches_gdb(what: &str, stack: &Value, gdb: &GdbStop) {
    if let Some(diff) = gdb_diff(what, stack, gdb) {
        panic!("{diff}");
    }
}

/// Why `stack` is not gdb's backtrace, or `None` when it is.
fn gdb_diff(what: &str, stack: &Value, gdb: &GdbStop) -> Option<String> {
    // Python frames replace the eval loop's native frame in leaktrace's
    // stacks; gdb shows the native one.
    let has_python = frames(stack).iter().any(|f| f["kind"] == "python");
    let want: Vec<String> = gdb.frames[1..]
        .iter()
        .filter(|f| !(has_python && f.function.as_deref() == Some("_PyEval_EvalFrameDefault")))
        .map(|f| render_gdb(f, &gdb.mappings))
        .collect();
    let got: Vec<String> = frames(stack)
        .iter()
        .filter(|f| f["kind"] == "native")
        .map(render_leaktrace)
        .collect();
    if want != got {
        let n = want.len().max(got.len());
        let rows: Vec<String> = (0..n)
            .map(|i| {
                let g = want.get(i).map(String::as_str).unwrap_or("-");
                let l = got.get(i).map(String::as_str).unwrap_or("-");
                let mark = if g == l { ' ' } else { '!' };
                format!("{mark} {i:2}  gdb: {g}\n        leaktrace: {l}")
            })
            .collect();
        return Some(format!(
            "{what}: leaktrace's stack differs from gdb's backtrace\n{}\n\
             --- gdb output ---\n{}\n--- leaktrace stack ---\n{stack:#}",
            rows.join("\n"),
            gdb.output
        ));
    }
    None
}

// ---------------------------------------------------------------------------
// 1. C, no frame pointers, through a shared library

fn check_c_stack(test: &str, pie: bool) {
    if !require_bpf(test) {
        return;
    }
    let bin = c_fixture(pie);
    let mut fx = Fixture::start(bin, &[]);
    let r = trace(&mut fx);

    let leaks = stacks_from(&r, "b3");
    assert_eq!(
        sum(&leaks, "outstanding_bytes"),
        C_LEAK_BYTES * C_LEAK_COUNT,
        "{test}: wrong outstanding bytes from b3 in {r:#}"
    );
    assert_eq!(
        sum(&leaks, "outstanding_allocs"),
        C_LEAK_COUNT,
        "{test}: wrong outstanding count from b3"
    );
    for stack in &leaks {
        assert_not_truncated(stack);
        let names = functions(stack);
        let inner: Vec<&str> = names.iter().take(7).map(String::as_str).collect();
        assert_eq!(
            inner,
            ["b3", "b2", "b1", "a3", "a2", "a1", "main"],
            "{test}: frames missing or out of order: {names:?}"
        );
        assert_eq!(
            names.get(7).map(String::as_str),
            Some("__libc_start_call_main"),
            "{test}: main's caller is not libc's (libc's local symbols come from libc6-dbg): {names:?}"
        );
        assert!(
            matches!(
                names.get(8).map(String::as_str),
                Some("__libc_start_main" | "__libc_start_main_impl")
            ),
            "{test}: no __libc_start_main under main: {names:?}"
        );
        let modules: Vec<&str> = frames(stack)
            .iter()
            .take(7)
            .map(|f| f["module"].as_str().unwrap_or("?"))
            .collect();
        let lib = work_dir().join("libunw_lib.so");
        let lib = lib.to_str().expect("utf-8 path");
        let exe = bin.to_str().expect("utf-8 path");
        assert_eq!(
            modules,
            [lib, lib, lib, exe, exe, exe, exe],
            "{test}: frames attributed to the wrong objects"
        );
    }
    assert_eq!(r["totals"]["lost_events"], 0, "{test}: lost events: {r:#}");
}

/// A PIE main binary and a shared library, both without frame pointers.
#[test]
fn cfi_stack_through_shared_library_pie() {
    check_c_stack("cfi_stack_through_shared_library_pie", true);
}

/// The same with a fixed-address (non-PIE) main binary.
#[test]
fn cfi_stack_through_shared_library_non_pie() {
    check_c_stack("cfi_stack_through_shared_library_non_pie", false);
}

// ---------------------------------------------------------------------------
// 2. The same stacks against gdb

fn check_c_against_gdb(test: &str, pie: bool) {
    if !require_bpf(test) {
        return;
    }
    let bin = c_fixture(pie);
    let mut fx = Fixture::start(bin, &[]);
    let r = trace(&mut fx);
    let stack = stacks_from(&r, "b3")
        .into_iter()
        .find(|s| s["outstanding_allocs"] == C_LEAK_COUNT)
        .unwrap_or_else(|| panic!("{test}: no stack from b3 holds all the leaks: {r:#}"));

    let mut twin = Fixture::start(bin, &[]);
    let pid = twin.pid();
    let gdb = gdb_backtrace(pid, &format!("malloc if $rdi == {C_LEAK_BYTES}"), || {
        twin.send("go")
    });
    assert_eq!(
        gdb.frames[1].function.as_deref(),
        Some("b3"),
        "{test}: gdb stopped somewhere else:\n{}",
        gdb.output
    );
    assert!(
        gdb.frames
            .iter()
            .any(|f| f.function.as_deref() == Some("main")),
        "{test}: gdb's backtrace does not reach main:\n{}",
        gdb.output
    );
    assert_matches_gdb(test, stack, &gdb);
}

#[test]
fn cfi_stack_matches_gdb_pie() {
    check_c_against_gdb("cfi_stack_matches_gdb_pie", true);
}

#[test]
fn cfi_stack_matches_gdb_non_pie() {
    check_c_against_gdb("cfi_stack_matches_gdb_non_pie", false);
}

// ---------------------------------------------------------------------------
// 3. Debian's python3.11: stripped, no frame pointers

#[test]
fn distro_python_stack_reaches_py_bytes_main() {
    let test = "distro_python_stack_reaches_py_bytes_main";
    if !require_bpf(test) {
        return;
    }
    let mut fx = start_python();
    let r = trace(&mut fx);

    // bytearray's buffer: PyByteArray_Resize -> PyObject_Malloc -> malloc.
    let leaks: Vec<&Value> = r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| functions(s).iter().any(|f| f == "PyByteArray_Resize"))
        .collect();
    assert!(
        sum(&leaks, "outstanding_bytes") >= PY_LEAK_BYTES * PY_LEAK_COUNT,
        "{test}: the bytearrays are not all outstanding through PyByteArray_Resize: {r:#}"
    );
    let stack = leaks
        .iter()
        .copied()
        .find(|s| s["outstanding_allocs"].as_i64() >= Some(PY_LEAK_COUNT))
        .unwrap_or_else(|| panic!("{test}: no single stack holds the bytearrays: {r:#}"));
    assert_not_truncated(stack);
    let names = functions(stack);
    // Debian's main() tail-calls Py_BytesMain, so main has no frame. The
    // Python frames stand where _PyEval_EvalFrameDefault ran them
    // (tests/tests/python.rs checks them).
    if let Err(e) = in_order(
        &names,
        &[
            "PyByteArray_Resize",
            "load_author_profiles",
            "Py_BytesMain",
            "__libc_start_call_main",
        ],
    ) {
        panic!("{test}: {e} in {names:?}");
    }

    let mut twin = start_python();
    let pid = twin.pid();
    let gdb = gdb_backtrace(pid, &format!("malloc if $rdi == {PY_LEAK_BYTES}"), || {
        twin.send("go")
    });
    assert!(
        gdb.frames
            .iter()
            .any(|f| f.function.as_deref() == Some("PyByteArray_Resize")),
        "{test}: gdb stopped somewhere else:\n{}",
        gdb.output
    );
    assert_matches_gdb(test, stack, &gdb);
}

// ---------------------------------------------------------------------------
// 4. Debian's nginx worker

/// nginx (master and worker) with its own prefix; SIGTERM on drop, then
/// SIGKILL for both if they linger (a worker outlives a killed master).
struct Nginx {
    master: Guard,
    worker: u32,
    port: u16,
    _dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let master = self.master.0.id() as i32;
        // SAFETY: plain kill(2) on our own child and its child.
        unsafe { libc::kill(master, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.master.0.try_wait(), Ok(Some(_))) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; the worker pid is only reused after it is reaped.
        unsafe { libc::kill(self.worker as i32, libc::SIGKILL) };
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn start_nginx() -> Nginx {
    require_tool("nginx", "nginx");
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = work_dir().join(format!("nginx-{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
    let port = free_port();
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\n\
             error_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{}}\n\
             http {{\n  access_log off;\n  server {{\n    listen 127.0.0.1:{port};\n\
             \x20   location / {{ return 200 \"ok\"; }}\n\
             \x20   location = /status {{ stub_status; }}\n  }}\n}}\n"
        ),
    )
    .expect("write nginx.conf");
    let child: Child = Command::new("nginx")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start nginx: {e}"));
    let master = Guard(child);
    let deadline = Instant::now() + HANG_GUARD;
    let worker = loop {
        if let Some(&w) = children(master.0.id()).first() {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                break w;
            }
        }
        let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "nginx never started a worker listening on {port}:\n{log}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    Nginx {
        master,
        worker,
        port,
        _dir: dir,
    }
}

/// One keep-alive request on `conn`; returns the body.
fn get(conn: &mut TcpStream, path: &str) -> String {
    write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send request");
    let mut r = BufReader::new(conn.try_clone().expect("clone stream"));
    let mut len = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("read response header");
        assert!(!line.is_empty(), "nginx closed the connection");
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = Some(v.trim().parse::<usize>().expect("content length"));
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len.expect("content-length in response")];
    r.read_exact(&mut body).expect("read response body");
    assert!(r.buffer().is_empty(), "unexpected bytes after the response");
    String::from_utf8_lossy(&body).into_owned()
}

/// A request whose headers never end: nginx keeps its request pool.
fn half_request(port: u16) -> TcpStream {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to nginx");
    write!(s, "GET / HTTP/1.1\r\nHost: localhost\r\n").expect("send half a request");
    s
}

/// Waits (hang guard only) until nginx's stub_status shows `reading`
/// connections reading request headers.
fn wait_reading(conn: &mut TcpStream, reading: u32) {
    let deadline = Instant::now() + HANG_GUARD;
    let want = format!("Reading: {reading} ");
    loop {
        let status = get(conn, "/status");
        if status.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nginx never read the half request: {status}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn distro_nginx_worker_stack_reaches_main() {
    let test = "distro_nginx_worker_stack_reaches_main";
    if !require_bpf(test) {
        return;
    }
    let nginx = start_nginx();
    let worker = nginx.worker.to_string();
    let tracer = attach(&["-p", &worker, "-i", "0", "--format", "json", "-n", "1000"]);
    let mut keep_alive =
        TcpStream::connect((Ipv4Addr::LOCALHOST, nginx.port)).expect("connect to nginx");
    for _ in 0..3 {
        assert_eq!(get(&mut keep_alive, "/"), "ok");
    }
    let half = half_request(nginx.port);
    wait_reading(&mut keep_alive, 1);
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();

    // Every outstanding stack of the worker is whole.
    let stacks = r["stacks"].as_array().expect("stacks");
    assert!(!stacks.is_empty(), "{test}: nothing outstanding: {r:#}");
    for s in stacks {
        assert_not_truncated(s);
    }

    // The half request's pool: ngx_memalign <- ngx_create_pool <- ... <-
    // ngx_http_create_request <- ... <- ngx_process_events_and_timers <-
    // ngx_worker_process_cycle <- ngx_spawn_process <- ... <- main.
    // ngx_worker_process_cycle is static and Debian's nginx has no .symtab
    // (only .dynsym), so neither leaktrace nor gdb can name it without
    // nginx's debug symbols: it is the one frame ngx_spawn_process called
    // (`proc(cycle, data)` in the worker), and it must be there, named or
    // as (nginx, offset).
    let through_http: Vec<&Value> = stacks
        .iter()
        .filter(|s| functions(s).iter().any(|f| f.starts_with("ngx_http_")))
        .collect();
    assert!(
        !through_http.is_empty(),
        "{test}: no outstanding stack runs through ngx_http_*: {r:#}"
    );
    let nginx_bin = std::fs::canonicalize(
        Command::new("sh")
            .args(["-c", "command -v nginx"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .expect("locate nginx"),
    )
    .expect("canonical nginx path");
    // Request pools: the half request's, and the keep-alive connection's
    // next request's when nginx made one (a path through another handler).
    let mut request_pools = Vec::new();
    for s in &through_http {
        let names = functions(s);
        let at = in_order(
            &names,
            &[
                "ngx_process_events_and_timers",
                "ngx_spawn_process",
                "ngx_master_process_cycle",
                "main",
            ],
        )
        .unwrap_or_else(|e| panic!("{test}: {e} in {names:?}"));
        assert_eq!(
            at[1],
            at[0] + 2,
            "{test}: not exactly one frame (ngx_worker_process_cycle) between \
             ngx_process_events_and_timers and ngx_spawn_process: {names:?}"
        );
        let cycle = &frames(s)[at[0] + 1];
        let named = cycle["function"].as_str();
        assert!(
            named == Some("ngx_worker_process_cycle")
                || (named.is_none()
                    && cycle["module"].as_str().map(Path::new) == Some(nginx_bin.as_path())
                    && cycle["offset"].as_u64().is_some()),
            "{test}: the frame ngx_spawn_process called is not ngx_worker_process_cycle: {cycle}"
        );
        if names[..2] == ["ngx_memalign", "ngx_create_pool"]
            && names.iter().any(|n| n == "ngx_http_create_request")
            && s["outstanding_bytes"].as_u64() == Some(NGINX_REQUEST_POOL_BYTES)
        {
            request_pools.push(*s);
        }
    }
    assert!(
        !request_pools.is_empty(),
        "{test}: the half request's pool (ngx_create_pool from ngx_http_create_request) is not \
         outstanding: {r:#}"
    );

    // gdb on a twin nginx that leaktrace never traced: a process that once
    // had uprobes keeps MMF_HAS_UPROBES, and then the kernel takes gdb's
    // int3 on posix_memalign for a stale uprobe (and silently removes it)
    // whenever any other tracer on the machine probes that libc function.
    let twin = start_nginx();
    let mut second = None;
    let gdb = gdb_backtrace(
        twin.worker,
        &format!("posix_memalign if $rdx == {NGINX_REQUEST_POOL_BYTES}"),
        || second = Some(half_request(twin.port)),
    );
    assert!(
        gdb.frames
            .iter()
            .any(|f| f.function.as_deref() == Some("ngx_http_create_request")),
        "{test}: gdb stopped somewhere else:\n{}",
        gdb.output
    );
    // gdb caught a new connection's first request, as the half request
    // is: one of the pools must be that stack, frame by frame.
    let diffs: Vec<String> = request_pools
        .iter()
        .filter_map(|s| gdb_diff(test, s, &gdb))
        .collect();
    assert!(diffs.len() < request_pools.len(), "{}", diffs.join("\n\n"));
    drop((half, second, keep_alive));
}
