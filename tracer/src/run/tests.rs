//! The session against a fake kernel side: process lifecycle (forks,
//! execs, exits of real child processes), the ledger fed from the kernel's
//! rows, and the report's notes, without root.

use std::{
    cell::RefCell,
    collections::HashMap,
    num::NonZeroU32,
    path::Path,
    process::{Child, Command},
    rc::Rc,
    sync::Arc,
};

use clap::Parser as _;

use tracer_common::{stop, Counter, GoBucketKey, StackId, StackKey, StackTotals, SyscallEvent};

use super::*;
use crate::{
    attach::probe::{Attachment, UnwindNotes},
    cli::Args,
    ingest::events::{RawInterp, RawStack, ReadError, Reading},
    runtime::{
        AttachFailure, Attacher, Found, KernelRecords, Language, Probed, RowCode, Runtime,
        RuntimeRow, Walker,
    },
    sys::procfs::MapEntry,
};

/// Records what the session asked, answers with what the test set.
struct FakeKernel {
    attached: Vec<u32>,
    detached: Vec<u32>,
    forgotten: Vec<u32>,
    rows: Vec<(StackKey, StackTotals)>,
    stacks: HashMap<StackId, RawStack>,
    counters: Vec<(Counter, u64)>,
    unwind_notes: UnwindNotes,
    oom: Result<(), String>,
    /// Processes that exit while being attached (killed, then the attach
    /// fails as the real one would).
    exit_on_attach: Vec<u32>,
    /// Processes watched (node mode).
    watched: Vec<u32>,
    /// Syscall and fault events the next drain returns.
    syscalls: Vec<SyscallEvent>,
    /// Processes whose loader has not mapped an allocator yet: the next
    /// this many attaches of each fail with `NoAllocator`.
    no_allocator_yet: HashMap<u32, u32>,
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
            unwind_notes: UnwindNotes::default(),
            oom: Ok(()),
            exit_on_attach: Vec::new(),
            watched: Vec::new(),
            syscalls: Vec::new(),
            no_allocator_yet: HashMap::new(),
        }
    }
}

