//! The ABI shared by leaktrace's eBPF programs (`tracer-ebpf`) and its
//! user-space daemon (`tracer`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and made of fixed-width integers
//! with explicit padding, so both sides agree on layout byte for byte; a
//! `const` assertion next to each type pins its size. Map and program names
//! live here too, so a rename cannot drift between the two sides.
#![no_std]

use core::mem::size_of;

mod go;
mod lua;
mod python;
mod unwind;

pub use go::*;
pub use lua::*;
pub use python::*;
pub use unwind::*;

/// Deepest user stack the kernel records, in frames.
pub const MAX_FRAMES: usize = 64;

/// Deepest interpreter stack (Python, Lua, ...) recorded next to the
/// native one, in frames.
pub const MAX_INTERP_FRAMES: usize = 32;

/// Most executable mappings per process the unwinder knows; addresses in
/// further mappings unwind by frame pointer.
pub const MAX_PROC_MAPS: usize = 128;

/// Identity of a recorded stack: a 64-bit hash of its frames (never 0).
pub type StackId = u64;

/// Stack id of every allocation whose stack could not be recorded.
pub const STACK_LOST: StackId = 0;

/// Map names, as the eBPF object exports them.
pub mod maps {
    /// `(tgid, addr)` -> [`crate::AllocInfo`]: every block still live.
    pub const ALLOCS: &str = "ALLOCS";
    /// `(tgid, stack_id)` -> [`crate::StackTotals`]: kernel-side per-stack ledger.
    pub const STACK_TOTALS: &str = "STACK_TOTALS";
    /// Stack id -> [`crate::StackBuf`]: each distinct stack, stored once.
    pub const STACKS: &str = "STACKS";
    /// Array of [`crate::UnwindRow`]: every object's unwind table, back to back.
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// tgid -> [`crate::ProcMaps`]: a process's executable mappings.
    pub const PROC_MAPS: &str = "PROC_MAPS";
    /// One `u32` bumped by user space whenever `PROC_MAPS` changes: the
    /// unwinder's per-CPU cache of unwind rules is valid for one value.
    pub const UNWIND_EPOCH: &str = "UNWIND_EPOCH";
    /// Program array of the allocation chain (kprobe-type programs), indexed
    /// by [`crate::chain`] stage.
    pub const CHAIN_ALLOC: &str = "CHAIN_ALLOC";
    /// Program array of the syscall chain (raw-tracepoint programs).
    pub const CHAIN_SYSCALL: &str = "CHAIN_SYSCALL";
    /// Thread id -> [`crate::PendingCall`]: an allocator call between entry and return.
    pub const PENDING: &str = "PENDING";
    /// Per-CPU array of `u64` counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// tgid -> 1 for every traced process (filters the syscall programs).
    pub const TARGETS: &str = "TARGETS";
    /// Ring buffer of [`crate::SyscallEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// tgid -> [`crate::PyProc`]: processes running a CPython whose frame
    /// layout leaktrace knows.
    pub const PY_PROCS: &str = "PY_PROCS";
    /// tgid -> [`crate::LuaProc`]: processes running LuaJIT VMs.
    pub const LUA_PROCS: &str = "LUA_PROCS";
    /// tgid -> `LuaGc`: the garbage collector's cycles seen per process.
    pub const LUA_GC: &str = "LUA_GC";
    /// `StackKey` -> `LuaYoung`: Lua bytes not yet through a GC cycle.
    pub const LUA_YOUNG: &str = "LUA_YOUNG";
    /// tgid -> one of [`crate::runtime`]: processes whose interpreter's
    /// frames are walked, and by which runtime's walker.
    pub const RUNTIMES: &str = "RUNTIMES";
    /// One `u32`: 1 once any process was registered in `RUNTIMES` (native
    /// tracing skips the lookup until then).
    pub const RUNTIME_ANY: &str = "RUNTIME_ANY";
    /// [`crate::GoBucketKey`] -> [`crate::StackTotals`]: the Go runtime's
    /// sampled heap objects per profile bucket, raw (not yet scaled by the
    /// sampling rate).
    pub const GO_BUCKETS: &str = "GO_BUCKETS";
}

