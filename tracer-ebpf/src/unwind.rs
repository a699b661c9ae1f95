//! In-kernel user-stack unwinder for x86-64 code with or without frame
//! pointers.
//!
//! User space turns each object's DWARF CFI into compact rows
//! (`UNWIND_ROWS`, see `tracer/src/unwind_table.rs`) and registers each
//! traced process's executable mappings (`PROC_MAPS`). Per frame: find the
//! mapping (binary search), find the row covering `pc - 1` (binary search),
//! compute the CFA, read the return address at CFA-8 and the caller's
//! `%rbp` where the row says. Objects without CFI, and processes not yet
//! registered, fall back to the frame-pointer rule. The walk ends at the
//! outermost frame, or records why it stopped. Stacks are stored once, keyed
//! by a 64-bit hash of their frames.
//!
//! The walk is stage `chain::NATIVE` of the recording chain (`chain.rs`):
//! `FRAMES_PER_STEP` frames per program run, then a tail call to itself or
//! to the next stage, so the verifier's work is that of a few frames.

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{map, raw_tracepoint, uprobe},
    maps::{Array, HashMap, PerCpuArray},
    programs::{ProbeContext, RawTracePointContext},
    EbpfContext,
};
use tracer_common::{
    runtime, stop, Counter, ProcMaps, StackBuf, StackId, UnwindRow, CFA_END_OF_STACK, CFA_PLT,
    CFA_RBP, CFA_RSP, CFA_STACK_SWITCH, MAX_FRAMES, MAX_INTERP_FRAMES, MAX_PROC_MAPS,
    RBP_AT_CFA_OFFSET, RBP_SAME, STACK_LOST,
};

use crate::{
    chain::{self as stages, slot, Job},
    counters::count,
};

/// Native frames walked per run of the native stage.
const FRAMES_PER_STEP: usize = 8;
const _: () = assert!(MAX_FRAMES.is_power_of_two() && MAX_FRAMES / FRAMES_PER_STEP <= 16);

#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 21, 0);

#[map]
pub static PROC_MAPS: HashMap<u32, ProcMaps> = HashMap::with_max_entries(1 << 11, 0);

#[map]
pub static STACKS: HashMap<StackId, StackBuf> = HashMap::with_max_entries(1 << 15, 0);

/// Stack ids this CPU stored or found in `STACKS` lately (direct-mapped).
#[map]
static SEEN_STACKS: PerCpuArray<StackId> = PerCpuArray::with_max_entries(SEEN_STACK_SLOTS, 0);

const SEEN_STACK_SLOTS: u32 = 1024;

/// Bumped by user space whenever `PROC_MAPS` changes (slot 0).
#[map]
static UNWIND_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// The rule found for one `(tgid, pc)`, so the hot call sites of a program
/// skip the mapping and row searches (~100 ns a frame).
#[repr(C)]
#[derive(Clone, Copy)]
struct CachedStep {
    pc: u64,
    tgid: u32,
    /// `UNWIND_EPOCH` when it was found; 0 never matches (epochs start at 1).
    epoch: u32,
    row: UnwindRow,
    /// `RULE_CFI` (use `row`) or `RULE_FP`.
    rule: u32,
}

const RULE_CFI: u32 = 1;
const RULE_FP: u32 = 2;
/// Entries per CPU (a power of two): direct-mapped by pc and tgid.
const STEP_CACHE_SLOTS: u32 = 4096;

#[map]
static STEP_CACHE: PerCpuArray<CachedStep> = PerCpuArray::with_max_entries(STEP_CACHE_SLOTS, 0);

#[inline(always)]
fn step_slot(tgid: u32, pc: u64) -> u32 {
    let h = pc ^ (pc >> 12) ^ ((tgid as u64) << 7);
    (h as u32) & (STEP_CACHE_SLOTS - 1)
}

/// log2 of MAX_PROC_MAPS, rounded up: iterations of the mapping search.
const MAP_SEARCH_STEPS: usize = 8;
/// Iterations of the row search: tables up to 2^22 rows.
const ROW_SEARCH_STEPS: usize = 22;

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Two consecutive words at `addr`.
#[inline(always)]
fn read_pair(addr: u64) -> Option<[u64; 2]> {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.ok()
}

