//! Byte sampling (`--sample-bytes`): a 64 MiB leak made of small blocks is
//! estimated within 10% at a 512 KiB period, while only a few hundred
//! allocations are recorded.

use leaktrace_tests::{compile_c_fixture, require_bpf, stacks_from, Fixture, Tracer};

const LEAK: f64 = (64u64 << 20) as f64;

#[test]
fn sampled_estimate_of_a_64_mib_leak_is_within_10_percent() {
    if !require_bpf("sampled_estimate_of_a_64_mib_leak_is_within_10_percent") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("leaktrace-sampling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let bin = compile_c_fixture("sample_leak", &dir);
    let mut fx = Fixture::start(&bin, &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&[
        "-p",
        &pid,
        "-i",
        "0",
        "--format",
        "json",
        "--sample-bytes",
        "524288",
    ]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "{out:?}");
    let r = out.json();
    let stacks = stacks_from(&r, "leak_small");
    assert_eq!(stacks.len(), 1, "{r:#}");
    let est = stacks[0]["outstanding_bytes"].as_f64().expect("bytes");
    let err = (est - LEAK).abs() / LEAK;
    assert!(err < 0.10, "estimate {est} is {:.1}% off", err * 100.0);
    let rel = stacks[0]["estimate_rel_error"]
        .as_f64()
        .expect("error estimate");
    assert!(rel > 0.0 && rel < 0.2, "{rel}");
    // ~128 samples expected for the leak: far fewer than the ~600,000 calls.
    let recorded = r["counters"]["allocs"].as_u64().expect("allocs");
    assert!(recorded < 2_000, "{recorded} allocations recorded");
    let _ = std::fs::remove_dir_all(&dir);
}
