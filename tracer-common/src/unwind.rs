//! The native unwinder: a process's executable mappings (`PROC_MAPS`),
//! the CFI rows per object (`UNWIND_ROWS`) and why a walk ended.

use core::mem::size_of;

use crate::MAX_PROC_MAPS;

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
