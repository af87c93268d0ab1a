//! Datapath tests through BPF_PROG_TEST_RUN: real frames in, bytes out, the programs and
//! maps the agent loads, programmed through the agent's own sync.
//!
//! The scenarios both families share are tables (like Katran's fixture tables): a row names
//! the input frame (a builder over one family's [`Addrs`]), the map state it needs (the
//! table's seed, or the row's frontend), the expected verdict (return code and counter) and
//! what the output frame must say. Every row runs for IPv4 and IPv6 and on every hook it
//! applies to (TC on a pod's veth: `from_pod` / `to_pod`; XDP on the uplink: `from_uplink`,
//! with `to_uplink` for replies leaving through it); a row that applies to one family or
//! one hook says so in the row. A table reports every failing (row, family, hook) case at
//! once. One-off scenarios follow the tables as plain tests; IPv6-only ones (extension
//! headers, maps written by hand) are in datapath_v6.rs, XDP-only ones in datapath_xdp.rs;
//! ICMP errors of both families are datapath_icmp.rs's table.
use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use proxy_common::nat_defaults::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use proxy_common::{CT_DIR_FORWARD, CT_DIR_REPLY, StatsFamily, ct_flags, verdict};
use proxy_tests::{
    family::*,
    frames::{check_port_unreachable, fix_ipv4_csum, with_ext_headers},
    harness::*,
};
use proxy_userspace::{
    dataplane::maps::node::{PortRange, node_config},
    model::{FrontendKey, FrontendKind, Protocol, Scope},
};

fn vname(v: u32) -> &'static str {
    proxy_common::Verdict::ALL[v as usize].name()
}

fn front(k: &FrontendKey) -> (IpAddr, u16) {
    (k.addr, k.port)
}

/// (family, hook) cases for [`run_cases`].
fn each<T: Copy>(families: &[Family], rows: &[T], name: impl Fn(&T) -> String) -> Vec<(String, (Family, T))> {
    let name = &name;
    families.iter().flat_map(|f| rows.iter().map(move |r| (format!("{} {}", f.name(), name(r)), (*f, *r)))).collect()
}

// ---------------------------------------------------------------------------------------
// Table: translated round trips.

/// A service hit: destination rewritten to a backend with valid checksums, the rest of the
/// frame untouched, conntrack entries for both directions, later packets of the flow keep
/// the backend, and the backend's reply gets its source put back to the frontend.
#[derive(Clone, Copy, Debug)]
struct Roundtrip {
    hook: Hook,
    proto: Protocol,
}

const ROUNDTRIPS: &[Roundtrip] = &[
    Roundtrip { hook: Hook::Pod, proto: Protocol::Tcp },
    Roundtrip { hook: Hook::Pod, proto: Protocol::Udp },
    Roundtrip { hook: Hook::Uplink, proto: Protocol::Tcp },
    Roundtrip { hook: Hook::Uplink, proto: Protocol::Udp },
];

/// Packets of the flow after its first.
const ESTABLISHED: u64 = 20;

fn roundtrip(fam: Family, row: Roundtrip) {
    let (a, hook, proto) = (fam.addrs(), row.hook, row.proto);
    let mut dp = TestDataplane::load();
    let key = hook.frontend(&a, proto);
    dp.program(vec![(key, svc(hook.kind(), &hook.backends(&a)))]);
    let id = dp.svc_id(&key);
    let backends: Vec<IpAddr> = hook.backends(&a).iter().map(|b| b.0).collect();
    let client = (hook.client(&a), 40000);
    let frame = fam.frame(proto, client, front(&key), b"hello");
    let (v, out) = dp.run(hook.forward(), &frame);
    assert_eq!(v, hook.pass(), "verdict");
    let d = decode_any(&out);
    assert!(backends.contains(&d.dst.0) && d.dst.1 == 8080, "dst {:?}", d.dst);
    assert_eq!(d.src, client, "source untouched");
    assert!(d.ip_csum_ok && d.l4_csum_ok, "checksums: {d:?}");
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.ttl, 64, "not routed here: TTL / hop limit untouched");
    assert_eq!(out.len(), frame.len());
    let keep = fam.untouched_prefix();
    assert_eq!(&out[..keep], &frame[..keep], "MACs and the IP header before the addresses untouched");
    let backend = d.dst;

    let p = proto.number();
    let fwd = dp.ct(client, front(&key), p, CT_DIR_FORWARD).expect("forward ct");
    assert_eq!(fwd.nat, backend, "forward entry -> backend");
    assert_eq!((fwd.svc_id, fwd.flags & ct_flags::SNAT), (id, 0));
    let rev = dp.ct(backend, client, p, CT_DIR_REPLY).expect("reply ct");
    assert_eq!(rev.nat, front(&key), "reply entry -> frontend");
    assert_eq!(dp.maps().ct_len(), 2);

    for i in 0..ESTABLISHED {
        let (v, out) = dp.run(hook.forward(), &frame);
        let d = decode_any(&out);
        assert_eq!((v, d.dst), (hook.pass(), backend), "packet {i} of the flow");
        assert!(d.l4_csum_ok);
    }

    let reply = fam.reply(proto, backend, client, b"world");
    let (v, out) = dp.run(hook.reverse(), &reply);
    assert_eq!(v, TC_ACT_UNSPEC, "reply verdict");
    let r = decode_any(&out);
    assert_eq!((r.src, r.dst), (front(&key), client), "reply source is the frontend");
    assert!(r.ip_csum_ok && r.l4_csum_ok, "reply checksums: {r:?}");
    assert_eq!(r.payload, b"world");
    if hook == Hook::Uplink {
        // A local backend's reply never arrives on XDP (a pod flow's reply would): passed.
        assert_eq!(dp.run(FROM_UPLINK, &reply), (XDP_PASS, reply.clone()), "a local flow's reply is not XDP's");
    }

    assert_eq!(dp.per_service(id, verdict::NEW_FLOW), 1);
    assert_eq!(dp.per_service(id, verdict::ESTABLISHED), ESTABLISHED);
    assert_eq!(dp.per_service(id, verdict::REVERSE_NAT), 1);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn service_roundtrips() {
    require_root("service_roundtrips");
    run_cases(each(&Family::ALL, ROUNDTRIPS, |r| format!("{:?} {:?}", r.hook, r.proto)), |(f, r)| roundtrip(f, r));
}

/// A zero UDP checksum ("none") stays zero through a translation, on both hooks. IPv4 only:
/// a zero UDP checksum is invalid over IPv6 (RFC 8200 8.1).
const ZERO_CSUM: &[(Family, Hook)] = &[(Family::V4, Hook::Pod), (Family::V4, Hook::Uplink)];

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn udp_zero_checksum_stays_zero() {
    require_root("udp_zero_checksum_stays_zero");
    let cases = ZERO_CSUM.iter().map(|(f, h)| (format!("{} {h:?}", f.name()), (*f, *h)));
    run_cases(cases, |(fam, hook)| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        let key = hook.frontend(&a, Protocol::Udp);
        dp.program(vec![(key, svc(hook.kind(), &hook.backends(&a)))]);
        let mut frame = fam.udp((hook.client(&a), 5353), front(&key), b"q");
        let csum = fam.l4() + 6;
        frame[csum..csum + 2].copy_from_slice(&[0, 0]);
        let (v, out) = dp.run(hook.forward(), &frame);
        assert_eq!(v, hook.pass());
        assert_eq!(&out[csum..csum + 2], &[0, 0], "no checksum stays no checksum");
        let d = decode_any(&out);
        assert!(d.ip_csum_ok);
        assert_eq!(d.dst.1, 8080);
    });
}

// ---------------------------------------------------------------------------------------
// Table: frames passed untouched.

/// The programs a row runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progs {
    /// `from_pod`, `to_pod`, `to_uplink` and `from_uplink`.
    All,
    /// `from_uplink` only (e.g. a ClusterIP, which pods reach but the outside does not).
    Xdp,
}

/// Where GLOBAL_STATS counts the frame: its EtherType's family block, or `other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Family,
    Other,
}

/// A frame that is not service traffic, or that we cannot or must not translate: every
/// program leaves it exactly as it came, lets it go on (TC_ACT_UNSPEC / XDP_PASS), counts
/// `verdict` once per program in GLOBAL_STATS (in `block`), tracks nothing and charges no
/// service.
#[derive(Clone, Copy)]
struct Untouched {
    name: &'static str,
    /// The frame in a family (with the table's addresses); `None`: the row is not of that
    /// family (its name says why).
    frame: fn(Family, &Addrs) -> Option<Vec<u8>>,
    progs: Progs,
    verdict: u32,
    block: Block,
}

