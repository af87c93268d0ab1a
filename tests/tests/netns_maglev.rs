//! Why Maglev exists, end to end (issue 24 item 1): an outside client's flows to a
//! LoadBalancer IP enter the cluster through node 1, then the router in front of the cluster
//! (the client's route to the LB prefix) moves them to node 2 mid-flow, as an ECMP change or
//! a drained node does. With `--lb-algorithm maglev` node 2 sends every flow to the backend
//! node 1 chose, so the flows keep talking to the same server; with random selection
//! (today's default) node 2 picks afresh and most flows land on another server.
//!
//! The flows are connected UDP sockets (a QUIC-like client: the server keeps the session,
//! the transport survives the path change). A TCP connection moved between nodes also needs
//! the backend to see the same source, which SNAT to each node's own address does not give:
//! that is direct server return (issue 24 item 2), not Maglev's part.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, TempDir, node_yaml, slice_yaml_on_nodes},
    harness::{PinDir, require_root},
    netns::{CLIENT_IPS, Cluster, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 40);
/// Client flows (source ports): with 4 backends, random selection keeps all of them on their
/// backend with probability (1/4)^12.
const FLOWS: [u16; 12] =
    [40_001, 40_002, 40_003, 40_004, 40_005, 40_006, 40_007, 40_008, 40_009, 40_010, 40_011, 40_012];

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn manifests(c: &Cluster) -> String {
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: game\n  namespace: default\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  ports:\n  - name: udp\n    port: 80\n    targetPort: 8080\n    protocol: UDP\n    nodePort: 30400\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: {LB_IP}\n"
    );
    let ep = |pod: &str| {
        let p = c.pod(pod);
        let node = if pod.starts_with("n1") { "node1" } else { "node2" };
        (p.name.as_str(), p.ip, node)
    };
    let slice = slice_yaml_on_nodes(
        "game",
        "game-1",
        &[ep("n1p0"), ep("n1p1"), ep("n2p0"), ep("n2p1")],
        &[("udp", 8080, "UDP")],
    );
    format!("---\n{svc}---\n{slice}")
}

/// Field order is drop order: agents stop before their namespaces go.
struct Env {
    _agents: Vec<Agent>,
    cluster: Cluster,
    _pins: Vec<PinDir>,
    _dirs: Vec<TempDir>,
}

fn start(extra: &[&str]) -> Env {
    let mut cluster = Cluster::new(2, 2).expect("cluster topology");
    cluster.start_servers(SERVER, 8080).expect("pod servers");
    cluster.client_route("203.0.113.0/24", 0).expect("client route via node 1");
    let objects = manifests(&cluster);
    let (mut agents, mut pins, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
    for node in &cluster.nodes {
        let dir = TempDir::new("ebpf-proxy-maglev-").expect("dir");
        dir.write("objects.yaml", &objects).unwrap();
        dir.write("node.yaml", &node_yaml(&node.name, node.ip)).unwrap();
        let pin = PinDir::new();
        let manifests = dir.0.to_str().unwrap().to_string();
        let mut args = vec!["--manifests", &manifests, "--node-name", &node.name, "--uplink", node.uplink.as_str()];
        args.extend_from_slice(extra);
        agents.push(Agent::start(&node.ns, &pin.0, 10256, &args).expect("agent"));
        pins.push(pin);
        dirs.push(dir);
    }
    for (a, n) in agents.iter().zip(&cluster.nodes) {
        a.wait_ready(&n.ns, Duration::from_secs(20)).expect("agent ready");
    }
    Env { _agents: agents, cluster, _pins: pins, _dirs: dirs }
}

/// One connected UDP socket per flow: the server that answers it now.
fn ask(sock: &UdpSocket) -> std::io::Result<String> {
    sock.send(b"who")?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The flows' servers before and after the route moves from node 1 to node 2.
fn servers_across_the_move(extra: &[&str]) -> (BTreeMap<u16, String>, BTreeMap<u16, String>) {
    let env = start(extra);
    let lb: SocketAddr = (LB_IP, 80).into();
    env.cluster.client.run(|| {
        let socks: Vec<(u16, UdpSocket)> = FLOWS
            .iter()
            .map(|&port| {
                let s = UdpSocket::bind((CLIENT_IPS[0], port)).expect("bind the flow's source");
                s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                s.connect(lb).expect("connect");
                (port, s)
            })
            .collect();
        // The pod servers start asynchronously, and the first datagram to a remote backend
        // waits for the neighbour resolution XDP asked for: retry until each flow answers.
        let answers = |what: &str| -> BTreeMap<u16, String> {
            socks
                .iter()
                .map(|(port, s)| {
                    let name = wait_for(Duration::from_secs(10), &format!("flow {port} {what}"), || ask(s).ok())
                        .expect("the flow answers");
                    (*port, name)
                })
                .collect()
        };
        let before = answers("through node 1");
        // Established flows keep their backend on their node.
        assert_eq!(answers("through node 1 again"), before, "a flow changed backend without a move");
        env.cluster.client_route("203.0.113.0/24", 1).expect("client route via node 2");
        let after = answers("through node 2");
        (before, after)
    })
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn flows_moved_to_another_node_keep_their_backend_with_maglev() {
    require_root("flows_moved_to_another_node_keep_their_backend_with_maglev");
    let _serial = serial();
    let (before, after) = servers_across_the_move(&["--xdp-mode", "native", "--lb-algorithm", "maglev"]);
    let servers: std::collections::BTreeSet<&String> = before.values().collect();
    assert!(servers.len() > 1, "the flows spread over several backends: {before:?}");
    assert_eq!(after, before, "with Maglev, node 2 chose what node 1 chose");
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn flows_moved_to_another_node_change_backend_without_maglev() {
    require_root("flows_moved_to_another_node_change_backend_without_maglev");
    let _serial = serial();
    let (before, after) = servers_across_the_move(&["--xdp-mode", "native"]);
    let moved = before.iter().filter(|(port, name)| after[*port] != **name).count();
    assert!(moved > 0, "random selection kept every flow on its backend: {before:?}");
}
