//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find a
//! struct member's byte offset, so raw tracepoint programs can read fields
//! of kernel structs (the OOM victim's `task_struct.tgid`) on any kernel.

/// Byte offset of `member` in `struct name`, from raw BTF data.
pub fn member_offset(btf: &[u8], name: &str, member: &str) -> Option<u32> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(btf.get(off..off + 4)?.try_into().ok()?))
    };
    if btf.get(0..2)? != [0x9f, 0xeb] {
        return None;
    }
    let hdr_len = u32_at(4)? as usize;
    let type_off = u32_at(8)? as usize;
    let type_len = u32_at(12)? as usize;
    let str_off = u32_at(16)? as usize;
    let str_len = u32_at(20)? as usize;
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let string = |off: u32| -> Option<&[u8]> {
        let start = strings + off as usize;
        if off as usize >= str_len {
            return None;
        }
        let rest = btf.get(start..strings + str_len)?;
        let end = rest.iter().position(|b| *b == 0)?;
        Some(&rest[..end])
    };
    let mut pos = types;
    let end = types + type_len;
    while pos + 12 <= end {
        let name_off = u32_at(pos)?;
        let info = u32_at(pos + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let body = pos + 12;
        let extra = match kind {
            1 => 4,                    // INT
            3 => 12,                   // ARRAY
            4 | 5 => 12 * vlen,        // STRUCT, UNION
            6 => 8 * vlen,             // ENUM
            13 => 8 * vlen,            // FUNC_PROTO
            14 => 4,                   // VAR
            15 => 12 * vlen,           // DATASEC
            17 => 4,                   // DECL_TAG
            19 => 12 * vlen,           // ENUM64
            2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, quals, FUNC, FLOAT, TYPE_TAG
            _ => return None,
        };
        if kind == 4 && string(name_off) == Some(name.as_bytes()) {
            for i in 0..vlen {
                let m = body + 12 * i;
                if string(u32_at(m)?) == Some(member.as_bytes()) {
                    let off = u32_at(m + 8)?;
                    let bits = if kind_flag { off & 0x00ff_ffff } else { off };
                    return Some(bits / 8);
                }
            }
        }
        pos = body + extra;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_struct_tgid_on_this_kernel() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipping: no /sys/kernel/btf/vmlinux");
            return;
        };
        let tgid = member_offset(&btf, "task_struct", "tgid").expect("tgid offset");
        let pid = member_offset(&btf, "task_struct", "pid").expect("pid offset");
        // pid and tgid are adjacent ints in every kernel since 2.6.
        assert_eq!(tgid, pid + 4);
        assert!(member_offset(&btf, "task_struct", "no_such_member").is_none());
    }

    #[test]
    fn rejects_garbage() {
        assert!(member_offset(b"not btf at all, not at all....", "a", "b").is_none());
    }
}
