//! End-to-end: Debian's nginx with OpenResty's Lua module (LuaJIT), traced
//! the way an operator traces a live service: through its master, across
//! a reload and a crashed worker, or by name before nginx even starts.
//!
//! Inputs: `tests/src/nginx.rs` (nginx with its own prefix, N workers),
//! `fixtures/lua/leakmod.lua` (a pure-Lua leak, a bounded cache, churn,
//! the heap size), `fixtures/lua/app.lua` and `fixtures/lua_ffi_lib.c`
//! (the FFI incident: a stale shared library, called from Lua, that keeps
//! a copy of every payload). A load thread counts the requests each worker
//! served (every response names its worker), so the bytes each worker
//! leaked are known exactly.
//!
//! What leaktrace promises for processes that exit (`run/lifecycle.rs`,
//! `on_exit`): while other targets run, an exited process's rows are
//! dropped with its address space (a recycled worker must not look like
//! a leak, and its pid may be reused). So after a reload and a killed
//! worker the leak's row holds exactly the live workers, with what each
//! of them leaked.
//!
//! The Lua tests (pure-Lua leak, FFI leak with its Lua caller) expect Lua
//! frames and Lua heap accounting and are ignored until LuaJIT support
//! lands (issue 15). The nginx tests take a lock: `--comm nginx` would
//! trace another test's nginx too.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use leaktrace_tests::{
    functions, gcc,
    nginx::{self, Nginx, Options},
    require_bpf, stacks_from, stacks_through, sum, Tracer,
};
use serde_json::Value;

/// What `stale_copy_payload` keeps per call: `sizeof(struct kept)` (a
/// pointer and a size_t) plus app.lua's 4096-byte payload.
const KEPT_BYTES: i64 = 16 + 4096;
/// The trace (`-d`): long enough for three phases of load a few seconds
/// each, short enough for 2 cores.
const TRACE_S: u64 = 16;
/// The load stops this long before the trace ends, so every counted
/// request is in the final reading.
const QUIET_S: u64 = 2;

const LEAKMOD: &str = include_str!("../fixtures/lua/leakmod.lua");
const APP: &str = include_str!("../fixtures/lua/app.lua");

fn lua_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/lua")
}

/// One nginx trace at a time: `--comm nginx` traces every nginx on the
/// machine, so another test's nginx would join its rows. Held for a
/// whole test (a panicking test leaves nothing behind, so poison is
/// harmless).
fn one_nginx_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh scratch directory for `test`.
fn work_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("leaktrace-nginx-{}/{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("failed to create {}: {e}", dir.display()));
    dir
}

/// 1-based line of `src` holding `marker`.
fn line_of(src: &str, marker: &str) -> u64 {
    src.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in the fixture")) as u64
        + 1
}

/// `fixtures/lua_ffi_lib.c` built the way a vendor ships a library:
/// optimized, position-independent, with debug info.
fn build_ffi_lib(dir: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/lua_ffi_lib.c");
    let out = dir.join("libstale_crypto.so");
    let st = gcc(&src, &out, &["-shared", "-fPIC", "-O2", "-g"])
        .expect("gcc (cargo xtask setup installs it)");
    assert!(st.success(), "gcc failed on {}", src.display());
    out
}

