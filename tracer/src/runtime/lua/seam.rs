//! LuaJIT behind the runtime seam: its allocator probed and its VMs
//! registered for the kernel's Lua walker at attach, the recorded frames
//! resolved while the process lives.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::Path,
};

use tracer_common::{lua_pos, lua_stop, runtime::LUA, LUA_MAX_VMS};

use super::{
    code::{self, LuajitCode},
    frames, vm,
};
use crate::{
    runtime::{
        AttachFailure, Attacher, CodeFrame, Found, InterpStack, Language, ObjectSymbols, Probed,
        RawInterpFrame, Runtime, RuntimeFrame, Walker,
    },
    sys::{elf, procfs::MapEntry},
};

/// The native frame that runs Lua frames: the interpreter, named by
/// [`LuajitSymbols`] (it has no symbol of its own).
pub const EVAL_FRAME: &str = "lj_vm";

/// A LuaJIT library (or an executable with LuaJIT linked in) mapped by a
/// process: its code and where it is loaded.
#[derive(Clone, Debug)]
struct Library {
    path: String,
    code: LuajitCode,
    /// Runtime address minus ELF virtual address.
    bias: u64,
    /// File offset minus virtual address, in the executable segment.
    text_delta: i64,
}

impl Library {
    fn runtime(&self, vaddr: u64) -> u64 {
        vaddr.wrapping_add(self.bias)
    }

    fn file_offset(&self, vaddr: u64) -> u64 {
        vaddr.wrapping_add(self.text_delta as u64)
    }
}

/// What an object file is to this runtime.
#[derive(Debug, Clone)]
enum Seen {
    Luajit(LuajitCode),
    Lua(NotTraced),
    Neither,
}

/// A Lua leaktrace does not trace.
#[derive(Debug, Clone)]
enum NotTraced {
    /// LuaJIT, but a build leaktrace cannot read (why).
    Refused(String),
    /// PUC-Rio's Lua (its version), whose frames are not read.
    PucLua(String),
}

impl Seen {
    fn read(path: &std::path::Path) -> Seen {
        let data = match crate::sys::bytes::file_bytes(path) {
            Ok(d) => d,
            Err(e) => {
                let why = format!("failed to read {}: {e}", path.display());
                return Seen::Lua(NotTraced::Refused(why));
            }
        };
        match LuajitCode::parse(&data) {
            Ok(Some(code)) => Seen::Luajit(code),
            Err(why) => Seen::Lua(NotTraced::Refused(why)),
            Ok(None) => {
                code::puc_lua(&data).map_or(Seen::Neither, |v| Seen::Lua(NotTraced::PucLua(v)))
            }
        }
    }
}

/// One traced process running LuaJIT.
#[derive(Debug)]
struct Target {
    library: Library,
    vms: Vec<u64>,
    /// The build the VMs were recognised as (the first VM's, when there
    /// is one).
    build: Option<&'static vm::Build>,
}

/// LuaJIT in the traced processes.
#[derive(Debug, Default)]
pub struct Lua {
    /// What each object's code says, by (device, inode).
    objects: HashMap<(String, u64), Seen>,
    found: HashMap<u32, Target>,
    protos: HashMap<(u32, u64), Option<frames::Proto>>,
    sources: frames::Sources,
    refused: HashSet<(String, u64)>,
    notes: Vec<String>,
}

/// The LuaJIT library among a process's executable mappings; otherwise
/// what is there instead (a LuaJIT leaktrace cannot read, PUC Lua).
fn find_library(
    pid: u32,
    maps: &[MapEntry],
    objects: &mut HashMap<(String, u64), Seen>,
) -> Result<Option<Library>, (String, (String, u64), NotTraced)> {
    let mut other = None;
    for m in maps.iter().filter(|m| m.executable && m.path.is_some()) {
        let key = (m.dev.clone(), m.inode);
        let Some(open) = m.open_path(pid) else {
            continue;
        };
        let seen = objects
            .entry(key.clone())
            .or_insert_with(|| Seen::read(&open))
            .clone();
        let path = m.path.clone().unwrap_or_default();
        let code = match seen {
            Seen::Luajit(code) => code,
            Seen::Neither => continue,
            Seen::Lua(refused @ NotTraced::Refused(_)) => return Err((path, key, refused)),
            Seen::Lua(puc) => {
                other.get_or_insert((path, key, puc));
                continue;
            }
        };
        let Ok(segments) = elf::load_segments(&open) else {
            continue;
        };
        let Some(vaddr) = elf::exec_vaddr_of_file_offset(&segments, m.offset) else {
            continue;
        };
        let Some(text) = segments.iter().find(|s| {
            s.executable && s.vaddr <= code.alloc_f && code.alloc_f < s.vaddr + s.file_size
        }) else {
            continue;
        };
        return Ok(Some(Library {
            path,
            code,
            bias: m.start.wrapping_sub(vaddr),
            text_delta: text.file_offset as i64 - text.vaddr as i64,
        }));
    }
    other.map_or(Ok(None), Err)
}

