//! CPython: finding the interpreter in a traced process, and turning the
//! `(code object, instruction offset)` pairs the kernel records into
//! function, file and line.
//!
//! Detection (at attach): an executable object of the process (the main
//! binary, or a `libpython3.X.so`) that defines `_PyRuntime` (dynamic
//! symbol, else the `.PyRuntime` section). The version is `Py_Version`
//! (3.11+), else the object's file name or `DT_SONAME` (`libpython3.9.so`,
//! `python3.10`), else the `sys.version` text in the object's data in the
//! live process. 3.8-3.13 have a [`Layout`] (3.13 also read from
//! `_Py_DebugOffsets` when the build carries them), checked against
//! `PyCode_Type.tp_basicsize`, and are registered for the kernel walk
//! (`tracer_common::PyProc`); any other version, or a build that does not
//! match, keeps native frames and gets a report note saying why.
//!
//! Resolution (while the process lives, when a stack is first seen): the
//! code object is read with `process_vm_readv` (checked to be a code object
//! by its type pointer when `PyCode_Type` is exported), its qualified name
//! (`co_name` before 3.11), file name and line table decoded in the
//! version's format ([`LineFormat`]; `docs`/`research/python.md` §3).
//! Failures are reasons, never guesses.
//!
//! Offsets were verified with gdb on the DWARF of pyenv's 3.8.18, 3.9.18,
//! 3.10.13, 3.11.7, 3.12.1 and 3.13.0 and Debian's 3.11.2, and against
//! `PyCode_Type.tp_basicsize`; 3.13.0's `_Py_DebugOffsets` agree.

use std::{collections::HashMap, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use tracer_common::{py_flags, PyProc};

use crate::{
    sys::elf::{exec_vaddr_of_file_offset, Segment},
    sys::procfs::{read_mem, MapEntry},
};

mod code;
mod layouts;
mod seam;

pub use code::*;
pub use layouts::*;
pub use seam::*;

/// A CPython found in a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyTarget {
    /// The object that holds the interpreter, as the process sees it.
    pub object: String,
    /// `Py_Version` (`0x030b02f0`), or `(major << 24) | (minor << 16)` when
    /// only the file name tells, or 0 when nothing does.
    pub hex_version: u32,
    pub runtime_addr: u64,
    /// Runtime address of `PyCode_Type`, when exported.
    pub code_type_addr: Option<u64>,
    /// `Err`: why Python frames cannot be shown (native frames only).
    pub layout: Result<Layout, &'static str>,
}

impl PyTarget {
    pub fn version_string(&self) -> String {
        let v = self.hex_version;
        let (major, minor, micro) = (v >> 24, (v >> 16) & 0xff, (v >> 8) & 0xff);
        if v == 0 {
            "of unknown version".to_string()
        } else if v & 0xffff == 0 {
            format!("{major}.{minor}")
        } else {
            format!("{major}.{minor}.{micro}")
        }
    }

    /// What the kernel walk needs, for a version with a layout.
    pub fn kernel_entry(&self) -> Option<PyProc> {
        let l = self.layout.ok()?;
        Some(PyProc {
            runtime_addr: self.runtime_addr,
            version: self.hex_version,
            tstate_current: l.tstate_current,
            tss_key: l.tss_key,
            tstate_thread_id: l.tstate_thread_id,
            tstate_cframe: l.tstate_cframe,
            cframe_current_frame: l.cframe_current_frame,
            frame_code: l.frame_code,
            frame_previous: l.frame_previous,
            frame_prev_instr: l.frame_prev_instr,
            frame_is_entry: l.frame_is_entry,
            code_bytecode: l.code_bytecode,
            flags: l.flags,
        })
    }

    /// For the report, when Python frames cannot be shown.
    pub fn missing_layout_note(&self, pid: u32) -> Option<String> {
        let why = self.layout.err()?;
        Some(format!(
            "process {pid} runs Python {} ({}): {why}; its stacks show native frames only",
            self.version_string(),
            self.object
        ))
    }
}

/// What an object file says about the interpreter it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyObjectInfo {
    /// `Py_Version`, else the version in the file or library name; `None`
    /// when neither tells.
    pub hex_version: Option<u32>,
    pub runtime_vaddr: u64,
    pub code_type_vaddr: Option<u64>,
    /// `PyCode_Type.tp_basicsize` from the file's data, when readable.
    pub code_basicsize: Option<u64>,
    /// `_Py_DebugOffsets` at the start of `_PyRuntime` (3.13).
    pub debug_offsets: Option<DebugOffsets>,
    pub segments: Vec<Segment>,
}

