//! Map layouts shared by the eBPF programs (`proxy-ebpf`) and the agent/CLI
//! (`proxy-userspace`). One definition of every key and value, `#[repr(C)]`, with explicit
//! padding fields so both sides agree byte for byte and BPF map keys never carry
//! uninitialised bytes (the verifier rejects those, and hashing them would be a bug).
//!
//! Byte order: addresses and ports are stored in **network byte order** exactly as they
//! appear on the wire, so the datapath compares them without swapping. Userspace converts
//! ports with [`port_to_map`] / [`port_from_map`] here, and addresses with helpers in
//! `proxy-userspace` (`dataplane::maps::addr`).
#![no_std]

/// Names of the maps, as pinned under the bpffs root (`--bpffs-root`).
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Unassured flows (LRU): see `ct_flags::ASSURED`.
    pub const CT_NEW: &str = "CT_NEW";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const SERVICE_META: &str = "SERVICE_META";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    pub const NEIGH_MISSES: &str = "NEIGH_MISSES";
    pub const SERVICES6: &str = "SERVICES6";
    pub const BACKENDS6: &str = "BACKENDS6";
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const CT_NEW6: &str = "CT_NEW6";
    pub const AFFINITY6: &str = "AFFINITY6";
    pub const SOURCE_RANGES6: &str = "SOURCE_RANGES6";
    pub const NODE_CONFIG6: &str = "NODE_CONFIG6";
    pub const NEIGH_MISSES6: &str = "NEIGH_MISSES6";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const SOCK_REVNAT6: &str = "SOCK_REVNAT6";
    pub const SOCK_CONFIG: &str = "SOCK_CONFIG";
    pub const SOCK_UDP_BACKENDS: &str = "SOCK_UDP_BACKENDS";
    pub const SOCK_UDP_BACKENDS6: &str = "SOCK_UDP_BACKENDS6";
    pub const SYNC_IDS: &str = "SYNC_IDS";
    /// Maglev lookup tables: one array of backend ids, each Maglev frontend's table a run
    /// of it (`ServiceValue::maglev_base`, `maglev_size`). Named apart from the hash of
    /// (frontend id, slot) that held them before, whose pin an upgrade leaves unread.
    pub const MAGLEV: &str = "MAGLEV_SLOTS";
    /// Service CIDRs (ServiceCIDR objects, `--service-cidr`) and the frontend addresses
    /// allocated inside them (LPM tries): see [`service_cidr`](crate::service_cidr).
    pub const SERVICE_CIDRS: &str = "SERVICE_CIDRS";
    pub const SERVICE_CIDRS6: &str = "SERVICE_CIDRS6";
    /// Which destinations may be a frontend: see [`frontend_filter`](crate::frontend_filter).
    pub const FRONTEND_FILTER: &str = "FRONTEND_FILTER";

    /// Every map held once per family, as (IPv4 map, IPv6 twin). The other maps are
    /// shared by both families (slots, metadata, counters, config). The one place the
    /// twins are paired: the userspace catalogue and the sync read it.
    pub const FAMILY_TWINS: [(&str, &str); 11] = [
        (SERVICES, SERVICES6),
        (BACKENDS, BACKENDS6),
        (SOURCE_RANGES, SOURCE_RANGES6),
        (NODE_CONFIG, NODE_CONFIG6),
        (CONNTRACK, CONNTRACK6),
        (CT_NEW, CT_NEW6),
        (AFFINITY, AFFINITY6),
        (NEIGH_MISSES, NEIGH_MISSES6),
        (SOCK_UDP_BACKENDS, SOCK_UDP_BACKENDS6),
        (SOCK_REVNAT, SOCK_REVNAT6),
        (SERVICE_CIDRS, SERVICE_CIDRS6),
    ];

    /// `name`'s twin in the other family; `None` for a shared map.
    pub fn twin(name: &str) -> Option<&'static str> {
        FAMILY_TWINS.iter().find_map(|&(v4, v6)| {
            if v4 == name {
                Some(v6)
            } else if v6 == name {
                Some(v4)
            } else {
                None
            }
        })
    }

    /// `name` holds IPv6 addresses (it is the second of a twin pair).
    pub fn is_v6(name: &str) -> bool {
        FAMILY_TWINS.iter().any(|&(_, v6)| v6 == name)
    }

    /// The map of `name`'s role in the given family: `name` itself for its own family or
    /// a shared map, its twin otherwise (`of_family(SERVICES, true)` is `SERVICES6`).
    pub fn of_family(name: &'static str, v6: bool) -> &'static str {
        match twin(name) {
            Some(t) if is_v6(name) != v6 => t,
            _ => name,
        }
    }
}

/// Default map sizes. The agent overrides them with flags (`--max-services` ...), so these
/// are only what the ELF declares.
pub mod sizes {
    /// Frontends per family: 100,000 Services with room for NodePorts and external IPs.
    pub const MAX_SERVICES: u32 = 262_144;
    /// 100,000 Services x 10 endpoints.
    pub const MAX_BACKENDS: u32 = 1_048_576;
    pub const MAX_SLOTS: u32 = 8_388_608;
    pub const MAX_CONNTRACK: u32 = 262_144;
    pub const MAX_AFFINITY: u32 = 65_536;
    pub const MAX_SERVICE_STATS: u32 = 65_536;
    pub const MAX_SOURCE_RANGES: u32 = 16_384;
    /// Backends one service frontend can have in one slot generation.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 1 << 16;
    /// Next hops whose neighbour entry was missing, waiting for the agent to resolve them.
    pub const MAX_NEIGH_MISSES: u32 = 1024;
    /// Socket-level reverse translations (one per socket and backend it sent to), LRU.
    pub const MAX_SOCK_REVNAT: u32 = 262_144;
    /// Fragmented datagrams of translated flows in flight (first fragment seen, later ones
    /// expected), LRU per family: entries are needed for milliseconds, so a small table
    /// holds every datagram a node has in flight at once.
    pub const MAX_FRAGS: u32 = 8192;
    /// Backends picked for unconnected UDP sockets (one per socket and frontend it sends
    /// to), LRU: a socket evicted under pressure is balanced afresh on its next datagram.
    pub const MAX_SOCK_UDP_BACKENDS: u32 = 65_536;
    /// Maglev table slots, all frontends together (`--max-maglev-slots`): 64 tables of the
    /// default 16,381 slots (16 of 65,521). An array: 4 bytes per slot, allocated at load
    /// (4 MiB here).
    pub const MAX_MAGLEV_SLOTS: u32 = 1_048_576;
    /// Entries of `SERVICE_CIDRS` per family: the Service CIDRs plus one host entry per
    /// frontend address inside them (every ClusterIP, on a cluster's usual layout).
    pub const MAX_SERVICE_CIDR_ENTRIES: u32 = 262_144;
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Which traffic a frontend applies to. Pod traffic (TC on pod veths) looks up
/// `SCOPE_INTERNAL`; traffic arriving from outside the node (XDP on the uplink) looks up
/// `SCOPE_EXTERNAL`. The same VIP can have different backend sets in the two scopes
/// (externalTrafficPolicy: Local applies only to external traffic, as in kube-proxy).
pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// A port as the maps hold it (network byte order, as on the wire), from host order. Both
/// the sync (keys it compares) and the map code (keys it writes) convert through here, so
/// neither depends on the other for it.
pub const fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// A port read from a map (network byte order), in host order.
pub const fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

/// Key of `SERVICES` (IPv4) and `SERVICES6` (IPv6, [`ServiceKey6`]): one frontend (VIP or
/// node address, port, protocol, scope).
///
/// The maps that hold addresses come in one map per family, so IPv4 keeps its short keys
/// (and its per-packet cost) and IPv6 costs only its own lookups; the types are generic over
/// the address (`u32`, or `[u32; 4]` for IPv6, network byte order) so there is one
/// definition of each. Service ids, backend ids, slots, metadata and counters are shared by
/// both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A = u32> {
    /// Address, network byte order.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Service flags (`ServiceValue::flags`).
pub mod svc_flags {
    /// sessionAffinity: ClientIP; `ServiceValue::affinity_timeout` holds the timeout.
    pub const AFFINITY: u32 = 1 << 0;
    /// loadBalancerSourceRanges set: check `SOURCE_RANGES` before selecting a backend.
    pub const SOURCE_RANGES: u32 = 1 << 1;
    /// externalTrafficPolicy/internalTrafficPolicy Local applied to this entry: client
    /// address is preserved (no SNAT) and only node-local backends are in the slots.
    pub const LOCAL_ONLY: u32 = 1 << 2;
    /// Frontend is a NodePort on a node address.
    pub const NODEPORT: u32 = 1 << 3;
    /// Frontend is an ExternalIP.
    pub const EXTERNAL_IP: u32 = 1 << 4;
    /// Frontend is a LoadBalancer ingress IP.
    pub const LOADBALANCER: u32 = 1 << 5;
    /// New flows pick their backend from the frontend's Maglev table (`MAGLEV`, size
    /// `ServiceValue::maglev_size`) by a hash of their 5-tuple, so every node picks the
    /// same one; without it, at random.
    pub const MAGLEV: u32 = 1 << 6;

