//! XDP-only scenarios of the uplink program (`from_uplink`) through BPF_PROG_TEST_RUN: ICMP
//! errors about a source-NATed flow, and the per-packet cost report. The north-south
//! scenarios both families share (local and remote backends, SNAT ports, neighbour misses,
//! source ranges, resets, frames passed untouched) are rows of the tables in datapath.rs,
//! run on the XDP hook. Forwarding (`bpf_fib_lookup`) runs in a private network namespace
//! with a static route and neighbour entries, so the MACs the program writes can be asserted.
use std::net::IpAddr;

use proxy_common::verdict;
use proxy_tests::{family::*, harness::*};
use proxy_userspace::model::{FrontendKind, Protocol};

const XDP: &str = FROM_UPLINK;

fn four(a: IpAddr) -> std::net::Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a}: not IPv4"),
    }
}

/// Per-packet cost of the XDP program, reported (not asserted). Each figure is the mean
/// in-kernel time of 50,000 single runs on a fresh copy of the frame (see
/// `TestDataplane::time_fresh`).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_report_per_packet_cost() {
    require_root("xdp_report_per_packet_cost");
    let a = Family::V4.addrs();
    let (node, client_ip) = (four(a.node), four(a.ext_client));
    let (local_pod, remote_pod) = (four(a.local_pod), four(a.remote_pod));
    let net = fwd_ns(Family::V4);
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    dp.program(vec![
        (ext(node, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(local_pod, 8080, true)])),
        (ext(node, 30081, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(remote_pod, 8080, false)])),
    ]);
    let local_hit = tcp_frame((client_ip, 40000), (node, NODE_PORT), b"");
    let miss = tcp_frame((client_ip, 40000), (node, 22), b"");
    let remote = tcp_frame((client_ip, 40001), (node, 30081), b"");
    let (_, out) = net.ns.run(|| dp.run_xdp_on(XDP, &remote, up0));
    let reply = tcp_frame((remote_pod, 8080), decode(&out).src, b"");
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

/// ICMP errors about a source-NATed NodePort flow (issue 12): node 2 (a router on the way)
/// or the remote backend itself reports about the translated packet (node:snat-port ->
/// backend); XDP translates the quote back to client -> node:nodePort, sends the error to
/// the client (from the frontend when the backend sent it) and forwards it like the flow's
/// replies.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_icmp_errors_about_snat_flows_reach_the_client() {
    require_root("xdp_icmp_errors_about_snat_flows_reach_the_client");
    let a = Family::V4.addrs();
    let (node, node2, client_ip, remote_pod) = (four(a.node), four(a.node2), four(a.ext_client), four(a.remote_pod));
    let net = fwd_ns(Family::V4);
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    dp.program(vec![(
        ext(node, NODE_PORT, Protocol::Tcp),
        ext_entry(FrontendKind::NodePort, &[(remote_pod, 8080, false)]),
    )]);
    let client = (client_ip, 40000);
    let (_, sent) = net.ns.run(|| dp.run_xdp_on(XDP, &tcp_frame(client, (node, NODE_PORT), &[1u8; 700]), up0));
    let snat_port = decode(&sent).src.1;
    // What node 2 saw: the forwarded packet (TTL already decremented by us).
    let mtu = 1280u16.to_be_bytes();
    for (sender, outer_src) in [(node2, node2), (remote_pod, node)] {
        let err = icmp_error(sender, node, (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED), [0, 0, mtu[0], mtu[1]], &sent[14..]);
        let before = dp.global(verdict::ICMP_ERROR);
        let (v, out) = net.ns.run(|| dp.run_xdp_on(XDP, &err, up0));
        assert_eq!(v, XDP_TX, "forwarded back out towards the client");
        assert_eq!(
            check_icmp_error(&out, true),
            Seen { outer: (outer_src, client_ip), inner_src: client, inner_dst: (node, NODE_PORT) },
            "error from {sender}"
        );
        assert_eq!(&out[..6], &CLIENT_MAC, "to the client's MAC");
        assert_eq!(dp.global(verdict::ICMP_ERROR), before + 1);
    }
    assert_ne!(snat_port, 40000, "the flow was source-NATed");
}
