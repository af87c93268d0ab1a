//! The uplink XDP program (`from_uplink`) and its TC egress companion (`to_uplink`)
//! through BPF_PROG_TEST_RUN: one test per verdict, bytes in, bytes out, with checksums
//! recomputed independently (etherparse). Forwarding (`bpf_fib_lookup`) runs in a private
//! network namespace with a static route and neighbour entries, so the MACs the program
//! writes can be asserted.
use std::net::Ipv4Addr;

use proxy_common::nat_defaults::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use proxy_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, StatsKey, ct_flags, port_from_map, port_to_map, verdict};
use proxy_tests::harness::*;
use proxy_userspace::{
    dataplane::{
        maps::addr::{ip_from_map, ip_to_map},
        maps::node::{PortRange, node_config},
    },
    model::{FrontendEntry, FrontendKey, FrontendKind, IpPrefix, Protocol},
};

const XDP: &str = "from_uplink";
const TO_UPLINK: &str = "to_uplink";
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
const TC_ACT_UNSPEC: i32 = -1;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 101);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const NODE_PORT: u16 = 30080;

/// MACs of the private forwarding namespace: our uplink, node 2, the client.
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];

fn program(dp: &mut TestDataplane, entries: Vec<(FrontendKey, FrontendEntry)>) {
    let r = dp.syncer.apply(&state(entries));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), dir: u8) -> CtKey {
    CtKey {
        src_addr: ip_to_map(src.0),
        dst_addr: ip_to_map(dst.0),
        src_port: port_to_map(src.1),
        dst_port: port_to_map(dst.1),
        proto: proxy_common::PROTO_TCP,
        dir,
        _pad: 0,
    }
}

fn per_service(dp: &TestDataplane, v: u32) -> u64 {
    let ids: Vec<u32> = dp.maps().services.iter().filter_map(Result::ok).map(|(_, v)| v.id).collect();
    ids.iter()
        .filter_map(|id| dp.maps().service_stats.get(&StatsKey { svc_id: *id, verdict: v }, 0).ok())
        .map(|pc| pc.iter().map(|c| c.packets).sum::<u64>())
        .sum()
}

fn ttl(frame: &[u8]) -> u8 {
    frame[14 + 8]
}

/// The node's network: uplink `up0` (192.168.100.1/24), node 2 and the client as permanent
/// neighbours, node 2's pod CIDR routed via node 2, forwarding on.
/// The XDP metadata `from_uplink` leaves for `uplink_handoff` (proxy-ebpf `handoff`): the
/// magic "epHO", then the egress ifindex, in host order.
fn handoff_tag(ifindex: u32) -> [u8; 8] {
    let mut tag = [0u8; 8];
    tag[..4].copy_from_slice(&0x6570_484f_u32.to_ne_bytes());
    tag[4..].copy_from_slice(&ifindex.to_ne_bytes());
    tag
}

fn fwd_ns() -> UplinkNs {
    let net = UplinkNs::new("epx-fwd-", UPLINK_MAC);
    let ns = &net.ns;
    ns.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "up0"]).unwrap();
    ns.ip(&["route", "add", "10.244.2.0/24", "via", &NODE2.to_string(), "dev", "up0"]).unwrap();
    // A gateway nobody has resolved: forwarding there must queue a neighbour miss.
    ns.ip(&["route", "add", "10.244.3.0/24", "via", "192.168.100.3", "dev", "up0"]).unwrap();
    for (ip, m) in [(NODE2, NODE2_MAC), (CLIENT, CLIENT_MAC)] {
        ns.ip(&["neigh", "replace", &ip.to_string(), "lladdr", &mac_str(m), "nud", "permanent", "dev", "up0"]).unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    net
}

