//! Builds `tracer-ebpf` for the BPF target on the nightly toolchain and
//! leaves the object in `OUT_DIR/tracer`, embedded by `probe::EBPF_OBJECT`.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tracer crate has no parent directory")?
        .join("tracer-ebpf");
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
