//! leaktrace: which call stacks hold the memory that keeps growing?
//!
//! The pipeline, one way, one folder per room:
//! `attach` (load the eBPF object, probe processes) -> `ingest` (read the
//! kernel's ledger, stacks, counters and syscall events) -> `unwind` and
//! `runtime` (object tables for the kernel's walkers; interpreter and Go
//! frames) -> `symbolize` (addresses to functions and lines) -> `report`
//! (trend, then text, JSON, folded, SVG, pprof). `run` drives it: process
//! lifecycle and the event loop. `node` is the machine-wide daemon's
//! user-space side: a census of every process's memory from `/proc` and
//! the cgroup files, and the Prometheus exposition. `sys` holds helpers
//! every room may use.
//! Only `attach` and `ingest` touch aya; the stages after them take plain
//! types and are unit-tested without root.
//!
//! Imports go one way, down this list (each room may import those below
//! it, never those above): `run` > `node` > `report` > `symbolize` >
//! `ingest` > `attach` > `unwind` > `runtime` > `sys`. (`node` sits
//! between `run` and `report`: `run` drives it, and it uses only `report`'s
//! trend fit and `sys`. `attach` loads `unwind`'s tables and attaches what
//! each runtime asks for; `unwind` asks the runtimes where their code
//! switches stacks.) The rooms above `runtime`
//! reach a runtime only through its seam, `runtime::Runtime`.

#[cfg(test)]
mod architecture;
pub mod attach;
pub mod cli;
pub mod demo;
pub mod ingest;
pub mod node;
pub mod oom;
pub mod report;
pub mod run;
pub mod runtime;
pub mod symbolize;
pub mod sys;
pub mod unwind;
pub mod version;
