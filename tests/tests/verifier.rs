//! The kernel verifies each eBPF program by walking its paths, up to one
//! million instructions. The unwinder runs inside `alloc_exit` and
//! `sys_exit`; a change that multiplies the verifier's states (one branch
//! too many on registers that reach the walk) fails every load at once.
//! `sys_exit` once stood at 977,434. This keeps a margin and says which
//! program is close, before the limit is hit.

use leaktrace_tests::{require_bpf, Fixture, Tracer};

const LIMIT: u64 = 1_000_000;
/// Fail when a program uses more than this share of the limit.
const BUDGET: u64 = 700_000;

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> libc::c_long {
    // SAFETY: bpf(2) with a zero-padded attribute buffer of the size given.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) }
}

/// (name, instructions the verifier processed) of every loaded program.
fn loaded_programs() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut id: u32 = 0;
    loop {
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        if bpf(BPF_PROG_GET_NEXT_ID, &mut attr) != 0 {
            break;
        }
        id = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue;
        }
        // struct bpf_prog_info: name at 64 (16 bytes), verified_insns at 216.
        let mut info = [0u8; 256];
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(fd as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        let rc = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr);
        // SAFETY: closing the descriptor bpf(2) gave us.
        unsafe { libc::close(fd as i32) };
        if rc != 0 {
            continue;
        }
        let name: String = info[64..80]
            .iter()
            .take_while(|b| **b != 0)
            .map(|b| *b as char)
            .collect();
        let insns = u32::from_ne_bytes(info[216..220].try_into().expect("4 bytes"));
        out.push((name, u64::from(insns)));
    }
    out
}

#[test]
fn unwinding_programs_keep_a_verifier_margin() {
    if !require_bpf("unwinding_programs_keep_a_verifier_margin") {
        return;
    }
    let fx = Fixture::start(&leaktrace_tests::fixture("leaky"), &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json"]);
    let programs = loaded_programs();
    drop(tracer.interrupt());
    for name in ["alloc_exit", "sys_exit"] {
        let seen: Vec<u64> = programs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, i)| *i)
            .collect();
        assert!(
            !seen.is_empty(),
            "{name} is not loaded (or this kernel does not report verified_insns): {programs:?}"
        );
        for insns in seen {
            assert!(
                insns > 0 && insns <= BUDGET,
                "{name}: the verifier processed {insns} instructions, over the budget of \
                 {BUDGET} (limit {LIMIT}); look for branches on values that reach the unwinder"
            );
            eprintln!("{name}: {insns} instructions verified (budget {BUDGET}, limit {LIMIT})");
        }
    }
}
