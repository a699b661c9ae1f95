//! An object file's bytes, mapped rather than read: parsing the unwind
//! tables of every process on a node reads objects of hundreds of MiB
//! (a compiler's driver library, a browser), and a copy of each on the
//! heap made leaktrace's peak memory several times its steady one, over
//! the memory limit its systemd unit and DaemonSet set. Mapped pages are
//! the page cache's, which the kernel reclaims under pressure.

use std::{fs::File, io, ops::Deref, path::Path};

/// The bytes of a file, read-only.
pub struct FileBytes(Inner);

enum Inner {
    Mapped(memmap2::Mmap),
    /// Files that cannot be mapped (empty ones, some pseudo files).
    Read(Vec<u8>),
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Mapped(m) => m,
            Inner::Read(v) => v,
        }
    }
}

/// Map `path` read-only (read it when it cannot be mapped).
pub fn file_bytes(path: &Path) -> io::Result<FileBytes> {
    let file = File::open(path)?;
    // SAFETY: a private read-only mapping. An object rewritten in place
    // while mapped could change under the parser (or fault past its new
    // end); package managers and linkers replace files by rename, which
    // leaves this mapping on the old inode.
    match unsafe { memmap2::Mmap::map(&file) } {
        Ok(m) => Ok(FileBytes(Inner::Mapped(m))),
        Err(_) => std::fs::read(path).map(|v| FileBytes(Inner::Read(v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_file_reads_as_its_bytes() {
        let exe = std::env::current_exe().expect("own executable");
        let mapped = file_bytes(&exe).expect("map");
        let read = std::fs::read(&exe).expect("read");
        assert_eq!(&*mapped, &read[..]);
        assert!(file_bytes(Path::new("/leaktrace-no-such-file")).is_err());
    }
}
