//! The map catalogue: every map the eBPF object pins, once, with what userspace needs to
//! know about it — its key and value layout (and the copy function a migration moves its
//! entries with), its other-family twin, the flag that sizes it, preallocation, how a
//! migration treats it, and which tools read it (`trace` seeds it, `verify` reads it, the
//! agent exports its fill ratio).
//!
//! The loader (sizes), the migration (policy and copy), "map full" errors (the flag),
//! metrics (fill ratios) and `trace` (family twins) iterate this table instead of lists of
//! their own. Adding a map means its eBPF declaration (`proxy-ebpf/src/maps.rs`) and one row
//! here; a test checks that the embedded object and this table name the same maps with the
//! same layouts, sizes and preallocation.
//!
//! It lives here, not in `proxy-common`: the copy functions are generic over aya's
//! userspace map types, and the eBPF side cannot iterate a table anyway (each map is a
//! `#[map]` static the programs name directly).
use aya::Pod;
use proxy_common::{
    AffinityKey, AffinityKey6, AffinityValue, Backend, Backend6, Counters, CtKey, CtKey6, CtValue, CtValue6, IdMarks,
    Ipv6Words, NeighKey, NeighKey6, NodeConfig, NodeConfig6, ServiceKey, ServiceKey6, ServiceMeta, ServiceValue,
    SlotKey, SockConfig, SockRevKey, SockRevKey6, SockRevValue, SockRevValue6, SockUdpKey, SockUdpKey6, SockUdpValue,
    SourceRangeData6, StatsKey,
    frontend_filter::{self, Block},
    map_names as n, sizes,
};

use crate::dataplane::maps::copy::{self, CopyFn, Legacy, Upgrade};
use crate::model::IpFamily;

/// A flag that sets the size of one or more maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeFlag {
    MaxServices,
    MaxBackends,
    MaxConntrack,
    MaxSourceRanges,
    MaxMaglevSlots,
}

impl SizeFlag {
    /// The flag's name, without dashes in front (`raise --{name}`).
    pub fn name(self) -> &'static str {
        match self {
            SizeFlag::MaxServices => "max-services",
            SizeFlag::MaxBackends => "max-backends",
            SizeFlag::MaxConntrack => "max-conntrack",
            SizeFlag::MaxSourceRanges => "max-source-ranges",
            SizeFlag::MaxMaglevSlots => "max-maglev-slots",
        }
    }

    /// The flag's default (`LoaderConfig::new`).
    pub fn default_value(self) -> u32 {
        match self {
            SizeFlag::MaxServices => sizes::MAX_SERVICES,
            SizeFlag::MaxBackends => sizes::MAX_BACKENDS,
            SizeFlag::MaxConntrack => sizes::MAX_CONNTRACK,
            SizeFlag::MaxSourceRanges => sizes::MAX_SOURCE_RANGES,
            SizeFlag::MaxMaglevSlots => sizes::MAX_MAGLEV_SLOTS,
        }
    }
}

/// Where a map's `max_entries` comes from.
#[derive(Clone, Copy, Debug)]
pub enum Sizing {
    /// What the object declares ([`MapDef::declared`]).
    Declared,
    /// The flag's value.
    Flag(SizeFlag),
    /// A function of the flag's value.
    Scaled(SizeFlag, fn(u32) -> u32),
}

/// Slot references per backend that `BACKEND_SLOTS` is sized for.
///
/// A slot is one (frontend, generation, index) -> backend reference, so the map fills with
/// references, not with distinct backends: one endpoint is referenced by every frontend of
/// its Service (ClusterIP, and NodePort/ExternalIP/LoadBalancer in the internal and the
/// external scope) and by every Service selecting it, once per generation. And a generation
/// switch writes a frontend's whole new list into its spare generation while the active one
/// still holds the old list, so steady state needs both generations. 2 generations x 4
/// references per backend covers a ClusterIP + NodePort service (3 frontends) with room to
/// spare; past that, the sync reclaims spare generations and shrinks in place (see
/// `sync`), and reports `BACKEND_SLOTS is full: raise --max-backends` per frontend.
pub const SLOTS_PER_BACKEND: u32 = 2 * 4;

/// Size of `BACKEND_SLOTS` for `--max-backends`.
pub fn slots_for(max_backends: u32) -> u32 {
    max_backends.saturating_mul(SLOTS_PER_BACKEND)
}

