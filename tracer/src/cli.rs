//! Command-line flags, parsed by clap into [`Args`], then validated into a
//! [`Config`] the daemon runs from.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;

use crate::report::{Format, SortBy};

/// Where the final report goes, in which format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub path: PathBuf,
    pub format: Format,
}

/// Find the call stacks that hold growing memory in live processes.
///
/// Attaches eBPF uprobes to the allocator of each target (no restart, no
/// LD_PRELOAD), pairs allocations with frees per stack in the kernel, and
/// reports the stacks whose outstanding bytes grow. Without a target it
/// runs a built-in demo. Exit codes: 0 done, 2 error.
#[derive(Debug, Parser)]
#[command(
    name = "leaktrace",
    about,
    long_about,
    disable_version_flag = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print the version, the commit and toolchain that built leaktrace,
    /// and the kernel features it finds.
    #[arg(short = 'V', long)]
    pub version: bool,
    /// Process to trace (repeatable), with every descendant it has now
    /// (the workers of an nginx, uwsgi, gunicorn or php-fpm master) and
    /// every child forked later.
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace only the processes named by --pid, --comm and --cgroup: not
    /// the descendants a --pid has at start, nor any child forked later
    /// (a child is still traced if it matches --comm or --cgroup itself).
    #[arg(long)]
    pub no_children: bool,
    /// Trace every process with this name, now and later (repeatable).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,
    /// Trace every process in this cgroup (a container, a pod), now and
    /// later: `/sys/fs/cgroup/memory/app` or `/app` (repeatable).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,
    /// Also probe allocator functions with this symbol prefix, for custom
    /// builds (`je_`, `tc_` and `mi_` are always probed) (repeatable).
    #[arg(long = "allocator-prefix", value_name = "PREFIX")]
    pub allocator_prefixes: Vec<String>,
    /// Count only allocations older than this many seconds (hides
    /// short-lived memory; reads every live allocation at each sample).
    #[arg(long, value_name = "SECS")]
    pub min_age: Option<f64>,
    /// Do not account anonymous mmap/munmap/mremap and brk made outside
    /// the allocator (saves a tracepoint hit on every syscall).
    #[arg(long)]
    pub no_syscalls: bool,
    /// Seconds between periodic reports (0: only the final report)
    /// [default: 10; 2 in the demo].
    #[arg(short = 'i', long, value_name = "SECS")]
    pub interval: Option<f64>,
    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or all
    /// targets exit).
    #[arg(short = 'd', long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Stacks to show in each report.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Format of the final report on stdout, or in a single `-o FILE`
    /// whose name does not say.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the final report to FILE instead of stdout (repeatable; the
    /// format follows the name: .json .txt .folded .growth.folded .svg
    /// .growth.svg .pb.gz). A directory (existing, or ending in `/`) gets
    /// every format.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Vec<PathBuf>,
    /// Order stacks by growth rate or by outstanding bytes.
    #[arg(long, value_enum, default_value_t = SortBy::Growth)]
    pub sort: SortBy,
    /// Seconds between readings of the kernel ledger (the growth series).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub sample_every: f64,
    /// Most live allocations tracked at once (kernel map size).
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    pub max_allocs: u32,
    /// Most distinct stacks tracked (kernel map size).
    #[arg(long, value_name = "N", default_value_t = 1 << 16)]
    pub max_stacks: u32,
    /// Sample allocations by bytes (a sample point every N bytes on
    /// average, as tcmalloc, jemalloc and Go do) instead of recording every
    /// one: stacks are walked only for sampled allocations and reported
    /// bytes are unbiased estimates. 524288 suits always-on use.
    #[arg(long, value_name = "N")]
    pub sample_bytes: Option<u64>,
    /// Go programs that never import runtime/pprof sample no heap
    /// allocations (runtime.MemProfileRate = 0). Write RATE (mean bytes
    /// between samples; Go's default is 524288) into the running
    /// program's runtime.MemProfileRate so its Go heap can be traced. This
    /// changes the target; only allocations made afterwards are seen.
    #[arg(long, value_name = "RATE")]
    pub go_enable_profiling: Option<u64>,
    /// Count CPython objects exactly, at pymalloc's own entry points
    /// (PyObject_Malloc/Calloc/Realloc/Free), instead of attributing the
    /// arenas pymalloc maps. Costs a probe trap per object; distro builds
    /// with LTO inline pymalloc's fast path into the interpreter, so only
    /// calls through the exported functions are seen there.
    #[arg(long)]
    pub pymalloc: bool,
    /// Log the eBPF programs' own diagnostics (a recording chain cut short,
    /// a job slot taken by another task) through leaktrace's log (set
    /// LEAKTRACE_LOG=warn or lower to see them). Off, they cost nothing:
    /// the kernel's verifier removes them.
    #[arg(long)]
    pub debug_bpf: bool,
    /// Where OOM reports go when the OOM killer picks a traced process.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub oom_dir: PathBuf,
    /// Write an OOM report for any process the OOM killer picks, traced or
    /// not.
    #[arg(long)]
    pub oom_any: bool,
    /// Most unwind-table rows kept in the kernel (12 bytes each; libc needs
    /// ~28,000, python3.11 ~65,000).
    #[arg(long, value_name = "N", default_value_t = 1 << 21)]
    pub max_unwind_rows: u32,
    /// Run the built-in demo (also what happens with no --pid).
    #[arg(long)]
    pub demo: bool,
    /// Benchmarking only: probe `free` at its first instruction instead of
    /// the cheaper point the prologue decoder picks.
    #[arg(long, hide = true)]
    pub free_probe_at_entry: bool,
    /// Internal: be the demo's leaking program.
    #[arg(long, hide = true)]
    pub demo_target: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Watch every process on the machine (or those of --comm/--cgroup)
    /// at near-zero cost and say which ones grow and which code makes them
    /// grow; runs until stopped. See docs/node.md.
    Node(NodeArgs),
}

