//! The session against a fake kernel side: process lifecycle (forks,
//! execs, exits of real child processes), the ledger fed from the kernel's
//! rows, and the report's notes, without root.

use std::{
    collections::HashMap,
    process::{Child, Command},
};

use clap::Parser as _;
use tracer_common::{stop, Counter, GoBucketKey, StackId, StackKey, StackTotals, SyscallEvent};

use super::*;
use crate::{
    attach::probe::{Attachment, UnwindNotes},
    cli::Args,
    ingest::events::{RawInterp, RawStack, ReadError, Reading},
    runtime::{go::GoTarget, python::PyTarget},
};

/// Records what the session asked, answers with what the test set.
struct FakeKernel {
    attached: Vec<u32>,
    detached: Vec<u32>,
    forgotten: Vec<u32>,
    rows: Vec<(StackKey, StackTotals)>,
    stacks: HashMap<StackId, RawStack>,
    counters: Vec<(Counter, u64)>,
    notes: Vec<String>,
    unwind_notes: UnwindNotes,
    oom: Result<(), String>,
}

impl Default for FakeKernel {
    fn default() -> Self {
        FakeKernel {
            attached: Vec::new(),
            detached: Vec::new(),
            forgotten: Vec::new(),
            rows: Vec::new(),
            stacks: HashMap::new(),
            counters: Vec::new(),
            notes: Vec::new(),
            unwind_notes: UnwindNotes::default(),
            oom: Ok(()),
        }
    }
}

impl Kernel for FakeKernel {
    fn attach_process(&mut self, pid: u32) -> Result<Attachment, ProbeError> {
        self.attached.push(pid);
        Ok(Attachment::default())
    }
    fn detach_process(&mut self, pid: u32) {
        self.detached.push(pid);
    }
    fn forget_process(&mut self, pid: u32) -> Result<(), ReadError> {
        self.forgotten.push(pid);
        self.rows.retain(|(k, _)| k.tgid != pid);
        Ok(())
    }
    fn read(&self) -> Result<Reading, ReadError> {
        Ok(Reading {
            rows: self.rows.clone(),
            counters: Counters(self.counters.iter().map(|(c, n)| (c.name(), *n)).collect()),
        })
    }
    fn read_aged(&self, _min_age_ns: u64) -> Result<Vec<(StackKey, StackTotals)>, ReadError> {
        Ok(self.rows.clone())
    }
    fn read_go(&self) -> Result<Vec<(GoBucketKey, StackTotals)>, ReadError> {
        Ok(Vec::new())
    }
    fn stack(&self, id: StackId) -> Option<RawStack> {
        self.stacks.get(&id).cloned()
    }
    fn drain_syscalls(&mut self, _out: &mut Vec<SyscallEvent>) {}
    fn inside_allocator(&self, _pid: u32, _ips: &[u64]) -> bool {
        false
    }
    fn python_target(&self, _pid: u32) -> Option<&PyTarget> {
        None
    }
    fn go_targets(&self) -> Vec<(u32, &GoTarget)> {
        Vec::new()
    }
    fn unwind_notes(&self) -> &UnwindNotes {
        &self.unwind_notes
    }
    fn runtime_notes(&self) -> Vec<String> {
        self.notes.clone()
    }
    fn oom(&self) -> &Result<(), String> {
        &self.oom
    }
}

/// A child process that lives until dropped.
struct Sleeper(Child);

