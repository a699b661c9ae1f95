//! The Go runtime's own heap samples, per profile bucket.
//!
//! Inputs: entry uprobes (never return probes: they corrupt Go's movable
//! stacks) on `runtime.setprofilebucket(p, b)` (a sampled object `p` was
//! charged to bucket `b`) and `runtime.mProf_Free(b, ...)` (the sweeper
//! freed a sampled object of bucket `b`). Go 1.17+ on x86-64 passes
//! integer arguments in AX, BX, CX...; user space refuses other versions.
//! Output: `GO_BUCKETS`, `(tgid, bucket)` -> objects and bytes sampled and
//! not yet freed, raw: user space scales them by the sampling rate and
//! reads each bucket's stack from the process.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::HashMap,
    programs::ProbeContext,
};
use tracer_common::{Counter, GoBucketKey, StackTotals, GO_BUCKET_SIZE_OFFSET};

use crate::{counters::count, probes::add_totals};

#[map]
static GO_BUCKETS: HashMap<GoBucketKey, StackTotals> = HashMap::with_max_entries(1 << 14, 0);

#[inline(always)]
fn regs_ax_bx(ctx: &ProbeContext) -> (u64, u64) {
    // SAFETY: the context of a uprobe is the trapped task's pt_regs.
    unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx) }
}

#[inline(always)]
fn add(bucket: u64, bytes: i64, objects: i64, total: u64) {
    let key = GoBucketKey {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        bucket,
    };
    if GO_BUCKETS.get_ptr_mut(&key).is_none() {
        let fresh = StackTotals::default();
        if GO_BUCKETS
            .insert(&key, &fresh, 1 /* BPF_NOEXIST */)
            .is_err()
            && GO_BUCKETS.get_ptr_mut(&key).is_none()
        {
            count(Counter::StackTotalsMapFull);
            return;
        }
    }
    if let Some(t) = GO_BUCKETS.get_ptr_mut(&key) {
        add_totals(t, bytes, objects, total);
    }
}

/// `runtime.setprofilebucket(p unsafe.Pointer, b *bucket)`.
#[uprobe]
pub fn go_setprofilebucket(ctx: ProbeContext) -> u32 {
    let (_p, b) = regs_ax_bx(&ctx);
    if b == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(size) = (unsafe { bpf_probe_read_user((b + GO_BUCKET_SIZE_OFFSET) as *const u64) })
    else {
        count(Counter::StackLost);
        return 0;
    };
    add(b, size as i64, 1, size);
    0
}

/// `runtime.mProf_Free(b *bucket, size uintptr)` (1.17-1.26) or
/// `runtime.mProf_Free(b *bucket)` (1.27+). The size is the bucket's own
/// (`stkbucket` keys buckets by object size, so it is the argument's
/// value where there is one), read from its header for every version.
#[uprobe]
pub fn go_mprof_free(ctx: ProbeContext) -> u32 {
    let (b, _) = regs_ax_bx(&ctx);
    if b == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(size) = (unsafe { bpf_probe_read_user((b + GO_BUCKET_SIZE_OFFSET) as *const u64) })
    else {
        count(Counter::StackLost);
        return 0;
    };
    add(b, -(size as i64), -1, 0);
    0
}
