//! leaktrace: which call stacks hold the memory that keeps growing?
//!
//! Pipeline, one way: `probe` (load, attach) -> `events` (read the kernel
//! ledger) -> `ledger` (per-stack totals over time, merged across
//! processes) -> `trend` (growing, plateau, churn) -> `symbolize` ->
//! `report`. Only `probe` and `events` touch aya; the stages after them
//! take plain types and are unit-tested without root.

pub mod btf;
pub mod cgroupfs;
pub mod cli;
pub mod demo;
pub mod elf;
pub mod events;
pub mod go;
pub mod gopclntab;
pub mod gostats;
pub mod ledger;
pub mod mmaps;
pub mod oom;
pub mod preflight;
pub mod probe;
pub mod proc_events;
pub mod procfs;
pub mod prologue;
pub mod python;
pub mod report;
pub mod run;
pub mod symbolize;
pub mod targets;
pub mod trend;
pub mod unwind_table;
pub mod version;
