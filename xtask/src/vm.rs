//! `cargo xtask vm`: run a command under kernels other than the host's.
//!
//! Inputs: a kernel line from [`KERNELS`] (Debian's stock kernels, pinned to
//! exact package versions), a command, and the environment variables to pass
//! in. Output: the command's console output, streamed to stdout, and its exit
//! code, as a [`VmOutcome`].
//!
//! The guest boots under QEMU with TCG (this machine kind's `/dev/kvm` is
//! PVM, which cannot boot stock kernels), from a small busybox initramfs
//! that mounts the host's `/` over 9p, read-only, under a tmpfs overlay:
//! the command sees the host's files and tools, its writes stay in guest RAM,
//! and the guest needs no disk image and no network. The command runs as
//! root in the workspace root with a clean environment; the init script
//! prints `LEAKTRACE_VM_EXIT=<code>` when it ends and powers off.
//!
//! Everything is fetched on first use and cached (idempotent, for a fresh CI
//! machine): QEMU from bookworm-backports, the kernel packages with
//! `apt-get download`, prepared under `target/vm/scratch/` and then moved
//! to `target/vm/kernels/<version>/`:
//! - `root/`: the package's files (`dpkg-deb -x`);
//! - `vmlinux`: the uncompressed kernel, booted through its PVH entry point
//!   (decompressing a bzImage under TCG costs about 6 s per boot);
//! - `initramfs.cpio`: busybox, `/init` and the modules 9p and overlay need;
//! - `ready`: written last; the release (`uname -r`) and the image to boot.
//!
//! Each run adds the command in a second cpio archive appended to the cached
//! one (the kernel unpacks concatenated archives), in `target/vm/scratch/`,
//! removed afterwards.

use std::{
    collections::{HashMap, HashSet},
    env, fs,
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;

use crate::{ensure_packages, is_root, output, status, workspace_root};

/// A Debian kernel package, pinned. The archive drops old versions; when the
/// pinned one is gone, the newest of the same line is used with a warning.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelSpec {
    /// What `--kernel` names.
    pub(crate) line: &'static str,
    pub(crate) package: &'static str,
    pub(crate) version: &'static str,
    /// The line's packages are named `<prefix><digits><suffix>`: a new ABI
    /// or upstream release renames the package, so a fallback searches names.
    name_prefix: &'static str,
    name_suffix: &'static str,
}

/// Debian 12's own kernel, and the 6.12 line Debian 12 also ships (first in
/// bookworm-backports; the pinned build comes from bookworm-security).
pub(crate) const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        line: "6.1",
        package: "linux-image-6.1.0-57-amd64-unsigned",
        version: "6.1.192-3",
        name_prefix: "linux-image-6.1.0-",
        name_suffix: "-amd64-unsigned",
    },
    KernelSpec {
        line: "6.12",
        package: "linux-image-6.12.118+deb12-amd64-unsigned",
        version: "6.12.118-1~deb12u1",
        name_prefix: "linux-image-6.12.",
        name_suffix: "+deb12-amd64-unsigned",
    },
];

/// Bookworm's own QEMU conflicts with the backports `qemu-utils` the image
/// ships, so QEMU comes from backports too.
const QEMU_PACKAGE: &str = "qemu-system-x86";
const QEMU_VERSION: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";
const QEMU_BIN: &str = "qemu-system-x86_64";
const BACKPORTS: &str = "bookworm-backports";
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/leaktrace-backports.sources";
/// busybox must be static: it runs before the host's libraries are mounted.
const HOST_PACKAGES: &[&str] = &["busybox-static", "cpio", "xz-utils", "zstd"];
const BUSYBOX: &str = "/bin/busybox";

/// Loaded in this order with their dependencies first; built-in ones are
/// skipped (6.12 builds virtio_pci in, 6.1 has it as a module).
const GUEST_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
const GUEST_MEMORY: &str = "4G";
const GUEST_CPUS: &str = "2";
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Host directories the guest covers with its own mounts; a workspace below
/// one of them gets its own overlay so the command still finds it.
const GUEST_MOUNTS: &[&str] = &["/tmp", "/run", "/dev", "/proc", "/sys"];
const EXIT_MARKER: &str = "LEAKTRACE_VM_EXIT=";

/// PID 1 in the guest. Mount failures print a reason and power off without
/// the exit marker, so the host reports a broken VM, not a failed command.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
die() { echo "leaktrace-vm: $*"; poweroff -f; }
mkdir -p /dev /proc /sys /lower /rw /newroot
mount -t devtmpfs dev /dev
# The kernel found no /dev/console in the archive to give us.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in /modules/*.ko; do
    [ -e "$m" ] || continue
    insmod "$m" || die "insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
    || die "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || die "cannot mount the overlay"