    /// The flags that say how a frontend is served; the others say what kind of frontend it
    /// is (which `ebpf-proxy services` shows in its TYPE column instead).
    pub const POLICY: u32 = AFFINITY | SOURCE_RANGES | LOCAL_ONLY | MAGLEV;

    /// Every flag with its name, in bit order (CLI columns, `verify`'s drift reports).
    pub const NAMES: [(u32, &str); 7] = [
        (AFFINITY, "affinity"),
        (SOURCE_RANGES, "source-ranges"),
        (LOCAL_ONLY, "local-only"),
        (NODEPORT, "nodeport"),
        (EXTERNAL_IP, "external-ip"),
        (LOADBALANCER, "loadbalancer"),
        (MAGLEV, "maglev"),
    ];

    /// Names of the flags set in `flags`, in bit order.
    pub fn names(flags: u32) -> impl Iterator<Item = &'static str> {
        NAMES.into_iter().filter_map(move |(bit, name)| (flags & bit != 0).then_some(name))
    }
}

/// Value of `SERVICES`.
///
/// Backends live in `BACKEND_SLOTS` under `(id, slot(generation, i))` for `i < count`. The agent
/// writes a complete new slot set into the generation that is *not* active, then replaces
/// this value (one atomic map update) to switch `generation` and `count`. A packet therefore sees
/// either the old or the new backend set, never a half-written one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// Frontend id: keys slots, counters, affinity and metadata. 32-bit on purpose.
    pub id: u32,
    /// Number of backends in the active slot generation. 0 = no endpoints: drop.
    pub count: u32,
    /// `svc_flags::*`.
    pub flags: u32,
    /// Active slot generation, 0 or 1.
    pub generation: u32,
    /// Session affinity timeout in seconds (with `svc_flags::AFFINITY`).
    pub affinity_timeout: u32,
    /// Slots of the frontend's Maglev table (a prime; with `svc_flags::MAGLEV`), 0 without.
    /// Was `_reserved` (always 0): the layout is unchanged.
    pub maglev_size: u32,
    /// Index in `MAGLEV` of the table's slot 0: the table is `MAGLEV[maglev_base..][..maglev_size]`,
    /// so a new flow reads one array element. 0 = no table (index 0 is never handed out). In
    /// this value, not a map of its own, so the table's place and size switch together.
    pub maglev_base: u32,
}

/// One slot of a frontend's Maglev table, as the sync names it (the map store places it at
/// `MAGLEV[maglev_base + slot]`; value: backend id). The table is rewritten in place, slot by slot (only the slots a change moves): every slot names a
/// backend of the old or the new list at every instant, and the backends a change drops are
/// deleted after the table no longer names them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub svc_id: u32,
    /// Below the frontend's `ServiceValue::maglev_size`.
    pub slot: u32,
}

/// The flow hash that indexes Maglev tables: the same on every node, in the datapath and in
/// userspace (tests, `explain`), with no per-boot seed, so a flow that an upstream router
/// moves to another node lands on the same slot there. Words are taken as they lie in the
/// packet (addresses in network order, each port in network order), so the hash depends
/// only on the bytes of the 5-tuple. A Murmur3-style mix per word and its finaliser:
/// cheap in BPF (no loops) and spread well enough for a table of 65,521 slots.
pub mod flow_hash {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    /// Fixed start value: nodes must agree, so it is a constant, not a seed.
    const SEED: u32 = 0x6d61_676c; // "magl"

    #[inline(always)]
    const fn mix(h: u32, w: u32) -> u32 {
        let k = w.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
    }

    #[inline(always)]
    const fn finish(h: u32, len: u32) -> u32 {
        fmix32(h ^ len)
    }

    /// Murmur3's 32-bit finaliser: every input bit reaches every output bit. Also what
    /// spreads the datapath's SNAT port candidates.
    #[inline(always)]
    pub const fn fmix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    /// The ports word: source port in the high half, destination in the low, each as the
    /// map stores it (network order).
    #[inline(always)]
    const fn ports(sport: u16, dport: u16) -> u32 {
        ((sport as u32) << 16) | dport as u32
    }

    /// IPv4: addresses as `u32` in network order (as the maps hold them), ports in network
    /// order.
    #[inline(always)]
    pub const fn v4(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        let mut h = mix(SEED, saddr);
        h = mix(h, daddr);
        h = mix(h, ports(sport, dport));
        h = mix(h, proto as u32);
        finish(h, 13)
    }

    /// IPv6: addresses as four `u32` words in network order (`Ipv6Words`).
    #[inline(always)]
    pub const fn v6(saddr: [u32; 4], daddr: [u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
        let mut h = mix(SEED, saddr[0]);
        h = mix(h, saddr[1]);
        h = mix(h, saddr[2]);
        h = mix(h, saddr[3]);
        h = mix(h, daddr[0]);
        h = mix(h, daddr[1]);
        h = mix(h, daddr[2]);
        h = mix(h, daddr[3]);
        h = mix(h, ports(sport, dport));
        h = mix(h, proto as u32);
        finish(h, 37)
    }
}

/// `FRONTEND_FILTER`: a bit array, written by the agent, that tells the programs which
/// destinations can be nothing of ours, so that they leave those packets (pod to pod
/// across nodes, the node's own traffic, a socket already connected to its backend) after
/// a few instructions instead of two conntrack lookups, a service lookup and a Service
/// CIDR match.
///
/// - Every (address, port, protocol) that has ever had a `SERVICES` entry since the agent
///   started has its bit set, before that entry is written; bits are never cleared while
///   it runs, so a flow that outlives its frontend keeps reaching conntrack. Collisions only
///   cost a packet the full path.
/// - Every Service CIDR sets the bit of each /16 (IPv4) or /64 (IPv6) it covers (a prefix
///   tag of its own), so an unallocated address in one still reaches the refusal; one wider
///   than `/8` or `/56` sets its family's `WIDE_*` flag instead, and that family is never
///   filtered.
/// - Every backend (address, port, protocol) has its bit as a reply's source (in a region
///   of its own) set before its `BACKENDS` entry, so `to_pod` passes what no backend sent (a
///   request arriving at a backend pod, pod-to-pod traffic) without the reply lookups.
/// - Element 0 is the header: word 0 is `IN_FORCE` once the agent has set the bits of
///   everything the maps held at its start (their frontends, backends, Service CIDRs,
///   every conntrack flow's destination and every reply's source); until then (and in a
///   copy nobody seeded) the programs take the full path for every packet.
pub mod frontend_filter {
    use crate::flow_hash::fmix32;

    /// 64-bit words per array element (4 KiB: a start writes a few hundred elements, an
    /// incremental change one or two).
    pub const BLOCK_WORDS: usize = 512;
    /// Bits per element.
    pub const BLOCK_BITS: u32 = 64 * BLOCK_WORDS as u32;
    /// Elements holding bits (1..=BLOCKS; 0 is the header).
    pub const BLOCKS: u32 = 256;
    /// 8,388,608 bits (1 MiB), in two regions of `REGION_BITS`: destinations (frontends
    /// and Service CIDR prefixes) first, then replies' sources (backends). Apart, so that
    /// a million backends cannot fill the bits new flows are filtered by: at 100,000
    /// Services of 10 endpoints in both families (400,000 frontends, 2,000,000 backends)
    /// about 9% of the destination bits are set.
    pub const BITS: u32 = BLOCKS * BLOCK_BITS;
    pub const REGION_BITS: u32 = BITS / 2;
    /// The map's `max_entries`.
    pub const ENTRIES: u32 = BLOCKS + 1;
    /// Header word 0 when the filter is in force ("fflt", version 1).
    pub const IN_FORCE: u64 = 0x6666_6c74_0000_0001;
    /// Header word 1: an IPv4 Service CIDR too wide to list its /16s: IPv4 is not filtered.
    pub const WIDE_V4: u64 = 1;
    /// Header word 1: the same for IPv6 (wider than /56).
    pub const WIDE_V6: u64 = 2;
    /// The widest Service CIDRs whose /16s (/64s) are listed, at most 256 each.
    pub const MIN_PREFIX_V4: u8 = 8;
    pub const MIN_PREFIX_V6: u8 = 56;

    /// One array element: the header, or `BLOCK_BITS` bits.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Block {
        pub words: [u64; BLOCK_WORDS],
    }

    impl Default for Block {
        fn default() -> Self {
            Block { words: [0; BLOCK_WORDS] }
        }
    }

    /// Keeps (port, protocol) words apart from prefix words.
    const PORT_TAG: u32 = 0x8000_0000;
    const PREFIX4_TAG: u32 = 0x4000_0000;
    const PREFIX6_TAG: u32 = 0x2000_0000;
    const REPLY_TAG: u32 = 0x1000_0000;

    /// Where bit `bit` lives: (array element, word in it, mask).
    #[inline(always)]
    pub const fn place(bit: u32) -> (u32, usize, u64) {
        (1 + bit / BLOCK_BITS, ((bit / 64) % BLOCK_WORDS as u32) as usize, 1u64 << (bit % 64))
    }

    #[inline(always)]
    const fn port_word(port: u16, proto: u8) -> u32 {
        PORT_TAG | ((proto as u32) << 16) | port as u32
    }

    #[inline(always)]
    const fn v4(addr: u32, word: u32) -> u32 {
        fmix32(addr ^ fmix32(word)) % REGION_BITS
    }

