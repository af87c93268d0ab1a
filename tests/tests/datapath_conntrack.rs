//! The conntrack lifecycle and frame validation in the datapath, through BPF_PROG_TEST_RUN:
//! flow states recorded from real segments, reopened tuples (hairpin, which is also
//! source-NATed) translated every time, full tables that keep established flows, and frames
//! whose lengths do not add up passing untouched.
use std::net::Ipv4Addr;

use proxy_common::{
    CT_DIR_FORWARD, PROTO_TCP,
    ct::{self, CtState},
    verdict,
};
use proxy_tests::harness::*;
use proxy_userspace::{
    dataplane::{
        maps::global_total,
        maps::loader::{self, LoaderConfig},
        maps::node::{PortRange, node_config},
    },
    model::{FrontendKind, Protocol},
    sync::Syncer,
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";
const XDP: &str = "from_uplink";

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const B1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);

fn flow_state(dp: &TestDataplane, client: (Ipv4Addr, u16)) -> CtState {
    let v = dp.maps().ct_get(&ct_key(client, (VIP, 80), PROTO_TCP, CT_DIR_FORWARD)).expect("forward entry");
    ct::state(PROTO_TCP, v.flags)
}

fn ct_entries(dp: &TestDataplane) -> usize {
    dp.maps().ct_len()
}

/// SYN -> new; the backend's SYN-ACK -> established (recorded in the forward entry); a FIN
/// from each side -> closed; a SYN on the closed tuple is a new connection whose old reply
/// entry is gone.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn flow_states_follow_the_segments() {
    require_root("flow_states_follow_the_segments");
    let mut dp = TestDataplane::load();
    let r = dp.syncer.apply(&state(vec![(frontend(VIP, 80, Protocol::Tcp), entry("web", &[(B1, 8080)]))]));
    assert!(r.errors.is_empty());
    let c = (CLIENT, 40000);
    let (v, _) = dp.run(FROM_POD, &tcp_segment(c, (VIP, 80), tcp::SYN, b""));
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(flow_state(&dp, c), CtState::New);
    let (v, out) = dp.run(TO_POD, &tcp_segment((B1, 8080), c, tcp::SYN | tcp::ACK, b""));
    assert_eq!((v, decode(&out).src), (TC_ACT_UNSPEC, (VIP, 80)));
    assert_eq!(flow_state(&dp, c), CtState::Replied, "SYN_RECV: the handshake is not complete yet");
    // The client's ACK of the SYN-ACK (seq 1000 + 1 taken by the SYN, acknowledging the
    // backend's SYN) completes it.
    dp.run(FROM_POD, &tcp_seq(ip4(c), ip4((VIP, 80)), tcp::ACK, 1001, 1001, b""));
    assert_eq!(flow_state(&dp, c), CtState::Established);
    dp.run(FROM_POD, &tcp_seq(ip4(c), ip4((VIP, 80)), tcp::FIN | tcp::ACK, 1001, 1001, b""));
    assert_eq!(flow_state(&dp, c), CtState::Closing, "half-closed by the client");
    let (_, out) = dp.run(TO_POD, &tcp_seq(ip4((B1, 8080)), ip4(c), tcp::FIN | tcp::ACK, 1001, 1002, b""));
    assert_eq!(decode(&out).src, (VIP, 80), "the backend's FIN is still translated");
    assert_eq!(flow_state(&dp, c), CtState::Closed);
    assert_eq!(ct_entries(&dp), 2);
    let (_, out) = dp.run(FROM_POD, &tcp_segment(c, (VIP, 80), tcp::SYN, b""));
    assert_eq!(decode(&out).dst, (B1, 8080));
    assert_eq!(flow_state(&dp, c), CtState::New, "reopened: a fresh flow");
    assert_eq!(ct_entries(&dp), 2, "the old connection's entries were replaced, not leaked");
    // A RST closes at once: the backend refusing the SYN acknowledges it (seq 1000 + 1).
    dp.run(TO_POD, &tcp_seq(ip4((B1, 8080)), ip4(c), tcp::RST | tcp::ACK, 0, 1001, b""));
    assert_eq!(flow_state(&dp, c), CtState::Closed);
}

fn ip4(a: (Ipv4Addr, u16)) -> (std::net::IpAddr, u16) {
    (a.0.into(), a.1)
}

