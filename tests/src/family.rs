//! One scenario, both address families: the test side's mirror of the datapath's `Family`.
//! A datapath table row is written once against [`Addrs`] (roles: the VIP, a client, the
//! node...) and [`Family`]'s frame builders, conntrack lookups and map readers, and runs
//! for IPv4 and IPv6; the hooks' program names and return codes live here too.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic::{AssertUnwindSafe, catch_unwind},
};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proxy_common::{AffinityKey, AffinityValue, CtKey, CtValue, ServiceKey, StatsFamily, StatsKey, port_to_map};
use proxy_userspace::{
    dataplane::maps::node::{PortRange, node_config, node_config6},
    model::{BackendAddr, FrontendEntry, FrontendKey, FrontendKind, IpPrefix, Protocol, Scope, ServicePortName},
};

use crate::harness::{TestDataplane, UplinkNs, mac_str, state, tcp_any};

/// The programs: TC on a pod's veth (both directions), XDP on the uplink and TC on the
/// uplink's egress.
pub const FROM_POD: &str = "from_pod";
pub const TO_POD: &str = "to_pod";
pub const FROM_UPLINK: &str = "from_uplink";
pub const TO_UPLINK: &str = "to_uplink";

pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;
pub const XDP_REDIRECT: i32 = 4;

pub const ETH_HLEN: usize = 14;

/// MACs of the private forwarding namespace ([`fwd_ns`]): our uplink, node 2, the external
/// client.
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
pub const NODE_PORT: u16 = 30080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The addresses a scenario names, in one family. Pod side: a ClusterIP, a pod client and
/// three backends; north-south: the uplink subnet (the node, node 2, a gateway nobody
/// resolved, outside clients), an LB IP, pods of this node, of node 2 and behind the
/// unresolved gateway.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub vip: IpAddr,
    pub other_vip: IpAddr,
    pub client: IpAddr,
    pub b1: IpAddr,
    pub b2: IpAddr,
    pub b3: IpAddr,
    pub node: IpAddr,
    pub node2: IpAddr,
    pub unresolved_gw: IpAddr,
    pub ext_client: IpAddr,
    pub other_client: IpAddr,
    pub lb_ip: IpAddr,
    pub local_pod: IpAddr,
    pub remote_pod: IpAddr,
    pub far_pod: IpAddr,
    /// The hairpin source address the agent configures by default.
    pub hairpin: IpAddr,
}

