//! The Go runtime's own figures, read from the live process beside the
//! Go stacks: the bytes in in-use heap spans (what
//! `runtime.ReadMemStats` reports as `HeapInuse`) and the goroutine count
//! (`runtime.NumGoroutine`).
//!
//! Where they live (Go 1.17-1.27 sources):
//! - heap in use: `runtime.gcController.heapInUse` (a `sysMemStat`, an
//!   atomic u64 at the member's offset);
//! - goroutines: `runtime.gcount()` =
//!   `allglen - free(sched) - sched.ngsys - Σ free(allp[i])`, where a free
//!   list's count is `gFree.n` up to 1.24 and `gFree.size` (per P) or
//!   `gFree.stack.size + gFree.noStack.size` (global) from 1.25.
//!
//! Member offsets change between versions, so they come from the binary's
//! own DWARF (`.debug_info`; the Go linker zlib-compresses it), and the
//! variables' addresses from `.symtab`. A stripped binary has neither:
//! its heap-in-use word is found from the code instead (the first 8-byte
//! RIP-relative load inside `runtime.heapRetained`, which returns
//! `gcController.heapInUse.load() + gcController.heapFree.load()` and
//! which `.gopclntab`'s inline tree locates even where it is inlined),
//! and its goroutines are counted one by one from `runtime.allgs` (found
//! from `runtime.forEachG`'s code; `runtime.g`'s offsets per version).
//!
//! The runtime is not stopped: each word is read as the runtime's own
//! readers read it (atomically, without a lock), so the count can be off
//! by goroutines starting or ending during the read, as `gcount` says of
//! itself.

use std::collections::HashMap;

use gimli::{AttributeValue, EndianSlice, LittleEndian};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::{
    runtime::go::code::{rip_relative, RipOp},
    runtime::go::pclntab::GoTable,
    sys::procfs::read_mem,
};

/// More Ps than any machine runs (`GOMAXPROCS` is capped at 1024 by the
/// runtime's own `_MaxGomaxprocs`): a larger `len(allp)` is a bad read.
const MAX_PROCS: u64 = 1024;

/// Where the figures are, as virtual addresses of the file (rebased by
/// [`StatsLayout::rebase`] for a process).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StatsLayout {
    /// `&runtime.gcController.heapInUse`.
    pub heap_inuse: Option<u64>,
    /// What `gcount` reads; `None` when any part was not found.
    pub goroutines: Option<GoroutineLayout>,
    /// Without DWARF: the goroutines counted one by one instead.
    pub goroutine_scan: Option<GoroutineScan>,
    /// Why a figure cannot be read, in words, for the report.
    pub missing: Vec<String>,
}

/// Goroutines counted from `runtime.allgs` as `NumGoroutine` counts
/// them: not dead (`atomicstatus` other than `_Gdead`, scan bit
/// ignored) and not a system goroutine (started at a `runtime.*`
/// function other than `runtime.main`, as `isSystemGoroutine` says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoroutineScan {
    /// `&runtime.allgs` (a slice header: pointer, length).
    pub allgs: u64,
    /// Offsets of `atomicstatus` (u32) and `startpc` in `runtime.g`.
    pub status: u64,
    pub startpc: u64,
    /// Link-time entries of the functions a system goroutine starts at,
    /// sorted.
    pub system_entries: Vec<u64>,
    /// Load bias of the executable in the process (0 in the file).
    pub bias: u64,
}

/// `(atomicstatus, startpc)` offsets in `runtime.g` per Go version, from
/// the DWARF of official builds (`runtime_figures_match_readmemstats`
/// checks each against DWARF); other versions are not counted.
pub fn g_offsets(version: (u32, u32)) -> Option<(u64, u64)> {
    match version {
        (1, 19) => Some((144, 312)),
        (1, 21) | (1, 22) | (1, 25) => Some((144, 296)),
        (1, 23) | (1, 24) => Some((152, 304)),
        (1, 26) | (1, 27) => Some((144, 304)),
        _ => None,
    }
}

