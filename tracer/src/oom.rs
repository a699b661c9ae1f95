//! Facts about an OOM victim, read the moment the OOM killer chooses it:
//! its cgroups and memory limits, and its memory figures.

use std::fs;

use crate::sys::cgroupfs::Mounts;

/// One line per fact, for the OOM report's notes.
pub fn victim_facts(pid: u32) -> Vec<String> {
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
    }
    if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) {
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
