//! Project tasks: `cargo xtask setup | test | demo | bench | image`.
//!
//! `setup` installs, idempotently and from registries only, everything the build and the
//! tests need: the nightly's rust-src, bpf-linker linked against the nightly's own LLVM,
//! Debian packages the tests use, and a mounted bpffs.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod e2e_kind;
mod setup;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and packages the build and tests need (idempotent).
    Setup,
    /// Run setup, then every test of the workspace.
    Test {
        /// Extra arguments passed to `cargo test` after `--`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build, then run the agent in a throw-away netns sandbox (one node, three pods).
    Demo,
    /// Release build, then the benchmarks (needs root; under 10 minutes, --quick under 1).
    Bench {
        /// CI smoke mode: tiny sizes and short bounds, every row still produced.
        #[arg(long)]
        quick: bool,
        /// Run nothing: redraw the charts (docs/bench/*.svg) from a saved report, e.g.
        /// target/bench/latest-full.json or docs/bench/report.json. No root needed.
        #[arg(long, value_name = "FILE")]
        charts_from: Option<std::path::PathBuf>,
        /// Where --charts-from draws them (default: docs/bench).
        #[arg(long, value_name = "DIR", requires = "charts_from")]
        charts_dir: Option<std::path::PathBuf>,
        /// Extra arguments passed to proxy-bench (e.g. `--sections conn,control`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// End-to-end on a kind cluster without kube-proxy (skips without docker/kind/kubectl).
    E2eKind,
    /// Release build, then the agent's image `FROM scratch` with buildah (no registry needed).
    Image {
        /// Image name; default ghcr.io/ebpf-proxy/ebpf-proxy:<the chart's appVersion>.
        #[arg(long)]
        tag: Option<String>,
        /// Put this binary in the image instead of building the release one (e.g. a debug
        /// build, to try a change quickly).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    let t = Instant::now();
    let cargo = || Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Style and lints first: CI enforces them, and they fail in seconds where tests take minutes.
    run(cargo().current_dir(workspace_root()).args(["fmt", "--all", "--check"]))?;
    run(cargo().current_dir(workspace_root()).args([
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate builds only for the BPF target, with the nightly (as aya-build does).
    run(Command::new("rustup")
        .current_dir(workspace_root().join("proxy-ebpf"))
        .args(["run", "nightly", "cargo", "clippy", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        // This process runs under the stable toolchain's cargo: none of its settings may leak.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN"))?;
    // The tests run the agent binary (`target/debug/ebpf-proxy`), which `cargo test` does not
    // rebuild when it exists: build it now so no test runs a stale agent.
    run(cargo().current_dir(workspace_root()).args(["build", "-p", "proxy-userspace", "--bin", "ebpf-proxy"]))?;
    let mut cmd = cargo();
    // proxy-ebpf only builds for the BPF target (proxy-userspace's build script embeds it).
    cmd.current_dir(workspace_root()).args(["test", "--workspace", "--exclude", "proxy-ebpf"]);
    // Tests that need root are #[ignore]d with that reason, so a plain `cargo test` by a
    // user reports them as ignored instead of passing without having run; as root (CI) they
    // run here.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    cmd.arg("--");
    if root {
        cmd.arg("--include-ignored");
    } else {
        eprintln!("xtask test: not root: tests that need root are reported as ignored");
    }
    // The upgrade test needs an older agent binary; without one it is left out by name
    // (and reported as filtered out), not run to pass without testing anything.
    if std::env::var_os(OLD_BIN_VAR).is_none() {
        eprintln!("xtask test: {OLD_BIN_VAR} unset: leaving out {UPGRADE_TEST} (it upgrades from that binary)");
        cmd.args(["--skip", UPGRADE_TEST]);
    }
    cmd.args(args);
    run(&mut cmd)?;
    eprintln!("xtask test: all tests passed in {:.0?}", t.elapsed());
    Ok(())
}

/// `tests/tests/agent_maps.rs`'s upgrade test and the older agent it upgrades from.
const OLD_BIN_VAR: &str = "EBPF_PROXY_OLD_BIN";
const UPGRADE_TEST: &str = "upgrade_from_an_older_agent_keeps_held_connections";

fn demo() -> Result<()> {
    setup::setup()?;
    let root = workspace_root();
    run(Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(&root).args([
        "build",
        "-p",
        "proxy-userspace",
        "-p",
        "proxy-tests",
        "--bins",
    ]))?;
    run(Command::new(root.join("target/debug/proxy-demo")).arg(root.join("target/debug/ebpf-proxy")))
}

/// `cargo xtask image`: the release binary, then [`xtask::image::assemble`].
fn image(tag: Option<String>, binary: Option<PathBuf>) -> Result<()> {
    let root = workspace_root();
    let tag = match tag {
        Some(t) => t,
        None => xtask::image::default_tag(&root)?,
    };
    let t = Instant::now();
    let binary = match binary {
        Some(b) => b,
        None => {
            run(Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(&root).args([
                "build",
                "--release",
                "--locked",
                "-p",
                "proxy-userspace",
                "--bin",
                "ebpf-proxy",
            ]))?;
            root.join("target/release/ebpf-proxy")
        }
    };
    let built = t.elapsed();
    let t = Instant::now();
    xtask::image::assemble(&binary, &tag)?;
    // The size comes from podman; buildah alone builds the image just as well.
    let size = xtask::image::image_size(&tag).map(|b| format!("{:.1} MB", b as f64 / 1e6)).unwrap_or_default();
    eprintln!(
        "xtask image: {tag} ({size}) in {:.1?} (cargo build {built:.1?}, image {:.1?})",
        built + t.elapsed(),
        t.elapsed()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo(),
        Cmd::Bench { charts_from: Some(file), charts_dir, .. } => bench::charts(&file, charts_dir.as_deref()),
        Cmd::Bench { quick, args, .. } => bench::bench(quick, &args),
        Cmd::E2eKind => e2e_kind::main(),
        Cmd::Image { tag, binary } => image(tag, binary),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
