//! CPython behind the runtime seam: found at attach and registered for
//! the kernel's Python walker, its recorded frames resolved while the
//! process lives.

use std::{collections::HashMap, num::NonZeroU32};

use tracer_common::py_stop;

use super::*;
use crate::runtime::{
    AttachFailure, Attacher, Found, InterpStack, Language, RawInterpFrame, Runtime, RuntimeFrame,
    Walker,
};

/// The native frame that runs Python frames in CPython 3.8-3.13.
pub const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

/// CPython in the traced processes.
#[derive(Debug, Default)]
pub struct Python {
    /// What each object says about a CPython in it, by (device, inode).
    objects: HashMap<(String, u64), Option<PyObjectInfo>>,
    /// The interpreter per process, and its code objects read so far.
    code: CodeCache,
    /// Processes looked at whose interpreter was found.
    found: HashMap<u32, PyTarget>,
    /// Why Python frames are not shown, per process.
    notes: Vec<String>,
}

impl Python {
    /// The CPython found in a process.
    pub fn target(&self, pid: u32) -> Option<&PyTarget> {
        self.found.get(&pid)
    }
}

impl Runtime for Python {
    fn name(&self) -> &'static str {
        "python"
    }

    fn attach(
        &mut self,
        pid: NonZeroU32,
        maps: &[MapEntry],
        kernel: &mut dyn Attacher,
    ) -> Result<Found, AttachFailure> {
        let pid = pid.get();
        if self.found.contains_key(&pid) {
            return Ok(Found::default());
        }
        let cache = &mut self.objects;
        let found = detect(
            maps,
            |m| {
                cache
                    .entry((m.dev.clone(), m.inode))
                    .or_insert_with(|| {
                        let open = m.open_path(pid)?;
                        inspect_object(&open, m.path.as_deref().unwrap_or_default())
                    })
                    .clone()
            },
            |object| version_from_memory(pid, maps, object),
        );
        let Some(target) = found else {
            return Ok(Found::default());
        };
        log::debug!(
            "pid {pid}: Python {} in {}, _PyRuntime at {:#x}",
            target.version_string(),
            target.object,
            target.runtime_addr
        );
        if let Some(note) = target.missing_layout_note(pid) {
            self.notes.push(note);
        } else if kernel.fsbase_offset() == 0 {
            self.notes.push(format!(
                "process {pid} runs Python {}, but the kernel's BTF does not describe \
                 task_struct.thread.fsbase: its stacks show native frames only",
                target.version_string()
            ));
        } else if let Some(entry) = target.kernel_entry() {
            if let Err(e) = kernel.register_walker(pid, &Walker::Python(entry)) {
                self.notes.push(format!(
                    "process {pid} runs Python {}, but it could not be registered \
                     for Python frames: {e}",
                    target.version_string()
                ));
            }
        }
        self.code.set_target(pid, target.clone());
        self.found.insert(pid, target);
        Ok(Found::default())
    }

    fn detach(&mut self, pid: u32, kernel: &mut dyn Attacher) {
        if self.found.remove(&pid).is_some() {
            kernel.unregister_walker(pid, tracer_common::runtime::PYTHON);
        }
    }

    /// Code objects read stay until the process's rows go: a stack first
    /// read after the process exited resolves from them.
    fn forget(&mut self, pid: u32) {
        self.code.forget(pid);
    }

    fn walker_id(&self) -> Option<u32> {
        Some(tracer_common::runtime::PYTHON)
    }

    /// Resolved now, because the code objects live in the process.
    fn frames(&mut self, pid: u32, frames: &[RawInterpFrame], stop: u32) -> InterpStack {
        let frames = frames
            .iter()
            .map(|f| {
                let frame = match self.code.code(pid, f.code) {
                    Ok(code) => RuntimeFrame::Code {
                        function: code.qualname.clone(),
                        file: code.filename.clone(),
                        line: code.line(f.pos),
                        language: Language::Python,
                    },
                    Err(reason) => RuntimeFrame::Marker {
                        text: format!("[python frame: {reason}]"),
                        offset: Some(f.code),
                    },
                };
                (frame, f.entry)
            })
            .collect();
        let tail = match stop {
            py_stop::DEPTH => Some("deeper than the frame limit"),
            py_stop::UNREADABLE => Some("interpreter memory unreadable"),
            _ => None,
        }
        .map(|why| RuntimeFrame::Marker {
            text: format!("[python stack truncated: {why}]"),
            offset: None,
        });
        InterpStack {
            frames,
            tail,
            eval_function: EVAL_FRAME,
        }
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_that_cannot_be_read_and_cut_walks_are_named() {
        let mut py = Python::default();
        let raw = [RawInterpFrame {
            code: 0x1234,
            pos: 4,
            entry: true,
        }];
        let stack = py.frames(1, &raw, py_stop::DEPTH);
        assert_eq!(stack.eval_function, EVAL_FRAME);
        assert_eq!(
            stack.frames,
            vec![(
                RuntimeFrame::Marker {
                    text: "[python frame: interpreter not registered]".into(),
                    offset: Some(0x1234),
                },
                true
            )]
        );
        assert_eq!(
            stack.tail,
            Some(RuntimeFrame::Marker {
                text: "[python stack truncated: deeper than the frame limit]".into(),
                offset: None,
            })
        );
        assert_eq!(py.frames(1, &raw, py_stop::COMPLETE).tail, None);
    }
}
