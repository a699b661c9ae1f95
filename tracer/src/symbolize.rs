//! From raw instruction pointers to frames people read.
//!
//! Two steps, as blazesym recommends. [`Normalizer`] runs while a process
//! lives: each address becomes `(object, file offset)` using the process's
//! memory map, and the object file is kept open so it can still be read
//! after the process exits, from another mount namespace, or after the file
//! was deleted. Identical normalized stacks from different processes (ASLR
//! puts them at different addresses) are interned once. [`Symbolizer`] then
//! turns each unique `(object, offset)` into function, file:line (inlined
//! calls expanded) with one batched blazesym call per object, and caches
//! the result for later reports.
//!
//! Python frames (code object, instruction offset) are resolved to name,
//! file and line by the normalizer too, since they need the live process
//! (see `python`); the symbolizer puts them where the interpreter's eval
//! loop (`_PyEval_EvalFrameDefault`) ran them.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::{fs::MetadataExt as _, io::AsRawFd as _},
    path::PathBuf,
};

use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer as Blaze,
};

use tracer_common::{py_stop, stop, StackId, STACK_LOST};

use crate::{
    ingest::events::RawStack,
    ingest::ledger::StackIdx,
    runtime::python::{CodeCache, PyTarget},
    sys::procfs::{self, MapEntry},
};

use serde::Serialize;

/// What kind of code a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FrameKind {
    Native,
    Python,
    Lua,
    Go,
    Kernel,
}

/// One frame, innermost first within a stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// Plain function name (demangled, no `+offset`), `null` if unknown.
    pub function: Option<String>,
    /// Object path as the traced process sees it.
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub kind: FrameKind,
    /// True for a call that the compiler inlined into the next frame.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// File offset in `module` (or the raw address when there is no
    /// module) when the function is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl Frame {
    /// A frame that stands for something other than code: a truncation,
    /// a lost stack, generated code (`[name]`, kind native, no module).
    pub fn marker(name: String, offset: Option<u64>) -> Frame {
        Frame {
            function: Some(name),
            module: None,
            file: None,
            line: None,
            kind: FrameKind::Native,
            inlined: false,
            offset,
        }
    }
}

/// One frame, normalized while its process lived.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NormFrame {
    /// A return address inside a file-backed object.
    Object { module: u32, file_offset: u64 },
    /// An address in an anonymous executable region (JIT code) or a pseudo
    /// mapping such as `[vdso]`; the walk cannot go on from here reliably.
    Anonymous { addr: u64, region: Option<String> },
    /// The kernel could not record this stack at all.
    Lost,
    /// The walk stopped before the outermost frame; the reason is one of
    /// `tracer_common::stop`.
    Truncated(u32),
    /// A Python frame, resolved while the process lived. `entry`: the
    /// first frame of a C-level call of the eval loop.
    Python {
        function: String,
        file: String,
        line: Option<u32>,
        entry: bool,
    },
    /// A Python frame whose code object could not be read.
    PythonUnreadable {
        code: u64,
        reason: &'static str,
        entry: bool,
    },
    /// The Python walk stopped early; one of `tracer_common::py_stop`.
    PythonTruncated(u32),
}

impl NormFrame {
    fn is_python(&self) -> bool {
        matches!(
            self,
            NormFrame::Python { .. }
                | NormFrame::PythonUnreadable { .. }
                | NormFrame::PythonTruncated(_)
        )
    }
}

/// An object file seen in some traced process.
#[derive(Debug)]
pub struct Module {
    /// Path as the process sees it.
    pub path: String,
    /// Path blazesym reads: the real path when it is the same file in our
    /// mount namespace, else `/proc/self/fd/N` of the kept descriptor.
    read_path: PathBuf,
    _file: Option<File>,
}

#[derive(Debug, Default)]
pub struct Normalizer {
    pub modules: Vec<Module>,
    module_ids: HashMap<(String, u64, String), u32>,
    stacks: Vec<Vec<NormFrame>>,
    stack_ids: HashMap<Vec<NormFrame>, StackIdx>,
    resolved: HashMap<(u32, StackId), StackIdx>,
    maps: HashMap<u32, Vec<MapEntry>>,
    python: CodeCache,
    /// Modules holding Go code (their frames are of kind "go").
    go_modules: std::collections::HashSet<u32>,
    /// Stacks taken from Go profile buckets: leading `runtime.*` frames
    /// are dropped when symbolized, as `runtime/pprof` does.
    go_stacks: std::collections::HashSet<StackIdx>,
}