/// `runtime._Gdead`.
const G_DEAD: u32 = 6;
/// `runtime._Gscan`, or'ed into a status while the GC scans the stack.
const G_SCAN: u32 = 0x1000;
/// More goroutines than any process runs: a larger `len(allgs)` is a bad
/// read.
const MAX_GOROUTINES: u64 = 1 << 24;

/// The words `runtime.gcount` adds up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoroutineLayout {
    /// `&runtime.allglen` (uintptr).
    pub allglen: u64,
    /// `&runtime.sched.ngsys` (int32 / uint32).
    pub ngsys: u64,
    /// Addresses of the global free lists' counts (int32 each).
    pub sched_free: Vec<u64>,
    /// `&runtime.allp` (a slice header: pointer, length).
    pub allp: u64,
    /// Offset of the per-P free list's count (int32) in `runtime.p`.
    pub p_free: u64,
}

impl StatsLayout {
    /// The same layout in a process whose executable is loaded `bias`
    /// bytes above its link addresses.
    pub fn rebase(&self, bias: u64) -> Self {
        let r = |a: u64| a.wrapping_add(bias);
        Self {
            heap_inuse: self.heap_inuse.map(r),
            goroutines: self.goroutines.as_ref().map(|g| GoroutineLayout {
                allglen: r(g.allglen),
                ngsys: r(g.ngsys),
                sched_free: g.sched_free.iter().map(|a| r(*a)).collect(),
                allp: r(g.allp),
                p_free: g.p_free,
            }),
            goroutine_scan: self.goroutine_scan.as_ref().map(|g| GoroutineScan {
                allgs: r(g.allgs),
                bias,
                ..g.clone()
            }),
            missing: self.missing.clone(),
        }
    }
}

/// One reading of the runtime's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct GoFigures {
    /// Bytes in in-use heap spans (`MemStats.HeapInuse`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_inuse_bytes: Option<u64>,
    /// `runtime.NumGoroutine()`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goroutines: Option<i64>,
}

/// Read the figures of process `pid` at the (rebased) `layout`. A figure
/// that cannot be read is `None`.
pub fn read(pid: u32, layout: &StatsLayout) -> GoFigures {
    GoFigures {
        heap_inuse_bytes: layout.heap_inuse.and_then(|a| word(pid, a, 8).ok()),
        goroutines: match (&layout.goroutines, &layout.goroutine_scan) {
            (Some(g), _) => goroutines(pid, g).ok(),
            (None, Some(g)) => scan_goroutines(pid, g).ok(),
            (None, None) => None,
        },
    }
}

