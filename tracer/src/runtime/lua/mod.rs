//! LuaJIT (OpenResty's luajit2 and upstream 2.1, GC64 x86-64): what
//! leaktrace needs to trace a Lua heap. `code` reads a library's (or a
//! statically linked executable's) machine code: the VM's default
//! allocator `lj_alloc_f` and the three functions it dispatches to, the
//! interpreter blob `lj_vm` and the FFI call trampoline, all found
//! without internal symbols.

pub mod code;
