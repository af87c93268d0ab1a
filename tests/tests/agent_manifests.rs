//! The real agent in a node namespace, fed by `--manifests DIR`: traffic, scaling, deletion,
//! what the CLI prints, and a kill -9 restart under load.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, TempDir, cli, converge, service_yaml, slice_yaml, under_load},
    client,
    harness::{PinDir, require_root},
    netns::{Topology, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

struct Env {
    topo: Topology,
    dir: TempDir,
    pins: PinDir,
}

fn setup(subnet: u8) -> Env {
    let mut topo = Topology::single_node(4, subnet).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    Env { topo, dir: TempDir::new("ebpf-proxy-manifests-").expect("dir"), pins: PinDir::new() }
}

impl Env {
    fn endpoints(&self, pods: &[usize]) -> Vec<(&str, Ipv4Addr)> {
        pods.iter().map(|i| (self.topo.pods[*i].name.as_str(), self.topo.pods[*i].ip)).collect()
    }

    fn write_slice(&self, pods: &[usize]) {
        self.dir.write("web-slice.yaml", &slice_yaml("web", "web-abc", &self.endpoints(pods), 8080, "TCP")).unwrap();
    }

    fn start_agent(&self, port: u16) -> Agent {
        let dir = self.dir.0.to_str().unwrap().to_string();
        let a = Agent::start(&self.topo.node, &self.pins.0, port, &["--manifests", &dir, "--node-name", "node-a"])
            .expect("agent");
        a.wait_ready(&self.topo.node, Duration::from_secs(20)).expect("agent ready");
        a
    }

    fn converge(&self, want: &[&str]) -> Duration {
        converge(&self.topo.pods[0].ns, (VIP, 80).into(), want)
    }
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn manifests_scale_delete_and_cli() {
    require_root("manifests_scale_delete_and_cli");
    let env = setup(10);
    env.dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.write_slice(&[1, 2]);
    let agent = env.start_agent(10256);
    env.converge(&["pod1", "pod2"]);

    // Scale up and down: reflected within 1 s of the file change.
    env.write_slice(&[1, 2, 3]);
    let up = env.converge(&["pod1", "pod2", "pod3"]);
    env.write_slice(&[1]);
    let down = env.converge(&["pod1"]);
    eprintln!("scale up reflected in {up:?}, scale down in {down:?}");
    assert!(up < Duration::from_secs(1) && down < Duration::from_secs(1), "up {up:?} down {down:?}");

    // The CLI shows exactly what is programmed.
    let root = env.pins.0.to_str().unwrap();
    let json = cli(&["services", "--bpffs-root", root, "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{json}");
    let r = &rows[0];
    assert_eq!(r["address"], "10.96.0.10");
    assert_eq!(r["port"], 80);
    assert_eq!(r["protocol"], "TCP");
    assert_eq!(r["namespace"], "default");
    assert_eq!(r["name"], "web");
    assert_eq!(r["port_name"], "main");
    assert_eq!(r["type"], "ClusterIP");
    let backends: Vec<String> = r["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("{}:{}", b["address"].as_str().unwrap(), b["port"]))
        .collect();
    assert_eq!(backends, vec![format!("{}:8080", env.topo.pods[1].ip)]);
    let table = cli(&["services", "--bpffs-root", root]).unwrap();
    assert!(table.contains("default/web:main") && table.contains("10.96.0.10:80/TCP"), "{table}");
    let stats = cli(&["stats", "--bpffs-root", root]).unwrap();
    assert!(stats.contains("new_flow"), "{stats}");

    // Delete the Service: new connections stop.
    env.dir.remove("web.yaml").unwrap();
    let vip: SocketAddr = (VIP, 80).into();
    env.topo.pods[0]
        .ns
        .run(|| wait_for(Duration::from_secs(1), "service removal", || client::tcp_name(vip).is_err().then_some(())))
        .expect("service deleted within 1 s");
    let json = cli(&["services", "--bpffs-root", root, "-o", "json"]).unwrap();
    assert_eq!(json.trim(), "[]");
    drop(agent);
}

/// A malformed object is skipped with a warning; the other service keeps working.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn malformed_service_does_not_disturb_others() {
    require_root("malformed_service_does_not_disturb_others");
    let env = setup(11);
    env.dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.write_slice(&[1, 2]);
    env.dir.write("bad.yaml", &service_yaml("bad", "10.96.0.300", 80, 8080, "TCP")).unwrap();
    env.dir.write("garbage.yaml", "kind: Service\nspec: [\n").unwrap();
    let agent = env.start_agent(10257);
    env.converge(&["pod1", "pod2"]);
    assert!(agent.metric(&env.topo.node, "ebpf_proxy_object_warnings").unwrap() >= 1.0);
}

/// kill -9 the agent while a client loop connects through the ClusterIP: no connection
/// fails, and the restarted agent writes nothing for the unchanged service.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn restart_under_load_drops_nothing_and_writes_nothing() {
    require_root("restart_under_load_drops_nothing_and_writes_nothing");
    let env = setup(12);
    env.dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.write_slice(&[1, 2, 3]);
    let mut agent = env.start_agent(10258);
    env.converge(&["pod1", "pod2", "pod3"]);

    let (ok, failed) = under_load(&env.topo.pods[0].ns, (VIP, 80).into(), || {
        agent.kill();
        std::thread::sleep(Duration::from_millis(300));
        agent = env.start_agent(10258);
    });
    eprintln!("connections during restart: {ok} ok, {failed} failed");
    assert!(ok > 50, "the loop ran: {ok}");
    assert_eq!(failed, 0);
    let writes = agent.metric(&env.topo.node, "ebpf_proxy_map_writes_total").unwrap();
    assert_eq!(writes, 0.0, "restarted agent rewrote unchanged state");
    // And it still follows changes.
    env.write_slice(&[2]);
    env.converge(&["pod2"]);
}

/// Pods created after the agent started get the programs attached (a new client pod can use
/// the ClusterIP at once); pods deleted lose their pinned links.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn interfaces_attach_as_pods_come_and_go() {
    require_root("interfaces_attach_as_pods_come_and_go");
    let mut env = setup(13);
    env.dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.write_slice(&[1, 2, 3]);
    let _agent = env.start_agent(10260);
    let links = env.pins.0.join("links");
    let count = || std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0);
    assert_eq!(count(), 8, "two links per pod interface");

    env.topo.add_pod("late", Ipv4Addr::new(10, 244, 13, 50)).unwrap();
    let late = env.topo.pods.len() - 1;
    wait_for(Duration::from_secs(5), "links for the new pod", || (count() == 10).then_some(())).unwrap();
    let vip: SocketAddr = (VIP, 80).into();
    let name = env.topo.pods[late]
        .ns
        .run(|| wait_for(Duration::from_secs(5), "service from the new pod", || client::tcp_name(vip).ok()))
        .unwrap();
    assert!(name.starts_with("pod"), "{name}");

    let gone = env.topo.pods.remove(late);
    drop(gone);
    wait_for(Duration::from_secs(5), "links of the deleted pod removed", || (count() == 8).then_some(())).unwrap();
}