/// A SYN to the ClusterIP, the base of the malformed rows.
fn syn(f: Family, a: &Addrs) -> Vec<u8> {
    f.tcp((a.client, 40000), (a.vip, 80), b"payload!")
}

/// Write the IP length field (IPv4 total length, IPv6 payload length), keeping the IPv4
/// header checksum valid.
fn set_ip_len(f: Family, frame: &mut [u8], len: u16) {
    let at = ETH_HLEN + if f == Family::V4 { 2 } else { 4 };
    frame[at..at + 2].copy_from_slice(&len.to_be_bytes());
    if f == Family::V4 {
        fix_ipv4_csum(frame);
    }
}

fn ip_len(f: Family, frame: &[u8]) -> u16 {
    let at = ETH_HLEN + if f == Family::V4 { 2 } else { 4 };
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// The IPv4 protocol / IPv6 next header byte.
fn ip_proto(f: Family, frame: &[u8]) -> u8 {
    frame[ETH_HLEN + if f == Family::V4 { 9 } else { 6 }]
}

fn mutated(frame: Vec<u8>, f: Family, edit: impl FnOnce(&mut Vec<u8>)) -> Option<Vec<u8>> {
    let mut frame = frame;
    edit(&mut frame);
    if f == Family::V4 {
        fix_ipv4_csum(&mut frame);
    }
    Some(frame)
}

/// An ICMPv6 message as a node sends it for neighbour and router discovery (multicast MAC,
/// hop limit 255) or an echo.
fn icmp6(src: &str, dst: IpAddr, typ: u8, bytes5to8: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().expect("IPv6 literal");
    let IpAddr::V6(dst) = dst else { panic!("{dst}: not IPv6") };
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6_raw(typ, 0, bytes5to8)
        .write(&mut v, payload)
        .expect("build ICMPv6");
    v
}

fn v6only(f: Family, build: impl FnOnce() -> Vec<u8>) -> Option<Vec<u8>> {
    (f == Family::V6).then(build)
}

/// A frame of neither family is run once, under "IPv4".
fn once(f: Family, build: impl FnOnce() -> Vec<u8>) -> Option<Vec<u8>> {
    (f == Family::V4).then(build)
}

fn solicited_node(a: IpAddr) -> IpAddr {
    let IpAddr::V6(a) = a else { panic!("{a}: not IPv6") };
    let o = a.octets();
    IpAddr::V6(std::net::Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    ))
}

