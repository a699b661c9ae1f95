//! Anonymous memory a program maps itself (mmap, munmap, mremap) and its
//! heap growth through brk, each region attributed to the call stack that
//! created it.
//!
//! Input: successful syscall events per process (tgid), in the order the
//! process made them, each with the kernel's stack id for the syscall's
//! user stack, plus the program break known at attach
//! ([`MmapTracker::set_initial_brk`]). Output: per `(tgid, stack_id, kind)`
//! the bytes still mapped and the number of regions holding them
//! ([`MmapTracker::totals`]), and the regions not recorded because the
//! tracker was full ([`MmapTracker::dropped`]).
//!
//! Invariants:
//! - a process's regions never overlap: a new mapping replaces whatever
//!   tracked memory it covers, as `MAP_FIXED` does;
//! - regions are not merged with their neighbours, so `regions` counts the
//!   mappings made (and the pieces partial unmaps leave), not kernel VMAs;
//! - running totals always equal a sum over the regions, kept up to date on
//!   every insert and removal, so `totals()` is one pass over the non-empty
//!   `(tgid, stack, kind)` groups (never more than the regions);
//! - at most `max_regions` regions over all processes; a region that does
//!   not fit is counted in `dropped` and `dropped_bytes`, never lost
//!   silently.
//!
//! Lengths of mmap, munmap and mremap are rounded up to whole pages as the
//! kernel does; addresses are taken as given (successful calls always have
//! page-aligned ones). An address in the error range (`-4095..=-1`) is a
//! failed call and ignored. brk regions are byte-exact: `[old break, new
//! break)`. `MREMAP_DONTUNMAP` is treated as a move: the old range keeps no
//! pages, so it holds no memory until touched again.

use std::collections::{btree_map, BTreeMap, HashMap};
use tracer_common::StackId;

use serde::Serialize;

pub const PAGE_SIZE: u64 = 4096;

/// Default bound on tracked regions over all processes: four times the
/// default `vm.max_map_count`, a few tens of MiB at most.
pub const DEFAULT_MAX_REGIONS: usize = 1 << 18;

/// A process and the kernel's stack id for the syscall's user stack.
pub type StackKey = (u32, StackId);

/// How a region came to be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RegionKind {
    /// mmap, or mremap of memory that was not tracked.
    Mmap,
    /// Growth of the program break.
    Brk,
    /// An anonymous `MAP_SHARED` mapping: memory every process that maps
    /// it shares (nginx's shared zones, `lua_shared_dict`), shown apart
    /// from the process's own.
    Shared,
}

/// One tracked region `[start, end)`; the start is its key in the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub end: u64,
    pub stack_id: StackId,
    pub kind: RegionKind,
    /// When it was mapped (kernel monotonic ns, as allocation ages are):
    /// the mmap, the brk that grew it, or the mremap that placed it (a
    /// remap is a new allocation, as realloc is). Pieces left by partial
    /// unmaps keep it.
    pub ts_ns: u64,
}

/// Outstanding memory of one `(tgid, stack_id, kind)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RegionTotals {
    pub tgid: u32,
    pub stack_id: StackId,
    pub kind: RegionKind,
    pub bytes: u64,
    pub regions: u64,
}

impl RegionTotals {
    pub fn stack_key(&self) -> StackKey {
        (self.tgid, self.stack_id)
    }
}

#[derive(Debug, Default)]
struct Process {
    regions: BTreeMap<u64, Region>,
    /// Current program break, once known.
    brk: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sum {
    bytes: u64,
    regions: u64,
}

type GroupKey = (u32, StackId, RegionKind);

/// Counts kept next to the region maps. Every change to a region map goes
/// through here so the totals and the limit cannot drift from the maps.
#[derive(Debug)]
struct Books {
    totals: BTreeMap<GroupKey, Sum>,
    regions: usize,
    max_regions: usize,
    dropped: u64,
    dropped_bytes: u64,
}

impl Books {
    fn insert(&mut self, tgid: u32, map: &mut BTreeMap<u64, Region>, start: u64, region: Region) {
        debug_assert!(start < region.end, "empty region at {start:#x}");
        let bytes = region.end - start;
        if self.regions >= self.max_regions {
            self.dropped += 1;
            self.dropped_bytes += bytes;
            return;
        }
        let previous = map.insert(start, region);
        debug_assert!(previous.is_none(), "region at {start:#x} inserted twice");
        self.regions += 1;
        let sum = self
            .totals
            .entry((tgid, region.stack_id, region.kind))
            .or_default();
        sum.bytes += bytes;
        sum.regions += 1;
    }

    fn remove(&mut self, tgid: u32, map: &mut BTreeMap<u64, Region>, start: u64) -> Option<Region> {
        let region = map.remove(&start)?;
        self.regions -= 1;
        self.take(tgid, &region, region.end - start, 1);
        Some(region)
    }

    /// Moves the end of the region at `start` down to `new_end`.
    fn truncate(&mut self, tgid: u32, map: &mut BTreeMap<u64, Region>, start: u64, new_end: u64) {
        if let Some(region) = map.get_mut(&start) {
            debug_assert!(start < new_end && new_end <= region.end);
            let cut = region.end - new_end;
            region.end = new_end;
            let region = *region;
            self.take(tgid, &region, cut, 0);
        }
    }

    fn take(&mut self, tgid: u32, region: &Region, bytes: u64, regions: u64) {
        if let btree_map::Entry::Occupied(mut entry) =
            self.totals.entry((tgid, region.stack_id, region.kind))
        {
            let sum = entry.get_mut();
            sum.bytes -= bytes;
            sum.regions -= regions;
            if sum.regions == 0 {
                debug_assert_eq!(sum.bytes, 0);
                entry.remove();
            }
        }
    }
}

/// Per-process anonymous regions and program break. See the module docs.
#[derive(Debug)]
pub struct MmapTracker {
    procs: HashMap<u32, Process>,
    books: Books,
    /// Time stamp for regions created from now on ([`Self::set_now`]).
    now_ns: u64,
}

impl Default for MmapTracker {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_REGIONS)
    }
}

