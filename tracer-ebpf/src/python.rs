//! CPython frames for the stack being recorded.
//!
//! Input: `PY_PROCS` (tgid -> where `_PyRuntime` is and the field offsets
//! of the interpreter's version, set by `tracer/src/python.rs`) and the
//! current task's fsbase. Output: up to `MAX_INTERP_FRAMES` `(code object,
//! instruction offset)` pairs in the per-CPU scratch stack, innermost
//! first, which frames start a C-level call of the eval loop, and why the
//! walk ended. Names and lines are user space's job (it reads the code
//! objects while the process lives).
//!
//! One walk serves 3.8-3.13; `PyProc::flags` say how the version's frames
//! are shaped: `PyFrameObject`s with `f_lasti` (3.8-3.10, each frame its
//! own eval call), `_PyInterpreterFrame`s reached through a `_PyCFrame`
//! (3.11, 3.12) or straight from the thread state (3.13), entry frames
//! marked by `is_entry` (3.11) or by the C-stack shim frames the eval loop
//! pushes (3.12+, skipped). The walk is the Python runtime stage of the
//! recording chain (`chain.rs`): `STEPS_PER_RUN` frames per program run, at
//! most `2 * MAX_INTERP_FRAMES + 1` in all, a few user reads each.
//!
//! The thread state is the allocating thread's own or none: the GIL
//! holder (`gilstate.tstate_current`, up to 3.11) when it is this thread, else the
//! one glibc keeps under the interpreter's pthread key. Either must name
//! this thread (`thread_id == fsbase`), so another thread's stack is never
//! recorded; a mismatch records no Python frames.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, raw_tracepoint, uprobe},
    maps::HashMap,
    programs::{ProbeContext, RawTracePointContext},
    EbpfContext,
};
use tracer_common::{chain, py_flags, py_stop, runtime, PyProc, MAX_INTERP_FRAMES};

use crate::chain::{self as stages, slot, Job};
const _: () = assert!(MAX_INTERP_FRAMES.is_power_of_two());

#[map]
pub static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(1 << 11, 0);

/// Byte offset of `thread.fsbase` in `struct task_struct`, from kernel BTF.
#[unsafe(no_mangle)]
static TASK_FSBASE_OFFSET: u32 = 0;

/// glibc (2.27-2.38, x86-64): `struct pthread.specific_1stblock`, 16-byte
/// `{seq, data}` slots for keys below 32. A wrong value only loses frames:
/// the thread state found must name this thread.
const PTHREAD_SPECIFIC_1STBLOCK: u64 = 0x310;

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// The current thread's `PyThreadState *`, or `None`.
#[inline(always)]
fn thread_state(p: &PyProc) -> Option<u64> {
    // SAFETY: a constant patched at load.
    let off = unsafe { core::ptr::read_volatile(&raw const TASK_FSBASE_OFFSET) };
    if off == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the kernel address.
    let task = unsafe { bpf_get_current_task() };
    let fsbase: u64 = unsafe { bpf_probe_read_kernel((task + off as u64) as *const u64) }.ok()?;
    if fsbase == 0 {
        return None;
    }
    if p.tstate_current != 0 {
        let holder = read_u64(p.runtime_addr + p.tstate_current as u64).unwrap_or(0);
        if holder != 0 && read_u64(holder + p.tstate_thread_id as u64) == Some(fsbase) {
            return Some(holder);
        }
    }
    if p.tss_key == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let key: u32 =
        unsafe { bpf_probe_read_user((p.runtime_addr + p.tss_key as u64) as *const u32) }.ok()?;
    if key >= 32 {
        return None;
    }
    let own = read_u64(fsbase + PTHREAD_SPECIFIC_1STBLOCK + 16 * key as u64 + 8)?;
    if own != 0 && read_u64(own + p.tstate_thread_id as u64) == Some(fsbase) {
        return Some(own);
    }
    None
}

/// Iterations of the frame walk: every recorded frame can be preceded by a
/// C-stack shim (3.12+), which takes an iteration but no slot.
const PY_WALK_STEPS: u32 = 2 * MAX_INTERP_FRAMES as u32 + 1;
/// Iterations per run of the Python stage.
const STEPS_PER_RUN: u32 = 8;

#[inline(always)]
fn read_u8(addr: u64) -> u8 {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u8) }.unwrap_or(0)
}