const UNTOUCHED: &[Untouched] = &[
    // Not service traffic.
    Untouched {
        name: "a backend directly",
        frame: |f, a| Some(f.tcp((a.client, 40000), (a.b1, 8080), b"direct")),
        progs: Progs::All,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    Untouched {
        name: "another address",
        frame: |f, a| Some(f.tcp((a.client, 40000), (a.other_vip, 80), b"x")),
        progs: Progs::All,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    Untouched {
        name: "another port",
        frame: |f, a| Some(f.tcp((a.client, 40000), (a.vip, 81), b"x")),
        progs: Progs::All,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    Untouched {
        name: "UDP to a TCP-only ClusterIP",
        frame: |f, a| Some(f.udp((a.client, 40000), (a.vip, 80), b"x")),
        progs: Progs::All,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    Untouched {
        name: "SSH to the node",
        frame: |f, a| Some(f.tcp((a.ext_client, 40000), (a.node, 22), b"x")),
        progs: Progs::All,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    Untouched {
        name: "UDP to a TCP-only NodePort",
        frame: |f, a| Some(f.udp((a.ext_client, 40000), (a.node, NODE_PORT), b"x")),
        progs: Progs::All,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    Untouched {
        name: "pod traffic between nodes",
        frame: |f, a| Some(f.tcp((a.remote_pod, 40000), (a.local_pod, 8080), b"x")),
        progs: Progs::All,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    Untouched {
        name: "a ClusterIP from outside (XDP only: pods do reach it)",
        frame: |f, a| Some(f.tcp((a.ext_client, 40000), (a.vip, 80), b"")),
        progs: Progs::Xdp,
        verdict: verdict::PASS,
        block: Block::Family,
    },
    // Not IP.
    Untouched {
        name: "ARP (neither family: once)",
        frame: |f, _| {
            once(f, || {
                let mut arp = vec![0xffu8; 12];
                arp.extend_from_slice(&[0x08, 0x06]);
                arp.extend_from_slice(&[0u8; 28]);
                arp
            })
        },
        progs: Progs::All,
        verdict: verdict::NOT_IP,
        block: Block::Other,
    },
    Untouched {
        name: "garbage (neither family: once)",
        frame: |f, _| once(f, || (0..64u32).map(|i| (i.wrapping_mul(97) % 251) as u8).collect()),
        progs: Progs::All,
        verdict: verdict::NOT_IP,
        block: Block::Other,
    },
    Untouched {
        name: "VLAN-tagged, to the VIP",
        frame: |f, a| {
            let s = syn(f, a);
            let mut v = s[..12].to_vec();
            v.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
            v.extend_from_slice(&s[12..]);
            Some(v)
        },
        progs: Progs::All,
        verdict: verdict::NOT_IP,
        block: Block::Other,
    },
    // Other L4.
    Untouched {
        name: "ICMP to the VIP (IPv4: the SYN's protocol set to ICMP; IPv6: an echo request)",
        frame: |f, a| match f {
            Family::V4 => mutated(f.tcp((a.client, 40000), (a.vip, 80), b"xxxx"), f, |v| v[ETH_HLEN + 9] = 1),
            Family::V6 => Some(icmp6("fd00:10:244::5", a.vip, 128, [0, 1, 0, 1], b"ping")),
        },
        progs: Progs::All,
        verdict: verdict::OTHER_L4,
        block: Block::Family,
    },
    Untouched {
        name: "echo request to the node",
        frame: |f, a| Some(f.echo(a.ext_client, a.node, b"ping")),
        progs: Progs::All,
        verdict: verdict::OTHER_L4,
        block: Block::Family,
    },
    Untouched {
        name: "neighbour solicitation for the VIP (DAD, from ::; IPv6 only: IPv4 has ARP)",
        frame: |f, a| {
            v6only(f, || {
                let IpAddr::V6(vip) = a.vip else { unreachable!() };
                icmp6("::", solicited_node(a.vip), 135, [0; 4], &vip.octets())
            })
        },
        progs: Progs::All,
        verdict: verdict::OTHER_L4,
        block: Block::Family,
    },
    Untouched {
        name: "neighbour solicitation to the VIP (IPv6 only)",
        frame: |f, a| {
            v6only(f, || {
                let IpAddr::V6(vip) = a.vip else { unreachable!() };
                let mut target = vip.octets().to_vec();
                target.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 1]); // source link-layer address option
                icmp6("fd00:10:244::5", a.vip, 135, [0; 4], &target)
            })
        },
        progs: Progs::All,
        verdict: verdict::OTHER_L4,
        block: Block::Family,
    },
    Untouched {
        name: "neighbour advertisement from the VIP (IPv6 only)",
        frame: |f, a| {
            v6only(f, || {
                let (IpAddr::V6(vip), IpAddr::V6(client)) = (a.vip, a.client) else { unreachable!() };
                let mut v = Vec::new();
                etherparse::PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1])
                    .ipv6(vip.octets(), client.octets(), 255)
                    .icmpv6_raw(136, 0, [0x60, 0, 0, 0])
                    .write(&mut v, &vip.octets())
                    .expect("build ICMPv6");
                v
            })
        },
        progs: Progs::All,
        verdict: verdict::OTHER_L4,
        block: Block::Family,
    },
    Untouched {
        name: "router solicitation (IPv6 only)",
        frame: |f, _| v6only(f, || icmp6("fe80::1", "ff02::2".parse().unwrap(), 133, [0; 4], &[])),
        progs: Progs::All,
        verdict: verdict::OTHER_L4,
        block: Block::Family,
    },
    Untouched {
        name: "router advertisement (IPv6 only)",
        frame: |f, _| v6only(f, || icmp6("fe80::1", "ff02::1".parse().unwrap(), 134, [64, 0, 0x07, 0x08], &[0u8; 8])),
        progs: Progs::All,
        verdict: verdict::OTHER_L4,
        block: Block::Family,
    },
    // Fragments we cannot translate: a first fragment of a service flow is translated like
    // a whole datagram (datapath_frag.rs); one of a protocol without ports, and a later one
    // whose first fragment was never translated, are not ours.
    Untouched {
        name: "first fragment of ICMP (IPv6: an echo behind a fragment header, M=1)",
        frame: |f, a| match f {
            Family::V4 => mutated(f.tcp((a.client, 40000), (a.vip, 80), b"frag"), f, |v| {
                v[ETH_HLEN + 6] |= 0x20; // more fragments
                v[ETH_HLEN + 9] = 1; // ICMP
            }),
            Family::V6 => Some(with_ext_headers(&icmp6("fd00:10:244::5", a.vip, 128, [0, 1, 0, 1], b"ping"), &[44])),
        },
        progs: Progs::All,
        verdict: verdict::FRAGMENT,
        block: Block::Family,
    },
    Untouched {
        name: "later fragment, first never seen",
        frame: |f, a| match f {
            Family::V4 => mutated(f.tcp((a.client, 40000), (a.vip, 80), b"frag"), f, |v| v[ETH_HLEN + 7] = 0x10),
            Family::V6 => {
                let mut v = with_ext_headers(&syn(f, a), &[44]);
                v[f.l4() + 2..f.l4() + 4].copy_from_slice(&[0x00, 0x80]); // offset 16 * 8, last
                Some(v)
            }
        },
        progs: Progs::All,
        verdict: verdict::FRAGMENT,
        block: Block::Family,
    },
    Untouched {
        name: "later fragment to a NodePort",
        frame: |f, a| {
            let np = f.tcp((a.ext_client, 40000), (a.node, NODE_PORT), b"payload!");
            match f {
                Family::V4 => mutated(np, f, |v| v[ETH_HLEN + 7] = 0x10),
                Family::V6 => {
                    let mut v = with_ext_headers(&np, &[44]);
                    v[f.l4() + 2..f.l4() + 4].copy_from_slice(&[0x00, 0x80]);
                    Some(v)
                }
            }
        },
        progs: Progs::All,
        verdict: verdict::FRAGMENT,
        block: Block::Family,
    },
    Untouched {
        name: "hop-by-hop then a later fragment (IPv6 only: extension headers)",
        frame: |f, a| {
            v6only(f, || {
                let mut v = with_ext_headers(&syn(f, a), &[0, 44]);
                v[f.l4() + 8 + 2..f.l4() + 8 + 4].copy_from_slice(&[0x00, 0x81]); // offset 16 * 8, more
                v
            })
        },
        progs: Progs::All,
        verdict: verdict::FRAGMENT,
        block: Block::Family,
    },
    // Malformed.
    Untouched {
        name: "Ethernet header only",
        frame: |f, a| Some(syn(f, a)[..ETH_HLEN].to_vec()),
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "truncated inside the headers (IPv4: 40 bytes of a NodePort SYN; IPv6: the IPv6 header cut)",
        frame: |f, a| match f {
            Family::V4 => Some(f.tcp((a.ext_client, 40000), (a.node, NODE_PORT), b"")[..40].to_vec()),
            Family::V6 => Some(syn(f, a)[..ETH_HLEN + 30].to_vec()),
        },
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "truncated TCP header",
        frame: |f, a| Some(syn(f, a)[..f.l4() + 10].to_vec()),
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "the other IP version in the header (counted by EtherType)",
        frame: |f, a| mutated(syn(f, a), f, |v| v[ETH_HLEN] = if f == Family::V4 { 0x65 } else { 0x45 }),
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "IHL < 5 (IPv4 only)",
        frame: |f, a| (f == Family::V4).then(|| mutated(syn(f, a), f, |v| v[ETH_HLEN] = 0x43)).flatten(),
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "IP length past the frame",
        frame: |f, a| {
            let mut v = syn(f, a);
            let len = ip_len(f, &v);
            set_ip_len(f, &mut v, len + 1);
            Some(v)
        },
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "IP length cuts the TCP header",
        frame: |f, a| {
            let mut v = syn(f, a);
            set_ip_len(f, &mut v, if f == Family::V4 { 20 + 12 } else { 12 });
            Some(v)
        },
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "payload length 0, a jumbogram (IPv6 only)",
        frame: |f, a| {
            v6only(f, || {
                let mut v = syn(f, a);
                set_ip_len(f, &mut v, 0);
                v
            })
        },
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "an IPv6 header of zeros, payload length 0 (IPv6 only)",
        frame: |f, _| {
            v6only(f, || {
                let mut v = vec![0x02u8; 12];
                v.extend_from_slice(&[0x86, 0xdd, 0x60]);
                v.extend_from_slice(&[0u8; 53]);
                v
            })
        },
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "TCP data offset < 5",
        frame: |f, a| mutated(syn(f, a), f, |v| v[f.l4() + 12] = 0x40),
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "TCP data offset past the payload",
        frame: |f, a| mutated(syn(f, a), f, |v| v[f.l4() + 12] = 0xf0),
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "UDP length past the payload",
        frame: |f, a| {
            mutated(f.udp((a.client, 40000), (a.vip, 80), b"x"), f, |v| {
                v[f.l4() + 4..f.l4() + 6].copy_from_slice(&100u16.to_be_bytes())
            })
        },
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
    Untouched {
        name: "extension header past the payload (IPv6 only)",
        frame: |f, a| {
            v6only(f, || {
                let mut v = with_ext_headers(&syn(f, a), &[0]);
                v[f.l4() + 1] = 20; // (20 + 1) * 8 bytes of options: past the payload
                v
            })
        },
        progs: Progs::All,
        verdict: verdict::MALFORMED,
        block: Block::Family,
    },
];

/// The table's map state: a TCP ClusterIP VIP:80 with three backends, a TCP NodePort with a
/// local one.
fn seed_untouched(fam: Family) -> TestDataplane {
    let a = fam.addrs();
    let mut dp = TestDataplane::load();
    dp.program(vec![
        (Hook::Pod.frontend(&a, Protocol::Tcp), svc(FrontendKind::ClusterIP, &Hook::Pod.backends(&a))),
        (Hook::Uplink.frontend(&a, Protocol::Tcp), svc(FrontendKind::NodePort, &Hook::Uplink.backends(&a))),
    ]);
    dp
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn untouched_frames_pass_every_hook() {
    require_root("untouched_frames_pass_every_hook");
    let dps = [RefCell::new(seed_untouched(Family::V4)), RefCell::new(seed_untouched(Family::V6))];
    // Only the (row, family) pairs the row applies to.
    let cases = each(&Family::ALL, UNTOUCHED, |r| r.name.to_string())
        .into_iter()
        .filter_map(|(name, (fam, row))| Some((name, (fam, row, (row.frame)(fam, &fam.addrs())?))));
    run_cases(cases, |(fam, row, frame)| {
        let mut dp = dps[fam as usize].borrow_mut();
        let block = match row.block {
            Block::Family => Family::of_frame(&frame).map_or(StatsFamily::Other, Family::stats),
            Block::Other => StatsFamily::Other,
        };
        let (before, before_in) = (dp.global(row.verdict), dp.global_in(block, row.verdict));
        // BPF_PROG_TEST_RUN refuses (EINVAL) an skb with an IP EtherType shorter than
        // Ethernet + that IP header: those reach only the XDP program here.
        let tc_ok = Family::of_frame(&frame).is_none_or(|f| frame.len() >= f.l4());
        let progs: &[&'static str] = match row.progs {
            Progs::All if tc_ok => &[FROM_POD, TO_POD, TO_UPLINK, FROM_UPLINK],
            _ => &[FROM_UPLINK],
        };
        for prog in progs {
            let (v, out) = dp.run(prog, &frame);
            let want = if *prog == FROM_UPLINK { XDP_PASS } else { TC_ACT_UNSPEC };
            assert_eq!(v, want, "via {prog}: verdict");
            assert_eq!(out, frame, "via {prog}: bytes changed");
        }
        let runs = progs.len() as u64;
        let v = vname(row.verdict);
        assert_eq!(dp.global(row.verdict), before + runs, "counted as {v}");
        assert_eq!(dp.global_in(block, row.verdict), before_in + runs, "counted as {v} in {}", block.name());
        assert_eq!(dp.maps().ct_len(), 0, "nothing tracked");
        assert_eq!(dp.service_count(verdict::PASS), 0, "misses belong to no service");
    });
}

// ---------------------------------------------------------------------------------------
// Table: a frontend without endpoints.

/// What the datapath answers.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A TCP reset from the frontend, sent back where the segment came from: `flags`,
    /// sequence number `seq`, and (with ACK) acknowledgement `ack`.
    Reset { flags: u8, seq: u32, ack: Option<u32> },
    /// An ICMP / ICMPv6 port unreachable from the frontend quoting the datagram's IP and
    /// UDP headers, sent back.
    PortUnreachable,
    /// Dropped as it came.
    Drop,
}

/// A Service without endpoints refuses at once, like kube-proxy's REJECT; nothing is
/// tracked and the packet is counted `no_backend` on its service.
#[derive(Clone, Copy, Debug)]
struct Reject {
    name: &'static str,
    hook: Hook,
    proto: Protocol,
    /// TCP flags of the segment (bits of `harness::tcp`).
    flags: u8,
    payload: &'static [u8],
    answer: Answer,
}

const RST_ACK: u8 = tcp::RST | tcp::ACK;

const REJECTS: &[Reject] = &[
    Reject {
        name: "SYN from a pod: RST|ACK, ack = seq + SYN",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        flags: tcp::SYN,
        payload: b"",
        answer: Answer::Reset { flags: RST_ACK, seq: 0, ack: Some(1000 + 1) },
    },
    Reject {
        name: "SYN with a byte from a pod: ack = seq + SYN + payload",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        flags: tcp::SYN,
        payload: b"x",
        answer: Answer::Reset { flags: RST_ACK, seq: 0, ack: Some(1000 + 1 + 1) },
    },
    Reject {
        name: "SYN with 4 bytes from a pod",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        flags: tcp::SYN,
        payload: b"data",
        answer: Answer::Reset { flags: RST_ACK, seq: 0, ack: Some(1000 + 1 + 4) },
    },
    Reject {
        name: "a segment with ACK from a pod: RST with seq = its ack (RFC 9293 3.10.7.1)",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        flags: tcp::ACK,
        payload: b"late",
        answer: Answer::Reset { flags: tcp::RST, seq: 1, ack: None },
    },
    Reject {
        name: "a RST from a pod is never answered",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        flags: tcp::RST,
        payload: b"",
        answer: Answer::Drop,
    },
    Reject {
        name: "UDP from a pod: port unreachable",
        hook: Hook::Pod,
        proto: Protocol::Udp,
        flags: 0,
        payload: b"query",
        answer: Answer::PortUnreachable,
    },
    Reject {
        name: "SYN on the uplink: RST|ACK built in place, payload trimmed",
        hook: Hook::Uplink,
        proto: Protocol::Tcp,
        flags: tcp::SYN,
        payload: b"data",
        answer: Answer::Reset { flags: RST_ACK, seq: 0, ack: Some(1000 + 1 + 4) },
    },
    Reject {
        name: "UDP on the uplink is dropped",
        hook: Hook::Uplink,
        proto: Protocol::Udp,
        flags: 0,
        payload: b"q",
        answer: Answer::Drop,
    },
];

/// The table's map state: the ClusterIP (TCP VIP:80, UDP VIP:53) and the NodePort (TCP and
/// UDP, externalTrafficPolicy Local) without endpoints.
fn seed_rejects(fam: Family) -> TestDataplane {
    let a = fam.addrs();
    let mut dp = TestDataplane::load();
    let mut local = svc(FrontendKind::NodePort, &[]);
    local.local_only = true;
    dp.program(vec![
        (fk(a.vip, 80, Protocol::Tcp, Scope::Internal), svc(FrontendKind::ClusterIP, &[])),
        (fk(a.vip, 53, Protocol::Udp, Scope::Internal), svc(FrontendKind::ClusterIP, &[])),
        (fk(a.node, NODE_PORT, Protocol::Tcp, Scope::External), local.clone()),
        (fk(a.node, NODE_PORT, Protocol::Udp, Scope::External), local),
    ]);
    dp
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn service_without_endpoints_rejects() {
    require_root("service_without_endpoints_rejects");
    let dps = [RefCell::new(seed_rejects(Family::V4)), RefCell::new(seed_rejects(Family::V6))];
    let ports = std::sync::atomic::AtomicU16::new(40000);
    run_cases(each(&Family::ALL, REJECTS, |r| r.name.to_string()), |(fam, row)| {
        let a = fam.addrs();
        let mut dp = dps[fam as usize].borrow_mut();
        let key = match (row.hook, row.proto) {
            (Hook::Pod, Protocol::Udp) => fk(a.vip, 53, Protocol::Udp, Scope::Internal),
            (hook, proto) => hook.frontend(&a, proto),
        };
        let id = dp.svc_id(&key);
        let client = (row.hook.client(&a), ports.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let frame = match row.proto {
            Protocol::Tcp => fam.segment(client, front(&key), row.flags, row.payload),
            _ => fam.udp(client, front(&key), row.payload),
        };
        let before = dp.per_service(id, verdict::NO_BACKEND);
        let (v, out) = dp.run(row.hook.forward(), &frame);
        let l4 = fam.l4();
        match row.answer {
            Answer::Reset { flags, seq, ack } => {
                assert_eq!(v, row.hook.answer(), "answered back where it came from");
                assert_eq!(out.len(), l4 + 20, "Ethernet + IP + TCP, no payload: {out:02x?}");
                assert_eq!((&out[..6], &out[6..12]), (&frame[6..12], &frame[..6]), "MACs swapped");
                assert_eq!((&out[12..14], out[ETH_HLEN] >> 4), (&frame[12..14], frame[ETH_HLEN] >> 4), "EtherType");
                assert_eq!((ip_len(fam, &out), ip_proto(fam, &out)), (if fam == Family::V4 { 40 } else { 20 }, 6));
                let d = decode_any(&out);
                assert_eq!((d.src, d.dst), (front(&key), client), "addresses and ports swapped");
                assert_eq!(d.tcp_flags, flags, "flags");
                assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
                assert!(d.payload.is_empty());
                assert_eq!(u32::from_be_bytes(out[l4 + 4..l4 + 8].try_into().unwrap()), seq, "seq");
                if let Some(ack) = ack {
                    assert_eq!(u32::from_be_bytes(out[l4 + 8..l4 + 12].try_into().unwrap()), ack, "ack");
                }
            }
            Answer::PortUnreachable => {
                assert_eq!(v, row.hook.answer(), "answered back where it came from");
                let iph = fam.ip_hlen();
                assert_eq!(out.len(), l4 + 8 + iph + 8, "Ethernet + IP + ICMP + quoted IP and UDP headers");
                assert_eq!((&out[..6], &out[6..12]), (&frame[6..12], &frame[..6]), "MACs swapped");
                assert_eq!(check_port_unreachable(&frame, &out), Ok(true), "port unreachable, checksums, quote");
                let (icmp, len) = if fam == Family::V4 { (1, 20 + 8 + 28) } else { (58, 8 + 48) };
                assert_eq!((ip_proto(fam, &out), ip_len(fam, &out), out[fam.ttl_at()]), (icmp, len, 64));
                assert_eq!(&out[l4 + 4..l4 + 8], &[0; 4], "unused");
            }
            Answer::Drop => {
                assert_eq!((v, &out), (row.hook.drop(), &frame), "dropped untouched");
            }
        }
        assert_eq!(dp.maps().ct_len(), 0, "no conntrack for refused flows");
        assert_eq!(dp.per_service(id, verdict::NO_BACKEND), before + 1, "counted no_backend");
    });
}

// ---------------------------------------------------------------------------------------
// Table: loadBalancerSourceRanges.

/// A client of the LB IP: inside the ranges it is translated (on the uplink and from pods,
/// upstream's firewall check holds for both), outside it is dropped untouched, counted
/// `source_range_drop` and never tracked, while the same Service's ClusterIP stays open.
#[derive(Clone, Copy)]
struct RangeRow {
    name: &'static str,
    client: fn(Family, &Addrs) -> IpAddr,
    inside: bool,
}

/// The LB's ranges: a pod subnet, one outside client, a documentation prefix.
fn lb_ranges(fam: Family, a: &Addrs) -> Vec<proxy_userspace::model::IpPrefix> {
    let host = if fam == Family::V4 { 32 } else { 128 };
    vec![
        prefix(fam.pick("10.244.7.0", "2001:db8:aa:1::"), if fam == Family::V4 { 24 } else { 64 }),
        prefix(a.ext_client, host),
        prefix(fam.pick("198.51.100.0", "2001:db8:51::"), if fam == Family::V4 { 24 } else { 48 }),
    ]
}

const RANGE_ROWS: &[RangeRow] = &[
    RangeRow { name: "inside the pod prefix", client: |f, _| f.pick("10.244.7.5", "2001:db8:aa:1::5"), inside: true },
    RangeRow {
        name: "the last address of the pod prefix",
        client: |f, _| f.pick("10.244.7.255", "2001:db8:aa:1:ffff:ffff:ffff:ffff"),
        inside: true,
    },
    RangeRow { name: "the one allowed outside client", client: |_, a| a.ext_client, inside: true },
    RangeRow {
        name: "inside the third prefix",
        client: |f, _| f.pick("198.51.100.77", "2001:db8:51::77"),
        inside: true,
    },
    RangeRow {
        name: "one bit below the pod prefix",
        client: |f, _| f.pick("10.244.6.255", "2001:db8:aa:0:ffff:ffff:ffff:ffff"),
        inside: false,
    },
    RangeRow {
        name: "allowed only for another service",
        client: |f, _| f.pick("10.244.8.5", "2001:db8:aa:2::5"),
        inside: false,
    },
    RangeRow {
        name: "a pod in no prefix",
        client: |f, a| f.pick(&a.client.to_string(), "2001:db8:ab:1::5"),
        inside: false,
    },
    RangeRow { name: "the outside client next to the allowed one", client: |_, a| a.other_client, inside: false },
];

fn seed_ranges(fam: Family) -> TestDataplane {
    let a = fam.addrs();
    let mut dp = TestDataplane::load();
    let mut lb = svc(FrontendKind::LoadBalancer, &[(a.local_pod, 8080, true)]);
    lb.source_ranges = lb_ranges(fam, &a);
    let other_lb_ip = fam.pick("203.0.113.21", "2001:db8:20::21");
    let mut other = svc(FrontendKind::LoadBalancer, &[(a.local_pod, 8080, true)]);
    other.source_ranges =
        vec![prefix(fam.pick("10.244.8.0", "2001:db8:aa:2::"), if fam == Family::V4 { 24 } else { 64 })];
    dp.program(vec![
        (fk(a.lb_ip, 80, Protocol::Tcp, Scope::External), lb.clone()),
        (fk(a.lb_ip, 80, Protocol::Tcp, Scope::Internal), lb),
        (fk(other_lb_ip, 80, Protocol::Tcp, Scope::External), other.clone()),
        (fk(other_lb_ip, 80, Protocol::Tcp, Scope::Internal), other),
        (fk(a.vip, 80, Protocol::Tcp, Scope::Internal), svc(FrontendKind::ClusterIP, &[(a.local_pod, 8080, true)])),
    ]);
    dp
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn source_ranges_allow_their_prefixes_and_drop_the_rest() {
    require_root("source_ranges_allow_their_prefixes_and_drop_the_rest");
    let dps = [RefCell::new(seed_ranges(Family::V4)), RefCell::new(seed_ranges(Family::V6))];
    let rows: Vec<(RangeRow, Hook)> = RANGE_ROWS.iter().flat_map(|r| Hook::BOTH.map(|h| (*r, h))).collect();
    let port = std::sync::atomic::AtomicU16::new(40000);
    run_cases(each(&Family::ALL, &rows, |(r, h)| format!("{} ({h:?})", r.name)), |(fam, (row, hook))| {
        let a = fam.addrs();
        let mut dp = dps[fam as usize].borrow_mut();
        let scope = if hook == Hook::Pod { Scope::Internal } else { Scope::External };
        let id = dp.svc_id(&fk(a.lb_ip, 80, Protocol::Tcp, scope));
        let c = (row.client)(fam, &a);
        let client = (c, port.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let frame = fam.tcp(client, (a.lb_ip, 80), b"");
        let (new, dropped, global) = (
            dp.per_service(id, verdict::NEW_FLOW),
            dp.per_service(id, verdict::SOURCE_RANGE_DROP),
            dp.global(verdict::SOURCE_RANGE_DROP),
        );
        let (v, out) = dp.run(hook.forward(), &frame);
        if row.inside {
            let d = decode_any(&out);
            assert_eq!((v, d.dst, d.src), (hook.pass(), (a.local_pod, 8080), client), "{c} inside: translated");
            assert!(d.l4_csum_ok);
            assert_eq!(dp.per_service(id, verdict::NEW_FLOW), new + 1);
        } else {
            assert_eq!((v, &out), (hook.drop(), &frame), "{c} outside: dropped untouched");
            assert!(
                dp.ct(client, (a.lb_ip, 80), proxy_common::PROTO_TCP, CT_DIR_FORWARD).is_none(),
                "{c}: no conntrack"
            );
            assert_eq!(dp.per_service(id, verdict::SOURCE_RANGE_DROP), dropped + 1, "counted on the service");
            assert_eq!(dp.global(verdict::SOURCE_RANGE_DROP), global + 1, "counted node-wide");
            // The ClusterIP of the same service stays open to it.
            let (v, out) = dp.run(FROM_POD, &fam.tcp((c, client.1), (a.vip, 80), b""));
            assert_eq!(
                (v, decode_any(&out).dst),
                (TC_ACT_UNSPEC, (a.local_pod, 8080)),
                "{c}: the ClusterIP stays open"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// Table: north-south to a backend on another node (XDP only: forwarding is the uplink's).

/// A frontend whose backend is on node 2: DNAT + SNAT to the node address with a port of
/// the SNAT range, TTL / hop limit decremented, MACs from the FIB and neighbour tables,
/// sent back out of the uplink (XDP_TX; from another interface handed to `uplink_handoff`).
/// The backend's reply is translated back to frontend -> client and forwarded to the
/// client's MAC; a later packet keeps backend and port; a FIN from the backend marks the
/// flow closing.
#[derive(Clone, Copy, Debug)]
struct Remote {
    name: &'static str,
    /// LB IP:80 (true) or NODE:NODE_PORT.
    lb: bool,
    /// NODE_CONFIG names the node address (else the SNAT source is the address the client
    /// used, which is the node's for a NodePort).
    configured: bool,
}

const REMOTES: &[Remote] = &[
    Remote {
        name: "NodePort, no node address configured: SNAT to the one the client used",
        lb: false,
        configured: false,
    },
    Remote {
        name: "LB IP, node address configured: SNAT to it (the backend's node would not route the LB IP back)",
        lb: true,
        configured: true,
    },
];

fn remote(fam: Family, row: Remote) {
    let a = fam.addrs();
    let net = fwd_ns(fam);
    let up0 = net.uplink_ifindex();
    assert_ne!(up0, 0);
    let mut dp = TestDataplane::load();
    if row.configured {
        fam.set_node(&dp, Some(a.node), None);
    }
    let (kind, key) = if row.lb {
        (FrontendKind::LoadBalancer, fk(a.lb_ip, 80, Protocol::Tcp, Scope::External))
    } else {
        (FrontendKind::NodePort, fk(a.node, NODE_PORT, Protocol::Tcp, Scope::External))
    };
    dp.program(vec![(key, svc(kind, &[(a.remote_pod, 8080, false)]))]);
    let id = dp.svc_id(&key);
    let client = (a.ext_client, 40000);
    let frame = fam.tcp(client, front(&key), b"hello");
    let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &frame, up0));
    assert_eq!(v, XDP_TX, "forwarded out of the interface it came in on");
    let d = decode_any(&out);
    assert_eq!(d.dst, (a.remote_pod, 8080));
    assert_eq!(d.src.0, a.node, "source NATed to the node address");
    let snat_port = d.src.1;
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port), "SNAT port {snat_port} outside the default range");
    assert!(d.ip_csum_ok && d.l4_csum_ok, "checksums: {d:?}");
    assert_eq!(d.payload, b"hello");
    assert_eq!((&out[..6], &out[6..12]), (&NODE2_MAC[..], &UPLINK_MAC[..]), "MACs: node 2 (the gateway), our uplink");
    assert_eq!(d.ttl, 63);

    let p = proxy_common::PROTO_TCP;
    let fwd = dp.ct(client, front(&key), p, CT_DIR_FORWARD).expect("forward entry");
    assert_ne!(fwd.flags & ct_flags::SNAT, 0);
    assert_eq!((fwd.nat, fwd.snat), ((a.remote_pod, 8080), (a.node, snat_port)));
    let rev = dp.ct((a.remote_pod, 8080), (a.node, snat_port), p, CT_DIR_REPLY).expect("reply entry");
    assert_ne!(rev.flags & ct_flags::SNAT, 0);
    assert_eq!((rev.nat, rev.snat), (front(&key), client));

    let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &frame, up0));
    assert_eq!((v, decode_any(&out).src), (XDP_TX, (a.node, snat_port)), "same flow: same backend, same port");

    // From another interface (lo here) the egress device is not the ingress one, which XDP
    // may not be able to transmit on (a tunnel): the translated packet is passed, tagged in
    // its XDP metadata (test_run returns it in front of the frame) for the uplink's TC
    // ingress (`uplink_handoff`) to send out of up0. A kernel that refuses XDP metadata gets
    // the program with the hand-off pruned: a plain redirect to up0.
    let (v, out) = net.ns.run(|| dp.run(FROM_UPLINK, &frame));
    let translated = if proxy_userspace::dataplane::maps::loader::xdp_metadata_supported() {
        assert_eq!(v, XDP_PASS, "egress interface differs from ingress: handed to TC");
        assert_eq!(out[..8], handoff_tag(up0), "metadata: the hand-off magic, then the egress ifindex");
        &out[8..]
    } else {
        assert_eq!(v, XDP_REDIRECT, "no XDP metadata on this kernel: redirected to the egress interface");
        &out[..]
    };
    let d = decode_any(translated);
    assert_eq!((d.src, d.dst), ((a.node, snat_port), (a.remote_pod, 8080)), "translated before the hand-off");
    assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");

    let reply = fam.segment((a.remote_pod, 8080), (a.node, snat_port), tcp::SYN | tcp::ACK, b"world");
    let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &reply, up0));
    assert_eq!(v, XDP_TX);
    let r = decode_any(&out);
    assert_eq!((r.src, r.dst), (front(&key), client), "both translations undone");
    assert!(r.ip_csum_ok && r.l4_csum_ok, "{r:?}");
    assert_eq!(r.payload, b"world");
    assert_eq!((&out[..6], &out[6..12]), (&CLIENT_MAC[..], &UPLINK_MAC[..]));
    assert_eq!(r.ttl, 63);

    // The backend closes: the forward entry is marked closing, so a new SYN on the tuple
    // is balanced afresh.
    let fin = fam.segment((a.remote_pod, 8080), (a.node, snat_port), tcp::FIN | tcp::ACK, b"");
    net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &fin, up0));
    let fwd = dp.ct(client, front(&key), p, CT_DIR_FORWARD).expect("forward entry");
    assert_ne!(fwd.flags & ct_flags::CLOSING, 0, "FIN from the backend marks the forward entry");

    assert_eq!(dp.per_service(id, verdict::NEW_FLOW), 1);
    assert_eq!(dp.per_service(id, verdict::ESTABLISHED), 2);
    assert_eq!(dp.per_service(id, verdict::REVERSE_NAT), 2);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn remote_backend_dnat_snat_forward_and_reverse() {
    require_root("remote_backend_dnat_snat_forward_and_reverse");
    run_cases(each(&Family::ALL, REMOTES, |r| r.name.to_string()), |(f, r)| remote(f, r));
}

/// SNAT ports are claimed per backend with BPF_NOEXIST: with a 4-port range four flows to
/// one backend get four different ports, a fifth finds none (dropped, `error`). A TTL /
/// hop limit of 1 cannot be forwarded (`no_route`, no neighbour asked for); a next hop
/// without a neighbour entry drops the packet (`no_route`) and queues the gateway in
/// NEIGH_MISSES for the agent to resolve. XDP only, both families.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn snat_exhaustion_last_hop_and_neighbour_miss_drop() {
    require_root("snat_exhaustion_last_hop_and_neighbour_miss_drop");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let net = fwd_ns(fam);
        let up0 = net.uplink_ifindex();
        let mut dp = TestDataplane::load();
        dp.node().set_config(&node_config(None, None, PortRange { min: 62000, max: 62003 })).unwrap();
        let np = fk(a.node, NODE_PORT, Protocol::Tcp, Scope::External);
        let far = fk(a.node, 30081, Protocol::Tcp, Scope::External);
        dp.program(vec![
            (np, svc(FrontendKind::NodePort, &[(a.remote_pod, 8080, false)])),
            (far, svc(FrontendKind::NodePort, &[(a.far_pod, 8080, false)])),
        ]);
        let (np_id, far_id) = (dp.svc_id(&np), dp.svc_id(&far));
        let mut ports = BTreeSet::new();
        for i in 0..4u16 {
            let src = (fam.pick(&format!("192.168.100.{}", 100 + i), &format!("fd00:100::{:x}", 0x200 + i)), 40000);
            let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &fam.tcp(src, front(&np), b""), up0));
            assert_eq!(v, XDP_TX, "flow {i}");
            let d = decode_any(&out);
            assert_eq!((d.src.0, d.dst), (a.node, (a.remote_pod, 8080)), "SNAT to the address the client used");
            assert!(d.l4_csum_ok);
            ports.insert(d.src.1);
        }
        assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![62000, 62001, 62002, 62003]);
        let before = dp.per_service(np_id, verdict::ERROR);
        let (v, _) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &fam.tcp((a.ext_client, 50000), front(&np), b""), up0));
        assert_eq!(v, XDP_DROP, "SNAT range exhausted");
        assert_eq!(dp.per_service(np_id, verdict::ERROR), before + 1);

        let mut last_hop = fam.tcp((a.ext_client, 39999), front(&far), b"");
        last_hop[fam.ttl_at()] = 1;
        if fam == Family::V4 {
            fix_ipv4_csum(&mut last_hop);
        }
        let (v, _) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &last_hop, up0));
        assert_eq!(v, XDP_DROP, "TTL / hop limit 1");
        assert_eq!(dp.per_service(far_id, verdict::NO_ROUTE), 1);
        assert!(dp.node().take_neigh_misses().is_empty(), "TTL 1 queues no neighbour miss");

        let (v, _) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &fam.tcp((a.ext_client, 40000), front(&far), b""), up0));
        assert_eq!(v, XDP_DROP);
        assert_eq!(dp.per_service(far_id, verdict::NO_ROUTE), 2);
        assert_eq!(dp.node().take_neigh_misses(), vec![(up0, a.unresolved_gw)], "the gateway, on the uplink");
        assert!(dp.node().take_neigh_misses().is_empty(), "taken misses are removed");
    });
}

