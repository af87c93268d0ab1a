//! Every map the programs and the agent share. All are pinned by name so they outlive the
//! agent: a restarted agent re-opens them and established flows keep their backend. (The
//! per-CPU scratch maps, which hold nothing between packets, are declared beside their
//! types: `pipeline::WORK6`, `reject::ANSWER`.)
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use proxy_common::{
    AffinityKey, AffinityKey6, AffinityValue, Backend, Backend6, Counters, CtKey, CtKey6, CtValue, CtValue6, FragKey,
    FragKey6, FragPorts, IdMarks, Ipv6Words, NeighKey, NeighKey6, NodeConfig, NodeConfig6, ServiceKey, ServiceKey6,
    ServiceMeta, ServiceValue, SlotKey, SockConfig, SockRevKey, SockRevKey6, SockRevValue, SockRevValue6, SockUdpKey,
    SockUdpKey6, SockUdpValue, SourceRangeData6, StatsKey, frontend_filter, sizes,
};

/// The maps only the agent writes (services, their metadata, backends, slots) are
/// allocated on use (NO_PREALLOC): they are sized for 100,000 services x 10 endpoints, which
/// preallocated would cost hundreds of MiB of kernel memory and a slow map creation on every
/// node, whatever it runs; lookups cost the same either way.
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(sizes::MAX_SERVICES, NO_PREALLOC);

/// Sized for every backend referenced by several frontends in both generations
/// (`--max-backends` x 8), a cap most nodes never approach.
#[map]
pub static BACKEND_SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(sizes::MAX_SLOTS, NO_PREALLOC);

/// Maglev tables: backend ids, each Maglev frontend's table the run
/// `[maglev_base, maglev_base + maglev_size)` its `ServiceValue` names (the agent hands the
/// runs out). An array rather than a hash of (frontend id, slot): a new flow reads one
/// element by index (no hashing, no bucket walk, 4 bytes per slot instead of ~64 in a hash
/// element, so far fewer cache misses), and the verifier needs nothing more than for
/// `NODE_CONFIG`. Map-in-map (an inner array per frontend) would save the runs' bookkeeping
/// but aya-ebpf 0.2 declares none.
#[map]
pub static MAGLEV_SLOTS: Array<u32> = Array::pinned(sizes::MAX_MAGLEV_SLOTS, 0);

#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(sizes::MAX_BACKENDS, NO_PREALLOC);

/// Assured flows (`ct_flags::ASSURED`: a completed TCP handshake, a UDP stream). A plain
/// (preallocated) hash, not an LRU: an LRU evicts whatever was used least recently, which on
/// a busy node is an idle established connection, whose next packet would then be balanced
/// afresh and reset. Here nothing live is ever evicted: the agent's GC removes closed and
/// expired flows. Only flows that proved themselves get here, so a flood of half-open or
/// one-shot flows (which cost an attacker one packet each) can never fill it.
#[map]
pub static CONNTRACK: HashMap<CtKey, CtValue> = HashMap::pinned(sizes::MAX_CONNTRACK, 0);

/// Unassured flows: every new flow starts here and moves to `CONNTRACK` when it becomes
/// assured. An LRU, so when it is full the least recently used unassured flow makes room:
/// netfilter's early drop, which a SYN flood or a burst of DNS exchanges can trigger but
/// which never touches an established connection.
#[map]
pub static CT_NEW: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(sizes::MAX_CONNTRACK, 0);

#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(sizes::MAX_AFFINITY, 0);

/// Allocated on first use (NO_PREALLOC): a preallocated per-CPU map would cost
/// entries x CPUs x 16 bytes up front.
#[map]
pub static SERVICE_STATS: PerCpuHashMap<StatsKey, Counters> =
    PerCpuHashMap::pinned(sizes::MAX_SERVICE_STATS, NO_PREALLOC);

#[map]
pub static GLOBAL_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(proxy_common::GLOBAL_STATS_LEN, 0);

/// Read only by userspace (CLI and a restarting agent); declared here so it is created and
/// pinned with the others.
#[map]
pub static SERVICE_META: HashMap<u32, ServiceMeta> = HashMap::pinned(sizes::MAX_SERVICES, NO_PREALLOC);

/// loadBalancerSourceRanges, keyed by (service id, source prefix). Value unused (1).
#[map]
pub static SOURCE_RANGES: LpmTrie<[u32; 2], u8> = LpmTrie::pinned(sizes::MAX_SOURCE_RANGES, 0);

/// Node facts (SNAT address, hairpin address, SNAT port range), index 0. Written by the agent.
#[map]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// Next hops XDP could not forward to because their neighbour entry was missing; the agent
/// triggers resolution and deletes the key. LRU so a flood of misses cannot fill it for good.
#[map]
pub static NEIGH_MISSES: LruHashMap<NeighKey, u64> = LruHashMap::pinned(sizes::MAX_NEIGH_MISSES, 0);

// IPv6: the maps that hold addresses have an IPv6 twin with 16-byte addresses, so IPv4
// keeps its short keys; ids, slots, metadata and counters are shared (docs/architecture.md).

