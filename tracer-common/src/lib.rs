//! The ABI shared by leaktrace's eBPF programs (`tracer-ebpf`) and its
//! user-space daemon (`tracer`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and made of fixed-width integers
//! with explicit padding, so both sides agree on layout byte for byte; a
//! `const` assertion next to each type pins its size. Map and program names
//! live here too, so a rename cannot drift between the two sides.
#![no_std]

use core::mem::size_of;

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
    pub const ALLOC_PROGRAMS: [(u32, &str); 3] = [
        (NATIVE, "native_alloc"),
        (FINISH, "finish_alloc"),
        (runtime_stage(crate::runtime::PYTHON), "python_alloc"),
    ];
    /// `(stage, program)` of the syscall chain.
    pub const SYSCALL_PROGRAMS: [(u32, &str); 3] = [
        (NATIVE, "native_syscall"),
        (FINISH, "finish_syscall"),
        (runtime_stage(crate::runtime::PYTHON), "python_syscall"),
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
    /// Not a syscall: the OOM killer chose `tgid` (`oom:mark_victim`).
    pub const OOM_VICTIM: u32 = 0xffff_0001;
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
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = 16;

impl Counter {
    pub const ALL: [Counter; 16] = [
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
    /// Python; 0 always means "no walk").
    pub stop: u32,
    /// Bit `i`: frame `i` is the first of a C-level call of the
    /// interpreter (Python: `is_entry` 3.11, just inside a C-stack shim
    /// 3.12+, every frame 3.8-3.10), so frames `0..=i` since the previous
    /// entry ran in one native call of the interpreter loop.
    pub entry_mask: u32,
    /// The runtime's object of each frame (Python: `PyCodeObject *`).
    pub code: [u64; MAX_INTERP_FRAMES],
    /// Where each frame is in it, as `i32` (negative: not started yet).
    /// Python: the byte offset of the last instruction started from the
    /// start of the bytecode (3.11+), or `f_lasti` (3.8-3.10).
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
    /// Highest id a walker stage is reserved for.
    pub const MAX: u32 = 5;
}

/// Why a Python stack walk ended (or did not start).
pub mod py_stop {
    /// Not a Python process (or its version has no layout): no frames.
    pub const NONE: u32 = 0;
    /// Reached the thread's outermost Python frame.
    pub const COMPLETE: u32 = 1;
    /// Hit `MAX_INTERP_FRAMES`.
    pub const DEPTH: u32 = 2;
    /// The allocating thread has no Python thread state it can be matched
    /// with (a C thread, or one not holding the GIL).
    pub const NO_THREAD: u32 = 3;
    /// Interpreter memory could not be read (paged out, torn down).
    pub const UNREADABLE: u32 = 4;
}

/// Where a traced process's CPython keeps its state, and the byte offsets
/// of the fields the kernel walk reads. Set by user space per process from
/// a layout it knows for the interpreter's version (3.8-3.13); `flags`
/// (`py_flags::*`) say how the version's frames are shaped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// Runtime address of `_PyRuntime`.
    pub runtime_addr: u64,
    /// `Py_Version` (`0x030b02f0` for 3.11.2); `(major << 24) | (minor << 16)`
    /// when the build does not say more.
    pub version: u32,
    /// `_PyRuntime.gilstate.tstate_current`: the GIL holder's thread state
    /// (0: the version has none, 3.12+).
    pub tstate_current: u32,
    /// `_PyRuntime.gilstate.autoTSSkey` + 4 (`_PyRuntime.autoTSSkey` + 4 in
    /// 3.12+): the pthread key whose value is each thread's own thread
    /// state (0: not used).
    pub tss_key: u32,
    /// `PyThreadState.thread_id` (`pthread_self()`, equal to the thread's
    /// fsbase with glibc on x86-64).
    pub tstate_thread_id: u32,
    /// `PyThreadState.cframe` (3.11, 3.12); with `py_flags::FRAME_IN_TSTATE`
    /// the field holding the innermost frame itself (`frame` 3.8-3.10,
    /// `current_frame` 3.13).
    pub tstate_cframe: u32,
    /// `_PyCFrame.current_frame` (unused with `py_flags::FRAME_IN_TSTATE`).
    pub cframe_current_frame: u32,
    /// `_PyInterpreterFrame.f_code` (`f_executable` 3.13, `PyFrameObject.f_code`
    /// 3.8-3.10).
    pub frame_code: u32,
    /// `_PyInterpreterFrame.previous` (`PyFrameObject.f_back` 3.8-3.10).
    pub frame_previous: u32,
    /// `_PyInterpreterFrame.prev_instr` (`instr_ptr` 3.13), a pointer into
    /// the bytecode; with `py_flags::INSTR_LASTI` the `int f_lasti`.
    pub frame_prev_instr: u32,
    /// `_PyInterpreterFrame.is_entry` (one byte, 3.11); with
    /// `py_flags::ENTRY_OWNER_SHIM` the `owner` byte (3.12+); unused with
    /// `py_flags::ENTRY_EVERY_FRAME`.
    pub frame_is_entry: u32,
    /// `PyCodeObject.co_code_adaptive`: where the bytecode starts (unused
    /// with `py_flags::INSTR_LASTI`).
    pub code_bytecode: u32,
    /// `py_flags::*`.
    pub flags: u32,
}
const _: () = assert!(size_of::<PyProc>() == 56);

/// How a CPython version's frames are shaped ([`PyProc::flags`]).
pub mod py_flags {
    /// `PyProc::tstate_cframe` holds the innermost frame itself: no
    /// `_PyCFrame` in between (3.8-3.10, 3.13).
    pub const FRAME_IN_TSTATE: u32 = 1 << 0;
    /// `PyProc::frame_prev_instr` is `int f_lasti`, recorded as it is (in
    /// bytes 3.8-3.9, in code units 3.10; -1: not started).
    pub const INSTR_LASTI: u32 = 1 << 1;
    /// Every frame is its own C-level call of the eval loop (3.8-3.10).
    pub const ENTRY_EVERY_FRAME: u32 = 1 << 2;
    /// `PyProc::frame_is_entry` is the frame's `owner`: frames owned by the
    /// C stack (`FRAME_OWNED_BY_CSTACK`) are the shims the eval loop
    /// pushes when called from C. They are not recorded; the frame just
    /// inside one is an entry frame (3.12+).
    pub const ENTRY_OWNER_SHIM: u32 = 1 << 3;
    /// `_PyInterpreterFrame.owner` of a C-stack shim frame.
    pub const FRAME_OWNED_BY_CSTACK: u8 = 3;
}

/// Why an unwind ended.
pub mod stop {
    /// Reached the outermost frame (`_start`, a thread's entry).
    pub const COMPLETE: u32 = 0;
    /// Hit `MAX_FRAMES`.
    pub const DEPTH: u32 = 1;
    /// An address outside any file mapping: JIT or other generated code.
    pub const ANON_CODE: u32 = 2;
    /// No unwind rule covers the address (a gap in the object's CFI).
    pub const NO_CFI: u32 = 3;
    /// Stack memory could not be read.
    pub const UNREADABLE: u32 = 4;
    /// A CFI rule the unwinder does not evaluate (signal frame, ...).
    pub const UNSUPPORTED: u32 = 5;
    /// The walk produced an implausible frame (frame-pointer fallback in
    /// code built without frame pointers).
    pub const BAD_FRAME: u32 = 6;
}

/// One executable mapping of a traced process, for the unwinder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMap {
    pub start: u64,
    pub end: u64,
    /// Runtime address minus ELF virtual address.
    pub bias: u64,
    /// First row of the object's table in `UNWIND_ROWS`.
    pub rows_start: u32,
    /// Rows in the table; 0: no CFI, unwind through frame pointers.
    pub rows_len: u32,
}
const _: () = assert!(size_of::<ExecMap>() == 32);