#[map]
static LAUNDER: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// `v`, through memory the verifier does not track: an index that went
/// through here does not make the values it was computed from precise, so
/// the search's branches do not multiply the states that follow.
#[inline(always)]
fn launder(v: u32) -> u32 {
    match LAUNDER.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, exclusive while this program runs.
        Some(p) => unsafe {
            core::ptr::write_volatile(p, v);
            core::ptr::read_volatile(p)
        },
        None => 0,
    }
}

/// The mapping holding `pc`: (bias, rows_start, rows_len).
#[inline(always)]
fn find_map(maps: &ProcMaps, pc: u64) -> Option<(u64, u32, u32)> {
    let mut lo: u32 = 0;
    // User space keeps `len` at most MAX_PROC_MAPS; indexes are masked.
    let mut hi: u32 = maps.len;
    // Largest i with maps[i].start <= pc.
    for _ in 0..MAP_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        let m = maps.maps.get(launder(mid) as usize & (MAX_PROC_MAPS - 1))?;
        if m.start <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // Laundered: the loop's exits then reach what follows as one state.
    let i = launder(lo).checked_sub(1)?;
    // Laundered again: the mask must stay where the index is used (see
    // `slot`).
    let m = maps.maps.get(launder(i) as usize & (MAX_PROC_MAPS - 1))?;
    if pc >= m.end {
        return None;
    }
    Some((m.bias, m.rows_start, m.rows_len))
}

