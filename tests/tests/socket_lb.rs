//! Socket-level load balancing (issue 11): the real agent attaches its cgroup sock_addr
//! programs to a child cgroup made for the test (never the machine's own root), and client
//! processes moved into that cgroup reach Services from the node namespace and from pods.
//! Everything (agent, clients, pins, cgroup, namespaces) is removed on drop, also when a
//! test fails.
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, TempDir, http_get, node_yaml, service_yaml, slice_yaml},
    harness::{PinDir, TestCgroup, require_root},
    netns::{Netns, Topology, wait_for},
};
use proxy_userspace::{dataplane::maps::Maps, show};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const CLIENT: &str = env!("CARGO_BIN_EXE_proxy-sockclient");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NODE_PORT: u16 = 30080;
const ECONNREFUSED: i32 = 111;

/// A client process (`proxy-sockclient`) in the test cgroup and a namespace.
struct SockClient {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

/// One answer of the client.
#[derive(Debug)]
enum Reply {
    /// Server name and the address the socket reports (getpeername / recvfrom source).
    Ok(String, SocketAddr),
    Err(i32, String),
}

impl SockClient {
    fn start(cg: &TestCgroup, ns: &Netns) -> Self {
        let mut child = Command::new(CLIENT)
            .args(["--cgroup", cg.path.to_str().expect("utf-8"), "--netns", &ns.name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start proxy-sockclient");
        let stdin = child.stdin.take().expect("stdin");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("client ready");
        assert_eq!(line.trim(), "ready");
        SockClient { child, stdin, out }
    }

    fn raw(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("send command");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("client answer");
        line.trim().to_string()
    }

    fn cmd(&mut self, cmd: &str) -> Reply {
        let line = self.raw(cmd);
        let mut w = line.splitn(3, ' ');
        match (w.next(), w.next(), w.next()) {
            (Some("ok"), Some(name), Some(addr)) => Reply::Ok(name.to_string(), addr.parse().expect("address")),
            (Some("err"), Some(code), rest) => Reply::Err(code.parse().unwrap_or(0), rest.unwrap_or("").to_string()),
            _ => panic!("bad client answer {line:?}"),
        }
    }

    fn ok(&mut self, cmd: &str) -> (String, SocketAddr) {
        match self.cmd(cmd) {
            Reply::Ok(n, a) => (n, a),
            Reply::Err(code, m) => panic!("{cmd}: errno {code}: {m}"),
        }
    }
}

impl Drop for SockClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node namespace with pods serving on 8080, an agent with socket-level LB on the test
/// cgroup. Dropped in field order: agent, pins, cgroup, namespaces, manifests.
struct Env {
    agent: Option<Agent>,
    pins: PinDir,
    cg: TestCgroup,
    topo: Topology,
    dir: TempDir,
    agent_args: Vec<String>,
}

impl Env {
    /// `servers` pods answer (of `pods`), `mode` is `--socket-lb`, `tc` whether the agent
    /// attaches TC programs to the pod veths at all.
    fn new(pods: usize, servers: usize, subnet: u8, mode: &str, tc: bool) -> Env {
        let mut topo = Topology::single_node(pods, subnet).expect("topology");
        for i in 0..servers {
            topo.start_server(SERVER, i, 8080).expect("server");
        }
        topo.node.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]).expect("node address");
        let dir = TempDir::new("ebpf-proxy-socklb-").expect("manifests dir");
        dir.write("node.yaml", &node_yaml("node-a", NODE_IP)).expect("node");
        let cg = TestCgroup::new().expect("test cgroup");
        let pins = PinDir::new();
        let mut agent_args: Vec<String> = vec![
            "--manifests".into(),
            dir.0.display().to_string(),
            "--node-name".into(),
            "node-a".into(),
            "--socket-lb".into(),
            mode.into(),
            "--cgroup-root".into(),
            cg.path.display().to_string(),
            // The per-frontend translation series (off by default) are checked below.
            "--metrics-per-frontend".into(),
        ];
        if !tc {
            // No interface matches: no TC program anywhere.
            agent_args.extend(["--pod-iface-pattern".into(), "no-such-if*".into()]);
        }
        Env { agent: None, pins, cg, topo, dir, agent_args }
    }

    fn start_agent(&mut self) {
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        let agent = Agent::start(&self.topo.node, &self.pins.0, 10256, &args).expect("agent");
        agent.wait_ready(&self.topo.node, Duration::from_secs(20)).expect("agent ready");
        self.agent = Some(agent);
    }

    fn pod_ips(&self, n: usize) -> Vec<(String, Ipv4Addr)> {
        self.topo.pods[..n].iter().map(|p| (p.name.clone(), p.ip)).collect()
    }

    /// A Service `name` on `vip:port/proto` -> pods `backends` on 8080.
    fn service(&self, name: &str, vip: Ipv4Addr, port: u16, proto: &str, backends: &[(String, Ipv4Addr)]) {
        self.dir.write(&format!("{name}.yaml"), &service_yaml(name, &vip.to_string(), port, 8080, proto)).expect("svc");
        let eps: Vec<(&str, Ipv4Addr)> = backends.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
        self.dir
            .write(&format!("{name}-slice.yaml"), &slice_yaml(name, &format!("{name}-1"), &eps, 8080, proto))
            .expect("slice");
    }

