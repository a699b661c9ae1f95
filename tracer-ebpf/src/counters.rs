//! Loss and activity counters, one per-CPU slot per [`Counter`]; user
//! space sums the CPUs. Every program that drops or mispairs something
//! counts it here, so the report can say what was not recorded.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use tracer_common::{Counter, COUNTER_SLOTS};

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot; a program does not migrate while running.
        unsafe { *p += 1 };
    }
}
