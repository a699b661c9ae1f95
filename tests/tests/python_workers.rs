//! End-to-end: a prefork Python worker pool (multiprocessing, fork) traced
//! through its master, the way a uwsgi or gunicorn service would be.
//!
//! `tests/fixtures/py_pool.py`: four workers each serve 400 requests that
//! leak into a module-level dict cache (`load_author_profiles`), fill a
//! bounded `functools.lru_cache` (`render_template`) and churn request
//! buffers (`handle_request`). leaktrace, attached to the master before the
//! workers exist, must follow the four forks, name `load_author_profiles`
//! at the leaking line as the top growing stack, as one row for all four
//! workers with the bytes their caches hold, classify the LRU as a plateau,
//! and show nothing outstanding for the churn. The same holds when the
//! workers already run when leaktrace attaches to the master (a uwsgi or
//! gunicorn pool in production): they are attached at start.

use std::path::{Path, PathBuf};

use leaktrace_tests::{functions, require_bpf, Fixture, Tracer};
use serde_json::Value;

const SCRIPT: &str = include_str!("../fixtures/py_pool.py");

fn script_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/py_pool.py")
}

/// 1-based line of the script holding `marker`.
fn line_of(marker: &str) -> u64 {
    SCRIPT
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in the script")) as u64
        + 1
}

/// Stacks with a Python frame `function` at `line`.
fn stacks_at<'a>(r: &'a Value, function: &str, line: u64) -> Vec<&'a Value> {
    r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| {
            s["frames"].as_array().expect("frames").iter().any(|f| {
                f["kind"] == "python"
                    && f["function"].as_str() == Some(function)
                    && f["line"].as_u64() == Some(line)
            })
        })
        .collect()
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

/// When the pool's workers are forked, relative to leaktrace's attach to
/// the master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workers {
    /// After: leaktrace follows the forks.
    ForkedLater,
    /// Before (the pool already serves): leaktrace attaches them at start.
    AlreadyRunning,
}

/// "forked 1,2,3" or "done 1,2,3 BYTES" -> the sorted pids.
fn pids_in(line: &str) -> Vec<u64> {
    let mut pids: Vec<u64> = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no worker pids in {line:?}"))
        .split(',')
        .map(|p| p.parse().expect("a pid"))
        .collect();
    pids.sort();
    pids
}

