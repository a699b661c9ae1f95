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

mod initramfs;
mod kernels;
mod packages;
mod runs;

use initramfs::*;
use kernels::*;
use packages::*;
use runs::*;

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
