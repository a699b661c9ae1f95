//! What a test command leaves running. xtask makes itself the child
//! subreaper, so a process orphaned anywhere below it (a daemon a test
//! started and never stopped, a fixture whose test panicked) becomes its
//! child instead of init's, where it can be named and killed.

use std::{fs, time::Duration};

/// Makes this process the subreaper of everything it starts.
pub(crate) fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!(
            "xtask: warning: cannot become the child subreaper ({}); processes a test \
             leaves behind will not be found",
            std::io::Error::last_os_error()
        );
    }
}

/// Kills this process's children that are still running (they can only be
/// leftovers: the command itself has been waited for), then their children
/// as they are reparented here, and reaps them all. Returns `pid command`
/// for each, with the command's name.
pub(crate) fn kill_leftovers() -> Vec<String> {
    let me = std::process::id();
    let mut killed = Vec::new();
    // Killing a parent hands its children to this process: a few rounds
    // take a tree of any practical depth.
    for _ in 0..16 {
        reap_zombies();
        let children = children_of(me);
        if children.is_empty() {
            break;
        }
        for (pid, what) in children {
            // SAFETY: kill(2) with a pid read from /proc and a constant
            // signal; a pid that was reaped meanwhile gets ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(format!("pid {pid} {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reap_zombies();
    killed
}

/// Every process below this one: `(pid, line)` with its parent, state,
/// where it sleeps in the kernel, and its command line, parents first.
pub(crate) fn descendants() -> Vec<(i32, String)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut all = Vec::new();
    for entry in dir.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, ppid)) = state_and_parent(&stat) {
            all.push((pid, ppid, state));
        }
    }
    let mut below = vec![std::process::id() as i32];
    let mut out = Vec::new();
    // Parents come before children: each round adds the next generation.
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, ppid, state) in &all {
            if below.contains(&pid) || !below.contains(&(ppid as i32)) {
                continue;
            }
            below.push(pid);
            grew = true;
            let proc_dir = format!("/proc/{pid}");
            let wchan = fs::read_to_string(format!("{proc_dir}/wchan")).unwrap_or_default();
            let cmdline = fs::read(format!("{proc_dir}/cmdline")).unwrap_or_default();
            let cmd: String = String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .trim()
                .chars()
                .take(160)
                .collect();
            out.push((
                pid,
                format!("pid {pid} parent {ppid} state {state} wchan {wchan:?}: {cmd}"),
            ));
        }
    }
    out
}

/// Kills every process below this one. The caller waits for its own
/// child; the rest are reaped as leftovers once it has.
pub(crate) fn kill_descendants() {
    for (pid, _) in descendants() {
        // SAFETY: kill(2) with a pid read from /proc and a constant signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Collects every exited child without blocking.
fn reap_zombies() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(-1) with a valid status pointer and WNOHANG.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// Running (not zombie) processes whose parent is `parent`, with their
/// command lines.
fn children_of(parent: u32) -> Vec<(i32, String)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((state, ppid)) = state_and_parent(&stat) else {
            continue;
        };
        if ppid != parent || state == 'Z' {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let what = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim()
            .chars()
            .take(160)
            .collect::<String>();
        out.push((pid, what));
    }
    out
}

/// `/proc/PID/stat`'s state and parent pid. The command name (field 2) may
/// hold spaces and parentheses, so the fields are read after its last `)`.
fn state_and_parent(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both tests kill and reap every child of this process.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn stat_fields_after_an_odd_command_name() {
        assert_eq!(
            state_and_parent("42 (a) b (c)) S 7 42 42 0 -1"),
            Some(('S', 7))
        );
        assert_eq!(state_and_parent("garbage"), None);
    }

    #[test]
    fn an_orphaned_grandchild_is_found_and_killed() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        become_subreaper();
        // The shell backgrounds a sleep and exits: the sleep is orphaned,
        // and comes here instead of to init.
        let st = std::process::Command::new("sh")
            .args(["-c", "sleep 300 >/dev/null 2>&1 &"])
            .status()
            .expect("sh runs");
        assert!(st.success());
        let killed = kill_leftovers();
        assert!(
            killed.iter().any(|k| k.ends_with("sleep 300")),
            "{killed:?}"
        );
        assert!(children_of(std::process::id()).is_empty());
    }

    #[test]
    fn a_stuck_tree_is_listed_parents_first_and_killed() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 301 & wait"])
            .spawn()
            .expect("sh runs");
        std::thread::sleep(Duration::from_millis(300));
        let tree = descendants();
        let sh = tree.iter().position(|(pid, _)| *pid == child.id() as i32);
        let sleep = tree.iter().position(|(_, l)| l.ends_with("sleep 301"));
        assert!(
            matches!((sh, sleep), (Some(a), Some(b)) if a < b),
            "{tree:?}"
        );
        kill_descendants();
        assert!(!child.wait().expect("waited").success());
        std::thread::sleep(Duration::from_millis(200));
        kill_leftovers();
        assert!(!descendants().iter().any(|(_, l)| l.ends_with("sleep 301")));
    }
}
