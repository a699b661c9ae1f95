//! Which processes to trace: explicit pids, every process with a name
//! (`--comm`), every process in a cgroup (`--cgroup`), now and later.
//! Children of traced processes are traced too (followed by the caller).

use std::fs;

use crate::sys::cgroupfs::Mounts;

/// What the user asked to trace.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub comms: Vec<String>,
    /// Cgroup paths relative to their hierarchy's root (`/kubepods/pod1`).
    pub cgroups: Vec<String>,
    /// Every user process (node mode without `--comm` or `--cgroup`),
    /// leaktrace itself and kernel threads excepted.
    pub everything: bool,
}

/// Longest name the kernel keeps in `comm`.
const TASK_COMM_LEN: usize = 15;

impl Selector {
    /// Build from `--comm` and `--cgroup` values. Cgroup arguments may be
    /// directories under any cgroup mount (`/sys/fs/cgroup/memory/app`,
    /// `/sys/fs/cgroup/app` on a v2 root) or hierarchy paths (`/app`).
    pub fn new(comms: &[String], cgroups: &[String]) -> Self {
        let mounts = Mounts::current();
        Self {
            comms: comms.to_vec(),
            cgroups: cgroups.iter().map(|c| mounts.relative(c)).collect(),
            everything: false,
        }
    }

    /// Node mode: `--comm` and `--cgroup` when given, else every process.
    pub fn node(comms: &[String], cgroups: &[String]) -> Self {
        let mut s = Self::new(comms, cgroups);
        s.everything = comms.is_empty() && cgroups.is_empty();
        s
    }

    /// The `--cgroup` paths that do not exist (yet) under any cgroup mount:
    /// traced when they appear, but worth a word, since a typo traces
    /// nothing.
    pub fn missing_cgroups(&self) -> Vec<String> {
        let mounts = Mounts::current();
        self.cgroups
            .iter()
            .filter(|c| !mounts.exists(c))
            .cloned()
            .collect()
    }

    /// Whether the selector names anything beyond explicit pids: then the
    /// trace waits for matching processes instead of ending when the
    /// current ones exit.
    pub fn is_open(&self) -> bool {
        self.everything || !self.comms.is_empty() || !self.cgroups.is_empty()
    }

    /// Whether process `pid` matches a name or a cgroup.
    pub fn matches(&self, pid: u32) -> bool {
        if self.everything {
            // Kernel threads are children of kthreadd (pid 2).
            return pid != std::process::id()
                && pid != 2
                && crate::sys::procfs::ppid(pid).is_some_and(|pp| pp != 2);
        }
        if !self.comms.is_empty() {
            if let Some(comm) = crate::sys::procfs::comm(pid) {
                if self.comms.iter().any(|c| comm_matches(c, &comm)) {
                    return true;
                }
            }
        }
        if !self.cgroups.is_empty() {
            let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
                return false;
            };
            let paths = parse_proc_cgroup(&text);
            return self
                .cgroups
                .iter()
                .any(|want| paths.iter().any(|p| cgroup_contains(want, p)));
        }
        false
    }
}

/// `comm` is truncated to 15 bytes by the kernel.
pub fn comm_matches(wanted: &str, comm: &str) -> bool {
    let w = wanted.as_bytes();
    let w = &w[..w.len().min(TASK_COMM_LEN)];
    w == comm.as_bytes()
}

/// Paths from `/proc/PID/cgroup` (`ID:controllers:path` per line).
pub fn parse_proc_cgroup(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_string))
        .collect()
}

/// `want` contains `path` if it is the same cgroup or an ancestor.
pub fn cgroup_contains(want: &str, path: &str) -> bool {
    if want == "/" {
        return true;
    }
    path == want || path.strip_prefix(want).is_some_and(|r| r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_is_truncated_like_the_kernel() {
        assert!(comm_matches("nginx", "nginx"));
        assert!(comm_matches("very-long-worker-name", "very-long-worke"));
        assert!(!comm_matches("nginx", "nginx2"));
    }

    #[test]
    fn cgroup_membership_includes_descendants() {
        let text = "12:memory:/app/worker1\n0::/app/worker1\n";
        let paths = parse_proc_cgroup(text);
        assert!(paths.iter().any(|p| cgroup_contains("/app", p)));
        assert!(!paths.iter().any(|p| cgroup_contains("/ap", p)));
        assert!(paths.iter().any(|p| cgroup_contains("/app/worker1", p)));
    }
}
