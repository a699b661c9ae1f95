//! Kernel errors turned into one line a user can act on.

use super::*;

/// Why the kernel refused program `name`, in words a user can act on.
pub(super) fn rejected(name: &str, e: &ProgramError) -> ProbeError {
    let chain = error_chain(e);
    if io_error_in(e).and_then(io::Error::raw_os_error) == Some(libc::E2BIG) {
        // "processed 1000001 insns (limit 1000000)" in the verifier's log.
        let processed = chain
            .split("processed ")
            .skip(1)
            .find_map(|rest| {
                let n = rest.split_whitespace().next()?;
                (rest[n.len()..].trim_start().starts_with("insns")).then(|| n.to_string())
            })
            .unwrap_or_else(|| "over 1,000,000".to_string());
        return ProbeError::TooComplex {
            program: name.to_string(),
            processed,
            kernel: crate::sys::procfs::kernel_release(),
        };
    }
    if let Some((_, log)) = chain.split_once("Verifier output:") {
        log::debug!("verifier log of {name}:\n{log}");
        // The verifier's reason is the last line before its statistics.
        let why = log
            .lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("verification time"))
            .filter(|l| !l.is_empty())
            .last()
            .unwrap_or("no reason given")
            .to_string();
        return ProbeError::Rejected {
            program: name.to_string(),
            kernel: crate::sys::procfs::kernel_release(),
            why,
        };
    }
    ProbeError::Load(format!("{name} was rejected: {chain}"), load_hint(e))
}

/// The first `io::Error` in an error's source chain.
pub(super) fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

pub(super) fn load_hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
    match io_error_in(e).and_then(io::Error::raw_os_error) {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE"
        }
        Some(libc::EINVAL) | Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => {
            "this kernel may lack a BPF feature leaktrace needs (see `leaktrace --version` for \
             what it found; Linux 5.8 or newer with BTF is required)"
        }
        _ => "see `leaktrace --version` for the kernel features leaktrace found",
    }
}

/// A one-line reason for a failed attach, with the fix where one is known.
pub(super) fn attach_reason(e: &ProgramError) -> String {
    let io = io_error_in(e);
    match io.and_then(io::Error::raw_os_error) {
        Some(libc::EINVAL) => format!(
            "{}; another tracer may hold a uprobe with a reference counter \
             (USDT semaphore) on this address (dmesg says \"ref_ctr_offset mismatch\"): \
             stop that tracer and retry",
            io.map(|e| e.to_string()).unwrap_or_default()
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "{}; run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE",
            io.map(|e| e.to_string()).unwrap_or_default()
        ),
        Some(libc::ENOENT) => format!(
            "{}; the process exited or its object is gone",
            io.map(|e| e.to_string()).unwrap_or_default()
        ),
        _ => error_chain(e),
    }
}
