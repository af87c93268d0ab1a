//! North-south service traffic across nodes, end to end: two node namespaces on an
//! underlay bridge with two pods each, an external client on the underlay, and the real
//! agent in every node (`--uplink eth0`), fed the same objects through `--manifests` plus
//! each node's own Node object. Most tests force `--xdp-mode native` (the underlay peers
//! run a no-op XDP program so native XDP_TX works on the veths); the ExternalIP/LB test
//! runs the default `auto`, which picks generic on a veth uplink.
//!
//! The tests share one topology layout (see `netns::Cluster`) and run one at a time: each
//! starts two agents and eight processes, which is plenty for a 2-core machine.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use proxy_tests::client::{name_set as set, tcp_names_from as names};
use proxy_tests::{
    agent::{Agent, TempDir, cli, http_get, node_counter, node_yaml, slice_yaml_on_nodes},
    client::{self, Held},
    harness::{PinDir, require_root},
    netns::{CLIENT_IPS, Cluster, node_ip, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every service the tests use, in one manifest.
fn services_yaml() -> String {
    let svc = |name: &str, spec: &str, status: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}{status}"
        )
    };
    let port = |node_port: Option<u16>| {
        let np = node_port.map(|p| format!("    nodePort: {p}\n")).unwrap_or_default();
        format!("  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n{np}")
    };
    let lb_status = |ip: &str| format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n");
    [
        // NodePort to pods on both nodes, TCP and UDP.
        svc(
            "np",
            "  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n    nodePort: 30080\n  - name: udp\n    port: 80\n    targetPort: 8080\n    protocol: UDP\n    nodePort: 30080\n",
            "",
        ),
        // externalTrafficPolicy: Local, endpoints on both nodes.
        svc(
            "local",
            &format!("  type: LoadBalancer\n  clusterIP: 10.96.0.21\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n{}", port(Some(30081))),
            &lb_status("203.0.113.31"),
        ),
        // externalTrafficPolicy: Local, endpoints on node 2 only.
        svc(
            "local-none",
            &format!("  type: LoadBalancer\n  clusterIP: 10.96.0.22\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n{}", port(Some(30082))),
            &lb_status("203.0.113.32"),
        ),
        svc("ext", &format!("  type: ClusterIP\n  clusterIP: 10.96.0.23\n  externalIPs: [\"{EXTERNAL_IP}\"]\n{}", port(None)), ""),
        svc(
            "lb",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 10.96.0.24\n  loadBalancerSourceRanges: [\"{}/32\"]\n{}",
                CLIENT_IPS[0],
                port(Some(30084))
            ),
            &lb_status(&LB_IP.to_string()),
        ),
        // East-west: backends on node 2 only.
        svc("east", &format!("  type: ClusterIP\n  clusterIP: 10.96.0.30\n{}", port(None)), ""),
        // Hairpin: n1p0 is its only backend.
        svc("self", &format!("  type: NodePort\n  clusterIP: 10.96.0.50\n{}", port(Some(30090))), ""),
    ]
    .concat()
}

fn slices_yaml(c: &Cluster) -> String {
    let ep = |pod: &str| {
        let p = c.pod(pod);
        let node = if pod.starts_with("n1") { "node1" } else { "node2" };
        (p.name.as_str(), p.ip, node)
    };
    let tcp = [("main", 8080, "TCP")];
    let all = [ep("n1p0"), ep("n1p1"), ep("n2p0"), ep("n2p1")];
    let node2 = [ep("n2p0"), ep("n2p1")];
    [
        slice_yaml_on_nodes("np", "np-1", &all, &[("main", 8080, "TCP"), ("udp", 8080, "UDP")]),
        slice_yaml_on_nodes("local", "local-1", &[ep("n1p0"), ep("n2p0"), ep("n2p1")], &tcp),
        slice_yaml_on_nodes("local-none", "local-none-1", &node2, &tcp),
        slice_yaml_on_nodes("ext", "ext-1", &all, &tcp),
        slice_yaml_on_nodes("lb", "lb-1", &all, &tcp),
        slice_yaml_on_nodes("east", "east-1", &node2, &tcp),
        slice_yaml_on_nodes("self", "self-1", &[ep("n1p0")], &tcp),
    ]
    .iter()
    .map(|s| format!("---\n{s}"))
    .collect()
}

/// Field order is drop order: agents stop before their namespaces go.
struct Env {
    agents: Vec<Agent>,
    cluster: Cluster,
    pins: Vec<PinDir>,
    dirs: Vec<TempDir>,
    /// Extra agent flags.
    extra: Vec<String>,
    /// Pass `--uplink eth0`; without it the agent detects its uplinks.
    uplink_flag: bool,
}

