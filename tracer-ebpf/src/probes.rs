//! Generic enter/exit/free helpers plus one thin program per allocator
//! function, in the manner of libbpf-tools' memleak.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    gen_tag, AllocInfo, AllocKey, AllocKind, Counter, LuaYoung, PendingCall, StackId, StackKey,
    StackTotals, PENDING_SLOTS, STACK_LOST,
};

use crate::{
    chain::{self as stages, AllocRecord},
    counters::count,
    unwind::{begin, store_stack, Regs},
};

#[map]
static ALLOCS: HashMap<AllocKey, AllocInfo> = HashMap::with_max_entries(1 << 20, 0);

/// Per CPU, so threads of one program allocating from the same stack on
/// different cores do not bounce one row's cache line (~150 ns a pair with
/// two threads); user space sums the CPUs. Allocated on first use, so a
/// many-core machine pays only for the rows in use.
#[map]
static STACK_TOTALS: PerCpuHashMap<StackKey, StackTotals> =
    PerCpuHashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Lua bytes per stack not yet through a GC cycle (see `LuaYoung`).
#[map]
static LUA_YOUNG: HashMap<StackKey, LuaYoung> =
    HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

#[map]
static PENDING: Array<PendingCall> = Array::with_max_entries(PENDING_SLOTS, 0);

/// The pending-call slot of thread `tid`.
#[inline(always)]
pub(crate) fn pending_slot(tid: u32) -> Option<&'static mut PendingCall> {
    let p = PENDING.get_ptr_mut(tid & (PENDING_SLOTS - 1))?;
    // SAFETY: an array value; only threads sharing the slot touch it, and
    // its `tid` says whose it is.
    Some(unsafe { &mut *p })
}

#[inline(always)]
fn sp_of(regs: *mut aya_ebpf::bindings::pt_regs) -> u64 {
    // SAFETY: the context of a uprobe is the trapped task's pt_regs.
    unsafe { (*regs).rsp }
}

// ---- entry ---------------------------------------------------------------

#[inline(always)]
pub(crate) fn enter(ctx: &ProbeContext, kind: u32, size_bytes: u64, old_addr: u64) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let entry_sp = sp_of(ctx.regs);
    // SAFETY: bpf_probe_read_user checks the user address.
    let ret_addr = unsafe { bpf_probe_read_user(entry_sp as *const u64) }.unwrap_or(0);
    let Some(slot) = pending_slot(tid) else {
        return 0;
    };
    if slot.tid == tid {
        if entry_sp < slot.entry_sp {
            // Called from inside a probed allocator call (calloc -> malloc):
            // the outer call is the one counted.
            count(Counter::Nested);
            return 0;
        }
        if entry_sp == slot.entry_sp && ret_addr != slot.ret_addr {
            // Jumped to from a probed allocator function (a tail call):
            // the outer call's return probe already took the return
            // address, and this call's return comes first.
            slot.depth += 1;
            count(Counter::Nested);
            return 0;
        }
        // A new call where the earlier one was: that one's return never
        // came (longjmp, a return probe attached while it ran): drop it.
        count(Counter::MissingReturn);
        slot.tid = 0;
    } else if slot.tid != 0 {
        // Another thread's call holds the slot: it is still inside an
        // allocator (its record is lost now), or it died there.
        count(Counter::PendingMapFull);
        slot.tid = 0;
    }
    // With byte sampling, an allocation that is not sampled still gets its
    // (cheap) record, with no weight: its return then only releases a
    // realloc's old block, and the syscalls it makes (malloc's own mmap
    // and brk) are known to come from inside the allocator.
    let (weight_bytes, weight_count) = sample(size_bytes).unwrap_or((0, 0));
    // Field by field: the slot's padding is never touched (see
    // `PendingCall::_pad`).
    slot.size_bytes = size_bytes;
    slot.old_addr = old_addr;
    slot.entry_sp = entry_sp;
    slot.ret_addr = ret_addr;
    slot.kind = kind;
    slot.depth = 0;
    slot.weight_bytes = weight_bytes;
    slot.weight_count = weight_count;
    slot.tid = tid;
    0
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter(&ctx, AllocKind::Malloc as u32, size, 0)
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let n: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    // An overflowing product fails in the allocator and is never recorded.
    enter(&ctx, AllocKind::Calloc as u32, n.wrapping_mul(size), 0)
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    let old: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(&ctx, AllocKind::Realloc as u32, size, old)
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let old: u64 = ctx.arg(0).unwrap_or(0);
    let n: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter(&ctx, AllocKind::Realloc as u32, n.wrapping_mul(size), old)
}

