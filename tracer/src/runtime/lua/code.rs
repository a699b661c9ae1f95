//! What a LuaJIT object's machine code says, read from the file alone (no
//! process, no root): the addresses leaktrace probes and names.
//!
//! Input: the bytes of an ELF object that exports `lua_newstate` and
//! `luaJIT_setmode` (`libluajit-5.1.so.2`, or an executable LuaJIT is
//! linked into, such as OpenResty's nginx), through `.dynsym` or `.symtab`.
//! Distributions strip LuaJIT's internal symbols, so everything else is
//! found from the code of exported functions and from `.eh_frame`:
//! - `lj_alloc_f`, the VM's default allocator: the function whose address
//!   `lua_newstate` loads (`allocf = lj_alloc_f` when the embedder asks
//!   for the internal allocator) and whose code is the three-way dispatch
//!   `nsize == 0` -> `lj_alloc_free(msp, ptr)`, `ptr == NULL` ->
//!   `lj_alloc_malloc(msp, nsize)`, else `lj_alloc_realloc(msp, ptr,
//!   nsize)`, each a tail jump: the targets are the three functions;
//! - `lj_vm`, the interpreter: one hand-written assembly blob with one
//!   large FDE; `lua_pcall`, `lua_call` and `lua_resume` call labels inside
//!   it (`lj_vm_pcall`, ...), never its start;
//! - `lj_vm_ffi_call`, the FFI call trampoline: the FDE right after
//!   `lj_vm`'s, with an `%rbp`-based CFA.
//!
//! Output: [`LuajitCode`], ELF virtual addresses. Invariant: a build whose
//! code differs from these shapes in any way leaktrace relies on is
//! refused with a reason rather than guessed at; only GC64 x86-64 builds
//! (64-bit `lua_State` references, the default on x86-64 since 2.1) are
//! accepted.

use std::path::Path;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, UnwindContext, UnwindSection, X86_64,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::runtime::go::code::{rip_relative, RipOp};
use crate::sys::elf::section_bytes;

/// An FDE this long or longer may be `lj_vm` (tens of KiB on x86-64);
/// the C functions the API calls are smaller or are called at their start.
const VM_MIN_BYTES: u64 = 4096;
/// How far after `lj_vm`'s end the FFI trampoline's FDE may start.
const FFI_CALL_WITHIN: u64 = 4096;
/// Bytes of an exported function read when its symbol has no size.
const DEFAULT_FUNCTION_BYTES: u64 = 2048;
/// Bytes of `lj_alloc_f` read to decode it (its branch targets included).
const ALLOC_F_WINDOW: u64 = 128;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// What leaktrace needs from a LuaJIT library's code (ELF virtual addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuajitCode {
    pub alloc_f: u64,
    pub alloc_malloc: u64,
    pub alloc_free: u64,
    pub alloc_realloc: u64,
    /// The interpreter blob `lj_vm` [start, end).
    pub vm: (u64, u64),
    /// The FFI call trampoline `lj_vm_ffi_call` [start, end), when its FDE
    /// is where and what it is expected to be.
    pub ffi_call: Option<(u64, u64)>,
    /// Each allocator function's extent [start, end), in the order
    /// `alloc_f`, `alloc_malloc`, `alloc_free`, `alloc_realloc`: the FDE
    /// that starts at the function, or without one the decoded dispatch
    /// (`alloc_f`) or the first byte (the others).
    pub alloc_ranges: [(u64, u64); 4],
}

/// The names [`LuajitCode::name_at`] gives the allocator functions, in
/// the order of [`LuajitCode::alloc_ranges`].
const ALLOC_NAMES: [&str; 4] = [
    "lj_alloc_f",
    "lj_alloc_malloc",
    "lj_alloc_free",
    "lj_alloc_realloc",
];

impl LuajitCode {
    /// Ok(None): not a LuaJIT library (no `luaJIT_setmode` / `lua_newstate` export).
    /// Err(reason): LuaJIT but not a build leaktrace can trace (one sentence naming what differs).
    pub fn read(path: &Path) -> Result<Option<LuajitCode>, String> {
        let data = crate::sys::bytes::file_bytes(path)
            .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
        Self::parse(&data)
    }

