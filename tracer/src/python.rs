//! CPython: finding the interpreter in a traced process, and turning the
//! `(code object, instruction offset)` pairs the kernel records into
//! function, file and line.
//!
//! Detection (at attach): an executable object of the process (the main
//! binary, or a `libpython3.X.so`) that defines `_PyRuntime` (dynamic
//! symbol, else the `.PyRuntime` section). `Py_Version` (3.11+) names the
//! version; older builds are named by their file name. A version with a
//! [`Layout`] is registered for the kernel walk (`tracer_common::PyProc`);
//! any other keeps native frames and gets a report note saying so.
//!
//! Resolution (while the process lives, when a stack is first seen): the
//! code object is read with `process_vm_readv` (checked to be a code object
//! by its type pointer when `PyCode_Type` is exported), its qualified name,
//! file name and line table decoded (3.11 format, see
//! `docs`/`research/python.md` §3). Failures are reasons, never guesses.
//!
//! Offsets were verified with gdb on Debian's 3.11.2 debug info and on a
//! pyenv 3.11.7 build (identical), and against `PyCode_Type.tp_basicsize`.

use std::{collections::HashMap, fs, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use tracer_common::PyProc;

use crate::{
    procfs::MapEntry,
    unwind_table::{vaddr_of_file_offset, Segment},
};

/// Where a CPython version keeps what the walk and the resolver read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `(major, minor)`.
    pub version: (u8, u8),
    pub tstate_current: u32,
    pub tss_key: u32,
    pub tstate_thread_id: u32,
    pub tstate_cframe: u32,
    pub cframe_current_frame: u32,
    pub frame_code: u32,
    pub frame_previous: u32,
    pub frame_prev_instr: u32,
    pub frame_is_entry: u32,
    /// `co_code_adaptive`, also `PyCode_Type.tp_basicsize`.
    pub code_bytecode: u32,
    pub code_firstlineno: u64,
    pub code_filename: u64,
    pub code_name: u64,
    pub code_qualname: u64,
    pub code_linetable: u64,
    pub bytes_size: u64,
    pub bytes_data: u64,
    /// `PyASCIIObject`: length, state, compact-ASCII data, compact data.
    pub str_length: u64,
    pub str_state: u64,
    pub str_ascii_data: u64,
    pub str_compact_data: u64,
}

/// CPython 3.11 (x86-64).
pub const LAYOUT_3_11: Layout = Layout {
    version: (3, 11),
    tstate_current: 576,
    tss_key: 592 + 4,
    tstate_thread_id: 152,
    tstate_cframe: 56,
    cframe_current_frame: 8,
    frame_code: 32,
    frame_previous: 48,
    frame_prev_instr: 56,
    frame_is_entry: 68,
    code_bytecode: 184,
    code_firstlineno: 72,
    code_filename: 112,
    code_name: 120,
    code_qualname: 128,
    code_linetable: 136,
    bytes_size: 16,
    bytes_data: 32,
    str_length: 16,
    str_state: 32,
    str_ascii_data: 48,
    str_compact_data: 72,
};

/// Versions leaktrace can walk.
const LAYOUTS: &[&Layout] = &[&LAYOUT_3_11];

/// `tp_basicsize` in `PyTypeObject`.
const TP_BASICSIZE: u64 = 32;
/// `ob_type` in `PyObject`.
const OB_TYPE: u64 = 8;

/// A CPython found in a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyTarget {
    /// The object that holds the interpreter, as the process sees it.
    pub object: String,
    /// `Py_Version` (`0x030b02f0`), or `(major << 24) | (minor << 16)` when
    /// only the file name tells.
    pub hex_version: u32,
    pub runtime_addr: u64,
    /// Runtime address of `PyCode_Type`, when exported.
    pub code_type_addr: Option<u64>,
    /// `None`: no layout for this version (native frames only).
    pub layout: Option<&'static Layout>,
}

impl PyTarget {
    pub fn version_string(&self) -> String {
        let v = self.hex_version;
        let (major, minor, micro) = (v >> 24, (v >> 16) & 0xff, (v >> 8) & 0xff);
        if v & 0xffff == 0 {
            format!("{major}.{minor}")
        } else {
            format!("{major}.{minor}.{micro}")
        }
    }

    /// What the kernel walk needs, for a version with a layout.
    pub fn kernel_entry(&self) -> Option<PyProc> {
        let l = self.layout?;
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
            _pad: 0,
        })
    }

    /// For the report, when Python frames cannot be shown.
    pub fn missing_layout_note(&self, pid: u32) -> Option<String> {
        if self.layout.is_some() {
            return None;
        }
        Some(format!(
            "process {pid} runs Python {} ({}): Python frames need a layout for this version; \
             its stacks show native frames only",
            self.version_string(),
            self.object
        ))
    }
}

