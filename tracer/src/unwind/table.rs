//! Compact x86-64 unwind tables from DWARF call-frame information.
//!
//! Input: the path of an ELF object (executable or shared library). Its
//! `.eh_frame` and, when present, `.debug_frame` are evaluated with gimli;
//! `.eh_frame_hdr` is not needed.
//!
//! Output: an [`UnwindTable`], a `Vec` of [`UnwindRow`] that the eBPF
//! unwinder binary-searches by pc. Each row gives the rule from its `pc` up
//! to the next row's `pc`: how to find the CFA (`%rsp` or `%rbp` plus an
//! offset, the PLT rule, the end of the stack, or "stop here") and where the
//! caller's `%rbp` is. The return address is always at `CFA - 8`.
//!
//! Invariants of [`UnwindTable::rows`]:
//! - pcs are ELF virtual addresses of the object (add the mapping's load
//!   bias, see [`load_segments`] and [`vaddr_of_file_offset`]), strictly
//!   increasing, so a binary search finds exactly one row per pc;
//! - no two consecutive rows carry the same rule (the first is kept);
//! - wherever an FDE's range ends and no other FDE starts at that pc, a
//!   `CFA_UNDEFINED` row marks the gap, so a pc between functions or past
//!   the covered text never borrows the previous function's rule;
//! - where `.eh_frame` and `.debug_frame` both cover a pc, `.eh_frame` wins;
//!   where FDEs of one section overlap, the one met first wins.
//!
//! Mapping (DWARF x86-64 registers: rbp 6, rsp 7, return address 16):
//! CFA `rsp+n` / `rbp+n` -> `CFA_RSP` / `CFA_RBP`; the binutils PLT CFA
//! expression -> `CFA_PLT` with the `(%rip & 15) >= n` threshold (11, or 10
//! for the `DW_OP_lit10` variant) in `cfa_offset`; an undefined return
//! address (`_start`, `clone`) -> `CFA_END_OF_STACK`; a signal-frame CIE
//! (augmentation `S`) -> `CFA_UNDEFINED`. `%rbp` never mentioned or
//! same-value -> `RBP_SAME`; saved at `CFA+n` -> `RBP_AT_CFA_OFFSET`;
//! explicitly undefined -> `RBP_UNDEFINED`.
//!
//! Anything the compact form cannot say is turned into a rule that stops
//! the walk (`CFA_UNDEFINED`) or gives up on `%rbp` (`RBP_UNDEFINED`), never
//! into a guess, and is counted in [`UnwindTable::skipped`].
//!
//! The per-range logic is split from the DWARF reading: [`rule_for_row`]
//! maps one gimli row to a [`Rule`], and [`rows_from_ranges`] (pure) turns
//! `(start, end, rule)` ranges into sorted, merged, gap-marked rows.

use crate::sys::elf;
use std::{collections::BTreeMap, collections::HashMap, path::Path};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, Register,
    RegisterRule, UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};
use object::{Object as _, ObjectSection as _};
use tracer_common::{
    UnwindRow, CFA_END_OF_STACK, CFA_PLT, CFA_RBP, CFA_RSP, CFA_STACK_SWITCH, CFA_UNDEFINED,
    RBP_AT_CFA_OFFSET, RBP_SAME, RBP_UNDEFINED,
};

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// The unwind table of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindTable {
    /// Sorted by `pc`, strictly increasing (see the module invariants).
    pub rows: Vec<UnwindRow>,
    /// CFI rows that could not be represented exactly: dropped because
    /// their pc does not fit `u32`, or kept with a weaker rule
    /// (`CFA_UNDEFINED` / `RBP_UNDEFINED`) because the compact form cannot
    /// express theirs (a CFA based on another register or on an expression
    /// other than the PLT one, a signal frame, a return address not at
    /// `CFA - 8`, a `%rbp` rule other than "same" or "saved at CFA+n", an
    /// offset too wide for its field).
    pub skipped: usize,
    /// FDEs whose CFI program gimli could not evaluate; their range is left
    /// uncovered (a gap, so the walk stops there).
    pub bad_fdes: usize,
}

impl UnwindTable {
    /// The row that applies at `pc` (an ELF virtual address of the object),
    /// found the way the eBPF unwinder finds it: the last row whose `pc` is
    /// at or below it. `None` below the first row.
    pub fn lookup(&self, pc: u32) -> Option<&UnwindRow> {
        let idx = self.rows.partition_point(|row| row.pc <= pc);
        idx.checked_sub(1).and_then(|i| self.rows.get(i))
    }
}

/// Errors of [`build`] and [`load_segments`]. Each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnwindTableError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {path} as an ELF object: {reason}")]
    Parse { path: String, reason: String },
    #[error(
        "cannot build an unwind table for {path}: it is a {arch} object, only x86-64 is supported"
    )]
    UnsupportedArch { path: String, arch: String },
    #[error("failed to read section {section} of {path}: {reason}")]
    Section {
        path: String,
        section: &'static str,
        reason: String,
    },
    #[error("failed to parse the call frame information in {section} of {path}: {reason}")]
    Cfi {
        path: String,
        section: &'static str,
        reason: String,
    },
}

/// Where the CFA is and where the caller's `%rbp` is, for a range of pcs.
/// The fields mean what the same fields of [`UnwindRow`] mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub cfa_reg: u8,
    pub cfa_offset: i32,
    pub rbp_rule: u8,
    pub rbp_offset: i16,
}

impl Rule {
    /// Stop the walk here, marked.
    pub const UNDEFINED: Rule = Rule {
        cfa_reg: CFA_UNDEFINED,
        cfa_offset: 0,
        rbp_rule: RBP_SAME,
        rbp_offset: 0,
    };

    /// The frame switched stacks; its caller is found through `%rbp`
    /// alone (`CFA_STACK_SWITCH`).
    pub const STACK_SWITCH: Rule = Rule {
        cfa_reg: CFA_STACK_SWITCH,
        cfa_offset: 0,
        rbp_rule: RBP_SAME,
        rbp_offset: 0,
    };

