//! End-to-end: real eBPF programs tracing real C processes.

use leaktrace_tests::{fixture, functions, require_bpf, stacks_from, sum, Fixture, Tracer};

/// Every glibc entry point: exact bytes and counts per leaking function,
/// frames in order, freed memory never reported.
#[test]
fn exact_bytes_and_frames_for_known_leaks() {
    if !require_bpf("exact_bytes_and_frames_for_known_leaks") {
        return;
    }
    let mut fx = Fixture::start(&fixture("leaky"), &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "1000"]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    assert_eq!(r["schema"], "leaktrace.report/v1");
    assert_eq!(r["targets"][0]["pid"].as_u64(), Some(fx.pid() as u64));

    let expect = [
        ("leak_4k", 100 * 4096, 100),
        ("leak_calloc", 50 * 120, 50),
        ("grow_buffer", 10 * 5000, 10),
        ("leak_realloc_null", 5 * 700, 5),
        ("leak_reallocarray", 5 * 300, 5),
        ("leak_posix_memalign", 5 * 320, 5),
        ("leak_aligned_alloc", 5 * 512, 5),
        ("leak_memalign", 5 * 384, 5),
        ("leak_valloc", 5 * 1000, 5),
    ];
    for (func, bytes, count) in expect {
        let stacks = stacks_from(&r, func);
        assert_eq!(
            sum(&stacks, "outstanding_bytes"),
            bytes,
            "{func}: wrong outstanding bytes in {stacks:#?}"
        );
        assert_eq!(
            sum(&stacks, "outstanding_allocs"),
            count,
            "{func}: wrong outstanding count"
        );
    }

    let leak = stacks_from(&r, "leak_4k")[0];
    let names = functions(leak);
    assert_eq!(
        &names[..4],
        &["leak_4k", "level2", "level1", "main"],
        "frames out of order: {names:?}"
    );
    assert_eq!(leak["frames"][0]["kind"], "native");
    assert!(
        leak["frames"][0]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("leaky.c")),
        "no source file: {:?}",
        leak["frames"][0]
    );
    assert!(leak["frames"][0]["line"].as_u64().is_some());
    assert_eq!(leak["pids"][0].as_u64(), Some(fx.pid() as u64));

    for s in r["stacks"].as_array().expect("stacks") {
        let names = functions(s);
        assert!(
            !names.iter().any(|n| n == "churn" || n == "failed_allocs"),
            "freed or failed memory reported: {s:#?}"
        );
    }
    assert_eq!(r["totals"]["lost_events"], 0, "lost events: {r:#?}");
    assert!(r["counters"]["frees"].as_u64().unwrap_or(0) >= 5000 * 3);
}

/// A target that exits ends the trace by itself, and what it leaked is in
/// the final report.
#[test]
fn target_exit_ends_trace_with_report() {
    if !require_bpf("target_exit_ends_trace_with_report") {
        return;
    }
    let mut fx = Fixture::start(&fixture("leaky"), &["exit"]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json"]);
    fx.send("go");
    let st = fx.wait_exit();
    assert!(st.success());
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.contains("every target exited"), "{}", out.stderr);
    let r = out.json();
    assert_eq!(r["targets"][0]["status"], "exited");
    assert_eq!(
        sum(&stacks_from(&r, "leak_4k"), "outstanding_bytes"),
        409600
    );
}

/// The built-in demo names its leaking function.
#[test]
fn demo_names_the_leak() {
    if !require_bpf("demo_names_the_leak") {
        return;
    }
    let out = Tracer::spawn(&["--demo", "-d", "3", "-i", "0", "--format", "json"]).finish();
    assert!(out.status.success(), "{out:?}");
    let r = out.json();
    let top = &r["stacks"][0];
    assert_eq!(
        top["frames"][0]["function"], "leaktrace::demo::cache_session_profile",
        "{r:#?}"
    );
    assert!(top["outstanding_bytes"].as_i64().unwrap_or(0) >= 4096);
    assert!(functions(top)
        .iter()
        .any(|f| f == "leaktrace::demo::handle_request"));
}

/// SIGTERM flushes the report like Ctrl-C.
#[test]
fn sigterm_flushes_the_report() {
    if !require_bpf("sigterm_flushes_the_report") {
        return;
    }
    let mut fx = Fixture::start(&fixture("leaky"), &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json"]);
    fx.send("go");
    fx.expect("done");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tracer.guard.0.id() as i32, libc::SIGTERM) };
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        sum(&stacks_from(&out.json(), "leak_4k"), "outstanding_bytes"),
        409600
    );
}
