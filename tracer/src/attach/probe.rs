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
    attach::prologue, runtime::go, runtime::python, sys::elf, sys::procfs,
    unwind::table as unwind_table,
};

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
    /// Write this into `runtime.MemProfileRate` of Go processes whose
    /// runtime samples nothing (`--go-enable-profiling`).
    pub go_enable_profiling: Option<u64>,
    /// Also probe CPython's pymalloc entry points (`--pymalloc`).
    pub pymalloc: bool,
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
    /// What each object says about a CPython in it, by (device, inode).
    python_objects: HashMap<(String, u64), Option<python::PyObjectInfo>>,
    /// The CPython found per process.
    python: HashMap<u32, python::PyTarget>,
    /// Why Python frames are not shown, per process, for the report.
    pub python_notes: Vec<String>,
    /// Byte offset of `thread.fsbase` in `task_struct` (0: unknown, no
    /// Python frames).
    fsbase_offset: u32,
    /// What each executable says about a Go runtime in it, by (device, inode).
    go_objects: HashMap<(String, u64), Option<go::GoObjectInfo>>,
    /// The Go runtime traced per process.
    go: HashMap<u32, go::GoTarget>,
    /// Why a Go heap is not shown, for the report.
    pub go_notes: Vec<String>,
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
            );
        loader
            .map_max_entries(maps::ALLOCS, sizes.max_allocs)
            .map_max_entries(maps::STACK_TOTALS, sizes.max_stacks)
            .map_max_entries(maps::STACKS, sizes.max_stacks)
            .map_max_entries(maps::UNWIND_ROWS, sizes.max_unwind_rows)
            .map_max_entries(maps::PROC_MAPS, sizes.max_processes)
            .map_max_entries(maps::PY_PROCS, sizes.max_processes)
            .map_max_entries(maps::RUNTIMES, sizes.max_processes)
            .map_max_entries(maps::GO_BUCKETS, sizes.max_stacks);
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
            python_objects: HashMap::new(),
            python: HashMap::new(),
            python_notes: Vec::new(),
            fsbase_offset,
            go_objects: HashMap::new(),
            go: HashMap::new(),
            go_notes: Vec::new(),
        })
    }

    /// Attach allocator probes to every object in `pid` that defines them
    /// and is not probed in it yet (call again after dlopen or exec), and
    /// mark the process as traced for the syscall programs.
    pub fn attach_process(&mut self, pid: u32) -> Result<Attachment, ProbeError> {
        let nz = NonZeroU32::new(pid).ok_or(ProbeError::NoProcess { pid })?;
        let maps = procfs::read_maps(pid).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ProbeError::NoProcess { pid }
            } else {
                ProbeError::Maps { pid, source }
            }
        })?;
        let wanted = self.wanted_names();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let mut attachment = Attachment::default();
        let mut seen: Vec<(String, u64)> = Vec::new();
        let mut go_refusal = None;
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
            let go_info = self
                .go_objects
                .entry(key.clone())
                .or_insert_with(|| go::inspect_object(&open_path))
                .clone();
            if let Some(info) = go_info {
                match self.attach_go(nz, entry, &path, &open_path, &info)? {
                    Ok(attached) => attachment.objects.push((path.clone(), attached)),
                    Err(why) => {
                        log::warn!("{why}");
                        self.go_notes.push(format!("process {pid}: {why}"));
                        go_refusal = Some(why);
                    }
                }
                self.attached_objects
                    .entry(pid)
                    .or_default()
                    .push(key.clone());
            }
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
        let already = self
            .attached_objects
            .get(&pid)
            .is_some_and(|v| !v.is_empty());
        if attachment.objects.is_empty() && !already {
            if let Some(reason) = go_refusal {
                return Err(ProbeError::Unsupported { pid, reason });
            }
            return Err(ProbeError::NoAllocator {
                pid,
                comm: procfs::comm(pid).unwrap_or_else(|| "?".into()),
            });
        }
        self.set_target(pid, true);
        self.register_unwind(pid, &maps);
        self.register_python(pid, &maps);
        Ok(attachment)
    }

    /// The Go runtimes traced, per process.
    pub fn go_targets(&self) -> impl Iterator<Item = (u32, &go::GoTarget)> {
        self.go.iter().map(|(p, t)| (*p, t))
    }

    /// Entry probes on the Go runtime's profiling hooks in a Go executable,
    /// or why not (`Ok(Err(reason))`): the version's registers are
    /// unknown, the binary is stripped, the functions are missing.
    fn attach_go(
        &mut self,
        pid: NonZeroU32,
        m: &procfs::MapEntry,
        path: &str,
        open_path: &Path,
        info: &go::GoObjectInfo,
    ) -> Result<Result<Vec<AttachedFunction>, String>, ProbeError> {
        if let Some(why) = info.refusal(path) {
            return Ok(Err(why));
        }
        let Some(mut target) = go::GoTarget::new(m, info) else {
            return Ok(Err(format!(
                "{path} ({}): its mapping at {:#x} matches no load segment",
                info.version, m.start
            )));
        };
        let mut done = Vec::new();
        for (function, program, offset) in [
            (
                "runtime.setprofilebucket",
                "go_setprofilebucket",
                info.setprofilebucket,
            ),
            ("runtime.mProf_Free", "go_mprof_free", info.mprof_free),
        ] {
            let Some(offset) = offset else { continue };
            // Past the stack check, at the emulated `PUSHQ BP` (Go 1.21+):
            // no single-step per sampled object.
            let skip = go_code(open_path, offset)
                .map_or(0, |code| crate::attach::prologue::go_probe_offset(&code));
            self.attach_one(program, offset + skip, open_path, pid)
                .map_err(|e| ProbeError::Attach {
                    pid: pid.get(),
                    function: function.to_string(),
                    object: path.to_string(),
                    reason: attach_reason(&e),
                })?;
            done.push(AttachedFunction {
                name: function.to_string(),
                offset: skip,
            });
        }
        let pid = pid.get();
        match target.rate(pid) {
            Ok(0) => {
                if let Some(rate) = self.options.go_enable_profiling {
                    match target.set_rate(pid, rate) {
                        Ok(()) => eprintln!(
                            "leaktrace: wrote runtime.MemProfileRate = {rate} into process {pid} \
                             ({path}, {}): this changes the target; its Go runtime samples heap \
                             allocations from now on",
                            target.version
                        ),
                        Err(e) => self.go_notes.push(format!(
                            "process {pid}: failed to write runtime.MemProfileRate through \
                             /proc/{pid}/mem: {e}"
                        )),
                    }
                }
            }
            Ok(rate) => log::debug!("pid {pid}: {} MemProfileRate {rate}", target.version),
            Err(e) => log::warn!("pid {pid}: runtime.MemProfileRate unreadable: {e}"),
        }
        // Right after the probes are in: what was allocated before, and
        // the runtime's figures to compare later ones with.
        target.walk(pid);
        target.at_attach = (
            std::time::Instant::now(),
            crate::runtime::go::stats::read(pid, &target.stats),
        );
        match &target.baseline_error {
            None => log::debug!(
                "pid {pid}: {} Go profile buckets live at attach",
                target.baseline.len()
            ),
            Some(why) => self.go_notes.push(format!(
                "process {pid}: Go objects allocated before leaktrace attached are not shown \
                 (the runtime's profile buckets could not be walked: {why})"
            )),
        }
        self.go.insert(pid, target);
        Ok(Ok(done))
    }

    /// The CPython running in a process, if any was found.
    pub fn python_target(&self, pid: u32) -> Option<&python::PyTarget> {
        self.python.get(&pid)
    }

    /// Find a CPython in the process; give the kernel walk its layout, or
    /// note why its Python frames cannot be shown.
    fn register_python(&mut self, pid: u32, maps: &[procfs::MapEntry]) {
        if self.python.contains_key(&pid) {
            return;
        }
        let cache = &mut self.python_objects;
        let found = python::detect(
            maps,
            |m| {
                cache
                    .entry((m.dev.clone(), m.inode))
                    .or_insert_with(|| {
                        let open = m.open_path(pid)?;
                        python::inspect_object(&open, m.path.as_deref().unwrap_or_default())
                    })
                    .clone()
            },
            |object| python::version_from_memory(pid, maps, object),
        );
        let Some(target) = found else { return };
        log::debug!(
            "pid {pid}: Python {} in {}, _PyRuntime at {:#x}",
            target.version_string(),
            target.object,
            target.runtime_addr
        );
        if let Some(note) = target.missing_layout_note(pid) {
            self.python_notes.push(note);
        } else if self.fsbase_offset == 0 {
            self.python_notes.push(format!(
                "process {pid} runs Python {}, but the kernel's BTF does not describe \
                 task_struct.thread.fsbase: its stacks show native frames only",
                target.version_string()
            ));
        } else if let Some(entry) = target.kernel_entry() {
            let mut registered = false;
            if let Some(map) = self.ebpf.map_mut(maps::PY_PROCS) {
                if let Ok(mut pp) = BpfHashMap::<&mut MapData, u32, PyProc>::try_from(map) {
                    let res = pp.insert(pid, entry, 0);
                    registered = res.is_ok();
                    if let Err(e) = res {
                        self.python_notes.push(format!(
                            "process {pid} runs Python {}, but it could not be registered \
                             for Python frames: {e}",
                            target.version_string()
                        ));
                    }
                }
            }
            // The native walk hands this process to the Python walker.
            if registered {
                self.register_runtime(pid, tracer_common::runtime::PYTHON);
            }
        }
        self.python.insert(pid, target);
    }

    /// Tell the kernel that `pid`'s stacks continue in `runtime`'s walker
    /// (`tracer_common::runtime`), and that some process now has one.
    fn register_runtime(&mut self, pid: u32, runtime: u32) {
        if let Some(Ok(mut rt)) = self
            .ebpf
            .map_mut(maps::RUNTIMES)
            .map(BpfHashMap::<&mut MapData, u32, u32>::try_from)
        {
            let _ = rt.insert(pid, runtime, 0);
        }
        if let Some(Ok(mut any)) = self
            .ebpf
            .map_mut(maps::RUNTIME_ANY)
            .map(Array::<&mut MapData, u32>::try_from)
        {
            let _ = any.set(0, 1, 0);
        }
    }

    /// Give the unwinder this process's executable mappings, loading each
    /// new object's unwind table once.
    fn register_unwind(&mut self, pid: u32, maps: &[procfs::MapEntry]) {
        let exec: Vec<&procfs::MapEntry> = maps
            .iter()
            .filter(|m| m.executable && m.path.is_some())
            .collect();
        let signature: Vec<(u64, u64)> = exec.iter().map(|m| (m.start, m.end)).collect();
        if self.registered.get(&pid) == Some(&signature) {
            return;
        }
        let mut entries: Vec<ExecMap> = Vec::with_capacity(exec.len());
        for m in &exec {
            let key = (m.dev.clone(), m.inode);
            if !self.unwind_objects.contains_key(&key) {
                let obj = self.load_unwind_object(pid, m);
                self.unwind_objects.insert(key.clone(), obj);
            }
            let Some(obj) = self.unwind_objects.get(&key) else {
                continue;
            };
            // A file page can belong to two segments (the end of the
            // read-only one and the start of the text): an executable
            // mapping is the text's.
            let text: Vec<crate::sys::elf::Segment> = obj
                .segments
                .iter()
                .filter(|s| s.executable)
                .copied()
                .collect();
            let Some(vaddr) = crate::sys::elf::vaddr_of_file_offset(&text, m.offset)
                .or_else(|| crate::sys::elf::vaddr_of_file_offset(&obj.segments, m.offset))
            else {
                continue;
            };
            entries.push(ExecMap {
                start: m.start,
                end: m.end,
                bias: m.start.wrapping_sub(vaddr),
                rows_start: obj.rows_start,
                rows_len: obj.rows_len,
            });
        }
        entries.sort_by_key(|e| e.start);
        if entries.len() > MAX_PROC_MAPS {
            self.unwind_notes.too_many_mappings.push(pid);
            entries.truncate(MAX_PROC_MAPS);
        }
        let mut value = ProcMaps {
            len: entries.len() as u32,
            _pad: 0,
            maps: [ExecMap::default(); MAX_PROC_MAPS],
        };
        value.maps[..entries.len()].copy_from_slice(&entries);
        if let Some(map) = self.ebpf.map_mut(maps::PROC_MAPS) {
            if let Ok(mut pm) = BpfHashMap::<&mut MapData, u32, ProcMaps>::try_from(map) {
                if let Err(e) = pm.insert(pid, value, 0) {
                    log::warn!("failed to register the mappings of process {pid}: {e}");
                }
            }
        }
        self.bump_unwind_epoch();
        self.registered.insert(pid, signature);
    }

    fn load_unwind_object(&mut self, pid: u32, m: &procfs::MapEntry) -> UnwindObject {
        let path = m.path.clone().unwrap_or_default();
        let Some(open) = m.open_path(pid) else {
            return UnwindObject::default();
        };
        let segments = match crate::sys::elf::load_segments(&open) {
            Ok(s) => s,
            Err(e) => {
                self.unwind_notes.unreadable.push(format!("{path}: {e}"));
                return UnwindObject::default();
            }
        };
        let table = match unwind_table::build(&open) {
            Ok(t) => t,
            Err(e) => {
                self.unwind_notes.unreadable.push(format!("{path}: {e}"));
                return UnwindObject {
                    segments,
                    ..Default::default()
                };
            }
        };
        let len = table.rows.len() as u32;
        if len == 0 {
            return UnwindObject {
                segments,
                ..Default::default()
            };
        }
        if self.unwind_next.saturating_add(len) > self.unwind_capacity {
            self.unwind_notes.table_full.push(path);
            return UnwindObject {
                segments,
                ..Default::default()
            };
        }
        let start = self.unwind_next;
        let Some(map) = self.ebpf.map_mut(maps::UNWIND_ROWS) else {
            return UnwindObject::default();
        };
        let Ok(mut rows) = Array::<&mut MapData, UnwindRow>::try_from(map) else {
            return UnwindObject::default();
        };
        for (i, row) in table.rows.iter().enumerate() {
            if rows.set(start + i as u32, *row, 0).is_err() {
                self.unwind_notes.table_full.push(path);
                return UnwindObject {
                    segments,
                    ..Default::default()
                };
            }
        }
        self.unwind_next += len;
        log::debug!("unwind table for {path}: {len} rows at {start}");
        UnwindObject {
            rows_start: start,
            rows_len: len,
            segments,
        }
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

    pub fn detach_process(&mut self, pid: u32) {
        // Closing a uprobe link takes ~0.1 s on this kernel: let a thread
        // do it, so the event loop keeps following forks meanwhile.
        let mut owned = Vec::new();
        for (prog, link) in self.links.remove(&pid).unwrap_or_default() {
            if let Some(Program::UProbe(p)) = self.ebpf.program_mut(prog) {
                if let Ok(l) = p.take_link(link) {
                    owned.push(l);
                }
            }
        }
        if !owned.is_empty() {
            std::thread::spawn(move || drop(owned));
        }
        self.attached_objects.remove(&pid);
        self.allocator_ranges.remove(&pid);
        self.registered.remove(&pid);
        self.go.remove(&pid);
        self.set_target(pid, false);
        if self.python.remove(&pid).is_some() {
            if let Some(map) = self.ebpf.map_mut(maps::PY_PROCS) {
                if let Ok(mut pp) = BpfHashMap::<&mut MapData, u32, PyProc>::try_from(map) {
                    let _ = pp.remove(&pid);
                }
            }
        }
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

    /// `PROC_MAPS` changed: the kernel's per-CPU cache of unwind rules
    /// (keyed by process and pc) is stale. Called after the change, so a
    /// walk that read the old mappings cached them under the old epoch.
    fn bump_unwind_epoch(&mut self) {
        // Never 0: the kernel treats epoch 0 as "do not cache".
        self.unwind_epoch = self.unwind_epoch.wrapping_add(1).max(1);
        let epoch = self.unwind_epoch;
        if let Some(map) = self.ebpf.map_mut(maps::UNWIND_EPOCH) {
            if let Ok(mut a) = Array::<&mut MapData, u32>::try_from(map) {
                if let Err(e) = a.set(0, epoch, 0) {
                    log::warn!("failed to update the unwinder's epoch: {e}");
                }
            }
        }
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

    /// Every symbol name probed: each function under each prefix.
    fn wanted_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for prefix in KNOWN_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(self.options.extra_prefixes.iter().cloned())
        {
            for (f, _) in ALLOCATOR_FUNCTIONS {
                if prefix.is_empty() && UNPREFIXED_SKIP.contains(f) {
                    continue;
                }
                names.push(format!("{prefix}{f}"));
            }
        }
        if self.options.pymalloc {
            names.extend(PYMALLOC_FUNCTIONS.iter().map(|(n, _)| n.to_string()));
        }
        names
    }

    fn attach_object(
        &mut self,
        pid: NonZeroU32,
        path: &str,
        open_path: &Path,
        functions: &HashMap<String, elf::Function>,
    ) -> Result<Vec<AttachedFunction>, ProbeError> {
        let mut done: Vec<AttachedFunction> = Vec::new();
        let mut offsets_done: Vec<u64> = Vec::new();
        let prefixes: Vec<String> = KNOWN_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(self.options.extra_prefixes.iter().cloned())
            .collect();
        let mut candidates: Vec<(String, Role)> = prefixes
            .iter()
            .flat_map(|prefix| {
                ALLOCATOR_FUNCTIONS
                    .iter()
                    .map(move |(base, role)| (format!("{prefix}{base}"), *role))
            })
            .collect();
        if self.options.pymalloc {
            candidates.extend(PYMALLOC_FUNCTIONS.iter().map(|(n, r)| (n.to_string(), *r)));
        }
        for (name, role) in candidates {
            let Some(func) = functions.get(&name) else {
                continue;
            };
            // Aliases (memalign = aligned_alloc in glibc, malloc =
            // je_malloc in some builds) are probed once.
            if offsets_done.contains(&func.file_offset) {
                continue;
            }
            offsets_done.push(func.file_offset);
            let err = |e: ProgramError| ProbeError::Attach {
                pid: pid.get(),
                function: name.clone(),
                object: path.to_string(),
                reason: attach_reason(&e),
            };
            let offset = match role {
                Role::Alloc(entry) => {
                    // Entry and return probe share one trap; the
                    // return probe needs [%rsp] to still be the return
                    // address, which alloc_probe_offset guarantees.
                    let off = if self.options.free_at_entry {
                        0
                    } else {
                        prologue::alloc_probe_offset(&func.code)
                    };
                    self.attach_one(entry, func.file_offset + off, open_path, pid)
                        .map_err(err)?;
                    self.attach_one(EXIT_PROGRAM, func.file_offset + off, open_path, pid)
                        .map_err(err)?;
                    off
                }
                Role::Free(entry) => {
                    let off = if self.options.free_at_entry {
                        0
                    } else {
                        prologue::free_probe_offset(&func.code)
                    };
                    self.attach_one(entry, func.file_offset + off, open_path, pid)
                        .map_err(err)?;
                    off
                }
            };
            done.push(AttachedFunction { name, offset });
        }
        Ok(done)
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        file_offset: u64,
        target: &Path,
        pid: NonZeroU32,
    ) -> Result<(), ProgramError> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        let link = prog.attach(
            UProbeAttachLocation::AbsoluteOffset(file_offset),
            PathBuf::from(target),
            UProbeScope::OneProcess(pid),
        )?;
        self.links
            .entry(pid.get())
            .or_default()
            .push((program, link));
        Ok(())
    }
}

/// The first 16 bytes of the function at file offset `offset` of `path`.
fn go_code(path: &Path, offset: u64) -> Option<[u8; 16]> {
    use std::os::unix::fs::FileExt as _;
    let mut code = [0u8; 16];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut code, offset)
        .ok()?;
    Some(code)
}

fn attach_raw_tp(ebpf: &mut Ebpf, prog: &str, tp: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing"))?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    p.attach(tp)
        .map(|_| ())
        .map_err(|e| format!("failed to attach raw tracepoint {tp}: {}", error_chain(&e)))
}

impl Probes {
    /// A second descriptor of the event ring buffer, to wait on.
    pub fn events_fd(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        self.events.as_ref()?.as_fd().try_clone_to_owned().ok()
    }
}

/// Why the kernel refused program `name`, in words a user can act on.
fn rejected(name: &str, e: &ProgramError) -> ProbeError {
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

/// Put each stage of a recording chain in its program array.
fn fill_chain(
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

/// The first `io::Error` in an error's source chain.
fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

fn load_hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
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
fn attach_reason(e: &ProgramError) -> String {
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
