//! The Lua frames the kernel recorded, read while the process lives: a
//! `GCproto` and a bytecode position become `function`, `chunk` and line.
//!
//! The line is the prototype's own line table (`lj_debug_line`). The
//! function's name is what its source says at its first line
//! (`local function name(`, `function mod.name(`, `name = function(`),
//! read through the process's root, since a prototype does not keep its
//! name (LuaJIT recovers it from the caller's bytecode); a chunk's main
//! function is named after the chunk (`content_by_lua(nginx.conf:16)`),
//! and a function whose source cannot be read is `function <file:line>`,
//! as Lua's own tracebacks write it.

use std::collections::HashMap;

use tracer_common::lua_pos;

use super::vm::gc64;
use crate::{runtime::RuntimeFrame, runtime::RuntimeFrame::Code, sys::procfs};

/// What a prototype says of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proto {
    pub function: String,
    /// The chunk: a file path, or the name a host gave a string chunk.
    pub file: String,
    pub firstline: u32,
    numline: u32,
    sizebc: u32,
    lineinfo: u64,
}

fn read(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    procfs::read_mem(pid, addr, len).ok()
}

fn u32_at(b: &[u8], at: u64) -> Option<u32> {
    let at = at as usize;
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: u64) -> Option<u64> {
    let at = at as usize;
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Read the prototype at `addr`; `None` when it is not one.
pub fn read_proto(pid: u32, addr: u64, sources: &mut Sources) -> Option<Proto> {
    let b = read(pid, addr, gc64::PROTO_SIZE as usize)?;
    if b.get(gc64::GCT as usize) != Some(&gc64::GCT_PROTO) {
        return None;
    }
    let chunk = u64_at(&b, gc64::PROTO_CHUNKNAME)? & ((1 << 47) - 1);
    let head = read(pid, chunk, gc64::STR_DATA as usize)?;
    let len = u32_at(&head, gc64::STR_LEN)?.min(4096) as usize;
    let name = read(pid, chunk + gc64::STR_DATA, len)?;
    let name = String::from_utf8_lossy(&name).into_owned();
    let firstline = u32_at(&b, gc64::PROTO_FIRSTLINE)?;
    let (file, path) = match name.as_bytes().first() {
        Some(b'@') => (name[1..].to_string(), Some(name[1..].to_string())),
        Some(b'=') => (name[1..].to_string(), None),
        _ => ("[string]".to_string(), None),
    };
    let function = if firstline == 0 {
        // The chunk's main function.
        file.clone()
    } else {
        path.and_then(|p| sources.function_at(pid, &p, firstline))
            .unwrap_or_else(|| format!("function <{}:{firstline}>", short(&file)))
    };
    Some(Proto {
        function,
        file,
        firstline,
        numline: u32_at(&b, gc64::PROTO_NUMLINE)?,
        sizebc: u32_at(&b, gc64::PROTO_SIZEBC)?,
        lineinfo: u64_at(&b, gc64::PROTO_LINEINFO)?,
    })
}

fn short(file: &str) -> &str {
    file.rsplit('/').next().unwrap_or(file)
}

/// The line of bytecode position `pos` (see `lua_pos`): the instruction
/// running is the one before it, and the line table starts at the
/// instruction after the function's header (`lj_debug_line` of `pos - 1`).
pub fn line_of(pid: u32, p: &Proto, pos: i32) -> Option<u32> {
    if pos <= 0 {
        return None;
    }
    let running = pos as u32 - 1;
    if running >= p.sizebc || p.lineinfo == 0 {
        return None;
    }
    if running == 0 {
        return Some(p.firstline);
    }
    let i = (running - 1) as u64;
    let delta = if p.numline < 256 {
        *read(pid, p.lineinfo + i, 1)?.first()? as u32
    } else if p.numline < 65536 {
        let b = read(pid, p.lineinfo + 2 * i, 2)?;
        u16::from_le_bytes([b[0], b[1]]) as u32
    } else {
        u32_at(&read(pid, p.lineinfo + 4 * i, 4)?, 0)?
    };
    Some(p.firstline + delta)
}

/// The bytecode a trace was at when it called out from `ret` (a return
/// address into its machine code): the PC of the trace's snapshot in
/// force there (LuaJIT restores exactly that state if the trace exits),
/// found through any of the process's VMs `gs` (of a build whose trace
/// array is `g_traces` past each).
pub fn trace_pc(pid: u32, gs: &[u64], g_traces: u64, traceno: u32, ret: u64) -> Option<u64> {
    let mask = (1u64 << 47) - 1;
    for &g in gs {
        let Some(traces) = read(pid, g + g_traces, 8).and_then(|b| u64_at(&b, 0)) else {
            continue;
        };
        let Some(t) = read(pid, traces + 8 * traceno as u64, 8).and_then(|b| u64_at(&b, 0)) else {
            continue;
        };
        let Some(tb) = read(pid, t & mask, gc64::TRACE_SIZE) else {
            continue;
        };
        let no = u16::from_le_bytes([
            tb[gc64::TRACE_TRACENO as usize],
            tb[gc64::TRACE_TRACENO as usize + 1],
        ]);
        let mcode = u64_at(&tb, gc64::TRACE_MCODE)?;
        let size = u32_at(&tb, gc64::TRACE_SZMCODE)? as u64;
        let at = ret.wrapping_sub(1).wrapping_sub(mcode);
        if tb[gc64::GCT as usize] != gc64::GCT_TRACE || no as u32 != traceno || at >= size {
            continue;
        }
        let nsnap = u16::from_le_bytes([
            tb[gc64::TRACE_NSNAP as usize],
            tb[gc64::TRACE_NSNAP as usize + 1],
        ]);
        let snaps = read(
            pid,
            u64_at(&tb, gc64::TRACE_SNAP)?,
            (nsnap as u64 * gc64::SNAP_SIZE) as usize,
        )?;
        // The last snapshot whose code starts at or before the call.
        let snap = snaps
            .chunks_exact(gc64::SNAP_SIZE as usize)
            .take_while(|s| (u16::from_le_bytes([s[6], s[7]]) as u64) <= at)
            .last()?;
        let mapofs = u32_at(snap, 0)? as u64;
        let nent = snap[10] as u64;
        let map = u64_at(&tb, gc64::TRACE_SNAPMAP)?;
        // After the snapshot's entries: `pc << 8 | frame bits` (two
        // 32-bit map entries, GC64).
        let pcbase = read(pid, map + 4 * (mapofs + nent), 8).and_then(|b| u64_at(&b, 0))?;
        return Some(pcbase >> 8);
    }
    None
}

/// The prototype holding bytecode address `pc` and the position after
/// it: the bytecode follows its `GCproto` header, so the header is found
/// by walking back over instructions.
pub fn proto_of_pc(pid: u32, pc: u64) -> Option<(u64, i32)> {
    const MAX_BACK: u64 = 1 << 16;
    let head = gc64::PROTO_SIZE as u64;
    let from = pc.checked_sub(head + MAX_BACK)?;
    // As much as is readable below `pc`, a page at a time from the top.
    let mut lo = pc - head;
    let mut bytes: Vec<u8> = Vec::new();
    while lo > from {
        let start = (lo - 1) & !0xfff;
        let start = start.max(from);
        match read(pid, start, (lo - start) as usize) {
            Some(mut b) => {
                b.extend_from_slice(&bytes);
                bytes = b;
                lo = start;
            }
            None => break,
        }
    }
    let top = read(pid, pc - head, head as usize)?;
    bytes.extend_from_slice(&top);
    // `bytes` covers [lo, pc); a header at `c` has its type byte at c+9
    // and `sizebc` (instructions) at c+12, and `pc` inside its code.
    let mut k: u64 = 0;
    while pc >= lo + head + 4 * k {
        let c = pc - head - 4 * k;
        let i = (c - lo) as usize;
        if bytes.get(i + gc64::GCT as usize) == Some(&gc64::GCT_PROTO) {
            let i = i as u64;
            let sizebc = u32_at(&bytes, i + gc64::PROTO_SIZEBC)? as u64;
            let chunk = u64_at(&bytes, i + gc64::PROTO_CHUNKNAME)?;
            let numline = u32_at(&bytes, i + gc64::PROTO_NUMLINE)?;
            let plausible = chunk != 0 && chunk < 1 << 47 && chunk % 8 == 0 && numline < 1 << 24;
            if k < sizebc && plausible {
                return Some((c, k as i32 + 1));
            }
        }
        k += 1;
        if k > MAX_BACK / 4 {
            break;
        }
    }
    None
}

/// Source files read to name functions, by (process, path).
#[derive(Debug, Default)]
pub struct Sources {
    files: HashMap<(u32, String), Option<Vec<String>>>,
}

impl Sources {
    /// The name a function defined at `line` of `path` has in its source.
    pub fn function_at(&mut self, pid: u32, path: &str, line: u32) -> Option<String> {
        let lines = self
            .files
            .entry((pid, path.to_string()))
            .or_insert_with(|| {
                let file = format!("/proc/{pid}/root/{}", path.trim_start_matches('/'));
                let text = std::fs::read(&file).ok()?;
                Some(
                    String::from_utf8_lossy(&text)
                        .lines()
                        .map(str::to_string)
                        .collect(),
                )
            })
            .as_ref()?;
        function_name(lines.get(line.checked_sub(1)? as usize)?)
    }

    pub fn forget(&mut self, pid: u32) {
        self.files.retain(|(p, _), _| *p != pid);
    }
}

/// The function a source line defines: `function a.b:c(`, `local
/// function name(`, `name = function(` or `local name = function(`.
pub fn function_name(line: &str) -> Option<String> {
    let ident = |s: &str| -> Option<String> {
        let s = s.trim();
        let ok = !s.is_empty()
            && s.chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '[' | ']' | '"'));
        ok.then(|| s.to_string())
    };
    let l = line.trim_start();
    let l = l.strip_prefix("local ").map(str::trim_start).unwrap_or(l);
    if let Some(rest) = l.strip_prefix("function") {
        if rest.starts_with(|c: char| c.is_whitespace()) {
            return ident(rest.split('(').next()?);
        }
    }
    let (lhs, rhs) = l.split_once('=')?;
    let after = rhs.trim_start().strip_prefix("function")?;
    if after.trim_start().starts_with('(') {
        return ident(lhs);
    }
    None
}