impl Env {
    fn start() -> Env {
        Self::start_with(&["--xdp-mode", "native"])
    }

    fn start_with(extra: &[&str]) -> Env {
        Self::start_flagged(extra, true)
    }

    fn start_flagged(extra: &[&str], uplink_flag: bool) -> Env {
        let mut cluster = Cluster::new(2, 2).expect("cluster topology");
        cluster.start_servers(SERVER, 8080).expect("pod servers");
        cluster.client_route("203.0.113.0/24", 0).expect("client route to the LB/external IPs");
        let (services, slices) = (services_yaml(), slices_yaml(&cluster));
        let mut env = Env {
            agents: Vec::new(),
            cluster,
            pins: Vec::new(),
            dirs: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            uplink_flag,
        };
        for i in 0..env.cluster.nodes.len() {
            let dir = TempDir::new("ebpf-proxy-ns-").expect("dir");
            dir.write("services.yaml", &services).unwrap();
            dir.write("slices.yaml", &slices).unwrap();
            let node = &env.cluster.nodes[i];
            dir.write("node.yaml", &node_yaml(&node.name, node.ip)).unwrap();
            env.pins.push(PinDir::new());
            env.dirs.push(dir);
            let agent = env.start_agent(i);
            env.agents.push(agent);
        }
        for (a, n) in env.agents.iter().zip(&env.cluster.nodes) {
            a.wait_ready(&n.ns, Duration::from_secs(20)).expect("agent ready");
        }
        env
    }

    fn start_agent(&self, i: usize) -> Agent {
        let node = &self.cluster.nodes[i];
        let dir = self.dirs[i].0.to_str().unwrap().to_string();
        let mut args = vec!["--manifests", &dir, "--node-name", &node.name];
        if self.uplink_flag {
            args.extend(["--uplink", node.uplink.as_str()]);
        }
        args.extend(self.extra.iter().map(String::as_str));
        Agent::start(&node.ns, &self.pins[i].0, 10256, &args).expect("agent")
    }

    fn client(&self) -> &proxy_tests::netns::Netns {
        &self.cluster.client
    }

    /// Wait until `addr` answers from the client (pod servers start asynchronously, and the
    /// very first SYN to a remote backend waits for the neighbour resolution XDP asked for).
    fn wait_answers(&self, addr: SocketAddr) {
        self.client()
            .run(|| wait_for(Duration::from_secs(10), &format!("{addr} to answer"), || client::tcp_name(addr).ok()))
            .expect("service reachable from the client");
    }

    fn stats(&self, i: usize) -> String {
        cli(&["stats", "--bpffs-root", self.pins[i].0.to_str().unwrap()]).expect("ebpf-proxy stats")
    }
}

/// Test 1: NodePort on node 1 reaches pods on both nodes. Local backends see the client's
/// address; remote ones see node 1's (SNAT). Every reply comes from node1:nodePort (the
/// client's connected socket accepts nothing else), and one connection stays on one
/// backend. UDP too. The uplink runs XDP in native mode, and a restarted agent keeps both
/// the XDP link and the established flows.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn nodeport_on_node1_reaches_pods_on_both_nodes() {
    require_root("nodeport_on_node1_reaches_pods_on_both_nodes");
    let _serial = serial();
    let mut env = Env::start();
    let np: SocketAddr = (node_ip(0), 30080).into();
    env.wait_answers(np);
    assert_eq!(names(env.client(), np, 40), set(&["n1p0", "n1p1", "n2p0", "n2p1"]));

    let mut held: Vec<Held> = env.client().run(|| {
        (0..12)
            .map(|_| {
                let mut h = Held::open(np).expect("connection");
                assert_eq!(h.peer().unwrap(), np);
                for _ in 0..5 {
                    assert_eq!(
                        h.ask().expect("same connection answers again"),
                        h.first,
                        "backend changed mid-connection"
                    );
                }
                let (name, peer) = h.who().expect("who");
                assert_eq!(name, h.first);
                let expect = if name.starts_with("n1") { CLIENT_IPS[0] } else { node_ip(0) };
                assert_eq!(peer, expect, "{name} sees the connection from {peer}");
                h
            })
            .collect()
    });
    let held_names: BTreeSet<String> = held.iter().map(|h| h.first.clone()).collect();
    assert!(held_names.iter().any(|n| n.starts_with("n2")), "no held connection to node 2: {held_names:?}");

    // UDP: answers from node1:30080, from pods on both nodes.
    let udp: BTreeSet<String> = env.client().run(|| client::udp_names_from(np, 40));
    assert_eq!(udp, set(&["n1p0", "n1p1", "n2p0", "n2p1"]));

    let stats = env.stats(0);
    let uplink_row = stats.lines().find(|l| l.starts_with("eth0")).unwrap_or_else(|| panic!("no uplink row:\n{stats}"));
    assert!(uplink_row.contains("native"), "XDP mode: {uplink_row}");
    assert!(node_counter(&stats, "reverse_nat") > 0 && node_counter(&stats, "new_flow") > 0, "{stats}");

    // kill -9 and restart node 1's agent: the pinned XDP link gets the new program
    // (BPF_LINK_UPDATE), and the open connections keep working throughout.
    env.agents[0].kill();
    for h in &mut held {
        let first = h.first.clone();
        assert_eq!(env.client().run(|| h.ask()).expect("held connection with the agent down"), first);
    }
    let agent = env.start_agent(0);
    agent.wait_ready(&env.cluster.nodes[0].ns, Duration::from_secs(20)).expect("restarted agent ready");
    env.agents[0] = agent;
    for h in &mut held {
        let first = h.first.clone();
        assert_eq!(env.client().run(|| h.ask()).expect("held connection after the restart"), first);
    }
    // 40 connections: with 20, one of 4 uniformly chosen pods is missed 1.3 % of the time.
    assert_eq!(names(env.client(), np, 40).len(), 4);
    assert!(env.stats(0).lines().any(|l| l.starts_with("eth0") && l.contains("native")));
}