/// A client reusing one source port towards a NodePort whose backend is on another node
/// (DNAT + SNAT), SYN then FIN, twenty times: translated every time with a port of the SNAT
/// range, the FIN on the same translation, and only the last connection's two entries
/// remain. Each reopen used to leak the previous connection's SNAT port claim, and the
/// tuple has only eight candidates, so the ninth SYN was dropped forever. XDP only.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn remote_nodeport_tuple_reopened_twenty_times_is_translated_every_time() {
    require_root("remote_nodeport_tuple_reopened_twenty_times_is_translated_every_time");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let net = fwd_ns(fam);
        let up0 = net.uplink_ifindex();
        let mut dp = TestDataplane::load();
        let np = fk(a.node, NODE_PORT, Protocol::Tcp, Scope::External);
        dp.program(vec![(np, svc(FrontendKind::NodePort, &[(a.remote_pod, 8080, false)]))]);
        let id = dp.svc_id(&np);
        let client = (a.ext_client, 5353);
        for i in 0..20 {
            let syn = fam.segment(client, front(&np), tcp::SYN, b"");
            let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &syn, up0));
            assert_eq!(v, XDP_TX, "SYN #{i} forwarded");
            let d = decode_any(&out);
            assert_eq!((d.src.0, d.dst), (a.node, (a.remote_pod, 8080)), "SYN #{i}");
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&d.src.1), "SYN #{i}: SNAT port {}", d.src.1);
            assert!(d.ip_csum_ok && d.l4_csum_ok, "SYN #{i}: {d:?}");
            let fin = fam.segment(client, front(&np), tcp::FIN | tcp::ACK, b"");
            let (v, out) = net.ns.run(|| dp.run_xdp_on(FROM_UPLINK, &fin, up0));
            assert_eq!((v, decode_any(&out).src), (XDP_TX, d.src), "FIN #{i} on the same translation");
        }
        assert_eq!(dp.per_service(id, verdict::NEW_FLOW), 20);
        assert_eq!(dp.per_service(id, verdict::ERROR), 0);
        assert_eq!(dp.maps().ct_len(), 2, "only the last connection's two entries remain");
    });
}

