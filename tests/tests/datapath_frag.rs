//! Fragments of translated flows (issue 19, item 11) through BPF_PROG_TEST_RUN: a datagram
//! is built whole with etherparse, split into fragments here (RFC 791 / RFC 8200's Fragment
//! header), run fragment by fragment, and what comes out is checked independently: every
//! fragment's addresses and IPv4 header checksum, the first fragment's ports, and the UDP
//! checksum of the datagram reassembled from the output fragments.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::verdict;
use proxy_tests::harness::*;
use proxy_userspace::model::{BackendAddr, FrontendEntry, FrontendKey, FrontendKind, Protocol, Scope, ServicePortName};

const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";
const XDP: &str = "from_uplink";
const TC_ACT_UNSPEC: i32 = -1;
const XDP_TX: i32 = 3;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const B1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const B2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x53);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5);
const B1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1);
const B2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);

/// Bytes of IP payload in a first fragment: what a 1500-byte MTU leaves after a 20-byte IPv4
/// header (a multiple of 8, as every fragment but the last must carry).
const FIRST_LEN: usize = 1480;
/// A large DNS answer with EDNS: bigger than one MTU.
const ANSWER_LEN: usize = 2400;

fn service(dp: &mut TestDataplane, vip: IpAddr, port: u16, backends: &[(IpAddr, u16)], external: bool) {
    let key = FrontendKey {
        addr: vip,
        port,
        proto: Protocol::Udp,
        scope: if external { Scope::External } else { Scope::Internal },
    };
    let e = FrontendEntry {
        service: ServicePortName::new("default", "dns", ""),
        kind: if external { FrontendKind::NodePort } else { FrontendKind::ClusterIP },
        backends: backends
            .iter()
            .map(|(a, p)| BackendAddr { addr: *a, port: *p, local: !external, terminating: false })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
        lb_algorithm: None,
        weights: vec![],
    };
    let r = dp.syncer.apply(&state(vec![(key, e)]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Split an Ethernet + IPv4 (no options) frame into two fragments with identification
/// `id`: the first carries `FIRST_LEN` bytes of the IP payload (the UDP header among them),
/// the second the rest at offset `FIRST_LEN / 8`.
fn fragment4(frame: &[u8], id: u16) -> [Vec<u8>; 2] {
    let (head, ip_payload) = frame.split_at(14 + 20);
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut f = head.to_vec();
        f.extend_from_slice(data);
        f[14 + 2..14 + 4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
        let frags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        f[14 + 6..14 + 8].copy_from_slice(&frags.to_be_bytes());
        f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = inet_csum(&f[14..14 + 20]);
        f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        f
    };
    [piece(&ip_payload[..FIRST_LEN], 0, true), piece(&ip_payload[FIRST_LEN..], FIRST_LEN, false)]
}

/// What the two output fragments of an IPv4 datagram say, checked independently of the
/// datapath: addresses (the same in both), each IPv4 header checksum, and the datagram
/// reassembled from them: its UDP ports, checksum and payload.
#[derive(Debug)]
struct Datagram<A> {
    src: (A, u16),
    dst: (A, u16),
    udp_csum_ok: bool,
    payload: Vec<u8>,
}

fn reassemble4(frags: &[Vec<u8>]) -> Datagram<Ipv4Addr> {
    let mut data = Vec::new();
    let mut addrs = None;
    for f in frags {
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&f[14..]).expect("IPv4 header").to_header();
        assert_eq!(ip.calc_header_checksum(), ip.header_checksum, "IPv4 header checksum of a fragment");
        let a = (Ipv4Addr::from(ip.source), Ipv4Addr::from(ip.destination));
        assert_eq!(*addrs.get_or_insert(a), a, "every fragment has the datagram's addresses");
        assert_eq!(usize::from(ip.fragment_offset.value()) * 8, data.len(), "fragments in order");
        data.extend_from_slice(&f[14 + 20..14 + usize::from(ip.total_len)]);
    }
    let (s, d) = addrs.expect("fragments");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&s.octets());
    pseudo.extend_from_slice(&d.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(data.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&data);
    udp_datagram(s, d, &data, inet_csum(&pseudo) == 0)
}

fn udp_datagram<A>(s: A, d: A, data: &[u8], udp_csum_ok: bool) -> Datagram<A> {
    let port = |o: usize| u16::from_be_bytes([data[o], data[o + 1]]);
    assert_eq!(usize::from(port(4)), data.len(), "UDP length is the reassembled datagram's");
    Datagram { src: (s, port(0)), dst: (d, port(2)), udp_csum_ok, payload: data[8..].to_vec() }
}

/// Split an Ethernet + IPv6 (no extension headers) frame into two fragments with a Fragment
/// header (identification `id`): `FIRST_LEN - 8` bytes of the upper-layer payload first (so
/// the first fragment is as long as the IPv4 one), the rest after.
fn fragment6(frame: &[u8], id: u32) -> [Vec<u8>; 2] {
    let first = FIRST_LEN - 8;
    let (head, upper) = frame.split_at(14 + 40);
    let next = head[14 + 6];
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut f = head.to_vec();
        f[14 + 6] = 44;
        f[14 + 4..14 + 6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        let om = (offset as u16) | u16::from(more);
        f.extend_from_slice(&[next, 0]);
        f.extend_from_slice(&om.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(data);
        f
    };
    [piece(&upper[..first], 0, true), piece(&upper[first..], first, false)]
}

fn reassemble6(frags: &[Vec<u8>]) -> Datagram<Ipv6Addr> {
    let mut data = Vec::new();
    let mut addrs = None;
    for f in frags {
        assert_eq!(f[14 + 6], 44, "a fragment header follows the IPv6 header");
        let s = Ipv6Addr::from(<[u8; 16]>::try_from(&f[14 + 8..14 + 24]).unwrap());
        let d = Ipv6Addr::from(<[u8; 16]>::try_from(&f[14 + 24..14 + 40]).unwrap());
        assert_eq!(*addrs.get_or_insert((s, d)), (s, d), "every fragment has the datagram's addresses");
        let plen = usize::from(u16::from_be_bytes([f[14 + 4], f[14 + 5]]));
        let offset = usize::from(u16::from_be_bytes([f[14 + 42], f[14 + 43]]) & 0xfff8);
        assert_eq!(offset, data.len(), "fragments in order");
        data.extend_from_slice(&f[14 + 48..14 + 40 + plen]);
    }
    let (s, d) = addrs.expect("fragments");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&s.octets());
    pseudo.extend_from_slice(&d.octets());
    pseudo.extend_from_slice(&(data.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&data);
    udp_datagram(s, d, &data, inet_csum(&pseudo) == 0)
}

/// The first output fragment's UDP ports (the second has none).
fn ports_at(f: &[u8], l4: usize) -> (u16, u16) {
    (u16::from_be_bytes([f[l4], f[l4 + 1]]), u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]))
}

/// A UDP ClusterIP flow whose answer comes back from the backend in two fragments through
/// `to_pod`: both leave from the VIP (the first with the service port), and the datagram
/// they reassemble to has a valid UDP checksum. A fragmented request through `from_pod`
/// reaches one backend with both fragments; a later fragment of a datagram we never saw the
/// start of passes untouched (`fragment`).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn udp_clusterip_fragments_v4() {
    require_root("udp_clusterip_fragments_v4");
    let mut dp = TestDataplane::load();
    service(&mut dp, VIP.into(), 53, &[(B1.into(), 5353), (B2.into(), 5353)], false);
    let client = (CLIENT, 40000);

    // The query, whole: balanced as usual.
    let (v, out) = dp.run(FROM_POD, &udp_frame(client, (VIP, 53), b"query"));
    assert_eq!(v, TC_ACT_UNSPEC);
    let backend = decode(&out).dst;
    assert!([(B1, 5353), (B2, 5353)].contains(&backend), "{backend:?}");

    // The answer, fragmented by the backend's stack.
    let answer = payload(ANSWER_LEN, 1);
    let frags = fragment4(&udp_frame(backend, client, &answer), 0x1234);
    let mut outs = Vec::new();
    for (i, f) in frags.iter().enumerate() {
        let (v, out) = dp.run(TO_POD, f);
        assert_eq!(v, TC_ACT_UNSPEC, "fragment {i}");
        assert_eq!(out.len(), f.len(), "fragment {i}: length");
        outs.push(out);
    }
    assert_eq!(ports_at(&outs[0], 14 + 20), (53, 40000), "first fragment: ports of VIP:53 -> client");
    assert_eq!(&outs[1][14 + 20..], &frags[1][14 + 20..], "later fragment: payload untouched");
    let d = reassemble4(&outs);
    assert_eq!((d.src, d.dst), ((VIP, 53), client), "the answer comes from VIP:port");
    assert!(d.udp_csum_ok, "reassembled UDP checksum");
    assert_eq!(d.payload, answer);
    assert_eq!(dp.service_count(verdict::REVERSE_NAT), 2, "both fragments counted as the flow's replies");

    // A fragmented request (another source port: a new flow): both fragments to the same
    // backend, whichever the first one was balanced to.
    let client2 = (CLIENT, 40001);
    let query = payload(ANSWER_LEN, 2);
    let frags = fragment4(&udp_frame(client2, (VIP, 53), &query), 0x4321);
    let outs: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| dp.run(FROM_POD, f))
        .map(|(v, o)| {
            assert_eq!(v, TC_ACT_UNSPEC);
            o
        })
        .collect();
    let d = reassemble4(&outs);
    assert!([(B1, 5353), (B2, 5353)].contains(&d.dst), "{:?}", d.dst);
    assert_eq!(d.src, client2);
    assert!(d.udp_csum_ok, "reassembled UDP checksum of the request");
    assert_eq!(d.payload, query);

    // A later fragment whose first fragment never came by (another identification): not
    // ours to translate.
    let stray = fragment4(&udp_frame(backend, client, &answer), 0x9999)[1].clone();
    let before = dp.global(verdict::FRAGMENT);
    for prog in [TO_POD, FROM_POD] {
        let (v, out) = dp.run(prog, &stray);
        assert_eq!((v, &out), (TC_ACT_UNSPEC, &stray), "{prog}: stray later fragment untouched");
    }
    assert_eq!(dp.global(verdict::FRAGMENT), before + 2);
}

