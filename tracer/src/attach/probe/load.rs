//! Load-time pieces: the recording chains' program arrays, the raw
//! tracepoints, the eBPF log reader (`--debug-bpf`) and the ring buffer's
//! descriptor for the event loop.

use super::*;

pub(super) fn attach_raw_tp(ebpf: &mut Ebpf, prog: &str, tp: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing"))?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    p.attach(tp)
        .map(|_| ())
        .map_err(|e| format!("failed to attach raw tracepoint {tp}: {}", error_chain(&e)))
}

/// Put each stage of a recording chain in its program array.
pub(super) fn fill_chain(
    ebpf: &mut Ebpf,
    map: &'static str,
    stages: &[(u32, &str)],
) -> Result<ProgramArray<MapData>, ProbeError> {
    let broken = |what: String| ProbeError::Load(format!("recording chain {map}: {what}"), "");
    let mut array = ebpf
        .take_map(map)
        .ok_or_else(|| broken("the map is missing".into()))
        .and_then(|m| ProgramArray::try_from(m).map_err(|e| broken(e.to_string())))?;
    for &(stage, name) in stages {
        let prog = ebpf
            .program(name)
            .ok_or_else(|| broken(format!("program {name} is missing")))?;
        let fd = prog.fd().map_err(|e| broken(format!("{name}: {e}")))?;
        array
            .set(stage, fd, 0)
            .map_err(|e| broken(format!("{name}: {e}")))?;
    }
    Ok(array)
}

impl Probes {
    /// The reader of the eBPF programs' log records (`--debug-bpf`), for
    /// the caller to poll; `None` when off or when no program logs.
    pub fn take_bpf_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        if !self.options.debug_bpf {
            return None;
        }
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| log::warn!("--debug-bpf: the eBPF log is unavailable: {e}"))
            .ok()
    }

    /// A second descriptor of the event ring buffer, to wait on.
    pub fn events_fd(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        self.events.as_ref()?.as_fd().try_clone_to_owned().ok()
    }
}