    /// Node-wide and per-service counters from the pinned maps: (verdict, packets) summed
    /// over the node rows only.
    fn node_counter(&self, verdict: &str) -> u64 {
        counter(&self.pins.0, verdict, None)
    }
}

fn counter(root: &Path, verdict: &str, per_service: Option<()>) -> u64 {
    let maps = Maps::open_pinned(root).expect("pinned maps");
    show::read_stats(&maps)
        .expect("stats")
        .iter()
        .filter(|r| r.verdict == verdict && (r.service_id.is_some() == per_service.is_some()))
        .map(|r| r.packets)
        .sum()
}

/// A global IPv6 address for the node namespace (on `lo`). The dual-stack topology gives the
/// node only link-local addresses, so a node client's datagrams to a pod left from a
/// link-local source and the pod answered from its own link-local address (same scope),
/// which no reverse translation knows: `recvfrom()` then saw `fe80::...`, and a connected
/// socket dropped the reply, whenever the pod's link-local address was already up.
fn node_global_ipv6(topo: &Topology, subnet: u8) {
    let addr = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, subnet.into(), 0, 0, 0, 1);
    topo.node.ip(&["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"]).expect("node IPv6 address");
}

/// Wait until `client` reaches `addr` over TCP (servers and the first sync are asynchronous).
fn wait_reachable(client: &mut SockClient, addr: SocketAddr) {
    wait_for(Duration::from_secs(10), "service reachable through the socket hooks", || {
        matches!(client.cmd(&format!("tcp {addr}")), Reply::Ok(..)).then_some(())
    })
    .expect("reachable");
}

/// Test 1: a node-namespace process reaches a ClusterIP over TCP and UDP with no TC
/// program attached anywhere; getpeername() shows VIP:port and UDP replies come from it.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn node_process_reaches_clusterip_without_tc() {
    require_root("node_process_reaches_clusterip_without_tc");
    let mut env = Env::new(3, 3, 30, "on", false);
    let backends = env.pod_ips(3);
    env.service("web", VIP, 80, "TCP", &backends);
    env.service("dns", VIP, 53, "UDP", &backends);
    env.start_agent();
    let vip: SocketAddr = (VIP, 80).into();
    let vip53: SocketAddr = (VIP, 53).into();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    wait_reachable(&mut client, vip);

    let mut names = BTreeSet::new();
    for _ in 0..40 {
        let (name, peer) = client.ok(&format!("tcp {vip}"));
        assert_eq!(peer, vip, "getpeername() of a TCP socket connected through the VIP");
        names.insert(name);
    }
    assert_eq!(names, ["pod0", "pod1", "pod2"].map(String::from).into(), "every backend serves");

    let mut unames = BTreeSet::new();
    for _ in 0..30 {
        let (name, from) = client.ok(&format!("udp {vip53}"));
        assert_eq!(from, vip53, "recvfrom() source of a reply to an unconnected UDP socket");
        unames.insert(name);
    }
    assert_eq!(unames.len(), 3, "{unames:?}");
    let (_, peer) = client.ok(&format!("uconn {vip53}"));
    assert_eq!(peer, vip53, "getpeername() of a connected UDP socket");

    // Nothing crossed a TC program (none is attached): every translation was a socket's.
    assert_eq!(env.node_counter("new_flow"), 0);
    assert!(env.node_counter("sock_translate") >= 71, "{}", env.node_counter("sock_translate"));

    // /metrics: attached, and the per-frontend translation counts (refreshed every 2 s).
    let agent = env.agent.as_ref().expect("agent");
    assert_eq!(agent.metric(&env.topo.node, "ebpf_proxy_socket_lb_attached").expect("metric"), 1.0);
    let addr = agent.metrics;
    let web = wait_for(Duration::from_secs(5), "socket_lb_translations for default/web", || {
        let (_, body) = env.topo.node.run(|| http_get(addr, "/metrics")).ok()?;
        let sum: f64 = body
            .lines()
            .filter(|l| l.starts_with("ebpf_proxy_socket_lb_translations{service=\"default/web:main\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        (sum >= 41.0).then_some(sum)
    })
    .expect("per-frontend metric");
    assert!(web >= 41.0, "{web}");
}

/// Test 2: a pod client (own netns, process in the test cgroup): its packets leave with the
/// backend address already (the TC program on its veth sees no service traffic), every
/// backend is reached, getpeername() shows the VIP.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn pod_client_connects_straight_to_backends() {
    require_root("pod_client_connects_straight_to_backends");
    let mut env = Env::new(4, 3, 31, "on", true);
    let backends = env.pod_ips(3);
    env.service("web", VIP, 80, "TCP", &backends);
    env.start_agent();
    let vip: SocketAddr = (VIP, 80).into();
    let mut client = SockClient::start(&env.cg, &env.topo.pods[3].ns);
    wait_reachable(&mut client, vip);
    let tc_before = (env.node_counter("new_flow"), env.node_counter("established"));
    let sock_before = env.node_counter("sock_translate");
    let mut names = BTreeSet::new();
    for _ in 0..40 {
        let (name, peer) = client.ok(&format!("tcp {vip}"));
        assert_eq!(peer, vip);
        names.insert(name);
    }
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(
        (env.node_counter("new_flow"), env.node_counter("established")),
        tc_before,
        "the pod's veth carried no packet to the VIP: TC translated nothing"
    );
    assert_eq!(env.node_counter("sock_translate") - sock_before, 40);
    // And the per-service counter shows them.
    assert!(counter(&env.pins.0, "sock_translate", Some(())) >= 40);
}

