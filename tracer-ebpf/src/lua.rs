//! LuaJIT: the allocator's entry probes and the Lua frames of the stack
//! being recorded.
//!
//! Allocator. A LuaJIT VM allocates every Lua object through its
//! `allocf`, by default `lj_alloc_f`, a dispatcher that jumps to three
//! internal functions: `lj_alloc_malloc(msp, nsize)`,
//! `lj_alloc_realloc(msp, ptr, nsize)` and `lj_alloc_free(msp, ptr)`.
//! User space finds them in the library's code (they have no symbols) and
//! probes them by address: the entries here record the call like
//! malloc's, and the shared return program (`alloc_exit`) records the
//! block, so Lua memory lands in the same tables, paired by address.
//!
//! Frames. Input: `LUA_PROCS` (tgid -> the process's `global_State`s, the
//! interpreter's code range and the field offsets, set by
//! `tracer/src/runtime/lua/`). Output: up to `MAX_INTERP_FRAMES`
//! `(GCproto, bytecode position)` pairs, innermost first (a C function's
//! frame records its `GCfunc` instead, see `lua_pos`), the frames entered
//! from C marked, and why the walk ended. A VM runs on this thread when
//! its current `lua_State`'s C frame (`L->cframe`) is on this thread's
//! stack above the allocation and either the native walk passed through
//! the interpreter (`lj_vm`) or the VM is in a trace (`vmstate >= 0`) and
//! one of the native frames is in that trace's machine code. In
//! a trace the frames start at `jit_base`, and the native walk, which
//! cannot unwind a trace's machine code, is cut there and resumed from
//! the VM's C frame; the trace's frame is recorded as an `lj_vm` frame,
//! so user space splices the Lua frames in the same place either way.
//!
//! The walk follows LuaJIT's own (`lj_debug_frame`): a Lua frame's link
//! is the return PC into its caller, whose frame lies `2 + A` slots below
//! (A of the `CALL` before that PC); other links carry a byte delta and a
//! type (C, continuation, vararg, pcall). A frame entered from C
//! (`lua_call`/`lua_pcall`) continues in the previous C frame, whose
//! saved PC is its caller's position.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, raw_tracepoint, uprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RawTracePointContext},
    EbpfContext,
};
use tracer_common::{
    chain, gen_tag, lua_pos, lua_stop, runtime, AllocKind, Counter, LuaGc, LuaProc, LUA_MAX_VMS,
    MAX_FRAMES, MAX_INTERP_FRAMES,
};

use crate::{
    chain::{self as stages, slot, Job},
    counters::count,
    probes::{enter, release},
};

#[map]
pub static LUA_PROCS: HashMap<u32, LuaProc> = HashMap::with_max_entries(1 << 11, 0);

/// Per process: the garbage collector's cycles seen (see `LuaGc`).
#[map]
static LUA_GC: HashMap<u32, LuaGc> = HashMap::with_max_entries(1 << 11, 0);

/// Per thread: the `global_State` of the last VM user space does not know
/// that allocated on it (made after attach: an nginx reload makes one in
/// the master, `lua_code_cache off` one per request), found from the
/// allocation's `msp`; a change is counted (`LuaVmsAfterAttach`), for the
/// report to say that such memory has native stacks only. (Walking such
/// a VM's frames was tried: the master's reload then recorded thousands
/// of new Lua stacks, whose reading held up attaching the new workers,
/// and a per-request VM is gone before its prototypes can be read.)
#[map]
static LUA_LAST: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1 << 12, 0);

// ---- allocator -----------------------------------------------------------