// --- `--manifests` robustness (issue 9, item 7) ----------------------------------------

/// Syncs done so far (the sync-duration histogram's count).
fn syncs(env: &Env, agent: &Agent) -> f64 {
    agent.metric(&env.topo.node, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap()
}

/// Reading the manifests (`cat`) is not a change: an idle agent makes no sync at all.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn idle_agent_makes_no_sync_after_a_read() {
    require_root("idle_agent_makes_no_sync_after_a_read");
    let env = setup(40);
    env.dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.write_slice(&[1, 2]);
    let agent = env.start_agent(10340);
    env.converge(&["pod1", "pod2"]);
    std::thread::sleep(Duration::from_millis(300));
    let before = syncs(&env, &agent);
    for name in ["web.yaml", "web-slice.yaml"] {
        let st =
            std::process::Command::new("cat").arg(env.dir.0.join(name)).stdout(std::process::Stdio::null()).status();
        assert!(st.unwrap().success());
    }
    std::thread::sleep(Duration::from_secs(5));
    let after = syncs(&env, &agent);
    eprintln!("syncs in the 5 s after a cat: {}", after - before);
    assert_eq!(after, before, "an idle agent synced {} times after a read", after - before);
    // A real change still syncs, quickly.
    env.write_slice(&[3]);
    let t = env.converge(&["pod3"]);
    eprintln!("change reflected in {t:?}");
    assert!(syncs(&env, &agent) > after);
}