    /// The outermost frame: the walk ends here normally.
    pub const END_OF_STACK: Rule = Rule {
        cfa_reg: CFA_END_OF_STACK,
        cfa_offset: 0,
        rbp_rule: RBP_SAME,
        rbp_offset: 0,
    };

    /// Zeroes the fields the rule does not read, so that rules that mean
    /// the same compare equal and their rows merge.
    fn normalized(self) -> Rule {
        match self.cfa_reg {
            CFA_UNDEFINED => Rule::UNDEFINED,
            CFA_END_OF_STACK => Rule::END_OF_STACK,
            CFA_STACK_SWITCH => Rule::STACK_SWITCH,
            _ if self.rbp_rule != RBP_AT_CFA_OFFSET => Rule {
                rbp_offset: 0,
                ..self
            },
            _ => self,
        }
    }

    fn row(self, pc: u32) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_offset: self.cfa_offset,
            rbp_offset: self.rbp_offset,
            cfa_reg: self.cfa_reg,
            rbp_rule: self.rbp_rule,
        }
    }
}

/// A rule and the pcs `[start, end)` it covers, as ELF virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CfiRange {
    pub start: u64,
    pub end: u64,
    pub rule: Rule,
}

/// Sorted, merged, gap-marked rows from `ranges`, and how many ranges were
/// dropped because they start beyond `u32::MAX`.
///
/// `ranges` come in priority order: where two overlap, the part of the
/// later one that an earlier one already covers is dropped. Empty ranges
/// are ignored. A `CFA_UNDEFINED` row is placed at the end of every
/// resulting run of contiguous ranges (unless that end is beyond
/// `u32::MAX`, where no row can say it), and consecutive rows with the same
/// rule are merged, keeping the first.
pub fn rows_from_ranges(ranges: &[CfiRange]) -> (Vec<UnwindRow>, usize) {
    const PC_LIMIT: u64 = 1 << 32;
    let mut dropped = 0;
    // start -> (end, rule); disjoint.
    let mut covered: BTreeMap<u64, (u64, Rule)> = BTreeMap::new();
    let mut holes = Vec::new();
    for range in ranges {
        if range.start >= range.end {
            continue;
        }
        if range.start >= PC_LIMIT {
            dropped += 1;
            continue;
        }
        let rule = range.rule.normalized();
        let mut cursor = range.start;
        if let Some((_, &(prev_end, _))) = covered.range(..=range.start).next_back() {
            cursor = cursor.max(prev_end);
        }
        holes.clear();
        for (&start, &(end, _)) in covered.range(range.start..range.end) {
            if start > cursor {
                holes.push((cursor, start));
            }
            cursor = cursor.max(end);
        }
        if cursor < range.end {
            holes.push((cursor, range.end));
        }
        for &(start, end) in &holes {
            covered.insert(start, (end, rule));
        }
    }

    let mut rows: Vec<UnwindRow> = Vec::with_capacity(covered.len() * 2);
    let mut push = |pc: u64, rule: Rule| {
        let Ok(pc) = u32::try_from(pc) else { return };
        let same = rows.last().is_some_and(|last| {
            Rule {
                cfa_reg: last.cfa_reg,
                cfa_offset: last.cfa_offset,
                rbp_rule: last.rbp_rule,
                rbp_offset: last.rbp_offset,
            } == rule
        });
        if !same {
            rows.push(rule.row(pc));
        }
    };
    let mut iter = covered.into_iter().peekable();
    while let Some((start, (end, rule))) = iter.next() {
        push(start, rule);
        let followed = iter.peek().is_some_and(|&(next, _)| next == end);
        if !followed {
            push(end, Rule::UNDEFINED);
        }
    }
    (rows, dropped)
}

/// `DW_CFA_def_cfa_expression` bodies that binutils emits for x86-64 PLT
/// entries: `DW_OP_breg7 8; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and;
/// DW_OP_lit11 (or lit10); DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus`.
/// Returns the threshold of the `(%rip & 15) >= n` test.
fn plt_threshold(expression: &[u8]) -> Option<i32> {
    const DW_OP_LIT0: u8 = 0x30;
    match expression {
        [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, lit @ (0x3a | 0x3b), 0x2a, 0x33, 0x24, 0x22] => {
            Some(i32::from(lit - DW_OP_LIT0))
        }
        _ => None,
    }
}

/// The compact rule for one row of gimli's unwind table, and whether it is
/// exact (`false`: something was given up, see [`UnwindTable::skipped`]).
///
/// `signal_frame`: the FDE's CIE has augmentation `S`. `cfa_expression`:
/// the bytes of a CFA expression, when the row's CFA is one.
pub fn rule_for_row<T: gimli::ReaderOffset, S: gimli::UnwindContextStorage<T>>(
    row: &UnwindTableRow<T, S>,
    signal_frame: bool,
    cfa_expression: Option<&[u8]>,
) -> (Rule, bool) {
    if signal_frame {
        return (Rule::UNDEFINED, false);
    }
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return (Rule::END_OF_STACK, true),
        Some(RegisterRule::Offset(-8)) => {}
        _ => return (Rule::UNDEFINED, false),
    }
    let (cfa_reg, cfa_offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let reg = match *register {
                X86_64::RSP => CFA_RSP,
                X86_64::RBP => CFA_RBP,
                _ => return (Rule::UNDEFINED, false),
            };
            match i32::try_from(*offset) {
                Ok(offset) => (reg, offset),
                Err(_) => return (Rule::UNDEFINED, false),
            }
        }
        CfaRule::Expression(_) => match cfa_expression.and_then(plt_threshold) {
            Some(threshold) => (CFA_PLT, threshold),
            None => return (Rule::UNDEFINED, false),
        },
    };
    let (rbp_rule, rbp_offset, exact) = match row.register(X86_64::RBP) {
        // Not mentioned: callee-saved, so unchanged (the x86-64 psABI
        // convention; readelf prints it as "u").
        None | Some(RegisterRule::SameValue) => (RBP_SAME, 0, true),
        Some(RegisterRule::Register(Register(6))) => (RBP_SAME, 0, true),
        // Explicitly undefined: the caller's value is gone; not a loss of
        // ours, the CFI says so.
        Some(RegisterRule::Undefined) => (RBP_UNDEFINED, 0, true),
        Some(RegisterRule::Offset(offset)) => match i16::try_from(offset) {
            Ok(offset) => (RBP_AT_CFA_OFFSET, offset, true),
            Err(_) => (RBP_UNDEFINED, 0, false),
        },
        Some(_) => (RBP_UNDEFINED, 0, false),
    };
    let rule = Rule {
        cfa_reg,
        cfa_offset,
        rbp_rule,
        rbp_offset,
    };
    (rule, exact)
}

