//! A node namespace with a client pod and three backend pods; the TC programs attached
//! inside the node namespace only. Real TCP and UDP through the ClusterIP.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use proxy_tests::{client, harness::*, netns::*};
use proxy_userspace::{
    dataplane::attach::attach_pod_interface,
    model::{FrontendKey, Protocol, Scope},
};

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

/// Issue 19, item 11: a UDP answer larger than the MTU (a large DNS answer with EDNS). The
/// backend's kernel fragments it (veth MTU 1500); both fragments cross the node, and the
/// client's kernel reassembles a datagram from VIP:port: the first fragment alone is not
/// enough, the reassembly needs every fragment translated the same way.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn fragmented_udp_answer_comes_from_the_vip() {
    require_root("fragmented_udp_answer_comes_from_the_vip");
    const ANSWER_LEN: usize = 3000;
    let topo = Topology::dual_stack(2, 3).expect("topology");
    let mut dp = attached_dataplane(&topo);
    let (client, server) = (&topo.pods[0], &topo.pods[1]);
    let (server4, server6) = (server.ip, server.ip6.expect("IPv6 pod address"));
    let vip6: std::net::Ipv6Addr = "fd00:10:96::53".parse().unwrap();
    let v6 = |port| FrontendKey { addr: vip6.into(), port, proto: Protocol::Udp, scope: Scope::Internal };
    let mut e6 = entry("dns", &[]);
    e6.backends =
        vec![proxy_userspace::model::BackendAddr { addr: server6.into(), port: 5353, local: true, terminating: false }];
    let r = dp
        .syncer
        .apply(&state(vec![(frontend(VIP, 53, Protocol::Udp), entry("dns", &[(server4, 5353)])), (v6(53), e6)]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);

    // The backend: answers every datagram with ANSWER_LEN bytes, until the test is done.
    let answer: Vec<u8> = (0..ANSWER_LEN).map(|i| (i % 251) as u8).collect();
    let socks = server.ns.run(|| {
        let s4 = std::net::UdpSocket::bind((server4, 5353)).expect("bind IPv4");
        let s6 = std::net::UdpSocket::bind((server6, 5353)).expect("bind IPv6");
        [s4, s6]
    });
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let servers: Vec<_> = socks
        .into_iter()
        .map(|s| {
            let (done, answer) = (done.clone(), answer.clone());
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
                let mut buf = [0u8; 512];
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((_, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&answer, from);
                    }
                }
            })
        })
        .collect();

    for vip in [SocketAddr::from((VIP, 53)), SocketAddr::from((vip6, 53))] {
        let got = client.ns.run(|| -> std::io::Result<(usize, SocketAddr, Vec<u8>)> {
            let bind: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
            let s = std::net::UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = vec![0u8; 65536];
            // A few tries: the first datagram may race the neighbour resolution.
            let mut last = Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
            for _ in 0..6 {
                s.send_to(b"query", vip)?;
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => return Ok((n, from, buf[..n].to_vec())),
                    Err(e) => last = Err(e),
                }
            }
            last
        });
        let (n, from, data) = got.unwrap_or_else(|e| panic!("{vip}: no answer reassembled: {e}"));
        assert_eq!(from, vip, "the fragmented answer comes from the VIP");
        assert_eq!(n, ANSWER_LEN, "{vip}: the whole answer");
        assert!(data == answer, "{vip}: answer bytes");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in servers {
        t.join().expect("server thread");
    }
}
