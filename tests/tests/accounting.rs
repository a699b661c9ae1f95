//! End-to-end: exact accounting, every process that matters, growth.
//!
//! Real C processes (`fixtures/*.c`, built by `build.rs` with frame
//! pointers) traced by the real binary:
//! - anonymous mmap/munmap/mremap and sbrk made by hand are counted to the
//!   page (to the byte for the break), and glibc's own mmap for a large
//!   malloc is counted once, as the malloc;
//! - a leak, a capped cache and request churn get `growing`, `plateau`
//!   and nothing outstanding;
//! - workers of a pre-forking master are followed by pid, by name and by
//!   cgroup, merged into one row per stack, and a killed worker's memory
//!   leaves the totals; forks and exits are still followed after the
//!   process event socket overran; workers that run before leaktrace
//!   attaches to their master are traced from the start, and
//!   `--no-children` traces neither them nor later forks;
//! - a library loaded with dlopen after attach, and a custom allocator
//!   under `--allocator-prefix`, are counted once;
//! - two threads at full speed do not cost a byte of the known leak, and
//!   every loss is counted;
//! - `--min-age` hides what is younger than its age.
//!
//! The load and growth tests run alone (see [`TURNS`]); tests that check
//! different things in one trace share it. No test asserts on time: waits
//! only guard against hangs.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use leaktrace_tests::{
    fixture, functions, leaktrace_bin, require_bpf, stacks_from, stacks_through, sum, Fixture,
    Guard, TestCgroup, Tracer,
};
use serde_json::Value;

/// Every loss counter of the report (`Counter::is_loss` in
/// tracer-common); `totals.lost_events` is their sum.
const LOSS_COUNTERS: &[&str] = &[
    "allocs_map_full",
    "stack_totals_map_full",
    "pending_displaced",
    "stack_collisions",
    "stacks_lost",
    "missing_entry",
    "missing_return",
    "stale_replaced",
    "syscall_events_lost",
];

/// This machine has two CPUs: the full-speed load test would starve the
/// other tests' fixtures and samplers, and the growth test's series should
/// not depend on what runs next to it, so those two run alone; the others
/// may share the machine.
static TURNS: RwLock<()> = RwLock::new(());

fn alone() -> RwLockWriteGuard<'static, ()> {
    TURNS.write().unwrap_or_else(|e| e.into_inner())
}

fn shared() -> RwLockReadGuard<'static, ()> {
    TURNS.read().unwrap_or_else(|e| e.into_inner())
}

