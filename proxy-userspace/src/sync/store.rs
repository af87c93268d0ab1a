//! What the sync needs from the maps, as a trait owned by the sync: the kernel maps
//! implement it (`dataplane::maps`), and `MemStore` implements it in memory so the diff
//! logic is unit-tested without a kernel. The trait and its error type live here, so the
//! sync depends on no kernel code.
//!
//! Keys and backends carry an `IpAddr` (`ServiceKey<IpAddr>`, `Backend<IpAddr>`: the map
//! types of proxy-common, generic over the address): the address says which family's map
//! holds them (`SERVICES` or `SERVICES6`, `BACKENDS` or `BACKENDS6`, `SOURCE_RANGES` or
//! `SOURCE_RANGES6`). Ids, slots and metadata are shared by both families.
//!
//! Two things a pass has carried out that are no Service entries go through the store
//! too, so that the order of everything a pass does is one sequence of store calls (held
//! by `order_tests`): the node's own entries (`put_node_config`) and the destruction of
//! connected UDP sockets pointed at deleted backends (`destroy_udp_sockets`).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use proxy_common::{
    Backend, CtKey, CtKey6, CtValue, CtValue6, IdMarks, MaglevKey, ServiceKey, ServiceMeta, ServiceValue, SlotKey,
    map_names as n,
};

use super::ids::{BackendId, ServiceId};
use crate::model::{IpFamily, IpPrefix, node::LbMode};

/// A `SERVICES` / `SERVICES6` key; port in network byte order as in the maps.
pub type AnyServiceKey = ServiceKey<IpAddr>;
/// A `BACKENDS` / `BACKENDS6` value; port in network byte order as in the maps.
pub type AnyBackend = Backend<IpAddr>;

/// What a conntrack purge decides on, the same for both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtFacts {
    pub proto: u8,
    pub svc_id: ServiceId,
    pub backend_id: BackendId,
}

/// One family's node facts (`NODE_CONFIG`, `NODE_CONFIG6`), which the datapath reads for
/// the flows it source-NATs or hairpins, in the sync's terms (the store encodes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeFacts {
    V4 {
        /// Flows to remote backends are source-NATed to it; `None`: to the address the
        /// client used.
        snat: Option<Ipv4Addr>,
        /// The hairpin source address; unspecified: hairpin SNAT off.
        hairpin: Ipv4Addr,
        /// The SNAT source ports, inclusive (min, max); shared by both families.
        snat_ports: (u16, u16),
        /// `--lb-mode`; shared by both families.
        lb_mode: LbMode,
    },
    V6 {
        snat: Option<Ipv6Addr>,
        hairpin: Ipv6Addr,
    },
}

impl NodeFacts {
    pub fn family(&self) -> IpFamily {
        match self {
            NodeFacts::V4 { .. } => IpFamily::V4,
            NodeFacts::V6 { .. } => IpFamily::V6,
        }
    }
}

/// What destroying the connected UDP sockets of deleted backends did, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketsDestroyed {
    pub destroyed: usize,
    pub elapsed: Duration,
}

/// One `SERVICE_CIDRS` / `SERVICE_CIDRS6` entry (`proxy_common::service_cidr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CidrEntry {
    /// A Service CIDR: an address matching only this is unallocated.
    Cidr,
    /// A frontend address inside a Service CIDR (a host prefix), not a ClusterIP.
    Allocated,
    /// A ClusterIP inside a Service CIDR (a host prefix): its unserved ports are refused.
    ClusterIp,
}

impl CidrEntry {
    /// The map value.
    pub fn value(self) -> u8 {
        match self {
            CidrEntry::Cidr => proxy_common::service_cidr::CIDR,
            CidrEntry::Allocated => proxy_common::service_cidr::ALLOCATED,
            CidrEntry::ClusterIp => proxy_common::service_cidr::CLUSTER_IP,
        }
    }

