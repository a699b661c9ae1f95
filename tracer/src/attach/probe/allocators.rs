//! Allocator entry points: which names to look for, where in each function
//! to put the probe (`prologue`), and the uprobe links per process.

use super::*;

impl Probes {
    /// Every symbol name probed: each function under each prefix.
    pub(super) fn wanted_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for prefix in KNOWN_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(self.options.extra_prefixes.iter().cloned())
        {
            for (f, _) in ALLOCATOR_FUNCTIONS {
                if prefix.is_empty() && UNPREFIXED_SKIP.contains(f) {
                    continue;
                }
                names.push(format!("{prefix}{f}"));
            }
        }
        if self.options.pymalloc {
            names.extend(PYMALLOC_FUNCTIONS.iter().map(|(n, _)| n.to_string()));
        }
        names
    }

    pub(super) fn attach_object(
        &mut self,
        pid: NonZeroU32,
        path: &str,
        open_path: &Path,
        functions: &HashMap<String, elf::Function>,
    ) -> Result<Vec<AttachedFunction>, ProbeError> {
        let mut done: Vec<AttachedFunction> = Vec::new();
        let mut offsets_done: Vec<u64> = Vec::new();
        let prefixes: Vec<String> = KNOWN_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(self.options.extra_prefixes.iter().cloned())
            .collect();
        let mut candidates: Vec<(String, Role)> = prefixes
            .iter()
            .flat_map(|prefix| {
                ALLOCATOR_FUNCTIONS
                    .iter()
                    .map(move |(base, role)| (format!("{prefix}{base}"), *role))
            })
            .collect();
        if self.options.pymalloc {
            candidates.extend(PYMALLOC_FUNCTIONS.iter().map(|(n, r)| (n.to_string(), *r)));
        }
        for (name, role) in candidates {
            let Some(func) = functions.get(&name) else {
                continue;
            };
            // Aliases (memalign = aligned_alloc in glibc, malloc =
            // je_malloc in some builds) are probed once.
            if offsets_done.contains(&func.file_offset) {
                continue;
            }
            offsets_done.push(func.file_offset);
            let err = |e: ProgramError| ProbeError::Attach {
                pid: pid.get(),
                function: name.clone(),
                object: path.to_string(),
                reason: attach_reason(&e),
            };
            let offset = match role {
                Role::Alloc(entry) => {
                    // Entry and return probe share one trap; the
                    // return probe needs [%rsp] to still be the return
                    // address, which alloc_probe_offset guarantees.
                    let off = if self.options.free_at_entry {
                        0
                    } else {
                        prologue::alloc_probe_offset(&func.code)
                    };
                    self.attach_one(entry, func.file_offset + off, open_path, pid)
                        .map_err(err)?;
                    self.attach_one(EXIT_PROGRAM, func.file_offset + off, open_path, pid)
                        .map_err(err)?;
                    off
                }
                Role::Free(entry) => {
                    let off = if self.options.free_at_entry {
                        0
                    } else {
                        prologue::free_probe_offset(&func.code)
                    };
                    self.attach_one(entry, func.file_offset + off, open_path, pid)
                        .map_err(err)?;
                    off
                }
            };
            done.push(AttachedFunction { name, offset });
        }
        Ok(done)
    }

    pub(super) fn attach_one(
        &mut self,
        program: &'static str,
        file_offset: u64,
        target: &Path,
        pid: NonZeroU32,
    ) -> Result<(), ProgramError> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        let link = prog.attach(
            UProbeAttachLocation::AbsoluteOffset(file_offset),
            PathBuf::from(target),
            UProbeScope::OneProcess(pid),
        )?;
        self.links
            .entry(pid.get())
            .or_default()
            .push((program, link));
        Ok(())
    }
}
