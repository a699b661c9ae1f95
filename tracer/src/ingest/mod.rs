//! Ingest: what the kernel recorded, read back as plain data.
//!
//! - `events`: per-stack totals, stored stacks, counters and the syscall
//!   ring buffer, read from the maps `attach` loaded.
//! - `mmaps`: anonymous mmap/munmap/mremap/brk regions from the syscall
//!   events, aged and split as the process maps and unmaps them.
//! - `faults`: sampled write faults on new pages (node mode), kept by
//!   page, given back as the process unmaps or lowers its break.
//! - `ledger`: per normalized stack, totals per process and a bounded time
//!   series, merged across processes.
//!
//! It may import `attach` (the loaded maps), `sys` and plain types; the
//! stages after it (`symbolize`, `report`) take what it produces.

pub mod events;
pub mod faults;
pub mod ledger;
pub mod mmaps;
