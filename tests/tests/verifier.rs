//! The kernel verifies each eBPF program by walking its paths, up to one
//! million instructions, and the same object can cost twice as much on
//! another build of the same kernel release (alloc_exit: 498k on one
//! 6.18.44 build, over the limit on another). So every program must stay
//! under a quarter of the limit, on every kernel it is run on (the VM
//! matrix runs this test too). Each program's figure is printed.

use leaktrace_tests::{require_bpf, Fixture, Tracer};

const LIMIT: u64 = 1_000_000;
/// Fail when a program uses more than this share of the limit.
const BUDGET: u64 = LIMIT / 4;

/// Every program of the object, by the name the kernel keeps (15 bytes).
const PROGRAMS: &[&str] = &[
    "malloc_enter",
    "calloc_enter",
    "realloc_enter",
    "reallocarray_enter",
    "memalign_enter",
    "posix_memalign_enter",
    "valloc_enter",
    "free_enter",
    "alloc_exit",
    "native_alloc",
    "python_alloc",
    "lua_alloc",
    "finish_alloc",
    "sys_exit",
    "native_syscall",
    "python_syscall",
    "lua_syscall",
    "finish_syscall",
    "oom_mark_victim",
    "page_fault",
    "go_setprofilebucket",
    "go_mprof_free",
    "lua_malloc_enter",
    "lua_realloc_enter",
    "lua_free_enter",
];

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
    check_programs(&[]);
}

/// With `--debug-bpf` the programs keep their log statements, which the
/// verifier then checks too: still within the budget.
#[test]
fn programs_with_bpf_diagnostics_keep_a_verifier_margin() {
    if !require_bpf("programs_with_bpf_diagnostics_keep_a_verifier_margin") {
        return;
    }
    check_programs(&["--debug-bpf"]);
}

/// Node mode loads the same object with the page-fault program switched on
/// (`FAULT_PERIOD` is a constant at load: off, the verifier removes it).
#[test]
fn node_mode_programs_keep_a_verifier_margin() {
    if !require_bpf("node_mode_programs_keep_a_verifier_margin") {
        return;
    }
    let mut tracer = Tracer::spawn(&["node", "--comm", "leaktrace-none", "-d", "60"]);
    assert!(
        tracer
            .wait_stderr("leaktrace: watching", std::time::Duration::from_secs(120))
            .is_some(),
        "node mode did not start"
    );
    let programs = loaded_programs();
    drop(tracer.interrupt());
    check_loaded(&programs, &[], " in node mode");
}

fn check_programs(extra: &[&str]) {
    let fx = Fixture::start(&leaktrace_tests::fixture("leaky"), &[]);
    let pid = fx.pid().to_string();
    let mut args = vec!["-p", pid.as_str(), "-i", "0", "--format", "json"];
    args.extend_from_slice(extra);
    let tracer = Tracer::attach(&args);
    let programs = loaded_programs();
    drop(tracer.interrupt());
    let how = if extra.is_empty() {
        ""
    } else {
        ", with --debug-bpf"
    };
    check_loaded(&programs, &["page_fault"], how);
}

/// Every program but `skip` is loaded and within the budget.
fn check_loaded(programs: &[(String, u64)], skip: &[&str], how: &str) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut over = Vec::new();
    for full in PROGRAMS.iter().filter(|p| !skip.contains(p)) {
        let name = &full[..full.len().min(15)];
        let seen: Vec<u64> = programs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, i)| *i)
            .collect();
        assert!(
            !seen.is_empty(),
            "{full} is not loaded (or this kernel does not report verified_insns): {programs:?}"
        );
        let insns = seen.iter().copied().max().unwrap_or(0);
        eprintln!(
            "verifier: {full:<22} {insns:>8} instructions on Linux {}{how} (budget {BUDGET}, \
             limit {LIMIT})",
            kernel.trim(),
        );
        if insns == 0 || insns > BUDGET {
            over.push(format!("{full}: {insns}"));
        }
    }
    assert!(
        over.is_empty(),
        "over the verifier budget of {BUDGET} instructions (limit {LIMIT}): {}; look for \
         branches on values that reach a loop, or split the stage",
        over.join(", ")
    );
}
