//! The chain that records a stack: small programs joined by tail calls.
//!
//! A program that wants a stack (`alloc_exit`, `sys_exit`) fills this CPU's
//! [`Job`] with the registers and what to record at the end, then tail-calls
//! stage [`chain::NATIVE`]: up to `FRAMES_PER_STEP` native frames per call,
//! calling itself again until the walk ends; then, for a process registered
//! in `RUNTIMES`, the walker of its interpreter
//! ([`chain::runtime_stage`]: one program per runtime, which fills
//! `InterpFrames`); then [`chain::FINISH`], which stores the stack and
//! records the allocation or sends the event. Adding a runtime's walker is
//! adding its stage program and a line in `tracer_common::chain`'s tables. Every stage reads its inputs from the job, so the
//! verifier checks each program once, from one state, and its cost is
//! bounded by the stage's own loop, not by the caller's branches nor by the
//! stack's depth (the kernel allows 33 tail calls; a full walk takes
//! 64 / FRAMES_PER_STEP + Python's steps + 1).
//!
//! Programs of different types cannot tail-call each other, so the stages
//! exist twice: for uprobes (`CHAIN_ALLOC`) and for raw tracepoints
//! (`CHAIN_SYSCALL`), each with its own job slot.
//!
//! A uprobe program can be preempted on kernels with preemptible RCU, and
//! another task's chain may then take this CPU's slot: each stage checks
//! that the job is still its task's and counts `UnwindAborted` otherwise.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
    EbpfContext,
};
use tracer_common::{chain, runtime, Counter, LuaProc, PyProc, StackBuf, SyscallEvent};

use aya_log_ebpf::warn;

use crate::counters::count;

/// Job slot of the allocation chain (kprobe-type programs).
pub const ALLOC: u32 = 0;
/// Job slot of the syscall chain (raw-tracepoint programs).
pub const SYSCALL: u32 = 1;

#[map]
static CHAIN_ALLOC: ProgramArray = ProgramArray::with_max_entries(chain::SLOTS, 0);

#[map]
static CHAIN_SYSCALL: ProgramArray = ProgramArray::with_max_entries(chain::SLOTS, 0);

/// The allocation an allocation chain records at its end.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AllocRecord {
    pub addr: u64,
    pub weight_bytes: u64,
    pub weight_count: u32,
    pub kind: u32,
}

/// One stack being recorded, and what to do with it.
#[repr(C)]
pub struct Job {
    /// The task whose stack this is.
    pub pid_tgid: u64,
    pub tgid: u32,
    /// `UNWIND_EPOCH` when the walk began.
    pub epoch: u32,
    /// Native walk: the frame being unwound.
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    /// Why the native walk stopped (a `stop::*`).
    pub why: u32,
    /// Lua: 1 + the index of the native frame in the running trace's
    /// machine code, 0 for none (set by the Lua stage).
    pub unmapped_at: u32,
    /// The stack pointer the walk began with.
    pub start_sp: u64,
    /// Interpreter walk: 1 once the thread's innermost frame was found.
    pub interp_started: u32,
    /// Interpreter walk: the frame being walked.
    pub interp_frame: u64,
    /// Interpreter walk: iterations used (Python's shims included).
    pub interp_steps: u32,
    pub _pad: u32,
    /// The Python layout of the process, copied from `PY_PROCS`.
    pub py: PyProc,
    /// The Lua walk: the process's VMs and layout (from `LUA_PROCS`),
    /// the running VM's C frame, the position of the frame being walked
    /// (0: unknown), the coroutine stack's bottom, 1 when the frame at
    /// `interp_frame` is a vararg frame's pseudo-frame (not recorded), and
    /// 1 when the native walk must go on from the VM's C frame afterwards
    /// (a trace's machine code has no unwind rows).
    pub lua: LuaProc,
    pub lua_cframe: u64,
    pub lua_pc: u64,
    pub lua_bottom: u64,
    pub lua_skip: u32,
    pub lua_resume: u32,
    pub alloc: AllocRecord,
    pub event: SyscallEvent,
    /// The stack itself, as stored in `STACKS`.
    pub buf: StackBuf,
}

