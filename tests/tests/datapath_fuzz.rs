//! Seeded fuzzing of the four programs through BPF_PROG_TEST_RUN: valid service frames,
//! replies, unrelated traffic and random mutations of them (flipped bytes, truncation,
//! extension, length fields off by a little). Properties checked on every frame:
//!
//! - a frame that is malformed by an independent reading of the RFCs (below, not the
//!   datapath's parser) comes out byte-identical, with the pass verdict, and leaves no
//!   conntrack entry;
//! - a frame that comes out changed is a well-formed IPv4 frame of the same length, whose
//!   IPv4 and L4 checksums are valid exactly when the input's were (an incremental update
//!   must neither repair nor break one), going to a backend (forward
//!   programs) or coming from a frontend (reverse programs); or, for a frontend without
//!   endpoints, a valid reset (TCP, both hooks) or ICMP port unreachable (UDP, pods).
//!
//! `FUZZ_FRAMES` sets the frames per program (default 3000, a few seconds; e.g.
//! `FUZZ_FRAMES=1000000 cargo xtask test -- fuzz` for a long run) and `FUZZ_SEED` the seed.
use std::net::Ipv4Addr;

use etherparse::{SlicedPacket, TransportSlice};
use proxy_common::verdict;
use proxy_tests::harness::*;
use proxy_userspace::{
    dataplane::maps::global_total,
    model::{FrontendEntry, FrontendKey, FrontendKind, Protocol, Scope},
};

const TC_ACT_UNSPEC: i32 = -1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)];
const NODE_PORT: u16 = 30080;
/// A NodePort without endpoints: SYNs to it are answered with a reset on the uplink.
const EMPTY_NODE_PORT: u16 = 30081;
/// A ClusterIP port without endpoints: pods get a reset (TCP) or a port unreachable (UDP).
const EMPTY_PORT: u16 = 81;
const TC_ACT_REDIRECT: i32 = 7;

fn frames_per_program() -> usize {
    std::env::var("FUZZ_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_f00d)
}

fn dataplane() -> TestDataplane {
    let mut dp = TestDataplane::load();
    let backends: Vec<(Ipv4Addr, u16)> = BACKENDS.iter().map(|b| (*b, 8080)).collect();
    let ext = |port, proto, e: FrontendEntry| {
        let mut e = e;
        e.kind = FrontendKind::NodePort;
        (FrontendKey { addr: NODE.into(), port, proto, scope: Scope::External }, e)
    };
    let mut entries = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        entries.push((frontend(VIP, 80, proto), entry("web", &backends)));
        entries.push(ext(NODE_PORT, proto, entry("np", &backends)));
    }
    entries.push(ext(EMPTY_NODE_PORT, Protocol::Tcp, entry("empty", &[])));
    for proto in [Protocol::Tcp, Protocol::Udp] {
        entries.push((frontend(VIP, EMPTY_PORT, proto), entry("empty", &[])));
    }
    let r = dp.syncer.apply(&state(entries));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    dp
}

/// An independent reading of when an Ethernet frame is a translatable IPv4 TCP/UDP/SCTP
/// packet (RFC 791, 9293, 768, 9260 and the kernel's receive checks), or `None` when it is
/// not one of those at all (other EtherType or protocol, a fragment of another protocol, a
/// later fragment): those pass untouched too, except a later fragment of a datagram whose
/// first fragment was translated (`check_later_fragment`). A first fragment is a candidate
/// whose UDP length covers the whole datagram, so it may exceed the fragment.
fn malformed(f: &[u8]) -> Option<bool> {
    if f.len() < 14 || u16::from_be_bytes([f[12], f[13]]) != 0x0800 {
        return None;
    }
    let ip = &f[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Some(true);
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || ip.len() < ihl || total < ihl || total > ip.len() {
        return Some(true);
    }
    let frags = u16::from_be_bytes([ip[6], ip[7]]);
    if frags & 0x1fff != 0 || (frags & 0x2000 != 0 && ![6, 17, 132].contains(&ip[9])) {
        return None;
    }
    let first_fragment = frags & 0x2000 != 0;
    let l4 = &ip[ihl..total];
    match ip[9] {
        6 => Some(l4.len() < 20 || usize::from(l4[12] >> 4) * 4 < 20 || usize::from(l4[12] >> 4) * 4 > l4.len()),
        17 => Some(
            l4.len() < 8 || {
                let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
                ulen < 8 || (ulen > l4.len() && !first_fragment)
            },
        ),
        132 => Some(l4.len() < 12),
        _ => None,
    }
}

/// Addresses, ports and checksum validity of a well-formed frame, recomputed with
/// etherparse.
struct View {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    ip_ok: bool,
    l4_ok: Option<bool>,
}

fn view(f: &[u8]) -> Option<View> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { return None };
    let h = ip.header().to_header();
    let ip_ok = h.calc_header_checksum() == h.header_checksum;
    let (sp, dp, l4_ok) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            (th.source_port, th.destination_port, Some(th.calc_checksum_ipv4(&h, t.payload()).ok()? == th.checksum))
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            let ok = uh.checksum == 0 || uh.calc_checksum_ipv4(&h, u.payload()).ok()? == uh.checksum;
            (uh.source_port, uh.destination_port, Some(ok))
        }
        // SCTP: ports only (its CRC32c does not cover addresses).
        _ => {
            let l4 = ip.payload().payload;
            if l4.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]), None)
        }
    };
    Some(View { src: (Ipv4Addr::from(h.source), sp), dst: (Ipv4Addr::from(h.destination), dp), ip_ok, l4_ok })
}