/// Local backend: DNAT only, XDP_PASS to the stack (which routes to the pod); the client
/// address is preserved. The pod's reply leaves through the uplink, where `to_uplink` puts
/// node:nodePort back as its source.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_local_backend_dnat_pass_and_reverse_on_uplink_egress() {
    require_root("xdp_local_backend_dnat_pass_and_reverse_on_uplink_egress");
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(LOCAL_POD, 8080, true)]))],
    );
    let client = (CLIENT, 40000);
    let frame = tcp_frame(client, (NODE, NODE_PORT), b"hello");
    let (v, out) = dp.run(XDP, &frame);
    assert_eq!(v, XDP_PASS);
    let d = decode(&out);
    assert_eq!(d.dst, (LOCAL_POD, 8080));
    assert_eq!(d.src, client, "client address preserved");
    assert!(d.ip_csum_ok && d.l4_csum_ok, "checksums: {d:?}");
    assert_eq!(d.payload, b"hello");
    assert_eq!(&out[..12], &frame[..12], "MACs untouched: the stack routes it");
    assert_eq!(ttl(&out), 64, "not forwarded by XDP, TTL untouched");

    let fwd = dp.maps().ct_get(&ct_key(client, (NODE, NODE_PORT), CT_DIR_FORWARD)).expect("forward ct");
    assert_eq!(fwd.flags & ct_flags::SNAT, 0);
    let rev = dp.maps().ct_get(&ct_key((LOCAL_POD, 8080), client, CT_DIR_REPLY)).expect("reply ct");
    assert_eq!((ip_from_map(rev.nat_addr), port_from_map(rev.nat_port)), (NODE, NODE_PORT));

    // Established: same translation.
    for _ in 0..5 {
        let (v, out) = dp.run(XDP, &frame);
        assert_eq!((v, decode(&out).dst), (XDP_PASS, (LOCAL_POD, 8080)));
    }
    // The pod's reply, leaving through the uplink.
    let reply = tcp_frame((LOCAL_POD, 8080), client, b"world");
    let (v, out) = dp.run(TO_UPLINK, &reply);
    assert_eq!(v, TC_ACT_UNSPEC);
    let r = decode(&out);
    assert_eq!((r.src, r.dst), ((NODE, NODE_PORT), client));
    assert!(r.ip_csum_ok && r.l4_csum_ok, "{r:?}");
    // The same reply arriving on XDP (it never does; a pod flow's reply would) is passed.
    let (v, out) = dp.run(XDP, &reply);
    assert_eq!((v, out), (XDP_PASS, reply));

    assert_eq!(per_service(&dp, verdict::NEW_FLOW), 1);
    assert_eq!(per_service(&dp, verdict::ESTABLISHED), 5);
    assert_eq!(per_service(&dp, verdict::REVERSE_NAT), 1);
}

/// UDP through XDP: checksums fixed, a zero ("none") UDP checksum stays zero.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_udp_checksums_and_zero_checksum() {
    require_root("xdp_udp_checksums_and_zero_checksum");
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Udp), ext_entry(FrontendKind::NodePort, &[(LOCAL_POD, 8080, true)]))],
    );
    let frame = udp_frame((CLIENT, 5353), (NODE, NODE_PORT), b"q");
    let (v, out) = dp.run(XDP, &frame);
    assert_eq!(v, XDP_PASS);
    let d = decode(&out);
    assert_eq!(d.dst, (LOCAL_POD, 8080));
    assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
    let mut zero = udp_frame((CLIENT, 5354), (NODE, NODE_PORT), b"q");
    let csum = 14 + 20 + 6;
    zero[csum..csum + 2].copy_from_slice(&[0, 0]);
    let (v, out) = dp.run(XDP, &zero);
    assert_eq!(v, XDP_PASS);
    assert_eq!(&out[csum..csum + 2], &[0, 0], "no checksum stays no checksum");
    assert!(decode(&out).ip_csum_ok);
}

