//! Sampled page faults (node mode): who touched new anonymous memory
//! first.
//!
//! Input: the kernel's sampled write faults on pages that were not
//! present (`sys::PAGE_FAULT` events: address, the pages a sample stands
//! for, the stack), and the munmap, mremap and brk events that give pages
//! back. Output: per `(tgid, stack)`, the estimated bytes of pages first
//! touched there and still mapped, and the bytes ever touched.
//!
//! A fault is the moment a page joins the process's resident memory,
//! whatever allocator handed the address out, so this sees glibc,
//! jemalloc, lj_alloc, pymalloc arenas and the Go heap alike. What it
//! cannot see: a block freed inside the allocator (the page stays
//! resident and counted until it is unmapped or the break moves down),
//! and pages released with `madvise` (counted until unmapped; touched
//! again, a sampled page is not counted twice, because pages are kept by
//! address).
//!
//! Invariant: `totals` equals the sum over kept pages; at most `limit`
//! pages are kept, and a sample past the limit is counted in `dropped`.

use std::collections::{BTreeMap, HashMap};

use tracer_common::StackId;

const PAGE: u64 = 4096;

/// One kept sample: the stack that first touched the page, and the pages
/// the sample stands for.
#[derive(Clone, Copy, Debug)]
struct Sample {
    stack_id: StackId,
    weight_pages: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultTotals {
    /// Estimated bytes of pages touched first from the stack and still
    /// mapped.
    pub bytes: u64,
    /// Samples behind `bytes`.
    pub samples: u64,
    /// Estimated bytes ever touched first from the stack.
    pub total_bytes: u64,
    pub total_samples: u64,
}

#[derive(Debug)]
pub struct FaultTracker {
    /// Per process: page address -> sample.
    pages: HashMap<u32, BTreeMap<u64, Sample>>,
    /// Per process: the last program break seen (brk's return value).
    brk: HashMap<u32, u64>,
    totals: HashMap<(u32, StackId), FaultTotals>,
    kept: usize,
    limit: usize,
    /// Samples not kept because `limit` pages were kept already.
    pub dropped: u64,
}

impl FaultTracker {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            pages: HashMap::new(),
            brk: HashMap::new(),
            totals: HashMap::new(),
            kept: 0,
            limit,
            dropped: 0,
        }
    }

    /// A sampled write fault at `addr` standing for `weight_pages` pages.
    pub fn fault(&mut self, tgid: u32, addr: u64, weight_pages: u64, stack_id: StackId) {
        let page = addr & !(PAGE - 1);
        let weight_pages = weight_pages.max(1);
        let pages = self.pages.entry(tgid).or_default();
        let new = Sample {
            stack_id,
            weight_pages,
        };
        match pages.get(&page).copied() {
            // The same page sampled again (released with madvise and
            // touched again): it is one page of memory, now the new
            // stack's.
            Some(old) => {
                debit(&mut self.totals, tgid, old);
                pages.insert(page, new);
            }
            None if self.kept >= self.limit => {
                self.dropped += 1;
                return;
            }
            None => {
                pages.insert(page, new);
                self.kept += 1;
            }
        }
        let t = self.totals.entry((tgid, stack_id)).or_default();
        t.bytes += weight_pages * PAGE;
        t.samples += 1;
        t.total_bytes += weight_pages * PAGE;
        t.total_samples += 1;
    }

    /// `[addr, addr + len)` is no longer mapped.
    pub fn unmap(&mut self, tgid: u32, addr: u64, len: u64) {
        let Some(pages) = self.pages.get_mut(&tgid) else {
            return;
        };
        let end = addr.saturating_add(len);
        let gone: Vec<u64> = pages.range(addr..end).map(|(p, _)| *p).collect();
        for p in gone {
            if let Some(s) = pages.remove(&p) {
                debit(&mut self.totals, tgid, s);
                self.kept -= 1;
            }
        }
    }

    /// mremap: pages of `[old, old + old_len)` move to `new`; past
    /// `new_len` they are gone.
    pub fn remap(&mut self, tgid: u32, old: u64, old_len: u64, new: u64, new_len: u64) {
        if old == new {
            if new_len < old_len {
                self.unmap(tgid, old + new_len, old_len - new_len);
            }
            return;
        }
        let Some(pages) = self.pages.get_mut(&tgid) else {
            return;
        };
        let moved: Vec<(u64, Sample)> = pages
            .range(old..old.saturating_add(old_len))
            .map(|(p, s)| (*p, *s))
            .collect();
        for (p, s) in moved {
            pages.remove(&p);
            let at = p - old;
            if at < new_len {
                pages.insert(new + at, s);
            } else {
                debit(&mut self.totals, tgid, s);
                self.kept -= 1;
            }
        }
    }

    /// The break moved to `new_brk`: a lower break gives back the pages
    /// above it.
    pub fn brk(&mut self, tgid: u32, new_brk: u64) {
        if let Some(old) = self.brk.insert(tgid, new_brk) {
            if new_brk < old {
                self.unmap(tgid, new_brk, old - new_brk);
            }
        }
    }

    /// Keep only the pages of `tgid` inside `mapped` (`[start, end)`
    /// ranges, sorted): without the syscall programs (node mode), the
    /// process's memory map says which pages munmap, mremap or a lower
    /// break gave back.
    pub fn retain_mapped(&mut self, tgid: u32, mapped: &[(u64, u64)]) {
        let Some(pages) = self.pages.get_mut(&tgid) else {
            return;
        };
        let gone: Vec<u64> = pages
            .keys()
            .copied()
            .filter(|p| {
                let i = mapped.partition_point(|&(start, _)| start <= *p);
                i == 0 || mapped[i - 1].1 <= *p
            })
            .collect();
        for p in gone {
            if let Some(s) = pages.remove(&p) {
                debit(&mut self.totals, tgid, s);
                self.kept -= 1;
            }
        }
    }

    /// Processes with pages kept.
    pub fn pids(&self) -> Vec<u32> {
        self.pages
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(t, _)| *t)
            .collect()
    }

    /// The process is gone (or exec'd): its pages with it.
    pub fn forget(&mut self, tgid: u32) {
        if let Some(pages) = self.pages.remove(&tgid) {
            self.kept -= pages.len();
        }
        self.brk.remove(&tgid);
        self.totals.retain(|(t, _), _| *t != tgid);
    }

    /// Per `(tgid, stack)`, what is outstanding and what was ever touched;
    /// stacks whose pages are all gone stay while they have a history.
    pub fn totals(&self) -> impl Iterator<Item = ((u32, StackId), FaultTotals)> + '_ {
        self.totals.iter().map(|(k, v)| (*k, *v))
    }

    /// Pages kept now.
    pub fn kept(&self) -> usize {
        self.kept
    }
}