/// Test 2: externalTrafficPolicy: Local: node 2 only sends to its own pods and preserves the
/// client address; a node without a local endpoint resets the connection at once and its
/// health-check node port answers 503 (200 where there are local endpoints).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn external_traffic_policy_local() {
    require_root("external_traffic_policy_local");
    let _serial = serial();
    let env = Env::start();
    let via2: SocketAddr = (node_ip(1), 30081).into();
    env.wait_answers(via2);
    assert_eq!(names(env.client(), via2, 30), set(&["n2p0", "n2p1"]), "only node 2's endpoints");
    let (_, peer) = env.client().run(|| Held::open(via2).and_then(|mut h| h.who())).expect("who");
    assert_eq!(peer, CLIENT_IPS[0], "client address preserved");
    let via1: SocketAddr = (node_ip(0), 30081).into();
    env.wait_answers(via1);
    assert_eq!(names(env.client(), via1, 10), set(&["n1p0"]), "node 1 uses its own endpoint only");

    // No local endpoint on node 1: the SYN is answered with a RST from XDP.
    let none: SocketAddr = (node_ip(0), 30082).into();
    let (elapsed, err) = env.client().run(|| {
        let t = Instant::now();
        let r = std::net::TcpStream::connect_timeout(&none, Duration::from_secs(3));
        (t.elapsed(), r.err())
    });
    let err = err.expect("connection without a local endpoint must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(elapsed < Duration::from_millis(500), "failed after {elapsed:?}, not fast");
    assert!(node_counter(&env.stats(0), "no_backend") > 0);

    let hc = |node: usize, port: u16| -> (u16, serde_json::Value) {
        let addr: SocketAddr = (node_ip(node), port).into();
        let (code, body) = env
            .client()
            .run(|| wait_for(Duration::from_secs(5), "health check", || http_get(addr, "/healthz").ok()))
            .expect("health check answers");
        (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{addr}: {e}: {body}")))
    };
    let (code, body) = hc(0, 32001);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["localEndpoints"], 0);
    assert_eq!(body["service"]["name"], "local-none");
    let (code, body) = hc(1, 32001);
    assert_eq!((code, &body["localEndpoints"]), (200, &serde_json::json!(2)), "{body}");
    assert_eq!(body["serviceProxyHealthy"], true);
    let (code, body) = hc(0, 32000);
    assert_eq!((code, &body["localEndpoints"]), (200, &serde_json::json!(1)), "{body}");
}