/// Remote backend: DNAT + SNAT to the node address with a port from the SNAT range, TTL
/// decremented, MACs from the FIB/neighbour tables, sent back out of the uplink (XDP_TX).
/// The backend's reply is translated back to node:nodePort -> client and forwarded to the
/// client's MAC. A later packet keeps backend and port; a FIN marks the flow closing.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_remote_backend_dnat_snat_forward_and_reverse() {
    require_root("xdp_remote_backend_dnat_snat_forward_and_reverse");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(REMOTE_POD, 8080, false)]))],
    );
    let client = (CLIENT, 40000);
    let frame = tcp_frame(client, (NODE, NODE_PORT), b"hello");
    let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &frame, up0));
    assert_eq!(v, XDP_TX, "forwarded out of the interface it came in on");
    let d = decode(&out);
    assert_eq!(d.dst, (REMOTE_POD, 8080));
    assert_eq!(d.src.0, NODE, "source NATed to the node address");
    let snat_port = d.src.1;
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port), "SNAT port {snat_port} outside the default range");
    assert!(d.ip_csum_ok && d.l4_csum_ok, "checksums: {d:?}");
    assert_eq!(d.payload, b"hello");
    assert_eq!(&out[..6], &NODE2_MAC, "destination MAC: node 2 (the route's gateway)");
    assert_eq!(&out[6..12], &UPLINK_MAC, "source MAC: our uplink");
    assert_eq!(ttl(&out), 63);

    let fwd = dp.maps().ct_get(&ct_key(client, (NODE, NODE_PORT), CT_DIR_FORWARD)).expect("forward ct");
    assert_ne!(fwd.flags & ct_flags::SNAT, 0);
    assert_eq!((ip_from_map(fwd.snat_addr), port_from_map(fwd.snat_port)), (NODE, snat_port));
    let rev = dp.maps().ct_get(&ct_key((REMOTE_POD, 8080), (NODE, snat_port), CT_DIR_REPLY)).expect("reply ct");
    assert_ne!(rev.flags & ct_flags::SNAT, 0);
    assert_eq!((ip_from_map(rev.snat_addr), port_from_map(rev.snat_port)), client);

    // Same flow again: same backend, same SNAT port.
    let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &frame, up0));
    assert_eq!(v, XDP_TX);
    assert_eq!(decode(&out).src, (NODE, snat_port));

    // From another interface (lo here) the egress device is not the ingress one, which XDP
    // may not be able to transmit on (a tunnel): the translated packet is passed, tagged in
    // its XDP metadata (test_run returns it in front of the frame) for the uplink's TC
    // ingress (`uplink_handoff`) to send out of up0.
    let (v, out) = net.ns.run(|| dp.run(XDP, &frame));
    assert_eq!(v, XDP_PASS, "egress interface differs from ingress: handed to TC");
    assert_eq!(out[..8], handoff_tag(up0), "metadata: the hand-off magic, then the egress ifindex");
    let d = decode(&out[8..]);
    assert_eq!((d.src, d.dst), ((NODE, snat_port), (REMOTE_POD, 8080)), "translated before the hand-off");
    assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");

    // The backend's reply, arriving from node 2.
    let reply = tcp_frame((REMOTE_POD, 8080), (NODE, snat_port), b"world");
    let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &reply, up0));
    assert_eq!(v, XDP_TX);
    let r = decode(&out);
    assert_eq!((r.src, r.dst), ((NODE, NODE_PORT), client), "both translations undone");
    assert!(r.ip_csum_ok && r.l4_csum_ok, "{r:?}");
    assert_eq!(r.payload, b"world");
    assert_eq!(&out[..6], &CLIENT_MAC);
    assert_eq!(&out[6..12], &UPLINK_MAC);
    assert_eq!(ttl(&out), 63);

    // The backend closes: the forward entry is marked closing, so a new SYN on the tuple
    // is balanced afresh.
    let mut fin = tcp_frame((REMOTE_POD, 8080), (NODE, snat_port), b"");
    fin[14 + 20 + 13] = 0x11;
    net.ns.run(|| dp.run_xdp_on(XDP, &fin, up0));
    let fwd = dp.maps().ct_get(&ct_key(client, (NODE, NODE_PORT), CT_DIR_FORWARD)).unwrap();
    assert_ne!(fwd.flags & ct_flags::CLOSING, 0, "FIN from the backend marks the forward entry");

    assert_eq!(per_service(&dp, verdict::NEW_FLOW), 1);
    assert_eq!(per_service(&dp, verdict::ESTABLISHED), 2);
    assert_eq!(per_service(&dp, verdict::REVERSE_NAT), 2);
}

