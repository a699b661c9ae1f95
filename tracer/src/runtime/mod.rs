//! Runtimes: what an interpreter or managed runtime adds to a traced
//! process, one room each, behind one seam ([`Runtime`]).
//!
//! - `python`: CPython 3.8-3.13: the interpreter and its layout found in a
//!   process, handed to the kernel's Python walker, and the recorded
//!   `(code object, offset)` frames turned into `function at file:line`.
//! - `lua`: LuaJIT 2.1 (GC64, x86-64; OpenResty's luajit2 in nginx): its
//!   allocator found in the library's code and probed by address, its VMs
//!   found in the process's memory and handed to the kernel's Lua walker,
//!   and the recorded prototypes turned into `function at chunk:line`.
//! - `go`: a Go executable's runtime and its profiling hooks (`go/mod.rs`),
//!   its heap profile buckets (`go/buckets.rs`), symbol and line tables
//!   (`go/pclntab.rs`, stripped binaries included), what its machine code
//!   says (`go/code.rs`) and its heap and goroutine figures (`go/stats.rs`).
//!
//! A runtime is driven through [`Runtime`] only: it recognises a process
//! and attaches what it needs through an [`Attacher`] (entry probes, its
//! kernel walker's per-process layout), turns the interpreter frames the
//! kernel recorded into [`RuntimeFrame`]s, may add rows of its own
//! ([`RuntimeRow`], read through [`KernelRecords`]) and figures, and says
//! in notes what it could not do. [`Runtimes::registry`] lists them; adding
//! a runtime is its room here, its kernel room (`tracer-ebpf/src/`), a
//! walker id in `tracer_common::runtime` and one line in the registry (plus
//! a [`Walker`] variant when it has a kernel walker).
//!
//! A runtime may import `sys` and `tracer_common`; the rooms above reach a
//! runtime only through this module's types.

use std::{collections::HashMap, num::NonZeroU32, path::Path, sync::Arc};

use tracer_common::{GoBucketKey, LuaProc, PyProc, StackTotals};

use crate::sys::procfs::MapEntry;

pub mod go;
pub mod lua;
pub mod python;

/// What a runtime asks of the loaded eBPF object; implemented by
/// `attach::probe::Probes` (the only room that touches aya).
pub trait Attacher {
    /// Attach entry program `program` at file offset `offset` of
    /// `open_path` in process `pid`.
    fn entry_probe(
        &mut self,
        pid: NonZeroU32,
        program: &'static str,
        open_path: &Path,
        offset: u64,
    ) -> Result<(), String>;
    /// Probe an allocation function the runtime found (by file offset;
    /// `code` is its first bytes) with `program` at its entry and the
    /// shared return program, at the cheapest correct point; returns that
    /// point's offset from the function's start.
    fn allocator_probe(
        &mut self,
        pid: NonZeroU32,
        program: &'static str,
        open_path: &Path,
        offset: u64,
        code: &[u8],
    ) -> Result<u64, String>;
    /// Probe a free-like function whose pointer is argument `pointer_arg`
    /// (0-based) with `program`, past its NULL check where it can.
    fn free_probe(
        &mut self,
        pid: NonZeroU32,
        program: &'static str,
        open_path: &Path,
        offset: u64,
        code: &[u8],
        pointer_arg: usize,
    ) -> Result<u64, String>;
    /// Register `pid` with its runtime's kernel walker: the walker's
    /// per-process layout, then the `RUNTIMES` entry that sends the
    /// process's stacks to it.
    fn register_walker(&mut self, pid: u32, walker: &Walker) -> Result<(), String>;
    /// Undo [`Self::register_walker`].
    fn unregister_walker(&mut self, pid: u32, runtime: u32);
    /// Byte offset of `thread.fsbase` in the kernel's `task_struct` (from
    /// BTF; 0 when unknown): how a walker tells a thread by its TLS.
    fn fsbase_offset(&self) -> u32;
    /// Whether probes may be placed: false while a process is only watched
    /// (node mode), where a runtime registers its walker and nothing else.
    fn probes_allowed(&self) -> bool {
        true
    }
}

