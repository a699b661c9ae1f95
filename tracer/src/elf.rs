//! Finding functions in ELF objects: their file offsets (what uprobes are
//! attached by) and their first bytes (what the prologue decoder reads).

use std::{collections::HashMap, fs, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// A function defined in an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// File offset of the first instruction.
    pub file_offset: u64,
    pub size: u64,
    /// Up to the first 64 bytes of code.
    pub code: Vec<u8>,
}

/// The functions an object defines among `wanted`, by name. Both the dynamic
/// symbol table and `.symtab` (when present) are searched, so a statically
/// linked allocator in a main binary is found too.
pub fn find_functions(path: &Path, wanted: &[&str]) -> Result<HashMap<String, Function>, ElfError> {
    let data = fs::read(path).map_err(|source| ElfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let file = object::File::parse(&*data).map_err(|e| ElfError::Parse {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut found = HashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.kind() != object::SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // `malloc@@GLIBC_2.2.5` style names come without the version here.
        let name = name.split('@').next().unwrap_or(name);
        if !wanted.contains(&name) || found.contains_key(name) {
            continue;
        }
        let Some(section) = sym
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((sec_off, sec_size)) = section.file_range() else {
            continue;
        };
        let Some(rel) = sym.address().checked_sub(section.address()) else {
            continue;
        };
        if rel >= sec_size {
            continue;
        }
        let file_offset = sec_off + rel;
        let start = file_offset as usize;
        let end = (start + 64)
            .min((sec_off + sec_size) as usize)
            .min(data.len());
        found.insert(
            name.to_string(),
            Function {
                file_offset,
                size: sym.size(),
                code: data.get(start..end).unwrap_or_default().to_vec(),
            },
        );
    }
    Ok(found)
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse ELF object {path}: {reason}")]
    Parse { path: String, reason: String },
}