/// An ExternalIP/LB frontend to a remote backend is source-NATed to the configured node
/// address (not to the LB IP, which the backend's node would not route back to us).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_snat_uses_configured_node_address() {
    require_root("xdp_snat_uses_configured_node_address");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    dp.node().set_config(&node_config(Some(NODE), None, PortRange::default())).unwrap();
    program(
        &mut dp,
        vec![(ext(LB_IP, 80, Protocol::Tcp), ext_entry(FrontendKind::LoadBalancer, &[(REMOTE_POD, 8080, false)]))],
    );
    let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &tcp_frame((CLIENT, 41000), (LB_IP, 80), b""), up0));
    assert_eq!(v, XDP_TX);
    let d = decode(&out);
    assert_eq!((d.src.0, d.dst), (NODE, (REMOTE_POD, 8080)));
    let reply = tcp_frame((REMOTE_POD, 8080), d.src, b"");
    let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &reply, up0));
    assert_eq!(v, XDP_TX);
    let r = decode(&out);
    assert_eq!((r.src, r.dst), ((LB_IP, 80), (CLIENT, 41000)));
}

/// SNAT ports are claimed per backend with BPF_NOEXIST: with a 4-port range, four flows
/// to one backend get four different ports, a fifth finds none (dropped, counted `error`).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_snat_ports_never_collide() {
    require_root("xdp_snat_ports_never_collide");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    dp.node().set_config(&node_config(None, None, PortRange { min: 62000, max: 62003 })).unwrap();
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(REMOTE_POD, 8080, false)]))],
    );
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..4u16 {
        let src = (Ipv4Addr::new(192, 168, 100, 100 + i as u8), 40000);
        let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &tcp_frame(src, (NODE, NODE_PORT), b""), up0));
        assert_eq!(v, XDP_TX, "flow {i}");
        ports.insert(decode(&out).src.1);
    }
    assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![62000, 62001, 62002, 62003]);
    let before = per_service(&dp, verdict::ERROR);
    let (v, _) = net.ns.run(|| dp.run_xdp_on(XDP, &tcp_frame((CLIENT, 50000), (NODE, NODE_PORT), b""), up0));
    assert_eq!(v, XDP_DROP, "range exhausted");
    assert_eq!(per_service(&dp, verdict::ERROR), before + 1);
}

/// No neighbour entry for the next hop: dropped (`no_route`), and the next hop is queued
/// in NEIGH_MISSES for the agent to resolve.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_unresolved_next_hop_is_queued_for_the_agent() {
    require_root("xdp_unresolved_next_hop_is_queued_for_the_agent");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    let far = Ipv4Addr::new(10, 244, 3, 10);
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(far, 8080, false)]))],
    );
    let (v, _) = net.ns.run(|| dp.run_xdp_on(XDP, &tcp_frame((CLIENT, 40000), (NODE, NODE_PORT), b""), up0));
    assert_eq!(v, XDP_DROP);
    assert_eq!(per_service(&dp, verdict::NO_ROUTE), 1);
    let misses = dp.node().take_neigh_misses();
    assert_eq!(misses, vec![(up0, Ipv4Addr::new(192, 168, 100, 3).into())], "the gateway, on the uplink");
    assert!(dp.node().take_neigh_misses().is_empty(), "taken misses are removed");
}