/// A report's stacks, one line each, for failure messages.
fn summary(r: &Value) -> String {
    r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .map(|s| {
            format!(
                "{} bytes / {} allocs, {} pids {} : {}",
                s["outstanding_bytes"],
                s["outstanding_allocs"],
                s["trend"],
                s["pids"],
                functions(s).join(" < ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn counter(r: &Value, name: &str) -> u64 {
    r["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name:?} in {}", r["counters"]))
}

// ---------------------------------------------------------------------------
// 1. Anonymous memory made outside the allocator

/// `fixtures/sys_regions.c`: what each function still holds.
const LEAK_MMAP_BYTES: i64 =
    5 * (256 * 1024 - 4096) + 5 * (256 * 1024 - 64 * 1024) + 8 * 256 * 1024;
/// 5 split in two, 5 trimmed, 8 whole.
const LEAK_MMAP_PIECES: i64 = 5 * 2 + 5 + 8;
const LEAK_MMAP_ODD_BYTES: i64 = 3 * 12288;
/// The moved 1 MiB, the 4 KiB left behind, the grown 256 KiB.
const GROW_MREMAP_BYTES: i64 = 1024 * 1024 + 4096 + 256 * 1024;
const GROW_SBRK_BYTES: i64 = 20000 + 12000 - 2000;
const BIG_MALLOC_BYTES: i64 = 4 * 1024 * 1024;
const SHARED_ZONE_BYTES: i64 = 512 * 1024;

#[test]
fn anonymous_regions_are_exact_and_malloc_mmaps_count_once() {
    if !require_bpf("anonymous_regions_are_exact_and_malloc_mmaps_count_once") {
        return;
    }
    let _turn = shared();
    let mut fx = Fixture::start(&fixture("sys_regions"), &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "1000"]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);

    let expect = [
        ("leak_mmap", LEAK_MMAP_BYTES, LEAK_MMAP_PIECES),
        ("leak_mmap_odd", LEAK_MMAP_ODD_BYTES, 3),
        ("grow_mremap", GROW_MREMAP_BYTES, 3),
        ("grow_sbrk", GROW_SBRK_BYTES, 2),
    ];
    for (func, bytes, pieces) in expect {
        let stacks = stacks_through(&r, func);
        assert_eq!(
            sum(&stacks, "outstanding_bytes"),
            bytes,
            "{func}: wrong outstanding bytes; stacks:\n{all}"
        );
        assert_eq!(
            sum(&stacks, "outstanding_allocs"),
            pieces,
            "{func}: wrong number of regions; stacks:\n{all}"
        );
        for s in &stacks {
            let names = functions(s);
            let at = names.iter().position(|f| f == func).expect("through func");
            assert!(
                s["frames"][0]["module"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("libc.so.6")),
                "{func}: the innermost frame should be libc's syscall wrapper: {names:?}"
            );
            assert_eq!(
                names.get(at + 1).map(String::as_str),
                Some("main"),
                "{func}: its caller is missing: {names:?}"
            );
        }
    }

    // glibc serves malloc(1 MiB) with its own mmap: one block each, under
    // malloc's stack, not a second time as a region.
    let big = stacks_through(&r, "big_malloc");
    assert_eq!(
        sum(&big, "outstanding_bytes"),
        BIG_MALLOC_BYTES,
        "big_malloc counted wrong; stacks:\n{all}"
    );
    assert_eq!(sum(&big, "outstanding_allocs"), 4, "stacks:\n{all}");
    for s in &big {
        assert_eq!(
            s["frames"][0]["function"],
            "big_malloc",
            "malloc's own mmap was counted as a region: {:?}",
            functions(s)
        );
    }

    // A shared anonymous mapping is its own row, labelled as shared.
    let shared = stacks_through(&r, "shared_zone");
    assert_eq!(
        sum(&shared, "outstanding_bytes"),
        SHARED_ZONE_BYTES,
        "{all}"
    );
    for s in &shared {
        assert!(
            s["frames"][0]["function"]
                .as_str()
                .is_some_and(|f| f.starts_with("[shared memory")),
            "the shared zone's row is not labelled shared: {:?}",
            functions(s)
        );
    }

    for gone in ["churn_mmap", "trim_regions"] {
        assert!(
            stacks_through(&r, gone).is_empty(),
            "{gone} holds nothing, yet it is reported; stacks:\n{all}"
        );
    }
    let everything = LEAK_MMAP_BYTES
        + LEAK_MMAP_ODD_BYTES
        + GROW_MREMAP_BYTES
        + GROW_SBRK_BYTES
        + BIG_MALLOC_BYTES
        + SHARED_ZONE_BYTES;
    assert_eq!(
        r["totals"]["outstanding_bytes"].as_i64(),
        Some(everything),
        "something else was counted, or something twice; stacks:\n{all}"
    );
    assert_eq!(r["totals"]["lost_events"], 0, "{}", r["counters"]);
}

// ---------------------------------------------------------------------------
// 2. Growth: a leak, a cache that fills, churn

#[test]
fn trend_tells_a_leak_from_a_cache_and_churn() {
    if !require_bpf("trend_tells_a_leak_from_a_cache_and_churn") {
        return;
    }
    let _turn = alone();
    let mut fx = Fixture::start(&fixture("trend_mix"), &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&[
        "-p",
        &pid,
        "-i",
        "0",
        "--format",
        "json",
        "-n",
        "1000",
        "--sample-every",
        "0.25",
        "-d",
        "6",
    ]);
    fx.send("go");
    fx.expect("started");
    let out = tracer.finish();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);
    let one = |func: &str| -> Value {
        let s = stacks_from(&r, func);
        assert_eq!(s.len(), 1, "want one {func} stack; stacks:\n{all}");
        s[0].clone()
    };
    let series = |s: &Value| s["samples"].to_string();

    let leak = one("leak_forever");
    assert_eq!(
        leak["trend"],
        "growing",
        "leak_forever: samples {}",
        series(&leak)
    );
    assert_eq!(
        leak["outstanding_bytes"].as_i64(),
        leak["outstanding_allocs"].as_i64().map(|n| n * 4096),
        "leak_forever keeps 4 KiB blocks"
    );

    let cache = one("lru_cache_put");
    assert_eq!(
        cache["trend"],
        "plateau",
        "lru_cache_put: samples {}",
        series(&cache)
    );
    assert_eq!(
        cache["outstanding_bytes"],
        30 * 2048,
        "the LRU holds 30 entries"
    );
    assert_eq!(cache["outstanding_allocs"], 30);

    for s in stacks_through(&r, "request_churn") {
        assert!(
            s["trend"] == "churn" || s["trend"] == "steady",
            "request_churn: {} with samples {}",
            s["trend"],
            series(s)
        );
    }
    assert_eq!(
        r["stacks"][0]["frames"][0]["function"], "leak_forever",
        "the default sort (growth) puts the leak first; stacks:\n{all}"
    );
}

// ---------------------------------------------------------------------------
// 3. Pre-forking workers: by pid, by name, by cgroup

/// How the test names the processes to trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Select {
    /// `-p MASTER`: attached before the workers fork.
    Pid,
    /// `--comm NAME`: attached once the workers run and carry the name.
    Comm,
    /// `--cgroup PATH` holding the master: attached before they fork.
    Cgroup,
}