/// Test 3: the node reaches its own NodePort and a LoadBalancer IP; a frontend without
/// endpoints refuses at once (ECONNREFUSED), over TCP and UDP.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn node_reaches_nodeport_and_lb_ip_and_empty_service_refuses() {
    require_root("node_reaches_nodeport_and_lb_ip_and_empty_service_refuses");
    let mut env = Env::new(2, 2, 32, "on", false);
    let backends = env.pod_ips(2);
    let lb = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\n  namespace: default\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  clusterIPs: [10.96.0.20]\n  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    nodePort: {NODE_PORT}\n    protocol: TCP\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: {LB_IP}\n"
    );
    env.dir.write("lb.yaml", &lb).expect("lb");
    let eps: Vec<(&str, Ipv4Addr)> = backends.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    env.dir.write("lb-slice.yaml", &slice_yaml("lb", "lb-1", &eps, 8080, "TCP")).expect("slice");
    env.dir.write("empty.yaml", &service_yaml("empty", "10.96.0.99", 80, 8080, "TCP")).expect("empty");
    env.dir.write("empty-udp.yaml", &service_yaml("empty-udp", "10.96.0.98", 53, 8080, "UDP")).expect("empty");
    env.start_agent();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    let nodeport: SocketAddr = (NODE_IP, NODE_PORT).into();
    let lb_addr: SocketAddr = (LB_IP, 80).into();
    wait_reachable(&mut client, nodeport);
    for addr in [nodeport, lb_addr] {
        let mut names = BTreeSet::new();
        for _ in 0..20 {
            let (name, peer) = client.ok(&format!("tcp {addr}"));
            assert_eq!(peer, addr);
            names.insert(name);
        }
        assert_eq!(names.len(), 2, "{addr}: {names:?}");
    }
    for (cmd, what) in [("tcp 10.96.0.99:80", "TCP connect"), ("udp 10.96.0.98:53", "UDP send")] {
        let t = Instant::now();
        match client.cmd(cmd) {
            Reply::Err(code, _) => assert_eq!(code, ECONNREFUSED, "{what} to a frontend without endpoints"),
            r => panic!("{what} to a frontend without endpoints: {r:?}"),
        }
        assert!(t.elapsed() < Duration::from_millis(500), "{what} refused at once, took {:?}", t.elapsed());
    }
}

/// Test 4: `--socket-lb=host-only`: node sockets are translated, pod sockets are not (and
/// still reach the service through the TC path).
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn host_only_leaves_pod_sockets_to_tc() {
    require_root("host_only_leaves_pod_sockets_to_tc");
    let mut env = Env::new(4, 3, 33, "host-only", true);
    let backends = env.pod_ips(3);
    env.service("web", VIP, 80, "TCP", &backends);
    env.start_agent();
    let vip: SocketAddr = (VIP, 80).into();
    let mut node_client = SockClient::start(&env.cg, &env.topo.node);
    let mut pod_client = SockClient::start(&env.cg, &env.topo.pods[3].ns);
    wait_reachable(&mut node_client, vip);
    wait_reachable(&mut pod_client, vip);

    let (sock0, tc0) = (env.node_counter("sock_translate"), env.node_counter("new_flow"));
    for _ in 0..20 {
        let (_, peer) = node_client.ok(&format!("tcp {vip}"));
        assert_eq!(peer, vip);
    }
    assert_eq!(env.node_counter("sock_translate") - sock0, 20, "node sockets translated at connect()");
    assert_eq!(env.node_counter("new_flow"), tc0, "node traffic crossed no TC program");

    let (sock1, tc1) = (env.node_counter("sock_translate"), env.node_counter("new_flow"));
    let mut names = BTreeSet::new();
    for _ in 0..30 {
        let (name, peer) = pod_client.ok(&format!("tcp {vip}"));
        assert_eq!(peer, vip);
        names.insert(name);
    }
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(env.node_counter("sock_translate"), sock1, "pod sockets are not translated in host-only mode");
    assert_eq!(env.node_counter("new_flow") - tc1, 30, "pod connections went through TC");
}

/// Test 5: a connected UDP socket whose backend is removed from the EndpointSlice is
/// destroyed; the client, reconnecting, reaches a live backend. Reports the time from the
/// manifest change to the socket failing.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn stale_connected_udp_socket_is_destroyed() {
    require_root("stale_connected_udp_socket_is_destroyed");
    let mut env = Env::new(3, 3, 34, "on", false);
    let backends = env.pod_ips(3);
    env.service("dns", VIP, 53, "UDP", &backends);
    env.start_agent();
    let vip: SocketAddr = (VIP, 53).into();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    let (victim, peer) =
        wait_for(Duration::from_secs(10), "UDP service reachable", || match client.cmd(&format!("uconn {vip}")) {
            Reply::Ok(n, a) => Some((n, a)),
            Reply::Err(..) => None,
        })
        .expect("connected UDP socket");
    assert_eq!(peer, vip);
    // The socket keeps its backend while it lives.
    for _ in 0..5 {
        assert_eq!(client.ok("uask").0, victim);
    }
    // A second client on an IPv6 socket dialling the IPv4-mapped VIP, connected to the same
    // backend (retried until the random choice gives it).
    let mapped: SocketAddr = (VIP.to_ipv6_mapped(), 53).into();
    let mut client6 = SockClient::start(&env.cg, &env.topo.node);
    let on_victim = (0..60).any(|_| matches!(client6.cmd(&format!("uconn {mapped}")), Reply::Ok(n, _) if n == victim));
    assert!(on_victim, "an IPv4-mapped connected UDP socket on {victim}");
    let live: Vec<(String, Ipv4Addr)> = backends.iter().filter(|(n, _)| *n != victim).cloned().collect();
    let eps: Vec<(&str, Ipv4Addr)> = live.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let t = Instant::now();
    env.dir.write("dns-slice.yaml", &slice_yaml("dns", "dns-1", &eps, 8080, "UDP")).expect("slice");
    // The removed pod still answers: only the destruction makes the socket fail.
    let failed = wait_for(Duration::from_secs(5), "the stale socket to be destroyed", || match client.cmd("uask") {
        Reply::Ok(name, _) => {
            assert_eq!(name, victim, "a connected socket never changes backend by itself");
            None
        }
        Reply::Err(code, _) => Some(code),
    })
    .expect("destroyed");
    let took = t.elapsed();
    eprintln!("stale UDP socket failed with errno {failed} {took:?} after the EndpointSlice change");
    // The agent destroys AF_INET sockets first, then AF_INET6 ones (`destroy_here`): the
    // first client can notice before the second's socket is gone.
    wait_for(Duration::from_secs(5), "the IPv4-mapped socket to be destroyed too", || match client6.cmd("uask") {
        Reply::Ok(name, _) => {
            assert_eq!(name, victim, "a connected socket never changes backend by itself");
            None
        }
        Reply::Err(code, _) => Some(code),
    })
    .expect("the IPv4-mapped socket on the removed backend destroyed");
    let (name, peer) = client6.ok(&format!("uconn {mapped}"));
    assert_ne!(name, victim);
    assert_eq!(peer, mapped);
    let (name, peer) = client.ok(&format!("uconn {vip}"));
    assert_ne!(name, victim, "reconnected to a live backend");
    assert_eq!(peer, vip);
    let agent = env.agent.as_ref().expect("agent");
    let destroyed = agent.metric(&env.topo.node, "ebpf_proxy_socket_lb_udp_sockets_destroyed_total").expect("metric");
    assert!(destroyed >= 2.0, "{destroyed}");
}

