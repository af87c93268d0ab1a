//! The address family as a type: the pipeline, conntrack and backend selection are written
//! once, generic over `Family`, and IPv4 and IPv6 are two instantiations with their own maps
//! (so IPv4 keeps its 16-byte conntrack keys and IPv6 costs only its own lookups).
use aya_ebpf::maps::{HashMap, LruHashMap, lpm_trie::Key};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragKey, FragPorts, Ipv6Words, NeighKey, ServiceKey,
    ServiceValue, StatsFamily, frontend_filter,
};

use crate::hdr::{IP_HLEN, IP6_HLEN};
use crate::maps::{
    AFFINITY, AFFINITY6, BACKENDS, BACKENDS6, CONNTRACK, CONNTRACK6, CT_NEW, CT_NEW6, FRAGS, FRAGS6, NEIGH_MISSES,
    NEIGH_MISSES6, NODE_CONFIG, NODE_CONFIG6, SERVICE_CIDRS, SERVICE_CIDRS6, SERVICES, SERVICES6, SOURCE_RANGES,
    SOURCE_RANGES6,
};

pub trait Family: 'static {
    /// Address in network byte order, as the maps store it.
    type Addr: Copy + PartialEq + Default;
    /// `AF_INET` / `AF_INET6`, for `bpf_fib_lookup`.
    const AF: u8;
    /// Run the big steps (conntrack lookup and creation, backend selection) as BPF functions
    /// of their own instead of inlined: IPv6's 40-byte keys and 56-byte values would not fit
    /// the 512-byte stack of one function otherwise. IPv4 stays inlined (no call overhead).
    const OUTLINE: bool;
    /// Which block of `GLOBAL_STATS` this family's packets are counted in.
    const STATS: StatsFamily;
    /// The fixed IP header's length: a packet whose transport header follows it directly
    /// has no options or extension headers.
    const HDR_LEN: usize;

    fn services() -> &'static HashMap<ServiceKey<Self::Addr>, ServiceValue>;
    fn backends() -> &'static HashMap<u32, Backend<Self::Addr>>;
    /// Assured flows (never evicted) and unassured ones (LRU); see `maps::CT_NEW`.
    fn conntrack() -> &'static HashMap<CtKey<Self::Addr>, CtValue<Self::Addr>>;
    fn ct_new() -> &'static LruHashMap<CtKey<Self::Addr>, CtValue<Self::Addr>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::Addr>, AffinityValue>;
    fn neigh_misses() -> &'static LruHashMap<NeighKey<Self::Addr>, u64>;
    /// Ports of fragmented datagrams whose first fragment was translated (`frag.rs`).
    fn frags() -> &'static LruHashMap<FragKey<Self::Addr>, FragPorts>;
    /// Is `addr` in the loadBalancerSourceRanges of service `svc_id`?
    fn source_allowed(svc_id: u32, addr: Self::Addr) -> bool;
    /// What `SERVICE_CIDRS` says of a destination: `proxy_common::service_cidr::CIDR` (inside
    /// a Service CIDR, unallocated), `ALLOCATED`, or 0 (outside every Service CIDR).
    fn service_cidr(addr: Self::Addr) -> u8;
    /// `FRONTEND_FILTER`'s bits for a destination: its frontend bit (address, port,
    /// protocol) and its prefix bit (the /16 or /64 it is in); and the header flag that
    /// says this family's Service CIDRs were too wide to list.
    fn frontend_bit(addr: Self::Addr, port: u16, proto: u8) -> u32;
    fn prefix_bit(addr: Self::Addr) -> u32;
    /// Its bit as the source of a reply (a backend's address and port).
    fn reply_bit(addr: Self::Addr, port: u16, proto: u8) -> u32;
    const WIDE: u64;
    /// The agent's SNAT and hairpin addresses for this family (all-zero: unset).
    fn node_addrs() -> (Self::Addr, Self::Addr);
    /// One word mixing the address's bits, for hashing (SNAT port candidates).
    fn fold(addr: Self::Addr) -> u32;
    /// 32-bit words in an address (1 or 4), and the address as words (the first `WORDS`
    /// used), for checksum arithmetic.
    const WORDS: usize;
    fn words(addr: Self::Addr) -> [u32; 4];
    /// The Maglev flow hash of a 5-tuple (`proxy_common::flow_hash`): the same on every node.
    fn flow_hash(saddr: Self::Addr, daddr: Self::Addr, sport: u16, dport: u16, proto: u8) -> u32;
    fn is_unset(addr: Self::Addr) -> bool {
        addr == Self::Addr::default()
    }
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    const AF: u8 = 2;
    const OUTLINE: bool = false;
    const STATS: StatsFamily = StatsFamily::Ipv4;
    const HDR_LEN: usize = IP_HLEN;

    fn services() -> &'static HashMap<ServiceKey, ServiceValue> {
        &SERVICES
    }
    fn backends() -> &'static HashMap<u32, Backend> {
        &BACKENDS
    }
    fn conntrack() -> &'static HashMap<CtKey, CtValue> {
        &CONNTRACK
    }
    fn ct_new() -> &'static LruHashMap<CtKey, CtValue> {
        &CT_NEW
    }
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue> {
        &AFFINITY
    }
    fn neigh_misses() -> &'static LruHashMap<NeighKey, u64> {
        &NEIGH_MISSES
    }
    fn frags() -> &'static LruHashMap<FragKey, FragPorts> {
        &FRAGS
    }
    #[inline(always)]
    fn source_allowed(svc_id: u32, addr: u32) -> bool {
        // The big-endian service id forms the key's leading 32 bits.
        SOURCE_RANGES.get(&Key::new(64, [svc_id.to_be(), addr])).is_some()
    }
    #[inline(always)]
    fn service_cidr(addr: u32) -> u8 {
        SERVICE_CIDRS.get(&Key::new(32, addr)).copied().unwrap_or(0)
    }
    #[inline(always)]
    fn frontend_bit(addr: u32, port: u16, proto: u8) -> u32 {
        frontend_filter::frontend_v4(addr, port, proto)
    }
    #[inline(always)]
    fn prefix_bit(addr: u32) -> u32 {
        frontend_filter::prefix_v4(addr)
    }
    #[inline(always)]
    fn reply_bit(addr: u32, port: u16, proto: u8) -> u32 {
        frontend_filter::reply_v4(addr, port, proto)
    }
    const WIDE: u64 = frontend_filter::WIDE_V4;
    #[inline(always)]
    fn node_addrs() -> (u32, u32) {
        NODE_CONFIG.get(0).map_or((0, 0), |c| (c.snat_addr, c.hairpin_addr))
    }
    #[inline(always)]
    fn fold(addr: u32) -> u32 {
        addr
    }
    const WORDS: usize = 1;
    #[inline(always)]
    fn words(addr: u32) -> [u32; 4] {
        [addr, 0, 0, 0]
    }
    #[inline(always)]
    fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        proxy_common::flow_hash::v4(saddr, daddr, sport, dport, proto)
    }
}

