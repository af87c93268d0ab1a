//! The IPv6 datapath through BPF_PROG_TEST_RUN (issue 10, 4.1): IPv6 frames through TC
//! (`from_pod`, `to_pod`, `to_uplink`) and XDP (`from_uplink`) for every row of the verdict
//! table, bytes in, bytes out, with the TCP/UDP checksums (over the IPv6 pseudo-header) and
//! the ICMPv6 checksum recomputed independently (etherparse).
//!
//! The control plane does not write the IPv6 maps yet, so these tests program SERVICES6,
//! BACKENDS6, BACKEND_SLOTS, SOURCE_RANGES6, AFFINITY6 and NODE_CONFIG6 directly, opened
//! from the test's own pin directory. Forwarding (`bpf_fib_lookup`) runs in a private
//! network namespace with IPv6 routes and permanent neighbours, deleted on drop.
use std::{collections::HashMap as StdHashMap, net::Ipv6Addr, path::Path};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key};
use etherparse::{Icmpv6Slice, PacketBuilder, TcpSlice, UdpSlice};
use proxy_common::nat_defaults::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use proxy_common::{
    AffinityKey6, AffinityValue, Backend6, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey6, CtValue6, NeighKey6, NodeConfig6,
    PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceKey6, ServiceValue, SlotKey, SourceRangeData6,
    StatsKey, backend_flags, ct_flags, nat_defaults, svc_flags, verdict,
};
use proxy_tests::harness::*;
use proxy_userspace::dataplane::maps::node::{PortRange, node_config};

const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";
const FROM_UPLINK: &str = "from_uplink";
const TO_UPLINK: &str = "to_uplink";

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

/// Offsets in an Ethernet + IPv6 frame without extension headers.
const IP6: usize = 14;
const L4: usize = 14 + 40;

const fn v6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

// Pod side (ClusterIP).
const VIP: Ipv6Addr = v6([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10]);
const CLIENT: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5]);
const B1: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1]);
const B2: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2]);
const B3: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 3]);

// North-south: the uplink subnet fd00:100::/64, pods of this node and of others.
const NODE: Ipv6Addr = v6([0xfd00, 0x100, 0, 0, 0, 0, 0, 1]);
const NODE2: Ipv6Addr = v6([0xfd00, 0x100, 0, 0, 0, 0, 0, 2]);
const UNRESOLVED_GW: Ipv6Addr = v6([0xfd00, 0x100, 0, 0, 0, 0, 0, 3]);
const EXT_CLIENT: Ipv6Addr = v6([0xfd00, 0x100, 0, 0, 0, 0, 0, 0x100]);
const LB_IP: Ipv6Addr = v6([0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x20]);
const LOCAL_POD: Ipv6Addr = v6([0xfd00, 0x244, 1, 0, 0, 0, 0, 0x10]);
const REMOTE_POD: Ipv6Addr = v6([0xfd00, 0x244, 2, 0, 0, 0, 0, 0x10]);
const FAR_POD: Ipv6Addr = v6([0xfd00, 0x244, 3, 0, 0, 0, 0, 0x10]);
const NODE_PORT: u16 = 30080;

/// MACs of the private forwarding namespace: our uplink, node 2, the external client.
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];

const AFFINITY_TIMEOUT: u32 = 10_800;

/// The IPv6 maps (and the shared slot map), opened from the test's pins.
struct Maps6 {
    services: HashMap<MapData, ServiceKey6, ServiceValue>,
    backends: HashMap<MapData, u32, Backend6>,
    slots: HashMap<MapData, SlotKey, u32>,
    conntrack: HashMap<MapData, CtKey6, CtValue6>,
    ct_new: HashMap<MapData, CtKey6, CtValue6>,
    affinity: HashMap<MapData, AffinityKey6, AffinityValue>,
    source_ranges: LpmTrie<MapData, SourceRangeData6, u8>,
    node: Array<MapData, NodeConfig6>,
    neigh_misses: HashMap<MapData, NeighKey6, u64>,
    next_backend_id: u32,
}

fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &str) -> T {
    let data = MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("open pinned {name}: {e}"));
    T::try_from(Map::from_map_data(data).expect(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A frontend: address, port, protocol, scope.
#[derive(Clone, Copy)]
struct Fe {
    addr: Ipv6Addr,
    port: u16,
    proto: u8,
    scope: u8,
}

const fn fe(addr: Ipv6Addr, port: u16, proto: u8, scope: u8) -> Fe {
    Fe { addr, port, proto, scope }
}

fn fe_key(f: Fe) -> ServiceKey6 {
    ServiceKey6 { addr: ip6_to_map(f.addr), port: f.port.to_be(), proto: f.proto, scope: f.scope }
}

impl Maps6 {
    fn open(dp: &TestDataplane) -> Self {
        let dir = dp.pins.0.join("maps");
        Maps6 {
            services: open(&dir, "SERVICES6"),
            backends: open(&dir, "BACKENDS6"),
            slots: open(&dir, "BACKEND_SLOTS"),
            conntrack: open(&dir, "CONNTRACK6"),
            ct_new: open(&dir, "CT_NEW6"),
            affinity: open(&dir, "AFFINITY6"),
            source_ranges: open(&dir, "SOURCE_RANGES6"),
            node: open(&dir, "NODE_CONFIG6"),
            neigh_misses: open(&dir, "NEIGH_MISSES6"),
            next_backend_id: 100,
        }
    }

    /// Program frontend `f` as service `id` with `flags` and `backends` (address, port,
    /// `backend_flags`) in slot generation 0; returns the backends' ids in slot order.
    fn service(&mut self, id: u32, f: Fe, flags: u32, backends: &[(Ipv6Addr, u16, u8)]) -> Vec<u32> {
        let mut ids = Vec::new();
        for (i, (addr, port, bflags)) in backends.iter().enumerate() {
            let bid = self.next_backend_id;
            self.next_backend_id += 1;
            let b = Backend6 { addr: ip6_to_map(*addr), port: port.to_be(), proto: f.proto, flags: *bflags };
            self.backends.insert(bid, b, 0).expect("BACKENDS6 insert");
            self.slots.insert(SlotKey::new(id, 0, i as u32), bid, 0).expect("BACKEND_SLOTS insert");
            ids.push(bid);
        }
        let affinity_timeout = if flags & svc_flags::AFFINITY != 0 { AFFINITY_TIMEOUT } else { 0 };
        let v =
            ServiceValue { id, count: backends.len() as u32, flags, generation: 0, affinity_timeout, maglev_size: 0 };
        self.services.insert(fe_key(f), v, 0).expect("SERVICES6 insert");
        ids
    }

    /// Allow `prefix/len` to use service `id` (SOURCE_RANGES6).
    fn allow(&mut self, id: u32, prefix: Ipv6Addr, len: u32) {
        let w = ip6_to_map(prefix);
        let key = Key::new(32 + len, [id.to_be(), w[0], w[1], w[2], w[3]]);
        self.source_ranges.insert(&key, 1, 0).expect("SOURCE_RANGES6 insert");
    }

    fn set_node(&mut self, snat: Option<Ipv6Addr>, hairpin: Option<Ipv6Addr>) {
        let c = NodeConfig6 {
            snat_addr: snat.map_or([0; 4], ip6_to_map),
            hairpin_addr: hairpin.map_or([0; 4], ip6_to_map),
        };
        self.node.set(0, c, 0).expect("NODE_CONFIG6 set");
    }

    /// A flow's entry, from whichever table holds it (assured or not).
    fn ct(&self, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), proto: u8, dir: u8) -> Option<CtValue6> {
        let k = ct_key(src, dst, proto, dir);
        self.conntrack.get(&k, 0).or_else(|_| self.ct_new.get(&k, 0)).ok()
    }

    fn ct_count(&self) -> usize {
        self.conntrack.keys().count() + self.ct_new.keys().count()
    }
}

fn ct_key(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), proto: u8, dir: u8) -> CtKey6 {
    CtKey6 {
        src_addr: ip6_to_map(src.0),
        dst_addr: ip6_to_map(dst.0),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
        proto,
        dir,
        _pad: 0,
    }
}

fn nat_of(v: &CtValue6) -> (Ipv6Addr, u16) {
    (ip6_from_map(v.nat_addr), u16::from_be(v.nat_port))
}

fn snat_of(v: &CtValue6) -> (Ipv6Addr, u16) {
    (ip6_from_map(v.snat_addr), u16::from_be(v.snat_port))
}

/// A frame with the IPv6 EtherType is counted in GLOBAL_STATS' IPv6 block, what the
/// programs cannot tell is IP (`not_ip`: a VLAN tag) in the `other` block (the split itself
/// is checked for both families in datapath.rs).
fn global(dp: &TestDataplane, v: u32) -> u64 {
    use proxy_common::StatsFamily;
    dp.global_in(if v == verdict::NOT_IP { StatsFamily::Other } else { StatsFamily::Ipv6 }, v)
}

fn per_service(dp: &TestDataplane, id: u32, v: u32) -> u64 {
    dp.maps()
        .service_stats
        .get(&StatsKey { svc_id: id, verdict: v }, 0)
        .map(|pc| pc.iter().map(|c| c.packets).sum())
        .unwrap_or(0)
}

fn vname(v: u32) -> &'static str {
    proxy_common::Verdict::ALL[v as usize].name()
}

fn frame_for(proto: u8, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    match proto {
        PROTO_TCP => tcp6_frame(src, dst, payload),
        _ => udp6_frame(src, dst, payload),
    }
}

/// The destination address of an Ethernet + IPv6 frame, read straight from the bytes.
fn dst_addr(frame: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&frame[IP6 + 24..IP6 + 40]).unwrap())
}

