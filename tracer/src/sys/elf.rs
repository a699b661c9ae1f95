//! Finding functions in ELF objects: their file offsets (what uprobes are
//! attached by) and their first bytes (what the prologue decoder reads).

use std::{collections::HashMap, path::Path};

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

/// The bytes of the object at `path`.
fn read(path: &Path) -> Result<super::bytes::FileBytes, ElfError> {
    super::bytes::file_bytes(path).map_err(|source| ElfError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// `data` parsed as an object, named by `path` in the error.
fn parse<'d>(path: &Path, data: &'d [u8]) -> Result<object::File<'d>, ElfError> {
    object::File::parse(data).map_err(|e| ElfError::Parse {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The functions an object defines among `wanted`, by name. Both the dynamic
/// symbol table and `.symtab` (when present) are searched, so a statically
/// linked allocator in a main binary is found too.
pub fn find_functions(path: &Path, wanted: &[&str]) -> Result<HashMap<String, Function>, ElfError> {
    let data = read(path)?;
    let file = parse(path, &data)?;
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

/// The `PT_LOAD` segments of a parsed object.
pub fn segments_of(file: &object::File<'_>) -> Vec<Segment> {
    use object::{Object as _, ObjectSegment as _};
    file.segments()
        .map(|segment| {
            let (file_offset, file_size) = segment.file_range();
            let executable = match segment.flags() {
                object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => false,
            };
            Segment {
                file_offset,
                vaddr: segment.address(),
                file_size,
                executable,
            }
        })
        .collect()
}

/// One `PT_LOAD` program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub file_offset: u64,
    pub vaddr: u64,
    pub file_size: u64,
    pub executable: bool,
}

/// The `PT_LOAD` program headers of the object at `path`, in file order.
pub fn load_segments(path: &Path) -> Result<Vec<Segment>, ElfError> {
    let data = read(path)?;
    let file = parse(path, &data)?;
    Ok(segments_of(&file))
}

/// The virtual address of an executable mapping's `file_offset`: a page
/// that two segments share (the read-only one and the start of the text)
/// is the text's, so executable segments are asked first.
pub fn exec_vaddr_of_file_offset(segments: &[Segment], file_offset: u64) -> Option<u64> {
    let text: Vec<Segment> = segments.iter().filter(|s| s.executable).copied().collect();
    vaddr_of_file_offset(&text, file_offset).or_else(|| vaddr_of_file_offset(segments, file_offset))
}

/// The ELF virtual address that `file_offset` is loaded at, so that a
/// mapping's load bias is `map.start - vaddr_of_file_offset(map.offset)`.
///
/// A segment whose `p_offset` is not page-aligned is mapped from the page
/// below it (4 KiB pages, as on x86-64), so an offset in that page belongs
/// to it too, unless the previous segment's bytes hold it.
pub fn vaddr_of_file_offset(segments: &[Segment], file_offset: u64) -> Option<u64> {
    const PAGE_MASK: u64 = !0xfff;
    let translate = |s: &Segment| {
        s.vaddr
            .wrapping_add(file_offset.wrapping_sub(s.file_offset))
    };
    let end = |s: &Segment| s.file_offset.saturating_add(s.file_size);
    segments
        .iter()
        .find(|s| s.file_offset <= file_offset && file_offset < end(s))
        .or_else(|| {
            segments
                .iter()
                .find(|s| s.file_offset & PAGE_MASK <= file_offset && file_offset < end(s))
        })
        .map(translate)
}

/// A section's address and its bytes (borrowed, or inflated).
pub type SectionBytes<'d> = (u64, std::borrow::Cow<'d, [u8]>);

/// The address and bytes of section `name`, if the object has it. A
/// zlib-compressed section (`SHF_COMPRESSED`; the Go linker compresses
/// its `.debug_*` sections, `.debug_frame` included) is inflated.
pub fn section_bytes<'d>(
    file: &object::File<'d>,
    name: &str,
) -> Result<Option<SectionBytes<'d>>, String> {
    use object::{Object as _, ObjectSection as _};
    let Some(section) = file.section_by_name(name) else {
        return Ok(None);
    };
    let error = |reason: String| reason;
    let compressed = section
        .compressed_data()
        .map_err(|e| error(e.to_string()))?;
    let bytes = match compressed.format {
        object::CompressionFormat::None => std::borrow::Cow::Borrowed(compressed.data),
        object::CompressionFormat::Zlib => {
            use std::io::Read as _;
            let size = usize::try_from(compressed.uncompressed_size)
                .map_err(|_| error("implausible uncompressed size".to_string()))?;
            let mut out = Vec::with_capacity(size.min(1 << 30));
            flate2::read::ZlibDecoder::new(compressed.data)
                .take(compressed.uncompressed_size)
                .read_to_end(&mut out)
                .map_err(|e| error(format!("failed to inflate the section: {e}")))?;
            std::borrow::Cow::Owned(out)
        }
        _ => {
            return Err(error(
                "the section is compressed in a format other than zlib, which is not \
                 supported; decompress it with `objcopy --decompress-debug-sections`"
                    .to_string(),
            ))
        }
    };
    Ok(Some((section.address(), bytes)))
}
/// The GNU build id of an ELF file, in hex; `None` when the file cannot be
/// read or has none. Reads only the headers and the note.
pub fn build_id(path: &Path) -> Option<String> {
    use object::Object as _;
    let file = std::fs::File::open(path).ok()?;
    let cache = object::ReadCache::new(file);
    let obj = object::File::parse(&cache).ok()?;
    let id = obj.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn build_id_reads_an_elf_note() {
        // Debian links everything with --build-id; if this binary has
        // none, there is nothing to compare.
        let exe = std::env::current_exe().expect("test binary path");
        let Ok(out) = Command::new("readelf").arg("-n").arg(&exe).output() else {
            eprintln!("skipping build_id_reads_an_elf_note: readelf not found");
            return;
        };
        let notes = String::from_utf8_lossy(&out.stdout);
        let expected = notes
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .map(str::to_string);
        assert_eq!(build_id(&exe), expected);
        assert_eq!(build_id(Path::new("/nonexistent/leaktrace")), None);
    }
}
