//! Checks made before anything is loaded, so that a missing privilege or
//! kernel feature gets one clear line instead of a verifier dump.

use std::{fs, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "leaktrace needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE) to load eBPF \
         programs and read other processes' memory maps; run it with sudo"
    )]
    NotPrivileged,
    #[error(
        "this kernel has no BTF ({0} is missing); leaktrace needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(String),
    #[error(
        "this kernel has no uprobe support ({0} is missing); leaktrace needs a kernel \
         built with CONFIG_UPROBE_EVENTS=y"
    )]
    NoUprobes(String),
    #[error(
        "Linux {release} is too old: leaktrace needs {feature}, which Linux {since} added; \
         run it on Linux {since} or newer"
    )]
    TooOld {
        release: String,
        feature: &'static str,
        since: &'static str,
    },
}

/// What leaktrace cannot work without, and the release that added it.
const REQUIRED: &[((u32, u32), &str, &str)] = &[
    ((5, 5), "bpf_probe_read_user", "5.5"),
    ((5, 8), "the BPF ring buffer", "5.8"),
];

/// The first required feature `release` lacks.
pub fn too_old(release: &str) -> Option<PreflightError> {
    let version = crate::sys::procfs::release_version(release)?;
    REQUIRED
        .iter()
        .find(|(since, _, _)| version < *since)
        .map(|(_, feature, since)| PreflightError::TooOld {
            release: release.to_string(),
            feature,
            since,
        })
}

const BTF: &str = "/sys/kernel/btf/vmlinux";
const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn check() -> Result<(), PreflightError> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    let bpf_ok = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if !bpf_ok || !has(CAP_SYS_PTRACE) {
        return Err(PreflightError::NotPrivileged);
    }
    if let Some(e) = too_old(&crate::sys::procfs::kernel_release()) {
        return Err(e);
    }
    if !Path::new(UPROBE_PMU).exists() {
        return Err(PreflightError::NoUprobes(UPROBE_PMU.into()));
    }
    if !Path::new(BTF).exists() {
        return Err(PreflightError::NoBtf(BTF.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_are_named_with_what_they_lack() {
        let e = too_old("5.4.0-150-generic").expect("too old").to_string();
        assert!(
            e.contains("bpf_probe_read_user") && e.contains("5.5"),
            "{e}"
        );
        let e = too_old("5.7.19").expect("too old").to_string();
        assert!(e.contains("ring buffer") && e.contains("5.8"), "{e}");
        assert!(too_old("5.15.0-91-generic").is_none());
        assert!(too_old("6.1.0-57-amd64").is_none());
        assert!(too_old("unparsable").is_none());
    }
}