/// Insert extension headers of the given types (0 hop-by-hop, 43 routing, 60 destination
/// options, 44 fragment; each 8 bytes) between the IPv6 header and the transport header of
/// `frame`, fixing the next-header chain and the payload length. The L4 checksum stays
/// valid: the pseudo-header counts the upper-layer length, not the payload length, and
/// there is no routing header with segments left.
fn with_ext_headers(frame: &[u8], types: &[u8]) -> Vec<u8> {
    let l4_next = frame[IP6 + 6];
    let mut ext = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let next = types.get(i + 1).copied().unwrap_or(l4_next);
        match t {
            // Routing header, type 253 (RFC 4727 experiment), segments left 0.
            43 => ext.extend_from_slice(&[next, 0, 253, 0, 0, 0, 0, 0]),
            // Fragment header: offset 0, more fragments, identification 42.
            44 => ext.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0, 42]),
            // Options header with one PadN option filling it.
            _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    let mut out = frame[..L4].to_vec();
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[L4..]);
    out[IP6 + 6] = types[0];
    let plen = u16::from_be_bytes([out[IP6 + 4], out[IP6 + 5]]) + ext.len() as u16;
    out[IP6 + 4..IP6 + 6].copy_from_slice(&plen.to_be_bytes());
    out
}

/// Ports and an independently recomputed checksum of the TCP/UDP header at `l4` of an IPv6
/// frame (for frames with extension headers), with the addresses from the fixed header.
fn l4_at(frame: &[u8], l4: usize, proto: u8) -> ((Ipv6Addr, u16), (Ipv6Addr, u16), bool, Vec<u8>) {
    let s: [u8; 16] = frame[IP6 + 8..IP6 + 24].try_into().unwrap();
    let d: [u8; 16] = frame[IP6 + 24..IP6 + 40].try_into().unwrap();
    let (sport, dport, ok, payload) = if proto == PROTO_TCP {
        let t = TcpSlice::from_slice(&frame[l4..]).expect("tcp");
        let h = t.to_header();
        (
            h.source_port,
            h.destination_port,
            h.calc_checksum_ipv6_raw(s, d, t.payload()).unwrap() == h.checksum,
            t.payload().to_vec(),
        )
    } else {
        let u = UdpSlice::from_slice(&frame[l4..]).expect("udp");
        let h = u.to_header();
        (
            h.source_port,
            h.destination_port,
            h.calc_checksum_ipv6_raw(s, d, u.payload()).unwrap() == h.checksum,
            u.payload().to_vec(),
        )
    };
    ((Ipv6Addr::from(s), sport), (Ipv6Addr::from(d), dport), ok, payload)
}

fn three_backends(m: &mut Maps6, id: u32, proto: u8) -> Vec<u32> {
    m.service(id, fe(VIP, 80, proto, SCOPE_INTERNAL), 0, &[(B1, 8080, 0), (B2, 8080, 0), (B3, 8080, 0)])
}

/// Item 1: ClusterIP hit: DNAT to a backend [addr]:port with a valid checksum, both conntrack
/// entries, later packets keep the backend, and the backend's reply entering the client pod
/// gets VIP:port back as its source.
fn roundtrip(proto: u8) {
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    let id = 11;
    three_backends(&mut m, id, proto);
    let client = (CLIENT, 40000);
    let frame = frame_for(proto, client, (VIP, 80), b"hello");
    let (v, out) = dp.run(FROM_POD, &frame);
    assert_eq!(v, TC_ACT_UNSPEC);
    let d = decode6(&out);
    assert!([B1, B2, B3].contains(&d.dst.0), "dst {:?}", d.dst);
    assert_eq!(d.dst.1, 8080);
    assert_eq!(d.src, client, "source untouched");
    assert!(d.l4_csum_ok, "checksum: {d:?}");
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.hop_limit, 64, "TC does not route: hop limit untouched");
    assert_eq!(out.len(), frame.len());
    assert_eq!(&out[..IP6 + 8], &frame[..IP6 + 8], "MACs and the IPv6 header up to the addresses untouched");
    let backend = d.dst;

    let fwd = m.ct(client, (VIP, 80), proto, CT_DIR_FORWARD).expect("forward CONNTRACK6 entry");
    assert_eq!(nat_of(&fwd), backend);
    assert_eq!((fwd.svc_id, fwd.flags & ct_flags::SNAT), (id, 0));
    let rev = m.ct(backend, client, proto, CT_DIR_REPLY).expect("reply CONNTRACK6 entry");
    assert_eq!(nat_of(&rev), (VIP, 80));
    assert_eq!(m.ct_count(), 2);

    for i in 0..20 {
        let (v, out) = dp.run(FROM_POD, &frame);
        let d = decode6(&out);
        assert_eq!((v, d.dst), (TC_ACT_UNSPEC, backend), "packet {i} of the flow");
        assert!(d.l4_csum_ok);
    }

    let reply = frame_for(proto, backend, client, b"world");
    let (v, out) = dp.run(TO_POD, &reply);
    assert_eq!(v, TC_ACT_UNSPEC);
    let r = decode6(&out);
    assert_eq!((r.src, r.dst), ((VIP, 80), client), "reply source is VIP:port");
    assert!(r.l4_csum_ok, "reply checksum: {r:?}");
    assert_eq!(r.payload, b"world");

    assert_eq!(per_service(&dp, id, verdict::NEW_FLOW), 1);
    assert_eq!(per_service(&dp, id, verdict::ESTABLISHED), 20);
    assert_eq!(per_service(&dp, id, verdict::REVERSE_NAT), 1);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_tcp_clusterip_roundtrip() {
    require_root("v6_tcp_clusterip_roundtrip");
    roundtrip(PROTO_TCP);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_udp_clusterip_roundtrip() {
    require_root("v6_udp_clusterip_roundtrip");
    roundtrip(PROTO_UDP);
}

/// Item 2: Misses: not service traffic, passed untouched through every hook, counted `pass`.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_misses_pass_untouched() {
    require_root("v6_misses_pass_untouched");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 12, PROTO_TCP);
    let other_vip = Ipv6Addr::from(0xfd00_0010_0096_0000_0000_0000_0000_0011u128);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("other address", tcp6_frame((CLIENT, 40000), (other_vip, 80), b"x")),
        ("a backend directly", tcp6_frame((CLIENT, 40000), (B1, 8080), b"x")),
        ("other port", tcp6_frame((CLIENT, 40000), (VIP, 81), b"x")),
        ("UDP to a TCP-only frontend", udp6_frame((CLIENT, 40000), (VIP, 80), b"x")),
    ];
    for (name, frame) in cases {
        let before = global(&dp, verdict::PASS);
        for prog in [FROM_POD, TO_POD] {
            let (v, out) = dp.run(prog, &frame);
            assert_eq!((v, &out), (TC_ACT_UNSPEC, &frame), "{name} via {prog}");
        }
        let (v, out) = dp.run(FROM_UPLINK, &frame);
        assert_eq!((v, &out), (XDP_PASS, &frame), "{name} via {FROM_UPLINK}");
        assert_eq!(global(&dp, verdict::PASS), before + 3, "{name}: counted pass");
    }
    // The internal (ClusterIP) frontend is not served on the uplink.
    let f = tcp6_frame((EXT_CLIENT, 40000), (VIP, 80), b"");
    assert_eq!(dp.run(FROM_UPLINK, &f), (XDP_PASS, f));
    assert_eq!(m.ct_count(), 0, "nothing tracked");
    assert_eq!(per_service(&dp, 12, verdict::PASS), 0, "misses belong to no service");
}

