//! Direct server return (issue 24 item 2), end to end: two node namespaces on an underlay
//! bridge with an external client (`netns::Cluster`), the real agent on both with
//! `--lb-mode dsr` (or `hybrid`) and native XDP. The client reaches a NodePort on node 1;
//! a flow balanced to a pod on node 2 is forwarded there with the client's own source and
//! the NodePort in an IPv4 option (IPv6: a Destination Options header), and node 2 answers
//! the client directly from the NodePort: node 1's uplink never sees the replies.
//!
//! Node 1's uplink traffic is read from its `eth0` counters (`/sys/class/net/eth0/statistics`
//! in its namespace): with native XDP on a veth every received frame is counted there,
//! forwarded (XDP_TX) or not.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, TempDir, cli, node_counter, node_yaml, node_yaml_dual, slice_yaml_on_nodes},
    client::{self, Held},
    harness::{PinDir, require_root},
    netns::{CLIENT_IPS, CLIENT_IPS6, Cluster, Netns, node_ip, node_ip6, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
/// The transfers: 1 MiB each way, full-sized segments on a 1500-byte path.
const MIB: usize = 1 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    /// The IP header and what DSR adds to it: the 8-byte IPv4 option, the 24-byte IPv6
    /// Destination Options header.
    fn ip_hlen(self) -> usize {
        if self == Fam::V4 { 20 } else { 40 }
    }
    fn dsr_len(self) -> usize {
        if self == Fam::V4 { 8 } else { 24 }
    }
    /// A UDP payload filling a 1500-byte packet.
    fn full_udp(self) -> usize {
        1500 - self.ip_hlen() - 8
    }
    fn client_ip(self) -> IpAddr {
        if self == Fam::V4 { CLIENT_IPS[0].into() } else { CLIENT_IPS6[0].into() }
    }
    fn node_ip(self, i: usize) -> IpAddr {
        if self == Fam::V4 { node_ip(i).into() } else { node_ip6(i).into() }
    }
    fn any(self) -> &'static str {
        if self == Fam::V4 { "0.0.0.0:0" } else { "[::]:0" }
    }
}

/// One NodePort Service (TCP and UDP on 30080) of the family, with endpoints on both nodes.
fn objects(c: &Cluster, fam: Fam) -> (String, String) {
    let (vip, family) = if fam == Fam::V4 {
        ("10.96.0.20", String::new())
    } else {
        (
            "fd00:96::20",
            "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIPs: [\"fd00:96::20\"]\n".to_string(),
        )
    };
    let services = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: np\n  namespace: default\nspec:\n  type: NodePort\n  \
         clusterIP: \"{vip}\"\n{family}  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n    \
         nodePort: 30080\n  - name: udp\n    port: 80\n    targetPort: 8080\n    protocol: UDP\n    nodePort: 30080\n"
    );
    let ep = |pod: &str| {
        let p = c.pod(pod);
        let ip: IpAddr = if fam == Fam::V4 { p.ip.into() } else { p.ip6.expect("dual-stack pod").into() };
        (p.name.as_str(), ip, if pod.starts_with("n1") { "node1" } else { "node2" })
    };
    let all = [ep("n1p0"), ep("n1p1"), ep("n2p0"), ep("n2p1")];
    let slices =
        format!("---\n{}", slice_yaml_on_nodes("np", "np-1", &all, &[("main", 8080, "TCP"), ("udp", 8080, "UDP")]));
    (services, slices)
}

/// Field order is drop order: agents stop before their namespaces go.
struct Env {
    _agents: Vec<Agent>,
    cluster: Cluster,
    pins: Vec<PinDir>,
    _dirs: Vec<TempDir>,
    fam: Fam,
}

