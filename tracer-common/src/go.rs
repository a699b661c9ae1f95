//! The Go runtime's profile buckets (`GO_BUCKETS`).

use core::mem::size_of;

/// Key of `GO_BUCKETS`: a Go runtime profile bucket (`*runtime.bucket`,
/// which holds the allocation stack) in one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GoBucketKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Address of the bucket in the process.
    pub bucket: u64,
}
const _: () = assert!(size_of::<GoBucketKey>() == 16);

/// Byte offset of `size` (bytes per object) in a Go `runtime.bucket`
/// (Go 1.17-1.25).
pub const GO_BUCKET_SIZE_OFFSET: u64 = 32;
