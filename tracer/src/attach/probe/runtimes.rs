//! What the runtimes attach through ([`Attacher`]): entry probes on their
//! functions, and their kernel walkers' per-process layouts plus the
//! `RUNTIMES` entry that sends a process's stacks to its walker.

use super::*;
use crate::runtime::{Attacher, Walker};
use tracer_common::LuaProc;

impl Attacher for Probes {
    fn entry_probe(
        &mut self,
        pid: NonZeroU32,
        program: &'static str,
        open_path: &Path,
        offset: u64,
    ) -> Result<(), String> {
        if self.walkers_only {
            return Err(NO_PROBES.into());
        }
        self.attach_one(program, offset, open_path, pid)
            .map_err(|e| attach_reason(&e))
    }

    fn allocator_probe(
        &mut self,
        pid: NonZeroU32,
        program: &'static str,
        open_path: &Path,
        offset: u64,
        code: &[u8],
    ) -> Result<u64, String> {
        if self.walkers_only {
            return Err(NO_PROBES.into());
        }
        // As for malloc: one trap serves the entry and the return probe.
        let at = if self.options.free_at_entry {
            0
        } else {
            prologue::alloc_probe_offset(code)
        };
        self.attach_one(program, offset + at, open_path, pid)
            .and_then(|()| self.attach_one(EXIT_PROGRAM, offset + at, open_path, pid))
            .map_err(|e| attach_reason(&e))?;
        Ok(at)
    }

    fn free_probe(
        &mut self,
        pid: NonZeroU32,
        program: &'static str,
        open_path: &Path,
        offset: u64,
        code: &[u8],
        pointer_arg: usize,
    ) -> Result<u64, String> {
        if self.walkers_only {
            return Err(NO_PROBES.into());
        }
        let at = if self.options.free_at_entry {
            0
        } else {
            prologue::free_probe_offset_of(code, pointer_arg)
        };
        self.attach_one(program, offset + at, open_path, pid)
            .map_err(|e| attach_reason(&e))?;
        Ok(at)
    }

    fn register_walker(&mut self, pid: u32, walker: &Walker) -> Result<(), String> {
        match walker {
            Walker::Lua(layout) => insert(self, maps::LUA_PROCS, pid, layout)?,
            Walker::Python(layout) => insert(self, maps::PY_PROCS, pid, layout)?,
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
        match runtime {
            tracer_common::runtime::PYTHON => remove::<PyProc>(self, maps::PY_PROCS, pid),
            tracer_common::runtime::LUA => remove::<LuaProc>(self, maps::LUA_PROCS, pid),
            _ => {}
        }
    }

    fn fsbase_offset(&self) -> u32 {
        self.fsbase_offset
    }

    fn probes_allowed(&self) -> bool {
        !self.walkers_only
    }
}

const NO_PROBES: &str = "a watched process (node mode) gets no probes";

/// A walker's per-process layout into its map.
fn insert<V: aya::Pod>(probes: &mut Probes, map: &str, pid: u32, layout: &V) -> Result<(), String> {
    let m = probes
        .ebpf
        .map_mut(map)
        .ok_or_else(|| format!("map {map} missing"))?;
    BpfHashMap::<&mut MapData, u32, V>::try_from(m)
        .map_err(|e| e.to_string())?
        .insert(pid, layout, 0)
        .map_err(|e| e.to_string())
}

fn remove<V: aya::Pod>(probes: &mut Probes, map: &str, pid: u32) {
    if let Some(Ok(mut m)) = probes
        .ebpf
        .map_mut(map)
        .map(BpfHashMap::<&mut MapData, u32, V>::try_from)
    {
        let _ = m.remove(&pid);
    }
}