/// "worker PID SLOT forked" -> (pid, slot).
fn forked(line: &str) -> (u32, usize) {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["worker", pid, slot, "forked"] => (
            pid.parse().expect("worker pid"),
            slot.parse().expect("worker slot"),
        ),
        _ => panic!("not a worker start line: {line:?}"),
    }
}

/// What `forking_master.c` leaks from a worker in `slot`.
fn worker_bytes(slot: usize) -> i64 {
    10 * (slot as i64 + 1) * 1000
}

/// leaktrace's log line when process events were lost and it read /proc
/// instead (`run.rs`); processes it finds that way are not logged.
const RESCAN: &str = "rescanning /proc";

/// How many times leaktrace has rescanned /proc, as far as read.
fn rescans(tracer: &Tracer) -> usize {
    tracer
        .stderr_lines()
        .iter()
        .filter(|l| l.contains(RESCAN))
        .count()
}

/// Whether leaktrace has taken `pid` in: listed when it attached, followed
/// when it forked (its log says so), or found by a rescan of /proc after
/// `rescans_then`, the count read once `pid` existed. Meaningful once
/// [`settle`] has returned.
fn taken_in(tracer: &Tracer, pid: u32, rescans_then: usize) -> bool {
    let listed = format!(" {pid} (");
    let following = format!("following child {pid} of");
    tracer
        .stderr_lines()
        .iter()
        .any(|l| (l.contains("attached to") && l.contains(&listed)) || l.contains(&following))
        || rescans(tracer) > rescans_then
}

/// Wait until leaktrace has handled every process event so far: `via`, a
/// traced process, forks a helper, and leaktrace's "following child" line
/// for it comes after everything before that fork, the rescan of /proc
/// that makes up for lost events included. A rescan says so before it
/// runs and not when it is done, so after one the marker is sent again.
fn settle(tracer: &mut Tracer, fx: &mut Fixture, via: u32, guard: Duration) {
    for _ in 0..5 {
        let before = rescans(tracer);
        fx.send(&format!("probe {via}"));
        let line = fx.expect_line(&format!(" of {via}"));
        let helper: u32 = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("not a helper line: {line:?}"));
        let following = format!("following child {helper} of");
        let deadline = std::time::Instant::now() + guard;
        loop {
            if tracer.stderr_lines().iter().any(|l| l.contains(&following)) {
                return;
            }
            if rescans(tracer) > before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "helper {helper} of traced process {via} was never followed: {:#?}",
                tracer.stderr_lines()
            );
            tracer.wait_stderr(&following, Duration::from_millis(100));
        }
    }
    panic!(
        "process events kept overrunning: {:#?}",
        tracer.stderr_lines()
    );
}

