//! A stripped Go executable's own symbol table: `.gopclntab` names its
//! functions, files and lines (with inlined calls) where the ELF file has
//! no `.symtab` (the few dynamic symbols of a cgo build would name them
//! wrongly).

use std::path::Path;

use object::Object as _;

use super::pclntab::{GoTable, PclnError};
use crate::{
    runtime::{CodeFrame, Language, ObjectSymbols},
    sys::elf::{segments_of, vaddr_of_file_offset, Segment},
};

/// `.gopclntab` and the load segments of a stripped Go executable (frames
/// arrive as file offsets, the table speaks virtual addresses).
pub struct StrippedTable {
    table: GoTable,
    segments: Vec<Segment>,
}

impl StrippedTable {
    /// `None` unless `path` is an ELF file with `.gopclntab` and no
    /// `.symtab`; a table that does not parse is logged and skipped
    /// (frames then stay `[module+offset]`).
    pub fn load(path: &Path) -> Option<Self> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        if file.section_by_name(".symtab").is_some() {
            return None;
        }
        match GoTable::from_elf(&data) {
            Ok(table) => Some(Self {
                table,
                segments: segments_of(&file)
                    .into_iter()
                    .filter(|s| s.executable)
                    .collect(),
            }),
            Err(PclnError::NoSection) => None,
            Err(e) => {
                log::warn!("{}: {e}; its Go frames stay unnamed", path.display());
                None
            }
        }
    }
}

impl ObjectSymbols for StrippedTable {
    fn language(&self) -> Option<Language> {
        Some(Language::Go)
    }

    fn frames(&self, file_offset: u64) -> Option<Vec<CodeFrame>> {
        let vaddr = vaddr_of_file_offset(&self.segments, file_offset)?;
        let frames = self.table.frames(vaddr.checked_sub(1)?);
        if frames.is_empty() {
            return None;
        }
        Some(
            frames
                .into_iter()
                .map(|f| CodeFrame {
                    function: f.function,
                    file: f.file,
                    line: f.line,
                    inlined: f.inlined,
                })
                .collect(),
        )
    }
}
