//! Where the cgroup hierarchies are mounted, read from
//! `/proc/self/mountinfo`: a cgroup v2 root at `/sys/fs/cgroup` (modern
//! distributions, Kubernetes nodes), a v2 root at `/sys/fs/cgroup/unified`
//! beside v1 controllers (hybrid hosts), or v1 alone.
//!
//! Input: mountinfo text. Output: [`Mounts`], which turns a cgroup path as
//! `/proc/PID/cgroup` gives it (`/app`) into the directory that holds its
//! files, and a directory a user names into that path.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The cgroup mounts this process sees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    /// Mount point of the cgroup v2 hierarchy.
    pub v2: Option<PathBuf>,
    /// Mount point of the v1 `memory` controller.
    pub v1_memory: Option<PathBuf>,
    /// Every cgroup mount point (v1 controllers and v2), longest first.
    pub all: Vec<PathBuf>,
}

impl Mounts {
    /// The mounts of this process (none if mountinfo cannot be read).
    pub fn current() -> Self {
        fs::read_to_string("/proc/self/mountinfo")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// Parse mountinfo lines: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... -
    /// FSTYPE SOURCE SUPEROPTS`.
    pub fn parse(mountinfo: &str) -> Self {
        let mut m = Mounts::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let fstype = r.next().unwrap_or("");
            let superopts = r.nth(1).unwrap_or("");
            let point = PathBuf::from(unescape(point));
            match fstype {
                "cgroup2" => {
                    m.v2.get_or_insert(point.clone());
                }
                "cgroup" => {
                    if superopts.split(',').any(|o| o == "memory") {
                        m.v1_memory.get_or_insert(point.clone());
                    }
                }
                _ => continue,
            }
            m.all.push(point);
        }
        m.all
            .sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        m
    }

    /// The directory of v2 cgroup `path` (as in `0::/app`).
    pub fn v2_dir(&self, path: &str) -> Option<PathBuf> {
        self.v2.as_ref().map(|root| join(root, path))
    }

    /// The directory of v1 memory cgroup `path`.
    pub fn v1_memory_dir(&self, path: &str) -> Option<PathBuf> {
        self.v1_memory.as_ref().map(|root| join(root, path))
    }

    /// A cgroup as a user names it, as the hierarchy path `/proc/PID/cgroup`
    /// shows: a directory under any cgroup mount loses the mount point
    /// (`/sys/fs/cgroup/memory/app` -> `/app`, `/sys/fs/cgroup/app` on a v2
    /// root -> `/app`); anything else is taken as a hierarchy path already.
    pub fn relative(&self, user: &str) -> String {
        let p = user.trim_end_matches('/');
        for mount in &self.all {
            if let Ok(rest) = Path::new(p).strip_prefix(mount) {
                return format!("/{}", rest.to_string_lossy());
            }
        }
        format!("/{}", p.trim_start_matches('/'))
    }

    /// Whether hierarchy path `rel` exists under some cgroup mount.
    pub fn exists(&self, rel: &str) -> bool {
        self.all.iter().any(|m| join(m, rel).is_dir())
    }
}

fn join(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str =
        "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";

    #[test]
    fn hybrid_host() {
        let m = Mounts::parse(HYBRID);
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            m.v1_memory.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(m.relative("/sys/fs/cgroup/memory/app/"), "/app");
        assert_eq!(m.relative("/sys/fs/cgroup/unified/a/b"), "/a/b");
        assert_eq!(m.relative("/app"), "/app");
        assert_eq!(m.relative("app"), "/app");
        assert_eq!(
            m.v2_dir("/a"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a"))
        );
    }

    #[test]
    fn pure_v2_root() {
        let m = Mounts::parse(PURE_V2);
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(m.v1_memory, None);
        assert_eq!(
            m.relative("/sys/fs/cgroup/system.slice/x.service"),
            "/system.slice/x.service"
        );
        assert_eq!(m.relative("/sys/fs/cgroup/memory"), "/memory");
        assert_eq!(
            m.v2_dir("/kubepods/pod1"),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/pod1"))
        );
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }
}
