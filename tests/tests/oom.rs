//! The OOM black box: a process leaking inside a memory cgroup with a small
//! limit is killed by the kernel; leaktrace writes its report, naming the
//! leaking function with bytes close to the limit, and keeps running.

use std::path::PathBuf;

use leaktrace_tests::{compile_c_fixture, functions, require_bpf, Fixture, TestCgroup, Tracer};

const LIMIT: u64 = 64 << 20;

#[test]
fn oom_kill_leaves_a_report_naming_the_leak() {
    if !require_bpf("oom_kill_leaves_a_report_naming_the_leak") {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("leaktrace-oom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let bin = compile_c_fixture("oom_hoard", &tmp);
    let cg = TestCgroup::new(
        &format!("leaktrace-test-oom-{}", std::process::id()),
        Some(LIMIT),
    );
    let mut fx = Fixture::start(&bin, &[]);
    cg.add(fx.pid());
    let pid = fx.pid().to_string();
    let oom_dir = tmp.join("oom");
    let tracer = Tracer::attach(&[
        "-p",
        &pid,
        "-i",
        "0",
        "--format",
        "json",
        "--oom-dir",
        oom_dir.to_str().expect("utf-8"),
    ]);
    fx.send("go");
    let st = fx.wait_exit();
    assert!(
        !st.success(),
        "the fixture was meant to be OOM-killed: {st:?}"
    );
    let out = tracer.finish();
    assert!(out.status.success(), "leaktrace did not survive: {out:?}");
    assert!(
        out.stderr.contains("the OOM killer chose process"),
        "{}",
        out.stderr
    );

    let report: PathBuf = std::fs::read_dir(&oom_dir)
        .expect("oom dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("an OOM report");
    let folded = report.with_extension("folded");
    assert!(folded.exists(), "no folded OOM report next to {report:?}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("read")).expect("json");
    assert_eq!(r["targets"][0]["pid"].as_u64(), Some(fx.pid() as u64));
    assert_eq!(r["targets"][0]["status"], "oom-killed");
    let notes = r["notes"].to_string();
    let facts = if cg.v2 { "memory.max" } else { "memory cgroup" };
    assert!(notes.contains(facts), "no cgroup facts: {notes}");
    let top = &r["stacks"][0];
    assert!(
        functions(top).iter().any(|f| f == "hoard_sessions"),
        "top stack is not the leak: {r:#}"
    );
    let bytes = top["outstanding_bytes"].as_u64().expect("bytes");
    assert!(
        (LIMIT / 2..=LIMIT).contains(&bytes),
        "leak of {bytes} bytes is not close to the {LIMIT}-byte limit"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