    /// What `verify` and the CLI call it.
    pub fn name(self) -> &'static str {
        match self {
            CidrEntry::Cidr => "service-cidr",
            CidrEntry::Allocated => "allocated",
            CidrEntry::ClusterIp => "cluster-ip",
        }
    }

    /// The entry a map value stands for (`None`: a value this build does not know).
    pub fn from_value(v: u8) -> Option<Self> {
        match v {
            proxy_common::service_cidr::CIDR => Some(CidrEntry::Cidr),
            proxy_common::service_cidr::ALLOCATED => Some(CidrEntry::Allocated),
            proxy_common::service_cidr::CLUSTER_IP => Some(CidrEntry::ClusterIp),
            _ => None,
        }
    }
}

/// Everything the sync reads back at start-up.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<(AnyServiceKey, ServiceValue)>,
    pub slots: Vec<(SlotKey, BackendId)>,
    pub backends: Vec<(BackendId, AnyBackend)>,
    pub meta: Vec<(ServiceId, ServiceMeta)>,
    pub ranges: Vec<(ServiceId, IpPrefix)>,
    /// The id allocators' persisted high-water marks (zero when none were recorded).
    pub id_marks: IdMarks,
    /// Maglev table slots (`MAGLEV`).
    pub maglev: Vec<(MaglevKey, BackendId)>,
    /// `SERVICE_CIDRS` and `SERVICE_CIDRS6` entries (an entry of a value this build does not
    /// know reads as a CIDR: the next pass rewrites or deletes it).
    pub service_cidrs: Vec<(IpPrefix, CidrEntry)>,
}

/// Why a store operation failed, as far as the sync must tell failures apart: a full map
/// is retried once removals have made room (a full `BACKEND_SLOTS` also allows the
/// in-place fallback); anything else is reported for its frontend as it is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("map {map} is full: raise --{flag}")]
    MapFull { map: &'static str, flag: &'static str },
    /// Any other failure, with the store's own message and cause (for the kernel maps a
    /// `DataplaneError` naming the map), so reports stay as precise as the store makes them.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

pub type StoreResult<T = ()> = Result<T, StoreError>;

pub trait MapStore {
    fn snapshot(&self) -> StoreResult<Snapshot>;
    /// What the sync read back (`snapshot`), before it writes anything: a store that keeps
    /// state derived from the maps brings it up to date here (the kernel maps: the
    /// frontend filter). Nothing by default.
    fn adopt(&mut self, snap: &Snapshot) -> StoreResult {
        let _ = snap;
        Ok(())
    }
    fn put_service(&mut self, k: &AnyServiceKey, v: &ServiceValue) -> StoreResult;
    fn del_service(&mut self, k: &AnyServiceKey) -> StoreResult;
    fn put_slot(&mut self, k: &SlotKey, backend_id: BackendId) -> StoreResult;
    fn del_slot(&mut self, k: &SlotKey) -> StoreResult;
    fn put_backend(&mut self, id: BackendId, b: &AnyBackend) -> StoreResult;
    /// Delete backend `id` from the map of `family`.
    fn del_backend(&mut self, id: BackendId, family: IpFamily) -> StoreResult;
    fn put_meta(&mut self, id: ServiceId, m: &ServiceMeta) -> StoreResult;
    fn del_meta(&mut self, id: ServiceId) -> StoreResult;
    /// Drop the per-service counters of a removed service.
    fn del_stats(&mut self, id: ServiceId) -> StoreResult;
    fn put_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult;
    fn del_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult;
    /// Delete every conntrack entry (both families) matching `pred`; returns how many.
    fn purge_conntrack(&mut self, pred: &dyn Fn(CtFacts) -> bool) -> StoreResult<usize>;
    /// Delete every session-affinity entry (both families) whose (service id, backend id)
    /// matches `pred`; returns how many.
    fn purge_affinity(&mut self, pred: &dyn Fn(ServiceId, BackendId) -> bool) -> StoreResult<usize>;
    /// Persist the id allocators' high-water marks (read back in `Snapshot::id_marks`).
    fn put_id_marks(&mut self, marks: &IdMarks) -> StoreResult;
    /// One slot of a frontend's Maglev table.
    fn put_maglev(&mut self, k: &MaglevKey, backend_id: BackendId) -> StoreResult;
    fn del_maglev(&mut self, k: &MaglevKey) -> StoreResult;
    /// One `SERVICE_CIDRS` / `SERVICE_CIDRS6` entry (the prefix's family picks the map).
    fn put_service_cidr(&mut self, p: IpPrefix, e: CidrEntry) -> StoreResult;
    fn del_service_cidr(&mut self, p: IpPrefix) -> StoreResult;
    /// The size of the Maglev tables the sync builds (`--maglev-table-size`), for a store
    /// that lays tables out itself (the kernel maps: a run of the Maglev array each).
    fn set_maglev_table_size(&mut self, m: u32) {
        let _ = m;
    }

