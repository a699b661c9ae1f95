//! The session's view of the kernel side, as one small trait: the real
//! one is [`Probes`]; the tests drive a [`Session`](super::Session) with a
//! fake, so process lifecycle, Go bucket scaling and the report's notes
//! are tested without root.

use tracer_common::{GoBucketKey, StackId, StackKey, StackTotals, SyscallEvent};

use crate::{
    attach::probe::{Attachment, ProbeError, Probes, UnwindNotes},
    ingest::events::{RawStack, ReadError, Reading},
    runtime::{go::GoTarget, python::PyTarget},
};

/// What a session asks of the loaded programs and their maps.
pub(crate) trait Kernel {
    /// Probe a process's allocators (again after dlopen or exec).
    fn attach_process(&mut self, pid: u32) -> Result<Attachment, ProbeError>;
    /// Remove a process's probes and registrations.
    fn detach_process(&mut self, pid: u32);
    /// Drop a process's rows from the kernel's tables.
    fn forget_process(&mut self, pid: u32) -> Result<(), ReadError>;
    /// Per-stack totals and counters.
    fn read(&self) -> Result<Reading, ReadError>;
    /// Per-stack totals of live blocks older than `min_age_ns`.
    fn read_aged(&self, min_age_ns: u64) -> Result<Vec<(StackKey, StackTotals)>, ReadError>;
    /// The Go runtime's sampled objects per bucket, raw.
    fn read_go(&self) -> Result<Vec<(GoBucketKey, StackTotals)>, ReadError>;
    /// A stored stack.
    fn stack(&self, id: StackId) -> Option<RawStack>;
    /// Memory syscalls and OOM kills since the last call.
    fn drain_syscalls(&mut self, out: &mut Vec<SyscallEvent>);
    /// Whether a stack passes through an allocator function of `pid`.
    fn inside_allocator(&self, pid: u32, ips: &[u64]) -> bool;
    /// The CPython found in a process.
    fn python_target(&self, pid: u32) -> Option<&PyTarget>;
    /// The Go runtimes traced, per process.
    fn go_targets(&self) -> Vec<(u32, &GoTarget)>;
    /// What the unwinder could not be given.
    fn unwind_notes(&self) -> &UnwindNotes;
    /// Why Python or Go processes show less than they could.
    fn runtime_notes(&self) -> Vec<String>;
    /// Whether the OOM black box is armed, or why not.
    fn oom(&self) -> &Result<(), String>;
}

impl Kernel for Probes {
    fn attach_process(&mut self, pid: u32) -> Result<Attachment, ProbeError> {
        Probes::attach_process(self, pid)
    }
    fn detach_process(&mut self, pid: u32) {
        Probes::detach_process(self, pid)
    }
    fn forget_process(&mut self, pid: u32) -> Result<(), ReadError> {
        Probes::forget_process(self, pid)
    }
    fn read(&self) -> Result<Reading, ReadError> {
        Probes::read(self)
    }
    fn read_aged(&self, min_age_ns: u64) -> Result<Vec<(StackKey, StackTotals)>, ReadError> {
        Probes::read_aged(self, min_age_ns)
    }
    fn read_go(&self) -> Result<Vec<(GoBucketKey, StackTotals)>, ReadError> {
        Probes::read_go(self)
    }
    fn stack(&self, id: StackId) -> Option<RawStack> {
        Probes::stack(self, id)
    }
    fn drain_syscalls(&mut self, out: &mut Vec<SyscallEvent>) {
        Probes::drain_syscalls(self, out)
    }
    fn inside_allocator(&self, pid: u32, ips: &[u64]) -> bool {
        Probes::inside_allocator(self, pid, ips)
    }
    fn python_target(&self, pid: u32) -> Option<&PyTarget> {
        Probes::python_target(self, pid)
    }
    fn go_targets(&self) -> Vec<(u32, &GoTarget)> {
        Probes::go_targets(self).collect()
    }
    fn unwind_notes(&self) -> &UnwindNotes {
        &self.unwind_notes
    }
    fn runtime_notes(&self) -> Vec<String> {
        self.python_notes
            .iter()
            .chain(self.go_notes.iter())
            .cloned()
            .collect()
    }
    fn oom(&self) -> &Result<(), String> {
        &self.oom
    }
}
