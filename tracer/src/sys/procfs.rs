//! Reading `/proc`: does a process exist (and is it still the same one),
//! its name, its descendants, and its memory map.
//!
//! Parsing is pure and unit-tested; the readers are thin.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Identity of a process that survives pid reuse: pid plus start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcId {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

impl ProcId {
    /// The process as it is now, or `None` when no process has that pid.
    pub fn current(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Self {
            pid,
            start_ticks: parse_start_ticks(&stat)?,
        })
    }

    /// Whether this very process (not a later one with the same pid) lives.
    pub fn alive(&self) -> bool {
        match Self::current(self.pid) {
            Some(now) => now == *self && !is_zombie(self.pid),
            None => false,
        }
    }
}

/// Whether process `pid` is gone or on its way out: a zombie, or past the
/// start of `exit(2)` (`PF_EXITING` in the flags of `/proc/PID/stat`),
/// where its memory map may already be torn down.
pub fn exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some(fields) = stat_fields_after_comm(&stat) else {
        return true;
    };
    // State is field 3 overall, flags field 9: the 1st and 7th after comm.
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    matches!(fields.first(), Some(&"Z" | &"X" | &"x")) || flags & PF_EXITING != 0
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_fields_after_comm(&s).and_then(|f| f.first().map(|s| *s == "Z")))
        .unwrap_or(true)
}

/// Fields of `/proc/PID/stat` after the `(comm)` field, which may itself
/// hold spaces and parentheses.
fn stat_fields_after_comm(stat: &str) -> Option<Vec<&str>> {
    let close = stat.rfind(')')?;
    Some(stat.get(close + 1..)?.split_whitespace().collect())
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // Field 22 overall is the 20th after comm (state is field 3).
    stat_fields_after_comm(stat)?.get(19)?.parse().ok()
}

/// The process name (`/proc/PID/comm`), or `None` when it is gone.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Parent process id, from `/proc/PID/stat`.
pub fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields_after_comm(&stat)?.get(1)?.parse().ok()
}

/// Thread group id of a task, from `/proc/PID/status`.
pub fn tgid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// File offset of `start`.
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    /// The path as the process sees it (inside its mount namespace), with
    /// any ` (deleted)` suffix removed; `None` for anonymous mappings.
    pub path: Option<String>,
    pub deleted: bool,
    /// `[heap]`, `[stack]`, `[vdso]`...
    pub pseudo: Option<String>,
}

impl MapEntry {
    /// A path that opens this mapping's file from the tracer, even when the
    /// file lives in another mount namespace or was deleted: the kernel's
    /// `map_files` link (root only), else the file through the process root.
    pub fn open_path(&self, pid: u32) -> Option<PathBuf> {
        let path = self.path.as_ref()?;
        let map_file = PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ));
        if self.deleted || fs::metadata(&map_file).is_ok() {
            return Some(map_file);
        }
        Some(Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/')))
    }
}

/// Parse the text of `/proc/PID/maps`. Malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?.to_string();
    let inode: u64 = it.next()?.parse().ok()?;
    let rest = it.next().unwrap_or("").trim_start();
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = perms.as_bytes();
    let (path, deleted, pseudo) = if rest.is_empty() {
        (None, false, None)
    } else if rest.starts_with('[') {
        (None, false, Some(rest.to_string()))
    } else if let Some(p) = rest.strip_suffix(" (deleted)") {
        (Some(p.to_string()), true, None)
    } else {
        (Some(rest.to_string()), false, None)
    };
    Some(MapEntry {
        start,
        end,
        readable: perms.first() == Some(&b'r'),
        writable: perms.get(1) == Some(&b'w'),
        executable: perms.get(2) == Some(&b'x'),
        offset,
        dev,
        inode,
        path,
        deleted,
        pseudo,
    })
}