/// The incremental checksum update against a from-scratch computation, over many random
/// rewrites (RFC 1624 corner cases: results of 0x0000/0xffff included by sheer volume), on
/// the XDP forwarding path (DNAT + SNAT + TTL), TCP and UDP, both families.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn checksums_match_full_recomputation_for_many_tuples() {
    require_root("checksums_match_full_recomputation_for_many_tuples");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let net = fwd_ns(fam);
        let up0 = net.uplink_ifindex();
        let mut dp = TestDataplane::load();
        let backend = [(a.remote_pod, 8080, false)];
        dp.program(vec![
            (fk(a.node, NODE_PORT, Protocol::Tcp, Scope::External), svc(FrontendKind::NodePort, &backend)),
            (fk(a.node, NODE_PORT, Protocol::Udp, Scope::External), svc(FrontendKind::NodePort, &backend)),
        ]);
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        net.ns.run(|| {
            for i in 0..2000u32 {
                let host = next() & 0xff;
                let addr = fam.pick(&format!("192.168.100.{host}"), &format!("fd00:100::{host:x}"));
                let src = (addr, (next() % 60000 + 1024) as u16);
                let payload: Vec<u8> = (0..(next() % 40)).map(|_| next() as u8).collect();
                let proto = if i % 2 == 0 { Protocol::Tcp } else { Protocol::Udp };
                let frame = fam.frame(proto, src, (a.node, NODE_PORT), &payload);
                let (v, out) = dp.run_xdp_on(FROM_UPLINK, &frame, up0);
                assert_eq!(v, XDP_TX, "flow {i} {src:?}");
                let d = decode_any(&out);
                assert!(d.ip_csum_ok && d.l4_csum_ok, "flow {i}: {d:?}");
            }
        });
    });
}