/// Read an object file: `None` when it holds no CPython.
pub fn inspect_object(path: &Path, name: &str) -> Option<PyObjectInfo> {
    let data = crate::sys::bytes::file_bytes(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let mut runtime = None;
    let mut version_sym = None;
    let mut code_type = None;
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        match sym.name() {
            Ok("_PyRuntime") => runtime = runtime.or(Some(sym.address())),
            Ok("Py_Version") => version_sym = version_sym.or(Some(sym.address())),
            Ok("PyCode_Type") => code_type = code_type.or(Some(sym.address())),
            _ => {}
        }
    }
    let runtime = runtime.or_else(|| file.section_by_name(".PyRuntime").map(|s| s.address()))?;
    let read_at = |vaddr: u64, len: u64| -> Option<&[u8]> {
        file.sections().find_map(|s| {
            let rel = vaddr.checked_sub(s.address())?;
            if rel + len > s.size() {
                return None;
            }
            s.data().ok()?.get(rel as usize..(rel + len) as usize)
        })
    };
    let u64_at = |vaddr: u64| -> Option<u64> {
        Some(u64::from_le_bytes(read_at(vaddr, 8)?.try_into().ok()?))
    };
    let hex_version = version_sym
        .and_then(u64_at)
        .map(|v| v as u32)
        .or_else(|| version_from_name(name))
        .or_else(|| soname(&file).and_then(|n| version_from_name(&n)));
    let debug_offsets =
        read_at(runtime, DEBUG_OFFSETS_SIZE_3_13 as u64).and_then(DebugOffsets::parse);
    let segments = crate::sys::elf::segments_of(&file);
    Some(PyObjectInfo {
        hex_version,
        runtime_vaddr: runtime,
        code_type_vaddr: code_type,
        code_basicsize: code_type.and_then(|a| u64_at(a + TP_BASICSIZE)),
        debug_offsets,
        segments,
    })
}