impl Addrs {
    pub fn backends(&self) -> [IpAddr; 3] {
        [self.b1, self.b2, self.b3]
    }
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().expect("IPv4 literal"))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("IPv6 literal"))
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// The family of a frame by its EtherType; `None` for neither.
    pub fn of_frame(frame: &[u8]) -> Option<Family> {
        match frame.get(12..14) {
            Some([0x08, 0x00]) => Some(Family::V4),
            Some([0x86, 0xdd]) => Some(Family::V6),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The block of GLOBAL_STATS a frame of this EtherType is counted in.
    pub fn stats(self) -> StatsFamily {
        match self {
            Family::V4 => StatsFamily::Ipv4,
            Family::V6 => StatsFamily::Ipv6,
        }
    }

    /// A literal of this family: `pick("10.0.0.1", "fd00::1")`.
    pub fn pick(self, four: &str, six: &str) -> IpAddr {
        match self {
            Family::V4 => v4(four),
            Family::V6 => v6(six),
        }
    }

    pub fn addrs(self) -> Addrs {
        match self {
            Family::V4 => Addrs {
                vip: v4("10.96.0.10"),
                other_vip: v4("10.96.0.11"),
                client: v4("10.244.0.5"),
                b1: v4("10.244.1.1"),
                b2: v4("10.244.1.2"),
                b3: v4("10.244.1.3"),
                node: v4("192.168.100.1"),
                node2: v4("192.168.100.2"),
                unresolved_gw: v4("192.168.100.3"),
                ext_client: v4("192.168.100.100"),
                other_client: v4("192.168.100.101"),
                lb_ip: v4("203.0.113.20"),
                local_pod: v4("10.244.1.10"),
                remote_pod: v4("10.244.2.10"),
                far_pod: v4("10.244.3.10"),
                hairpin: IpAddr::V4(proxy_common::nat_defaults::HAIRPIN_ADDR.into()),
            },
            Family::V6 => Addrs {
                vip: v6("fd00:10:96::10"),
                other_vip: v6("fd00:10:96::11"),
                client: v6("fd00:10:244::5"),
                b1: v6("fd00:10:244:1::1"),
                b2: v6("fd00:10:244:1::2"),
                b3: v6("fd00:10:244:1::3"),
                node: v6("fd00:100::1"),
                node2: v6("fd00:100::2"),
                unresolved_gw: v6("fd00:100::3"),
                ext_client: v6("fd00:100::100"),
                other_client: v6("fd00:100::101"),
                lb_ip: v6("2001:db8:20::20"),
                local_pod: v6("fd00:244:1::10"),
                remote_pod: v6("fd00:244:2::10"),
                far_pod: v6("fd00:244:3::10"),
                hairpin: IpAddr::V6(proxy_common::nat_defaults::HAIRPIN_ADDR6.into()),
            },
        }
    }

    /// Length of the IP header the builders write (no options, no extension headers).
    pub fn ip_hlen(self) -> usize {
        match self {
            Family::V4 => 20,
            Family::V6 => 40,
        }
    }

    /// Where the transport header of a built frame starts.
    pub fn l4(self) -> usize {
        ETH_HLEN + self.ip_hlen()
    }

    /// Offset of the TTL / hop limit.
    pub fn ttl_at(self) -> usize {
        ETH_HLEN + if self == Family::V4 { 8 } else { 7 }
    }

    /// How many leading bytes (Ethernet and the IP header before anything a translation
    /// may change: the IPv4 checksum, the addresses) a DNAT on TC leaves alone.
    pub fn untouched_prefix(self) -> usize {
        ETH_HLEN + if self == Family::V4 { 10 } else { 8 }
    }

    /// A TCP SYN (sequence number 1000) with valid checksums.
    pub fn tcp(self, src: (IpAddr, u16), dst: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
        tcp_any(src, dst, crate::harness::tcp::SYN, payload)
    }

    /// A TCP segment with exactly `flags` (see [`crate::harness::tcp_any`]).
    pub fn segment(self, src: (IpAddr, u16), dst: (IpAddr, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
        tcp_any(src, dst, flags, payload)
    }

    pub fn udp(self, src: (IpAddr, u16), dst: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
        crate::frames::udp_any(src, dst, payload)
    }

    /// A TCP SYN or a UDP datagram.
    pub fn frame(self, proto: Protocol, src: (IpAddr, u16), dst: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
        match proto {
            Protocol::Tcp => self.tcp(src, dst, payload),
            _ => self.udp(src, dst, payload),
        }
    }

    /// The first packet of a reply: SYN|ACK for TCP, a datagram for UDP.
    pub fn reply(self, proto: Protocol, src: (IpAddr, u16), dst: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
        use crate::harness::tcp::{ACK, SYN};
        match proto {
            Protocol::Tcp => self.segment(src, dst, SYN | ACK, payload),
            _ => self.udp(src, dst, payload),
        }
    }

    /// An ICMP echo request (ICMPv6 for IPv6).
    pub fn echo(self, src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]);
        let mut v = Vec::new();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                eth.ipv4(s.octets(), d.octets(), 64).icmpv4_echo_request(1, 1).write(&mut v, payload)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                eth.ipv6(s.octets(), d.octets(), 64).icmpv6_echo_request(1, 1).write(&mut v, payload)
            }
            _ => panic!("echo: {src} and {dst} are of different families"),
        }
        .expect("build echo request");
        v
    }

    /// Program NODE_CONFIG(6): the SNAT and hairpin addresses (the port range back to its
    /// default for IPv4, whose NODE_CONFIG holds it for both families).
    pub fn set_node(self, dp: &TestDataplane, snat: Option<IpAddr>, hairpin: Option<IpAddr>) {
        let four = |a: Option<IpAddr>| a.map(|a| if let IpAddr::V4(a) = a { a } else { panic!("{a}: not IPv4") });
        let six = |a: Option<IpAddr>| a.map(|a| if let IpAddr::V6(a) = a { a } else { panic!("{a}: not IPv6") });
        let mut node = dp.node();
        match self {
            Family::V4 => node.set_config(&node_config(four(snat), four(hairpin), PortRange::default())),
            Family::V6 => node.set_config6(&node_config6(six(snat), six(hairpin))),
        }
        .expect("NODE_CONFIG");
    }
}