/// Item 3a: No endpoints, pod side: a TCP SYN is answered with a reset, a UDP datagram with an
/// ICMPv6 port unreachable quoting its IPv6 and UDP headers, both from VIP:port and
/// redirected back into the pod; a RST is dropped; nothing tracked; counted `no_backend`.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_no_endpoints_pod_side_rejects() {
    require_root("v6_no_endpoints_pod_side_rejects");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    m.service(21, fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL), 0, &[]);
    m.service(22, fe(VIP, 53, PROTO_UDP, SCOPE_INTERNAL), 0, &[]);

    // A SYN (no payload, then with 4 bytes): RST|ACK, seq 0, ack = seq + 1 (+ payload).
    for payload in [&b""[..], b"data"] {
        let syn = tcp6_frame((CLIENT, 40000), (VIP, 80), payload);
        let (v, out) = dp.run(FROM_POD, &syn);
        assert_eq!(v, TC_ACT_REDIRECT, "answered back into the pod");
        assert_eq!(out.len(), 14 + 40 + 20, "Ethernet + IPv6 + TCP: {out:02x?}");
        assert_eq!((&out[..6], &out[6..12]), (&syn[6..12], &syn[..6]), "MACs swapped");
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        assert_eq!(out[IP6] >> 4, 6, "version");
        assert_eq!(u16::from_be_bytes([out[IP6 + 4], out[IP6 + 5]]), 20, "payload length");
        assert_eq!(out[IP6 + 6], PROTO_TCP, "next header");
        let d = decode6(&out);
        assert_eq!((d.src, d.dst), ((VIP, 80), (CLIENT, 40000)), "addresses and ports swapped");
        assert_eq!(d.tcp_flags, tcp::RST | tcp::ACK, "RST|ACK");
        assert!(d.l4_csum_ok, "{d:?}");
        assert!(d.payload.is_empty());
        assert_eq!(u32::from_be_bytes(out[L4 + 4..L4 + 8].try_into().unwrap()), 0, "seq");
        let ack = u32::from_be_bytes(out[L4 + 8..L4 + 12].try_into().unwrap());
        assert_eq!(ack, 1000 + 1 + payload.len() as u32, "ack = seq + SYN + payload");
    }

    // A segment with ACK (no SYN): RST with seq = its ack (RFC 9293 3.10.7.1).
    let ack_seg = tcp6_segment((CLIENT, 40001), (VIP, 80), tcp::ACK, b"late");
    let (v, out) = dp.run(FROM_POD, &ack_seg);
    assert_eq!(v, TC_ACT_REDIRECT);
    let d = decode6(&out);
    assert_eq!((d.src, d.dst, d.tcp_flags), ((VIP, 80), (CLIENT, 40001), tcp::RST));
    assert!(d.l4_csum_ok);
    assert_eq!(u32::from_be_bytes(out[L4 + 4..L4 + 8].try_into().unwrap()), 1, "seq = the segment's ack");

    // A RST is never answered: dropped untouched.
    let rst = tcp6_segment((CLIENT, 40002), (VIP, 80), tcp::RST, b"");
    let (v, out) = dp.run(FROM_POD, &rst);
    assert_eq!((v, &out), (TC_ACT_SHOT, &rst));

    // UDP: ICMPv6 destination unreachable, port unreachable.
    let query = udp6_frame((CLIENT, 5353), (VIP, 53), b"query");
    let (v, out) = dp.run(FROM_POD, &query);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 8 + 40 + 8, "Ethernet + IPv6 + ICMPv6 + quoted IPv6 and UDP headers");
    assert_eq!((&out[..6], &out[6..12]), (&query[6..12], &query[..6]), "MACs swapped");
    let ip = etherparse::Ipv6HeaderSlice::from_slice(&out[IP6..L4]).expect("IPv6 header");
    assert_eq!((ip.source_addr(), ip.destination_addr()), (VIP, CLIENT));
    assert_eq!((ip.next_header().0, ip.payload_length(), ip.hop_limit()), (58, 56, 64));
    assert_eq!((out[L4], out[L4 + 1]), (1, 4), "type 1 (destination unreachable), code 4 (port unreachable)");
    assert_eq!(&out[L4 + 4..L4 + 8], &[0; 4], "unused");
    assert_eq!(&out[L4 + 8..], &query[IP6..L4 + 8], "quotes the datagram's IPv6 and UDP headers");
    let icmp = Icmpv6Slice::from_slice(&out[L4..]).expect("ICMPv6");
    assert!(icmp.is_checksum_valid(ip.source(), ip.destination()), "ICMPv6 checksum (pseudo-header)");
    // And once more without etherparse: the one's complement sum over pseudo-header and
    // message must be 0xffff.
    let mut sum: u32 = out[IP6 + 8..L4].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    sum += (out.len() - L4) as u32 + 58;
    sum += out[L4..].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "ICMPv6 checksum, recomputed by hand");

    assert_eq!(m.ct_count(), 0, "no conntrack for refused flows");
    assert_eq!(per_service(&dp, 21, verdict::NO_BACKEND), 4);
    assert_eq!(per_service(&dp, 22, verdict::NO_BACKEND), 1);
}

/// Item 3b: No endpoints, uplink: a TCP SYN is answered in place with a RST (`XDP_TX`, payload
/// trimmed), UDP is dropped; counted `no_backend`.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_no_endpoints_uplink_resets_tcp() {
    require_root("v6_no_endpoints_uplink_resets_tcp");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    m.service(31, fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL), svc_flags::NODEPORT, &[]);
    m.service(32, fe(NODE, NODE_PORT, PROTO_UDP, SCOPE_EXTERNAL), svc_flags::NODEPORT, &[]);
    let syn = tcp6_frame((EXT_CLIENT, 40000), (NODE, NODE_PORT), b"data");
    let (v, out) = dp.run(FROM_UPLINK, &syn);
    assert_eq!(v, XDP_TX);
    assert_eq!(out.len(), 14 + 40 + 20, "Ethernet + IPv6 + TCP, payload trimmed");
    assert_eq!((&out[..6], &out[6..12]), (&syn[6..12], &syn[..6]), "MACs swapped");
    let d = decode6(&out);
    assert_eq!((d.src, d.dst), ((NODE, NODE_PORT), (EXT_CLIENT, 40000)));
    assert_eq!(d.tcp_flags, tcp::RST | tcp::ACK);
    assert!(d.l4_csum_ok, "{d:?}");
    assert_eq!(u32::from_be_bytes(out[L4 + 4..L4 + 8].try_into().unwrap()), 0, "seq");
    assert_eq!(u32::from_be_bytes(out[L4 + 8..L4 + 12].try_into().unwrap()), 1000 + 1 + 4, "ack");

    let (v, _) = dp.run(FROM_UPLINK, &udp6_frame((EXT_CLIENT, 5353), (NODE, NODE_PORT), b"q"));
    assert_eq!(v, XDP_DROP, "UDP is dropped on the uplink");
    assert_eq!(m.ct_count(), 0);
    assert_eq!(per_service(&dp, 31, verdict::NO_BACKEND), 1);
    assert_eq!(per_service(&dp, 32, verdict::NO_BACKEND), 1);
}

/// Item 4: loadBalancerSourceRanges: a /64 allowed; clients inside pass (translated), clients
/// outside (even by one bit, or allowed only for another service) are dropped and counted
/// `source_range_drop`, with no conntrack. On the uplink (XDP) and for pods (TC).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_source_ranges_allow_a_prefix_and_drop_the_rest() {
    require_root("v6_source_ranges_allow_a_prefix_and_drop_the_rest");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    let flags = svc_flags::LOADBALANCER | svc_flags::SOURCE_RANGES;
    let local = backend_flags::LOCAL;
    m.service(41, fe(LB_IP, 80, PROTO_TCP, SCOPE_EXTERNAL), flags, &[(LOCAL_POD, 8080, local)]);
    m.service(42, fe(LB_IP, 80, PROTO_TCP, SCOPE_INTERNAL), flags, &[(LOCAL_POD, 8080, local)]);
    // The same ClusterIP service without ranges, and another LB service whose range covers
    // a client this one refuses.
    m.service(43, fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL), 0, &[(LOCAL_POD, 8080, local)]);
    let allowed: Ipv6Addr = "2001:db8:aa:1::".parse().unwrap();
    for id in [41, 42] {
        m.allow(id, allowed, 64);
    }
    m.allow(44, "2001:db8:aa:2::".parse().unwrap(), 64);

    let inside: [Ipv6Addr; 2] =
        ["2001:db8:aa:1::5".parse().unwrap(), "2001:db8:aa:1:ffff:ffff:ffff:ffff".parse().unwrap()];
    let outside: [Ipv6Addr; 3] = [
        "2001:db8:aa:0:ffff:ffff:ffff:ffff".parse().unwrap(),
        "2001:db8:aa:2::5".parse().unwrap(),
        "2001:db8:ab:1::5".parse().unwrap(),
    ];
    for (i, c) in inside.iter().enumerate() {
        let (v, out) = dp.run(FROM_UPLINK, &tcp6_frame((*c, 40000 + i as u16), (LB_IP, 80), b""));
        let d = decode6(&out);
        assert_eq!((v, d.dst, d.src.0), (XDP_PASS, (LOCAL_POD, 8080), *c), "{c} (uplink) inside the /64");
        assert!(d.l4_csum_ok);
        let (v, out) = dp.run(FROM_POD, &tcp6_frame((*c, 41000 + i as u16), (LB_IP, 80), b""));
        assert_eq!((v, decode6(&out).dst), (TC_ACT_UNSPEC, (LOCAL_POD, 8080)), "{c} (pod) inside the /64");
    }
    for (i, c) in outside.iter().enumerate() {
        let f = tcp6_frame((*c, 40000 + i as u16), (LB_IP, 80), b"");
        let (v, _) = dp.run(FROM_UPLINK, &f);
        assert_eq!(v, XDP_DROP, "{c} (uplink) outside the /64");
        let (v, out) = dp.run(FROM_POD, &f);
        assert_eq!((v, &out), (TC_ACT_SHOT, &f), "{c} (pod) outside: dropped untouched");
        assert!(m.ct((*c, 40000 + i as u16), (LB_IP, 80), PROTO_TCP, CT_DIR_FORWARD).is_none(), "{c}: no conntrack");
        // The ClusterIP of the same service stays open to it.
        let (v, out) = dp.run(FROM_POD, &tcp6_frame((*c, 42000), (VIP, 80), b""));
        assert_eq!((v, decode6(&out).dst), (TC_ACT_UNSPEC, (LOCAL_POD, 8080)), "{c}: ClusterIP open");
    }
    assert_eq!(per_service(&dp, 41, verdict::SOURCE_RANGE_DROP), 3);
    assert_eq!(per_service(&dp, 42, verdict::SOURCE_RANGE_DROP), 3);
    assert_eq!(per_service(&dp, 41, verdict::NEW_FLOW), 2);
    assert_eq!(global(&dp, verdict::SOURCE_RANGE_DROP), 6);
}