    /// Same from bytes (for unit tests).
    pub fn parse(data: &[u8]) -> Result<Option<LuajitCode>, String> {
        let Ok(file) = object::File::parse(data) else {
            return Ok(None);
        };
        let (Some(newstate), Some(_)) = (
            function(&file, "lua_newstate"),
            function(&file, "luaJIT_setmode"),
        ) else {
            return Ok(None);
        };
        if file.architecture() != object::Architecture::X86_64 {
            return Err(format!(
                "this LuaJIT is built for {:?}; leaktrace reads x86-64 LuaJIT only",
                file.architecture()
            ));
        }
        let image = Image::new(&file);
        check_gc64(&file, data, &image)?;
        let fdes = fdes(&file)?;
        let alloc = find_alloc_f(&file, &image, newstate)?;
        let vm = find_vm(&file, &image, &fdes)?;
        let ffi_call = find_ffi_call(&fdes, vm);
        let extent = |addr: u64, fallback: u64| {
            fde_starting_at(&fdes, addr)
                .map_or((addr, fallback.max(addr + 1)), |f| (f.start, f.end))
        };
        Ok(Some(LuajitCode {
            alloc_f: alloc.f,
            alloc_malloc: alloc.malloc,
            alloc_free: alloc.free,
            alloc_realloc: alloc.realloc,
            vm,
            ffi_call,
            alloc_ranges: [
                extent(alloc.f, alloc.end),
                extent(alloc.malloc, 0),
                extent(alloc.free, 0),
                extent(alloc.realloc, 0),
            ],
        }))
    }

    /// A name for the function holding `vaddr`, for the symbolizer: "lj_vm", "[ffi]" (lj_vm_ffi_call), "lj_alloc_f", "lj_alloc_malloc", "lj_alloc_free", "lj_alloc_realloc" (each of the allocator functions covers its FDE's range); None elsewhere.
    pub fn name_at(&self, vaddr: u64) -> Option<&'static str> {
        let inside = |(start, end): (u64, u64)| start <= vaddr && vaddr < end;
        if inside(self.vm) {
            return Some("lj_vm");
        }
        if self.ffi_call.is_some_and(inside) {
            return Some("[ffi]");
        }
        self.alloc_ranges
            .iter()
            .zip(ALLOC_NAMES)
            .find(|(range, _)| inside(**range))
            .map(|(_, name)| name)
    }
}

/// The address and size of the defined function `name`, from `.dynsym` or
/// `.symtab` (versioned names match without their version).
fn function(file: &object::File<'_>, name: &str) -> Option<(u64, u64)> {
    file.dynamic_symbols()
        .chain(file.symbols())
        .find(|s| {
            s.kind() == object::SymbolKind::Text
                && !s.is_undefined()
                && s.address() != 0
                && s.name().is_ok_and(|n| n.split('@').next() == Some(name))
        })
        .map(|s| (s.address(), s.size()))
}

/// PUC-Rio's Lua, built into this object (the `lua5.x` interpreters) or
/// its library (`liblua5.x`): its version as `lua_ident` spells it
/// ("Lua 5.4.4"). It exports `lua_newstate` and `lua_ident`, and not
/// LuaJIT's `luaJIT_setmode`.
pub fn puc_lua(data: &[u8]) -> Option<String> {
    let file = object::File::parse(data).ok()?;
    if function(&file, "luaJIT_setmode").is_some() || function(&file, "lua_newstate").is_none() {
        return None;
    }
    let ident = file.dynamic_symbols().chain(file.symbols()).find(|s| {
        !s.is_undefined()
            && s.name()
                .is_ok_and(|n| n.split('@').next() == Some("lua_ident"))
    })?;
    // "$LuaVersion: Lua 5.4.4  Copyright (C) ..." (5.2 on), "$Lua: Lua
    // 5.1.5 Copyright (C) ..." (5.1), in a read-only section.
    let section = file.section_by_index(ident.section_index()?).ok()?;
    let bytes = section.data().ok()?;
    let at = usize::try_from(ident.address().checked_sub(section.address())?).ok()?;
    let text = bytes.get(at..)?.split(|&b| b == 0).next()?;
    let text = std::str::from_utf8(text).ok()?;
    Some(ident_version(text)?.to_string())
}