    /// The four words folded by rotations into one, then mixed as IPv4's: what differs
    /// between two addresses (mostly the low words) still differs in the fold, and IPv6
    /// costs one hash like IPv4 (a collision only costs a packet the full path).
    #[inline(always)]
    const fn v6(a: [u32; 4], word: u32) -> u32 {
        v4(a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24), word)
    }

    /// The bit of an IPv4 frontend: address and port in network order, as the maps hold them.
    #[inline(always)]
    pub const fn frontend_v4(addr: u32, port: u16, proto: u8) -> u32 {
        v4(addr, port_word(port, proto))
    }

    /// The bit of an IPv6 frontend (`Ipv6Words`, network order).
    #[inline(always)]
    pub const fn frontend_v6(a: [u32; 4], port: u16, proto: u8) -> u32 {
        v6(a, port_word(port, proto))
    }

    /// The bit of an IPv4 backend as the source of a reply (network order).
    #[inline(always)]
    pub const fn reply_v4(addr: u32, port: u16, proto: u8) -> u32 {
        REGION_BITS + v4(addr, REPLY_TAG | port_word(port, proto))
    }

    /// The bit of an IPv6 backend as the source of a reply.
    #[inline(always)]
    pub const fn reply_v6(a: [u32; 4], port: u16, proto: u8) -> u32 {
        REGION_BITS + v6(a, REPLY_TAG | port_word(port, proto))
    }

    /// The bit of the /16 holding an IPv4 address (network order).
    #[inline(always)]
    pub const fn prefix_v4(addr: u32) -> u32 {
        prefix16(u32::from_be(addr) >> 16)
    }

    /// The bit of a /16, given as the address's top 16 bits (host order).
    #[inline(always)]
    pub const fn prefix16(top: u32) -> u32 {
        fmix32(PREFIX4_TAG | top) % REGION_BITS
    }

    /// The bit of the /64 holding an IPv6 address (`Ipv6Words`, network order).
    #[inline(always)]
    pub const fn prefix_v6(a: [u32; 4]) -> u32 {
        prefix64(((u32::from_be(a[0]) as u64) << 32) | u32::from_be(a[1]) as u64)
    }

    /// The bit of a /64, given as the address's top 64 bits (host order).
    #[inline(always)]
    pub const fn prefix64(top: u64) -> u32 {
        fmix32(PREFIX6_TAG ^ fmix32((top >> 32) as u32) ^ (top as u32).rotate_left(7)) % REGION_BITS
    }
}

/// Key of `BACKEND_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    /// `generation << 31 | index`, see [`SlotKey::new`].
    pub slot: u32,
}

impl SlotKey {
    #[inline(always)]
    pub const fn new(svc_id: u32, generation: u32, index: u32) -> Self {
        SlotKey { svc_id, slot: ((generation & 1) << 31) | (index & 0x7fff_ffff) }
    }
    pub const fn generation(&self) -> u32 {
        self.slot >> 31
    }
    pub const fn index(&self) -> u32 {
        self.slot & 0x7fff_ffff
    }
}

/// Backend flags (`Backend::flags`).
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
    /// The endpoint is serving but terminating (used only as kube-proxy's fallback).
    pub const TERMINATING: u8 = 1 << 1;
}

/// Value of `BACKENDS` (key: backend id, `u32`). One entry per distinct
/// (address, port, protocol); services share them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend<A = u32> {
    /// Address, network byte order (IPv6 backends live in `BACKENDS6`).
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Direction of a conntrack entry.
pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Key of `CONNTRACK`: the packet's 5-tuple as seen where the lookup happens, plus the
/// direction. Forward entries are keyed by the client's original packet (client -> VIP),
/// reply entries by the backend's reply as it arrives (backend -> client).
///
/// Generic over the address type so IPv6 (`[u32; 4]`, see [`CtKey6`]) shares the layout
/// rules and the state logic of [`ct`] instead of copying them; `u32` (IPv4) is the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CtKey<A = u32> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// IPv6 conntrack key (40 bytes): same fields, 16-byte addresses in network byte order.
pub type CtKey6 = CtKey<[u32; 4]>;

impl<A: Copy> CtKey<A> {
    /// Key of the reply entry that belongs to this forward entry (`self` with value `v`):
    /// backend -> client, or backend -> SNAT address:port for a source-NATed flow.
    #[inline(always)]
    pub fn reply_of_forward(&self, v: &CtValue<A>) -> CtKey<A> {
        let (dst, dport) =
            if v.flags & ct_flags::SNAT != 0 { (v.snat_addr, v.snat_port) } else { (self.src_addr, self.src_port) };
        CtKey {
            src_addr: v.nat_addr,
            dst_addr: dst,
            src_port: v.nat_port,
            dst_port: dport,
            proto: self.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        }
    }

    /// Whether the reply entry value `rv` is this forward entry's partner (`self` is the
    /// forward key): its reverse translation leads back to this client and frontend. A
    /// reply tuple found under a forward entry's reply key may belong to another flow (a
    /// clash refused at creation, a reused SNAT port): it is never deleted on this flow's
    /// behalf.
    #[inline(always)]
    pub fn reply_belongs(&self, rv: &CtValue<A>) -> bool
    where
        A: PartialEq,
    {
        let client_ok =
            rv.flags & ct_flags::SNAT == 0 || (rv.snat_addr == self.src_addr && rv.snat_port == self.src_port);
        client_ok && rv.nat_addr == self.dst_addr && rv.nat_port == self.dst_port
    }

    /// Key of the forward entry this reply entry (`self` with value `v`) belongs to. A
    /// source-NATed flow's client is not the reply's destination (that is our SNAT
    /// address): the reply entry remembers it.
    #[inline(always)]
    pub fn forward_of_reply(&self, v: &CtValue<A>) -> CtKey<A> {
        let (client, client_port) =
            if v.flags & ct_flags::SNAT != 0 { (v.snat_addr, v.snat_port) } else { (self.dst_addr, self.dst_port) };
        CtKey {
            src_addr: client,
            dst_addr: v.nat_addr,
            src_port: client_port,
            dst_port: v.nat_port,
            proto: self.proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        }
    }
}

/// Conntrack flags (`CtValue::flags`). The connection state is derived from them by
/// [`ct::state`]; they are only ever set, never cleared, until the entry is replaced.
pub mod ct_flags {
    /// A TCP FIN or RST was seen in either direction: a SYN on this tuple now opens a new
    /// connection (the reopen rule).
    pub const CLOSING: u8 = 1 << 0;
    /// The flow was also source-NATed (north-south to a remote backend, or hairpin).
    pub const SNAT: u8 = 1 << 1;
    /// The backend has answered (in a reply entry: this direction has sent a packet, so its
    /// `seq_end` is known).
    pub const SEEN_REPLY: u8 = 1 << 2;
    /// The client sent a FIN.
    pub const FIN_FWD: u8 = 1 << 3;
    /// The backend sent a FIN.
    pub const FIN_REV: u8 = 1 << 4;
    /// Either side sent a RST.
    pub const RST: u8 = 1 << 5;
    /// netfilter's "assured": TCP once the handshake completed (the client acknowledged the
    /// backend's SYN-ACK, or data flowed both ways for a flow picked up mid-stream); UDP once
    /// it is a stream (traffic after a reply, 2 s or more after the first packet). Assured
    /// flows live in `CONNTRACK`, which never evicts; the others in `CT_NEW`, an LRU.
    pub const ASSURED: u8 = 1 << 6;
    /// The flow was opened by a client SYN (not picked up mid-stream).
    pub const SYN: u8 = 1 << 7;
}

/// Value of `CONNTRACK` and `CT_NEW`.
///
/// Forward entry: rewrite the destination to `nat_addr:nat_port` (the backend).
/// Reply entry: rewrite the source to `nat_addr:nat_port` (the VIP the client used).
/// When `ct_flags::SNAT` is set, `snat_addr:snat_port` is the other half of the
/// translation (north-south to a remote backend, hairpin).
///
/// The forward entry is the authority on the connection's state (`flags`); the reply
/// entry lives and dies with it (see [`ct`] and the agent's conntrack GC). `ifindex` and
/// `seq_end` belong to the entry's own direction: where its packets come from and how far
/// its TCP sequence numbers have gone, which is what anti-spoofing checks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue<A = u32> {
    pub nat_addr: A,
    pub nat_port: u16,
    pub flags: u8,
    /// [`ct::SEQ_UNKNOWN`] or 0.
    pub seq_flags: u8,
    pub snat_addr: A,
    pub snat_port: u16,
    /// Forward entry of a direct-server-return flow (`dsr::FLOW`, else 0): forwarded to
    /// its remote backend without source NAT, the frontend carried in an IP option (see
    /// [`dsr`]); its replies never come back through this node.
    pub dsr: u8,
    pub _pad2: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    /// `bpf_ktime_get_ns()` when the entry was created or last refreshed (at most once a
    /// second per entry, so established flows do not write a shared cache line per packet).
    pub last_seen: u64,
    /// Where this direction's packets enter: the pod interface's ifindex (a forward entry
    /// made on `from_pod`), [`ct::IFINDEX_UPLINK`] (any uplink: made by `from_uplink`), or
    /// for a reply entry the interface the backend's first answer came in on; 0 = not
    /// known yet (learnt from the next packet). A packet arriving elsewhere is invalid.
    pub ifindex: u32,
    /// TCP: the sequence number just past the furthest segment this direction sent (SYN and
    /// FIN count one), host byte order. RST and FIN are accepted only near it.
    pub seq_end: u32,
    /// `ct::coarse_ms(bpf_ktime_get_ns())` when the flow was created (UDP stream rule).
    pub created: u32,
    pub _pad3: u32,
}