/// `DT_SONAME` of an ELF shared object.
fn soname(file: &object::File<'_>) -> Option<String> {
    let dynstr = file.section_by_name(".dynstr")?.data().ok()?;
    let dynamic = file.section_by_name(".dynamic")?.data().ok()?;
    // Elf64_Dyn: d_tag, d_val; DT_SONAME = 14.
    let off = dynamic
        .chunks_exact(16)
        .map(|e| (u64_in(e, 0), u64_in(e, 8)))
        .find_map(|(tag, val)| (tag == Some(14)).then_some(val).flatten())?;
    let rest = dynstr.get(off as usize..)?;
    let end = rest.iter().position(|b| *b == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// `python3.10`, `libpython3.9.so.1.0` -> `0x030a0000`, ...
fn version_from_name(name: &str) -> Option<u32> {
    let base = name.rsplit('/').next()?;
    let rest = base
        .strip_prefix("libpython")
        .or_else(|| base.strip_prefix("python"))?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    let major: u32 = it.next()?.parse().ok()?;
    let minor: u32 = it.next()?.parse().ok()?;
    (major < 256 && minor < 256).then_some((major << 24) | (minor << 16))
}

/// The version in `sys.version` text (`3.9.18 (main, May  9 2026, ...`) in
/// `mem`, as `PY_VERSION_HEX`. The interpreter formats it at startup into a
/// static buffer of libpython (`Py_GetVersion`); this is how a build
/// without `Py_Version` and without a telling name is named (as py-spy does).
pub fn version_in(mem: &[u8]) -> Option<u32> {
    let digits = |b: &[u8]| -> Option<(u32, usize)> {
        let n = b.iter().take(3).take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 2 {
            return None;
        }
        Some((std::str::from_utf8(&b[..n]).ok()?.parse().ok()?, n))
    };
    let mut from = 0;
    while let Some(pos) = mem.get(from..)?.windows(2).position(|w| w == b"3.") {
        let at = from + pos;
        from = at + 1;
        if at > 0 && (mem[at - 1].is_ascii_digit() || mem[at - 1] == b'.') {
            continue;
        }
        let rest = &mem[at + 2..];
        let Some((minor, n)) = digits(rest) else {
            continue;
        };
        let rest = &rest[n..];
        let Some(rest) = rest.strip_prefix(b".") else {
            continue;
        };
        let Some((micro, n)) = digits(rest) else {
            continue;
        };
        let mut rest = &rest[n..];
        let mut level = 0xf0;
        let mut serial = 0;
        for (tag, l) in [(&b"rc"[..], 0xc0), (b"a", 0xa0), (b"b", 0xb0)] {
            if let Some(r) = rest.strip_prefix(tag) {
                let Some((s, n)) = digits(r) else { break };
                (level, serial, rest) = (l, s, &r[n..]);
                break;
            }
        }
        let rest = rest.strip_prefix(b"+").unwrap_or(rest);
        if rest.starts_with(b" (") && serial < 16 {
            return Some((3 << 24) | (minor << 16) | (micro << 8) | level | serial);
        }
    }
    None
}

/// Largest span of an object's data scanned for its version.
const MAX_VERSION_SCAN: u64 = 16 << 20;

/// The version of the CPython in `object` of process `pid`, from the
/// `sys.version` text in that object's data and bss mappings.
pub fn version_from_memory(pid: u32, maps: &[MapEntry], object: &str) -> Option<u32> {
    let mut budget = MAX_VERSION_SCAN;
    let mut after_object = false;
    for m in maps {
        let ours = m.path.as_deref() == Some(object);
        let bss = after_object && m.path.is_none() && m.pseudo.is_none();
        after_object = ours || (after_object && bss);
        if !(ours || bss) || !m.readable || m.executable {
            continue;
        }
        let len = (m.end - m.start).min(budget);
        budget -= len;
        if let Some(v) = read_mem(pid, m.start, len as usize)
            .ok()
            .and_then(|b| version_in(&b))
        {
            return Some(v);
        }
        if budget == 0 {
            break;
        }
    }
    None
}

/// The layout for a build, or why there is none.
fn layout_for(info: &PyObjectInfo, hex_version: u32) -> Result<Layout, &'static str> {
    if hex_version == 0 {
        return Err("its version could not be read, so its frames cannot be walked");
    }
    let (major, minor) = (hex_version >> 24, (hex_version >> 16) & 0xff);
    let base = **LAYOUTS
        .iter()
        .find(|l| (u32::from(l.version.0), u32::from(l.version.1)) == (major, minor))
        .ok_or("Python frames need a layout for this version")?;
    let layout = match info.debug_offsets {
        Some(d) if d.version >> 16 == hex_version >> 16 => d.apply(base)?,
        _ => base,
    };
    // A build whose code objects differ in size is not the layout we know
    // (a debug build, a patched interpreter).
    if info
        .code_basicsize
        .is_some_and(|b| b != layout.code_basicsize)
    {
        return Err("its code objects differ from the release build's layout");
    }
    Ok(layout)
}

/// The interpreter in a process, given the objects it maps and what each
/// holds (`inspect` is cached by the caller), and a way to read the
/// version from the running process when the object does not tell
/// (`scan`, given the object's path).
pub fn detect(
    maps: &[MapEntry],
    mut inspect: impl FnMut(&MapEntry) -> Option<PyObjectInfo>,
    mut scan: impl FnMut(&str) -> Option<u32>,
) -> Option<PyTarget> {
    let mut seen: Vec<(&str, u64)> = Vec::new();
    for m in maps.iter().filter(|m| m.executable) {
        let Some(path) = m.path.as_deref() else {
            continue;
        };
        if seen.contains(&(m.dev.as_str(), m.inode)) {
            continue;
        }
        seen.push((m.dev.as_str(), m.inode));
        let Some(info) = inspect(m) else { continue };
        let Some(vaddr) = exec_vaddr_of_file_offset(&info.segments, m.offset) else {
            continue;
        };
        let bias = m.start.wrapping_sub(vaddr);
        let hex_version = info.hex_version.or_else(|| scan(path)).unwrap_or(0);
        return Some(PyTarget {
            object: path.to_string(),
            hex_version,
            runtime_addr: info.runtime_vaddr.wrapping_add(bias),
            code_type_addr: info.code_type_vaddr.map(|a| a.wrapping_add(bias)),
            layout: layout_for(&info, hex_version),
        });
    }
    None
}

// ---- reading the target ------------------------------------------------

fn u64_in(b: &[u8], off: u64) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off as usize..off as usize + 8)?.try_into().ok()?,
    ))
}