/// The hook a scenario runs on, and what it means there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC on a pod's veth: a pod client reaches a ClusterIP (`from_pod`); replies enter the
    /// pod (`to_pod`).
    Pod,
    /// XDP on the uplink: an outside client reaches a NodePort (`from_uplink`); a local
    /// backend's replies leave through the uplink (`to_uplink`).
    Uplink,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::Pod, Hook::Uplink];

    pub fn forward(self) -> &'static str {
        match self {
            Hook::Pod => FROM_POD,
            Hook::Uplink => FROM_UPLINK,
        }
    }

    pub fn reverse(self) -> &'static str {
        match self {
            Hook::Pod => TO_POD,
            Hook::Uplink => TO_UPLINK,
        }
    }

    /// What the forward program returns for a translated packet it lets go on.
    pub fn pass(self) -> i32 {
        match self {
            Hook::Pod => TC_ACT_UNSPEC,
            Hook::Uplink => XDP_PASS,
        }
    }

    pub fn drop(self) -> i32 {
        match self {
            Hook::Pod => TC_ACT_SHOT,
            Hook::Uplink => XDP_DROP,
        }
    }

    /// What the forward program returns for an answer it sends back itself.
    pub fn answer(self) -> i32 {
        match self {
            Hook::Pod => TC_ACT_REDIRECT,
            Hook::Uplink => XDP_TX,
        }
    }

    pub fn client(self, a: &Addrs) -> IpAddr {
        match self {
            Hook::Pod => a.client,
            Hook::Uplink => a.ext_client,
        }
    }

    /// The hook's frontend: a ClusterIP VIP:80 for pods, NODE:NODE_PORT outside.
    pub fn frontend(self, a: &Addrs, proto: Protocol) -> FrontendKey {
        match self {
            Hook::Pod => fk(a.vip, 80, proto, Scope::Internal),
            Hook::Uplink => fk(a.node, NODE_PORT, proto, Scope::External),
        }
    }

    pub fn kind(self) -> FrontendKind {
        match self {
            Hook::Pod => FrontendKind::ClusterIP,
            Hook::Uplink => FrontendKind::NodePort,
        }
    }

    /// Its backends: three pods for the ClusterIP; one pod of this node for the NodePort
    /// (a remote one is forwarded: the `remote_*` scenarios).
    pub fn backends(self, a: &Addrs) -> Vec<(IpAddr, u16, bool)> {
        match self {
            Hook::Pod => a.backends().iter().map(|b| (*b, 8080, true)).collect(),
            Hook::Uplink => vec![(a.local_pod, 8080, true)],
        }
    }
}

/// A frame read independently of the datapath (etherparse), either family: checksums
/// recomputed (IPv4 header; TCP/UDP over the family's pseudo-header; a zero UDP checksum
/// counts as valid over IPv4 only, RFC 8200 8.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    /// Always true for IPv6, which has no header checksum.
    pub ip_csum_ok: bool,
    pub l4_csum_ok: bool,
    /// TTL or hop limit.
    pub ttl: u8,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20); 0 for UDP.
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