cd /newroot
mount -t proc proc proc
mount -t sysfs sys sys
mount -t devtmpfs dev dev
mkdir -p dev/pts dev/shm
mount -t devpts -o ptmxmode=0666 devpts dev/pts
mount -t tmpfs -o mode=1777 shm dev/shm
mount -t tmpfs -o mode=1777 tmp tmp
mount -t tmpfs -o mode=0755 run run
mount -t bpf bpf sys/fs/bpf
mount -t cgroup2 cgroup2 sys/fs/cgroup
[ -d sys/kernel/tracing ] && mount -t tracefs tracefs sys/kernel/tracing
[ -d sys/kernel/debug ] && mount -t debugfs debugfs sys/kernel/debug
n=0
while read -r dir; do
    n=$((n + 1))
    mkdir -p "/rw/u$n" "/rw/w$n" "/newroot$dir"
    mount -t overlay -o "lowerdir=/lower$dir,upperdir=/rw/u$n,workdir=/rw/w$n" overlay "/newroot$dir" \
        || die "cannot mount $dir"
done </shadowed
mkdir -p run/leaktrace-vm
cp /cmd.sh run/leaktrace-vm/cmd.sh
chroot /newroot /bin/sh /run/leaktrace-vm/cmd.sh </dev/null
echo "LEAKTRACE_VM_EXIT=$?"
poweroff -f
"#;

/// `cargo xtask vm` arguments.
#[derive(Args, Debug)]
pub(crate) struct VmArgs {
    /// Kernel line to boot: 6.1, 6.12 or all.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Go on with the next kernel after a failure.
    #[arg(long)]
    keep_going: bool,
    /// Print the pinned kernels and exit.
    #[arg(long)]
    list: bool,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Pass NAME (with the host's value) or NAME=VALUE into the guest.
    #[arg(short, long = "env", value_name = "NAME[=VALUE]")]
    env: Vec<String>,
    /// The command, run in the workspace root.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// How a command ended in the guest.
#[derive(Debug)]
pub(crate) struct VmOutcome {
    /// The guest's `uname -r`.
    pub(crate) release: String,
    pub(crate) exit_code: i32,
    /// Console output (the command's stdout and stderr, kernel warnings),
    /// without the exit marker.
    #[allow(dead_code, reason = "for callers that check the output, as tests will")]
    pub(crate) output: String,
    /// Wall time from starting QEMU to its exit.
    pub(crate) elapsed: Duration,
}

impl VmOutcome {
    pub(crate) fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// The entry point of `cargo xtask vm`.
pub(crate) fn main(args: &VmArgs) -> Result<()> {
    if args.list {
        print_kernels();
        return Ok(());
    }
    if args.command.is_empty() {
        bail!("no command given; usage: cargo xtask vm --kernel 6.1 -- uname -r");
    }
    let kernels = select_kernels(&args.kernel)?;
    let env = parse_env(&args.env)?;
    let timeout = Duration::from_secs(args.timeout);
    let mut summary = Vec::new();
    let mut failed = 0;
    for kernel in kernels {
        let (line, ok) = summarize(kernel, run_in_vm(kernel, &args.command, &env, timeout));
        summary.push(line);
        if !ok {
            failed += 1;
            if !args.keep_going {
                break;
            }
        }
    }
    for line in &summary {
        println!("{line}");
    }
    if failed > 0 {
        bail!("the command failed under {failed} kernel(s)");
    }
    Ok(())
}

fn print_kernels() {
    for k in KERNELS {
        println!("{:<5} {} {}", k.line, k.package, k.version);
    }
}

fn select_kernels(which: &str) -> Result<Vec<&'static KernelSpec>> {
    if which == "all" {
        return Ok(KERNELS.iter().collect());
    }
    let lines: Vec<&str> = KERNELS.iter().map(|k| k.line).collect();
    KERNELS
        .iter()
        .find(|k| k.line == which)
        .map(|k| vec![k])
        .with_context(|| {
            format!(
                "unknown kernel {which}; pick one of {} or all",
                lines.join(", ")
            )
        })
}

/// `NAME` takes the host's value, so secrets need not sit on a command line.
fn parse_env(specs: &[String]) -> Result<Vec<(String, String)>> {
    specs
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => env::var(s)
                .map(|v| (s.clone(), v))
                .with_context(|| format!("--env {s}: not set on the host; pass {s}=VALUE")),
        })
        .collect()
}

fn summarize(kernel: &KernelSpec, result: Result<VmOutcome>) -> (String, bool) {
    match result {
        Ok(o) if o.success() => (
            format!("vm {}: ok ({:.1} s)", o.release, o.elapsed.as_secs_f64()),
            true,
        ),
        Ok(o) => (
            format!(
                "vm {}: failed (exit {}, {:.1} s)",
                o.release,
                o.exit_code,
                o.elapsed.as_secs_f64()
            ),
            false,
        ),
        Err(e) => (format!("vm {}: error: {e:#}", kernel.line), false),
    }
}