/// Issue 19 item 4: unconnected UDP keeps one backend per (socket, frontend), as conntrack
/// keeps one per 5-tuple: 30 datagrams sent with sendto() from one socket that was never
/// bound reach one backend of three (each reply from VIP:port), and SOCK_UDP_BACKENDS holds
/// that socket's choice. (Before: a backend picked per datagram, three backends seen.)
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn unconnected_udp_socket_keeps_one_backend() {
    require_root("unconnected_udp_socket_keeps_one_backend");
    let mut env = Env::new(3, 3, 38, "on", false);
    let backends = env.pod_ips(3);
    env.service("dns", VIP, 53, "UDP", &backends);
    env.start_agent();
    let vip: SocketAddr = (VIP, 53).into();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    wait_for(Duration::from_secs(10), "UDP service reachable", || {
        matches!(client.cmd(&format!("udp {vip}")), Reply::Ok(..)).then_some(())
    })
    .expect("reachable");
    // The agent passed --conntrack-udp-timeout-stream (default 120 s) to the hooks.
    let cfg_pin = aya::maps::MapData::from_pin(env.pins.0.join("maps").join("SOCK_CONFIG")).expect("SOCK_CONFIG");
    let cfg: aya::maps::Array<_, proxy_common::SockConfig> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(cfg_pin).expect("map")).expect("array");
    assert_eq!(cfg.get(&0, 0).expect("SOCK_CONFIG[0]").udp_timeout_secs, 120);
    let maps = Maps::open_pinned(&env.pins.0).expect("pinned maps");
    let kept = |maps: &Maps| maps.sock_udp.iter().filter_map(Result::ok).collect::<Vec<_>>();
    let before = kept(&maps).len();
    for round in 0..2 {
        // A second socket may land on another backend: not asserted, only that it sticks.
        let (names, from) = client.ok(&format!("usend {vip} 30"));
        let names: Vec<&str> = names.split(',').collect();
        assert_eq!(names.len(), 30, "socket {round}: {names:?}");
        let seen: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(seen.len(), 1, "socket {round}: one backend for every datagram of one socket, got {seen:?}");
        assert_eq!(from, vip, "recvfrom() source");
    }
    let now = kept(&maps);
    assert_eq!(now.len(), before + 2, "one kept backend per socket and frontend: {now:?}");
    for (k, _) in &now {
        assert_eq!((k.addr, k.port), (u32::from_ne_bytes(VIP.octets()), 53u16.to_be()), "{k:?}");
    }

    // Its backend leaving the Service: the socket's next datagrams are re-balanced, to one
    // of the others, and stick there again; no entry points at the removed backend.
    let (names, _) = client.ok(&format!("ukeep {vip} 10"));
    let victim = names.split(',').next().expect("a name").to_string();
    assert!(names.split(',').all(|n| n == victim), "{names}");
    let victim_id = {
        let snap = maps.read_snapshot().expect("snapshot");
        let ip = backends.iter().find(|(n, _)| *n == victim).expect("victim").1;
        snap.backends.iter().find(|(_, b)| b.addr == std::net::IpAddr::V4(ip)).expect("victim's id").0.get()
    };
    assert!(kept(&maps).iter().any(|(_, v)| v.backend_id == victim_id));
    let live: Vec<(String, Ipv4Addr)> = backends.iter().filter(|(n, _)| *n != victim).cloned().collect();
    let eps: Vec<(&str, Ipv4Addr)> = live.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    env.dir.write("dns-slice.yaml", &slice_yaml("dns", "dns-1", &eps, 8080, "UDP")).expect("slice");
    wait_for(Duration::from_secs(5), "the removed backend's kept entries purged", || {
        kept(&maps).iter().all(|(_, v)| v.backend_id != victim_id).then_some(())
    })
    .expect("purged");
    let (names, _) = client.ok(&format!("ukeep {vip} 20"));
    let seen: BTreeSet<&str> = names.split(',').collect();
    assert_eq!(seen.len(), 1, "re-balanced once, then kept: {seen:?}");
    assert!(!seen.contains(victim.as_str()), "{seen:?}");
}

