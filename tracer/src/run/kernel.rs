//! The session's view of the kernel side, as one small trait: the real
//! one is [`Probes`]; the tests drive a [`Session`](super::Session) with a
//! fake, so process lifecycle, runtime rows and the report's notes are
//! tested without root.

use tracer_common::{StackId, StackKey, StackTotals, SyscallEvent};

use crate::{
    attach::probe::{Attachment, ProbeError, Probes, UnwindNotes},
    ingest::events::{RawStack, ReadError, Reading},
    runtime::{KernelRecords, Runtimes},
};

/// What a session asks of the loaded programs and their maps (the
/// runtimes' own records included).
pub(crate) trait Kernel: KernelRecords {
    /// Probe a process's allocators (again after dlopen or exec) and let
    /// the runtimes attach what they need.
    fn attach_process(
        &mut self,
        pid: u32,
        runtimes: &mut Runtimes,
    ) -> Result<Attachment, ProbeError>;
    /// Watch a process without probes (node mode): its syscalls and
    /// sampled faults, with stacks.
    fn watch_process(&mut self, pid: u32, runtimes: &mut Runtimes) -> Result<(), ProbeError>;
    /// Remove a process's probes and registrations.
    fn detach_process(&mut self, pid: u32, runtimes: &mut Runtimes);
    /// Drop a process's rows from the kernel's tables.
    fn forget_process(&mut self, pid: u32) -> Result<(), ReadError> {
        self.forget_processes(&std::iter::once(pid).collect())
    }
    /// Drop the rows of several processes, one pass over each table.
    fn forget_processes(&mut self, pids: &std::collections::HashSet<u32>) -> Result<(), ReadError>;
    /// Per-stack totals and counters.
    fn read(&self) -> Result<Reading, ReadError>;
    /// Per-stack totals of live blocks older than `min_age_ns`.
    fn read_aged(&self, min_age_ns: u64) -> Result<Vec<(StackKey, StackTotals)>, ReadError>;
    /// A stored stack.
    fn stack(&self, id: StackId) -> Option<RawStack>;
    /// Memory syscalls and OOM kills since the last call.
    fn drain_syscalls(&mut self, out: &mut Vec<SyscallEvent>);
    /// Whether a stack passes through an allocator function of `pid`.
    fn inside_allocator(&self, pid: u32, ips: &[u64]) -> bool;
    /// What the unwinder could not be given.
    fn unwind_notes(&self) -> &UnwindNotes;
    /// Whether the OOM black box is armed, or why not.
    fn oom(&self) -> &Result<(), String>;
    /// What the programs cost so far (node mode's budget).
    fn cost(&self) -> crate::attach::probe::ProgramCost {
        Default::default()
    }
}

impl Kernel for Probes {
    fn attach_process(
        &mut self,
        pid: u32,
        runtimes: &mut Runtimes,
    ) -> Result<Attachment, ProbeError> {
        Probes::attach_process(self, pid, runtimes)
    }
    fn watch_process(&mut self, pid: u32, runtimes: &mut Runtimes) -> Result<(), ProbeError> {
        Probes::watch_process(self, pid, runtimes)
    }
    fn detach_process(&mut self, pid: u32, runtimes: &mut Runtimes) {
        Probes::detach_process(self, pid, runtimes)
    }
    fn forget_processes(&mut self, pids: &std::collections::HashSet<u32>) -> Result<(), ReadError> {
        Probes::forget_processes(self, pids)
    }
    fn read(&self) -> Result<Reading, ReadError> {
        Probes::read(self)
    }
    fn read_aged(&self, min_age_ns: u64) -> Result<Vec<(StackKey, StackTotals)>, ReadError> {
        Probes::read_aged(self, min_age_ns)
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
    fn unwind_notes(&self) -> &UnwindNotes {
        &self.unwind_notes
    }
    fn oom(&self) -> &Result<(), String> {
        &self.oom
    }
    fn cost(&self) -> crate::attach::probe::ProgramCost {
        Probes::cost(self)
    }
}
