//! What the runtimes attach through ([`Attacher`]): entry probes on their
//! functions, and their kernel walkers' per-process layouts plus the
//! `RUNTIMES` entry that sends a process's stacks to its walker.

use super::*;
use crate::runtime::{Attacher, Walker};

impl Attacher for Probes {
    fn entry_probe(
        &mut self,
        pid: NonZeroU32,
        program: &'static str,
        open_path: &Path,
        offset: u64,
    ) -> Result<(), String> {
        self.attach_one(program, offset, open_path, pid)
            .map_err(|e| attach_reason(&e))
    }

    fn register_walker(&mut self, pid: u32, walker: &Walker) -> Result<(), String> {
        match walker {
            Walker::Python(layout) => {
                let map = self
                    .ebpf
                    .map_mut(maps::PY_PROCS)
                    .ok_or_else(|| format!("map {} missing", maps::PY_PROCS))?;
                BpfHashMap::<&mut MapData, u32, PyProc>::try_from(map)
                    .map_err(|e| e.to_string())?
                    .insert(pid, layout, 0)
                    .map_err(|e| e.to_string())?;
            }
        }
        // The native walk hands this process to the runtime's walker.
        if let Some(Ok(mut rt)) = self
            .ebpf
            .map_mut(maps::RUNTIMES)
            .map(BpfHashMap::<&mut MapData, u32, u32>::try_from)
        {
            rt.insert(pid, walker.id(), 0).map_err(|e| e.to_string())?;
        }
        if let Some(Ok(mut any)) = self
            .ebpf
            .map_mut(maps::RUNTIME_ANY)
            .map(Array::<&mut MapData, u32>::try_from)
        {
            let _ = any.set(0, 1, 0);
        }
        Ok(())
    }

    fn unregister_walker(&mut self, pid: u32, runtime: u32) {
        let layouts = match runtime {
            tracer_common::runtime::PYTHON => maps::PY_PROCS,
            _ => return,
        };
        if let Some(Ok(mut m)) = self
            .ebpf
            .map_mut(layouts)
            .map(BpfHashMap::<&mut MapData, u32, PyProc>::try_from)
        {
            let _ = m.remove(&pid);
        }
    }

    fn fsbase_offset(&self) -> u32 {
        self.fsbase_offset
    }
}