/// Boots `kernel` and runs `cmd` as root in the workspace root with a clean
/// environment (PATH, HOME=/root, then `env`, which may override both).
/// The console streams to stdout as it comes. Errors mean no exit code came
/// back: setup failed, the guest broke, or `timeout` passed (QEMU is killed).
pub(crate) fn run_in_vm(
    kernel: &KernelSpec,
    cmd: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<VmOutcome> {
    ensure!(!cmd.is_empty(), "no command to run in the VM");
    ensure_qemu()?;
    let image = ensure_kernel(kernel)?;
    let run = Scratch::create()?;
    let initrd = run_initrd(&image.initramfs, &run.0, cmd, env)?;
    let mut qemu = qemu_command(&image.kernel, &initrd);
    let (code, output, elapsed) = boot(&mut qemu, timeout)
        .with_context(|| format!("booting {} ({})", image.release, kernel.package))?;
    Ok(VmOutcome {
        release: image.release,
        exit_code: code,
        output,
        elapsed,
    })
}

// ---------------------------------------------------------------- packages

fn ensure_qemu() -> Result<()> {
    ensure_packages(HOST_PACKAGES)?;
    if installed(QEMU_PACKAGE) {
        return Ok(());
    }
    if !is_root() {
        bail!("{QEMU_PACKAGE} is missing; run `sudo cargo xtask vm ...` once to install it from {BACKPORTS}");
    }
    ensure_backports_source()?;
    apt_update()?;
    let pkg = if available(QEMU_PACKAGE, QEMU_VERSION)? {
        format!("{QEMU_PACKAGE}={QEMU_VERSION}")
    } else {
        eprintln!("xtask: warning: {QEMU_PACKAGE} {QEMU_VERSION} is gone from {BACKPORTS}; installing its newest version");
        QEMU_PACKAGE.to_string()
    };
    eprintln!("xtask: installing {pkg} from {BACKPORTS}");
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "-t"])
            .args([BACKPORTS, &pkg])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Whether the apt lists know `pkg` at exactly `version`.
fn available(pkg: &str, version: &str) -> Result<bool> {
    Ok(madison(pkg)?.iter().any(|v| v == version))
}

/// Every version of `pkg` the apt lists know.
fn madison(pkg: &str) -> Result<Vec<String>> {
    let out = output(Command::new("apt-cache").args(["madison", pkg]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split('|').nth(1))
        .map(|v| v.trim().to_string())
        .collect())
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Once per process: the lists only go stale between runs.
fn apt_update() -> Result<()> {
    if APT_UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    status(Command::new("apt-get").args(["update", "-q"]))
}

/// Adds bookworm-backports with the URI and key of the system's own
/// bookworm entry, so no mirror is named here and a local mirror is kept.
fn ensure_backports_source() -> Result<()> {
    if backports_configured_elsewhere() {
        return Ok(());
    }
    let (uri, signed_by) = bookworm_source()?;
    let mut text = format!("Types: deb\nURIs: {uri}\nSuites: {BACKPORTS}\nComponents: main\n");
    if let Some(key) = signed_by {
        text.push_str(&format!("Signed-By: {key}\n"));
    }
    if fs::read_to_string(BACKPORTS_SOURCE).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    eprintln!("xtask: adding {BACKPORTS} as {BACKPORTS_SOURCE}");
    fs::write(BACKPORTS_SOURCE, text).with_context(|| format!("failed to write {BACKPORTS_SOURCE}"))
}

/// Whether another sources file lists the suite already: apt would warn
/// about every duplicate entry on each update.
fn backports_configured_elsewhere() -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| {
            p.to_str() != Some(BACKPORTS_SOURCE)
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("list" | "sources")
                )
        }));
    }
    files.iter().any(|f| {
        fs::read_to_string(f).is_ok_and(|t| {
            t.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == BACKPORTS))
        })
    })
}

/// The URI and `Signed-By` of the `bookworm` suite, from the deb822 file
/// Debian 12 installs or else from a one-line `sources.list`.
fn bookworm_source() -> Result<(String, Option<String>)> {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let one_line = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    deb822_bookworm(&deb822)
        .or_else(|| one_line_bookworm(&one_line))
        .context("no `bookworm` suite in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list to copy the mirror from")
}