/// Issue 19 item 10: a connected UDP socket whose reverse entry the LRU evicted (the test
/// deletes every SOCK_REVNAT entry) is still destroyed when its backend is removed: it is
/// found by its destination. A socket connected to a backend that stays is left alone.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn stale_udp_socket_is_destroyed_without_its_reverse_entry() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use proxy_common::{SockRevKey, SockRevValue};
    require_root("stale_udp_socket_is_destroyed_without_its_reverse_entry");
    let mut env = Env::new(3, 3, 39, "on", false);
    let backends = env.pod_ips(3);
    env.service("dns", VIP, 53, "UDP", &backends);
    env.start_agent();
    let vip: SocketAddr = (VIP, 53).into();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    let victim =
        wait_for(Duration::from_secs(10), "UDP service reachable", || match client.cmd(&format!("uconn {vip}")) {
            Reply::Ok(n, _) => Some(n),
            Reply::Err(..) => None,
        })
        .expect("connected UDP socket");
    // A second client connected to another backend (retried until the random choice gives one).
    let mut other = SockClient::start(&env.cg, &env.topo.node);
    let survivor = (0..60)
        .find_map(|_| match other.cmd(&format!("uconn {vip}")) {
            Reply::Ok(n, _) if n != victim => Some(n),
            _ => None,
        })
        .expect("a connected UDP socket on another backend");
    // As an LRU eviction would: no reverse entry left for either socket.
    let path = env.pins.0.join("maps").join("SOCK_REVNAT");
    let data = MapData::from_pin(&path).expect("SOCK_REVNAT pin");
    let mut revnat: BpfHashMap<MapData, SockRevKey, SockRevValue> =
        BpfHashMap::try_from(Map::from_map_data(data).expect("map")).expect("SOCK_REVNAT");
    let keys: Vec<SockRevKey> = revnat.keys().filter_map(Result::ok).collect();
    assert!(keys.len() >= 2, "the hooks recorded both sockets: {keys:?}");
    for k in &keys {
        revnat.remove(k).expect("delete SOCK_REVNAT entry");
    }
    assert_eq!(revnat.keys().count(), 0);

    let live: Vec<(String, Ipv4Addr)> = backends.iter().filter(|(n, _)| *n != victim).cloned().collect();
    let eps: Vec<(&str, Ipv4Addr)> = live.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    env.dir.write("dns-slice.yaml", &slice_yaml("dns", "dns-1", &eps, 8080, "UDP")).expect("slice");
    // The removed pod still answers: only the destruction makes the socket fail.
    let errno = wait_for(Duration::from_secs(5), "the stale socket to be destroyed", || match client.cmd("uask") {
        Reply::Ok(name, _) => {
            assert_eq!(name, victim, "a connected socket never changes backend by itself");
            None
        }
        Reply::Err(code, _) => Some(code),
    })
    .expect("destroyed although its SOCK_REVNAT entry was gone");
    assert_ne!(errno, 0, "the call failed with an errno");
    for _ in 0..5 {
        assert_eq!(other.ok("uask").0, survivor, "a socket on a backend that stays is left alone");
    }
}

/// Issue 19 item 12: an agent on root A attached to the cgroup and was killed (its links
/// stay pinned and attached, translating with A's maps); an agent on root B starts on the
/// same cgroup. A ClusterIP that only B's maps send to pod1 (A's sent it to pod0) reaches
/// pod1, and the cgroup then carries only B's programs, one per hook.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn other_roots_cgroup_programs_are_replaced() {
    use proxy_userspace::dataplane::sock;
    require_root("other_roots_cgroup_programs_are_replaced");
    let mut env = Env::new(2, 2, 40, "on", false);
    let backends = env.pod_ips(2);
    env.service("web", VIP, 80, "TCP", &backends[..1]);
    env.start_agent();
    let vip: SocketAddr = (VIP, 80).into();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    wait_reachable(&mut client, vip);
    assert_eq!(client.ok(&format!("tcp {vip}")).0, "pod0", "root A's agent translates to pod0");
    if let Some(mut a) = env.agent.take() {
        a.kill();
    }
    assert_eq!(client.ok(&format!("tcp {vip}")).0, "pod0", "root A's links outlive its agent");

    // Root B, its own manifests: the same ClusterIP on pod1 only.
    let root_a = std::mem::replace(&mut env.pins, PinDir::new());
    let dir_b = TempDir::new("ebpf-proxy-socklb-b-").expect("manifests dir");
    dir_b.write("node.yaml", &node_yaml("node-a", NODE_IP)).expect("node");
    dir_b.write("web.yaml", &service_yaml("web", &VIP.to_string(), 80, 8080, "TCP")).expect("svc");
    let eps = [(backends[1].0.as_str(), backends[1].1)];
    dir_b.write("web-slice.yaml", &slice_yaml("web", "web-1", &eps, 8080, "TCP")).expect("slice");
    let manifests = env.agent_args.iter().position(|a| a == "--manifests").expect("--manifests") + 1;
    env.agent_args[manifests] = dir_b.0.display().to_string();
    env.start_agent();
    for _ in 0..10 {
        assert_eq!(client.ok(&format!("tcp {vip}")).0, "pod1", "root B's maps decide");
    }
    let mine = sock::pinned_link_ids(&env.pins.0);
    assert_eq!(mine.len(), 8, "root B pinned a link per program");
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&env.cg.path).expect("cgroup"));
    let links = sock::our_links_on(cgroup_id);
    assert!(links.iter().all(|l| mine.contains(&l.link_id)), "only root B's links: {links:?}");
    assert_eq!(links.len(), 8, "{links:?}");
    for (program, progs) in sock::cgroup_programs(&env.cg.path).expect("BPF_PROG_QUERY") {
        assert_eq!(progs.len(), 1, "{program}: one program on the hook, got {progs:?}");
    }
    drop(root_a);
}

