//! The address family as a type: the pipeline, conntrack and backend selection are written
//! once, generic over `Family`, so IPv6 becomes a second instantiation with its own maps
//! (IPv4 keeps its 16-byte conntrack keys and IPv6 costs only its own lookups). Only IPv4
//! is instantiated today: the IPv6 path did not fit the verifier's 512-byte stack yet
//! (docs/architecture.md, "IPv6").
use aya_ebpf::maps::{HashMap, LruHashMap, lpm_trie::Key};
use proxy_common::{AffinityKey, AffinityValue, Backend, CtKey, CtValue, NeighKey, ServiceKey, ServiceValue};

use crate::maps::{AFFINITY, BACKENDS, CONNTRACK, NEIGH_MISSES, NODE_CONFIG, SERVICES, SOURCE_RANGES};
use crate::parse::{self, Packet};
use proxy_common::Verdict;

pub trait Family: 'static {
    /// Address in network byte order, as the maps store it.
    type Addr: Copy + PartialEq + Default;
    /// `AF_INET` / `AF_INET6`, for `bpf_fib_lookup`.
    const AF: u8;

    fn services() -> &'static HashMap<ServiceKey<Self::Addr>, ServiceValue>;
    fn backends() -> &'static HashMap<u32, Backend<Self::Addr>>;
    fn conntrack() -> &'static HashMap<CtKey<Self::Addr>, CtValue<Self::Addr>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::Addr>, AffinityValue>;
    fn neigh_misses() -> &'static LruHashMap<NeighKey<Self::Addr>, u64>;
    /// Is `addr` in the loadBalancerSourceRanges of service `svc_id`?
    fn source_allowed(svc_id: u32, addr: Self::Addr) -> bool;
    /// The agent's SNAT and hairpin addresses for this family (all-zero: unset).
    fn node_addrs() -> (Self::Addr, Self::Addr);
    /// One word mixing the address's bits, for hashing (SNAT port candidates).
    fn fold(addr: Self::Addr) -> u32;
    /// Parse a frame of this family (see `parse`).
    fn parse(start: usize, end: usize, pkt_len: usize) -> Result<Packet<Self::Addr>, Verdict>;
    fn is_unset(addr: Self::Addr) -> bool {
        addr == Self::Addr::default()
    }
}

pub struct V4;

impl Family for V4 {
    type Addr = u32;
    const AF: u8 = 2;

    #[inline(always)]
    fn parse(start: usize, end: usize, pkt_len: usize) -> Result<Packet, Verdict> {
        parse::parse_v4(start, end, pkt_len)
    }

    fn services() -> &'static HashMap<ServiceKey, ServiceValue> {
        &SERVICES
    }
    fn backends() -> &'static HashMap<u32, Backend> {
        &BACKENDS
    }
    fn conntrack() -> &'static HashMap<CtKey, CtValue> {
        &CONNTRACK
    }
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue> {
        &AFFINITY
    }
    fn neigh_misses() -> &'static LruHashMap<NeighKey, u64> {
        &NEIGH_MISSES
    }
    #[inline(always)]
    fn source_allowed(svc_id: u32, addr: u32) -> bool {
        // The big-endian service id forms the key's leading 32 bits.
        SOURCE_RANGES.get(&Key::new(64, [svc_id.to_be(), addr])).is_some()
    }
    #[inline(always)]
    fn node_addrs() -> (u32, u32) {
        NODE_CONFIG.get(0).map_or((0, 0), |c| (c.snat_addr, c.hairpin_addr))
    }
    #[inline(always)]
    fn fold(addr: u32) -> u32 {
        addr
    }
}