/// Builds the unwind table of the object at `path`. An object without
/// `.eh_frame` and `.debug_frame` yields an empty table.
pub fn build(path: &Path) -> Result<UnwindTable, UnwindTableError> {
    let path_str = || path.display().to_string();
    let data = crate::sys::bytes::file_bytes(path).map_err(|source| UnwindTableError::Read {
        path: path_str(),
        source,
    })?;
    let file = object::File::parse(&*data).map_err(|e| UnwindTableError::Parse {
        path: path_str(),
        reason: e.to_string(),
    })?;
    if file.architecture() != object::Architecture::X86_64 || !file.is_little_endian() {
        return Err(UnwindTableError::UnsupportedArch {
            path: path_str(),
            arch: format!("{:?}", file.architecture()),
        });
    }

    let section_address = |name: &str| file.section_by_name(name).map(|s| s.address());

    let mut ranges = Vec::new();
    let mut stats = Stats::default();
    // A runtime that switches stacks (Go in runtime.asmcgocall and
    // runtime.systemstack) leaves, at those calls' return addresses, a
    // frame on the system stack whose caller is on another stack, which
    // the CFI does not describe. %rbp there is still a frame pointer on
    // the caller's stack: the walk crosses over by it (earlier ranges
    // win). See `runtime::stack_switch_return_pcs`.
    for ret in crate::runtime::stack_switch_return_pcs(&data) {
        ranges.push(CfiRange {
            start: ret - 1,
            end: ret,
            rule: Rule::STACK_SWITCH,
        });
    }
    if let Some((address, bytes)) = section_bytes(&file, ".eh_frame", path)? {
        let mut eh_frame = EhFrame::new(&bytes, LittleEndian);
        eh_frame.set_address_size(8);
        let mut bases = BaseAddresses::default().set_eh_frame(address);
        if let Some(text) = section_address(".text") {
            bases = bases.set_text(text);
        }
        if let Some(got) = section_address(".got") {
            bases = bases.set_got(got);
        }
        collect_ranges(&eh_frame, &bases, &mut ranges, &mut stats).map_err(|e| {
            UnwindTableError::Cfi {
                path: path_str(),
                section: ".eh_frame",
                reason: e.to_string(),
            }
        })?;
    }
    if let Some((_, bytes)) = section_bytes(&file, ".debug_frame", path)? {
        let mut debug_frame = DebugFrame::new(&bytes, LittleEndian);
        debug_frame.set_address_size(8);
        collect_ranges(
            &debug_frame,
            &BaseAddresses::default(),
            &mut ranges,
            &mut stats,
        )
        .map_err(|e| UnwindTableError::Cfi {
            path: path_str(),
            section: ".debug_frame",
            reason: e.to_string(),
        })?;
    }

    let (rows, dropped) = rows_from_ranges(&ranges);
    Ok(UnwindTable {
        rows,
        skipped: stats.inexact + dropped,
        bad_fdes: stats.bad_fdes,
    })
}

/// The address and bytes of section `name` (see [`elf::section_bytes`]),
/// with the object named in the error.
fn section_bytes<'d>(
    file: &object::File<'d>,
    name: &'static str,
    path: &Path,
) -> Result<Option<elf::SectionBytes<'d>>, UnwindTableError> {
    elf::section_bytes(file, name).map_err(|reason| UnwindTableError::Section {
        path: path.display().to_string(),
        section: name,
        reason,
    })
}

#[derive(Default)]
struct Stats {
    inexact: usize,
    bad_fdes: usize,
}

