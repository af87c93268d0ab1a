//! IPv6-only datapath scenarios through BPF_PROG_TEST_RUN (issue 10, 4.1): what has no
//! IPv4 counterpart (extension headers and the parser's bound on them, a SYN's options, a trailer after the payload length) and states only a hand-written map
//! reaches (a slot or backend missing mid-update, a full assured table). The scenarios both
//! families share are the tables of datapath.rs. Bytes in, bytes out, with the TCP/UDP
//! checksums (over the IPv6 pseudo-header) recomputed independently (etherparse). ICMPv6
//! errors are rows of datapath_icmp.rs's table, with ICMP's.
//!
//! These tests program SERVICES6, BACKENDS6 and BACKEND_SLOTS directly, opened from the
//! test's own pin directory: the datapath on its own, whatever the sync would write (so
//! with the frontend filter out of force: their entries have no bits).
use std::{net::Ipv6Addr, path::Path};

use aya::maps::{HashMap, Map, MapData, MapError};
use etherparse::{PacketBuilder, TcpSlice, UdpSlice};
use proxy_common::{
    Backend6, CT_DIR_FORWARD, CtKey6, CtValue6, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceKey6,
    ServiceValue, SlotKey, StatsFamily, backend_flags, ct_flags, svc_flags, verdict,
};
use proxy_tests::{
    family::{
        FROM_POD, FROM_UPLINK, NODE_PORT, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, TO_POD, XDP_DROP, XDP_PASS,
        XDP_TX,
    },
    frames::with_ext_headers,
    harness::*,
};

/// Offsets in an Ethernet + IPv6 frame without extension headers.
const IP6: usize = 14;
const L4: usize = 14 + 40;

const fn v6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

// Pod side (ClusterIP), and north-south: the node and an outside client on the uplink
// subnet, a pod of this node (the same addresses as `proxy_tests::family::Family::V6`).
const VIP: Ipv6Addr = v6([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10]);
const CLIENT: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5]);
const B1: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1]);
const B2: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2]);
const B3: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 3]);
const NODE: Ipv6Addr = v6([0xfd00, 0x100, 0, 0, 0, 0, 0, 1]);
const EXT_CLIENT: Ipv6Addr = v6([0xfd00, 0x100, 0, 0, 0, 0, 0, 0x100]);
const LOCAL_POD: Ipv6Addr = v6([0xfd00, 0x244, 1, 0, 0, 0, 0, 0x10]);

/// The IPv6 service maps (and the shared slot map) and conntrack, opened from the test's
/// pins.
struct Maps6 {
    services: HashMap<MapData, ServiceKey6, ServiceValue>,
    backends: HashMap<MapData, u32, Backend6>,
    slots: HashMap<MapData, SlotKey, u32>,
    conntrack: HashMap<MapData, CtKey6, CtValue6>,
    ct_new: HashMap<MapData, CtKey6, CtValue6>,
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
        let v = ServiceValue {
            id,
            count: backends.len() as u32,
            flags,
            generation: 0,
            affinity_timeout: 0,
            maglev_size: 0,
            maglev_base: 0,
        };
        self.services.insert(fe_key(f), v, 0).expect("SERVICES6 insert");
        ids
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

/// Packets counted in GLOBAL_STATS' IPv6 block under verdict `v`.
fn global(dp: &TestDataplane, v: u32) -> u64 {
    dp.global_in(StatsFamily::Ipv6, v)
}

fn frame_for(proto: u8, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    match proto {
        PROTO_TCP => tcp6_frame(src, dst, payload),
        _ => udp6_frame(src, dst, payload),
    }
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

/// A slot or backend missing under a service (the agent mid-update): dropped, `error`.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_missing_slot_or_backend_is_an_error_drop() {
    require_root("v6_missing_slot_or_backend_is_an_error_drop");
    let mut dp = TestDataplane::load_unfiltered();
    let mut m = Maps6::open(&dp);
    let f = fe(VIP, 80, PROTO_TCP, SCOPE_INTERNAL);
    let v =
        ServiceValue { id: 81, count: 1, flags: 0, generation: 0, affinity_timeout: 0, maglev_size: 0, maglev_base: 0 };
    m.services.insert(fe_key(f), v, 0).unwrap();
    let frame = tcp6_frame((CLIENT, 40000), (VIP, 80), b"");
    assert_eq!(dp.run(FROM_POD, &frame).0, TC_ACT_SHOT, "no slot");
    m.slots.insert(SlotKey::new(81, 0, 0), 999, 0).unwrap();
    assert_eq!(dp.run(FROM_POD, &frame).0, TC_ACT_SHOT, "slot names a backend that is not in BACKENDS6");
    let ext = fe(NODE, NODE_PORT, PROTO_TCP, SCOPE_EXTERNAL);
    m.services.insert(fe_key(ext), ServiceValue { id: 82, ..v }, 0).unwrap();
    assert_eq!(dp.run(FROM_UPLINK, &tcp6_frame((EXT_CLIENT, 40000), (NODE, NODE_PORT), b"")).0, XDP_DROP);
    assert_eq!(dp.per_service(81, verdict::ERROR), 2);
    assert_eq!(dp.per_service(82, verdict::ERROR), 1);
    assert_eq!(m.ct_count(), 0);
}

/// A full CONNTRACK6 (every entry live): a new flow is dropped, nothing written, `ct_full`;
/// a tracked flow keeps working.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_full_assured_table_keeps_its_flows_and_new_ones_still_pass() {
    require_root("v6_full_assured_table_keeps_its_flows_and_new_ones_still_pass");
    let mut dp = TestDataplane::load_unfiltered();
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
    assert_eq!(dp.per_service(91, verdict::CT_FULL), 0);
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
    let mut dp = TestDataplane::load_unfiltered();
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
    let mut dp = TestDataplane::load_unfiltered();
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

/// Bytes after the IPv6 payload (a frame longer than the payload length says) are not
/// part of the packet: the datagram is translated on its own length, the trailer is kept.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn v6_trailing_bytes_after_the_payload_are_kept() {
    require_root("v6_trailing_bytes_after_the_payload_are_kept");
    let mut dp = TestDataplane::load_unfiltered();
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
    let mut dp = TestDataplane::load_unfiltered();
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
    assert_eq!(dp.per_service(182, verdict::NEW_FLOW), 0, "no flow to the options' 'port'");
    assert!(m.ct((CLIENT, 0x067f), (VIP, 0x01ff), PROTO_TCP, CT_DIR_FORWARD).is_none());
    assert_eq!(m.ct_count(), 2, "only the flow inside the bound is tracked");
}
