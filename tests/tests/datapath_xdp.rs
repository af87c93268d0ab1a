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

/// The Internet checksum of `b` verifies (sums to 0xffff with its checksum field in).
fn csum_verifies(b: &[u8]) -> bool {
    let mut s: u32 = b.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// Direct server return on the wire (issue 24 item 2), with `--lb-mode dsr`:
/// - the node the client reached forwards the SYN to the remote backend DNATed only (the
///   client's source kept), with the frontend in an 8-byte IPv4 option (IHL 7, type 0x9e,
///   length 8, port, address) and valid IP and TCP checksums; later segments go without it;
/// - the backend's node (another dataplane) passes that SYN unchanged, counts it `dsr`, and
///   its `to_uplink` then sends the backend's answer from the frontend;
/// - a full-sized datagram that the option would push past the uplink's MTU is answered
///   with ICMP fragmentation needed advertising 1492, quoting the client's own header.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_dsr_option_inserted_learnt_and_too_big_answered() {
    use proxy_common::{NodeConfig, lb_mode};
    use proxy_userspace::dataplane::maps::node::{PortRange, node_config};
    require_root("xdp_dsr_option_inserted_learnt_and_too_big_answered");
    let a = Family::V4.addrs();
    let (node, client_ip, remote_pod) = (four(a.node), four(a.ext_client), four(a.remote_pod));
    let net = fwd_ns(Family::V4);
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    let dsr = NodeConfig { lb_mode: lb_mode::DSR, ..node_config(None, None, PortRange::default()) };
    dp.node().set_config(&dsr).unwrap();
    dp.program(vec![
        (ext(node, NODE_PORT, Protocol::Tcp), ext_entry(FrontendKind::NodePort, &[(remote_pod, 8080, false)])),
        (ext(node, NODE_PORT, Protocol::Udp), ext_entry(FrontendKind::NodePort, &[(remote_pod, 8080, false)])),
    ]);
    let client = (client_ip, 40000);
    let syn = tcp_segment(client, (node, NODE_PORT), tcp::SYN, b"");
    let (v, fwd) = net.ns.run(|| dp.run_xdp_on(XDP, &syn, up0));
    assert_eq!(v, XDP_TX, "forwarded");
    let d = decode(&fwd);
    assert_eq!((d.src, d.dst), (client, (remote_pod, 8080)), "DNAT only");
    assert!(d.ip_csum_ok && d.l4_csum_ok, "checksums");
    assert_eq!((fwd.len(), fwd[14]), (syn.len() + 8, 0x47), "an 8-byte option: IHL 7");
    let mut opt = vec![0x9e, 8];
    opt.extend(NODE_PORT.to_be_bytes());
    opt.extend(node.octets());
    assert_eq!(&fwd[34..42], &opt[..], "the option carries the frontend");
    assert_eq!(&fwd[42 + 4..42 + 16], &syn[34 + 4..34 + 16], "the TCP header follows the option");
    assert_eq!(dp.global(verdict::NEW_FLOW), 1);

    let ack = tcp_segment(client, (node, NODE_PORT), tcp::ACK, b"data");
    let (v, fwd2) = net.ns.run(|| dp.run_xdp_on(XDP, &ack, up0));
    let d2 = decode(&fwd2);
    assert_eq!((v, fwd2[14], d2.src, d2.dst), (XDP_TX, 0x45, client, (remote_pod, 8080)), "later segments: no option");
    assert!(d2.ip_csum_ok && d2.l4_csum_ok);

    // The backend's node: an agent of its own, no frontend of node 1's.
    let mut b = TestDataplane::load();
    let (v, passed) = b.run(XDP, &fwd);
    assert_eq!((v, passed.as_slice()), (XDP_PASS, fwd.as_slice()), "passed on to the pod unchanged");
    assert_eq!(b.global(verdict::DSR), 1, "learnt from the option");
    let synack = tcp_segment((remote_pod, 8080), client, tcp::SYN | tcp::ACK, b"");
    let (v, reply) = b.run_tc_from(TO_UPLINK, &synack, 7);
    let r = decode(&reply);
    assert_eq!((v, r.src, r.dst), (TC_ACT_UNSPEC, (node, NODE_PORT), client), "the answer leaves from the frontend");
    assert!(r.ip_csum_ok && r.l4_csum_ok);

    // Too big with the option: fragmentation needed, MTU 1500 - 8.
    let big = udp_frame((client_ip, 40001), (node, NODE_PORT), &[7u8; 1500 - 20 - 8]);
    let before = dp.global(verdict::DSR_TOO_BIG);
    let (v, icmp) = net.ns.run(|| dp.run_xdp_on(XDP, &big, up0));
    assert_eq!((v, icmp.len()), (XDP_TX, 14 + 20 + 8 + 28), "answered in place");
    assert_eq!(dp.global(verdict::DSR_TOO_BIG), before + 1);
    assert_eq!((&icmp[..6], &icmp[6..12]), (&big[6..12], &big[..6]), "back where it came from");
    assert_eq!((icmp[14 + 9], &icmp[26..30], &icmp[30..34]), (1, &node.octets()[..], &client_ip.octets()[..]));
    assert_eq!((icmp[34], icmp[35], &icmp[40..42]), (3, 4, &1492u16.to_be_bytes()[..]), "frag needed, MTU 1492");
    assert_eq!(&icmp[42..70], &big[14..42], "quotes the client's own IP header and UDP header");
    assert!(csum_verifies(&icmp[14..34]) && csum_verifies(&icmp[34..]), "IP and ICMP checksums");
}

