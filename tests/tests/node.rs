//! Node mode end to end: `leaktrace node` watches every process on the
//! machine, and processes started after it are found, classified and
//! explained by stack without any allocator probe (tier 1: page faults
//! and mmap/brk); an OOM kill leaves a report; Prometheus scrapes
//! `/metrics`; bad input is one line and exit 2.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use leaktrace_tests::{
    compile_c_fixture, fixture_dir, functions, require_bpf, Fixture, Go, TestCgroup, Tracer,
};
use serde_json::Value;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("leaktrace-node-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// Start `leaktrace node args...` and wait until it watches.
fn node(args: &[&str]) -> Tracer {
    let mut full = vec!["node"];
    full.extend_from_slice(args);
    let mut t = Tracer::spawn(&full);
    if t.wait_stderr("leaktrace: watching", Duration::from_secs(120))
        .is_none()
    {
        panic!("node mode never started: {:?}", t.finish());
    }
    t
}

fn process(r: &Value, pid: u32) -> &Value {
    r["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
        .unwrap_or_else(|| panic!("process {pid} not in the node report: {r:#}"))
}

/// The process's first stack in report order (growing first, by rate).
fn top_stack_of(r: &Value, pid: u32) -> &Value {
    r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .find(|s| {
            s["pids"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p.as_u64() == Some(u64::from(pid))))
        })
        .unwrap_or_else(|| panic!("no stack of process {pid}: {r:#}"))
}

fn names(stack: &Value) -> String {
    functions(stack).join(" <- ")
}

/// A C leak, a Python cache leak and a Go leak, started after node mode,
/// are growing, each with its leaking function in its top growth stack; a
/// bounded cache is not growing, nor is a churning process.
#[test]
fn node_mode_explains_leaks_started_after_it() {
    if !require_bpf("node_mode_explains_leaks_started_after_it") {
        return;
    }
    let dir = tmp("leaks");
    std::fs::create_dir_all(dir.join("node")).expect("fixture dir");
    let bin = compile_c_fixture("node/node_leak", &dir);
    let (_go_dir, go_bin) = Go::installed().build(
        "node",
        "node_go_leak",
        include_str!("../fixtures/node/node_leak.go"),
        &[],
        false,
    );
    let json = dir.join("node.json");
    let tracer = node(&[
        "-d",
        "45",
        "--sample-every",
        "1",
        "--no-drill",
        "--format",
        "json",
        "-o",
        json.to_str().expect("utf-8"),
    ]);
    let mut leak = Fixture::start(&bin, &["leak"]);
    let mut cache = Fixture::start(&bin, &["cache"]);
    let mut churn = Fixture::start(&bin, &["churn"]);
    let script = fixture_dir().join("node/node_cache.py");
    let mut py = Fixture::start(
        Path::new("/usr/bin/python3"),
        &[script.to_str().expect("utf-8")],
    );
    let mut go = Fixture::start(&go_bin, &[]);
    for f in [&mut leak, &mut cache, &mut churn, &mut py, &mut go] {
        f.send("go");
    }
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    assert_eq!(r["schema"], "leaktrace.node/v1");
    for (fx, function, what) in [
        (&leak, "leak_request", "C"),
        (&py, "remember", "Python"),
        (&go, "main.leakRequest", "Go"),
    ] {
        let p = process(&r, fx.pid());
        assert_eq!(p["trend"], "growing", "{what} leak not growing: {p:#}");
        let top = top_stack_of(&r, fx.pid());
        assert!(
            functions(top).iter().any(|f| f == function),
            "{what} leak's top growth stack does not name {function}: {} ({})",
            names(top),
            top["source"]
        );
    }
    let c = process(&r, cache.pid());
    assert_ne!(c["trend"], "growing", "the bounded cache: {c:#}");
    let ch = process(&r, churn.pid());
    assert_ne!(ch["trend"], "growing", "the churning process: {ch:#}");
    for s in r["stacks"].as_array().expect("stacks") {
        let source = s["source"].as_str().unwrap_or("");
        assert!(
            ["page_fault", "mmap", "allocator", "go_runtime"].contains(&source),
            "{s:#}"
        );
    }
    let me = &r["leaktrace"];
    eprintln!(
        "leaktrace cost {:.3}% of a core, peak {:.3}%, RSS {} MiB, {} processes",
        me["cpu_share"].as_f64().unwrap_or(-1.0) * 100.0,
        me["peak_share"].as_f64().unwrap_or(-1.0) * 100.0,
        me["rss_bytes"].as_u64().unwrap_or(0) >> 20,
        me["watched_processes"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A memory-limited cgroup's process is OOM-killed while node mode runs:
/// the OOM report exists, names the victim and its growth stack.
#[test]
fn node_mode_oom_kill_leaves_a_report() {
    if !require_bpf("node_mode_oom_kill_leaves_a_report") {
        return;
    }
    let dir = tmp("oom");
    let bin = compile_c_fixture("oom_hoard", &dir);
    let cg = TestCgroup::new(
        &format!("leaktrace-test-node-oom-{}", std::process::id()),
        Some(64 << 20),
    );
    let oom_dir = dir.join("oom");
    let tracer = node(&[
        "-d",
        "20",
        "--sample-every",
        "1",
        "--no-drill",
        "--oom-dir",
        oom_dir.to_str().expect("utf-8"),
        "--format",
        "json",
    ]);
    let mut fx = Fixture::start(&bin, &[]);
    cg.add(fx.pid());
    // Let the next reading see it in its cgroup.
    std::thread::sleep(Duration::from_secs(2));
    fx.send("go");
    let st = fx.wait_exit();
    assert!(!st.success(), "meant to be OOM-killed: {st:?}");
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("the OOM killer chose process {}", fx.pid())),
        "{}",
        out.stderr
    );
    let report = std::fs::read_dir(&oom_dir)
        .expect("oom dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.to_string_lossy().contains(&format!("-{}-", fx.pid()))
        })
        .expect("an OOM report for the victim");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("read")).expect("json");
    assert_eq!(r["schema"], "leaktrace.node/v1");
    assert_eq!(r["oom_kills"][0]["pid"].as_u64(), Some(u64::from(fx.pid())));
    let facts = r["notes"].to_string();
    let want = if cg.v2 { "memory.max" } else { "memory cgroup" };
    assert!(facts.contains(want), "no cgroup facts: {facts}");
    let top = &r["stacks"][0];
    assert!(
        functions(top).iter().any(|f| f == "hoard_sessions"),
        "the victim's top growth stack is not the leak: {r:#}"
    );
    let final_report: Value = out.json();
    assert!(
        final_report["oom_kills"].as_array().is_some_and(|k| k
            .iter()
            .any(|k| k["pid"].as_u64() == Some(u64::from(fx.pid())))),
        "{final_report:#}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A free port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// Prometheus (Debian's package) scrapes node mode's `/metrics` for a
/// minute: the leaking process's series rises, and the number of series
/// stays bounded while 1,000 short-lived processes come and go.
#[test]
fn prometheus_scrapes_node_metrics() {
    if !require_bpf("prometheus_scrapes_node_metrics") {
        return;
    }
    let prometheus = Path::new("/usr/bin/prometheus");
    assert!(
        prometheus.exists(),
        "Debian's prometheus is needed (cargo xtask test installs it)"
    );
    let dir = tmp("prom");
    std::fs::create_dir_all(dir.join("node")).expect("fixture dir");
    let bin = compile_c_fixture("node/node_leak", &dir);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let tracer = node(&[
        "-d",
        "75",
        "--sample-every",
        "1",
        "--no-drill",
        "--listen",
        &listen,
        "--format",
        "json",
    ]);
    let mut leak = Fixture::start(&bin, &["leak"]);
    leak.send("go");
    let prom_port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\nscrape_configs:\n  - job_name: leaktrace\n    static_configs:\n      - targets: ['{listen}']\n"
        ),
    )
    .expect("prometheus config");
    let mut prom = leaktrace_tests::Guard(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    // 1,000 short-lived processes while Prometheus scrapes.
    let churn_until = Instant::now() + Duration::from_secs(40);
    let mut started = 0;
    while Instant::now() < churn_until && started < 1000 {
        let _ = Command::new("/bin/true").status();
        started += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    std::thread::sleep(Duration::from_secs(20));
    let prom_addr = format!("127.0.0.1:{prom_port}");
    let query = |q: &str| -> Value {
        let path = format!("/api/v1/query?query={}", urlencode(q));
        let resp = http_get(&prom_addr, &path);
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{q}: {e}: {resp}"))
    };
    let up = query("up{job=\"leaktrace\"}");
    assert_eq!(
        up["data"]["result"][0]["value"][1], "1",
        "prometheus cannot scrape leaktrace: {up:#}"
    );
    let pid = leak.pid();
    let series = format!("leaktrace_process_anon_bytes{{pid=\"{pid}\"}}");
    let rise = query(&format!("delta({series}[50s])"));
    let delta: f64 = rise["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series for the leak: {rise:#}"));
    assert!(
        delta > 1_000_000.0,
        "the leak's series did not rise: {rise:#}"
    );
    let count = query("count({__name__=~\"leaktrace_.*\"})");
    let n: f64 = count["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("series count");
    let ever = query("count(last_over_time({__name__=~\"leaktrace_.*\"}[70s]))");
    let n_ever: f64 = ever["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("series count over the minute: {ever:#}"));
    eprintln!("{started} short-lived processes; {n} series now, {n_ever} over the minute");
    assert!(
        n_ever < 2000.0,
        "series grew with short-lived processes: {n_ever}"
    );
    let direct = http_get(&listen, "/metrics");
    assert!(direct.contains("text/plain"), "{direct}");
    let _ = prom.0.kill();
    let out = tracer.interrupt();
    assert!(out.status.success(), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn assert_exit_2(out: &leaktrace_tests::Finished, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("leaktrace:"))
        .collect();
    assert_eq!(lines.len(), 1, "not one line: {}", out.stderr);
    assert!(lines[0].contains(needle), "{needle} not in {}", lines[0]);
}

/// Unknown cgroup, unwritable --out, a port in use, no BPF permission:
/// one clear line each, exit 2, before anything is watched.
#[test]
fn node_mode_bad_input() {
    if !require_bpf("node_mode_bad_input") {
        return;
    }
    let out = Tracer::spawn(&["node", "--cgroup", "/leaktrace-no-such-cgroup", "-d", "1"]).finish();
    assert_exit_2(&out, "/leaktrace-no-such-cgroup");
    let out = Tracer::spawn(&["node", "--out", "/proc/leaktrace-nowhere", "-d", "1"]).finish();
    assert_exit_2(&out, "/proc/leaktrace-nowhere");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = Tracer::spawn(&["node", "--listen", &addr, "-d", "1"]).finish();
    assert_exit_2(&out, &addr);
    let out = Tracer::spawn_cmd(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(leaktrace_tests::leaktrace_bin())
            .args(["node", "-d", "1"]),
    )
    .finish();
    assert_exit_2(&out, "root");
}