fn deb822_bookworm(text: &str) -> Option<(String, Option<String>)> {
    text.split("\n\n").find_map(|stanza| {
        let fields: HashMap<&str, &str> = stanza
            .lines()
            // Comments, and continuation lines (an inline key block).
            .filter(|l| !l.starts_with(['#', ' ', '\t']))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let is_deb = fields.get("Types")?.split_whitespace().any(|t| t == "deb");
        let has_suite = fields
            .get("Suites")?
            .split_whitespace()
            .any(|s| s == "bookworm");
        let uri = fields.get("URIs")?.split_whitespace().next()?;
        (is_deb && has_suite).then(|| {
            (
                uri.to_string(),
                // Empty when the key is inline: apt's keyring then serves.
                fields
                    .get("Signed-By")
                    .filter(|s| !s.is_empty())
                    .map(|s| s.to_string()),
            )
        })
    })
}

/// `deb [signed-by=KEY ...] URI bookworm main ...`
fn one_line_bookworm(text: &str) -> Option<(String, Option<String>)> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("deb ")?.trim_start();
        let (opts, rest) = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']')?,
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == "bookworm").then(|| {
            let key = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            (uri.to_string(), key)
        })
    })
}

// ----------------------------------------------------------------- kernels

/// A kernel ready to boot, from the cache.
struct KernelImage {
    release: String,
    /// The ELF vmlinux, or the bzImage when the kernel has no PVH entry.
    kernel: PathBuf,
    initramfs: PathBuf,
}

fn vm_dir() -> PathBuf {
    workspace_root().join("target").join("vm")
}

fn ensure_kernel(spec: &KernelSpec) -> Result<KernelImage> {
    let pinned = vm_dir().join("kernels").join(spec.version);
    if let Some(image) = read_ready(&pinned) {
        return Ok(image);
    }
    let (package, version) = resolve_version(spec)?;
    let dir = vm_dir().join("kernels").join(&version);
    if let Some(image) = read_ready(&dir) {
        return Ok(image);
    }
    eprintln!("xtask: preparing {package} {version} in {}", dir.display());
    // Built aside and renamed into place: a concurrent run sees a whole
    // kernel or none, and an interrupted one leaves nothing half-made.
    let scratch = Scratch::create()?;
    let staged = scratch.0.join("kernel");
    prepare_kernel(&package, &version, &staged)?;
    if read_ready(&dir).is_none() {
        let _ = fs::remove_dir_all(&dir);
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        // Losing a race to another run is fine: its copy is as good.
        let _ = fs::rename(&staged, &dir);
    }
    read_ready(&dir).with_context(|| format!("failed to move the kernel into {}", dir.display()))
}

/// `ready` holds the release and the image's path in `dir`, one a line.
fn read_ready(dir: &Path) -> Option<KernelImage> {
    let text = fs::read_to_string(dir.join("ready")).ok()?;
    let mut lines = text.lines();
    let release = lines.next()?.to_string();
    let kernel = dir.join(lines.next()?);
    let initramfs = dir.join("initramfs.cpio");
    (kernel.is_file() && initramfs.is_file()).then_some(KernelImage {
        release,
        kernel,
        initramfs,
    })
}

/// The pinned package, or the newest of its line when the archive dropped it.
fn resolve_version(spec: &KernelSpec) -> Result<(String, String)> {
    if available(spec.package, spec.version)? {
        return Ok((spec.package.to_string(), spec.version.to_string()));
    }
    if is_root() {
        ensure_backports_source()?;
        apt_update()?;
        if available(spec.package, spec.version)? {
            return Ok((spec.package.to_string(), spec.version.to_string()));
        }
    }
    let (package, version) = newest_in_line(spec)?;
    eprintln!(
        "xtask: warning: {} {} is not in the archive any more; using {package} {version} \
         (update KERNELS in xtask/src/vm.rs)",
        spec.package, spec.version
    );
    Ok((package, version))
}

fn newest_in_line(spec: &KernelSpec) -> Result<(String, String)> {
    let names = output(Command::new("apt-cache").args(["pkgnames", spec.name_prefix]))?;
    let mut best: Option<(String, String)> = None;
    for name in names.lines().filter(|n| in_line(spec, n)) {
        for version in madison(name)? {
            if best
                .as_ref()
                .is_none_or(|(_, b)| version_newer(&version, b))
            {
                best = Some((name.to_string(), version));
            }
        }
    }
    best.with_context(|| {
        format!(
            "no {}<N>{} package in the apt lists; is bookworm-security or {BACKPORTS} configured?",
            spec.name_prefix, spec.name_suffix
        )
    })
}

/// `<prefix><digits><suffix>`: keeps `-cloud-` and `-rt-` flavours out.
fn in_line(spec: &KernelSpec, name: &str) -> bool {
    name.strip_prefix(spec.name_prefix)
        .and_then(|r| r.strip_suffix(spec.name_suffix))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn version_newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

/// Download, extract, uncompress the kernel, build the initramfs, into
/// the new directory `dir`.
fn prepare_kernel(package: &str, version: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let deb = download(package, version, dir)?;
    let root = dir.join("root");
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb)?;
    let (release, vmlinuz) = find_vmlinuz(&root)?;
    let kernel = uncompressed_kernel(&vmlinuz, dir)?;
    let modules = root.join("lib/modules").join(&release);
    build_initramfs(&modules, &dir.join("initramfs.cpio"))?;
    let image = kernel.strip_prefix(dir).unwrap_or(&kernel);
    fs::write(
        dir.join("ready"),
        format!("{release}\n{}\n", image.display()),
    )?;
    Ok(())
}