/// Test 6: kill -9 and restart of the agent while a node client loops through a ClusterIP:
/// the pinned cgroup links keep translating, and the new agent swaps its programs into
/// them: zero failed connections.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn agent_restart_loses_no_connection() {
    require_root("agent_restart_loses_no_connection");
    let mut env = Env::new(3, 3, 35, "on", false);
    let backends = env.pod_ips(3);
    env.service("web", VIP, 80, "TCP", &backends);
    env.start_agent();
    let vip: SocketAddr = (VIP, 80).into();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    wait_reachable(&mut client, vip);
    let links = |root: &Path| std::fs::read_dir(root.join("cgroup-links")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(links(&env.pins.0), 8);
    writeln!(client.stdin, "loop {vip} 5000").expect("loop");
    client.stdin.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(1000));
    if let Some(mut a) = env.agent.take() {
        a.kill();
    }
    std::thread::sleep(Duration::from_millis(500));
    env.start_agent();
    let mut line = String::new();
    client.out.read_line(&mut line).expect("loop result");
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"ok"), "{line:?}");
    let (ok, failed): (u64, u64) = (w[1].parse().expect("count"), w[2].parse().expect("count"));
    eprintln!("through the restart: {ok} connections, {failed} failed");
    assert_eq!(failed, 0, "connections failed across the restart");
    assert!(ok > 50, "the loop ran: {ok}");
    assert_eq!(links(&env.pins.0), 8, "the same pinned links, updated in place");
}

