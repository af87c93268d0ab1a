//! Service CIDRs with real sockets (issue 24 item 3): a pod's TCP connect() to an address
//! inside the Service CIDR that no Service holds fails at once with ECONNREFUSED (the TC
//! program answers the SYN with a reset), the allocated ClusterIP serves, and an address
//! outside the CIDR (another pod) is left alone. Without the Service CIDR the same
//! unallocated address is not refused (it goes where the routes send it).
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use proxy_tests::{client, harness::*, netns::*};
use proxy_userspace::{
    dataplane::attach::attach_pod_interface,
    model::{DesiredState, IpPrefix, Protocol},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");

fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&to, Duration::from_secs(2))
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn unallocated_clusterip_is_refused_with_econnrefused() {
    require_root("unallocated_clusterip_is_refused_with_econnrefused");
    let mut topo = Topology::single_node(3, 0).expect("topology");
    topo.start_server(SERVER, 1, 8080).expect("server");
    topo.start_server(SERVER, 2, 8080).expect("server");
    let mut dp = TestDataplane::load();
    let root = dp.pins.0.clone();
    topo.node.run(|| {
        for p in &topo.pods {
            attach_pod_interface(&mut dp.programs, &root, &p.host_if).expect("attach");
        }
    });
    let desired = |with_cidr: bool| {
        let mut d: DesiredState =
            state(vec![(frontend(VIP, 80, Protocol::Tcp), entry("web", &[(topo.pods[1].ip, 8080)]))]);
        if with_cidr {
            d.service_cidrs.insert("10.96.0.0/16".parse::<IpPrefix>().expect("cidr"));
        }
        d
    };
    let r = dp.syncer.apply(&desired(true));
    assert!(r.errors.is_empty(), "{:?}", r.errors);

    let client_ns = &topo.pods[0].ns;
    let vip: SocketAddr = (VIP, 80).into();
    client_ns
        .run(|| wait_for(Duration::from_secs(5), "the ClusterIP to answer", || client::tcp_name(vip).ok()))
        .expect("allocated ClusterIP served");
    assert_eq!(client_ns.run(|| client::tcp_name(vip)).expect("served"), "pod1");

    // Outside every Service CIDR: left alone (a pod reached directly).
    let other: SocketAddr = (topo.pods[2].ip, 8080).into();
    client_ns.run(|| wait_for(Duration::from_secs(5), "pod2 to answer", || connect(other).ok())).expect("pod2");

    // Unallocated inside the CIDR: refused at once.
    let unallocated: SocketAddr = (UNALLOCATED, 80).into();
    let (res, took) = client_ns.run(|| {
        let t = Instant::now();
        (connect(unallocated), t.elapsed())
    });
    let err = res.expect_err("connect to an unallocated ClusterIP must fail");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(took < Duration::from_secs(1), "refused at once, not timed out: {took:?}");
    // Any port of it.
    let err = client_ns.run(|| connect((UNALLOCATED, 443).into())).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // Without the Service CIDR the address is not refused any more.
    dp.syncer.apply(&desired(false));
    let res = client_ns.run(|| connect(unallocated));
    assert!(
        res.as_ref().err().is_none_or(|e| e.kind() != ErrorKind::ConnectionRefused),
        "no longer refused without the CIDR: {res:?}"
    );
}