/// nginx with the Lua module and the fixtures' locations.
fn start_lua_nginx(dir: &Path, workers: usize, ffi_lib: &Path) -> Nginx {
    let handler = |path: &str, call: &str| {
        format!("    location = {path} {{ content_by_lua_block {{ {call} }} }}\n")
    };
    let mut locations = String::new();
    locations += &handler("/leak", r#"require("leakmod").leak() ngx.say("ok")"#);
    locations += &handler("/cache", r#"require("leakmod").cache() ngx.say("ok")"#);
    locations += &handler("/churn", r#"require("leakmod").churn() ngx.say("ok")"#);
    locations += &handler("/count", r#"require("leakmod").count()"#);
    locations += &format!(
        "    location = /ffi {{ set $ffi_lib {}; content_by_lua_block {{ require(\"app\").handle() }} }}\n",
        ffi_lib.display()
    );
    Nginx::start(
        &dir.join("nginx"),
        Options {
            workers,
            lua_dir: Some(lua_dir()),
            locations,
            ..Options::default()
        },
    )
}

/// What a load thread saw.
#[derive(Debug, Default)]
struct Tally {
    /// Requests each worker answered (by the pid in its response).
    served: BTreeMap<u32, i64>,
    /// Requests answered with 200, per path.
    ok: BTreeMap<&'static str, i64>,
    /// Requests that did not get a 200 with a pid, and why.
    failures: Vec<String>,
}

/// Requests, one after the other, on a thread of their own; a request
/// is never in flight while the load is paused.
struct Load {
    stop: Arc<AtomicBool>,
    gate: Arc<Mutex<()>>,
    thread: thread::JoinHandle<Tally>,
}

impl Load {
    /// Request `paths` in turn. A `/ffi` response starts with the pid of
    /// the worker that served it, which is counted.
    fn start(port: u16, paths: &'static [&'static str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Mutex::new(()));
        let (s, g) = (stop.clone(), gate.clone());
        let thread = thread::spawn(move || {
            let mut tally = Tally::default();
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let path = paths[i % paths.len()];
                i += 1;
                let open = g.lock().unwrap_or_else(|e| e.into_inner());
                match nginx::get(port, path) {
                    Ok(r) if r.status == 200 => {
                        *tally.ok.entry(path).or_default() += 1;
                        if path == "/ffi" {
                            match r.body.split_whitespace().next().map(str::parse::<u32>) {
                                Some(Ok(pid)) => *tally.served.entry(pid).or_default() += 1,
                                _ => tally.failures.push(format!("{path}: body {:?}", r.body)),
                            }
                        }
                    }
                    Ok(r) => tally
                        .failures
                        .push(format!("{path}: status {}: {:?}", r.status, r.body)),
                    Err(e) => tally.failures.push(format!("{path}: {e}")),
                }
                drop(open);
                thread::sleep(Duration::from_millis(2));
            }
            tally
        });
        Load { stop, gate, thread }
    }

    /// No request is in flight until the guard is dropped.
    fn pause(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the load thread panicked")
    }
}

/// Waits until leaktrace says it follows the new worker `pid`.
fn wait_followed(tracer: &mut Tracer, test: &str, pid: u32, master: u32) {
    let what = format!("following child {pid} of {master}");
    assert!(
        tracer.wait_stderr(&what, Duration::from_secs(30)).is_some(),
        "{test}: leaktrace never said {what:?}:\n{}",
        tracer.stderr_lines().join("\n")
    );
}

fn summary(r: &Value) -> String {
    let head = format!("counters {}\nnotes {}\n", r["counters"], r["notes"]);
    head + &r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .take(12)
        .map(|s| {
            format!(
                "{} B {} pids={} {:?}\n",
                s["outstanding_bytes"],
                s["trend"],
                s["pids"],
                functions(s).iter().take(8).collect::<Vec<_>>()
            )
        })
        .collect::<String>()
}

fn pids_of(stack: &Value) -> BTreeSet<u32> {
    stack["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .map(|p| p.as_u64().expect("pid") as u32)
        .collect()
}

/// `[alert]`, `[crit]` and `[emerg]` lines of nginx's error log, except
/// the alert for a worker the test killed on purpose.
fn serious_errors(log: &str, killed: &[u32]) -> Vec<String> {
    log.lines()
        .filter(|l| {
            ["[alert]", "[crit]", "[emerg]"]
                .iter()
                .any(|m| l.contains(m))
        })
        .filter(|l| {
            !killed
                .iter()
                .any(|k| l.contains(&format!("worker process {k} exited on signal 9")))
        })
        .map(str::to_string)
        .collect()
}

/// The rows of `copies` (stacks from stale_copy_payload) cut short after
/// that first frame. Any other row must be called from encrypt_payload
/// (LuaJIT calls it from the interpreter until it compiles a trace, then
/// from the trace's machine code: two stacks for one call site).
///
/// Cut-short rows are a known issue: the unwinder gets a library's tables
/// when leaktrace next looks at the process's mappings (`refresh_objects`,
/// once per `--sample-every`), so a copy made between a worker's
/// `ffi.load` and that look stops after its first frame.
fn dlopen_window_rows<'a>(copies: &[&'a Value]) -> Vec<&'a Value> {
    let mut window = Vec::new();
    for s in copies {
        let names = functions(s);
        if names.len() == 2 && names[1].starts_with("[truncated: implausible frame") {
            window.push(*s);
        } else {
            assert_eq!(
                names.get(1).map(String::as_str),
                Some("encrypt_payload"),
                "a stale_copy_payload row neither from encrypt_payload nor the dlopen \
                 window: {names:?}"
            );
        }
    }
    window
}

