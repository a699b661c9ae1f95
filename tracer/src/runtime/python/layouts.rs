//! Per-version layouts of the CPython structures the kernel walker and
//! the code reader use: hand-checked tables for 3.8-3.12, and 3.13+ from
//! the interpreter's own `_Py_DebugOffsets`.

use super::*;

/// How a version maps instructions to lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineFormat {
    /// 3.8, 3.9: `co_lnotab` (byte delta, signed line delta) pairs; the
    /// instruction is `f_lasti` in bytes.
    Lnotab,
    /// 3.10: `co_linetable` (byte delta, signed line delta, -128: no line)
    /// ranges; the instruction is `f_lasti` in code units.
    Pairs,
    /// 3.11+: the location table (see [`line_at`]); the instruction is a
    /// byte offset from `co_code_adaptive`.
    Locations,
}

/// Where a CPython version keeps what the walk and the resolver read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `(major, minor)`.
    pub version: (u8, u8),
    /// `tracer_common::py_flags` for the kernel walk.
    pub flags: u32,
    /// 0: no `gilstate.tstate_current` (3.12+).
    pub tstate_current: u32,
    pub tss_key: u32,
    pub tstate_thread_id: u32,
    /// `cframe`, or the innermost frame with `py_flags::FRAME_IN_TSTATE`.
    pub tstate_cframe: u32,
    pub cframe_current_frame: u32,
    pub frame_code: u32,
    pub frame_previous: u32,
    /// `prev_instr`/`instr_ptr`, or `f_lasti` with `py_flags::INSTR_LASTI`.
    pub frame_prev_instr: u32,
    /// `is_entry` (3.11) or `owner` (3.12+).
    pub frame_is_entry: u32,
    /// `co_code_adaptive` (3.11+; 0 before).
    pub code_bytecode: u32,
    /// `PyCode_Type.tp_basicsize`: a build whose code objects differ is not
    /// this layout.
    pub code_basicsize: u64,
    pub code_firstlineno: u64,
    pub code_filename: u64,
    pub code_name: u64,
    /// `None` before 3.11: frames are named by `co_name`.
    pub code_qualname: Option<u64>,
    /// `co_linetable` (3.10+) or `co_lnotab`.
    pub code_linetable: u64,
    pub line_format: LineFormat,
    pub bytes_size: u64,
    pub bytes_data: u64,
    /// `PyASCIIObject`: length, state, compact-ASCII data, compact data.
    pub str_length: u64,
    pub str_state: u64,
    pub str_ascii_data: u64,
    pub str_compact_data: u64,
}

/// CPython 3.8 (x86-64).
pub const LAYOUT_3_8: Layout = Layout {
    version: (3, 8),
    flags: py_flags::FRAME_IN_TSTATE | py_flags::INSTR_LASTI | py_flags::ENTRY_EVERY_FRAME,
    tstate_current: 1368,
    tss_key: 1392 + 4,
    tstate_thread_id: 176,
    tstate_cframe: 24,
    cframe_current_frame: 0,
    frame_code: 32,
    frame_previous: 24,
    frame_prev_instr: 104,
    frame_is_entry: 0,
    code_bytecode: 0,
    code_basicsize: 176,
    code_firstlineno: 40,
    code_filename: 104,
    code_name: 112,
    code_qualname: None,
    code_linetable: 120,
    line_format: LineFormat::Lnotab,
    bytes_size: 16,
    bytes_data: 32,
    str_length: 16,
    str_state: 32,
    str_ascii_data: 48,
    str_compact_data: 72,
};

/// CPython 3.9: 3.8's frames and code objects, a smaller `_PyRuntime`.
pub const LAYOUT_3_9: Layout = Layout {
    version: (3, 9),
    tstate_current: 568,
    tss_key: 584 + 4,
    ..LAYOUT_3_8
};

/// CPython 3.10: `f_lasti` moved and counts code units; a new line table.
pub const LAYOUT_3_10: Layout = Layout {
    version: (3, 10),
    frame_prev_instr: 96,
    line_format: LineFormat::Pairs,
    ..LAYOUT_3_9
};

/// CPython 3.11 (x86-64).
pub const LAYOUT_3_11: Layout = Layout {
    version: (3, 11),
    flags: 0,
    tstate_current: 576,
    tss_key: 592 + 4,
    tstate_thread_id: 152,
    tstate_cframe: 56,
    cframe_current_frame: 8,
    frame_code: 32,
    frame_previous: 48,
    frame_prev_instr: 56,
    frame_is_entry: 68,
    code_bytecode: 184,
    code_basicsize: 184,
    code_firstlineno: 72,
    code_filename: 112,
    code_name: 120,
    code_qualname: Some(128),
    code_linetable: 136,
    line_format: LineFormat::Locations,
    bytes_size: 16,
    bytes_data: 32,
    str_length: 16,
    str_state: 32,
    str_ascii_data: 48,
    str_compact_data: 72,
};

