//! Other eBPF tracers on the machine while the bench runs: they share the
//! probes on libc and compete for the cores, so rows measured alongside
//! one are marked in the tables.
//!
//! Imports: `procfs`. Samples /proc on a thread of its own; never fails
//! (a process that cannot be read is not a tracer).

use std::{
    fs,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use super::procfs;

/// When other tracers were seen, and which.
type Sightings = Arc<Mutex<Vec<(Instant, Vec<String>)>>>;

/// Samples, twice a second, which processes outside this benchmark hold
/// eBPF programs attached through links or perf events: other tracers.
/// Rows that ran alongside one are marked in the tables.
pub(super) struct Watch {
    seen: Sightings,
    stop: Arc<AtomicBool>,
    /// Time left to wait for the others to finish, over the whole run.
    wait_budget: Mutex<Duration>,
}

impl Watch {
    pub(super) fn start() -> Watch {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let now = other_tracers();
                if !now.is_empty() {
                    if let Ok(mut v) = s.lock() {
                        v.push((Instant::now(), now));
                    }
                }
                thread::sleep(Duration::from_millis(500));
            }
        });
        Watch {
            seen,
            stop,
            wait_budget: Mutex::new(Duration::from_secs(120)),
        }
    }

    /// Waits (up to 20 s, and 120 s over the run) until no other tracer
    /// runs.
    pub(super) fn wait_quiet(&self) {
        let Ok(mut budget) = self.wait_budget.lock() else {
            return;
        };
        let t0 = Instant::now();
        let limit = (*budget).min(Duration::from_secs(20));
        let mut told = false;
        while t0.elapsed() < limit {
            let now = other_tracers();
            if now.is_empty() {
                break;
            }
            if !told {
                eprintln!(
                    "xtask: bench: waiting up to {:.0} s for other tracers to finish: {}",
                    limit.as_secs_f64(),
                    now.join(", ")
                );
                told = true;
            }
            thread::sleep(Duration::from_millis(500));
        }
        *budget = budget.saturating_sub(t0.elapsed());
    }

    /// `comm (pid)` of the tracers seen since `t0`, sorted, once each.
    pub(super) fn seen_since(&self, t0: Instant) -> Vec<String> {
        let mut names: Vec<String> = self
            .seen
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(t, _)| *t >= t0)
                    .flat_map(|(_, n)| n.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `comm (pid)` of every process outside this benchmark's process tree
/// that holds an eBPF program and a link or perf event.
fn other_tracers() -> Vec<String> {
    let me = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| holds_attached_program(pid) && !descends_from(pid, me))
        .map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{} ({pid})", comm.trim())
        })
        .collect()
}

/// Whether `pid` holds an eBPF program and something that attaches one.
fn holds_attached_program(pid: u32) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let (mut prog, mut attached) = (false, false);
    for fd in fds.flatten() {
        if let Ok(target) = fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            prog |= t == "anon_inode:bpf-prog";
            attached |= t == "anon_inode:bpf_link" || t == "anon_inode:[perf_event]";
        }
    }
    prog && attached
}

fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        if pid <= 1 {
            return false;
        }
        let Some(ppid) = procfs::parent(pid) else {
            return false;
        };
        pid = ppid;
    }
    false
}
