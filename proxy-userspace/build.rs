//! Builds the eBPF object (proxy-ebpf) with the nightly toolchain and bpf-linker, via
//! aya-build, and leaves it in OUT_DIR for `include_bytes_aligned!`. Set AYA_BUILD_SKIP=1
//! to skip (e.g. for `cargo check` on a machine without the eBPF toolchain).
use std::path::Path;

/// The commit the agent was built from, for `ebpf_proxy_build_info`: `GIT_COMMIT` when
/// set (image builds without a .git directory), else `git rev-parse`, else "unknown".
fn git_commit(here: &Path) -> String {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    if let Some(c) = std::env::var("GIT_COMMIT").ok().filter(|c| !c.is_empty()) {
        return c;
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(here)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    // A new commit or checkout moves HEAD's reflog: rebuild then.
    for f in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&["rev-parse", "--git-path", f]) {
            println!("cargo:rerun-if-changed={}", here.join(p).display());
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

fn main() -> anyhow::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    println!("cargo:rustc-env=EBPF_PROXY_GIT_COMMIT={}", git_commit(here));
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
