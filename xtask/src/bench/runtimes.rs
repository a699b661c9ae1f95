//! The cost per allocation in a managed runtime: `bench/pyalloc.py` under
//! Debian's Python at two stack depths, and `bench/goalloc.go` built with
//! two Go toolchains at two MemProfileRates. Both programs speak
//! mallocbench's phase protocol.
//!
//! Imports: `super` (configurations), `micro` (the phases).

use std::process::Command;

use anyhow::{anyhow, Result};

use super::{
    micro::{run_phases, Micro, Phases},
    one_line, Ctx, Kind, PYTHON,
};

/// One Python configuration: `bench/pyalloc.py` at `depth` frames, per
/// iteration one 1,000-byte bytes object (malloc and free) and one small
/// tuple (pymalloc), median thread CPU over the phases.
pub(super) fn measure_python(ctx: &Ctx, depth: u32, kind: &Kind, iters: u64) -> Result<Micro> {
    let mut python = Command::new(PYTHON);
    python.arg(&ctx.pyalloc).arg(depth.to_string());
    run_phases(
        ctx,
        &mut python,
        &one_thread("pyalloc", iters, 300),
        kind,
        None,
    )
}

/// One Go configuration: `bench/goalloc.go` at `rate`, process CPU per
/// object (the collector included), median over the phases.
pub(super) fn measure_go(
    ctx: &Ctx,
    toolchain: usize,
    rate: u64,
    kind: &Kind,
    iters: u64,
) -> Result<Micro> {
    let (_, bin) = ctx
        .goalloc
        .get(toolchain)
        .ok_or_else(|| anyhow!("no such toolchain"))?
        .1
        .as_ref()
        .map_err(|e| anyhow!("{}", one_line(e)))?;
    let mut go = Command::new(bin);
    go.arg(rate.to_string());
    run_phases(ctx, &mut go, &one_thread("goalloc", iters, 40), kind, None)
}

/// The phases of a program that runs its loop on one thread (the Go
/// collector's threads are its own).
fn one_thread(program: &'static str, iters: u64, us_per_iter: u64) -> Phases {
    Phases {
        program,
        iters,
        us_per_iter,
        threads: 1,
    }
}