    /// Write one family's node facts (`NODE_CONFIG` / `NODE_CONFIG6`). The sync asks only
    /// when it was given them (`Syncer::set_node_facts`, the agent's); a store without the
    /// node's maps (the pinned maps the CLI and the datapath tests open) refuses, naming
    /// the map.
    fn put_node_config(&mut self, facts: &NodeFacts) -> StoreResult {
        let map = n::of_family(n::NODE_CONFIG, facts.family() == IpFamily::V6);
        Err(StoreError::Other(format!("this store does not hold map {map}").into()))
    }
    /// Destroy the connected UDP sockets that the socket-level hooks pointed at `backends`
    /// (UDP backends this pass deleted: address, port in network byte order), so their
    /// applications reconnect to a live backend. `None`: this store serves no sockets (no
    /// socket-level load balancing), as by default. A socket that cannot be destroyed is
    /// counted by the store, not an error: it goes when its application gives up.
    fn destroy_udp_sockets(&mut self, backends: &[(IpAddr, u16)]) -> Option<SocketsDestroyed> {
        let _ = backends;
        None
    }

    // Many new entries of one kind at once (a cold start into empty maps). The kernel maps
    // write them in batches; these defaults write them one by one.
    /// Backends and slots, the bulk of a cold start: neither names the other's keys, so the
    /// kernel maps write the two batches at once, on two threads.
    fn put_backends_and_slots(
        &mut self,
        backends: &[(BackendId, AnyBackend)],
        slots: &[(SlotKey, BackendId)],
    ) -> StoreResult {
        backends.iter().try_for_each(|(id, b)| self.put_backend(*id, b))?;
        slots.iter().try_for_each(|(k, b)| self.put_slot(k, *b))
    }
    fn put_maglevs(&mut self, items: &[(MaglevKey, BackendId)]) -> StoreResult {
        items.iter().try_for_each(|(k, b)| self.put_maglev(k, *b))
    }
    fn put_metas(&mut self, items: &[(ServiceId, ServiceMeta)]) -> StoreResult {
        items.iter().try_for_each(|(id, m)| self.put_meta(*id, m))
    }
    fn put_services(&mut self, items: &[(AnyServiceKey, ServiceValue)]) -> StoreResult {
        items.iter().try_for_each(|(k, v)| self.put_service(k, v))
    }
}

/// In-memory store with capacity limits, for tests. Both families' services live in one
/// map here (the key's address tells them apart); limits count each family on its own,
/// as the kernel's twin maps do. Ids are held as the numbers the kernel maps hold, so tests
/// can put conntrack and affinity entries in as the datapath would.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub services: BTreeMap<AnyServiceKey, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, AnyBackend>,
    pub meta: BTreeMap<u32, ServiceMeta>,
    pub ranges: BTreeMap<(u32, IpPrefix), ()>,
    pub conntrack: BTreeMap<CtKey, CtValue>,
    pub conntrack6: BTreeMap<CtKey6, CtValue6>,
    /// Session-affinity entries as (client, service id) -> backend id.
    pub affinity: BTreeMap<(IpAddr, u32), u32>,
    pub stats_deleted: Vec<u32>,
    /// Maximum number of service entries per family (None = unlimited), to test "map full".
    pub max_services: Option<usize>,
    /// Maximum number of slot entries (None = unlimited), to test a full `BACKEND_SLOTS`.
    pub max_slots: Option<usize>,
    /// Maximum number of source ranges per family (None = unlimited), to test a full
    /// `SOURCE_RANGES` / `SOURCE_RANGES6`.
    pub max_ranges: Option<usize>,
    pub id_marks: IdMarks,
    /// Maglev table slots.
    pub maglev: BTreeMap<MaglevKey, u32>,
    /// `SERVICE_CIDRS` entries, both families.
    pub service_cidrs: BTreeMap<IpPrefix, CidrEntry>,
    /// Every write, in order, as text: lets tests assert ordering and minimality.
    pub log: Vec<String>,
    /// The node's facts by family (not in `log`: no Service state, and not counted as a
    /// map write by the sync).
    pub node_config: BTreeMap<IpFamily, NodeFacts>,
    /// Refuse to write the node's facts, to test a failed write.
    pub refuse_node_config: bool,
    /// Every UDP backend whose connected sockets a pass had destroyed, in order (no map
    /// write either).
    pub udp_sockets_destroyed: Vec<(IpAddr, u16)>,
}