/// IPv6 conntrack value (72 bytes).
pub type CtValue6 = CtValue<[u32; 4]>;

/// The conntrack lifecycle, shared by the datapath (which sets the flags) and the agent's
/// garbage collector (which expires entries): one definition of what a state is and how
/// long an idle flow in it lives.
pub mod ct {
    use super::{PROTO_TCP, ct_flags};

    /// `CtValue::ifindex` of a forward entry made on an uplink: its packets may arrive on any
    /// uplink (ECMP, a bond's members), never on a pod interface.
    pub const IFINDEX_UPLINK: u32 = u32::MAX;

    /// How far (bytes, either way) a RST's or FIN's sequence number may be from the
    /// direction's `seq_end` to be believed (RFC 5961's idea; a stack sends its RST at
    /// exactly `snd_nxt`, which is `seq_end`). An off-path attacker has to hit a 128 KiB
    /// window in 4 GiB.
    pub const SEQ_SLACK: u32 = 1 << 16;

    /// How far ahead of `seq_end` a segment may start and still move it. Segments of one
    /// stream can reach the hooks out of order (GSO packets of up to 64 KiB handled on
    /// several CPUs): a bound as tight as `SEQ_SLACK` would leave `seq_end` behind for good
    /// once it lagged by more than 64 KiB, and the stream's FIN would then be refused. A
    /// spoofed data segment moves the window only if it lands within 16 MiB ahead (1 in
    /// 256 blind tries), and still needs a RST of its own after it.
    pub const SEQ_ADVANCE: u32 = 1 << 24;

    /// netfilter's UDP stream rule: traffic after a reply makes a flow assured only once it
    /// is this old (a DNS-like exchange of two queries and two answers stays unassured).
    pub const UDP_STREAM_AFTER_MS: u32 = 2_000;

    /// A 32-bit clock in units of 2^20 ns (about a millisecond), for `CtValue::created`.
    #[inline(always)]
    pub const fn coarse_ms(ns: u64) -> u32 {
        (ns >> 20) as u32
    }

    /// `CtValue::seq_flags`: this entry's `seq_end` is not known (an entry carried over from
    /// a version that did not track sequence numbers): its next segment sets it, and until
    /// then a RST or FIN is believed as before.
    pub const SEQ_UNKNOWN: u8 = 1;

    /// `UDP_STREAM_AFTER_MS` in `coarse_ms` units.
    pub const UDP_STREAM_AFTER: u32 = coarse_ms(UDP_STREAM_AFTER_MS as u64 * 1_000_000);

    /// Is `seq` within `SEQ_SLACK` of `end` (modulo 2^32)?
    #[inline(always)]
    pub const fn seq_near(seq: u32, end: u32) -> bool {
        let d = seq.wrapping_sub(end) as i32;
        d >= -(SEQ_SLACK as i32) && d <= SEQ_SLACK as i32
    }

    /// Connection state derived from `CtValue::flags` (netfilter's names in [`CtState::label`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum CtState {
        /// Opened, no reply yet (TCP SYN_SENT; UDP unreplied). Unassured: evicted first.
        New,
        /// Answered but not assured: TCP SYN_RECV (handshake not completed), UDP replied but
        /// not yet a stream. Unassured: evicted first.
        Replied,
        /// Assured: TCP ESTABLISHED, UDP stream. Never evicted, only expired.
        Established,
        /// TCP: one side sent a FIN (half-closed; kube-proxy's CLOSE_WAIT timeout applies).
        Closing,
        /// TCP: FIN from both sides, or a RST. Removed after a short grace period, or at
        /// once when the table is under pressure.
        Closed,
    }

    impl CtState {
        pub const ALL: [CtState; 5] =
            [CtState::New, CtState::Replied, CtState::Established, CtState::Closing, CtState::Closed];

        pub const fn name(self) -> &'static str {
            match self {
                CtState::New => "new",
                CtState::Replied => "replied",
                CtState::Established => "established",
                CtState::Closing => "closing",
                CtState::Closed => "closed",
            }
        }

        /// The state as netfilter (`conntrack -L`) names it for protocol `proto`.
        pub const fn label(self, proto: u8) -> &'static str {
            if proto == PROTO_TCP {
                match self {
                    CtState::New => "SYN_SENT",
                    CtState::Replied => "SYN_RECV",
                    CtState::Established => "ESTABLISHED",
                    CtState::Closing => "CLOSE_WAIT",
                    CtState::Closed => "CLOSE",
                }
            } else {
                match self {
                    CtState::New => "UNREPLIED",
                    CtState::Replied => "REPLIED",
                    _ => "ASSURED",
                }
            }
        }

        /// Unassured states: their flows live in the evicting table.
        pub const fn unassured(self) -> bool {
            matches!(self, CtState::New | CtState::Replied)
        }
    }

    /// The state of a flow of protocol `proto` whose forward entry carries `flags`.
    #[inline(always)]
    pub const fn state(proto: u8, flags: u8) -> CtState {
        if proto == PROTO_TCP {
            let both_fin = ct_flags::FIN_FWD | ct_flags::FIN_REV;
            if flags & ct_flags::RST != 0 || flags & both_fin == both_fin {
                return CtState::Closed;
            }
            if flags & ct_flags::CLOSING != 0 {
                return CtState::Closing;
            }
        }
        if flags & ct_flags::ASSURED != 0 {
            CtState::Established
        } else if flags & ct_flags::SEEN_REPLY != 0 {
            CtState::Replied
        } else {
            CtState::New
        }
    }

    /// Flags a TCP segment with `tcp_flags` (FIN 0x01, RST 0x04) adds to its flow, seen in
    /// direction `reply` (from the backend) or not.
    #[inline(always)]
    pub const fn tcp_flags_to_ct(tcp_flags: u8, reply: bool) -> u8 {
        let mut f = 0;
        if tcp_flags & 0x04 != 0 {
            f |= ct_flags::RST | ct_flags::CLOSING;
        }
        if tcp_flags & 0x01 != 0 {
            f |= ct_flags::CLOSING | if reply { ct_flags::FIN_REV } else { ct_flags::FIN_FWD };
        }
        f
    }

    /// Idle timeouts per state, in seconds. Defaults follow kube-proxy's conntrack settings
    /// where it has one (`--conntrack-tcp-timeout-established` 24h,
    /// `--conntrack-tcp-timeout-close-wait` 1h) and the kernel's otherwise (UDP 30 s
    /// unreplied or replied / 120 s stream, SYN 60 s as Cilium); closed TCP flows 10 s like
    /// Cilium's `bpf-ct-timeout-regular-tcp-fin`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CtTimeouts {
        pub tcp_syn: u32,
        pub tcp_established: u32,
        pub tcp_close_wait: u32,
        pub tcp_closed: u32,
        pub udp: u32,
        pub udp_stream: u32,
    }

    impl Default for CtTimeouts {
        fn default() -> Self {
            CtTimeouts {
                tcp_syn: 60,
                tcp_established: 86_400,
                tcp_close_wait: 3_600,
                tcp_closed: 10,
                udp: 30,
                udp_stream: 120,
            }
        }
    }

    impl CtTimeouts {
        /// How long a flow of `proto` in `state` may stay idle, in nanoseconds.
        pub const fn idle_ns(&self, proto: u8, state: CtState) -> u64 {
            let s = if proto == PROTO_TCP {
                match state {
                    CtState::New | CtState::Replied => self.tcp_syn,
                    CtState::Established => self.tcp_established,
                    CtState::Closing => self.tcp_close_wait,
                    CtState::Closed => self.tcp_closed,
                }
            } else {
                // UDP, SCTP and anything else without a state machine of ours.
                match state {
                    CtState::New | CtState::Replied => self.udp,
                    _ => self.udp_stream,
                }
            };
            s as u64 * 1_000_000_000
        }
    }
}

/// Key of `AFFINITY` (and `AFFINITY6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey<A = u32> {
    pub client_addr: A,
    pub svc_id: u32,
}

/// An IPv6 address as the maps store it: four words in network byte order.
pub type Ipv6Words = [u32; 4];
pub type ServiceKey6 = ServiceKey<Ipv6Words>;
pub type Backend6 = Backend<Ipv6Words>;
pub type AffinityKey6 = AffinityKey<Ipv6Words>;

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used: u64,
}

