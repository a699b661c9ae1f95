//! One sample: read the kernel's per-stack totals (or the aged live
//! blocks), the syscall regions and the rows the runtimes account
//! themselves (the Go heap's profile buckets), and feed them to the ledger.

use super::*;

/// The label of a shared anonymous mapping's row: every process that
/// maps it shares it (it is not the mapper's alone).
const SHARED_LABEL: &str = "[shared memory: MAP_SHARED|MAP_ANONYMOUS]";

impl<K: Kernel> Session<K> {
    /// One reading of the kernel ledger into the ledger's time series.
    pub(super) fn sample(&mut self) -> anyhow::Result<()> {
        // A process's cgroup as of now, for the OOM black box (node mode
        // refreshes the largest ones itself: there may be thousands).
        if !self.watch_only {
            let pids: Vec<u32> = self
                .targets
                .iter()
                .filter(|(_, t)| t.status == Status::Running)
                .map(|(p, _)| *p)
                .collect();
            self.refresh_cgroups(&pids);
        }
        let victims = self.drain_events();
        self.ingest()?;
        self.sample_runtimes();
        self.flush_forgets();
        for v in victims {
            self.on_victim(v);
        }
        Ok(())
    }

    pub(super) fn ingest(&mut self) -> anyhow::Result<()> {
        let reading = self.probes.read()?;
        let mut kernel_rows = match self.min_age_ns {
            Some(age) => self.probes.read_aged(age)?,
            None => reading.rows,
        };
        if !self.pending_forget.is_empty() {
            kernel_rows.retain(|(k, _)| !self.pending_forget.contains(&k.tgid));
        }
        let probes = &self.probes;
        let normalizer = &mut self.normalizer;
        let runtimes = &mut self.runtimes;
        let mut rows: Vec<Row> = kernel_rows
            .iter()
            .map(|(key, totals)| Row {
                stack: normalizer.resolve(key.tgid, key.stack_id, runtimes, || {
                    probes.stack(key.stack_id)
                }),
                pid: key.tgid,
                totals: *totals,
            })
            .collect();
        let allocator_rows = rows.len();
        let region_totals = match self.min_age_ns {
            Some(age) => self
                .regions
                .totals_older_than(crate::ingest::events::monotonic_ns().saturating_sub(age)),
            None => self.regions.totals(),
        };
        // A runtime that accounts its heap itself (a sampling Go runtime)
        // would count its mmaps twice; asked once per process per sample
        // (Go reads its sampling rate from the process).
        let mut own_heap: HashMap<u32, bool> = HashMap::new();
        for r in region_totals {
            if *own_heap
                .entry(r.tgid)
                .or_insert_with(|| runtimes.accounts_heap(r.tgid))
            {
                continue;
            }
            let bytes = i64::try_from(r.bytes).unwrap_or(i64::MAX);
            let mut stack =
                normalizer.resolve(r.tgid, r.stack_id, runtimes, || probes.stack(r.stack_id));
            if r.kind == crate::ingest::mmaps::RegionKind::Shared {
                stack = normalizer.labelled(stack, SHARED_LABEL);
            }
            rows.push(Row {
                stack,
                pid: r.tgid,
                totals: StackTotals {
                    outstanding_bytes: bytes,
                    outstanding_allocs: r.regions as i64,
                    total_bytes: r.bytes,
                    total_allocs: r.regions,
                },
            });
        }
        let region_rows = rows.len();
        self.runtime_rows(&mut rows);
        let runtime_rows = rows.len();
        let (probes, normalizer, runtimes) =
            (&self.probes, &mut self.normalizer, &mut self.runtimes);
        for ((tgid, stack_id), t) in self.faults.totals() {
            if t.total_bytes == 0 {
                continue;
            }
            rows.push(Row {
                stack: normalizer.resolve(tgid, stack_id, runtimes, || probes.stack(stack_id)),
                pid: tgid,
                totals: StackTotals {
                    outstanding_bytes: i64::try_from(t.bytes).unwrap_or(i64::MAX),
                    outstanding_allocs: t.samples as i64,
                    total_bytes: t.total_bytes,
                    total_allocs: t.total_samples,
                },
            });
        }
        let now_s = self.started.elapsed().as_secs_f64();
        match &mut self.by_source {
            // Node mode: each source in its own ledger.
            Some(ledgers) => {
                let groups = [
                    (Source::Allocator, &rows[..allocator_rows]),
                    (Source::Mmap, &rows[allocator_rows..region_rows]),
                    (Source::GoRuntime, &rows[region_rows..runtime_rows]),
                    (Source::PageFault, &rows[runtime_rows..]),
                ];
                for (source, rows) in groups {
                    ledgers.entry(source).or_default().ingest(now_s, rows);
                }
            }
            None => self.ledger.ingest(now_s, &rows),
        }
        self.counters = reading.counters;
        if !self.pairing_warned {
            if let Some(problem) = self.counters.pairing_problem(&procfs::kernel_release()) {
                eprintln!("leaktrace: {problem}");
                self.pairing_warned = true;
            }
        }
        Ok(())
    }

    /// The rows each runtime accounts itself (the Go heap's profile
    /// buckets), each stack normalized once per process.
    fn runtime_rows(&mut self, rows: &mut Vec<Row>) {
        for set in self.runtimes.rows(&self.probes) {
            let code = set.code;
            let runtime_rows = match set.rows {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("runtime rows unreadable: {e}");
                    continue;
                }
            };
            for r in runtime_rows {
                let normalizer = &mut self.normalizer;
                let stack = *self
                    .runtime_stacks
                    .entry((r.pid, r.key))
                    .or_insert_with(|| normalizer.intern_pcs(r.pid, &r.pcs, code));
                rows.push(Row {
                    stack,
                    pid: r.pid,
                    totals: r.totals,
                });
            }
        }
    }

    /// Let each runtime read its figures of the running processes.
    pub(super) fn sample_runtimes(&mut self) {
        let targets = &self.targets;
        self.runtimes
            .sample(&|pid| targets.get(&pid).map(|t| &t.status) == Some(&Status::Running));
    }
}