fn ct_facts<A>(k: &CtKey<A>, v: &CtValue<A>) -> CtFacts {
    CtFacts { proto: k.proto, svc_id: v.svc_id.into(), backend_id: v.backend_id.into() }
}

impl MapStore for MemStore {
    fn snapshot(&self) -> StoreResult<Snapshot> {
        Ok(Snapshot {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: self.slots.iter().map(|(k, v)| (*k, BackendId::new(*v))).collect(),
            backends: self.backends.iter().map(|(k, v)| (BackendId::new(*k), *v)).collect(),
            meta: self.meta.iter().map(|(k, v)| (ServiceId::new(*k), *v)).collect(),
            ranges: self.ranges.keys().map(|(id, p)| (ServiceId::new(*id), *p)).collect(),
            id_marks: self.id_marks,
            maglev: self.maglev.iter().map(|(k, v)| (*k, BackendId::new(*v))).collect(),
            service_cidrs: self.service_cidrs.iter().map(|(p, e)| (*p, *e)).collect(),
        })
    }
    fn put_service(&mut self, k: &AnyServiceKey, v: &ServiceValue) -> StoreResult {
        let family = IpFamily::of(k.addr);
        let same_family = self.services.keys().filter(|s| IpFamily::of(s.addr) == family).count();
        if self.max_services.is_some_and(|max| !self.services.contains_key(k) && same_family >= max) {
            return Err(StoreError::MapFull {
                map: n::of_family(n::SERVICES, family == IpFamily::V6),
                flag: "max-services",
            });
        }
        self.log.push(format!("put_service {} count={} gen={}", v.id, v.count, v.generation));
        self.services.insert(*k, *v);
        Ok(())
    }
    fn del_service(&mut self, k: &AnyServiceKey) -> StoreResult {
        if let Some(v) = self.services.remove(k) {
            self.log.push(format!("del_service {}", v.id));
        }
        Ok(())
    }
    fn put_slot(&mut self, k: &SlotKey, backend_id: BackendId) -> StoreResult {
        // Like a kernel hash map: overwriting an existing key works when full.
        if self.max_slots.is_some_and(|max| !self.slots.contains_key(k) && self.slots.len() >= max) {
            return Err(StoreError::MapFull { map: "BACKEND_SLOTS", flag: "max-backends" });
        }
        self.log.push(format!("put_slot {}/{}/{}={}", k.svc_id, k.generation(), k.index(), backend_id));
        self.slots.insert(*k, backend_id.get());
        Ok(())
    }
    fn del_slot(&mut self, k: &SlotKey) -> StoreResult {
        self.log.push(format!("del_slot {}/{}/{}", k.svc_id, k.generation(), k.index()));
        self.slots.remove(k);
        Ok(())
    }
    fn put_maglev(&mut self, k: &MaglevKey, backend_id: BackendId) -> StoreResult {
        self.log.push(format!("put_maglev {}/{}={}", k.svc_id, k.slot, backend_id));
        self.maglev.insert(*k, backend_id.get());
        Ok(())
    }
    fn del_maglev(&mut self, k: &MaglevKey) -> StoreResult {
        self.log.push(format!("del_maglev {}/{}", k.svc_id, k.slot));
        self.maglev.remove(k);
        Ok(())
    }
    fn put_service_cidr(&mut self, p: IpPrefix, e: CidrEntry) -> StoreResult {
        self.log.push(format!("put_service_cidr {p} {e:?}"));
        self.service_cidrs.insert(p, e);
        Ok(())
    }
    fn del_service_cidr(&mut self, p: IpPrefix) -> StoreResult {
        self.log.push(format!("del_service_cidr {p}"));
        self.service_cidrs.remove(&p);
        Ok(())
    }
    fn put_backend(&mut self, id: BackendId, b: &AnyBackend) -> StoreResult {
        self.log.push(format!("put_backend {id}"));
        self.backends.insert(id.get(), *b);
        Ok(())
    }
    fn del_backend(&mut self, id: BackendId, family: IpFamily) -> StoreResult {
        self.log.push(format!("del_backend {id}"));
        // Only from its own family's map, like the kernel store.
        if self.backends.get(&id.get()).is_some_and(|b| IpFamily::of(b.addr) == family) {
            self.backends.remove(&id.get());
        }
        Ok(())
    }
    fn put_meta(&mut self, id: ServiceId, m: &ServiceMeta) -> StoreResult {
        self.log.push(format!("put_meta {id}"));
        self.meta.insert(id.get(), *m);
        Ok(())
    }
    fn del_meta(&mut self, id: ServiceId) -> StoreResult {
        self.log.push(format!("del_meta {id}"));
        self.meta.remove(&id.get());
        Ok(())
    }
    fn del_stats(&mut self, id: ServiceId) -> StoreResult {
        self.stats_deleted.push(id.get());
        Ok(())
    }
    fn put_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult {
        let family = IpFamily::of(p.addr);
        let same_family = self.ranges.keys().filter(|(_, r)| IpFamily::of(r.addr) == family).count();
        if self.max_ranges.is_some_and(|max| !self.ranges.contains_key(&(svc_id.get(), p)) && same_family >= max) {
            return Err(StoreError::MapFull {
                map: n::of_family(n::SOURCE_RANGES, family == IpFamily::V6),
                flag: "max-source-ranges",
            });
        }
        self.log.push(format!("put_range {svc_id} {p}"));
        self.ranges.insert((svc_id.get(), p), ());
        Ok(())
    }
    fn del_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult {
        self.log.push(format!("del_range {svc_id} {p}"));
        self.ranges.remove(&(svc_id.get(), p));
        Ok(())
    }
    fn purge_conntrack(&mut self, pred: &dyn Fn(CtFacts) -> bool) -> StoreResult<usize> {
        let before = self.conntrack.len() + self.conntrack6.len();
        self.conntrack.retain(|k, v| !pred(ct_facts(k, v)));
        self.conntrack6.retain(|k, v| !pred(ct_facts(k, v)));
        Ok(before - self.conntrack.len() - self.conntrack6.len())
    }
    fn purge_affinity(&mut self, pred: &dyn Fn(ServiceId, BackendId) -> bool) -> StoreResult<usize> {
        let before = self.affinity.len();
        self.affinity.retain(|(_, svc), backend| !pred(ServiceId::new(*svc), BackendId::new(*backend)));
        Ok(before - self.affinity.len())
    }
    fn put_id_marks(&mut self, marks: &IdMarks) -> StoreResult {
        self.log.push(format!("put_id_marks {} {}", marks.next_service_id, marks.next_backend_id));
        self.id_marks = *marks;
        Ok(())
    }
    fn put_node_config(&mut self, facts: &NodeFacts) -> StoreResult {
        if self.refuse_node_config {
            return Err(StoreError::Other("refused".into()));
        }
        self.node_config.insert(facts.family(), *facts);
        Ok(())
    }
    /// Serves sockets, but holds none: records the backends, destroys nothing.
    fn destroy_udp_sockets(&mut self, backends: &[(IpAddr, u16)]) -> Option<SocketsDestroyed> {
        self.udp_sockets_destroyed.extend_from_slice(backends);
        Some(SocketsDestroyed::default())
    }
}