impl Normalizer {
    /// The stack for kernel row `(tgid, stack_id)`, normalizing it on first
    /// sight with `raw` (innermost first) and the process's current map.
    pub fn resolve(
        &mut self,
        tgid: u32,
        stack_id: StackId,
        raw: impl FnOnce() -> Option<RawStack>,
    ) -> StackIdx {
        if let Some(idx) = self.resolved.get(&(tgid, stack_id)) {
            return *idx;
        }
        let frames = match (stack_id != STACK_LOST).then(raw).flatten() {
            Some(raw) if !raw.ips.is_empty() => {
                let why = raw.stop;
                log::trace!(
                    "stack {stack_id:#x} of {tgid}: stop {why}, ips {:x?}, python {:x?} (stop {})",
                    raw.ips,
                    raw.interp.frames,
                    raw.interp.stop
                );
                let mut frames = self.normalize(tgid, &raw.ips);
                let ended_in_anon = matches!(frames.last(), Some(NormFrame::Anonymous { .. }));
                if why != stop::COMPLETE && !ended_in_anon {
                    frames.push(NormFrame::Truncated(why));
                }
                self.normalize_python(tgid, &raw, &mut frames);
                frames
            }
            _ => vec![NormFrame::Lost],
        };
        let idx = self.intern(frames);
        self.resolved.insert((tgid, stack_id), idx);
        idx
    }

    /// The stack of a Go profile bucket: `pcs` are return PCs, innermost
    /// first, read from the process (which must still live).
    pub fn intern_go(&mut self, tgid: u32, pcs: &[u64]) -> StackIdx {
        let frames = if pcs.is_empty() {
            vec![NormFrame::Lost]
        } else {
            self.normalize(tgid, pcs)
        };
        for f in &frames {
            if let NormFrame::Object { module, .. } = f {
                self.go_modules.insert(*module);
            }
        }
        let idx = self.intern(frames);
        self.go_stacks.insert(idx);
        idx
    }

    /// Whether `module` holds Go code.
    pub fn is_go_module(&self, module: u32) -> bool {
        self.go_modules.contains(&module)
    }

    /// Keep a process's memory map from the moment it is attached, so
    /// stacks first read after it exited (a short-lived target) still
    /// normalize.
    pub fn remember_maps(&mut self, tgid: u32, maps: Vec<MapEntry>) {
        self.maps.insert(tgid, maps);
    }

    /// Stacks resolved for a process are forgotten when it exits (its
    /// stack ids may be reused for another process's addresses).
    pub fn forget_process(&mut self, tgid: u32) {
        self.resolved.retain(|(t, _), _| *t != tgid);
        self.maps.remove(&tgid);
        self.python.forget(tgid);
    }

    /// The process runs this Python: its code objects can be read.
    pub fn set_python(&mut self, tgid: u32, target: PyTarget) {
        self.python.set_target(tgid, target);
    }

    /// Python frames go after the native ones (the symbolizer puts them in
    /// place), resolved now because the code objects live in the process.
    fn normalize_python(&mut self, tgid: u32, raw: &RawStack, frames: &mut Vec<NormFrame>) {
        if raw.interp.runtime != tracer_common::runtime::PYTHON {
            return;
        }
        for f in &raw.interp.frames {
            frames.push(match self.python.code(tgid, f.code) {
                Ok(code) => NormFrame::Python {
                    function: code.qualname.clone(),
                    file: code.filename.clone(),
                    line: code.line(f.pos),
                    entry: f.entry,
                },
                Err(reason) => NormFrame::PythonUnreadable {
                    code: f.code,
                    reason,
                    entry: f.entry,
                },
            });
        }
        if matches!(raw.interp.stop, py_stop::DEPTH | py_stop::UNREADABLE) {
            frames.push(NormFrame::PythonTruncated(raw.interp.stop));
        }
    }

    /// GNU build ids of the objects seen, by the path the processes see,
    /// read through the kept descriptors (right even for containers).
    pub fn build_ids(&self) -> std::collections::BTreeMap<String, String> {
        self.modules
            .iter()
            .filter_map(|m| Some((m.path.clone(), crate::sys::elf::build_id(&m.read_path)?)))
            .collect()
    }