/// What an object file says about the interpreter it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyObjectInfo {
    pub hex_version: u32,
    pub runtime_vaddr: u64,
    pub code_type_vaddr: Option<u64>,
    /// `PyCode_Type.tp_basicsize` from the file's data, when readable.
    pub code_basicsize: Option<u64>,
    pub segments: Vec<Segment>,
}

/// Read an object file: `None` when it holds no CPython.
pub fn inspect_object(path: &Path, name: &str) -> Option<PyObjectInfo> {
    let data = fs::read(path).ok()?;
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
    let hex_version = match version_sym.and_then(u64_at) {
        Some(v) => v as u32,
        None => version_from_name(name)?,
    };
    let segments = crate::unwind_table::segments_of(&file);
    Some(PyObjectInfo {
        hex_version,
        runtime_vaddr: runtime,
        code_type_vaddr: code_type,
        code_basicsize: code_type.and_then(|a| u64_at(a + TP_BASICSIZE)),
        segments,
    })
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
    Some((major << 24) | (minor << 16))
}

/// The interpreter in a process, given the objects it maps and what each
/// holds (`inspect` is cached by the caller).
pub fn detect(
    maps: &[MapEntry],
    mut inspect: impl FnMut(&MapEntry) -> Option<PyObjectInfo>,
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
        let text: Vec<Segment> = info
            .segments
            .iter()
            .filter(|s| s.executable)
            .copied()
            .collect();
        let Some(vaddr) = vaddr_of_file_offset(&text, m.offset)
            .or_else(|| vaddr_of_file_offset(&info.segments, m.offset))
        else {
            continue;
        };
        let bias = m.start.wrapping_sub(vaddr);
        let minor = (info.hex_version >> 16) & 0xff;
        let major = info.hex_version >> 24;
        let layout = LAYOUTS
            .iter()
            .copied()
            .find(|l| (u32::from(l.version.0), u32::from(l.version.1)) == (major, minor))
            // A build whose code objects differ in size is not the layout
            // we know (a debug build, a patched interpreter).
            .filter(|l| {
                info.code_basicsize
                    .is_none_or(|b| b == u64::from(l.code_bytecode))
            });
        return Some(PyTarget {
            object: path.to_string(),
            hex_version: info.hex_version,
            runtime_addr: info.runtime_vaddr.wrapping_add(bias),
            code_type_addr: info.code_type_vaddr.map(|a| a.wrapping_add(bias)),
            layout,
        });
    }
    None
}

// ---- reading the target ------------------------------------------------

/// `len` bytes of process `pid` at `addr`.
pub fn read_mem(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, &'static str> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: both iovecs describe valid memory of the stated length (the
    // remote one is checked by the kernel).
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 || n as usize != len {
        return Err("process memory unreadable");
    }
    Ok(buf)
}

fn u64_in(b: &[u8], off: u64) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off as usize..off as usize + 8)?.try_into().ok()?,
    ))
}

/// Longest name or file name read.
const MAX_STR: u64 = 4096;
/// Longest line table read.
const MAX_LINETABLE: u64 = 1 << 20;

/// A `str` object's text (compact objects only, as code objects hold).
fn read_str(pid: u32, l: &Layout, addr: u64) -> Result<String, &'static str> {
    if addr == 0 {
        return Err("null string");
    }
    let head = read_mem(pid, addr, l.str_ascii_data as usize)?;
    let len = u64_in(&head, l.str_length).ok_or("short string header")?;
    let state = *head
        .get(l.str_state as usize)
        .ok_or("short string header")?;
    let kind = (state >> 2) & 7;
    let compact = state & 0x20 != 0;
    let ascii = state & 0x40 != 0;
    if !compact || len > MAX_STR {
        return Err("string not readable");
    }
    if ascii {
        let b = read_mem(pid, addr + l.str_ascii_data, len as usize)?;
        return String::from_utf8(b).map_err(|_| "string not ASCII");
    }
    let width = match kind {
        1 | 2 | 4 => u64::from(kind),
        _ => return Err("string kind unknown"),
    };
    let b = read_mem(pid, addr + l.str_compact_data, (len * width) as usize)?;
    b.chunks_exact(width as usize)
        .map(|c| {
            let mut v = [0u8; 4];
            v[..c.len()].copy_from_slice(c);
            char::from_u32(u32::from_le_bytes(v)).ok_or("string not Unicode")
        })
        .collect()
}