// ---------------------------------------------------------------------------------------
// Scenarios of the pod hook, both families.

fn three_backends(dp: &mut TestDataplane, a: &Addrs) -> u32 {
    let key = Hook::Pod.frontend(a, Protocol::Tcp);
    dp.program(vec![(key, svc(FrontendKind::ClusterIP, &Hook::Pod.backends(a)))]);
    dp.svc_id(&key)
}

/// A pod client address of the family: `net` (0-255) and `host` (1-255) vary.
fn pod_client(fam: Family, net: u8, host: u8) -> IpAddr {
    fam.pick(&format!("10.244.{net}.{host}"), &format!("fd00:10:244:{net:x}::{host:x}"))
}

/// 30,000 new flows over 3 backends: each gets 10,000 +- 5%, each is new, each tracked.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn new_flows_spread_uniformly() {
    require_root("new_flows_spread_uniformly");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        let id = three_backends(&mut dp, &a);
        let mut counts: HashMap<IpAddr, u32> = HashMap::new();
        for i in 0..30_000u32 {
            let src = (pod_client(fam, 2, (i / 10_000) as u8 + 1), 10_000 + (i % 10_000) as u16);
            let (v, out) = dp.run(FROM_POD, &fam.tcp(src, (a.vip, 80), b""));
            assert_eq!(v, TC_ACT_UNSPEC, "flow {i}");
            *counts.entry(decode_any(&out).dst.0).or_default() += 1;
        }
        eprintln!("{} distribution over 30000 flows: {counts:?}", fam.name());
        assert_eq!(counts.len(), 3, "{counts:?}");
        for (b, n) in &counts {
            assert!(a.backends().contains(b), "{b}");
            assert!((9_500..=10_500).contains(n), "backend {b} got {n} of 30000: {counts:?}");
        }
        assert_eq!(dp.per_service(id, verdict::NEW_FLOW), 30_000, "every flow was new");
        assert_eq!(dp.maps().ct_len(), 60_000, "two conntrack entries per flow");
    });
}

