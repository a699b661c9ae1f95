//! Choosing where to put a uprobe on a `free`-like function (the Go
//! runtime's profiling hooks: `runtime::go::code::go_probe_offset`).
//!
//! The kernel emulates a few x86 instructions under a uprobe (push, jumps,
//! nops) and must single-step every other one, which costs ~17-20 µs here
//! instead of ~0.5 µs. glibc's `free` starts with `test %rdi,%rdi; je
//! <return>` (single-stepped), and its first `push` comes right after. A
//! probe there sees every non-NULL free with the pointer still in `%rdi`,
//! and `free(NULL)` is ignored anyway.
//!
//! The decoder walks the straight-line start of the function and accepts a
//! later probe point only if everything before it leaves the first argument
//! intact and can only branch away when that argument is NULL. Anything it
//! does not recognise ends the walk at offset 0, which is always correct.

const MAX_WALK_BYTES: usize = 48;

/// The offset (from the function start) of the cheapest correct probe
/// point for a function whose first argument is the pointer to free.
pub fn free_probe_offset(code: &[u8]) -> u64 {
    free_probe_offset_of(code, 0)
}

/// System V argument registers, by argument index.
const ARG_REGS: [u8; 6] = [7, 6, 2, 1, 8, 9];

/// [`free_probe_offset`] for a function whose pointer is argument
/// `pointer_arg` (0-based: LuaJIT's `lj_alloc_free(msp, ptr)` is 1).
pub fn free_probe_offset_of(code: &[u8], pointer_arg: usize) -> u64 {
    let Some(&reg) = ARG_REGS.get(pointer_arg) else {
        return 0;
    };
    let mut off = 0usize;
    // Whether the last instruction was `test %reg,%reg` on the pointer, so
    // a following `je` can only leave when the pointer is NULL.
    let mut after_null_test = false;
    while off < code.len().min(MAX_WALK_BYTES) {
        let rest = &code[off..];
        match decode(rest) {
            Some(Insn::Push) => return off as u64,
            Some(Insn::Endbr64) => {
                after_null_test = false;
                off += 4;
            }
            Some(Insn::TestSelf(r)) => {
                after_null_test = r == reg;
                off += 3;
            }
            Some(Insn::Je(len)) if after_null_test => {
                after_null_test = false;
                off += len;
            }
            Some(Insn::FlagsOnly(len)) => {
                after_null_test = false;
                off += len;
            }
            Some(Insn::MovRegReg { dst, len }) if !clobbers_arg(dst) => {
                after_null_test = false;
                off += len;
            }
            _ => return 0,
        }
    }
    0
}

/// The offset of the cheapest correct probe point for an allocation
/// function, where both the entry program (which reads the arguments) and
/// the return probe (which takes the return address from `[%rsp]`) go.
/// Everything before it must leave the argument registers and the stack
/// pointer alone and must not branch: glibc's `posix_memalign`, `valloc`
/// and `pvalloc` start with `cmpb $0,x(%rip)` (single-stepped, ~17 µs per
/// call here) followed by a `push`, where they are probed instead.
pub fn alloc_probe_offset(code: &[u8]) -> u64 {
    let mut off = 0usize;
    while off < code.len().min(MAX_WALK_BYTES) {
        match decode(&code[off..]) {
            Some(Insn::Push) => return off as u64,
            Some(Insn::Endbr64) => off += 4,
            Some(Insn::FlagsOnly(len)) => off += len,
            Some(Insn::TestSelf(_)) => off += 3,
            Some(Insn::MovRegReg { dst, len }) if !clobbers_arg(dst) => off += len,
            _ => return 0,
        }
    }
    0
}

#[derive(Debug, PartialEq, Eq)]
enum Insn {
    Endbr64,
    Push,
    /// `test %reg,%reg` (64-bit, legacy registers), with the register.
    TestSelf(u8),
    /// `je rel8` / `je rel32`, with its length.
    Je(usize),
    /// An instruction that only sets flags (compare with a RIP-relative
    /// memory operand), with its length.
    FlagsOnly(usize),
    /// `mov %reg,%reg` (64-bit), with the destination register number.
    MovRegReg {
        dst: u8,
        len: usize,
    },
}