impl MmapTracker {
    /// A tracker that holds at most `max_regions` regions over all
    /// processes.
    pub fn with_limit(max_regions: usize) -> Self {
        Self {
            procs: HashMap::new(),
            books: Books {
                totals: BTreeMap::new(),
                regions: 0,
                max_regions,
                dropped: 0,
                dropped_bytes: 0,
            },
            now_ns: 0,
        }
    }

    /// The time of the event about to be applied (kernel monotonic ns);
    /// regions it creates carry it, for [`Self::totals_older_than`].
    pub fn set_now(&mut self, ts_ns: u64) {
        self.now_ns = ts_ns;
    }

    /// mmap returned `addr` for `len` bytes. A new mapping replaces whatever
    /// part of existing tracked regions it overlaps (`MAP_FIXED`).
    pub fn mmap(&mut self, tgid: u32, addr: u64, len: u64, stack_id: StackId) {
        self.map(tgid, addr, len, stack_id, RegionKind::Mmap);
    }

    /// An anonymous shared mmap (`MAP_SHARED | MAP_ANONYMOUS`).
    pub fn mmap_shared(&mut self, tgid: u32, addr: u64, len: u64, stack_id: StackId) {
        self.map(tgid, addr, len, stack_id, RegionKind::Shared);
    }

    fn map(&mut self, tgid: u32, addr: u64, len: u64, stack_id: StackId, kind: RegionKind) {
        let len = page_up(len);
        if len == 0 || is_error_return(addr) {
            return;
        }
        let end = addr.saturating_add(len);
        let proc = self.procs.entry(tgid).or_default();
        carve(&mut self.books, tgid, &mut proc.regions, addr, end, None);
        let region = Region {
            end,
            stack_id,
            kind,
            ts_ns: self.now_ns,
        };
        self.books.insert(tgid, &mut proc.regions, addr, region);
    }

    /// munmap: forget `[addr, addr + len)`. Partial unmaps shrink or split
    /// regions; both pieces of a split keep the region's stack.
    pub fn munmap(&mut self, tgid: u32, addr: u64, len: u64) {
        let len = page_up(len);
        if len == 0 {
            return;
        }
        if let Some(proc) = self.procs.get_mut(&tgid) {
            let end = addr.saturating_add(len);
            carve(&mut self.books, tgid, &mut proc.regions, addr, end, None);
        }
    }

    /// mremap moved or resized `[old, old + old_len)` to
    /// `[new, new + new_len)` (`new` is the syscall's return value).
    ///
    /// Tracked pieces of the old range move with their own stacks and kinds
    /// (clipped to `new_len` when shrinking). The rest of the new range,
    /// growth and untracked holes alike, goes to the region that was at
    /// `old` (extending it when adjacent), or to `stack_id` as an mmap
    /// region when nothing was tracked at `old`. The destination replaces
    /// any tracked memory there (`MREMAP_FIXED`).
    pub fn mremap(
        &mut self,
        tgid: u32,
        old: u64,
        old_len: u64,
        new: u64,
        new_len: u64,
        stack_id: StackId,
    ) {
        let old_len = page_up(old_len);
        let new_len = page_up(new_len);
        if new_len == 0 || is_error_return(new) {
            return;
        }
        let old_end = old.saturating_add(old_len);
        let new_end = new.saturating_add(new_len);
        let proc = self.procs.entry(tgid).or_default();
        let mut pieces = Vec::new();
        carve(
            &mut self.books,
            tgid,
            &mut proc.regions,
            old,
            old_end,
            Some(&mut pieces),
        );
        let (fill_stack, fill_kind) = match pieces.first() {
            Some(&(start, region)) if start == old => (region.stack_id, region.kind),
            _ => (stack_id, RegionKind::Mmap),
        };

        let ts_ns = self.now_ns;
        let mut placed: Vec<(u64, Region)> = Vec::with_capacity(pieces.len() + 1);
        let mut cursor = new;
        for (start, region) in pieces {
            let moved_start = new.saturating_add(start - old);
            if moved_start >= new_end {
                break;
            }
            let moved_end = new.saturating_add(region.end - old).min(new_end);
            if cursor < moved_start {
                push_fill(
                    &mut placed,
                    cursor,
                    moved_start,
                    fill_stack,
                    fill_kind,
                    ts_ns,
                );
            }
            placed.push((
                moved_start,
                Region {
                    end: moved_end,
                    ts_ns,
                    ..region
                },
            ));
            cursor = moved_end;
        }
        if cursor < new_end {
            push_fill(&mut placed, cursor, new_end, fill_stack, fill_kind, ts_ns);
        }

        carve(&mut self.books, tgid, &mut proc.regions, new, new_end, None);
        for (start, region) in placed {
            self.books.insert(tgid, &mut proc.regions, start, region);
        }
    }

    /// brk moved the program break to `new_brk` (the syscall's return value;
    /// a failed brk returns the unchanged break and so changes nothing).
    /// Growth becomes a brk region `[old_brk, new_brk)` with `stack_id`;
    /// shrinking unmaps `[new_brk, old_brk)`, trimming or removing the
    /// topmost regions. Before the break is known, only records it.
    pub fn brk(&mut self, tgid: u32, new_brk: u64, stack_id: StackId) {
        self.set_brk(tgid, new_brk, Some(stack_id));
    }