/// What the datapath did with a packet: counted once per packet, per service
/// (`SERVICE_STATS`) when the packet belonged to one and node-wide (`GLOBAL_STATS`, indexed by
/// [`StatsFamily::index`]). One enum with its names, so counters and their labels cannot drift.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// New flow: backend selected, destination NATed.
    NewFlow = 0,
    /// Packet of a tracked flow, destination NATed.
    Established = 1,
    /// Reply of a tracked flow, source rewritten back to the frontend.
    ReverseNat = 2,
    /// Service has no backends: rejected (XDP: TCP reset) or dropped.
    NoBackend = 3,
    /// Not service traffic: passed untouched.
    Pass = 4,
    /// Not IPv4 or IPv6 (ARP, VLAN-tagged, ...): passed untouched.
    NotIp = 5,
    /// Truncated or malformed header, or lengths that do not add up: passed untouched for
    /// the kernel to judge.
    Malformed = 6,
    /// A later fragment (IPv4 offset > 0, or an IPv6 fragment header with offset > 0) whose
    /// first fragment was not translated here, or a fragment of a protocol other than
    /// TCP/UDP/SCTP: passed untouched (it has no ports of its own to match). Fragments of
    /// translated flows get their flow's verdict.
    Fragment = 7,
    /// Source address not in loadBalancerSourceRanges: dropped.
    SourceRangeDrop = 8,
    /// A map write or checksum helper failed: dropped.
    Error = 9,
    /// Protocol other than TCP/UDP/SCTP: passed untouched.
    OtherL4 = 10,
    /// XDP could not forward a translated packet: no route, TTL expired, or the next hop's
    /// neighbour entry is not resolved yet (queued in `NEIGH_MISSES` for the agent). Dropped.
    NoRoute = 11,
    /// A new flow found the conntrack table full (every entry live: established flows are
    /// never evicted to make room). Dropped; the agent's GC is woken to reclaim space.
    CtFull = 12,
    /// An ICMP error (destination unreachable — fragmentation needed / packet too big
    /// included —, time exceeded, parameter problem) about a tracked flow: the quoted packet
    /// and the outer header translated the way the flow's own packets are.
    IcmpError = 13,
    /// Socket-level load balancing: a `connect()` or unconnected `sendmsg()` to a frontend
    /// was given a backend address before any packet existed (cgroup sock_addr hooks).
    /// Counted once per call; `bytes` stays 0.
    SockTranslate = 14,
    /// A packet conntrack refused, as netfilter's INVALID (which kube-proxy drops): a
    /// tracked flow's packet arriving on another interface than the flow's side (a pod
    /// spoofing someone else's tuple), or a RST/FIN whose sequence number is outside the
    /// window the flow last saw. Dropped; the flow is left as it was.
    CtInvalid = 15,
    /// A new flow whose reply tuple is already another flow's (one client port towards two
    /// frontends that share a backend): refused (dropped) rather than stealing the other
    /// flow's replies.
    CtClash = 16,
    /// A new SCTP flow whose packets would need a port rewritten (a targetPort other than
    /// the frontend's port, or the source port of a source-NATed NodePort flow): SCTP's
    /// CRC32c covers the ports and is not updated here, so the receiver would drop the
    /// packet. Refused (dropped) and counted instead of silently broken; the agent warns
    /// about the Service.
    SctpPortNat = 17,
    /// Direct server return, on the backend's node: a packet from an uplink carrying the
    /// frontend in a DSR option (put there by the node the client reached) created the flow
    /// whose replies leave from that frontend straight to the client. Passed on to the pod.
    Dsr = 18,
    /// Direct server return, on the node the client reached: a packet that would exceed the
    /// uplink's MTU once the DSR option is added. Answered with ICMP fragmentation needed
    /// (RFC 1191) advertising the MTU less the option, so the client's path MTU shrinks.
    DsrTooBig = 19,
    /// A new flow from a pod or the uplink to an address inside a Service CIDR that no
    /// frontend holds (no `SERVICES` entry for the address, any port): refused as a flow to a
    /// Service without endpoints is (TCP reset, ICMP unreachable), instead of leaking to the
    /// default route (KEP-1880).
    UnallocatedServiceIp = 20,
    /// A new flow from a pod (or a node process, socket level) to a ClusterIP inside a
    /// Service CIDR on a port or protocol the Service does not serve: refused (TCP reset,
    /// ICMP unreachable; ECONNREFUSED at the socket level), as kube-proxy's nftables mode.
    ClusterIpUnknownPort = 21,
}

impl Verdict {
    pub const COUNT: u32 = 22;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Verdict::NewFlow,
        Verdict::Established,
        Verdict::ReverseNat,
        Verdict::NoBackend,
        Verdict::Pass,
        Verdict::NotIp,
        Verdict::Malformed,
        Verdict::Fragment,
        Verdict::SourceRangeDrop,
        Verdict::Error,
        Verdict::OtherL4,
        Verdict::NoRoute,
        Verdict::CtFull,
        Verdict::IcmpError,
        Verdict::SockTranslate,
        Verdict::CtInvalid,
        Verdict::CtClash,
        Verdict::SctpPortNat,
        Verdict::Dsr,
        Verdict::DsrTooBig,
        Verdict::UnallocatedServiceIp,
        Verdict::ClusterIpUnknownPort,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::NewFlow => "new_flow",
            Verdict::Established => "established",
            Verdict::ReverseNat => "reverse_nat",
            Verdict::NoBackend => "no_backend",
            Verdict::Pass => "pass",
            Verdict::NotIp => "not_ip",
            Verdict::Malformed => "malformed",
            Verdict::Fragment => "fragment",
            Verdict::SourceRangeDrop => "source_range_drop",
            Verdict::Error => "error",
            Verdict::OtherL4 => "other_l4",
            Verdict::NoRoute => "no_route",
            Verdict::CtFull => "ct_full",
            Verdict::IcmpError => "icmp_error",
            Verdict::SockTranslate => "sock_translate",
            Verdict::CtInvalid => "ct_invalid",
            Verdict::CtClash => "ct_clash",
            Verdict::SctpPortNat => "sctp_port_nat",
            Verdict::Dsr => "dsr",
            Verdict::DsrTooBig => "dsr_too_big",
            Verdict::UnallocatedServiceIp => "unallocated_service_ip",
            Verdict::ClusterIpUnknownPort => "cluster_ip_unknown_port",
        }
    }

    /// The verdict stored under map index `v` (None for an index this build does not know).
    pub const fn from_index(v: u32) -> Option<Verdict> {
        if v < Self::COUNT { Some(Self::ALL[v as usize]) } else { None }
    }
}

/// The verdicts as the `u32` map indices stored in `StatsKey` and `GLOBAL_STATS`: derived
/// from [`Verdict`], so they cannot drift from it.
pub mod verdict {
    use super::Verdict;
    pub const NEW_FLOW: u32 = Verdict::NewFlow as u32;
    pub const ESTABLISHED: u32 = Verdict::Established as u32;
    pub const REVERSE_NAT: u32 = Verdict::ReverseNat as u32;
    pub const NO_BACKEND: u32 = Verdict::NoBackend as u32;
    pub const PASS: u32 = Verdict::Pass as u32;
    pub const NOT_IP: u32 = Verdict::NotIp as u32;
    pub const MALFORMED: u32 = Verdict::Malformed as u32;
    pub const FRAGMENT: u32 = Verdict::Fragment as u32;
    pub const SOURCE_RANGE_DROP: u32 = Verdict::SourceRangeDrop as u32;
    pub const ERROR: u32 = Verdict::Error as u32;
    pub const OTHER_L4: u32 = Verdict::OtherL4 as u32;
    pub const NO_ROUTE: u32 = Verdict::NoRoute as u32;
    pub const CT_FULL: u32 = Verdict::CtFull as u32;
    pub const ICMP_ERROR: u32 = Verdict::IcmpError as u32;
    pub const SOCK_TRANSLATE: u32 = Verdict::SockTranslate as u32;
    pub const CT_INVALID: u32 = Verdict::CtInvalid as u32;
    pub const CT_CLASH: u32 = Verdict::CtClash as u32;
    pub const SCTP_PORT_NAT: u32 = Verdict::SctpPortNat as u32;
    pub const DSR: u32 = Verdict::Dsr as u32;
    pub const DSR_TOO_BIG: u32 = Verdict::DsrTooBig as u32;
    pub const UNALLOCATED_SERVICE_IP: u32 = Verdict::UnallocatedServiceIp as u32;
    pub const CLUSTER_IP_UNKNOWN_PORT: u32 = Verdict::ClusterIpUnknownPort as u32;
    pub const COUNT: u32 = Verdict::COUNT;
    /// Room per family in `GLOBAL_STATS`, more than `COUNT` so that a verdict added later
    /// keeps every existing index (the map migrates index by index).
    pub const STRIDE: u32 = 32;
    const _: () = assert!(COUNT <= STRIDE);
}

/// The address family a node-wide counter is kept under: `GLOBAL_STATS` holds one block of
/// [`verdict::STRIDE`] verdicts per family, so `ebpf-proxy stats` and the metrics can say
/// whether IPv4 or IPv6 traffic is being dropped. A service's own counters need no family:
/// a frontend has one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatsFamily {
    /// Neither family: a frame that is not IPv4/IPv6 or too short to tell (`not_ip`,
    /// `malformed` before the IP header). Also where counts of a `GLOBAL_STATS` pinned
    /// before the per-family layout land when migrated: its flat indices are this block's.
    Other = 0,
    Ipv4 = 1,
    Ipv6 = 2,
}