/// The Internet checksum over an IPv6 pseudo-header (`src`, `dst`, upper-layer length,
/// next header `next`) and `body`: true if `body`'s checksum field makes it add up.
fn csum6_verifies(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, next: u8, body: &[u8]) -> bool {
    let mut b = Vec::new();
    b.extend(src.octets());
    b.extend(dst.octets());
    b.extend((body.len() as u32).to_be_bytes());
    b.extend([0, 0, 0, next]);
    b.extend(body);
    csum_verifies(&b)
}

/// Direct server return over IPv6 (issue 24 item 2), with `--lb-mode dsr`:
/// - the SYN is forwarded DNATed only, with the frontend in a 24-byte Destination Options
///   header right after the fixed one (next header 60; the header's own next header 6,
///   length 2, option 0x1e of 18 bytes: port and address, then a PadN), payload length
///   grown by 24, the TCP checksum valid; later segments go without it;
/// - the backend's node passes that SYN unchanged, counts it `dsr`, and its `to_uplink`
///   then sends the backend's answer from the frontend;
/// - a full-sized datagram that the header would push past the uplink's MTU is answered
///   with ICMPv6 Packet Too Big advertising 1476, quoting the client's own headers.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_dsr6_header_inserted_learnt_and_too_big_answered() {
    use proxy_common::{NodeConfig, lb_mode};
    use proxy_userspace::dataplane::maps::node::{PortRange, node_config};
    use proxy_userspace::model::Scope;
    require_root("xdp_dsr6_header_inserted_learnt_and_too_big_answered");
    let f = Family::V6;
    let a = f.addrs();
    let (node, client_ip, remote_pod) = (a.node, a.ext_client, a.remote_pod);
    let six = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(a) => a,
        std::net::IpAddr::V4(a) => panic!("{a}: not IPv6"),
    };
    let net = fwd_ns(f);
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    let dsr = NodeConfig { lb_mode: lb_mode::DSR, ..node_config(None, None, PortRange::default()) };
    dp.node().set_config(&dsr).unwrap();
    let entry = || svc(FrontendKind::NodePort, &[(remote_pod, 8080, false)]);
    dp.program(vec![
        (fk(node, NODE_PORT, Protocol::Tcp, Scope::External), entry()),
        (fk(node, NODE_PORT, Protocol::Udp, Scope::External), entry()),
    ]);
    let client = (client_ip, 40000);
    let syn = f.segment(client, (node, NODE_PORT), tcp::SYN, b"");
    let (v, fwd) = net.ns.run(|| dp.run_xdp_on(XDP, &syn, up0));
    assert_eq!(v, XDP_TX, "forwarded");
    let d = decode_any(&fwd);
    assert_eq!((d.src, d.dst), (client, (remote_pod, 8080)), "DNAT only");
    assert!(d.l4_csum_ok, "TCP checksum");
    assert_eq!(fwd.len(), syn.len() + 24, "a 24-byte extension header");
    assert_eq!((fwd[14 + 6], &fwd[18..20]), (60, &(20u16 + 24).to_be_bytes()[..]), "next header, payload length");
    let mut ext = vec![6, 2, 0x1e, 18];
    ext.extend(NODE_PORT.to_be_bytes());
    ext.extend(six(node).octets());
    ext.extend([1, 0]);
    assert_eq!(&fwd[54..78], &ext[..], "the header carries the frontend");
    assert_eq!(&fwd[78 + 4..78 + 16], &syn[54 + 4..54 + 16], "the TCP header follows it");
    assert_eq!(dp.global(verdict::NEW_FLOW), 1);

    let ack = f.segment(client, (node, NODE_PORT), tcp::ACK, b"data");
    let (v, fwd2) = net.ns.run(|| dp.run_xdp_on(XDP, &ack, up0));
    let d2 = decode_any(&fwd2);
    assert_eq!((v, fwd2[14 + 6], d2.src, d2.dst), (XDP_TX, 6, client, (remote_pod, 8080)), "later segments: none");
    assert!(d2.l4_csum_ok);

    // The backend's node: an agent of its own, no frontend of node 1's.
    let mut b = TestDataplane::load();
    let (v, passed) = b.run(XDP, &fwd);
    assert_eq!((v, passed.as_slice()), (XDP_PASS, fwd.as_slice()), "passed on to the pod unchanged");
    assert_eq!(b.global(verdict::DSR), 1, "learnt from the header");
    let synack = f.segment((remote_pod, 8080), client, tcp::SYN | tcp::ACK, b"");
    let (v, reply) = b.run_tc_from(TO_UPLINK, &synack, 7);
    let r = decode_any(&reply);
    assert_eq!((v, r.src, r.dst), (TC_ACT_UNSPEC, (node, NODE_PORT), client), "the answer leaves from the frontend");
    assert!(r.l4_csum_ok);

    // Too big with the header: Packet Too Big, MTU 1500 - 24.
    let big = f.udp((client_ip, 40001), (node, NODE_PORT), &[7u8; 1500 - 40 - 8]);
    let before = dp.global(verdict::DSR_TOO_BIG);
    let (v, icmp) = net.ns.run(|| dp.run_xdp_on(XDP, &big, up0));
    assert_eq!((v, icmp.len()), (XDP_TX, 14 + 40 + 8 + 56), "answered in place");
    assert_eq!(dp.global(verdict::DSR_TOO_BIG), before + 1);
    assert_eq!((&icmp[..6], &icmp[6..12]), (&big[6..12], &big[..6]), "back where it came from");
    assert_eq!(
        (icmp[14 + 6], &icmp[22..38], &icmp[38..54]),
        (58, &six(node).octets()[..], &six(client_ip).octets()[..])
    );
    assert_eq!((icmp[54], icmp[55], &icmp[58..62]), (2, 0, &1476u32.to_be_bytes()[..]), "Packet Too Big, MTU 1476");
    assert_eq!(&icmp[62..], &big[14..70], "quotes the client's own IPv6 header and what follows");
    assert!(csum6_verifies(six(node), six(client_ip), 58, &icmp[54..]), "ICMPv6 checksum");
}