/// Cache of resolved code objects per process. Code objects are immutable,
/// but a freed one's address can be reused: entries are checked by type
/// when read and forgotten with the process.
#[derive(Debug, Default)]
pub struct CodeCache {
    targets: HashMap<u32, PyTarget>,
    code: HashMap<(u32, u64), Result<std::sync::Arc<CodeInfo>, &'static str>>,
}

impl CodeCache {
    pub fn set_target(&mut self, tgid: u32, target: PyTarget) {
        self.targets.insert(tgid, target);
    }

    pub fn forget(&mut self, tgid: u32) {
        self.targets.remove(&tgid);
        self.code.retain(|(t, _), _| *t != tgid);
    }

    pub fn code(&mut self, tgid: u32, addr: u64) -> Result<std::sync::Arc<CodeInfo>, &'static str> {
        if let Some(r) = self.code.get(&(tgid, addr)) {
            return r.clone();
        }
        let r = match self.targets.get(&tgid) {
            Some(t) => read_code(tgid, t, addr).map(std::sync::Arc::new),
            None => Err("interpreter not registered"),
        };
        // Failures are not cached: a paged-out object may read next time.
        if r.is_ok() {
            self.code.insert((tgid, addr), r.clone());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// `sample.__code__` of a small function under Debian's python3.11, with
    /// what `co_lines()` said for every code unit.
    const TABLE: &str = "8000d80c0d8045dd0d12903189588c58f000080513f0000805138801d80b0c8871893590418a3a883ad80c119051894a88458845f008000d12d81011d81011f103011112f103020d1388458845f006000c11804c";
    const LINES: &str = "0:1,1:2,2:2,3:3,4:3,5:3,6:3,7:3,8:3,9:3,10:3,11:3,12:3,13:3,14:3,15:3,16:3,17:3,18:3,19:3,20:4,21:4,22:4,23:4,24:4,25:4,26:4,27:4,28:4,29:5,30:5,31:5,32:5,33:5,34:5,35:9,36:10,37:11,38:10,39:10,40:9,41:9,42:9,43:9,44:12,45:12";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test data"))
            .collect()
    }

    #[test]
    fn line_table_matches_co_lines() {
        let table = unhex(TABLE);
        for pair in LINES.split(',') {
            let (u, l) = pair.split_once(':').expect("test data");
            let (u, l): (u32, u32) = (u.parse().expect("test data"), l.parse().expect("test data"));
            assert_eq!(line_at(&table, 1, u), Some(l), "unit {u}");
        }
        assert_eq!(line_at(&table, 1, 46), None);
    }

    #[test]
    fn no_location_keeps_running_line() {
        // kind 13 (+2 lines, 1 unit), kind 15 (1 unit), kind 10 (same line).
        let table = [
            0x80 | (13 << 3),
            4,
            0x80 | (15 << 3),
            0x80 | (10 << 3),
            0,
            0,
        ];
        assert_eq!(line_at(&table, 10, 0), Some(12));
        assert_eq!(line_at(&table, 10, 1), None);
        assert_eq!(line_at(&table, 10, 2), Some(12));
    }

    #[test]
    fn versions_from_names() {
        assert_eq!(version_from_name("/usr/bin/python3.10"), Some(0x030a_0000));
        assert_eq!(
            version_from_name("/x/libpython3.9.so.1.0"),
            Some(0x0309_0000)
        );
        assert_eq!(version_from_name("/usr/bin/bash"), None);
    }

