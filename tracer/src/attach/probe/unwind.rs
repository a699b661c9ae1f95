//! The unwinder's inputs per process: each object's rows loaded once into
//! `UNWIND_ROWS`, the process's executable mappings in `PROC_MAPS`, and the
//! epoch that invalidates the kernel's per-CPU rule cache.

use super::*;

impl Probes {
    /// Give the unwinder this process's executable mappings, loading each
    /// new object's unwind table once.
    pub(super) fn register_unwind(&mut self, pid: u32, maps: &[procfs::MapEntry]) {
        let exec: Vec<&procfs::MapEntry> = maps
            .iter()
            .filter(|m| m.executable && m.path.is_some())
            .collect();
        let signature: Vec<(u64, u64)> = exec.iter().map(|m| (m.start, m.end)).collect();
        if self.registered.get(&pid) == Some(&signature) {
            return;
        }
        let mut entries: Vec<ExecMap> = Vec::with_capacity(exec.len());
        for m in &exec {
            let key = (m.dev.clone(), m.inode);
            if !self.unwind_objects.contains_key(&key) {
                let obj = self.load_unwind_object(pid, m);
                self.unwind_objects.insert(key.clone(), obj);
            }
            let Some(obj) = self.unwind_objects.get(&key) else {
                continue;
            };
            // A file page can belong to two segments (the end of the
            // read-only one and the start of the text): an executable
            // mapping is the text's.
            let Some(vaddr) = crate::sys::elf::exec_vaddr_of_file_offset(&obj.segments, m.offset)
            else {
                continue;
            };
            entries.push(ExecMap {
                start: m.start,
                end: m.end,
                bias: m.start.wrapping_sub(vaddr),
                rows_start: obj.rows_start,
                rows_len: obj.rows_len,
            });
        }
        entries.sort_by_key(|e| e.start);
        if entries.len() > MAX_PROC_MAPS {
            self.unwind_notes.too_many_mappings.push(pid);
            entries.truncate(MAX_PROC_MAPS);
        }
        let mut value = ProcMaps {
            len: entries.len() as u32,
            _pad: 0,
            maps: [ExecMap::default(); MAX_PROC_MAPS],
        };
        value.maps[..entries.len()].copy_from_slice(&entries);
        if let Some(map) = self.ebpf.map_mut(maps::PROC_MAPS) {
            if let Ok(mut pm) = BpfHashMap::<&mut MapData, u32, ProcMaps>::try_from(map) {
                if let Err(e) = pm.insert(pid, value, 0) {
                    log::warn!("failed to register the mappings of process {pid}: {e}");
                }
            }
        }
        self.bump_unwind_epoch();
        self.registered.insert(pid, signature);
    }

    pub(super) fn load_unwind_object(&mut self, pid: u32, m: &procfs::MapEntry) -> UnwindObject {
        let path = m.path.clone().unwrap_or_default();
        let Some(open) = m.open_path(pid) else {
            return UnwindObject::default();
        };
        let segments = match crate::sys::elf::load_segments(&open) {
            Ok(s) => s,
            Err(e) => {
                self.unwind_notes.unreadable.push(format!("{path}: {e}"));
                return UnwindObject::default();
            }
        };
        let table = match unwind_table::build(&open) {
            Ok(t) => t,
            Err(e) => {
                self.unwind_notes.unreadable.push(format!("{path}: {e}"));
                return UnwindObject {
                    segments,
                    ..Default::default()
                };
            }
        };
        let len = table.rows.len() as u32;
        if len == 0 {
            return UnwindObject {
                segments,
                ..Default::default()
            };
        }
        if self.unwind_next.saturating_add(len) > self.unwind_capacity {
            self.unwind_notes.table_full.push(path);
            return UnwindObject {
                segments,
                ..Default::default()
            };
        }
        let start = self.unwind_next;
        let Some(map) = self.ebpf.map_mut(maps::UNWIND_ROWS) else {
            return UnwindObject::default();
        };
        let Ok(mut rows) = Array::<&mut MapData, UnwindRow>::try_from(map) else {
            return UnwindObject::default();
        };
        for (i, row) in table.rows.iter().enumerate() {
            if rows.set(start + i as u32, *row, 0).is_err() {
                self.unwind_notes.table_full.push(path);
                return UnwindObject {
                    segments,
                    ..Default::default()
                };
            }
        }
        self.unwind_next += len;
        log::debug!("unwind table for {path}: {len} rows at {start}");
        UnwindObject {
            rows_start: start,
            rows_len: len,
            segments,
        }
    }

    /// `PROC_MAPS` changed: the kernel's per-CPU cache of unwind rules
    /// (keyed by process and pc) is stale. Called after the change, so a
    /// walk that read the old mappings cached them under the old epoch.
    pub(super) fn bump_unwind_epoch(&mut self) {
        // Never 0: the kernel treats epoch 0 as "do not cache".
        self.unwind_epoch = self.unwind_epoch.wrapping_add(1).max(1);
        let epoch = self.unwind_epoch;
        if let Some(map) = self.ebpf.map_mut(maps::UNWIND_EPOCH) {
            if let Ok(mut a) = Array::<&mut MapData, u32>::try_from(map) {
                if let Err(e) = a.set(0, epoch, 0) {
                    log::warn!("failed to update the unwinder's epoch: {e}");
                }
            }
        }
    }
}
