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

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use tracer_common::{
    stop, ProcMaps, StackBuf, StackId, UnwindRow, CFA_END_OF_STACK, CFA_PLT, CFA_RBP, CFA_RSP,
    CFA_STACK_SWITCH, MAX_FRAMES, MAX_PROC_MAPS, MAX_PY_FRAMES, RBP_AT_CFA_OFFSET, RBP_SAME,
    STACK_LOST,
};

use tracer_common::Counter;

use crate::{probes::count, python::record_python};

#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 21, 0);

#[map]
pub static PROC_MAPS: HashMap<u32, ProcMaps> = HashMap::with_max_entries(1 << 11, 0);

#[map]
pub static STACKS: HashMap<StackId, StackBuf> = HashMap::with_max_entries(1 << 15, 0);

#[map]
static SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);

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

/// The per-CPU scratch stack.
#[inline(always)]
pub(crate) fn scratch() -> Option<&'static mut StackBuf> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, exclusive while this program runs; callers
    // never hold two references at once.
    Some(unsafe { &mut *p })
}

/// log2 of MAX_PROC_MAPS, rounded up: iterations of the mapping search.
const MAP_SEARCH_STEPS: usize = 8;
/// Iterations of the row search: tables up to 2^22 rows.
const ROW_SEARCH_STEPS: usize = 22;

/// Registers at the point the stack is taken.
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

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

/// The mapping holding `pc`: (bias, rows_start, rows_len).
#[inline(always)]
fn find_map(maps: &ProcMaps, pc: u64) -> Option<(u64, u32, u32)> {
    let mut lo: u32 = 0;
    let mut hi: u32 = maps.len;
    if hi as usize > MAX_PROC_MAPS {
        hi = MAX_PROC_MAPS as u32;
    }
    // Largest i with maps[i].start <= pc.
    for _ in 0..MAP_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        let m = maps.maps.get(mid as usize)?;
        if m.start <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let i = lo.checked_sub(1)? as usize;
    let m = maps.maps.get(i)?;
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
    let i = lo.checked_sub(1)?;
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

/// State of a walk, shared with the per-frame callback.
#[repr(C)]
struct Walk {
    tgid: u32,
    len: u32,
    why: u32,
    epoch: u32,
    pc: u64,
    sp: u64,
    bp: u64,
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

/// One frame: record `pc`, then step to the caller. Returns 1 to stop.
/// Run through `bpf_loop`, so the verifier checks it once rather than
/// once per frame.
#[inline(never)]
extern "C" fn walk_frame(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` on record_stack's stack.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    let i = index as usize;
    if i >= MAX_FRAMES {
        return 1;
    }
    if w.pc == 0 {
        w.why = stop::COMPLETE;
        return 1;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch slot, exclusive while this program runs.
    let buf = unsafe { &mut *buf };
    buf.ips[i] = w.pc;
    w.len = i as u32 + 1;
    let (pc, sp, bp) = (w.pc, w.sp, w.bp);
    let cached = STEP_CACHE.get_ptr_mut(step_slot(w.tgid, pc));
    // SAFETY: per-CPU slot, exclusive while this program runs.
    let hit = cached.and_then(|c| {
        let c = unsafe { &*c };
        (c.pc == pc && c.tgid == w.tgid && c.epoch == w.epoch && w.epoch != 0).then_some(*c)
    });
    let (rule, row) = match hit {
        Some(c) => (c.rule, c.row),
        None => {
            let (rule, row) = find_rule(w.tgid, pc);
            if rule != 0 {
                if let Some(c) = cached {
                    // SAFETY: as above.
                    unsafe {
                        *c = CachedStep {
                            pc,
                            tgid: w.tgid,
                            epoch: w.epoch,
                            row,
                            rule,
                        }
                    };
                }
            }
            (rule, row)
        }
    };
    let step = match rule {
        RULE_CFI => cfi_step(&row, pc, sp, bp),
        RULE_FP => fp_step(sp, bp),
        _ => Step::Stop(stop::NO_CFI),
    };
    match step {
        Step::Next(ra, cfa, caller_bp) => {
            // The stack grows down: a caller's frame is above ours.
            if cfa <= sp && i > 0 {
                w.why = stop::BAD_FRAME;
                return 1;
            }
            w.pc = ra;
            w.sp = cfa;
            w.bp = caller_bp;
            0
        }
        Step::Switch(ra, cfa, caller_bp) => {
            w.pc = ra;
            w.sp = cfa;
            w.bp = caller_bp;
            0
        }
        Step::Stop(reason) => {
            w.why = reason;
            1
        }
    }
}

/// Unwind from `regs` (whose `ip` is a return address or a syscall's next
/// instruction) and store the stack; returns its id or `STACK_LOST`.
#[inline(always)]
pub fn record_stack(tgid: u32, regs: Regs) -> StackId {
    let mut w = Walk {
        tgid,
        len: 0,
        why: stop::DEPTH,
        // SAFETY: a plain array slot.
        epoch: UNWIND_EPOCH.get(0).copied().unwrap_or(0),
        pc: regs.ip,
        sp: regs.sp,
        bp: regs.bp,
    };
    // SAFETY: the callback and its context match bpf_loop's contract.
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            walk_frame as *mut c_void,
            (&raw mut w).cast(),
            0,
        )
    };
    // The interpreter's own frames, for a Python process.
    record_python(tgid);
    let Some(buf) = scratch() else {
        return STACK_LOST;
    };
    let len = w.len;
    let why = w.why;
    buf.len = len;
    buf.stop = why;
    // FNV-1a over the frames and the stop reason.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_FRAMES {
        if i as u32 >= len {
            break;
        }
        h = (h ^ buf.ips[i]).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ why as u64).wrapping_mul(0x0100_0000_01b3);
    let py_len = buf.py_len;
    for i in 0..MAX_PY_FRAMES {
        if i as u32 >= py_len {
            break;
        }
        h = (h ^ buf.py_code[i]).wrapping_mul(0x0100_0000_01b3);
        h = (h ^ buf.py_instr[i] as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let py_tail = ((buf.py_stop as u64) << 32) | buf.py_entry_mask as u64;
    h = (h ^ py_tail).wrapping_mul(0x0100_0000_01b3);
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
        if let Err(e) = STACKS.insert(&id, &*buf, 1) {
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