/// Read and parse `/proc/PID/maps`.
pub fn read_maps(pid: u32) -> io::Result<Vec<MapEntry>> {
    Ok(parse_maps(&fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

/// Pids of all processes now running.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every descendant of `root` now running (children, grandchildren, ...),
/// from each process's parent in `/proc/PID/stat`. A process that exits
/// during the walk is simply not listed; one forked during it may be
/// missed (the caller follows forks from then on).
pub fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|pid| Some((pid, ppid(pid)?)))
        .collect();
    descendants_in(root, &parents)
}

/// The descendants of `root` in a snapshot of `(pid, parent pid)` pairs,
/// nearest first (children before grandchildren), each once.
pub fn descendants_in(root: u32, parents: &[(u32, u32)]) -> Vec<u32> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for &(pid, parent) in parents {
        // pid 0's "children" are init and kthreadd, not descendants.
        if pid != parent && pid != 0 {
            children.entry(parent).or_default().push(pid);
        }
    }
    for kids in children.values_mut() {
        kids.sort_unstable();
    }
    let mut seen = std::collections::HashSet::from([root]);
    let mut out = Vec::new();
    let mut next = 0;
    let mut frontier = vec![root];
    // Breadth first over a snapshot: `seen` stops a cycle, which a pid
    // reused between two reads of a live /proc could make.
    while let Some(&pid) = frontier.get(next) {
        next += 1;
        for &kid in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(kid) {
                out.push(kid);
                frontier.push(kid);
            }
        }
    }
    out
}

/// `len` bytes of process `pid` at `addr`.
pub fn read_mem(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, &'static str> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: both iovecs describe valid memory of the stated length (the
    // remote one is checked by the kernel).
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 || n as usize != len {
        return Err("process memory unreadable");
    }
    Ok(buf)
}

/// A kernel release as (major, minor), from `6.12.118+deb12-amd64`.
pub fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The running kernel's release (`uname -r`), or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_children_then_grandchildren_and_nothing_else() {
        // 1 -> 100 -> {200, 201}, 201 -> 300; 100 -> 202 listed before its
        // parent; 150 is a sibling of 100, 400 a stranger.
        let procs = [
            (1, 0),
            (202, 100),
            (100, 1),
            (150, 1),
            (200, 100),
            (201, 100),
            (300, 201),
            (400, 150),
        ];
        assert_eq!(descendants_in(100, &procs), vec![200, 201, 202, 300]);
        assert_eq!(descendants_in(300, &procs), Vec::<u32>::new());
        assert_eq!(descendants_in(999, &procs), Vec::<u32>::new());
        // A cycle (pids reused between reads) ends.
        assert_eq!(descendants_in(5, &[(5, 6), (6, 5)]), vec![6]);
    }

    #[test]
    fn a_live_process_is_not_exiting_and_a_reaped_one_is() {
        assert!(!exiting(std::process::id()));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("start true");
        let pid = child.id();
        let _ = child.wait();
        assert!(exiting(pid), "reaped");
    }

    #[test]
    fn descendants_of_this_process_include_a_child_it_started() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let found = descendants(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?}");
    }

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234                       /usr/bin/demo
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234                       /usr/bin/demo
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2c600000-7f1e2c628000 r--p 00000000 fe:01 777                        /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2c628000-7f1e2c79d000 r-xp 00028000 fe:01 777                        /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2c800000-7f1e2c801000 r-xp 00000000 fe:01 99                         /tmp/old lib.so (deleted)
7ffd5b1d4000-7ffd5b1f5000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_paths_offsets_and_flags() {
        let maps = parse_maps(MAPS);
        assert_eq!(maps.len(), 7);
        let libc_text = &maps[4];
        assert_eq!(libc_text.start, 0x7f1e2c628000);
        assert_eq!(libc_text.offset, 0x28000);
        assert!(libc_text.executable);
        assert_eq!(
            libc_text.path.as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(maps[2].path, None);
        assert_eq!(maps[5].path.as_deref(), Some("/tmp/old lib.so"));
        assert!(maps[5].deleted);
        assert_eq!(maps[6].pseudo.as_deref(), Some("[stack]"));
    }

    #[test]
    fn start_time_survives_odd_comm() {
        let stat =
            "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_start_ticks(stat), Some(987654));
    }
}