/// "Lua 5.4.4" of `lua_ident`'s text.
fn ident_version(text: &str) -> Option<&str> {
    let rest = text
        .strip_prefix("$LuaVersion: ")
        .or_else(|| text.strip_prefix("$Lua: "))?;
    let version = rest.split(" Copyright").next()?.trim();
    version.starts_with("Lua ").then_some(version)
}

/// The object's executable sections, to read code by virtual address.
struct Image<'d> {
    sections: Vec<(u64, &'d [u8])>,
}

impl<'d> Image<'d> {
    fn new(file: &object::File<'d>) -> Self {
        let sections = file
            .sections()
            .filter(|s| s.kind() == object::SectionKind::Text)
            .filter_map(|s| Some((s.address(), s.data().ok()?)))
            .collect();
        Self { sections }
    }

    /// Up to `len` bytes of code from `vaddr` (fewer at its section's end);
    /// `None` outside the executable sections.
    fn code(&self, vaddr: u64, len: u64) -> Option<&'d [u8]> {
        self.sections.iter().find_map(|&(start, data)| {
            let at = usize::try_from(vaddr.checked_sub(start)?).ok()?;
            let rest = data.get(at..).filter(|r| !r.is_empty())?;
            let len = usize::try_from(len).unwrap_or(usize::MAX).min(rest.len());
            rest.get(..len)
        })
    }

    fn contains(&self, vaddr: u64) -> bool {
        self.code(vaddr, 1).is_some()
    }
}

/// Refuses a build without GC64. Two witnesses, either may be absent:
/// - `lua_getallocf` starts by loading `L->glref`, a 64-bit reference at
///   +0x10 in GC64 (`mov 0x10(%rdi),%rax`) and a 32-bit one at +8
///   otherwise (`mov 0x8(%rdi),%eax`);
/// - `ffi.abi`'s parameter list in `.rodata` ends `"\x02le\x04gc64"` in
///   GC64 and `"\x02le"` otherwise (absent when FFI is compiled out).
fn check_gc64(file: &object::File<'_>, data: &[u8], image: &Image<'_>) -> Result<(), String> {
    let by_layout = function(file, "lua_getallocf")
        .and_then(|(addr, _)| image.code(addr, 16))
        .and_then(|code| {
            let code = code.strip_prefix(&ENDBR64[..]).unwrap_or(code);
            if code.starts_with(&[0x48, 0x8b, 0x47, 0x10]) {
                Some(true)
            } else if code.starts_with(&[0x8b, 0x47, 0x08]) {
                Some(false)
            } else {
                None
            }
        });
    let contains = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
    let by_abi = if contains(b"\x02le\x04gc64\0") {
        Some(true)
    } else if contains(b"hardfp\x02le\0") || contains(b"softfp\x02le\0") {
        Some(false)
    } else {
        None
    };
    match (by_layout, by_abi) {
        (Some(false), _) | (_, Some(false)) => Err(
            "this LuaJIT is built without GC64 (32-bit object references); leaktrace \
             reads GC64 builds only"
                .to_string(),
        ),
        (Some(true), _) | (_, Some(true)) => Ok(()),
        (None, None) => Err(
            "cannot tell whether this LuaJIT is built with GC64: neither lua_getallocf's \
             code nor ffi.abi's flags say"
                .to_string(),
        ),
    }
}

/// One FDE of `.eh_frame`: the code range [start, end) it describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fde {
    start: u64,
    end: u64,
    /// Some row's CFA is `%rbp` plus an offset (a frame-pointer frame).
    cfa_rbp: bool,
}

/// Every FDE of the object's `.eh_frame`, by start address. An FDE that
/// cannot be parsed is left out.
fn fdes(file: &object::File<'_>) -> Result<Vec<Fde>, String> {
    let no_cfi = || {
        "this LuaJIT has no readable .eh_frame (call-frame information), which \
         leaktrace needs to find the interpreter lj_vm"
            .to_string()
    };
    let Some((address, bytes)) = section_bytes(file, ".eh_frame")
        .map_err(|e| format!("failed to read this LuaJIT's .eh_frame: {e}"))?
    else {
        return Err(no_cfi());
    };
    let mut eh_frame = EhFrame::new(&bytes, LittleEndian);
    eh_frame.set_address_size(8);
    let mut bases = BaseAddresses::default().set_eh_frame(address);
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    let mut ctx = UnwindContext::new();
    let mut out = Vec::new();
    let mut entries = eh_frame.entries(&bases);
    loop {
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(e) => return Err(format!("failed to walk this LuaJIT's .eh_frame: {e}")),
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(UnwindSection::cie_from_offset) else {
            continue;
        };
        let mut cfa_rbp = false;
        if let Ok(mut rows) = fde.rows(&eh_frame, &bases, &mut ctx) {
            while let Ok(Some(row)) = rows.next_row() {
                if let CfaRule::RegisterAndOffset { register, .. } = row.cfa() {
                    cfa_rbp |= *register == X86_64::RBP;
                }
            }
        }
        let start = fde.initial_address();
        out.push(Fde {
            start,
            end: start.saturating_add(fde.len()),
            cfa_rbp,
        });
    }
    if out.is_empty() {
        return Err(no_cfi());
    }
    out.sort_by_key(|f| f.start);
    Ok(out)
}