/// Count the goroutines in `runtime.allgs` one by one (see
/// [`GoroutineScan`]): reads of each `g` batched, 512 per system call.
pub fn scan_goroutines(pid: u32, g: &GoroutineScan) -> Result<i64, &'static str> {
    let ptr = word(pid, g.allgs, 8)?;
    let len = word(pid, g.allgs + 8, 8)?;
    if len > MAX_GOROUTINES {
        return Err("implausible len(runtime.allgs)");
    }
    // One span per g covering both fields.
    let lo = g.status.min(g.startpc);
    let span = (g.status.max(g.startpc) + 8 - lo) as usize;
    let mut n = 0i64;
    for first in (0..len).step_by(512) {
        let count = (len - first).min(512);
        let ptrs = read_mem(pid, ptr + first * 8, count as usize * 8)?;
        let chunk: Vec<u64> = ptrs
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
            .collect();
        let bytes = read_spans(pid, &chunk, lo, span)?;
        for b in bytes.chunks_exact(span) {
            let at = |off: u64, w: usize| -> Option<u64> {
                let o = (off - lo) as usize;
                let mut v = [0u8; 8];
                v[..w].copy_from_slice(b.get(o..o + w)?);
                Some(u64::from_le_bytes(v))
            };
            let status = at(g.status, 4).ok_or("short g")? as u32 & !G_SCAN;
            if status > 9 {
                return Err("implausible goroutine status: wrong runtime.g layout");
            }
            let start = at(g.startpc, 8).ok_or("short g")?.wrapping_sub(g.bias);
            if status != G_DEAD && g.system_entries.binary_search(&start).is_err() {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// `span` bytes at `base + lo` of each address in `bases`, in one
/// `process_vm_readv`.
fn read_spans(pid: u32, bases: &[u64], lo: u64, span: usize) -> Result<Vec<u8>, &'static str> {
    let mut buf = vec![0u8; bases.len() * span];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote: Vec<libc::iovec> = bases
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.wrapping_add(lo) as *mut libc::c_void,
            iov_len: span,
        })
        .collect();
    // SAFETY: the local iovec covers `buf`, which outlives the call; the
    // remote ones are checked by the kernel.
    let got = unsafe {
        libc::process_vm_readv(
            pid as libc::pid_t,
            &local,
            1,
            remote.as_ptr(),
            remote.len() as libc::c_ulong,
            0,
        )
    };
    if got < 0 || got as usize != buf.len() {
        return Err("a goroutine is unreadable");
    }
    Ok(buf)
}

/// A little-endian word of `n` (4 or 8) bytes at `addr`.
fn word(pid: u32, addr: u64, n: usize) -> Result<u64, &'static str> {
    let b = read_mem(pid, addr, n)?;
    let mut w = [0u8; 8];
    w[..n].copy_from_slice(&b);
    Ok(u64::from_le_bytes(w))
}

/// `runtime.gcount()`, from process memory.
fn goroutines(pid: u32, g: &GoroutineLayout) -> Result<i64, &'static str> {
    let i32_at = |a: u64| word(pid, a, 4).map(|w| i64::from(w as u32 as i32));
    let mut n = word(pid, g.allglen, 8)? as i64 - i32_at(g.ngsys)?;
    for a in &g.sched_free {
        n -= i32_at(*a)?;
    }
    let ptr = word(pid, g.allp, 8)?;
    let len = word(pid, g.allp + 8, 8)?;
    if len > MAX_PROCS {
        return Err("implausible len(runtime.allp)");
    }
    if len > 0 {
        let ps = read_mem(pid, ptr, len as usize * 8)?;
        for p in ps.chunks_exact(8) {
            let p = u64::from_le_bytes(p.try_into().map_err(|_| "short read")?);
            if p != 0 {
                n -= i32_at(p + g.p_free)?;
            }
        }
    }
    // As gcount: at least the goroutine running it.
    Ok(n.max(1))
}

/// Find the figures in a Go executable: DWARF and `.symtab` when the
/// binary has them, else what the code of a stripped binary shows.
pub fn layout_of(
    file: &object::File<'_>,
    table: Option<&GoTable>,
    version: Option<(u32, u32)>,
) -> StatsLayout {
    let mut out = StatsLayout::default();
    let symbols: HashMap<&str, u64> = file
        .symbols()
        .filter(|s| !s.is_undefined() && s.address() != 0)
        .filter_map(|s| Some((s.name().ok()?, s.address())))
        .filter(|(n, _)| {
            matches!(
                *n,
                "runtime.gcController" | "runtime.sched" | "runtime.allglen" | "runtime.allp"
            )
        })
        .collect();
    // Without DWARF the figures are looked for in the code instead; its
    // absence is a reason only for a figure found neither way.
    let types = struct_types(file);
    let member = |ty: &str, path: &[&str]| types.as_ref().ok().and_then(|t| t.offset(ty, path));
    let dwarf = |what: &str| match &types {
        Ok(_) => what.to_string(),
        Err(why) => format!("{why}, and {what}"),
    };
    out.heap_inuse = symbols
        .get("runtime.gcController")
        .zip(member("runtime.gcControllerState", &["heapInUse"]))
        .map(|(base, off)| base + off);
    if out.heap_inuse.is_none() {
        out.heap_inuse = table.and_then(|t| heap_inuse_from_code(file, t));
    }
    if out.heap_inuse.is_none() {
        out.missing.push(format!(
            "heap in use: {}",
            dwarf("runtime.gcController.heapInUse not found in the code")
        ));
    }
    out.goroutines = goroutine_layout(&symbols, &member);
    if out.goroutines.is_none() {
        out.goroutine_scan = table.and_then(|t| goroutine_scan(file, t, version?));
    }
    if out.goroutines.is_none() && out.goroutine_scan.is_none() {
        let why = match version.and_then(g_offsets) {
            None => "runtime.g's layout is not known for this Go version",
            Some(_) => "runtime.allgs not found in the code",
        };
        out.missing.push(format!("goroutine count: {}", dwarf(why)));
    }
    out
}