pub fn decode_any(frame: &[u8]) -> Pkt {
    let p = SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("parse frame {frame:02x?}: {e}"));
    let (src, dst, ttl, ip_csum_ok, v4h) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            let ok = h.calc_header_checksum() == h.header_checksum;
            (IpAddr::from(h.source), IpAddr::from(h.destination), h.time_to_live, ok, Some(h))
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (IpAddr::V6(h.source_addr()), IpAddr::V6(h.destination_addr()), h.hop_limit(), true, None)
        }
        other => panic!("not IP: {other:?}"),
    };
    let six = |a: IpAddr| match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => unreachable!("one family"),
    };
    let (sport, dport, tcp_flags, l4_csum_ok, payload) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let want = match &v4h {
                Some(ip) => h.calc_checksum_ipv4(ip, t.payload()).expect("tcp csum"),
                None => h.calc_checksum_ipv6_raw(six(src), six(dst), t.payload()).expect("tcp csum"),
            };
            let flags = u8::from(h.fin)
                | u8::from(h.syn) << 1
                | u8::from(h.rst) << 2
                | u8::from(h.psh) << 3
                | u8::from(h.ack) << 4
                | u8::from(h.urg) << 5;
            (h.source_port, h.destination_port, flags, want == h.checksum, t.payload().to_vec())
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            let ok = match &v4h {
                Some(ip) => h.checksum == 0 || h.calc_checksum_ipv4(ip, u.payload()).expect("udp csum") == h.checksum,
                None => h.calc_checksum_ipv6_raw(six(src), six(dst), u.payload()).expect("udp csum") == h.checksum,
            };
            (h.source_port, h.destination_port, 0, ok, u.payload().to_vec())
        }
        other => panic!("unexpected transport {other:?}"),
    };
    Pkt { src: (src, sport), dst: (dst, dport), ip_csum_ok, l4_csum_ok, ttl, tcp_flags, payload }
}

/// A std address and the form the maps store it in (`u32` / `Ipv6Words`, network order).
pub trait TestAddr: Copy {
    type Map: Copy;
    fn to_map(self) -> Self::Map;
}

impl TestAddr for Ipv4Addr {
    type Map = u32;
    fn to_map(self) -> u32 {
        u32::from_ne_bytes(self.octets())
    }
}

impl TestAddr for Ipv6Addr {
    type Map = proxy_common::Ipv6Words;
    fn to_map(self) -> proxy_common::Ipv6Words {
        crate::harness::ip6_to_map(self)
    }
}

/// The conntrack key of `src -> dst` (protocol `proto`) in direction `dir`, for either
/// family (`CtKey` for IPv4 addresses, `CtKey6` for IPv6 ones).
pub fn ct_key<A: TestAddr>(src: (A, u16), dst: (A, u16), proto: u8, dir: u8) -> CtKey<A::Map> {
    CtKey {
        src_addr: src.0.to_map(),
        dst_addr: dst.0.to_map(),
        src_port: port_to_map(src.1),
        dst_port: port_to_map(dst.1),
        proto,
        dir,
        _pad: 0,
    }
}

/// A conntrack entry read back, either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct {
    pub nat: (IpAddr, u16),
    pub snat: (IpAddr, u16),
    pub flags: u8,
    pub svc_id: u32,
    pub backend_id: u32,
}

fn ct_of<A: Copy>(v: CtValue<A>, ip: impl Fn(A) -> IpAddr) -> Ct {
    Ct {
        nat: (ip(v.nat_addr), u16::from_be(v.nat_port)),
        snat: (ip(v.snat_addr), u16::from_be(v.snat_port)),
        flags: v.flags,
        svc_id: v.svc_id,
        backend_id: v.backend_id,
    }
}

fn four(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a}: not IPv4"),
    }
}

fn six(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => panic!("{a}: not IPv6"),
    }
}

fn from4(w: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes()))
}

fn from6(w: proxy_common::Ipv6Words) -> IpAddr {
    IpAddr::V6(crate::harness::ip6_from_map(w))
}

/// A frontend of either family.
pub fn fk(addr: IpAddr, port: u16, proto: Protocol, scope: Scope) -> FrontendKey {
    FrontendKey { addr, port, proto, scope }
}