impl Env {
    fn start(lb_mode: &str, fam: Fam) -> Env {
        let mut cluster =
            if fam == Fam::V4 { Cluster::new(2, 2) } else { Cluster::dual_stack(2, 2) }.expect("cluster topology");
        cluster.start_servers(SERVER, 8080).expect("pod servers");
        let (services, slices) = objects(&cluster, fam);
        let (mut agents, mut pins, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
        for node in &cluster.nodes {
            let dir = TempDir::new("ebpf-proxy-dsr-").expect("dir");
            dir.write("services.yaml", &services).unwrap();
            dir.write("slices.yaml", &slices).unwrap();
            let node_yaml = match node.ip6 {
                Some(ip6) => node_yaml_dual(&node.name, node.ip, ip6),
                None => node_yaml(&node.name, node.ip),
            };
            dir.write("node.yaml", &node_yaml).unwrap();
            let pin = PinDir::new();
            let d = dir.0.to_str().unwrap().to_string();
            let args = [
                "--manifests",
                &d,
                "--node-name",
                &node.name,
                "--uplink",
                &node.uplink,
                "--xdp-mode",
                "native",
                "--lb-mode",
                lb_mode,
            ];
            agents.push(Agent::start(&node.ns, &pin.0, 10256, &args).expect("agent"));
            pins.push(pin);
            dirs.push(dir);
        }
        for (a, n) in agents.iter().zip(&cluster.nodes) {
            a.wait_ready(&n.ns, Duration::from_secs(90)).expect("agent ready");
        }
        let env = Env { _agents: agents, cluster, pins, _dirs: dirs, fam };
        let np = env.nodeport();
        env.client()
            .run(|| wait_for(Duration::from_secs(10), "the NodePort to answer", || client::tcp_name(np).ok()))
            .expect("NodePort reachable from the client");
        env
    }

    fn nodeport(&self) -> SocketAddr {
        (self.fam.node_ip(0), 30080).into()
    }

    fn client(&self) -> &Netns {
        &self.cluster.client
    }

    fn counter(&self, node: usize, verdict: &str) -> u64 {
        let stats = cli(&["stats", "--bpffs-root", self.pins[node].0.to_str().unwrap()]).expect("ebpf-proxy stats");
        node_counter(&stats, verdict)
    }

    /// Bytes node `i`'s uplink has received so far.
    fn uplink_rx_bytes(&self, i: usize) -> u64 {
        let node = &self.cluster.nodes[i];
        let path = format!("/sys/class/net/{}/statistics/rx_bytes", node.uplink);
        node.ns
            .run(|| std::fs::read_to_string(&path))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .parse()
            .expect("rx_bytes")
    }

    /// A connection from the client through node 1's NodePort that node 1 balanced to a pod
    /// on node 2 (random selection: a few tries).
    fn held_to_node2(&self) -> Held {
        let np = self.nodeport();
        self.client()
            .run(|| (0..60).find_map(|_| Held::open(np).ok().filter(|h| h.first.starts_with("n2"))))
            .expect("a connection balanced to node 2")
    }
}

/// TCP in `--lb-mode dsr`: the backend on node 2 sees the client's address, its answers
/// reach the client from node1:NodePort (the client's connected socket accepts nothing
/// else) without crossing node 1 (its uplink receives far less than the 1 MiB downloaded),
/// and 1 MiB uploads (full-sized segments: the option rides on the SYN only) complete.
/// UDP takes the same path, the option on every datagram.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn dsr_backend_on_node2_answers_the_client_directly() {
    require_root("dsr_backend_on_node2_answers_the_client_directly");
    backend_on_node2_answers_directly(Fam::V4);
}

/// The same over IPv6: the frontend rides in a Destination Options header, the path MTU
/// the client learns is 1500 less its 24 bytes (ICMPv6 Packet Too Big).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn dsr6_backend_on_node2_answers_the_client_directly() {
    require_root("dsr6_backend_on_node2_answers_the_client_directly");
    backend_on_node2_answers_directly(Fam::V6);
}