    pub fn stack(&self, idx: StackIdx) -> &[NormFrame] {
        self.stacks
            .get(idx as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn intern(&mut self, frames: Vec<NormFrame>) -> StackIdx {
        if let Some(idx) = self.stack_ids.get(&frames) {
            return *idx;
        }
        let idx = self.stacks.len() as StackIdx;
        self.stacks.push(frames.clone());
        self.stack_ids.insert(frames, idx);
        idx
    }

    fn normalize(&mut self, tgid: u32, ips: &[u64]) -> Vec<NormFrame> {
        let mut refreshed = false;
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips {
            let mut entry = self.find(tgid, ip);
            if entry.is_none() && !refreshed {
                // A library loaded since we last looked (dlopen).
                refreshed = true;
                if let Ok(maps) = procfs::read_maps(tgid) {
                    self.maps.insert(tgid, maps);
                }
                entry = self.find(tgid, ip);
            }
            let frame = match entry {
                Some(e) if e.path.is_some() => {
                    let module = self.module_for(tgid, &e);
                    NormFrame::Object {
                        module,
                        file_offset: ip - e.start + e.offset,
                    }
                }
                Some(e) => NormFrame::Anonymous {
                    addr: ip,
                    region: e.pseudo.clone(),
                },
                None => NormFrame::Anonymous {
                    addr: ip,
                    region: None,
                },
            };
            let stop = matches!(frame, NormFrame::Anonymous { .. });
            out.push(frame);
            if stop {
                break;
            }
        }
        out
    }

    fn find(&mut self, tgid: u32, ip: u64) -> Option<MapEntry> {
        let maps = match self.maps.entry(tgid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(procfs::read_maps(tgid).ok()?),
        };
        maps.iter().find(|m| m.start <= ip && ip < m.end).cloned()
    }

    fn module_for(&mut self, tgid: u32, e: &MapEntry) -> u32 {
        let path = e.path.clone().unwrap_or_default();
        let key = (e.dev.clone(), e.inode, path.clone());
        if let Some(id) = self.module_ids.get(&key) {
            return *id;
        }
        let file = e.open_path(tgid).and_then(|p| File::open(p).ok());
        let same_file_here = !e.deleted
            && std::fs::metadata(&path)
                .map(|m| m.ino() == e.inode)
                .unwrap_or(false);
        let read_path = match (&file, same_file_here) {
            (_, true) | (None, _) => PathBuf::from(&path),
            (Some(f), false) => PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())),
        };
        let id = self.modules.len() as u32;
        self.modules.push(Module {
            path,
            read_path,
            _file: file,
        });
        self.module_ids.insert(key, id);
        id
    }
}

/// Symbolizes normalized frames, caching per `(module, offset)`.
pub struct Symbolizer {
    blaze: Blaze,
    cache: HashMap<(u32, u64), Vec<Frame>>,
    /// Go function tables of modules without `.symtab` (stripped Go
    /// binaries), read once per module.
    go_tables: HashMap<u32, Option<StrippedGo>>,
}

/// A stripped Go executable's `.gopclntab` and its load segments (frames
/// arrive as file offsets, the table speaks virtual addresses).
struct StrippedGo {
    table: crate::runtime::go::pclntab::GoTable,
    segments: Vec<crate::sys::elf::Segment>,
}

impl StrippedGo {
    /// `None` unless `path` is an ELF file with `.gopclntab` and no
    /// `.symtab`; a table that does not parse is logged and skipped
    /// (frames then stay `[module+offset]`).
    fn load(path: &std::path::Path) -> Option<Self> {
        use object::Object as _;
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        if file.section_by_name(".symtab").is_some() {
            return None;
        }
        match crate::runtime::go::pclntab::GoTable::from_elf(&data) {
            Ok(table) => Some(Self {
                table,
                segments: crate::sys::elf::segments_of(&file),
            }),
            Err(crate::runtime::go::pclntab::PclnError::NoSection) => None,
            Err(e) => {
                log::warn!("{}: {e}; its Go frames stay unnamed", path.display());
                None
            }
        }
    }

    /// Frames for the return address at `file_offset`, or `None` when it
    /// is not Go code of this table.
    fn frames(&self, file_offset: u64, module: &str) -> Option<Vec<Frame>> {
        let text: Vec<_> = self
            .segments
            .iter()
            .copied()
            .filter(|s| s.executable)
            .collect();
        let vaddr = crate::sys::elf::vaddr_of_file_offset(&text, file_offset)?;
        let frames = self.table.frames(vaddr.checked_sub(1)?);
        if frames.is_empty() {
            return None;
        }
        Some(
            frames
                .into_iter()
                .map(|f| Frame {
                    function: Some(f.function),
                    module: Some(module.to_string()),
                    file: f.file,
                    line: f.line,
                    kind: FrameKind::Go,
                    inlined: f.inlined,
                    offset: None,
                })
                .collect(),
        )
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        let blaze = Blaze::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Self {
            blaze,
            cache: HashMap::new(),
            go_tables: HashMap::new(),
        }
    }