/// A kernel walker's per-process layout, one variant per walker.
#[derive(Clone, Copy, Debug)]
pub enum Walker {
    /// `PY_PROCS`, walked by `tracer-ebpf/src/python.rs`.
    Python(PyProc),
    /// `LUA_PROCS`, walked by `tracer-ebpf/src/lua.rs`.
    Lua(LuaProc),
}

impl Walker {
    /// The walker's id in `tracer_common::runtime`.
    pub fn id(&self) -> u32 {
        match self {
            Walker::Python(_) => tracer_common::runtime::PYTHON,
            Walker::Lua(_) => tracer_common::runtime::LUA,
        }
    }
}

/// What the kernel keeps for the runtimes beyond stacks, read by the
/// ingest room; implemented by `attach::probe::Probes`.
pub trait KernelRecords {
    /// The Go runtime's sampled objects per profile bucket (`GO_BUCKETS`).
    fn go_buckets(&self) -> Result<Vec<(GoBucketKey, StackTotals)>, String>;
}

/// One interpreter frame as the kernel saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawInterpFrame {
    /// The runtime's object of the frame (Python: the `PyCodeObject`).
    pub code: u64,
    /// Where the frame is in it (negative: not started). Python: a
    /// bytecode byte offset (3.11+) or `f_lasti` (3.8-3.10); see
    /// `python::LineFormat`.
    pub pos: i32,
    /// The first frame of a C-level call of the interpreter loop.
    pub entry: bool,
}

/// A function probed by a runtime, for the attach summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    pub function: String,
    /// Bytes past the function's start where the probe sits.
    pub offset: u64,
}

/// What a runtime did with a process.
#[derive(Debug, Default)]
pub struct Found {
    /// Objects probed: path as the process sees it, and the functions.
    pub objects: Vec<(String, Vec<Probed>)>,
    /// The runtime is there but refused (a version whose calling
    /// convention is unknown, say): why, in a sentence.
    pub refusal: Option<String>,
}

/// Attaching failed in a way the user must hear about (not a refusal).
#[derive(Debug)]
pub struct AttachFailure {
    pub function: String,
    pub object: String,
    pub reason: String,
}

/// The language of a runtime's code frames (the report's frame kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Language {
    Python,
    Lua,
    Go,
}

/// One interpreter frame, resolved while its process lived.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuntimeFrame {
    /// A function of the interpreted language.
    Code {
        function: String,
        file: String,
        line: Option<u32>,
        language: Language,
    },
    /// Not a function: a frame that could not be read, or where the walk
    /// stopped, in words (`[python frame: not a code object]`), with the
    /// address it concerns.
    Marker { text: String, offset: Option<u64> },
}

/// A stack's interpreter frames, innermost first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterpStack {
    /// Each frame with its entry flag: the first frame run by a C-level
    /// call of the eval loop.
    pub frames: Vec<(RuntimeFrame, bool)>,
    /// Why the walk stopped early, after the outermost frame.
    pub tail: Option<RuntimeFrame>,
    /// The native function whose frames these replace, one C-level call
    /// per entry group (`_PyEval_EvalFrameDefault`).
    pub eval_function: &'static str,
}

/// A row a runtime accounts itself (the Go heap's profile buckets): its
/// stack as return PCs, innermost first, and its totals.
#[derive(Clone, Debug)]
pub struct RuntimeRow {
    pub pid: u32,
    /// Identifies the stack within the process (the bucket's address), so
    /// it is normalized once.
    pub key: u64,
    pub pcs: Arc<[u64]>,
    pub totals: StackTotals,
}