impl Family for V6 {
    type Addr = Ipv6Words;
    const AF: u8 = 10;
    const OUTLINE: bool = true;
    const STATS: StatsFamily = StatsFamily::Ipv6;
    const HDR_LEN: usize = IP6_HLEN;

    fn services() -> &'static HashMap<ServiceKey<Ipv6Words>, ServiceValue> {
        &SERVICES6
    }
    fn backends() -> &'static HashMap<u32, Backend<Ipv6Words>> {
        &BACKENDS6
    }
    fn conntrack() -> &'static HashMap<CtKey<Ipv6Words>, CtValue<Ipv6Words>> {
        &CONNTRACK6
    }
    fn ct_new() -> &'static LruHashMap<CtKey<Ipv6Words>, CtValue<Ipv6Words>> {
        &CT_NEW6
    }
    fn affinity() -> &'static LruHashMap<AffinityKey<Ipv6Words>, AffinityValue> {
        &AFFINITY6
    }
    fn neigh_misses() -> &'static LruHashMap<NeighKey<Ipv6Words>, u64> {
        &NEIGH_MISSES6
    }
    fn frags() -> &'static LruHashMap<FragKey<Ipv6Words>, FragPorts> {
        &FRAGS6
    }
    #[inline(always)]
    fn source_allowed(svc_id: u32, a: Ipv6Words) -> bool {
        SOURCE_RANGES6.get(&Key::new(32 + 128, [svc_id.to_be(), a[0], a[1], a[2], a[3]])).is_some()
    }
    #[inline(always)]
    fn service_cidr(addr: Ipv6Words) -> u8 {
        SERVICE_CIDRS6.get(&Key::new(128, addr)).copied().unwrap_or(0)
    }
    #[inline(always)]
    fn frontend_bit(addr: Ipv6Words, port: u16, proto: u8) -> u32 {
        frontend_filter::frontend_v6(addr, port, proto)
    }
    #[inline(always)]
    fn prefix_bit(addr: Ipv6Words) -> u32 {
        frontend_filter::prefix_v6(addr)
    }
    #[inline(always)]
    fn reply_bit(addr: Ipv6Words, port: u16, proto: u8) -> u32 {
        frontend_filter::reply_v6(addr, port, proto)
    }
    const WIDE: u64 = frontend_filter::WIDE_V6;
    #[inline(always)]
    fn node_addrs() -> (Ipv6Words, Ipv6Words) {
        NODE_CONFIG6.get(0).map_or(([0; 4], [0; 4]), |c| (c.snat_addr, c.hairpin_addr))
    }
    #[inline(always)]
    fn fold(a: Ipv6Words) -> u32 {
        a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24)
    }
    const WORDS: usize = 4;
    #[inline(always)]
    fn words(addr: Ipv6Words) -> [u32; 4] {
        addr
    }
    #[inline(always)]
    fn flow_hash(saddr: Ipv6Words, daddr: Ipv6Words, sport: u16, dport: u16, proto: u8) -> u32 {
        proxy_common::flow_hash::v6(saddr, daddr, sport, dport, proto)
    }
}
