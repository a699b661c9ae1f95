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
    /// `global_State.gc.currentwhite` and `.state` (one byte each): the
    /// white flips at each cycle's atomic phase; the state says whether
    /// the sweep that follows it is done.
    pub g_gc_white: u32,
    /// Each VM's `allocd` (the allocator state `lj_alloc_*` get as their
    /// first argument), in the order of `g`: which VM an allocation is for.
    pub allocd: [u64; LUA_MAX_VMS],
    pub g_gc_state: u32,
    /// `g - allocd` of a VM (its `GG_State` is the first block of its
    /// allocator state): how the kernel recognises a VM made after attach
    /// (`lua_code_cache off` makes one per request) from an allocation's
    /// `msp`, to count it. 0: unknown.
    pub msp_to_g: u32,
}
const _: () = assert!(size_of::<LuaProc>() == 152);

/// Per traced process (`LUA_GC`): the garbage collector's cycles as the
/// allocator's probes see them. A block of a Lua VM is tagged with the
/// process's generation at its allocation (`AllocInfo::kind`, see
/// [`gen_tag`]); one allocated before the last atomic phase and still
/// there once the sweep after it is done was reachable: it survived a
/// cycle. Younger ones may be garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LuaGc {
    /// Atomic phases seen, over the process's VMs (a white flip each).
    pub gen: u32,
    /// Per VM: its `currentwhite` last seen, plus 1 (0: not seen yet).
    pub white: [u32; LUA_MAX_VMS],
    /// Per VM: its `gc.state` last seen ([`gc_state`]).
    pub state: [u32; LUA_MAX_VMS],
    pub _pad: u32,
}
const _: () = assert!(size_of::<LuaGc>() == 40);

/// LuaJIT's `gc.state` values.
pub mod gc_state {
    pub const PAUSE: u32 = 0;
    pub const PROPAGATE: u32 = 1;
    pub const ATOMIC: u32 = 2;
    pub const SWEEP_STRING: u32 = 3;
    pub const SWEEP: u32 = 4;
    pub const FINALIZE: u32 = 5;
    /// Whether the sweep after the last atomic phase is still running
    /// (blocks of the generation before may still be garbage).
    pub const fn sweeping(state: u32) -> bool {
        state == SWEEP_STRING || state == SWEEP
    }
}

/// `AllocInfo::kind` and `PendingCall::kind`: the allocation kind in the
/// low byte, a Lua block's generation tag above it (0: not a Lua block).
pub mod gen_tag {
    pub const SHIFT: u32 = 8;
    pub const KIND_MASK: u32 = 0xff;
    /// Tags wrap: 24 bits, never 0.
    pub const fn of_gen(gen: u32) -> u32 {
        (gen % 0xff_ffff) + 1
    }
    pub const fn kind(v: u32) -> u32 {
        v & KIND_MASK
    }
    pub const fn tag(v: u32) -> u32 {
        v >> SHIFT
    }
}

/// Per `(tgid, stack)` (`LUA_YOUNG`): the outstanding bytes and blocks
/// of the two youngest generations a stack allocated in, by generation
/// tag parity; a slot whose tag is older than the last two generations
/// holds nothing young (its blocks survived).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LuaYoung {
    pub bytes: [i64; 2],
    pub allocs: [i64; 2],
    pub tag: [u32; 2],
}
const _: () = assert!(size_of::<LuaYoung>() == 40);

impl LuaYoung {
    /// Bytes and blocks that have not survived a cycle yet, given the
    /// process's generation now and whether a sweep is running.
    pub fn young(&self, gen: u32, sweeping: bool) -> (i64, i64) {
        let now = gen_tag::of_gen(gen);
        let before = gen_tag::of_gen(gen.wrapping_sub(1));
        let mut out = (0, 0);
        for i in 0..2 {
            if self.tag[i] == now || (sweeping && self.tag[i] == before) {
                out.0 += self.bytes[i];
                out.1 += self.allocs[i];
            }
        }
        out
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn young_is_the_last_generation_and_while_sweeping_the_one_before() {
        let g = 7;
        let y = LuaYoung {
            bytes: [100, 30],
            allocs: [2, 1],
            // Slot by tag parity: tag(7) = 8 in slot 0, tag(6) = 7 in 1.
            tag: [gen_tag::of_gen(g), gen_tag::of_gen(g - 1)],
        };
        assert_eq!(y.young(g, false), (100, 2));
        assert_eq!(y.young(g, true), (130, 3));
        // Two cycles on, both slots hold survivors.
        assert_eq!(y.young(g + 2, true), (0, 0));
        assert!(gc_state::sweeping(gc_state::SWEEP));
        assert!(!gc_state::sweeping(gc_state::PAUSE));
        assert_eq!(gen_tag::tag(AllocKindTag::of(3, 5)), 5);
        assert_eq!(gen_tag::kind(AllocKindTag::of(3, 5)), 3);
    }

    struct AllocKindTag;
    impl AllocKindTag {
        fn of(kind: u32, tag: u32) -> u32 {
            kind | tag << gen_tag::SHIFT
        }
    }
}
