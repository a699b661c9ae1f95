//! Go's own function table, `.gopclntab`: names, file:line and inlined
//! calls for Go code in binaries without `.symtab` or DWARF
//! (`go build -ldflags="-s -w"` strips both; the runtime needs this table
//! for tracebacks, so it always survives).
//!
//! Input: the bytes of an ELF Go executable. Output: [`GoTable`], which
//! answers entry address -> function name, name -> entry, and
//! pc -> frames (innermost inlined call first, each with file:line).
//!
//! Layouts read (the header's magic tells them apart; each field below is
//! checked against the table's bounds, and anything out of bounds is an
//! error value, never a panic):
//! - Go 1.16-1.17 (`0xfffffffa`): function table of `(entry uintptr,
//!   funcoff uintptr)`; `_func` starts with an absolute `entry uintptr`;
//!   funcdata are absolute addresses (pointer-aligned).
//! - Go 1.18-1.19 (`0xfffffff0`): the header gains `textStart`; function
//!   table of `(entryoff u32, funcoff u32)` relative to it; `_func` starts
//!   with `entryoff u32`; funcdata are `u32` offsets from the module's
//!   `gofunc` (`go:func.*`).
//! - Go 1.20+ (`0xfffffff1`): as 1.18 plus `startLine i32` after
//!   `cuOffset` in `_func`, and a 16-byte `inlinedCall` (name, parent PC)
//!   instead of the 20-byte one (parent index, file, line, name, parent PC).
//!   From 1.26 the header's `textStart` is zero and `moduledata.text` is
//!   the base instead.
//!
//! pc-value tables (`pcfile`, `pcln`, `pcdata`) are runs of
//! `(zig-zag value delta, pc delta / quantum)` uvarint pairs starting at
//! value -1 and the function's entry; a zero value delta after the first
//! pair ends the table.
//!
//! Inlined calls: `pcdata[2]` gives, per pc, an index into the function's
//! inline tree (`funcdata[3]`), or -1 outside inlined code. Each tree
//! entry names the inlined function and the parent pc (the call site in
//! the outer body), where the lookup repeats. The tree's address is
//! relative to `moduledata.gofunc` from Go 1.18; `moduledata` is found by
//! its first field, the address of the pclntab header, validated by the
//! second (the function-name table's address). Without it, frames are
//! still right but inlined calls are folded into their outer function.

use object::{Object as _, ObjectSection as _};

/// Format of the table, from its header magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PclnVersion {
    /// Go 1.16 and 1.17.
    Go116,
    /// Go 1.18 and 1.19.
    Go118,
    /// Go 1.20 and later.
    Go120,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PclnError {
    #[error("no .gopclntab section (not a Go binary, or an unusual link)")]
    NoSection,
    #[error("unknown .gopclntab magic {0:#x}: Go before 1.16 or a newer format")]
    Magic(u32),
    #[error("only 64-bit .gopclntab tables are read (pointer size {0})")]
    PtrSize(u8),
    #[error(".gopclntab is truncated or inconsistent ({0})")]
    Corrupt(&'static str),
    #[error("failed to parse the ELF file: {0}")]
    Elf(String),
}

/// One function of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoFunc {
    pub entry: u64,
    /// First address past the function (the next function's entry).
    pub end: u64,
    pub name: String,
}

/// One source-level frame at a pc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoFrame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Inlined into the next (outer) frame.
    pub inlined: bool,
}

/// Pc-data table index of the inline tree index.
const PCDATA_INL_TREE_INDEX: u32 = 2;
/// Funcdata index of the inline tree.
const FUNCDATA_INL_TREE: u32 = 3;
/// Deeper inline chains than this mean a loop in corrupt data.
const MAX_INLINE_DEPTH: usize = 64;