/// The report frame of one recorded Lua frame, or `None` for a frame the
/// native stack shows already (a C function or built-in: its own native
/// frame runs it).
pub fn frame(
    pid: u32,
    code: u64,
    pos: i32,
    protos: &mut HashMap<(u32, u64), Option<Proto>>,
    sources: &mut Sources,
) -> Option<RuntimeFrame> {
    if pos <= lua_pos::CFUNC {
        return None;
    }
    let proto = protos
        .entry((pid, code))
        .or_insert_with(|| read_proto(pid, code, sources));
    let Some(p) = proto else {
        return Some(RuntimeFrame::Marker {
            text: "[lua frame: not a prototype]".into(),
            offset: Some(code),
        });
    };
    let function = if pos == lua_pos::TRACE {
        format!("{} [trace]", p.function)
    } else {
        p.function.clone()
    };
    Some(Code {
        function,
        file: p.file.clone(),
        line: line_of(pid, p, pos),
        language: crate::runtime::Language::Lua,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_definitions() {
        assert_eq!(
            function_name("local function remember_request(r)").as_deref(),
            Some("remember_request")
        );
        assert_eq!(
            function_name("function _M.leak()").as_deref(),
            Some("_M.leak")
        );
        assert_eq!(
            function_name("  function obj:method(a, b)").as_deref(),
            Some("obj:method")
        );
        assert_eq!(
            function_name("local handler = function(req)").as_deref(),
            Some("handler")
        );
        assert_eq!(function_name("M.f = function()").as_deref(), Some("M.f"));
        assert_eq!(function_name("return function()"), None);
        assert_eq!(function_name("x = functional(1)"), None);
        assert_eq!(function_name("local x = 1"), None);
    }
}