/// Item 5: sessionAffinity: ClientIP: new flows of one client keep its backend (AFFINITY6 holds
/// it), other clients still spread, and the datapath follows what AFFINITY6 says.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_session_affinity_pins_a_client() {
    require_root("v6_session_affinity_pins_a_client");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    let id = 51;
    let ids = m.service(
        id,
        fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL),
        svc_flags::AFFINITY,
        &[(B1, 8080, 0), (B2, 8080, 0), (B3, 8080, 0)],
    );
    let first = decode6(&dp.run(FROM_POD, &tcp6_frame((CLIENT, 1000), (VIP, 80), b"")).1).dst;
    for port in 1001..1100u16 {
        let d = decode6(&dp.run(FROM_POD, &tcp6_frame((CLIENT, port), (VIP, 80), b"")).1);
        assert_eq!(d.dst, first, "flow from port {port} left the affinity backend");
    }
    let akey = AffinityKey6 { client_addr: ip6_to_map(CLIENT), svc_id: id };
    let a = m.affinity.get(&akey, 0).expect("AFFINITY6 entry for the client");
    let b = m.backends.get(&a.backend_id, 0).expect("affinity backend exists");
    assert_eq!((ip6_from_map(b.addr), u16::from_be(b.port)), first, "AFFINITY6 names the chosen backend");
    assert_ne!(a.last_used, 0);

    let mut others = std::collections::HashSet::new();
    for c in 0..60u16 {
        let client = v6([0xfd00, 0x10, 0x244, 3, 0, 0, 0, c]);
        others.insert(decode6(&dp.run(FROM_POD, &tcp6_frame((client, 5000), (VIP, 80), b"")).1).dst.0);
    }
    assert_eq!(others.len(), 3, "different clients spread over all backends");

    // Point the client's affinity at another backend (fresh timestamp): new flows follow it.
    let other = *ids.iter().find(|b| **b != a.backend_id).unwrap();
    let ob = m.backends.get(&other, 0).unwrap();
    m.affinity.insert(akey, AffinityValue { backend_id: other, _pad: 0, last_used: a.last_used }, 0).unwrap();
    let d = decode6(&dp.run(FROM_POD, &tcp6_frame((CLIENT, 2000), (VIP, 80), b"")).1);
    assert_eq!(d.dst, (ip6_from_map(ob.addr), 8080), "the datapath reads AFFINITY6");
}

/// The node's network, IPv6: uplink `up0` (fd00:100::1/64), node 2 and the external client
/// as permanent neighbours, node 2's pod prefix routed via node 2, another via a gateway
/// nobody resolved, forwarding on.
fn fwd_ns6() -> UplinkNs {
    let net = UplinkNs::new("epx-fwd6-", UPLINK_MAC);
    let ns = &net.ns;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    ns.sysctl("net.ipv6.conf.default.forwarding", "1").unwrap();
    ns.ip(&["-6", "addr", "add", &format!("{NODE}/64"), "dev", "up0", "nodad"]).unwrap();
    ns.ip(&["-6", "route", "add", "fd00:244:2::/64", "via", &NODE2.to_string(), "dev", "up0"]).unwrap();
    ns.ip(&["-6", "route", "add", "fd00:244:3::/64", "via", &UNRESOLVED_GW.to_string(), "dev", "up0"]).unwrap();
    for (ip, m) in [(NODE2, NODE2_MAC), (EXT_CLIENT, CLIENT_MAC)] {
        ns.ip(&["-6", "neigh", "replace", &ip.to_string(), "lladdr", &mac_str(m), "nud", "permanent", "dev", "up0"])
            .unwrap();
    }
    net
}

/// Item 6a: NodePort to a local backend: DNAT only, `XDP_PASS`, client address preserved, MACs
/// and hop limit untouched; later packets keep the backend; the pod's reply leaving through
/// the uplink gets node:nodePort back (`to_uplink`); the same reply seen by XDP is passed.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_xdp_nodeport_local_backend() {
    require_root("v6_xdp_nodeport_local_backend");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    let id = 61;
    m.service(
        id,
        fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL),
        svc_flags::NODEPORT,
        &[(LOCAL_POD, 8080, backend_flags::LOCAL)],
    );
    let client = (EXT_CLIENT, 40000);
    let frame = tcp6_frame(client, (NODE, NODE_PORT), b"hello");
    let (v, out) = dp.run(FROM_UPLINK, &frame);
    assert_eq!(v, XDP_PASS);
    let d = decode6(&out);
    assert_eq!((d.src, d.dst), (client, (LOCAL_POD, 8080)));
    assert!(d.l4_csum_ok, "{d:?}");
    assert_eq!(d.payload, b"hello");
    assert_eq!((&out[..12], d.hop_limit), (&frame[..12], 64), "not forwarded by XDP: MACs, hop limit untouched");
    let fwd = m.ct(client, (NODE, NODE_PORT), PROTO_TCP, CT_DIR_FORWARD).expect("forward entry");
    assert_eq!((nat_of(&fwd), fwd.flags & ct_flags::SNAT), ((LOCAL_POD, 8080), 0));
    let rev = m.ct((LOCAL_POD, 8080), client, PROTO_TCP, CT_DIR_REPLY).expect("reply entry");
    assert_eq!(nat_of(&rev), (NODE, NODE_PORT));

    for _ in 0..3 {
        let (v, out) = dp.run(FROM_UPLINK, &frame);
        assert_eq!((v, decode6(&out).dst), (XDP_PASS, (LOCAL_POD, 8080)));
    }
    let reply = tcp6_segment((LOCAL_POD, 8080), client, tcp::SYN | tcp::ACK, b"world");
    let (v, out) = dp.run(TO_UPLINK, &reply);
    assert_eq!(v, TC_ACT_UNSPEC);
    let r = decode6(&out);
    assert_eq!((r.src, r.dst), ((NODE, NODE_PORT), client));
    assert!(r.l4_csum_ok, "{r:?}");
    assert_eq!(r.payload, b"world");
    assert_eq!(dp.run(FROM_UPLINK, &reply), (XDP_PASS, reply.clone()), "a local flow's reply is not XDP's");

    assert_eq!(per_service(&dp, id, verdict::NEW_FLOW), 1);
    assert_eq!(per_service(&dp, id, verdict::ESTABLISHED), 3);
    assert_eq!(per_service(&dp, id, verdict::REVERSE_NAT), 1);
}

/// Item 6b: A LoadBalancer IP to a remote backend: DNAT + SNAT to NODE_CONFIG6's address with a
/// port of the SNAT range, hop limit decremented, MACs from the namespace's neighbour
/// table, `XDP_TX` (or, from another interface, handed to `uplink_handoff`); the backend's reply is
/// translated back completely (`reverse_nat`) and forwarded to the client's MAC.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_xdp_remote_backend_dnat_snat_forward_and_reverse() {
    require_root("v6_xdp_remote_backend_dnat_snat_forward_and_reverse");
    let net = fwd_ns6();
    let up0 = net.uplink_ifindex();
    assert_ne!(up0, 0);
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    m.set_node(Some(NODE), None);
    let id = 62;
    m.service(id, fe(LB_IP, 80, PROTO_TCP, SCOPE_EXTERNAL), svc_flags::LOADBALANCER, &[(REMOTE_POD, 8080, 0)]);
    let client = (EXT_CLIENT, 41000);
    let frame = tcp6_frame(client, (LB_IP, 80), b"hello");
    let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &frame, up0));
    assert_eq!(v, XDP_TX, "forwarded out of the interface it came in on");
    let d = decode6(&out);
    assert_eq!(d.dst, (REMOTE_POD, 8080));
    assert_eq!(d.src.0, NODE, "source NATed to NODE_CONFIG6.snat_addr");
    let snat_port = d.src.1;
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port), "SNAT port {snat_port}");
    assert!(d.l4_csum_ok, "{d:?}");
    assert_eq!(d.payload, b"hello");
    assert_eq!((&out[..6], &out[6..12]), (&NODE2_MAC[..], &UPLINK_MAC[..]), "MACs: node 2 (gateway), our uplink");
    assert_eq!(d.hop_limit, 63);

    let fwd = m.ct(client, (LB_IP, 80), PROTO_TCP, CT_DIR_FORWARD).expect("forward entry");
    assert_ne!(fwd.flags & ct_flags::SNAT, 0);
    assert_eq!((nat_of(&fwd), snat_of(&fwd)), ((REMOTE_POD, 8080), (NODE, snat_port)));
    let rev = m.ct((REMOTE_POD, 8080), (NODE, snat_port), PROTO_TCP, CT_DIR_REPLY).expect("reply entry");
    assert_ne!(rev.flags & ct_flags::SNAT, 0);
    assert_eq!((nat_of(&rev), snat_of(&rev)), ((LB_IP, 80), client));

    let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &frame, up0));
    assert_eq!((v, decode6(&out).src), (XDP_TX, (NODE, snat_port)), "same flow, same port");
    // From another interface (lo): handed to the uplink's TC ingress, tagged in the XDP
    // metadata (8 bytes test_run returns in front of the frame; see datapath_xdp.rs).
    let (v, out) = net.ns.run(|| dp.run(FROM_UPLINK, &frame));
    assert_eq!(v, XDP_PASS, "from another interface (lo): handed to uplink_handoff");
    assert_eq!(out[..4], 0x6570_484f_u32.to_ne_bytes());
    assert_eq!(out[4..8], up0.to_ne_bytes());
    assert_eq!(decode6(&out[8..]).src, (NODE, snat_port));

    let reply = tcp6_segment((REMOTE_POD, 8080), (NODE, snat_port), tcp::SYN | tcp::ACK, b"world");
    let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &reply, up0));
    assert_eq!(v, XDP_TX);
    let r = decode6(&out);
    assert_eq!((r.src, r.dst), ((LB_IP, 80), client), "both translations undone");
    assert!(r.l4_csum_ok, "{r:?}");
    assert_eq!(r.payload, b"world");
    assert_eq!((&out[..6], &out[6..12]), (&CLIENT_MAC[..], &UPLINK_MAC[..]));
    assert_eq!(r.hop_limit, 63);

    assert_eq!(per_service(&dp, id, verdict::NEW_FLOW), 1);
    assert_eq!(per_service(&dp, id, verdict::ESTABLISHED), 2);
    assert_eq!(per_service(&dp, id, verdict::REVERSE_NAT), 1);
}