/// The same for IPv6: the answer in two fragments (Fragment header) through `to_pod`, and a
/// fragmented query through `from_pod`.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn udp_clusterip_fragments_v6() {
    require_root("udp_clusterip_fragments_v6");
    let mut dp = TestDataplane::load();
    service(&mut dp, VIP6.into(), 53, &[(B1_6.into(), 5353), (B2_6.into(), 5353)], false);
    let client = (CLIENT6, 40000);

    let (v, out) = dp.run(FROM_POD, &udp6_frame(client, (VIP6, 53), b"query"));
    assert_eq!(v, TC_ACT_UNSPEC);
    let backend = decode6(&out).dst;
    assert!([(B1_6, 5353), (B2_6, 5353)].contains(&backend), "{backend:?}");

    let answer = payload(ANSWER_LEN, 3);
    let frags = fragment6(&udp6_frame(backend, client, &answer), 0xdead_beef);
    let mut outs = Vec::new();
    for (i, f) in frags.iter().enumerate() {
        let (v, out) = dp.run(TO_POD, f);
        assert_eq!(v, TC_ACT_UNSPEC, "fragment {i}");
        assert_eq!(out.len(), f.len(), "fragment {i}: length");
        outs.push(out);
    }
    assert_eq!(ports_at(&outs[0], 14 + 48), (53, 40000), "first fragment: ports of VIP:53 -> client");
    assert_eq!(&outs[1][14 + 40..], &frags[1][14 + 40..], "later fragment: fragment header and payload untouched");
    let d = reassemble6(&outs);
    assert_eq!((d.src, d.dst), ((VIP6, 53), client), "the answer comes from [VIP]:port");
    assert!(d.udp_csum_ok, "reassembled UDP checksum");
    assert_eq!(d.payload, answer);
    assert_eq!(dp.service_count(verdict::REVERSE_NAT), 2);

    let client2 = (CLIENT6, 40001);
    let query = payload(ANSWER_LEN, 4);
    let frags = fragment6(&udp6_frame(client2, (VIP6, 53), &query), 7);
    let outs: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| dp.run(FROM_POD, f))
        .map(|(v, o)| {
            assert_eq!(v, TC_ACT_UNSPEC);
            o
        })
        .collect();
    let d = reassemble6(&outs);
    assert!([(B1_6, 5353), (B2_6, 5353)].contains(&d.dst), "{:?}", d.dst);
    assert_eq!(d.src, client2);
    assert!(d.udp_csum_ok, "reassembled UDP checksum of the query");
    assert_eq!(d.payload, query);

    let stray = fragment6(&udp6_frame(backend, client, &answer), 8)[1].clone();
    let before = dp.global(verdict::FRAGMENT);
    let (v, out) = dp.run(TO_POD, &stray);
    assert_eq!((v, &out), (TC_ACT_UNSPEC, &stray), "stray later fragment untouched");
    assert_eq!(dp.global(verdict::FRAGMENT), before + 1);
}

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const NODE_PORT: u16 = 30053;
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];