impl StatsFamily {
    pub const COUNT: u32 = 3;
    pub const ALL: [StatsFamily; Self::COUNT as usize] = [StatsFamily::Other, StatsFamily::Ipv4, StatsFamily::Ipv6];

    /// The `family` label of the datapath metrics and the CLI's FAMILY column, spelled as
    /// the agent's other per-family metrics (Kubernetes' `IPv4`/`IPv6`).
    pub const fn name(self) -> &'static str {
        match self {
            StatsFamily::Other => "other",
            StatsFamily::Ipv4 => "IPv4",
            StatsFamily::Ipv6 => "IPv6",
        }
    }

    /// The `GLOBAL_STATS` index of `verdict` counted under this family.
    pub const fn index(self, verdict: u32) -> u32 {
        self as u32 * verdict::STRIDE + verdict
    }
}

/// Entries of `GLOBAL_STATS`: every family's block of verdicts.
pub const GLOBAL_STATS_LEN: u32 = StatsFamily::COUNT * verdict::STRIDE;

/// Key of `SERVICE_STATS` (per-CPU hash).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatsKey {
    pub svc_id: u32,
    pub verdict: u32,
}

/// Value of `SERVICE_STATS` and `GLOBAL_STATS` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Kind of frontend, stored in `SERVICE_META` for the CLI.
pub mod frontend_kind {
    pub const CLUSTER_IP: u8 = 0;
    pub const NODE_PORT: u8 = 1;
    pub const EXTERNAL_IP: u8 = 2;
    pub const LOAD_BALANCER: u8 = 3;
}

pub const META_NAMESPACE_LEN: usize = 64;
pub const META_NAME_LEN: usize = 64;
pub const META_PORT_NAME_LEN: usize = 16;

/// Value of `SERVICE_META` (key: service id). Written by the agent, read only by the CLI
/// and by a restarting agent, so names survive without asking the API. Kubernetes limits
/// namespace and service names to 63 bytes and port names to 15, hence the sizes
/// (NUL-padded).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceMeta {
    pub namespace: [u8; META_NAMESPACE_LEN],
    pub name: [u8; META_NAME_LEN],
    pub port_name: [u8; META_PORT_NAME_LEN],
    pub kind: u8,
    pub _pad: [u8; 7],
}

/// Key of `SOURCE_RANGES` (LPM trie): prefix length counts the bits after `svc_id`,
/// so one trie holds the ranges of every service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// 32 (svc_id) + prefix bits of `addr`.
    pub prefix_len: u32,
    /// Big-endian service id, so it forms the leading bits of the LPM key.
    pub svc_id_be: u32,
    /// Network byte order.
    pub addr: u32,
}

/// Defaults of [`NodeConfig`] when the agent has not written it (and for `--snat-port-range`).
pub mod nat_defaults {
    /// Source ports for SNAT (north-south to a remote backend, hairpin): below both the
    /// kernel's default `ip_local_port_range` (32768-60999), so they never collide with the
    /// node's own connections, and the default NodePort range (30000-32767), so NodePort
    /// traffic never pays the uplink's reply lookup; above the privileged ports. 28,976
    /// ports per backend ip:port, where netfilter would use the whole port space.
    pub const SNAT_PORT_MIN: u16 = 1024;
    pub const SNAT_PORT_MAX: u16 = 29999;
    /// Source a pod sees when it reaches itself through its own service (hairpin). Link-local
    /// and routed by the pod's default route back to its host-side veth; 169.254.1.1 is
    /// taken by the CNI gateway in Calico-like setups, so another one.
    pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];
    /// The IPv6 hairpin source: a unique-local address (RFC 4193) no cluster routes, so a pod
    /// answers it through its default route, back to its veth, like the IPv4 one.
    pub const HAIRPIN_ADDR6: [u8; 16] = [0xfd, 0x65, 0x62, 0x70, 0x66, 0x2d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
}

/// Value of `NODE_CONFIG` (array, one entry, index 0): node facts the datapath needs,
/// written by the agent at start-up and whenever the Node changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeConfig {
    /// Address remote-backend flows are source-NATed to (network byte order); 0 = the
    /// address the packet was sent to.
    pub snat_addr: u32,
    /// Hairpin source address (network byte order); 0 = hairpin SNAT disabled.
    pub hairpin_addr: u32,
    /// SNAT source-port range, inclusive, **host** byte order (used for arithmetic); 0 =
    /// the `nat_defaults`.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `--lb-mode` ([`lb_mode`]): how north-south flows reach a backend on another node.
    pub lb_mode: u8,
    pub _reserved: [u8; 3],
}

/// `NodeConfig::lb_mode`: how a north-south flow (NodePort, ExternalIP, LoadBalancer) to a
/// backend on another node travels. Local backends and `externalTrafficPolicy: Local` need
/// neither: the client address is kept and replies leave from this node anyway.
pub mod lb_mode {
    use super::PROTO_UDP;
    /// Source NAT to this node (kube-proxy's behaviour): replies come back through it.
    pub const SNAT: u8 = 0;
    /// Direct server return for every protocol: the frontend travels in an IP option, the
    /// backend's node answers the client directly from it.
    pub const DSR: u8 = 1;
    /// DSR for TCP, SNAT for UDP (Cilium's `hybrid`): a UDP datagram would carry the option
    /// on every packet (cost per packet, and MTU), a TCP flow only on its SYN.
    pub const HYBRID: u8 = 2;

    /// Does a flow of `proto` use DSR under `mode`?
    pub const fn dsr_for(mode: u8, proto: u8) -> bool {
        mode == DSR || (mode == HYBRID && proto != PROTO_UDP)
    }
}

/// Direct server return on the wire: the frontend (VIP:port) a client used, carried to the
/// backend's node.
///
/// - IPv4: an option, 8 bytes right after the fixed header, so IHL becomes 7. The option
///   type is RFC 4727's experimental one with the copy bit set (0x9e: copied into
///   fragments, class 0, number 30), so no standard option is shadowed; a kernel ignores an
///   option type it does not know on received packets and never echoes it in its answers.
/// - IPv6: a Destination Options header of 24 bytes right after the fixed header (before
///   any other extension header): next header, length 2 (3 x 8 bytes), one option of type
///   0x1e (RFC 4727's experimental type whose top bits 00 say "skip if unknown", so the pod
///   that receives it ignores it) holding the port and the address, then a 2-byte PadN.
///   A forwarding node never reads destination options; only the final destination does.
pub mod dsr {
    /// `CtValue::dsr` of a forward entry made for a DSR flow.
    pub const FLOW: u8 = 1;
    pub const OPT4_TYPE: u8 = 0x9e;
    /// Type, length, port (network order), IPv4 address (network order).
    pub const OPT4_LEN: u8 = 8;
    /// The whole Destination Options header IPv6 DSR inserts.
    pub const EXT6_LEN: usize = 24;
    /// The header's length field: 8-byte units beyond the first 8.
    pub const EXT6_HDR_LEN: u8 = (EXT6_LEN / 8 - 1) as u8;
    pub const OPT6_TYPE: u8 = 0x1e;
    /// The option's data: port (network order), IPv6 address (network order).
    pub const OPT6_DATA_LEN: u8 = 18;
    /// The option's place in the header (after next header and length), and the PadN
    /// (type 1, no data) that fills the header to `EXT6_LEN`.
    pub const OPT6_OFF: usize = 2;
    pub const PADN: u8 = 1;
}

/// Value of `NODE_CONFIG6` (array, one entry): the IPv6 node facts; the SNAT port range is
/// `NodeConfig`'s, shared by both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeConfig6 {
    /// Address remote-backend flows are source-NATed to; all zero = the address the packet
    /// was sent to.
    pub snat_addr: Ipv6Words,
    /// Hairpin source address; all zero = hairpin SNAT disabled for IPv6.
    pub hairpin_addr: Ipv6Words,
}

/// Key of `NEIGH_MISSES` (LRU hash, value: `bpf_ktime_get_ns()` of the miss): a next hop
/// `bpf_fib_lookup` found no neighbour entry for. XDP cannot resolve neighbours; the agent
/// asks the kernel to (`NTF_USE`) and deletes the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighKey<A = u32> {
    pub ifindex: u32,
    /// Next-hop address, network byte order (IPv6 misses go to `NEIGH_MISSES6`).
    pub addr: A,
}

pub type NeighKey6 = NeighKey<Ipv6Words>;

/// Key data of `SOURCE_RANGES6` (LPM trie, prefix length before it): the big-endian service
/// id, then the IPv6 source prefix, so one trie holds every service's ranges.
pub type SourceRangeData6 = [u32; 5];

/// Key of `SOCK_REVNAT` (LRU hash): a socket (its cookie, unique for the boot) and the
/// backend the socket-level hooks sent it to. `recvmsg()` and `getpeername()` find the
/// frontend the application dialled under it, so it sees replies from VIP:port (as Cilium's
/// `lb4_reverse_nat_sk` map). The cookie is two words, so the IPv6 instantiation has no
/// implicit padding either.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey<A = u32> {
    /// `bpf_get_socket_cookie()`, low word first (native order of the u64).
    pub cookie: [u32; 2],
    /// Backend address, network byte order.
    pub addr: A,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