/// A source port of `client` whose new flow to the VIP lands on `backend`.
fn port_landing_on(dp: &mut TestDataplane, fam: Family, client: IpAddr, backend: IpAddr) -> u16 {
    let vip = fam.addrs().vip;
    (20_000..20_200u16)
        .find(|p| decode_any(&dp.run(FROM_POD, &fam.tcp((client, *p), (vip, 80), b"")).1).dst.0 == backend)
        .unwrap_or_else(|| panic!("no flow lands on {backend}"))
}

/// Removing a backend: new flows never reach it, an established flow to it continues.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn removed_backend_keeps_established_flow() {
    require_root("removed_backend_keeps_established_flow");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        three_backends(&mut dp, &a);
        let port = port_landing_on(&mut dp, fam, a.client, a.b3);
        let key = Hook::Pod.frontend(&a, Protocol::Tcp);
        dp.program(vec![(key, svc(FrontendKind::ClusterIP, &[(a.b1, 8080, true), (a.b2, 8080, true)]))]);
        let (_, out) = dp.run(FROM_POD, &fam.tcp((a.client, port), (a.vip, 80), b""));
        assert_eq!(decode_any(&out).dst, (a.b3, 8080), "established flow keeps its backend");
        for port in 30_000..30_300u16 {
            let (_, out) = dp.run(FROM_POD, &fam.tcp((a.client, port), (a.vip, 80), b""));
            assert_ne!(decode_any(&out).dst.0, a.b3, "new flow reached the removed backend");
        }
    });
}

/// The reopen rule: a retransmitted SYN of a live connection keeps its backend (even once
/// the backend left the Service); the FIN reaches it and marks the flow closing; a SYN on
/// the same tuple after it is a new connection, balanced over the backends there are now
/// (a removed one is never reached again), whose old reply entry is gone.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn syn_after_fin_reopens_the_tuple() {
    require_root("syn_after_fin_reopens_the_tuple");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        let id = three_backends(&mut dp, &a);
        let port = port_landing_on(&mut dp, fam, a.client, a.b3);
        let syn = fam.tcp((a.client, port), (a.vip, 80), b"");
        assert_eq!(decode_any(&dp.run(FROM_POD, &syn).1).dst.0, a.b3, "a retransmitted SYN keeps its backend");
        let key = Hook::Pod.frontend(&a, Protocol::Tcp);
        dp.program(vec![(key, svc(FrontendKind::ClusterIP, &[(a.b1, 8080, true), (a.b2, 8080, true)]))]);
        assert_eq!(decode_any(&dp.run(FROM_POD, &syn).1).dst.0, a.b3, "... also once its backend left");
        let fin = fam.segment((a.client, port), (a.vip, 80), tcp::FIN | tcp::ACK, b"");
        assert_eq!(decode_any(&dp.run(FROM_POD, &fin).1).dst.0, a.b3, "the FIN reaches the connection's backend");
        let p = proxy_common::PROTO_TCP;
        let fwd = dp.ct((a.client, port), (a.vip, 80), p, CT_DIR_FORWARD).expect("forward entry");
        assert_ne!(fwd.flags & ct_flags::CLOSING, 0, "FIN marks the flow closing");
        let before = dp.per_service(id, verdict::NEW_FLOW);
        let d = decode_any(&dp.run(FROM_POD, &syn).1);
        assert!([a.b1, a.b2].contains(&d.dst.0), "reopened tuple went to {:?}", d.dst);
        assert!(d.l4_csum_ok);
        assert_eq!(dp.per_service(id, verdict::NEW_FLOW), before + 1);
        assert!(dp.ct((a.b3, 8080), (a.client, port), p, CT_DIR_REPLY).is_none(), "the old reply entry is gone");
        assert!(dp.ct(d.dst, (a.client, port), p, CT_DIR_REPLY).is_some(), "the new one is there");
    });
}

const AFFINITY_TIMEOUT: u32 = 10_800;