/// How leaktrace finds nginx's workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Find {
    /// `-p MASTER` once nginx runs: the running workers and later forks.
    Master,
    /// `--comm nginx` before nginx starts: every nginx as it appears.
    Comm,
}

/// Two workers leak through the FFI library under load; nginx reloads
/// (two new workers) and one new worker is killed (the master forks a
/// replacement), the load going on to whoever serves.
fn check_ffi_reload(test: &str, find: Find) {
    if !require_bpf(test) {
        return;
    }
    let _alone = one_nginx_at_a_time();
    let dir = work_dir(test);
    let lib = build_ffi_lib(&dir);
    let out_file = dir.join("report.json");
    let out_s = out_file.display().to_string();
    let secs = TRACE_S.to_string();
    let common = [
        "-i", "1", "-d", &secs, "-n", "1000", "--format", "json", "-o", &out_s,
    ];
    let (nginx, mut tracer) = match find {
        Find::Master => {
            let nginx = start_lua_nginx(&dir, 2, &lib);
            let master = nginx.master().to_string();
            let mut args = vec!["-p", master.as_str()];
            args.extend(common);
            let tracer = Tracer::attach(&args);
            (nginx, tracer)
        }
        Find::Comm => {
            let mut args = vec!["--comm", "nginx"];
            args.extend(common);
            let mut tracer = Tracer::attach(&args);
            let nginx = start_lua_nginx(&dir, 2, &lib);
            for w in nginx.workers() {
                wait_followed(&mut tracer, test, w, nginx.master());
            }
            (nginx, tracer)
        }
    };
    let end_load = Instant::now() + Duration::from_secs(TRACE_S - QUIET_S);
    let master = nginx.master();
    let first = nginx.workers();
    let load = Load::start(nginx.port(), &["/ffi"]);

    thread::sleep(Duration::from_secs(4));
    let second = {
        let _paused = load.pause();
        let second = nginx.reload();
        for &w in &second {
            wait_followed(&mut tracer, test, w, master);
        }
        second
    };
    thread::sleep(Duration::from_secs(3));
    let killed = second[0];
    let last = {
        let _paused = load.pause();
        let last = nginx.kill_worker(killed);
        for w in last.iter().filter(|w| !second.contains(w)) {
            wait_followed(&mut tracer, test, *w, master);
        }
        last
    };
    thread::sleep(end_load.saturating_duration_since(Instant::now()));
    let tally = load.stop();
    let fin = tracer.finish();
    assert!(fin.status.success(), "{test}: leaktrace failed: {fin:?}");
    let text = std::fs::read_to_string(&out_file)
        .unwrap_or_else(|e| panic!("{test}: no report in {out_s}: {e}\n{fin:?}"));
    let r: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{test}: {out_s} is not JSON ({e}):\n{text}"));
    let all = summary(&r);
    eprintln!(
        "{test}: generations {first:?} -> {second:?} -> {last:?} (killed {killed}), served {:?}",
        tally.served
    );

    // nginx itself was fine, and every request got its answer.
    assert!(
        tally.failures.is_empty(),
        "{test}: {} requests failed: {:?}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(10)]
    );
    let errors = serious_errors(&nginx.error_log(), &[killed]);
    assert!(errors.is_empty(), "{test}: nginx's error log: {errors:#?}");
    // Every generation served: the trace saw the leak in all of them.
    let served = |pids: &[u32]| -> i64 {
        pids.iter()
            .map(|p| tally.served.get(p).copied().unwrap_or(0))
            .sum()
    };
    for (what, gen) in [("first", &first), ("second", &second), ("last", &last)] {
        assert!(
            served(gen) > 0,
            "{test}: the {what} workers {gen:?} served nothing: {:?}",
            tally.served
        );
    }

    // The leak: the top growing stack, from the stale library's copy,
    // one row for the live workers (exited ones drop their rows).
    let top = &r["stacks"][0];
    assert_eq!(
        functions(top)[..2],
        ["stale_copy_payload", "encrypt_payload"],
        "{test}: the top stack is the copy stale_copy_payload makes for encrypt_payload:\n{all}"
    );
    assert_eq!(top["trend"], "growing", "{test}: {}", top["samples"]);
    let live: BTreeSet<u32> = nginx.workers().into_iter().collect();
    assert_eq!(
        live,
        last.iter().copied().collect(),
        "{test}: no worker changed after the kill"
    );
    // A worker the master respawned has its own row: below the event
    // loop its stack runs through `ngx_reap_children`, not the start-up
    // path. Together the rows that rose hold the live workers. (A worker
    // respawned late in the trace rose for a few seconds, then stayed
    // flat through the load's quiet end: under a loaded CI its row can be
    // `plateau` rather than `growing`.)
    let rising_pids: BTreeSet<u32> = r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| {
            (s["trend"] == "growing" || s["trend"] == "plateau")
                && functions(s)
                    .starts_with(&["stale_copy_payload".into(), "encrypt_payload".into()])
        })
        .flat_map(pids_of)
        .collect();
    assert_eq!(
        rising_pids, live,
        "{test}: the rows that rose hold the live workers, not the exited ones:\n{all}"
    );

    // Every copy, exactly: what each live worker kept, and nothing for
    // the old generation or the killed worker. A copy made in the first
    // moments after a worker dlopen()s the library is cut short after
    // stale_copy_payload (see `dlopen_window_rows`): counted here, in
    // a row of its own.
    let copies = stacks_from(&r, "stale_copy_payload");
    let window = dlopen_window_rows(&copies);
    if !window.is_empty() {
        eprintln!(
            "{test}: known issue: {} copies in a row cut short after stale_copy_payload",
            sum(&window, "outstanding_allocs")
        );
    }
    let mut kept: BTreeMap<u32, (i64, i64)> = BTreeMap::new();
    for s in &copies {
        for per in s["per_pid"].as_array().expect("per_pid") {
            let e = kept
                .entry(per["pid"].as_u64().expect("pid") as u32)
                .or_default();
            e.0 += per["outstanding_allocs"].as_i64().expect("allocs");
            e.1 += per["outstanding_bytes"].as_i64().expect("bytes");
        }
    }
    let want: BTreeMap<u32, (i64, i64)> = live
        .iter()
        .map(|&p| {
            let n = tally.served.get(&p).copied().unwrap_or(0);
            (p, (n, n * KEPT_BYTES))
        })
        .collect();
    // Never more than was kept, and every copy but those a new worker
    // makes before leaktrace attached to it. (Up to ~11% went missing
    // after a reload while each old worker's exit walked the kernel's
    // tables, holding up the event loop that attaches the new workers;
    // exits are now cleaned up in one pass per reading, and executable
    // mappings are registered as they appear: 4 of 4 runs, 8 new
    // workers, exact since; 97% leaves room for an attach that is late.)
    eprintln!("{test}: kept {kept:?}, served {want:?}");
    assert_eq!(
        kept.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{test}: copies kept by exactly the live workers:\n{all}"
    );
    for (pid, &(n, bytes)) in &kept {
        let (wn, wbytes) = want[pid];
        assert!(
            n <= wn && bytes == n * KEPT_BYTES && n * 100 >= wn * 97,
            "{test}: worker {pid} kept {n} copies ({bytes} B) of the {wn} ({wbytes} B) \
             it made, {KEPT_BYTES} B per /ffi request:\n{all}"
        );
    }

    // The buffer encrypt_payload returns is freed by app.lua: it never
    // shows as outstanding.
    let returned: Vec<&Value> = stacks_through(&r, "encrypt_payload")
        .into_iter()
        .filter(|s| functions(s)[0] == "encrypt_payload")
        .filter(|s| s["outstanding_bytes"].as_i64().unwrap_or(0) > 0)
        .collect();
    assert!(
        returned.is_empty(),
        "{test}: encrypt_payload's freed buffers show as outstanding:\n{all}"
    );
}

