//! The real agent on `--manifests` with a dual-stack Service and an IPv6-only Service: the
//! IPv6 frontends and backends land in SERVICES6 / BACKENDS6 (ids shared with IPv4), the
//! Node's IPv6 facts in NODE_CONFIG6, the CLI prints both families, a removed IPv6
//! endpoint disappears, and a restart writes nothing. (IPv6 traffic itself is the
//! datapath's part; this checks what the control plane programs.)
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData};
use proxy_common::port_from_map;
use proxy_common::{Backend6, NodeConfig6, ServiceKey6, ServiceValue, map_names as n, nat_defaults};
use proxy_tests::{
    agent::{Agent, TempDir, cli, converge, slice_yaml},
    harness::{PinDir, require_root},
    netns::{Topology, wait_for},
};
use proxy_userspace::dataplane::maps::addr::{ip6_from_map, ip6_to_map};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: &str = "fd00:96::10";
const VIP6_ONLY: &str = "fd00:96::20";
const NODE_IP6: &str = "fd00:1::10";

fn dual_service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: ClusterIP\n  \
         clusterIP: {VIP4}\n  clusterIPs: [{VIP4}, \"{VIP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  \
         ipFamilyPolicy: RequireDualStack\n  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n"
    )
}

fn v6_only_service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web6\n  namespace: default\nspec:\n  type: ClusterIP\n  \
         clusterIP: \"{VIP6_ONLY}\"\n  clusterIPs: [\"{VIP6_ONLY}\"]\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n  \
         ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n"
    )
}

/// An IPv6 EndpointSlice of `service` with ready endpoints on this node.
fn slice6_yaml(service: &str, slice: &str, addrs: &[&str]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  \
         labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv6\nports:\n- name: main\n  port: 8080\n  \
         protocol: TCP\nendpoints:\n"
    );
    for a in addrs {
        s.push_str(&format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n  nodeName: node-a\n"));
    }
    s
}

