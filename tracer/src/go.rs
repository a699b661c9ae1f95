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
//!   the two functions, `runtime.MemProfileRate`), refusing versions whose
//!   argument registers are not known and stripped binaries (no `.symtab`);
//! - reads each bucket's stack (`nstk` at +40, return PCs at +48) and the
//!   sampling rate from the live process;
//! - scales sampled bytes the way `go tool pprof -inuse_space` does:
//!   `bytes / (1 - e^(-avg/rate))`, `avg` the bucket's object size.
//!
//! Invariant: a bucket's stack and size never change once published
//! (buckets are persistent-allocated, never freed or moved), so each is
//! read once per process.

use std::{fs, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::{
    procfs::MapEntry,
    python::read_mem,
    unwind_table::{vaddr_of_file_offset, Segment},
};

/// Byte offset of `nstk` in `runtime.bucket` (Go 1.17-1.25).
const BUCKET_NSTK: u64 = 40;
/// Byte offset of the first stack PC in `runtime.bucket`.
const BUCKET_STACK: u64 = 48;
/// More frames than any Go version records (32 up to 1.22, 128 by default
/// from 1.23): a larger `nstk` means the read was wrong.
const MAX_BUCKET_FRAMES: u64 = 1024;

/// Go versions whose probed functions take their arguments in registers
/// leaktrace knows on x86-64: `setprofilebucket(p=AX, b=BX)`,
/// `mProf_Free(b=AX, size=BX)` (verified 1.19-1.25; the register ABI
/// starts with 1.17).
const SUPPORTED: std::ops::RangeInclusive<(u32, u32)> = (1, 17)..=(1, 25);

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
    /// No `.symtab`: the function table would have to come from `.gopclntab`.
    pub stripped: bool,
    pub segments: Vec<Segment>,
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
                 runtime's argument registers for go1.17-go1.25 only",
                self.version
            ));
        };
        if !SUPPORTED.contains(&mm) {
            return Some(format!(
                "{path} is built with {}: leaktrace knows the runtime's argument registers \
                 for go1.17-go1.25 only (x86-64 register ABI); its Go heap is not traced",
                self.version
            ));
        }
        if self.stripped {
            return Some(format!(
                "stripped Go binary: {path} ({}) has no symbol table; finding the runtime's \
                 profiling functions through .gopclntab is not yet supported; build without \
                 -ldflags=-s to trace its Go heap",
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
        stripped: file.section_by_name(".symtab").is_none(),
        segments: Vec::new(),
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
    info.segments = crate::unwind_table::segments_of(&file);
    Some(info)
}

/// A Go binary being traced in one process.
#[derive(Clone, Debug)]
pub struct GoTarget {
    /// The executable, as the process sees it.
    pub object: String,
    pub version: String,
    /// Runtime address of `runtime.MemProfileRate`.
    pub rate_addr: u64,
}

impl GoTarget {
    /// For the executable mapping `m` of a binary described by `info`.
    pub fn new(m: &MapEntry, info: &GoObjectInfo) -> Option<Self> {
        let text: Vec<Segment> = info
            .segments
            .iter()
            .filter(|s| s.executable)
            .copied()
            .collect();
        let vaddr = vaddr_of_file_offset(&text, m.offset)
            .or_else(|| vaddr_of_file_offset(&info.segments, m.offset))?;
        let bias = m.start.wrapping_sub(vaddr);
        Some(Self {
            object: m.path.clone().unwrap_or_default(),
            version: info.version.clone(),
            rate_addr: info.rate_vaddr?.wrapping_add(bias),
        })
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

/// A bucket as read from the process: bytes per object and the return
/// PCs of its stack, innermost first (the allocator's own frames are
/// already skipped by the runtime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub size_bytes: u64,
    pub pcs: Vec<u64>,
}

/// Read bucket `b` of process `pid`.
pub fn read_bucket(pid: u32, b: u64) -> Result<Bucket, &'static str> {
    let head = read_mem(pid, b, BUCKET_STACK as usize)?;
    let word = |off: u64| {
        u64::from_le_bytes(
            head[off as usize..off as usize + 8]
                .try_into()
                .unwrap_or_default(),
        )
    };
    let size_bytes = word(32);
    let nstk = word(BUCKET_NSTK);
    if nstk == 0 || nstk > MAX_BUCKET_FRAMES {
        return Err("implausible bucket stack depth");
    }
    let raw = read_mem(pid, b + BUCKET_STACK, 8 * nstk as usize)?;
    let pcs = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Ok(Bucket { size_bytes, pcs })
}

/// The inverse sampling probability `go tool pprof` applies to a bucket
/// whose objects are `avg_bytes` each, at `rate` bytes per sample (1 when
/// every allocation is recorded).
pub fn scale(avg_bytes: f64, rate: i64) -> f64 {
    if rate <= 1 || avg_bytes <= 0.0 {
        return 1.0;
    }
    1.0 / (1.0 - (-avg_bytes / rate as f64).exp())
}

/// Report note for a Go process whose runtime samples nothing.
pub fn rate_zero_note(pid: u32, target: &GoTarget) -> String {
    format!(
        "process {pid} ({}, {}): the Go runtime is not sampling heap allocations \
         (runtime.MemProfileRate = 0, set by the linker because the program never imports \
         runtime/pprof or net/http/pprof), so its Go heap cannot be shown; opt in by importing \
         _ \"runtime/pprof\" (or net/http/pprof), or setting runtime.MemProfileRate at start, \
         or rerun leaktrace with --go-enable-profiling 524288 to switch sampling on in the \
         running process (this changes the target; only later allocations are seen)",
        target.object, target.version
    )
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
}