/// Look at the collector of the VM whose allocator state is `msp`: a
/// `currentwhite` changed since the last look means an atomic phase ran
/// (one per cycle), and the process's generation moves on. Returns the
/// generation tag of a block allocated now (0: not a known VM's).
///
/// Every cycle allocates (steps run on allocation debt) and its sweep
/// frees through `lj_alloc_free`, so no flip goes unseen; a full
/// collection (`collectgarbage()`) flips once.
#[inline(always)]
fn gc_look(msp: u64) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: read-only lookup; the value is valid during the program.
    let Some(p) = (unsafe { LUA_PROCS.get(&tgid) }) else {
        return 0;
    };
    let Some(gc) = LUA_GC.get_ptr_mut(&tgid) else {
        let fresh = LuaGc::default();
        let _ = LUA_GC.insert(&tgid, &fresh, 1);
        return 0;
    };
    // SAFETY: a map value of this process; one VM runs on one thread.
    let gc = unsafe { &mut *gc };
    // Constant slots: with a variable index LLVM addresses the aligned
    // value with `or`, which the verifier refuses on a pointer.
    if p.allocd[0] == msp {
        return look_vm::<0>(p, gc);
    }
    if p.allocd[1] == msp {
        return look_vm::<1>(p, gc);
    }
    if p.allocd[2] == msp {
        return look_vm::<2>(p, gc);
    }
    if p.allocd[3] == msp {
        return look_vm::<3>(p, gc);
    }
    remember_vm(p, msp);
    0
}

/// An allocation by a VM user space does not know: its `global_State` is
/// at a fixed distance from the allocator state (`GG_State` is the state's
/// first block), confirmed by `g->allocd` pointing back, and counted once
/// per thread and VM.
#[inline(always)]
fn remember_vm(p: &LuaProc, msp: u64) {
    if p.msp_to_g == 0 || msp == 0 {
        return;
    }
    let g = msp.wrapping_add(u64::from(p.msp_to_g));
    if read_u64(g + G_ALLOCD) != Some(msp) {
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: read-only lookup, copied out.
    if unsafe { LUA_LAST.get(&tid) }.copied() != Some(g) {
        count(Counter::LuaVmsAfterAttach);
        let _ = LUA_LAST.insert(&tid, &g, 0);
    }
}

const _: () = assert!(LUA_MAX_VMS == 4, "gc_look names each VM slot");

/// [`gc_look`] for VM slot `I`.
#[inline(always)]
fn look_vm<const I: usize>(p: &LuaProc, gc: &mut LuaGc) -> u32 {
    if p.g[I] == 0 {
        return 0;
    }
    let at = p.g[I].wrapping_add(u64::from(p.g_gc_white));
    // SAFETY: bpf_probe_read_user checks the user address. `state`
    // follows `currentwhite` (user space sets both offsets so).
    let Ok(pair) = (unsafe { bpf_probe_read_user(at as *const u16) }) else {
        return 0;
    };
    let white = u32::from(pair & 0xff) + 1;
    if gc.white[I] != 0 && gc.white[I] != white {
        gc.gen = gc.gen.wrapping_add(1);
    }
    gc.white[I] = white;
    gc.state[I] = u32::from(pair >> 8);
    gen_tag::of_gen(gc.gen)
}

/// `lj_alloc_malloc(msp, nsize)`.
#[uprobe]
pub fn lua_malloc_enter(ctx: ProbeContext) -> u32 {
    let msp: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let tag = gc_look(msp);
    enter(
        &ctx,
        AllocKind::Malloc as u32 | tag << gen_tag::SHIFT,
        size,
        0,
    )
}

/// `lj_alloc_realloc(msp, ptr, nsize)`.
#[uprobe]
pub fn lua_realloc_enter(ctx: ProbeContext) -> u32 {
    let msp: u64 = ctx.arg(0).unwrap_or(0);
    let old: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    let tag = gc_look(msp);
    enter(
        &ctx,
        AllocKind::Realloc as u32 | tag << gen_tag::SHIFT,
        size,
        old,
    )
}

/// `lj_alloc_free(msp, ptr)`: the sweep's frees keep the collector's
/// state fresh.
#[uprobe]
pub fn lua_free_enter(ctx: ProbeContext) -> u32 {
    let msp: u64 = ctx.arg(0).unwrap_or(0);
    let addr: u64 = ctx.arg(1).unwrap_or(0);
    gc_look(msp);
    if addr != 0 {
        release((bpf_get_current_pid_tgid() >> 32) as u32, addr, true);
    }
    0
}

// ---- frames --------------------------------------------------------------

/// Frames walked per run of the stage.
const STEPS_PER_RUN: u32 = 8;
/// Steps in all: a vararg frame's pseudo-frame takes a step, no slot.
const LUA_WALK_STEPS: u32 = 2 * MAX_INTERP_FRAMES as u32 + 2;
/// GC64: object references are 47-bit addresses.
const GC64_MASK: u64 = (1 << 47) - 1;
/// How far above the allocation the VM's C frame may be: the thread's
/// stack.
const STACK_SPAN: u64 = 8 << 20;
/// `lua_State.cframe`'s flag bits.
const CFRAME_FLAGS: u64 = 3;
/// Frame link types (`ftsz & 7`).
const FRAME_C: u64 = 1;
const FRAME_CONT: u64 = 2;
const FRAME_VARG: u64 = 3;
const FRAME_CP: u64 = 5;
/// `Job::lua_pc` of a trace's first frame (no PC is kept in a trace).
const PC_TRACE: u64 = 1;
/// `global_State.allocd` (the same in every build read).
const G_ALLOCD: u64 = 8;

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_u8(addr: u64) -> u8 {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u8) }.unwrap_or(0)
}