/// Item 6c: Without NODE_CONFIG6 a remote flow is source-NATed to the address the client used;
/// the SNAT port range running out is an `error` drop; hop limit 1 is a `no_route` drop;
/// a next hop without a neighbour entry drops the packet (`no_route`) and queues the
/// gateway in NEIGH_MISSES6.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_xdp_unconfigured_snat_neighbour_miss_and_port_exhaustion() {
    require_root("v6_xdp_unconfigured_snat_neighbour_miss_and_port_exhaustion");
    let net = fwd_ns6();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    dp.node().set_config(&node_config(None, None, PortRange { min: 62000, max: 62003 })).unwrap();
    m.service(63, fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL), svc_flags::NODEPORT, &[(REMOTE_POD, 8080, 0)]);
    m.service(64, fe(NODE, 30081, PROTO_TCP, SCOPE_EXTERNAL), svc_flags::NODEPORT, &[(FAR_POD, 8080, 0)]);

    let mut ports = std::collections::BTreeSet::new();
    for i in 0..4u16 {
        let src = (v6([0xfd00, 0x100, 0, 0, 0, 0, 0, 0x200 + i]), 40000);
        let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &tcp6_frame(src, (NODE, NODE_PORT), b""), up0));
        assert_eq!(v, XDP_TX, "flow {i}");
        let d = decode6(&out);
        assert_eq!((d.src.0, d.dst), (NODE, (REMOTE_POD, 8080)), "SNAT to the address the client used");
        assert!(d.l4_csum_ok);
        ports.insert(d.src.1);
    }
    assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![62000, 62001, 62002, 62003]);
    let (v, _) =
        net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &tcp6_frame((EXT_CLIENT, 50000), (NODE, NODE_PORT), b""), up0));
    assert_eq!(v, XDP_DROP, "SNAT range exhausted");
    assert_eq!(per_service(&dp, 63, verdict::ERROR), 1);

    // Hop limit 1: cannot be forwarded (no_route), and no neighbour is asked for.
    let mut last_hop = tcp6_frame((EXT_CLIENT, 39999), (NODE, 30081), b"");
    last_hop[IP6 + 7] = 1;
    let (v, _) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &last_hop, up0));
    assert_eq!(v, XDP_DROP, "hop limit 1");
    assert_eq!(per_service(&dp, 64, verdict::NO_ROUTE), 1);
    assert!(m.neigh_misses.keys().next().is_none(), "hop limit 1 queues no neighbour miss");

    let (v, _) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &tcp6_frame((EXT_CLIENT, 40000), (NODE, 30081), b""), up0));
    assert_eq!(v, XDP_DROP);
    assert_eq!(per_service(&dp, 64, verdict::NO_ROUTE), 2);
    let misses: Vec<(u32, Ipv6Addr)> =
        m.neigh_misses.keys().map(|k| k.unwrap()).map(|k| (k.ifindex, ip6_from_map(k.addr))).collect();
    assert_eq!(misses, vec![(up0, UNRESOLVED_GW)], "the gateway, on the uplink");
}

/// Hairpin over IPv6: a pod balanced to itself is source-NATed to NODE_CONFIG6's hairpin
/// address and bounced back into the pod; its answer is translated back to VIP -> pod.
/// Without a hairpin address, DNAT only.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_hairpin_is_source_natted_and_bounced() {
    require_root("v6_hairpin_is_source_natted_and_bounced");
    let hairpin = Ipv6Addr::from(nat_defaults::HAIRPIN_ADDR6);
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    m.service(71, fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL), 0, &[(CLIENT, 8080, 0)]);
    let (v, out) = dp.run(FROM_POD, &tcp6_frame((CLIENT, 40000), (VIP, 80), b"me"));
    assert_eq!((v, decode6(&out).src, decode6(&out).dst), (TC_ACT_UNSPEC, (CLIENT, 40000), (CLIENT, 8080)));

    m.set_node(None, Some(hairpin));
    let frame = tcp6_frame((CLIENT, 40001), (VIP, 80), b"me");
    let (v, out) = dp.run(FROM_POD, &frame);
    assert_eq!(v, TC_ACT_REDIRECT, "bounced back into the pod");
    let d = decode6(&out);
    assert_eq!(d.dst, (CLIENT, 8080));
    assert_eq!(d.src.0, hairpin);
    let port = d.src.1;
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port), "{port}");
    assert!(d.l4_csum_ok, "{d:?}");
    assert_eq!((&out[..6], &out[6..12]), (&frame[6..12], &frame[..6]), "MACs swapped");

    let reply = tcp6_segment((CLIENT, 8080), (hairpin, port), tcp::SYN | tcp::ACK, b"you");
    let (v, out) = dp.run(FROM_POD, &reply);
    assert_eq!(v, TC_ACT_REDIRECT);
    let r = decode6(&out);
    assert_eq!((r.src, r.dst), ((VIP, 80), (CLIENT, 40001)));
    assert!(r.l4_csum_ok, "{r:?}");
    assert_eq!(r.payload, b"you");
    assert_eq!(per_service(&dp, 71, verdict::REVERSE_NAT), 1);
}

/// A slot or backend missing under a service (the agent mid-update): dropped, `error`.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_missing_slot_or_backend_is_an_error_drop() {
    require_root("v6_missing_slot_or_backend_is_an_error_drop");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    let f = fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL);
    let v = ServiceValue { id: 81, count: 1, flags: 0, generation: 0, affinity_timeout: 0, maglev_size: 0 };
    m.services.insert(fe_key(f), v, 0).unwrap();
    let frame = tcp6_frame((CLIENT, 40000), (VIP, 80), b"");
    assert_eq!(dp.run(FROM_POD, &frame).0, TC_ACT_SHOT, "no slot");
    m.slots.insert(SlotKey::new(81, 0, 0), 999, 0).unwrap();
    assert_eq!(dp.run(FROM_POD, &frame).0, TC_ACT_SHOT, "slot names a backend that is not in BACKENDS6");
    let ext = fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL);
    m.services.insert(fe_key(ext), ServiceValue { id: 82, ..v }, 0).unwrap();
    assert_eq!(dp.run(FROM_UPLINK, &tcp6_frame((EXT_CLIENT, 40000), (NODE, NODE_PORT), b"")).0, XDP_DROP);
    assert_eq!(per_service(&dp, 81, verdict::ERROR), 2);
    assert_eq!(per_service(&dp, 82, verdict::ERROR), 1);
    assert_eq!(m.ct_count(), 0);
}

/// A full CONNTRACK6 (every entry live): a new flow is dropped, nothing written, `ct_full`;
/// a tracked flow keeps working.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_full_assured_table_keeps_its_flows_and_new_ones_still_pass() {
    require_root("v6_full_assured_table_keeps_its_flows_and_new_ones_still_pass");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 91, PROTO_TCP);
    m.service(92, fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL), 0, &[(LOCAL_POD, 8080, backend_flags::LOCAL)]);
    let tracked = tcp6_frame((CLIENT, 40000), (VIP, 80), b"");
    let (_, out) = dp.run(FROM_POD, &tracked);
    let backend = decode6(&out).dst;
    // Fill the assured table with idle entries of other flows until the kernel says it is full.
    let mut filler = CtValue6 { flags: ct_flags::ASSURED | ct_flags::SEEN_REPLY, ..CtValue6::default() };
    let mut n = 0u32;
    let err = loop {
        let mut k = ct_key((B1, 1), (B2, 2), PROTO_UDP, CT_DIR_FORWARD);
        k.src_addr[3] = n;
        filler.backend_id = n;
        if let Err(e) = m.conntrack.insert(k, filler, 0) {
            break e;
        }
        n += 1;
        assert!(n <= proxy_common::sizes::MAX_CONNTRACK + 2, "CONNTRACK6 never filled up");
    };
    assert!(n as usize >= proxy_common::sizes::MAX_CONNTRACK as usize, "filled to its size: {err}");

    // New flows start unassured, in CT_NEW6: a full assured table does not stop them.
    let new = tcp6_frame((CLIENT, 40001), (VIP, 80), b"");
    let (v, out) = dp.run(FROM_POD, &new);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_ne!(decode6(&out).dst, (VIP, 80), "new flow translated");
    let (v, _) = dp.run(FROM_UPLINK, &tcp6_frame((EXT_CLIENT, 40000), (NODE, NODE_PORT), b""));
    assert_eq!(v, XDP_PASS);
    assert_eq!(per_service(&dp, 91, verdict::CT_FULL), 0);
    assert!(m.ct((CLIENT, 40001), (VIP, 80), PROTO_TCP, CT_DIR_FORWARD).is_some());
    let (v, out) = dp.run(FROM_POD, &tracked);
    assert_eq!((v, decode6(&out).dst), (TC_ACT_UNSPEC, backend), "the tracked flow keeps its backend");
}

