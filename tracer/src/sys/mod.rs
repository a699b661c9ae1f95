//! System helpers every room may use, and that use no room: `/proc` (maps,
//! memory, comm, kernel release), ELF objects (functions, segments),
//! cgroup mounts, and the kernel's BTF.

pub mod btf;
pub mod bytes;
pub mod cgroupfs;
pub mod elf;
pub mod procfs;
