//! The kernel's LuaJIT walker: a process's VMs and their layout
//! (`LUA_PROCS`), how a recorded frame's position reads, and why a walk
//! ended.

use core::mem::size_of;

/// Most LuaJIT VMs (`global_State`s) per process the walker looks at.
pub const LUA_MAX_VMS: usize = 4;

/// Where a traced process's LuaJIT VMs are, and the byte offsets of the
/// fields the kernel walk reads (GC64 x86-64 builds of LuaJIT 2.1). Set
/// by user space (`tracer/src/runtime/lua/`) per process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LuaProc {
    /// Runtime range of the interpreter (`lj_vm`): a native frame there
    /// is a C-level call of the VM, whose frame holds the running state.
    pub vm_start: u64,
    pub vm_end: u64,
    /// Each VM's `global_State *` (0: unused slot).
    pub g: [u64; LUA_MAX_VMS],
    /// `global_State.vmstate` (`int32`: >= 0 a trace number, negative an
    /// interpreter state).
    pub g_vmstate: u32,
    /// `global_State.cur_L`: the `lua_State` the VM last entered.
    pub g_cur_l: u32,
    /// `global_State.jit_base`: the base of the frame a running trace
    /// started in (0 outside traces).
    pub g_jit_base: u32,
    /// `lua_State.base`, `.stack` and `.cframe`.
    pub l_base: u32,
    pub l_stack: u32,
    pub l_cframe: u32,
    /// In the VM's C frame (at `cframe & !3`): the saved bytecode PC, the
    /// previous C frame, and the return address into the VM's caller
    /// (the saved `%rbp` is the word below it; the caller's stack pointer
    /// the word above).
    pub cframe_pc: u32,
    pub cframe_prev: u32,
    pub cframe_ret: u32,
    /// `GCfuncL.pc`: the function's bytecode, `GCproto` + `proto_size`.
    pub func_pc: u32,
    /// `GCfunc.ffid` (one byte: 0 a Lua function, 1 a C function, more a
    /// built-in "fast function").
    pub func_ffid: u32,
    /// `sizeof(GCproto)`.
    pub proto_size: u32,
    /// `jit_State.trace` from `g` (`GG_State.J - GG_State.g` plus the
    /// field's offset): the traces by number; `GCtrace.mcode` and
    /// `.szmcode`: a trace's machine code, where the walker looks for
    /// the trace's native frame (the native walk cannot unwind it).
    pub g_traces: u32,
    pub trace_mcode: u32,
    pub trace_szmcode: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<LuaProc>() == 112);

/// How [`crate::InterpFrames::pos`] reads for a Lua frame. Non-negative:
/// the bytecode position after the one running (`proto_bcpos` of the
/// saved or return PC; the instruction running is one before). For a
/// frame that is not a Lua function the recorded object is the `GCfunc`
/// itself and the position is `CFUNC - ffid`.
pub mod lua_pos {
    /// A Lua function whose position is not known.
    pub const UNKNOWN: i32 = -1;
    /// A Lua function running in a JIT trace (the trace started in it;
    /// functions it inlined have no frame).
    pub const TRACE: i32 = -2;
    /// `CFUNC - ffid`: a C function (ffid 1) or a built-in (ffid > 1).
    pub const CFUNC: i32 = -16;
    /// `TRACE_AT - traceno`: not a frame but where a trace was, recorded
    /// before the trace's first frame; the object is the return address
    /// into the trace's machine code, which user space maps to the
    /// bytecode (and so the function and line) through the trace's
    /// snapshots.
    pub const TRACE_AT: i32 = -(1 << 20);
}

/// Why a Lua stack walk ended (or did not start).
pub mod lua_stop {
    /// Not a LuaJIT process: no frames.
    pub const NONE: u32 = 0;
    /// Reached the bottom of the running coroutine's stack.
    pub const COMPLETE: u32 = 1;
    /// Hit `MAX_INTERP_FRAMES`.
    pub const DEPTH: u32 = 2;
    /// No VM of the process is running on this thread's stack (a thread
    /// without Lua, or C code called outside the VM).
    pub const NOT_RUNNING: u32 = 3;
    /// VM memory could not be read, or a frame made no sense.
    pub const UNREADABLE: u32 = 4;
}