/// The directory replaced by `mv` and by rm + mkdir: the agent follows the name.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn replaced_directory_is_followed() {
    require_root("replaced_directory_is_followed");
    let env = setup(41);
    let dir = env.dir.0.join("manifests");
    let write = |dir: &std::path::Path, pods: &[usize]| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("web.yaml"), service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
        std::fs::write(dir.join("web-slice.yaml"), slice_yaml("web", "web-abc", &env.endpoints(pods), 8080, "TCP"))
            .unwrap();
    };
    write(&dir, &[1]);
    let agent = Agent::start(
        &env.topo.node,
        &env.pins.0,
        10341,
        &["--manifests", dir.to_str().unwrap(), "--node-name", "node-a"],
    )
    .expect("agent");
    agent.wait_ready(&env.topo.node, Duration::from_secs(20)).expect("agent ready");
    env.converge(&["pod1"]);

    // mv: the new directory is prepared aside and moved into place.
    let staged = env.dir.0.join("manifests.new");
    write(&staged, &[2]);
    std::fs::rename(&dir, env.dir.0.join("manifests.old")).unwrap();
    std::fs::rename(&staged, &dir).unwrap();
    let t = env.converge(&["pod2"]);
    eprintln!("directory replaced by mv: followed in {t:?}");

    // rm + mkdir.
    std::fs::remove_dir_all(&dir).unwrap();
    write(&dir, &[3]);
    let t = env.converge(&["pod3"]);
    eprintln!("directory replaced by rm + mkdir: followed in {t:?}");

    // And the new directory is watched: a later edit is seen.
    std::fs::write(dir.join("web-slice.yaml"), slice_yaml("web", "web-abc", &env.endpoints(&[1, 3]), 8080, "TCP"))
        .unwrap();
    env.converge(&["pod1", "pod3"]);
}

/// Rewrite `name` in place (same inode): what `>`, `cp` or many editors do.
fn write_in_place(dir: &std::path::Path, name: &str, content: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).create(true).open(dir.join(name)).expect("open");
    f.write_all(content).expect("write");
}

/// A Service file read while half-written never removes the Service: connections keep
/// working throughout.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn half_written_service_file_never_removes_the_service() {
    require_root("half_written_service_file_never_removes_the_service");
    let env = setup(42);
    let full = service_yaml("web", "10.96.0.10", 80, 8080, "TCP");
    env.dir.write("web.yaml", &full).unwrap();
    env.write_slice(&[1, 2]);
    let agent = env.start_agent(10342);
    env.converge(&["pod1", "pod2"]);
    let cut = full.find("clusterIPs: [").unwrap() + "clusterIPs: [10.9".len();

    let (ok, failed) = under_load(&env.topo.pods[0].ns, (VIP, 80).into(), || {
        // A writer stopped half-way (the file does not parse), then finished.
        write_in_place(&env.dir.0, "web.yaml", &full.as_bytes()[..cut]);
        std::thread::sleep(Duration::from_millis(1500));
        write_in_place(&env.dir.0, "web.yaml", full.as_bytes());
        std::thread::sleep(Duration::from_millis(500));
        // Truncated, then written in slow pieces (every prefix is a smaller valid YAML).
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(env.dir.0.join("web.yaml")).unwrap();
        for chunk in full.as_bytes().chunks(full.len() / 3 + 1) {
            std::thread::sleep(Duration::from_millis(100));
            std::io::Write::write_all(&mut f, chunk).unwrap();
        }
        drop(f);
        std::thread::sleep(Duration::from_millis(500));
    });
    eprintln!("connections during half-written rewrites: {ok} ok, {failed} failed");
    assert!(ok > 50, "the loop ran: {ok}");
    assert_eq!(failed, 0, "a half-written file removed the Service");
    assert!(agent.metric(&env.topo.node, "ebpf_proxy_services_programmed").unwrap() >= 1.0);
    // Still following: a real change applies.
    env.write_slice(&[3]);
    env.converge(&["pod3"]);
}

/// A FIFO (or a socket) in the directory never blocks the agent: it starts, serves its
/// HTTP endpoints and keeps following changes.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn fifo_in_the_directory_does_not_block_the_agent() {
    require_root("fifo_in_the_directory_does_not_block_the_agent");
    let env = setup(43);
    env.dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.write_slice(&[1, 2]);
    let mkfifo = |name: &str| {
        let st = std::process::Command::new("mkfifo").arg(env.dir.0.join(name)).status().unwrap();
        assert!(st.success());
    };
    mkfifo("pipe.yaml");
    let agent = env.start_agent(10343);
    env.converge(&["pod1", "pod2"]);
    // One added while running, too.
    mkfifo("later.yaml");
    env.write_slice(&[3]);
    env.converge(&["pod3"]);
    for (addr, path) in [(agent.http, "/healthz"), (agent.http, "/readyz"), (agent.metrics, "/metrics")] {
        let (code, _) = env.topo.node.run(|| proxy_tests::agent::http_get(addr, path)).unwrap();
        assert_eq!(code, 200, "{path}");
    }
    assert!(agent.metric(&env.topo.node, "ebpf_proxy_services_programmed").unwrap() >= 1.0);
}