/// `leaktrace node`: always-on node mode.
///
/// Tier 0: every process's and cgroup's memory over time (procfs,
/// cgroupfs). Tier 1: sampled write faults on new pages and anonymous
/// mmap/brk, each with a user stack, for every watched process (no
/// probes). Tier 2: a process that keeps growing gets sampled allocator
/// probes for a bounded window, within a CPU budget.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Watch only processes with this name (repeatable).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,
    /// Watch only processes in this cgroup (repeatable).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,
    /// Stop after this many seconds and write the report (default: run
    /// until SIGTERM or Ctrl-C).
    #[arg(short = 'd', long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Seconds between reports: files in --out, and text on stdout when
    /// nothing else is asked (0: only the final report).
    #[arg(short = 'i', long, value_name = "SECS", default_value_t = 60.0)]
    pub interval: f64,
    /// Stacks in each report.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 20)]
    pub top: usize,
    /// Format of the final report on stdout, or in a single -o FILE whose
    /// name does not say.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the final report to FILE (repeatable; the format follows
    /// the name: .json .txt .folded .svg .pb.gz).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Vec<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Write a JSON report and a pprof profile every --interval into DIR,
    /// rotating the oldest out past --out-max-mb.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Disk bound of --out, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub out_max_mb: u64,
    /// Where OOM reports go (every OOM kill on the node gets one).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub oom_dir: PathBuf,
    /// Record a stack for about one in N write faults on new pages.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub fault_period: u32,
    /// Seconds between readings (the growth series).
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub sample_every: f64,
    /// Seconds of history behind each process's and cgroup's trend (cut
    /// into 64 slots: a trend needs 4 of them, a fifteenth of the window).
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub window: f64,
    /// Drill down into a process that has grown for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub drill_after: f64,
    /// How long a drill-down keeps its probes on.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub drill_for: f64,
    /// Never drill down (tiers 0 and 1 only).
    #[arg(long)]
    pub no_drill: bool,
    /// Benchmarking: drill down into this process at once, growing or
    /// not (once, as soon as the budget leaves room; it must be watched).
    #[arg(long, value_name = "PID", hide = true, conflicts_with = "no_drill")]
    pub drill_pid: Option<u32>,
    /// CPU that leaktrace may cost, its own and its probes' (measured with
    /// the kernel's BPF run-time statistics), in percent of one core; a
    /// drill-down that would exceed it ends early.
    #[arg(long, value_name = "PERCENT", default_value_t = 1.0)]
    pub budget_cpu: f64,
    /// Mean bytes between sampled allocations in a drill-down.
    #[arg(long, value_name = "N", default_value_t = 524_288)]
    pub drill_sample_bytes: u64,
    /// Most processes followed at once.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_processes: usize,
    /// Log the eBPF programs' own diagnostics.
    #[arg(long)]
    pub debug_bpf: bool,
}