/// Executable mappings of one process, sorted by `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcMaps {
    pub len: u32,
    pub _pad: u32,
    pub maps: [ExecMap; MAX_PROC_MAPS],
}
const _: () = assert!(size_of::<ProcMaps>() == 8 + 32 * MAX_PROC_MAPS);

/// One row of a compact x86-64 unwind table, derived from DWARF CFI
/// (`.eh_frame` / `.debug_frame`) by user space and evaluated by the eBPF
/// unwinder. A row applies from `pc` up to the next row's `pc`. The return
/// address is always at `CFA - 8` (x86-64 System V).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// Start of the range, as an ELF virtual address of the object (add the
    /// mapping's load bias for a runtime address).
    pub pc: u32,
    /// Added to the register named by `cfa_reg`.
    pub cfa_offset: i32,
    /// With `rbp_rule == RBP_AT_CFA_OFFSET`: the caller's `%rbp` is saved
    /// at `CFA + rbp_offset`.
    pub rbp_offset: i16,
    /// One of the `CFA_*` constants.
    pub cfa_reg: u8,
    /// One of the `RBP_*` constants.
    pub rbp_rule: u8,
}
const _: () = assert!(size_of::<UnwindRow>() == 12);

/// `CFA = %rsp + cfa_offset`.
pub const CFA_RSP: u8 = 0;
/// `CFA = %rbp + cfa_offset`.
pub const CFA_RBP: u8 = 1;
/// PLT stubs: `CFA = %rsp + 8 + (((%rip & 15) >= 11) ? 8 : 0)`.
/// In these rows `cfa_offset` carries the threshold the CFI tests against:
/// 11 for the usual lazy PLT (`DW_OP_lit11`), 10 for the variant binutils
/// emits with `DW_OP_lit10`; compare with `cfa_offset` rather than 11.
pub const CFA_PLT: u8 = 2;
/// No rule here (a gap between functions, a signal frame, or an
/// expression the unwinder does not evaluate): the walk stops, marked.
pub const CFA_UNDEFINED: u8 = 3;
/// `%rbp` is the outermost frame marker: the walk ends here normally
/// (the CFI marks the return address undefined, as `_start` does).
pub const CFA_END_OF_STACK: u8 = 4;
/// The frame switched stacks and its caller's frame is found through
/// `%rbp` alone (Go's `runtime.asmcgocall`, which calls C on the system
/// stack while `%rbp` still holds the goroutine frame's pointer): one
/// frame-pointer step, without the check that the caller's frame lies
/// above this one on the same stack.
pub const CFA_STACK_SWITCH: u8 = 5;