/// The first bytes of the function at file offset `offset`, to choose the
/// probe point.
fn code_at(path: &Path, offset: u64) -> Vec<u8> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut buf = vec![0u8; 64];
    let read = std::fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read(&mut buf)
    });
    buf.truncate(read.unwrap_or(0));
    buf
}

impl Lua {
    /// Probe the allocator's three functions.
    fn probe(
        pid: NonZeroU32,
        lib: &Library,
        open: &Path,
        kernel: &mut dyn Attacher,
    ) -> Result<Vec<Probed>, AttachFailure> {
        let c = &lib.code;
        let mut probed = Vec::new();
        for (function, vaddr, program) in [
            ("lj_alloc_malloc", c.alloc_malloc, "lua_malloc_enter"),
            ("lj_alloc_realloc", c.alloc_realloc, "lua_realloc_enter"),
            ("lj_alloc_free", c.alloc_free, "lua_free_enter"),
        ] {
            let offset = lib.file_offset(vaddr);
            let code = code_at(open, offset);
            let at = if program == "lua_free_enter" {
                kernel.free_probe(pid, program, open, offset, &code, 1)
            } else {
                kernel.allocator_probe(pid, program, open, offset, &code)
            }
            .map_err(|reason| AttachFailure {
                function: function.into(),
                object: lib.path.clone(),
                reason,
            })?;
            probed.push(Probed {
                function: function.into(),
                offset: at,
            });
        }
        Ok(probed)
    }
}

impl Runtime for Lua {
    fn name(&self) -> &'static str {
        "lua"
    }

    fn attach(
        &mut self,
        pid: NonZeroU32,
        maps: &[MapEntry],
        kernel: &mut dyn Attacher,
    ) -> Result<Found, AttachFailure> {
        let p = pid.get();
        if self.found.contains_key(&p) {
            return Ok(Found::default());
        }
        let lib = match find_library(p, maps, &mut self.objects) {
            Ok(Some(lib)) => lib,
            Ok(None) => return Ok(Found::default()),
            Err((path, key, not_traced)) => {
                let note = match not_traced {
                    NotTraced::Refused(why) => format!(
                        "{path}: LuaJIT not traced ({why}); its memory shows as the mmaps \
                         its allocator makes, with native stacks"
                    ),
                    NotTraced::PucLua(version) => format!(
                        "{path}: {version} (PUC-Rio) runs here; leaktrace reads LuaJIT's \
                         frames only, so its Lua memory shows as malloc's, with native stacks \
                         (luaV_execute where Lua runs)"
                    ),
                };
                if self.refused.insert(key) {
                    self.notes.push(note);
                }
                return Ok(Found::default());
            }
        };
        let Some(open) = maps
            .iter()
            .find(|m| m.executable && m.path.as_deref() == Some(lib.path.as_str()))
            .and_then(|m| m.open_path(p))
        else {
            return Ok(Found::default());
        };
        // Watched only (node mode): the walker gives page faults and
        // syscalls made under Lua their Lua frames; nothing is probed.
        let probed = if kernel.probes_allowed() {
            Self::probe(pid, &lib, &open, kernel)?
        } else {
            Vec::new()
        };
        let allocf = lib.runtime(lib.code.alloc_f);
        let mut budget = vm::SCAN_LIMIT;
        let mut found: Vec<(u64, &'static vm::Build)> = vm::scannable(maps)
            .flat_map(|m| vm::find_in(p, m.start, m.end, allocf, &mut budget))
            .collect();
        found.dedup();
        // One library, one build: a VM that reads as another is not one.
        let build = found.first().map(|(_, b)| *b);
        let vms: Vec<u64> = found
            .iter()
            .filter(|(_, b)| Some(*b) == build)
            .map(|(g, _)| *g)
            .collect();
        log::debug!(
            "pid {p}: LuaJIT in {} ({}), allocator at {allocf:#x}, {} VM(s) {:x?}",
            lib.path,
            build.map_or("no VM", |b| b.name),
            vms.len(),
            vms
        );
        if vms.len() > LUA_MAX_VMS {
            self.notes.push(format!(
                "process {p} runs {} LuaJIT VMs; Lua frames are shown for the first \
                 {LUA_MAX_VMS}",
                vms.len()
            ));
        }
        let range = (lib.runtime(lib.code.vm.0), lib.runtime(lib.code.vm.1));
        let allocds = vm::allocds(p, &vms);
        let layout = vm::layout(range, build.unwrap_or(&vm::BUILDS[0]), &vms, &allocds);
        if let Err(e) = kernel.register_walker(p, &Walker::Lua(layout)) {
            self.notes.push(format!(
                "process {p} runs LuaJIT, but it could not be registered for Lua frames: {e}"
            ));
        }
        let object = lib.path.clone();
        self.found.insert(
            p,
            Target {
                library: lib,
                vms,
                build,
            },
        );
        Ok(Found {
            objects: vec![(object, probed)],
            refusal: None,
        })
    }

    fn detach(&mut self, pid: u32, kernel: &mut dyn Attacher) {
        if self.found.remove(&pid).is_some() {
            kernel.unregister_walker(pid, LUA);
        }
    }

    fn forget(&mut self, pid: u32) {
        self.protos.retain(|(p, _), _| *p != pid);
        self.sources.forget(pid);
    }

    fn walker_id(&self) -> Option<u32> {
        Some(LUA)
    }

    /// Resolved now: the prototypes live in the process (and may be
    /// collected later).
    fn frames(&mut self, pid: u32, raw: &[RawInterpFrame], stop: u32) -> InterpStack {
        let mut out: Vec<(RuntimeFrame, bool)> = Vec::with_capacity(raw.len());
        let mut raw = raw;
        // Inside a trace: the bytecode it was at, through its snapshots.
        let mut in_trace: Option<(u64, i32)> = None;
        if let Some((first, rest)) = raw.split_first() {
            if first.pos <= lua_pos::TRACE_AT {
                let traceno = (lua_pos::TRACE_AT - first.pos) as u32;
                in_trace = self
                    .found
                    .get(&pid)
                    .and_then(|t| Some((t.vms.as_slice(), t.build?)))
                    .and_then(|(gs, b)| frames::trace_pc(pid, gs, b.g_traces, traceno, first.code))
                    .and_then(|pc| frames::proto_of_pc(pid, pc));
                raw = rest;
            }
        }
        if let Some((proto, pos)) = in_trace {
            match raw.first() {
                // The trace's own function: its line is now known.
                Some(start) if start.code == proto && start.pos == lua_pos::TRACE => {
                    let entry = start.entry;
                    let mut fixed = vec![RawInterpFrame {
                        code: proto,
                        pos,
                        entry,
                    }];
                    fixed.extend_from_slice(&raw[1..]);
                    return self.resolve(pid, &fixed, stop);
                }
                // A function the trace inlined: it has no frame of its own.
                _ => {
                    if let Some(f) =
                        frames::frame(pid, proto, pos, &mut self.protos, &mut self.sources)
                    {
                        out.push((f, false));
                    }
                }
            }
        }
        self.resolve_into(pid, raw, stop, out)
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = self.notes.clone();
        for (pid, t) in &self.found {
            if t.vms.is_empty() {
                notes.push(format!(
                    "process {pid}: LuaJIT's allocator in {} is traced, but no VM was found \
                     in its memory at attach: Lua memory has native stacks only",
                    t.library.path
                ));
            }
        }
        notes
    }
}

