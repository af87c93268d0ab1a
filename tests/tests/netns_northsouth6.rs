//! North-south service traffic over IPv6 (issue 10, test 3): the two-node topology of
//! `netns_northsouth` with IPv6 on the underlay and in the pods (`Cluster::dual_stack`),
//! the real agent on every node with `--xdp-mode native`, and IPv6 single-stack Services:
//! a NodePort whose remote backends are reached through SNAT to node 1's IPv6 address,
//! externalTrafficPolicy: Local with the client address preserved and an IPv6
//! LoadBalancer ingress address, and loadBalancerSourceRanges on an IPv6 prefix.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proxy_tests::client::{name_set as set, tcp_names_from as names};
use proxy_tests::{
    agent::{Agent, TempDir, node_yaml_dual},
    client::{self, Held},
    harness::{PinDir, require_root},
    netns::{CLIENT_IPS6, Cluster, Netns, node_ip6, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const LOCAL_LB: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x31);
const RANGED_LB: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x20);

fn services_yaml() -> String {
    let svc = |name: &str, vip: &str, spec: &str, status: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  \
             ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIP: \"{vip}\"\n  clusterIPs: [\"{vip}\"]\n\
             {spec}{status}"
        )
    };
    let tcp = |node_port: u16| {
        format!(
            "  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n    nodePort: {node_port}\n"
        )
    };
    let lb_status = |ip: Ipv6Addr| format!("status:\n  loadBalancer:\n    ingress:\n    - ip: \"{ip}\"\n");
    [
        svc(
            "np",
            "fd00:96::20",
            "  type: NodePort\n  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n    \
             nodePort: 30080\n  - name: udp\n    port: 80\n    targetPort: 8080\n    protocol: UDP\n    nodePort: 30080\n",
            "",
        ),
        svc(
            "local",
            "fd00:96::21",
            &format!("  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n{}", tcp(30081)),
            &lb_status(LOCAL_LB),
        ),
        svc(
            "lb",
            "fd00:96::24",
            &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [\"{}/128\"]\n{}", CLIENT_IPS6[0], tcp(30084)),
            &lb_status(RANGED_LB),
        ),
    ]
    .concat()
}

/// IPv6 EndpointSlices: every pod for `np` and `lb`; `local` too (eTP Local filters).
fn slices_yaml(c: &Cluster) -> String {
    let mut out = String::new();
    for (svc, ports) in [("np", &["main", "udp"][..]), ("local", &["main"][..]), ("lb", &["main"][..])] {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-v6\n  \
             namespace: default\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv6\nports:\n"
        ));
        for p in ports {
            let proto = if *p == "udp" { "UDP" } else { "TCP" };
            out.push_str(&format!("- {{name: {p}, port: 8080, protocol: {proto}}}\n"));
        }
        out.push_str("endpoints:\n");
        for node in &c.nodes {
            for pod in &node.pods {
                out.push_str(&format!(
                    "- addresses: [\"{}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                     nodeName: {}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
                    pod.ip6.expect("dual-stack pod"),
                    node.name,
                    pod.name
                ));
            }
        }
    }
    out
}

/// Field order is drop order: agents stop before their namespaces go.
struct Env {
    _agents: Vec<Agent>,
    cluster: Cluster,
    _pins: Vec<PinDir>,
    _dirs: Vec<TempDir>,
}

