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
    ledger::StackIdx,
    procfs::{self, MapEntry},
    report::{Frame, FrameKind},
};

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
}

impl Normalizer {
    /// The stack for kernel row `(tgid, stack_id)`, normalizing it on first
    /// sight with `ips` (innermost first) and the process's current map.
    pub fn resolve(
        &mut self,
        tgid: u32,
        stack_id: StackId,
        ips: impl FnOnce() -> Option<(Vec<u64>, u32)>,
    ) -> StackIdx {
        if let Some(idx) = self.resolved.get(&(tgid, stack_id)) {
            return *idx;
        }
        let frames = match (stack_id != STACK_LOST).then(ips).flatten() {
            Some((ips, why)) if !ips.is_empty() => {
                log::trace!("stack {stack_id:#x} of {tgid}: stop {why}, ips {ips:x?}");
                let mut frames = self.normalize(tgid, &ips);
                let ended_in_anon = matches!(frames.last(), Some(NormFrame::Anonymous { .. }));
                if why != stop::COMPLETE && !ended_in_anon {
                    frames.push(NormFrame::Truncated(why));
                }
                frames
            }
            _ => vec![NormFrame::Lost],
        };
        let idx = self.intern(frames);
        self.resolved.insert((tgid, stack_id), idx);
        idx
    }

    /// Stacks resolved for a process are forgotten when it exits (its
    /// stack ids may be reused for another process's addresses).
    pub fn forget_process(&mut self, tgid: u32) {
        self.resolved.retain(|(t, _), _| *t != tgid);
        self.maps.remove(&tgid);
    }

    /// GNU build ids of the objects seen, by the path the processes see,
    /// read through the kept descriptors (right even for containers).
    pub fn build_ids(&self) -> std::collections::BTreeMap<String, String> {
        self.modules
            .iter()
            .filter_map(|m| {
                Some((
                    m.path.clone(),
                    crate::report::pprof::build_id(&m.read_path)?,
                ))
            })
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
                norm.stack(*idx)
                    .iter()
                    .flat_map(|f| self.frames_for(norm, f))
                    .collect()
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
        let results = self
            .blaze
            .symbolize(&src, Input::FileOffset(&lookup))
            .unwrap_or_default();
        for (i, off) in offsets.iter().enumerate() {
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
                            kind: FrameKind::Native,
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
                        kind: FrameKind::Native,
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
                    kind: FrameKind::Native,
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
            NormFrame::Anonymous { addr, region } => vec![Frame {
                function: Some(format!(
                    "[{}]",
                    region
                        .as_deref()
                        .map(|r| r.trim_matches(|c| c == '[' || c == ']'))
                        .unwrap_or("anonymous code; stack ends here")
                )),
                module: None,
                file: None,
                line: None,
                kind: FrameKind::Native,
                inlined: false,
                offset: Some(*addr),
            }],
            NormFrame::Truncated(why) => vec![Frame {
                function: Some(format!("[truncated: {}]", stop_reason(*why))),
                module: None,
                file: None,
                line: None,
                kind: FrameKind::Native,
                inlined: false,
                offset: None,
            }],
            NormFrame::Lost => vec![Frame {
                function: Some("[stack lost]".into()),
                module: None,
                file: None,
                line: None,
                kind: FrameKind::Native,
                inlined: false,
                offset: None,
            }],
        }
    }
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