/// Whose code the stacks of a runtime's own rows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCode {
    /// The language of the code those stacks pass through.
    pub language: Language,
    /// The runtime's own frames at the allocation end (named with this
    /// prefix), dropped as its profiler drops them (`runtime.`).
    pub drop_prefix: &'static str,
}

/// One runtime's rows at a sample, or why they could not be read.
#[derive(Debug)]
pub struct RowSet {
    pub rows: Result<Vec<RuntimeRow>, String>,
    pub code: RowCode,
}

/// A runtime's own symbol table for an object's native code, where the
/// object's ELF symbols do not name it (a stripped Go binary's
/// `.gopclntab`).
pub trait ObjectSymbols {
    /// The language of the code it names (`None`: native code).
    fn language(&self) -> Option<Language>;
    /// Frames for the return address at `file_offset`, innermost first
    /// (inlined calls expanded), or `None` when the table does not cover
    /// it.
    fn frames(&self, file_offset: u64) -> Option<Vec<CodeFrame>>;
}

/// A function in a runtime's own symbol table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeFrame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Inlined into the next frame.
    pub inlined: bool,
}

/// Return addresses in the object file `data` (virtual addresses) where a
/// runtime's code has switched stacks: the caller's frame is on another
/// stack, reached by the frame pointer (Go's `runtime.asmcgocall` and
/// `runtime.systemstack`).
pub fn stack_switch_return_pcs(data: &[u8]) -> Vec<u64> {
    go::code::stack_switch_return_pcs(data)
}

/// The runtime symbol table of the object file at `path`, if a runtime
/// has one for it.
pub fn object_symbols(path: &Path) -> Option<Box<dyn ObjectSymbols>> {
    go::StrippedTable::load(path)
        .map(|t| Box::new(t) as Box<dyn ObjectSymbols>)
        .or_else(|| lua::LuajitSymbols::load(path).map(|t| Box::new(t) as Box<dyn ObjectSymbols>))
}

/// A runtime's figures for the report.
#[derive(Clone, Debug)]
pub enum Figures {
    Go(go::GoReport),
}

/// One runtime: a room on each side of the seam.
pub trait Runtime {
    /// Its name, for logs.
    fn name(&self) -> &'static str;
    /// Look at a process (all of it on first sight; again after dlopen or
    /// exec) and attach what it needs. A runtime already attached in the
    /// process does nothing.
    fn attach(
        &mut self,
        pid: NonZeroU32,
        maps: &[MapEntry],
        kernel: &mut dyn Attacher,
    ) -> Result<Found, AttachFailure>;
    /// The process exited or exec'd: its probes and kernel registration
    /// go (what was read from it stays for the final report).
    fn detach(&mut self, pid: u32, kernel: &mut dyn Attacher);
    /// The process's rows are dropped: forget everything read from it.
    fn forget(&mut self, _pid: u32) {}
    /// The id its kernel walker tags frames with (`tracer_common::runtime`),
    /// if it has one.
    fn walker_id(&self) -> Option<u32> {
        None
    }
    /// Resolve the frames the kernel walker recorded for a stack of `pid`
    /// (`stop` is the walker's reason for stopping).
    fn frames(&mut self, _pid: u32, _frames: &[RawInterpFrame], _stop: u32) -> InterpStack {
        InterpStack::default()
    }
    /// Whether the runtime accounts `pid`'s heap itself ([`Self::rows`]):
    /// its mmaps would count the same memory again.
    fn accounts_heap(&self, _pid: u32) -> bool {
        false
    }
    /// Rows the runtime accounts itself, at a sample.
    fn rows(&mut self, _kernel: &dyn KernelRecords) -> Result<Vec<RuntimeRow>, String> {
        Ok(Vec::new())
    }
    /// Whose code the stacks of [`Self::rows`] are (a runtime with rows
    /// has this).
    fn row_code(&self) -> Option<RowCode> {
        None
    }
    /// Read the runtime's figures of the running processes.
    fn sample(&mut self, _running: &dyn Fn(u32) -> bool) {}
    /// Its figures for a report (of `only` when given).
    fn figures(&self, _only: Option<u32>) -> Vec<Figures> {
        Vec::new()
    }
    /// What it could not do, for the report.
    fn notes(&self) -> Vec<String>;
}