fn download(package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
    let mut apt = Command::new("apt-get");
    // As root apt hands the download to the `_apt` user, who cannot write
    // into the workspace: download as root instead of warning each time.
    if is_root() {
        apt.args(["-o", "APT::Sandbox::User=root"]);
    }
    status(
        apt.args(["download", "-q", &format!("{package}={version}")])
            .current_dir(dir),
    )?;
    fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))
}

/// `boot/vmlinuz-<release>`: the release names the modules directory.
fn find_vmlinuz(root: &Path) -> Result<(String, PathBuf)> {
    let boot = root.join("boot");
    fs::read_dir(&boot)
        .with_context(|| format!("failed to list {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find_map(|p| {
            let name = p.file_name()?.to_str()?;
            Some((name.strip_prefix("vmlinuz-")?.to_string(), p.clone()))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// The ELF vmlinux when QEMU can boot it (a PVH entry note), else the
/// bzImage as shipped.
fn uncompressed_kernel(vmlinuz: &Path, dir: &Path) -> Result<PathBuf> {
    let vmlinux = dir.join("vmlinux");
    extract_vmlinux(vmlinuz, &vmlinux)?;
    let elf = fs::read(&vmlinux)?;
    if has_pvh_entry(&elf) {
        return Ok(vmlinux);
    }
    eprintln!(
        "xtask: warning: {} has no PVH entry; booting the bzImage (about 6 s slower)",
        vmlinux.display()
    );
    fs::remove_file(&vmlinux)?;
    Ok(vmlinuz.to_path_buf())
}

/// What `scripts/extract-vmlinux` does, but from the boot protocol's
/// payload fields instead of scanning for magic numbers.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image =
        fs::read(vmlinuz).with_context(|| format!("failed to read {}", vmlinuz.display()))?;
    let payload = bzimage_payload(&image)
        .with_context(|| format!("{} is not a bzImage", vmlinuz.display()))?;
    let (tool, payload) = decompressor(payload)
        .with_context(|| format!("unknown compression in {}", vmlinuz.display()))?;
    let packed = out.with_extension("packed");
    fs::write(&packed, payload)?;
    let file = File::create(out)?;
    let result = status(Command::new(tool).arg("-dc").arg(&packed).stdout(file));
    fs::remove_file(&packed)?;
    result?;
    let mut magic = [0u8; 4];
    File::open(out)?.read_exact(&mut magic)?;
    ensure!(
        &magic == b"\x7fELF",
        "{} did not decompress to an ELF file",
        vmlinuz.display()
    );
    Ok(())
}

/// Boot protocol 2.08+: the compressed kernel's offset and length, relative
/// to the protected-mode code after the setup sectors.
fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let offset = le_u32(image, 0x248)? as usize;
    let length = le_u32(image, 0x24c)? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    image.get(start..start.checked_add(length)?)
}

/// The tool for the payload, and the bytes to give it: the kernel build
/// appends the uncompressed size to xz and zstd streams (gzip has its own),
/// which those tools would reject as trailing garbage.
fn decompressor(payload: &[u8]) -> Option<(&'static str, &[u8])> {
    let sized = payload.get(..payload.len().checked_sub(4)?)?;
    if payload.starts_with(b"\xfd7zXZ\x00") {
        Some(("xz", sized))
    } else if payload.starts_with(b"\x28\xb5\x2f\xfd") {
        Some(("zstd", sized))
    } else if payload.starts_with(b"\x1f\x8b") {
        Some(("gzip", payload))
    } else {
        None
    }
}

/// XEN_ELFNOTE_PHYS32_ENTRY: QEMU boots an ELF kernel only through it.
fn has_pvh_entry(elf: &[u8]) -> bool {
    const PHYS32_ENTRY: u32 = 18;
    elf_section(elf, ".notes").is_some_and(|notes| {
        elf_notes(notes).any(|(name, kind)| name == b"Xen\0" && kind == PHYS32_ENTRY)
    })
}

/// (name with its NUL, type) of each note.
fn elf_notes(mut notes: &[u8]) -> impl Iterator<Item = (&[u8], u32)> {
    std::iter::from_fn(move || {
        let name_len = le_u32(notes, 0)? as usize;
        let desc_len = le_u32(notes, 4)? as usize;
        let kind = le_u32(notes, 8)?;
        let name = notes.get(12..12 + name_len)?;
        let next = 12 + name_len.next_multiple_of(4) + desc_len.next_multiple_of(4);
        notes = notes.get(next.min(notes.len())..)?;
        Some((name, kind))
    })
}

/// The bytes of section `name` in a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let shoff = le_u64(elf, 0x28)? as usize;
    let shentsize = usize::from(le_u16(elf, 0x3a)?);
    let shnum = usize::from(le_u16(elf, 0x3c)?);
    let header = |i: usize| elf.get(shoff + i * shentsize..shoff + (i + 1) * shentsize);
    let bytes = |sh: &[u8]| -> Option<&'a [u8]> {
        let off = le_u64(sh, 0x18)? as usize;
        elf.get(off..off.checked_add(le_u64(sh, 0x20)? as usize)?)
    };
    let names = bytes(header(usize::from(le_u16(elf, 0x3e)?))?)?;
    (0..shnum).find_map(|i| {
        let sh = header(i)?;
        let at = names.get(le_u32(sh, 0)? as usize..)?;
        let this = at.split(|&b| b == 0).next()?;
        (this == name.as_bytes()).then(|| bytes(sh)).flatten()
    })
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