/// loadBalancerSourceRanges: an allowed client gets through, another is dropped and
/// counted; no conntrack entry for it.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_source_ranges_drop_other_clients() {
    require_root("xdp_source_ranges_drop_other_clients");
    let mut dp = TestDataplane::load();
    let mut e = ext_entry(FrontendKind::LoadBalancer, &[(LOCAL_POD, 8080, true)]);
    e.source_ranges = vec![
        IpPrefix { addr: CLIENT.into(), len: 32 },
        IpPrefix { addr: Ipv4Addr::new(198, 51, 100, 0).into(), len: 24 },
    ];
    program(&mut dp, vec![(ext(LB_IP, 80, Protocol::Tcp), e)]);
    let (v, out) = dp.run(XDP, &tcp_frame((CLIENT, 40000), (LB_IP, 80), b""));
    assert_eq!((v, decode(&out).dst), (XDP_PASS, (LOCAL_POD, 8080)));
    let (v, out) = dp.run(XDP, &tcp_frame((Ipv4Addr::new(198, 51, 100, 77), 40000), (LB_IP, 80), b""));
    assert_eq!((v, decode(&out).dst), (XDP_PASS, (LOCAL_POD, 8080)), "inside an allowed /24");
    let denied = tcp_frame((OTHER_CLIENT, 40000), (LB_IP, 80), b"");
    let (v, _) = dp.run(XDP, &denied);
    assert_eq!(v, XDP_DROP);
    assert_eq!(per_service(&dp, verdict::SOURCE_RANGE_DROP), 1);
    assert!(dp.maps().ct_get(&ct_key((OTHER_CLIENT, 40000), (LB_IP, 80), CT_DIR_FORWARD)).is_none());
}

/// No (local) endpoint: a TCP SYN is answered with a RST built in place (XDP_TX), so the
/// client fails at once; UDP is dropped. Both counted `no_backend`.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_no_backend_answers_tcp_with_reset() {
    require_root("xdp_no_backend_answers_tcp_with_reset");
    let mut dp = TestDataplane::load();
    let mut e = ext_entry(FrontendKind::NodePort, &[]);
    e.local_only = true;
    program(&mut dp, vec![(ext(NODE, NODE_PORT, Protocol::Tcp), e.clone()), (ext(NODE, NODE_PORT, Protocol::Udp), e)]);
    let syn = tcp_frame((CLIENT, 40000), (NODE, NODE_PORT), b"data");
    let (v, out) = dp.run(XDP, &syn);
    assert_eq!(v, XDP_TX);
    assert_eq!(out.len(), 54, "Ethernet + IPv4 + TCP, payload trimmed");
    assert_eq!(&out[..6], &syn[6..12]);
    assert_eq!(&out[6..12], &syn[..6]);
    let d = decode(&out);
    assert_eq!((d.src, d.dst), ((NODE, NODE_PORT), (CLIENT, 40000)));
    assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
    let tcp = &out[34..];
    assert_eq!(tcp[13], 0x14, "RST|ACK");
    assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 0, "seq");
    assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().unwrap()), 1000 + 1 + 4, "ack = seq + SYN + payload");
    assert!(dp.maps().ct_len() == 0, "no conntrack for rejected flows");

    let (v, _) = dp.run(XDP, &udp_frame((CLIENT, 5353), (NODE, NODE_PORT), b"q"));
    assert_eq!(v, XDP_DROP);
    assert_eq!(per_service(&dp, verdict::NO_BACKEND), 2);
}

/// Not service traffic: untouched, XDP_PASS, counted.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_non_service_frames_pass_untouched() {
    require_root("xdp_non_service_frames_pass_untouched");
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(LOCAL_POD, 8080, true)]))],
    );
    let mut arp = vec![0xffu8; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("SSH to the node", tcp_frame((CLIENT, 40000), (NODE, 22), b"x"), verdict::PASS),
        ("UDP to a TCP NodePort", udp_frame((CLIENT, 40000), (NODE, NODE_PORT), b"x"), verdict::PASS),
        ("pod traffic between nodes", tcp_frame((REMOTE_POD, 40000), (LOCAL_POD, 8080), b"x"), verdict::PASS),
        ("ARP", arp, verdict::NOT_IP),
        ("truncated", tcp_frame((CLIENT, 40000), (NODE, NODE_PORT), b"")[..40].to_vec(), verdict::MALFORMED),
    ];
    for (name, frame, expect) in cases {
        let before = dp.global(expect);
        let (v, out) = dp.run(XDP, &frame);
        assert_eq!(v, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}: bytes changed");
        assert_eq!(
            dp.global(expect),
            before + 1,
            "{name}: counted as {}",
            proxy_common::Verdict::ALL[expect as usize].name()
        );
    }
    // The internal (pod-side) frontend is not served on the uplink: ClusterIP from outside.
    program(
        &mut dp,
        vec![(frontend(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp), entry("web", &[(LOCAL_POD, 8080)]))],
    );
    let f = tcp_frame((CLIENT, 40000), (Ipv4Addr::new(10, 96, 0, 10), 80), b"");
    assert_eq!(dp.run(XDP, &f), (XDP_PASS, f));
}