    /// Frames for each stack in `stacks`, innermost first. Symbolization
    /// failures become frames with only the module and offset.
    pub fn symbolize(&mut self, norm: &Normalizer, stacks: &[StackIdx]) -> Vec<Vec<Frame>> {
        // Batch every uncached (module, offset) by module.
        let mut wanted: HashMap<u32, Vec<u64>> = HashMap::new();
        for idx in stacks {
            for f in norm.stack(*idx) {
                if let NormFrame::Object {
                    module,
                    file_offset,
                } = f
                {
                    if !self.cache.contains_key(&(*module, *file_offset)) {
                        wanted.entry(*module).or_default().push(*file_offset);
                    }
                }
            }
        }
        for (module, mut offsets) in wanted {
            offsets.sort_unstable();
            offsets.dedup();
            self.symbolize_module(norm, module, &offsets);
        }
        stacks
            .iter()
            .map(|idx| {
                let stack = norm.stack(*idx);
                let go = norm.go_stacks.contains(idx);
                let last = stack.len().saturating_sub(1);
                let native: Vec<Frame> = stack
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| !f.is_python())
                    .flat_map(|(i, f)| {
                        let mut frames = self.frames_for(norm, f);
                        if go && i != last {
                            one_logical_frame(&mut frames);
                        }
                        frames
                    })
                    .collect();
                let python: Vec<(Frame, bool)> = stack
                    .iter()
                    .filter_map(|f| match f {
                        NormFrame::Python { entry, .. }
                        | NormFrame::PythonUnreadable { entry, .. } => {
                            Some((python_frame(f), *entry))
                        }
                        _ => None,
                    })
                    .collect();
                let tail = stack.iter().find_map(|f| match f {
                    NormFrame::PythonTruncated(_) => Some(python_frame(f)),
                    _ => None,
                });
                let mut frames = merge_python(native, python, tail);
                if go {
                    drop_runtime_frames(&mut frames);
                }
                frames
            })
            .collect()
    }

    fn symbolize_module(&mut self, norm: &Normalizer, module: u32, offsets: &[u64]) {
        let Some(m) = norm.modules.get(module as usize) else {
            return;
        };
        // Every frame is a return address: look up the call instruction
        // just before it, so the line is the call site's.
        let lookup: Vec<u64> = offsets.iter().map(|o| o.saturating_sub(1)).collect();
        let src = Source::Elf(Elf::new(&m.read_path));
        // A stripped Go binary: its own table names its Go frames (the
        // few dynamic symbols of a cgo build would name them wrongly).
        let stripped_go = self
            .go_tables
            .entry(module)
            .or_insert_with(|| StrippedGo::load(&m.read_path));
        let kind = if norm.is_go_module(module) || stripped_go.is_some() {
            FrameKind::Go
        } else {
            FrameKind::Native
        };
        let results = self
            .blaze
            .symbolize(&src, Input::FileOffset(&lookup))
            .unwrap_or_default();
        for (i, off) in offsets.iter().enumerate() {
            if let Some(frames) = stripped_go.as_ref().and_then(|g| g.frames(*off, &m.path)) {
                self.cache.insert((module, *off), frames);
                continue;
            }
            let frames = match results.get(i) {
                Some(Symbolized::Sym(sym)) => {
                    let mut frames = Vec::with_capacity(1 + sym.inlined.len());
                    // Innermost first: the deepest inlined call, out to the
                    // function that holds the code.
                    for inl in sym.inlined.iter().rev() {
                        let (file, line) = code_loc(inl.code_info.as_ref());
                        frames.push(Frame {
                            function: Some(inl.name.to_string()),
                            module: Some(m.path.clone()),
                            file,
                            line,
                            kind,
                            inlined: true,
                            offset: None,
                        });
                    }
                    let (file, line) = code_loc(sym.code_info.as_deref());
                    frames.push(Frame {
                        function: Some(sym.name.to_string()),
                        module: Some(m.path.clone()),
                        file,
                        line,
                        kind,
                        inlined: false,
                        offset: None,
                    });
                    frames
                }
                _ => vec![Frame {
                    function: None,
                    module: Some(m.path.clone()),
                    file: None,
                    line: None,
                    kind,
                    inlined: false,
                    offset: Some(*off),
                }],
            };
            self.cache.insert((module, *off), frames);
        }
    }

    fn frames_for(&self, norm: &Normalizer, f: &NormFrame) -> Vec<Frame> {
        match f {
            NormFrame::Object {
                module,
                file_offset,
            } => self
                .cache
                .get(&(*module, *file_offset))
                .cloned()
                .unwrap_or_else(|| {
                    vec![Frame {
                        function: None,
                        module: norm.modules.get(*module as usize).map(|m| m.path.clone()),
                        file: None,
                        line: None,
                        kind: FrameKind::Native,
                        inlined: false,
                        offset: Some(*file_offset),
                    }]
                }),
            NormFrame::Anonymous { addr, region } => {
                let what = region
                    .as_deref()
                    .map(|r| r.trim_matches(|c| c == '[' || c == ']'))
                    .unwrap_or("anonymous code; stack ends here");
                vec![Frame::marker(format!("[{what}]"), Some(*addr))]
            }
            NormFrame::Truncated(why) => vec![Frame::marker(
                format!("[truncated: {}]", stop_reason(*why)),
                None,
            )],
            NormFrame::Python { .. }
            | NormFrame::PythonUnreadable { .. }
            | NormFrame::PythonTruncated(_) => vec![python_frame(f)],
            NormFrame::Lost => vec![Frame::marker("[stack lost]".into(), None)],
        }
    }
}