// --------------------------------------------------------------- initramfs

/// The package's module directory: no `modules.dep` (Debian runs depmod at
/// install time), so dependencies come from each module's `.modinfo`.
struct ModuleTree {
    dir: PathBuf,
    builtin: HashSet<String>,
    /// Module name to path relative to `dir`, as `modules.order` lists it
    /// (without the `.xz`/`.zst` the files may carry).
    paths: HashMap<String, String>,
}

impl ModuleTree {
    fn open(dir: &Path) -> Result<ModuleTree> {
        let read = |f: &str| {
            fs::read_to_string(dir.join(f))
                .with_context(|| format!("failed to read {}", dir.join(f).display()))
        };
        let builtin = read("modules.builtin")?.lines().map(module_name).collect();
        let paths = read("modules.order")?
            .lines()
            .map(|l| (module_name(l), l.to_string()))
            .collect();
        Ok(ModuleTree {
            dir: dir.to_path_buf(),
            builtin,
            paths,
        })
    }

    /// The modules `wanted` needs, uncompressed, dependencies first.
    fn load_order(&self, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for name in wanted {
            self.visit(&module_name(name), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if self.builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        let rel = self.paths.get(name).with_context(|| {
            format!(
                "the kernel in {} has no module {name} and does not build it in",
                self.dir.display()
            )
        })?;
        let ko = read_module(&self.dir.join(rel))?;
        for dep in modinfo_depends(&ko) {
            self.visit(&dep, seen, order)?;
        }
        order.push((name.to_string(), ko));
        Ok(())
    }
}

/// `kernel/net/9p/9pnet_virtio.ko` -> `9pnet_virtio`; the kernel treats `-`
/// and `_` in module names alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// busybox's insmod takes only plain ELF, so compressed modules are
/// decompressed here.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    if path.is_file() {
        return fs::read(path).with_context(|| format!("failed to read {}", path.display()));
    }
    for (ext, tool) in [("xz", "xz"), ("zst", "zstd")] {
        let packed = PathBuf::from(format!("{}.{ext}", path.display()));
        if packed.is_file() {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(&packed)
                .output()
                .with_context(|| format!("failed to start {tool}"))?;
            ensure!(
                out.status.success(),
                "{tool} -dc {} failed",
                packed.display()
            );
            return Ok(out.stdout);
        }
    }
    bail!("no module file at {}[.xz|.zst]", path.display())
}

fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    elf_section(ko, ".modinfo")
        .into_iter()
        .flat_map(|s| s.split(|&b| b == 0))
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect()
}

fn build_initramfs(modules: &Path, out: &Path) -> Result<()> {
    let stage = out.with_extension("d");
    reset_dir(&stage)?;
    fs::create_dir_all(stage.join("bin"))?;
    fs::create_dir_all(stage.join("modules"))?;
    fs::copy(BUSYBOX, stage.join("bin/busybox"))
        .with_context(|| format!("failed to copy {BUSYBOX} (package busybox-static)"))?;
    write_executable(&stage.join("init"), INIT_SCRIPT)?;
    let order = ModuleTree::open(modules)?.load_order(GUEST_MODULES)?;
    for (i, (name, ko)) in order.iter().enumerate() {
        // The init script loads them in glob order.
        fs::write(stage.join(format!("modules/{i:02}-{name}.ko")), ko)?;
    }
    cpio(&stage, out)?;
    fs::remove_dir_all(&stage)?;
    Ok(())
}