fn workers_are_followed(select: Select) {
    const LONG: Duration = Duration::from_secs(60);
    let name = match select {
        Select::Pid => "lt-wk-pid",
        Select::Comm => "lt-wk-comm",
        Select::Cgroup => "lt-wk-cgroup",
    };
    // Declared before the fixture, so it is removed after the processes.
    let cgroup = (select == Select::Cgroup).then(|| {
        TestCgroup::new(
            &format!("leaktrace-test-workers-{}", std::process::id()),
            None,
        )
    });
    let mut fx = Fixture::start(&fixture("forking_master"), &[name]);
    let master = fx.pid();
    let master_s = master.to_string();
    let common = ["-i", "0", "--format", "json", "-n", "1000"];
    let cgroup_path = cgroup
        .as_ref()
        .map(|c| c.dir.display().to_string())
        .unwrap_or_default();
    if let Some(c) = &cgroup {
        c.add(master);
    }
    let selector: Vec<&str> = match select {
        Select::Pid => vec!["-p", &master_s],
        Select::Comm => vec!["--comm", name],
        Select::Cgroup => vec!["--cgroup", &cgroup_path],
    };
    let args: Vec<&str> = selector.iter().chain(common.iter()).copied().collect();

    // By pid and by cgroup: attached before the workers fork ("later").
    let mut early = (select != Select::Comm).then(|| Tracer::attach(&args));
    fx.send("go");
    // slot -> (pid, bytes it leaked)
    let mut workers: BTreeMap<usize, (u32, i64)> = BTreeMap::new();
    for _ in 0..3 {
        let (pid, slot) = forked(&fx.expect_line("forked"));
        workers.insert(slot, (pid, 0));
    }
    if let Some(t) = early.as_mut() {
        let then = rescans(t);
        settle(t, &mut fx, master, LONG);
        for (pid, _) in workers.values() {
            assert!(
                taken_in(t, *pid, then),
                "{select:?}: worker {pid} was never followed: {:#?}",
                t.stderr_lines()
            );
        }
    }
    for (pid, _) in workers.values() {
        fx.send(&format!("name {pid}"));
        fx.expect(&format!("worker {pid} named"));
    }
    // By name: attached once the workers run under it ("now").
    let mut tracer = early.take().unwrap_or_else(|| Tracer::attach(&args));
    for (pid, _) in workers.values() {
        assert!(
            taken_in(&tracer, *pid, usize::MAX),
            "{select:?}: worker {pid} is not traced: {:#?}",
            tracer.stderr_lines()
        );
    }
    for (slot, (pid, bytes)) in workers.iter_mut() {
        fx.send(&format!("leak {pid}"));
        fx.expect(&format!("worker {pid} leaked"));
        *bytes = worker_bytes(*slot);
    }

    // Kill one; the master forks a replacement, which names itself later.
    let (&victim_slot, &(victim, _)) = workers.iter().nth(1).expect("three workers");
    // SAFETY: kill(2) on a worker of our own fixture.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    fx.expect(&format!("respawned {victim}"));
    let (fresh, slot) = forked(&fx.expect_line("forked"));
    let rescans_at_fresh = rescans(&tracer);
    assert_eq!(
        slot, victim_slot,
        "the master refills the dead worker's slot"
    );
    workers.insert(slot, (fresh, 0));
    assert!(
        tracer
            .wait_stderr(&format!("process {victim} ("), LONG)
            .is_some_and(|l| l.contains("exited")),
        "{select:?}: leaktrace never saw worker {victim} exit: {:#?}",
        tracer.stderr_lines()
    );
    // By name the master is not traced: a worker that is makes the marker.
    let via = match select {
        Select::Comm => workers[&0].0,
        Select::Pid | Select::Cgroup => master,
    };
    settle(&mut tracer, &mut fx, via, LONG);
    let fresh_taken_in = taken_in(&tracer, fresh, rescans_at_fresh);
    fx.send(&format!("name {fresh}"));
    fx.expect(&format!("worker {fresh} named"));
    if select == Select::Comm {
        // Renamed after the fork: leaktrace takes it in on the name change.
        assert!(
            fresh_taken_in
                || tracer
                    .wait_stderr(&format!("following {fresh}: renamed"), LONG)
                    .is_some(),
            "{select:?}: renamed worker {fresh} never taken in: {:#?}",
            tracer.stderr_lines()
        );
    } else {
        assert!(
            fresh_taken_in,
            "{select:?}: replacement worker {fresh} not followed when it forked: {:#?}",
            tracer.stderr_lines()
        );
    }
    fx.send(&format!("leak {fresh}"));
    fx.expect(&format!("worker {fresh} leaked"));
    workers.insert(slot, (fresh, worker_bytes(slot)));

    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);
    let status = |pid: u32| -> Option<String> {
        r["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .find(|t| t["pid"].as_u64() == Some(pid as u64))
            .and_then(|t| t["status"].as_str().map(str::to_string))
    };

    assert_eq!(
        status(victim).as_deref(),
        Some("exited"),
        "{select:?}: killed worker {victim}; targets {}",
        r["targets"]
    );
    let rows = stacks_from(&r, "worker_leak");
    assert!(
        rows.iter().all(|s| {
            let pids = s["pids"].as_array().expect("pids");
            !pids.iter().any(|p| p.as_u64() == Some(victim as u64))
        }),
        "{select:?}: killed worker {victim} still holds memory; stacks:\n{all}"
    );
    for (slot, (pid, _)) in &workers {
        assert_eq!(
            status(*pid).as_deref(),
            Some("running"),
            "{select:?}: worker {pid} (slot {slot}{}) is not traced; targets {}",
            if *pid == fresh {
                format!(
                    ", the replacement for {victim}: forked as lt-master, \
                     named {name} with prctl once leaktrace had seen the fork"
                )
            } else {
                String::new()
            },
            r["targets"]
        );
    }

    assert_eq!(
        rows.len(),
        1,
        "{select:?}: want one worker_leak row:\n{all}"
    );
    let row = rows[0];
    let mut want_pids: Vec<u64> = workers.values().map(|(p, _)| *p as u64).collect();
    want_pids.sort_unstable();
    let got_pids: Vec<u64> = row["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(got_pids, want_pids, "{select:?}: pids of the row:\n{all}");
    let want_bytes: i64 = workers.values().map(|(_, b)| *b).sum();
    assert_eq!(
        row["outstanding_bytes"].as_i64(),
        Some(want_bytes),
        "{select:?}: {row:#}"
    );
    assert_eq!(row["outstanding_allocs"].as_i64(), Some(want_bytes / 1000));
    for (pid, bytes) in workers.values() {
        let share = row["per_pid"]
            .as_array()
            .expect("per_pid")
            .iter()
            .find(|p| p["pid"].as_u64() == Some(*pid as u64))
            .unwrap_or_else(|| panic!("{select:?}: no per_pid entry for {pid}: {row:#}"));
        assert_eq!(share["outstanding_bytes"].as_i64(), Some(*bytes), "{pid}");
    }
}

#[test]
fn workers_forked_by_a_traced_pid_are_followed() {
    if !require_bpf("workers_forked_by_a_traced_pid_are_followed") {
        return;
    }
    let _turn = shared();
    workers_are_followed(Select::Pid);
}

#[test]
fn workers_are_found_by_name_now_and_later() {
    if !require_bpf("workers_are_found_by_name_now_and_later") {
        return;
    }
    let _turn = shared();
    workers_are_followed(Select::Comm);
}

#[test]
fn workers_are_found_by_cgroup() {
    if !require_bpf("workers_are_found_by_cgroup") {
        return;
    }
    let _turn = shared();
    workers_are_followed(Select::Cgroup);
}

/// A machine that forks a lot (a build, a CI runner) overruns the process
/// event socket while leaktrace loads; it must go on following forks and
/// exits afterwards, not only rescan /proc once.
#[test]
fn forks_and_exits_are_followed_after_an_event_overrun() {
    if !require_bpf("forks_and_exits_are_followed_after_an_event_overrun") {
        return;
    }
    let _turn = alone();
    let mut fx = Fixture::start(&fixture("forking_master"), &["lt-wk-flood"]);
    let master = fx.pid();
    let master_s = master.to_string();
    let flood: Vec<Guard> = (0..2)
        .map(|_| {
            Guard(
                Command::new("bash")
                    .args(["-c", "while :; do /bin/true; done"])
                    .spawn()
                    .expect("start a fork loop"),
            )
        })
        .collect();
    // The daemon asks for an 8 MiB event queue; a small one makes the
    // overrun certain on two cores.
    let mut tracer = Tracer::spawn_cmd(
        Command::new(leaktrace_bin())
            .args(["-p", &master_s, "-i", "0", "--format", "json"])
            .env("LEAKTRACE_PROC_EVENTS_RCVBUF", "4096"),
    );
    assert!(
        tracer
            .wait_stderr("attached to", Duration::from_secs(60))
            .is_some(),
        "leaktrace never attached: {:#?}",
        tracer.stderr_lines()
    );
    let overrun = tracer
        .wait_stderr("overrun", Duration::from_secs(30))
        .is_some();
    drop(flood);
    assert!(
        overrun,
        "a fork storm against a 4 KiB event queue never overran it: {:#?}",
        tracer.stderr_lines()
    );
    fx.send("go");
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(forked(&fx.expect_line("forked")).0);
    }
    // Generous: without an overrun this takes milliseconds.
    settle(&mut tracer, &mut fx, master, Duration::from_secs(15));
    let victim = workers[1];
    // SAFETY: kill(2) on a worker of our own fixture.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    fx.expect(&format!("respawned {victim}"));
    assert!(
        tracer
            .wait_stderr(&format!("process {victim} ("), Duration::from_secs(15))
            .is_some_and(|l| l.contains("exited")),
        "leaktrace never saw worker {victim} exit: {:#?}",
        tracer.stderr_lines()
    );
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
}

