//! Loading the eBPF object and attaching allocator probes to processes.
//!
//! Input: validated sizes and target pids. Output: a loaded [`Probes`]
//! whose maps `events` reads, plus, per process, what was attached where
//! (or a [`ProbeError`] that says why not and what to do).
//! This module and `events` are the only ones that touch aya.

use std::{
    collections::HashMap,
    io,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, ProgramArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        Program, ProgramError, RawTracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use tracer_common::{maps, ExecMap, ProcMaps, PyProc, UnwindRow, MAX_PROC_MAPS};

use crate::{
    attach::prologue,
    runtime::{AttachFailure, Runtimes},
    sys::elf,
    sys::procfs,
    unwind::table as unwind_table,
};

mod allocators;
mod errors;
mod load;
mod runtimes;
mod unwind;

use errors::{attach_reason, error_chain, load_hint, rejected};
use load::{attach_raw_tp, fill_chain};

/// aya-log's `Level::Debug`: error, warn, info and debug statements run.
const AYA_LOG_DEBUG: u8 = 4;

/// The eBPF object, built by `build.rs` from `tracer-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// How a probed function is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Entry program plus the shared return program, both at offset 0
    /// (one trap serves both).
    Alloc(&'static str),
    /// Entry program at the cheapest correct offset (see `prologue`).
    Free(&'static str),
}

/// Allocator entry points by their unprefixed name and what handles each.
/// glibc exports these; jemalloc (`je_` or unprefixed), tcmalloc (`tc_`),
/// mimalloc (`mi_`) and custom builds (`--allocator-prefix`) export the same
/// names behind a prefix. C++ `operator new`/`delete` call these.
const ALLOCATOR_FUNCTIONS: &[(&str, Role)] = &[
    ("malloc", Role::Alloc("malloc_enter")),
    ("calloc", Role::Alloc("calloc_enter")),
    ("realloc", Role::Alloc("realloc_enter")),
    ("reallocarray", Role::Alloc("reallocarray_enter")),
    ("memalign", Role::Alloc("memalign_enter")),
    ("aligned_alloc", Role::Alloc("memalign_enter")),
    ("posix_memalign", Role::Alloc("posix_memalign_enter")),
    ("valloc", Role::Alloc("valloc_enter")),
    ("pvalloc", Role::Alloc("valloc_enter")),
    ("free", Role::Free("free_enter")),
    ("cfree", Role::Free("free_enter")),
    // jemalloc's non-standard API (Rust's jemallocator uses it).
    ("mallocx", Role::Alloc("malloc_enter")),
    ("rallocx", Role::Alloc("realloc_enter")),
    ("dallocx", Role::Free("free_enter")),
    ("sdallocx", Role::Free("free_enter")),
    // mimalloc's own names.
    ("zalloc", Role::Alloc("malloc_enter")),
];

/// CPython's object allocator (`--pymalloc`): every object, exactly. A
/// block above pymalloc's 512-byte limit is passed on to `malloc`, which
/// then runs nested and is counted once, as calloc -> malloc is; the arenas
/// pymalloc maps are made inside the probed call and not counted again.
const PYMALLOC_FUNCTIONS: &[(&str, Role)] = &[
    ("PyObject_Malloc", Role::Alloc("malloc_enter")),
    ("PyObject_Calloc", Role::Alloc("calloc_enter")),
    ("PyObject_Realloc", Role::Alloc("realloc_enter")),
    ("PyObject_Free", Role::Free("free_enter")),
];

/// Names too generic to probe without an allocator prefix.
const UNPREFIXED_SKIP: &[&str] = &["zalloc"];

/// Prefixes of known allocators; `--allocator-prefix` adds more.
pub const KNOWN_PREFIXES: &[&str] = &["", "je_", "tc_", "mi_"];

const EXIT_PROGRAM: &str = "alloc_exit";

/// Map sizes, from flags.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub max_allocs: u32,
    pub max_stacks: u32,
    pub max_unwind_rows: u32,
    pub max_processes: u32,
}

/// Where probes go.
#[derive(Clone, Debug, Default)]
pub struct ProbeOptions {
    /// Probe `free` at offset 0 (benchmarks compare it with the cheaper point).
    pub free_at_entry: bool,
    /// Extra symbol prefixes of custom allocator builds.
    pub extra_prefixes: Vec<String>,
    /// Account anonymous mmap/munmap/mremap and brk made outside the
    /// allocator.
    pub syscalls: bool,
    /// Report every OOM victim, not only traced processes.
    pub oom_any: bool,
    /// Mean bytes between sampled allocations (0: record every one).
    pub sample_bytes: u64,
    /// Also probe CPython's pymalloc entry points (`--pymalloc`).
    pub pymalloc: bool,
    /// Turn on the eBPF programs' diagnostics (aya-log).
    pub debug_bpf: bool,
    /// Record a stack for about one in this many write faults on new
    /// pages of watched processes (node mode); 0: off.
    pub fault_period: u32,
}

/// One function with probes on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedFunction {
    pub name: String,
    pub offset: u64,
}

