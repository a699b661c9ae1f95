//! The Go runtime behind the runtime seam: entry probes on its profiling
//! hooks at attach, its heap as profile-bucket rows scaled as `go tool
//! pprof -inuse_space` scales them, its own figures, and its notes.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::Path,
    sync::Arc,
    time::Instant,
};

use tracer_common::StackTotals;

use super::{stats::GoFigures, *};
use crate::runtime::{
    AttachFailure, Attacher, Figures, Found, KernelRecords, Language, Probed, RowCode, Runtime,
    RuntimeRow,
};

/// A Go process's runtime figures, read from its memory: at the first
/// sample after attach and at the last one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GoReport {
    pub pid: u32,
    /// `go1.19.8`.
    pub version: String,
    pub at_attach: GoFigures,
    pub now: GoFigures,
    /// Seconds between the two readings.
    pub elapsed_s: f64,
    /// Figures that cannot be read, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

/// A profile bucket's stack (return PCs) and object size.
type BucketStack = (Arc<[u64]>, u64);

/// The Go runtimes in the traced processes.
#[derive(Debug, Default)]
pub struct Go {
    /// `--go-enable-profiling`: the rate written into a runtime that
    /// samples nothing.
    enable_profiling: Option<u64>,
    /// What each executable says about a Go runtime in it, by (device, inode).
    objects: HashMap<(String, u64), Option<GoObjectInfo>>,
    /// Executables looked at per process (a refusal is noted once).
    looked: HashSet<(u32, String, u64)>,
    /// The runtime traced per process.
    targets: HashMap<u32, GoTarget>,
    /// Each bucket's stack and object size, read once per process.
    buckets: HashMap<(u32, u64), Option<BucketStack>>,
    /// The runtime's figures at the latest sample.
    figures: HashMap<u32, (Instant, GoFigures)>,
    /// Why a Go heap is not shown.
    notes: Vec<String>,
}

impl Go {
    pub fn new(enable_profiling: Option<u64>) -> Self {
        Self {
            enable_profiling,
            ..Self::default()
        }
    }

    /// Entry probes on the profiling hooks of the Go executable mapped at
    /// `m`, then the runtime's buckets and figures as they are now; or why
    /// not (`Ok(Err(reason))`).
    fn attach_object(
        &mut self,
        pid: NonZeroU32,
        m: &MapEntry,
        open_path: &Path,
        info: &GoObjectInfo,
        kernel: &mut dyn Attacher,
    ) -> Result<Result<Vec<Probed>, String>, AttachFailure> {
        let path = m.path.clone().unwrap_or_default();
        if let Some(why) = info.refusal(&path) {
            return Ok(Err(why));
        }
        let Some(mut target) = GoTarget::new(m, info) else {
            return Ok(Err(format!(
                "{path} ({}): its mapping at {:#x} matches no load segment",
                info.version, m.start
            )));
        };
        let mut done = Vec::new();
        for (function, program, offset) in [
            (
                "runtime.setprofilebucket",
                "go_setprofilebucket",
                info.setprofilebucket,
            ),
            ("runtime.mProf_Free", "go_mprof_free", info.mprof_free),
        ] {
            let Some(offset) = offset else { continue };
            // Past the stack check, at the emulated `PUSHQ BP` (Go 1.21+):
            // no single-step per sampled object.
            let skip = first_code(open_path, offset).map_or(0, |c| code::go_probe_offset(&c));
            kernel
                .entry_probe(pid, program, open_path, offset + skip)
                .map_err(|reason| AttachFailure {
                    function: function.to_string(),
                    object: path.clone(),
                    reason,
                })?;
            done.push(Probed {
                function: function.to_string(),
                offset: skip,
            });
        }
        let pid = pid.get();
        match target.rate(pid) {
            Ok(0) => {
                if let Some(rate) = self.enable_profiling {
                    match target.set_rate(pid, rate) {
                        Ok(()) => eprintln!(
                            "leaktrace: wrote runtime.MemProfileRate = {rate} into process {pid} \
                             ({path}, {}): this changes the target; its Go runtime samples heap \
                             allocations from now on",
                            target.version
                        ),
                        Err(e) => self.notes.push(format!(
                            "process {pid}: failed to write runtime.MemProfileRate through \
                             /proc/{pid}/mem: {e}"
                        )),
                    }
                }
            }
            Ok(rate) => log::debug!("pid {pid}: {} MemProfileRate {rate}", target.version),
            Err(e) => log::warn!("pid {pid}: runtime.MemProfileRate unreadable: {e}"),
        }
        // Right after the probes are in: what was allocated before, and
        // the runtime's figures to compare later ones with.
        target.walk(pid);
        target.at_attach = (Instant::now(), stats::read(pid, &target.stats));
        match &target.baseline_error {
            None => log::debug!(
                "pid {pid}: {} Go profile buckets live at attach",
                target.baseline.len()
            ),
            Some(why) => self.notes.push(format!(
                "process {pid}: Go objects allocated before leaktrace attached are not shown \
                 (the runtime's profile buckets could not be walked: {why})"
            )),
        }
        self.targets.insert(pid, target);
        Ok(Ok(done))
    }
}