/// The stages a stack is recorded in: each stage is its own small program,
/// reached by a tail call through a program array, so the verifier checks
/// each once, whatever the caller's state and whatever the stack's depth.
/// `alloc_exit` starts the allocation chain, `sys_exit` the syscall chain;
/// both run the same stages, compiled once per program type.
pub mod chain {
    /// Walks up to a fixed number of native frames, then calls itself
    /// again, or the walker of the process's runtime, or [`FINISH`].
    pub const NATIVE: u32 = 0;
    /// Stores the stack and records the allocation or sends the event.
    pub const FINISH: u32 = 1;
    /// The stage of runtime `r`'s interpreter walker (`crate::runtime`):
    /// it walks a few frames per call, then calls itself or [`FINISH`].
    pub const fn runtime_stage(r: u32) -> u32 {
        FINISH + r
    }
    /// Slots of each program array.
    pub const SLOTS: u32 = runtime_stage(crate::runtime::MAX) + 1;
    /// `(stage, program)` of the allocation chain.
    pub const ALLOC_PROGRAMS: [(u32, &str); 4] = [
        (NATIVE, "native_alloc"),
        (FINISH, "finish_alloc"),
        (runtime_stage(crate::runtime::PYTHON), "python_alloc"),
        (runtime_stage(crate::runtime::LUA), "lua_alloc"),
    ];
    /// `(stage, program)` of the syscall chain.
    pub const SYSCALL_PROGRAMS: [(u32, &str); 4] = [
        (NATIVE, "native_syscall"),
        (FINISH, "finish_syscall"),
        (runtime_stage(crate::runtime::PYTHON), "python_syscall"),
        (runtime_stage(crate::runtime::LUA), "lua_syscall"),
    ];
}

/// Syscalls leaktrace accounts (x86-64 numbers).
pub mod sys {
    pub const MMAP: u32 = 9;
    pub const MUNMAP: u32 = 11;
    pub const BRK: u32 = 12;
    pub const MREMAP: u32 = 25;
    /// `MAP_ANONYMOUS`.
    pub const MAP_ANONYMOUS: u64 = 0x20;
    /// `MAP_SHARED`.
    pub const MAP_SHARED: u64 = 0x01;
    /// Not a syscall: the OOM killer chose `tgid` (`oom:mark_victim`).
    pub const OOM_VICTIM: u32 = 0xffff_0001;
    /// Not a syscall: a sampled user write fault on a page not present
    /// (`exceptions:page_fault_user`): `ret` is the faulting address,
    /// `args[0]` the error code, `args[1]` the pages the sample stands for.
    pub const PAGE_FAULT: u32 = 0xffff_0002;
    /// Not a syscall: a traced process mapped a file executable (dlopen);
    /// `ret` is the address, `args[0]` the length.
    pub const MMAP_EXEC: u32 = 0xffff_0003;
    /// `PROT_EXEC`.
    pub const PROT_EXEC: u64 = 4;
    /// x86 page fault error code bits (`X86_PF_*`).
    pub const PF_PROT: u64 = 1;
    pub const PF_WRITE: u64 = 2;
    pub const PF_INSTR: u64 = 16;
}

/// Globals set by user space before load.
pub mod globals {
    /// Byte offset of `tgid` in `struct task_struct` (from kernel BTF).
    pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
    /// 1: report every OOM victim, traced or not.
    pub const OOM_ANY: &str = "OOM_ANY";
    /// Mean bytes between sampled allocations; 0: every allocation.
    pub const SAMPLE_BYTES: &str = "SAMPLE_BYTES";
    /// Byte offset of `thread.fsbase` in `struct task_struct` (from kernel
    /// BTF); 0: unknown, Python frames are not walked.
    pub const TASK_FSBASE_OFFSET: &str = "TASK_FSBASE_OFFSET";
    /// Mean write faults on new pages between two recorded ones, per CPU
    /// (node mode's growth stacks); 0: the page fault program is off.
    pub const FAULT_PERIOD: &str = "FAULT_PERIOD";
}