/// The row covering `rel` in rows `[start, start + len)`.
#[inline(always)]
fn find_row(start: u32, len: u32, rel: u32) -> Option<UnwindRow> {
    let mut lo: u32 = 0;
    let mut hi: u32 = len;
    for _ in 0..ROW_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        let row = UNWIND_ROWS.get(start.wrapping_add(mid))?;
        if row.pc <= rel {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // Laundered: the loop's exits then reach what follows as one state.
    let i = launder(lo).checked_sub(1)?;
    UNWIND_ROWS.get(start.wrapping_add(i)).copied()
}

enum Step {
    /// Caller's (pc, sp, bp).
    Next(u64, u64, u64),
    /// Caller's (pc, sp, bp) on another stack (`CFA_STACK_SWITCH`).
    Switch(u64, u64, u64),
    Stop(u32),
}

/// One frame by the frame-pointer rule: CFA = rbp + 16.
#[inline(always)]
fn fp_step(sp: u64, bp: u64) -> Step {
    // A frame pointer below the stack pointer is not a frame pointer.
    if bp < sp || bp == 0 {
        return Step::Stop(stop::BAD_FRAME);
    }
    let cfa = bp + 16;
    // The saved %rbp and the return address, in one read.
    match read_pair(bp) {
        Some([caller_bp, ra]) => Step::Next(ra, cfa, caller_bp),
        None => Step::Stop(stop::UNREADABLE),
    }
}

#[inline(always)]
fn cfi_step(row: &UnwindRow, pc: u64, sp: u64, bp: u64) -> Step {
    let cfa = match row.cfa_reg {
        CFA_RSP => sp.wrapping_add(row.cfa_offset as i64 as u64),
        CFA_RBP => bp.wrapping_add(row.cfa_offset as i64 as u64),
        CFA_PLT => {
            let extra = if (pc & 15) >= row.cfa_offset as u64 {
                8
            } else {
                0
            };
            sp + 8 + extra
        }
        CFA_END_OF_STACK => return Step::Stop(stop::COMPLETE),
        CFA_STACK_SWITCH => {
            if bp == 0 {
                return Step::Stop(stop::BAD_FRAME);
            }
            return match read_pair(bp) {
                Some([caller_bp, ra]) => Step::Switch(ra, bp + 16, caller_bp),
                None => Step::Stop(stop::UNREADABLE),
            };
        }
        _ => return Step::Stop(stop::UNSUPPORTED),
    };
    // The usual prologue (`push %rbp` right after the call) saves %rbp
    // next to the return address: one read for both.
    if row.rbp_rule == RBP_AT_CFA_OFFSET && row.rbp_offset == -16 {
        return match read_pair(cfa.wrapping_sub(16)) {
            Some([caller_bp, ra]) => Step::Next(ra, cfa, caller_bp),
            None => Step::Stop(stop::UNREADABLE),
        };
    }
    let Some(ra) = read_u64(cfa.wrapping_sub(8)) else {
        return Step::Stop(stop::UNREADABLE);
    };
    let caller_bp = match row.rbp_rule {
        RBP_SAME => bp,
        RBP_AT_CFA_OFFSET => match read_u64(cfa.wrapping_add(row.rbp_offset as i64 as u64)) {
            Some(v) => v,
            None => return Step::Stop(stop::UNREADABLE),
        },
        _ => 0,
    };
    Step::Next(ra, cfa, caller_bp)
}

/// The rule for the frame at `pc`: `RULE_CFI` with its row, `RULE_FP`, or
/// 0 when the object has CFI but none covers `pc`.
#[inline(always)]
fn find_rule(tgid: u32, pc: u64) -> (u32, UnwindRow) {
    let none = UnwindRow {
        pc: 0,
        cfa_offset: 0,
        rbp_offset: 0,
        cfa_reg: 0,
        rbp_rule: 0,
    };
    // SAFETY: read-only lookup; the value stays valid during the program.
    let Some(maps) = (unsafe { PROC_MAPS.get(&tgid) }) else {
        return (RULE_FP, none);
    };
    match find_map(maps, pc) {
        // Not in a registered mapping: a library loaded since the last
        // registration (dlopen), or generated code. Frame pointers are the
        // best guess; user space marks the frame if it is not in a file
        // mapping and ends the stack there.
        None | Some((_, _, 0)) => (RULE_FP, none),
        Some((bias, start, rows)) => {
            let rel = pc.wrapping_sub(1).wrapping_sub(bias);
            match find_row(start, rows, rel as u32) {
                Some(row) if rel <= u32::MAX as u64 => (RULE_CFI, row),
                _ => (0, none),
            }
        }
    }
}

/// Registers at the point the stack is taken.
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// Begin a walk in `job` from `regs` (whose `ip` is a return address or a
/// syscall's next instruction).
#[inline(always)]
pub fn begin(job: &mut Job, pid_tgid: u64, regs: Regs) {
    job.pid_tgid = pid_tgid;
    job.tgid = (pid_tgid >> 32) as u32;
    job.epoch = UNWIND_EPOCH.get(0).copied().unwrap_or(0);
    job.pc = regs.ip;
    job.sp = regs.sp;
    job.bp = regs.bp;
    job.why = stop::DEPTH;
    job.unmapped_at = 0;
    job.start_sp = regs.sp;
    job.lua_resume = 0;
    job.interp_started = 0;
    job.interp_frame = 0;
    job.interp_steps = 0;
    job.buf.len = 0;
    job.buf.stop = stop::DEPTH;
    job.buf.interp.runtime = runtime::NONE;
    job.buf.interp.len = 0;
    job.buf.interp.stop = 0;
    job.buf.interp.entry_mask = 0;
}

/// The rule for `pc` in `tgid`, through this CPU's cache.
#[inline(always)]
fn rule_for(tgid: u32, epoch: u32, pc: u64) -> (u32, UnwindRow) {
    let cached = STEP_CACHE.get_ptr_mut(step_slot(tgid, pc));
    if let Some(c) = cached {
        // SAFETY: per-CPU slot, exclusive while this program runs.
        let c = unsafe { &mut *c };
        if c.pc == pc && c.tgid == tgid && c.epoch == epoch && epoch != 0 {
            return (c.rule, c.row);
        }
        let (rule, row) = find_rule(tgid, pc);
        if rule != 0 {
            *c = CachedStep {
                pc,
                tgid,
                epoch,
                row,
                rule,
            };
        }
        return (rule, row);
    }
    find_rule(tgid, pc)
}

/// One frame: record `pc`, then step to the caller. Returns true when the
/// walk is over (`job.why` says why).
#[inline(always)]
fn walk_one(job: &mut Job) -> bool {
    let i = job.buf.len as usize;
    if i >= MAX_FRAMES {
        job.why = stop::DEPTH;
        return true;
    }
    let (pc, sp, bp) = (job.pc, job.sp, job.bp);
    if pc == 0 {
        job.why = stop::COMPLETE;
        return true;
    }
    job.buf.ips[slot(&job.buf.len, MAX_FRAMES)] = pc;
    job.buf.len = i as u32 + 1;
    let (rule, row) = rule_for(job.tgid, job.epoch, pc);
    let step = match rule {
        RULE_CFI => cfi_step(&row, pc, sp, bp),
        RULE_FP => fp_step(sp, bp),
        _ => Step::Stop(stop::NO_CFI),
    };
    match step {
        Step::Next(ra, cfa, caller_bp) => {
            // The stack grows down: a caller's frame is above ours.
            if cfa <= sp && i > 0 {
                job.why = stop::BAD_FRAME;
                return true;
            }
            job.pc = ra;
            job.sp = cfa;
            job.bp = caller_bp;
            false
        }
        Step::Switch(ra, cfa, caller_bp) => {
            job.pc = ra;
            job.sp = cfa;
            job.bp = caller_bp;
            false
        }
        Step::Stop(reason) => {
            job.why = reason;
            true
        }
    }
}

/// Stage `NATIVE`: a few frames, then this stage again or the next one.
#[inline(always)]
fn native_step<C: EbpfContext>(ctx: &C, slot: u32) {
    if stages::job(ctx, slot).is_none() {
        return;
    }
    for _ in 0..FRAMES_PER_STEP {
        // Looked up again for every frame: nothing of the frame before
        // stays in a register, so each frame starts from the same
        // verifier state and the cost adds up instead of multiplying
        // (Linux 6.1 went over the limit with 8 frames otherwise).
        let Some(job) = stages::claim(slot) else {
            return;
        };
        if walk_one(job) {
            job.buf.stop = job.why;
            return stages::after_native(ctx, slot, job.tgid);
        }
    }
    stages::next(ctx, slot, tracer_common::chain::NATIVE)
}

#[uprobe]
pub fn native_alloc(ctx: ProbeContext) -> u32 {
    native_step(&ctx, stages::ALLOC);
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn native_syscall(ctx: RawTracePointContext) -> u32 {
    native_step(&ctx, stages::SYSCALL);
    0
}

/// Store the job's stack (once per distinct stack); its id or `STACK_LOST`.
#[inline(always)]
pub fn store_stack(job: &Job) -> StackId {
    let buf = &job.buf;
    let len = buf.len;
    let why = buf.stop;
    // FNV-1a over the frames and the stop reason.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_FRAMES {
        if i as u32 >= len {
            break;
        }
        h = (h ^ buf.ips[i]).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ why as u64).wrapping_mul(0x0100_0000_01b3);
    let interp = &buf.interp;
    let interp_len = interp.len;
    for i in 0..MAX_INTERP_FRAMES {
        if i as u32 >= interp_len {
            break;
        }
        h = (h ^ interp.code[i]).wrapping_mul(0x0100_0000_01b3);
        h = (h ^ interp.pos[i] as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let tail = ((interp.stop as u64) << 32) | interp.entry_mask as u64;
    h = (h ^ tail).wrapping_mul(0x0100_0000_01b3);
    h = (h ^ interp.runtime as u64).wrapping_mul(0x0100_0000_01b3);
    let id = h | 1;
    // Stacks stored are never removed, so an id this CPU has stored or
    // found recently needs no lookup.
    let seen = SEEN_STACKS.get_ptr_mut(((id >> 8) as u32) & (SEEN_STACK_SLOTS - 1));
    // SAFETY: per-CPU slot, exclusive while this program runs.
    if seen.is_some_and(|s| unsafe { *s } == id) {
        return id;
    }
    // SAFETY: read-only lookup.
    if unsafe { STACKS.get(&id) }.is_none() {
        // BPF_NOEXIST: another CPU may store the same stack meanwhile.
        if let Err(e) = STACKS.insert(&id, buf, 1) {
            if e != -17 {
                count(Counter::StackLost);
                return STACK_LOST;
            }
        }
    }
    if let Some(s) = seen {
        // SAFETY: as above.
        unsafe { *s = id };
    }
    id
}
