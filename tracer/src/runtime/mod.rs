//! Runtimes: what an interpreter or managed runtime adds to a traced
//! process, one room each.
//!
//! - `python`: CPython 3.8-3.13: finds the interpreter and its layout in a
//!   process, gives the kernel's Python walker what it needs (`PY_PROCS`,
//!   `RUNTIMES`), and turns recorded `(code object, offset)` frames into
//!   `function at file:line`.
//! - `go`: a Go executable's runtime found and its profiling hooks located
//!   (`go/mod.rs`), the heap profile buckets read from the process
//!   (`go/buckets.rs`), its symbol and line tables (`go/pclntab.rs`,
//!   stripped binaries included), what its machine code says (`go/code.rs`:
//!   variables addressed RIP-relative, stack switches) and its heap and
//!   goroutine figures (`go/stats.rs`).
//!
//! The kernel side has a matching room per runtime (`tracer-ebpf/src/
//! python.rs`, `go.rs`), registered in `tracer_common::runtime` and
//! `tracer_common::chain`. A runtime may import `sys`; the core imports a
//! runtime only through this module.

pub mod go;
pub mod python;
