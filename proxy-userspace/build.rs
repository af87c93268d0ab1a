//! Builds the eBPF object (proxy-ebpf) with the nightly toolchain and bpf-linker, via
//! aya-build, and leaves it in OUT_DIR for `include_bytes_aligned!`. Set AYA_BUILD_SKIP=1
//! to skip (e.g. for `cargo check` on a machine without the eBPF toolchain).
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ebpf = here.join("../proxy-ebpf");
    let common = here.join("../proxy-common");
    // The map layouts are part of the object too.
    println!("cargo:rerun-if-changed={}", common.display());
    let ebpf_dir = ebpf.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "proxy-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
