//! Peak RSS of the real agent (`ebpf-proxy agent --manifests DIR`) holding N services x E
//! endpoints, run in a scratch node namespace with its own bpffs pin directory; VmHWM is
//! read from /proc/<pid>/status once /readyz answers 200.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proxy_tests::{
    agent::{Agent, TempDir},
    harness::PinDir,
    netns::Netns,
};

use crate::{Plan, objects, report::Row, rules, vm_hwm_rss_kib};

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let n = plan.rss_n;
    let e = plan.cp_endpoints;
    let dir = TempDir::new("ebpf-proxy-bench-manifests-")?;
    objects::write_manifests(&dir.0, &rules::services(n, e, None))?;
    let node = Netns::new("epb-rss-")?;
    let pins = PinDir::new();
    let dir_s = dir.0.to_str().context("manifest dir")?.to_string();
    let t = Instant::now();
    let mut agent = Agent::start(
        &node,
        &pins.0,
        10256,
        &[
            "--manifests",
            &dir_s,
            "--node-name",
            objects::NODE_NAME,
            "--max-services",
            &(n.max(65_536)).to_string(),
            "--max-backends",
            &((n * e).max(262_144)).to_string(),
        ],
    )?;
    let pid = agent.child.id();
    if let Err(err) = agent.wait_ready(&node, Duration::from_secs(120)) {
        if let Ok(Some(status)) = agent.child.try_wait() {
            bail!("the agent exited ({status}) before it was ready: {err}");
        }
        return Err(err.context("agent not ready"));
    }
    let ready = t.elapsed();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(comm.trim() == "ebpf-proxy", "pid {pid} is {comm:?}, not the agent");
    let (hwm, rss) = vm_hwm_rss_kib(pid)?;
    let programmed = agent.metric(&node, "ebpf_proxy_services_programmed")?;
    ensure!(programmed as usize == n, "agent programmed {programmed} services, wanted {n}");
    let sync_s = agent.metric(&node, "kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(f64::NAN);
    let syncs = agent.metric(&node, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(f64::NAN);
    agent.kill();
    rows.push(Row::new("rss", "agent_vmhwm_mib", Some(n), hwm as f64 / 1024.0, "MiB").note(format!(
        "ebpf-proxy agent --manifests, {n} services x {e} endpoints; VmRSS at ready {:.1} MiB",
        rss as f64 / 1024.0
    )));
    rows.push(
        Row::new("rss", "agent_ready_s", Some(n), ready.as_secs_f64(), "s")
            .note("process start to /readyz 200: load programs, read YAML, translate, sync"),
    );
    rows.push(
        Row::new("rss", "agent_sync_ms", Some(n), sync_s * 1e3, "ms")
            .note(format!("sum of the agent's own sync_duration over {syncs} sync(s)")),
    );
    Ok(())
}