fn sctp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    // Built from a UDP frame of the same length (12-byte SCTP common header + 4 bytes):
    // the protocol number and the IPv4 checksum are fixed up by hand.
    let mut f = udp_frame(src, dst, &[0u8; 8]);
    f[14 + 9] = 132;
    f[14 + 10] = 0;
    f[14 + 11] = 0;
    let sum: u32 = f[14..34].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let c = !(((folded & 0xffff) + (folded >> 16)) as u16);
    f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    f
}

/// A frame a program of kind `reverse` (to_pod/to_uplink) or forward would see; replies
/// are often those of `flows` (backend -> client pairs the forward program translated).
/// A translated flow as its replies see it: (backend, client).
type Flow = ((Ipv4Addr, u16), (Ipv4Addr, u16));

fn base(rng: &mut fastrand::Rng, reverse: bool, uplink: bool, flows: &[Flow]) -> Vec<u8> {
    let client = (CLIENT, rng.u16(1024..65535));
    let backend = (BACKENDS[rng.usize(..BACKENDS.len())], 8080);
    let frontend = if uplink {
        (NODE, if rng.u8(..8) == 0 { EMPTY_NODE_PORT } else { NODE_PORT })
    } else {
        (VIP, if rng.u8(..8) == 0 { EMPTY_PORT } else { 80 })
    };
    let (src, dst) = match (reverse, rng.u8(..10)) {
        (_, 0) => (client, (Ipv4Addr::from(rng.u32(..)), rng.u16(..))),
        (true, 1..=6) if !flows.is_empty() => flows[rng.usize(..flows.len())],
        (true, _) => (backend, client),
        (false, _) => (client, frontend),
    };
    let payload: Vec<u8> = (0..rng.usize(..64)).map(|_| rng.u8(..)).collect();
    match rng.u8(..10) {
        0..=4 => tcp_segment(
            src,
            dst,
            [tcp::SYN, tcp::ACK, tcp::FIN | tcp::ACK, tcp::RST, tcp::SYN | tcp::ACK][rng.usize(..5)],
            &payload,
        ),
        5..=8 => udp_frame(src, dst, &payload),
        _ => sctp_frame(src, dst),
    }
}