/// What was attached in one process.
#[derive(Clone, Debug, Default)]
pub struct Attachment {
    /// Per object (path as the process sees it): the functions probed.
    pub objects: Vec<(String, Vec<AttachedFunction>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("failed to load leaktrace's eBPF programs: {0}; {1}")]
    Load(String, &'static str),
    #[error(
        "the kernel's verifier rejected {program} as too complex ({processed} instructions \
         processed on Linux {kernel}, limit 1,000,000); please report this with the output \
         of `leaktrace --version`"
    )]
    TooComplex {
        program: String,
        processed: String,
        kernel: String,
    },
    #[error(
        "the kernel's verifier rejected {program} on Linux {kernel}: {why}; please report \
         this with the output of `leaktrace --version` (LEAKTRACE_LOG=debug shows the \
         verifier's whole log)"
    )]
    Rejected {
        program: String,
        kernel: String,
        why: String,
    },
    #[error("process {pid} does not exist (or exited); check the pid with `ps -p {pid}`")]
    NoProcess { pid: u32 },
    #[error("failed to read the memory map of process {pid}: {source}; run leaktrace as root")]
    Maps {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "process {pid} ({comm}) maps no object that defines malloc/free; \
         leaktrace traces processes that allocate through libc or a known allocator"
    )]
    NoAllocator { pid: u32, comm: String },
    #[error("process {pid} cannot be traced: {reason}")]
    Unsupported { pid: u32, reason: String },
    #[error("failed to attach uprobe {function} to {object} (pid {pid}): {reason}")]
    Attach {
        pid: u32,
        function: String,
        object: String,
        reason: String,
    },
}

/// A process's memory map; a process that is gone says so.
fn process_maps(pid: u32) -> Result<Vec<procfs::MapEntry>, ProbeError> {
    procfs::read_maps(pid).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            ProbeError::NoProcess { pid }
        } else {
            ProbeError::Maps { pid, source }
        }
    })
}