/// The first 16 bytes of the function at file offset `offset` of `path`.
fn first_code(path: &Path, offset: u64) -> Option<[u8; 16]> {
    use std::os::unix::fs::FileExt as _;
    let mut code = [0u8; 16];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut code, offset)
        .ok()?;
    Some(code)
}

impl Runtime for Go {
    fn name(&self) -> &'static str {
        "go"
    }

    fn attach(
        &mut self,
        pid: NonZeroU32,
        maps: &[MapEntry],
        kernel: &mut dyn Attacher,
    ) -> Result<Found, AttachFailure> {
        let mut found = Found::default();
        // Watched only (node mode): the heap's growth shows through page
        // faults with Go's own frames; its profile needs probes.
        if self.targets.contains_key(&pid.get()) || !kernel.probes_allowed() {
            return Ok(found);
        }
        for m in maps.iter().filter(|m| m.executable) {
            let Some(path) = m.path.clone() else { continue };
            if !self.looked.insert((pid.get(), m.dev.clone(), m.inode)) {
                continue;
            }
            let Some(open_path) = m.open_path(pid.get()) else {
                continue;
            };
            let info = self
                .objects
                .entry((m.dev.clone(), m.inode))
                .or_insert_with(|| inspect_object(&open_path))
                .clone();
            let Some(info) = info else { continue };
            match self.attach_object(pid, m, &open_path, &info, kernel)? {
                Ok(probed) => found.objects.push((path, probed)),
                Err(why) => {
                    log::warn!("{why}");
                    self.notes.push(format!("process {pid}: {why}"));
                    found.refusal = Some(why);
                }
            }
        }
        Ok(found)
    }

    fn detach(&mut self, pid: u32, _kernel: &mut dyn Attacher) {
        self.targets.remove(&pid);
        self.looked.retain(|(p, _, _)| *p != pid);
    }

    fn forget(&mut self, pid: u32) {
        self.buckets.retain(|(p, _), _| *p != pid);
        self.figures.remove(&pid);
    }

    /// A Go runtime that samples its heap is accounted through its profile
    /// buckets; without sampling, the heap's mmaps (with Go stacks) are
    /// the attribution that needs no help from the runtime.
    fn accounts_heap(&self, pid: u32) -> bool {
        self.targets
            .get(&pid)
            .is_some_and(|t| t.rate(pid).is_ok_and(|r| r > 0))
    }

    /// One row per profile bucket: the probes' counts since attach plus
    /// what the bucket held at attach (see `GoTarget::walk`), scaled as
    /// `go tool pprof -inuse_space` scales them. Objects allocated before
    /// attach and freed since debit a bucket below zero; such rows count
    /// as zero.
    fn rows(&mut self, kernel: &dyn KernelRecords) -> Result<Vec<RuntimeRow>, String> {
        let mut raw: HashMap<(u32, u64), StackTotals> = kernel
            .go_buckets()?
            .into_iter()
            .map(|(k, t)| ((k.tgid, k.bucket), t))
            .collect();
        for (pid, target) in &self.targets {
            for b in &target.baseline {
                let t = raw.entry((*pid, b.addr)).or_default();
                t.outstanding_bytes += b.live_bytes;
                t.outstanding_allocs += b.live_objects;
                t.total_bytes += b.alloc_bytes;
                t.total_allocs += b.alloc_objects;
                self.buckets
                    .entry((*pid, b.addr))
                    .or_insert_with(|| Some((b.bucket.pcs.clone().into(), b.bucket.size_bytes)));
            }
        }
        let mut rates: HashMap<u32, i64> = HashMap::new();
        let mut rows = Vec::with_capacity(raw.len());
        for ((pid, bucket), totals) in raw {
            let Some((pcs, size)) = self
                .buckets
                .entry((pid, bucket))
                .or_insert_with(|| match read_bucket(pid, bucket) {
                    Ok(b) => Some((b.pcs.into(), b.size_bytes)),
                    Err(e) => {
                        log::debug!("go bucket {bucket:#x} of {pid}: {e}");
                        None
                    }
                })
                .clone()
            else {
                continue;
            };
            let rate = *rates.entry(pid).or_insert_with(|| {
                self.targets
                    .get(&pid)
                    .and_then(|t| t.rate(pid).ok())
                    .unwrap_or(0)
            });
            let avg = if totals.total_allocs > 0 {
                totals.total_bytes as f64 / totals.total_allocs as f64
            } else {
                size as f64
            };
            let f = scale(avg, rate);
            let scaled = |v: i64| (v.max(0) as f64 * f).round() as i64;
            rows.push(RuntimeRow {
                pid,
                key: bucket,
                pcs,
                totals: StackTotals {
                    outstanding_bytes: scaled(totals.outstanding_bytes),
                    outstanding_allocs: scaled(totals.outstanding_allocs),
                    total_bytes: (totals.total_bytes as f64 * f).round() as u64,
                    total_allocs: (totals.total_allocs as f64 * f).round() as u64,
                },
            });
        }
        Ok(rows)
    }

    /// Bucket stacks are Go code and start in the runtime's allocator
    /// (`runtime.mallocgc`), dropped as `runtime/pprof` drops them.
    fn row_code(&self) -> Option<RowCode> {
        Some(RowCode {
            language: Language::Go,
            drop_prefix: "runtime.",
        })
    }

    fn sample(&mut self, running: &dyn Fn(u32) -> bool) {
        for (pid, target) in &self.targets {
            if !running(*pid) {
                continue;
            }
            let f = stats::read(*pid, &target.stats);
            if f != GoFigures::default() {
                self.figures.insert(*pid, (Instant::now(), f));
            }
        }
    }

    fn figures(&self, only: Option<u32>) -> Vec<Figures> {
        let mut out: Vec<GoReport> = self
            .targets
            .iter()
            .filter(|(pid, _)| only.is_none_or(|o| o == **pid))
            .map(|(pid, t)| {
                let (then, first) = t.at_attach;
                let (now, last) = self.figures.get(pid).copied().unwrap_or(t.at_attach);
                GoReport {
                    pid: *pid,
                    version: t.version.clone(),
                    at_attach: first,
                    now: last,
                    elapsed_s: now.saturating_duration_since(then).as_secs_f64(),
                    unavailable: t.stats.missing.clone(),
                }
            })
            .collect();
        out.sort_by_key(|g| g.pid);
        out.into_iter().map(Figures::Go).collect()
    }

    /// Its notes, then one per process whose runtime samples nothing.
    fn notes(&self) -> Vec<String> {
        let mut notes = self.notes.clone();
        let mut targets: Vec<(&u32, &GoTarget)> = self.targets.iter().collect();
        targets.sort_by_key(|(p, _)| **p);
        for (pid, target) in targets {
            if target.rate(*pid) == Ok(0) {
                notes.push(rate_zero_note(*pid, target));
            }
        }
        notes
    }
}