/// A NodePort to a backend on another node (DNAT + SNAT, forwarded by XDP): the backend's
/// fragmented answer arrives at `from_uplink` addressed to node:snat-port; both fragments are
/// translated back (node:nodePort -> client) and forwarded to the client. Before fragments
/// were translated they were handed to the stack addressed to the node, which had no socket
/// for them: the answer was lost.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn udp_nodeport_snat_fragments_xdp() {
    require_root("udp_nodeport_snat_fragments_xdp");
    let net = UplinkNs::new("epx-frag-", UPLINK_MAC);
    let ns = &net.ns;
    ns.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "up0"]).unwrap();
    ns.ip(&["route", "add", "10.244.2.0/24", "via", &NODE2.to_string(), "dev", "up0"]).unwrap();
    for (ip, m) in [(NODE2, NODE2_MAC), (EXT_CLIENT, CLIENT_MAC)] {
        ns.ip(&["neigh", "replace", &ip.to_string(), "lladdr", &mac_str(m), "nud", "permanent", "dev", "up0"]).unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    service(&mut dp, NODE.into(), NODE_PORT, &[(REMOTE_POD.into(), 5353)], true);

    let client = (EXT_CLIENT, 40000);
    let (v, out) = ns.run(|| dp.run_xdp_on(XDP, &udp_frame(client, (NODE, NODE_PORT), b"query"), up0));
    assert_eq!(v, XDP_TX);
    let q = decode(&out);
    assert_eq!((q.src.0, q.dst), (NODE, (REMOTE_POD, 5353)), "query source-NATed to the remote backend");
    let snat = q.src;

    let answer = payload(ANSWER_LEN, 5);
    let frags = fragment4(&udp_frame((REMOTE_POD, 5353), snat, &answer), 0x0bad);
    let mut outs = Vec::new();
    for (i, f) in frags.iter().enumerate() {
        let (v, out) = ns.run(|| dp.run_xdp_on(XDP, f, up0));
        assert_eq!(v, XDP_TX, "fragment {i}: forwarded to the client");
        assert_eq!(&out[..6], &CLIENT_MAC, "fragment {i}: to the client's MAC");
        assert_eq!(out[14 + 8], 63, "fragment {i}: TTL decremented");
        outs.push(out);
    }
    assert_eq!(ports_at(&outs[0], 14 + 20), (NODE_PORT, 40000));
    let d = reassemble4(&outs);
    assert_eq!((d.src, d.dst), ((NODE, NODE_PORT), client), "both translations undone in both fragments");
    assert!(d.udp_csum_ok, "reassembled UDP checksum");
    assert_eq!(d.payload, answer);
    assert_eq!(dp.service_count(verdict::REVERSE_NAT), 2);
}