/// Whether a native frame of the walk is in the interpreter.
#[inline(always)]
fn through_vm(job: &Job) -> bool {
    let (start, end) = (job.lua.vm_start, job.lua.vm_end);
    for i in 0..MAX_FRAMES {
        if i as u32 >= job.buf.len {
            break;
        }
        // A return address: the call is just before it.
        let pc = job.buf.ips[i].wrapping_sub(1);
        if pc >= start && pc < end {
            return true;
        }
    }
    false
}

/// 1 + the index of the first native frame in trace `traceno`'s machine
/// code, 0 for none. (The native walk cannot unwind a trace; it went on
/// by the frame-pointer rule, so what follows that frame is not a stack.)
#[inline(always)]
fn trace_frame(job: &Job, p: &LuaProc, g: u64, traceno: u64) -> u32 {
    let Some(traces) = read_u64(g + p.g_traces as u64) else {
        return 0;
    };
    let Some(t) = read_u64(traces + 8 * (traceno & 0xffff)) else {
        return 0;
    };
    let t = t & GC64_MASK;
    let (Some(mcode), Some(size)) = (
        read_u64(t + p.trace_mcode as u64),
        // SAFETY: bpf_probe_read_user checks the user address.
        unsafe { bpf_probe_read_user((t + p.trace_szmcode as u64) as *const u32) }.ok(),
    ) else {
        return 0;
    };
    let end = mcode + size as u64;
    for i in 0..MAX_FRAMES {
        if i as u32 >= job.buf.len {
            break;
        }
        let pc = job.buf.ips[i].wrapping_sub(1);
        if pc >= mcode && pc < end {
            return i as u32 + 1;
        }
    }
    0
}

