//! Reading Go machine code: RIP-relative operands (how Go code addresses
//! package variables, so stripped binaries' runtime variables are found
//! from the code that reads them) and the return addresses where the
//! runtime switches stacks.

use object::Object as _;

use super::pclntab::GoTable;

/// The kind of RIP-relative instruction [`rip_relative`] looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RipOp {
    /// `MOVQ sym(SB), reg`: `REX.W 8B /r`.
    Load64,
    /// `MOVL sym(SB), reg`: `8B /r` without `REX.W`.
    Load32,
    /// `LEAQ sym(SB), reg`: `REX.W 8D /r`.
    Lea,
}

/// The absolute target of the first RIP-relative instruction of kind `op`
/// in `code` (which starts at `vaddr`) whose target satisfies `accept`
/// (called with the instruction's address and the target): ModRM
/// `mod=00 rm=101`, a 32-bit displacement from the next instruction. Go's
/// compiler reads and addresses package variables this way
/// (`MOVQ runtime.mbuckets(SB), CX`).
///
/// The scan is over bytes, not decoded instructions, so `accept` must
/// check the target (in a data section, aligned): a false match inside
/// another instruction's immediate is then unlikely, and the caller
/// validates what it reads there.
pub fn rip_relative(
    code: &[u8],
    vaddr: u64,
    op: RipOp,
    mut accept: impl FnMut(u64, u64) -> bool,
) -> Option<u64> {
    let (wide, opcode) = match op {
        RipOp::Load64 => (true, 0x8b),
        RipOp::Load32 => (false, 0x8b),
        RipOp::Lea => (true, 0x8d),
    };
    let mut i = 0usize;
    while i + 6 <= code.len() {
        let (rex, op_at) = match code[i] {
            r @ 0x40..=0x4f => (Some(r), i + 1),
            _ => (None, i),
        };
        let is_wide = rex.is_some_and(|r| r & 0x08 != 0);
        if is_wide == wide && code.get(op_at) == Some(&opcode) {
            if let Some(&modrm) = code.get(op_at + 1) {
                if modrm & 0xc7 == 0x05 {
                    if let Some(disp) = code.get(op_at + 2..op_at + 6) {
                        let disp = i32::from_le_bytes([disp[0], disp[1], disp[2], disp[3]]);
                        let next = vaddr + (op_at + 6) as u64;
                        let target = next.wrapping_add(disp as i64 as u64);
                        if accept(vaddr + i as u64, target) {
                            return Some(target);
                        }
                    }
                }
            }
        }
        i += 1;
    }
    None
}

/// Return addresses in a Go executable (`data`, its bytes) where the
/// caller's frame is on another stack, which no CFI describes; the
/// unwinder crosses there by one frame-pointer step:
/// - `runtime.asmcgocall`'s call into C on the system stack: `CALL AX`
///   followed by `MOVQ 0x30(SP), DI` (reloading the saved g); %rbp is
///   still `runtime.cgocall`'s frame pointer on the goroutine stack;
/// - `runtime.systemstack`'s call of its function on g0 (`CALL DI`, the
///   only one in it): %rbp is still the goroutine's frame pointer (from
///   1.21 systemstack's own frame, pushed before the switch, whose return
///   address is in its caller; before, its caller's, which loses that
///   caller's own frame). Without it every stack of runtime work done on
///   g0 (heap growth, span allocation) ends at `runtime.systemstack`.
///
/// Checked on Go 1.19 and 1.21-1.27 (asm_amd64.s); a runtime whose code
/// differs gets no rule and its walks end there.
pub fn stack_switch_return_pcs(data: &[u8]) -> Vec<u64> {
    const CGO_CALL: [u8; 7] = [0xff, 0xd0, 0x48, 0x8b, 0x7c, 0x24, 0x30];
    const CALL_DI: [u8; 2] = [0xff, 0xd7];
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    if file.section_by_name(".gopclntab").is_none()
        && file.section_by_name(".data.rel.ro.gopclntab").is_none()
    {
        return Vec::new();
    }
    let Ok(table) = GoTable::from_elf(data) else {
        return Vec::new();
    };
    let one = |code: &[u8], pattern: &[u8]| -> Option<usize> {
        let mut hits = code
            .windows(pattern.len())
            .enumerate()
            .filter(|(_, w)| *w == pattern)
            .map(|(i, _)| i);
        let first = hits.next()?;
        hits.next().is_none().then_some(first)
    };
    table
        .functions()
        .filter_map(|f| {
            let pattern: &[u8] = match f.name.as_str() {
                "runtime.asmcgocall" | "runtime.asmcgocall.abi0" => &CGO_CALL,
                "runtime.systemstack" | "runtime.systemstack.abi0" => &CALL_DI,
                _ => return None,
            };
            let at = one(table.code(&f)?, pattern)?;
            Some(f.entry + at as u64 + 2)
        })
        .collect()
}

/// The offset of the cheapest correct probe point for an entry-only probe
/// on a Go function (register ABI). Go 1.21+ functions start with the
/// stack check `CMPQ SP, 16(R14)` and `JBE <grow the stack>` (single-
/// stepped; the grow path jumps back to the entry, which passes the check
/// again) and then `PUSHQ BP` (emulated): a probe there runs once per call
/// with every argument register as at entry. Any other start (Go 1.19's
/// `SUBQ $n, SP` frame, a frameless function) stays at 0.
pub fn go_probe_offset(code: &[u8]) -> u64 {
    const STACK_CHECK: [u8; 4] = [0x49, 0x3b, 0x66, 0x10];
    let Some(rest) = code.strip_prefix(&STACK_CHECK[..]) else {
        return 0;
    };
    let jbe = match rest {
        [0x76, _, ..] => 2,
        [0x0f, 0x86, _, _, _, _, ..] => 6,
        _ => return 0,
    };
    match rest.get(jbe) {
        Some(0x55) => (STACK_CHECK.len() + jbe) as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_probes_skip_the_stack_check() {
        // go1.25 setprofilebucket: CMPQ SP,0x10(R14); JBE rel32; PUSHQ BP
        let go125 = [
            0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x7c, 0x00, 0x00, 0x00, 0x55, 0x48, 0x89, 0xe5,
        ];
        assert_eq!(go_probe_offset(&go125), 10);
        // JBE rel8
        assert_eq!(
            go_probe_offset(&[0x49, 0x3b, 0x66, 0x10, 0x76, 0x7c, 0x55]),
            6
        );
        // go1.19: CMPQ; JBE; SUBQ $0x28,SP -> nothing emulated: 0.
        let go119 = [
            0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x80, 0x00, 0x00, 0x00, 0x48, 0x83, 0xec, 0x28,
        ];
        assert_eq!(go_probe_offset(&go119), 0);
        assert_eq!(go_probe_offset(&[0x55]), 0);
        assert_eq!(go_probe_offset(&[]), 0);
    }
}
