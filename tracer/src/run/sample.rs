//! One sample: read the kernel's per-stack totals (or the aged live
//! blocks), the syscall regions and the Go runtime's buckets (scaled like
//! `go tool pprof -inuse_space`), and feed them to the ledger.

use super::*;

impl<K: Kernel> Session<K> {
    /// One reading of the kernel ledger into the ledger's time series.
    pub(super) fn sample(&mut self) -> anyhow::Result<()> {
        let victims = self.drain_events();
        self.ingest()?;
        self.read_go_figures();
        for v in victims {
            self.write_oom_report(v);
        }
        Ok(())
    }

    pub(super) fn ingest(&mut self) -> anyhow::Result<()> {
        let reading = self.probes.read()?;
        let kernel_rows = match self.min_age_ns {
            Some(age) => self.probes.read_aged(age)?,
            None => reading.rows,
        };
        // A Go runtime that samples its heap is accounted through its
        // profile buckets; its heap's mmaps would count the same memory
        // again. Without sampling, the mmaps (with Go stacks) are the
        // attribution that needs no help from the runtime.
        let go_sampling: std::collections::HashSet<u32> = self
            .probes
            .go_targets()
            .into_iter()
            .filter(|(pid, t)| t.rate(*pid).is_ok_and(|r| r > 0))
            .map(|(pid, _)| pid)
            .collect();
        let probes = &self.probes;
        let normalizer = &mut self.normalizer;
        let mut rows: Vec<Row> = kernel_rows
            .iter()
            .map(|(key, totals)| Row {
                stack: normalizer.resolve(key.tgid, key.stack_id, || probes.stack(key.stack_id)),
                pid: key.tgid,
                totals: *totals,
            })
            .collect();
        let region_totals = match self.min_age_ns {
            Some(age) => self
                .regions
                .totals_older_than(crate::ingest::events::monotonic_ns().saturating_sub(age)),
            None => self.regions.totals(),
        };
        for r in region_totals {
            if go_sampling.contains(&r.tgid) {
                continue;
            }
            let bytes = i64::try_from(r.bytes).unwrap_or(i64::MAX);
            rows.push(Row {
                stack: normalizer.resolve(r.tgid, r.stack_id, || probes.stack(r.stack_id)),
                pid: r.tgid,
                totals: StackTotals {
                    outstanding_bytes: bytes,
                    outstanding_allocs: r.regions as i64,
                    total_bytes: r.bytes,
                    total_allocs: r.regions,
                },
            });
        }
        self.go_rows(&mut rows)?;
        self.ledger
            .ingest(self.started.elapsed().as_secs_f64(), &rows);
        self.counters = reading.counters;
        if !self.pairing_warned {
            if let Some(problem) = self.counters.pairing_problem(&procfs::kernel_release()) {
                eprintln!("leaktrace: {problem}");
                self.pairing_warned = true;
            }
        }
        Ok(())
    }

    /// Rows for the Go runtime's sampled heap objects: one per profile
    /// bucket, its stack read from the process on first sight, its bytes
    /// and counts scaled as `go tool pprof -inuse_space` scales them.
    /// Objects allocated before attach and freed since debit a bucket
    /// below zero; such rows count as zero.
    pub(super) fn go_rows(&mut self, rows: &mut Vec<Row>) -> anyhow::Result<()> {
        // Probe counts since attach, plus what each bucket held at attach
        // (walked then; see `GoTarget::walk`).
        let mut raw: HashMap<(u32, u64), StackTotals> = self
            .probes
            .read_go()?
            .into_iter()
            .map(|(k, t)| ((k.tgid, k.bucket), t))
            .collect();
        for (pid, target) in self.probes.go_targets() {
            for b in &target.baseline {
                let t = raw.entry((pid, b.addr)).or_default();
                t.outstanding_bytes += b.live_bytes;
                t.outstanding_allocs += b.live_objects;
                t.total_bytes += b.alloc_bytes;
                t.total_allocs += b.alloc_objects;
                let normalizer = &mut self.normalizer;
                self.go_buckets.entry((pid, b.addr)).or_insert_with(|| {
                    Some((
                        normalizer.intern_go(pid, &b.bucket.pcs),
                        b.bucket.size_bytes,
                    ))
                });
            }
        }
        if raw.is_empty() {
            return Ok(());
        }
        let mut rates: HashMap<u32, i64> = HashMap::new();
        for ((pid, bucket), totals) in raw {
            let normalizer = &mut self.normalizer;
            let Some((stack, size)) = *self.go_buckets.entry((pid, bucket)).or_insert_with(|| {
                match crate::runtime::go::read_bucket(pid, bucket) {
                    Ok(b) => Some((normalizer.intern_go(pid, &b.pcs), b.size_bytes)),
                    Err(e) => {
                        log::debug!("go bucket {bucket:#x} of {pid}: {e}");
                        None
                    }
                }
            }) else {
                continue;
            };
            let rate = *rates.entry(pid).or_insert_with(|| {
                self.probes
                    .go_targets()
                    .into_iter()
                    .find(|(p, _)| *p == pid)
                    .and_then(|(_, t)| t.rate(pid).ok())
                    .unwrap_or(0)
            });
            let avg = if totals.total_allocs > 0 {
                totals.total_bytes as f64 / totals.total_allocs as f64
            } else {
                size as f64
            };
            let f = crate::runtime::go::scale(avg, rate);
            let scaled = |v: i64| (v.max(0) as f64 * f).round() as i64;
            rows.push(Row {
                stack,
                pid,
                totals: StackTotals {
                    outstanding_bytes: scaled(totals.outstanding_bytes),
                    outstanding_allocs: scaled(totals.outstanding_allocs),
                    total_bytes: (totals.total_bytes as f64 * f).round() as u64,
                    total_allocs: (totals.total_allocs as f64 * f).round() as u64,
                },
            });
        }
        Ok(())
    }

    /// Read each running Go process's runtime figures.
    pub(super) fn read_go_figures(&mut self) {
        for (pid, target) in self.probes.go_targets() {
            if self.targets.get(&pid).map(|t| &t.status) != Some(&Status::Running) {
                continue;
            }
            let f = crate::runtime::go::stats::read(pid, &target.stats);
            if f != GoFigures::default() {
                self.go_figures.insert(pid, (Instant::now(), f));
            }
        }
    }

    /// The Go runtime figures of the Go processes traced (of `only` when
    /// given), for a report: at attach and at the last sample.
    pub(super) fn go_runtime(&self, only: Option<u32>) -> Vec<report::GoRuntime> {
        let mut out: Vec<report::GoRuntime> = self
            .probes
            .go_targets()
            .into_iter()
            .filter(|(pid, _)| only.is_none_or(|o| o == *pid))
            .map(|(pid, t)| {
                let (then, first) = t.at_attach;
                let (now, last) = self.go_figures.get(&pid).copied().unwrap_or(t.at_attach);
                report::GoRuntime {
                    pid,
                    version: t.version.clone(),
                    at_attach: first,
                    now: last,
                    elapsed_s: now.saturating_duration_since(then).as_secs_f64(),
                    unavailable: t.stats.missing.clone(),
                }
            })
            .collect();
        out.sort_by_key(|g| g.pid);
        out
    }
}