/// The FDE whose range holds `vaddr`.
fn fde_containing(fdes: &[Fde], vaddr: u64) -> Option<Fde> {
    let after = fdes.partition_point(|f| f.start <= vaddr);
    let f = *fdes.get(after.checked_sub(1)?)?;
    (vaddr < f.end).then_some(f)
}

fn fde_starting_at(fdes: &[Fde], vaddr: u64) -> Option<Fde> {
    fde_containing(fdes, vaddr).filter(|f| f.start == vaddr)
}

/// `lj_alloc_f` and where it dispatches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AllocF {
    f: u64,
    malloc: u64,
    free: u64,
    realloc: u64,
    /// The end of the last instruction decoded.
    end: u64,
}

/// `lj_alloc_f` as loaded by `lua_newstate` (`newstate`: address, size):
/// a RIP-relative `lea` (position-independent code) or a 32-bit immediate
/// `mov` (a non-PIE executable) whose target decodes as the dispatch.
fn find_alloc_f(
    file: &object::File<'_>,
    image: &Image<'_>,
    (addr, size): (u64, u64),
) -> Result<AllocF, String> {
    let len = if size == 0 {
        DEFAULT_FUNCTION_BYTES
    } else {
        size
    };
    let code = image
        .code(addr, len)
        .ok_or("this LuaJIT's lua_newstate is not in an executable section")?;
    let decode = |target: u64| {
        image
            .code(target, ALLOC_F_WINDOW)
            .and_then(|c| decode_alloc_f(c, target))
            .filter(|a| {
                [a.malloc, a.free, a.realloc]
                    .iter()
                    .all(|&t| t != a.f && image.contains(t))
            })
    };
    let mut found = None;
    rip_relative(code, addr, RipOp::Lea, |_, target| {
        found = decode(target);
        found.is_some()
    });
    if found.is_none() && !is_position_independent(file) {
        found = immediates(code).find_map(decode);
    }
    found.ok_or_else(|| {
        "this LuaJIT's lua_newstate loads no function shaped like lj_alloc_f (test nsize; \
         je free; test ptr; je malloc; tail-jump realloc): its default allocator is not \
         the one leaktrace knows"
            .to_string()
    })
}

/// A shared object or PIE: code addresses are never 32-bit immediates.
fn is_position_independent(file: &object::File<'_>) -> bool {
    file.kind() == object::ObjectKind::Dynamic
}

/// Every 32-bit immediate of a `mov $imm32, reg` (`B8+r`, optionally with
/// REX.B, zero-extended; `REX.W C7 /0`, sign-extended) anywhere in `code`,
/// byte by byte: the caller checks what the value points at.
fn immediates(code: &[u8]) -> impl Iterator<Item = u64> + '_ {
    (0..code.len()).filter_map(move |i| {
        let rest = code.get(i..)?;
        let (imm, signed) = match rest {
            [0xb8..=0xbf, imm @ ..] | [0x41, 0xb8..=0xbf, imm @ ..] => (imm, false),
            [0x48 | 0x49, 0xc7, 0xc0..=0xc7, imm @ ..] => (imm, true),
            _ => return None,
        };
        let bytes: [u8; 4] = imm.get(..4)?.try_into().ok()?;
        Some(if signed {
            i32::from_le_bytes(bytes) as i64 as u64
        } else {
            u64::from(u32::from_le_bytes(bytes))
        })
    })
}