/// IPv6: `connect6`/`sendmsg6`/`recvmsg6`/`getpeername6` for node and pod sockets on an
/// IPv6 ClusterIP, an IPv4-mapped destination on an IPv6 socket served by the IPv4 maps,
/// and an IPv6 frontend without endpoints refusing. The control plane does not write the
/// IPv6 maps on this branch yet, so the datapath is loaded by the test (IPv4 through the
/// syncer, IPv6 programmed into the pinned SERVICES6/BACKENDS6/BACKEND_SLOTS) and the
/// socket-level programs attached with the agent's own function, from the node namespace.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn ipv6_sockets_and_v4_mapped_destinations() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use proxy_common::{Backend6, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL, ServiceKey6, ServiceValue, SlotKey};
    use proxy_tests::harness::{TestDataplane, entry, frontend, ip6_to_map, state};
    use proxy_userspace::{
        dataplane::sock::{self, SocketLbMode},
        model::Protocol,
    };
    use std::net::Ipv6Addr;

    require_root("ipv6_sockets_and_v4_mapped_destinations");
    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
    const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x99);
    let mut topo = Topology::dual_stack(4, 36).expect("topology");
    node_global_ipv6(&topo, 36);
    for i in 0..3 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let cg = TestCgroup::new().expect("test cgroup");
    let mut dp = TestDataplane::load();
    let v4: Vec<(Ipv4Addr, u16)> = topo.pods[..3].iter().map(|p| (p.ip, 8080)).collect();
    let r = dp.syncer.apply(&state(vec![(frontend(VIP, 80, Protocol::Tcp), entry("web", &v4))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let dir = dp.pins.0.join("maps");
    fn open<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> BpfHashMap<MapData, K, V> {
        let data = MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("open pinned {name}: {e}"));
        BpfHashMap::try_from(Map::from_map_data(data).expect(name)).expect(name)
    }
    let mut services: BpfHashMap<MapData, ServiceKey6, ServiceValue> = open(&dir, "SERVICES6");
    let mut backends: BpfHashMap<MapData, u32, Backend6> = open(&dir, "BACKENDS6");
    let mut slots: BpfHashMap<MapData, SlotKey, u32> = open(&dir, "BACKEND_SLOTS");
    // Ids far above what the syncer allocated for the one IPv4 frontend.
    let (svc_tcp, svc_udp, svc_empty) = (5000u32, 5001u32, 5002u32);
    for (svc, proto) in [(svc_tcp, PROTO_TCP), (svc_udp, PROTO_UDP)] {
        for (i, pod) in topo.pods[..3].iter().enumerate() {
            let bid = svc * 10 + i as u32;
            let b = Backend6 { addr: ip6_to_map(pod.ip6.expect("dual-stack")), port: 8080u16.to_be(), proto, flags: 0 };
            backends.insert(bid, b, 0).expect("BACKENDS6");
            slots.insert(SlotKey::new(svc, 0, i as u32), bid, 0).expect("BACKEND_SLOTS");
        }
        let key = ServiceKey6 { addr: ip6_to_map(VIP6), port: 80u16.to_be(), proto, scope: SCOPE_INTERNAL };
        let v = ServiceValue { id: svc, count: 3, ..Default::default() };
        services.insert(key, v, 0).expect("SERVICES6");
    }
    let key = ServiceKey6 { addr: ip6_to_map(EMPTY6), port: 80u16.to_be(), proto: PROTO_TCP, scope: SCOPE_INTERNAL };
    services.insert(key, ServiceValue { id: svc_empty, count: 0, ..Default::default() }, 0).expect("SERVICES6");
    let root = dp.pins.0.clone();
    // From the node namespace: it becomes the "host" whose cookie SOCK_CONFIG records.
    let attached = topo.node.run(|| sock::attach(&mut dp.programs, &root, &cg.path, SocketLbMode::On));
    assert_eq!(attached.expect("attach").created, 8);

    let vip6: SocketAddr = (VIP6, 80).into();
    let mapped: SocketAddr = (VIP.to_ipv6_mapped(), 80).into();
    for ns in [&topo.node, &topo.pods[3].ns] {
        let mut client = SockClient::start(&cg, ns);
        wait_reachable(&mut client, vip6);
        let mut names = BTreeSet::new();
        for _ in 0..30 {
            let (name, peer) = client.ok(&format!("tcp {vip6}"));
            assert_eq!(peer, vip6, "getpeername() of an IPv6 socket connected through the VIP");
            names.insert(name);
        }
        assert_eq!(names.len(), 3, "{names:?}");
        let (_, from) = client.ok(&format!("udp {vip6}"));
        assert_eq!(from, vip6, "recvfrom() source of an IPv6 reply");
        let (_, peer) = client.ok(&format!("uconn {vip6}"));
        assert_eq!(peer, vip6);
        match client.cmd(&format!("tcp [{EMPTY6}]:80")) {
            Reply::Err(code, _) => assert_eq!(code, ECONNREFUSED),
            r => panic!("IPv6 frontend without endpoints: {r:?}"),
        }
    }
    // An IPv6 socket dialling ::ffff:10.96.0.10 (dual-stack applications) on the node.
    let mut client = SockClient::start(&cg, &topo.node);
    let mut names = BTreeSet::new();
    for _ in 0..20 {
        let (name, peer) = client.ok(&format!("tcp {mapped}"));
        assert_eq!(peer, mapped, "getpeername() shows the IPv4-mapped VIP");
        names.insert(name);
    }
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(counter(&dp.pins.0, "sock_translate", None) >= 2 * 32 + 20);
}

/// IPv6 end to end through the agent (dual-stack control plane): a node process reaches a
/// dual-stack Service's IPv6 ClusterIP over TCP and UDP (getpeername / recvfrom show the
/// IPv6 VIP), and a connected UDP socket on an IPv6 backend removed from the IPv6
/// EndpointSlice is destroyed; reconnecting reaches a live backend.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn ipv6_through_the_agent_and_stale_udp6() {
    use std::net::{IpAddr, Ipv6Addr};
    require_root("ipv6_through_the_agent_and_stale_udp6");
    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
    let mut topo = Topology::dual_stack(3, 37).expect("topology");
    node_global_ipv6(&topo, 37);
    for i in 0..3 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let dir = TempDir::new("ebpf-proxy-socklb6-").expect("manifests dir");
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: ClusterIP\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {VIP}\n  \
         clusterIPs: [\"{VIP}\", \"{VIP6}\"]\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  \
         - {{name: udp, port: 53, targetPort: 8080, protocol: UDP}}\n"
    );
    let slice = |family: &str, pods: &[(String, IpAddr)]| {
        let mut s = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-{}\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: web\naddressType: {family}\nports:\n\
             - {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: udp, port: 8080, protocol: UDP}}\nendpoints:\n",
            family.to_lowercase()
        );
        for (name, addr) in pods {
            s.push_str(&format!(
                "- addresses: [\"{addr}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                 nodeName: node-a\n  targetRef: {{kind: Pod, name: {name}, namespace: default}}\n"
            ));
        }
        s
    };
    let v4: Vec<(String, IpAddr)> = topo.pods.iter().map(|p| (p.name.clone(), p.ip.into())).collect();
    let v6: Vec<(String, IpAddr)> =
        topo.pods.iter().map(|p| (p.name.clone(), p.ip6.expect("dual-stack").into())).collect();
    dir.write("web.yaml", &svc).expect("svc");
    dir.write("web-v4.yaml", &slice("IPv4", &v4)).expect("slice");
    dir.write("web-v6.yaml", &slice("IPv6", &v6)).expect("slice");
    let cg = TestCgroup::new().expect("test cgroup");
    let pins = PinDir::new();
    let d = dir.0.display().to_string();
    let c = cg.path.display().to_string();
    let args = [
        "--manifests",
        d.as_str(),
        "--node-name",
        "node-a",
        "--socket-lb",
        "on",
        "--cgroup-root",
        c.as_str(),
        "--pod-iface-pattern",
        "no-such-if*",
    ];
    let agent = Agent::start(&topo.node, &pins.0, 10256, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");

    let vip6: SocketAddr = (VIP6, 80).into();
    let dns6: SocketAddr = (VIP6, 53).into();
    let mut client = SockClient::start(&cg, &topo.node);
    wait_reachable(&mut client, vip6);
    let mut names = BTreeSet::new();
    for _ in 0..30 {
        let (name, peer) = client.ok(&format!("tcp {vip6}"));
        assert_eq!(peer, vip6);
        names.insert(name);
    }
    assert_eq!(names.len(), 3, "{names:?}");
    let (_, from) = client.ok(&format!("udp {dns6}"));
    assert_eq!(from, dns6);

    let (victim, peer) = client.ok(&format!("uconn {dns6}"));
    assert_eq!(peer, dns6);
    let live: Vec<(String, IpAddr)> = v6.iter().filter(|(n, _)| *n != victim).cloned().collect();
    let t = Instant::now();
    dir.write("web-v6.yaml", &slice("IPv6", &live)).expect("slice");
    let failed =
        wait_for(Duration::from_secs(5), "the stale IPv6 socket to be destroyed", || match client.cmd("uask") {
            Reply::Ok(name, _) => {
                assert_eq!(name, victim);
                None
            }
            Reply::Err(code, _) => Some(code),
        })
        .expect("destroyed");
    eprintln!("stale IPv6 UDP socket failed with errno {failed} {:?} after the EndpointSlice change", t.elapsed());
    let (name, peer) = client.ok(&format!("uconn {dns6}"));
    assert_ne!(name, victim);
    assert_eq!(peer, dns6);
}