/// CPython 3.12: no `tstate_current`; C-stack shim frames; `wstr` gone.
pub const LAYOUT_3_12: Layout = Layout {
    version: (3, 12),
    flags: py_flags::ENTRY_OWNER_SHIM,
    tstate_current: 0,
    tss_key: 1544 + 4,
    tstate_thread_id: 136,
    tstate_cframe: 56,
    cframe_current_frame: 0,
    frame_code: 0,
    frame_previous: 8,
    frame_prev_instr: 56,
    frame_is_entry: 70,
    code_bytecode: 192,
    code_basicsize: 192,
    code_firstlineno: 68,
    str_ascii_data: 40,
    str_compact_data: 56,
    ..LAYOUT_3_11
};

/// CPython 3.13: the thread state points at the frame; `_Py_DebugOffsets`
/// (checked against this table, see [`DebugOffsets`]).
pub const LAYOUT_3_13: Layout = Layout {
    version: (3, 13),
    flags: py_flags::FRAME_IN_TSTATE | py_flags::ENTRY_OWNER_SHIM,
    tss_key: 2160 + 4,
    tstate_thread_id: 152,
    tstate_cframe: 72,
    code_bytecode: 200,
    code_basicsize: 200,
    ..LAYOUT_3_12
};

/// Versions leaktrace can walk.
pub(super) const LAYOUTS: &[&Layout] = &[
    &LAYOUT_3_8,
    &LAYOUT_3_9,
    &LAYOUT_3_10,
    &LAYOUT_3_11,
    &LAYOUT_3_12,
    &LAYOUT_3_13,
];

/// `tp_basicsize` in `PyTypeObject`.
pub(super) const TP_BASICSIZE: u64 = 32;
/// `ob_type` in `PyObject`.
pub(super) const OB_TYPE: u64 = 8;

/// The field offsets a 3.13 build describes itself with, at the start of
/// `_PyRuntime` (`_Py_DebugOffsets`, gh-106597; austin and py-spy read
/// them). They do not include the gilstate key, so the table still
/// supplies that; every field they do give overrides the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugOffsets {
    /// `PY_VERSION_HEX` of the build.
    pub version: u32,
    pub free_threaded: bool,
    pub tstate_current_frame: u64,
    pub tstate_thread_id: u64,
    pub frame_previous: u64,
    pub frame_executable: u64,
    pub frame_instr_ptr: u64,
    pub frame_owner: u64,
    pub code_filename: u64,
    pub code_name: u64,
    pub code_qualname: u64,
    pub code_linetable: u64,
    pub code_firstlineno: u64,
    pub code_adaptive: u64,
    pub bytes_size: u64,
    pub bytes_data: u64,
    pub str_state: u64,
    pub str_length: u64,
    pub str_ascii_size: u64,
}

/// `_Py_DebugOffsets.cookie`.
pub(super) const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";
/// Bytes of `_Py_DebugOffsets` in 3.13.
pub(super) const DEBUG_OFFSETS_SIZE_3_13: usize = 584;

impl DebugOffsets {
    /// Parse the 3.13 struct (`bytes` from the start of `_PyRuntime`);
    /// `None` without the cookie or for another version's struct.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.get(..8)? != DEBUG_COOKIE || bytes.len() < DEBUG_OFFSETS_SIZE_3_13 {
            return None;
        }
        let at = |off: u64| u64_in(bytes, off);
        let version = at(8)? as u32;
        // The struct's own layout changes between minor versions.
        if version >> 16 != 0x030d {
            return None;
        }
        Some(Self {
            version,
            free_threaded: at(16)? != 0,
            tstate_current_frame: at(184)?,
            tstate_thread_id: at(192)?,
            frame_previous: at(232)?,
            frame_executable: at(240)?,
            frame_instr_ptr: at(248)?,
            frame_owner: at(264)?,
            code_filename: at(280)?,
            code_name: at(288)?,
            code_qualname: at(296)?,
            code_linetable: at(304)?,
            code_firstlineno: at(312)?,
            code_adaptive: at(344)?,
            bytes_size: at(520)?,
            bytes_data: at(528)?,
            str_state: at(544)?,
            str_length: at(552)?,
            str_ascii_size: at(560)?,
        })
    }

    /// `base` with every field these offsets give; `Err` when the build
    /// cannot be walked with it.
    pub fn apply(&self, base: Layout) -> Result<Layout, &'static str> {
        if self.free_threaded {
            return Err("free-threaded builds are not supported");
        }
        let small = |v: u64| u32::try_from(v).map_err(|_| "implausible _Py_DebugOffsets");
        Ok(Layout {
            tstate_thread_id: small(self.tstate_thread_id)?,
            tstate_cframe: small(self.tstate_current_frame)?,
            frame_code: small(self.frame_executable)?,
            frame_previous: small(self.frame_previous)?,
            frame_prev_instr: small(self.frame_instr_ptr)?,
            frame_is_entry: small(self.frame_owner)?,
            code_bytecode: small(self.code_adaptive)?,
            code_basicsize: self.code_adaptive,
            code_firstlineno: self.code_firstlineno,
            code_filename: self.code_filename,
            code_name: self.code_name,
            code_qualname: Some(self.code_qualname),
            code_linetable: self.code_linetable,
            bytes_size: self.bytes_size,
            bytes_data: self.bytes_data,
            str_length: self.str_length,
            str_state: self.str_state,
            str_ascii_data: self.str_ascii_size,
            // `PyCompactUnicodeObject` adds `utf8_length` and `utf8`.
            str_compact_data: self.str_ascii_size + 16,
            ..base
        })
    }
}