/// Appends one range per non-empty CFI row of every FDE in `section`.
/// Fails only when the section cannot be walked; an FDE whose program
/// cannot be evaluated is counted and skipped.
fn collect_ranges<'a, S: UnwindSection<Reader<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    out: &mut Vec<CfiRange>,
    stats: &mut Stats,
) -> gimli::Result<()> {
    let mut cies: HashMap<usize, gimli::CommonInformationEntry<Reader<'a>>> = HashMap::new();
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial.parse(|section, bases, offset| {
            let key: usize = gimli::UnwindOffset::into(offset);
            if let Some(cie) = cies.get(&key) {
                return Ok(cie.clone());
            }
            let cie = section.cie_from_offset(bases, offset)?;
            cies.insert(key, cie.clone());
            Ok(cie)
        });
        let Ok(fde) = fde else {
            stats.bad_fdes += 1;
            continue;
        };
        let signal_frame = fde.is_signal_trampoline();
        let first = out.len();
        let result = (|| -> gimli::Result<()> {
            let mut table = fde.rows(section, bases, &mut ctx)?;
            while let Some(row) = table.next_row()? {
                if row.start_address() >= row.end_address() {
                    continue;
                }
                let expression = match row.cfa() {
                    CfaRule::Expression(e) => Some(e.get(section)?.0.slice()),
                    CfaRule::RegisterAndOffset { .. } => None,
                };
                let (rule, exact) = rule_for_row(row, signal_frame, expression);
                if !exact {
                    stats.inexact += 1;
                }
                out.push(CfiRange {
                    start: row.start_address(),
                    end: row.end_address(),
                    rule,
                });
            }
            Ok(())
        })();
        if result.is_err() {
            // A partial FDE would claim pcs it does not describe.
            out.truncate(first);
            stats.bad_fdes += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::elf::{load_segments, vaddr_of_file_offset, Segment};
    use std::fs;
    use std::{
        path::PathBuf,
        process::Command,
        time::{Duration, Instant},
    };

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    const PYTHON: &str = "/usr/bin/python3.11";

    fn rsp(offset: i32) -> Rule {
        Rule {
            cfa_reg: CFA_RSP,
            cfa_offset: offset,
            rbp_rule: RBP_SAME,
            rbp_offset: 0,
        }
    }

    fn rbp_saved(rule: Rule, at: i16) -> Rule {
        Rule {
            rbp_rule: RBP_AT_CFA_OFFSET,
            rbp_offset: at,
            ..rule
        }
    }

    fn range(start: u64, end: u64, rule: Rule) -> CfiRange {
        CfiRange { start, end, rule }
    }

    fn rows(ranges: &[CfiRange]) -> Vec<(u32, Rule)> {
        let (rows, dropped) = rows_from_ranges(ranges);
        assert_eq!(dropped, 0);
        rows.iter()
            .map(|r| {
                (
                    r.pc,
                    Rule {
                        cfa_reg: r.cfa_reg,
                        cfa_offset: r.cfa_offset,
                        rbp_rule: r.rbp_rule,
                        rbp_offset: r.rbp_offset,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn contiguous_fdes_get_no_marker_and_gaps_do() {
        let got = rows(&[
            range(0x100, 0x101, rsp(8)),
            range(0x101, 0x110, rsp(16)),
            // Next FDE starts right where the first ends.
            range(0x110, 0x120, rsp(8)),
            // Gap 0x120..0x130.
            range(0x130, 0x140, rsp(8)),
        ]);
        assert_eq!(
            got,
            vec![
                (0x100, rsp(8)),
                (0x101, rsp(16)),
                (0x110, rsp(8)),
                (0x120, Rule::UNDEFINED),
                (0x130, rsp(8)),
                (0x140, Rule::UNDEFINED),
            ]
        );
    }

    #[test]
    fn identical_consecutive_rules_merge_keeping_the_first() {
        let got = rows(&[
            range(0x10, 0x20, rsp(8)),
            range(0x20, 0x30, rsp(8)),
            range(0x30, 0x38, Rule::UNDEFINED),
            // Touching: the CFA_UNDEFINED range merges with nothing after it
            // but the end marker merges with it.
            range(0x40, 0x48, rbp_saved(rsp(16), -16)),
            range(0x48, 0x50, rbp_saved(rsp(16), -16)),
        ]);
        assert_eq!(
            got,
            vec![
                (0x10, rsp(8)),
                (0x30, Rule::UNDEFINED),
                (0x40, rbp_saved(rsp(16), -16)),
                (0x50, Rule::UNDEFINED),
            ]
        );
    }

    #[test]
    fn fields_a_rule_does_not_read_do_not_block_merging() {
        let noisy_undefined = Rule {
            cfa_reg: CFA_UNDEFINED,
            cfa_offset: 99,
            rbp_rule: RBP_AT_CFA_OFFSET,
            rbp_offset: -8,
        };
        let noisy_same = Rule {
            rbp_offset: 7,
            ..rsp(8)
        };
        let got = rows(&[
            range(0x10, 0x20, rsp(8)),
            range(0x20, 0x30, noisy_same),
            range(0x30, 0x40, noisy_undefined),
        ]);
        assert_eq!(got, vec![(0x10, rsp(8)), (0x30, Rule::UNDEFINED)]);
    }

    #[test]
    fn earlier_ranges_win_overlaps_and_later_ones_fill_the_holes() {
        // As with .eh_frame first, .debug_frame second.
        let got = rows(&[
            range(0x20, 0x30, rsp(8)),
            range(0x40, 0x50, rsp(8)),
            range(0x10, 0x60, rsp(32)),
        ]);
        assert_eq!(
            got,
            vec![
                (0x10, rsp(32)),
                (0x20, rsp(8)),
                (0x30, rsp(32)),
                (0x40, rsp(8)),
                (0x50, rsp(32)),
                (0x60, Rule::UNDEFINED),
            ]
        );
        // Fully shadowed: nothing of the later range survives.
        let got = rows(&[range(0x10, 0x60, rsp(8)), range(0x20, 0x30, rsp(16))]);
        assert_eq!(got, vec![(0x10, rsp(8)), (0x60, Rule::UNDEFINED)]);
    }

    #[test]
    fn empty_and_out_of_range_ranges_are_handled() {
        let (got, dropped) = rows_from_ranges(&[
            range(0x10, 0x10, rsp(8)),
            range(0xffff_fff0, 0x1_0000_0000, rsp(8)),
            range(0x1_0000_0000, 0x1_0000_0010, rsp(8)),
        ]);
        assert_eq!(dropped, 1);
        // The range reaching 4 GiB keeps its row but cannot get a marker.
        assert_eq!(got, vec![rsp(8).row(0xffff_fff0)]);
    }

    #[test]
    fn plt_expressions_are_recognised_by_their_bytes() {
        let lit11 = [
            0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
        ];
        let lit10 = [
            0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3a, 0x2a, 0x33, 0x24, 0x22,
        ];
        assert_eq!(plt_threshold(&lit11), Some(11));
        assert_eq!(plt_threshold(&lit10), Some(10));
        assert_eq!(plt_threshold(&lit11[..10]), None);
        // DW_OP_breg7 16: a plain expression, not the PLT one.
        assert_eq!(plt_threshold(&[0x77, 0x10]), None);
    }

    #[test]
    fn segments_translate_file_offsets() {
        let segments = [
            Segment {
                file_offset: 0,
                vaddr: 0,
                file_size: 0x1000,
                executable: false,
            },
            Segment {
                file_offset: 0x1000,
                vaddr: 0x1000,
                file_size: 0x2500,
                executable: true,
            },
            // Not page-aligned: mapped from offset 0x3000 of the page below.
            Segment {
                file_offset: 0x3dd0,
                vaddr: 0x4dd0,
                file_size: 0x300,
                executable: false,
            },
        ];
        assert_eq!(vaddr_of_file_offset(&segments, 0x1000), Some(0x1000));
        // 0x3000 is still inside the executable segment's bytes.
        assert_eq!(vaddr_of_file_offset(&segments, 0x3000), Some(0x3000));
        let segments = [segments[0], segments[2]];
        assert_eq!(vaddr_of_file_offset(&segments, 0x3000), Some(0x4000));
        assert_eq!(vaddr_of_file_offset(&segments, 0x9000), None);
    }

    #[test]
    fn libc_segments_give_the_text_bias() {
        let Some(libc) = existing(LIBC) else { return };
        let segments = load_segments(&libc).expect("read libc program headers");
        let exec = segments
            .iter()
            .find(|s| s.executable)
            .expect("libc has an executable PT_LOAD");
        let map_offset = exec.file_offset & !0xfff;
        assert_eq!(
            vaddr_of_file_offset(&segments, map_offset),
            Some(exec.vaddr - (exec.file_offset - map_offset))
        );
    }

    #[test]
    fn errors_name_the_file() {
        let err = build(Path::new("/nonexistent/libfoo.so")).expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/libfoo.so"), "{err}");
        let err = build(Path::new("/etc/hostname")).expect_err("not ELF");
        assert!(err.to_string().contains("/etc/hostname"), "{err}");
    }

    fn existing(path: &str) -> Option<PathBuf> {
        let path = PathBuf::from(path);
        if path.exists() {
            Some(path)
        } else {
            eprintln!("skipping a test on {}: not present", path.display());
            None
        }
    }

    // ---- comparison against readelf ------------------------------------

    /// One row of readelf's interpreted table: the CFA, rbp and ra columns
    /// as printed (`None` when the column is absent).
    #[derive(Clone, Debug)]
    struct ReadelfRow {
        loc: u64,
        cfa: String,
        rbp: Option<String>,
        ra: Option<String>,
    }

    #[derive(Debug)]
    struct ReadelfFde {
        start: u64,
        end: u64,
        signal: bool,
        rows: Vec<ReadelfRow>,
    }

    /// Parses `readelf --debug-dump=frames-interp`. An FDE printed without
    /// a table has only its CIE's initial rules.
    fn readelf_fdes(path: &Path) -> Option<Vec<ReadelfFde>> {
        // -wN: do not follow .gnu_debuglink to a separate debug file, whose
        // NOBITS .eh_frame makes readelf exit 1.
        let output = match Command::new("readelf")
            .args(["-wN", "--debug-dump=frames-interp"])
            .arg(path)
            .output()
        {
            Ok(o) if o.status.success() => o,
            Ok(o) => panic!("readelf failed on {}: {:?}", path.display(), o.status),
            Err(e) => {
                eprintln!("skipping: readelf not runnable: {e}");
                return None;
            }
        };
        let text = String::from_utf8_lossy(&output.stdout);
        // CIE offsets are per section: key them by (section number, offset).
        enum Current {
            None,
            Cie((usize, u64)),
            Fde(usize),
        }
        let mut section = 0;
        let mut cie_rows: HashMap<(usize, u64), (bool, Vec<ReadelfRow>)> = HashMap::new();
        let mut fdes: Vec<((usize, u64), ReadelfFde)> = Vec::new();
        let mut current = Current::None;
        let mut columns: Vec<String> = Vec::new();
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        for line in text.lines() {
            // A register column reads "r9 (r9)": glue the name to its number.
            let mut tokens: Vec<&str> = Vec::new();
            let mut glued: Vec<String> = Vec::new();
            for token in line.split_whitespace() {
                match glued.last_mut() {
                    Some(last) if token.starts_with('(') => {
                        last.push(' ');
                        last.push_str(token);
                    }
                    _ => glued.push(token.to_string()),
                }
            }
            tokens.extend(glued.iter().map(String::as_str));
            if tokens.len() >= 4 && tokens[3] == "CIE" {
                let offset = (section, hex(tokens[0]).expect("cie offset"));
                let signal = tokens.get(4).is_some_and(|aug| aug.contains('S'));
                cie_rows.insert(offset, (signal, Vec::new()));
                current = Current::Cie(offset);
                columns.clear();
            } else if tokens.len() >= 6 && tokens[3] == "FDE" {
                let cie = hex(tokens[4].trim_start_matches("cie=")).expect("fde cie");
                let (start, end) = tokens[5]
                    .trim_start_matches("pc=")
                    .split_once("..")
                    .expect("fde range");
                fdes.push((
                    (section, cie),
                    ReadelfFde {
                        start: hex(start).expect("fde start"),
                        end: hex(end).expect("fde end"),
                        signal: false,
                        rows: Vec::new(),
                    },
                ));
                current = Current::Fde(fdes.len() - 1);
                columns.clear();
            } else if tokens.first() == Some(&"LOC") {
                columns = tokens[1..].iter().map(|s| s.to_string()).collect();
            } else if tokens.len() == columns.len() + 1
                && tokens[0].len() == 16
                && hex(tokens[0]).is_some()
            {
                let col = |name: &str| {
                    columns
                        .iter()
                        .position(|c| c == name)
                        .map(|i| tokens[i + 1].to_string())
                };
                let row = ReadelfRow {
                    loc: hex(tokens[0]).expect("loc"),
                    cfa: col("CFA").expect("CFA column"),
                    rbp: col("rbp"),
                    ra: col("ra"),
                };
                match current {
                    Current::Cie(offset) => {
                        if let Some(cie) = cie_rows.get_mut(&offset) {
                            cie.1.push(row);
                        }
                    }
                    Current::Fde(i) => fdes[i].1.rows.push(row),
                    Current::None => {}
                }
            } else if line.contains("Contents of the") {
                section += 1;
                current = Current::None;
            }
        }
        Some(
            fdes.into_iter()
                .map(|(cie, mut fde)| {
                    let (signal, rows) = cie_rows.get(&cie).cloned().unwrap_or_default();
                    fde.signal = signal;
                    if fde.rows.is_empty() {
                        fde.rows = rows
                            .last()
                            .map(|r| ReadelfRow {
                                loc: fde.start,
                                ..r.clone()
                            })
                            .into_iter()
                            .collect();
                    }
                    fde
                })
                .collect(),
        )
    }

    /// What our table must say for a readelf row. For CFA expressions:
    /// `plt` tells whether the pc is in a PLT section.
    fn expected_rule(row: &ReadelfRow, signal: bool, plt: bool) -> Rule {
        if signal {
            return Rule::UNDEFINED;
        }
        match row.ra.as_deref() {
            Some("u") => return Rule::END_OF_STACK,
            Some("c-8") => {}
            _ => return Rule::UNDEFINED,
        }
        let (cfa_reg, cfa_offset) = if let Some(off) = row.cfa.strip_prefix("rsp+") {
            (CFA_RSP, off.parse().expect("cfa offset"))
        } else if let Some(off) = row.cfa.strip_prefix("rbp+") {
            (CFA_RBP, off.parse().expect("cfa offset"))
        } else if row.cfa == "exp" && plt {
            (CFA_PLT, 11)
        } else {
            return Rule::UNDEFINED;
        };
        let (rbp_rule, rbp_offset) = match row.rbp.as_deref() {
            // readelf prints "u" for both "never mentioned" (same, by the
            // psABI) and an explicit DW_CFA_undefined (RBP_UNDEFINED here);
            // libc and python3.11 have none of the latter, so "u" is "same".
            None | Some("u") | Some("s") => (RBP_SAME, 0),
            Some(c) if c.starts_with('c') => {
                let offset: i64 = c[1..].parse().expect("rbp offset");
                match i16::try_from(offset) {
                    Ok(offset) => (RBP_AT_CFA_OFFSET, offset),
                    Err(_) => (RBP_UNDEFINED, 0),
                }
            }
            Some(_) => (RBP_UNDEFINED, 0),
        };
        Rule {
            cfa_reg,
            cfa_offset,
            rbp_rule,
            rbp_offset,
        }
    }

    fn rule_of(row: &UnwindRow) -> Rule {
        Rule {
            cfa_reg: row.cfa_reg,
            cfa_offset: row.cfa_offset,
            rbp_rule: row.rbp_rule,
            rbp_offset: row.rbp_offset,
        }
        .normalized()
    }

    struct Reference {
        fdes: Vec<ReadelfFde>,
        /// Indices of FDEs that overlap no other FDE.
        alone: Vec<bool>,
        plt_ranges: Vec<(u64, u64)>,
    }

    impl Reference {
        fn load(path: &Path) -> Option<Reference> {
            let fdes = readelf_fdes(path)?;
            let mut order: Vec<usize> = (0..fdes.len()).collect();
            order.sort_by_key(|&i| fdes[i].start);
            let mut alone = vec![true; fdes.len()];
            for pair in order.windows(2) {
                if fdes[pair[1]].start < fdes[pair[0]].end {
                    alone[pair[0]] = false;
                    alone[pair[1]] = false;
                }
            }
            let data = std::fs::read(path).expect("read object");
            let file = object::File::parse(&*data).expect("parse object");
            let plt_ranges = file
                .sections()
                .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
                .map(|s| (s.address(), s.address() + s.size()))
                .collect();
            Some(Reference {
                fdes,
                alone,
                plt_ranges,
            })
        }

        /// The rule readelf gives at `pc`, if exactly one FDE covers it.
        fn expected_at(&self, pc: u64) -> Option<Rule> {
            let (i, fde) = self
                .fdes
                .iter()
                .enumerate()
                .find(|(_, f)| f.start <= pc && pc < f.end)?;
            if !self.alone[i] {
                return None;
            }
            let row = fde.rows.iter().rev().find(|r| r.loc <= pc)?;
            let plt = self.plt_ranges.iter().any(|&(s, e)| s <= pc && pc < e);
            Some(expected_rule(row, fde.signal, plt))
        }
    }

    /// Checks our table against readelf at the first and last byte of
    /// every row of every FDE that overlaps no other. Returns the number
    /// of pcs and FDEs checked.
    fn compare_with_readelf(
        table: &UnwindTable,
        reference: &Reference,
        what: &str,
    ) -> (usize, usize) {
        let mut checked = 0;
        let mut fdes_checked = 0;
        let mut mismatches = Vec::new();
        for (fde, &alone) in reference.fdes.iter().zip(&reference.alone) {
            if !alone || fde.start >= fde.end {
                continue;
            }
            fdes_checked += 1;
            let plt = reference
                .plt_ranges
                .iter()
                .any(|&(s, e)| s <= fde.start && fde.start < e);
            for (i, row) in fde.rows.iter().enumerate() {
                let end = fde.rows.get(i + 1).map_or(fde.end, |next| next.loc);
                if row.loc >= end {
                    continue;
                }
                let expected = expected_rule(row, fde.signal, plt).normalized();
                for pc in [row.loc, end - 1] {
                    let got = table
                        .lookup(u32::try_from(pc).expect("pc fits u32"))
                        .map(rule_of);
                    checked += 1;
                    if got != Some(expected) {
                        mismatches.push(format!(
                            "pc {pc:#x} (FDE {:#x}..{:#x}, readelf {row:?}): \
                             expected {expected:?}, got {got:?}",
                            fde.start, fde.end
                        ));
                    }
                }
            }
        }
        assert!(
            mismatches.is_empty(),
            "{what}: {} of {checked} pcs differ from readelf, first ones:\n{}",
            mismatches.len(),
            mismatches[..mismatches.len().min(20)].join("\n")
        );
        (checked, fdes_checked)
    }

    fn symbol_range(path: &Path, name: &str) -> (u64, u64) {
        let data = std::fs::read(path).expect("read object");
        let file = object::File::parse(&*data).expect("parse object");
        use object::ObjectSymbol as _;
        let sym = file
            .dynamic_symbols()
            .chain(file.symbols())
            .find(|s| {
                s.kind() == object::SymbolKind::Text
                    && !s.is_undefined()
                    && s.name().is_ok_and(|n| n.split('@').next() == Some(name))
            })
            .unwrap_or_else(|| panic!("{name} not found in {}", path.display()));
        (sym.address(), sym.address() + sym.size())
    }

    #[test]
    fn libc_matches_readelf() {
        let Some(libc) = existing(LIBC) else { return };
        let Some(reference) = Reference::load(&libc) else {
            return;
        };
        let table = build(&libc).expect("build libc unwind table");
        assert_eq!(table.bad_fdes, 0);

        let (pcs, fdes) = compare_with_readelf(&table, &reference, "libc");
        println!("libc: compared {pcs} pcs across {fdes} FDEs with readelf");
        assert!(fdes >= 1000, "only {fdes} FDEs compared");
        assert!(pcs >= 5000, "only {pcs} pcs compared");

        // Every byte of malloc and free, against readelf.
        for name in ["malloc", "free"] {
            let (start, end) = symbol_range(&libc, name);
            assert!(end > start, "{name} has no size");
            for pc in start..end {
                let expected = reference
                    .expected_at(pc)
                    .unwrap_or_else(|| panic!("readelf has no single FDE for {name} at {pc:#x}"));
                let got = table
                    .lookup(u32::try_from(pc).expect("pc fits u32"))
                    .map(rule_of);
                assert_eq!(got, Some(expected.normalized()), "{name}+{:#x}", pc - start);
            }
            let entry = table.lookup(start as u32).map(rule_of);
            assert_eq!(entry, Some(rsp(8)), "{name} entry");
        }

        // The lazy PLT: after the 16-byte header, every entry uses the
        // DW_OP_lit11 expression.
        let plt = reference
            .plt_ranges
            .iter()
            .find(|&&(s, e)| e - s > 0x20)
            .copied();
        let (plt_start, _) = plt.expect("libc has a .plt");
        let entry = table.lookup(plt_start as u32 + 0x10).map(rule_of);
        assert_eq!(
            entry,
            Some(Rule {
                cfa_reg: CFA_PLT,
                cfa_offset: 11,
                rbp_rule: RBP_SAME,
                rbp_offset: 0,
            })
        );

        // __restore_rt's FDE is a signal frame ("zRS" CIE).
        let signal = reference
            .fdes
            .iter()
            .find(|f| f.signal)
            .expect("libc has a signal frame FDE");
        assert_eq!(
            table.lookup(signal.start as u32).map(rule_of),
            Some(Rule::UNDEFINED)
        );
    }

    #[test]
    fn binaries_have_plt_rows() {
        for path in ["/bin/ls", PYTHON] {
            let Some(path) = existing(path) else { continue };
            let table = build(&path).expect("build unwind table");
            let plt_rows = table.rows.iter().filter(|r| r.cfa_reg == CFA_PLT).count();
            assert!(plt_rows > 0, "no CFA_PLT row in {}", path.display());
        }
    }

    #[test]
    fn python_matches_readelf() {
        let Some(python) = existing(PYTHON) else {
            return;
        };
        let Some(reference) = Reference::load(&python) else {
            return;
        };
        let table = build(&python).expect("build python unwind table");
        let (pcs, fdes) = compare_with_readelf(&table, &reference, "python3.11");
        println!("python3.11: compared {pcs} pcs across {fdes} FDEs with readelf");
        assert!(fdes >= 1000, "only {fdes} FDEs compared");
    }

    #[test]
    fn row_counts_and_build_times() {
        for path in [LIBC, PYTHON] {
            let Some(path) = existing(path) else { continue };
            let started = Instant::now();
            let table = build(&path).expect("build unwind table");
            let elapsed: Duration = started.elapsed();
            let end_of_stack = table
                .rows
                .iter()
                .filter(|r| r.cfa_reg == CFA_END_OF_STACK)
                .count();
            let undefined = table
                .rows
                .iter()
                .filter(|r| r.cfa_reg == CFA_UNDEFINED)
                .count();
            println!(
                "{}: {} rows ({} KiB), {} CFA_UNDEFINED, {} CFA_END_OF_STACK, \
                 {} skipped, {} bad FDEs, built in {:.1} ms",
                path.display(),
                table.rows.len(),
                table.rows.len() * std::mem::size_of::<UnwindRow>() / 1024,
                undefined,
                end_of_stack,
                table.skipped,
                table.bad_fdes,
                elapsed.as_secs_f64() * 1e3,
            );
            assert!(
                table.rows.windows(2).all(|w| w[0].pc < w[1].pc),
                "rows of {} are not strictly increasing",
                path.display()
            );
            assert!(
                table
                    .rows
                    .windows(2)
                    .all(|w| rule_of(&w[0]) != rule_of(&w[1])),
                "rows of {} are not merged",
                path.display()
            );
            assert_eq!(
                table.rows.last().map(|r| r.cfa_reg),
                Some(CFA_UNDEFINED),
                "the covered text of {} must end with a marker",
                path.display()
            );
        }
    }

    // ---- a hand-written fixture, assembled and linked with gcc ---------

    /// `.eh_frame` only. Each function exercises one mapping.
    const FIXTURE_EH: &str = r#"
    .text
    .p2align 4
    .globl f_frame
    .type f_frame,@function
f_frame:
    .cfi_startproc
    pushq %rbp
    .cfi_def_cfa_offset 16
    .cfi_offset %rbp, -16
    movq %rsp, %rbp
    .cfi_def_cfa_register %rbp
    nop
    popq %rbp
    .cfi_def_cfa %rsp, 8
    ret
    .cfi_endproc
    .size f_frame, .-f_frame

    .p2align 4
    .globl f_start
    .type f_start,@function
f_start:
    .cfi_startproc
    .cfi_undefined %rip
    xorl %ebp, %ebp
    nop
    .cfi_endproc
    .size f_start, .-f_start

    .globl f_odd
    .type f_odd,@function
f_odd:
    .cfi_startproc
    nop
    .cfi_def_cfa %r12, 8
    nop
    .cfi_def_cfa %rsp, 8
    .cfi_offset %rbp, -40000
    nop
    .cfi_register %rbp, %rbx
    nop
    .cfi_escape 0x0f, 0x0b, 0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3a, 0x2a, 0x33, 0x24, 0x22
    nop
    .cfi_escape 0x0f, 0x02, 0x77, 0x10
    nop
    ret
    .cfi_endproc
    .size f_odd, .-f_odd

    .globl f_signal
    .type f_signal,@function
f_signal:
    .cfi_startproc
    .cfi_signal_frame
    nop
    ret
    .cfi_endproc
    .size f_signal, .-f_signal
"#;

    /// `.debug_frame` only.
    const FIXTURE_DEBUG: &str = r#"
    .cfi_sections .debug_frame
    .text
    .p2align 4
    .globl g_debug
    .type g_debug,@function
g_debug:
    .cfi_startproc
    pushq %rbx
    .cfi_def_cfa_offset 16
    .cfi_offset %rbx, -16
    pushq %rbp
    .cfi_def_cfa_offset 24
    .cfi_offset %rbp, -24
    nop
    popq %rbp
    .cfi_restore %rbp
    .cfi_def_cfa_offset 16
    popq %rbx
    .cfi_def_cfa_offset 8
    ret
    .cfi_endproc
    .size g_debug, .-g_debug
"#;

    /// Builds the fixture in a fresh directory; `None` (skip) without gcc.
    fn build_fixture() -> Option<(PathBuf, PathBuf)> {
        let dir = std::env::temp_dir().join(format!("leaktrace-unwind-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create fixture dir");
        let eh = dir.join("eh.s");
        let debug = dir.join("debug.s");
        fs::write(&eh, FIXTURE_EH).expect("write fixture");
        fs::write(&debug, FIXTURE_DEBUG).expect("write fixture");
        let so = dir.join("fixture.so");
        let status = Command::new("gcc")
            .args(["-shared", "-nostdlib", "-o"])
            .arg(&so)
            .arg(&eh)
            .arg(&debug)
            .status();
        match status {
            Ok(s) if s.success() => Some((dir, so)),
            Ok(s) => panic!("gcc failed to build the unwind fixture: {s}"),
            Err(e) => {
                eprintln!("skipping unwind fixture: gcc not runnable: {e}");
                None
            }
        }
    }

    #[test]
    fn fixture_rules_map_as_documented() {
        let Some((dir, so)) = build_fixture() else {
            return;
        };
        let table = build(&so).expect("build fixture unwind table");
        let at = |name: &str, delta: u64| {
            let (start, _) = symbol_range(&so, name);
            let pc = u32::try_from(start + delta).expect("fixture pc fits u32");
            table.lookup(pc).map(rule_of)
        };
        let exact_row = |name: &str, delta: u64| {
            let (start, _) = symbol_range(&so, name);
            table
                .rows
                .iter()
                .find(|r| u64::from(r.pc) == start + delta)
                .map(rule_of)
        };

        // f_frame: push (1) mov (3) nop (1) pop (1) ret (1).
        assert_eq!(at("f_frame", 0), Some(rsp(8)));
        assert_eq!(at("f_frame", 1), Some(rbp_saved(rsp(16), -16)));
        let rbp16 = Rule {
            cfa_reg: CFA_RBP,
            ..rbp_saved(rsp(16), -16)
        };
        assert_eq!(at("f_frame", 4), Some(rbp16));
        assert_eq!(at("f_frame", 5), Some(rbp16));
        assert_eq!(at("f_frame", 6), Some(rbp_saved(rsp(8), -16)));
        // Alignment padding after f_frame: a gap, marked.
        assert_eq!(exact_row("f_frame", 7), Some(Rule::UNDEFINED));

        assert_eq!(at("f_start", 0), Some(Rule::END_OF_STACK));
        assert_eq!(at("f_start", 2), Some(Rule::END_OF_STACK));
        // f_odd follows f_start directly: no marker between them.
        let (start_start, start_end) = symbol_range(&so, "f_start");
        assert!(start_end > start_start);
        assert_eq!(exact_row("f_odd", 0), Some(rsp(8)));

        assert_eq!(at("f_odd", 1), Some(Rule::UNDEFINED), "CFA from r12");
        let rbp_lost = Rule {
            rbp_rule: RBP_UNDEFINED,
            ..rsp(8)
        };
        assert_eq!(at("f_odd", 2), Some(rbp_lost), "rbp offset beyond i16");
        assert_eq!(at("f_odd", 3), Some(rbp_lost), "rbp in another register");
        let plt10 = Rule {
            cfa_reg: CFA_PLT,
            cfa_offset: 10,
            ..rbp_lost
        };
        assert_eq!(at("f_odd", 4), Some(plt10), "PLT expression, lit10");
        assert_eq!(at("f_odd", 5), Some(Rule::UNDEFINED), "other expression");

        assert_eq!(at("f_signal", 0), Some(Rule::UNDEFINED));

        // g_debug comes from .debug_frame only.
        assert_eq!(at("g_debug", 0), Some(rsp(8)));
        assert_eq!(at("g_debug", 1), Some(rsp(16)));
        assert_eq!(at("g_debug", 2), Some(rbp_saved(rsp(24), -24)));
        assert_eq!(at("g_debug", 3), Some(rbp_saved(rsp(24), -24)));
        assert_eq!(at("g_debug", 4), Some(rsp(16)), "rbp restored");
        assert_eq!(at("g_debug", 5), Some(rsp(8)));
        let (_, g_end) = symbol_range(&so, "g_debug");
        assert_eq!(
            table.rows.last().map(|r| (u64::from(r.pc), rule_of(r))),
            Some((g_end, Rule::UNDEFINED)),
            "end of the covered text is marked"
        );

        // r12 CFA, rbp at -40000, rbp in rbx, the other expression, the
        // signal frame, and the lit10 PLT row (its rbp is still in rbx): 6
        // rows given up on.
        assert_eq!(table.skipped, 6);
        assert_eq!(table.bad_fdes, 0);

        fs::remove_dir_all(dir).expect("remove fixture dir");
    }
}
