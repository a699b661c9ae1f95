//! Debian's kernel packages: pinned versions, the newest of a line when a
//! pin is gone from the archive, and the uncompressed vmlinux extracted
//! once (booting the compressed image costs ~6 s under TCG).

use super::*;

// ----------------------------------------------------------------- kernels

/// A kernel ready to boot, from the cache.
pub(super) struct KernelImage {
    pub(super) release: String,
    /// The ELF vmlinux, or the bzImage when the kernel has no PVH entry.
    pub(super) kernel: PathBuf,
    pub(super) initramfs: PathBuf,
}

pub(super) fn vm_dir() -> PathBuf {
    workspace_root().join("target").join("vm")
}

pub(super) fn ensure_kernel(spec: &KernelSpec) -> Result<KernelImage> {
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
pub(super) fn read_ready(dir: &Path) -> Option<KernelImage> {
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
pub(super) fn resolve_version(spec: &KernelSpec) -> Result<(String, String)> {
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

pub(super) fn newest_in_line(spec: &KernelSpec) -> Result<(String, String)> {
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
pub(super) fn in_line(spec: &KernelSpec, name: &str) -> bool {
    name.strip_prefix(spec.name_prefix)
        .and_then(|r| r.strip_suffix(spec.name_suffix))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

pub(super) fn version_newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

/// Download, extract, uncompress the kernel, build the initramfs, into
/// the new directory `dir`.
pub(super) fn prepare_kernel(package: &str, version: &str, dir: &Path) -> Result<()> {
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

pub(super) fn download(package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
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
pub(super) fn find_vmlinuz(root: &Path) -> Result<(String, PathBuf)> {
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
pub(super) fn uncompressed_kernel(vmlinuz: &Path, dir: &Path) -> Result<PathBuf> {
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
pub(super) fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
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
pub(super) fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
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
pub(super) fn decompressor(payload: &[u8]) -> Option<(&'static str, &[u8])> {
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
pub(super) fn has_pvh_entry(elf: &[u8]) -> bool {
    const PHYS32_ENTRY: u32 = 18;
    elf_section(elf, ".notes").is_some_and(|notes| {
        elf_notes(notes).any(|(name, kind)| name == b"Xen\0" && kind == PHYS32_ENTRY)
    })
}

/// (name with its NUL, type) of each note.
pub(super) fn elf_notes(mut notes: &[u8]) -> impl Iterator<Item = (&[u8], u32)> {
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
pub(super) fn elf_section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
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

pub(super) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(super) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(super) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
