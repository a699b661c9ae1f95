//! Memory syscalls of traced processes and the OOM killer's choice, for
//! user space's region tracker and OOM black box.
//!
//! `sys_exit` keeps successful anonymous `mmap`, `munmap`, `mremap` and
//! `brk` calls made outside a probed allocator call; the stack is recorded
//! by the syscall chain (`chain.rs`), which ends in `finish_syscall`, where
//! the event is sent.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use tracer_common::{sys, Counter, SyscallEvent, STACK_LOST, SYSCALL_IN_ALLOCATOR};

use crate::{
    chain as stages,
    counters::count,
    probes::pending_slot,
    unwind::{begin, store_stack, Regs},
};

#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(1 << 14, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Offsets in x86-64 `struct pt_regs`.
const PT_REGS_DI: usize = 112;
const PT_REGS_SI: usize = 104;
const PT_REGS_DX: usize = 96;
const PT_REGS_R10: usize = 56;
const PT_REGS_BP: usize = 32;
const PT_REGS_ORIG_AX: usize = 120;
const PT_REGS_IP: usize = 128;
const PT_REGS_SP: usize = 152;

#[inline(always)]
fn reg(regs: *const u8, off: usize) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: bpf_probe_read_kernel checks the kernel address and zeroes
    // the destination on failure. The result is ignored on purpose: a
    // branch per register made two verifier states (0 and unknown) of
    // every register reaching the unwinder, which then was verified twice.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            (&raw mut v).cast(),
            8,
            regs.add(off).cast(),
        )
    };
    v
}

/// `sys_exit(struct pt_regs *regs, long ret)`, every syscall of every task:
/// keep successful memory syscalls of traced processes made outside the
/// allocator (brk inside it too, so the break's position is known).
///
/// Everything is read at the exit: the syscall number (`orig_ax`) and the
/// arguments are still in the saved user registers. One program instead of
/// an entry and an exit program matters because every uretprobe return is
/// a syscall (`uretprobe`, Linux 6.11+) that would run both.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> u32 {
    let regs: u64 = ctx.arg(0);
    let regs = regs as *const u8;
    let nr = reg(regs, PT_REGS_ORIG_AX) as u32;
    if nr != sys::MMAP && nr != sys::MUNMAP && nr != sys::MREMAP && nr != sys::BRK {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // SAFETY: read-only lookup.
    if unsafe { TARGETS.get(&tgid) }.is_none() {
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    if ret < 0 && ret > -4096 {
        return 0;
    }
    // Inside malloc & co: the block is counted by the allocator probes.
    // Only the break's new position is still wanted.
    let in_allocator = pending_slot(tid).is_some_and(|p| p.tid == tid);
    if in_allocator && nr != sys::BRK {
        return 0;
    }
    // A file mapping is not an allocation: only anonymous mmaps count. An
    // executable one is new code (dlopen): user space registers it with
    // the unwinder (and probes its allocator) at once, not at its next
    // look, so the stacks of its first calls are whole.
    if nr == sys::MMAP && reg(regs, PT_REGS_R10) & sys::MAP_ANONYMOUS == 0 {
        if reg(regs, PT_REGS_DX) & sys::PROT_EXEC != 0 {
            send(&SyscallEvent {
                ts_ns: unsafe { bpf_ktime_get_ns() },
                tgid,
                nr: sys::MMAP_EXEC,
                ret: ret as u64,
                args: [reg(regs, PT_REGS_SI), 0, 0],
                stack_id: STACK_LOST,
                flags: 0,
                _pad: 0,
            });
        }
        return 0;
    }
    let args = match nr {
        sys::MMAP => [reg(regs, PT_REGS_SI), reg(regs, PT_REGS_R10), 0],
        sys::MUNMAP => [reg(regs, PT_REGS_DI), reg(regs, PT_REGS_SI), 0],
        sys::MREMAP => [
            reg(regs, PT_REGS_DI),
            reg(regs, PT_REGS_SI),
            reg(regs, PT_REGS_DX),
        ],
        _ => [reg(regs, PT_REGS_DI), 0, 0],
    };
    let event = SyscallEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        nr,
        ret: ret as u64,
        args,
        stack_id: STACK_LOST,
        flags: if in_allocator {
            SYSCALL_IN_ALLOCATOR
        } else {
            0
        },
        _pad: 0,
    };
    if !in_allocator {
        if let Some(job) = stages::claim(stages::SYSCALL) {
            // The syscall's pt_regs are the user registers at the `syscall`.
            let regs = Regs {
                ip: reg(regs, PT_REGS_IP),
                sp: reg(regs, PT_REGS_SP),
                bp: reg(regs, PT_REGS_BP),
            };
            begin(job, pid_tgid, regs);
            job.event = event;
            stages::start(&ctx, stages::SYSCALL);
        }
    }
    // Inside the allocator, or the chain could not run: no stack.
    send(&event);
    0
}