/// Per-service counter keys: room for the verdicts a service usually sees.
pub const STATS_PER_SERVICE: u32 = 4;

fn stats_for(max_services: u32) -> u32 {
    max_services.saturating_mul(STATS_PER_SERVICE)
}

/// Key and value sizes, and the function a migration copies entries with (generic over the
/// `proxy-common` types, so the sizes and the copy cannot disagree).
#[derive(Clone, Copy)]
pub struct Layout {
    pub key_size: u32,
    pub value_size: u32,
    pub(super) copy: CopyFn,
}

const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

impl Layout {
    /// HASH and LRU_HASH.
    const fn hash<K: Pod, V: Pod>() -> Self {
        Layout { key_size: size::<K>(), value_size: size::<V>(), copy: copy::copy_hash::<K, V> }
    }
    /// A hash whose values pass through `U` when carried over.
    const fn hash_upgraded<K: Pod, V: Pod, U: Upgrade<K, V>>() -> Self {
        Layout { key_size: size::<K>(), value_size: size::<V>(), copy: copy::copy_hash_upgraded::<K, V, U> }
    }
    const fn percpu_hash<K: Pod, V: Pod>() -> Self {
        Layout { key_size: size::<K>(), value_size: size::<V>(), copy: copy::copy_percpu_hash::<K, V> }
    }
    /// LPM tries: the kernel's key is the 4-byte prefix length, then the data.
    const fn lpm<K: Pod, V: Pod>() -> Self {
        Layout { key_size: 4 + size::<K>(), value_size: size::<V>(), copy: copy::copy_lpm::<K, V> }
    }
    /// Arrays: the key is the u32 index.
    const fn array<V: Pod>() -> Self {
        Layout { key_size: size::<u32>(), value_size: size::<V>(), copy: copy::copy_array::<V> }
    }
    const fn percpu_array<V: Pod>() -> Self {
        Layout { key_size: size::<u32>(), value_size: size::<V>(), copy: copy::copy_percpu_array::<V> }
    }
}

/// How a migration carries a map over when its pin differs from the configuration.
pub struct Policy {
    /// The datapath writes this map: copy again, insert-if-absent, after the new programs
    /// are in place (entries the old programs created in between). Maps only the agent
    /// writes are copied once, before the sync reads them back: a second pass could
    /// resurrect what the first sync deleted.
    pub repeat: bool,
    /// Every entry must fit (the agent's maps: a service half carried over is worse than
    /// refusing to start). Datapath state (conntrack, affinity, counters) is best effort:
    /// what does not fit is dropped and counted.
    pub must_fit: bool,
    /// The older layout this map can also be migrated from, if any.
    pub legacy: Option<Legacy>,
}

/// The agent's maps: copied once, every entry must fit.
const AGENT_WRITES: Policy = Policy { repeat: false, must_fit: true, legacy: None };
/// Datapath state: best effort, copied again after the swap.
const DATAPATH_WRITES: Policy = Policy { repeat: true, must_fit: false, legacy: None };
/// Single-entry arrays (and GLOBAL_STATS): every index exists, nothing to add after the
/// swap; an array that shrank drops its tail.
const ARRAY: Policy = Policy { repeat: false, must_fit: false, legacy: None };

/// One pinned map.
pub struct MapDef {
    pub name: &'static str,
    pub layout: Layout,
    /// `max_entries` the object declares (the size without flags).
    pub declared: u32,
    pub sizing: Sizing,
    /// Created preallocated (no `BPF_F_NO_PREALLOC`).
    pub prealloc: bool,
    /// `None`: a pin that differs cannot be carried over; the start is refused naming it.
    pub migrate: Option<Policy>,
    /// `trace` copies live entries of it into its private instance.
    pub trace_seeds: bool,
    /// `verify` (and the agent's periodic check) reads it, through the map store's snapshot.
    pub verify_reads: bool,
    /// The agent exports `ebpf_proxy_map_fill_ratio{map=NAME}` for it.
    pub fill_ratio: bool,
}

impl MapDef {
    const fn new(name: &'static str, layout: Layout, declared: u32) -> Self {
        MapDef {
            name,
            layout,
            declared,
            sizing: Sizing::Declared,
            prealloc: true,
            migrate: None,
            trace_seeds: false,
            verify_reads: false,
            fill_ratio: false,
        }
    }