/// Item 7a: Extension headers a stack sends (hop-by-hop, destination options, a routing header
/// with no segments left) are skipped, up to four of them: the SYN behind them is translated
/// with a valid checksum, the extension headers themselves untouched; the reply through
/// `to_pod` too. A fifth header is beyond the bound: untouched.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_extension_headers_are_skipped() {
    require_root("v6_extension_headers_are_skipped");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 101, PROTO_TCP);
    three_backends(&mut m, 102, PROTO_UDP);
    let cases: [(&str, &[u8], u8); 4] = [
        ("hop-by-hop + destination options", &[0, 60], PROTO_TCP),
        ("hop-by-hop + destination options (UDP)", &[0, 60], PROTO_UDP),
        ("hop-by-hop, dest-opts, routing, dest-opts", &[0, 60, 43, 60], PROTO_TCP),
        ("destination options", &[60], PROTO_TCP),
    ];
    for (i, (name, types, proto)) in cases.iter().enumerate() {
        let client = (CLIENT, 45000 + i as u16);
        let plain = frame_for(*proto, client, (VIP, 80), b"ext");
        let frame = with_ext_headers(&plain, types);
        let l4 = L4 + 8 * types.len();
        let (_, _, ok, _) = l4_at(&frame, l4, *proto);
        assert!(ok, "{name}: the test frame itself is valid");
        let (v, out) = dp.run(FROM_POD, &frame);
        assert_eq!(v, TC_ACT_UNSPEC, "{name}");
        assert_eq!(out.len(), frame.len());
        let (src, dst, ok, payload) = l4_at(&out, l4, *proto);
        assert!([B1, B2, B3].contains(&dst.0) && dst.1 == 8080, "{name}: translated to {dst:?}");
        assert_eq!(src, client);
        assert!(ok, "{name}: L4 checksum after translation");
        assert_eq!(payload, b"ext");
        assert_eq!(&out[..IP6 + 24], &frame[..IP6 + 24], "{name}: header before the destination untouched");
        assert_eq!(&out[L4..l4], &frame[L4..l4], "{name}: extension headers untouched");
        if types == &[0, 60] && *proto == PROTO_TCP {
            // etherparse agrees (it walks the extension headers itself).
            let d = decode6(&out);
            assert_eq!((d.dst, d.l4_csum_ok), (dst, true));
        }
        // The backend's reply, with the same extension headers, through to_pod.
        let reply = with_ext_headers(&frame_for(*proto, dst, client, b"back"), types);
        let (v, out) = dp.run(TO_POD, &reply);
        assert_eq!(v, TC_ACT_UNSPEC);
        let (rsrc, rdst, ok, _) = l4_at(&out, l4, *proto);
        assert_eq!((rsrc, rdst, ok), ((VIP, 80), client, true), "{name}: reply");
    }
    // And on the uplink.
    m.service(103, fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL), 0, &[(LOCAL_POD, 8080, backend_flags::LOCAL)]);
    let frame = with_ext_headers(&tcp6_frame((EXT_CLIENT, 40000), (NODE, NODE_PORT), b"x"), &[0, 60]);
    let (v, out) = dp.run(FROM_UPLINK, &frame);
    let (_, dst, ok, _) = l4_at(&out, L4 + 16, PROTO_TCP);
    assert_eq!((v, dst, ok), (XDP_PASS, (LOCAL_POD, 8080), true), "uplink with extension headers");

    // Five headers: beyond the bound, not translated.
    let five = with_ext_headers(&tcp6_frame((CLIENT, 46000), (VIP, 80), b"x"), &[0, 60, 43, 60, 60]);
    let before = global(&dp, verdict::OTHER_L4);
    for prog in [FROM_POD, TO_POD] {
        assert_eq!(dp.run(prog, &five), (TC_ACT_UNSPEC, five.clone()), "five extension headers via {prog}");
    }
    assert_eq!(dp.run(FROM_UPLINK, &five), (XDP_PASS, five.clone()));
    assert_eq!(global(&dp, verdict::OTHER_L4), before + 3);
    assert!(m.ct((CLIENT, 46000), (VIP, 80), PROTO_TCP, CT_DIR_FORWARD).is_none());
}

/// ICMPv6 messages used for neighbour discovery, router discovery and pings.
fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, typ: u8, bytes5to8: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6_raw(typ, 0, bytes5to8)
        .write(&mut v, payload)
        .expect("build ICMPv6");
    v
}

/// Item 7b: Frames we must not touch: fragments we cannot translate (`fragment`), ICMPv6 neighbour discovery,
/// router discovery and echo to or from anything including the VIP (`other_l4`), a
/// VLAN-tagged IPv6 frame (`not_ip`) and malformed IPv6 (`malformed`): every hook passes
/// them untouched and tracks nothing.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_fragments_icmpv6_and_malformed_pass_untouched() {
    require_root("v6_fragments_icmpv6_and_malformed_pass_untouched");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 111, PROTO_TCP);
    three_backends(&mut m, 112, PROTO_UDP);
    m.service(113, fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL), 0, &[(LOCAL_POD, 8080, backend_flags::LOCAL)]);
    let syn = tcp6_frame((CLIENT, 40000), (VIP, 80), b"payload!");
    let np_syn = tcp6_frame((EXT_CLIENT, 40000), (NODE, NODE_PORT), b"payload!");

    let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let solicited = |a: Ipv6Addr| {
        let o = a.octets();
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]))
    };
    let mut ns_target = VIP.octets().to_vec();
    ns_target.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 1]); // source link-layer address option
    let na_target = VIP.octets().to_vec();
    let ra_body = [0u8; 8]; // reachable time, retrans timer

    // First fragments of service flows are translated like whole datagrams
    // (datapath_frag.rs); later fragments whose first fragment was never translated, and
    // fragments of ICMPv6, are not ours.
    let mut later_fragment = with_ext_headers(&syn, &[44]);
    later_fragment[L4 + 2..L4 + 4].copy_from_slice(&[0x00, 0x80]); // offset 16 * 8, last
    let mut hbh_later_fragment = with_ext_headers(&syn, &[0, 44]);
    hbh_later_fragment[L4 + 8 + 2..L4 + 8 + 4].copy_from_slice(&[0x00, 0x81]); // offset 16 * 8, more
    let mut np_later_fragment = with_ext_headers(&np_syn, &[44]);
    np_later_fragment[L4 + 2..L4 + 4].copy_from_slice(&[0x00, 0x80]);
    let echo_first_fragment = with_ext_headers(&icmp6(CLIENT, VIP, 128, [0, 1, 0, 1], b"ping"), &[44]);
    let mut wrong_version = syn.clone();
    wrong_version[IP6] = 0x45;
    let mut plen_past_frame = syn.clone();
    let plen = u16::from_be_bytes([syn[IP6 + 4], syn[IP6 + 5]]);
    plen_past_frame[IP6 + 4..IP6 + 6].copy_from_slice(&(plen + 1).to_be_bytes());
    let mut plen_zero = syn.clone();
    plen_zero[IP6 + 4..IP6 + 6].copy_from_slice(&[0, 0]);
    let mut tcp_doff_small = syn.clone();
    tcp_doff_small[L4 + 12] = 0x40;
    let mut tcp_doff_past = syn.clone();
    tcp_doff_past[L4 + 12] = 0xf0;
    let mut udp_len_past = udp6_frame((CLIENT, 40000), (VIP, 80), b"x");
    udp_len_past[L4 + 4..L4 + 6].copy_from_slice(&100u16.to_be_bytes());
    let mut ext_past_payload = with_ext_headers(&syn, &[0]);
    ext_past_payload[L4 + 1] = 20; // (20 + 1) * 8 bytes of options: past the payload
    let mut vlan_tagged = syn[..12].to_vec();
    vlan_tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    vlan_tagged.extend_from_slice(&syn[12..]);
    let mut plen_cuts_tcp = syn.clone();
    plen_cuts_tcp[IP6 + 4..IP6 + 6].copy_from_slice(&12u16.to_be_bytes());

    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("first fragment of an ICMPv6 echo (fragment header, M=1)", echo_first_fragment, verdict::FRAGMENT),
        ("later fragment, first never seen", later_fragment, verdict::FRAGMENT),
        ("hop-by-hop then a later fragment", hbh_later_fragment, verdict::FRAGMENT),
        ("later fragment to a NodePort", np_later_fragment, verdict::FRAGMENT),
        (
            "neighbour solicitation for the VIP (DAD, from ::)",
            icmp6(Ipv6Addr::UNSPECIFIED, solicited(VIP), 135, [0; 4], &na_target),
            verdict::OTHER_L4,
        ),
        ("neighbour solicitation to the VIP", icmp6(CLIENT, VIP, 135, [0; 4], &ns_target), verdict::OTHER_L4),
        (
            "neighbour advertisement from the VIP",
            icmp6(VIP, CLIENT, 136, [0x60, 0, 0, 0], &na_target),
            verdict::OTHER_L4,
        ),
        ("router solicitation", icmp6(link_local, all_routers, 133, [0; 4], &[]), verdict::OTHER_L4),
        ("router advertisement", icmp6(link_local, all_nodes, 134, [64, 0, 0x07, 0x08], &ra_body), verdict::OTHER_L4),
        ("echo request to the VIP", icmp6(CLIENT, VIP, 128, [0, 1, 0, 1], b"ping"), verdict::OTHER_L4),
        ("echo request to the node", icmp6(EXT_CLIENT, NODE, 128, [0, 1, 0, 1], b"ping"), verdict::OTHER_L4),
        ("VLAN-tagged IPv6 to the VIP", vlan_tagged, verdict::NOT_IP),
        ("truncated IPv6 header", syn[..IP6 + 30].to_vec(), verdict::MALFORMED),
        ("Ethernet header only, IPv6 EtherType", syn[..IP6].to_vec(), verdict::MALFORMED),
        ("truncated TCP header", syn[..L4 + 10].to_vec(), verdict::MALFORMED),
        ("version 4 in an IPv6 EtherType", wrong_version, verdict::MALFORMED),
        ("payload length past the frame", plen_past_frame, verdict::MALFORMED),
        ("payload length 0 (jumbogram)", plen_zero, verdict::MALFORMED),
        ("payload length cuts the TCP header", plen_cuts_tcp, verdict::MALFORMED),
        ("TCP data offset < 5", tcp_doff_small, verdict::MALFORMED),
        ("TCP data offset past the payload", tcp_doff_past, verdict::MALFORMED),
        ("UDP length past the payload", udp_len_past, verdict::MALFORMED),
        ("extension header past the payload", ext_past_payload, verdict::MALFORMED),
    ];
    for (name, frame, expect) in cases {
        let before = global(&dp, expect);
        // BPF_PROG_TEST_RUN refuses (EINVAL) an skb with the IPv6 EtherType that is
        // shorter than Ethernet + IPv6 header, so those reach only the XDP program here.
        let tc_progs: &[&'static str] = if frame.len() >= L4 { &[FROM_POD, TO_POD, TO_UPLINK] } else { &[] };
        for prog in tc_progs {
            let (v, out) = dp.run(prog, &frame);
            assert_eq!(v, TC_ACT_UNSPEC, "{name} via {prog}: verdict");
            assert_eq!(out, frame, "{name} via {prog}: bytes changed");
        }
        let (v, out) = dp.run(FROM_UPLINK, &frame);
        assert_eq!((v, &out), (XDP_PASS, &frame), "{name} via {FROM_UPLINK}");
        let runs = tc_progs.len() as u64 + 1;
        assert_eq!(global(&dp, expect), before + runs, "{name}: counted as {}", vname(expect));
    }
    assert_eq!(m.ct_count(), 0, "nothing tracked");
}