/// sessionAffinity: ClientIP: every new flow of one client goes to the same backend while
/// the timeout has not passed (the affinity map names it), other clients are still spread,
/// and the datapath follows what the affinity map says.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn session_affinity_pins_a_client_to_one_backend() {
    require_root("session_affinity_pins_a_client_to_one_backend");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        let key = Hook::Pod.frontend(&a, Protocol::Tcp);
        let mut e = svc(FrontendKind::ClusterIP, &Hook::Pod.backends(&a));
        e.affinity_timeout = Some(AFFINITY_TIMEOUT);
        dp.program(vec![(key, e)]);
        let id = dp.svc_id(&key);
        let first = decode_any(&dp.run(FROM_POD, &fam.tcp((a.client, 1000), (a.vip, 80), b"")).1).dst;
        for port in 1001..1100u16 {
            let d = decode_any(&dp.run(FROM_POD, &fam.tcp((a.client, port), (a.vip, 80), b"")).1);
            assert_eq!(d.dst, first, "flow from port {port} left the affinity backend");
        }
        let (backend_id, last_used) = dp.affinity(a.client, id).expect("affinity entry for the client");
        assert_eq!(dp.backend(fam, backend_id), Some(first), "the affinity map names the chosen backend");
        assert_ne!(last_used, 0);

        let mut others = HashSet::new();
        for c in 1..=60u8 {
            let client = pod_client(fam, 3, c);
            others.insert(decode_any(&dp.run(FROM_POD, &fam.tcp((client, 5000), (a.vip, 80), b"")).1).dst.0);
        }
        assert_eq!(others.len(), 3, "different clients spread over all backends");

        // Point the client's affinity at another backend (fresh timestamp): new flows follow it.
        let other = dp.backend_ids(fam).into_iter().find(|b| *b != backend_id).expect("another backend");
        let other_addr = dp.backend(fam, other).expect("backend");
        dp.set_affinity(a.client, id, other, last_used);
        let d = decode_any(&dp.run(FROM_POD, &fam.tcp((a.client, 2000), (a.vip, 80), b"")).1);
        assert_eq!(d.dst, other_addr, "the datapath reads the affinity map");
    });
}

/// A backend removed from a Service with session affinity stops getting the clients pinned
/// to it, even while another Service keeps it (so the backend entry itself stays): the
/// agent drops the affinity entries with the backend (reported by the IPv6 test session).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn affinity_never_outlives_the_backend_leaving_the_service() {
    require_root("affinity_never_outlives_the_backend_leaving_the_service");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        let program = |dp: &mut TestDataplane, backends: &[(IpAddr, u16, bool)]| {
            let mut sticky = svc(FrontendKind::ClusterIP, backends);
            sticky.affinity_timeout = Some(AFFINITY_TIMEOUT);
            let s = state(vec![
                (fk(a.vip, 80, Protocol::Tcp, Scope::Internal), sticky),
                (
                    fk(a.other_vip, 80, Protocol::Tcp, Scope::Internal),
                    svc(FrontendKind::ClusterIP, &[(a.b2, 8080, true)]),
                ),
            ]);
            let r = dp.syncer.apply(&s);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            r
        };
        program(&mut dp, &[(a.b1, 8080, true), (a.b2, 8080, true)]);
        let client = (1..=60u8)
            .map(|c| pod_client(fam, 4, c))
            .find(|c| decode_any(&dp.run(FROM_POD, &fam.tcp((*c, 1000), (a.vip, 80), b"")).1).dst.0 == a.b2)
            .expect("some client lands on B2");
        let r = program(&mut dp, &[(a.b1, 8080, true)]);
        assert!(r.affinity_purged >= 1, "affinity entries purged: {}", r.affinity_purged);
        for port in 2000..2020u16 {
            let d = decode_any(&dp.run(FROM_POD, &fam.tcp((client, port), (a.vip, 80), b"")).1);
            assert_eq!(d.dst, (a.b1, 8080), "new flow from port {port} of a client pinned to the removed B2");
        }
    });
}

/// Hairpin: a pod reaching itself through its own service. The pod would drop a packet
/// from its own address arriving on eth0, so the flow is also source-NATed to the hairpin
/// address and bounced straight back into the pod (TC_ACT_REDIRECT to the same veth, MACs
/// swapped); the pod's answer to the hairpin address is translated back to VIP -> pod the
/// same way. Without a hairpin address configured, the flow is only DNATed.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn hairpin_to_self_is_source_natted_and_bounced() {
    require_root("hairpin_to_self_is_source_natted_and_bounced");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        let key = Hook::Pod.frontend(&a, Protocol::Tcp);
        dp.program(vec![(key, svc(FrontendKind::ClusterIP, &[(a.client, 8080, true)]))]);
        let id = dp.svc_id(&key);

        // Not configured: DNAT only.
        let (v, out) = dp.run(FROM_POD, &fam.tcp((a.client, 40000), (a.vip, 80), b"me"));
        let d = decode_any(&out);
        assert_eq!((v, d.src, d.dst), (TC_ACT_UNSPEC, (a.client, 40000), (a.client, 8080)));

        fam.set_node(&dp, None, Some(a.hairpin));
        let frame = fam.tcp((a.client, 40001), (a.vip, 80), b"me");
        let (v, out) = dp.run(FROM_POD, &frame);
        assert_eq!(v, TC_ACT_REDIRECT, "bounced back into the pod");
        let d = decode_any(&out);
        assert_eq!(d.dst, (a.client, 8080));
        assert_eq!(d.src.0, a.hairpin);
        let port = d.src.1;
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port), "{port}");
        assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
        assert_eq!((&out[..6], &out[6..12]), (&frame[6..12], &frame[..6]), "MACs swapped");
        // Established: same port.
        let (v, fwd_out) = dp.run(FROM_POD, &frame);
        assert_eq!((v, decode_any(&fwd_out).src), (TC_ACT_REDIRECT, (a.hairpin, port)));

        // The pod answers the hairpin address.
        let reply = fam.segment((a.client, 8080), (a.hairpin, port), tcp::SYN | tcp::ACK, b"you");
        let (v, out) = dp.run(FROM_POD, &reply);
        assert_eq!(v, TC_ACT_REDIRECT);
        let r = decode_any(&out);
        assert_eq!((r.src, r.dst), ((a.vip, 80), (a.client, 40001)));
        assert!(r.ip_csum_ok && r.l4_csum_ok, "{r:?}");
        assert_eq!(r.payload, b"you");
        assert_eq!(dp.per_service(id, verdict::REVERSE_NAT), 1);
        // Neither translated packet is touched again by to_pod on its way into the pod.
        for f in [&out, &fwd_out] {
            let (v, again) = dp.run(TO_POD, f);
            assert_eq!((v, &again), (TC_ACT_UNSPEC, f));
        }
    });
}

// ---------------------------------------------------------------------------------------
// One-offs.

/// IPv4 options shift the L4 header: it must still be found and translated correctly.
/// (IPv6 has extension headers instead: datapath_v6.rs.)
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn ip_options_are_handled() {
    require_root("ip_options_are_handled");
    let a = Family::V4.addrs();
    let mut dp = TestDataplane::load();
    three_backends(&mut dp, &a);
    let plain = Family::V4.tcp((a.client, 40000), (a.vip, 80), b"opts");
    let mut frame = plain[..34].to_vec();
    frame.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
    frame.extend_from_slice(&plain[34..]);
    frame[14] = 0x46;
    let total = u16::from_be_bytes([frame[16], frame[17]]) + 4;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_csum(&mut frame);
    let (v, out) = dp.run(FROM_POD, &frame);
    assert_eq!(v, TC_ACT_UNSPEC);
    let d = decode_any(&out);
    assert_eq!(d.dst.1, 8080);
    assert!(a.backends().contains(&d.dst.0));
    assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
    assert_eq!(d.payload, b"opts");
}

/// Per-packet cost, reported (not asserted: performance lives in `cargo xtask bench`).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn report_per_packet_cost() {
    require_root("report_per_packet_cost");
    let a = Family::V4.addrs();
    let mut dp = TestDataplane::load();
    three_backends(&mut dp, &a);
    let hit = Family::V4.tcp((a.client, 40000), (a.vip, 80), b"");
    let miss = Family::V4.tcp((a.client, 40000), (a.b1, 9999), b"");
    let hit_ns = dp.time(FROM_POD, &hit, 1_000_000);
    let miss_ns = dp.time(FROM_POD, &miss, 1_000_000);
    eprintln!(
        "test_run repeat=1000000: service frame {hit_ns:.0} ns/packet (translates once, then the rewritten frame is a miss; see docs/benchmarks.md), miss {miss_ns:.0} ns/packet"
    );
    assert!(hit_ns > 0.0 && miss_ns > 0.0);
}