/// For a binary without DWARF: `runtime.allgs` from `runtime.forEachG`
/// (its first 8-byte RIP-relative load, confirmed by the next one
/// reading the slice's length 8 bytes on), `runtime.g`'s offsets by
/// version, and the system goroutines' start functions from the table.
pub fn goroutine_scan(
    file: &object::File<'_>,
    table: &GoTable,
    version: (u32, u32),
) -> Option<GoroutineScan> {
    let (status, startpc) = g_offsets(version)?;
    let writable = writable_ranges(file);
    let f = table.find("runtime.forEachG")?;
    let code = table.code(&f)?;
    let in_data =
        |t: u64| t.is_multiple_of(8) && writable.iter().any(|(a, b)| (*a..*b).contains(&t));
    let allgs = rip_relative(code, f.entry, RipOp::Load64, |_, t| in_data(t))?;
    let len = rip_relative(code, f.entry, RipOp::Load64, |_, t| {
        t != allgs && in_data(t)
    })?;
    if len != allgs + 8 {
        return None;
    }
    let mut system_entries: Vec<u64> = table
        .functions()
        .filter(|f| f.name.starts_with("runtime.") && f.name != "runtime.main")
        .map(|f| f.entry)
        .collect();
    system_entries.sort_unstable();
    Some(GoroutineScan {
        allgs,
        status,
        startpc,
        system_entries,
        bias: 0,
    })
}

/// What `gcount` reads, from the symbols and the DWARF members.
fn goroutine_layout(
    symbols: &HashMap<&str, u64>,
    member: &dyn Fn(&str, &[&str]) -> Option<u64>,
) -> Option<GoroutineLayout> {
    let sched = *symbols.get("runtime.sched")?;
    let sched_free = match member("runtime.schedt", &["gFree", "n"]) {
        Some(off) => vec![sched + off],
        None => vec![
            sched + member("runtime.schedt", &["gFree", "stack", "size"])?,
            sched + member("runtime.schedt", &["gFree", "noStack", "size"])?,
        ],
    };
    Some(GoroutineLayout {
        allglen: *symbols.get("runtime.allglen")?,
        ngsys: sched + member("runtime.schedt", &["ngsys"])?,
        sched_free,
        allp: *symbols.get("runtime.allp")?,
        p_free: member("runtime.p", &["gFree", "n"])
            .or_else(|| member("runtime.p", &["gFree", "size"]))?,
    })
}

/// `&gcController.heapInUse` in a stripped binary: the first 8-byte
/// RIP-relative load of the code `.gopclntab` attributes to
/// `runtime.heapRetained` (inlined or not), whose body is
/// `gcController.heapInUse.load() + gcController.heapFree.load()`.
pub fn heap_inuse_from_code(file: &object::File<'_>, table: &GoTable) -> Option<u64> {
    let writable = writable_ranges(file);
    let in_retained = |pc: u64| {
        table
            .frames(pc)
            .iter()
            .any(|f| f.function == "runtime.heapRetained")
    };
    HEAP_RETAINED_HOLDERS
        .iter()
        .filter_map(|n| table.find(n))
        .find_map(|f| {
            rip_relative(table.code(&f)?, f.entry, RipOp::Load64, |pc, t| {
                t.is_multiple_of(8)
                    && writable.iter().any(|(a, b)| (*a..*b).contains(&t))
                    && in_retained(pc)
            })
        })
}