/// A completed memory syscall of a traced process, for user space's
/// region tracker. Calls made from inside a probed allocator (malloc's own
/// mmap and brk) are not sent: the allocation is already counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallEvent {
    pub ts_ns: u64,
    pub tgid: u32,
    /// One of the `sys::*` numbers.
    pub nr: u32,
    /// Return value (an address for mmap, mremap and brk).
    pub ret: u64,
    /// mmap: len, flags; munmap: addr, len; mremap: old addr, old len, new
    /// len; brk: requested break.
    pub args: [u64; 3],
    /// User stack of the call, or [`STACK_LOST`].
    pub stack_id: StackId,
    /// `SYSCALL_IN_ALLOCATOR` when made from inside a probed allocator call.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SyscallEvent>() == 64);

/// The syscall came from inside malloc & co. (only brk is sent then, so the
/// region tracker knows where the break is).
pub const SYSCALL_IN_ALLOCATOR: u32 = 1;

/// Key of the live-allocation table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub addr: u64,
    pub tgid: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AllocKey>() == 16);

/// One live block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocInfo {
    /// Bytes this block stands for: its size, or with byte sampling its
    /// inverse-probability weight.
    pub size_bytes: u64,
    pub ts_ns: u64,
    /// Key in `STACKS`, or [`STACK_LOST`].
    pub stack_id: StackId,
    /// One of [`AllocKind`] as `u32`.
    pub kind: u32,
    /// Allocations this block stands for (1 unless sampled).
    pub count: u32,
}
const _: () = assert!(size_of::<AllocInfo>() == 32);

/// Key of the kernel-side per-stack ledger.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Key in `STACKS`; [`STACK_LOST`] when the stack could not be recorded
    /// (all such allocations of a process share one row).
    pub stack_id: StackId,
}
const _: () = assert!(size_of::<StackKey>() == 16);

/// Running totals of one `(tgid, stack)` row. Updated with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackTotals {
    /// Bytes allocated from this stack and not yet freed.
    pub outstanding_bytes: i64,
    /// Blocks allocated from this stack and not yet freed.
    pub outstanding_allocs: i64,
    /// Bytes ever allocated from this stack since attach.
    pub total_bytes: u64,
    /// Blocks ever allocated from this stack since attach.
    pub total_allocs: u64,
}
const _: () = assert!(size_of::<StackTotals>() == 32);

/// An allocator call seen at entry and waiting for its return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCall {
    /// Requested size.
    pub size_bytes: u64,
    /// For `realloc`: the block being resized (0 for none).
    pub old_addr: u64,
    /// Stack pointer at entry. The call's own return comes back with the
    /// stack pointer 8 above it; a nested call's entry and return are
    /// lower, a stale record's (its return never came) are higher.
    pub entry_sp: u64,
    /// One of [`AllocKind`] as `u32`.
    pub kind: u32,
    /// Probed calls chained to this one by a tail call (`jmp` from one
    /// allocator function to another, on the same stack pointer): their
    /// returns come first and are not counted.
    pub depth: u32,
    /// Bytes the new block will stand for (its size, or its sampling
    /// weight); 0 when byte sampling skipped it.
    pub weight_bytes: u64,
    /// Allocations the new block will stand for; 0 when not sampled.
    pub weight_count: u32,
    /// The thread whose call this is; 0 for a free slot (`PENDING` is
    /// indexed by thread id modulo its size, see [`PENDING_SLOTS`]).
    pub tid: u32,
    /// The return address at entry (`[entry_sp]`): the call's own return
    /// comes back to it. A call entered on the same stack pointer with
    /// another word there is chained to this one (its return address is
    /// already the kernel's return trampoline); with the same word it is a
    /// new call from the same site, and this record is stale.
    pub ret_addr: u64,
    /// The last call recorded from this slot: its thread, and the stack
    /// pointer and address its return came back with. Some kernels (6.1
    /// and 6.12 do, 6.18 does not) run every return consumer of a uprobe for every return (one
    /// per traced process sharing the object), so the same return comes
    /// again once per other traced process; those runs are told from a
    /// return whose entry was never seen.
    pub done_sp: u64,
    pub done_ip: u64,
    pub done_tid: u32,
    pub _pad0: u32,
    /// Pads a slot to two cache lines, so threads with consecutive ids
    /// (a pool started together) never share a line: with 48-byte slots
    /// two threads allocating at full speed spent ~90 ns per call
    /// bouncing one.
    pub _pad: [u64; 6],
}
const _: () = assert!(size_of::<PendingCall>() == 128);

