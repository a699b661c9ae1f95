//! Builds `tracer-ebpf` for the BPF target on the nightly toolchain and
//! leaves the object in `OUT_DIR/tracer`, embedded by `probe::EBPF_OBJECT`;
//! generates the pprof messages (`OUT_DIR/perftools.profiles.rs`, included
//! by `report::pprof`) from the vendored `proto/profile.proto`; records
//! what built it all for `leaktrace --version`.
use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// First line of a command's output, or `unknown`.
fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn provenance(root: &std::path::Path) {
    // The commit changes when HEAD or the branch it names moves.
    let git = root.join(".git");
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed={}", git.join(r).display());
        }
        println!(
            "cargo:rerun-if-changed={}",
            git.join("packed-refs").display()
        );
    }
    let dir = root.to_string_lossy();
    let commit = first_line("git", &["-C", &dir, "rev-parse", "--short=12", "HEAD"]);
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let nightly = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let field = |key: &str| {
        nightly
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or("unknown")
            .trim()
            .to_string()
    };
    println!("cargo:rustc-env=LEAKTRACE_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=LEAKTRACE_RUSTC={}",
        first_line(&rustc, &["-V"])
    );
    println!(
        "cargo:rustc-env=LEAKTRACE_EBPF_RUSTC={}",
        first_line("rustc", &["+nightly", "-V"])
    );
    println!(
        "cargo:rustc-env=LEAKTRACE_EBPF_LLVM={}",
        field("LLVM version:")
    );
    println!(
        "cargo:rustc-env=LEAKTRACE_BPF_LINKER={}",
        first_line("bpf-linker", &["--version"])
    );
}

/// The pprof schema as prost messages. protox parses it in Rust, so the
/// build needs no protoc on the machine.
fn pprof_messages(crate_dir: &Path) -> anyhow::Result<()> {
    let dir = crate_dir.join("proto");
    let schema = dir.join("profile.proto");
    println!("cargo:rerun-if-changed={}", schema.display());
    let descriptors = protox::compile(["profile.proto"], [&dir])
        .with_context(|| format!("failed to parse {}", schema.display()))?;
    prost_build::Config::new()
        .compile_fds(descriptors)
        .with_context(|| format!("failed to generate Rust from {}", schema.display()))
}

fn main() -> anyhow::Result<()> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tracer crate has no parent directory")?
        .to_path_buf();
    provenance(&workspace);
    pprof_messages(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    // The same object from any checkout and any CARGO_HOME: the nightly
    // cargo that aya-build runs trims the source paths it records
    // (workspace, registry, sysroot) to fixed ones. aya-build sets the
    // rustflags itself, so this goes through cargo's environment config.
    // SAFETY: a build script is single-threaded here.
    unsafe {
        std::env::set_var("CARGO_UNSTABLE_TRIM_PATHS", "true");
        std::env::set_var("CARGO_PROFILE_RELEASE_TRIM_PATHS", "all");
    }
    let root = workspace.join("tracer-ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "tracer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