fn backend_on_node2_answers_directly(fam: Fam) {
    let _serial = serial();
    let env = Env::start("dsr", fam);
    let np = env.nodeport();
    let learnt = env.counter(1, "dsr");
    let mut held = env.held_to_node2();
    assert!(env.counter(1, "dsr") > learnt, "node 2 learnt no flow from a DSR option");
    env.client().run(|| {
        assert_eq!(held.peer().unwrap(), np);
        let (name, peer) = held.who().expect("who");
        assert_eq!((name.as_str(), peer), (held.first.as_str(), fam.client_ip()), "the backend sees the client");
    });

    let rx = env.uplink_rx_bytes(0);
    env.client().run(|| held.download(MIB)).expect("1 MiB download through DSR");
    let received = env.uplink_rx_bytes(0) - rx;
    assert!(
        received < (MIB / 4) as u64,
        "node 1's uplink received {received} bytes during a {MIB}-byte download: the replies came back through it"
    );
    for _ in 0..2 {
        let answer = env.client().run(|| held.upload(MIB)).expect("1 MiB upload through DSR");
        assert_eq!(answer, held.first, "the same backend answers the upload");
    }

    // UDP: answers from node1:30080, pods on both nodes.
    let before = env.counter(1, "dsr");
    let names: std::collections::BTreeSet<String> = env.client().run(|| client::udp_names_from(np, 40));
    assert_eq!(names, client::name_set(&["n1p0", "n1p1", "n2p0", "n2p1"]));
    assert!(env.counter(1, "dsr") > before, "UDP to node 2 did not go through DSR");

    // Path MTU: a full-sized datagram (1500 bytes of IP) to a node-2 pod does not fit the
    // uplink with the option: node 1 answers ICMP fragmentation needed (ICMPv6 Packet Too
    // Big) with 1500 less the option, the client's kernel learns it for the NodePort and
    // sends the next one in two fragments, which are answered.
    let too_big = env.counter(0, "dsr_too_big");
    let (name, answered) = env.client().run(|| {
        (0..60)
            .find_map(|_| {
                let s = UdpSocket::bind(fam.any()).ok()?;
                s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                let ask = |len: usize| -> Option<String> {
                    s.send_to(&vec![b'u'; len], np).ok()?;
                    let mut buf = [0u8; 256];
                    let (n, from) = s.recv_from(&mut buf).ok()?;
                    assert_eq!(from, np, "UDP reply source");
                    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
                };
                let name = (0..3).find_map(|_| ask(8))?;
                // A backend on node 2 (this socket's flow keeps it): then the big ones.
                name.starts_with("n2").then(|| (name, (0..5).find_map(|_| ask(fam.full_udp()))))
            })
            .expect("a UDP flow balanced to node 2")
    });
    assert!(env.counter(0, "dsr_too_big") > too_big, "node 1 answered no datagram with fragmentation needed");
    assert_eq!(answered.as_deref(), Some(name.as_str()), "the full-sized datagram was never answered");
    let route = env.client().ip(&["route", "get", &fam.node_ip(0).to_string()]).expect("ip route get");
    let mtu = format!("mtu {}", 1500 - fam.dsr_len());
    assert!(route.contains(&mtu), "the client learnt no path MTU of 1500 less the option ({mtu}): {route}");
}

/// `--lb-mode hybrid`: TCP goes direct (the backend sees the client), UDP is source-NATed
/// as with `snat` (node 2 learns nothing from it, and its answers still come from the
/// NodePort).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn hybrid_tcp_direct_udp_source_nated() {
    require_root("hybrid_tcp_direct_udp_source_nated");
    let _serial = serial();
    let env = Env::start("hybrid", Fam::V4);
    let np = env.nodeport();
    let mut held = env.held_to_node2();
    let (_, peer) = env.client().run(|| held.who()).expect("who");
    assert_eq!(peer, IpAddr::from(CLIENT_IPS[0]), "TCP in hybrid mode keeps the client address");
    let learnt = env.counter(1, "dsr");
    let names: std::collections::BTreeSet<String> = env.client().run(|| client::udp_names_from(np, 40));
    assert_eq!(names, client::name_set(&["n1p0", "n1p1", "n2p0", "n2p1"]));
    assert_eq!(env.counter(1, "dsr"), learnt, "UDP went through DSR in hybrid mode");
}