/// Slots of the `PENDING` array (a power of two): a thread's call waits in
/// slot `tid % PENDING_SLOTS`. An array slot costs a few nanoseconds where
/// a hash-map insert and delete cost ~150 ns per call; two threads whose
/// ids share a slot and are inside an allocator call at the same moment
/// displace each other's record (counted, `pending_displaced`).
pub const PENDING_SLOTS: u32 = 1 << 15;

/// Which allocator entry point produced a block.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Memalign = 3,
    PosixMemalign = 4,
    Valloc = 5,
    Mmap = 6,
}

impl AllocKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Malloc,
            1 => Self::Calloc,
            2 => Self::Realloc,
            3 => Self::Memalign,
            4 => Self::PosixMemalign,
            5 => Self::Valloc,
            6 => Self::Mmap,
            _ => return None,
        })
    }
}

/// Indices of the per-CPU `COUNTERS` array. Every way an event can be
/// dropped or mispaired has its own slot; the report shows them all.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Allocations recorded in the live table.
    Allocs = 0,
    /// Frees that matched a recorded block.
    Frees = 1,
    /// Frees of blocks not in the table (allocated before attach, or lost).
    FreesUnknown = 2,
    /// Allocations that returned NULL (not counted).
    FailedAllocs = 3,
    /// Allocator calls nested inside another probed call (counted once).
    Nested = 4,
    /// Lost: the live table was full.
    AllocsMapFull = 5,
    /// Lost: the per-stack ledger was full.
    StackTotalsMapFull = 6,
    /// Lost: a call's pending record was displaced by another thread's
    /// sharing its slot.
    PendingMapFull = 7,
    /// Stack lost to a stack-map hash collision.
    StackCollision = 8,
    /// Stack lost for another reason (fault, map full).
    StackLost = 9,
    /// Return seen without its entry.
    MissingEntry = 10,
    /// Entry whose return was never seen (longjmp, thread killed).
    MissingReturn = 11,
    /// A recorded block was replaced by a new one at the same address
    /// (its free was never seen).
    StaleReplaced = 12,
    /// Lost: the syscall ring buffer was full.
    EventsLost = 13,
    /// Lost: a stack's recording chain was cut (a tail call failed, or
    /// another task took this CPU's slot while the chain ran).
    UnwindAborted = 14,
    /// Not a loss: a return seen again by another traced process's return
    /// probe (kernels that run every return consumer; see `PendingCall`).
    RepeatedReturns = 15,
    /// Not a loss: a LuaJIT VM made after attach allocated on a thread
    /// (`lua_code_cache off` makes one per request); counted when a
    /// thread's VM changes.
    LuaVmsAfterAttach = 16,
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = 17;

impl Counter {
    pub const ALL: [Counter; 17] = [
        Counter::Allocs,
        Counter::Frees,
        Counter::FreesUnknown,
        Counter::FailedAllocs,
        Counter::Nested,
        Counter::AllocsMapFull,
        Counter::StackTotalsMapFull,
        Counter::PendingMapFull,
        Counter::StackCollision,
        Counter::StackLost,
        Counter::MissingEntry,
        Counter::MissingReturn,
        Counter::StaleReplaced,
        Counter::EventsLost,
        Counter::UnwindAborted,
        Counter::RepeatedReturns,
        Counter::LuaVmsAfterAttach,
    ];

    /// Name used in reports (`snake_case`).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Allocs => "allocs",
            Counter::Frees => "frees",
            Counter::FreesUnknown => "frees_unknown",
            Counter::FailedAllocs => "failed_allocs",
            Counter::Nested => "nested_calls",
            Counter::AllocsMapFull => "allocs_map_full",
            Counter::StackTotalsMapFull => "stack_totals_map_full",
            Counter::PendingMapFull => "pending_displaced",
            Counter::StackCollision => "stack_collisions",
            Counter::StackLost => "stacks_lost",
            Counter::MissingEntry => "missing_entry",
            Counter::MissingReturn => "missing_return",
            Counter::StaleReplaced => "stale_replaced",
            Counter::EventsLost => "syscall_events_lost",
            Counter::UnwindAborted => "unwind_aborted",
            Counter::RepeatedReturns => "repeated_returns",
            Counter::LuaVmsAfterAttach => "lua_vms_after_attach",
        }
    }

    /// Whether this counter means data was lost (as opposed to informational).
    pub const fn is_loss(self) -> bool {
        matches!(
            self,
            Counter::AllocsMapFull
                | Counter::StackTotalsMapFull
                | Counter::PendingMapFull
                | Counter::StackCollision
                | Counter::StackLost
                | Counter::MissingEntry
                | Counter::MissingReturn
                | Counter::StaleReplaced
                | Counter::EventsLost
                | Counter::UnwindAborted
        )
    }
}