fn debit(totals: &mut HashMap<(u32, StackId), FaultTotals>, tgid: u32, s: Sample) {
    if let Some(t) = totals.get_mut(&(tgid, s.stack_id)) {
        t.bytes = t.bytes.saturating_sub(s.weight_pages * PAGE);
        t.samples = t.samples.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(t: &FaultTracker, tgid: u32, stack: StackId) -> u64 {
        t.totals()
            .find(|(k, _)| *k == (tgid, stack))
            .map_or(0, |(_, v)| v.bytes)
    }

    #[test]
    fn faults_count_by_weight_and_go_with_the_mapping() {
        let mut t = FaultTracker::with_limit(100);
        t.fault(1, 0x1000_0010, 16, 7);
        t.fault(1, 0x1001_0000, 16, 7);
        t.fault(1, 0x2000_0000, 16, 9);
        assert_eq!(bytes(&t, 1, 7), 2 * 16 * 4096);
        t.unmap(1, 0x1000_0000, 0x1000);
        assert_eq!(bytes(&t, 1, 7), 16 * 4096);
        assert_eq!(t.kept(), 2);
        let total = t.totals().find(|(k, _)| *k == (1, 7)).map(|(_, v)| v);
        assert_eq!(total.map(|v| v.total_bytes), Some(2 * 16 * 4096));
    }

    #[test]
    fn a_page_touched_again_is_counted_once() {
        let mut t = FaultTracker::with_limit(100);
        t.fault(1, 0x5000, 8, 1);
        t.fault(1, 0x5008, 8, 2);
        assert_eq!(bytes(&t, 1, 1), 0);
        assert_eq!(bytes(&t, 1, 2), 8 * 4096);
        assert_eq!(t.kept(), 1);
    }

    #[test]
    fn a_lower_break_gives_pages_back_and_remap_moves_them() {
        let mut t = FaultTracker::with_limit(100);
        t.brk(1, 0x10_0000);
        t.brk(1, 0x20_0000);
        t.fault(1, 0x18_0000, 1, 3);
        t.fault(1, 0x1f_f000, 1, 3);
        t.brk(1, 0x19_0000);
        assert_eq!(bytes(&t, 1, 3), 4096);
        t.fault(1, 0x7000_0000, 1, 4);
        t.fault(1, 0x7000_2000, 1, 4);
        t.remap(1, 0x7000_0000, 0x3000, 0x8000_0000, 0x1000);
        assert_eq!(bytes(&t, 1, 4), 4096);
        t.unmap(1, 0x8000_0000, 0x1000);
        assert_eq!(bytes(&t, 1, 4), 0);
        t.forget(1);
        assert_eq!(t.kept(), 0);
    }

    #[test]
    fn pages_outside_the_memory_map_are_given_back() {
        let mut t = FaultTracker::with_limit(100);
        t.fault(1, 0x1000, 1, 1);
        t.fault(1, 0x5000, 1, 1);
        t.fault(1, 0x9000, 1, 2);
        t.retain_mapped(1, &[(0x0, 0x2000), (0x8000, 0xa000)]);
        assert_eq!(bytes(&t, 1, 1), 4096);
        assert_eq!(bytes(&t, 1, 2), 4096);
        assert_eq!(t.kept(), 2);
        assert_eq!(t.pids(), vec![1]);
    }

    #[test]
    fn past_the_limit_samples_are_dropped_and_counted() {
        let mut t = FaultTracker::with_limit(2);
        for i in 0..5u64 {
            t.fault(1, i * 4096, 1, 1);
        }
        assert_eq!(t.kept(), 2);
        assert_eq!(t.dropped, 3);
    }
}