/// The incremental checksum update against a from-scratch computation, over many random
/// rewrites (RFC 1624 corner cases: results of 0x0000/0xffff included by sheer volume).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_checksums_match_full_recomputation_for_many_tuples() {
    require_root("xdp_checksums_match_full_recomputation_for_many_tuples");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![
            (ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(REMOTE_POD, 8080, false)])),
            (ext(NODE, NODE_PORT, Protocol::Udp), ext_entry(FrontendKind::NodePort, &[(REMOTE_POD, 8080, false)])),
        ],
    );
    let mut seed = 0x1234_5678u32;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    net.ns.run(|| {
        for i in 0..2000u32 {
            let src = (Ipv4Addr::from(0xc0a8_6400 | (next() & 0xff)), (next() % 60000 + 1024) as u16);
            let payload: Vec<u8> = (0..(next() % 40)).map(|_| next() as u8).collect();
            let frame = if i % 2 == 0 {
                tcp_frame(src, (NODE, NODE_PORT), &payload)
            } else {
                udp_frame(src, (NODE, NODE_PORT), &payload)
            };
            let (v, out) = dp.run_xdp_on(XDP, &frame, up0);
            assert_eq!(v, XDP_TX, "flow {i} {src:?}");
            let d = decode(&out);
            assert!(d.ip_csum_ok && d.l4_csum_ok, "flow {i}: {d:?}");
        }
    });
}

/// Per-packet cost of the XDP program, reported (not asserted). Each figure is the mean
/// in-kernel time of 50,000 single runs on a fresh copy of the frame (see
/// `TestDataplane::time_fresh`).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_report_per_packet_cost() {
    require_root("xdp_report_per_packet_cost");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![
            (ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(LOCAL_POD, 8080, true)])),
            (ext(NODE, 30081, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(REMOTE_POD, 8080, false)])),
        ],
    );
    let local_hit = tcp_frame((CLIENT, 40000), (NODE, NODE_PORT), b"");
    let miss = tcp_frame((CLIENT, 40000), (NODE, 22), b"");
    let remote = tcp_frame((CLIENT, 40001), (NODE, 30081), b"");
    let (_, out) = net.ns.run(|| dp.run_xdp_on(XDP, &remote, up0));
    let reply = tcp_frame((REMOTE_POD, 8080), decode(&out).src, b"");
    dp.run(XDP, &local_hit);
    let mut arp = vec![0xffu8; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 46]);
    const N: u32 = 50_000;
    let (floor_ns, hit_ns, miss_ns, fwd_ns, rev_ns, miss_repeat_ns) = net.ns.run(|| {
        (
            dp.time_fresh(XDP, &arp, N, Some(up0)),
            dp.time_fresh(XDP, &local_hit, N, Some(up0)),
            dp.time_fresh(XDP, &miss, N, Some(up0)),
            dp.time_fresh(XDP, &remote, N, Some(up0)),
            dp.time_fresh(XDP, &reply, N, Some(up0)),
            // The non-service frame is not rewritten, so `repeat` measures it exactly.
            dp.time(XDP, &miss, 1_000_000),
        )
    });
    eprintln!(
        "XDP test_run, mean of {N} single runs on fresh frames (includes the per-run timer \
         overhead; ARP, the cheapest path, takes {floor_ns:.0} ns): local backend (tracked, DNAT) \
         {hit_ns:.0} ns/packet, non-service {miss_ns:.0} ns, remote backend (tracked, DNAT+SNAT+fib+XDP_TX) \
         {fwd_ns:.0} ns, reverse (SNAT reply, fib, XDP_TX) {rev_ns:.0} ns; non-service with repeat=1000000: \
         {miss_repeat_ns:.0} ns"
    );
    assert!(hit_ns > 0.0 && miss_ns > 0.0 && fwd_ns > 0.0 && rev_ns > 0.0);
}

