//! ICMP errors about translated flows through BPF_PROG_TEST_RUN (issue 12): the quoted
//! packet and the outer header come out translated the way the flow's packets are, with
//! every checksum recomputed independently here (the quoted IPv4 header's and TCP/UDP
//! checksum with etherparse, the ICMP checksum over the whole message).
use std::net::Ipv4Addr;

use proxy_common::verdict;
use proxy_tests::harness::*;
use proxy_userspace::model::Protocol;

const TC_ACT_UNSPEC: i32 = -1;
const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// A router on the way (the node's gateway address on the pod veths).
const ROUTER: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

fn one_backend(dp: &mut TestDataplane, proto: Protocol) {
    let s = state(vec![(frontend(VIP, 80, proto), entry("web", &[(BACKEND, 8080)]))]);
    let r = dp.syncer.apply(&s);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

/// The client's flow to the VIP, as it leaves `from_pod` (DNATed to the backend).
fn open_flow(dp: &mut TestDataplane, proto: Protocol, payload: &[u8]) -> Vec<u8> {
    let frame = match proto {
        Protocol::Tcp => tcp_segment((CLIENT, 40000), (VIP, 80), tcp::ACK, payload),
        _ => udp_frame((CLIENT, 40000), (VIP, 80), payload),
    };
    let (v, out) = dp.run(FROM_POD, &frame);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(decode(&out).dst, (BACKEND, 8080), "flow DNATed");
    out
}

/// Fragmentation needed from a router about the client's (translated) segment, on its way
/// into the client pod: the quote says client -> VIP:80 again, so the client's socket
/// learns the path MTU; the router stays the sender.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn frag_needed_about_a_client_segment_quotes_the_vip() {
    require_root("frag_needed_about_a_client_segment_quotes_the_vip");
    let mut dp = TestDataplane::load();
    one_backend(&mut dp, Protocol::Tcp);
    let sent = open_flow(&mut dp, Protocol::Tcp, &[7u8; 600]);
    let mtu = 1280u16.to_be_bytes();
    let err = icmp_error(ROUTER, CLIENT, (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED), [0, 0, mtu[0], mtu[1]], &sent[14..]);
    let before = dp.global(verdict::ICMP_ERROR);
    let (v, out) = dp.run(TO_POD, &err);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(
        check_icmp_error(&out, true),
        Seen { outer: (ROUTER, CLIENT), inner_src: (CLIENT, 40000), inner_dst: (VIP, 80) },
        "translated error"
    );
    assert_eq!(&out[14 + 20 + 4..14 + 20 + 8], &[0, 0, mtu[0], mtu[1]], "next-hop MTU kept");
    assert_eq!(dp.global(verdict::ICMP_ERROR), before + 1, "counted icmp_error");

    // RFC 792 only promises 8 bytes of the quoted transport header: the ports are still
    // translated (TCP's checksum lies beyond them and is left alone).
    let short = icmp_error(ROUTER, CLIENT, (ICMP_TIME_EXCEEDED, 0), [0; 4], &sent[14..14 + 20 + 8]);
    let (_, out) = dp.run(TO_POD, &short);
    assert_eq!(check_icmp_error(&out, false).inner_dst, (VIP, 80), "short quote");
}

/// The backend itself answers a UDP datagram with port unreachable: the client must see it
/// from the VIP, about client -> VIP:80.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn port_unreachable_from_the_backend_comes_from_the_vip() {
    require_root("port_unreachable_from_the_backend_comes_from_the_vip");
    let mut dp = TestDataplane::load();
    one_backend(&mut dp, Protocol::Udp);
    let sent = open_flow(&mut dp, Protocol::Udp, b"hello");
    let err = icmp_error(BACKEND, CLIENT, (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH), [0; 4], &sent[14..]);
    let (v, out) = dp.run(TO_POD, &err);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(
        check_icmp_error(&out, true),
        Seen { outer: (VIP, CLIENT), inner_src: (CLIENT, 40000), inner_dst: (VIP, 80) },
        "translated error"
    );
}

/// The client pod reports an error about a reply it got from VIP:80 (e.g. its socket is
/// gone): on the way out of the pod the quote and the destination become the backend's.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn client_error_about_a_reply_goes_to_the_backend() {
    require_root("client_error_about_a_reply_goes_to_the_backend");
    let mut dp = TestDataplane::load();
    one_backend(&mut dp, Protocol::Udp);
    open_flow(&mut dp, Protocol::Udp, b"hello");
    let (_, reply) = dp.run(TO_POD, &udp_frame((BACKEND, 8080), (CLIENT, 40000), b"answer"));
    assert_eq!(decode(&reply).src, (VIP, 80), "reply reverse-NATed");
    let err = icmp_error(CLIENT, VIP, (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH), [0; 4], &reply[14..]);
    let (v, out) = dp.run(FROM_POD, &err);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(
        check_icmp_error(&out, true),
        Seen { outer: (CLIENT, BACKEND), inner_src: (BACKEND, 8080), inner_dst: (CLIENT, 40000) },
        "translated error"
    );
}

/// Errors about untracked flows and ICMP that is not an error pass untouched.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn other_icmp_passes_untouched() {
    require_root("other_icmp_passes_untouched");
    let mut dp = TestDataplane::load();
    one_backend(&mut dp, Protocol::Tcp);
    let untracked = tcp_segment((CLIENT, 41000), (BACKEND, 8080), tcp::ACK, b"x");
    let cases = [
        ("error about an untracked flow", icmp_error(ROUTER, CLIENT, (ICMP_DEST_UNREACH, 1), [0; 4], &untracked[14..])),
        ("echo request", icmp_error(CLIENT, VIP, (8, 0), [0, 1, 0, 1], b"ping payload")),
    ];
    for (name, frame) in cases {
        for prog in [FROM_POD, TO_POD] {
            let before = dp.global(verdict::OTHER_L4);
            let (v, out) = dp.run(prog, &frame);
            assert_eq!((v, &out), (TC_ACT_UNSPEC, &frame), "{name} via {prog}");
            assert_eq!(dp.global(verdict::OTHER_L4), before + 1, "{name} via {prog} counted other_l4");
        }
    }
}

/// Every IPv4 error type is translated (destination unreachable in each code the kernel
/// sends for a forwarded packet, time exceeded, parameter problem); informational types
/// (echo reply, timestamp) are not errors and pass untouched.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn every_icmp_error_type_is_translated() {
    require_root("every_icmp_error_type_is_translated");
    let mut dp = TestDataplane::load();
    one_backend(&mut dp, Protocol::Tcp);
    let sent = open_flow(&mut dp, Protocol::Tcp, b"payload");
    let errors = [(3, 0), (3, 1), (3, 3), (3, 4), (3, 13), (11, 0), (11, 1), (12, 0)];
    for (typ, code) in errors {
        let err = icmp_error(ROUTER, CLIENT, (typ, code), [0; 4], &sent[14..]);
        let (_, out) = dp.run(TO_POD, &err);
        assert_eq!(check_icmp_error(&out, true).inner_dst, (VIP, 80), "type {typ} code {code}");
    }
    for typ in [0u8, 14] {
        let msg = icmp_error(ROUTER, CLIENT, (typ, 0), [0; 4], &sent[14..]);
        let (_, out) = dp.run(TO_POD, &msg);
        assert_eq!(out, msg, "type {typ} is not an error");
    }
}
