//! Process lifecycle: attaching a process (new, forked, exec'd, matched
//! by name or cgroup, or a descendant a `--pid` had at start; children
//! only without `--no-children`), following forks, execs and exits from the
//! kernel's process events (or a /proc rescan), and dropping what an
//! exited process held.

use super::*;

/// Seconds a process caught before its loader mapped an allocator is
/// tried again.
const LATE_S: u64 = 5;

impl<K: Kernel> Session<K> {
    /// Attach to a process (new, forked, exec'd, or matched by name or
    /// cgroup). Failures are kept as the target's status.
    pub(super) fn add(&mut self, pid: u32) -> Result<(), ProbeError> {
        let Some(id) = ProcId::current(pid) else {
            return Err(ProbeError::NoProcess { pid });
        };
        // A pid reused before its old rows went: they go now.
        if self.pending_forget.contains(&pid) {
            self.flush_forgets();
        }
        if self.watch_only && self.running() >= self.max_targets {
            self.over_limit += 1;
            return Ok(());
        }
        let comm = procfs::comm(pid).unwrap_or_else(|| "?".into());
        let res = if self.watch_only && !self.drilling.contains(&pid) {
            self.recent.push((pid, Instant::now()));
            self.probes
                .watch_process(pid, &mut self.runtimes)
                .map(|()| Default::default())
        } else {
            self.probes.attach_process(pid, &mut self.runtimes)
        };
        let status = match &res {
            Ok(att) => {
                for (object, funcs) in &att.objects {
                    let names: Vec<String> = funcs
                        .iter()
                        .map(|f| match f.offset {
                            0 => f.name.clone(),
                            off => format!("{}+{off}", f.name),
                        })
                        .collect();
                    log::debug!("pid {pid}: {object}: {}", names.join(" "));
                }
                if let Ok(maps) = procfs::read_maps(pid) {
                    if let Some(heap) = maps.iter().find(|m| m.pseudo.as_deref() == Some("[heap]"))
                    {
                        self.regions.set_initial_brk(pid, heap.end);
                    }
                    self.normalizer.remember_maps(pid, maps);
                }
                Status::Running
            }
            Err(e) => Status::NotAttached(e.to_string()),
        };
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
        self.targets.insert(
            pid,
            TargetState {
                id,
                comm,
                status,
                cgroups,
            },
        );
        res.map(|_| ())
    }

    /// A process caught after its exec but before its loader mapped an
    /// allocator (the exec event comes first): tried again at each tick.
    fn defer(&mut self, pid: u32) {
        self.targets.remove(&pid);
        if !self.late.iter().any(|(p, _)| *p == pid) {
            self.late.push((pid, Instant::now()));
        }
    }

    /// Attaches the deferred processes whose loaders have run. One that
    /// still maps no allocator after `LATE_S` has none (a static binary)
    /// and is reported as not traced, like any other.
    pub(super) fn retry_late(&mut self) {
        for (pid, since) in std::mem::take(&mut self.late) {
            if self.targets.contains_key(&pid) {
                continue;
            }
            match self.add(pid) {
                Ok(()) => log::info!("following {pid} once its loader ran"),
                Err(e) if procfs::exiting(pid) => {
                    self.targets.remove(&pid);
                    log::debug!("not following {pid}: {e}");
                }
                Err(ProbeError::NoAllocator { .. })
                    if since.elapsed() < std::time::Duration::from_secs(LATE_S) =>
                {
                    self.targets.remove(&pid);
                    self.late.push((pid, since));
                }
                Err(e) => log::warn!("not following {pid}: {e}"),
            }
        }
    }

    /// Attach to a process named by `--pid` and, unless `--no-children`,
    /// to every descendant it has now: the workers of a prefork master
    /// that already runs. Only the root's failure is returned; a
    /// descendant that exits during the walk is skipped, one that cannot
    /// be traced keeps its reason as its status (the report names it).
    pub(super) fn add_tree(&mut self, root: u32) -> Result<(), ProbeError> {
        let res = self.add(root);
        if !self.follow_children || !self.targets.contains_key(&root) {
            return res;
        }
        let mut attached = 0;
        for pid in procfs::descendants(root) {
            if self.targets.contains_key(&pid) {
                continue;
            }
            match self.add(pid) {
                Ok(()) => attached += 1,
                // Gone between the walk and the attach.
                Err(ProbeError::NoProcess { .. }) => {}
                // Exiting while being attached: its maps or its probes
                // were already gone.
                Err(_) if procfs::exiting(pid) => {
                    self.targets.remove(&pid);
                }
                Err(e) => log::warn!("not tracing process {pid}, a descendant of {root}: {e}"),
            }
        }
        if attached > 0 {
            log::info!("process {root}: {attached} existing descendants traced");
        }
        self.descendants_at_start.insert(root, attached);
        res
    }

