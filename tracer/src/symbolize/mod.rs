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
//! Interpreter frames (Python's code object and instruction offset) are
//! resolved by their runtime when the normalizer first sees the stack,
//! since they need the live process; the symbolizer puts them where the
//! interpreter's eval loop (`_PyEval_EvalFrameDefault`) ran them (see
//! `interp`).

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

use tracer_common::{stop, StackId, STACK_LOST};

use crate::{
    ingest::events::RawStack,
    ingest::ledger::StackIdx,
    runtime::{Language, ObjectSymbols, RowCode, RuntimeFrame, Runtimes},
    sys::procfs::{self, MapEntry},
};

mod interp;
mod normalize;

pub use interp::merge_interp;
use interp::*;
pub use normalize::*;

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
    /// An interpreter frame, resolved by its runtime while the process
    /// lived. `entry`: the first frame of a C-level call of the eval loop,
    /// the native function `eval`.
    Interp {
        frame: RuntimeFrame,
        entry: bool,
        eval: &'static str,
    },
    /// A label on the allocation end of a stack (what kind of memory the
    /// row holds: `[shared memory]`).
    Label(&'static str),
    /// Why the interpreter walk stopped early, after its outermost frame.
    InterpTail {
        frame: RuntimeFrame,
        eval: &'static str,
    },
}

impl NormFrame {
    fn is_interp(&self) -> bool {
        matches!(
            self,
            NormFrame::Interp { .. } | NormFrame::InterpTail { .. }
        )
    }
}

/// The report's frame kind for a runtime's language.
fn frame_kind(language: Language) -> FrameKind {
    match language {
        Language::Python => FrameKind::Python,
        Language::Lua => FrameKind::Lua,
        Language::Go => FrameKind::Go,
    }
}

/// Symbolizes normalized frames, caching per `(module, offset)`.
pub struct Symbolizer {
    blaze: Blaze,
    cache: HashMap<(u32, u64), Vec<Frame>>,
    /// A runtime's own symbol table of each module, where it has one
    /// (a stripped Go binary's `.gopclntab`), read once per module.
    runtime_tables: HashMap<u32, Option<Box<dyn ObjectSymbols>>>,
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
            runtime_tables: HashMap::new(),
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
                let runtime_row = norm.runtime_stacks.get(idx).copied();
                let last = stack.len().saturating_sub(1);
                let native: Vec<Frame> = stack
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| !f.is_interp())
                    .flat_map(|(i, f)| {
                        let mut frames = self.frames_for(norm, f);
                        if runtime_row.is_some() && i != last {
                            one_logical_frame(&mut frames);
                        }
                        frames
                    })
                    .collect();
                let mut eval = "";
                let interp: Vec<(Frame, bool)> = stack
                    .iter()
                    .filter_map(|f| match f {
                        NormFrame::Interp {
                            frame,
                            entry,
                            eval: e,
                        } => {
                            eval = e;
                            Some((interp_frame(frame), *entry))
                        }
                        _ => None,
                    })
                    .collect();
                let tail = stack.iter().find_map(|f| match f {
                    NormFrame::InterpTail { frame, eval: e } => {
                        eval = e;
                        Some(interp_frame(frame))
                    }
                    _ => None,
                });
                let mut frames = merge_interp(native, interp, tail, eval);
                if let Some(prefix) = runtime_row {
                    drop_runtime_frames(&mut frames, prefix);
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
        let table = self
            .runtime_tables
            .entry(module)
            .or_insert_with(|| crate::runtime::object_symbols(&m.read_path))
            .as_deref();
        let kind = match (norm.module_language(module), table) {
            (Some(language), _) => frame_kind(language),
            (None, Some(t)) => t.language().map_or(FrameKind::Native, frame_kind),
            (None, None) => FrameKind::Native,
        };
        let results = self
            .blaze
            .symbolize(&src, Input::FileOffset(&lookup))
            .unwrap_or_default();
        for (i, off) in offsets.iter().enumerate() {
            if let Some(t) = table {
                if let Some(frames) = t.frames(*off) {
                    let kind = t.language().map_or(FrameKind::Native, frame_kind);
                    let frames = frames
                        .into_iter()
                        .map(|f| Frame {
                            function: Some(f.function),
                            module: Some(m.path.clone()),
                            file: f.file,
                            line: f.line,
                            kind,
                            inlined: f.inlined,
                            offset: None,
                        })
                        .collect();
                    self.cache.insert((module, *off), frames);
                    continue;
                }
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
            NormFrame::Interp { frame, .. } | NormFrame::InterpTail { frame, .. } => {
                vec![interp_frame(frame)]
            }
            NormFrame::Lost => vec![Frame::marker("[stack lost]".into(), None)],
            NormFrame::Label(what) => vec![Frame::marker((*what).into(), None)],
        }
    }
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

/// Drop a runtime's own frames (named `prefix`...) at the allocation end
/// of a stack of its own rows (Go's `runtime.makeslice`,
/// `runtime.newobject`, ...), as `runtime/pprof` does for heap profiles,
/// keeping at least one frame.
fn drop_runtime_frames(frames: &mut Vec<Frame>, prefix: &str) {
    let keep_from = frames
        .iter()
        .position(|f| !f.function.as_deref().is_some_and(|n| n.starts_with(prefix)))
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

    const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

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
        let f = interp_frame(&RuntimeFrame::Code {
            function: name.into(),
            file: "app.py".into(),
            line: Some(1),
            language: Language::Python,
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
        let out = merge_interp(natives, python, None, EVAL_FRAME);
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
        let tail = interp_frame(&RuntimeFrame::Marker {
            text: "[python stack truncated: deeper than the frame limit]".into(),
            offset: None,
        });
        let out = merge_interp(natives, python, Some(tail), EVAL_FRAME);
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
    fn unreadable_interp_frame_is_a_marked_native_frame() {
        let f = interp_frame(&RuntimeFrame::Marker {
            text: "[python frame: not a code object]".into(),
            offset: Some(0x1234),
        });
        assert_eq!(f.kind, FrameKind::Native);
        assert_eq!(
            f.function.as_deref(),
            Some("[python frame: not a code object]")
        );
        assert_eq!(f.offset, Some(0x1234));
        let out = merge_interp(vec![native("main")], vec![], None, EVAL_FRAME);
        assert_eq!(names(&out), ["main"]);
    }
}
