//! Attach: everything that puts leaktrace into the kernel and into target
//! processes, and the first room of the pipeline (attach -> ingest ->
//! unwind/runtime -> symbolize -> report).
//!
//! - `preflight`: privileges and kernel features, before anything loads.
//! - `probe`: loads the eBPF object, sizes its maps, fills the recording
//!   chains, attaches allocator uprobes per process (the allocator table,
//!   `prologue` for the probe points), registers unwind tables and
//!   runtime processes with the kernel.
//! - `targets`, `proc_events`: which processes to trace, and their forks,
//!   execs and exits as the kernel reports them.
//!
//! This room and `ingest` are the only ones that touch aya. It may import
//! `sys`, `unwind` (tables to load) and `runtime` (what a runtime needs
//! attached); nothing after it in the pipeline.

pub mod preflight;
pub mod probe;
pub mod proc_events;
pub mod prologue;
pub mod targets;