/// A stack as the unwinder recorded it: return addresses, innermost
/// first, and why the walk stopped; for a process running an interpreter
/// leaktrace knows, also that interpreter's frames ([`InterpFrames`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackBuf {
    pub len: u32,
    /// One of the `stop::*` reasons.
    pub stop: u32,
    pub ips: [u64; MAX_FRAMES],
    pub interp: InterpFrames,
}
const _: () = assert!(size_of::<StackBuf>() == 8 + 8 * MAX_FRAMES + size_of::<InterpFrames>());

/// The interpreter frames of one stack, as one runtime's walker recorded
/// them: which runtime, and per frame an object and a position in it that
/// the runtime's user-space side resolves to a name and a line (a
/// `PyCodeObject *` and a bytecode offset for Python), innermost first.
/// User space splices them in place of the interpreter's native frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterpFrames {
    /// One of [`runtime`]; [`runtime::NONE`] for a native-only stack.
    pub runtime: u32,
    /// Frames recorded.
    pub len: u32,
    /// Why the walk ended: one of the runtime's reasons ([`py_stop`] for
    /// Python, [`lua_stop`] for Lua; 0 always means "no walk").
    pub stop: u32,
    /// Bit `i`: frame `i` is the first of a C-level call of the
    /// interpreter (Python: `is_entry` 3.11, just inside a C-stack shim
    /// 3.12+, every frame 3.8-3.10), so frames `0..=i` since the previous
    /// entry ran in one native call of the interpreter loop.
    pub entry_mask: u32,
    /// The runtime's object of each frame (Python: `PyCodeObject *`; Lua:
    /// `GCproto *`, or the `GCfunc *` of a C function).
    pub code: [u64; MAX_INTERP_FRAMES],
    /// Where each frame is in it, as `i32` (negative: not started yet).
    /// Python: the byte offset of the last instruction started from the
    /// start of the bytecode (3.11+), or `f_lasti` (3.8-3.10). Lua: see
    /// [`lua_pos`].
    pub pos: [u32; MAX_INTERP_FRAMES],
}
const _: () = assert!(size_of::<InterpFrames>() == 16 + 12 * MAX_INTERP_FRAMES);

/// The interpreters whose frames the kernel walks, as tagged in
/// [`InterpFrames::runtime`] and registered in `RUNTIMES`. Each has its
/// walker at chain stage [`chain::runtime_stage`].
pub mod runtime {
    /// No interpreter frames.
    pub const NONE: u32 = 0;
    /// CPython 3.8-3.13 (`PY_PROCS` has the layout).
    pub const PYTHON: u32 = 1;
    /// LuaJIT 2.1, GC64 (`LUA_PROCS` has the VMs and layout).
    pub const LUA: u32 = 2;
    /// Highest id a walker stage is reserved for.
    pub const MAX: u32 = 5;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for GoBucketKey {}
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for StackBuf {}
    unsafe impl aya::Pod for ExecMap {}
    unsafe impl aya::Pod for ProcMaps {}
    unsafe impl aya::Pod for PyProc {}
    unsafe impl aya::Pod for LuaProc {}
    unsafe impl aya::Pod for LuaGc {}
    unsafe impl aya::Pod for LuaYoung {}
    unsafe impl aya::Pod for SyscallEvent {}
    use super::*;
    // SAFETY: all are repr(C), Copy, made of integers with explicit padding.
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for StackKey {}
    unsafe impl aya::Pod for StackTotals {}
    unsafe impl aya::Pod for PendingCall {}
}