    /// The other family's map of the same role (`SERVICES` <-> `SERVICES6`); `None` for the
    /// maps both families share. Paired once, in `proxy_common::map_names::FAMILY_TWINS`.
    pub fn twin(&self) -> Option<&'static str> {
        n::twin(self.name)
    }

    /// Holds IPv6 addresses (the `6` twin).
    pub fn v6(&self) -> bool {
        n::is_v6(self.name)
    }

    /// `max_entries` with the size flags at `flag`'s values.
    pub fn max_entries(&self, flag: impl Fn(SizeFlag) -> u32) -> u32 {
        match self.sizing {
            Sizing::Declared => self.declared,
            Sizing::Flag(f) => flag(f),
            Sizing::Scaled(f, scale) => scale(flag(f)),
        }
    }

    /// The flag that sizes this map, if one does.
    pub fn size_flag(&self) -> Option<SizeFlag> {
        match self.sizing {
            Sizing::Declared => None,
            Sizing::Flag(f) | Sizing::Scaled(f, _) => Some(f),
        }
    }

    /// Flag-sized (the loader overrides the declared size).
    pub fn flag_sized(&self) -> bool {
        self.size_flag().is_some()
    }
}

/// Every pinned map, once. The IPv6 twins follow the same flags and policies as their IPv4
/// maps, with their own layouts.
/// SERVICES or SERVICES6 (keys `K`): their values before `maglev_base` are widened, their
/// tables republished by the sync.
const fn services_map<K: Pod>(name: &'static str) -> MapDef {
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxServices),
        prealloc: false,
        migrate: Some(Policy {
            legacy: Some(Legacy {
                value_size: crate::dataplane::maps::maglev::LEGACY_VALUE_SIZE as u32,
                sibling: name,
                copy: crate::dataplane::maps::maglev::copy_legacy_services::<K>,
            }),
            ..AGENT_WRITES
        }),
        trace_seeds: true,
        verify_reads: true,
        fill_ratio: true,
        ..MapDef::new(name, Layout::hash::<K, ServiceValue>(), sizes::MAX_SERVICES)
    }
}