/// Find the VM running on this thread and set the walk up; `Err` is the
/// `lua_stop` reason to record instead.
#[inline(always)]
fn start(job: &mut Job) -> Result<(), u32> {
    // SAFETY: read-only lookup, copied out.
    let Some(p) = (unsafe { LUA_PROCS.get(&job.tgid) }).copied() else {
        return Err(lua_stop::NONE);
    };
    job.lua = p;
    let vm = through_vm(job);
    for k in 0..LUA_MAX_VMS {
        let g = p.g[k];
        if g == 0 {
            continue;
        }
        let Some(l) = read_u64(g + p.g_cur_l as u64) else {
            continue;
        };
        let Some(cf) = read_u64((l & GC64_MASK) + p.l_cframe as u64) else {
            continue;
        };
        let l = l & GC64_MASK;
        let cf = cf & !CFRAME_FLAGS;
        if cf < job.start_sp || cf >= job.start_sp + STACK_SPAN {
            continue;
        }
        // SAFETY: bpf_probe_read_user checks the user address.
        let vmstate: i32 =
            unsafe { bpf_probe_read_user((g + p.g_vmstate as u64) as *const i32) }.unwrap_or(-1);
        job.unmapped_at = if vmstate >= 0 {
            trace_frame(job, &p, g, vmstate as u64)
        } else {
            0
        };
        let trace = job.unmapped_at > 0;
        if !trace && !vm {
            continue;
        }
        let stack = read_u64(l + p.l_stack as u64).ok_or(lua_stop::UNREADABLE)?;
        job.lua_bottom = stack + 8;
        job.lua_cframe = cf;
        let base = if trace {
            job.lua_pc = PC_TRACE;
            match read_u64(g + p.g_jit_base as u64) {
                Some(b) if b != 0 => b,
                _ => read_u64(l + p.l_base as u64).ok_or(lua_stop::UNREADABLE)?,
            }
        } else {
            job.lua_pc = read_u64(cf + p.cframe_pc as u64).unwrap_or(0);
            read_u64(l + p.l_base as u64).ok_or(lua_stop::UNREADABLE)?
        };
        job.interp_frame = base.wrapping_sub(8);
        if trace {
            // Keep the native frames up to the trace's, shown as the
            // VM's (the return address of `vm_start` symbolizes in
            // `lj_vm`), and go on from the VM's C frame afterwards.
            let at = job.unmapped_at;
            job.buf.len = at;
            let i = slot(&job.buf.len, MAX_FRAMES).wrapping_sub(1) & (MAX_FRAMES - 1);
            // Where in the trace: for user space to find the bytecode
            // through the trace's snapshots.
            job.buf.interp.code[0] = job.buf.ips[i];
            job.buf.interp.pos[0] = (lua_pos::TRACE_AT - (vmstate & 0xffff)) as u32;
            job.buf.interp.len = 1;
            job.buf.ips[i] = p.vm_start + 1;
            let ret = cf + p.cframe_ret as u64;
            let (Some(ra), Some(bp)) = (read_u64(ret), read_u64(ret - 8)) else {
                return Err(lua_stop::UNREADABLE);
            };
            job.pc = ra;
            job.sp = ret + 8;
            job.bp = bp;
            job.lua_resume = 1;
        }
        return Ok(());
    }
    Err(lua_stop::NOT_RUNNING)
}