impl Lua {
    fn resolve(&mut self, pid: u32, raw: &[RawInterpFrame], stop: u32) -> InterpStack {
        self.resolve_into(pid, raw, stop, Vec::new())
    }

    /// Resolve `raw` after the frames already in `out`.
    fn resolve_into(
        &mut self,
        pid: u32,
        raw: &[RawInterpFrame],
        stop: u32,
        mut out: Vec<(RuntimeFrame, bool)>,
    ) -> InterpStack {
        for f in raw {
            match frames::frame(pid, f.code, f.pos, &mut self.protos, &mut self.sources) {
                Some(frame) => out.push((frame, f.entry)),
                // A C function's frame: its native frame shows it; an
                // entry flag moves to the frame before it.
                None => {
                    if f.entry {
                        if let Some(last) = out.last_mut() {
                            last.1 = true;
                        }
                    }
                }
            }
        }
        let tail = match stop {
            lua_stop::DEPTH => Some("deeper than the frame limit"),
            lua_stop::UNREADABLE => Some("VM memory unreadable"),
            _ => None,
        }
        .map(|why| RuntimeFrame::Marker {
            text: format!("[lua stack truncated: {why}]"),
            offset: None,
        });
        InterpStack {
            frames: out,
            tail,
            eval_function: EVAL_FRAME,
        }
    }
}

/// LuaJIT's unnamed functions (a stripped library names none of them)
/// for the symbolizer: the interpreter, the FFI call and the allocator.
pub struct LuajitSymbols {
    code: LuajitCode,
    segments: Vec<elf::Segment>,
}

impl LuajitSymbols {
    pub fn load(path: &Path) -> Option<Self> {
        let code = LuajitCode::read(path).ok()??;
        let segments = elf::load_segments(path).ok()?;
        Some(Self { code, segments })
    }
}

impl ObjectSymbols for LuajitSymbols {
    fn language(&self) -> Option<Language> {
        None
    }

    fn frames(&self, file_offset: u64) -> Option<Vec<CodeFrame>> {
        // A return address: the call is the byte before it.
        let vaddr = elf::exec_vaddr_of_file_offset(&self.segments, file_offset.checked_sub(1)?)?;
        let name = self.code.name_at(vaddr)?;
        Some(vec![CodeFrame {
            function: name.to_string(),
            file: None,
            line: None,
            inlined: false,
        }])
    }
}