/// `-p MASTER` on a running nginx: the workers it has, the ones a reload
/// forks and the one the master forks after a crash.
#[test]
fn master_pid_traces_running_workers_and_reload() {
    check_ffi_reload("master_pid_traces_running_workers_and_reload", Find::Master);
}

/// `--comm nginx` before nginx starts: every worker as it appears,
/// including the respawned one.
#[test]
fn comm_nginx_follows_respawned_worker() {
    check_ffi_reload("comm_nginx_follows_respawned_worker", Find::Comm);
}

// ---------------------------------------------------------------------------
// Lua frames and Lua heap accounting (LuaJIT support, issue 15)

/// Every worker's Lua heap in KiB (`/count` after a full collection);
/// requests land on random workers, so ask until each has answered.
fn lua_heaps(nginx: &Nginx) -> BTreeMap<u32, f64> {
    let workers = nginx.workers();
    let mut heaps = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while workers.iter().any(|w| !heaps.contains_key(w)) {
        assert!(
            Instant::now() < deadline,
            "workers {workers:?} did not all answer /count: {heaps:?}"
        );
        let r = nginx.get("/count").expect("GET /count");
        assert_eq!(r.status, 200, "/count: {r:?}");
        let mut words = r.body.split_whitespace();
        let pid: u32 = words.next().and_then(|p| p.parse().ok()).expect("a pid");
        let kib: f64 = words.next().and_then(|k| k.parse().ok()).expect("KiB");
        heaps.insert(pid, kib);
    }
    heaps
}