/// What node mode adds to a [`Config`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub listen: Option<String>,
    pub out: Option<PathBuf>,
    pub out_max_bytes: u64,
    pub fault_period: u32,
    /// `None`: no drill-downs.
    pub drill_after: Option<Duration>,
    pub drill_for: Duration,
    /// A process drilled into at once, whatever the census says
    /// (`--drill-pid`, for benchmarks).
    pub drill_pid: Option<u32>,
    /// Fraction of one core.
    pub budget_cpu: f64,
    pub max_processes: usize,
    /// History behind the census's trends.
    pub window: Duration,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub pids: Vec<u32>,
    /// Trace the descendants of `pids` at start, and children of traced
    /// processes as they fork (not `--no-children`).
    pub follow_children: bool,
    pub comms: Vec<String>,
    pub cgroups: Vec<String>,
    pub allocator_prefixes: Vec<String>,
    pub min_age: Option<Duration>,
    pub syscalls: bool,
    pub demo: bool,
    pub interval: Option<Duration>,
    pub duration: Option<Duration>,
    pub top: usize,
    pub format: Format,
    /// Empty: the final report goes to stdout in `format`.
    pub outputs: Vec<Output>,
    pub sort: SortBy,
    pub sample_every: Duration,
    pub max_allocs: u32,
    pub max_stacks: u32,
    pub max_unwind_rows: u32,
    pub free_probe_at_entry: bool,
    pub oom_dir: PathBuf,
    pub oom_any: bool,
    /// 0: exact mode.
    pub sample_bytes: u64,
    /// Rate written into Go processes that sample nothing.
    pub go_enable_profiling: Option<u64>,
    /// Probe pymalloc's entry points (`--pymalloc`).
    pub pymalloc: bool,
    pub debug_bpf: bool,
    /// `leaktrace node`.
    pub node: Option<NodeConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} must be a finite number of seconds >= {min}, not {value}")]
    BadSeconds {
        flag: &'static str,
        min: f64,
        value: f64,
    },
    #[error("--{flag} must be at least {min}")]
    TooSmall { flag: &'static str, min: u64 },
    #[error("--{flag} must be a percentage above 0 and at most 100, not {value}")]
    BadPercent { flag: &'static str, value: f64 },
    #[error("--sample-bytes must be between 1024 and 2147483648, not {0}")]
    BadSampling(u64),
    #[error(
        "cannot tell the format of output file {0} from its name; name it .json, .txt, \
         .folded, .growth.folded, .svg, .growth.svg or .pb.gz, or give one -o with --format"
    )]
    UnknownOutput(String),
    #[error("cannot write {what} {path}: {why}")]
    Unwritable {
        what: &'static str,
        path: String,
        why: String,
    },
}

/// `dir` exists (made if missing, as it would be at the end) and this
/// process may write into it.
fn writable_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| "the path has a NUL byte".to_string())?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "directory {} is not writable: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

impl Config {
    /// Check, before tracing starts, that every report can be written: a
    /// typo in `-o` must not cost the trace.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        for out in &self.outputs {
            let unwritable = |why: String| ConfigError::Unwritable {
                what: "the report to",
                path: out.path.display().to_string(),
                why,
            };
            if out.path.is_dir() {
                return Err(unwritable("it is a directory".into()));
            }
            let dir = out
                .path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            writable_dir(dir).map_err(unwritable)?;
        }
        // The default (the working directory) is only a default: an OOM
        // report that cannot be written there is said when it happens.
        if self.oom_dir == Path::new(".") {
            return Ok(());
        }
        writable_dir(&self.oom_dir).map_err(|why| ConfigError::Unwritable {
            what: "OOM reports to --oom-dir",
            path: self.oom_dir.display().to_string(),
            why,
        })
    }
}

fn secs(flag: &'static str, value: f64, min: f64) -> Result<Duration, ConfigError> {
    if !value.is_finite() || value < min {
        return Err(ConfigError::BadSeconds { flag, min, value });
    }
    Ok(Duration::from_secs_f64(value))
}

fn outputs(paths: &[PathBuf], format: Format) -> Result<Vec<Output>, ConfigError> {
    let mut outputs = Vec::new();
    let single = paths.len() == 1;
    for path in paths {
        let is_dir = path.is_dir() || path.to_string_lossy().ends_with('/');
        if is_dir {
            outputs.extend(Format::ALL.iter().map(|f| Output {
                path: path.join(f.file_name()),
                format: *f,
            }));
            continue;
        }
        let name = path.to_string_lossy();
        let format = match Format::from_file_name(&name) {
            Some(f) if !single || format == Format::Text => f,
            _ if single => format,
            _ => return Err(ConfigError::UnknownOutput(name.into_owned())),
        };
        outputs.push(Output {
            path: path.clone(),
            format,
        });
    }
    Ok(outputs)
}

