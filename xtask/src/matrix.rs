//! The kernel matrix of `cargo xtask test`: a core subset of the
//! end-to-end suite, run again under each of Debian's stock kernels in a
//! VM (`vm.rs`), from the test binaries the host run just built.
//!
//! Under QEMU's TCG a traced process runs ~10x slower, so the subset is
//! what proves a kernel works: every program verifies within budget (with
//! each figure printed), every allocator entry point is exact, a stack
//! walks through a library without frame pointers, Python frames, a Go
//! bucket, an OOM report, `--cgroup` on a cgroup v2 root, and node mode's
//! page-fault and brk growth stacks.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, vm};

/// `(test binary, test name)` run under every kernel of the matrix.
const SUBSET: &[(&str, &str)] = &[
    ("verifier", "unwinding_programs_keep_a_verifier_margin"),
    (
        "verifier",
        "programs_with_bpf_diagnostics_keep_a_verifier_margin",
    ),
    ("verifier", "node_mode_programs_keep_a_verifier_margin"),
    ("native", "exact_bytes_and_frames_for_known_leaks"),
    ("native", "sigterm_flushes_the_report"),
    ("unwinding", "cfi_stack_through_shared_library_pie"),
    ("python", "distro_python311_names_python_frames"),
    ("go", "go_heap_growth_named_and_matches_pprof"),
    ("oom", "oom_kill_leaves_a_report_naming_the_leak"),
    ("accounting", "workers_are_found_by_cgroup"),
    ("node", "node_mode_names_a_c_leak_on_this_kernel"),
];

/// Seconds one kernel's run may take (boot, then the subset, serially);
/// a run here takes 4 to 5 minutes.
const TIMEOUT_S: u64 = 1500;

/// Seconds one test may take in the guest before `timeout` kills it, so
/// one stuck test fails alone and the rest of the subset still runs.
const TEST_TIMEOUT_S: u64 = 420;

/// The end-to-end test binaries cargo built: `(target name, executable)`.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args([
            "test",
            "--package",
            "leaktrace-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("failed to list the end-to-end test binaries")?;
    if !out.status.success() {
        bail!("building the end-to-end test binaries failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(bins)
}

/// The guest's script: each test on its own, labelled like cargo labels a
/// suite (`Running vm-6.1/native`), so the tally counts it per kernel.
fn script(line: &str, bins: &[(String, PathBuf)], filter: Option<&str>) -> Result<String> {
    let mut s = String::from("rc=0\n");
    for (bin, test) in SUBSET {
        if filter.is_some_and(|f| !test.contains(f)) {
            continue;
        }
        let exe = bins
            .iter()
            .find(|(n, _)| n == bin)
            .map(|(_, e)| e)
            .with_context(|| format!("no test binary {bin}"))?;
        // The verifier test prints each program's figure on this kernel.
        let show = if *bin == "verifier" {
            " --nocapture"
        } else {
            ""
        };
        s.push_str(&format!(
            "echo '     Running vm-{line}/{bin} ({})'\n\
             timeout -k 10 {TEST_TIMEOUT_S} {} {test} --exact --test-threads=1{show} \
             || {{ rc=1; echo 'vm-{line}/{bin}: {test} failed or ran past {TEST_TIMEOUT_S} s'; }}\n",
            exe.display(),
            exe.display()
        ));
    }
    s.push_str("exit $rc\n");
    Ok(s)
}

/// One command per kernel: `xtask vm --kernel LINE -- sh -c SCRIPT`, for
/// the caller's tally to run and read.
pub(crate) fn commands(leaktrace: &std::path::Path, filter: Option<&str>) -> Result<Vec<Command>> {
    let bins = test_binaries()?;
    let xtask = std::env::current_exe().context("failed to find xtask's own executable")?;
    let mut out = Vec::new();
    for kernel in vm::KERNELS {
        let script = script(kernel.line, &bins, filter)?;
        let mut c = Command::new(&xtask);
        c.args(["vm", "--kernel", kernel.line, "--timeout"])
            .arg(TIMEOUT_S.to_string())
            .arg("-e")
            .arg(format!("LEAKTRACE_BIN={}", leaktrace.display()))
            .arg("-e")
            .arg(format!(
                "LEAKTRACE_REQUIRE_BPF={}",
                std::env::var("LEAKTRACE_REQUIRE_BPF").unwrap_or_default()
            ))
            .args(["-e", "RUST_BACKTRACE=1"])
            .args(["--", "sh", "-c", &script]);
        out.push(c);
    }
    Ok(out)
}