/// The native frame that runs Python frames in CPython 3.8-3.13.
const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

/// The report frame for a Python [`NormFrame`]. A frame that could not be
/// read stays a native-kind placeholder with the reason: never a guess.
fn python_frame(f: &NormFrame) -> Frame {
    let mut frame = Frame::marker(String::new(), None);
    frame.function = None;
    match f {
        NormFrame::Python {
            function,
            file,
            line,
            ..
        } => {
            frame.function = Some(function.clone());
            frame.file = Some(file.clone());
            frame.line = *line;
            frame.kind = FrameKind::Python;
        }
        NormFrame::PythonUnreadable { code, reason, .. } => {
            frame.function = Some(format!("[python frame: {reason}]"));
            frame.offset = Some(*code);
        }
        NormFrame::PythonTruncated(why) => {
            frame.function = Some(format!(
                "[python stack truncated: {}]",
                match *why {
                    py_stop::DEPTH => "deeper than the frame limit",
                    _ => "interpreter memory unreadable",
                }
            ));
        }
        _ => {}
    }
    frame
}

/// Put Python frames (innermost first, with their `is_entry` flags) in
/// place of the native eval-loop frames that ran them.
///
/// Each C-level call of `_PyEval_EvalFrameDefault` runs the Python frames
/// from one entry frame inwards (3.11+ run Python-to-Python calls in the
/// same C call; 3.8-3.10 make every frame an entry frame), so group `k`
/// (ending at the `k`-th entry frame) replaces the `k`-th eval frame.
/// When the counts disagree (a native walk cut short, an entry flag
/// unread) every Python frame goes in place of the
/// innermost eval frame and the other eval frames are dropped: the order
/// of the Python frames is still right, only their interleaving with C
/// frames between eval calls is lost. Without any eval frame (its symbol
/// unknown) they go after the native frames. `tail` (a truncation marker)
/// follows the outermost Python frame.
pub fn merge_python(
    native: Vec<Frame>,
    python: Vec<(Frame, bool)>,
    tail: Option<Frame>,
) -> Vec<Frame> {
    if python.is_empty() && tail.is_none() {
        return native;
    }
    let mut groups: Vec<Vec<Frame>> = Vec::new();
    let mut cur = Vec::new();
    for (f, entry) in python {
        cur.push(f);
        if entry {
            groups.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        groups.push(cur);
    }
    if let Some(t) = tail {
        match groups.last_mut() {
            Some(g) => g.push(t),
            None => groups.push(vec![t]),
        }
    }
    let evals: Vec<usize> = native
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.inlined && f.function.as_deref() == Some(EVAL_FRAME))
        .map(|(i, _)| i)
        .collect();
    if evals.is_empty() {
        let mut out = native;
        out.extend(groups.into_iter().flatten());
        return out;
    }
    if groups.len() != evals.len() {
        groups = vec![groups.into_iter().flatten().collect()];
    }
    let mut groups = groups.into_iter();
    let mut out = Vec::with_capacity(native.len());
    for (i, f) in native.into_iter().enumerate() {
        if evals.contains(&i) {
            out.extend(groups.next().unwrap_or_default());
        } else {
            out.push(f);
        }
    }
    out
}