/// Trace nginx through its master while a load thread requests `paths`
/// until shortly before the trace ends; the report and the tally. With
/// `heaps`, each worker's Lua heap after a full collection, asked once the
/// load stopped, while the trace still runs: the trace's last readings
/// then see the collections the heaps were measured after.
fn trace_load(
    test: &str,
    dir: &Path,
    nginx: &Nginx,
    paths: &'static [&'static str],
    heaps: Option<&mut BTreeMap<u32, f64>>,
) -> (Value, Tally) {
    let out_file = dir.join("report.json");
    let out_s = out_file.display().to_string();
    let secs = TRACE_S.to_string();
    let master = nginx.master().to_string();
    let tracer = Tracer::attach(&[
        "-p", &master, "-i", "1", "-d", &secs, "-n", "1000", "--format", "json", "-o", &out_s,
    ]);
    let end_load = Instant::now() + Duration::from_secs(TRACE_S - QUIET_S);
    let load = Load::start(nginx.port(), paths);
    thread::sleep(end_load.saturating_duration_since(Instant::now()));
    let tally = load.stop();
    if let Some(h) = heaps {
        *h = lua_heaps(nginx);
    }
    let fin = tracer.finish();
    assert!(fin.status.success(), "{test}: leaktrace failed: {fin:?}");
    let text = std::fs::read_to_string(&out_file)
        .unwrap_or_else(|e| panic!("{test}: no report in {out_s}: {e}\n{fin:?}"));
    let r = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{test}: {out_s} is not JSON ({e}):\n{text}"));
    assert!(
        tally.failures.is_empty(),
        "{test}: {} requests failed: {:?}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(10)]
    );
    let errors = serious_errors(&nginx.error_log(), &[]);
    assert!(errors.is_empty(), "{test}: nginx's error log: {errors:#?}");
    (r, tally)
}

/// Whether `frame` is a Lua frame of `function` (by name, as LuaJIT may
/// qualify it: `M.handle`) in a file named `file`.
fn is_lua_frame(frame: &Value, function: &str, file: &str) -> bool {
    frame["kind"] == "lua"
        && frame["function"]
            .as_str()
            .is_some_and(|n| n.contains(function))
        && frame["file"].as_str().is_some_and(|p| p.ends_with(file))
}

/// The Lua frames of `function` in `file` of `stack`.
fn lua_frames<'a>(stack: &'a Value, function: &str, file: &str) -> Vec<&'a Value> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .filter(|f| is_lua_frame(f, function, file))
        .collect()
}

