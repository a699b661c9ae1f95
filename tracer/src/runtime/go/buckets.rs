//! The Go runtime's heap profile buckets read from the live process: one
//! bucket's stack and size, the walk of `runtime.mbuckets` at attach (what
//! was allocated before leaktrace came), and the scaling `go tool pprof`
//! applies to sampled counts.

use super::*;

/// A bucket as read from the process: bytes per object and the return
/// PCs of its stack, innermost first (the allocator's own frames are
/// already skipped by the runtime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub size_bytes: u64,
    pub pcs: Vec<u64>,
}

/// Read bucket `b` of process `pid`.
pub fn read_bucket(pid: u32, b: u64) -> Result<Bucket, &'static str> {
    let head = read_mem(pid, b, BUCKET_STACK as usize)?;
    let word = |off: u64| {
        u64::from_le_bytes(
            head[off as usize..off as usize + 8]
                .try_into()
                .unwrap_or_default(),
        )
    };
    let size_bytes = word(32);
    let nstk = word(BUCKET_NSTK);
    if nstk == 0 || nstk > MAX_BUCKET_FRAMES {
        return Err("implausible bucket stack depth");
    }
    let raw = read_mem(pid, b + BUCKET_STACK, 8 * nstk as usize)?;
    let pcs = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Ok(Bucket { size_bytes, pcs })
}

/// One bucket as walked from `runtime.mbuckets`: its stack, object size
/// and sampled counts (raw, not scaled by the sampling rate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSnapshot {
    pub addr: u64,
    pub bucket: Bucket,
    /// Sampled objects and bytes allocated and not yet freed.
    pub live_objects: i64,
    pub live_bytes: i64,
    /// Sampled objects and bytes allocated in all.
    pub alloc_objects: u64,
    pub alloc_bytes: u64,
}

/// Bytes of one `runtime.memRecordCycle` in `runtime.memRecord`
/// (`active` and `future[3]`): four `uintptr` (allocs, frees, alloc_bytes,
/// free_bytes) up to Go 1.26, two (allocs, frees) from 1.27. A bucket's
/// objects all have its `size`, so bytes are counts times that size.
pub fn mem_record_cycle(version: (u32, u32)) -> usize {
    if version >= (1, 27) {
        16
    } else {
        32
    }
}
/// More buckets than this means the list was misread (a loop, a wrong
/// `mbuckets`); the runtime's own hash table has 179999 chains.
pub(super) const MAX_BUCKETS: usize = 1 << 20;
/// `runtime.bucketType` of heap profile buckets.
pub(super) const MEM_PROFILE: u64 = 1;

/// Walk the bucket list whose head pointer is at `head_addr`: every heap
/// bucket with sampled objects still live.
pub fn walk_buckets(
    pid: u32,
    head_addr: u64,
    cycle_bytes: usize,
) -> Result<Vec<BucketSnapshot>, String> {
    let word = |b: &[u8], off: usize| -> u64 {
        b.get(off..off + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    };
    let head = read_mem(pid, head_addr, 8).map_err(|e| format!("runtime.mbuckets: {e}"))?;
    let mut b = word(&head, 0);
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while b != 0 {
        if !seen.insert(b) || seen.len() > MAX_BUCKETS {
            return Err(format!(
                "bucket list loops or is implausibly long at {b:#x}"
            ));
        }
        let hdr =
            read_mem(pid, b, BUCKET_STACK as usize).map_err(|e| format!("bucket {b:#x}: {e}"))?;
        let (next, typ, size, nstk) = (
            word(&hdr, 8),
            word(&hdr, 16),
            word(&hdr, 32),
            word(&hdr, 40),
        );
        if typ != MEM_PROFILE || nstk == 0 || nstk > MAX_BUCKET_FRAMES {
            return Err(format!(
                "bucket {b:#x}: implausible header (type {typ}, {nstk} frames)"
            ));
        }
        let body = read_mem(pid, b + BUCKET_STACK, 8 * nstk as usize + 4 * cycle_bytes)
            .map_err(|e| format!("bucket {b:#x}: {e}"))?;
        let rec = &body[8 * nstk as usize..];
        let (mut allocs, mut frees) = (0u64, 0u64);
        for cycle in 0..4 {
            let at = cycle_bytes * cycle;
            allocs = allocs.wrapping_add(word(rec, at));
            frees = frees.wrapping_add(word(rec, at + 8));
        }
        let live_objects = allocs.wrapping_sub(frees) as i64;
        let live_bytes = live_objects.saturating_mul(size as i64);
        let abytes = allocs.saturating_mul(size);
        if live_objects > 0 && live_bytes > 0 {
            let pcs = body[..8 * nstk as usize]
                .chunks_exact(8)
                .map(|c| word(c, 0))
                .collect();
            out.push(BucketSnapshot {
                addr: b,
                bucket: Bucket {
                    size_bytes: size,
                    pcs,
                },
                live_objects,
                live_bytes,
                alloc_objects: allocs,
                alloc_bytes: abytes,
            });
        }
        b = next;
    }
    Ok(out)
}

/// The inverse sampling probability `go tool pprof` applies to a bucket
/// whose objects are `avg_bytes` each, at `rate` bytes per sample (1 when
/// every allocation is recorded).
pub fn scale(avg_bytes: f64, rate: i64) -> f64 {
    if rate <= 1 || avg_bytes <= 0.0 {
        return 1.0;
    }
    1.0 / (1.0 - (-avg_bytes / rate as f64).exp())
}

/// Report note for a Go process whose runtime samples nothing.
pub fn rate_zero_note(pid: u32, target: &GoTarget) -> String {
    format!(
        "process {pid} ({}, {}): the Go runtime is not sampling heap allocations \
         (runtime.MemProfileRate = 0, set by the linker because the program never imports \
         runtime/pprof or net/http/pprof), so its Go heap in use by stack cannot be shown; \
         the stacks through runtime.sysMap show which allocations made the heap grow (a \
         churning stack shares that blame with a leaking one); opt in by importing \
         _ \"runtime/pprof\" (or net/http/pprof), or setting runtime.MemProfileRate at start, \
         or rerun leaktrace with --go-enable-profiling 524288 to switch sampling on in the \
         running process (this changes the target; only later allocations are seen)",
        target.object, target.version
    )
}