/// A parsed `.gopclntab`, owning the bytes it needs.
#[derive(Clone, Debug)]
pub struct GoTable {
    version: PclnVersion,
    quantum: u32,
    /// The table section, from its header.
    pcln: Vec<u8>,
    nfunc: usize,
    text_start: u64,
    funcname: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    /// Readable sections of the file, `(vaddr, bytes)`, for funcdata that
    /// live outside the table (inline trees).
    data: Vec<(u64, Vec<u8>)>,
    /// `moduledata.gofunc` (Go 1.18+), the base of funcdata offsets.
    gofunc: Option<u64>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn cstr(b: &[u8], off: usize) -> Option<String> {
    let rest = b.get(off..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn uvarint(b: &[u8], pos: &mut usize) -> Option<u32> {
    let mut v = 0u32;
    for shift in (0..35).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u32::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Section names the Go linker gives the table (internal linking, and
/// external linking of a position-independent executable).
const SECTION_NAMES: [&str; 2] = [".gopclntab", ".data.rel.ro.gopclntab"];

impl GoTable {
    /// Parse the table of an ELF Go executable.
    pub fn from_elf(bytes: &[u8]) -> Result<Self, PclnError> {
        let file = object::File::parse(bytes).map_err(|e| PclnError::Elf(e.to_string()))?;
        let section = SECTION_NAMES
            .iter()
            .find_map(|n| file.section_by_name(n))
            .ok_or(PclnError::NoSection)?;
        let pcln = section
            .data()
            .map_err(|e| PclnError::Elf(e.to_string()))?
            .to_vec();
        let data: Vec<(u64, Vec<u8>)> = file
            .sections()
            .filter(|s| s.file_range().is_some() && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.data().ok()?.to_vec())))
            .collect();
        let mut table = Self::parse(pcln, data)?;
        let (text, gofunc) = table.moduledata_text_gofunc(section.address());
        table.gofunc = gofunc;
        if table.text_start == 0 && table.version != PclnVersion::Go116 {
            // Go 1.26+ no longer stores textStart in the header.
            table.text_start = text.ok_or(PclnError::Corrupt(
                "no textStart in the header and no moduledata.text",
            ))?;
        }
        Ok(table)
    }

    /// Parse a table from its bytes; `data` are the other readable parts
    /// of the image (`(vaddr, bytes)`), used for inline trees.
    pub fn parse(pcln: Vec<u8>, data: Vec<(u64, Vec<u8>)>) -> Result<Self, PclnError> {
        let magic = u32_at(&pcln, 0).ok_or(PclnError::Corrupt("header"))?;
        let version = match magic {
            0xffff_fffa => PclnVersion::Go116,
            0xffff_fff0 => PclnVersion::Go118,
            0xffff_fff1 => PclnVersion::Go120,
            m => return Err(PclnError::Magic(m)),
        };
        let (pad, quantum, ptr) = (
            pcln.get(4..6).ok_or(PclnError::Corrupt("header"))?,
            pcln.get(6).copied().ok_or(PclnError::Corrupt("header"))?,
            pcln.get(7).copied().ok_or(PclnError::Corrupt("header"))?,
        );
        if pad != [0, 0] || quantum == 0 {
            return Err(PclnError::Corrupt("header padding or quantum"));
        }
        if ptr != 8 {
            return Err(PclnError::PtrSize(ptr));
        }
        let word = |i: usize| u64_at(&pcln, 8 + 8 * i).ok_or(PclnError::Corrupt("header"));
        let (text_start, first) = match version {
            PclnVersion::Go116 => (0, 2),
            _ => (word(2)?, 3),
        };
        let offset = |i: usize| -> Result<usize, PclnError> {
            let v = word(first + i)?;
            if v as usize >= pcln.len() {
                return Err(PclnError::Corrupt("header offset past the table"));
            }
            Ok(v as usize)
        };
        let table = Self {
            version,
            quantum: u32::from(quantum),
            nfunc: word(0)? as usize,
            text_start,
            funcname: offset(0)?,
            cutab: offset(1)?,
            filetab: offset(2)?,
            pctab: offset(3)?,
            functab: offset(4)?,
            pcln,
            data,
            gofunc: None,
        };
        // The function table must hold nfunc + 1 entries.
        let need = (table.nfunc + 1)
            .checked_mul(table.functab_entry_size())
            .and_then(|n| n.checked_add(table.functab))
            .ok_or(PclnError::Corrupt("function count"))?;
        if need > table.pcln.len() {
            return Err(PclnError::Corrupt("function table past the end"));
        }
        Ok(table)
    }

    pub fn version(&self) -> PclnVersion {
        self.version
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.nfunc
    }

    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }

    /// Whether inlined calls can be expanded (the inline trees are
    /// reachable).
    pub fn has_inline_trees(&self) -> bool {
        self.version == PclnVersion::Go116 || self.gofunc.is_some()
    }

    fn functab_entry_size(&self) -> usize {
        match self.version {
            PclnVersion::Go116 => 16,
            _ => 8,
        }
    }

    /// `(entry address, offset of _func from the function table)` of
    /// function `i` (`i == nfunc` gives the end of the text).
    fn functab_entry(&self, i: usize) -> Option<(u64, usize)> {
        let at = self.functab + i * self.functab_entry_size();
        match self.version {
            PclnVersion::Go116 => Some((
                u64_at(&self.pcln, at)?,
                u64_at(&self.pcln, at + 8)? as usize,
            )),
            _ => Some((
                self.text_start + u64::from(u32_at(&self.pcln, at)?),
                u32_at(&self.pcln, at + 4)? as usize,
            )),
        }
    }

    /// Byte offset of function `i`'s `_func` in the table.
    fn func_off(&self, i: usize) -> Option<usize> {
        let (_, off) = self.functab_entry(i)?;
        let at = self.functab.checked_add(off)?;
        (at < self.pcln.len()).then_some(at)
    }

    /// Offset of a `u32` field of `_func` that sits at the same place in
    /// every layout relative to `nameoff`.
    fn field(&self, func: usize, after_name: usize) -> Option<u32> {
        let base = match self.version {
            PclnVersion::Go116 => func + 8,
            _ => func + 4,
        };
        u32_at(&self.pcln, base + after_name)
    }

    fn name_of(&self, func: usize) -> Option<String> {
        let nameoff = self.field(func, 0)? as usize;
        cstr(&self.pcln, self.funcname.checked_add(nameoff)?)
    }

    /// `(npcdata, nfuncdata, offset of pcdata[0])` of a `_func`.
    fn tails(&self, func: usize) -> Option<(u32, u32, usize)> {
        let npcdata = self.field(func, 24)?;
        let (nfuncdata_at, pcdata_at) = match self.version {
            PclnVersion::Go116 => (func + 43, func + 44),
            PclnVersion::Go118 => (func + 39, func + 40),
            PclnVersion::Go120 => (func + 43, func + 44),
        };
        Some((npcdata, u32::from(*self.pcln.get(nfuncdata_at)?), pcdata_at))
    }

    /// Index of the function holding `pc`.
    fn index_of(&self, pc: u64) -> Option<usize> {
        let (first, _) = self.functab_entry(0)?;
        let (end, _) = self.functab_entry(self.nfunc)?;
        if pc < first || pc >= end {
            return None;
        }
        // Last entry <= pc.
        let (mut lo, mut hi) = (0usize, self.nfunc);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.functab_entry(mid)?.0 <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }

    /// The function holding `pc`.
    pub fn func_at(&self, pc: u64) -> Option<GoFunc> {
        let i = self.index_of(pc)?;
        self.func(i)
    }

    fn func(&self, i: usize) -> Option<GoFunc> {
        let (entry, _) = self.functab_entry(i)?;
        let (end, _) = self.functab_entry(i + 1)?;
        Some(GoFunc {
            entry,
            end,
            name: self.name_of(self.func_off(i)?)?,
        })
    }

    /// Every function, in address order.
    pub fn functions(&self) -> impl Iterator<Item = GoFunc> + '_ {
        (0..self.nfunc).filter_map(|i| self.func(i))
    }

    /// The function named `name`.
    pub fn find(&self, name: &str) -> Option<GoFunc> {
        (0..self.nfunc)
            .find(|&i| {
                self.func_off(i)
                    .and_then(|f| {
                        let off = self.funcname.checked_add(self.field(f, 0)? as usize)?;
                        let bytes = self.pcln.get(off..off + name.len() + 1)?;
                        Some(&bytes[..name.len()] == name.as_bytes() && bytes[name.len()] == 0)
                    })
                    .unwrap_or(false)
            })
            .and_then(|i| self.func(i))
    }

    /// The value of pc-value table `table` (an offset into the pc tables)
    /// at `pc`, for a function starting at `entry`.
    fn pcvalue(&self, table: u32, entry: u64, pc: u64) -> Option<i32> {
        if table == 0 {
            return None;
        }
        let mut pos = self.pctab.checked_add(table as usize)?;
        let mut val: i32 = -1;
        let mut cur = entry;
        let mut first = true;
        loop {
            let uv = uvarint(&self.pcln, &mut pos)?;
            if uv == 0 && !first {
                return None;
            }
            first = false;
            let delta = if uv & 1 != 0 {
                !((uv >> 1) as i32)
            } else {
                (uv >> 1) as i32
            };
            val = val.wrapping_add(delta);
            let pcdelta = uvarint(&self.pcln, &mut pos)?;
            cur = cur.checked_add(u64::from(pcdelta) * u64::from(self.quantum))?;
            if pc < cur {
                return Some(val);
            }
        }
    }

    fn file_name(&self, func: usize, fileno: i32) -> Option<String> {
        if fileno < 0 {
            return None;
        }
        let cu = self.field(func, 28)?;
        let idx = (cu as usize).checked_add(fileno as usize)?;
        let off = u32_at(&self.pcln, self.cutab.checked_add(idx * 4)?)?;
        if off == u32::MAX {
            return None;
        }
        cstr(&self.pcln, self.filetab.checked_add(off as usize)?)
    }

    /// File and line at `pc` of the function whose `_func` is at `func`.
    fn file_line(&self, func: usize, entry: u64, pc: u64) -> (Option<String>, Option<u32>) {
        let file = self
            .field(func, 16)
            .and_then(|t| self.pcvalue(t, entry, pc))
            .and_then(|n| self.file_name(func, n));
        let line = self
            .field(func, 20)
            .and_then(|t| self.pcvalue(t, entry, pc))
            .and_then(|l| u32::try_from(l).ok());
        (file, line)
    }

    /// Address of funcdata `i` of a `_func`, if present.
    fn funcdata(&self, func: usize, i: u32) -> Option<u64> {
        let (npcdata, nfuncdata, pcdata_at) = self.tails(func)?;
        if i >= nfuncdata {
            return None;
        }
        let start = pcdata_at + 4 * npcdata as usize;
        match self.version {
            PclnVersion::Go116 => {
                let aligned = (start + 7) & !7;
                let v = u64_at(&self.pcln, aligned + 8 * i as usize)?;
                (v != 0).then_some(v)
            }
            _ => {
                let off = u32_at(&self.pcln, start + 4 * i as usize)?;
                (off != u32::MAX).then_some(self.gofunc?.checked_add(u64::from(off))?)
            }
        }
    }

    fn pcdata_table(&self, func: usize, i: u32) -> Option<u32> {
        let (npcdata, _, pcdata_at) = self.tails(func)?;
        (i < npcdata).then_some(())?;
        u32_at(&self.pcln, pcdata_at + 4 * i as usize)
    }

    /// Bytes of the image at `vaddr`.
    fn read(&self, vaddr: u64, len: usize) -> Option<&[u8]> {
        self.data.iter().find_map(|(base, bytes)| {
            let rel = usize::try_from(vaddr.checked_sub(*base)?).ok()?;
            bytes.get(rel..rel.checked_add(len)?)
        })
    }

    /// The machine code of `f`, from the file's sections.
    pub fn code(&self, f: &GoFunc) -> Option<&[u8]> {
        self.read(f.entry, usize::try_from(f.end.checked_sub(f.entry)?).ok()?)
    }

    /// `(name offset, parent pc offset)` of inline tree entry `ix`.
    fn inlined_call(&self, tree: u64, ix: i32) -> Option<(u32, i32)> {
        let ix = u64::try_from(ix).ok()?;
        match self.version {
            PclnVersion::Go120 => {
                let b = self.read(tree.checked_add(ix * 16)?, 16)?;
                Some((u32_at(b, 4)?, u32_at(b, 8)? as i32))
            }
            _ => {
                let b = self.read(tree.checked_add(ix * 20)?, 20)?;
                Some((u32_at(b, 12)?, u32_at(b, 16)? as i32))
            }
        }
    }

    /// Source frames at `pc`, innermost first: the inlined calls (when the
    /// inline trees are reachable) and then the function that holds the
    /// code. Empty when `pc` is in no Go function. For a return address,
    /// pass `pc - 1` so the frames are the call's.
    pub fn frames(&self, pc: u64) -> Vec<GoFrame> {
        let Some(i) = self.index_of(pc) else {
            return Vec::new();
        };
        let (Some(func), Some((entry, _))) = (self.func_off(i), self.functab_entry(i)) else {
            return Vec::new();
        };
        let Some(outer) = self.name_of(func) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let tree = self.funcdata(func, FUNCDATA_INL_TREE);
        let index_table = self.pcdata_table(func, PCDATA_INL_TREE_INDEX);
        let mut at = pc;
        if let (Some(tree), Some(table)) = (tree, index_table) {
            while out.len() < MAX_INLINE_DEPTH {
                let Some(ix) = self.pcvalue(table, entry, at).filter(|ix| *ix >= 0) else {
                    break;
                };
                let Some((nameoff, parent_pc)) = self.inlined_call(tree, ix) else {
                    break;
                };
                let (file, line) = self.file_line(func, entry, at);
                let function = self
                    .funcname
                    .checked_add(nameoff as usize)
                    .and_then(|o| cstr(&self.pcln, o))
                    .unwrap_or_else(|| "[inlined function: name unreadable]".into());
                out.push(GoFrame {
                    function,
                    file,
                    line,
                    inlined: true,
                });
                match u64::try_from(parent_pc)
                    .ok()
                    .and_then(|p| entry.checked_add(p))
                {
                    Some(p) if p != at => at = p,
                    _ => break,
                }
            }
        }
        let (file, line) = self.file_line(func, entry, at);
        out.push(GoFrame {
            function: outer,
            file,
            line,
            inlined: false,
        });
        out
    }

    /// `moduledata.text` and `moduledata.gofunc`: `moduledata` begins
    /// with the address of the pclntab header, then the function-name
    /// table as a slice. `text` is word 22 from Go 1.18 on; `gofunc` is
    /// word 38 (1.18-1.19), 40 (1.20-1.26) or 43 (1.27+, which adds
    /// `typedesclen`, `itaboffset` and `itabsize` before it), and must lie
    /// at or above `rodata`, the word before it.
    fn moduledata_text_gofunc(&self, pcln_vaddr: u64) -> (Option<u64>, Option<u64>) {
        let indexes: &[usize] = match self.version {
            PclnVersion::Go116 => return (None, None),
            PclnVersion::Go118 => &[38],
            PclnVersion::Go120 => &[40, 43],
        };
        let Some(names) = pcln_vaddr.checked_add(self.funcname as u64) else {
            return (None, None);
        };
        for (base, bytes) in &self.data {
            let mut off = 0usize;
            while off + 8 * 44 <= bytes.len() {
                if u64_at(bytes, off) == Some(pcln_vaddr) && u64_at(bytes, off + 8) == Some(names) {
                    let text = u64_at(bytes, off + 8 * 22).filter(|t| *t != 0);
                    let gofunc = indexes.iter().find_map(|&index| {
                        let gofunc = u64_at(bytes, off + 8 * index)?;
                        let rodata = u64_at(bytes, off + 8 * (index - 1))?;
                        let plausible =
                            gofunc != 0 && gofunc >= rodata && self.read(gofunc, 1).is_some();
                        log::debug!(
                            "moduledata at {:#x}: text {text:#x?}, word {index} {gofunc:#x} \
                             (plausible gofunc: {plausible})",
                            base + off as u64
                        );
                        plausible.then_some(gofunc)
                    });
                    return (text, gofunc);
                }
                off += 8;
            }
        }
        (None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::go::code::{rip_relative, RipOp};

    fn put_u32(b: &mut Vec<u8>, v: u32) {
        b.extend_from_slice(&v.to_le_bytes());
    }

    fn put_u64(b: &mut Vec<u8>, v: u64) {
        b.extend_from_slice(&v.to_le_bytes());
    }

    /// pc-value table bytes from `(value, pc delta in bytes)` runs.
    fn pcvalue_bytes(runs: &[(i32, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = -1i32;
        for &(v, pcd) in runs {
            let d = v - prev;
            let zz = if d < 0 {
                ((!d as u32) << 1) | 1
            } else {
                (d as u32) << 1
            };
            for mut n in [zz, pcd] {
                loop {
                    let byte = (n & 0x7f) as u8;
                    n >>= 7;
                    if n == 0 {
                        out.push(byte);
                        break;
                    }
                    out.push(byte | 0x80);
                }
            }
            prev = v;
        }
        out.push(0);
        out
    }

    /// A Go 1.18-layout table: two functions at 0x1000 (`main.a`, lines
    /// 10 then 12 at +0x10, file `a.go`) and 0x1040 (`main.b`, no
    /// pc tables), text ending at 0x1080.
    fn table118() -> GoTable {
        let mut names = b"main.a\0main.b\0".to_vec();
        names.push(0);
        let cutab: Vec<u8> = [0u32].iter().flat_map(|v| v.to_le_bytes()).collect();
        let filetab = b"a.go\0".to_vec();
        let mut pctab = vec![0u8]; // offset 0 means "no table"
        let pcfile_off = pctab.len() as u32;
        pctab.extend(pcvalue_bytes(&[(0, 0x40)]));
        let pcln_off = pctab.len() as u32;
        pctab.extend(pcvalue_bytes(&[(10, 0x10), (12, 0x30)]));

        let header_len = 8 + 8 * 8;
        let funcname = header_len;
        let cu = funcname + names.len();
        let file = cu + cutab.len();
        let pcs = file + filetab.len();
        let functab = (pcs + pctab.len() + 7) & !7;
        let mut b = Vec::new();
        put_u32(&mut b, 0xffff_fff0);
        b.extend_from_slice(&[0, 0, 1, 8]);
        for v in [2, 1, 0x1000, funcname, cu, file, pcs, functab] {
            put_u64(&mut b, v as u64);
        }
        b.extend(&names);
        b.extend(&cutab);
        b.extend(&filetab);
        b.extend(&pctab);
        b.resize(functab, 0);
        // functab: 3 entries, then two _funcs (44 bytes each, 1.18 layout).
        let f0 = 3 * 8;
        let f1 = f0 + 44;
        for (e, f) in [(0u32, f0), (0x40, f1), (0x80, f0)] {
            put_u32(&mut b, e);
            put_u32(&mut b, f as u32);
        }
        for (entry, name, pcfile, pcln) in [(0u32, 0u32, pcfile_off, pcln_off), (0x40, 7, 0, 0)] {
            for v in [entry, name, 0, 0, 0, pcfile, pcln, 0, 0] {
                put_u32(&mut b, v);
            }
            b.extend_from_slice(&[0, 0, 0, 0]);
            put_u32(&mut b, 0);
        }
        GoTable::parse(b, Vec::new()).expect("hand-built table parses")
    }

    #[test]
    fn names_entries_and_lines() {
        let t = table118();
        assert_eq!(t.version(), PclnVersion::Go118);
        assert_eq!(t.len(), 2);
        let a = t.func_at(0x1005).expect("pc in main.a");
        assert_eq!(
            (a.name.as_str(), a.entry, a.end),
            ("main.a", 0x1000, 0x1040)
        );
        assert_eq!(t.find("main.b").map(|f| f.entry), Some(0x1040));
        assert_eq!(t.find("main"), None);
        assert!(t.func_at(0xfff).is_none());
        assert!(t.func_at(0x1080).is_none());
        let f = t.frames(0x1012);
        assert_eq!(
            f,
            vec![GoFrame {
                function: "main.a".into(),
                file: Some("a.go".into()),
                line: Some(12),
                inlined: false
            }]
        );
        assert_eq!(t.frames(0x1002)[0].line, Some(10));
        let b = t.frames(0x1050);
        assert_eq!((b[0].function.as_str(), b[0].line), ("main.b", None));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_eq!(
            GoTable::parse(vec![1, 2, 3], Vec::new()).err(),
            Some(PclnError::Corrupt("header"))
        );
        let mut b = vec![0u8; 80];
        b[..4].copy_from_slice(&0xffff_fffbu32.to_le_bytes());
        assert_eq!(
            GoTable::parse(b.clone(), Vec::new()).err(),
            Some(PclnError::Magic(0xffff_fffb))
        );
        // A valid header whose function count runs past the end.
        let t = table118();
        let mut bytes = t.pcln.clone();
        bytes[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
        assert!(matches!(
            GoTable::parse(bytes.clone(), Vec::new()),
            Err(PclnError::Corrupt(_))
        ));
        // Every truncation of a good table either parses or errors.
        for n in 0..t.pcln.len() {
            if let Ok(t) = GoTable::parse(t.pcln[..n].to_vec(), Vec::new()) {
                let _ = t.frames(0x1012);
                let _ = t.find("main.b");
            }
        }
    }

    #[test]
    fn rip_relative_loads_are_found() {
        // SUBQ $0x28, SP; MOVQ 0x153099(IP), CX (as in mProf_FlushLocked).
        let code = [
            0x48, 0x83, 0xec, 0x28, 0x48, 0x8b, 0x0d, 0x99, 0x30, 0x15, 0x00,
        ];
        let got = rip_relative(&code, 0x42c4ac, RipOp::Load64, |_, _| true);
        assert_eq!(got, Some(0x42c4ac + 11 + 0x153099));
        // MOVL 0x182395(IP), AX: a 4-byte load.
        let code = [0x8b, 0x05, 0x95, 0x23, 0x18, 0x00];
        assert_eq!(
            rip_relative(&code, 0x42c3b9, RipOp::Load32, |_, _| true),
            Some(0x42c3bf + 0x182395)
        );
        assert_eq!(
            rip_relative(&code, 0x42c3b9, RipOp::Load64, |_, _| true),
            None
        );
        assert_eq!(rip_relative(&code, 0, RipOp::Load32, |_, t| t == 1), None);
        // LEAQ 0x1824c9(IP), AX.
        let code = [0x48, 0x8d, 0x05, 0xc9, 0x24, 0x18, 0x00];
        assert_eq!(
            rip_relative(&code, 0x42c3e8, RipOp::Lea, |_, _| true),
            Some(0x42c3ef + 0x1824c9)
        );
    }
}
