//! `leaktrace --version`: what this build is (version, commit, the
//! toolchain that built the eBPF object, the object's hash) and what the
//! running kernel offers, so a bug report carries both.

use std::{fmt::Write as _, path::Path};

use crate::sys::{cgroupfs::Mounts, procfs, procfs::release_version};

/// FNV-1a of the embedded eBPF object: the same bytes give the same value
/// on any machine.
pub fn object_hash(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the kernel needs to offer, from which release, and whether this
/// one does: `(feature, since, present, what leaktrace does without it)`.
pub fn kernel_features(
    release: (u32, u32),
) -> Vec<(&'static str, &'static str, bool, &'static str)> {
    let at_least = |maj: u32, min: u32| release >= (maj, min);
    vec![
        (
            "BTF (/sys/kernel/btf/vmlinux)",
            "5.4, CONFIG_DEBUG_INFO_BTF",
            Path::new("/sys/kernel/btf/vmlinux").exists(),
            "refuses to start",
        ),
        (
            "uprobe PMU (perf_event_open)",
            "4.17, CONFIG_UPROBE_EVENTS",
            Path::new("/sys/bus/event_source/devices/uprobe/type").exists(),
            "refuses to start",
        ),
        ("BPF ring buffer", "5.8", at_least(5, 8), "refuses to start"),
        (
            "bpf_probe_read_user",
            "5.5",
            at_least(5, 5),
            "refuses to start",
        ),
        (
            "verifier figures in bpf_prog_info",
            "5.16",
            at_least(5, 16),
            "the verifier test cannot report them",
        ),
        (
            "uretprobe syscall (faster return probes)",
            "6.11",
            at_least(6, 11),
            "return probes trap with int3 (~250 ns more per allocation)",
        ),
    ]
}

/// The text `leaktrace --version` prints.
pub fn long_version(object: &[u8]) -> String {
    let release = procfs::kernel_release();
    let mut out = String::new();
    let _ = writeln!(out, "leaktrace {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "commit: {}", env!("LEAKTRACE_GIT_COMMIT"));
    let _ = writeln!(out, "built by: {}", env!("LEAKTRACE_RUSTC"));
    let _ = writeln!(
        out,
        "eBPF object: {} bytes, fnv64 {:016x}, built by {} (LLVM {}) and {}",
        object.len(),
        object_hash(object),
        env!("LEAKTRACE_EBPF_RUSTC"),
        env!("LEAKTRACE_EBPF_LLVM"),
        env!("LEAKTRACE_BPF_LINKER"),
    );
    let _ = writeln!(out, "kernel: Linux {release}");
    let version = release_version(&release).unwrap_or((0, 0));
    for (name, since, present, without) in kernel_features(version) {
        let state = if present { "yes" } else { "NO" };
        let _ = write!(out, "  {name}: {state} (since {since})");
        if !present {
            let _ = write!(out, "; without it leaktrace {without}");
        }
        out.push('\n');
    }
    let mounts = Mounts::current();
    let show = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not mounted".into())
    };
    let _ = writeln!(
        out,
        "  cgroup v2: {}; v1 memory controller: {}",
        show(&mounts.v2),
        show(&mounts.v1_memory)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(release_version("6.12.118+deb12-amd64"), Some((6, 12)));
        assert_eq!(release_version("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(release_version("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(release_version("garbage"), None);
    }

    #[test]
    fn the_object_hash_is_stable() {
        assert_eq!(object_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(object_hash(b"a"), object_hash(b"b"));
    }
}
