//! leaktrace's kernel side: allocator uprobes that keep a live-allocation
//! table and a per-stack ledger.
//!
//! Inputs: uprobes at allocator entry (size, old block), uretprobes at
//! return (the block's address, and the user stack, which at return names
//! the immediate caller), uprobes on `free`-like functions.
//! Outputs: `ALLOCS` (`(tgid, addr)` -> size, stack, time), `STACK_TOTALS`
//! (`(tgid, stack)` -> outstanding bytes and count), `STACK_TRACES`, and a
//! counter for every event that could not be recorded.
//! Invariant: `STACK_TOTALS` equals the sum of `ALLOCS` per stack, except
//! for rows whose insertion failed, which are counted.
//! Policy (what to report, when a stack grows) is user space's.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod chain;
#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod go;
#[cfg(target_arch = "bpf")]
mod lua;
#[cfg(target_arch = "bpf")]
mod probes;
#[cfg(target_arch = "bpf")]
mod python;
#[cfg(target_arch = "bpf")]
mod syscalls;
#[cfg(target_arch = "bpf")]
mod unwind;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
