//! A node namespace with a client pod and three backend pods; the TC programs attached
//! inside the node namespace only. Real TCP and UDP through the ClusterIP.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use proxy_tests::{client, harness::*, netns::*};
use proxy_userspace::{dataplane::attach::attach_pod_interface, model::Protocol};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");

/// The datapath loaded and attached to every pod veth of `topo`, inside its node namespace.
fn attached_dataplane(topo: &Topology) -> TestDataplane {
    let mut dp = TestDataplane::load();
    let root = dp.pins.0.clone();
    topo.node.run(|| {
        for p in &topo.pods {
            attach_pod_interface(&mut dp.programs, &root, &p.host_if).expect("attach");
        }
    });
    dp
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn clusterip_through_pod_veths() {
    require_root("clusterip_through_pod_veths");
    let mut topo = Topology::single_node(4, 0).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let pod_ips: Vec<Ipv4Addr> = topo.pods.iter().map(|p| p.ip).collect();
    let mut dp = attached_dataplane(&topo);
    let backends = |n: usize| -> Vec<(Ipv4Addr, u16)> { pod_ips[1..=n].iter().map(|ip| (*ip, 8080)).collect() };
    let program = |dp: &mut TestDataplane, n: usize| {
        let s = state(vec![
            (frontend(VIP, 80, Protocol::Tcp), entry("web", &backends(n))),
            (frontend(VIP, 80, Protocol::Udp), entry("web", &backends(n))),
        ]);
        let r = dp.syncer.apply(&s);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    };
    program(&mut dp, 3);
    let vip: SocketAddr = (VIP, 80).into();
    let client = &topo.pods[0].ns;
    // Servers start asynchronously: wait until one answers.
    client
        .run(|| wait_for(Duration::from_secs(5), "a backend to answer", || client::tcp_name(vip).ok()))
        .expect("service reachable");

    // TCP: every connection succeeds and all three backends serve.
    let names = client.run(|| (0..60).map(|_| client::tcp_name(vip)).collect::<Vec<_>>());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        *seen.entry(n.expect("tcp connection through the VIP")).or_default() += 1;
    }
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), vec!["pod1", "pod2", "pod3"], "{seen:?}");

    // UDP: every reply comes from VIP:80.
    let replies = client.run(|| (0..30).map(|_| client::udp_name(vip)).collect::<Vec<_>>());
    let mut useen = BTreeMap::new();
    for r in replies {
        let (name, from) = r.expect("udp reply");
        assert_eq!(from, vip, "UDP reply source");
        *useen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(useen.len(), 3, "{useen:?}");

    // Hold a connection to pod3, then remove pod3 from the service.
    let mut held = client
        .run(|| (0..200).find_map(|_| client::Held::open(vip).ok().filter(|h| h.first == "pod3")))
        .expect("a connection to pod3");
    program(&mut dp, 2);
    let after = client.run(|| (0..60).map(|_| client::tcp_name(vip)).collect::<Vec<_>>());
    for n in after {
        let n = n.expect("connection after removal");
        assert_ne!(n, "pod3", "new connection reached the removed backend");
    }
    let again = client.run(|| held.ask());
    assert_eq!(again.expect("held connection still works"), "pod3");
}

/// A Service without endpoints refuses a pod's connections at once, as kube-proxy's REJECT
/// does: TCP `connect()` fails with ECONNREFUSED (a reset, not a timeout) and a connected
/// UDP socket gets ECONNREFUSED from the ICMP port unreachable.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn service_without_endpoints_refuses_pods_at_once() {
    require_root("service_without_endpoints_refuses_pods_at_once");
    let topo = Topology::single_node(1, 1).expect("topology");
    let mut dp = attached_dataplane(&topo);
    let r = dp.syncer.apply(&state(vec![
        (frontend(VIP, 80, Protocol::Tcp), entry("empty", &[])),
        (frontend(VIP, 53, Protocol::Udp), entry("empty", &[])),
    ]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let client = &topo.pods[0].ns;
    let (tcp, took) = client.run(|| {
        let t = std::time::Instant::now();
        let r = std::net::TcpStream::connect_timeout(&(VIP, 80).into(), Duration::from_secs(3));
        (r.map(drop), t.elapsed())
    });
    let err = tcp.expect_err("connect to a Service without endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(took < Duration::from_millis(500), "refused at once, not after a timeout: {took:?}");

    let udp = client.run(|| -> std::io::Result<usize> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect((VIP, 53))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send(b"query")?;
        s.recv(&mut [0u8; 64])
    });
    let err = udp.expect_err("a reply from a Service without endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "ICMP port unreachable reached the socket: {err}");
}

/// loadBalancerSourceRanges hold for pods too: a pod outside the ranges cannot reach the
/// LoadBalancer IP (upstream's firewall check drops it), a pod inside can, and the
/// Service's ClusterIP stays open to both.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn source_ranges_keep_pods_outside_them_off_the_lb_ip() {
    require_root("source_ranges_keep_pods_outside_them_off_the_lb_ip");
    const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    let mut topo = Topology::single_node(3, 2).expect("topology");
    topo.start_server(SERVER, 2, 8080).expect("server");
    let mut dp = attached_dataplane(&topo);
    // Only pod1's address is in the ranges; pod0 is outside.
    let (outside, inside, server) = (&topo.pods[0], &topo.pods[1], topo.pods[2].ip);
    let mut lb = entry("web", &[(server, 8080)]);
    lb.kind = proxy_userspace::model::FrontendKind::LoadBalancer;
    lb.source_ranges = vec![proxy_userspace::model::IpPrefix { addr: inside.ip.into(), len: 32 }];
    let r = dp.syncer.apply(&state(vec![
        (frontend(VIP, 80, Protocol::Tcp), entry("web", &[(server, 8080)])),
        (frontend(LB_IP, 80, Protocol::Tcp), lb),
    ]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let (vip, lb_ip): (SocketAddr, SocketAddr) = ((VIP, 80).into(), (LB_IP, 80).into());
    inside
        .ns
        .run(|| wait_for(Duration::from_secs(5), "the server to answer", || client::tcp_name(vip).ok()))
        .expect("service reachable");
    assert_eq!(inside.ns.run(|| client::tcp_name(lb_ip)).expect("inside the ranges"), "pod2");
    assert_eq!(outside.ns.run(|| client::tcp_name(vip)).expect("ClusterIP open to every pod"), "pod2");
    let blocked = outside.ns.run(|| std::net::TcpStream::connect_timeout(&lb_ip, Duration::from_millis(800)));
    assert!(blocked.is_err(), "a pod outside the ranges reached the LB IP");
}
