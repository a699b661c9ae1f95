//! One VM run: the per-run initramfs with the command, QEMU's command
//! line, and the console read until the exit marker or the timeout.

use super::*;

// -------------------------------------------------------------------- runs

/// A directory of its own under `target/vm/scratch/`, removed on drop.
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    pub(super) fn create() -> Result<Scratch> {
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
pub(super) fn remove_orphans(parent: &Path) {
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
pub(super) fn run_initrd(
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
pub(super) fn command_script(cwd: &Path, cmd: &[String], env: &[(String, String)]) -> String {
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

pub(super) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The workspace and cargo's target dir, when the guest's own mounts would
/// hide them; one a line.
pub(super) fn shadowed_dirs(cwd: &Path) -> String {
    let target = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
    [Some(cwd.to_path_buf()), target]
        .into_iter()
        .flatten()
        .filter(|p| GUEST_MOUNTS.iter().any(|m| p.starts_with(m)))
        .map(|p| format!("{}\n", p.display()))
        .collect()
}

pub(super) fn qemu_command(kernel: &Path, initrd: &Path) -> Command {
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
pub(super) fn boot(qemu: &mut Command, timeout: Duration) -> Result<(i32, String, Duration)> {
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
pub(super) fn stream_console(console: impl Read) -> (String, Option<i32>) {
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