/// Decodes `code` (at `vaddr`) as `lj_alloc_f`, strictly:
/// ```text
///     [endbr64]
///     test %rcx,%rcx ; je A        (nsize == 0)
///     test %rsi,%rsi ; je B        (ptr == NULL)
///     mov  %rcx,%rdx ; jmp REALLOC
/// B:  mov  %rcx,%rsi ; jmp MALLOC
/// A:  jmp  FREE
/// ```
/// with `rel8` or `rel32` branches, either encoding of each `mov`, and
/// nop padding before `A` and `B`.
fn decode_alloc_f(code: &[u8], vaddr: u64) -> Option<AllocF> {
    const TEST_RCX: [&[u8]; 1] = [&[0x48, 0x85, 0xc9]];
    const TEST_RSI: [&[u8]; 1] = [&[0x48, 0x85, 0xf6]];
    const MOV_RCX_RDX: [&[u8]; 2] = [&[0x48, 0x89, 0xca], &[0x48, 0x8b, 0xd1]];
    const MOV_RCX_RSI: [&[u8]; 2] = [&[0x48, 0x89, 0xce], &[0x48, 0x8b, 0xf1]];
    let mut c = Cursor {
        code,
        vaddr,
        at: 0,
        end: vaddr,
    };
    c.eat(&[&ENDBR64[..]]);
    c.expect(&TEST_RCX)?;
    let free_at = c.je()?;
    c.expect(&TEST_RSI)?;
    let malloc_at = c.je()?;
    c.expect(&MOV_RCX_RDX)?;
    let realloc = c.jmp()?;
    c.goto(malloc_at)?;
    c.expect(&MOV_RCX_RSI)?;
    let malloc = c.jmp()?;
    c.goto(free_at)?;
    let free = c.jmp()?;
    Some(AllocF {
        f: vaddr,
        malloc,
        free,
        realloc,
        end: c.end,
    })
}

/// A position in code being decoded.
struct Cursor<'c> {
    code: &'c [u8],
    vaddr: u64,
    at: usize,
    /// The furthest instruction end seen.
    end: u64,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let bytes = self.code.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        self.end = self.end.max(self.vaddr + self.at as u64);
        Some(bytes)
    }

    /// Consumes the first of `options` the code starts with.
    fn eat(&mut self, options: &[&[u8]]) -> bool {
        let rest = self.code.get(self.at..).unwrap_or_default();
        match options.iter().find(|o| rest.starts_with(o)) {
            Some(o) => self.take(o.len()).is_some(),
            None => false,
        }
    }

    fn expect(&mut self, options: &[&[u8]]) -> Option<()> {
        self.eat(options).then_some(())
    }

    /// The target of a `rel8` / `rel32` branch whose short opcode is
    /// `short` and whose near opcode bytes are `near`.
    fn branch(&mut self, short: u8, near: &[u8]) -> Option<u64> {
        let rest = self.code.get(self.at..)?;
        let rel = if rest.first() == Some(&short) {
            let b = self.take(2)?;
            i64::from(*b.get(1)? as i8)
        } else if rest.starts_with(near) {
            let b = self.take(near.len() + 4)?;
            let imm: [u8; 4] = b.get(near.len()..)?.try_into().ok()?;
            i64::from(i32::from_le_bytes(imm))
        } else {
            return None;
        };
        Some((self.vaddr + self.at as u64).wrapping_add(rel as u64))
    }

    fn je(&mut self) -> Option<u64> {
        self.branch(0x74, &[0x0f, 0x84])
    }

    fn jmp(&mut self) -> Option<u64> {
        self.branch(0xeb, &[0xe9])
    }

    /// Continues at `target` (inside the code), past any nop there.
    fn goto(&mut self, target: u64) -> Option<()> {
        let at = usize::try_from(target.checked_sub(self.vaddr)?).ok()?;
        if at >= self.code.len() {
            return None;
        }
        self.at = at;
        while let Some(n) = nop_len(self.code.get(self.at..)?) {
            self.take(n)?;
        }
        Some(())
    }
}