/// A pod reaching itself through its Service (hairpin, source-NATed to the hairpin address)
/// with one client port, SYN then FIN, twenty times: translated every time. Each reopen used
/// to leak the old connection's claim on one of the tuple's eight SNAT port candidates, so
/// the ninth SYN was dropped forever.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn hairpin_tuple_reopened_twenty_times_is_translated_every_time() {
    require_root("hairpin_tuple_reopened_twenty_times_is_translated_every_time");
    let hairpin = Ipv4Addr::new(169, 254, 42, 1);
    let mut dp = TestDataplane::load();
    let r = dp.syncer.apply(&state(vec![(frontend(VIP, 80, Protocol::Tcp), entry("self", &[(CLIENT, 8080)]))]));
    assert!(r.errors.is_empty());
    dp.node().set_config(&node_config(None, Some(hairpin), PortRange::default())).unwrap();
    let c = (CLIENT, 5353);
    for i in 0..20 {
        let (v, out) = dp.run(FROM_POD, &tcp_segment(c, (VIP, 80), tcp::SYN, b""));
        assert_eq!(v, TC_ACT_REDIRECT, "SYN #{i} bounced back translated");
        let d = decode(&out);
        assert_eq!((d.src.0, d.dst), (hairpin, (CLIENT, 8080)), "SYN #{i}");
        assert!(d.ip_csum_ok && d.l4_csum_ok, "SYN #{i}: {d:?}");
        let (v, _) = dp.run(FROM_POD, &tcp_segment(c, (VIP, 80), tcp::FIN | tcp::ACK, b""));
        assert_eq!(v, TC_ACT_REDIRECT, "FIN #{i}");
    }
    assert_eq!(dp.service_count(verdict::NEW_FLOW), 20);
    assert_eq!(dp.service_count(verdict::ERROR), 0);
    assert_eq!(ct_entries(&dp), 2, "only the last connection's two entries remain");
}

/// With room for two flows in each table, a third new flow still gets through: unassured
/// flows live in the LRU `CT_NEW`, where a new flow makes room by evicting the least recently
/// used unassured one, never an established connection (assured, in `CONNTRACK`).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn full_table_never_evicts_established_flows() {
    require_root("full_table_never_evicts_established_flows");
    let pins = PinDir::new();
    let cfg = LoaderConfig { max_conntrack: 4, ..LoaderConfig::new(&pins.0) };
    let (programs, maps) = loader::load(&cfg).expect("load");
    let syncer = Syncer::new(maps).expect("read back");
    let mut dp = TestDataplane { programs, syncer, pins };
    let r = dp.syncer.apply(&state(vec![(frontend(VIP, 80, Protocol::Tcp), entry("web", &[(B1, 8080)]))]));
    assert!(r.errors.is_empty());
    // Two established connections (complete handshakes) fill the assured table.
    for port in [1000, 1001] {
        let c = ip4((CLIENT, port));
        let (v, _) = dp.run(FROM_POD, &tcp_seq(c, ip4((VIP, 80)), tcp::SYN, 7, 0, b""));
        assert_eq!(v, TC_ACT_UNSPEC);
        dp.run(TO_POD, &tcp_seq(ip4((B1, 8080)), c, tcp::SYN | tcp::ACK, 90, 8, b""));
        dp.run(FROM_POD, &tcp_seq(c, ip4((VIP, 80)), tcp::ACK, 8, 91, b""));
        assert_eq!(flow_state(&dp, (CLIENT, port)), CtState::Established);
    }
    assert_eq!(dp.maps().conntrack.keys().count(), 4, "both flows assured");
    // Many more new flows than the unassured table holds: each is translated.
    for port in 2000..2010 {
        let (v, out) = dp.run(FROM_POD, &tcp_segment((CLIENT, port), (VIP, 80), tcp::SYN, b""));
        assert_eq!((v, decode(&out).dst), (TC_ACT_UNSPEC, (B1, 8080)), "new flow {port} translated");
    }
    assert_eq!(dp.service_count(verdict::CT_FULL), 0);
    assert!(dp.maps().ct_new.keys().count() <= 4, "the LRU keeps to its size");
    for port in [1000, 1001] {
        let (v, out) = dp.run(FROM_POD, &tcp_seq(ip4((CLIENT, port)), ip4((VIP, 80)), tcp::ACK, 8, 91, b"data"));
        assert_eq!((v, decode(&out).dst), (TC_ACT_UNSPEC, (B1, 8080)), "established flow {port} kept");
        assert_eq!(flow_state(&dp, (CLIENT, port)), CtState::Established);
    }
}