impl Env {
    fn start() -> Env {
        let mut cluster = Cluster::dual_stack(2, 2).expect("dual-stack cluster");
        cluster.start_servers(SERVER, 8080).expect("pod servers");
        cluster.client_route6(&format!("{RANGED_LB}/128"), 0).expect("client route to the LB IP");
        cluster.client_route6(&format!("{LOCAL_LB}/128"), 1).expect("client route to the local LB IP");
        let (services, slices) = (services_yaml(), slices_yaml(&cluster));
        let (mut agents, mut pins, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
        for node in &cluster.nodes {
            let dir = TempDir::new("ebpf-proxy-ns6-").expect("dir");
            dir.write("services.yaml", &services).unwrap();
            dir.write("slices.yaml", &slices).unwrap();
            dir.write("node.yaml", &node_yaml_dual(&node.name, node.ip, node.ip6.expect("IPv6 node"))).unwrap();
            let pin = PinDir::new();
            let d = dir.0.to_str().unwrap().to_string();
            let args = ["--manifests", &d, "--node-name", &node.name, "--uplink", "eth0", "--xdp-mode", "native"];
            agents.push(Agent::start(&node.ns, &pin.0, 10257, &args).expect("agent"));
            pins.push(pin);
            dirs.push(dir);
        }
        for (a, n) in agents.iter().zip(&cluster.nodes) {
            a.wait_ready(&n.ns, Duration::from_secs(20)).expect("agent ready");
        }
        Env { _agents: agents, cluster, _pins: pins, _dirs: dirs }
    }

    fn client(&self) -> &Netns {
        &self.cluster.client
    }

    /// Wait until `addr` answers (the first SYN to a remote backend waits for the
    /// neighbour (NDP) resolution XDP asked the agent for).
    fn wait_answers(&self, addr: SocketAddr) {
        self.client()
            .run(|| wait_for(Duration::from_secs(10), &format!("{addr} to answer"), || client::tcp_name(addr).ok()))
            .expect("service reachable from the client");
    }
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn ipv6_north_south() {
    require_root("ipv6_north_south");
    let env = Env::start();

    // NodePort on node 1: pods on both nodes; local ones see the client, remote ones node
    // 1's IPv6 address (SNAT); every reply comes from [node1]:30080.
    let np: SocketAddr = (node_ip6(0), 30080).into();
    env.wait_answers(np);
    assert_eq!(names(env.client(), np, 40), set(&["n1p0", "n1p1", "n2p0", "n2p1"]));
    let seen: Vec<(String, IpAddr)> = env.client().run(|| {
        (0..16)
            .map(|_| {
                let mut h = Held::open(np).expect("connection");
                assert_eq!(h.peer().unwrap(), np);
                assert_eq!(h.ask().expect("same connection again"), h.first, "backend changed mid-connection");
                h.who().expect("who")
            })
            .collect()
    });
    for (name, peer) in &seen {
        let expect: IpAddr = if name.starts_with("n1") { CLIENT_IPS6[0].into() } else { node_ip6(0).into() };
        assert_eq!(*peer, expect, "{name} sees the connection from {peer}");
    }
    assert!(seen.iter().any(|(n, _)| n.starts_with("n2")), "no connection to node 2: {seen:?}");
    let udp: BTreeSet<String> = env.client().run(|| client::udp_names_from(np, 40));
    assert_eq!(udp, set(&["n1p0", "n1p1", "n2p0", "n2p1"]));

    // externalTrafficPolicy: Local through node 2 (NodePort and the IPv6 LB ingress IP the
    // client routes via node 2): node 2's pods only, client address preserved.
    for addr in [SocketAddr::from((node_ip6(1), 30081)), SocketAddr::from((LOCAL_LB, 80))] {
        env.wait_answers(addr);
        assert_eq!(names(env.client(), addr, 20), set(&["n2p0", "n2p1"]), "via {addr}");
        let (_, peer) = env.client().run(|| Held::open(addr).and_then(|mut h| h.who())).expect("who");
        assert_eq!(peer, IpAddr::from(CLIENT_IPS6[0]), "client address preserved via {addr}");
    }

    // loadBalancerSourceRanges [client ::100/128]: ::100 gets through, ::101 is dropped.
    let lb: SocketAddr = (RANGED_LB, 80).into();
    env.wait_answers(lb);
    let from = |src: Ipv6Addr| {
        env.client().run(|| client::connect_from_any(src.into(), lb, Duration::from_millis(1500)).map(|_| ()))
    };
    from(CLIENT_IPS6[0]).expect("a client inside the source ranges connects");
    assert!(from(CLIENT_IPS6[1]).is_err(), "a client outside the source ranges must not connect");
}