/// `memalign(align, size)` and `aligned_alloc(align, size)`.
#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(&ctx, AllocKind::Memalign as u32, size, 0)
}

/// `posix_memalign(void **memptr, align, size)`: the block comes back
/// through `memptr`, kept in `old_addr` until the return.
#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter(&ctx, AllocKind::PosixMemalign as u32, size, memptr)
}

/// `valloc(size)` and `pvalloc(size)`.
#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    enter(&ctx, AllocKind::Valloc as u32, size, 0)
}

// ---- return --------------------------------------------------------------

/// What the return needs of a pending call (copied out without the slot's
/// padding).
struct Call {
    size_bytes: u64,
    old_addr: u64,
    kind: u32,
    weight_bytes: u64,
    weight_count: u32,
}

#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let Some(pending) = pending_slot(tid) else {
        return 0;
    };
    // SAFETY: the context of a uretprobe is the task's pt_regs, with the
    // stack pointer just past the return address and the instruction
    // pointer at the call site's next instruction.
    let (ip, sp, bp) = unsafe { ((*ctx.regs).rip, (*ctx.regs).rsp, (*ctx.regs).rbp) };
    if pending.tid != tid {
        if pending.done_tid == tid && pending.done_sp == sp && pending.done_ip == ip {
            // The return just recorded, run again for another traced
            // process's return probe.
            count(Counter::RepeatedReturns);
        } else {
            count(Counter::MissingEntry);
        }
        return 0;
    }
    let own_sp = pending.entry_sp.wrapping_add(8);
    if sp < own_sp {
        // The return of a nested call.
        return 0;
    }
    if sp > own_sp || (pending.ret_addr != 0 && ip != pending.ret_addr) {
        // Returning past the pending call, or another call at its depth:
        // its own return was never seen.
        count(Counter::MissingReturn);
        pending.tid = 0;
        return 0;
    }
    if pending.depth > 0 {
        // A chained call's return (see `enter`); the outer one follows.
        pending.depth -= 1;
        return 0;
    }
    let call = Call {
        size_bytes: pending.size_bytes,
        old_addr: pending.old_addr,
        kind: pending.kind,
        weight_bytes: pending.weight_bytes,
        weight_count: pending.weight_count,
    };
    pending.tid = 0;
    pending.done_tid = tid;
    pending.done_sp = sp;
    pending.done_ip = ip;

    let ret: u64 = ctx.ret();
    let addr = match AllocKind::from_u32(gen_tag::kind(call.kind)) {
        Some(AllocKind::Realloc) => {
            if ret == 0 {
                if call.size_bytes == 0 && call.old_addr != 0 {
                    // realloc(p, 0) frees p.
                    release(tgid, call.old_addr, false);
                } else {
                    // A failed realloc leaves the old block live.
                    count(Counter::FailedAllocs);
                }
                return 0;
            }
            if call.old_addr != 0 {
                release(tgid, call.old_addr, false);
            }
            ret
        }
        Some(AllocKind::PosixMemalign) => {
            // Returns 0 on success, the block is in *memptr.
            if ret as u32 != 0 || call.old_addr == 0 {
                count(Counter::FailedAllocs);
                return 0;
            }
            // SAFETY: bpf_probe_read_user checks the user address.
            match unsafe { bpf_probe_read_user(call.old_addr as *const u64) } {
                Ok(addr) => addr,
                Err(_) => {
                    count(Counter::MissingEntry);
                    return 0;
                }
            }
        }
        _ => ret,
    };
    if addr == 0 {
        count(Counter::FailedAllocs);
        return 0;
    }
    if call.weight_count == 0 {
        // Not sampled (a realloc kept only to release its old block).
        return 0;
    }
    let alloc = AllocRecord {
        addr,
        weight_bytes: call.weight_bytes,
        weight_count: call.weight_count,
        kind: call.kind,
    };
    // The stack is recorded by the chain, which ends in `finish_alloc`. At
    // the return the registers are the caller's: the walk starts at the
    // call site, so the immediate caller is never missing.
    if let Some(job) = stages::claim(stages::ALLOC) {
        begin(job, pid_tgid, Regs { ip, sp, bp });
        job.alloc = alloc;
        stages::start(&ctx, stages::ALLOC);
    }
    // The chain could not run: keep the block, without its stack.
    record(tgid, &alloc, STACK_LOST);
    0
}