/// The length of the nop `code` starts with (`90`, `66 90`, `0f 1f /0`
/// with `66`/`2e` prefixes), if it starts with one.
fn nop_len(code: &[u8]) -> Option<usize> {
    let prefixes = code.iter().take_while(|&&b| b == 0x66 || b == 0x2e).count();
    match code.get(prefixes..)? {
        [0x90, ..] => Some(prefixes + 1),
        [0x0f, 0x1f, modrm, rest @ ..] if modrm & 0x38 == 0 => {
            let (md, rm) = (modrm >> 6, modrm & 7);
            let sib = usize::from(md != 3 && rm == 4);
            let disp = match md {
                0 if rm == 5 => 4,
                0 | 3 => 0,
                1 => 1,
                _ => 4,
            };
            (rest.len() >= sib + disp).then_some(prefixes + 3 + sib + disp)
        }
        _ => None,
    }
}

/// `lj_vm`'s range: the FDE of at least [`VM_MIN_BYTES`] that the direct
/// calls and jumps of `lua_pcall`, `lua_call` and `lua_resume` land in
/// (not at its start: those are `lj_vm_pcall`-like labels inside the
/// blob). The scan is over bytes, so a false match is outvoted; a tie
/// between two FDEs is refused.
fn find_vm(file: &object::File<'_>, image: &Image<'_>, fdes: &[Fde]) -> Result<(u64, u64), String> {
    let mut votes: Vec<(Fde, usize)> = Vec::new();
    for name in ["lua_pcall", "lua_call", "lua_resume"] {
        let Some((addr, size)) = function(file, name) else {
            continue;
        };
        let len = if size == 0 {
            DEFAULT_FUNCTION_BYTES
        } else {
            size
        };
        let Some(code) = image.code(addr, len) else {
            continue;
        };
        for target in rel32_branches(code, addr) {
            let Some(fde) = fde_containing(fdes, target) else {
                continue;
            };
            if fde.end - fde.start < VM_MIN_BYTES || fde.start == target {
                continue;
            }
            match votes.iter_mut().find(|(f, _)| *f == fde) {
                Some((_, n)) => *n += 1,
                None => votes.push((fde, 1)),
            }
        }
    }
    votes.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    match votes.as_slice() {
        [] => Err(
            "none of this LuaJIT's lua_pcall, lua_call and lua_resume calls into a large \
             FDE: the interpreter lj_vm is not where leaktrace looks for it"
                .to_string(),
        ),
        [(a, n), (b, m), ..] if n == m => Err(format!(
            "this LuaJIT's lua_pcall, lua_call and lua_resume call into two large FDEs \
             ({:#x} and {:#x}) as often: the interpreter lj_vm is ambiguous",
            a.start, b.start
        )),
        [(vm, _), ..] => Ok((vm.start, vm.end)),
    }
}

/// The targets of every `call rel32` / `jmp rel32` in `code` (at `vaddr`),
/// byte by byte.
fn rel32_branches(code: &[u8], vaddr: u64) -> impl Iterator<Item = u64> + '_ {
    code.windows(5).enumerate().filter_map(move |(i, w)| {
        let [0xe8 | 0xe9, a, b, c, d] = *w else {
            return None;
        };
        let next = vaddr + i as u64 + 5;
        Some(next.wrapping_add(i64::from(i32::from_le_bytes([a, b, c, d])) as u64))
    })
}