/// Item 8: 30,000 new IPv6 flows over 3 backends: each gets 10,000 +- 5%.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_new_flows_spread_uniformly() {
    require_root("v6_new_flows_spread_uniformly");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 121, PROTO_TCP);
    let mut counts: StdHashMap<Ipv6Addr, u32> = StdHashMap::new();
    // One frame, its source address (last byte) and port changed per flow; the datapath does
    // not verify checksums, so none are fixed here.
    let mut frame = tcp6_frame((CLIENT, 0), (VIP, 80), b"");
    for i in 0..30_000u32 {
        frame[IP6 + 8 + 15] = (i / 10_000) as u8 + 1;
        frame[L4..L4 + 2].copy_from_slice(&(10_000 + (i % 10_000) as u16).to_be_bytes());
        let (v, out) = dp.run(FROM_POD, &frame);
        assert_eq!(v, TC_ACT_UNSPEC, "flow {i}");
        *counts.entry(dst_addr(&out)).or_default() += 1;
    }
    eprintln!("IPv6 distribution over 30000 flows: {counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (b, n) in &counts {
        assert!([B1, B2, B3].contains(b), "{b}");
        assert!((9_500..=10_500).contains(n), "backend {b} got {n} of 30000: {counts:?}");
    }
    assert_eq!(per_service(&dp, 121, verdict::NEW_FLOW), 30_000, "every flow was new");
    assert_eq!(m.ct_count(), 60_000, "two CONNTRACK6 entries per flow");
}

/// A SYN as Linux sends it over IPv6: MSS, SACK permitted, timestamps, NOP, window scale
/// (20 bytes of options, data offset 10).
fn linux_syn6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Vec<u8> {
    let opts = [2, 4, 0x05, 0xa0, 4, 2, 8, 10, 0, 0, 0x10, 0, 0, 0, 0, 0, 1, 3, 3, 7];
    let mut v = Vec::new();
    PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2])
        .ipv6(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64800)
        .syn()
        .options_raw(&opts)
        .expect("options")
        .write(&mut v, &[])
        .expect("build SYN");
    v
}

/// Real SYNs carry TCP options: one to a frontend with endpoints is translated (valid
/// checksum, options untouched), one to a frontend without endpoints is reset on both hooks
/// with ack = seq + 1 (the options are not payload).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_syn_with_tcp_options_translated_or_reset() {
    require_root("v6_syn_with_tcp_options_translated_or_reset");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 131, PROTO_TCP);
    m.service(132, fe(VIP, 81, PROTO_TCP, SCOPE_INTERNAL), 0, &[]);
    m.service(133, fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL), svc_flags::NODEPORT, &[]);

    let syn = linux_syn6((CLIENT, 40000), (VIP, 80));
    assert_eq!(syn[L4 + 12] >> 4, 10, "data offset");
    let (v, out) = dp.run(FROM_POD, &syn);
    assert_eq!(v, TC_ACT_UNSPEC);
    let d = decode6(&out);
    assert!([B1, B2, B3].contains(&d.dst.0) && d.dst.1 == 8080, "{d:?}");
    assert!(d.l4_csum_ok);
    assert_eq!(&out[L4 + 20..], &syn[L4 + 20..], "options untouched");

    for (prog, frame, want) in [
        (FROM_POD, linux_syn6((CLIENT, 40001), (VIP, 81)), TC_ACT_REDIRECT),
        (FROM_UPLINK, linux_syn6((EXT_CLIENT, 40001), (NODE, NODE_PORT)), XDP_TX),
    ] {
        let (v, out) = dp.run(prog, &frame);
        assert_eq!(v, want, "{prog}");
        assert_eq!(out.len(), 14 + 40 + 20, "{prog}: a reset without options");
        let d = decode6(&out);
        assert_eq!(d.tcp_flags, tcp::RST | tcp::ACK, "{prog}");
        assert_eq!((d.src, d.dst), (decode6(&frame).dst, decode6(&frame).src), "{prog}");
        assert!(d.l4_csum_ok, "{prog}: {d:?}");
        assert_eq!(u32::from_be_bytes(out[L4 + 8..L4 + 12].try_into().unwrap()), 1001, "{prog}: ack = seq + 1");
    }
}

/// The reopen rule over IPv6: after a FIN, a SYN on the same tuple is a new connection,
/// balanced over the backends there are now (a removed one is never reached again), while
/// the closing connection itself kept its backend.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_syn_after_fin_reopens_the_tuple() {
    require_root("v6_syn_after_fin_reopens_the_tuple");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    let id = 141;
    let ids = three_backends(&mut m, id, PROTO_TCP);
    let mut port = None;
    for p in 20_000..20_200u16 {
        let (_, out) = dp.run(FROM_POD, &tcp6_frame((CLIENT, p), (VIP, 80), b""));
        if decode6(&out).dst.0 == B3 {
            port = Some(p);
            break;
        }
    }
    let port = port.expect("some flow lands on B3");
    // The agent removes B3: a new slot generation with B1 and B2 only.
    m.slots.insert(SlotKey::new(id, 1, 0), ids[0], 0).unwrap();
    m.slots.insert(SlotKey::new(id, 1, 1), ids[1], 0).unwrap();
    let v = ServiceValue { id, count: 2, flags: 0, generation: 1, affinity_timeout: 0, maglev_size: 0 };
    m.services.insert(fe_key(fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL)), v, 0).unwrap();

    let syn = tcp6_frame((CLIENT, port), (VIP, 80), b"");
    assert_eq!(decode6(&dp.run(FROM_POD, &syn).1).dst.0, B3, "a retransmitted SYN keeps its backend");
    let fin = tcp6_segment((CLIENT, port), (VIP, 80), tcp::FIN | tcp::ACK, b"");
    assert_eq!(decode6(&dp.run(FROM_POD, &fin).1).dst.0, B3, "the FIN reaches the connection's backend");
    let fwd = m.ct((CLIENT, port), (VIP, 80), PROTO_TCP, CT_DIR_FORWARD).unwrap();
    assert_ne!(fwd.flags & ct_flags::CLOSING, 0, "FIN marks the flow closing");
    let before = per_service(&dp, id, verdict::NEW_FLOW);
    let d = decode6(&dp.run(FROM_POD, &syn).1);
    assert!([B1, B2].contains(&d.dst.0), "reopened tuple went to {:?}", d.dst);
    assert!(d.l4_csum_ok);
    assert_eq!(per_service(&dp, id, verdict::NEW_FLOW), before + 1);
    assert!(m.ct((B3, 8080), (CLIENT, port), PROTO_TCP, CT_DIR_REPLY).is_none(), "the old reply entry is gone");
    assert!(m.ct(d.dst, (CLIENT, port), PROTO_TCP, CT_DIR_REPLY).is_some(), "the new one is there");
}

/// A client reusing one source port towards a remote NodePort backend (DNAT + SNAT), SYN
/// then FIN, twenty times: translated every time with a port of the SNAT range, and only the
/// last connection's two entries remain (each reopen gives the previous SNAT port back).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_xdp_remote_tuple_reopened_twenty_times() {
    require_root("v6_xdp_remote_tuple_reopened_twenty_times");
    let net = fwd_ns6();
    let up0 = net.uplink_ifindex();
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    m.service(151, fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL), svc_flags::NODEPORT, &[(REMOTE_POD, 8080, 0)]);
    let client = (EXT_CLIENT, 5353);
    for i in 0..20 {
        let syn = tcp6_segment(client, (NODE, NODE_PORT), tcp::SYN, b"");
        let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &syn, up0));
        assert_eq!(v, XDP_TX, "SYN #{i}");
        let d = decode6(&out);
        assert_eq!((d.src.0, d.dst), (NODE, (REMOTE_POD, 8080)), "SYN #{i}");
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&d.src.1), "SYN #{i}: SNAT port {}", d.src.1);
        assert!(d.l4_csum_ok, "SYN #{i}");
        let fin = tcp6_segment(client, (NODE, NODE_PORT), tcp::FIN | tcp::ACK, b"");
        let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &fin, up0));
        assert_eq!((v, decode6(&out).src), (XDP_TX, d.src), "FIN #{i} on the same translation");
    }
    assert_eq!(per_service(&dp, 151, verdict::NEW_FLOW), 20);
    assert_eq!(per_service(&dp, 151, verdict::ERROR), 0);
    assert_eq!(m.ct_count(), 2, "only the last connection's two entries remain");
}