fn mutate(rng: &mut fastrand::Rng, f: &mut Vec<u8>) {
    for _ in 0..rng.usize(1..4) {
        match rng.u8(..6) {
            0 if !f.is_empty() => {
                let i = rng.usize(..f.len());
                f[i] = rng.u8(..);
            }
            // Header fields the parser reads: length, IHL, fragment, protocol, data offset, UDP length.
            1 => {
                let i = [14, 16, 17, 20, 23, 14 + 20 + 12, 14 + 20 + 4, 14 + 20 + 5][rng.usize(..8)];
                if i < f.len() {
                    f[i] = f[i].wrapping_add(rng.u8(..5)).wrapping_sub(2);
                }
            }
            // Never below an Ethernet header: the kernel hands no shorter frame to a
            // program (and BPF_PROG_TEST_RUN refuses one).
            2 if f.len() > 14 => f.truncate(rng.usize(14..=f.len())),
            3 => f.extend((0..rng.usize(1..40)).map(|_| rng.u8(..))),
            4 if f.len() > 13 => {
                f[12] = 0x86;
                f[13] = 0xdd;
            }
            // A first fragment (MF, offset 0) or a later one (offset 1..16), checksum fixed:
            // the fragment paths see well-formed headers too.
            5 if f.len() >= 34 => {
                let frags: u16 = if rng.bool() { 0x2000 } else { rng.u16(1..16) | (u16::from(rng.bool()) << 13) };
                f[20..22].copy_from_slice(&frags.to_be_bytes());
                let ihl = (usize::from(f[14] & 0xf) * 4).clamp(20, f.len() - 14);
                f[24..26].copy_from_slice(&[0, 0]);
                let c = inet_csum(&f[14..14 + ihl]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            _ => {}
        }
    }
}

/// BPF_PROG_TEST_RUN refuses skb frames too short for the network header their EtherType
/// announces (EINVAL), so TC programs are fuzzed from an IPv6 header's length up.
fn runnable(f: &[u8], xdp: bool) -> bool {
    xdp || f.len() >= 14 + 40
}

fn is_pass(v: i32, xdp: bool) -> bool {
    v == if xdp { XDP_PASS } else { TC_ACT_UNSPEC }
}

fn check(prog: &str, frame: &[u8], v: i32, out: &[u8], xdp: bool, reverse: bool) {
    match malformed(frame) {
        Some(true) => {
            assert!(is_pass(v, xdp) && out == frame, "{prog}: malformed frame changed (verdict {v}): {frame:02x?}");
            return;
        }
        None if later_fragment(frame) => return check_later_fragment(prog, frame, out, reverse),
        None => {
            assert!(is_pass(v, xdp) && out == frame, "{prog}: non-candidate frame changed (verdict {v}): {frame:02x?}");
            return;
        }
        Some(false) => {}
    }
    if out == frame {
        return;
    }
    if !xdp && v == TC_ACT_REDIRECT && out.len() == 14 + 20 + 8 + 28 && out[14 + 9] == 1 {
        // The port unreachable a pod gets from a UDP frontend without endpoints: a valid
        // IPv4 header from the frontend, ICMP 3/3 with a valid checksum, quoting the
        // datagram's headers.
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&out[14..34]).expect("ICMP's IPv4 header").to_header();
        assert_eq!(ip.calc_header_checksum(), ip.header_checksum, "{prog}: ICMP's IPv4 checksum");
        assert_eq!((ip.source, ip.destination), (frame[30..34].try_into().unwrap(), frame[26..30].try_into().unwrap()));
        assert_eq!((out[34], out[35]), (3, 3), "{prog}: port unreachable");
        let mut sum: u32 = out[34..].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff, "{prog}: ICMP checksum");
        assert_eq!(&out[42..70], &frame[14..42], "{prog}: quotes the datagram");
        return;
    }
    let (Some(before), Some(after)) = (view(frame), view(out)) else {
        panic!("{prog}: translated frame does not parse: {frame:02x?} -> {out:02x?}");
    };
    if (xdp && v == XDP_TX || !xdp && v == TC_ACT_REDIRECT) && out.len() == 54 {
        // The reset for a frontend without endpoints (no hairpin is configured here, so a TC
        // redirect is always a reject).
        assert!(after.ip_ok && after.l4_ok == Some(true), "{prog}: reset checksums");
        assert_eq!((after.src, after.dst), (before.dst, before.src), "{prog}: reset addresses");
        return;
    }
    assert_eq!(after.ip_ok, before.ip_ok, "{prog}: IPv4 checksum validity changed: {frame:02x?} -> {out:02x?}");
    assert_eq!(out.len(), frame.len(), "{prog}: length changed");
    assert_eq!(after.l4_ok, before.l4_ok, "{prog}: L4 checksum validity changed: {frame:02x?} -> {out:02x?}");
    if reverse {
        assert!([(VIP, 80), (NODE, NODE_PORT)].contains(&after.src), "{prog}: reply source {:?}", after.src);
    } else {
        assert!(BACKENDS.contains(&after.dst.0) && after.dst.1 == 8080, "{prog}: destination {:?}", after.dst);
    }
}

/// An IPv4 TCP/UDP/SCTP fragment at an offset > 0 (with a header `malformed` accepts).
fn later_fragment(f: &[u8]) -> bool {
    f.len() >= 34
        && u16::from_be_bytes([f[12], f[13]]) == 0x0800
        && u16::from_be_bytes([f[20], f[21]]) & 0x1fff != 0
        && [6, 17, 132].contains(&f[23])
}