/// Loaded programs and maps.
pub struct Probes {
    pub(crate) ebpf: Ebpf,
    options: ProbeOptions,
    /// Syscall events, taken out of `ebpf` so they can be drained while the
    /// other maps are read.
    pub(crate) events: Option<RingBuf<MapData>>,
    /// The recording chains' program arrays, held so the kernel keeps
    /// their entries (a program array is emptied when user space closes
    /// its last descriptor).
    _chains: Vec<ProgramArray<MapData>>,
    /// Links per traced process, detached when it exits.
    links: HashMap<u32, Vec<(&'static str, UProbeLinkId)>>,
    /// Objects already attached per process, by (device, inode).
    attached_objects: HashMap<u32, Vec<(String, u64)>>,
    /// Allocator functions per object file, by (device, inode): libc is
    /// parsed once, not once per worker.
    elf_cache: HashMap<(String, u64), Option<HashMap<String, elf::Function>>>,
    /// Runtime address ranges of the allocator functions found in each
    /// process (probed or not), for [`Self::inside_allocator`].
    allocator_ranges: HashMap<u32, Vec<(u64, u64)>>,
    /// Unwind tables loaded into `UNWIND_ROWS`, by (device, inode): where
    /// they start, how many rows, and the object's load segments.
    unwind_objects: HashMap<(String, u64), UnwindObject>,
    /// Next free row in `UNWIND_ROWS`.
    unwind_next: u32,
    unwind_capacity: u32,
    /// The executable mappings last registered per process.
    registered: HashMap<u32, Vec<(u64, u64)>>,
    /// Last value written to `UNWIND_EPOCH` (see [`Self::bump_unwind_epoch`]).
    unwind_epoch: u32,
    /// What the unwinder could not be given, for the report.
    pub unwind_notes: UnwindNotes,
    /// Whether the OOM black box is armed, or why not.
    pub oom: Result<(), String>,
    /// Byte offset of `thread.fsbase` in `task_struct` (0: unknown, no
    /// interpreter frames).
    fsbase_offset: u32,
    /// Processes where a runtime probed functions of its own.
    runtime_probed: std::collections::HashSet<u32>,
    /// While watching a process (node mode): runtimes may register their
    /// walkers but place no probe.
    walkers_only: bool,
    /// Held while the kernel keeps run-time statistics of BPF programs
    /// (node mode's CPU budget).
    _stats: Option<std::os::fd::OwnedFd>,
}

/// What leaktrace's programs have cost the traced processes so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramCost {
    /// Time inside the programs (the kernel's statistics, tail calls
    /// included in their caller's).
    pub run_time_ns: u64,
    /// Runs of uprobe programs: each is a trap, whose cost the statistics
    /// do not include.
    pub uprobe_runs: u64,
    /// Runs of tracepoint programs.
    pub tracepoint_runs: u64,
}

#[derive(Clone, Debug, Default)]
struct UnwindObject {
    rows_start: u32,
    rows_len: u32,
    segments: Vec<crate::sys::elf::Segment>,
}

/// Objects whose unwind tables could not be loaded.
#[derive(Clone, Debug, Default)]
pub struct UnwindNotes {
    /// Objects left to the frame-pointer rule because the row table was full.
    pub table_full: Vec<String>,
    /// Objects whose CFI could not be read, with the reason.
    pub unreadable: Vec<String>,
    /// Processes with more executable mappings than the unwinder keeps.
    pub too_many_mappings: Vec<u32>,
}

