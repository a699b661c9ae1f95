//! CPython frames for the stack being recorded.
//!
//! Input: `PY_PROCS` (tgid -> where `_PyRuntime` is and the field offsets
//! of the interpreter's version, set by `tracer/src/python.rs`) and the
//! current task's fsbase. Output: up to `MAX_PY_FRAMES` `(code object,
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
//! pushes (3.12+, skipped). The loop is a `bpf_loop` of at most
//! `2 * MAX_PY_FRAMES + 1` steps, a few user reads each.
//!
//! The thread state is the allocating thread's own or none: the GIL
//! holder (`gilstate.tstate_current`, up to 3.11) when it is this thread, else the
//! one glibc keeps under the interpreter's pthread key. Either must name
//! this thread (`thread_id == fsbase`), so another thread's stack is never
//! recorded; a mismatch records no Python frames.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap},
};
use tracer_common::{py_flags, py_stop, PyProc, MAX_PY_FRAMES};

#[map]
pub static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(1 << 11, 0);

/// Slot 0 is set to 1 by user space once any process is in `PY_PROCS`, so
/// native-only tracing skips the lookup on every allocation.
#[map]
pub static PY_ANY: Array<u32> = Array::with_max_entries(1, 0);

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

/// State of a Python walk, shared with the per-frame callback.
#[repr(C)]
struct PyWalk {
    frame: u64,
    len: u32,
    why: u32,
    entry_mask: u32,
    flags: u32,
    code: u32,
    previous: u32,
    prev_instr: u32,
    is_entry: u32,
    bytecode: u32,
}

/// Iterations of the frame loop: every recorded frame can be preceded by a
/// C-stack shim (3.12+), which takes an iteration but no slot.
const PY_WALK_STEPS: u32 = 2 * MAX_PY_FRAMES as u32 + 1;

#[inline(always)]
fn read_u8(addr: u64) -> u8 {
    // SAFETY: bpf_probe_read_user checks the user address.
    unsafe { bpf_probe_read_user(addr as *const u8) }.unwrap_or(0)
}

/// One Python frame: record it (or skip a C-stack shim), then follow
/// `previous`. Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_py_frame(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `PyWalk` on record_python's stack.
    let w = unsafe { &mut *(ctx as *mut PyWalk) };
    let frame = w.frame;
    if frame == 0 {
        w.why = py_stop::COMPLETE;
        return 1;
    }
    let i = w.len as usize;
    if i >= MAX_PY_FRAMES {
        w.why = py_stop::DEPTH;
        return 1;
    }
    let (Some(code), Some(prev)) = (
        read_u64(frame + w.code as u64),
        read_u64(frame + w.previous as u64),
    ) else {
        w.why = py_stop::UNREADABLE;
        return 1;
    };
    let entry = if w.flags & py_flags::ENTRY_EVERY_FRAME != 0 {
        true
    } else if w.flags & py_flags::ENTRY_OWNER_SHIM != 0 {
        if read_u8(frame + w.is_entry as u64) == py_flags::FRAME_OWNED_BY_CSTACK {
            // The eval loop was entered from C here: the frame recorded
            // last ran first in that call.
            if i > 0 {
                w.entry_mask |= 1 << ((i as u32 - 1) & 31);
            }
            w.frame = prev;
            return 0;
        }
        false
    } else {
        read_u8(frame + w.is_entry as u64) != 0
    };
    let instr = if w.flags & py_flags::INSTR_LASTI != 0 {
        // SAFETY: bpf_probe_read_user checks the user address.
        match unsafe { bpf_probe_read_user((frame + w.prev_instr as u64) as *const u32) } {
            Ok(lasti) => lasti,
            Err(_) => {
                w.why = py_stop::UNREADABLE;
                return 1;
            }
        }
    } else {
        let Some(p) = read_u64(frame + w.prev_instr as u64) else {
            w.why = py_stop::UNREADABLE;
            return 1;
        };
        p.wrapping_sub(code.wrapping_add(w.bytecode as u64)) as u32
    };
    let Some(buf) = crate::unwind::scratch() else {
        return 1;
    };
    buf.py_code[i] = code;
    buf.py_instr[i] = instr;
    if entry {
        w.entry_mask |= 1 << (i as u32 & 31);
    }
    w.len = i as u32 + 1;
    w.frame = prev;
    0
}

/// Set the Python part of the scratch stack.
#[inline(always)]
fn finish(len: u32, why: u32, entry_mask: u32) {
    if let Some(buf) = crate::unwind::scratch() {
        buf.py_len = len;
        buf.py_stop = why;
        buf.py_entry_mask = entry_mask;
    }
}

/// Fill the Python part of the scratch stack for a process in `PY_PROCS`
/// (clear it for any other).
#[inline(always)]
pub fn record_python(tgid: u32) {
    // No Python process registered yet (native tracing): no lookup.
    if PY_ANY.get(0).copied().unwrap_or(0) == 0 {
        return finish(0, py_stop::NONE, 0);
    }
    // SAFETY: read-only lookup, copied out.
    let Some(p) = (unsafe { PY_PROCS.get(&tgid) }).copied() else {
        return finish(0, py_stop::NONE, 0);
    };
    let Some(tstate) = thread_state(&p) else {
        return finish(0, py_stop::NO_THREAD, 0);
    };
    let Some(top) = read_u64(tstate + p.tstate_cframe as u64) else {
        return finish(0, py_stop::UNREADABLE, 0);
    };
    let frame = if p.flags & py_flags::FRAME_IN_TSTATE != 0 || top == 0 {
        top
    } else {
        match read_u64(top + p.cframe_current_frame as u64) {
            Some(f) => f,
            None => return finish(0, py_stop::UNREADABLE, 0),
        }
    };
    let mut w = PyWalk {
        frame,
        len: 0,
        why: py_stop::DEPTH,
        entry_mask: 0,
        flags: p.flags,
        code: p.frame_code,
        previous: p.frame_previous,
        prev_instr: p.frame_prev_instr,
        is_entry: p.frame_is_entry,
        bytecode: p.code_bytecode,
    };
    // SAFETY: the callback and its context match bpf_loop's contract.
    unsafe {
        bpf_loop(
            PY_WALK_STEPS,
            walk_py_frame as *mut c_void,
            (&raw mut w).cast(),
            0,
        )
    };
    let why = if w.frame == 0 {
        py_stop::COMPLETE
    } else {
        w.why
    };
    finish(w.len, why, w.entry_mask);
}
