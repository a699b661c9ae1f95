//! The kernel's Python walker: a process's CPython layout (`PY_PROCS`)
//! and why a walk ended.

use core::mem::size_of;

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