/// Test 3: ExternalIP and LoadBalancer IP (routed by the client via node 1) behave like the
/// NodePort; loadBalancerSourceRanges admit 192.168.100.100 and drop .101. With the
/// default `--xdp-mode auto`, which runs generic XDP on a veth uplink.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn external_and_load_balancer_ips_with_source_ranges() {
    require_root("external_and_load_balancer_ips_with_source_ranges");
    let _serial = serial();
    let env = Env::start_with(&[]);
    assert!(
        env.stats(0).lines().any(|l| l.starts_with("eth0") && l.contains("generic")),
        "auto mode on a veth uplink: {}",
        env.stats(0)
    );
    let all = set(&["n1p0", "n1p1", "n2p0", "n2p1"]);
    let ext: SocketAddr = (EXTERNAL_IP, 80).into();
    env.wait_answers(ext);
    assert_eq!(names(env.client(), ext, 40), all);

    let lb = SocketAddrV4::new(LB_IP, 80);
    let allowed: BTreeSet<String> = env.client().run(|| {
        (0..40)
            .map(|_| client::tcp_name_from(CLIENT_IPS[0], lb, Duration::from_secs(3)).expect("allowed source"))
            .collect()
    });
    assert_eq!(allowed, all);
    let (_, peer) = env
        .client()
        .run(|| {
            (0..40).find_map(|_| {
                let mut h = Held::open_from(CLIENT_IPS[0], lb, Duration::from_secs(3)).ok()?;
                h.first.starts_with("n2").then(|| h.who().ok()).flatten()
            })
        })
        .expect("a connection to node 2 through the LB IP");
    assert_eq!(peer, node_ip(0), "remote backend sees node 1's InternalIP, not the LB IP");

    let before = node_counter(&env.stats(0), "source_range_drop");
    let denied = env.client().run(|| client::tcp_name_from(CLIENT_IPS[1], lb, Duration::from_secs(1)));
    assert!(denied.is_err(), "source outside loadBalancerSourceRanges got through: {denied:?}");
    assert!(node_counter(&env.stats(0), "source_range_drop") > before);
}

/// Test 4: ClusterIP from a pod on node 1 to backends on node 2 (east-west across nodes, TC
/// path): no SNAT, the backend sees the pod's address.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn cluster_ip_from_node1_pod_to_node2_backends() {
    require_root("cluster_ip_from_node1_pod_to_node2_backends");
    let _serial = serial();
    let env = Env::start();
    let vip: SocketAddr = (Ipv4Addr::new(10, 96, 0, 30), 80).into();
    let pod = env.cluster.pod("n1p0");
    pod.ns
        .run(|| wait_for(Duration::from_secs(10), "ClusterIP to answer", || client::tcp_name(vip).ok()))
        .expect("ClusterIP reachable from the pod");
    assert_eq!(names(&pod.ns, vip, 30), set(&["n2p0", "n2p1"]));
    pod.ns.run(|| {
        let mut h = Held::open(vip).expect("connection");
        for _ in 0..5 {
            assert_eq!(h.ask().unwrap(), h.first);
        }
        let (_, peer) = h.who().unwrap();
        assert_eq!(peer, pod.ip, "east-west keeps the pod's address");
    });
}

/// Test 5: Hairpin: a pod reaching itself through its ClusterIP and through its node's
/// NodePort; it sees the connection from the hairpin address.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn hairpin_pod_reaches_itself() {
    require_root("hairpin_pod_reaches_itself");
    let _serial = serial();
    let env = Env::start();
    let pod = env.cluster.pod("n1p0");
    for addr in [SocketAddr::from((Ipv4Addr::new(10, 96, 0, 50), 80)), SocketAddr::from((node_ip(0), 30090))] {
        let name = pod
            .ns
            .run(|| wait_for(Duration::from_secs(10), "hairpin to answer", || client::tcp_name(addr).ok()))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(name, "n1p0");
        let (name, peer) = pod.ns.run(|| Held::open(addr).and_then(|mut h| h.who())).expect("who");
        assert_eq!((name.as_str(), peer), ("n1p0", HAIRPIN.into()), "via {addr}");
    }
}

/// NodePorts out of the box: an agent started without `--uplink` finds the device that
/// carries its Node's InternalIP (eth0 here) and serves NodePort traffic from outside on it,
/// to pods on both nodes, as kube-proxy serves NodePorts on every node address by default.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn nodeport_without_uplink_flag_on_the_detected_uplink() {
    require_root("nodeport_without_uplink_flag_on_the_detected_uplink");
    let _serial = serial();
    let env = Env::start_flagged(&[], false);
    let np: SocketAddr = (env.cluster.nodes[0].ip, 30080).into();
    env.wait_answers(np);
    assert_eq!(names(env.client(), np, 40), set(&["n1p0", "n1p1", "n2p0", "n2p1"]));
    let stats = env.stats(0);
    assert!(stats.lines().any(|l| l.starts_with("eth0")), "the XDP link on the detected uplink:\n{stats}");
}