/// One frame: record it (unless it is a vararg pseudo-frame), then step
/// to its caller. Returns `Some(why)` when the walk is over.
#[inline(always)]
fn walk_one(job: &mut Job) -> Option<u32> {
    let f = job.interp_frame;
    if f <= job.lua_bottom {
        return Some(lua_stop::COMPLETE);
    }
    let i = job.buf.interp.len as usize;
    if i >= MAX_INTERP_FRAMES {
        return Some(lua_stop::DEPTH);
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok([func, ftsz]) = (unsafe { bpf_probe_read_user((f - 8) as *const [u64; 2]) }) else {
        return Some(lua_stop::UNREADABLE);
    };
    let func = func & GC64_MASK;
    let p = &job.lua;
    let (next, next_pc, from_c, varg) = if ftsz & 3 == 0 {
        // Called from Lua: `ftsz` is the return PC, after the CALL whose
        // A operand (byte 1) is the callee's slot in the caller's frame.
        let a = read_u8(ftsz.wrapping_sub(3)) as u64;
        (f.wrapping_sub(8 * (2 + a)), ftsz, false, false)
    } else {
        let delta = ftsz & !7;
        let next = f.wrapping_sub(delta);
        match ftsz & 7 {
            FRAME_C | FRAME_CP => {
                // Entered from C: the caller's position is the PC saved
                // in the previous C frame of the VM.
                let cf =
                    read_u64(job.lua_cframe + p.cframe_prev as u64).unwrap_or(0) & !CFRAME_FLAGS;
                job.lua_cframe = cf;
                let pc = if cf == 0 {
                    0
                } else {
                    read_u64(cf + p.cframe_pc as u64).unwrap_or(0)
                };
                (next, pc, true, false)
            }
            FRAME_CONT => (next, read_u64(f - 16).unwrap_or(0), false, false),
            FRAME_VARG => (next, job.lua_pc, false, true),
            _ => (next, 0, false, false),
        }
    };
    if next >= f {
        return Some(lua_stop::UNREADABLE);
    }
    if job.lua_skip != 0 {
        // A vararg function's original frame, below its varargs: its link
        // is the function's; the frame was recorded above.
        if from_c && i > 0 {
            job.buf.interp.entry_mask |= 1 << ((i as u32 - 1) & 31);
        }
    } else {
        let ffid = read_u8(func + p.func_ffid as u64);
        let (code, pos) = if ffid == 0 {
            let bc = read_u64(func + p.func_pc as u64).unwrap_or(0);
            let pos = match job.lua_pc {
                0 => lua_pos::UNKNOWN,
                PC_TRACE => lua_pos::TRACE,
                pc => {
                    let d = pc.wrapping_sub(bc) / 4;
                    if d < 1 << 24 {
                        d as i32
                    } else {
                        lua_pos::UNKNOWN
                    }
                }
            };
            (bc.wrapping_sub(p.proto_size as u64), pos)
        } else {
            (func, lua_pos::CFUNC - ffid as i32)
        };
        let i = slot(&job.buf.interp.len, MAX_INTERP_FRAMES);
        job.buf.interp.code[i] = code;
        job.buf.interp.pos[i] = pos as u32;
        if from_c {
            job.buf.interp.entry_mask |= 1 << (i as u32 & 31);
        }
        job.buf.interp.len = i as u32 + 1;
    }
    job.lua_skip = varg as u32;
    if !varg {
        job.lua_pc = next_pc;
    }
    job.interp_frame = next;
    None
}

/// The walk is over: finish, or first go on with the native walk from
/// the VM's C frame (a trace).
#[inline(always)]
fn done<C: EbpfContext>(ctx: &C, slot: u32, job: &mut Job, why: u32) {
    job.buf.interp.stop = why;
    if job.lua_resume == 1 {
        job.lua_resume = 2;
        return stages::next(ctx, slot, chain::NATIVE);
    }
    stages::next(ctx, slot, chain::FINISH)
}

/// Stage `LUA`: fill the Lua part of the stack, a few frames per run.
#[inline(always)]
fn lua_step<C: EbpfContext>(ctx: &C, slot: u32) {
    let Some(job) = stages::job(ctx, slot) else {
        return;
    };
    if job.interp_started == 0 {
        job.interp_started = 1;
        job.lua_skip = 0;
        job.buf.interp.runtime = runtime::LUA;
        if let Err(why) = start(job) {
            job.buf.interp.stop = why;
            return stages::next(ctx, slot, chain::FINISH);
        }
    } else if job.lua_resume == 2 {
        // Back from the native walk resumed after a trace.
        return stages::next(ctx, slot, chain::FINISH);
    }
    for _ in 0..STEPS_PER_RUN {
        if let Some(why) = walk_one(job) {
            return done(ctx, slot, job, why);
        }
    }
    job.interp_steps += STEPS_PER_RUN;
    if job.interp_steps >= LUA_WALK_STEPS {
        let why = if job.interp_frame <= job.lua_bottom {
            lua_stop::COMPLETE
        } else {
            lua_stop::DEPTH
        };
        return done(ctx, slot, job, why);
    }
    stages::next(ctx, slot, chain::runtime_stage(runtime::LUA))
}

#[uprobe]
pub fn lua_alloc(ctx: ProbeContext) -> u32 {
    lua_step(&ctx, stages::ALLOC);
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn lua_syscall(ctx: RawTracePointContext) -> u32 {
    lua_step(&ctx, stages::SYSCALL);
    0
}