/// A frontend entry of `kind` with `backends` (address, port, on this node).
pub fn svc(kind: FrontendKind, backends: &[(IpAddr, u16, bool)]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName::new("default", "svc", ""),
        kind,
        backends: backends
            .iter()
            .map(|(a, p, local)| BackendAddr { addr: *a, port: *p, local: *local, terminating: false })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
        lb_algorithm: None,
        weights: vec![],
    }
}

/// `addr/len` as a loadBalancerSourceRanges entry.
pub fn prefix(addr: IpAddr, len: u8) -> IpPrefix {
    IpPrefix { addr, len }
}

impl TestDataplane {
    /// Program these frontends through the sync (the agent's own path), expecting no error.
    pub fn program(&mut self, entries: Vec<(FrontendKey, FrontendEntry)>) {
        let r = self.syncer.apply(&state(entries));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    /// The flow entry `src -> dst` in direction `dir`, from whichever table of its family
    /// holds it (assured or not).
    pub fn ct(&self, src: (IpAddr, u16), dst: (IpAddr, u16), proto: u8, dir: u8) -> Option<Ct> {
        match Family::of(src.0) {
            Family::V4 => {
                let k = ct_key((four(src.0), src.1), (four(dst.0), dst.1), proto, dir);
                self.maps().ct_get(&k).map(|v| ct_of(v, from4))
            }
            Family::V6 => {
                let k = ct_key((six(src.0), src.1), (six(dst.0), dst.1), proto, dir);
                self.maps().ct_get6(&k).map(|v| ct_of(v, from6))
            }
        }
    }

    /// The service id the sync gave frontend `k`.
    pub fn svc_id(&self, k: &FrontendKey) -> u32 {
        let (port, proto, scope) = (port_to_map(k.port), k.proto.number(), k.scope.number());
        let v = match Family::of(k.addr) {
            Family::V4 => self.maps().services.get(&ServiceKey { addr: four(k.addr).to_map(), port, proto, scope }, 0),
            Family::V6 => self.maps().services6.get(&ServiceKey { addr: six(k.addr).to_map(), port, proto, scope }, 0),
        };
        v.unwrap_or_else(|e| panic!("no service for {k:?}: {e}")).id
    }

    /// Packets counted for service `id` under verdict `v` (SERVICE_STATS, every CPU).
    pub fn per_service(&self, id: u32, v: u32) -> u64 {
        self.maps()
            .service_stats
            .get(&StatsKey { svc_id: id, verdict: v }, 0)
            .map(|pc| pc.iter().map(|c| c.packets).sum())
            .unwrap_or(0)
    }

    /// Packets counted under verdict `v` for any service.
    pub fn service_count(&self, v: u32) -> u64 {
        let keys: Vec<StatsKey> = self.maps().service_stats.keys().filter_map(Result::ok).collect();
        keys.iter().filter(|k| k.verdict == v).map(|k| self.per_service(k.svc_id, v)).sum()
    }

    /// The affinity entry of `client` for service `id`: (backend id, last used).
    pub fn affinity(&self, client: IpAddr, id: u32) -> Option<(u32, u64)> {
        let v = match Family::of(client) {
            Family::V4 => self.maps().affinity.get(&AffinityKey { client_addr: four(client).to_map(), svc_id: id }, 0),
            Family::V6 => self.maps().affinity6.get(&AffinityKey { client_addr: six(client).to_map(), svc_id: id }, 0),
        };
        v.ok().map(|v| (v.backend_id, v.last_used))
    }

    /// Point `client`'s affinity for service `id` at `backend_id`, as the datapath would.
    pub fn set_affinity(&mut self, client: IpAddr, id: u32, backend_id: u32, last_used: u64) {
        let v = AffinityValue { backend_id, _pad: 0, last_used };
        let maps = self.syncer.store_mut();
        match Family::of(client) {
            Family::V4 => maps.affinity.insert(AffinityKey { client_addr: four(client).to_map(), svc_id: id }, v, 0),
            Family::V6 => maps.affinity6.insert(AffinityKey { client_addr: six(client).to_map(), svc_id: id }, v, 0),
        }
        .expect("AFFINITY insert");
    }

    /// Backend `id` of `family`: (address, port).
    pub fn backend(&self, family: Family, id: u32) -> Option<(IpAddr, u16)> {
        match family {
            Family::V4 => self.maps().backends.get(&id, 0).ok().map(|b| (from4(b.addr), u16::from_be(b.port))),
            Family::V6 => self.maps().backends6.get(&id, 0).ok().map(|b| (from6(b.addr), u16::from_be(b.port))),
        }
    }

    /// Every backend id of `family`.
    pub fn backend_ids(&self, family: Family) -> Vec<u32> {
        match family {
            Family::V4 => self.maps().backends.keys().filter_map(Result::ok).collect(),
            Family::V6 => self.maps().backends6.keys().filter_map(Result::ok).collect(),
        }
    }
}

/// The XDP metadata `from_uplink` leaves for `uplink_handoff` (proxy-ebpf `handoff`): the
/// magic "epHO", then the egress ifindex, in host order.
pub fn handoff_tag(ifindex: u32) -> [u8; 8] {
    let mut tag = [0u8; 8];
    tag[..4].copy_from_slice(&0x6570_484f_u32.to_ne_bytes());
    tag[4..].copy_from_slice(&ifindex.to_ne_bytes());
    tag
}

/// The node's network for the XDP forwarding tests, one family: uplink `up0` with the
/// node's address (192.168.100.1/24, fd00:100::1/64), node 2 and the external client as
/// permanent neighbours, node 2's pod subnet routed via node 2, another via a gateway
/// nobody resolved (forwarding there must queue a neighbour miss), forwarding on.
pub fn fwd_ns(family: Family) -> UplinkNs {
    let a = family.addrs();
    let net = UplinkNs::new(if family == Family::V4 { "epx-fwd-" } else { "epx-fwd6-" }, UPLINK_MAC);
    let ns = &net.ns;
    let (v, plen, remote_net, far_net) = match family {
        Family::V4 => ("-4", 24, "10.244.2.0/24", "10.244.3.0/24"),
        Family::V6 => ("-6", 64, "fd00:244:2::/64", "fd00:244:3::/64"),
    };
    match family {
        Family::V4 => ns.sysctl("net.ipv4.ip_forward", "1").unwrap(),
        Family::V6 => {
            ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
            ns.sysctl("net.ipv6.conf.default.forwarding", "1").unwrap();
        }
    }
    let node = format!("{}/{plen}", a.node);
    let mut add = vec![v, "addr", "add", &node, "dev", "up0"];
    if family == Family::V6 {
        add.push("nodad");
    }
    ns.ip(&add).unwrap();
    ns.ip(&[v, "route", "add", remote_net, "via", &a.node2.to_string(), "dev", "up0"]).unwrap();
    ns.ip(&[v, "route", "add", far_net, "via", &a.unresolved_gw.to_string(), "dev", "up0"]).unwrap();
    for (ip, m) in [(a.node2, NODE2_MAC), (a.ext_client, CLIENT_MAC)] {
        ns.ip(&[v, "neigh", "replace", &ip.to_string(), "lladdr", &mac_str(m), "nud", "permanent", "dev", "up0"])
            .unwrap();
    }
    net
}

/// Run every case, each on its own (a failing case does not hide the others), then fail
/// naming every case that failed and why.
pub fn run_cases<C>(cases: impl IntoIterator<Item = (String, C)>, body: impl Fn(C)) {
    let mut failed = Vec::new();
    let mut n = 0;
    for (name, case) in cases {
        n += 1;
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| body(case))) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{name}: {why}"));
        }
    }
    eprintln!("{} of {n} cases passed", n - failed.len());
    assert!(failed.is_empty(), "{} of {n} cases failed:\n{}", failed.len(), failed.join("\n"));
}