    /// brk made from inside a probed allocator (malloc's own sbrk): the
    /// bytes are already counted as allocations, so growth records no
    /// region (and clears any tracked memory it covers, now the heap's);
    /// shrinking unmaps `[new_brk, old_brk)` as [`Self::brk`] does.
    pub fn move_brk(&mut self, tgid: u32, new_brk: u64) {
        self.set_brk(tgid, new_brk, None);
    }

    fn set_brk(&mut self, tgid: u32, new_brk: u64, stack_id: Option<StackId>) {
        let proc = self.procs.entry(tgid).or_default();
        let Some(old_brk) = proc.brk.replace(new_brk) else {
            return;
        };
        let (low, high) = (old_brk.min(new_brk), old_brk.max(new_brk));
        carve(&mut self.books, tgid, &mut proc.regions, low, high, None);
        if let (true, Some(stack_id)) = (new_brk > old_brk, stack_id) {
            let region = Region {
                end: new_brk,
                stack_id,
                kind: RegionKind::Brk,
                ts_ns: self.now_ns,
            };
            self.books.insert(tgid, &mut proc.regions, old_brk, region);
        }
    }

    /// The break known at attach (`[heap]` end in /proc/PID/maps, or a
    /// brk(0) query). Ignored once a brk event has recorded the break: the
    /// event is exact and at least as recent.
    pub fn set_initial_brk(&mut self, tgid: u32, brk: u64) {
        let proc = self.procs.entry(tgid).or_default();
        proc.brk.get_or_insert(brk);
    }

    /// A process exited or exec'd: drop everything about it.
    pub fn forget(&mut self, tgid: u32) {
        if let Some(mut proc) = self.procs.remove(&tgid) {
            while let Some((&start, _)) = proc.regions.first_key_value() {
                self.books.remove(tgid, &mut proc.regions, start);
            }
        }
    }

    /// Outstanding bytes and region count per `(tgid, stack_id, kind)`,
    /// ordered by tgid, then stack id, then kind. Groups with nothing
    /// outstanding are absent.
    pub fn totals(&self) -> Vec<RegionTotals> {
        self.books
            .totals
            .iter()
            .map(|(&(tgid, stack_id, kind), sum)| RegionTotals {
                tgid,
                stack_id,
                kind,
                bytes: sum.bytes,
                regions: sum.regions,
            })
            .collect()
    }

    /// As [`Self::totals`], counting only regions mapped at or before
    /// `cutoff_ns` (`--min-age`). One pass over every region.
    pub fn totals_older_than(&self, cutoff_ns: u64) -> Vec<RegionTotals> {
        let mut sums: BTreeMap<GroupKey, Sum> = BTreeMap::new();
        for (&tgid, proc) in &self.procs {
            for (&start, region) in &proc.regions {
                if region.ts_ns <= cutoff_ns {
                    let sum = sums
                        .entry((tgid, region.stack_id, region.kind))
                        .or_default();
                    sum.bytes += region.end - start;
                    sum.regions += 1;
                }
            }
        }
        sums.into_iter()
            .map(|((tgid, stack_id, kind), sum)| RegionTotals {
                tgid,
                stack_id,
                kind,
                bytes: sum.bytes,
                regions: sum.regions,
            })
            .collect()
    }

    /// Regions not recorded because the limit was reached.
    pub fn dropped(&self) -> u64 {
        self.books.dropped
    }

    /// Bytes of the regions counted in [`Self::dropped`].
    pub fn dropped_bytes(&self) -> u64 {
        self.books.dropped_bytes
    }

    /// Regions tracked over all processes.
    pub fn region_count(&self) -> usize {
        self.books.regions
    }

    /// The program break of `tgid`, if known.
    pub fn brk_of(&self, tgid: u32) -> Option<u64> {
        self.procs.get(&tgid).and_then(|p| p.brk)
    }

    /// The regions of `tgid` as `(start, region)`, in address order.
    pub fn regions(&self, tgid: u32) -> impl Iterator<Item = (u64, Region)> + '_ {
        self.procs
            .get(&tgid)
            .into_iter()
            .flat_map(|p| p.regions.iter().map(|(&start, &region)| (start, region)))
    }
}