/// Issue 24 item 4: `--nodeport-localhost` (on by default) serves a NodePort on 127.0.0.1
/// and ::1 to processes on the node, through the socket hooks; a pod's own loopback is
/// left alone (nothing listens there: refused), and the loopback frontends have no
/// external scope, so no packet from an uplink can reach them.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn nodeport_on_localhost_serves_node_processes_only() {
    use std::net::{IpAddr, Ipv6Addr};
    require_root("nodeport_on_localhost_serves_node_processes_only");
    const NODE_PORT_L: u16 = 30081;
    let mut topo = Topology::dual_stack(3, 43).expect("topology");
    node_global_ipv6(&topo, 43);
    for i in 0..3 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let dir = TempDir::new("ebpf-proxy-localnp-").expect("manifests dir");
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: np\n  namespace: default\nspec:\n  type: NodePort\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.43\n  \
         clusterIPs: [\"10.96.0.43\", \"fd00:96::43\"]\n  \
         ports:\n  - {{name: tcp, port: 80, targetPort: 8080, nodePort: {NODE_PORT_L}, protocol: TCP}}\n"
    );
    dir.write("np.yaml", &svc).expect("svc");
    for (family, addrs) in [
        ("IPv4", topo.pods.iter().map(|p| IpAddr::from(p.ip)).collect::<Vec<_>>()),
        ("IPv6", topo.pods.iter().map(|p| IpAddr::from(p.ip6.expect("dual-stack"))).collect()),
    ] {
        let mut s = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-{}\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: np\naddressType: {family}\n\
             ports:\n- {{name: tcp, port: 8080, protocol: TCP}}\nendpoints:\n",
            family.to_lowercase()
        );
        for (pod, addr) in topo.pods.iter().zip(addrs) {
            s.push_str(&format!(
                "- addresses: [\"{addr}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                 nodeName: node-a\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
                pod.name
            ));
        }
        dir.write(&format!("np-{family}.yaml"), &s).expect("slice");
    }
    let cg = TestCgroup::new().expect("test cgroup");
    let pins = PinDir::new();
    let (d, c) = (dir.0.display().to_string(), cg.path.display().to_string());
    let args = ["--manifests", &d, "--node-name", "node-a", "--socket-lb", "on", "--cgroup-root", &c];
    let agent = Agent::start(&topo.node, &pins.0, 10256, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");

    let v4: SocketAddr = (Ipv4Addr::LOCALHOST, NODE_PORT_L).into();
    let v6: SocketAddr = (Ipv6Addr::LOCALHOST, NODE_PORT_L).into();
    let mut node = SockClient::start(&cg, &topo.node);
    wait_reachable(&mut node, v4);
    for addr in [v4, v6] {
        let mut names = BTreeSet::new();
        for _ in 0..30 {
            let (name, peer) = node.ok(&format!("tcp {addr}"));
            assert_eq!(peer, addr, "getpeername reports the address the node process dialled");
            names.insert(name);
        }
        assert_eq!(names.len(), 3, "{addr}: {names:?}");
    }
    // A pod's 127.0.0.1 and ::1 are its own: nothing listens there, so it is refused.
    let mut pod = SockClient::start(&cg, &topo.pods[0].ns);
    for addr in [v4, v6] {
        match pod.cmd(&format!("tcp {addr}")) {
            Reply::Err(code, _) => assert_eq!(code, ECONNREFUSED, "pod to its own {addr}"),
            r => panic!("a pod's loopback reached a backend: {addr}: {r:?}"),
        }
    }
    // The loopback frontends are internal only: no uplink packet can hit them.
    let maps = Maps::open_pinned(&pins.0).expect("pinned maps");
    let rows = show::read_services(&maps).expect("services");
    let loopback: Vec<_> = rows.iter().filter(|r| r.address.is_loopback() && r.port == NODE_PORT_L).collect();
    assert_eq!(loopback.len(), 2, "{rows:?}");
    assert!(loopback.iter().all(|r| r.scope == "internal"), "{loopback:?}");
}

/// Service CIDRs at the socket level (issue 24 item 3): with no TC program anywhere, a node
/// process's connect() to an unallocated address inside `--service-cidr`, or to the
/// ClusterIP on a port it does not serve, fails at once with ECONNREFUSED and is counted;
/// the ClusterIP's own port is served.
#[test]
#[ignore = "needs root (BPF, cgroups, network namespaces): run by `cargo xtask test` as root"]
fn node_process_is_refused_unallocated_service_ips() {
    require_root("node_process_is_refused_unallocated_service_ips");
    let mut env = Env::new(2, 2, 33, "on", false);
    env.agent_args.extend(["--service-cidr".into(), "10.96.0.0/16".into()]);
    let backends = env.pod_ips(2);
    env.service("web", VIP, 80, "TCP", &backends);
    env.start_agent();
    let mut client = SockClient::start(&env.cg, &env.topo.node);
    wait_reachable(&mut client, (VIP, 80).into());
    for (cmd, verdict) in
        [("tcp 10.96.0.77:80", "unallocated_service_ip"), (&format!("tcp {VIP}:81") as &str, "cluster_ip_unknown_port")]
    {
        let t = Instant::now();
        match client.cmd(cmd) {
            Reply::Err(code, _) => assert_eq!(code, ECONNREFUSED, "{cmd}"),
            r => panic!("{cmd}: {r:?}"),
        }
        assert!(t.elapsed() < Duration::from_millis(500), "{cmd}: refused at once, took {:?}", t.elapsed());
        assert_eq!(env.node_counter(verdict), 1, "{cmd}: counted {verdict}");
    }
}