pub static MAPS: &[MapDef] = &[
    // The frontends, keyed by address: written by the agent, read by every hook.
    services_map::<ServiceKey>(n::SERVICES),
    services_map::<ServiceKey6>(n::SERVICES6),
    // Slot references (frontend, generation, index) -> backend id, both families.
    MapDef {
        sizing: Sizing::Scaled(SizeFlag::MaxBackends, slots_for),
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        trace_seeds: true,
        verify_reads: true,
        fill_ratio: true,
        ..MapDef::new(n::BACKEND_SLOTS, Layout::hash::<SlotKey, u32>(), sizes::MAX_SLOTS)
    },
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxBackends),
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        trace_seeds: true,
        verify_reads: true,
        fill_ratio: true,
        ..MapDef::new(n::BACKENDS, Layout::hash::<u32, Backend>(), sizes::MAX_BACKENDS)
    },
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxBackends),
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        trace_seeds: true,
        verify_reads: true,
        fill_ratio: true,
        ..MapDef::new(n::BACKENDS6, Layout::hash::<u32, Backend6>(), sizes::MAX_BACKENDS)
    },
    // Read only by userspace (the CLI, `trace`'s service name, a restarting agent).
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxServices),
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        verify_reads: true,
        ..MapDef::new(n::SERVICE_META, Layout::hash::<u32, ServiceMeta>(), sizes::MAX_SERVICES)
    },
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxSourceRanges),
        // The kernel allocates LPM trie nodes on use: the object declares them so.
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        trace_seeds: true,
        verify_reads: true,
        ..MapDef::new(n::SOURCE_RANGES, Layout::lpm::<[u32; 2], u8>(), sizes::MAX_SOURCE_RANGES)
    },
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxSourceRanges),
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        trace_seeds: true,
        verify_reads: true,
        ..MapDef::new(n::SOURCE_RANGES6, Layout::lpm::<SourceRangeData6, u8>(), sizes::MAX_SOURCE_RANGES)
    },
    MapDef { migrate: Some(ARRAY), trace_seeds: true, ..MapDef::new(n::NODE_CONFIG, Layout::array::<NodeConfig>(), 1) },
    MapDef {
        migrate: Some(ARRAY),
        trace_seeds: true,
        ..MapDef::new(n::NODE_CONFIG6, Layout::array::<NodeConfig6>(), 1)
    },
    // Assured flows. Pre-lifecycle (LRU) entries are read as established: see
    // `dataplane::maps::ct_legacy::CtUpgrade`. Entries of the layout before the assured table (32 bytes) are
    // converted, and their unassured flows moved to CT_NEW: see `dataplane::maps::ct_legacy`. The
    // agent exports its fill ratio from the conntrack GC (`conntrack::task`).
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxConntrack),
        migrate: Some(Policy {
            legacy: Some(Legacy {
                value_size: crate::dataplane::maps::ct_legacy::VALUE_SIZE as u32,
                sibling: n::CT_NEW,
                copy: crate::dataplane::maps::ct_legacy::copy::<u32, { crate::dataplane::maps::ct_legacy::VALUE_SIZE }>,
            }),
            ..DATAPATH_WRITES
        }),
        trace_seeds: true,
        fill_ratio: true,
        ..MapDef::new(
            n::CONNTRACK,
            Layout::hash_upgraded::<CtKey, CtValue, crate::dataplane::maps::ct_legacy::CtUpgrade>(),
            sizes::MAX_CONNTRACK,
        )
    },
    // CONNTRACK6 was never an LRU, so its entries need no upgrade.
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxConntrack),
        migrate: Some(Policy {
            legacy: Some(Legacy {
                value_size: crate::dataplane::maps::ct_legacy::VALUE_SIZE6 as u32,
                sibling: n::CT_NEW6,
                copy: crate::dataplane::maps::ct_legacy::copy::<
                    Ipv6Words,
                    { crate::dataplane::maps::ct_legacy::VALUE_SIZE6 },
                >,
            }),
            ..DATAPATH_WRITES
        }),
        trace_seeds: true,
        fill_ratio: true,
        ..MapDef::new(n::CONNTRACK6, Layout::hash::<CtKey6, CtValue6>(), sizes::MAX_CONNTRACK)
    },
    // Unassured flows get as much room as assured ones: a flood evicts only its own kind.
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxConntrack),
        migrate: Some(DATAPATH_WRITES),
        trace_seeds: true,
        fill_ratio: true,
        ..MapDef::new(n::CT_NEW, Layout::hash::<CtKey, CtValue>(), sizes::MAX_CONNTRACK)
    },
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxConntrack),
        migrate: Some(DATAPATH_WRITES),
        trace_seeds: true,
        fill_ratio: true,
        ..MapDef::new(n::CT_NEW6, Layout::hash::<CtKey6, CtValue6>(), sizes::MAX_CONNTRACK)
    },
    MapDef {
        migrate: Some(DATAPATH_WRITES),
        trace_seeds: true,
        ..MapDef::new(n::AFFINITY, Layout::hash::<AffinityKey, AffinityValue>(), sizes::MAX_AFFINITY)
    },
    MapDef {
        migrate: Some(DATAPATH_WRITES),
        trace_seeds: true,
        ..MapDef::new(n::AFFINITY6, Layout::hash::<AffinityKey6, AffinityValue>(), sizes::MAX_AFFINITY)
    },
    // Allocated on first use: a preallocated per-CPU map costs entries x CPUs up front.
    MapDef {
        sizing: Sizing::Scaled(SizeFlag::MaxServices, stats_for),
        prealloc: false,
        migrate: Some(DATAPATH_WRITES),
        ..MapDef::new(n::SERVICE_STATS, Layout::percpu_hash::<StatsKey, Counters>(), sizes::MAX_SERVICE_STATS)
    },
    MapDef {
        migrate: Some(ARRAY),
        ..MapDef::new(n::GLOBAL_STATS, Layout::percpu_array::<Counters>(), proxy_common::GLOBAL_STATS_LEN)
    },
    MapDef {
        migrate: Some(DATAPATH_WRITES),
        ..MapDef::new(n::NEIGH_MISSES, Layout::hash::<NeighKey, u64>(), sizes::MAX_NEIGH_MISSES)
    },
    MapDef {
        migrate: Some(DATAPATH_WRITES),
        ..MapDef::new(n::NEIGH_MISSES6, Layout::hash::<NeighKey6, u64>(), sizes::MAX_NEIGH_MISSES)
    },
    // Socket-level state the hooks write: best effort, like affinity.
    MapDef {
        migrate: Some(DATAPATH_WRITES),
        ..MapDef::new(n::SOCK_UDP_BACKENDS, Layout::hash::<SockUdpKey, SockUdpValue>(), sizes::MAX_SOCK_UDP_BACKENDS)
    },
    MapDef {
        migrate: Some(DATAPATH_WRITES),
        ..MapDef::new(n::SOCK_UDP_BACKENDS6, Layout::hash::<SockUdpKey6, SockUdpValue>(), sizes::MAX_SOCK_UDP_BACKENDS)
    },
    // Not migrated (yet): no flag sizes them, so a pin differs only if their definition
    // changes, and then the start is refused naming the map.
    MapDef { ..MapDef::new(n::SOCK_REVNAT, Layout::hash::<SockRevKey, SockRevValue>(), sizes::MAX_SOCK_REVNAT) },
    MapDef { ..MapDef::new(n::SOCK_REVNAT6, Layout::hash::<SockRevKey6, SockRevValue6>(), sizes::MAX_SOCK_REVNAT) },
    MapDef { ..MapDef::new(n::SOCK_CONFIG, Layout::array::<SockConfig>(), 1) },
    // The agent's id high-water marks: one array entry, only the agent writes it.
    MapDef { migrate: Some(ARRAY), ..MapDef::new(n::SYNC_IDS, Layout::array::<IdMarks>(), 1) },
    // Maglev tables: backend ids, one run per Maglev frontend (`ServiceValue::maglev_base`),
    // both families; written by the agent, read by TC and XDP for new flows of Maglev
    // frontends. A resized array keeps its head; runs past a smaller end are rewritten.
    MapDef {
        sizing: Sizing::Flag(SizeFlag::MaxMaglevSlots),
        migrate: Some(ARRAY),
        trace_seeds: true,
        ..MapDef::new(n::MAGLEV, Layout::array::<u32>(), sizes::MAX_MAGLEV_SLOTS)
    },
    // Service CIDRs and the frontend addresses inside them (`proxy_common::service_cidr`):
    // written by the agent, read by TC, XDP and the socket hooks for new flows that found no
    // frontend; LPM trie nodes are allocated on use.
    MapDef {
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        trace_seeds: true,
        ..MapDef::new(n::SERVICE_CIDRS, Layout::lpm::<u32, u8>(), sizes::MAX_SERVICE_CIDR_ENTRIES)
    },
    MapDef {
        prealloc: false,
        migrate: Some(AGENT_WRITES),
        trace_seeds: true,
        ..MapDef::new(n::SERVICE_CIDRS6, Layout::lpm::<Ipv6Words, u8>(), sizes::MAX_SERVICE_CIDR_ENTRIES)
    },
    // Which destinations may be a frontend (`proxy_common::frontend_filter`): written only
    // by the agent, read by TC and XDP. Not migrated: each start re-derives its bits from
    // the other maps, and a changed definition refuses the start naming it.
    MapDef { ..MapDef::new(n::FRONTEND_FILTER, Layout::array::<Block>(), frontend_filter::ENTRIES) },
];