/// The master's "forked" lines for its three workers: slot -> pid.
fn three_workers(fx: &mut Fixture) -> BTreeMap<usize, u32> {
    (0..3)
        .map(|_| {
            let (pid, slot) = forked(&fx.expect_line("forked"));
            (slot, pid)
        })
        .collect()
}

/// A report's notes, one a line.
fn notes(r: &Value) -> String {
    r["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `-p MASTER` on a pool that already runs: the workers are attached at
/// start, their leaks are one row with every worker's exact bytes, and the
/// report says how many descendants were taken in.
#[test]
fn workers_running_before_attach_are_traced_through_the_master() {
    const TEST: &str = "workers_running_before_attach_are_traced_through_the_master";
    if !require_bpf(TEST) {
        return;
    }
    let _turn = shared();
    let mut fx = Fixture::start(&fixture("forking_master"), &["lt-wk-exist"]);
    let master = fx.pid();
    fx.send("go");
    let workers = three_workers(&mut fx);
    let master_s = master.to_string();
    let tracer = Tracer::attach(&["-p", &master_s, "-i", "0", "--format", "json"]);
    for pid in workers.values() {
        assert!(
            taken_in(&tracer, *pid, usize::MAX),
            "{TEST}: worker {pid} is not listed as attached: {:#?}",
            tracer.stderr_lines()
        );
    }
    for pid in workers.values() {
        fx.send(&format!("leak {pid}"));
        fx.expect(&format!("worker {pid} leaked"));
    }
    let out = tracer.interrupt();
    assert!(out.status.success(), "{TEST}: leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);
    let rows = stacks_from(&r, "worker_leak");
    assert_eq!(rows.len(), 1, "{TEST}: want one worker_leak row:\n{all}");
    let mut want_pids: Vec<u64> = workers.values().map(|p| *p as u64).collect();
    want_pids.sort_unstable();
    let got_pids: Vec<u64> = rows[0]["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(got_pids, want_pids, "{TEST}: pids of the row:\n{all}");
    let want_bytes: i64 = workers.keys().map(|slot| worker_bytes(*slot)).sum();
    assert_eq!(
        rows[0]["outstanding_bytes"].as_i64(),
        Some(want_bytes),
        "{TEST}:\n{all}"
    );
    let notes = notes(&r);
    assert!(
        notes.contains(&format!(
            "process {master} (lt-master): 3 existing descendants traced"
        )),
        "{TEST}: notes:\n{notes}"
    );
}

/// `--no-children`: only the master, neither the workers it had when
/// leaktrace attached nor the one it forks afterwards to replace a dead
/// one.
#[test]
fn no_children_traces_neither_running_nor_later_workers() {
    const TEST: &str = "no_children_traces_neither_running_nor_later_workers";
    if !require_bpf(TEST) {
        return;
    }
    let _turn = shared();
    let mut fx = Fixture::start(&fixture("forking_master"), &["lt-wk-nochild"]);
    let master = fx.pid();
    fx.send("go");
    let mut workers = three_workers(&mut fx);
    let master_s = master.to_string();
    let tracer = Tracer::attach(&[
        "-p",
        &master_s,
        "--no-children",
        "-i",
        "0",
        "--format",
        "json",
    ]);
    // A fork after attach: the master replaces a killed worker.
    let victim = workers[&1];
    // SAFETY: kill(2) on a worker of our own fixture.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    fx.expect(&format!("respawned {victim}"));
    let (fresh, slot) = forked(&fx.expect_line("forked"));
    workers.insert(slot, fresh);
    for pid in workers.values() {
        fx.send(&format!("leak {pid}"));
        fx.expect(&format!("worker {pid} leaked"));
    }
    let out = tracer.interrupt();
    assert!(out.status.success(), "{TEST}: leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);
    let targets: Vec<u64> = r["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["pid"].as_u64())
        .collect();
    assert_eq!(
        targets,
        vec![master as u64],
        "{TEST}: only the master is a target"
    );
    assert!(
        stacks_from(&r, "worker_leak").is_empty(),
        "{TEST}: the workers' leaks are not traced:\n{all}"
    );
    assert!(
        !out.stderr.contains("following child"),
        "{TEST}: {}",
        out.stderr
    );
    let notes = notes(&r);
    assert!(notes.contains("(--no-children)"), "{TEST}: notes:\n{notes}");
    assert!(
        !notes.contains("existing descendant"),
        "{TEST}: notes:\n{notes}"
    );
}

// ---------------------------------------------------------------------------
// 4. Code that arrives late, and allocators that call each other

/// `dlopen_host` loads `libleakplugin.so` after the tracer attached and
/// calls `plugin_leak(40)`: 40 x 3000 bytes. Traced once for the tests
/// that read it.
fn trace_dlopen() -> &'static Value {
    static REPORT: OnceLock<Value> = OnceLock::new();
    REPORT.get_or_init(trace_dlopen_once)
}

fn trace_dlopen_once() -> Value {
    let plugin = fixture("libleakplugin.so");
    let plugin = plugin.to_str().expect("utf-8 path");
    let mut fx = Fixture::start(&fixture("dlopen_host"), &[plugin]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "1000"]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    out.json()
}

#[test]
fn library_loaded_after_attach_is_named() {
    if !require_bpf("library_loaded_after_attach_is_named") {
        return;
    }
    let _turn = shared();
    let r = trace_dlopen();
    let all = summary(r);
    let rows = stacks_from(r, "plugin_leak");
    assert_eq!(sum(&rows, "outstanding_bytes"), 40 * 3000, "stacks:\n{all}");
    assert_eq!(sum(&rows, "outstanding_allocs"), 40);
    for s in &rows {
        assert!(
            s["frames"][0]["module"]
                .as_str()
                .is_some_and(|m| m.ends_with("/libleakplugin.so")),
            "module of plugin_leak: {}",
            s["frames"][0]
        );
        assert!(
            s["frames"][0]["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("leakplugin.c")),
            "{}",
            s["frames"][0]
        );
    }
}

/// The walk through a library mapped after leaktrace last read the
/// process's mappings must go on to the library's callers.
#[test]
fn stack_through_a_library_loaded_after_attach_is_whole() {
    if !require_bpf("stack_through_a_library_loaded_after_attach_is_whole") {
        return;
    }
    let _turn = shared();
    let r = trace_dlopen();
    let rows = stacks_from(r, "plugin_leak");
    assert!(!rows.is_empty(), "no plugin_leak stack:\n{}", summary(r));
    for s in rows {
        let names = functions(s);
        assert_eq!(
            names.get(1).map(String::as_str),
            Some("main"),
            "plugin_leak's caller is lost: {names:?}"
        );
    }
}

#[test]
fn prefixed_allocator_forwarding_to_glibc_counts_once() {
    if !require_bpf("prefixed_allocator_forwarding_to_glibc_counts_once") {
        return;
    }
    let _turn = shared();
    let mut fx = Fixture::start(&fixture("uses_prefalloc"), &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&[
        "-p",
        &pid,
        "--allocator-prefix",
        "myalloc_",
        "-i",
        "0",
        "--format",
        "json",
        "-n",
        "1000",
    ]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);
    let want = 25 * 640 + 15 * 10 * 32;
    let rows = stacks_from(&r, "prefixed_leak");
    assert_eq!(sum(&rows, "outstanding_bytes"), want, "stacks:\n{all}");
    assert_eq!(sum(&rows, "outstanding_allocs"), 40, "stacks:\n{all}");
    assert_eq!(
        r["totals"]["outstanding_bytes"].as_i64(),
        Some(want),
        "a block counted twice (myalloc_malloc and the __libc_malloc it \
         calls), or something else counted; stacks:\n{all}"
    );
    assert!(
        stacks_through(&r, "prefixed_churn").is_empty(),
        "freed through myalloc_free, yet reported; stacks:\n{all}"
    );
    // The inner __libc_malloc/__libc_calloc (malloc's own address) was
    // probed and hidden, once per outer call at least.
    assert!(
        counter(&r, "nested_calls") >= 40,
        "the inner glibc call was not seen: {}",
        r["counters"]
    );
}

// ---------------------------------------------------------------------------
// 5. Exactness under load

#[test]
fn known_leak_is_exact_under_full_speed_churn() {
    if !require_bpf("known_leak_is_exact_under_full_speed_churn") {
        return;
    }
    let _turn = alone();
    let mut fx = Fixture::start(&fixture("load_churn"), &["8"]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "1000"]);
    fx.send("go");
    let done = fx.expect_line("done churn=");
    let churned: u64 = done
        .trim_start_matches("done churn=")
        .trim()
        .parse()
        .expect("churn count");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    let all = summary(&r);

    let lost = r["totals"]["lost_events"]
        .as_u64()
        .expect("totals.lost_events");
    let losses: u64 = LOSS_COUNTERS.iter().map(|c| counter(&r, c)).sum();
    eprintln!(
        "known_leak_is_exact_under_full_speed_churn: {churned} malloc/free pairs, \
         lost_events {lost}, counters {}",
        r["counters"]
    );
    assert_eq!(
        lost, losses,
        "lost_events is not the sum of the loss counters"
    );

    let rows = stacks_from(&r, "known_leak");
    assert_eq!(sum(&rows, "outstanding_bytes"), 2000 * 72, "stacks:\n{all}");
    assert_eq!(sum(&rows, "outstanding_allocs"), 2000, "stacks:\n{all}");
    for gone in ["churn_pairs", "churn_thread"] {
        assert!(
            stacks_through(&r, gone).is_empty(),
            "{gone} freed everything, yet it is reported; stacks:\n{all}"
        );
    }
    assert_eq!(
        counter(&r, "frees"),
        churned,
        "every churned block's free should match its malloc"
    );
}

// ---------------------------------------------------------------------------
// 6. --min-age

/// `aged_leak` under `--min-age 2`, traced once for the tests that read it.
fn trace_aged() -> &'static Value {
    static REPORT: OnceLock<Value> = OnceLock::new();
    REPORT.get_or_init(trace_aged_once)
}

fn trace_aged_once() -> Value {
    let mut fx = Fixture::start(&fixture("aged_leak"), &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&[
        "-p",
        &pid,
        "--min-age",
        "2",
        "-i",
        "0",
        "--format",
        "json",
        "-n",
        "1000",
    ]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    out.json()
}

#[test]
fn min_age_counts_only_old_blocks() {
    if !require_bpf("min_age_counts_only_old_blocks") {
        return;
    }
    let _turn = shared();
    let r = trace_aged();
    let all = summary(r);
    let early = stacks_from(r, "leak_early");
    assert_eq!(
        sum(&early, "outstanding_bytes"),
        100 * 512,
        "stacks:\n{all}"
    );
    assert_eq!(sum(&early, "outstanding_allocs"), 100);
    assert!(
        stacks_through(r, "leak_late").is_empty(),
        "blocks younger than --min-age counted; stacks:\n{all}"
    );
}

/// An anonymous mapping is an allocation like any other: `--min-age`
/// hides a young one too.
#[test]
fn min_age_applies_to_mapped_regions() {
    if !require_bpf("min_age_applies_to_mapped_regions") {
        return;
    }
    let _turn = shared();
    let r = trace_aged();
    let all = summary(r);
    assert_eq!(
        sum(&stacks_through(r, "map_early"), "outstanding_bytes"),
        65536,
        "stacks:\n{all}"
    );
    assert!(
        stacks_through(r, "map_late").is_empty(),
        "a region mapped right before the report counted under --min-age 2; stacks:\n{all}"
    );
}