/// Frames whose length fields do not add up are malformed: passed untouched (byte for
/// byte), counted, and leave no conntrack entry, on TC and XDP alike.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn length_mismatched_frames_pass_untouched() {
    require_root("length_mismatched_frames_pass_untouched");
    let mut dp = TestDataplane::load();
    let mut np = entry("np", &[(B1, 8080)]);
    np.kind = FrontendKind::NodePort;
    let r = dp.syncer.apply(&state(vec![
        (frontend(VIP, 80, Protocol::Tcp), entry("web", &[(B1, 8080)])),
        (frontend(VIP, 53, Protocol::Udp), entry("dns", &[(B1, 5353)])),
        (
            proxy_userspace::model::FrontendKey {
                addr: NODE.into(),
                port: 30080,
                proto: Protocol::Tcp,
                scope: proxy_userspace::model::Scope::External,
            },
            np,
        ),
    ]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let set16 = |f: &mut Vec<u8>, off: usize, v: u16| f[off..off + 2].copy_from_slice(&v.to_be_bytes());
    let ip = 14;
    let l4 = 14 + 20;
    let tcp_to = |dst: (Ipv4Addr, u16)| tcp_segment((CLIENT, 40000), dst, tcp::SYN, b"payload!");
    let udp = udp_frame((CLIENT, 40000), (VIP, 53), b"query");
    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    for (dst, xdp) in [((VIP, 80), false), ((NODE, 30080), true)] {
        let mut f = tcp_to(dst);
        let n = f.len() - ip;
        set16(&mut f, ip + 2, n as u16 + 1);
        cases.push(("IPv4 total length runs past the frame", f, xdp));
        let mut f = tcp_to(dst);
        set16(&mut f, ip + 2, 19);
        cases.push(("IPv4 total length shorter than its header", f, xdp));
        let mut f = tcp_to(dst);
        set16(&mut f, ip + 2, 20 + 12);
        cases.push(("IPv4 total length cuts the TCP header", f, xdp));
        let mut f = tcp_to(dst);
        f[l4 + 12] = 4 << 4;
        cases.push(("TCP data offset below 5", f, xdp));
        let mut f = tcp_to(dst);
        f[l4 + 12] = 15 << 4;
        cases.push(("TCP data offset past the IP payload", f, xdp));
    }
    let mut f = udp.clone();
    set16(&mut f, l4 + 4, 8 + 5 + 1);
    cases.push(("UDP length past the IP payload", f, false));
    let mut f = udp.clone();
    set16(&mut f, l4 + 4, 7);
    cases.push(("UDP length below its header", f, false));
    for (what, frame, xdp) in &cases {
        let (v, out) = dp.run(if *xdp { XDP } else { FROM_POD }, frame);
        let pass = if *xdp { XDP_PASS } else { TC_ACT_UNSPEC };
        assert_eq!((v, &out), (pass, frame), "{what}: passed untouched");
    }
    assert_eq!(ct_entries(&dp), 0, "no conntrack entry from a malformed frame");
    assert_eq!(global_total(&dp.maps().global_stats, verdict::MALFORMED).unwrap().packets, cases.len() as u64);
    // Ethernet padding after a well-formed datagram is fine (and kept as it is).
    let mut padded = udp.clone();
    padded.extend_from_slice(&[0; 6]);
    let (v, out) = dp.run(FROM_POD, &padded);
    assert_eq!((v, decode(&out).dst), (TC_ACT_UNSPEC, (B1, 5353)));
    assert_eq!(out.len(), padded.len());
}

/// A SYN to a NodePort without endpoints, in a frame larger than one page (BPF_PROG_TEST_RUN
/// hands the rest over as fragments): the reset is exactly Ethernet + IPv4 + TCP, with none
/// of the original's bytes trailing.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn xdp_reset_of_a_multi_buffer_frame_has_no_trailing_bytes() {
    require_root("xdp_reset_of_a_multi_buffer_frame_has_no_trailing_bytes");
    let mut dp = TestDataplane::load();
    let mut np = entry("np", &[]);
    np.kind = FrontendKind::NodePort;
    let key = proxy_userspace::model::FrontendKey {
        addr: NODE.into(),
        port: 30080,
        proto: Protocol::Tcp,
        scope: proxy_userspace::model::Scope::External,
    };
    let r = dp.syncer.apply(&state(vec![(key, np)]));
    assert!(r.errors.is_empty());
    let syn = tcp_segment((CLIENT, 40000), (NODE, 30080), tcp::SYN, &[0xab; 6000]);
    let (v, out) = dp.run(XDP, &syn);
    assert_eq!(v, XDP_TX);
    assert_eq!(out.len(), 54, "Ethernet + IPv4 + TCP only");
    let d = decode(&out);
    assert_eq!((d.src, d.dst), ((NODE, 30080), (CLIENT, 40000)));
    assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
    assert_eq!(out[34 + 13], 0x14, "RST|ACK");
}