    /// A `sample` function (a loop, an if/else, a try with a two-line
    /// comprehension; `def` on line 2) compiled by pyenv's 3.8.18, 3.9.18
    /// and 3.10.13: its table, and `PyCode_Addr2Line` at every even byte
    /// offset, called through ctypes in the same interpreter.
    const OLD_TABLES: [(LineFormat, &str, &str); 3] = [
        (
            LineFormat::Lnotab,
            "000104010c0108010a020a010201060106ff0a020e010601",
            "0:3,2:3,4:4,6:4,8:4,10:4,12:4,14:4,16:5,18:5,20:5,22:5,24:6,26:6,28:6,30:6,32:6,34:8,36:8,38:8,40:8,42:8,44:9,46:10,48:10,50:10,52:11,54:11,56:11,58:10,60:10,62:10,64:10,66:10,68:12,70:12,72:12,74:12,76:12,78:12,80:12,82:13,84:13,86:13,88:14,90:14",
        ),
        (
            LineFormat::Lnotab,
            "000104010c0108010a020a010201060106ff0a020c010601",
            "0:3,2:3,4:4,6:4,8:4,10:4,12:4,14:4,16:5,18:5,20:5,22:5,24:6,26:6,28:6,30:6,32:6,34:8,36:8,38:8,40:8,42:8,44:9,46:10,48:10,50:10,52:11,54:11,56:11,58:10,60:10,62:10,64:10,66:10,68:12,70:12,72:12,74:12,76:12,78:12,80:13,82:13,84:13,86:14,88:14",
        ),
        (
            LineFormat::Pairs,
            "04010c0108010a010a0202010601060108ff04040cfe0201040102fe",
            "0:3,2:3,4:4,6:4,8:4,10:4,12:4,14:4,16:5,18:5,20:5,22:5,24:6,26:6,28:6,30:6,32:6,34:8,36:8,38:8,40:8,42:8,44:9,46:10,48:10,50:10,52:11,54:11,56:11,58:10,60:10,62:10,64:10,66:14,68:14,70:12,72:12,74:12,76:12,78:12,80:12,82:13,84:14,86:14,88:12",
        ),
    ];

    #[test]
    fn old_line_tables_match_the_interpreter() {
        for (format, table, lines) in OLD_TABLES {
            let code = CodeInfo {
                qualname: "sample".into(),
                filename: "gen.py".into(),
                firstlineno: 2,
                linetable: unhex(table),
                line_format: format,
            };
            for pair in lines.split(',') {
                let (off, l) = pair.split_once(':').expect("test data");
                let (off, l): (i32, u32) = (
                    off.parse().expect("test data"),
                    l.parse().expect("test data"),
                );
                // What the kernel records: f_lasti in bytes (3.8, 3.9) or
                // in code units (3.10).
                let instr = if format == LineFormat::Pairs {
                    off / 2
                } else {
                    off
                };
                assert_eq!(code.line(instr), Some(l), "{format:?} offset {off}");
            }
            assert_eq!(code.line(-1), Some(2), "{format:?}: not started");
        }
    }

    #[test]
    fn pairs_without_a_line_keep_the_running_line() {
        // 4 bytes at +1, 2 bytes without a line, 2 bytes at +1 more.
        let table = [4, 1, 2, 0x80, 2, 1];
        assert_eq!(pairs_line(&table, 10, 0), Some(11));
        assert_eq!(pairs_line(&table, 10, 4), None);
        assert_eq!(pairs_line(&table, 10, 6), Some(12));
        assert_eq!(pairs_line(&table, 10, 8), None);
    }

