//! Peak RSS of the real agent (`ebpf-proxy agent --manifests DIR`) holding N services x E
//! endpoints, run in a scratch node namespace with its own bpffs pin directory; VmHWM is
//! read from /proc/<pid>/status once /readyz answers 200.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proxy_tests::{
    agent::{Agent, TempDir},
    harness::PinDir,
    netns::Netns,
    scale::PinnedServices,
};

use crate::{Plan, check_interrupted, objects, percentile, report::Row, rules, vm_hwm_rss_kib};

/// How long one rename may take to show in the map before the run fails.
const RENAME_BOUND: Duration = Duration::from_secs(10);

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
    let renamed = rename_to_map(plan, n, &dir, &pins, rows);
    agent.kill();
    renamed?;
    structure_rows(n, e, rows)?;
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

/// `--manifests` updated the atomic way: a probe Service's file written under a name that
/// is not a manifest, then renamed into place; timed from just before the rename to its
/// new backend in the map, the probe's one endpoint alternating between two pods.
fn rename_to_map(plan: &Plan, n: usize, dir: &TempDir, pins: &PinDir, rows: &mut Vec<Row>) -> Result<()> {
    let reps = if plan.quick { 5 } else { 100 };
    let maps = PinnedServices::open(&pins.0)?;
    let pods = [std::net::Ipv4Addr::new(10, 250, 0, 1), std::net::Ipv4Addr::new(10, 250, 0, 2)];
    let (staged, target) = (dir.0.join("probe.yaml.tmp"), dir.0.join("probe.yaml"));
    let mut lat = Vec::with_capacity(reps);
    // Round 0 puts the probe in place (not timed).
    for i in 0..=reps {
        check_interrupted()?;
        let pod = pods[i % 2];
        // The VIP after the loaded services'.
        let probe = rules::Svc {
            name: "rename-probe".into(),
            vip: rules::vip(n),
            port: rules::SVC_PORT,
            endpoints: vec![(pod, rules::TARGET_PORT)],
        };
        std::fs::write(&staged, objects::manifest_text(std::slice::from_ref(&probe)))?;
        // Past the source's timestamp-tick recheck of the previous round.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        std::fs::rename(&staged, &target)?;
        while maps.backends(probe.vip, probe.port).as_deref() != Some(&[pod][..]) {
            ensure!(t.elapsed() < RENAME_BOUND, "rename {i}: {} not in the map after {RENAME_BOUND:?}", pod);
            std::thread::sleep(Duration::from_micros(200));
        }
        if i > 0 {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let note = format!(
        "{reps} atomic renames of a one-Service file into place -> its backend in the map (polled every 0.2 ms), {n} services loaded"
    );
    rows.push(Row::new("rss", "manifests_rename_to_map.p50_ms", Some(n), percentile(&lat, 50.0), "ms").note(note));
    rows.push(Row::new("rss", "manifests_rename_to_map.p99_ms", Some(n), percentile(&lat, 99.0), "ms"));
    Ok(())
}

/// The structures' estimated heap bytes (`proxy_userspace::memory`) of the same pipeline in
/// this process: objects parsed, translated, synced into an in-memory store (which stands
/// for the kernel's maps). Per Service at `e` endpoints, and per endpoint from the growth
/// between `e` and `2e`.
pub fn structure_bytes(n: usize, e: usize) -> Result<Vec<proxy_userspace::memory::Usage>> {
    use proxy_userspace::{
        model::{NodeInfo, Translator},
        sync::{Syncer, store::MemStore},
    };
    let objs = objects::objects(&rules::services(n, e, None))?;
    let mut translator =
        Translator::new(NodeInfo { name: objects::NODE_NAME.into(), nodeport_addrs: vec![], zone: None });
    let mut syncer = Syncer::new(MemStore::default())?;
    translator.replace_services(&objs.services);
    translator.replace_slices(&objs.slices);
    translator.commit(&syncer);
    let report = syncer.apply(translator.desired());
    ensure!(report.errors.is_empty(), "sync errors: {:?}", report.errors.first());
    // Neither source keeps the parsed objects once translated: they are not the agent's.
    drop(objs);
    let mut out = translator.memory_usage();
    out.extend(syncer.memory_usage());
    Ok(out)
}

fn structure_rows(n: usize, e: usize, rows: &mut Vec<Row>) -> Result<()> {
    let at_e = structure_bytes(n, e)?;
    let at_2e = structure_bytes(n, 2 * e)?;
    let (mut service_total, mut endpoint_total) = (0.0, 0.0);
    for (a, b) in at_e.iter().zip(&at_2e) {
        let per_service = a.bytes as f64 / n as f64;
        let per_endpoint = (b.bytes as f64 - a.bytes as f64) / (n * e) as f64;
        service_total += per_service;
        endpoint_total += per_endpoint;
        rows.push(
            Row::new("rss", &format!("bytes.{}.per_service", a.structure), Some(n), per_service, "B")
                .note(format!("estimated heap bytes per Service of {e} endpoints")),
        );
        rows.push(Row::new("rss", &format!("bytes.{}.per_endpoint", a.structure), Some(n), per_endpoint, "B"));
    }
    rows.push(Row::new("rss", "bytes.total.per_service", Some(n), service_total, "B").note(format!(
        "every structure, per Service of {e} endpoints (neither source keeps the objects once translated)"
    )));
    rows.push(Row::new("rss", "bytes.total.per_endpoint", Some(n), endpoint_total, "B"));
    Ok(())
}
