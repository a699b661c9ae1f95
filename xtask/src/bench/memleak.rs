//! bcc, the comparison: `memleak-bpfcc` (what leaktrace replaces) and the
//! floor (`bench/floor.py`: empty eBPF programs on the probe points
//! leaktrace uses, the trap cost alone), both through
//! `bench/bcc_refctr0.py`; and the kernel environment bcc needs (headers,
//! tracefs).
//!
//! Imports: `super` (configurations), `harness`, `micro`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Result;

use super::{harness::Tracer, micro, Ctx, Kind};
use crate::ensure_packages;

/// bcc memleak and the floor script; bcc compiles against kernel headers.
const BCC_PACKAGES: &[&str] = &["bpfcc-tools", "linux-headers-amd64"];

/// Whether bcc can run here, after installing what it needs; why not
/// (also on stderr) when it cannot.
pub(super) fn ready() -> Result<(), String> {
    let ready = ensure_packages(BCC_PACKAGES)
        .map_err(|e| format!("{e:#}"))
        .and_then(|()| ensure_bcc_kernel_env());
    if let Err(why) = &ready {
        eprintln!("xtask: bench: bcc cannot run: {why}");
    }
    ready
}

pub(super) fn memleak(ctx: &Ctx, pid: u32) -> Result<Tracer> {
    // memleak prints "Attaching" before it attaches; its first report
    // (after the 5 s interval) proves every probe is in place.
    Tracer::spawn(
        ctx,
        "memleak-bpfcc",
        Command::new("/usr/bin/python3")
            .arg(&ctx.bcc_refctr0)
            .args(["/usr/sbin/memleak-bpfcc", "-p", &pid.to_string(), "5"])
            .env("PYTHONUNBUFFERED", "1"),
        |l| l.contains("Top 10 stacks with outstanding allocations"),
        Duration::from_secs(120),
    )
}

pub(super) fn floor(ctx: &Ctx, pid: u32, free_offset: u64) -> Result<Tracer> {
    Tracer::spawn(
        ctx,
        "floor",
        Command::new("/usr/bin/python3")
            .arg(&ctx.bcc_refctr0)
            .arg(&ctx.floor_py)
            .arg(pid.to_string())
            .arg(free_offset.to_string()),
        |l| l == "floor: attached",
        Duration::from_secs(120),
    )
}

/// The floor row of the malloc/free table: it probes `free` where
/// leaktrace did (`leaktrace_offset`, from its log), and says where.
pub(super) fn measure_floor(
    ctx: &Ctx,
    pairs: u64,
    leaktrace_offset: Option<u64>,
) -> Result<micro::Micro> {
    let off = leaktrace_offset.unwrap_or(9);
    let why = if leaktrace_offset.is_some() {
        "leaktrace's choice"
    } else {
        "leaktrace's choice not in its log; glibc 2.36's first push"
    };
    let mut m = micro::measure(ctx, &Kind::Floor, pairs, Some(off))?;
    m.note = Some(format!("free+{off} ({why})"));
    Ok(m)
}

/// bcc compiles its programs against kernel headers at run time and its
/// tools expect tracefs. No headers exist for this kernel; Debian's 6.1
/// headers serve for user-space probes. Idempotent.
fn ensure_bcc_kernel_env() -> Result<(), String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("failed to read the kernel release: {e}"))?;
    let modules = Path::new("/lib/modules").join(release.trim());
    let build = modules.join("build");
    let source = modules.join("source");
    if !(build.join("Makefile").exists() && has_kconfig(&source)) {
        let (amd64, common) = debian_headers()?;
        fs::create_dir_all(&modules)
            .map_err(|e| format!("failed to create {}: {e}", modules.display()))?;
        for (link, target) in [(&build, &amd64), (&source, &common)] {
            link_headers(link, target)?;
        }
    }
    mount_tracefs()
}

fn has_kconfig(headers: &Path) -> bool {
    headers.join("include/linux/kconfig.h").exists()
}

/// The newest `/usr/src/linux-headers-*-amd64` and its `-common` half.
/// Debian splits the headers: generated files in -amd64, the rest
/// (include/linux/kconfig.h among them) in -common. bcc reads both,
/// through `build` and `source`.
fn debian_headers() -> Result<(PathBuf, PathBuf), String> {
    let mut amd64: Vec<PathBuf> = fs::read_dir("/usr/src")
        .map_err(|e| format!("failed to list /usr/src: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-headers-") && n.ends_with("-amd64"))
        })
        .collect();
    amd64.sort();
    let amd64 = amd64
        .pop()
        .ok_or("no /usr/src/linux-headers-*-amd64 (package linux-headers-amd64)")?;
    let name = amd64
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let common = amd64.with_file_name(format!(
        "{}-common",
        name.strip_suffix("-amd64").unwrap_or(name)
    ));
    let common = if has_kconfig(&common) {
        common
    } else {
        amd64.clone()
    };
    Ok((amd64, common))
}

/// Points `link` at `target`, unless it already does; never replaces a
/// real directory.
fn link_headers(link: &Path, target: &Path) -> Result<(), String> {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        return Ok(());
    }
    if link.symlink_metadata().is_ok() && !link.is_symlink() {
        return Err(format!(
            "{} exists and is not a symlink; leaving it alone",
            link.display()
        ));
    }
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).map_err(|e| {
        format!(
            "failed to link {} to {}: {e}",
            link.display(),
            target.display()
        )
    })?;
    eprintln!(
        "xtask: bench: linked {} -> {}",
        link.display(),
        target.display()
    );
    Ok(())
}

fn mount_tracefs() -> Result<(), String> {
    if Path::new("/sys/kernel/tracing/uprobe_events").exists() {
        return Ok(());
    }
    eprintln!("xtask: bench: mounting tracefs at /sys/kernel/tracing");
    let out = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .output()
        .map_err(|e| format!("failed to run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "failed to mount tracefs at /sys/kernel/tracing: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
