//! Building a report from the session: the ledger's stacks, the notes
//! (losses, pairing self-check, unwinder and runtime notes, descendants
//! attached at start), the Go runtime figures; and the OOM black box's
//! files.

use super::*;

impl<K: Kernel> Session<K> {
    /// The OOM black box: the victim's outstanding stacks, its cgroup and
    /// memory figures, as JSON and folded stacks in `--oom-dir`.
    pub(super) fn write_oom_report(&mut self, pid: u32) {
        let comm = self
            .targets
            .get(&pid)
            .map(|t| t.comm.clone())
            .or_else(|| procfs::comm(pid))
            .unwrap_or_else(|| "?".into());
        let mut notes = vec![format!("the OOM killer chose process {pid} ({comm})")];
        let known = self.targets.get(&pid).and_then(|t| t.cgroups.as_deref());
        notes.extend(crate::oom::victim_facts(pid, known));
        let ledger = self.ledger.only_pid(pid);
        let figures = self.runtimes.figures(Some(pid));
        let (normalizer, symbolizer) = (&self.normalizer, &mut self.symbolizer);
        let report = report::build(
            report::Inputs {
                duration_s: self.started.elapsed().as_secs_f64(),
                targets: vec![Target {
                    pid,
                    comm: comm.clone(),
                    status: "oom-killed".into(),
                }],
                counters: &self.counters,
                ledger: &ledger,
                top: self.top,
                sort: self.sort,
                notes,
                sample_bytes: self.sample_bytes,
                figures,
            },
            &mut |idxs| symbolizer.symbolize(normalizer, idxs),
        );
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = self.oom_dir.join(format!("leaktrace-oom-{pid}-{stamp}"));
        let json = base.with_extension("json");
        let folded = base.with_extension("folded");
        let res = std::fs::create_dir_all(&self.oom_dir)
            .and_then(|()| {
                let mut f = io::BufWriter::new(File::create(&json)?);
                report::json::write(&report, &mut f)?;
                f.flush()
            })
            .and_then(|()| {
                let mut f = io::BufWriter::new(File::create(&folded)?);
                report::folded::write(&report, &mut f)?;
                f.flush()
            });
        match res {
            Ok(()) => eprintln!(
                "leaktrace: the OOM killer chose process {pid} ({comm}); its report is in {} and {}",
                json.display(),
                folded.display()
            ),
            Err(e) => eprintln!(
                "leaktrace: the OOM killer chose process {pid} ({comm}) but its report could not be written to {}: {e}",
                self.oom_dir.display()
            ),
        }
    }

    pub(super) fn report(&mut self, cfg: &Config) -> Report {
        self.report_top(cfg, cfg.top)
    }

    pub(super) fn report_top(&mut self, cfg: &Config, top: usize) -> Report {
        let mut notes = Vec::new();
        if let Some(problem) = self.counters.pairing_problem(&procfs::kernel_release()) {
            notes.push(problem);
        }
        let repeated = self.counters.get(Counter::RepeatedReturns);
        if repeated > 0 {
            notes.push(format!(
                "this kernel runs the return probe of every traced process that maps an \
                 allocator for each return ({repeated} repeated runs, not losses): tracing many \
                 processes that share a library costs more per allocation here than on newer \
                 kernels (Linux 6.18 runs only the process's own)"
            ));
        }
        let late_vms = self.counters.get(Counter::LuaVmsAfterAttach);
        if late_vms > 0 {
            notes.push(format!(
                "{late_vms} LuaJIT VM{} made after attach allocated (an nginx reload makes one \
                 in the master, lua_code_cache off one per request): their memory has native \
                 stacks, without Lua frames, and counts at once; a VM that closes frees its \
                 blocks by unmapping them, so they stay counted until their addresses are \
                 reused, and rows under a VM's start-up can grow slowly without a leak",
                if late_vms == 1 { "" } else { "s" }
            ));
        }
        let lost: Vec<String> = Counter::ALL
            .iter()
            .filter(|c| c.is_loss() && self.counters.get(**c) > 0)
            .map(|c| {
                format!(
                    "{} {} ({})",
                    self.counters.get(*c),
                    c.name(),
                    crate::ingest::events::loss_meaning(*c)
                )
            })
            .collect();
        if !lost.is_empty() {
            notes.push(format!("events lost: {}", lost.join("; ")));
        }
        if self.regions.dropped() > 0 {
            notes.push(format!(
                "{} mmap/brk regions not tracked (region table full)",
                self.regions.dropped()
            ));
        }
        if cfg.sample_bytes > 0 {
            notes.push(format!(
                "allocations sampled by bytes (mean period {} bytes): bytes and counts are \
                 estimates; each stack's relative error is about sqrt(period / bytes)",
                cfg.sample_bytes
            ));
        }
        if let Err(why) = self.probes.oom() {
            notes.push(format!("OOM black box unavailable: {why}"));
        }
        let un = self.probes.unwind_notes();
        if !un.table_full.is_empty() {
            notes.push(format!(
                "unwind table full (raise --max-unwind-rows); frame pointers used for: {}",
                un.table_full.join(", ")
            ));
        }
        if !un.unreadable.is_empty() {
            notes.push(format!(
                "unwind info unreadable: {}",
                un.unreadable.join("; ")
            ));
        }
        notes.extend(self.runtimes.notes());
        if let Some(age) = self.min_age_ns {
            notes.push(format!(
                "only allocations older than {:.1}s are counted (--min-age)",
                age as f64 / 1e9
            ));
        }
        for (root, n) in &self.descendants_at_start {
            if *n > 0 {
                let comm = self.targets.get(root).map_or("?", |t| t.comm.as_str());
                let what = if *n == 1 { "descendant" } else { "descendants" };
                notes.push(format!(
                    "process {root} ({comm}): {n} existing {what} traced"
                ));
            }
        }
        if !self.follow_children {
            notes.push(
                "children of traced processes are not traced (--no-children), existing or \
                 forked later"
                    .into(),
            );
        }
        let mut pids: Vec<&u32> = self.targets.keys().collect();
        pids.sort();
        for pid in &pids {
            if let Some(TargetState {
                status: Status::NotAttached(why),
                comm,
                ..
            }) = self.targets.get(pid)
            {
                notes.push(format!("process {pid} ({comm}) not traced: {why}"));
            }
        }
        let targets = pids
            .iter()
            .filter_map(|pid| self.targets.get(pid).map(|t| (**pid, t)))
            .map(|(pid, t)| Target {
                pid,
                comm: t.comm.clone(),
                status: match &t.status {
                    Status::Running => "running".into(),
                    Status::Exited => "exited".into(),
                    Status::NotAttached(why) => format!("not attached: {why}"),
                },
            })
            .collect();
        let figures = self.runtimes.figures(None);
        let (normalizer, symbolizer) = (&self.normalizer, &mut self.symbolizer);
        report::build(
            report::Inputs {
                duration_s: self.started.elapsed().as_secs_f64(),
                targets,
                counters: &self.counters,
                ledger: &self.ledger,
                top,
                sort: cfg.sort,
                notes,
                sample_bytes: cfg.sample_bytes,
                figures,
            },
            &mut |idxs| symbolizer.symbolize(normalizer, idxs),
        )
    }
}