/// Stage `FINISH` of the allocation chain: store the stack, record the
/// block.
#[uprobe]
pub fn finish_alloc(ctx: ProbeContext) -> u32 {
    let Some(job) = stages::job(&ctx, stages::ALLOC) else {
        return 0;
    };
    let stack_id = store_stack(job);
    let alloc = job.alloc;
    record(job.tgid, &alloc, stack_id);
    0
}

/// Mean bytes between samples; 0 records every allocation (exact mode).
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

/// Per-CPU bytes left until the next sampled allocation.
#[map]
static SAMPLER: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);

/// Sampling by bytes: a sample point every `period` bytes on average,
/// the gaps drawn uniformly from `[period/2, 3*period/2)` (a renewal
/// process: no aliasing with periodic allocation patterns, like
/// tcmalloc's exponential gaps, but ~3.5x less variance for the same
/// cost). An allocation is sampled when a point falls in it, and weighted
/// by the inverse of that probability, so totals are unbiased: `period`
/// for sizes up to `period/2`, `size` from `3*period/2` on, and
/// `size / (1 - u^2 / (2 period^2))` with `u = 3*period/2 - size` between.
/// Returns the bytes and count the allocation stands for, or `None`.
#[inline(always)]
fn sample(size: u64) -> Option<(u64, u32)> {
    // SAFETY: a constant patched at load.
    let period = unsafe { core::ptr::read_volatile(&raw const SAMPLE_BYTES) };
    if period == 0 {
        return Some((size, 1));
    }
    let left = SAMPLER.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot.
    let left = unsafe { &mut *left };
    *left -= size as i64;
    if *left > 0 {
        return None;
    }
    let r = unsafe { bpf_get_prandom_u32() } as u64;
    let gap = period / 2 + r % period;
    *left += gap as i64;
    if *left <= 0 {
        *left = gap as i64;
    }
    let half = period / 2;
    let bytes = if size <= half {
        period
    } else if size >= period + half {
        size
    } else {
        // Scaled down by 2^10 so the squares fit in 64 bits.
        let p = period >> 10;
        let u = (period + half - size) >> 10;
        let den = 2 * p * p - u * u;
        if den == 0 {
            size
        } else {
            let q = ((u * u) << 16) / den;
            size + ((size * q) >> 16)
        }
    };
    let count = if size == 0 { 1 } else { (bytes / size).max(1) };
    Some((bytes, count.min(u32::MAX as u64) as u32))
}

#[inline(always)]
fn record(tgid: u32, alloc: &AllocRecord, stack_id: StackId) {
    let key = AllocKey {
        addr: alloc.addr,
        tgid,
        _pad: 0,
    };
    let info = AllocInfo {
        size_bytes: alloc.weight_bytes,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        stack_id,
        kind: alloc.kind,
        count: alloc.weight_count,
    };
    // BPF_NOEXIST: one map operation in the common case.
    match ALLOCS.insert(key, info, 1) {
        Ok(()) => {}
        // EEXIST: the block at this address was freed by a path we do not
        // see; replace it.
        Err(-17) => {
            // SAFETY: the value is copied out before the entry is replaced.
            if let Some(old) = unsafe { ALLOCS.get(&key) } {
                let old = *old;
                count(Counter::StaleReplaced);
                debit(tgid, &old);
            }
            if ALLOCS.insert(key, info, 0).is_err() {
                count(Counter::AllocsMapFull);
                return;
            }
        }
        Err(_) => {
            count(Counter::AllocsMapFull);
            return;
        }
    }
    count(Counter::Allocs);
    credit(tgid, stack_id, alloc.weight_bytes, alloc.weight_count);
    let tag = gen_tag::tag(alloc.kind);
    if tag != 0 {
        young(
            tgid,
            stack_id,
            tag,
            alloc.weight_bytes as i64,
            i64::from(alloc.weight_count),
        );
    }
}