impl<A> SockRevKey<A> {
    #[inline(always)]
    pub const fn new(cookie: u64, addr: A, port: u16) -> Self {
        SockRevKey { cookie: [cookie as u32, (cookie >> 32) as u32], addr, port, _pad: 0 }
    }
    pub const fn cookie(&self) -> u64 {
        self.cookie[0] as u64 | (self.cookie[1] as u64) << 32
    }
}

/// Value of `SOCK_REVNAT`: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevValue<A = u32> {
    /// Frontend address (VIP, node address, external or LB IP), network byte order.
    pub addr: A,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: u16,
    /// The frontend's service id (for the CLI; 0 never allocated).
    pub svc_id: u32,
}

pub type SockRevKey6 = SockRevKey<Ipv6Words>;
pub type SockRevValue6 = SockRevValue<Ipv6Words>;

/// Flags of [`SockConfig`].
pub mod sock_flags {
    /// `--socket-lb=host-only`: translate only sockets of the host network namespace
    /// (`bpf_get_netns_cookie` equal to `SockConfig::host_netns_cookie`); pod sockets are
    /// left to the TC path, so sidecars see the ClusterIP.
    pub const HOST_ONLY: u32 = 1 << 0;
}

/// Value of `SOCK_CONFIG` (array, one entry): how the socket-level hooks behave, written by
/// the agent before it attaches them. All zero: translate every socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockConfig {
    /// `sock_flags::*`.
    pub flags: u32,
    /// How long an unconnected UDP socket keeps the backend it was given for a frontend
    /// while it sends nothing there (`--conntrack-udp-timeout-stream`), in seconds; 0:
    /// [`sock_defaults::UDP_TIMEOUT_SECS`]. (Was padding: agents that wrote 0 get the default.)
    pub udp_timeout_secs: u32,
    /// The host network namespace's cookie (`SO_NETNS_COOKIE` of a socket of the agent's).
    pub host_netns_cookie: u64,
}

/// Key of `FRAGS` / `FRAGS6` (LRU hash, not pinned): one fragmented IP datagram, as its
/// fragments name it (RFC 791 / RFC 8200: source, destination, protocol, identification).
/// Only the first fragment carries the ports; the datapath remembers them here so the
/// later fragments of a translated flow get the same translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey<A = u32> {
    /// Source and destination addresses, network byte order, as the fragment arrived.
    pub src_addr: A,
    pub dst_addr: A,
    /// Identification: IPv4's 16 bits (zero-extended) or IPv6's 32, host order.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pub type FragKey6 = FragKey<Ipv6Words>;

/// Value of `FRAGS` / `FRAGS6`: the datagram's ports from its first fragment, network byte
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Defaults of the socket-level hooks for what the agent left 0 in [`SockConfig`].
pub mod sock_defaults {
    /// kube-proxy's `--conntrack-udp-timeout-stream` default: the longest netfilter keeps a
    /// UDP flow that goes on, so an unconnected socket is never re-balanced sooner than
    /// conntrack would re-balance its 5-tuple.
    pub const UDP_TIMEOUT_SECS: u32 = 120;
}

/// Key of `SOCK_UDP_BACKENDS` (LRU hash): an unconnected UDP socket (its cookie) and a
/// frontend it sends to with `sendto()`/`sendmsg()`. The family is the map's (IPv4-mapped
/// frontends use the IPv4 map). Netfilter keeps one backend per 5-tuple for as long as its
/// conntrack entry lives; a socket's datagrams to one VIP:port are that 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockUdpKey<A = u32> {
    /// `bpf_get_socket_cookie()`, low word first (as [`SockRevKey`]).
    pub cookie: [u32; 2],
    /// Frontend address, network byte order.
    pub addr: A,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

impl<A> SockUdpKey<A> {
    #[inline(always)]
    pub const fn new(cookie: u64, addr: A, port: u16) -> Self {
        SockUdpKey { cookie: [cookie as u32, (cookie >> 32) as u32], addr, port, _pad: 0 }
    }
}

/// Value of `SOCK_UDP_BACKENDS`: the backend the socket was given, used while fresh and
/// while the backend exists (the agent purges entries whose backend left the frontend,
/// with the UDP conntrack entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockUdpValue {
    pub backend_id: u32,
    /// The frontend's service id when the backend was picked (a frontend re-created under
    /// another id starts afresh).
    pub svc_id: u32,
    /// `bpf_ktime_get_ns()` of the socket's last datagram to the frontend.
    pub last_used: u64,
}

pub type SockUdpKey6 = SockUdpKey<Ipv6Words>;

/// Value of `SYNC_IDS` (array, one entry, index 0), written and read only by the agent: the
/// id allocators' high-water marks. Every service and backend id handed out on these pins is
/// below its mark, and a restarted agent resumes allocating at the mark, so an id released
/// before the restart is never handed out again while stale affinity or conntrack entries of
/// its old owner may still name it. All zero: nothing recorded (pins of an older agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IdMarks {
    /// Service ids handed out are below this.
    pub next_service_id: u32,
    /// Backend ids handed out are below this.
    pub next_backend_id: u32,
}

/// Values of `SERVICE_CIDRS` / `SERVICE_CIDRS6` (LPM tries keyed by an address prefix in
/// network byte order: `u32` / [`Ipv6Words`]). The longest prefix matching a destination
/// tells what it is: inside a Service CIDR, and whether a frontend holds it (a host entry,
/// /32 or /128, for every frontend address inside a CIDR, written by the agent).
pub mod service_cidr {
    /// A Service CIDR (`ServiceCIDR.spec.cidrs`, `--service-cidr`): an address matching
    /// only this is unallocated, and new flows to it are refused.
    pub const CIDR: u8 = 1;
    /// A frontend address inside a Service CIDR (host prefix) other than a ClusterIP
    /// (an externalIP or load-balancer IP): a port it does not serve is left alone.
    pub const ALLOCATED: u8 = 2;
    /// A ClusterIP inside a Service CIDR (host prefix): from pods and node processes, a
    /// port (or protocol) it does not serve is refused, as kube-proxy's nftables mode
    /// rejects "traffic to invalid ports of ClusterIPs". Uplink traffic is left alone
    /// (ClusterIPs are not served from outside here).
    pub const CLUSTER_IP: u8 = 3;
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    /// `aya::Pod` for the map keys and values the agent reads and writes.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: every type listed is #[repr(C)], Copy, made only of integers and byte
            // arrays with explicit padding fields, so any bit pattern is valid and there are no
            // hidden bytes (the layout tests below pin sizes and offsets).
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        ServiceKey,
        ServiceValue,
        SlotKey,
        MaglevKey,
        Backend,
        CtKey,
        CtValue,
        CtKey6,
        CtValue6,
        AffinityKey,
        AffinityValue,
        StatsKey,
        Counters,
        ServiceMeta,
        SourceRangeKey,
        NodeConfig,
        NeighKey,
        ServiceKey6,
        Backend6,
        AffinityKey6,
        NodeConfig6,
        NeighKey6,
        SockRevKey,
        SockRevValue,
        SockRevKey6,
        SockRevValue6,
        SockConfig,
        FragKey,
        FragKey6,
        FragPorts,
        SockUdpKey,
        SockUdpKey6,
        SockUdpValue,
        IdMarks,
        frontend_filter::Block,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    /// One name per flag bit, each bit once: the CLI and `verify` name flags from this.
    #[test]
    fn every_service_flag_has_one_name() {
        let all = svc_flags::NAMES.iter().fold(0u32, |acc, (bit, _)| {
            assert_eq!(acc & bit, 0, "bit {bit:#x} named twice");
            acc | bit
        });
        assert_eq!(all, (1 << svc_flags::NAMES.len()) - 1, "contiguous bits from 0");
        let mut names = svc_flags::names(svc_flags::NODEPORT | svc_flags::AFFINITY);
        assert_eq!((names.next(), names.next(), names.next()), (Some("affinity"), Some("nodeport"), None));
        assert_eq!(svc_flags::names(svc_flags::POLICY).count(), 4);
    }