/// What a code object says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    pub qualname: String,
    pub filename: String,
    pub firstlineno: i32,
    pub linetable: Vec<u8>,
}

impl CodeInfo {
    /// Line of the instruction at byte offset `instr` (negative: the frame
    /// has not started, attributed to the definition line as CPython does).
    pub fn line(&self, instr: i32) -> Option<u32> {
        if instr < 0 {
            return u32::try_from(self.firstlineno).ok();
        }
        line_at(&self.linetable, self.firstlineno, (instr / 2) as u32)
    }
}

/// Read the code object at `addr` in process `pid`.
pub fn read_code(pid: u32, target: &PyTarget, addr: u64) -> Result<CodeInfo, &'static str> {
    let l = target.layout.ok_or("no layout for this Python version")?;
    let head = read_mem(pid, addr, l.code_bytecode as usize)?;
    if let Some(ty) = target.code_type_addr {
        // Freed and reused memory, or a torn read: not a code object now.
        if u64_in(&head, OB_TYPE) != Some(ty) {
            return Err("not a code object");
        }
    }
    let firstlineno = u64_in(&head, l.code_firstlineno).ok_or("short code object")? as u32 as i32;
    let qualname = u64_in(&head, l.code_qualname)
        .ok_or("short code object")
        .and_then(|p| read_str(pid, l, p))
        .or_else(|_| {
            u64_in(&head, l.code_name)
                .ok_or("short code object")
                .and_then(|p| read_str(pid, l, p))
        })?;
    let filename = u64_in(&head, l.code_filename)
        .ok_or("short code object")
        .and_then(|p| read_str(pid, l, p))?;
    let table = u64_in(&head, l.code_linetable).ok_or("short code object")?;
    let linetable = if table == 0 {
        Vec::new()
    } else {
        let h = read_mem(pid, table, l.bytes_data as usize)?;
        let n = u64_in(&h, l.bytes_size).ok_or("short bytes object")?;
        if n > MAX_LINETABLE {
            return Err("line table too long");
        }
        read_mem(pid, table + l.bytes_data, n as usize)?
    };
    Ok(CodeInfo {
        qualname,
        filename,
        firstlineno,
        linetable,
    })
}

/// The line of code unit `unit` (inline cache slots count) by a 3.11+
/// location table, or `None` for an instruction without a line.
pub fn line_at(table: &[u8], firstlineno: i32, unit: u32) -> Option<u32> {
    let mut it = table.iter().copied().peekable();
    let mut line = i64::from(firstlineno);
    let mut addr: u32 = 0;
    let varint = |it: &mut std::iter::Peekable<std::iter::Copied<std::slice::Iter<'_, u8>>>| {
        let mut b = it.next().unwrap_or(0);
        let mut v = u64::from(b & 63);
        let mut shift = 6;
        while b & 64 != 0 && shift < 64 {
            b = it.next().unwrap_or(0);
            v |= u64::from(b & 63) << shift;
            shift += 6;
        }
        v
    };
    while let Some(first) = it.next() {
        if first & 0x80 == 0 {
            return None;
        }
        let kind = (first >> 3) & 15;
        let units = u32::from(first & 7) + 1;
        let known = match kind {
            0..=9 => {
                it.next();
                true
            }
            10..=12 => {
                line += i64::from(kind) - 10;
                it.next();
                it.next();
                true
            }
            13 | 14 => {
                let v = varint(&mut it);
                let delta = if v & 1 != 0 {
                    -((v >> 1) as i64)
                } else {
                    (v >> 1) as i64
                };
                line += delta;
                if kind == 14 {
                    varint(&mut it);
                    varint(&mut it);
                    varint(&mut it);
                }
                true
            }
            // No location; the running line is kept for the next entry.
            _ => false,
        };
        if unit < addr + units {
            return known.then(|| u32::try_from(line).ok()).flatten();
        }
        addr += units;
    }
    None
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

    #[test]
    fn unknown_version_gets_a_note() {
        let t = PyTarget {
            object: "/usr/bin/python3.10".into(),
            hex_version: 0x030a_0000,
            runtime_addr: 0,
            code_type_addr: None,
            layout: None,
        };
        let note = t.missing_layout_note(7).expect("test data");
        assert!(note.contains("Python 3.10"), "{note}");
        assert!(t.kernel_entry().is_none());
        let t = PyTarget {
            layout: Some(&LAYOUT_3_11),
            hex_version: 0x030b_02f0,
            ..t
        };
        assert_eq!(t.version_string(), "3.11.2");
        assert!(t.missing_layout_note(7).is_none());
        assert_eq!(t.kernel_entry().expect("test data").tstate_current, 576);
    }
}