fn decode(b: &[u8]) -> Option<Insn> {
    match *b {
        [0xf3, 0x0f, 0x1e, 0xfa, ..] => Some(Insn::Endbr64),
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => Some(Insn::Push),
        // test r64, r64 with both operands the same register.
        [0x48, 0x85, modrm, ..] if modrm >> 6 == 0b11 && (modrm >> 3) & 7 == modrm & 7 => {
            Some(Insn::TestSelf(modrm & 7))
        }
        [0x74, _, ..] => Some(Insn::Je(2)),
        [0x0f, 0x84, _, _, _, _, ..] => Some(Insn::Je(6)),
        // cmpb $imm8, disp32(%rip)
        [0x80, 0x3d, _, _, _, _, _, ..] => Some(Insn::FlagsOnly(7)),
        // cmpq $imm8, disp32(%rip)
        [0x48, 0x83, 0x3d, _, _, _, _, _, ..] => Some(Insn::FlagsOnly(8)),
        // mov r64, r64 (mod = 11): REX.W with optional R/B.
        [rex @ (0x48 | 0x49 | 0x4c | 0x4d), 0x89, modrm, ..] if modrm >> 6 == 0b11 => {
            let dst = (modrm & 7) | if rex & 1 != 0 { 8 } else { 0 };
            Some(Insn::MovRegReg { dst, len: 3 })
        }
        _ => None,
    }
}

/// Registers that carry arguments (rdi, rsi, rdx, rcx, r8, r9) or the
/// stack pointer.
fn clobbers_arg(reg: u8) -> bool {
    matches!(reg, 7 | 6 | 2 | 1 | 8 | 9 | 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_236_free_skips_the_null_check() {
        // test %rdi,%rdi; je +0xbf; push %rbp; lea -0x10(%rdi),%rsi
        let code = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48, 0x8d, 0x77, 0xf0,
        ];
        assert_eq!(free_probe_offset(&code), 9);
    }

    #[test]
    fn luajit_free_tests_its_second_argument() {
        // lj_alloc_free(msp, ptr): test %rsi,%rsi; je rel32; push %r15
        let code = [
            0x48, 0x85, 0xf6, 0x0f, 0x84, 0x5f, 0x01, 0x00, 0x00, 0x41, 0x57,
        ];
        assert_eq!(free_probe_offset_of(&code, 1), 9);
        // The same test is no NULL check of the first argument.
        assert_eq!(free_probe_offset(&code), 0);
    }

    #[test]
    fn push_first_is_offset_zero() {
        assert_eq!(free_probe_offset(&[0x41, 0x54, 0x55]), 0);
    }

    #[test]
    fn endbr_then_push() {
        assert_eq!(free_probe_offset(&[0xf3, 0x0f, 0x1e, 0xfa, 0x53]), 4);
    }

    #[test]
    fn je_without_null_test_stops() {
        // cmpb $0,x(%rip); je; push -> the je may skip real frees.
        let code = [0x80, 0x3d, 0x71, 0x0e, 0x14, 0x00, 0x00, 0x74, 0x07, 0x53];
        assert_eq!(free_probe_offset(&code), 0);
    }

    #[test]
    fn mov_into_argument_register_stops() {
        // mov %rax,%rdi; push %rbx
        assert_eq!(free_probe_offset(&[0x48, 0x89, 0xc7, 0x53]), 0);
        // mov %rdi,%rbx; push %rbp
        assert_eq!(free_probe_offset(&[0x48, 0x89, 0xfb, 0x55]), 3);
    }

    #[test]
    fn glibc_236_posix_memalign_and_valloc_skip_the_rip_compare() {
        // cmpb $0x0,0x140201(%rip); push %r12; mov %rdx,%r12
        let pm = [
            0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54, 0x49, 0x89, 0xd4,
        ];
        assert_eq!(alloc_probe_offset(&pm), 7);
        // cmpb $0x0,...(%rip); push %rbx
        let valloc = [0x80, 0x3d, 0x31, 0x0e, 0x14, 0x00, 0x00, 0x53];
        assert_eq!(alloc_probe_offset(&valloc), 7);
    }

    #[test]
    fn alloc_probe_never_crosses_a_branch() {
        // glibc memalign: cmpb; je; jmp -> stay at 0.
        let memalign = [
            0x80, 0x3d, 0x71, 0x0e, 0x14, 0x00, 0x00, 0x74, 0x07, 0xe9, 0, 0, 0, 0,
        ];
        assert_eq!(alloc_probe_offset(&memalign), 0);
        // malloc starts with a push: 0.
        assert_eq!(alloc_probe_offset(&[0x41, 0x54, 0x55]), 0);
        // free-style NULL check is a branch: not for allocators.
        let free = [0x48, 0x85, 0xff, 0x74, 0x05, 0x55];
        assert_eq!(alloc_probe_offset(&free), 0);
    }

    #[test]
    fn unknown_instruction_stops() {
        assert_eq!(free_probe_offset(&[0x48, 0x8b, 0x05, 0, 0, 0, 0, 0x55]), 0);
        assert_eq!(free_probe_offset(&[]), 0);
    }
}