/// A pure-Lua leak in two workers: one growing row for both, named at
/// the inserting line, with the bytes the workers' Lua heaps grew by; the
/// bounded cache does not grow and the churn holds nothing.
#[test]
fn lua_pure_leak_one_row_two_workers() {
    let test = "lua_pure_leak_one_row_two_workers";
    if !require_bpf(test) {
        return;
    }
    let _alone = one_nginx_at_a_time();
    let dir = work_dir(test);
    let lib = build_ffi_lib(&dir);
    let nginx = start_lua_nginx(&dir, 2, &lib);
    // Fill both workers' caches first: the heaps measured before and
    // after then differ by the leak alone.
    for _ in 0..400 {
        let r = nginx.get("/cache").expect("GET /cache");
        assert_eq!(r.status, 200, "{test}: /cache: {r:?}");
    }
    let before = lua_heaps(&nginx);
    let mut after = BTreeMap::new();
    let (r, tally) = trace_load(
        test,
        &dir,
        &nginx,
        &["/leak", "/cache", "/leak", "/churn"],
        Some(&mut after),
    );
    let all = summary(&r);
    let workers: BTreeSet<u32> = nginx.workers().into_iter().collect();
    assert_eq!(
        workers,
        before.keys().copied().collect(),
        "{test}: a worker changed during the trace"
    );
    let grown_bytes: f64 = workers
        .iter()
        .map(|w| (after[w] - before[w]) * 1024.0)
        .sum();
    eprintln!(
        "{test}: requests {:?}, Lua heaps {before:?} -> {after:?}",
        tally.ok
    );
    assert!(
        tally.ok.get("/leak").copied().unwrap_or(0) > 1000,
        "{test}: too few /leak requests: {:?}",
        tally.ok
    );

    let line = line_of(LEAKMOD, "-- LEAK");
    // The report's top row is the leak's. (Lua memory counts once it
    // survived a collection: the churn's garbage, which waits for a
    // collector that runs less often as the heap grows, cannot outrank
    // it.)
    let top = &r["stacks"][0];
    assert!(
        !lua_frames(top, "M.leak", "leakmod.lua").is_empty(),
        "{test}: the top stack is not through M.leak:\n{all}"
    );
    let at = lua_frames(top, "remember_request", "leakmod.lua");
    assert!(
        !at.is_empty(),
        "{test}: the leak's top stack has no Lua frame remember_request in leakmod.lua:\n{all}\n{top:#}"
    );
    assert_eq!(
        at[0]["line"].as_u64(),
        Some(line),
        "{test}: remember_request's frame is at the insert, leakmod.lua:{line}: {top:#}"
    );
    assert_eq!(top["trend"], "growing", "{test}: {}", top["samples"]);
    // The leak's rows: every stack through the handler `M.leak`. A JIT
    // trace inlines remember_request into M.leak; an allocation the trace
    // makes before the inlined code's first snapshot is at M.leak's call
    // line, and calls run before the trace was compiled have their own
    // (interpreter) rows.
    let stacks = r["stacks"].as_array().expect("stacks");
    let leak_rows: Vec<&Value> = stacks
        .iter()
        .filter(|s| !lua_frames(s, "M.leak", "leakmod.lua").is_empty())
        .collect();
    // One row per stack for both workers (a rare path may have run in
    // one worker only).
    assert_eq!(
        pids_of(leak_rows.first().expect("leak rows")),
        workers,
        "{test}: the leak's largest row holds both workers:\n{all}"
    );
    for s in &leak_rows {
        assert!(pids_of(s).is_subset(&workers), "{test}: {s:#}");
    }
    let bytes: f64 = leak_rows
        .iter()
        .map(|s| s["outstanding_bytes"].as_f64().expect("bytes"))
        .sum();
    eprintln!(
        "{test}: {} leak rows hold {bytes} B; the Lua heaps grew {grown_bytes} B",
        leak_rows.len()
    );
    assert!(
        (bytes - grown_bytes).abs() <= 0.10 * grown_bytes,
        "{test}: the workers' Lua heaps grew by {grown_bytes} B, leaktrace says {bytes} B:\n{all}"
    );

    // Lua memory counts once it survived a collection (garbage waiting
    // for the collector is not held), so the churn is absent from the
    // growing rows and holds next to nothing, and the bounded cache holds
    // at most its bound: 64 entries per worker, each a ~210-byte string
    // and its slots in two tables.
    for (f, what, bound) in [
        ("M.cache", "cache", 160 << 10),
        ("M.churn", "churn", 16 << 10),
    ] {
        let rows: Vec<&Value> = stacks
            .iter()
            .filter(|s| !lua_frames(s, f, "leakmod.lua").is_empty())
            .collect();
        let held = sum(&rows, "outstanding_bytes");
        eprintln!("{test}: {what} holds {held} B in {} rows", rows.len());
        assert!(
            held <= bound,
            "{test}: the {what} holds {held} B (at most {bound} expected):\n{all}"
        );
    }
    // (What survives of the churn is the JIT's: a trace keeps the
    // constants it was compiled with, a few KiB that may still rise as
    // traces are made; a growing row of that size is no leak.)
    let churning: Vec<&Value> = stacks
        .iter()
        .filter(|s| {
            s["trend"] == "growing"
                && !lua_frames(s, "M.churn", "leakmod.lua").is_empty()
                && s["outstanding_bytes"].as_f64().unwrap_or(0.0) * 100.0 >= bytes
        })
        .collect();
    assert!(
        churning.is_empty(),
        "{test}: churn among the growing rows:\n{all}"
    );
}

