//! Facts about an OOM victim, read the moment the OOM killer chooses it:
//! its cgroups and memory limits, and its memory figures.

use std::fs;

use crate::sys::cgroupfs::Mounts;

/// One line per fact, for the OOM report's notes. `known_cgroups` is the
/// victim's `/proc/PID/cgroup` as read when it was attached: the victim is
/// often reaped before its OOM event is read, and its cgroup outlives it.
pub fn victim_facts(pid: u32, known_cgroups: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
        let wanted = ["VmRSS", "VmHWM", "RssAnon", "VmSwap"];
        let figures: Vec<String> = status
            .lines()
            .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if !figures.is_empty() {
            out.push(format!("victim memory at the kill: {}", figures.join(", ")));
        }
    } else {
        out.push(format!(
            "process {pid} was gone before its memory figures could be read"
        ));
    }
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .or_else(|| known_cgroups.map(str::to_string));
    if let Some(text) = text {
        let mounts = Mounts::current();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrl, path) = (parts.next(), parts.next(), parts.next());
            let (Some(ctrl), Some(path)) = (ctrl, path) else {
                continue;
            };
            if ctrl.split(',').any(|c| c == "memory") {
                let Some(dir) = mounts.v1_memory_dir(path) else {
                    continue;
                };
                let read = |f: &str| {
                    fs::read_to_string(dir.join(f))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|_| "?".into())
                };
                out.push(format!(
                    "memory cgroup {path}: limit {} bytes, usage {}, max usage {}, failcnt {}",
                    read("memory.limit_in_bytes"),
                    read("memory.usage_in_bytes"),
                    read("memory.max_usage_in_bytes"),
                    read("memory.failcnt")
                ));
            } else if ctrl.is_empty() {
                let Some(dir) = mounts.v2_dir(path) else {
                    out.push(format!("cgroup {path}"));
                    continue;
                };
                if let Ok(max) = fs::read_to_string(dir.join("memory.max")) {
                    let current =
                        fs::read_to_string(dir.join("memory.current")).unwrap_or_default();
                    let events = fs::read_to_string(dir.join("memory.events"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ");
                    out.push(format!(
                        "cgroup {path}: memory.max {}, memory.current {}, events: {events}",
                        max.trim(),
                        current.trim()
                    ));
                } else {
                    out.push(format!("cgroup {path}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reaped_victim_is_described_by_the_cgroups_known_at_attach() {
        let known = fs::read_to_string("/proc/self/cgroup").expect("own cgroups");
        let path = known
            .lines()
            .find_map(|l| l.splitn(3, ':').nth(2))
            .expect("a cgroup line")
            .to_string();
        let facts = victim_facts(u32::MAX, Some(&known));
        assert!(facts[0].contains("was gone"), "{facts:?}");
        assert!(
            facts.iter().any(|f| f.contains(&format!("cgroup {path}"))),
            "{facts:?}"
        );
        assert_eq!(victim_facts(u32::MAX, None).len(), 1);
    }
}