#[map]
static JOBS: PerCpuArray<Job> = PerCpuArray::with_max_entries(2, 0);

/// This CPU's job in `slot`, whoever holds it (for the chain's start).
#[inline(always)]
pub fn claim(slot: u32) -> Option<&'static mut Job> {
    let p = JOBS.get_ptr_mut(slot)?;
    // SAFETY: a per-CPU slot; the holder is checked by `job` at each stage.
    Some(unsafe { &mut *p })
}

/// This CPU's job in `slot` if it is still the current task's.
#[inline(always)]
pub fn job<C: EbpfContext>(ctx: &C, slot: u32) -> Option<&'static mut Job> {
    let job = claim(slot)?;
    if job.pid_tgid != bpf_get_current_pid_tgid() {
        count(Counter::UnwindAborted);
        // Diagnostics, off unless `--debug-bpf` (the level is a constant
        // patched at load, so the verifier drops this path).
        warn!(
            ctx,
            "recording chain {}: the job slot was taken by another task", slot
        );
        return None;
    }
    Some(job)
}

#[inline(always)]
fn programs(slot: u32) -> &'static ProgramArray {
    if slot == ALLOC {
        &CHAIN_ALLOC
    } else {
        &CHAIN_SYSCALL
    }
}

/// Go on with `stage`. Returns only when the tail call failed (an empty
/// slot, or the kernel's limit of 33), after counting the loss.
#[inline(always)]
pub fn next<C: EbpfContext>(ctx: &C, slot: u32, stage: u32) {
    // SAFETY: the programs in the array take the same context type.
    unsafe { programs(slot).tail_call(ctx, stage) };
    // Counted, not logged: this is inlined at every exit of a stage, and
    // a log statement at each multiplied the verifier's work on Linux 6.1
    // past its limit when diagnostics were on.
    count(Counter::UnwindAborted);
}

/// Start a chain whose job the caller has filled. Returns only when the
/// first tail call failed; the loss is counted and the caller records
/// what it can without a stack.
#[inline(always)]
pub fn start<C: EbpfContext>(ctx: &C, slot: u32) {
    next(ctx, slot, chain::NATIVE)
}

/// The array slot a length field names, masked where it is used: `*len &
/// (capacity - 1)` (capacity a power of two), read so LLVM cannot prove
/// the mask redundant after the caller's own bounds check and drop it.
/// Linux 6.1's verifier loses that check when the index is spilled to the
/// stack before it and reloaded after (newer ones carry it through).
#[inline(always)]
pub fn slot(len: &u32, capacity: usize) -> usize {
    // SAFETY: a plain read of a field the caller holds a reference to.
    let v = unsafe { core::ptr::read_volatile(len) };
    v as usize & (capacity - 1)
}

/// tgid -> the runtime whose walker runs after the native walk.
#[map]
static RUNTIMES: HashMap<u32, u32> = HashMap::with_max_entries(1 << 11, 0);

/// Slot 0 is 1 once any process is in `RUNTIMES`, so native-only tracing
/// skips the lookup on every allocation.
#[map]
static RUNTIME_ANY: Array<u32> = Array::with_max_entries(1, 0);

/// After the native walk: the walker of the process's runtime, or the end.
#[inline(always)]
pub fn after_native<C: EbpfContext>(ctx: &C, slot: u32, tgid: u32) {
    if RUNTIME_ANY.get(0).copied().unwrap_or(0) != 0 {
        // SAFETY: read-only lookup, copied out.
        let r = unsafe { RUNTIMES.get(&tgid) }
            .copied()
            .unwrap_or(runtime::NONE);
        if r != runtime::NONE && r <= runtime::MAX {
            return next(ctx, slot, chain::runtime_stage(r));
        }
    }
    next(ctx, slot, chain::FINISH)
}
