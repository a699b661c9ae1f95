//! Reading code objects from the live process: names, file names and
//! the line of an instruction, for the three line-table formats
//! (`co_lnotab` 3.8-3.9, `co_linetable` pairs 3.10, location entries
//! 3.11+).

use super::*;

/// Longest name or file name read.
pub(super) const MAX_STR: u64 = 4096;
/// Longest line table read.
pub(super) const MAX_LINETABLE: u64 = 1 << 20;

/// A `str` object's text (compact objects only, as code objects hold).
pub(super) fn read_str(pid: u32, l: &Layout, addr: u64) -> Result<String, &'static str> {
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
    /// `co_qualname` (3.11+), else `co_name`.
    pub qualname: String,
    pub filename: String,
    pub firstlineno: i32,
    pub linetable: Vec<u8>,
    pub line_format: LineFormat,
}

impl CodeInfo {
    /// Line of the instruction at `instr` as the kernel recorded it (see
    /// [`LineFormat`]; negative: the frame has not started, attributed to
    /// the definition line as CPython does).
    pub fn line(&self, instr: i32) -> Option<u32> {
        let Ok(at) = u32::try_from(instr) else {
            return u32::try_from(self.firstlineno).ok();
        };
        match self.line_format {
            LineFormat::Lnotab => lnotab_line(&self.linetable, self.firstlineno, at),
            LineFormat::Pairs => {
                pairs_line(&self.linetable, self.firstlineno, at.saturating_mul(2))
            }
            LineFormat::Locations => line_at(&self.linetable, self.firstlineno, at / 2),
        }
    }
}

/// Read the code object at `addr` in process `pid`.
pub fn read_code(pid: u32, target: &PyTarget, addr: u64) -> Result<CodeInfo, &'static str> {
    let l = target.layout?;
    let head = read_mem(pid, addr, l.code_basicsize as usize)?;
    if let Some(ty) = target.code_type_addr {
        // Freed and reused memory, or a torn read: not a code object now.
        if u64_in(&head, OB_TYPE) != Some(ty) {
            return Err("not a code object");
        }
    }
    let firstlineno = u64_in(&head, l.code_firstlineno).ok_or("short code object")? as u32 as i32;
    let name = |off: u64| {
        u64_in(&head, off)
            .ok_or("short code object")
            .and_then(|p| read_str(pid, &l, p))
    };
    let qualname = match l.code_qualname {
        Some(q) => name(q).or_else(|_| name(l.code_name))?,
        None => name(l.code_name)?,
    };
    let filename = name(l.code_filename)?;
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
        line_format: l.line_format,
    })
}

/// The line of byte offset `addr` by a 3.8/3.9 `co_lnotab`
/// (`PyCode_Addr2Line`): pairs of (byte delta, signed line delta).
pub fn lnotab_line(table: &[u8], firstlineno: i32, addr: u32) -> Option<u32> {
    let mut line = i64::from(firstlineno);
    let mut at: u32 = 0;
    for pair in table.chunks_exact(2) {
        at += u32::from(pair[0]);
        if at > addr {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    u32::try_from(line).ok()
}

/// The line of byte offset `addr` by a 3.10 `co_linetable`
/// (`PyCode_Addr2Line`): each (byte delta, signed line delta) pair covers
/// the next range; a line delta of -128 means no line, without moving the
/// running line.
pub fn pairs_line(table: &[u8], firstlineno: i32, addr: u32) -> Option<u32> {
    let mut line = i64::from(firstlineno);
    let mut end: u32 = 0;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += u32::from(pair[0]);
        let delta = pair[1] as i8;
        let here = if delta == -128 {
            None
        } else {
            line += i64::from(delta);
            Some(line)
        };
        if start <= addr && addr < end {
            return here.and_then(|l| u32::try_from(l).ok());
        }
    }
    None
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
