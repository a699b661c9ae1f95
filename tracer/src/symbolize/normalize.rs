//! Normalizing stacks while their process lives: each address becomes an
//! `(object, file offset)` by the process's memory map (the object kept
//! open), interpreter frames are resolved, and identical stacks across
//! processes are interned once.

use super::*;

/// An object file seen in some traced process.
#[derive(Debug)]
pub struct Module {
    /// Path as the process sees it.
    pub path: String,
    /// Path blazesym reads: the real path when it is the same file in our
    /// mount namespace, else `/proc/self/fd/N` of the kept descriptor.
    pub(super) read_path: PathBuf,
    pub(super) _file: Option<File>,
}

#[derive(Debug, Default)]
pub struct Normalizer {
    pub modules: Vec<Module>,
    pub(super) module_ids: HashMap<(String, u64, String), u32>,
    pub(super) stacks: Vec<Vec<NormFrame>>,
    pub(super) stack_ids: HashMap<Vec<NormFrame>, StackIdx>,
    pub(super) resolved: HashMap<(u32, StackId), StackIdx>,
    pub(super) maps: HashMap<u32, Vec<MapEntry>>,
    /// Modules that stacks of a runtime's own rows pass through, with the
    /// runtime's language (Go code: frames of kind "go").
    pub(super) row_modules: HashMap<u32, Language>,
    /// Stacks of a runtime's own rows (Go profile buckets), with the
    /// prefix of the runtime's frames dropped from their allocation end,
    /// as `runtime/pprof` drops `runtime.*`.
    pub(super) runtime_stacks: HashMap<StackIdx, &'static str>,
}

impl Normalizer {
    /// The stack for kernel row `(tgid, stack_id)`, normalizing it on first
    /// sight with `raw` (innermost first) and the process's current map.
    pub fn resolve(
        &mut self,
        tgid: u32,
        stack_id: StackId,
        runtimes: &mut Runtimes,
        raw: impl FnOnce() -> Option<RawStack>,
    ) -> StackIdx {
        if let Some(idx) = self.resolved.get(&(tgid, stack_id)) {
            return *idx;
        }
        let frames = match (stack_id != STACK_LOST).then(raw).flatten() {
            Some(raw) if !raw.ips.is_empty() => {
                let why = raw.stop;
                log::trace!(
                    "stack {stack_id:#x} of {tgid}: stop {why}, ips {:x?}, interp {:x?} (stop {})",
                    raw.ips,
                    raw.interp.frames,
                    raw.interp.stop
                );
                let mut frames = self.normalize(tgid, &raw.ips);
                let ended_in_anon = matches!(frames.last(), Some(NormFrame::Anonymous { .. }));
                if why != stop::COMPLETE && !ended_in_anon {
                    frames.push(NormFrame::Truncated(why));
                }
                Self::interp_frames(tgid, &raw, runtimes, &mut frames);
                frames
            }
            _ => vec![NormFrame::Lost],
        };
        let idx = self.intern(frames);
        self.resolved.insert((tgid, stack_id), idx);
        idx
    }

    /// The stack of a runtime's own row (a Go profile bucket): `pcs` are
    /// return PCs, innermost first, read from the process (which must
    /// still live); `code` says whose code they are.
    pub fn intern_pcs(&mut self, tgid: u32, pcs: &[u64], code: RowCode) -> StackIdx {
        let frames = if pcs.is_empty() {
            vec![NormFrame::Lost]
        } else {
            self.normalize(tgid, pcs)
        };
        for f in &frames {
            if let NormFrame::Object { module, .. } = f {
                self.row_modules.insert(*module, code.language);
            }
        }
        let idx = self.intern(frames);
        self.runtime_stacks.insert(idx, code.drop_prefix);
        idx
    }

    /// Stack `idx` with `label` on its allocation end: the same code, but
    /// memory of another kind, in a row of its own.
    pub fn labelled(&mut self, idx: StackIdx, label: &'static str) -> StackIdx {
        let mut frames = vec![NormFrame::Label(label)];
        frames.extend(self.stacks.get(idx as usize).cloned().unwrap_or_default());
        self.intern(frames)
    }

    /// The language of a module's code, when a runtime's rows said.
    pub fn module_language(&self, module: u32) -> Option<Language> {
        self.row_modules.get(&module).copied()
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
    }

    /// Interpreter frames go after the native ones (the symbolizer puts
    /// them in place), resolved now by their runtime because what they
    /// point to lives in the process.
    fn interp_frames(
        tgid: u32,
        raw: &RawStack,
        runtimes: &mut Runtimes,
        frames: &mut Vec<NormFrame>,
    ) {
        let Some(interp) = runtimes.frames(
            tgid,
            raw.interp.runtime,
            &raw.interp.frames,
            raw.interp.stop,
        ) else {
            return;
        };
        let eval = interp.eval_function;
        for (frame, entry) in interp.frames {
            frames.push(NormFrame::Interp { frame, entry, eval });
        }
        if let Some(frame) = interp.tail {
            frames.push(NormFrame::InterpTail { frame, eval });
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