/// Bytes after the IPv6 payload (a frame longer than the payload length says) are not
/// part of the packet: the datagram is translated on its own length, the trailer is kept.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_trailing_bytes_after_the_payload_are_kept() {
    require_root("v6_trailing_bytes_after_the_payload_are_kept");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 161, PROTO_UDP);
    let mut frame = udp6_frame((CLIENT, 5353), (VIP, 80), b"dns?");
    frame.extend_from_slice(&[0xee; 6]);
    let (v, out) = dp.run(FROM_POD, &frame);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(out.len(), frame.len());
    assert_eq!(&out[out.len() - 6..], &[0xee; 6]);
    let (_, dst, ok, payload) = l4_at(&out[..out.len() - 6], L4, PROTO_UDP);
    assert_eq!((dst.1, ok, payload.as_slice()), (8080, true, &b"dns?"[..]));
    assert!([B1, B2, B3].contains(&dst.0));
}

/// A hop-by-hop header of `len` bytes (a multiple of 8, at least 8) filled with PadN options
/// whose data bytes 10..12 of the header read as a TCP data offset of 5 and a SYN, so the
/// header itself parses as a TCP segment from port 0x067f (its first two bytes) to port
/// 0x01ff (the first PadN's type and length), inserted before the transport header.
fn with_big_hop_by_hop(frame: &[u8], len: usize) -> Vec<u8> {
    let mut hbh = vec![frame[IP6 + 6], (len / 8 - 1) as u8];
    let mut left = len - 2;
    while left > 0 {
        let n = (left - 2).min(255);
        hbh.push(1);
        hbh.push(n as u8);
        hbh.extend(std::iter::repeat_n(0u8, n));
        left -= n + 2;
    }
    assert_eq!(hbh.len(), len);
    hbh[12] = 0x50;
    hbh[13] = tcp::SYN;
    let mut out = frame[..L4].to_vec();
    out.extend_from_slice(&hbh);
    out.extend_from_slice(&frame[L4..]);
    out[IP6 + 6] = 0;
    let plen = u16::from_be_bytes([out[IP6 + 4], out[IP6 + 5]]) + len as u16;
    out[IP6 + 4..IP6 + 6].copy_from_slice(&plen.to_be_bytes());
    out
}

/// Extension headers pushing the transport header past the parser's offset bound (1023)
/// must leave the frame alone, never be read at a wrapped-around offset: a SYN to VIP:80
/// behind a 1024-byte hop-by-hop header used to be parsed at offset 54 (1078 & 0x3ff), inside
/// the hop-by-hop options, and translated as a flow to VIP:511 (the options' bytes), with the
/// IPv6 destination, the option bytes and a "checksum" inside the options rewritten and the
/// real TCP checksum left wrong. Just inside the bound, the SYN is translated normally.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_extension_headers_past_the_parse_bound_are_never_misread() {
    require_root("v6_extension_headers_past_the_parse_bound_are_never_misread");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    three_backends(&mut m, 181, PROTO_TCP);
    m.service(182, fe(VIP, 0x01ff, PROTO_TCP, SCOPE_INTERNAL), 0, &[(B1, 8080, 0)]);
    let plain = tcp6_frame((CLIENT, 40000), (VIP, 80), b"big");

    // 960 bytes: the TCP header at 1014, within the bound: translated.
    let inside = with_big_hop_by_hop(&plain, 960);
    let (v, out) = dp.run(FROM_POD, &inside);
    assert_eq!(v, TC_ACT_UNSPEC);
    let (src, dst, ok, payload) = l4_at(&out, L4 + 960, PROTO_TCP);
    assert!([B1, B2, B3].contains(&dst.0) && dst.1 == 8080, "960-byte header: {dst:?}");
    assert_eq!((src, ok, payload.as_slice()), ((CLIENT, 40000), true, &b"big"[..]));
    assert_eq!(&out[L4..L4 + 960], &inside[L4..L4 + 960], "hop-by-hop header untouched");

    // 1024 bytes: the TCP header at 1078, past the bound: untouched everywhere.
    let past = with_big_hop_by_hop(&tcp6_frame((CLIENT, 40001), (VIP, 80), b"big"), 1024);
    assert!(l4_at(&past, L4 + 1024, PROTO_TCP).2, "the test frame is valid");
    for prog in [FROM_POD, TO_POD] {
        let (v, out) = dp.run(prog, &past);
        assert_eq!(v, TC_ACT_UNSPEC, "{prog}");
        let changed: Vec<usize> = (0..past.len()).filter(|i| out.get(*i) != past.get(*i)).collect();
        assert!(changed.is_empty(), "{prog}: bytes changed at {changed:?}");
    }
    let (v, out) = dp.run(FROM_UPLINK, &past);
    assert_eq!((v, out == past), (XDP_PASS, true), "{FROM_UPLINK}");
    assert_eq!(per_service(&dp, 182, verdict::NEW_FLOW), 0, "no flow to the options' 'port'");
    assert!(m.ct((CLIENT, 0x067f), (VIP, 0x01ff), PROTO_TCP, CT_DIR_FORWARD).is_none());
    assert_eq!(m.ct_count(), 2, "only the flow inside the bound is tracked");
}

/// An Ethernet + IPv6 + ICMPv6 error from `src` to `dst` quoting `quote` (an IPv6 packet),
/// its checksum over the pseudo-header (RFC 4443 2.3).
fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, (typ, code): (u8, u8), rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![typ, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quote);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let c = inet_csum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd, 0x60, 0, 0, 0];
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 64]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// The translated error: outer (src, dst) and the quote's (src, dst) with ports, after
/// checking the ICMPv6 checksum (with etherparse) and the quoted TCP/UDP checksum.
fn check_icmp6(frame: &[u8]) -> ((Ipv6Addr, Ipv6Addr), (Ipv6Addr, u16), (Ipv6Addr, u16)) {
    let outer = (dst_addr_at(frame, IP6 + 8), dst_addr_at(frame, IP6 + 24));
    let icmp = Icmpv6Slice::from_slice(&frame[L4..]).expect("ICMPv6");
    let ok = icmp.header().icmp_type.calc_checksum(outer.0.octets(), outer.1.octets(), icmp.payload()).unwrap();
    assert_eq!(ok, icmp.header().checksum, "ICMPv6 checksum");
    let quote = &frame[L4 + 8..];
    let (src, dst, l4_ok, _) = l4_at(quote_as_frame(quote).as_slice(), L4, quote[6]);
    assert!(l4_ok, "quoted L4 checksum");
    (outer, src, dst)
}

fn dst_addr_at(frame: &[u8], off: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&frame[off..off + 16]).unwrap())
}

/// An IPv6 packet with an Ethernet header in front, for the frame helpers.
fn quote_as_frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(ip);
    f
}

/// ICMPv6 errors about translated flows (issue 12): packet too big from a router about the
/// client's segment quotes the VIP again; the backend's own port unreachable comes from
/// the VIP (which changes the ICMPv6 pseudo-header too).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_icmp_errors_about_translated_flows() {
    require_root("v6_icmp_errors_about_translated_flows");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    m.service(31, fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL), 0, &[(B1, 8080, 0)]);
    m.service(32, fe(VIP, 53, PROTO_UDP, SCOPE_INTERNAL), 0, &[(B1, 5353, 0)]);
    let router = v6([0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1]);
    let (_, sent) = dp.run(FROM_POD, &tcp6_frame((CLIENT, 40000), (VIP, 80), &[9u8; 900]));
    assert_eq!(decode6(&sent).dst, (B1, 8080));
    let ptb = icmp6_error(router, CLIENT, (2, 0), 1280u32.to_be_bytes(), &sent[IP6..]);
    let before = global(&dp, verdict::ICMP_ERROR);
    let (v, out) = dp.run(TO_POD, &ptb);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(check_icmp6(&out), ((router, CLIENT), (CLIENT, 40000), (VIP, 80)), "packet too big");
    assert_eq!(&out[L4 + 4..L4 + 8], &1280u32.to_be_bytes(), "MTU kept");
    assert_eq!(global(&dp, verdict::ICMP_ERROR), before + 1);

    let (_, sent) = dp.run(FROM_POD, &udp6_frame((CLIENT, 40001), (VIP, 53), b"query"));
    let unreach = icmp6_error(B1, CLIENT, (1, 4), [0; 4], &sent[IP6..]);
    let (v, out) = dp.run(TO_POD, &unreach);
    assert_eq!(v, TC_ACT_UNSPEC);
    assert_eq!(check_icmp6(&out), ((VIP, CLIENT), (CLIENT, 40001), (VIP, 53)), "port unreachable from the backend");
}

/// Every ICMPv6 error type (RFC 4443: 1 destination unreachable, 2 packet too big, 3 time
/// exceeded, 4 parameter problem) is translated; informational ones (128 echo request, 135
/// neighbour solicitation) pass untouched.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_every_icmp_error_type_is_translated() {
    require_root("v6_every_icmp_error_type_is_translated");
    let mut dp = TestDataplane::load();
    let mut m = Maps6::open(&dp);
    m.service(33, fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL), 0, &[(B2, 8080, 0)]);
    let router = v6([0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1]);
    let (_, sent) = dp.run(FROM_POD, &tcp6_frame((CLIENT, 40002), (VIP, 80), b"x"));
    for (typ, code) in [(1u8, 0u8), (1, 3), (1, 4), (2, 0), (3, 0), (4, 0)] {
        // The 4 bytes after the checksum: the MTU for packet too big, unused (zero) or a
        // pointer (zero here) for the others.
        let rest = if typ == 2 { 1280u32.to_be_bytes() } else { [0; 4] };
        let err = icmp6_error(router, CLIENT, (typ, code), rest, &sent[IP6..]);
        let (_, out) = dp.run(TO_POD, &err);
        assert_eq!(check_icmp6(&out).2, (VIP, 80), "type {typ} code {code}");
    }
    for typ in [128u8, 135] {
        let msg = icmp6_error(router, CLIENT, (typ, 0), [0; 4], &sent[IP6..]);
        let (_, out) = dp.run(TO_POD, &msg);
        assert_eq!(out, msg, "type {typ} is not an error");
    }
}