impl Kernel for FakeKernel {
    fn attach_process(
        &mut self,
        pid: u32,
        runtimes: &mut Runtimes,
    ) -> Result<Attachment, ProbeError> {
        self.attached.push(pid);
        if let Some(left) = self.no_allocator_yet.get_mut(&pid).filter(|n| **n > 0) {
            *left -= 1;
            return Err(ProbeError::NoAllocator {
                pid,
                comm: "sh".into(),
            });
        }
        if self.exit_on_attach.contains(&pid) {
            // SAFETY: kill(2) on a process of the test's own tree.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            // The real attach fails once the exit has begun; kill(2)
            // returns before: wait until it is a zombie or reaped.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
            {
                assert!(std::time::Instant::now() < deadline, "{pid} never died");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            return Err(ProbeError::Maps {
                pid,
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let nz = NonZeroU32::new(pid).ok_or(ProbeError::NoProcess { pid })?;
        let found = runtimes
            .attach(nz, &[], self)
            .map_err(|f| ProbeError::Attach {
                pid,
                function: f.function,
                object: f.object,
                reason: f.reason,
            })?;
        let mut att = Attachment::default();
        for (object, probed) in found.objects {
            att.objects.push((
                object,
                probed
                    .into_iter()
                    .map(|p| crate::attach::probe::AttachedFunction {
                        name: p.function,
                        offset: p.offset,
                    })
                    .collect(),
            ));
        }
        Ok(att)
    }
    fn watch_process(&mut self, pid: u32, _runtimes: &mut Runtimes) -> Result<(), ProbeError> {
        self.watched.push(pid);
        Ok(())
    }
    fn detach_process(&mut self, pid: u32, runtimes: &mut Runtimes) {
        self.detached.push(pid);
        runtimes.detach(pid, self);
    }
    fn forget_processes(&mut self, pids: &std::collections::HashSet<u32>) -> Result<(), ReadError> {
        let mut pids: Vec<u32> = pids.iter().copied().collect();
        pids.sort_unstable();
        self.rows.retain(|(k, _)| !pids.contains(&k.tgid));
        self.forgotten.extend(pids);
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
    fn stack(&self, id: StackId) -> Option<RawStack> {
        self.stacks.get(&id).cloned()
    }
    fn drain_syscalls(&mut self, out: &mut Vec<SyscallEvent>) {
        out.append(&mut self.syscalls);
    }
    fn inside_allocator(&self, _pid: u32, _ips: &[u64]) -> bool {
        false
    }
    fn unwind_notes(&self) -> &UnwindNotes {
        &self.unwind_notes
    }
    fn oom(&self) -> &Result<(), String> {
        &self.oom
    }
}

impl KernelRecords for FakeKernel {
    fn go_buckets(&self) -> Result<Vec<(GoBucketKey, StackTotals)>, String> {
        Ok(Vec::new())
    }
}

impl Attacher for FakeKernel {
    fn entry_probe(
        &mut self,
        _pid: NonZeroU32,
        _program: &'static str,
        _open_path: &Path,
        _offset: u64,
    ) -> Result<(), String> {
        Ok(())
    }
    fn allocator_probe(
        &mut self,
        _pid: NonZeroU32,
        _program: &'static str,
        _open_path: &Path,
        _offset: u64,
        _code: &[u8],
    ) -> Result<u64, String> {
        Ok(0)
    }
    fn free_probe(
        &mut self,
        _pid: NonZeroU32,
        _program: &'static str,
        _open_path: &Path,
        _offset: u64,
        _code: &[u8],
        _pointer_arg: usize,
    ) -> Result<u64, String> {
        Ok(0)
    }
    fn register_walker(&mut self, _pid: u32, _walker: &Walker) -> Result<(), String> {
        Ok(())
    }
    fn unregister_walker(&mut self, _pid: u32, _runtime: u32) {}
    fn fsbase_offset(&self) -> u32 {
        0
    }
}

/// What a [`FakeRuntime`] was asked, shared with the test.
#[derive(Debug, Default)]
struct RuntimeLog {
    attached: Vec<u32>,
    detached: Vec<u32>,
    forgotten: Vec<u32>,
}

/// A runtime that finds itself in every process, accounts 8 KiB per
/// process itself and has a note per process.
struct FakeRuntime(Rc<RefCell<RuntimeLog>>);

impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn attach(
        &mut self,
        pid: NonZeroU32,
        _maps: &[MapEntry],
        _kernel: &mut dyn Attacher,
    ) -> Result<Found, AttachFailure> {
        self.0.borrow_mut().attached.push(pid.get());
        Ok(Found {
            objects: vec![(
                "/fake/runtime".into(),
                vec![Probed {
                    function: "fake_alloc".into(),
                    offset: 0,
                }],
            )],
            refusal: None,
        })
    }
    fn detach(&mut self, pid: u32, _kernel: &mut dyn Attacher) {
        self.0.borrow_mut().detached.push(pid);
    }
    fn forget(&mut self, pid: u32) {
        self.0.borrow_mut().forgotten.push(pid);
    }
    fn accounts_heap(&self, _pid: u32) -> bool {
        true
    }
    fn row_code(&self) -> Option<RowCode> {
        Some(RowCode {
            language: Language::Go,
            drop_prefix: "fake_",
        })
    }
    fn rows(&mut self, _kernel: &dyn KernelRecords) -> Result<Vec<RuntimeRow>, String> {
        let log = self.0.borrow();
        Ok(log
            .attached
            .iter()
            .filter(|p| !log.forgotten.contains(p))
            .map(|&pid| RuntimeRow {
                pid,
                key: 1,
                pcs: Arc::from(vec![own_stack as *const () as u64 + 1]),
                totals: StackTotals {
                    outstanding_bytes: 8192,
                    outstanding_allocs: 2,
                    total_bytes: 8192,
                    total_allocs: 2,
                },
            })
            .collect())
    }
    fn notes(&self) -> Vec<String> {
        self.0
            .borrow()
            .attached
            .iter()
            .map(|p| format!("process {p} runs FakeLang 0.1, which leaktrace does not know"))
            .collect()
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

/// A process tree that exists before the session starts, the shape of a
/// prefork master and its workers: `sh` with two children, one of which
/// (`sh`) has a child of its own. Every process is killed on drop.
struct Tree {
    root: Child,
    /// The root's children.
    children: Vec<u32>,
    grandchild: u32,
}

impl Tree {
    fn start() -> Self {
        use std::io::BufRead as _;
        let mut root = Command::new("sh")
            .args([
                "-c",
                r#"sleep 60 & a=$!; sh -c 'sleep 60 & echo "grandchild $!"; wait' & b=$!; echo "children $a $b"; wait"#,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start sh");
        let out = std::io::BufReader::new(root.stdout.take().expect("piped stdout"));
        let (mut children, mut grandchild) = (Vec::new(), None);
        for line in out.lines().take(2) {
            let line = line.expect("read the tree's pids");
            let pids: Vec<u32> = line
                .split_whitespace()
                .skip(1)
                .map(|p| p.parse().expect("a pid"))
                .collect();
            match line.split_whitespace().next() {
                Some("children") => children = pids,
                Some("grandchild") => grandchild = pids.first().copied(),
                _ => panic!("unexpected line from the tree: {line:?}"),
            }
        }
        assert_eq!(children.len(), 2, "the root's two children");
        Tree {
            root,
            children,
            grandchild: grandchild.expect("the grandchild's pid"),
        }
    }
    fn pid(&self) -> u32 {
        self.root.id()
    }
    /// Every descendant, sorted.
    fn descendants(&self) -> Vec<u32> {
        let mut all = self.children.clone();
        all.push(self.grandchild);
        all.sort_unstable();
        all
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for pid in self.descendants() {
            // SAFETY: kill(2) on a process this tree started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = self.root.kill();
        let _ = self.root.wait();
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
    session_with(kernel, Runtimes::none(), cfg)
}

fn session_with(kernel: FakeKernel, runtimes: Runtimes, cfg: &Config) -> Session<FakeKernel> {
    let selector = Selector::new(&cfg.comms, &cfg.cgroups);
    Session::new(kernel, runtimes, selector, cfg)
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
    // Its kernel rows go at the next reading, which leaves them out.
    assert!(s.probes.forgotten.is_empty());
    s.sample().expect("sample");
    assert_eq!(s.probes.forgotten, vec![child.pid()]);
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
        oom: Err("the kernel's BTF does not describe task_struct.tgid".into()),
        ..FakeKernel::default()
    };
    let log = Rc::new(RefCell::new(RuntimeLog::default()));
    let runtimes = Runtimes::new(vec![Box::new(FakeRuntime(log.clone()))]);
    let mut s = session_with(kernel, runtimes, &cfg);
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
    assert!(notes.contains("FakeLang 0.1"), "{notes}");
    assert!(notes.contains("OOM black box unavailable"), "{notes}");
}

#[test]
fn a_runtime_attaches_accounts_its_rows_and_is_told_of_exits() {
    let parent = Sleeper::start();
    let child = Sleeper::start();
    let cfg = config(&["-p", &parent.pid().to_string()]);
    let log = Rc::new(RefCell::new(RuntimeLog::default()));
    let runtimes = Runtimes::new(vec![Box::new(FakeRuntime(log.clone()))]);
    let mut s = session_with(FakeKernel::default(), runtimes, &cfg);
    s.add(parent.pid()).expect("attach the parent");
    s.on_proc_event(ProcEvent::Fork {
        parent: parent.pid(),
        child: child.pid(),
    });
    assert_eq!(log.borrow().attached, vec![parent.pid(), child.pid()]);
    s.sample().expect("sample");
    let r = s.report(&cfg);
    assert_eq!(
        r.stacks.len(),
        1,
        "one stack for both processes: {:?}",
        r.stacks
    );
    assert_eq!(r.stacks[0].outstanding_bytes, 2 * 8192);
    s.on_exit(child.pid());
    assert_eq!(log.borrow().detached, vec![child.pid()]);
    assert_eq!(log.borrow().forgotten, vec![child.pid()]);
    s.sample().expect("sample");
    let r = s.report(&cfg);
    assert_eq!(r.stacks[0].outstanding_bytes, 8192, "{:?}", r.stacks);
    assert_eq!(r.stacks[0].pids, vec![parent.pid()]);
}

#[test]
fn a_pid_s_existing_descendants_are_attached_at_start_and_noted() {
    let tree = Tree::start();
    let root = tree.pid();
    let cfg = config(&["-p", &root.to_string()]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.add_tree(root).expect("attach the tree");
    assert_eq!(s.probes.attached.first(), Some(&root), "the root first");
    let mut rest = s.probes.attached[1..].to_vec();
    rest.sort_unstable();
    assert_eq!(rest, tree.descendants(), "children and grandchild");
    assert_eq!(s.running(), 4);

    // A fork event for a child the walk found does not attach it twice.
    s.on_proc_event(ProcEvent::Fork {
        parent: root,
        child: tree.children[0],
    });
    assert_eq!(s.probes.attached.len(), 4, "{:?}", s.probes.attached);

    s.sample().expect("sample");
    let notes = s.report(&cfg).notes.join("\n");
    assert!(
        notes.contains(&format!(
            "process {root} (sh): 3 existing descendants traced"
        )),
        "{notes}"
    );
}

#[test]
fn a_child_caught_before_its_loader_is_attached_at_a_later_tick() {
    let parent = Sleeper::start();
    let child = Sleeper::start();
    let cfg = config(&["-p", &parent.pid().to_string()]);
    let kernel = FakeKernel {
        no_allocator_yet: HashMap::from([(child.pid(), 2)]),
        ..FakeKernel::default()
    };
    let mut s = session(kernel, &cfg);
    s.add(parent.pid()).expect("attach the parent");
    s.on_proc_event(ProcEvent::Fork {
        parent: parent.pid(),
        child: child.pid(),
    });
    assert!(
        !s.targets.contains_key(&child.pid()),
        "no target (and no warning) while its loader runs"
    );
    s.retry_late();
    assert!(!s.targets.contains_key(&child.pid()), "still no allocator");
    s.retry_late();
    assert_eq!(s.running(), 2, "attached once its allocator is mapped");
    s.retry_late();
    assert_eq!(
        s.probes
            .attached
            .iter()
            .filter(|p| **p == child.pid())
            .count(),
        3,
        "tried three times, then left alone"
    );
}

#[test]
fn a_child_that_never_maps_an_allocator_is_reported_after_the_window() {
    let parent = Sleeper::start();
    let child = Sleeper::start();
    let cfg = config(&["-p", &parent.pid().to_string()]);
    let kernel = FakeKernel {
        no_allocator_yet: HashMap::from([(child.pid(), u32::MAX)]),
        ..FakeKernel::default()
    };
    let mut s = session(kernel, &cfg);
    s.add(parent.pid()).expect("attach the parent");
    s.on_proc_event(ProcEvent::Fork {
        parent: parent.pid(),
        child: child.pid(),
    });
    // As if the window had passed.
    for (_, since) in &mut s.late {
        *since -= std::time::Duration::from_secs(60);
    }
    s.retry_late();
    assert!(s.late.is_empty());
    s.sample().expect("sample");
    let notes = s.report(&cfg).notes.join("\n");
    assert!(
        notes.contains(&format!("process {} (sleep) not traced", child.pid())),
        "{notes}"
    );
}

#[test]
fn a_descendant_that_exits_during_the_walk_is_not_an_error() {
    let tree = Tree::start();
    let root = tree.pid();
    let gone = tree.grandchild;
    let cfg = config(&["-p", &root.to_string()]);
    let kernel = FakeKernel {
        exit_on_attach: vec![gone],
        ..FakeKernel::default()
    };
    let mut s = session(kernel, &cfg);
    s.add_tree(root).expect("the root attached");
    assert!(s.probes.attached.contains(&gone), "it was tried");
    assert!(
        !s.targets.contains_key(&gone),
        "an exited descendant is no target"
    );
    assert_eq!(s.running(), 3);
    s.sample().expect("sample");
    let notes = s.report(&cfg).notes.join("\n");
    assert!(notes.contains("2 existing descendants traced"), "{notes}");
    assert!(!notes.contains("not traced"), "{notes}");
}

#[test]
fn no_children_traces_only_the_given_pid_neither_existing_nor_forked_children() {
    let tree = Tree::start();
    let root = tree.pid();
    let cfg = config(&["-p", &root.to_string(), "--no-children"]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.add_tree(root).expect("attach the root");
    assert_eq!(s.probes.attached, vec![root], "existing children are not");
    s.on_proc_event(ProcEvent::Fork {
        parent: root,
        child: tree.children[0],
    });
    // Without the process connector, children are found by a rescan.
    s.rescan();
    assert_eq!(s.probes.attached, vec![root], "forked children are not");
    s.sample().expect("sample");
    let notes = s.report(&cfg).notes.join("\n");
    assert!(notes.contains("(--no-children)"), "{notes}");
    assert!(!notes.contains("existing descendant"), "{notes}");
}

#[test]
fn without_the_connector_a_rescan_follows_a_traced_process_s_children() {
    // The counterpart of the test above: the rescan does find them.
    let tree = Tree::start();
    let root = tree.pid();
    let cfg = config(&["-p", &root.to_string()]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.add(root).expect("attach the root alone");
    s.rescan();
    for child in &tree.children {
        assert!(
            s.probes.attached.contains(child),
            "the rescan finds child {child}: {:?}",
            s.probes.attached
        );
    }
}

/// Node mode: processes are watched, not probed; sampled faults become a
/// `page_fault` row weighted by their period, mmaps an `mmap` row, and an
/// exited process leaves nothing behind.
#[test]
fn node_mode_watches_and_keeps_one_ledger_per_source() {
    let p = Sleeper::start();
    let cfg = config(&["node"]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.watch_only = true;
    s.by_source = Some(Default::default());
    s.add(p.pid()).expect("watch");
    assert_eq!(s.probes.watched, vec![p.pid()]);
    assert!(s.probes.attached.is_empty(), "node mode probes nothing");
    let stack = 0x77;
    s.probes.stacks.insert(stack, own_stack());
    let fault = |addr: u64| SyscallEvent {
        ts_ns: 1,
        tgid: p.pid(),
        nr: sys::PAGE_FAULT,
        ret: addr,
        args: [2, 16, 0],
        stack_id: stack,
        flags: 0,
        _pad: 0,
    };
    s.probes.syscalls = vec![
        fault(0x1000_0000),
        fault(0x1000_1000),
        SyscallEvent {
            ts_ns: 2,
            tgid: p.pid(),
            nr: sys::MMAP,
            ret: 0x2000_0000,
            args: [1 << 20, sys::MAP_ANONYMOUS, 0],
            stack_id: stack,
            flags: 0,
            _pad: 0,
        },
    ];
    s.sample().expect("sample");
    let (faults, _) = s.source_stacks(Source::PageFault, None, 10);
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].outstanding_bytes, 2 * 16 * 4096);
    assert_eq!(faults[0].source, Some(Source::PageFault));
    let (mmaps, _) = s.source_stacks(Source::Mmap, Some(p.pid()), 10);
    assert_eq!(mmaps.len(), 1);
    assert_eq!(mmaps[0].outstanding_bytes, 1 << 20);
    assert!(s.ledger.stacks.is_empty(), "the process ledger stays empty");
    s.on_exit(p.pid());
    assert!(
        !s.targets.contains_key(&p.pid()),
        "an exited process is forgotten"
    );
    s.sample().expect("sample");
    assert!(s.source_stacks(Source::PageFault, None, 10).0.is_empty());
}

/// A traced process that maps new code (dlopen) is looked at again at
/// once: its new objects get their probes and unwind tables before the
/// next reading.
#[test]
fn new_executable_mappings_are_attached_at_once() {
    let p = Sleeper::start();
    let cfg = config(&["-p", &p.pid().to_string()]);
    let mut s = session(FakeKernel::default(), &cfg);
    s.add(p.pid()).expect("attach");
    assert_eq!(s.probes.attached, vec![p.pid()]);
    s.probes.syscalls = vec![SyscallEvent {
        ts_ns: 1,
        tgid: p.pid(),
        nr: sys::MMAP_EXEC,
        ret: 0x7f00_0000_0000,
        args: [0x1000, 0, 0],
        stack_id: 0,
        flags: 0,
        _pad: 0,
    }];
    s.on_events().expect("events");
    assert_eq!(s.probes.attached, vec![p.pid(), p.pid()]);
}