    /// 3.13.0's `_Py_DebugOffsets` (gdb on pyenv's build): the table must
    /// say the same.
    #[test]
    fn debug_offsets_of_3_13_0_agree_with_the_table() {
        let mut b = vec![0u8; DEBUG_OFFSETS_SIZE_3_13];
        b[..8].copy_from_slice(DEBUG_COOKIE);
        fn put(b: &mut [u8], off: usize, v: u64) {
            b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        put(&mut b, 8, 0x030d_00f0);
        for (off, v) in [
            (40, 632),
            (72, 7344),
            (184, 72),
            (192, 152),
            (232, 8),
            (240, 0),
            (248, 56),
            (264, 70),
            (280, 112),
            (288, 120),
            (296, 128),
            (304, 136),
            (312, 68),
            (344, 200),
            (520, 16),
            (528, 32),
            (544, 32),
            (552, 16),
            (560, 40),
        ] {
            put(&mut b, off, v);
        }
        let d = DebugOffsets::parse(&b).expect("3.13 debug offsets");
        assert_eq!(d.apply(LAYOUT_3_13), Ok(LAYOUT_3_13));
        put(&mut b, 16, 1);
        let d = DebugOffsets::parse(&b).expect("3.13 debug offsets");
        assert!(d.apply(LAYOUT_3_13).is_err(), "free-threaded");
        // Another version's struct is not read as 3.13's.
        put(&mut b, 8, 0x030e_00f0);
        assert_eq!(DebugOffsets::parse(&b), None);
        b[0] = b'y';
        assert_eq!(DebugOffsets::parse(&b), None);
    }

    #[test]
    fn version_text_in_memory() {
        let mem = b"\0\0x3.1\x003.9.18 (main, May  9 2026, 07:33:49) \n[GCC 12.2.0]\0";
        assert_eq!(version_in(mem), Some(0x0309_12f0));
        assert_eq!(version_in(b"13.8.1 (x"), None);
        assert_eq!(version_in(b"3.13.0rc2+ (main"), Some(0x030d_00c2));
        assert_eq!(version_in(b"3.10.13"), None);
    }

    fn info(hex_version: Option<u32>, code_basicsize: Option<u64>) -> PyObjectInfo {
        PyObjectInfo {
            hex_version,
            runtime_vaddr: 0,
            code_type_vaddr: None,
            code_basicsize,
            debug_offsets: None,
            segments: Vec::new(),
        }
    }

    #[test]
    fn each_supported_version_has_its_layout() {
        for (v, basic, expect) in [
            (0x0308_0000, 176, &LAYOUT_3_8),
            (0x0309_0000, 176, &LAYOUT_3_9),
            (0x030a_0000, 176, &LAYOUT_3_10),
            (0x030b_07f0, 184, &LAYOUT_3_11),
            (0x030c_01f0, 192, &LAYOUT_3_12),
            (0x030d_00f0, 200, &LAYOUT_3_13),
        ] {
            assert_eq!(layout_for(&info(Some(v), Some(basic)), v), Ok(*expect));
            assert!(layout_for(&info(Some(v), Some(basic + 8)), v).is_err());
        }
        assert!(layout_for(&info(None, None), 0x0307_0000).is_err());
        assert!(layout_for(&info(None, None), 0x030e_00f0).is_err());
        assert!(layout_for(&info(None, None), 0).is_err());
    }

    /// The pyenv builds on this machine image (skipped when absent): each
    /// is recognized from its file alone, 3.13 with its `_Py_DebugOffsets`.
    #[test]
    fn pyenv_builds_are_recognized() {
        for (version, layout) in [
            ("3.8.18", &LAYOUT_3_8),
            ("3.9.18", &LAYOUT_3_9),
            ("3.10.13", &LAYOUT_3_10),
            ("3.11.7", &LAYOUT_3_11),
            ("3.12.1", &LAYOUT_3_12),
            ("3.13.0", &LAYOUT_3_13),
        ] {
            let minor = version.rsplit_once('.').expect("test data").0;
            let lib = format!("/root/.pyenv/versions/{version}/lib/libpython{minor}.so.1.0");
            if fs::metadata(&lib).is_err() {
                eprintln!("skipping pyenv {version}: {lib} not readable");
                continue;
            }
            let info = inspect_object(Path::new(&lib), &lib).expect("a CPython");
            let v = info.hex_version.expect("a version");
            assert_eq!(layout_for(&info, v), Ok(*layout), "{version}");
            assert_eq!(
                info.debug_offsets.is_some(),
                layout.version >= (3, 13),
                "{version}"
            );
        }
    }

    #[test]
    fn unknown_version_gets_a_note() {
        let t = PyTarget {
            object: "/usr/bin/python3.7".into(),
            hex_version: 0x0307_0000,
            runtime_addr: 0,
            code_type_addr: None,
            layout: layout_for(&info(Some(0x0307_0000), None), 0x0307_0000),
        };
        let note = t.missing_layout_note(7).expect("test data");
        assert!(note.contains("Python 3.7"), "{note}");
        assert!(t.kernel_entry().is_none());
        let t = PyTarget {
            layout: Ok(LAYOUT_3_11),
            hex_version: 0x030b_02f0,
            ..t
        };
        assert_eq!(t.version_string(), "3.11.2");
        assert!(t.missing_layout_note(7).is_none());
        assert_eq!(t.kernel_entry().expect("test data").tstate_current, 576);
        let t = PyTarget {
            layout: Ok(LAYOUT_3_8),
            hex_version: 0x0308_0000,
            ..t
        };
        let k = t.kernel_entry().expect("test data");
        assert_eq!(
            k.flags,
            py_flags::FRAME_IN_TSTATE | py_flags::INSTR_LASTI | py_flags::ENTRY_EVERY_FRAME
        );
        assert_eq!((k.tstate_cframe, k.frame_prev_instr), (24, 104));
    }
}