#[map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::pinned(sizes::MAX_SERVICES, NO_PREALLOC);

#[map]
pub static BACKENDS6: HashMap<u32, Backend6> = HashMap::pinned(sizes::MAX_BACKENDS, NO_PREALLOC);

/// See `CONNTRACK`: a plain hash whose live entries are never evicted.
#[map]
pub static CONNTRACK6: HashMap<CtKey6, CtValue6> = HashMap::pinned(sizes::MAX_CONNTRACK, 0);

/// See `CT_NEW`.
#[map]
pub static CT_NEW6: LruHashMap<CtKey6, CtValue6> = LruHashMap::pinned(sizes::MAX_CONNTRACK, 0);

#[map]
pub static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue> = LruHashMap::pinned(sizes::MAX_AFFINITY, 0);

/// loadBalancerSourceRanges for IPv6 frontends: (service id, IPv6 source prefix).
#[map]
pub static SOURCE_RANGES6: LpmTrie<SourceRangeData6, u8> = LpmTrie::pinned(sizes::MAX_SOURCE_RANGES, 0);

/// IPv6 node facts (SNAT and hairpin addresses), index 0. Written by the agent.
#[map]
pub static NODE_CONFIG6: Array<NodeConfig6> = Array::pinned(1, 0);

/// IPv6 next hops XDP found no neighbour (NDP) entry for; see `NEIGH_MISSES`.
#[map]
pub static NEIGH_MISSES6: LruHashMap<NeighKey6, u64> = LruHashMap::pinned(sizes::MAX_NEIGH_MISSES, 0);

/// The ports of fragmented datagrams whose first fragment was translated, for their later
/// fragments (`frag.rs`). LRU: a datagram whose last fragment never comes ages out. Not
/// pinned: it holds milliseconds of state, which a restart may lose (those datagrams'
/// later fragments pass untouched, as before).
#[map]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(sizes::MAX_FRAGS, 0);

/// `FRAGS` for IPv6 (fragment header identification).
#[map]
pub static FRAGS6: LruHashMap<FragKey6, FragPorts> = LruHashMap::with_max_entries(sizes::MAX_FRAGS, 0);

// Socket-level load balancing (`sock.rs`).

/// Reverse translations of the socket-level hooks: (socket cookie, backend) -> the frontend
/// the application dialled, for `recvmsg()` and `getpeername()`. LRU: entries of closed
/// sockets are never looked up again (cookies are not reused) and age out.
#[map]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(sizes::MAX_SOCK_REVNAT, 0);

/// `SOCK_REVNAT` for IPv6 sockets (IPv4-mapped peers use `SOCK_REVNAT`).
#[map]
pub static SOCK_REVNAT6: LruHashMap<SockRevKey6, SockRevValue6> = LruHashMap::pinned(sizes::MAX_SOCK_REVNAT, 0);

/// `--socket-lb` mode and the host network namespace's cookie, index 0. Written by the agent.
#[map]
pub static SOCK_CONFIG: Array<SockConfig> = Array::pinned(1, 0);

/// The backend each unconnected UDP socket was given per frontend it sends to, so its
/// datagrams keep going to one backend while it keeps sending (netfilter's per-5-tuple
/// conntrack entry). LRU: entries of closed sockets are never looked up again and age out.
#[map]
pub static SOCK_UDP_BACKENDS: LruHashMap<SockUdpKey, SockUdpValue> =
    LruHashMap::pinned(sizes::MAX_SOCK_UDP_BACKENDS, 0);

/// `SOCK_UDP_BACKENDS` for IPv6 frontends (IPv4-mapped ones use `SOCK_UDP_BACKENDS`).
#[map]
pub static SOCK_UDP_BACKENDS6: LruHashMap<SockUdpKey6, SockUdpValue> =
    LruHashMap::pinned(sizes::MAX_SOCK_UDP_BACKENDS, 0);
/// The sync's id high-water marks (`IdMarks`), index 0. Read and written only by the agent
/// (like `SERVICE_META`); declared here so it is created and pinned with the others.
#[map]
pub static SYNC_IDS: Array<IdMarks> = Array::pinned(1, 0);

/// Service CIDRs and the frontend addresses allocated inside them, keyed by an IPv4 prefix
/// (network byte order); values `proxy_common::service_cidr`. The pipeline refuses new flows
/// to an address whose longest match is a CIDR (unallocated). Written by the agent.
#[map]
pub static SERVICE_CIDRS: LpmTrie<u32, u8> = LpmTrie::pinned(sizes::MAX_SERVICE_CIDR_ENTRIES, 0);

/// `SERVICE_CIDRS` for IPv6.
#[map]
pub static SERVICE_CIDRS6: LpmTrie<Ipv6Words, u8> = LpmTrie::pinned(sizes::MAX_SERVICE_CIDR_ENTRIES, 0);

/// Which destinations may be a frontend (`proxy_common::frontend_filter`): written by the
/// agent, read by `balance` before conntrack. Preallocated (an array): 1 MiB.
#[map]
pub static FRONTEND_FILTER: Array<frontend_filter::Block> = Array::pinned(frontend_filter::ENTRIES, 0);