/// The FFI incident with Lua frames: the C frames of the stale library
/// first, then the Lua handler that called it.
#[test]
fn lua_ffi_leak_names_c_and_lua() {
    let test = "lua_ffi_leak_names_c_and_lua";
    if !require_bpf(test) {
        return;
    }
    let _alone = one_nginx_at_a_time();
    let dir = work_dir(test);
    let lib = build_ffi_lib(&dir);
    let nginx = start_lua_nginx(&dir, 2, &lib);
    let (r, tally) = trace_load(test, &dir, &nginx, &["/ffi"], None);
    let all = summary(&r);
    eprintln!("{test}: served {:?}", tally.served);
    let top = &r["stacks"][0];
    let names = functions(top);
    assert_eq!(
        names[..2],
        ["stale_copy_payload", "encrypt_payload"],
        "{test}: the top stack starts in the stale library:\n{all}"
    );
    let frames = top["frames"].as_array().expect("frames");
    let handle = frames
        .iter()
        .position(|f| is_lua_frame(f, "handle", "app.lua"))
        .unwrap_or_else(|| panic!("{test}: no Lua frame handle in app.lua: {top:#}"));
    assert!(
        handle > 1,
        "{test}: the Lua caller is outside the C frames: {names:?}"
    );
    assert_eq!(
        frames[handle]["line"].as_u64(),
        Some(line_of(APP, "-- FFI")),
        "{test}: handle's frame is at the FFI call: {top:#}"
    );
    assert_eq!(top["trend"], "growing", "{test}: {}", top["samples"]);
    let workers: BTreeSet<u32> = nginx.workers().into_iter().collect();
    assert_eq!(
        pids_of(top),
        workers,
        "{test}: one row for both workers:\n{all}"
    );
}

/// `lua_code_cache off` runs each request in a VM of its own, made after
/// attach and closed after the request: the report counts those VMs and
/// says their memory has native stacks only, and the worker keeps serving.
#[test]
fn per_request_vms_are_counted_and_named_in_a_note() {
    let test = "per_request_vms_are_counted_and_named_in_a_note";
    if !require_bpf(test) {
        return;
    }
    let _alone = one_nginx_at_a_time();
    let dir = work_dir(test);
    let nginx = Nginx::start(
        &dir.join("nginx"),
        Options {
            workers: 1,
            lua_dir: Some(lua_dir()),
            locations: "    location = /nocache { lua_code_cache off; content_by_lua_block { \
                        local t = {} for i = 1, 100 do t[i] = { i } end ngx.say(#t) } }\n"
                .to_string(),
            ..Options::default()
        },
    );
    let worker = nginx.workers()[0].to_string();
    let tracer = Tracer::attach(&["-p", &worker, "-i", "0", "--format", "json"]);
    for _ in 0..50 {
        let r = nginx.get("/nocache").expect("GET /nocache");
        assert_eq!((r.status, r.body.trim()), (200, "100"), "{test}: {r:?}");
    }
    let fin = tracer.interrupt();
    assert!(fin.status.success(), "{test}: {fin:?}");
    let r = fin.json();
    let vms = r["counters"]["lua_vms_after_attach"].as_u64().unwrap_or(0);
    assert!(
        vms >= 1,
        "{test}: no VM made after attach was counted: {}",
        r["counters"]
    );
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .map(|n| n.iter().filter_map(|n| n.as_str()).collect())
        .unwrap_or_default();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with(&format!("{vms} LuaJIT VM")) && n.contains("native stacks")),
        "{test}: no note on the VMs made after attach: {notes:#?}"
    );
}