/// Address ranges of the writable sections (where Go variables live).
fn writable_ranges(file: &object::File<'_>) -> Vec<(u64, u64)> {
    file.sections()
        .filter(|s| {
            matches!(
                s.kind(),
                object::SectionKind::Data | object::SectionKind::UninitializedData
            )
        })
        .map(|s| (s.address(), s.address() + s.size()))
        .collect()
}

/// `runtime.heapRetained` and functions that inline it (1.19-1.27:
/// `gcPaceScavenger` in every version checked).
const HEAP_RETAINED_HOLDERS: &[&str] = &[
    "runtime.heapRetained",
    "runtime.gcPaceScavenger",
    "runtime.(*mheap).grow",
    "runtime.(*mheap).allocSpan",
    "runtime.(*scavengerState).init.func3",
    "runtime.(*scavengerState).init.func2",
    "runtime.bgscavenge",
];

/// Go's DWARF struct types by name, with their members.
struct StructTypes {
    /// Name -> members `(name, offset, type's .debug_info offset)`.
    by_name: HashMap<String, Members>,
    /// `.debug_info` offset -> members, for every struct type (nested
    /// anonymous structs are reached through their member's type).
    by_offset: HashMap<usize, Members>,
    /// `.debug_info` offset of a typedef -> its type's (Go 1.25 names
    /// `runtime.gList` through a typedef).
    typedefs: HashMap<usize, usize>,
}

/// A struct's members: name, offset, and the `.debug_info` offset of the
/// member's type.
type Members = Vec<(String, u64, Option<usize>)>;

impl StructTypes {
    fn insert(&mut self, name: Option<String>, off: usize, members: Members) {
        if let Some(n) = name {
            self.by_name.insert(n, members.clone());
        }
        self.by_offset.insert(off, members);
    }

    /// Offset of the member at `path` (member of a member ...) in `ty`.
    fn offset(&self, ty: &str, path: &[&str]) -> Option<u64> {
        let mut members = self.by_name.get(ty)?;
        let mut total = 0;
        for (i, name) in path.iter().enumerate() {
            let (_, off, ty) = members.iter().find(|(n, _, _)| n == name)?;
            total += off;
            if i + 1 < path.len() {
                let mut ty = (*ty)?;
                for _ in 0..8 {
                    match self.typedefs.get(&ty) {
                        Some(t) => ty = *t,
                        None => break,
                    }
                }
                members = self.by_offset.get(&ty)?;
            }
        }
        Some(total)
    }
}

/// The struct types whose members are looked up by name.
const WANTED: &[&str] = &[
    "runtime.gcControllerState",
    "runtime.schedt",
    "runtime.p",
    "runtime.gList",
];

/// The struct types of the binary's `.debug_info` that [`WANTED`] names,
/// and the unnamed ones (`struct { ... }`) their members use.
fn struct_types(file: &object::File<'_>) -> Result<StructTypes, String> {
    struct_types_of(file, WANTED)
}