/// A later fragment carries no ports: it is translated only when its datagram's first
/// fragment was (the fuzzer's frames share identification 0, so a mutated first fragment
/// can be followed by a mutated later one), and then only its addresses change, with the
/// IPv4 header checksum (valid exactly when it was); forwarding also rewrites the MACs and
/// the TTL. Every other byte stays.
fn check_later_fragment(prog: &str, frame: &[u8], out: &[u8], reverse: bool) {
    if out == frame {
        return;
    }
    assert_eq!(out.len(), frame.len(), "{prog}: later fragment's length changed");
    const TTL: usize = 14 + 8;
    const CSUM_AND_ADDRS: std::ops::Range<usize> = 14 + 10..14 + 20;
    for i in 12..out.len() {
        if i != TTL && !CSUM_AND_ADDRS.contains(&i) {
            assert_eq!(out[i], frame[i], "{prog}: later fragment's byte {i} changed: {frame:02x?} -> {out:02x?}");
        }
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let ip_ok = |f: &[u8]| inet_csum(&f[14..14 + ihl]) == 0;
    assert_eq!(ip_ok(out), ip_ok(frame), "{prog}: later fragment's IPv4 checksum validity changed");
    let addr = |o: usize| Ipv4Addr::new(out[o], out[o + 1], out[o + 2], out[o + 3]);
    if reverse {
        assert!([VIP, NODE].contains(&addr(26)), "{prog}: later fragment's source {}", addr(26));
    } else {
        assert!(BACKENDS.contains(&addr(30)), "{prog}: later fragment's destination {}", addr(30));
    }
}

fn fuzz(prog: &'static str, xdp: bool, reverse: bool) {
    let n = frames_per_program();
    let mut rng = fastrand::Rng::with_seed(seed() ^ prog.len() as u64);
    // Malformed frames alone first: they must leave no conntrack entry at all.
    let mut dp = dataplane();
    let mut malformed_seen = 0u64;
    for _ in 0..n {
        let mut f = base(&mut rng, reverse, xdp, &[]);
        mutate(&mut rng, &mut f);
        if malformed(&f) != Some(true) || !runnable(&f, xdp) {
            continue;
        }
        let (v, out) = dp.run(prog, &f);
        check(prog, &f, v, &out, xdp, reverse);
        malformed_seen += 1;
    }
    assert!(malformed_seen > 0, "the mutations produced no malformed frame");
    assert_eq!(dp.maps().ct_len(), 0, "{prog}: malformed frames left conntrack entries");
    assert_eq!(global_total(&dp.maps().global_stats, verdict::MALFORMED).unwrap().packets, malformed_seen);
    // Then everything mixed: valid frames build conntrack state that mutated ones hit.
    let mut translated = 0u64;
    let mut fragments_translated = 0u64;
    let mut flows = Vec::new();
    for _ in 0..n {
        let mut f = base(&mut rng, reverse, xdp, &flows);
        if rng.bool() {
            mutate(&mut rng, &mut f);
        }
        if !runnable(&f, xdp) {
            continue;
        }
        let (v, out) = dp.run(prog, &f);
        check(prog, &f, v, &out, xdp, reverse);
        translated += u64::from(out != f);
        let fragment = f.len() >= 34 && f[12..14] == [8, 0] && u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0;
        fragments_translated += u64::from(out != f && fragment);
        // Forward traffic seeds the reply programs' conntrack; its translations tell which
        // replies to send.
        if reverse && rng.u8(..4) == 0 {
            let fwd = base(&mut rng, false, prog == "to_uplink", &[]);
            let (_, out) = dp.run(if prog == "to_uplink" { "from_uplink" } else { "from_pod" }, &fwd);
            if out != fwd
                && let Some(v) = view(&out)
                && flows.len() < 4096
            {
                flows.push((v.dst, v.src));
            }
        }
    }
    eprintln!(
        "{prog}: {n} + {n} frames, {malformed_seen} malformed, {translated} translated \
         ({fragments_translated} of them fragments)"
    );
    assert!(translated > 0, "{prog}: nothing was translated; the fuzzer is not reaching the datapath");
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn fuzz_from_pod() {
    require_root("fuzz_from_pod");
    fuzz("from_pod", false, false);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn fuzz_to_pod() {
    require_root("fuzz_to_pod");
    fuzz("to_pod", false, true);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn fuzz_from_uplink() {
    require_root("fuzz_from_uplink");
    fuzz("from_uplink", true, false);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn fuzz_to_uplink() {
    require_root("fuzz_to_uplink");
    fuzz("to_uplink", false, true);
}
