//! `cargo xtask bench [--quick] [-- <proxy-bench arguments>]`: release build, then the
//! benchmarks of the `proxy-bench` crate (needs root): per-packet cost, connection rate
//! against kube-proxy's iptables and nftables layouts, control-plane timings, agent RSS and
//! throughput. Prints markdown tables; JSON goes to target/bench/, SVG charts to docs/bench/
//! (after a complete full run; target/bench/charts-<mode>/ otherwise). Method and numbers:
//! docs/benchmarks.md. `cargo xtask bench --charts-from FILE` only redraws the charts.
use std::{env, path::Path, process::Command};

use anyhow::Result;

use crate::{run, setup, workspace_root};

pub fn bench(quick: bool, args: &[String]) -> Result<()> {
    setup::setup()?;
    let root = workspace_root();
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Every binary the bench starts: the pod server (bench-podserver) and, for the rss
    // section, the real agent (ebpf-proxy), with the same profile.
    run(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "proxy-bench",
        "-p",
        "proxy-userspace",
        "--bins",
    ]))?;
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args(["run", "--release", "-p", "proxy-bench", "--bin", "proxy-bench", "--"])
        .env("EBPF_PROXY_BIN", root.join("target/release/ebpf-proxy"));
    if quick {
        cmd.arg("--quick");
    }
    cmd.args(args);
    run(&mut cmd)
}

/// Redraw the charts of a saved report (proxy-bench --charts-from): a debug build, which
/// `cargo xtask test` keeps warm, and no setup or root (nothing is measured).
pub fn charts(file: &Path, dir: Option<&Path>) -> Result<()> {
    let root = workspace_root();
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // proxy-bench runs from the workspace root: paths as the caller typed them.
    let cwd = env::current_dir()?;
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args(["run", "-q", "-p", "proxy-bench", "--bin", "proxy-bench", "--"]);
    cmd.arg("--charts-from").arg(cwd.join(file));
    if let Some(dir) = dir {
        cmd.arg("--charts-dir").arg(cwd.join(dir));
    }
    run(&mut cmd)
}
