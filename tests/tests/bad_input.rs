//! Bad input: one clear line on stderr naming the object and the fix, and
//! exit code 2.

use std::{ffi::CString, process::Command};

use leaktrace_tests::{fixture, leaktrace_bin, require_bpf, Finished, Fixture, Tracer};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

fn assert_error(out: &Finished, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("leaktrace: ") && !l.contains("attached to"))
        .collect();
    assert_eq!(lines.len(), 1, "want one error line: {out:?}");
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
}

fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (300..max)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid")
}

#[test]
fn bad_flags_exit_2() {
    let out = Tracer::spawn(&["-p", "1", "-n", "0"]).finish();
    assert_error(&out, "--top");
}

#[test]
fn nonexistent_pid() {
    if !require_bpf("nonexistent_pid") {
        return;
    }
    let pid = unused_pid().to_string();
    let out = Tracer::spawn(&["-p", &pid]).finish();
    assert_error(&out, &format!("process {pid} does not exist"));
}

/// A bad pid is named before anything needs root, so this runs as anyone.
#[test]
fn nonexistent_pid_needs_no_privilege() {
    let pid = unused_pid().to_string();
    // As root, as CI runs, drop to nobody without capabilities first.
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        as_nobody(&["-p", &pid])
    } else {
        Tracer::spawn(&["-p", &pid]).finish()
    };
    assert_error(&out, &format!("process {pid} does not exist"));
}

/// An output that cannot be written is refused before tracing starts, not
/// after the whole trace.
#[test]
fn unwritable_output_is_refused_before_tracing() {
    if !require_bpf("unwritable_output_is_refused_before_tracing") {
        return;
    }
    let fx = Fixture::start(&fixture("leaky"), &[]);
    let out = Tracer::spawn(&[
        "-p",
        &fx.pid().to_string(),
        "-d",
        "30",
        "-o",
        "/proc/leaktrace-nowhere/report.json",
    ])
    .finish();
    assert_error(&out, "/proc/leaktrace-nowhere/report.json");
    assert!(
        !out.stderr.contains("attached to"),
        "traced before refusing: {out:?}"
    );
}

/// A `--cgroup` that does not exist is named (a typo would trace nothing),
/// and leaktrace waits for it.
#[test]
fn missing_cgroup_is_named() {
    if !require_bpf("missing_cgroup_is_named") {
        return;
    }
    let mut t = Tracer::spawn(&["--cgroup", "/leaktrace-no-such-cgroup", "-d", "2"]);
    let line = t.wait_stderr("does not exist", std::time::Duration::from_secs(30));
    assert!(
        line.as_deref()
            .is_some_and(|l| l.contains("/leaktrace-no-such-cgroup") && l.contains("waiting")),
        "{line:?}"
    );
    let out = t.finish();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn not_root() {
    if !require_bpf("not_root") {
        return;
    }
    let fx = Fixture::start(&fixture("leaky"), &[]);
    let out = as_nobody(&["-p", &fx.pid().to_string()]);
    assert_error(&out, "needs root");
}

/// leaktrace run as nobody, without any capability.
fn as_nobody(args: &[&str]) -> Finished {
    Tracer::spawn_cmd(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(leaktrace_bin())
            .args(args),
    )
    .finish()
}

/// Hide a sysfs directory in a private mount namespace, then run leaktrace.
fn with_hidden(dir: &str, pid: u32) -> Finished {
    Tracer::spawn_cmd(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("mount -t tmpfs none {dir} && exec \"$0\" -p {pid}"))
            .arg(leaktrace_bin()),
    )
    .finish()
}

#[test]
fn kernel_without_btf() {
    if !require_bpf("kernel_without_btf") {
        return;
    }
    let fx = Fixture::start(&fixture("leaky"), &[]);
    assert_error(&with_hidden("/sys/kernel/btf", fx.pid()), "no BTF");
}

#[test]
fn kernel_without_uprobes() {
    if !require_bpf("kernel_without_uprobes") {
        return;
    }
    let fx = Fixture::start(&fixture("leaky"), &[]);
    assert_error(
        &with_hidden("/sys/bus/event_source/devices/uprobe", fx.pid()),
        "no uprobe support",
    );
}

/// File offset of a symbol in an ELF file.
fn file_offset(path: &std::path::Path, name: &str) -> u64 {
    let data = std::fs::read(path).expect("read fixture library");
    let file = object::File::parse(&*data).expect("parse ELF");
    let sym = file
        .symbols()
        .chain(file.dynamic_symbols())
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()));
    let sec = file
        .section_by_index(sym.section_index().expect("section"))
        .expect("section");
    let (off, _) = sec.file_range().expect("file range");
    sym.address() - sec.address() + off
}

/// Another tracer holds a uprobe with a reference counter (a USDT
/// semaphore) on the same address: the kernel refuses ours with EINVAL.
#[test]
fn probe_held_by_another_tracer() {
    if !require_bpf("probe_held_by_another_tracer") {
        return;
    }
    let lib = fixture("libmyalloc.so");
    let fx = Fixture::start(&fixture("uses_myalloc"), &[]);
    let malloc_off = file_offset(&lib, "malloc");
    let sema_off = file_offset(&lib, "myalloc_probe_semaphore");
    let pmu_type: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .expect("uprobe PMU")
        .trim()
        .parse()
        .expect("PMU type");
    let path = CString::new(lib.to_str().expect("utf-8 path")).expect("path");
    // perf_event_attr, zero-filled: type, size, config (ref_ctr_offset in
    // bits 32-63), config1 = path, config2 = offset.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(pmu_type) | (128u64 << 32);
    attr[1] = sema_off << 32;
    attr[7] = path.as_ptr() as u64;
    attr[8] = malloc_off;
    // SAFETY: a valid, zero-padded perf_event_attr of the size it states.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            fx.pid() as i32,
            -1i32,
            -1i32,
            8u64, // PERF_FLAG_FD_CLOEXEC
        )
    };
    assert!(
        fd >= 0,
        "could not create the competing uprobe: {}",
        std::io::Error::last_os_error()
    );
    let out = Tracer::spawn(&["-p", &fx.pid().to_string()]).finish();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd as i32) };
    assert_error(&out, "another tracer");
    assert!(out.stderr.contains("libmyalloc.so"), "{}", out.stderr);
}