/// One Python frame: record it (or skip a C-stack shim), then follow
/// `previous`. Returns `Some(why)` when the walk is over.
#[inline(always)]
fn walk_one(job: &mut Job) -> Option<u32> {
    let frame = job.interp_frame;
    if frame == 0 {
        return Some(py_stop::COMPLETE);
    }
    let i = job.buf.interp.len as usize;
    if i >= MAX_INTERP_FRAMES {
        return Some(py_stop::DEPTH);
    }
    let p = &job.py;
    let (Some(code), Some(prev)) = (
        read_u64(frame + p.frame_code as u64),
        read_u64(frame + p.frame_previous as u64),
    ) else {
        return Some(py_stop::UNREADABLE);
    };
    let entry = if p.flags & py_flags::ENTRY_EVERY_FRAME != 0 {
        true
    } else if p.flags & py_flags::ENTRY_OWNER_SHIM != 0 {
        if read_u8(frame + p.frame_is_entry as u64) == py_flags::FRAME_OWNED_BY_CSTACK {
            // The eval loop was entered from C here: the frame recorded
            // last ran first in that call.
            if i > 0 {
                job.buf.interp.entry_mask |= 1 << ((i as u32 - 1) & 31);
            }
            job.interp_frame = prev;
            return None;
        }
        false
    } else {
        read_u8(frame + p.frame_is_entry as u64) != 0
    };
    let instr = if p.flags & py_flags::INSTR_LASTI != 0 {
        // SAFETY: bpf_probe_read_user checks the user address.
        match unsafe { bpf_probe_read_user((frame + p.frame_prev_instr as u64) as *const u32) } {
            Ok(lasti) => lasti,
            Err(_) => return Some(py_stop::UNREADABLE),
        }
    } else {
        let Some(ptr) = read_u64(frame + p.frame_prev_instr as u64) else {
            return Some(py_stop::UNREADABLE);
        };
        ptr.wrapping_sub(code.wrapping_add(p.code_bytecode as u64)) as u32
    };
    let i = slot(&job.buf.interp.len, MAX_INTERP_FRAMES);
    job.buf.interp.code[i] = code;
    job.buf.interp.pos[i] = instr;
    if entry {
        job.buf.interp.entry_mask |= 1 << (i as u32 & 31);
    }
    job.buf.interp.len = i as u32 + 1;
    job.interp_frame = prev;
    None
}

/// The frame the walk starts from, for a process in `PY_PROCS`; `Err` is
/// the `py_stop` reason to record instead (`NONE` for other processes).
#[inline(always)]
fn first_frame(job: &mut Job) -> Result<u64, u32> {
    // SAFETY: read-only lookup, copied out.
    let Some(p) = (unsafe { PY_PROCS.get(&job.tgid) }).copied() else {
        return Err(py_stop::NONE);
    };
    job.py = p;
    let tstate = thread_state(&p).ok_or(py_stop::NO_THREAD)?;
    let top = read_u64(tstate + p.tstate_cframe as u64).ok_or(py_stop::UNREADABLE)?;
    if p.flags & py_flags::FRAME_IN_TSTATE != 0 || top == 0 {
        return Ok(top);
    }
    read_u64(top + p.cframe_current_frame as u64).ok_or(py_stop::UNREADABLE)
}

/// Stage `PYTHON`: fill the Python part of the stack for a process in
/// `PY_PROCS` (leave it empty for any other), a few frames per run.
#[inline(always)]
fn python_step<C: EbpfContext>(ctx: &C, slot: u32) {
    let Some(job) = stages::job(ctx, slot) else {
        return;
    };
    if job.interp_started == 0 {
        job.interp_started = 1;
        job.buf.interp.runtime = runtime::PYTHON;
        match first_frame(job) {
            Ok(frame) => job.interp_frame = frame,
            Err(why) => {
                job.buf.interp.stop = why;
                return stages::next(ctx, slot, chain::FINISH);
            }
        }
    }
    for _ in 0..STEPS_PER_RUN {
        if let Some(why) = walk_one(job) {
            job.buf.interp.stop = why;
            return stages::next(ctx, slot, chain::FINISH);
        }
    }
    job.interp_steps += STEPS_PER_RUN;
    if job.interp_steps >= PY_WALK_STEPS {
        job.buf.interp.stop = if job.interp_frame == 0 {
            py_stop::COMPLETE
        } else {
            py_stop::DEPTH
        };
        return stages::next(ctx, slot, chain::FINISH);
    }
    stages::next(ctx, slot, chain::runtime_stage(runtime::PYTHON))
}

#[uprobe]
pub fn python_alloc(ctx: ProbeContext) -> u32 {
    python_step(&ctx, stages::ALLOC);
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn python_syscall(ctx: RawTracePointContext) -> u32 {
    python_step(&ctx, stages::SYSCALL);
    0
}