/// `services_programmed` counts the frontends written to the map, not the ones wanted; the
/// frontend that does not fit is logged once, not on every sync.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn services_programmed_counts_what_the_map_holds() {
    require_root("services_programmed_counts_what_the_map_holds");
    let env = setup(44);
    for i in 0..3 {
        let vip = format!("10.96.0.{}", 10 + i);
        env.dir.write(&format!("s{i}.yaml"), &service_yaml(&format!("s{i}"), &vip, 80, 8080, "TCP")).unwrap();
        env.dir
            .write(
                &format!("s{i}-slice.yaml"),
                &slice_yaml(&format!("s{i}"), &format!("s{i}-abc"), &env.endpoints(&[1]), 8080, "TCP"),
            )
            .unwrap();
    }
    // Started by hand (same arguments as `Agent::start`) to keep its log.
    let logs = TempDir::new("ebpf-proxy-agent-log-").expect("log dir");
    let log_path = logs.0.join("agent.log");
    let http: SocketAddr = ([127, 0, 0, 1], 10344).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], proxy_tests::agent::metrics_port(10344)).into();
    let child = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", env.topo.node.name))
        .arg(proxy_tests::agent::ebpf_proxy_bin().unwrap())
        .env(proxy_tests::agent::SOCKET_LB_ENV, "off")
        .args(["agent", "--bpffs-root", env.pins.0.to_str().unwrap(), "--http-addr", &http.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--sync-delay-ms", "10", "--manifests", env.dir.0.to_str().unwrap(), "--node-name", "node-a"])
        .args(["--max-services", "2"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("agent");
    let agent = Agent { child, http, metrics };
    agent.wait_ready(&env.topo.node, Duration::from_secs(20)).expect("agent ready");
    let root = env.pins.0.to_str().unwrap();
    let json = cli(&["services", "--bpffs-root", root, "-o", "json"]).unwrap();
    let in_map = serde_json::from_str::<serde_json::Value>(&json).unwrap().as_array().unwrap().len();
    assert_eq!(in_map, 2, "{json}");
    let programmed = agent.metric(&env.topo.node, "ebpf_proxy_services_programmed").unwrap();
    assert_eq!(programmed, 2.0, "the metric says {programmed}, the map holds {in_map}");

    // More syncs with the same failure: still one error line.
    let syncs = |a: &Agent| a.metric(&env.topo.node, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap();
    for pods in [[1, 2], [2, 3], [1, 3]] {
        let before = syncs(&agent);
        env.dir.write("s0-slice.yaml", &slice_yaml("s0", "s0-abc", &env.endpoints(&pods), 8080, "TCP")).unwrap();
        wait_for(Duration::from_secs(5), "a sync", || (syncs(&agent) > before).then_some(())).unwrap();
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines = log.lines().filter(|l| l.contains("frontend not programmed")).count();
    assert_eq!(lines, 1, "{log}");
}

/// A Service added later that claims a live VIP:port (and sorts first) does not take it
/// over: the Service already programmed keeps it; the newcomer gets the warning.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn newcomer_does_not_take_over_a_live_vip() {
    require_root("newcomer_does_not_take_over_a_live_vip");
    let env = setup(45);
    env.dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.write_slice(&[1, 2]);
    let agent = env.start_agent(10345);
    env.converge(&["pod1", "pod2"]);
    env.dir.write("aaa.yaml", &service_yaml("aaa", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    env.dir.write("aaa-slice.yaml", &slice_yaml("aaa", "aaa-abc", &env.endpoints(&[3]), 8080, "TCP")).unwrap();
    // Give the agent time to apply both files, then check nothing moved.
    std::thread::sleep(Duration::from_millis(500));
    let seen = proxy_tests::agent::names(&env.topo.pods[0].ns, (VIP, 80).into(), 20);
    let want: std::collections::BTreeSet<String> = ["pod1", "pod2"].iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, want, "the newcomer took the VIP");
    assert!(agent.metric(&env.topo.node, "ebpf_proxy_object_warnings").unwrap() >= 1.0);
    // Once the holder is deleted, the newcomer gets it.
    env.dir.remove("web.yaml").unwrap();
    env.converge(&["pod3"]);
}