/// Options the runtimes take from the command line.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    /// Write this into `runtime.MemProfileRate` of Go processes whose
    /// runtime samples nothing (`--go-enable-profiling`).
    pub go_enable_profiling: Option<u64>,
}

/// Every runtime leaktrace knows, in the order they look at a process.
pub struct Runtimes {
    all: Vec<Box<dyn Runtime>>,
    /// Which runtime each process's walker frames belong to.
    by_walker: HashMap<u32, usize>,
}

impl Runtimes {
    /// The registry: one line per runtime.
    pub fn registry(options: &RuntimeOptions) -> Self {
        Self::new(vec![
            Box::new(python::Python::default()),
            Box::new(lua::Lua::default()),
            Box::new(go::Go::new(options.go_enable_profiling)),
        ])
    }

    /// A given set (tests).
    pub fn new(all: Vec<Box<dyn Runtime>>) -> Self {
        let by_walker = all
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((r.walker_id()?, i)))
            .collect();
        Self { all, by_walker }
    }

    /// No runtime at all.
    pub fn none() -> Self {
        Self::new(Vec::new())
    }

    /// Let each runtime look at a process. Objects probed are collected;
    /// the last refusal is returned with them.
    pub fn attach(
        &mut self,
        pid: NonZeroU32,
        maps: &[MapEntry],
        kernel: &mut dyn Attacher,
    ) -> Result<Found, AttachFailure> {
        let mut all = Found::default();
        for rt in &mut self.all {
            let found = rt.attach(pid, maps, kernel)?;
            all.objects.extend(found.objects);
            if found.refusal.is_some() {
                all.refusal = found.refusal;
            }
        }
        Ok(all)
    }

    pub fn detach(&mut self, pid: u32, kernel: &mut dyn Attacher) {
        for rt in &mut self.all {
            rt.detach(pid, kernel);
        }
    }

    pub fn forget(&mut self, pid: u32) {
        for rt in &mut self.all {
            rt.forget(pid);
        }
    }

    /// The frames a kernel walker (`runtime`, its id) recorded.
    pub fn frames(
        &mut self,
        pid: u32,
        runtime: u32,
        frames: &[RawInterpFrame],
        stop: u32,
    ) -> Option<InterpStack> {
        let i = *self.by_walker.get(&runtime)?;
        Some(self.all.get_mut(i)?.frames(pid, frames, stop))
    }

    pub fn accounts_heap(&self, pid: u32) -> bool {
        self.all.iter().any(|r| r.accounts_heap(pid))
    }

    /// Every runtime's own rows, each with the frame prefix its stacks
    /// start with; a runtime that cannot be read says why (logged by the
    /// caller) and the others still count.
    pub fn rows(&mut self, kernel: &dyn KernelRecords) -> Vec<RowSet> {
        self.all
            .iter_mut()
            .filter_map(|r| {
                let code = r.row_code()?;
                Some(RowSet {
                    rows: r.rows(kernel),
                    code,
                })
            })
            .collect()
    }

    pub fn sample(&mut self, running: &dyn Fn(u32) -> bool) {
        for r in &mut self.all {
            r.sample(running);
        }
    }

    pub fn figures(&self, only: Option<u32>) -> Vec<Figures> {
        self.all.iter().flat_map(|r| r.figures(only)).collect()
    }

    pub fn notes(&self) -> Vec<String> {
        self.all.iter().flat_map(|r| r.notes()).collect()
    }
}

impl std::fmt::Debug for Runtimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.all.iter().map(|r| r.name()))
            .finish()
    }
}