impl Sleeper {
    fn start() -> Self {
        Sleeper(
            Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("start sleep"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(args: &[&str]) -> Config {
    let mut v = vec!["leaktrace"];
    v.extend_from_slice(args);
    Args::try_parse_from(v)
        .expect("flags parse")
        .validate()
        .expect("flags are valid")
}

fn session(kernel: FakeKernel, cfg: &Config) -> Session<FakeKernel> {
    let selector = Selector::new(&cfg.comms, &cfg.cgroups);
    Session::new(kernel, selector, cfg)
}

/// A stack of this test process's own code, so it resolves to a module.
fn own_stack() -> RawStack {
    RawStack {
        ips: vec![
            own_stack as *const () as u64 + 1,
            config as *const () as u64 + 1,
        ],
        stop: stop::COMPLETE,
        interp: RawInterp::default(),
    }
}

#[test]
fn a_traced_parent_s_fork_is_followed_and_an_exit_drops_its_rows() {
    let parent = Sleeper::start();
    let child = Sleeper::start();
    let stranger = Sleeper::start();
    let cfg = config(&["-p", &parent.pid().to_string()]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.add(parent.pid()).expect("attach the parent");
    s.on_proc_event(ProcEvent::Fork {
        parent: parent.pid(),
        child: child.pid(),
    });
    // A fork of a process nobody traces, matching no name or cgroup.
    s.on_proc_event(ProcEvent::Fork {
        parent: std::process::id(),
        child: stranger.pid(),
    });
    assert_eq!(
        s.probes.attached,
        vec![parent.pid(), child.pid()],
        "the traced parent's child is attached, the stranger is not"
    );
    assert_eq!(s.running(), 2);

    // The child held memory, then exited: its rows go, the parent's stay.
    let stack = 0x51;
    s.probes.stacks.insert(stack, own_stack());
    for pid in [parent.pid(), child.pid()] {
        s.probes.rows.push((
            StackKey {
                tgid: pid,
                _pad: 0,
                stack_id: stack,
            },
            StackTotals {
                outstanding_bytes: 4096,
                outstanding_allocs: 1,
                total_bytes: 4096,
                total_allocs: 1,
            },
        ));
    }
    s.sample().expect("sample");
    s.on_exit(child.pid());
    assert_eq!(s.probes.detached, vec![child.pid()]);
    assert_eq!(s.probes.forgotten, vec![child.pid()]);
    s.sample().expect("sample");
    let r = s.report(&cfg);
    assert_eq!(r.stacks.len(), 1, "{:?}", r.stacks);
    assert_eq!(r.stacks[0].outstanding_bytes, 4096);
    assert_eq!(r.stacks[0].pids, vec![parent.pid()]);
    let exited: Vec<&str> = r
        .targets
        .iter()
        .filter(|t| t.pid == child.pid())
        .map(|t| t.status.as_str())
        .collect();
    assert_eq!(exited, vec!["exited"]);
    assert!(!s.done(), "the parent still runs");
}

#[test]
fn the_last_exit_of_a_fixed_set_keeps_its_rows_for_the_final_report() {
    let only = Sleeper::start();
    let cfg = config(&["-p", &only.pid().to_string()]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.add(only.pid()).expect("attach");
    s.on_exit(only.pid());
    assert_eq!(s.probes.detached, vec![only.pid()]);
    assert!(
        s.probes.forgotten.is_empty(),
        "the final report needs the last process's rows"
    );
    assert!(s.done());
}

#[test]
fn exec_of_a_traced_process_attaches_its_new_image() {
    let p = Sleeper::start();
    let cfg = config(&["-p", &p.pid().to_string()]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.add(p.pid()).expect("attach");
    s.on_proc_event(ProcEvent::Exec { pid: p.pid() });
    assert_eq!(s.probes.detached, vec![p.pid()]);
    assert_eq!(s.probes.attached, vec![p.pid(), p.pid()]);
    assert_eq!(s.running(), 1);
}

#[test]
fn notes_say_what_the_kernel_side_lost_and_why() {
    let p = Sleeper::start();
    let cfg = config(&["-p", &p.pid().to_string()]);
    let kernel = FakeKernel {
        counters: vec![
            (Counter::Allocs, 7),
            (Counter::Nested, 55_696),
            (Counter::MissingEntry, 3),
            (Counter::RepeatedReturns, 900),
        ],
        notes: vec!["process 1 runs Python 3.7, which leaktrace does not know".into()],
        oom: Err("the kernel's BTF does not describe task_struct.tgid".into()),
        ..FakeKernel::default()
    };
    let mut s = session(kernel, &cfg);
    s.add(p.pid()).expect("attach");
    s.sample().expect("sample");
    let notes = s.report(&cfg).notes.join("\n");
    assert!(
        notes.starts_with("WARNING: allocator calls do not pair"),
        "{notes}"
    );
    assert!(
        notes.contains("3 missing_entry (returns whose entry"),
        "{notes}"
    );
    assert!(notes.contains("900 repeated runs, not losses"), "{notes}");
    assert!(notes.contains("Python 3.7"), "{notes}");
    assert!(notes.contains("OOM black box unavailable"), "{notes}");
}