fn reset_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("failed to clear {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A newc archive of everything under `stage`, owned by root.
fn cpio(stage: &Path, out: &Path) -> Result<()> {
    let mut list = String::new();
    list_tree(stage, Path::new(""), &mut list)?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
        .current_dir(stage)
        .stdin(Stdio::piped())
        .stdout(File::create(out).with_context(|| format!("failed to create {}", out.display()))?)
        .spawn()
        .context("failed to start cpio (package cpio)")?;
    child
        .stdin
        .take()
        .context("cpio has no stdin")?
        .write_all(list.as_bytes())?;
    let st = child.wait()?;
    ensure!(st.success(), "cpio failed for {}: {st}", stage.display());
    Ok(())
}

/// Relative paths, parents before children, one a line.
fn list_tree(root: &Path, rel: &Path, list: &mut String) -> Result<()> {
    for entry in fs::read_dir(root.join(rel))? {
        let path = rel.join(entry?.file_name());
        list.push_str(&format!("{}\n", path.display()));
        if root.join(&path).is_dir() {
            list_tree(root, &path, list)?;
        }
    }
    Ok(())
}

// -------------------------------------------------------------------- runs

/// A directory of its own under `target/vm/scratch/`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> Result<Scratch> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let parent = vm_dir().join("scratch");
        remove_orphans(&parent);
        let dir = parent.join(format!("{}-{n}", std::process::id()));
        reset_dir(&dir)?;
        Ok(Scratch(dir))
    }
}

/// Scratch directories of xtask processes that died without their drop (a
/// Ctrl-C kills the whole process group).
fn remove_orphans(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.split('-').next());
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The cached archive with this run's command appended.
fn run_initrd(
    base: &Path,
    run: &Path,
    cmd: &[String],
    env: &[(String, String)],
) -> Result<PathBuf> {
    let stage = run.join("stage");
    fs::create_dir_all(&stage)?;
    let cwd = workspace_root();
    write_executable(&stage.join("cmd.sh"), &command_script(&cwd, cmd, env))?;
    fs::write(stage.join("shadowed"), shadowed_dirs(&cwd))?;
    let extra = run.join("run.cpio");
    cpio(&stage, &extra)?;
    let initrd = run.join("initrd.img");
    let mut bytes = fs::read(base).with_context(|| format!("failed to read {}", base.display()))?;
    bytes.extend(fs::read(&extra)?);
    fs::write(&initrd, bytes)?;
    Ok(initrd)
}

/// Runs in the guest's chroot with the host's `/bin/sh`; `env -i` drops
/// what init's environment holds.
fn command_script(cwd: &Path, cmd: &[String], env: &[(String, String)]) -> String {
    let mut vars = vec![format!("PATH={GUEST_PATH}"), "HOME=/root".to_string()];
    vars.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    let words = |w: &[String]| w.iter().map(|s| quote(s)).collect::<Vec<_>>().join(" ");
    format!(
        "cd {} || exit 127\nexec env -i {} {}\n",
        quote(&cwd.display().to_string()),
        words(&vars),
        words(cmd)
    )
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The workspace and cargo's target dir, when the guest's own mounts would
/// hide them; one a line.
fn shadowed_dirs(cwd: &Path) -> String {
    let target = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
    [Some(cwd.to_path_buf()), target]
        .into_iter()
        .flatten()
        .filter(|p| GUEST_MOUNTS.iter().any(|m| p.starts_with(m)))
        .map(|p| format!("{}\n", p.display()))
        .collect()
}

fn qemu_command(kernel: &Path, initrd: &Path) -> Command {
    let mut c = Command::new(QEMU_BIN);
    c.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-m", GUEST_MEMORY, "-smp", GUEST_CPUS])
        // No NIC (so no iPXE option ROM), no VGA, no disks: only what is
        // named below.
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        // The kernel as users run it: `mitigations=off` would save about a
        // second of boot but changes what the BPF verifier checks.
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-chardev", "stdio,id=console", "-serial", "chardev:console"])
        // remap: the host's other mounts (e.g. a separate /work) appear
        // below / with inode numbers that cannot collide.
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        ])
        // A terminal on stdin would be put in raw mode and left so.
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    c
}

/// Starts QEMU, streams the console to stdout, and returns the command's
/// exit code, the console text without the marker, and the wall time.
fn boot(qemu: &mut Command, timeout: Duration) -> Result<(i32, String, Duration)> {
    let start = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("failed to start {QEMU_BIN}"))?;
    let console = child.stdout.take().context("qemu has no stdout")?;
    let reader = thread::spawn(move || stream_console(console));
    let finished = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let (text, code) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the console reader panicked"))?;
    match (finished, code) {
        (None, _) => bail!("no exit after {} s; killed {QEMU_BIN}", timeout.as_secs()),
        (Some(_), Some(code)) => Ok((code, text, elapsed)),
        (Some(st), None) => {
            bail!("the guest ended without reporting an exit code ({QEMU_BIN} {st})")
        }
    }
}