/// As [`struct_types`], for the named structs `wanted`.
fn struct_types_of(file: &object::File<'_>, wanted: &[&str]) -> Result<StructTypes, String> {
    if file.section_by_name(".debug_info").is_none() {
        return Err("no DWARF (.debug_info): built with -ldflags=-w or stripped".into());
    }
    let load = |id: gimli::SectionId| -> Result<std::borrow::Cow<'_, [u8]>, String> {
        match crate::sys::elf::section_bytes(file, id.name()) {
            Ok(Some((_, b))) => Ok(b),
            Ok(None) => Ok(std::borrow::Cow::Borrowed(&[][..])),
            Err(e) => Err(format!("section {}: {e}", id.name())),
        }
    };
    let owned = gimli::DwarfSections::load(load)?;
    let dwarf = owned.borrow(|s| EndianSlice::new(s, LittleEndian));
    let mut types = StructTypes {
        by_name: HashMap::new(),
        by_offset: HashMap::new(),
        typedefs: HashMap::new(),
    };
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(|e| e.to_string())? {
        let unit = dwarf.unit(header).map_err(|e| e.to_string())?;
        let mut cursor = unit.entries();
        // The struct whose members are being collected: name, offset,
        // depth.
        let mut current: Option<(Option<String>, usize, isize)> = None;
        let mut members = Vec::new();
        while let Some(entry) = cursor.next_dfs().map_err(|e| e.to_string())? {
            let depth = entry.depth();
            if let Some((name, off, d)) = &current {
                if depth > *d {
                    if entry.tag() == gimli::DW_TAG_member && depth == d + 1 {
                        let member =
                            attr_string(&dwarf, &unit, entry.attr_value(gimli::DW_AT_name));
                        let at = entry
                            .attr_value(gimli::DW_AT_data_member_location)
                            .and_then(|v| v.udata_value())
                            .unwrap_or(0);
                        let ty = type_offset(&unit, entry.attr_value(gimli::DW_AT_type));
                        if let Some(member) = member {
                            members.push((member, at, ty));
                        }
                    }
                    continue;
                }
                types.insert(name.clone(), *off, std::mem::take(&mut members));
                current = None;
            }
            if entry.tag() == gimli::DW_TAG_typedef {
                if let (Some(from), Some(to)) = (
                    entry.offset().to_debug_info_offset(&unit.header),
                    type_offset(&unit, entry.attr_value(gimli::DW_AT_type)),
                ) {
                    types.typedefs.insert(from.0, to);
                }
                continue;
            }
            if entry.tag() != gimli::DW_TAG_structure_type {
                continue;
            }
            let name = attr_string(&dwarf, &unit, entry.attr_value(gimli::DW_AT_name));
            let wanted = name
                .as_deref()
                .is_none_or(|n| wanted.contains(&n) || n.starts_with("struct {"));
            if let (true, Some(off)) = (wanted, entry.offset().to_debug_info_offset(&unit.header)) {
                current = Some((name, off.0, depth));
            }
        }
        if let Some((name, off, _)) = current.take() {
            types.insert(name, off, std::mem::take(&mut members));
        }
    }
    if types.by_name.is_empty() {
        return Err("the DWARF names none of the runtime's structs".into());
    }
    Ok(types)
}

/// Offset of the member at `path` in the DWARF struct type `ty` (for
/// tests that check the per-version tables against DWARF).
#[cfg(test)]
pub(crate) fn dwarf_offset(file: &object::File<'_>, ty: &str, path: &[&str]) -> Option<u64> {
    struct_types_of(file, &[ty]).ok()?.offset(ty, path)
}

/// The `.debug_info` offset a `DW_AT_type` refers to.
fn type_offset<R: gimli::Reader<Offset = usize>>(
    unit: &gimli::Unit<R>,
    v: Option<AttributeValue<R>>,
) -> Option<usize> {
    match v? {
        AttributeValue::UnitRef(r) => r.to_debug_info_offset(&unit.header).map(|o| o.0),
        AttributeValue::DebugInfoRef(r) => Some(r.0),
        _ => None,
    }
}

fn attr_string<R: gimli::Reader<Offset = usize>>(
    dwarf: &gimli::Dwarf<R>,
    unit: &gimli::Unit<R>,
    v: Option<AttributeValue<R>>,
) -> Option<String> {
    let v = v?;
    let s = dwarf.attr_string(unit, v).ok()?;
    s.to_string_lossy().ok().map(|c| c.into_owned())
}
