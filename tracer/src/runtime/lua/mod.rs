//! LuaJIT 2.1 (OpenResty's luajit2 and upstream 2.1; GC64 x86-64 builds),
//! the runtime of nginx's Lua module and OpenResty.
//!
//! - `code`: what the library's machine code says (it is stripped of its
//!   internal symbols): the allocator `lj_alloc_f` and the three functions
//!   it dispatches to, the interpreter's range, the FFI call.
//! - `vm`: the process's VMs (`global_State`s), found in its memory, and
//!   the layout the kernel's Lua walker reads.
//! - `frames`: a recorded `(GCproto, position)` as `function at
//!   chunk:line`.
//! - `seam`: all of it behind [`crate::runtime::Runtime`].

pub mod code;
pub mod frames;
mod seam;
pub mod vm;

pub use seam::{Lua, LuajitSymbols, EVAL_FRAME};