/// A Go bucket stack (the runtime's `callers`) already holds one PC per
/// logical frame: an inlined call's caller gets its own entry, the
/// call's inline mark + 1. So each PC names only the innermost function
/// at `pc - 1`, as `runtime.CallersFrames` does; expanding the inline
/// tree at every PC would repeat each inlined call's callers. The last PC
/// keeps its whole expansion (`runtime/pprof` expands a stack cut off at
/// the depth limit the same way; an untruncated stack ends in
/// `runtime.goexit`, which inlines nothing).
fn one_logical_frame(frames: &mut Vec<Frame>) {
    frames.truncate(1);
}

/// Drop the Go runtime's frames at the allocation end of a bucket stack
/// (`runtime.makeslice`, `runtime.newobject`, ...), as `runtime/pprof` does
/// for heap profiles, keeping at least one frame.
fn drop_runtime_frames(frames: &mut Vec<Frame>) {
    let keep_from = frames
        .iter()
        .position(|f| {
            !f.function
                .as_deref()
                .is_some_and(|n| n.starts_with("runtime."))
        })
        .unwrap_or(frames.len().saturating_sub(1));
    frames.drain(..keep_from);
}

/// Words for a `tracer_common::stop` reason.
pub fn stop_reason(why: u32) -> &'static str {
    match why {
        stop::DEPTH => "deeper than the frame limit",
        stop::ANON_CODE => "code outside any file (JIT)",
        stop::NO_CFI => "no unwind info for this address",
        stop::UNREADABLE => "stack memory unreadable",
        stop::UNSUPPORTED => "unwind rule not supported (signal frame?)",
        stop::BAD_FRAME => "implausible frame (no frame pointer, no unwind info)",
        _ => "unknown reason",
    }
}

fn code_loc(ci: Option<&blazesym::symbolize::CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match ci {
        Some(ci) => (Some(ci.to_path().display().to_string()), ci.line),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(name: &str) -> Frame {
        Frame {
            function: Some(name.into()),
            module: Some("/usr/bin/python3.11".into()),
            file: None,
            line: None,
            kind: FrameKind::Native,
            inlined: false,
            offset: None,
        }
    }

    fn py(name: &str, entry: bool) -> (Frame, bool) {
        let f = python_frame(&NormFrame::Python {
            function: name.into(),
            file: "app.py".into(),
            line: Some(1),
            entry,
        });
        (f, entry)
    }

    fn names(frames: &[Frame]) -> Vec<&str> {
        frames
            .iter()
            .map(|f| f.function.as_deref().unwrap_or("??"))
            .collect()
    }

    #[test]
    fn python_groups_replace_their_eval_frames() {
        let natives = vec![
            native("malloc_caller"),
            native(EVAL_FRAME),
            native("builtin_sorted"),
            native(EVAL_FRAME),
            native("main"),
        ];
        let python = vec![
            py("key", true),
            py("sort_them", false),
            py("<module>", true),
        ];
        let out = merge_python(natives, python, None);
        assert_eq!(
            names(&out),
            [
                "malloc_caller",
                "key",
                "builtin_sorted",
                "sort_them",
                "<module>",
                "main"
            ]
        );
        assert_eq!(out[1].kind, FrameKind::Python);
    }

    #[test]
    fn mismatched_groups_go_to_the_first_eval_frame() {
        let natives = vec![
            native("f"),
            native(EVAL_FRAME),
            native(EVAL_FRAME),
            native("main"),
        ];
        let python = vec![py("a", false), py("b", true)];
        let tail = python_frame(&NormFrame::PythonTruncated(py_stop::DEPTH));
        let out = merge_python(natives, python, Some(tail));
        assert_eq!(
            names(&out),
            [
                "f",
                "a",
                "b",
                "[python stack truncated: deeper than the frame limit]",
                "main"
            ]
        );
    }

    #[test]
    fn unreadable_python_frame_is_a_marked_native_frame() {
        let f = python_frame(&NormFrame::PythonUnreadable {
            code: 0x1234,
            reason: "not a code object",
            entry: false,
        });
        assert_eq!(f.kind, FrameKind::Native);
        assert_eq!(
            f.function.as_deref(),
            Some("[python frame: not a code object]")
        );
        let out = merge_python(vec![native("main")], vec![], None);
        assert_eq!(names(&out), ["main"]);
    }
}
