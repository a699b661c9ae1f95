//! A process's LuaJIT VMs: where each `global_State` is, found in the
//! process's memory by the allocator it names, and the layout the kernel
//! walker reads.
//!
//! Every VM that allocates through LuaJIT's own allocator keeps
//! `lj_alloc_f`'s address in `g->allocf`, the first word of its
//! `global_State`, which sits in the VM's first allocation (`GG_State`:
//! the main `lua_State`, then `g`). A word equal to that address in an
//! anonymous mapping is a VM when the rest of `GG_State` agrees:
//! `g->mainthref` is the `lua_State` just before `g`, that state's type
//! byte says thread, and its `glref` points back at `g`.

use tracer_common::{LuaProc, LUA_MAX_VMS};

use crate::sys::procfs::{self, MapEntry};

/// Field offsets of GC64 LuaJIT 2.1 on x86-64 (OpenResty's luajit2 and
/// upstream 2.1 agree on these): `global_State`, `lua_State`, the VM's C
/// frame (`vm_x64.dasc`), `GCfunc` and `GCproto` (`lj_obj.h`).
pub mod gc64 {
    pub const G_ALLOCF: u64 = 0x0;
    pub const G_ALLOCD: u64 = 0x8;
    /// `global_State.gc.currentwhite` and `.state` (`GCState` follows
    /// `allocd`: `total`, `threshold`, then these two bytes).
    pub const G_GC_WHITE: u32 = 0x20;
    pub const G_GC_STATE: u32 = 0x21;
    pub const G_VMSTATE: u32 = 0xb8;
    pub const G_MAINTHREF: u64 = 0xc0;
    pub const G_CUR_L: u32 = 0x170;
    pub const G_JIT_BASE: u32 = 0x178;
    /// `GCobj.gct`: the type byte of every collectable object.
    pub const GCT: u64 = 9;
    /// `~LJ_TTHREAD` and `~LJ_TPROTO`, as `gct` holds them.
    pub const GCT_THREAD: u8 = 6;
    pub const GCT_PROTO: u8 = 7;
    pub const L_GLREF: u64 = 0x10;
    pub const L_BASE: u32 = 0x20;
    pub const L_STACK: u32 = 0x38;
    pub const L_CFRAME: u32 = 0x50;
    pub const CFRAME_PC: u32 = 0x18;
    pub const CFRAME_PREV: u32 = 0x20;
    pub const CFRAME_RET: u32 = 0x48;
    pub const FUNC_FFID: u32 = 0xa;
    pub const FUNC_PC: u32 = 0x20;
    pub const PROTO_SIZEBC: u64 = 0xc;
    pub const PROTO_CHUNKNAME: u64 = 0x40;
    pub const PROTO_FIRSTLINE: u64 = 0x48;
    pub const PROTO_NUMLINE: u64 = 0x4c;
    pub const PROTO_LINEINFO: u64 = 0x50;
    pub const PROTO_SIZE: u32 = 0x68;
    /// `GCtrace`: type byte value, snapshot count, snapshots, their map,
    /// machine code size and start, number.
    pub const GCT_TRACE: u8 = 9;
    pub const TRACE_NSNAP: u64 = 0xa;
    pub const TRACE_SNAP: u64 = 0x30;
    pub const TRACE_SNAPMAP: u64 = 0x38;
    pub const TRACE_SZMCODE: u64 = 0x54;
    pub const TRACE_MCODE: u64 = 0x58;
    pub const TRACE_TRACENO: u64 = 0x68;
    pub const TRACE_SIZE: usize = 0x70;
    /// `SnapShot`: 12 bytes, `mapofs` at 0, `mcofs` at 6, `nent` at 10.
    pub const SNAP_SIZE: u64 = 12;
    /// `GCstr.len` and where its bytes start.
    pub const STR_LEN: u64 = 0x14;
    pub const STR_DATA: u64 = 0x18;
}

/// What differs between the GC64 builds leaktrace reads. They are told
/// apart in memory, by the size of a VM's main `lua_State` (`GG_State.g -
/// GG_State.L`, see [`is_vm`]): OpenResty's luajit2 appends `exdata` and
/// `exdata2` to upstream's `lua_State`, after every field read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Build {
    pub name: &'static str,
    /// `GG_State.g - GG_State.L`.
    pub l_size: u64,
    /// `GG_State.J.trace - GG_State.g`: the traces by number.
    pub g_traces: u64,
    /// `g - allocd`: `GG_State` is the first block of the VM's own
    /// allocator state, right after dlmalloc's `malloc_state`.
    pub msp_to_g: u64,
}

/// Every build whose layout is known; the offsets were read off each
/// build's running VMs (a trace array whose entries are `GCtrace`s).
pub const BUILDS: [Build; 2] = [
    Build {
        name: "OpenResty luajit2",
        l_size: 0x70,
        g_traces: 0x460,
        msp_to_g: 0x3e0,
    },
    Build {
        name: "LuaJIT 2.1",
        l_size: 0x60,
        g_traces: 0x458,
        msp_to_g: 0x3d0,
    },
];