/// A client reusing one source port towards a NodePort whose backend is on another node
/// (DNAT + SNAT), SYN then FIN, twenty times: translated every time, always with a port of
/// the SNAT range. Each reopen used to leak the previous connection's SNAT port claim, and
/// the tuple has only eight candidates, so the ninth SYN was dropped forever.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_remote_nodeport_tuple_reopened_twenty_times_is_translated_every_time() {
    require_root("xdp_remote_nodeport_tuple_reopened_twenty_times_is_translated_every_time");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(REMOTE_POD, 8080, false)]))],
    );
    let client = (CLIENT, 5353);
    for i in 0..20 {
        let syn = tcp_segment(client, (NODE, NODE_PORT), tcp::SYN, b"");
        let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &syn, up0));
        assert_eq!(v, XDP_TX, "SYN #{i} forwarded");
        let d = decode(&out);
        assert_eq!((d.src.0, d.dst), (NODE, (REMOTE_POD, 8080)), "SYN #{i}");
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&d.src.1), "SYN #{i}: SNAT port {}", d.src.1);
        assert!(d.ip_csum_ok && d.l4_csum_ok, "SYN #{i}: {d:?}");
        let fin = tcp_segment(client, (NODE, NODE_PORT), tcp::FIN | tcp::ACK, b"");
        let (v, _) = net.ns.run(|| dp.run_xdp_on(XDP, &fin, up0));
        assert_eq!(v, XDP_TX, "FIN #{i} forwarded");
    }
    assert_eq!(per_service(&dp, verdict::NEW_FLOW), 20);
    assert_eq!(per_service(&dp, verdict::ERROR), 0);
    assert_eq!(dp.maps().ct_len(), 2, "only the last connection's two entries remain");
}

/// ICMP errors about a source-NATed NodePort flow (issue 12): node 2 (a router on the way)
/// or the remote backend itself reports about the translated packet (node:snat-port ->
/// backend); XDP translates the quote back to client -> node:nodePort, sends the error to
/// the client (from the frontend when the backend sent it) and forwards it like the flow's
/// replies.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_icmp_errors_about_snat_flows_reach_the_client() {
    require_root("xdp_icmp_errors_about_snat_flows_reach_the_client");
    let net = fwd_ns();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    program(
        &mut dp,
        vec![(ext(NODE, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(REMOTE_POD, 8080, false)]))],
    );
    let client = (CLIENT, 40000);
    let (_, sent) = net.ns.run(|| dp.run_xdp_on(XDP, &tcp_frame(client, (NODE, NODE_PORT), &[1u8; 700]), up0));
    let snat_port = decode(&sent).src.1;
    // What node 2 saw: the forwarded packet (TTL already decremented by us).
    let mtu = 1280u16.to_be_bytes();
    for (sender, outer_src) in [(NODE2, NODE2), (REMOTE_POD, NODE)] {
        let err = icmp_error(sender, NODE, (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED), [0, 0, mtu[0], mtu[1]], &sent[14..]);
        let before = dp.global(verdict::ICMP_ERROR);
        let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &err, up0));
        assert_eq!(v, XDP_TX, "forwarded back out towards the client");
        assert_eq!(
            check_icmp_error(&out, true),
            Seen { outer: (outer_src, CLIENT), inner_src: client, inner_dst: (NODE, NODE_PORT) },
            "error from {sender}"
        );
        assert_eq!(&out[..6], &CLIENT_MAC, "to the client's MAC");
        assert_eq!(dp.global(verdict::ICMP_ERROR), before + 1);
    }
    assert_ne!(snat_port, 40000, "the flow was source-NATed");
}
