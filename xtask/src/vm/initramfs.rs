//! The initramfs a kernel boots with: busybox, the modules 9p and overlay
//! need (dependencies read from the modules themselves), and the init
//! script that mounts the host's root read-only under a tmpfs overlay.

use super::*;

// --------------------------------------------------------------- initramfs

/// The package's module directory: no `modules.dep` (Debian runs depmod at
/// install time), so dependencies come from each module's `.modinfo`.
pub(super) struct ModuleTree {
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
pub(super) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// busybox's insmod takes only plain ELF, so compressed modules are
/// decompressed here.
pub(super) fn read_module(path: &Path) -> Result<Vec<u8>> {
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

pub(super) fn modinfo_depends(ko: &[u8]) -> Vec<String> {
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

pub(super) fn build_initramfs(modules: &Path, out: &Path) -> Result<()> {
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

pub(super) fn reset_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("failed to clear {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))
}

pub(super) fn write_executable(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A newc archive of everything under `stage`, owned by root.
pub(super) fn cpio(stage: &Path, out: &Path) -> Result<()> {
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
pub(super) fn list_tree(root: &Path, rel: &Path, list: &mut String) -> Result<()> {
    for entry in fs::read_dir(root.join(rel))? {
        let path = rel.join(entry?.file_name());
        list.push_str(&format!("{}\n", path.display()));
        if root.join(&path).is_dir() {
            list_tree(root, &path, list)?;
        }
    }
    Ok(())
}