/// Maps an earlier release pinned that this one no longer declares: their pins are removed
/// once this release's programs are in place (`Migration::finish`), so an upgrade does not
/// leave them holding kernel memory. `MAGLEV`: the (frontend id, slot) hash that
/// `MAGLEV_SLOTS` replaced.
pub const RETIRED: &[&str] = &["MAGLEV"];

/// The row of map `name`.
pub fn get(name: &str) -> Option<&'static MapDef> {
    MAPS.iter().find(|m| m.name == name)
}

/// The map of `name`'s role in the given family: `name` itself for its own family or a
/// shared map, its twin otherwise (`of_family(SERVICES, V6)` is `SERVICES6`).
pub fn of_family(name: &'static str, family: IpFamily) -> &'static str {
    n::of_family(name, family == IpFamily::V6)
}

/// Flag that sizes a map, for "map full" errors. Maps no flag sizes name `max-services`
/// (the flag most of the state scales with).
pub fn size_flag(name: &str) -> &'static str {
    get(name).and_then(MapDef::size_flag).unwrap_or(SizeFlag::MaxServices).name()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A retired map's pin is removed on upgrade: it must never be one this release uses.
    #[test]
    fn retired_maps_are_not_in_the_catalogue() {
        for name in RETIRED {
            assert!(get(name).is_none(), "{name} is retired but declared");
        }
    }

    /// The pinned maps the embedded object declares: (max_entries, key, value, flags).
    fn object_maps() -> BTreeMap<String, (u32, u32, u32, u32)> {
        let obj = aya_obj::Object::parse(crate::dataplane::EBPF_OBJECT).expect("the embedded object parses");
        obj.maps
            .iter()
            .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
            .map(|(name, m)| (name.clone(), (m.max_entries(), m.key_size(), m.value_size(), m.map_flags())))
            .collect()
    }

    /// Adding a map to `proxy-ebpf/src/maps.rs` without its row here (or the other way
    /// round, or with another layout) fails here, in CI, instead of at an upgrade.
    #[test]
    fn every_pinned_map_has_exactly_one_row() {
        let declared = object_maps();
        let mut rows: BTreeMap<&str, &MapDef> = BTreeMap::new();
        for m in MAPS {
            assert!(rows.insert(m.name, m).is_none(), "{} has two rows", m.name);
        }
        let missing: Vec<&String> = declared.keys().filter(|k| !rows.contains_key(k.as_str())).collect();
        let extra: Vec<&&str> = rows.keys().filter(|k| !declared.contains_key(**k)).collect();
        assert!(missing.is_empty(), "pinned by the object, no catalogue row: {missing:?}");
        assert!(extra.is_empty(), "catalogue rows the object does not pin: {extra:?}");
        for (name, (max_entries, key, value, flags)) in &declared {
            let m = rows[name.as_str()];
            assert_eq!((m.layout.key_size, m.layout.value_size), (*key, *value), "{name}: key and value sizes");
            assert_eq!(m.declared, *max_entries, "{name}: declared max_entries");
            let no_prealloc = flags & aya_obj::generated::BPF_F_NO_PREALLOC != 0;
            assert_eq!(m.prealloc, !no_prealloc, "{name}: preallocation");
        }
    }

    #[test]
    fn twins_pair_up_across_families() {
        for m in MAPS {
            let Some(t) = m.twin() else { continue };
            let twin = get(t).unwrap_or_else(|| panic!("{}: twin {t} has no row", m.name));
            assert_eq!(twin.twin(), Some(m.name), "{} <-> {t}", m.name);
            assert_ne!(twin.v6(), m.v6(), "{} and {t} are of different families", m.name);
            if m.v6() {
                assert_eq!(format!("{t}6"), m.name, "the IPv6 twin is named NAME6");
            }
            assert_eq!(twin.size_flag(), m.size_flag(), "{}: twins follow one flag", m.name);
            assert_eq!(twin.migrate.is_some(), m.migrate.is_some(), "{}: twins migrate alike", m.name);
        }
        assert_eq!(of_family(n::SERVICES, IpFamily::V6), n::SERVICES6);
        assert_eq!(of_family(n::SERVICES6, IpFamily::V4), n::SERVICES);
        assert_eq!(of_family(n::CONNTRACK, IpFamily::V4), n::CONNTRACK);
        assert_eq!(of_family(n::BACKEND_SLOTS, IpFamily::V6), n::BACKEND_SLOTS, "shared");
    }

    #[test]
    fn size_flags_and_defaults() {
        assert_eq!(size_flag(n::SERVICES6), "max-services");
        assert_eq!(size_flag(n::BACKEND_SLOTS), "max-backends");
        assert_eq!(size_flag(n::CT_NEW6), "max-conntrack");
        assert_eq!(size_flag(n::SOURCE_RANGES), "max-source-ranges");
        assert_eq!(size_flag(n::AFFINITY), "max-services", "unsized maps name the main flag");
        // With the flags at their defaults, a map sized by its flag alone gets what the
        // object declares.
        for m in MAPS {
            if let Sizing::Flag(f) = m.sizing {
                assert_eq!(f.default_value(), m.declared, "{}", m.name);
                assert_eq!(m.max_entries(SizeFlag::default_value), m.declared, "{}", m.name);
            }
        }
    }
}