    /// Forget everything about a process's address space: it exited, or
    /// exec'd into a new image whose addresses mean something else.
    pub(super) fn drop_address_space(&mut self, pid: u32) {
        self.probes.detach_process(pid, &mut self.runtimes);
        // A watched process (node mode) has no rows in the allocator's
        // tables unless a drill-down probed it; walking those tables per
        // exit is what made many short-lived processes cost.
        // The kernel's rows go at the next reading, all exits since in one
        // pass over each table (a pass per exit kept the event loop from
        // attaching the workers a reload forks meanwhile); until then the
        // readings leave them out.
        if !self.watch_only || self.drilling.contains(&pid) {
            self.pending_forget.insert(pid);
        }
        self.normalizer.forget_process(pid);
        self.runtimes.forget(pid);
        self.runtime_stacks.retain(|(t, _), _| *t != pid);
        self.allocator_stacks.retain(|(t, _), _| *t != pid);
        self.regions.forget(pid);
        self.faults.forget(pid);
    }

    /// Read again the cgroups of `pids` (traced): a process moved into a
    /// cgroup after it was attached (a container runtime's or a test's
    /// move) must be described by where it is when the OOM killer picks
    /// it, and it is often reaped before its event is read.
    pub(super) fn refresh_cgroups(&mut self, pids: &[u32]) {
        for pid in pids {
            if let Some(t) = self.targets.get_mut(pid) {
                if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
                    t.cgroups = Some(text);
                }
            }
        }
    }

    /// Drop the kernel rows of the processes forgotten since the last
    /// reading, in one pass over each table.
    pub(super) fn flush_forgets(&mut self) {
        if self.pending_forget.is_empty() {
            return;
        }
        if let Err(e) = self.probes.forget_processes(&self.pending_forget) {
            log::warn!("{e}");
        }
        self.pending_forget.clear();
    }

    /// A batch read from the process connector: its events, or a rescan
    /// of /proc when the kernel dropped some or the read failed.
    pub(super) fn on_proc_batch(
        &mut self,
        res: io::Result<crate::attach::proc_events::Batch>,
        events: &mut Vec<ProcEvent>,
    ) {
        match res.map(|b| b.overrun) {
            Ok(false) => {}
            Ok(true) => {
                log::warn!("process events overrun; rescanning /proc");
                self.rescan();
            }
            Err(e) => {
                log::warn!("process events failed ({e}); rescanning /proc");
                self.rescan();
            }
        }
        for ev in events.drain(..) {
            self.on_proc_event(ev);
        }
    }

    pub(super) fn on_proc_event(&mut self, ev: ProcEvent) {
        match ev {
            ProcEvent::Fork { parent, child } => {
                let traced_parent = self.follow_children
                    && self
                        .targets
                        .get(&parent)
                        .is_some_and(|t| t.status == Status::Running);
                if (traced_parent || self.selector.matches(child))
                    && !self.targets.contains_key(&child)
                {
                    match self.add(child) {
                        Ok(()) => log::info!("following child {child} of {parent}"),
                        // A child that exited before or while it was
                        // attached (the `sh -c` of a `system()`) leaves no
                        // target and no warning.
                        Err(e) if procfs::exiting(child) => {
                            self.targets.remove(&child);
                            log::debug!("not following child {child} of {parent}: {e}");
                        }
                        // Caught between its exec and its loader.
                        Err(ProbeError::NoAllocator { .. }) => self.defer(child),
                        Err(e) => log::warn!("not following child {child} of {parent}: {e}"),
                    }
                }
            }
            ProcEvent::Exec { pid } => {
                let traced = self
                    .targets
                    .get(&pid)
                    .is_some_and(|t| t.status == Status::Running);
                if traced {
                    self.drop_address_space(pid);
                    self.targets.remove(&pid);
                    match self.add(pid) {
                        Err(e) if procfs::exiting(pid) => {
                            self.targets.remove(&pid);
                            log::debug!("process {pid} exited after its exec: {e}");
                        }
                        Err(ProbeError::NoAllocator { .. }) => self.defer(pid),
                        Err(e) => log::warn!(
                            "process {pid} exec'd into something leaktrace cannot trace: {e}"
                        ),
                        Ok(()) => log::info!("re-attached to {pid} after exec"),
                    }
                } else if self.selector.matches(pid) {
                    self.targets.remove(&pid);
                    if let Err(e) = self.add(pid) {
                        log::warn!("not tracing {pid}: {e}");
                    }
                }
            }
            ProcEvent::Exit { pid } => self.on_exit(pid),
            ProcEvent::Comm { pid } => {
                // A worker that names itself after it was forked
                // (prctl(PR_SET_NAME)) now matches --comm.
                if !self.targets.contains_key(&pid) && self.selector.matches(pid) {
                    match self.add(pid) {
                        Ok(()) => log::info!("following {pid}: renamed to a traced name"),
                        Err(e) => log::warn!("not tracing {pid}: {e}"),
                    }
                }
            }
        }
    }

    pub(super) fn on_exit(&mut self, pid: u32) {
        if !self.targets.contains_key(&pid) {
            return;
        }
        // An OOM kill's event may still be queued: its report needs the
        // rows this exit is about to drop.
        if let Err(e) = self.on_events() {
            log::warn!("{e:#}");
        }
        let Some(t) = self.targets.get_mut(&pid) else {
            return;
        };
        if t.status != Status::Running {
            return;
        }
        t.status = Status::Exited;
        log::info!("process {pid} ({}) exited", t.comm);
        // The last process of a fixed set keeps its data for the final
        // report; otherwise its memory is gone and so are its rows (a
        // recycled worker must not look like a leak, and its pid may be
        // reused).
        if self.watch_only {
            // Node mode: nothing of an exited process stays (1,000
            // short-lived processes must not grow leaktrace).
            self.drop_address_space(pid);
            self.targets.remove(&pid);
            self.drilling.remove(&pid);
        } else if self.running() > 0 || !self.closed_set {
            self.drop_address_space(pid);
        } else {
            self.probes.detach_process(pid, &mut self.runtimes);
        }
    }

    /// Without the process connector: find new children and matches in
    /// `/proc`, and exits by polling.
    pub(super) fn rescan(&mut self) {
        let exited: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, t)| t.status == Status::Running && !t.id.alive())
            .map(|(p, _)| *p)
            .collect();
        for pid in exited {
            self.on_exit(pid);
        }
        for pid in procfs::all_pids() {
            if self.targets.contains_key(&pid) {
                continue;
            }
            let parent_traced = self.follow_children
                && procfs::ppid(pid).is_some_and(|pp| {
                    self.targets
                        .get(&pp)
                        .is_some_and(|t| t.status == Status::Running)
                });
            if parent_traced || self.selector.matches(pid) {
                let _ = self.add(pid);
            }
        }
    }

    /// Libraries loaded since the last look (dlopen) get their probes.
    pub(super) fn refresh_objects(&mut self) {
        let pids: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, t)| t.status == Status::Running)
            .map(|(p, _)| *p)
            .collect();
        for pid in pids {
            self.refresh_process(pid);
        }
    }

    /// A traced process's new objects (dlopen, a libpython loaded late by
    /// an embedding host) get their probes and unwind tables.
    pub(super) fn refresh_process(&mut self, pid: u32) {
        if self.targets.get(&pid).map(|t| &t.status) != Some(&Status::Running) {
            return;
        }
        let res = if self.watch_only && !self.drilling.contains(&pid) {
            self.probes.watch_process(pid, &mut self.runtimes)
        } else {
            self.probes
                .attach_process(pid, &mut self.runtimes)
                .map(|_| ())
        };
        if let Err(e) = res {
            log::debug!("refresh of {pid}: {e}");
        }
    }

    /// Apply queued kernel events; returns the OOM victims among them.
    pub(super) fn drain_events(&mut self) -> Vec<u32> {
        self.syscall_buf.clear();
        self.probes.drain_syscalls(&mut self.syscall_buf);
        let mut victims = Vec::new();
        let mut new_code: Vec<u32> = Vec::new();
        for ev in &self.syscall_buf {
            if ev.nr == sys::OOM_VICTIM {
                victims.push(ev.tgid);
                continue;
            }
            if ev.nr == sys::MMAP_EXEC {
                if !new_code.contains(&ev.tgid) {
                    new_code.push(ev.tgid);
                }
                continue;
            }
            let mut ev = *ev;
            if ev.flags & SYSCALL_IN_ALLOCATOR == 0
                && ev.nr != sys::MUNMAP
                && ev.nr != sys::PAGE_FAULT
            {
                let probes = &self.probes;
                let inside = *self
                    .allocator_stacks
                    .entry((ev.tgid, ev.stack_id))
                    .or_insert_with(|| {
                        probes
                            .stack(ev.stack_id)
                            .is_some_and(|s| probes.inside_allocator(ev.tgid, &s.ips))
                    });
                if inside {
                    ev.flags |= SYSCALL_IN_ALLOCATOR;
                }
            }
            apply_syscall(&mut self.regions, &mut self.faults, &ev);
        }
        for pid in new_code {
            self.refresh_process(pid);
        }
        victims
    }
}
