//! A dual-stack node with the real agent on `--manifests`: pods hold an IPv4 /32 and an
//! IPv6 /128 (IPv6 default route via a link-local gateway), and one Service with
//! `ipFamilyPolicy: RequireDualStack` is reached through both of its ClusterIPs, over TCP
//! and UDP, from a pod (issue 10, test 2).
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, TempDir, converge, names, under_load},
    client,
    harness::{PinDir, require_root},
    netns::{Pod, Topology},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const HTTP_PORT: u16 = 10291;

fn service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: ClusterIP\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {VIP4}\n  \
         clusterIPs: [\"{VIP4}\", \"{VIP6}\"]\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  \
         - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}\n"
    )
}

/// One EndpointSlice of `family` ("IPv4" / "IPv6") with `pods` as ready endpoints.
fn slice_yaml(family: &str, pods: &[&Pod]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-{}\n  namespace: default\n  \
         labels:\n    kubernetes.io/service-name: web\naddressType: {family}\nports:\n\
         - {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: udp, port: 8080, protocol: UDP}}\nendpoints:\n",
        family.to_lowercase()
    );
    for pod in pods {
        let addr: IpAddr = if family == "IPv6" { pod.ip6.expect("dual-stack pod").into() } else { pod.ip.into() };
        s.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
             nodeName: node-a\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
            pod.name
        ));
    }
    s
}

/// Names answering UDP through `vip` over `n` datagrams; every reply must come from `vip`
/// itself (a reply from the backend's own address would be dropped by a connected client).
fn udp_names(topo: &Topology, vip: SocketAddr, n: usize) -> BTreeSet<String> {
    topo.pods[0].ns.run(|| {
        (0..n)
            .map(|i| {
                let (name, from) = client::udp_name(vip).unwrap_or_else(|e| panic!("UDP #{i} to {vip}: {e}"));
                assert_eq!(from, vip, "UDP reply #{i} not from the ClusterIP");
                name
            })
            .collect()
    })
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn dual_stack_service_through_both_cluster_ips() {
    require_root("dual_stack_service_through_both_cluster_ips");
    let mut topo = Topology::dual_stack(4, 61).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let dir = TempDir::new("ebpf-proxy-ds-").expect("dir");
    let pins = PinDir::new();
    let backends: Vec<&Pod> = topo.pods[1..].iter().collect();
    dir.write("web.yaml", &service_yaml()).unwrap();
    dir.write("web-v4.yaml", &slice_yaml("IPv4", &backends)).unwrap();
    dir.write("web-v6.yaml", &slice_yaml("IPv6", &backends)).unwrap();
    let d = dir.0.to_str().unwrap().to_string();
    let args = ["--manifests", d.as_str(), "--node-name", "node-a"];
    let mut agent = Agent::start(&topo.node, &pins.0, HTTP_PORT, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");

    let all: BTreeSet<String> = ["pod1", "pod2", "pod3"].iter().map(|s| s.to_string()).collect();
    let (v4, v6): (SocketAddr, SocketAddr) = ((VIP4, 80).into(), (VIP6, 80).into());
    let client = &topo.pods[0].ns;
    for vip in [v4, v6] {
        // TCP: every backend of the family is reached (30 connections over 3 backends).
        converge(client, vip, &["pod1", "pod2", "pod3"]);
        // The application sees the ClusterIP as its peer.
        let peer = client.run(|| client::Held::open(vip).and_then(|h| h.peer())).expect("held");
        assert_eq!(peer, vip, "TCP peer");
        assert_eq!(udp_names(&topo, vip, 30), all, "UDP backends through {vip}");
    }

    // Backend removal in the IPv6 slice only: the IPv6 ClusterIP stops using pod3 and the
    // IPv4 one keeps all three.
    dir.write("web-v6.yaml", &slice_yaml("IPv6", &backends[..2])).unwrap();
    converge(client, v6, &["pod1", "pod2"]);
    assert_eq!(names(client, v4, 30), all, "IPv4 backends after an IPv6-only change");

    // kill -9 and restart on the same pins while a client loops through the IPv6 ClusterIP:
    // established and new connections keep working.
    let (ok, failed) = under_load(client, v6, || {
        agent.kill();
        agent = Agent::start(&topo.node, &pins.0, HTTP_PORT, &args).expect("agent restart");
        agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready after restart");
    });
    assert!(ok > 0, "no connection completed during the restart");
    assert_eq!(failed, 0, "{failed} of {} connections through [{VIP6}]:80 failed across the restart", ok + failed);
    converge(client, v6, &["pod1", "pod2"]);
}