/// Echoes each console line up to the exit marker and keeps the last
/// marker's code.
fn stream_console(console: impl Read) -> (String, Option<i32>) {
    let mut text = String::new();
    let mut code = None;
    let mut reader = BufReader::new(console);
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
        let raw = String::from_utf8_lossy(&buf);
        let line = raw.trim_end_matches(['\n', '\r']);
        // The marker may follow output that did not end in a newline.
        let (shown, marker) = match line.rfind(EXIT_MARKER) {
            Some(at) => (
                &line[..at],
                line[at + EXIT_MARKER.len()..].trim().parse().ok(),
            ),
            None => (line, None),
        };
        // After the marker only the kernel's power-off message follows.
        if code.is_none() && !(marker.is_some() && shown.is_empty()) {
            println!("{shown}");
            text.push_str(shown);
            text.push('\n');
        }
        code = marker.or(code);
        buf.clear();
    }
    (text, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_picks_the_bookworm_stanza() {
        let text = "Types: deb\n# a comment: with colon\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            deb822_bookworm(text),
            Some(("http://mirror.example/debian".into(), Some("/k.gpg".into())))
        );
    }

    #[test]
    fn deb822_inline_key_is_no_signed_by_path() {
        let text = "Types: deb\nURIs: http://m.example/d\nSuites: bookworm\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n Comment: x\n";
        assert_eq!(
            deb822_bookworm(text),
            Some(("http://m.example/d".into(), None))
        );
    }

    #[test]
    fn one_line_sources_with_and_without_options() {
        let text = "deb http://mirror.example/debian-security bookworm-security main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            one_line_bookworm(text),
            Some(("http://mirror.example/debian".into(), Some("/k.gpg".into())))
        );
        assert_eq!(
            one_line_bookworm("deb http://m.example/d bookworm main"),
            Some(("http://m.example/d".into(), None))
        );
    }

    #[test]
    fn kernel_lines_exclude_other_flavours() {
        let k61 = &KERNELS[0];
        assert!(in_line(k61, "linux-image-6.1.0-58-amd64-unsigned"));
        assert!(!in_line(k61, "linux-image-6.1.0-58-cloud-amd64-unsigned"));
        assert!(!in_line(k61, "linux-image-6.1.0-58-rt-amd64-unsigned"));
        let k612 = &KERNELS[1];
        assert!(in_line(k612, "linux-image-6.12.120+deb12-amd64-unsigned"));
        assert!(!in_line(
            k612,
            "linux-image-6.12.120+deb12-cloud-amd64-unsigned"
        ));
        for k in KERNELS {
            assert!(
                in_line(k, k.package),
                "{} is not in its own line",
                k.package
            );
        }
    }

    #[test]
    fn init_prints_the_marker_the_host_parses() {
        assert!(INIT_SCRIPT.contains(&format!("echo \"{EXIT_MARKER}$?\"")));
    }

    #[test]
    fn module_names_normalize() {
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(module_name("kernel/fs/overlayfs/overlay.ko.xz"), "overlay");
        assert_eq!(module_name("virtio-pci"), "virtio_pci");
    }

    #[test]
    fn command_script_quotes_everything() {
        let s = command_script(
            Path::new("/w s"),
            &["sh".into(), "-c".into(), "echo 'hi'; false".into()],
            &[("A".into(), "x y".into())],
        );
        assert_eq!(
            s,
            format!(
                "cd '/w s' || exit 127\nexec env -i 'PATH={GUEST_PATH}' 'HOME=/root' 'A=x y' 'sh' '-c' 'echo '\\''hi'\\''; false'\n"
            )
        );
    }

    #[test]
    fn console_marker_gives_the_code_and_is_hidden() {
        let (text, code) = stream_console(&b"hello\r\npartialLEAKTRACE_VM_EXIT=3\r\n"[..]);
        assert_eq!(code, Some(3));
        assert_eq!(text, "hello\npartial\n");
        let (text, code) =
            stream_console(&b"LEAKTRACE_VM_EXIT=0\r\n[    4.4] reboot: Power down\r\n"[..]);
        assert_eq!((text.as_str(), code), ("", Some(0)));
        assert_eq!(stream_console(&b"panic\n"[..]).1, None);
    }

    #[test]
    fn bzimage_payload_uses_the_setup_header() {
        let mut img = vec![0u8; 4096];
        img[0x1f1] = 1;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&8u32.to_le_bytes());
        img[1024 + 16..1024 + 24].copy_from_slice(b"\xfd7zXZ\x00ab");
        let payload = bzimage_payload(&img).expect("payload");
        assert_eq!(payload, b"\xfd7zXZ\x00ab");
        assert_eq!(decompressor(payload), Some(("xz", &b"\xfd7zX"[..])));
    }
}