impl Probes {
    /// Load the programs into the kernel with the given map sizes.
    pub fn load(sizes: MapSizes, options: ProbeOptions) -> Result<Self, ProbeError> {
        // The OOM black box reads the victim's tgid from its task_struct;
        // the offset comes from the running kernel's BTF.
        let tgid_offset: u32 = std::fs::read("/sys/kernel/btf/vmlinux")
            .ok()
            .and_then(|b| crate::sys::btf::member_offset(&b, "task_struct", "tgid"))
            .unwrap_or(0);
        let oom_any: u32 = options.oom_any.into();
        // The Python walk tells the allocating thread by its fsbase.
        let fsbase_offset: u32 = std::fs::read("/sys/kernel/btf/vmlinux")
            .ok()
            .and_then(|b| {
                let thread = crate::sys::btf::member_offset(&b, "task_struct", "thread")?;
                let fsbase = crate::sys::btf::member_offset(&b, "thread_struct", "fsbase")?;
                Some(thread + fsbase)
            })
            .unwrap_or(0);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(tracer_common::globals::TASK_TGID_OFFSET, &tgid_offset, true)
            .override_global(
                tracer_common::globals::TASK_FSBASE_OFFSET,
                &fsbase_offset,
                true,
            )
            .override_global(tracer_common::globals::OOM_ANY, &oom_any, true)
            .override_global(
                tracer_common::globals::SAMPLE_BYTES,
                &options.sample_bytes,
                true,
            )
            .override_global(
                tracer_common::globals::FAULT_PERIOD,
                &options.fault_period,
                true,
            );
        loader
            .map_max_entries(maps::ALLOCS, sizes.max_allocs)
            .map_max_entries(maps::STACK_TOTALS, sizes.max_stacks)
            .map_max_entries(maps::STACKS, sizes.max_stacks)
            .map_max_entries(maps::UNWIND_ROWS, sizes.max_unwind_rows)
            .map_max_entries(maps::PROC_MAPS, sizes.max_processes)
            .map_max_entries(maps::PY_PROCS, sizes.max_processes)
            .map_max_entries(maps::LUA_PROCS, sizes.max_processes)
            .map_max_entries(maps::RUNTIMES, sizes.max_processes)
            .map_max_entries(maps::GO_BUCKETS, sizes.max_stacks);
        // aya-log's level: 0 turns every log statement off, and as a
        // constant the verifier removes them from the programs.
        let log_level: u8 = if options.debug_bpf { AYA_LOG_DEBUG } else { 0 };
        loader.override_global("AYA_LOG_LEVEL", &log_level, false);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::Load(format!("{e:#}"), load_hint(&e)))?;
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        for name in names {
            let prog = ebpf
                .program_mut(&name)
                .ok_or_else(|| ProbeError::Load(format!("program {name} vanished"), ""))?;
            let res = match prog {
                Program::UProbe(p) => p.load(),
                Program::RawTracePoint(p) => p.load(),
                _ => continue,
            };
            res.map_err(|e| rejected(&name, &e))?;
        }
        let chains = vec![
            fill_chain(
                &mut ebpf,
                maps::CHAIN_ALLOC,
                &tracer_common::chain::ALLOC_PROGRAMS,
            )?,
            fill_chain(
                &mut ebpf,
                maps::CHAIN_SYSCALL,
                &tracer_common::chain::SYSCALL_PROGRAMS,
            )?,
        ];
        let events = match ebpf.take_map(maps::EVENTS) {
            Some(m) => Some(
                RingBuf::try_from(m)
                    .map_err(|e| ProbeError::Load(format!("ring buffer: {e}"), ""))?,
            ),
            None => None,
        };
        let oom = if tgid_offset == 0 {
            Err("the kernel's BTF does not describe \
                 task_struct.tgid"
                .to_string())
        } else {
            attach_raw_tp(&mut ebpf, "oom_mark_victim", "mark_victim")
        };
        if options.syscalls {
            let (prog, tp) = ("sys_exit", "sys_exit");
            let p: &mut RawTracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| ProbeError::Load(format!("program {prog} missing"), ""))?
                .try_into()
                .map_err(|e: ProgramError| ProbeError::Load(format!("{prog}: {e}"), ""))?;
            p.attach(tp).map_err(|e| {
                ProbeError::Load(
                    format!("failed to attach raw tracepoint {tp}: {}", error_chain(&e)),
                    load_hint(&e),
                )
            })?;
        }
        if options.fault_period > 0 {
            attach_raw_tp(&mut ebpf, "page_fault", "page_fault_user").map_err(|why| {
                ProbeError::Load(
                    why,
                    "node mode needs the x86 exceptions:page_fault_user tracepoint",
                )
            })?;
        }
        // Run-time statistics cost two clock reads per program run; node
        // mode needs them to hold its CPU budget (Linux 5.8+).
        let stats = if options.fault_period > 0 {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    log::warn!("BPF run-time statistics unavailable ({e}); the CPU budget counts leaktrace's own CPU only");
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            ebpf,
            options,
            events,
            _chains: chains,
            links: HashMap::new(),
            attached_objects: HashMap::new(),
            elf_cache: HashMap::new(),
            allocator_ranges: HashMap::new(),
            unwind_objects: HashMap::new(),
            unwind_next: 0,
            unwind_capacity: sizes.max_unwind_rows,
            registered: HashMap::new(),
            unwind_epoch: 0,
            unwind_notes: UnwindNotes::default(),
            oom,
            fsbase_offset,
            runtime_probed: Default::default(),
            walkers_only: false,
            _stats: stats,
        })
    }

    /// Attach allocator probes to every object in `pid` that defines them
    /// and is not probed in it yet (call again after dlopen or exec), let
    /// each runtime attach what it needs, and mark the process as traced
    /// for the syscall programs.
    pub fn attach_process(
        &mut self,
        pid: u32,
        runtimes: &mut Runtimes,
    ) -> Result<Attachment, ProbeError> {
        let nz = NonZeroU32::new(pid).ok_or(ProbeError::NoProcess { pid })?;
        let maps = process_maps(pid)?;
        // The unwinder first: a probe fires as soon as it is attached, and
        // a stack recorded before the process's unwind tables are in falls
        // back to frame pointers (a worker forked mid-load had its first
        // allocations in a row of their own).
        let fresh = !self.registered.contains_key(&pid);
        self.register_unwind(pid, &maps);
        let res = self.attach_mapped(nz, &maps, runtimes);
        if res.is_err() && fresh {
            self.unregister_unwind(pid);
        }
        res
    }

    /// [`Self::attach_process`] once the unwinder has the process.
    fn attach_mapped(
        &mut self,
        nz: NonZeroU32,
        maps: &[procfs::MapEntry],
        runtimes: &mut Runtimes,
    ) -> Result<Attachment, ProbeError> {
        let pid = nz.get();
        let wanted = self.wanted_names();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let mut attachment = Attachment::default();
        let mut seen: Vec<(String, u64)> = Vec::new();
        for entry in maps.iter().filter(|m| m.executable) {
            let Some(path) = entry.path.clone() else {
                continue;
            };
            let key = (entry.dev.clone(), entry.inode);
            if seen.contains(&key)
                || self
                    .attached_objects
                    .get(&pid)
                    .is_some_and(|v| v.contains(&key))
            {
                continue;
            }
            seen.push(key.clone());
            let Some(open_path) = entry.open_path(pid) else {
                continue;
            };
            let functions = self
                .elf_cache
                .entry(key.clone())
                .or_insert_with(|| elf::find_functions(&open_path, &wanted).ok())
                .clone();
            let Some(functions) = functions else { continue };
            if functions.is_empty() {
                continue;
            }
            let ranges = self.allocator_ranges.entry(pid).or_default();
            for f in functions.values() {
                let holder = maps.iter().find(|m| {
                    m.dev == entry.dev
                        && m.inode == entry.inode
                        && f.file_offset >= m.offset
                        && f.file_offset - m.offset < m.end - m.start
                });
                if let Some(m) = holder {
                    let start = m.start + (f.file_offset - m.offset);
                    ranges.push((start, start + f.size.max(1)));
                }
            }
            let attached = self.attach_object(nz, &path, &open_path, &functions)?;
            self.attached_objects.entry(pid).or_default().push(key);
            if !attached.is_empty() {
                attachment.objects.push((path, attached));
            }
        }
        let found = runtimes
            .attach(nz, maps, self)
            .map_err(|f: AttachFailure| ProbeError::Attach {
                pid,
                function: f.function,
                object: f.object,
                reason: f.reason,
            })?;
        if !found.objects.is_empty() {
            self.runtime_probed.insert(pid);
        }
        for (object, probed) in found.objects {
            attachment.objects.push((
                object,
                probed
                    .into_iter()
                    .map(|p| AttachedFunction {
                        name: p.function,
                        offset: p.offset,
                    })
                    .collect(),
            ));
        }
        let already = self.runtime_probed.contains(&pid)
            || self
                .attached_objects
                .get(&pid)
                .is_some_and(|v| !v.is_empty());
        if attachment.objects.is_empty() && !already {
            if let Some(reason) = found.refusal {
                return Err(ProbeError::Unsupported { pid, reason });
            }
            return Err(ProbeError::NoAllocator {
                pid,
                comm: procfs::comm(pid).unwrap_or_else(|| "?".into()),
            });
        }
        self.set_target(pid, true);
        Ok(attachment)
    }

    /// What the programs cost so far (zero without run-time statistics).
    pub fn cost(&self) -> ProgramCost {
        let mut c = ProgramCost::default();
        for (_, prog) in self.ebpf.programs() {
            let Ok(info) = prog.info() else { continue };
            c.run_time_ns += info.run_time().as_nanos() as u64;
            match prog {
                Program::UProbe(_) => c.uprobe_runs += info.run_count(),
                _ => c.tracepoint_runs += info.run_count(),
            }
        }
        c
    }

    /// Watch a process without probing it (node mode): its memory
    /// syscalls and sampled page faults are recorded with stacks, which
    /// the unwinder and the runtimes' walkers can read (`runtimes` may
    /// register walkers; `probes_allowed` false forbids any probe, so a
    /// runtime that needs one adds nothing).
    pub fn watch_process(&mut self, pid: u32, runtimes: &mut Runtimes) -> Result<(), ProbeError> {
        let nz = NonZeroU32::new(pid).ok_or(ProbeError::NoProcess { pid })?;
        let maps = process_maps(pid)?;
        self.walkers_only = true;
        let res = runtimes.attach(nz, &maps, self);
        self.walkers_only = false;
        if let Err(f) = res {
            log::debug!("pid {pid}: {} not watched: {}", f.function, f.reason);
        }
        self.set_target(pid, true);
        self.register_unwind(pid, &maps);
        Ok(())
    }

    /// Detach from a process (it exited, or exec'd into a new image) and
    /// forget what the syscall filter knew of it.
    /// Whether a stack (return addresses, innermost first) passes through
    /// an allocator function of process `pid`: a syscall made there is the
    /// allocator's own (glibc's `free` creates a thread's arena with a
    /// 64 MiB mmap), already counted as the blocks it serves. The kernel
    /// tells calls inside malloc & co. by their pending record, but `free`
    /// is probed at entry only.
    pub fn inside_allocator(&self, pid: u32, ips: &[u64]) -> bool {
        let Some(ranges) = self.allocator_ranges.get(&pid) else {
            return false;
        };
        ips.iter()
            .any(|&ip| ranges.iter().any(|&(start, end)| ip > start && ip <= end))
    }

    pub fn detach_process(&mut self, pid: u32, runtimes: &mut Runtimes) {
        runtimes.detach(pid, self);
        // Closing a uprobe link takes ~0.1 s on this kernel: let threads
        // do it, so the event loop keeps following forks meanwhile.
        let mut owned = Vec::new();
        for (prog, link) in self.links.remove(&pid).unwrap_or_default() {
            if let Some(Program::UProbe(p)) = self.ebpf.program_mut(prog) {
                if let Ok(l) = p.take_link(link) {
                    owned.push(l);
                }
            }
        }
        // All at once: one after another, a process with a dozen links kept
        // trapping for a second or more after it was let go (a drill-down
        // that ended at its CPU budget went on costing).
        for link in owned {
            std::thread::spawn(move || drop(link));
        }
        self.attached_objects.remove(&pid);
        self.runtime_probed.remove(&pid);
        self.allocator_ranges.remove(&pid);
        self.set_target(pid, false);
        self.unregister_unwind(pid);
    }

    /// Undo [`Self::register_unwind`] and the runtime routing of `pid`.
    fn unregister_unwind(&mut self, pid: u32) {
        self.registered.remove(&pid);
        if let Some(Ok(mut rt)) = self
            .ebpf
            .map_mut(maps::RUNTIMES)
            .map(BpfHashMap::<&mut MapData, u32, u32>::try_from)
        {
            let _ = rt.remove(&pid);
        }
        if let Some(map) = self.ebpf.map_mut(maps::PROC_MAPS) {
            if let Ok(mut pm) = BpfHashMap::<&mut MapData, u32, ProcMaps>::try_from(map) {
                let _ = pm.remove(&pid);
            }
        }
        self.bump_unwind_epoch();
    }

    fn set_target(&mut self, pid: u32, on: bool) {
        let Some(map) = self.ebpf.map_mut(maps::TARGETS) else {
            return;
        };
        let Ok(mut targets) = BpfHashMap::<&mut MapData, u32, u32>::try_from(map) else {
            return;
        };
        let _ = if on {
            targets.insert(pid, 1, 0)
        } else {
            targets.remove(&pid)
        };
    }
}