impl NodeArgs {
    fn validate(self) -> Result<Config, ConfigError> {
        let duration = match self.duration {
            Some(d) => Some(secs("duration", d, 0.0)?),
            None => None,
        };
        let interval = secs("interval", self.interval, 0.0)?;
        let sample_every = secs("sample-every", self.sample_every, 0.1)?;
        let drill_after = secs("drill-after", self.drill_after, 1.0)?;
        let drill_for = secs("drill-for", self.drill_for, 1.0)?;
        let window = secs("window", self.window, 16.0)?;
        if self.top == 0 {
            return Err(ConfigError::TooSmall {
                flag: "top",
                min: 1,
            });
        }
        if self.fault_period == 0 {
            return Err(ConfigError::TooSmall {
                flag: "fault-period",
                min: 1,
            });
        }
        if self.max_processes < 16 {
            return Err(ConfigError::TooSmall {
                flag: "max-processes",
                min: 16,
            });
        }
        if !(1024..=1 << 31).contains(&self.drill_sample_bytes) {
            return Err(ConfigError::BadSampling(self.drill_sample_bytes));
        }
        if self.drill_pid == Some(0) {
            return Err(ConfigError::TooSmall {
                flag: "drill-pid",
                min: 1,
            });
        }
        if !self.budget_cpu.is_finite() || self.budget_cpu <= 0.0 || self.budget_cpu > 100.0 {
            return Err(ConfigError::BadPercent {
                flag: "budget-cpu",
                value: self.budget_cpu,
            });
        }
        Ok(Config {
            pids: Vec::new(),
            follow_children: false,
            comms: self.comms,
            cgroups: self.cgroups,
            allocator_prefixes: Vec::new(),
            min_age: None,
            syscalls: true,
            demo: false,
            interval: (!interval.is_zero()).then_some(interval),
            duration,
            top: self.top,
            format: self.format,
            outputs: outputs(&self.output, self.format)?,
            sort: SortBy::Growth,
            sample_every,
            max_allocs: 1 << 18,
            max_stacks: 1 << 16,
            max_unwind_rows: 1 << 21,
            free_probe_at_entry: false,
            oom_dir: self.oom_dir,
            oom_any: true,
            sample_bytes: self.drill_sample_bytes,
            go_enable_profiling: None,
            pymalloc: false,
            debug_bpf: self.debug_bpf,
            node: Some(NodeConfig {
                listen: self.listen,
                out: self.out,
                out_max_bytes: self.out_max_mb.saturating_mul(1 << 20),
                fault_period: self.fault_period,
                drill_after: (!self.no_drill).then_some(drill_after),
                drill_for,
                drill_pid: self.drill_pid,
                budget_cpu: self.budget_cpu / 100.0,
                max_processes: self.max_processes,
                window,
            }),
        })
    }
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        if let Some(Command::Node(node)) = self.command {
            return node.validate();
        }
        let demo =
            self.demo || (self.pids.is_empty() && self.comms.is_empty() && self.cgroups.is_empty());
        let interval = secs(
            "interval",
            self.interval.unwrap_or(if demo { 2.0 } else { 10.0 }),
            0.0,
        )?;
        let duration = match self.duration {
            Some(d) => Some(secs("duration", d, 0.0)?),
            // The demo shows a few seconds of a leak, then its report.
            None if demo => Some(Duration::from_secs(6)),
            None => None,
        };
        let sample_every = secs("sample-every", self.sample_every, 0.05)?;
        if self.top == 0 {
            return Err(ConfigError::TooSmall {
                flag: "top",
                min: 1,
            });
        }
        if self.max_allocs < 1024 {
            return Err(ConfigError::TooSmall {
                flag: "max-allocs",
                min: 1024,
            });
        }
        if self.max_stacks < 64 {
            return Err(ConfigError::TooSmall {
                flag: "max-stacks",
                min: 64,
            });
        }
        let outputs = outputs(&self.output, self.format)?;
        if let Some(n) = self.sample_bytes {
            if !(1024..=1 << 31).contains(&n) {
                return Err(ConfigError::BadSampling(n));
            }
        }
        if let Some(r) = self.go_enable_profiling {
            if r == 0 {
                return Err(ConfigError::TooSmall {
                    flag: "go-enable-profiling",
                    min: 1,
                });
            }
        }
        let min_age = match self.min_age {
            Some(a) => Some(secs("min-age", a, 0.0)?),
            None => None,
        };
        Ok(Config {
            pids: self.pids,
            follow_children: !self.no_children,
            comms: self.comms,
            cgroups: self.cgroups,
            allocator_prefixes: self.allocator_prefixes,
            min_age,
            syscalls: !self.no_syscalls,
            demo,
            interval: (!interval.is_zero()).then_some(interval),
            duration,
            top: self.top,
            format: self.format,
            outputs,
            sort: self.sort,
            sample_every,
            max_allocs: self.max_allocs,
            max_stacks: self.max_stacks,
            max_unwind_rows: self.max_unwind_rows,
            sample_bytes: self.sample_bytes.unwrap_or(0),
            oom_dir: self.oom_dir,
            oom_any: self.oom_any,
            free_probe_at_entry: self.free_probe_at_entry,
            go_enable_profiling: self.go_enable_profiling,
            pymalloc: self.pymalloc,
            debug_bpf: self.debug_bpf,
            node: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["leaktrace"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn no_pid_means_demo() {
        let c = parse(&[]).expect("valid");
        assert!(c.demo);
        assert!(c.duration.is_some());
    }

    #[test]
    fn pids_repeat_and_zero_interval_disables() {
        let c = parse(&["-p", "1", "-p", "2", "-i", "0"]).expect("valid");
        assert_eq!(c.pids, vec![1, 2]);
        assert!(!c.demo);
        assert!(c.interval.is_none());
        assert!(c.duration.is_none());
    }

    #[test]
    fn children_are_followed_unless_told_not_to() {
        assert!(parse(&["-p", "1"]).expect("valid").follow_children);
        let c = parse(&["-p", "1", "--no-children"]).expect("valid");
        assert!(!c.follow_children);
    }

    #[test]
    fn unwritable_outputs_are_rejected_before_tracing() {
        let c = parse(&["-p", "1", "-o", "/proc/leaktrace-no/x.json"]).expect("valid");
        let e = c.check_paths().expect_err("unwritable").to_string();
        assert!(e.contains("/proc/leaktrace-no/x.json"), "{e}");
        let dir = std::env::temp_dir();
        let c = parse(&["-p", "1", "-o", &dir.join("r.json").to_string_lossy()]).expect("valid");
        let mut c = c;
        c.oom_dir = dir.clone();
        c.check_paths().expect("writable");
        let c = parse(&["-p", "1", "-o", &dir.to_string_lossy(), "--format", "json"]);
        // A directory without a trailing slash is a directory output.
        assert!(c.is_ok());
    }

    #[test]
    fn node_mode_watches_with_its_own_defaults() {
        let c = parse(&["node", "--listen", "127.0.0.1:0", "-d", "5"]).expect("valid");
        let n = c.node.expect("node");
        assert_eq!(n.listen.as_deref(), Some("127.0.0.1:0"));
        assert!(c.oom_any && c.syscalls && !c.demo);
        assert!((n.budget_cpu - 0.01).abs() < 1e-9);
        assert!(parse(&["node", "--budget-cpu", "0"]).is_err());
        assert!(parse(&["node", "--no-drill"])
            .expect("valid")
            .node
            .is_some_and(|n| n.drill_after.is_none()));
        // Trace flags belong before no subcommand.
        assert!(parse(&["-p", "1", "node"]).is_err());
    }

    #[test]
    fn node_drill_pid_is_hidden_and_needs_drill_downs() {
        let c = parse(&["node", "--drill-pid", "4242"]).expect("valid");
        assert_eq!(c.node.expect("node").drill_pid, Some(4242));
        assert_eq!(
            parse(&["node"])
                .expect("valid")
                .node
                .expect("node")
                .drill_pid,
            None
        );
        let e = parse(&["node", "--drill-pid", "4242", "--no-drill"]).expect_err("conflict");
        assert!(e.contains("--no-drill"), "{e}");
        assert!(parse(&["node", "--drill-pid", "0"]).is_err());
        assert!(parse(&["node", "--drill-pid", "x"]).is_err());
        let help = Args::try_parse_from(["leaktrace", "node", "--help"])
            .expect_err("help")
            .to_string();
        assert!(
            help.contains("--drill-after") && !help.contains("--drill-pid"),
            "{help}"
        );
    }

    #[test]
    fn bad_numbers_are_rejected() {
        assert!(parse(&["-p", "1", "-i=-1"]).is_err());
        assert!(parse(&["-p", "1", "-d", "nan"]).is_err());
        assert!(parse(&["-p", "1", "-n", "0"]).is_err());
    }
}
