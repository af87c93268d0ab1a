//! Builds the eBPF object (proxy-ebpf) with the nightly toolchain and bpf-linker, via
//! aya-build, and leaves it in OUT_DIR for `include_bytes_aligned!`. Set AYA_BUILD_SKIP=1
//! to skip (e.g. for `cargo check` on a machine without the eBPF toolchain).
//!
//! Also embeds the git commit (`EBPF_PROXY_GIT_COMMIT`, "unknown" without git or outside a
//! checkout) and the build date (`EBPF_PROXY_BUILD_DATE`, UTC; SOURCE_DATE_EPOCH when set,
//! for reproducible builds) for `ebpf-proxy version`.
use std::{path::Path, process::Command};

fn main() -> anyhow::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ebpf = here.join("../proxy-ebpf");
    let common = here.join("../proxy-common");
    // The map layouts are part of the object too.
    println!("cargo:rerun-if-changed={}", common.display());
    embed_version(here);
    let ebpf_dir = ebpf.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "proxy-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

/// `git ARGS` in `dir`, its trimmed output when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The commit (for `ebpf-proxy version` and `ebpf_proxy_build_info`): `GIT_COMMIT` when set
/// (image builds without a .git directory), else `git rev-parse`, else "unknown".
fn embed_version(here: &Path) {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    let commit = std::env::var("GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(here, &["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // A new commit or checkout re-runs this script: HEAD, the branch it points at, and the
    // packed refs (paths from git, so worktrees work too).
    for args in [&["rev-parse", "--git-path", "HEAD"][..], &["rev-parse", "--git-path", "packed-refs"]] {
        if let Some(p) = git(here, args) {
            println!("cargo:rerun-if-changed={}", here.join(p).display());
        }
    }
    if let Some(branch) = git(here, &["symbolic-ref", "-q", "HEAD"])
        && let Some(p) = git(here, &["rev-parse", "--git-path", &branch])
    {
        println!("cargo:rerun-if-changed={}", here.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    });
    println!("cargo:rustc-env=EBPF_PROXY_GIT_COMMIT={commit}");
    let date = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    println!("cargo:rustc-env=EBPF_PROXY_BUILD_DATE={}", humantime::format_rfc3339_seconds(date));
}