fn page_up(len: u64) -> u64 {
    len.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// Syscalls return `-errno` (`-4095..=-1`) on failure.
fn is_error_return(ret: u64) -> bool {
    ret > u64::MAX - 4095
}

/// Removes `[start, end)` from `map`. A region straddling an edge keeps the
/// part outside; one covering both edges is split in two. When `out` is
/// given, the removed parts are pushed to it, clipped and in address order.
fn carve(
    books: &mut Books,
    tgid: u32,
    map: &mut BTreeMap<u64, Region>,
    start: u64,
    end: u64,
    mut out: Option<&mut Vec<(u64, Region)>>,
) {
    if start >= end {
        return;
    }
    // At most one region starts below `start` and reaches into the range,
    // since regions do not overlap.
    if let Some((&head_start, &region)) = map.range(..start).next_back() {
        if region.end > start {
            books.truncate(tgid, map, head_start, start);
            if let Some(out) = out.as_deref_mut() {
                let clipped = Region {
                    end: region.end.min(end),
                    ..region
                };
                out.push((start, clipped));
            }
            if region.end > end {
                books.insert(tgid, map, end, region);
            }
        }
    }
    while let Some((&inner_start, _)) = map.range(start..end).next() {
        let Some(region) = books.remove(tgid, map, inner_start) else {
            break;
        };
        if let Some(out) = out.as_deref_mut() {
            let clipped = Region {
                end: region.end.min(end),
                ..region
            };
            out.push((inner_start, clipped));
        }
        if region.end > end {
            books.insert(tgid, map, end, region);
        }
    }
}

/// Appends `[start, end)` for the fill stack, extending the previous piece
/// when it is adjacent and has the same stack and kind, so that growing a
/// region in place leaves one region.
fn push_fill(
    placed: &mut Vec<(u64, Region)>,
    start: u64,
    end: u64,
    stack_id: StackId,
    kind: RegionKind,
    ts_ns: u64,
) {
    if let Some((_, last)) = placed.last_mut() {
        if last.end == start && last.stack_id == stack_id && last.kind == kind {
            last.end = end;
            return;
        }
    }
    placed.push((
        start,
        Region {
            end,
            stack_id,
            kind,
            ts_ns,
        },
    ));
}

#[cfg(test)]
mod shared_tests {
    use super::*;

    #[test]
    fn a_shared_mapping_is_its_own_kind_and_unmaps_like_any() {
        let mut t = MmapTracker::with_limit(100);
        t.mmap_shared(1, 0x10_0000, 8192, 5);
        t.mmap(1, 0x20_0000, 4096, 5);
        let kinds: Vec<(RegionKind, u64)> = t.totals().iter().map(|r| (r.kind, r.bytes)).collect();
        assert_eq!(
            kinds,
            vec![(RegionKind::Mmap, 4096), (RegionKind::Shared, 8192)]
        );
        t.munmap(1, 0x10_0000, 8192);
        assert_eq!(t.totals().len(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use RegionKind::{Brk, Mmap};

    const P: u64 = PAGE_SIZE;
    const BASE: u64 = 0x7f00_0000_0000;

    fn at(page: u64) -> u64 {
        BASE + page * P
    }

    /// `(tgid, stack, kind, bytes, regions)` rows, for compact asserts.
    fn rows(tr: &MmapTracker) -> Vec<(u32, StackId, RegionKind, u64, u64)> {
        check_invariants(tr);
        tr.totals()
            .into_iter()
            .map(|t| (t.tgid, t.stack_id, t.kind, t.bytes, t.regions))
            .collect()
    }

    /// `(start page, end page, stack)` of one process's regions.
    fn spans(tr: &MmapTracker, tgid: u32) -> Vec<(u64, u64, StackId)> {
        tr.regions(tgid)
            .map(|(s, r)| ((s - BASE) / P, (r.end - BASE) / P, r.stack_id))
            .collect()
    }

    /// Regions are non-empty and disjoint; the running totals and count
    /// equal a fresh sum over the regions; the count respects the limit.
    fn check_invariants(tr: &MmapTracker) {
        let mut sums: BTreeMap<GroupKey, (u64, u64)> = BTreeMap::new();
        let mut count = 0;
        for (&tgid, proc) in &tr.procs {
            let mut prev_end = 0;
            for (&start, region) in &proc.regions {
                assert!(
                    start < region.end,
                    "tgid {tgid}: empty region at {start:#x}"
                );
                assert!(
                    start >= prev_end,
                    "tgid {tgid}: region at {start:#x} overlaps one ending at {prev_end:#x}"
                );
                prev_end = region.end;
                let sum = sums
                    .entry((tgid, region.stack_id, region.kind))
                    .or_default();
                sum.0 += region.end - start;
                sum.1 += 1;
                count += 1;
            }
        }
        let recomputed: Vec<RegionTotals> = sums
            .into_iter()
            .map(|((tgid, stack_id, kind), (bytes, regions))| RegionTotals {
                tgid,
                stack_id,
                kind,
                bytes,
                regions,
            })
            .collect();
        assert_eq!(
            tr.totals(),
            recomputed,
            "running totals drifted from the regions"
        );
        assert_eq!(tr.region_count(), count, "region count drifted");
        assert!(
            count <= tr.books.max_regions,
            "{count} regions over the limit"
        );
    }

    #[test]
    fn ages_count_from_the_mapping_and_remaps_are_new() {
        let mut tr = MmapTracker::default();
        tr.set_now(100);
        tr.mmap(1, at(0), 4 * P, 7);
        tr.brk(1, at(100), 9);
        tr.set_now(200);
        tr.mmap(1, at(10), 2 * P, 8);
        tr.brk(1, at(102), 9);
        tr.set_now(300);
        // A partial unmap leaves pieces as old as the mapping.
        tr.munmap(1, at(1), P);
        let old = |tr: &MmapTracker, cutoff| -> Vec<(StackId, RegionKind, u64, u64)> {
            tr.totals_older_than(cutoff)
                .into_iter()
                .map(|t| (t.stack_id, t.kind, t.bytes, t.regions))
                .collect()
        };
        assert_eq!(old(&tr, 99), vec![]);
        assert_eq!(old(&tr, 150), vec![(7, Mmap, 3 * P, 2)]);
        // The first brk only told where the break was; the growth is the
        // second's.
        assert_eq!(
            old(&tr, 250),
            vec![(7, Mmap, 3 * P, 2), (8, Mmap, 2 * P, 1), (9, Brk, 2 * P, 1)]
        );
        tr.set_initial_brk(2, at(200));
        tr.set_now(400);
        tr.brk(2, at(203), 5);
        tr.set_now(500);
        tr.mremap(1, at(10), 2 * P, at(10), 3 * P, 8);
        assert_eq!(
            old(&tr, 450),
            vec![(7, Mmap, 3 * P, 2), (9, Brk, 2 * P, 1), (5, Brk, 3 * P, 1)],
            "the remapped region is new"
        );
        assert_eq!(old(&tr, 500).len(), 4);
        assert_eq!(
            old(&tr, u64::MAX).iter().map(|r| r.2).sum::<u64>(),
            tr.totals().iter().map(|t| t.bytes).sum::<u64>()
        );
    }

    #[test]
    fn mmap_rounds_length_up_to_pages() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 1, 7);
        tr.mmap(1, at(4), 2 * P + 1, 7);
        assert_eq!(rows(&tr), vec![(1, 7, Mmap, 4 * P, 2)]);
        assert_eq!(spans(&tr, 1), vec![(0, 1, 7), (4, 7, 7)]);
    }

    #[test]
    fn map_fixed_replaces_the_overlapped_parts() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 10 * P, 1);
        tr.mmap(1, at(10), 10 * P, 2);
        // Inside the first region: splits it around the new one.
        tr.mmap(1, at(4), 2 * P, 3);
        assert_eq!(
            spans(&tr, 1),
            vec![(0, 4, 1), (4, 6, 3), (6, 10, 1), (10, 20, 2)]
        );
        // Across the boundary of two regions: trims the tail of one and the
        // head of the other, and the whole of the one in between.
        tr.mmap(1, at(5), 7 * P, 4);
        assert_eq!(
            spans(&tr, 1),
            vec![(0, 4, 1), (4, 5, 3), (5, 12, 4), (12, 20, 2)]
        );
        assert_eq!(
            rows(&tr),
            vec![
                (1, 1, Mmap, 4 * P, 1),
                (1, 2, Mmap, 8 * P, 1),
                (1, 3, Mmap, P, 1),
                (1, 4, Mmap, 7 * P, 1),
            ]
        );
        // Exactly over an existing region: replaces it.
        tr.mmap(1, at(12), 8 * P, 5);
        assert_eq!(
            spans(&tr, 1),
            vec![(0, 4, 1), (4, 5, 3), (5, 12, 4), (12, 20, 5)]
        );
        check_invariants(&tr);
    }

    #[test]
    fn munmap_of_a_middle_part_splits_the_region() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 10 * P, 1);
        tr.munmap(1, at(3), 2 * P);
        assert_eq!(spans(&tr, 1), vec![(0, 3, 1), (5, 10, 1)]);
        assert_eq!(rows(&tr), vec![(1, 1, Mmap, 8 * P, 2)]);
    }

    #[test]
    fn munmap_trims_heads_and_tails() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 10 * P, 1);
        tr.munmap(1, at(0), 2 * P);
        tr.munmap(1, at(8), 1); // rounded up to one page
        assert_eq!(spans(&tr, 1), vec![(2, 8, 1), (9, 10, 1)]);
        tr.munmap(1, at(7), 3 * P);
        assert_eq!(spans(&tr, 1), vec![(2, 7, 1)]);
        check_invariants(&tr);
    }

    #[test]
    fn munmap_covering_several_regions() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 4 * P, 1);
        tr.mmap(1, at(4), 4 * P, 2);
        tr.mmap(1, at(10), 4 * P, 3);
        tr.mmap(1, at(20), 4 * P, 4);
        tr.munmap(1, at(2), 10 * P);
        assert_eq!(spans(&tr, 1), vec![(0, 2, 1), (12, 14, 3), (20, 24, 4)]);
        assert_eq!(
            rows(&tr),
            vec![
                (1, 1, Mmap, 2 * P, 1),
                (1, 3, Mmap, 2 * P, 1),
                (1, 4, Mmap, 4 * P, 1)
            ]
        );
    }

    #[test]
    fn munmap_of_untracked_memory_is_a_no_op() {
        let mut tr = MmapTracker::default();
        tr.munmap(9, at(0), 100 * P);
        assert!(tr.procs.is_empty(), "an unknown process was created");
        tr.mmap(1, at(10), 4 * P, 1);
        tr.munmap(1, at(0), 10 * P);
        tr.munmap(1, at(14), 10 * P);
        tr.munmap(2, at(10), 4 * P);
        assert_eq!(spans(&tr, 1), vec![(10, 14, 1)]);
        assert_eq!(rows(&tr), vec![(1, 1, Mmap, 4 * P, 1)]);
    }

    #[test]
    fn mremap_grows_in_place_keeping_the_original_stack() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 2 * P, 1);
        tr.mremap(1, at(0), 2 * P, at(0), 5 * P, 9);
        assert_eq!(spans(&tr, 1), vec![(0, 5, 1)]);
        assert_eq!(rows(&tr), vec![(1, 1, Mmap, 5 * P, 1)]);
    }

    #[test]
    fn mremap_moves_and_grows() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 2 * P, 1);
        tr.mmap(1, at(2), 2 * P, 2);
        tr.mremap(1, at(0), 2 * P, at(50), 3 * P, 9);
        assert_eq!(spans(&tr, 1), vec![(2, 4, 2), (50, 53, 1)]);
        assert_eq!(
            rows(&tr),
            vec![(1, 1, Mmap, 3 * P, 1), (1, 2, Mmap, 2 * P, 1)]
        );
    }

    #[test]
    fn mremap_shrinks_in_place_and_while_moving() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 8 * P, 1);
        tr.mremap(1, at(0), 8 * P, at(0), 3 * P, 9);
        assert_eq!(spans(&tr, 1), vec![(0, 3, 1)]);
        tr.mremap(1, at(0), 3 * P, at(40), P, 9);
        assert_eq!(spans(&tr, 1), vec![(40, 41, 1)]);
        assert_eq!(rows(&tr), vec![(1, 1, Mmap, P, 1)]);
    }

    #[test]
    fn mremap_of_untracked_memory_takes_the_call_stack() {
        let mut tr = MmapTracker::default();
        tr.mremap(1, at(0), 2 * P, at(30), 4 * P, 9);
        assert_eq!(spans(&tr, 1), vec![(30, 34, 9)]);
        assert_eq!(rows(&tr), vec![(1, 9, Mmap, 4 * P, 1)]);
    }

    #[test]
    fn mremap_split_pieces_keep_their_own_stacks() {
        let mut tr = MmapTracker::default();
        // Two adjacent mappings the kernel merged into one VMA, with a hole
        // (mapped before attach) between pages 4 and 5.
        tr.mmap(1, at(0), 4 * P, 1);
        tr.mmap(1, at(5), 3 * P, 2);
        tr.mremap(1, at(0), 8 * P, at(20), 10 * P, 9);
        // The hole extends the region that was at `old`; the growth goes to
        // it too, as a new region since stack 2 sits in between.
        assert_eq!(spans(&tr, 1), vec![(20, 25, 1), (25, 28, 2), (28, 30, 1)]);
        assert_eq!(
            rows(&tr),
            vec![(1, 1, Mmap, 7 * P, 2), (1, 2, Mmap, 3 * P, 1)]
        );
    }

    #[test]
    fn mremap_without_a_region_at_old_fills_with_the_call_stack() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(2), 2 * P, 1);
        tr.mremap(1, at(0), 4 * P, at(10), 6 * P, 9);
        assert_eq!(spans(&tr, 1), vec![(10, 12, 9), (12, 14, 1), (14, 16, 9)]);
        check_invariants(&tr);
    }

    #[test]
    fn mremap_of_part_of_a_region_splits_the_original() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 10 * P, 1);
        tr.mremap(1, at(4), 2 * P, at(40), 2 * P, 9);
        assert_eq!(spans(&tr, 1), vec![(0, 4, 1), (6, 10, 1), (40, 42, 1)]);
        assert_eq!(rows(&tr), vec![(1, 1, Mmap, 10 * P, 3)]);
    }

    #[test]
    fn mremap_to_a_fixed_destination_replaces_what_was_there() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, at(0), 2 * P, 1);
        tr.mmap(1, at(10), 4 * P, 2);
        tr.mremap(1, at(0), 2 * P, at(11), 2 * P, 9);
        assert_eq!(spans(&tr, 1), vec![(10, 11, 2), (11, 13, 1), (13, 14, 2)]);
        assert_eq!(
            rows(&tr),
            vec![(1, 1, Mmap, 2 * P, 1), (1, 2, Mmap, 2 * P, 2)]
        );
    }

    #[test]
    fn brk_grows_and_shrinks_from_the_top() {
        let mut tr = MmapTracker::default();
        tr.set_initial_brk(1, at(100));
        tr.brk(1, at(104), 1);
        tr.brk(1, at(110), 2);
        // A failed brk returns the unchanged break.
        tr.brk(1, at(110), 3);
        assert_eq!(spans(&tr, 1), vec![(100, 104, 1), (104, 110, 2)]);
        assert_eq!(
            rows(&tr),
            vec![(1, 1, Brk, 4 * P, 1), (1, 2, Brk, 6 * P, 1)]
        );
        tr.brk(1, at(106), 3);
        assert_eq!(spans(&tr, 1), vec![(100, 104, 1), (104, 106, 2)]);
        tr.brk(1, at(102), 3);
        assert_eq!(spans(&tr, 1), vec![(100, 102, 1)]);
        assert_eq!(rows(&tr), vec![(1, 1, Brk, 2 * P, 1)]);
        assert_eq!(tr.brk_of(1), Some(at(102)));
    }

    #[test]
    fn allocator_brk_moves_the_break_without_a_region() {
        let mut tr = MmapTracker::default();
        tr.set_initial_brk(1, at(100));
        tr.brk(1, at(102), 1);
        tr.move_brk(1, at(110));
        assert_eq!(spans(&tr, 1), vec![(100, 102, 1)]);
        // Later program growth starts at the allocator's break.
        tr.brk(1, at(112), 2);
        assert_eq!(spans(&tr, 1), vec![(100, 102, 1), (110, 112, 2)]);
        // Shrinking from inside the allocator still unmaps the top.
        tr.move_brk(1, at(101));
        assert_eq!(spans(&tr, 1), vec![(100, 101, 1)]);
        assert_eq!(tr.brk_of(1), Some(at(101)));
        check_invariants(&tr);
    }

    #[test]
    fn brk_regions_are_byte_exact() {
        let mut tr = MmapTracker::default();
        tr.set_initial_brk(1, 0x5000_0010);
        tr.brk(1, 0x5000_0110, 1);
        assert_eq!(rows(&tr), vec![(1, 1, Brk, 0x100, 1)]);
    }

    #[test]
    fn brk_before_the_initial_break_only_records_it() {
        let mut tr = MmapTracker::default();
        tr.brk(1, at(104), 1);
        assert!(rows(&tr).is_empty());
        assert_eq!(tr.brk_of(1), Some(at(104)));
        tr.brk(1, at(106), 2);
        assert_eq!(spans(&tr, 1), vec![(104, 106, 2)]);
    }

    #[test]
    fn initial_break_does_not_override_a_recorded_one() {
        let mut tr = MmapTracker::default();
        tr.brk(1, at(104), 1);
        tr.set_initial_brk(1, at(100));
        assert_eq!(tr.brk_of(1), Some(at(104)));
        tr.set_initial_brk(2, at(100));
        assert_eq!(tr.brk_of(2), Some(at(100)));
    }

    #[test]
    fn mmap_and_brk_of_one_stack_are_reported_apart() {
        let mut tr = MmapTracker::default();
        tr.set_initial_brk(1, at(100));
        tr.brk(1, at(101), 5);
        tr.mmap(1, at(0), 2 * P, 5);
        tr.mmap(2, at(0), P, 5);
        assert_eq!(
            rows(&tr),
            vec![
                (1, 5, Mmap, 2 * P, 1),
                (1, 5, Brk, P, 1),
                (2, 5, Mmap, P, 1)
            ]
        );
        assert_eq!(tr.totals()[0].stack_key(), (1, 5));
    }

    #[test]
    fn forget_drops_the_process_and_only_it() {
        let mut tr = MmapTracker::default();
        tr.set_initial_brk(1, at(100));
        tr.brk(1, at(102), 1);
        tr.mmap(1, at(0), 4 * P, 1);
        tr.mmap(2, at(0), 4 * P, 1);
        tr.forget(1);
        assert_eq!(rows(&tr), vec![(2, 1, Mmap, 4 * P, 1)]);
        assert_eq!(tr.brk_of(1), None);
        assert_eq!(tr.regions(1).count(), 0);
        assert_eq!(tr.region_count(), 1);
        tr.forget(42);
        assert_eq!(tr.region_count(), 1);
    }

    #[test]
    fn failed_calls_and_zero_lengths_are_ignored() {
        let mut tr = MmapTracker::default();
        tr.mmap(1, -12i64 as u64, P, 1); // -ENOMEM
        tr.mmap(1, at(0), 0, 1);
        assert!(rows(&tr).is_empty());
        tr.mmap(1, at(0), P, 1);
        tr.munmap(1, at(0), 0);
        tr.mremap(1, at(0), P, -14i64 as u64, 2 * P, 2); // -EFAULT
        tr.mremap(1, at(0), P, at(0), 0, 2);
        assert_eq!(spans(&tr, 1), vec![(0, 1, 1)]);
    }

    #[test]
    fn limit_counts_what_it_drops() {
        let mut tr = MmapTracker::with_limit(2);
        tr.mmap(1, at(0), 4 * P, 1);
        tr.mmap(2, at(0), 4 * P, 2);
        tr.mmap(1, at(10), 3 * P, 3);
        assert_eq!(tr.dropped(), 1);
        assert_eq!(tr.dropped_bytes(), 3 * P);
        assert_eq!(
            rows(&tr),
            vec![(1, 1, Mmap, 4 * P, 1), (2, 2, Mmap, 4 * P, 1)]
        );
        // A split at the limit keeps the lower piece and drops the upper.
        tr.munmap(1, at(1), P);
        assert_eq!(spans(&tr, 1), vec![(0, 1, 1)]);
        assert_eq!((tr.dropped(), tr.dropped_bytes()), (2, 5 * P));
        // Freed room is used again.
        tr.munmap(2, at(0), 4 * P);
        tr.mmap(1, at(10), 3 * P, 3);
        assert_eq!(spans(&tr, 1), vec![(0, 1, 1), (10, 13, 3)]);
        assert_eq!(tr.dropped(), 2);
        check_invariants(&tr);
    }

    #[test]
    fn zero_limit_records_nothing() {
        let mut tr = MmapTracker::with_limit(0);
        tr.mmap(1, at(0), P, 1);
        tr.set_initial_brk(1, at(100));
        tr.brk(1, at(101), 1);
        assert!(rows(&tr).is_empty());
        assert_eq!((tr.dropped(), tr.dropped_bytes()), (2, 2 * P));
        assert_eq!(tr.brk_of(1), Some(at(101)));
    }

    /// xorshift64*: enough to drive the model test, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    struct Cell {
        stack: StackId,
        kind: RegionKind,
        /// Which region holds the page: a region is a run of consecutive
        /// pages with one id.
        id: u64,
    }

    /// Reference model: one cell per mapped page. Slow and obviously right.
    #[derive(Default)]
    struct Model {
        procs: BTreeMap<u32, (BTreeMap<u64, Cell>, Option<u64>)>,
        next_id: u64,
    }

    impl Model {
        fn fresh(&mut self) -> u64 {
            self.next_id += 1;
            self.next_id
        }

        fn pages(len: u64) -> u64 {
            len.div_ceil(P)
        }

        fn mmap(&mut self, tgid: u32, addr: u64, len: u64, stack: StackId) {
            let n = Self::pages(len);
            if n == 0 {
                return;
            }
            let id = self.fresh();
            let pages = &mut self.procs.entry(tgid).or_default().0;
            for p in addr / P..addr / P + n {
                pages.insert(
                    p,
                    Cell {
                        stack,
                        kind: Mmap,
                        id,
                    },
                );
            }
        }

        fn munmap(&mut self, tgid: u32, addr: u64, len: u64) {
            if let Some((pages, _)) = self.procs.get_mut(&tgid) {
                for p in addr / P..addr / P + Self::pages(len) {
                    pages.remove(&p);
                }
            }
        }

        fn mremap(
            &mut self,
            tgid: u32,
            old: u64,
            old_len: u64,
            new: u64,
            new_len: u64,
            stack: StackId,
        ) {
            let (old_n, new_n) = (Self::pages(old_len), Self::pages(new_len));
            if new_n == 0 {
                return;
            }
            let (old_p, new_p) = (old / P, new / P);
            let taken: Vec<Option<Cell>> = {
                let pages = &mut self.procs.entry(tgid).or_default().0;
                (0..old_n).map(|i| pages.remove(&(old_p + i))).collect()
            };
            // Each moved piece is a region of its own.
            let mut moved = Vec::with_capacity(taken.len());
            let mut run: Option<(u64, u64)> = None; // (old id, new id)
            for cell in &taken {
                let Some(c) = *cell else {
                    run = None;
                    moved.push(None);
                    continue;
                };
                let id = match run {
                    Some((old_id, new_id)) if old_id == c.id => new_id,
                    _ => self.fresh(),
                };
                run = Some((c.id, id));
                moved.push(Some(Cell { id, ..c }));
            }
            let (fill_stack, fill_kind) = match taken.first() {
                Some(Some(c)) => (c.stack, c.kind),
                _ => (stack, Mmap),
            };
            let mut placed: Vec<Cell> = Vec::with_capacity(new_n as usize);
            for i in 0..new_n {
                let cell = match moved.get(i as usize) {
                    Some(&Some(c)) => c,
                    _ => match placed.last() {
                        Some(&prev) if prev.stack == fill_stack && prev.kind == fill_kind => prev,
                        _ => Cell {
                            stack: fill_stack,
                            kind: fill_kind,
                            id: self.fresh(),
                        },
                    },
                };
                placed.push(cell);
            }
            let pages = &mut self.procs.entry(tgid).or_default().0;
            for (i, cell) in placed.into_iter().enumerate() {
                pages.insert(new_p + i as u64, cell);
            }
        }

        /// `stack` is `None` for a brk from inside the allocator.
        fn brk(&mut self, tgid: u32, new_brk: u64, stack: Option<StackId>) {
            let id = self.fresh();
            let (pages, brk) = self.procs.entry(tgid).or_default();
            let Some(old) = brk.replace(new_brk) else {
                return;
            };
            for p in new_brk.min(old) / P..new_brk.max(old) / P {
                match stack {
                    Some(stack) if new_brk > old => {
                        pages.insert(
                            p,
                            Cell {
                                stack,
                                kind: Brk,
                                id,
                            },
                        );
                    }
                    _ => {
                        pages.remove(&p);
                    }
                }
            }
        }

        fn set_initial_brk(&mut self, tgid: u32, brk: u64) {
            self.procs.entry(tgid).or_default().1.get_or_insert(brk);
        }

        fn forget(&mut self, tgid: u32) {
            self.procs.remove(&tgid);
        }

        fn totals(&self) -> Vec<RegionTotals> {
            let mut sums: BTreeMap<GroupKey, (u64, u64)> = BTreeMap::new();
            for (&tgid, (pages, _)) in &self.procs {
                let mut prev: Option<(u64, Cell)> = None;
                for (&p, &cell) in pages {
                    let sum = sums.entry((tgid, cell.stack, cell.kind)).or_default();
                    sum.0 += P;
                    if prev != Some((p.wrapping_sub(1), cell)) {
                        sum.1 += 1;
                    }
                    prev = Some((p, cell));
                }
            }
            sums.into_iter()
                .map(|((tgid, stack_id, kind), (bytes, regions))| RegionTotals {
                    tgid,
                    stack_id,
                    kind,
                    bytes,
                    regions,
                })
                .collect()
        }
    }

    /// Drives `tr` and `model` through `ops` pseudo-random
    /// operations over a small window, so that overlaps are the rule, and
    /// compares their totals after each step when `compare` is set.
    fn random_ops(seed: u64, ops: usize, tr: &mut MmapTracker, model: &mut Model, compare: bool) {
        let mut rng = Rng(seed);
        for step in 0..ops {
            let tgid = 1 + rng.below(2) as u32;
            let stack = rng.below(5) as StackId;
            // Lengths from 0 to 11 pages, often not page multiples.
            let len =
                |rng: &mut Rng| (rng.below(12) * P).saturating_sub(rng.below(2) * rng.below(P));
            let roll = rng.below(100);
            let what = if roll < 30 {
                let (addr, len) = (at(rng.below(56)), len(&mut rng));
                tr.mmap(tgid, addr, len, stack);
                model.mmap(tgid, addr, len, stack);
                format!("mmap({tgid}, {addr:#x}, {len:#x}, {stack})")
            } else if roll < 55 {
                let (addr, len) = (at(rng.below(56)), len(&mut rng));
                tr.munmap(tgid, addr, len);
                model.munmap(tgid, addr, len);
                format!("munmap({tgid}, {addr:#x}, {len:#x})")
            } else if roll < 75 {
                let old = at(rng.below(56));
                let old_len = len(&mut rng);
                let new = if rng.below(3) == 0 {
                    old
                } else {
                    at(rng.below(56))
                };
                let new_len = len(&mut rng);
                tr.mremap(tgid, old, old_len, new, new_len, stack);
                model.mremap(tgid, old, old_len, new, new_len, stack);
                format!("mremap({tgid}, {old:#x}, {old_len:#x}, {new:#x}, {new_len:#x}, {stack})")
            } else if roll < 95 {
                let new_brk = at(40 + rng.below(32));
                if rng.below(4) == 0 {
                    tr.move_brk(tgid, new_brk);
                    model.brk(tgid, new_brk, None);
                    format!("move_brk({tgid}, {new_brk:#x})")
                } else {
                    tr.brk(tgid, new_brk, stack);
                    model.brk(tgid, new_brk, Some(stack));
                    format!("brk({tgid}, {new_brk:#x}, {stack})")
                }
            } else if roll < 98 {
                let brk = at(40 + rng.below(32));
                tr.set_initial_brk(tgid, brk);
                model.set_initial_brk(tgid, brk);
                format!("set_initial_brk({tgid}, {brk:#x})")
            } else {
                tr.forget(tgid);
                model.forget(tgid);
                format!("forget({tgid})")
            };
            check_invariants(tr);
            if compare {
                assert_eq!(
                    tr.totals(),
                    model.totals(),
                    "seed {seed:#x}, step {step}: {what} left totals unlike the page model"
                );
            }
        }
    }

    #[test]
    fn totals_match_a_page_model_over_random_operations() {
        for seed in [0x9e37_79b9_7f4a_7c15, 0xdead_beef_cafe_f00d, 42] {
            let mut tr = MmapTracker::default();
            let mut model = Model::default();
            random_ops(seed, 4000, &mut tr, &mut model, true);
            assert_eq!(
                tr.dropped(),
                0,
                "seed {seed:#x}: the default limit dropped regions"
            );
        }
    }

    #[test]
    fn invariants_hold_under_a_small_limit() {
        let mut tr = MmapTracker::with_limit(6);
        random_ops(7, 4000, &mut tr, &mut Model::default(), false);
        assert!(
            tr.dropped() > 0,
            "the limit was never reached; the test lost its point"
        );
        assert!(tr.dropped_bytes() >= tr.dropped());
    }
}