/// The caller's `%rbp` equals the current one.
pub const RBP_SAME: u8 = 0;
/// The caller's `%rbp` is saved at `CFA + rbp_offset`.
pub const RBP_AT_CFA_OFFSET: u8 = 1;
/// The caller's `%rbp` cannot be recovered (the walk can go on while no
/// later rule needs it).
pub const RBP_UNDEFINED: u8 = 2;

/// Key of `GO_BUCKETS`: a Go runtime profile bucket (`*runtime.bucket`,
/// which holds the allocation stack) in one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GoBucketKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Address of the bucket in the process.
    pub bucket: u64,
}
const _: () = assert!(size_of::<GoBucketKey>() == 16);

/// Byte offset of `size` (bytes per object) in a Go `runtime.bucket`
/// (Go 1.17-1.25).
pub const GO_BUCKET_SIZE_OFFSET: u64 = 32;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for GoBucketKey {}
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for StackBuf {}
    unsafe impl aya::Pod for ExecMap {}
    unsafe impl aya::Pod for ProcMaps {}
    unsafe impl aya::Pod for PyProc {}
    unsafe impl aya::Pod for SyscallEvent {}
    use super::*;
    // SAFETY: all are repr(C), Copy, made of integers with explicit padding.
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for StackKey {}
    unsafe impl aya::Pod for StackTotals {}
    unsafe impl aya::Pod for PendingCall {}
}
