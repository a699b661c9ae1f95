//! Unwind: the user-space half of the in-kernel unwinder.
//!
//! `table` turns an object's DWARF call-frame information (`.eh_frame`,
//! `.debug_frame`) into the compact rows the kernel's walker searches
//! (`UNWIND_ROWS`), with the stack-switch rules Go's runtime needs. It may
//! import `sys` (ELF) and `runtime::go::pclntab` (where Go switches
//! stacks); `attach` loads its tables into the kernel.

pub mod table;