/// Stage `FINISH` of the syscall chain: store the stack, send the event.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn finish_syscall(ctx: RawTracePointContext) -> u32 {
    let Some(job) = stages::job(&ctx, stages::SYSCALL) else {
        return 0;
    };
    let stack_id = store_stack(job);
    let mut event = job.event;
    event.stack_id = stack_id;
    send(&event);
    0
}

#[inline(always)]
fn send(event: &SyscallEvent) {
    if EVENTS.output::<SyscallEvent>(event, 0).is_err() {
        count(Counter::EventsLost);
    }
}

// ---- Page faults (node mode) ---------------------------------------------

/// Mean sampled faults between two recorded ones (0: off); set at load.
#[unsafe(no_mangle)]
static FAULT_PERIOD: u32 = 0;

/// Per CPU: faults left to skip before the next recorded one.
#[map]
static FAULT_COUNTDOWN: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// `page_fault_user(unsigned long address, struct pt_regs *regs,
/// unsigned long error_code)`: a traced process wrote to a page that was
/// not there. For anonymous memory that is the moment the page joins the
/// process's RSS, whatever allocator handed the address out (glibc,
/// jemalloc, lj_alloc, pymalloc arenas, the Go heap), so the stack here
/// says who made memory grow. One in about `FAULT_PERIOD` such faults per
/// CPU gets a stack (a random countdown, so a periodic access pattern
/// cannot alias with the period); user space weighs each by the period.
/// Read faults are left out (an untouched anonymous page reads as the
/// shared zero page) and so are protection faults (copy-on-write after
/// fork, NUMA hinting): neither adds a new page of the process's own.
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault(ctx: RawTracePointContext) -> u32 {
    // SAFETY: a plain read of a constant patched at load.
    let period = unsafe { core::ptr::read_volatile(&raw const FAULT_PERIOD) };
    if period == 0 {
        return 0;
    }
    let error_code: u64 = ctx.arg(2);
    if error_code & (sys::PF_PROT | sys::PF_WRITE | sys::PF_INSTR) != sys::PF_WRITE {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: read-only lookup.
    if unsafe { TARGETS.get(&tgid) }.is_none() {
        return 0;
    }
    let Some(left) = FAULT_COUNTDOWN.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot; tracepoint programs do not nest on a CPU.
    unsafe {
        if *left > 1 {
            *left -= 1;
            return 0;
        }
        // Uniform on 1..=2*period-1: mean `period`.
        let span = period.saturating_mul(2).saturating_sub(1).max(1);
        *left = bpf_get_prandom_u32() % span + 1;
    }
    let address: u64 = ctx.arg(0);
    let regs: u64 = ctx.arg(1);
    let regs = regs as *const u8;
    let event = SyscallEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        nr: sys::PAGE_FAULT,
        ret: address,
        args: [error_code, u64::from(period), 0],
        stack_id: STACK_LOST,
        flags: 0,
        _pad: 0,
    };
    if let Some(job) = stages::claim(stages::SYSCALL) {
        // The fault's pt_regs are the user registers at the faulting
        // instruction. The walk treats every pc as a return address (it
        // looks up pc - 1, and so does the symbolizer): one past the
        // faulting instruction's first byte names that instruction.
        let regs = Regs {
            ip: reg(regs, PT_REGS_IP).wrapping_add(1),
            sp: reg(regs, PT_REGS_SP),
            bp: reg(regs, PT_REGS_BP),
        };
        begin(job, pid_tgid, regs);
        job.event = event;
        stages::start(&ctx, stages::SYSCALL);
    }
    send(&event);
    0
}

// ---- OOM black box -------------------------------------------------------

/// Byte offset of `tgid` in `struct task_struct`, set from kernel BTF.
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u32 = 0;

/// 1: report every OOM victim, not only traced processes.
#[unsafe(no_mangle)]
static OOM_ANY: u32 = 0;

/// `mark_victim(struct task_struct *task, uid_t uid)`: the OOM killer chose
/// `task`. Tell user space at once so it can freeze the victim's view
/// before the process is gone.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn oom_mark_victim(ctx: RawTracePointContext) -> u32 {
    // SAFETY: globals are plain reads of constants patched at load.
    let off = unsafe { core::ptr::read_volatile(&raw const TASK_TGID_OFFSET) };
    let any = unsafe { core::ptr::read_volatile(&raw const OOM_ANY) };
    if off == 0 {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    // SAFETY: bpf_probe_read_kernel checks the kernel address.
    let Ok(tgid) =
        (unsafe { bpf_probe_read_kernel((task as *const u8).add(off as usize).cast::<u32>()) })
    else {
        return 0;
    };
    // SAFETY: read-only lookup.
    if any == 0 && unsafe { TARGETS.get(&tgid) }.is_none() {
        return 0;
    }
    let event = SyscallEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        nr: sys::OOM_VICTIM,
        ret: 0,
        args: [0; 3],
        stack_id: STACK_LOST,
        flags: 0,
        _pad: 0,
    };
    send(&event);
    0
}