fn check_pool(test: &str, python: &str, when: Workers) {
    if !require_bpf(test) {
        return;
    }
    if !Path::new(python).exists() {
        eprintln!("skipping {test}: {python} is not installed");
        return;
    }
    let script = script_path();
    let script_s = script.display().to_string();
    let mut fx = Fixture::start(Path::new(python), &[&script_s]);
    let master = fx.pid().to_string();
    let running = (when == Workers::AlreadyRunning).then(|| {
        fx.send("fork");
        pids_in(&fx.expect_line("forked"))
    });
    let tracer = Tracer::attach(&[
        "-p",
        &master,
        "-i",
        "0",
        "--format",
        "json",
        "-n",
        "200",
        "--sample-every",
        "0.25",
    ]);
    fx.send("go");
    let line = fx.expect_line("done");
    let workers = pids_in(&line);
    if let Some(running) = &running {
        assert_eq!(
            running, &workers,
            "{test}: the workers forked before attach did the work"
        );
    }
    let mut words = line.split_whitespace().skip(2);
    let held: i64 = words
        .next()
        .and_then(|b| b.parse().ok())
        .expect("bytes held");
    let out = tracer.interrupt();
    fx.send("quit");
    assert!(out.status.success(), "{test}: leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);
    eprintln!(
        "{test}: {}",
        all.lines().take(2).collect::<Vec<_>>().join("; ")
    );
    if when == Workers::AlreadyRunning {
        let note = format!(": {} existing descendants traced", workers.len());
        assert!(
            r["notes"]
                .as_array()
                .expect("notes")
                .iter()
                .filter_map(Value::as_str)
                .any(|n| n.starts_with(&format!("process {master} (")) && n.ends_with(&note)),
            "{test}: the report says the workers were attached at start:\n{all}"
        );
    }

    // The leak: the top stack, one row for the four workers.
    let leak_line = line_of("# LEAK");
    let leak = stacks_at(&r, "load_author_profiles", leak_line);
    assert_eq!(
        leak.len(),
        1,
        "{test}: want one load_author_profiles:{leak_line} stack:\n{all}"
    );
    let leak = leak[0];
    assert_eq!(
        functions(&r["stacks"][0]),
        functions(leak),
        "{test}: the leak is the top growing stack:\n{all}"
    );
    let mut pids: Vec<u64> = leak["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .map(|p| p.as_u64().expect("pid"))
        .collect();
    pids.sort();
    assert_eq!(pids, workers, "{test}: the row holds every worker:\n{all}");
    assert_eq!(leak["trend"], "growing", "{test}: {}", leak["samples"]);
    let bytes = leak["outstanding_bytes"].as_i64().expect("bytes");
    assert!(
        (bytes - held).abs() as f64 <= 0.01 * held as f64,
        "{test}: the caches hold {held} B, leaktrace says {bytes} B:\n{all}"
    );
    let frame = leak["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .find(|f| f["function"] == "load_author_profiles")
        .expect("the frame");
    assert_eq!(frame["file"].as_str(), Some(script_s.as_str()));

    // The bounded LRU: a plateau at its size.
    let lru = stacks_at(&r, "render_template", line_of("# LRU"));
    assert_eq!(
        lru.len(),
        1,
        "{test}: want one render_template stack:\n{all}"
    );
    assert_eq!(
        lru[0]["trend"], "plateau",
        "{test}: render_template: {}",
        lru[0]["samples"]
    );

    // The churn: freed at the end of every request.
    for s in stacks_at(&r, "handle_request", line_of("# CHURN")) {
        assert!(
            s["outstanding_bytes"].as_i64().unwrap_or(0) < 64 * 1024,
            "{test}: request buffers are freed:\n{all}"
        );
    }
}

#[test]
fn distro_python_worker_pool_leak_is_one_growing_row() {
    check_pool(
        "distro_python_worker_pool_leak_is_one_growing_row",
        "/usr/bin/python3.11",
        Workers::ForkedLater,
    );
}

#[test]
fn pyenv_python_worker_pool_leak_is_one_growing_row() {
    check_pool(
        "pyenv_python_worker_pool_leak_is_one_growing_row",
        "/root/.pyenv/versions/3.11.7/bin/python3.11",
        Workers::ForkedLater,
    );
}

/// The uwsgi incident's shape: `-p MASTER` on a pool whose workers are
/// already running must trace them, not report nothing outstanding.
#[test]
fn distro_python_pool_running_before_attach_is_traced_through_its_master() {
    check_pool(
        "distro_python_pool_running_before_attach_is_traced_through_its_master",
        "/usr/bin/python3.11",
        Workers::AlreadyRunning,
    );
}

#[test]
fn pyenv_python_pool_running_before_attach_is_traced_through_its_master() {
    check_pool(
        "pyenv_python_pool_running_before_attach_is_traced_through_its_master",
        "/root/.pyenv/versions/3.11.7/bin/python3.11",
        Workers::AlreadyRunning,
    );
}

/// `--pymalloc`: every object counted at pymalloc's own entry points, so a
/// leak of small objects shows as objects (here 20,000 instances of a
/// slotted class, 40 bytes each as `sys.getsizeof` says) rather than as
/// the 1 MiB arenas pymalloc maps for them. On pyenv's shared libpython,
/// where the interpreter calls the exported `PyObject_Malloc`.
#[test]
fn pymalloc_mode_counts_small_objects_exactly() {
    const TEST: &str = "pymalloc_mode_counts_small_objects_exactly";
    const SCRIPT: &str = r#"import sys
class Rec:
    __slots__ = ("a",)
keep = []
def make_records(n):
    for i in range(n):
        keep.append(Rec())  # OBJ
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "go":
        make_records(20000)
        print("done", sys.getsizeof(Rec()), flush=True)
"#;
    if !require_bpf(TEST) {
        return;
    }
    let python = "/root/.pyenv/versions/3.11.7/bin/python3.11";
    if !Path::new(python).exists() {
        eprintln!("skipping {TEST}: {python} is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("leaktrace-pymalloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the script directory");
    let script = dir.join("objs.py");
    std::fs::write(&script, SCRIPT).expect("write the script");
    let script_s = script.display().to_string();
    let line = SCRIPT
        .lines()
        .position(|l| l.contains("# OBJ"))
        .expect("marker") as u64
        + 1;
    let run = |extra: &[&str]| -> Value {
        let mut fx = Fixture::start(Path::new(python), &[&script_s]);
        let pid = fx.pid().to_string();
        let mut args = vec![
            "-p",
            pid.as_str(),
            "-i",
            "0",
            "--format",
            "json",
            "-n",
            "50",
        ];
        args.extend_from_slice(extra);
        let tracer = Tracer::attach(&args);
        fx.send("go");
        let done = fx.expect_line("done");
        assert_eq!(done.split_whitespace().nth(1), Some("40"), "{TEST}: {done}");
        let out = tracer.interrupt();
        assert!(out.status.success(), "{TEST}: leaktrace failed: {out:?}");
        out.json()
    };

    let exact = run(&["--pymalloc"]);
    let objs = stacks_at(&exact, "make_records", line);
    let all = summary(&exact);
    let records: Vec<&&Value> = objs
        .iter()
        .filter(|s| s["outstanding_allocs"].as_i64() == Some(20000))
        .collect();
    assert_eq!(
        records.len(),
        1,
        "{TEST}: want one stack holding the 20,000 objects:\n{all}"
    );
    assert_eq!(
        records[0]["outstanding_bytes"].as_i64(),
        Some(20000 * 40),
        "{TEST}:\n{all}"
    );

    // Without it the same objects are the arena pymalloc mapped for them.
    let arenas = run(&[]);
    let all = summary(&arenas);
    assert!(
        stacks_at(&arenas, "make_records", line)
            .iter()
            .all(|s| s["outstanding_allocs"].as_i64().unwrap_or(0) < 100),
        "{TEST}: without --pymalloc objects are not counted one by one:\n{all}"
    );
    assert!(
        arenas["stacks"]
            .as_array()
            .expect("stacks")
            .iter()
            .any(|s| functions(s).iter().any(|f| f == "_PyObject_ArenaMmap")),
        "{TEST}: the arena's mmap is attributed:\n{all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