/// A fragment header placed so that the transport header behind it lies past the last
/// offset the parser reads (1,023 bytes) is not ours: the frame passes untouched. Before,
/// the offset wrapped and the "ports" were read from the Ethernet header: with a source MAC
/// spelling port 80 the frame was rewritten in its MAC and EtherType (found by the fuzzer).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_fragment_header_past_the_parse_bound_is_never_misread() {
    require_root("v6_fragment_header_past_the_parse_bound_is_never_misread");
    let mut dp = TestDataplane::load();
    service(&mut dp, VIP6.into(), 80, &[(B1_6.into(), 8080)], false);
    // Destination options of (120 + 1) * 8 bytes put the fragment header at frame offset
    // 14 + 40 + 968 = 1022 and the UDP header at 1030, past the bound.
    const OPTS: usize = 968;
    let udp_len = 8 + 8;
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0x50, 0, 0x10, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((OPTS + 8 + udp_len) as u16).to_be_bytes());
    f.extend_from_slice(&[60, 64]);
    f.extend_from_slice(&CLIENT6.octets());
    f.extend_from_slice(&VIP6.octets());
    // Next header, length in 8-byte units past the first, then Pad1 options (zero bytes).
    let mut opts = vec![0u8; OPTS];
    (opts[0], opts[1]) = (44, (OPTS / 8 - 1) as u8);
    f.extend_from_slice(&opts);
    // Fragment header: next UDP, offset 0 with M (a first fragment), id 7.
    f.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 7]);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(b"12345678");
    let (v, out) = dp.run(FROM_POD, &f);
    assert_eq!((v, out), (TC_ACT_UNSPEC, f), "passed untouched");
}