/// `lj_vm_ffi_call`: the first FDE at or after `lj_vm`'s end (within
/// [`FFI_CALL_WITHIN`]), if it has an `%rbp`-based CFA as the
/// trampoline's hand-written CFI does.
fn find_ffi_call(fdes: &[Fde], vm: (u64, u64)) -> Option<(u64, u64)> {
    let next = fdes.get(fdes.partition_point(|f| f.start < vm.1))?;
    (next.start - vm.1 < FFI_CALL_WITHIN && next.cfa_rbp).then_some((next.start, next.end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIB: &str = "/usr/lib/x86_64-linux-gnu/libluajit-5.1.so.2";

    fn debian_lib() -> Option<Vec<u8>> {
        match std::fs::read(LIB) {
            Ok(data) => Some(data),
            Err(e) => {
                eprintln!("skipping: {LIB}: {e}");
                None
            }
        }
    }

    /// The file offset of `vaddr` in `data`.
    fn file_offset(data: &[u8], vaddr: u64) -> usize {
        let file = object::File::parse(data).expect("parse the library");
        let section = file
            .sections()
            .find(|s| s.address() <= vaddr && vaddr < s.address() + s.size())
            .expect("a section holding the address");
        let (offset, _) = section.file_range().expect("section bytes in the file");
        (offset + vaddr - section.address()) as usize
    }

    #[test]
    fn reads_debian_luajit2() {
        let Some(data) = debian_lib() else { return };
        let code = LuajitCode::parse(&data)
            .expect("a build leaktrace traces")
            .expect("a LuaJIT library");
        assert_eq!(code.alloc_f, 0x18e60);
        assert_eq!(code.alloc_free, 0x16270);
        assert_eq!(code.alloc_malloc, 0x17990);
        assert_eq!(code.alloc_realloc, 0x18c40);
        assert_eq!(code.vm, (0x9e40, 0xde92));
        for pc in [0xabfe, 0xbaf6] {
            assert!(
                code.vm.0 <= pc && pc < code.vm.1,
                "{pc:#x} in lj_vm {code:x?}"
            );
        }
        assert_eq!(code.ffi_call, Some((0xde92, 0xdf32)));
        assert_eq!(
            code.alloc_ranges,
            [
                (0x18e60, 0x18e85),
                (0x17990, 0x18c39),
                (0x16270, 0x16a57),
                (0x18c40, 0x18e5d)
            ]
        );
        assert_eq!(
            LuajitCode::read(Path::new(LIB)).expect("read the library"),
            Some(code)
        );
    }

    #[test]
    fn names_debian_luajit2_code() {
        let Some(data) = debian_lib() else { return };
        let code = LuajitCode::parse(&data)
            .expect("a build leaktrace traces")
            .expect("a LuaJIT library");
        let cases = [
            (0x9e40, Some("lj_vm")),
            (0xabfe, Some("lj_vm")),
            (0xbaf6, Some("lj_vm")),
            (0xde91, Some("lj_vm")),
            (0xdf16, Some("[ffi]")),
            (0x18e60, Some("lj_alloc_f")),
            (0x18e84, Some("lj_alloc_f")),
            (0x17b10, Some("lj_alloc_malloc")),
            (0x16270, Some("lj_alloc_free")),
            (0x18c40, Some("lj_alloc_realloc")),
            (0x18e85, None),
            (0x5b5e0, None),
            (0, None),
        ];
        for (pc, name) in cases {
            assert_eq!(code.name_at(pc), name, "name at {pc:#x}");
        }
    }

    #[test]
    fn refuses_an_unknown_allocator() {
        let Some(mut data) = debian_lib() else { return };
        let at = file_offset(&data, 0x18e60);
        // `test %rcx,%rcx` becomes `test %rdx,%rdx` (osize, not nsize).
        data[at + 2] = 0xd2;
        let err = LuajitCode::parse(&data).expect_err("an allocator of another shape");
        assert!(err.contains("lj_alloc_f"), "{err}");
    }

    #[test]
    fn puc_lua_versions_from_lua_ident() {
        assert_eq!(
            ident_version("$LuaVersion: Lua 5.4.4  Copyright (C) 1994-2022 Lua.org, PUC-Rio $"),
            Some("Lua 5.4.4")
        );
        assert_eq!(
            ident_version("$Lua: Lua 5.1.5 Copyright (C) 1994-2012 Lua.org, PUC-Rio $"),
            Some("Lua 5.1.5")
        );
        assert_eq!(ident_version("$Id: something else $"), None);
    }

    #[test]
    fn refuses_a_build_without_gc64() {
        let Some(mut data) = debian_lib() else { return };
        let at = file_offset(&data, 0x67b70);
        // lua_getallocf loading a 32-bit `L->glref` at +8, as without GC64.
        assert_eq!(&data[at..at + 4], &[0x48, 0x8b, 0x47, 0x10]);
        data[at..at + 4].copy_from_slice(&[0x8b, 0x47, 0x08, 0x90]);
        let err = LuajitCode::parse(&data).expect_err("a build without GC64");
        assert!(err.contains("GC64"), "{err}");
    }

    #[test]
    fn other_objects_are_not_luajit() {
        assert_eq!(LuajitCode::parse(b"not an ELF file"), Ok(None));
        match std::fs::read("/bin/true") {
            Ok(data) => assert_eq!(LuajitCode::parse(&data), Ok(None)),
            Err(e) => eprintln!("skipping /bin/true: {e}"),
        }
        assert!(LuajitCode::read(Path::new("/nonexistent/libluajit.so")).is_err());
    }

    /// Assembles `lj_alloc_f`'s shape at 0x1000 with the given branch
    /// encodings.
    fn alloc_f_bytes(endbr: bool, near: bool) -> Vec<u8> {
        let mut code = Vec::new();
        if endbr {
            code.extend(ENDBR64);
        }
        // Offsets of A and B patched below.
        code.extend([0x48, 0x85, 0xc9]);
        let je_a = code.len();
        code.extend(if near {
            vec![0x0f, 0x84, 0, 0, 0, 0]
        } else {
            vec![0x74, 0]
        });
        code.extend([0x48, 0x85, 0xf6]);
        let je_b = code.len();
        code.extend(if near {
            vec![0x0f, 0x84, 0, 0, 0, 0]
        } else {
            vec![0x74, 0]
        });
        code.extend([0x48, 0x8b, 0xd1]);
        let jmp = |code: &mut Vec<u8>, target: u64| {
            let next = 0x1000 + code.len() as u64 + if near { 5 } else { 2 };
            let rel = target.wrapping_sub(next) as i64;
            if near {
                code.push(0xe9);
                code.extend((rel as i32).to_le_bytes());
            } else {
                code.extend([0xeb, rel as i8 as u8]);
            }
        };
        jmp(&mut code, 0x1070);
        code.extend([0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]);
        let b = code.len();
        code.extend([0x48, 0x89, 0xce]);
        jmp(&mut code, 0x1060);
        code.push(0x90);
        let a = code.len();
        jmp(&mut code, 0x1050);
        let patch = |code: &mut Vec<u8>, at: usize, to: usize| {
            if near {
                let rel = (to - (at + 6)) as i32;
                code[at + 2..at + 6].copy_from_slice(&rel.to_le_bytes());
            } else {
                code[at + 1] = (to - (at + 2)) as u8;
            }
        };
        patch(&mut code, je_a, a);
        patch(&mut code, je_b, b);
        code
    }

    #[test]
    fn decodes_each_encoding_of_the_dispatch() {
        for endbr in [false, true] {
            for near in [false, true] {
                let code = alloc_f_bytes(endbr, near);
                let got = decode_alloc_f(&code, 0x1000);
                assert_eq!(
                    got,
                    Some(AllocF {
                        f: 0x1000,
                        malloc: 0x1060,
                        free: 0x1050,
                        realloc: 0x1070,
                        end: 0x1000 + code.len() as u64,
                    }),
                    "endbr64 {endbr}, rel32 {near}"
                );
            }
        }
        // Branches swapped: `je` to realloc is not the shape.
        let mut code = alloc_f_bytes(false, false);
        code[3] = 0x75;
        assert_eq!(decode_alloc_f(&code, 0x1000), None);
        // Cut short.
        let code = alloc_f_bytes(false, true);
        assert_eq!(decode_alloc_f(&code[..code.len() - 1], 0x1000), None);
    }

    #[test]
    fn nop_lengths() {
        assert_eq!(nop_len(&[0x90]), Some(1));
        assert_eq!(nop_len(&[0x66, 0x90]), Some(2));
        assert_eq!(nop_len(&[0x0f, 0x1f, 0x00]), Some(3));
        assert_eq!(nop_len(&[0x0f, 0x1f, 0x40, 0x00]), Some(4));
        assert_eq!(nop_len(&[0x0f, 0x1f, 0x44, 0x00, 0x00]), Some(5));
        assert_eq!(nop_len(&[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]), Some(6));
        assert_eq!(nop_len(&[0x0f, 0x1f, 0x80, 0, 0, 0, 0]), Some(7));
        assert_eq!(
            nop_len(&[0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0]),
            Some(11)
        );
        assert_eq!(nop_len(&[0x0f, 0x1f, 0x84, 0, 0]), None);
        assert_eq!(nop_len(&[0x48, 0x89, 0xce]), None);
    }

    #[test]
    fn immediates_of_movs() {
        let code = [
            0xba, 0x60, 0x8e, 0x41, 0x00, 0x48, 0xc7, 0xc1, 0xf0, 0xff, 0xff, 0xff,
        ];
        let all: Vec<u64> = immediates(&code).collect();
        assert!(all.contains(&0x418e60), "{all:x?}");
        assert!(all.contains(&0xffff_ffff_ffff_fff0), "{all:x?}");
    }
}
