//! QEMU from bookworm-backports (the apt source added from the existing
//! bookworm entry), and the host packages the initramfs is built with.

use super::*;

// ---------------------------------------------------------------- packages

pub(super) fn ensure_qemu() -> Result<()> {
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

pub(super) fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Whether the apt lists know `pkg` at exactly `version`.
pub(super) fn available(pkg: &str, version: &str) -> Result<bool> {
    Ok(madison(pkg)?.iter().any(|v| v == version))
}

/// Every version of `pkg` the apt lists know.
pub(super) fn madison(pkg: &str) -> Result<Vec<String>> {
    let out = output(Command::new("apt-cache").args(["madison", pkg]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split('|').nth(1))
        .map(|v| v.trim().to_string())
        .collect())
}

pub(super) static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Once per process: the lists only go stale between runs.
pub(super) fn apt_update() -> Result<()> {
    if APT_UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    status(Command::new("apt-get").args(["update", "-q"]))
}

/// Adds bookworm-backports with the URI and key of the system's own
/// bookworm entry, so no mirror is named here and a local mirror is kept.
pub(super) fn ensure_backports_source() -> Result<()> {
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
pub(super) fn backports_configured_elsewhere() -> bool {
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
pub(super) fn bookworm_source() -> Result<(String, Option<String>)> {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let one_line = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    deb822_bookworm(&deb822)
        .or_else(|| one_line_bookworm(&one_line))
        .context("no `bookworm` suite in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list to copy the mirror from")
}

pub(super) fn deb822_bookworm(text: &str) -> Option<(String, Option<String>)> {
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
pub(super) fn one_line_bookworm(text: &str) -> Option<(String, Option<String>)> {
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