/// The kernel walker's layout for a process whose interpreter code is at
/// runtime `[vm_start, vm_end)` and whose VMs are `gs`.
/// Each VM's `allocd` (the allocator state its `lj_alloc_*` calls get),
/// in the order of `gs`; 0 where it cannot be read.
pub fn allocds(pid: u32, gs: &[u64]) -> Vec<u64> {
    gs.iter()
        .map(|g| read_u64(pid, g + gc64::G_ALLOCD).unwrap_or(0))
        .collect()
}

pub fn layout(vm: (u64, u64), build: &Build, gs: &[u64], allocds: &[u64]) -> LuaProc {
    let mut g = [0u64; LUA_MAX_VMS];
    for (slot, v) in g.iter_mut().zip(gs) {
        *slot = *v;
    }
    let mut allocd = [0u64; LUA_MAX_VMS];
    for (slot, v) in allocd.iter_mut().zip(allocds) {
        *slot = *v;
    }
    LuaProc {
        vm_start: vm.0,
        vm_end: vm.1,
        g,
        g_vmstate: gc64::G_VMSTATE,
        g_cur_l: gc64::G_CUR_L,
        g_jit_base: gc64::G_JIT_BASE,
        l_base: gc64::L_BASE,
        l_stack: gc64::L_STACK,
        l_cframe: gc64::L_CFRAME,
        cframe_pc: gc64::CFRAME_PC,
        cframe_prev: gc64::CFRAME_PREV,
        cframe_ret: gc64::CFRAME_RET,
        func_pc: gc64::FUNC_PC,
        func_ffid: gc64::FUNC_FFID,
        proto_size: gc64::PROTO_SIZE,
        g_traces: build.g_traces as u32,
        trace_mcode: gc64::TRACE_MCODE as u32,
        trace_szmcode: gc64::TRACE_SZMCODE as u32,
        g_gc_white: gc64::G_GC_WHITE,
        allocd,
        g_gc_state: gc64::G_GC_STATE,
        msp_to_g: build.msp_to_g as u32,
    }
}

/// Bytes read from the process at a time while scanning.
const CHUNK: usize = 1 << 20;
/// Most bytes scanned per process (a leaking worker may hold gigabytes;
/// the VMs are made early, in the first segments).
pub const SCAN_LIMIT: u64 = 1 << 30;

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn read_u64(pid: u32, addr: u64) -> Option<u64> {
    let b = procfs::read_mem(pid, addr, 8).ok()?;
    u64_at(&b, 0)
}

/// The build of the VM whose `global_State` is `g`, if it is one (its
/// first word already matched).
fn is_vm(pid: u32, g: u64) -> Option<&'static Build> {
    let allocd = read_u64(pid, g + gc64::G_ALLOCD)?;
    // The main thread, whose size says which LuaJIT this is.
    let l = read_u64(pid, g + gc64::G_MAINTHREF)?;
    let build = BUILDS.iter().find(|b| g.checked_sub(b.l_size) == Some(l))?;
    let glref = read_u64(pid, l + gc64::L_GLREF)?;
    let gct = *procfs::read_mem(pid, l + gc64::GCT, 1).ok()?.first()?;
    (allocd != 0 && glref == g && gct == gc64::GCT_THREAD).then_some(build)
}

/// The anonymous writable mappings a VM's state can be in.
pub fn scannable(maps: &[MapEntry]) -> impl Iterator<Item = &MapEntry> {
    maps.iter()
        .filter(|m| m.path.is_none() && m.readable && m.writable && !m.executable)
}

/// The `global_State`s in `[start, end)` of `pid`, with their builds:
/// every 8-byte-aligned word equal to `allocf` (the runtime address of
/// `lj_alloc_f`) that [`is_vm`] confirms. `budget` bytes at most are read
/// (and used up).
pub fn find_in(
    pid: u32,
    start: u64,
    end: u64,
    allocf: u64,
    budget: &mut u64,
) -> Vec<(u64, &'static Build)> {
    let needle = allocf.to_le_bytes();
    let mut found = Vec::new();
    let mut at = start;
    while at < end && *budget > 0 {
        let len = (end - at).min(CHUNK as u64).min(*budget) as usize;
        *budget -= len as u64;
        let Ok(bytes) = procfs::read_mem(pid, at, len) else {
            // Unreadable (guard pages): the rest of this mapping too.
            break;
        };
        for (i, word) in bytes.chunks_exact(8).enumerate() {
            if word == needle {
                let g = at + 8 * i as u64;
                if let Some(build) = is_vm(pid, g) {
                    found.push((g, build));
                }
            }
        }
        at += len as u64;
    }
    found
}