/// A Lua block's bytes in its stack's generation slot (`LuaYoung`): a
/// slot holding an older generation is reused, its blocks having aged.
#[inline(always)]
fn young(tgid: u32, stack_id: StackId, tag: u32, bytes: i64, allocs: i64) {
    let key = StackKey {
        tgid,
        _pad: 0,
        stack_id,
    };
    let i = (tag & 1) as usize;
    let y = match LUA_YOUNG.get_ptr_mut(&key) {
        Some(y) => y,
        None if bytes > 0 => {
            let _ = LUA_YOUNG.insert(&key, &LuaYoung::default(), 1);
            match LUA_YOUNG.get_ptr_mut(&key) {
                Some(y) => y,
                None => return,
            }
        }
        None => return,
    };
    // SAFETY: a map value; a VM's allocations run on one thread.
    let y = unsafe { &mut *y };
    if y.tag[i] != tag {
        if bytes < 0 {
            // The block's generation has aged out of the slot.
            return;
        }
        y.tag[i] = tag;
        y.bytes[i] = 0;
        y.allocs[i] = 0;
    }
    y.bytes[i] += bytes;
    y.allocs[i] += allocs;
}

#[inline(always)]
fn credit(tgid: u32, stack_id: StackId, size_bytes: u64, n: u32) {
    let key = StackKey {
        tgid,
        _pad: 0,
        stack_id,
    };
    if let Some(t) = STACK_TOTALS.get_ptr_mut(&key) {
        add_totals(t, size_bytes as i64, n as i64, size_bytes);
        return;
    }
    let fresh = StackTotals {
        outstanding_bytes: size_bytes as i64,
        outstanding_allocs: n as i64,
        total_bytes: size_bytes,
        total_allocs: n as u64,
    };
    // BPF_NOEXIST (this CPU's value is `fresh`, the others zero): another
    // CPU may have created the row meanwhile, and then ours is zero.
    if STACK_TOTALS.insert(key, fresh, 1).is_ok() {
        return;
    }
    match STACK_TOTALS.get_ptr_mut(&key) {
        Some(t) => add_totals(t, size_bytes as i64, n as i64, size_bytes),
        None => count(Counter::StackTotalsMapFull),
    }
}

#[inline(always)]
fn debit(tgid: u32, info: &AllocInfo) {
    let key = StackKey {
        tgid,
        _pad: 0,
        stack_id: info.stack_id,
    };
    if let Some(t) = STACK_TOTALS.get_ptr_mut(&key) {
        add_totals(t, -(info.size_bytes as i64), -(info.count as i64), 0);
    }
    let tag = gen_tag::tag(info.kind);
    if tag != 0 {
        young(
            tgid,
            info.stack_id,
            tag,
            -(info.size_bytes as i64),
            -i64::from(info.count),
        );
    }
}

#[inline(always)]
pub(crate) fn add_totals(t: *mut StackTotals, bytes: i64, allocs: i64, total: u64) {
    let new_allocs = if total != 0 { allocs as u64 } else { 0 };
    // SAFETY: `t` points into a map value; the fields are 8-byte aligned.
    // BPF has no compare-and-swap for `Atomic*::fetch_add`, but the kernel
    // provides atomic add, which is what this intrinsic lowers to.
    unsafe {
        atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(
            &raw mut (*t).outstanding_bytes,
            bytes,
        );
        atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(
            &raw mut (*t).outstanding_allocs,
            allocs,
        );
        if total != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*t).total_bytes, total);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*t).total_allocs,
                new_allocs,
            );
        }
    }
}

/// Forget a block: remove it from the table and debit its stack.
/// `count_unknown` is false where a miss is expected (realloc after an
/// internal free already seen).
#[inline(always)]
pub(crate) fn release(tgid: u32, addr: u64, count_unknown: bool) {
    let key = AllocKey {
        addr,
        tgid,
        _pad: 0,
    };
    // SAFETY: the value is copied out before the entry is removed.
    match unsafe { ALLOCS.get(&key) } {
        Some(info) => {
            let info = *info;
            if ALLOCS.remove(&key).is_ok() {
                count(Counter::Frees);
                debit(tgid, &info);
            }
        }
        None => {
            if count_unknown {
                count(Counter::FreesUnknown);
            }
        }
    }
}

// ---- free ----------------------------------------------------------------

/// `free(ptr)`, attached past the function's NULL check where the kernel
/// can emulate the instruction (see `tracer/src/attach/prologue.rs`).
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    release(tgid, addr, true);
    0
}