/// A dual-stack Node: NODE_CONFIG6 gets its IPv6 InternalIP as the SNAT address.
fn dual_node_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  - type: InternalIP\n    \
         address: 192.168.60.1\n  - type: InternalIP\n    address: \"{NODE_IP6}\"\n"
    )
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(pins: &PinDir, name: &str) -> T {
    let data = MapData::from_pin(pins.0.join("maps").join(name)).unwrap();
    T::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// SERVICES6 as (address, port) -> value.
fn services6(pins: &PinDir) -> Vec<(Ipv6Addr, u16, ServiceValue)> {
    let m: HashMap<MapData, ServiceKey6, ServiceValue> = open(pins, n::SERVICES6);
    m.iter().map(Result::unwrap).map(|(k, v)| (ip6_from_map(k.addr), port_from_map(k.port), v)).collect()
}

/// The addresses in BACKENDS6.
fn backends6(pins: &PinDir) -> BTreeSet<Ipv6Addr> {
    let m: HashMap<MapData, u32, Backend6> = open(pins, n::BACKENDS6);
    m.iter().map(Result::unwrap).map(|(_, b)| ip6_from_map(b.addr)).collect()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// `ebpf-proxy services -o json`: frontend address -> backend addresses ("[addr]:port" /
/// "addr:port").
fn cli_services(pins: &PinDir) -> Vec<(String, String, Vec<String>)> {
    let json = cli(&["services", "--bpffs-root", pins.0.to_str().unwrap(), "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let backends = r["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| format!("{}/{}", b["address"].as_str().unwrap(), b["family"].as_str().unwrap()))
                .collect();
            (r["address"].as_str().unwrap().to_string(), r["family"].as_str().unwrap().to_string(), backends)
        })
        .collect()
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn dual_stack_and_ipv6_only_services_from_manifests() {
    require_root("dual_stack_and_ipv6_only_services_from_manifests");
    let mut topo = Topology::single_node(3, 60).expect("topology");
    for i in 1..3 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let dir = TempDir::new("ebpf-proxy-dualstack-").expect("dir");
    let pins = PinDir::new();
    let endpoints: Vec<(&str, Ipv4Addr)> = (1..3).map(|i| (topo.pods[i].name.as_str(), topo.pods[i].ip)).collect();
    dir.write("node.yaml", &dual_node_yaml()).unwrap();
    dir.write("web.yaml", &dual_service_yaml()).unwrap();
    dir.write("web-v4.yaml", &slice_yaml("web", "web-v4", &endpoints, 8080, "TCP")).unwrap();
    dir.write("web-v6.yaml", &slice6_yaml("web", "web-v6", &["fd00:10::1", "fd00:10::2"])).unwrap();
    dir.write("web6.yaml", &v6_only_service_yaml()).unwrap();
    dir.write("web6-v6.yaml", &slice6_yaml("web6", "web6-v6", &["fd00:10::3"])).unwrap();
    let args = ["--manifests", dir.0.to_str().unwrap(), "--node-name", "node-a"];
    let mut agent = Agent::start(&topo.node, &pins.0, 10261, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("agent ready");

    // IPv4 still flows through the dual-stack Service's IPv4 ClusterIP.
    converge(&topo.pods[0].ns, (VIP4, 80).into(), &["pod1", "pod2"]);

    // SERVICES6 holds both IPv6 ClusterIPs, BACKENDS6 the three IPv6 endpoints; the ids
    // are not reused by the IPv4 frontend (one id space).
    let s6 = services6(&pins);
    let addrs: BTreeSet<(Ipv6Addr, u16)> = s6.iter().map(|(a, p, _)| (*a, *p)).collect();
    assert_eq!(addrs, [(v6(VIP6), 80), (v6(VIP6_ONLY), 80)].into_iter().collect());
    assert!(s6.iter().all(|(a, _, v)| v.count == if *a == v6(VIP6) { 2 } else { 1 }), "{s6:?}");
    assert_eq!(backends6(&pins), ["fd00:10::1", "fd00:10::2", "fd00:10::3"].map(v6).into_iter().collect());
    let cfg6: Array<MapData, NodeConfig6> = open(&pins, n::NODE_CONFIG6);
    let cfg6 = cfg6.get(&0, 0).unwrap();
    assert_eq!(cfg6.snat_addr, ip6_to_map(v6(NODE_IP6)), "the Node's IPv6 InternalIP");
    assert_eq!(cfg6.hairpin_addr, ip6_to_map(Ipv6Addr::from(nat_defaults::HAIRPIN_ADDR6)));

    // The CLI shows both families, IPv6 in standard form with its family.
    let rows = cli_services(&pins);
    let find = |addr: &str| rows.iter().find(|r| r.0 == addr).unwrap_or_else(|| panic!("{addr} in {rows:?}"));
    assert_eq!(find("10.96.0.10").1, "IPv4");
    assert_eq!(find(VIP6).1, "IPv6");
    assert_eq!(find(VIP6).2, vec!["fd00:10::1/IPv6", "fd00:10::2/IPv6"]);
    assert_eq!(find(VIP6_ONLY).2, vec!["fd00:10::3/IPv6"]);
    assert!(find("10.96.0.10").2.iter().all(|b| b.ends_with("/IPv4")));
    let root = pins.0.to_str().unwrap();
    let table = cli(&["services", "--bpffs-root", root]).unwrap();
    for part in ["[fd00:96::10]:80/TCP", "[fd00:10::1]:8080", "[fd00:96::20]:80/TCP", "default/web6:main"] {
        assert!(table.contains(part), "{part} in\n{table}");
    }
    let backends = cli(&["backends", "--bpffs-root", root]).unwrap();
    assert!(backends.contains("[fd00:10::3]:8080/TCP"), "{backends}");
    cli(&["conntrack", "--bpffs-root", root]).expect("conntrack reads both tables");
    cli(&["conntrack", "--bpffs-root", root, "-o", "json"]).expect("conntrack json");
    assert_eq!(agent.metric(&topo.node, "ebpf_proxy_frontends_programmed{family=\"IPv6\"}").unwrap(), 2.0);
    assert_eq!(agent.metric(&topo.node, "ebpf_proxy_frontends_programmed{family=\"IPv4\"}").unwrap(), 1.0);

    // A removed IPv6 endpoint leaves the CLI and BACKENDS6.
    dir.write("web-v6.yaml", &slice6_yaml("web", "web-v6", &["fd00:10::1"])).unwrap();
    wait_for(Duration::from_secs(5), "IPv6 endpoint removed", || {
        (!backends6(&pins).contains(&v6("fd00:10::2"))).then_some(())
    })
    .unwrap();
    assert_eq!(find_backends(&pins, VIP6), vec!["fd00:10::1/IPv6"]);
    assert!(services6(&pins).iter().any(|(a, _, v)| *a == v6(VIP6) && v.count == 1));

    // A restart reads both families back and writes nothing.
    agent.kill();
    let agent = Agent::start(&topo.node, &pins.0, 10261, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("agent ready after restart");
    assert_eq!(agent.metric(&topo.node, "ebpf_proxy_map_writes_total").unwrap(), 0.0);

    // Deleting the IPv6-only Service empties its SERVICES6 entry; the dual-stack one stays.
    dir.remove("web6.yaml").unwrap();
    wait_for(Duration::from_secs(5), "IPv6-only service removed", || {
        (services6(&pins).iter().all(|(a, _, _)| *a != v6(VIP6_ONLY))).then_some(())
    })
    .unwrap();
    assert!(!backends6(&pins).contains(&v6("fd00:10::3")));
    drop(agent);
}

fn find_backends(pins: &PinDir, addr: &str) -> Vec<String> {
    cli_services(pins).into_iter().find(|r| r.0 == addr).map(|r| r.2).unwrap_or_default()
}

/// An IPv6 next hop XDP found no neighbour for (queued in NEIGH_MISSES6) is resolved by the
/// agent through rtnetlink (`NTF_USE`, a neighbour solicitation) and the miss is taken off
/// the map, as for IPv4.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn ipv6_neighbour_misses_are_resolved() {
    require_root("ipv6_neighbour_misses_are_resolved");
    let topo = Topology::single_node(1, 61).expect("topology");
    let dir = TempDir::new("ebpf-proxy-dualstack-").expect("dir");
    let pins = PinDir::new();
    dir.write("node.yaml", &dual_node_yaml()).unwrap();
    let args = ["--manifests", dir.0.to_str().unwrap(), "--node-name", "node-a"];
    let agent = Agent::start(&topo.node, &pins.0, 10262, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("agent ready");

    let host_if = topo.pods[0].host_if.clone();
    let ifindex = topo.node.run(|| nix::net::if_::if_nametoindex(host_if.as_str())).expect("ifindex");
    let next_hop = v6("fd00:99::5");
    let mut misses: HashMap<MapData, proxy_common::NeighKey6, u64> = open(&pins, n::NEIGH_MISSES6);
    misses.insert(proxy_common::NeighKey6 { ifindex, addr: ip6_to_map(next_hop) }, 1, 0).unwrap();

    let shown = wait_for(Duration::from_secs(5), "IPv6 neighbour entry", || {
        let out = topo.node.ip(&["-6", "neigh", "show", "dev", &host_if]).ok()?;
        out.contains("fd00:99::5").then_some(out)
    })
    .unwrap();
    eprintln!("neighbour table: {shown}");
    wait_for(Duration::from_secs(5), "miss taken off NEIGH_MISSES6", || misses.keys().next().is_none().then_some(()))
        .unwrap();
    drop(agent);
}
