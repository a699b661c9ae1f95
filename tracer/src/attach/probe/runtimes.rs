//! What the runtimes need attached in a process: entry probes on the Go
//! runtime's profiling hooks (and its buckets walked at attach), a CPython's
//! layout for the kernel's Python walker, and the `RUNTIMES` registration
//! that sends a process's stacks to its runtime's walker.

use super::*;

/// The first 16 bytes of the function at file offset `offset` of `path`.
pub(super) fn go_code(path: &Path, offset: u64) -> Option<[u8; 16]> {
    use std::os::unix::fs::FileExt as _;
    let mut code = [0u8; 16];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut code, offset)
        .ok()?;
    Some(code)
}

impl Probes {
    /// The Go runtimes traced, per process.
    pub fn go_targets(&self) -> impl Iterator<Item = (u32, &go::GoTarget)> {
        self.go.iter().map(|(p, t)| (*p, t))
    }

    /// Entry probes on the Go runtime's profiling hooks in a Go executable,
    /// or why not (`Ok(Err(reason))`): the version's registers are
    /// unknown, the binary is stripped, the functions are missing.
    pub(super) fn attach_go(
        &mut self,
        pid: NonZeroU32,
        m: &procfs::MapEntry,
        path: &str,
        open_path: &Path,
        info: &go::GoObjectInfo,
    ) -> Result<Result<Vec<AttachedFunction>, String>, ProbeError> {
        if let Some(why) = info.refusal(path) {
            return Ok(Err(why));
        }
        let Some(mut target) = go::GoTarget::new(m, info) else {
            return Ok(Err(format!(
                "{path} ({}): its mapping at {:#x} matches no load segment",
                info.version, m.start
            )));
        };
        let mut done = Vec::new();
        for (function, program, offset) in [
            (
                "runtime.setprofilebucket",
                "go_setprofilebucket",
                info.setprofilebucket,
            ),
            ("runtime.mProf_Free", "go_mprof_free", info.mprof_free),
        ] {
            let Some(offset) = offset else { continue };
            // Past the stack check, at the emulated `PUSHQ BP` (Go 1.21+):
            // no single-step per sampled object.
            let skip = go_code(open_path, offset)
                .map_or(0, |code| crate::attach::prologue::go_probe_offset(&code));
            self.attach_one(program, offset + skip, open_path, pid)
                .map_err(|e| ProbeError::Attach {
                    pid: pid.get(),
                    function: function.to_string(),
                    object: path.to_string(),
                    reason: attach_reason(&e),
                })?;
            done.push(AttachedFunction {
                name: function.to_string(),
                offset: skip,
            });
        }
        let pid = pid.get();
        match target.rate(pid) {
            Ok(0) => {
                if let Some(rate) = self.options.go_enable_profiling {
                    match target.set_rate(pid, rate) {
                        Ok(()) => eprintln!(
                            "leaktrace: wrote runtime.MemProfileRate = {rate} into process {pid} \
                             ({path}, {}): this changes the target; its Go runtime samples heap \
                             allocations from now on",
                            target.version
                        ),
                        Err(e) => self.go_notes.push(format!(
                            "process {pid}: failed to write runtime.MemProfileRate through \
                             /proc/{pid}/mem: {e}"
                        )),
                    }
                }
            }
            Ok(rate) => log::debug!("pid {pid}: {} MemProfileRate {rate}", target.version),
            Err(e) => log::warn!("pid {pid}: runtime.MemProfileRate unreadable: {e}"),
        }
        // Right after the probes are in: what was allocated before, and
        // the runtime's figures to compare later ones with.
        target.walk(pid);
        target.at_attach = (
            std::time::Instant::now(),
            crate::runtime::go::stats::read(pid, &target.stats),
        );
        match &target.baseline_error {
            None => log::debug!(
                "pid {pid}: {} Go profile buckets live at attach",
                target.baseline.len()
            ),
            Some(why) => self.go_notes.push(format!(
                "process {pid}: Go objects allocated before leaktrace attached are not shown \
                 (the runtime's profile buckets could not be walked: {why})"
            )),
        }
        self.go.insert(pid, target);
        Ok(Ok(done))
    }

    /// The CPython running in a process, if any was found.
    pub fn python_target(&self, pid: u32) -> Option<&python::PyTarget> {
        self.python.get(&pid)
    }

    /// Find a CPython in the process; give the kernel walk its layout, or
    /// note why its Python frames cannot be shown.
    pub(super) fn register_python(&mut self, pid: u32, maps: &[procfs::MapEntry]) {
        if self.python.contains_key(&pid) {
            return;
        }
        let cache = &mut self.python_objects;
        let found = python::detect(
            maps,
            |m| {
                cache
                    .entry((m.dev.clone(), m.inode))
                    .or_insert_with(|| {
                        let open = m.open_path(pid)?;
                        python::inspect_object(&open, m.path.as_deref().unwrap_or_default())
                    })
                    .clone()
            },
            |object| python::version_from_memory(pid, maps, object),
        );
        let Some(target) = found else { return };
        log::debug!(
            "pid {pid}: Python {} in {}, _PyRuntime at {:#x}",
            target.version_string(),
            target.object,
            target.runtime_addr
        );
        if let Some(note) = target.missing_layout_note(pid) {
            self.python_notes.push(note);
        } else if self.fsbase_offset == 0 {
            self.python_notes.push(format!(
                "process {pid} runs Python {}, but the kernel's BTF does not describe \
                 task_struct.thread.fsbase: its stacks show native frames only",
                target.version_string()
            ));
        } else if let Some(entry) = target.kernel_entry() {
            let mut registered = false;
            if let Some(map) = self.ebpf.map_mut(maps::PY_PROCS) {
                if let Ok(mut pp) = BpfHashMap::<&mut MapData, u32, PyProc>::try_from(map) {
                    let res = pp.insert(pid, entry, 0);
                    registered = res.is_ok();
                    if let Err(e) = res {
                        self.python_notes.push(format!(
                            "process {pid} runs Python {}, but it could not be registered \
                             for Python frames: {e}",
                            target.version_string()
                        ));
                    }
                }
            }
            // The native walk hands this process to the Python walker.
            if registered {
                self.register_runtime(pid, tracer_common::runtime::PYTHON);
            }
        }
        self.python.insert(pid, target);
    }

    /// Tell the kernel that `pid`'s stacks continue in `runtime`'s walker
    /// (`tracer_common::runtime`), and that some process now has one.
    pub(super) fn register_runtime(&mut self, pid: u32, runtime: u32) {
        if let Some(Ok(mut rt)) = self
            .ebpf
            .map_mut(maps::RUNTIMES)
            .map(BpfHashMap::<&mut MapData, u32, u32>::try_from)
        {
            let _ = rt.insert(pid, runtime, 0);
        }
        if let Some(Ok(mut any)) = self
            .ebpf
            .map_mut(maps::RUNTIME_ANY)
            .map(Array::<&mut MapData, u32>::try_from)
        {
            let _ = any.set(0, 1, 0);
        }
    }
}