    /// Sizes are part of the pinned-map ABI: a change here breaks maps pinned by an older
    /// agent, so it must be deliberate.
    #[test]
    fn ports_are_stored_in_wire_order() {
        assert_eq!(port_to_map(80).to_ne_bytes(), [0, 80]);
        assert_eq!(port_from_map(port_to_map(8080)), 8080);
    }

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 28);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<MaglevKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 48);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<StatsKey>(), 8);
        assert_eq!(size_of::<Counters>(), 16);
        assert_eq!(size_of::<ServiceMeta>(), 152);
        assert_eq!(size_of::<SourceRangeKey>(), 12);
        assert_eq!(size_of::<NodeConfig>(), 16);
        assert_eq!(size_of::<NeighKey>(), 8);
        assert_eq!(align_of::<CtValue>(), 8);
        assert_eq!(size_of::<CtKey6>(), 40);
        assert_eq!(size_of::<ServiceKey6>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<AffinityKey6>(), 20);
        assert_eq!(size_of::<NodeConfig6>(), 32);
        assert_eq!(size_of::<NeighKey6>(), 20);
        assert_eq!(size_of::<CtValue6>(), 72);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevValue>(), 12);
        assert_eq!(size_of::<SockRevKey6>(), 28);
        assert_eq!(size_of::<SockRevValue6>(), 24);
        assert_eq!(size_of::<SockConfig>(), 16);
        assert_eq!(align_of::<SockConfig>(), 8);
        assert_eq!(size_of::<SockUdpKey>(), 16);
        assert_eq!(size_of::<SockUdpKey6>(), 28);
        assert_eq!(size_of::<SockUdpValue>(), 16);
        assert_eq!(align_of::<SockUdpValue>(), 8);
        assert_eq!(size_of::<IdMarks>(), 8);
    }

    /// No implicit padding: the sum of the field sizes equals the struct size.
    #[test]
    fn no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<ServiceValue>(), 7 * 4);
        assert_eq!(size_of::<Backend>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<CtKey>(), 4 + 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<CtValue>(), 4 + 2 + 1 + 1 + 4 + 2 + 2 + 4 + 4 + 8 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<CtKey6>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<CtValue6>(), 16 + 2 + 1 + 1 + 16 + 2 + 2 + 4 + 4 + 8 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<AffinityValue>(), 4 + 4 + 8);
        assert_eq!(size_of::<ServiceMeta>(), META_NAMESPACE_LEN + META_NAME_LEN + META_PORT_NAME_LEN + 1 + 7);
        assert_eq!(size_of::<SockRevKey>(), 8 + 4 + 2 + 2);
        assert_eq!(size_of::<SockRevKey6>(), 8 + 16 + 2 + 2);
        assert_eq!(size_of::<SockRevValue>(), 4 + 2 + 2 + 4);
        assert_eq!(size_of::<SockRevValue6>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<SockConfig>(), 4 + 4 + 8);
        assert_eq!(size_of::<FragKey>(), 4 + 4 + 4 + 1 + 3);
        assert_eq!(size_of::<FragKey6>(), 16 + 16 + 4 + 1 + 3);
        assert_eq!(size_of::<FragPorts>(), 2 + 2);
        assert_eq!(size_of::<SockUdpKey>(), 8 + 4 + 2 + 2);
        assert_eq!(size_of::<SockUdpKey6>(), 8 + 16 + 2 + 2);
        assert_eq!(size_of::<SockUdpValue>(), 4 + 4 + 8);
        assert_eq!(size_of::<IdMarks>(), 4 + 4);
    }

    #[test]
    fn sock_rev_key_cookie_round_trips() {
        let k = SockRevKey::new(0x1234_5678_9abc_def0, 7u32, 80);
        assert_eq!(k.cookie(), 0x1234_5678_9abc_def0);
        assert_eq!(k.cookie, [0x9abc_def0, 0x1234_5678]);
        let base = &k as *const _ as usize;
        assert_eq!(&k.addr as *const _ as usize - base, 8);
        assert_eq!(&k.port as *const _ as usize - base, 12);
    }

    #[test]
    fn field_offsets_match_the_datapath() {
        let k = CtKey { src_addr: 0, dst_addr: 0, src_port: 0, dst_port: 0, proto: 0, dir: 0, _pad: 0 };
        let base = &k as *const _ as usize;
        assert_eq!(&k.dst_addr as *const _ as usize - base, 4);
        assert_eq!(&k.src_port as *const _ as usize - base, 8);
        assert_eq!(&k.proto as *const _ as usize - base, 12);
        let v = CtValue::<u32>::default();
        let base = &v as *const _ as usize;
        assert_eq!(&v.snat_addr as *const _ as usize - base, 8);
        assert_eq!(&v.backend_id as *const _ as usize - base, 16);
        assert_eq!(&v.last_seen as *const _ as usize - base, 24);
    }

    #[test]
    fn slot_key_encodes_generation_and_index() {
        let k = SlotKey::new(7, 1, 42);
        assert_eq!((k.svc_id, k.generation(), k.index()), (7, 1, 42));
        let k = SlotKey::new(7, 0, 42);
        assert_eq!((k.generation(), k.index()), (0, 42));
        assert_ne!(SlotKey::new(7, 0, 1), SlotKey::new(7, 1, 1));
    }

    #[test]
    fn ct_state_follows_the_flags() {
        use ct::{CtState, state, tcp_flags_to_ct};
        assert_eq!(state(PROTO_TCP, 0), CtState::New);
        // A SYN-ACK alone is not established: only the handshake's last ACK assures a flow.
        assert_eq!(state(PROTO_TCP, ct_flags::SEEN_REPLY), CtState::Replied);
        assert_eq!(state(PROTO_TCP, ct_flags::SEEN_REPLY | ct_flags::ASSURED), CtState::Established);
        let fin_fwd = tcp_flags_to_ct(0x11, false);
        assert_eq!(fin_fwd, ct_flags::CLOSING | ct_flags::FIN_FWD);
        assert_eq!(state(PROTO_TCP, ct_flags::SEEN_REPLY | fin_fwd), CtState::Closing);
        let both = fin_fwd | tcp_flags_to_ct(0x11, true);
        assert_eq!(state(PROTO_TCP, ct_flags::SEEN_REPLY | both), CtState::Closed);
        assert_eq!(state(PROTO_TCP, tcp_flags_to_ct(0x04, true)), CtState::Closed);
        // A plain ACK or SYN adds nothing.
        assert_eq!(tcp_flags_to_ct(0x10, false) | tcp_flags_to_ct(0x02, true), 0);
        // UDP has no FIN: replied or not.
        assert_eq!(state(PROTO_UDP, 0), CtState::New);
        assert_eq!(state(PROTO_UDP, ct_flags::SEEN_REPLY | ct_flags::SNAT), CtState::Replied);
        assert_eq!(state(PROTO_UDP, ct_flags::SEEN_REPLY | ct_flags::ASSURED), CtState::Established);
        assert_eq!(CtState::Replied.label(PROTO_TCP), "SYN_RECV");
        assert!(CtState::Replied.unassured() && !CtState::Closed.unassured());
    }

    #[test]
    fn ct_partner_keys_round_trip() {
        let fwd = CtKey {
            src_addr: 1u32,
            dst_addr: 2,
            src_port: 1000,
            dst_port: 80,
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        // Plain DNAT: the backend answers the client.
        let v = CtValue { nat_addr: 3u32, nat_port: 8080, ..Default::default() };
        let rk = fwd.reply_of_forward(&v);
        assert_eq!((rk.src_addr, rk.src_port, rk.dst_addr, rk.dst_port, rk.dir), (3, 8080, 1, 1000, CT_DIR_REPLY));
        let rv = CtValue { nat_addr: 2u32, nat_port: 80, ..Default::default() };
        assert_eq!(rk.forward_of_reply(&rv), fwd);
        // Source-NATed: the backend answers our SNAT address:port; the reply entry keeps
        // the client.
        let v = CtValue {
            nat_addr: 3u32,
            nat_port: 8080,
            flags: ct_flags::SNAT,
            snat_addr: 9,
            snat_port: 61000,
            ..Default::default()
        };
        let rk = fwd.reply_of_forward(&v);
        assert_eq!((rk.dst_addr, rk.dst_port), (9, 61000));
        let rv = CtValue {
            nat_addr: 2u32,
            nat_port: 80,
            flags: ct_flags::SNAT,
            snat_addr: 1,
            snat_port: 1000,
            ..Default::default()
        };
        assert_eq!(rk.forward_of_reply(&rv), fwd);
        assert!(fwd.reply_belongs(&rv));
        // Another flow's reply entry under the same reply key (another frontend, another
        // client) is not this flow's.
        assert!(!fwd.reply_belongs(&CtValue { nat_port: 81, ..rv }));
        assert!(!fwd.reply_belongs(&CtValue { snat_port: 1001, ..rv }));
    }

    #[test]
    fn ct_sequence_window() {
        use ct::{SEQ_SLACK, seq_near};
        assert!(seq_near(1000, 1000));
        assert!(seq_near(1000 + SEQ_SLACK, 1000) && seq_near(1000, 1000 + SEQ_SLACK));
        assert!(!seq_near(1001 + SEQ_SLACK, 1000));
        // Across the wrap of the 32-bit sequence space.
        assert!(seq_near(5, u32::MAX - 5));
        assert!(!seq_near(0x8000_0000, 0));
    }

    #[test]
    fn ct_timeouts_by_state() {
        use ct::{CtState, CtTimeouts};
        let t = CtTimeouts::default();
        let s = 1_000_000_000u64;
        assert_eq!(t.idle_ns(PROTO_TCP, CtState::Established), 86_400 * s);
        assert_eq!(t.idle_ns(PROTO_TCP, CtState::Closed), 10 * s);
        assert_eq!(t.idle_ns(PROTO_UDP, CtState::New), 30 * s);
        assert_eq!(t.idle_ns(PROTO_SCTP, CtState::Established), 120 * s);
    }

    #[test]
    fn verdicts_are_indexed_by_their_discriminant() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{v:?}");
            assert_eq!(Verdict::from_index(i as u32), Some(*v));
        }
        assert_eq!(Verdict::from_index(Verdict::COUNT), None);
        assert_eq!(Verdict::NoBackend.name(), "no_backend");
        for a in Verdict::ALL {
            for b in Verdict::ALL {
                assert!(a == b || a.name() != b.name(), "{a:?} and {b:?} share a name");
            }
        }
    }
}
