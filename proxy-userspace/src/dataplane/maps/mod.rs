//! Typed handles on the pinned maps. The agent gets them from the freshly loaded object;
//! the CLI opens the pins directly, so it works whether or not the agent runs.
pub mod addr;
pub mod catalogue;
pub mod copy;
pub mod ct;
pub mod ct_legacy;
pub mod filter;
pub mod loader;
pub mod maglev;
pub mod migrate;
pub mod node;
pub mod pins;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
};
use proxy_common::{
    AffinityKey, AffinityKey6, AffinityValue, Backend, Backend6, Counters, CtKey, CtKey6, CtValue, CtValue6, IdMarks,
    Ipv6Words, MaglevKey, PROTO_UDP, ServiceKey, ServiceKey6, ServiceMeta, ServiceValue, SlotKey, SockUdpKey,
    SockUdpKey6, SockUdpValue, SourceRangeData6, StatsFamily, StatsKey, map_names as n,
};

use self::addr::{ip_from_map, ip_to_map, ip6_from_map, ip6_to_map};
use crate::dataplane::{DataplaneError, kernel::bpfsys, paths};
use crate::{
    model::{IpFamily, IpPrefix},
    sync::{
        ids::{BackendId, ServiceId},
        store::{AnyBackend, AnyServiceKey, CidrEntry, CtFacts, MapStore, Snapshot, StoreError, StoreResult},
    },
};

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    /// Assured flows (never evicted) and unassured ones (`CT_NEW`, an LRU): a flow is in one
    /// or the other (see `proxy_common::ct_flags::ASSURED`).
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub ct_new: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub service_stats: PerCpuHashMap<MapData, StatsKey, Counters>,
    pub global_stats: PerCpuArray<MapData, Counters>,
    pub meta: HashMap<MapData, u32, ServiceMeta>,
    pub source_ranges: LpmTrie<MapData, [u32; 2], u8>,
    // IPv6 twins of the maps that hold addresses (ids, slots, metadata, counters shared).
    pub services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub backends6: HashMap<MapData, u32, Backend6>,
    pub conntrack6: HashMap<MapData, CtKey6, CtValue6>,
    pub ct_new6: HashMap<MapData, CtKey6, CtValue6>,
    pub affinity6: HashMap<MapData, AffinityKey6, AffinityValue>,
    pub source_ranges6: LpmTrie<MapData, SourceRangeData6, u8>,
    /// Backends kept by unconnected UDP sockets of the socket-level hooks (LRU).
    pub sock_udp: HashMap<MapData, SockUdpKey, SockUdpValue>,
    pub sock_udp6: HashMap<MapData, SockUdpKey6, SockUdpValue>,
    /// The sync's id high-water marks. None when the pins predate it (the CLI reading an
    /// older agent's maps); the agent's own object always has it.
    pub sync_ids: Option<Array<MapData, IdMarks>>,
    /// Maglev tables: backend ids, a run per Maglev frontend (`maglev::Runs`). None when
    /// the pins predate it (the CLI reading an older agent's maps); the agent's own object
    /// always has it.
    pub maglev: Option<Array<MapData, u32>>,
    /// Where each frontend's table lives in `maglev` (read back from the `SERVICES` values).
    maglev_runs: maglev::Runs,
    /// Service CIDRs and the frontend addresses inside them (`proxy_common::service_cidr`).
    /// None when the pins predate them (the CLI reading an older agent's maps).
    pub service_cidrs: Option<LpmTrie<MapData, u32, u8>>,
    pub service_cidrs6: Option<LpmTrie<MapData, Ipv6Words, u8>>,
    /// Which destinations may be a frontend (`filter`). Only the agent's own object has it:
    /// the CLI and the datapath tests open the pins without it and never write it (their
    /// copy could only go stale under the agent's writes).
    filter: Option<filter::FrontendFilter>,
}

/// A map that pins of an older agent may lack: `None` then.
fn optional<T>(
    name: &'static str,
    get: &mut impl FnMut(&'static str) -> Result<Map, DataplaneError>,
) -> Result<Option<T>, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    match get(name) {
        Ok(m) => Ok(Some(typed(name, m)?)),
        Err(DataplaneError::NotPinned { .. } | DataplaneError::MissingObject(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn typed<T>(name: &'static str, map: Map) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|e| DataplaneError::from_map(name, e))
}

impl Maps {
    /// Take the maps out of a loaded object (programs keep their references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::MissingObject(name));
        let mut maps = Self::assemble(&mut take)?;
        let map = take(n::FRONTEND_FILTER)?;
        maps.filter = Some(filter::FrontendFilter::open(typed(n::FRONTEND_FILTER, map)?)?);
        Ok(maps)
    }

    /// Build the typed handles from a source of maps by name (shared by the agent's and
    /// the CLI's constructors).
    fn assemble(get: &mut impl FnMut(&'static str) -> Result<Map, DataplaneError>) -> Result<Self, DataplaneError> {
        let mut maps = Maps {
            services: typed(n::SERVICES, get(n::SERVICES)?)?,
            slots: typed(n::BACKEND_SLOTS, get(n::BACKEND_SLOTS)?)?,
            backends: typed(n::BACKENDS, get(n::BACKENDS)?)?,
            conntrack: typed(n::CONNTRACK, get(n::CONNTRACK)?)?,
            ct_new: typed(n::CT_NEW, get(n::CT_NEW)?)?,
            affinity: typed(n::AFFINITY, get(n::AFFINITY)?)?,
            service_stats: typed(n::SERVICE_STATS, get(n::SERVICE_STATS)?)?,
            global_stats: typed(n::GLOBAL_STATS, get(n::GLOBAL_STATS)?)?,
            meta: typed(n::SERVICE_META, get(n::SERVICE_META)?)?,
            source_ranges: typed(n::SOURCE_RANGES, get(n::SOURCE_RANGES)?)?,
            services6: typed(n::SERVICES6, get(n::SERVICES6)?)?,
            backends6: typed(n::BACKENDS6, get(n::BACKENDS6)?)?,
            conntrack6: typed(n::CONNTRACK6, get(n::CONNTRACK6)?)?,
            ct_new6: typed(n::CT_NEW6, get(n::CT_NEW6)?)?,
            affinity6: typed(n::AFFINITY6, get(n::AFFINITY6)?)?,
            source_ranges6: typed(n::SOURCE_RANGES6, get(n::SOURCE_RANGES6)?)?,
            sock_udp: typed(n::SOCK_UDP_BACKENDS, get(n::SOCK_UDP_BACKENDS)?)?,
            sock_udp6: typed(n::SOCK_UDP_BACKENDS6, get(n::SOCK_UDP_BACKENDS6)?)?,
            sync_ids: optional(n::SYNC_IDS, get)?,
            maglev: optional(n::MAGLEV, get)?,
            service_cidrs: optional(n::SERVICE_CIDRS, get)?,
            service_cidrs6: optional(n::SERVICE_CIDRS6, get)?,
            maglev_runs: maglev::Runs::new(0),
            filter: None,
        };
        maps.maglev_runs = maps.read_maglev_runs()?;
        Ok(maps)
    }

    /// The runs of `MAGLEV_SLOTS` the `SERVICES` values name (see `maglev::Runs::read_back`).
    fn read_maglev_runs(&self) -> Result<maglev::Runs, DataplaneError> {
        let Some(array) = &self.maglev else { return Ok(maglev::Runs::new(0)) };
        let mut values = Vec::new();
        for r in self.services.iter() {
            values.push(r.map_err(|e| DataplaneError::from_map(n::SERVICES, e))?.1);
        }
        for r in self.services6.iter() {
            values.push(r.map_err(|e| DataplaneError::from_map(n::SERVICES6, e))?.1);
        }
        Ok(maglev::Runs::read_back(array.len(), &values))
    }

    /// New Maglev tables get `m` slots (`--maglev-table-size`).
    pub fn set_maglev_table_size(&mut self, m: u32) {
        self.maglev_runs.set_table_size(m);
    }

    /// The backend id in slot `slot` of frontend `svc_id`'s Maglev table, if written.
    pub fn maglev_slot(&self, svc_id: u32, slot: u32) -> Option<u32> {
        let index = self.maglev_runs.index(svc_id, slot)?;
        self.maglev.as_ref()?.get(&index, 0).ok().filter(|id| *id != 0)
    }

    /// Slots `[base, base + len)` of the Maglev array in one `BPF_MAP_LOOKUP_BATCH` per
    /// chunk (a table is thousands of slots: one syscall each would dominate a start).
    fn read_maglev_run(&self, base: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        let array = self.maglev.as_ref().ok_or(DataplaneError::MissingObject(n::MAGLEV))?;
        let fd = aya::maps::IterableMap::map(array).fd().as_fd();
        let mut out = Vec::with_capacity(len as usize);
        // The batch walk starts after its cursor; `base` is at least 1.
        let mut cursor = base.checked_sub(1);
        while (out.len() as u32) < len {
            let want = (len - out.len() as u32).min(UPDATE_BATCH as u32);
            let mut keys = vec![0u8; want as usize * 4];
            let mut values = vec![0u8; want as usize * 4];
            let (got, next) = bpfsys::map_lookup_batch(fd, cursor, &mut keys, &mut values, want).map_err(|e| {
                DataplaneError::from_map(
                    n::MAGLEV,
                    aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error: e,
                    }),
                )
            })?;
            out.extend(values[..got * 4].chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])));
            match next {
                Some(c) if got > 0 => cursor = Some(c),
                _ => break,
            }
        }
        out.truncate(len as usize);
        Ok(out)
    }

    /// Write Maglev slots: each placed by its frontend's run (copying a run that moved
    /// first), then one batched update.
    fn write_maglev(&mut self, items: &[(MaglevKey, BackendId)]) -> StoreResult {
        if items.is_empty() {
            return Ok(());
        }
        if self.maglev.is_none() {
            return Err(DataplaneError::MissingObject(n::MAGLEV).into());
        }
        let mut writes: Vec<(u32, u32)> = Vec::with_capacity(items.len());
        for (k, b) in items {
            match self.maglev_runs.place(k.svc_id, k.slot) {
                Ok(maglev::Place::At(i)) => writes.push((i, b.get())),
                Ok(maglev::Place::Moved { from, to, len, index }) => {
                    // Earlier writes of this batch may sit in the old run: land them first.
                    self.update_maglev(&std::mem::take(&mut writes))?;
                    let old = self.read_maglev_run(from, len)?;
                    let copied: Vec<(u32, u32)> = old.into_iter().zip(to..).map(|(id, i)| (i, id)).collect();
                    self.update_maglev(&copied)?;
                    writes.push((index, b.get()));
                }
                Err(maglev::Full) => {
                    return Err(
                        DataplaneError::MapFull { map: n::MAGLEV, flag: catalogue::size_flag(n::MAGLEV) }.into()
                    );
                }
            }
        }
        self.update_maglev(&writes)
    }

    fn update_maglev(&self, writes: &[(u32, u32)]) -> StoreResult {
        let array = self.maglev.as_ref().ok_or(DataplaneError::MissingObject(n::MAGLEV))?;
        update_batch(array, n::MAGLEV, writes.iter().copied())
    }

    /// Open the maps an agent pinned under `root` (read by the CLI).
    pub fn open_pinned(root: &Path) -> Result<Self, DataplaneError> {
        let dir = paths::maps_dir(root);
        let mut open = |name: &'static str| -> Result<Map, DataplaneError> {
            let data = open_pin(&dir, name)?.ok_or_else(|| DataplaneError::NotPinned { path: dir.clone() })?;
            Map::from_map_data(data).map_err(|e| DataplaneError::from_map(name, e))
        };
        Self::assemble(&mut open)
    }
}

/// The pin of map `name` in the maps directory `dir`: `None` when it is not pinned; no
/// permission is an error naming the path.
pub fn open_pin(dir: &Path, name: &'static str) -> Result<Option<MapData>, DataplaneError> {
    let path = dir.join(name);
    match MapData::from_pin(&path) {
        Ok(d) => Ok(Some(d)),
        Err(aya::maps::MapError::SyscallError(s)) if s.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(aya::maps::MapError::SyscallError(s)) if s.io_error.kind() == io::ErrorKind::PermissionDenied => {
            Err(DataplaneError::Permission { path })
        }
        Err(e) => Err(DataplaneError::from_map(name, e)),
    }
}

/// The text of a NUL-padded name field of the maps (`ServiceMeta`'s namespace, name, port).
pub fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Sizes of the maps in use, as the kernel reports them (for fill ratios: after a
/// migration, or when pins were re-used, they are what counts, not the flags). The IPv6
/// twins are sized by the same flags as their IPv4 maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    pub conntrack: u32,
    pub services6: u32,
    pub backends6: u32,
    pub conntrack6: u32,
}

impl Maps {
    /// A flow's entry under `key`, from whichever table holds it (assured or not).
    pub fn ct_get(&self, key: &CtKey) -> Option<CtValue> {
        self.conntrack.get(key, 0).or_else(|_| self.ct_new.get(key, 0)).ok()
    }

    /// `ct_get` for IPv6.
    pub fn ct_get6(&self, key: &CtKey6) -> Option<CtValue6> {
        self.conntrack6.get(key, 0).or_else(|_| self.ct_new6.get(key, 0)).ok()
    }

    /// Conntrack entries of both families in both tables.
    pub fn ct_len(&self) -> usize {
        self.conntrack.keys().count()
            + self.ct_new.keys().count()
            + self.conntrack6.keys().count()
            + self.ct_new6.keys().count()
    }

    pub fn capacities(&self) -> Capacities {
        use aya::maps::IterableMap;
        let max = |m: &MapData| m.info().map(|i| i.max_entries()).unwrap_or(0);
        Capacities {
            services: max(self.services.map()),
            backends: max(self.backends.map()),
            slots: max(self.slots.map()),
            conntrack: max(self.conntrack.map()),
            services6: max(self.services6.map()),
            backends6: max(self.backends6.map()),
            conntrack6: max(self.conntrack6.map()),
        }
    }
}

/// One verdict's node-wide counters in `family`'s block, summed over CPUs; zero for an index
/// that a GLOBAL_STATS pinned by an older agent does not have (its flat layout is the
/// `Other` block, so its counts read back there).
pub fn global_counters(
    map: &PerCpuArray<MapData, Counters>,
    family: StatsFamily,
    verdict: u32,
) -> Result<Counters, DataplaneError> {
    let index = family.index(verdict);
    if verdict >= proxy_common::verdict::STRIDE || index >= map.len() {
        return Ok(Counters::default());
    }
    let pc = map.get(&index, 0).map_err(|e| DataplaneError::from_map(n::GLOBAL_STATS, e))?;
    Ok(pc.iter().fold(Counters::default(), |a, c| add(a, *c)))
}

/// One verdict's node-wide counters, every family together.
pub fn global_total(map: &PerCpuArray<MapData, Counters>, verdict: u32) -> Result<Counters, DataplaneError> {
    StatsFamily::ALL.iter().try_fold(Counters::default(), |a, f| Ok(add(a, global_counters(map, *f, verdict)?)))
}

fn add(a: Counters, b: Counters) -> Counters {
    Counters { packets: a.packets + b.packets, bytes: a.bytes + b.bytes }
}

/// GLOBAL_STATS on its own, for readers that need nothing else (the conntrack GC watches
/// the `ct_full` counter).
pub struct GlobalStats(PerCpuArray<MapData, Counters>);

impl GlobalStats {
    pub fn open_pinned(root: &Path) -> Result<Self, DataplaneError> {
        let path = paths::maps_dir(root).join(n::GLOBAL_STATS);
        let data = MapData::from_pin(&path).map_err(|e| DataplaneError::from_map(n::GLOBAL_STATS, e))?;
        let map = Map::from_map_data(data).map_err(|e| DataplaneError::from_map(n::GLOBAL_STATS, e))?;
        Ok(GlobalStats(typed(n::GLOBAL_STATS, map)?))
    }

    pub fn total(&self, verdict: u32) -> Result<Counters, DataplaneError> {
        global_total(&self.0, verdict)
    }

    pub fn counters(&self, family: StatsFamily, verdict: u32) -> Result<Counters, DataplaneError> {
        global_counters(&self.0, family, verdict)
    }
}

/// Deleting what is already gone is not an error for the sync.
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}

fn range_key(svc_id: ServiceId, addr: Ipv4Addr, len: u8) -> Key<[u32; 2]> {
    Key::new(32 + u32::from(len), [svc_id.get().to_be(), ip_to_map(addr)])
}

/// `SOURCE_RANGES6` key: the big-endian service id, then the IPv6 prefix.
fn range_key6(svc_id: ServiceId, addr: Ipv6Addr, len: u8) -> Key<SourceRangeData6> {
    let [a, b, c, d] = ip6_to_map(addr);
    Key::new(32 + u32::from(len), [svc_id.get().to_be(), a, b, c, d])
}

fn ct_facts<A>(k: &CtKey<A>, v: &CtValue<A>) -> CtFacts {
    CtFacts { proto: k.proto, svc_id: v.svc_id.into(), backend_id: v.backend_id.into() }
}

/// Delete the entries of one conntrack map that `pred` selects; returns how many.
fn purge<K, V>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    pred: impl Fn(&K, &V) -> bool,
) -> Result<usize, DataplaneError>
where
    K: aya::Pod,
    V: aya::Pod,
{
    // Collect first: deleting while iterating a BPF hash map restarts the walk.
    let doomed: Vec<K> = map.iter().filter_map(Result::ok).filter(|(k, v)| pred(k, v)).map(|(k, _)| k).collect();
    for k in &doomed {
        ignore_missing(map.remove(k)).map_err(|e| DataplaneError::from_map(name, e))?;
    }
    Ok(doomed.len())
}

impl Maps {
    /// Everything the sync reads back, with the kernel's error (the CLI and `verify`
    /// report it as is).
    pub fn read_snapshot(&self) -> Result<Snapshot, DataplaneError> {
        let collect_err = |name: &'static str| move |e| DataplaneError::from_map(name, e);
        let mut snap = Snapshot::default();
        for r in self.services.iter() {
            let (k, v) = r.map_err(collect_err(n::SERVICES))?;
            snap.services.push((key_with(&k, IpAddr::V4(ip_from_map(k.addr))), v));
        }
        for r in self.services6.iter() {
            let (k, v) = r.map_err(collect_err(n::SERVICES6))?;
            snap.services.push((key_with(&k, IpAddr::V6(ip6_from_map(k.addr))), v));
        }
        for r in self.slots.iter() {
            let (k, id) = r.map_err(collect_err(n::BACKEND_SLOTS))?;
            snap.slots.push((k, BackendId::new(id)));
        }
        for r in self.backends.iter() {
            let (id, b) = r.map_err(collect_err(n::BACKENDS))?;
            snap.backends.push((BackendId::new(id), backend_with(&b, IpAddr::V4(ip_from_map(b.addr)))));
        }
        for r in self.backends6.iter() {
            let (id, b) = r.map_err(collect_err(n::BACKENDS6))?;
            snap.backends.push((BackendId::new(id), backend_with(&b, IpAddr::V6(ip6_from_map(b.addr)))));
        }
        for r in self.meta.iter() {
            let (id, m) = r.map_err(collect_err(n::SERVICE_META))?;
            snap.meta.push((ServiceId::new(id), m));
        }
        for r in self.source_ranges.iter() {
            let (k, _) = r.map_err(collect_err(n::SOURCE_RANGES))?;
            let [svc_be, addr] = k.data();
            let len = k.prefix_len().saturating_sub(32).min(32) as u8;
            snap.ranges
                .push((ServiceId::new(u32::from_be(svc_be)), IpPrefix { addr: IpAddr::V4(ip_from_map(addr)), len }));
        }
        for r in self.source_ranges6.iter() {
            let (k, _) = r.map_err(collect_err(n::SOURCE_RANGES6))?;
            let [svc_be, a, b, c, d] = k.data();
            let len = k.prefix_len().saturating_sub(32).min(128) as u8;
            snap.ranges.push((
                ServiceId::new(u32::from_be(svc_be)),
                IpPrefix { addr: IpAddr::V6(ip6_from_map([a, b, c, d])), len },
            ));
        }
        if let Some(ids) = &self.sync_ids {
            snap.id_marks = ids.get(&0, 0).map_err(collect_err(n::SYNC_IDS))?;
        }
        // The tables the values publish, each read from its run. A value whose run is
        // unusable (migrated from before runs, overlapping another) reads as publishing no
        // table: the datapath uses none, and the sync writes and publishes it afresh.
        for (_, v) in &mut snap.services {
            let Some((base, size)) = maglev::published(v) else {
                (v.maglev_size, v.maglev_base) = (0, 0);
                continue;
            };
            if self.maglev_runs.index(v.id, 0) != Some(base) || self.maglev_runs.index(v.id, size - 1).is_none() {
                (v.maglev_size, v.maglev_base) = (0, 0);
                continue;
            }
            for (slot, id) in self.read_maglev_run(base, size)?.into_iter().enumerate() {
                if id != 0 {
                    snap.maglev.push((MaglevKey { svc_id: v.id, slot: slot as u32 }, BackendId::new(id)));
                }
            }
        }
        let entry = |v: u8| CidrEntry::from_value(v).unwrap_or(CidrEntry::Cidr);
        if let Some(m) = &self.service_cidrs {
            for r in m.iter() {
                let (k, v) = r.map_err(collect_err(n::SERVICE_CIDRS))?;
                let len = k.prefix_len().min(32) as u8;
                snap.service_cidrs.push((IpPrefix { addr: IpAddr::V4(ip_from_map(k.data())), len }, entry(v)));
            }
        }
        if let Some(m) = &self.service_cidrs6 {
            for r in m.iter() {
                let (k, v) = r.map_err(collect_err(n::SERVICE_CIDRS6))?;
                let len = k.prefix_len().min(128) as u8;
                snap.service_cidrs.push((IpPrefix { addr: IpAddr::V6(ip6_from_map(k.data())), len }, entry(v)));
            }
        }
        Ok(snap)
    }
}

/// A failed map operation as the sync sees it (a full map stays recognisable).
fn store_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> StoreError {
    move |e| DataplaneError::from_map(map, e).into()
}

/// Entries per `BPF_MAP_UPDATE_BATCH` call: big enough to amortise the syscall, small
/// enough that the staging copies stay a few hundred KiB.
const UPDATE_BATCH: usize = 8192;

/// Write `entries` into `map` (a hash, or an array keyed by index) with batched updates.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &impl aya::maps::IterableMap<K, V>,
    name: &'static str,
    entries: impl Iterator<Item = (K, V)>,
) -> StoreResult {
    let fd = aya::maps::IterableMap::map(map).fd().as_fd();
    let entries: Vec<(K, V)> = entries.collect();
    for chunk in entries.chunks(UPDATE_BATCH) {
        let (keys, values): (Vec<K>, Vec<V>) = chunk.iter().copied().unzip();
        // SAFETY: byte views of two live vectors of plain `#[repr(C)]` map types without
        // padding (the same bytes aya passes for a single update).
        let (kb, vb) = unsafe {
            (
                std::slice::from_raw_parts(keys.as_ptr() as *const u8, keys.len() * size_of::<K>()),
                std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * size_of::<V>()),
            )
        };
        bpfsys::map_update_batch(fd, kb, vb, chunk.len() as u32).map_err(|(done, e)| {
            let e =
                aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_batch", io_error: e });
            tracing::debug!(map = name, done, "batched update stopped");
            StoreError::from(DataplaneError::from_map(name, e))
        })?;
    }
    Ok(())
}

impl Maps {
    fn write_backends(&self, items: &[(BackendId, AnyBackend)]) -> StoreResult {
        let v4 = items.iter().filter_map(|(id, b)| match b.addr {
            IpAddr::V4(a) => Some((id.get(), backend_with(b, ip_to_map(a)))),
            IpAddr::V6(_) => None,
        });
        update_batch(&self.backends, n::BACKENDS, v4)?;
        let v6 = items.iter().filter_map(|(id, b)| match b.addr {
            IpAddr::V6(a) => Some((id.get(), backend_with(b, ip6_to_map(a)))),
            IpAddr::V4(_) => None,
        });
        update_batch(&self.backends6, n::BACKENDS6, v6)
    }

    fn write_slots(&self, items: &[(SlotKey, BackendId)]) -> StoreResult {
        update_batch(&self.slots, n::BACKEND_SLOTS, items.iter().map(|(k, b)| (*k, b.get())))
    }
}

impl MapStore for Maps {
    fn snapshot(&self) -> StoreResult<Snapshot> {
        Ok(self.read_snapshot()?)
    }
    /// The two batches on two threads: different maps, each insert its own syscall work
    /// (hashing, bucket locks, allocation) that the other does not wait for.
    fn put_backends_and_slots(
        &mut self,
        backends: &[(BackendId, AnyBackend)],
        slots: &[(SlotKey, BackendId)],
    ) -> StoreResult {
        self.mark_backends(backends.iter().map(|(_, b)| b))?;
        let this = &*self;
        std::thread::scope(|s| {
            let slots_written = s.spawn(|| this.write_slots(slots));
            let backends_written = this.write_backends(backends);
            let slots_written = slots_written.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            backends_written.and(slots_written)
        })
    }
    fn put_maglevs(&mut self, items: &[(MaglevKey, BackendId)]) -> StoreResult {
        self.write_maglev(items)
    }
    fn put_metas(&mut self, items: &[(ServiceId, ServiceMeta)]) -> StoreResult {
        update_batch(&self.meta, n::SERVICE_META, items.iter().map(|(id, m)| (id.get(), *m)))
    }
    fn put_services(&mut self, items: &[(AnyServiceKey, ServiceValue)]) -> StoreResult {
        self.mark_frontends(items.iter().map(|(k, _)| k))?;
        let items: Vec<(AnyServiceKey, ServiceValue)> =
            items.iter().map(|(k, v)| (*k, self.maglev_runs.fill(v))).collect();
        let v4 = items.iter().filter_map(|(k, v)| match k.addr {
            IpAddr::V4(a) => Some((key_with(k, ip_to_map(a)), *v)),
            IpAddr::V6(_) => None,
        });
        update_batch(&self.services, n::SERVICES, v4)?;
        let v6 = items.iter().filter_map(|(k, v)| match k.addr {
            IpAddr::V6(a) => Some((key_with(k, ip6_to_map(a)), *v)),
            IpAddr::V4(_) => None,
        });
        update_batch(&self.services6, n::SERVICES6, v6)
    }
    fn put_service(&mut self, k: &AnyServiceKey, v: &ServiceValue) -> StoreResult {
        self.mark_frontends([k])?;
        let v = &self.maglev_runs.fill(v);
        match k.addr {
            IpAddr::V4(a) => self.services.insert(key_with(k, ip_to_map(a)), v, 0).map_err(store_err(n::SERVICES)),
            IpAddr::V6(a) => self.services6.insert(key_with(k, ip6_to_map(a)), v, 0).map_err(store_err(n::SERVICES6)),
        }
    }
    fn del_service(&mut self, k: &AnyServiceKey) -> StoreResult {
        match k.addr {
            IpAddr::V4(a) => {
                ignore_missing(self.services.remove(&key_with(k, ip_to_map(a)))).map_err(store_err(n::SERVICES))
            }
            IpAddr::V6(a) => {
                ignore_missing(self.services6.remove(&key_with(k, ip6_to_map(a)))).map_err(store_err(n::SERVICES6))
            }
        }
    }
    fn put_slot(&mut self, k: &SlotKey, backend_id: BackendId) -> StoreResult {
        self.slots.insert(k, backend_id.get(), 0).map_err(store_err(n::BACKEND_SLOTS))
    }
    fn del_slot(&mut self, k: &SlotKey) -> StoreResult {
        ignore_missing(self.slots.remove(k)).map_err(store_err(n::BACKEND_SLOTS))
    }
    fn put_backend(&mut self, id: BackendId, b: &AnyBackend) -> StoreResult {
        self.mark_backends([b])?;
        let id = id.get();
        match b.addr {
            IpAddr::V4(a) => self.backends.insert(id, backend_with(b, ip_to_map(a)), 0).map_err(store_err(n::BACKENDS)),
            IpAddr::V6(a) => {
                self.backends6.insert(id, backend_with(b, ip6_to_map(a)), 0).map_err(store_err(n::BACKENDS6))
            }
        }
    }
    fn del_backend(&mut self, id: BackendId, family: IpFamily) -> StoreResult {
        let id = id.get();
        match family {
            IpFamily::V4 => ignore_missing(self.backends.remove(&id)).map_err(store_err(n::BACKENDS)),
            IpFamily::V6 => ignore_missing(self.backends6.remove(&id)).map_err(store_err(n::BACKENDS6)),
        }
    }
    fn put_meta(&mut self, id: ServiceId, m: &ServiceMeta) -> StoreResult {
        self.meta.insert(id.get(), m, 0).map_err(store_err(n::SERVICE_META))
    }
    fn del_meta(&mut self, id: ServiceId) -> StoreResult {
        ignore_missing(self.meta.remove(&id.get())).map_err(store_err(n::SERVICE_META))
    }
    fn del_stats(&mut self, id: ServiceId) -> StoreResult {
        for verdict in 0..proxy_common::verdict::COUNT {
            ignore_missing(self.service_stats.remove(&StatsKey { svc_id: id.get(), verdict }))
                .map_err(store_err(n::SERVICE_STATS))?;
        }
        Ok(())
    }
    fn put_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult {
        match p.addr {
            IpAddr::V4(a) => {
                self.source_ranges.insert(&range_key(svc_id, a, p.len), 1, 0).map_err(store_err(n::SOURCE_RANGES))
            }
            IpAddr::V6(a) => {
                self.source_ranges6.insert(&range_key6(svc_id, a, p.len), 1, 0).map_err(store_err(n::SOURCE_RANGES6))
            }
        }
    }
    fn del_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult {
        match p.addr {
            IpAddr::V4(a) => ignore_missing(self.source_ranges.remove(&range_key(svc_id, a, p.len)))
                .map_err(store_err(n::SOURCE_RANGES)),
            IpAddr::V6(a) => ignore_missing(self.source_ranges6.remove(&range_key6(svc_id, a, p.len)))
                .map_err(store_err(n::SOURCE_RANGES6)),
        }
    }
    fn purge_conntrack(&mut self, pred: &dyn Fn(CtFacts) -> bool) -> StoreResult<usize> {
        let mut count = purge(&mut self.conntrack, n::CONNTRACK, |k, v| pred(ct_facts(k, v)))?;
        count += purge(&mut self.ct_new, n::CT_NEW, |k, v| pred(ct_facts(k, v)))?;
        count += purge(&mut self.conntrack6, n::CONNTRACK6, |k, v| pred(ct_facts(k, v)))?;
        count += purge(&mut self.ct_new6, n::CT_NEW6, |k, v| pred(ct_facts(k, v)))?;
        // The backends unconnected UDP sockets keep are the socket level's UDP conntrack:
        // what purges a UDP flow's entry purges them too (their backend left the frontend).
        let sock = |v: &SockUdpValue| {
            pred(CtFacts { proto: PROTO_UDP, svc_id: v.svc_id.into(), backend_id: v.backend_id.into() })
        };
        let s4 = purge(&mut self.sock_udp, n::SOCK_UDP_BACKENDS, |_, v| sock(v))?;
        let s6 = purge(&mut self.sock_udp6, n::SOCK_UDP_BACKENDS6, |_, v| sock(v))?;
        if s4 + s6 > 0 {
            tracing::debug!(entries = s4 + s6, "purged backends kept by unconnected UDP sockets");
        }
        Ok(count)
    }

    fn purge_affinity(&mut self, pred: &dyn Fn(ServiceId, BackendId) -> bool) -> StoreResult<usize> {
        let pred = |svc_id: u32, backend_id: u32| pred(svc_id.into(), backend_id.into());
        let v4 = purge(&mut self.affinity, n::AFFINITY, |k, v| pred(k.svc_id, v.backend_id))?;
        let v6 = purge(&mut self.affinity6, n::AFFINITY6, |k, v| pred(k.svc_id, v.backend_id))?;
        Ok(v4 + v6)
    }

    fn put_maglev(&mut self, k: &MaglevKey, backend_id: BackendId) -> StoreResult {
        self.write_maglev(&[(*k, backend_id)])
    }
    fn del_maglev(&mut self, k: &MaglevKey) -> StoreResult {
        // Nothing to write: an element no value reaches is never read; the run goes back
        // with its last slot.
        self.maglev_runs.remove(k.svc_id, k.slot);
        Ok(())
    }
    fn set_maglev_table_size(&mut self, m: u32) {
        Maps::set_maglev_table_size(self, m);
    }
    fn put_service_cidr(&mut self, p: IpPrefix, e: CidrEntry) -> StoreResult {
        if e == CidrEntry::Cidr
            && let Some(f) = &mut self.filter
        {
            f.bits.cidr(p);
            f.flush()?;
        }
        let len = u32::from(p.len);
        match p.addr {
            IpAddr::V4(a) => cidr_map(&mut self.service_cidrs, n::SERVICE_CIDRS)?
                .insert(&Key::new(len, ip_to_map(a)), e.value(), 0)
                .map_err(store_err(n::SERVICE_CIDRS)),
            IpAddr::V6(a) => cidr_map(&mut self.service_cidrs6, n::SERVICE_CIDRS6)?
                .insert(&Key::new(len, ip6_to_map(a)), e.value(), 0)
                .map_err(store_err(n::SERVICE_CIDRS6)),
        }
    }
    fn del_service_cidr(&mut self, p: IpPrefix) -> StoreResult {
        let len = u32::from(p.len);
        match p.addr {
            IpAddr::V4(a) => ignore_missing(
                cidr_map(&mut self.service_cidrs, n::SERVICE_CIDRS)?.remove(&Key::new(len, ip_to_map(a))),
            )
            .map_err(store_err(n::SERVICE_CIDRS)),
            IpAddr::V6(a) => ignore_missing(
                cidr_map(&mut self.service_cidrs6, n::SERVICE_CIDRS6)?.remove(&Key::new(len, ip6_to_map(a))),
            )
            .map_err(store_err(n::SERVICE_CIDRS6)),
        }
    }
    fn adopt(&mut self, snap: &Snapshot) -> StoreResult {
        self.adopt_filter(snap)
    }
    fn put_id_marks(&mut self, marks: &IdMarks) -> StoreResult {
        match &mut self.sync_ids {
            Some(ids) => ids.set(0, marks, 0).map_err(store_err(n::SYNC_IDS)),
            // Only the CLI opens pins without it, and it never syncs.
            None => Ok(()),
        }
    }
}

impl Maps {
    /// The bits of `keys` set in the filter, before their `SERVICES` entries are written.
    fn mark_frontends<'a>(&mut self, keys: impl IntoIterator<Item = &'a AnyServiceKey>) -> StoreResult {
        let Some(f) = &mut self.filter else {
            return Ok(());
        };
        keys.into_iter().for_each(|k| f.bits.frontend(k.addr, k.port, k.proto));
        f.flush()
    }

    /// The reply bits of `backends` set in the filter, before their `BACKENDS` entries are
    /// written.
    fn mark_backends<'a>(&mut self, backends: impl IntoIterator<Item = &'a AnyBackend>) -> StoreResult {
        let Some(f) = &mut self.filter else {
            return Ok(());
        };
        backends.into_iter().for_each(|b| f.bits.backend(b.addr, b.port, b.proto));
        f.flush()
    }

    /// At a start, before anything is written (`MapStore::adopt`): the filter out of force
    /// (a version of the agent that did not keep it may have run since it was last in
    /// force), then the bits of everything the maps hold: `snap`'s frontends, backends and
    /// Service CIDRs, and the destination and reply source of every conntrack flow, which
    /// may outlive its frontend and backend.
    fn adopt_filter(&mut self, snap: &Snapshot) -> StoreResult {
        let Some(f) = &mut self.filter else {
            return Ok(());
        };
        f.bits.set_in_force(false);
        f.flush()?;
        snap.services.iter().for_each(|(k, _)| f.bits.frontend(k.addr, k.port, k.proto));
        snap.backends.iter().for_each(|(_, b)| f.bits.backend(b.addr, b.port, b.proto));
        snap.service_cidrs.iter().filter(|(_, e)| *e == CidrEntry::Cidr).for_each(|(p, _)| f.bits.cidr(*p));
        mark_flows(&self.conntrack, n::CONNTRACK, &mut f.bits)?;
        mark_flows(&self.ct_new, n::CT_NEW, &mut f.bits)?;
        mark_flows(&self.conntrack6, n::CONNTRACK6, &mut f.bits)?;
        mark_flows(&self.ct_new6, n::CT_NEW6, &mut f.bits)?;
        f.flush()
    }

    /// Put the filter (back) in force: once the first sync after a start has written every
    /// frontend, each with its bit. Nothing to write when it is in force already; `true`
    /// when it came into force now.
    pub fn put_filter_in_force(&mut self) -> StoreResult<bool> {
        let Some(f) = &mut self.filter else {
            return Ok(false);
        };
        let was = f.bits.in_force();
        f.bits.set_in_force(true);
        f.flush()?;
        Ok(!was)
    }

    /// Bits set in the filter, and whether it is in force (`None`: these maps have none).
    pub fn filter_state(&self) -> Option<(u32, bool)> {
        self.filter.as_ref().map(|f| (f.bits.count(), f.bits.in_force()))
    }
}

/// Set the bit of every forward flow's destination, and the reply bit of every reply
/// entry's source, in `map` (a conntrack table).
fn mark_flows<A: addr::MapAddr>(
    map: &HashMap<MapData, CtKey<A>, CtValue<A>>,
    name: &'static str,
    bits: &mut filter::FilterBits,
) -> StoreResult
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let data = aya::maps::IterableMap::map(map);
    let mut cursor = None;
    loop {
        let (entries, next) = ct::read_chunk::<A>(data, cursor, 512).map_err(|source| -> StoreError {
            DataplaneError::Io { context: format!("reading map {name} in batches"), source }.into()
        })?;
        for (k, _) in &entries {
            if k.dir == proxy_common::CT_DIR_FORWARD {
                bits.frontend(k.dst_addr.to_ip(), k.dst_port, k.proto);
            } else {
                bits.backend(k.src_addr.to_ip(), k.src_port, k.proto);
            }
        }
        match next {
            Some(c) => cursor = Some(c),
            None => return Ok(()),
        }
    }
}

/// A `SERVICE_CIDRS` map, which only pins of an older agent lack (the CLI never writes).
fn cidr_map<'a, K: aya::Pod>(
    m: &'a mut Option<LpmTrie<MapData, K, u8>>,
    name: &'static str,
) -> Result<&'a mut LpmTrie<MapData, K, u8>, StoreError> {
    m.as_mut().ok_or_else(|| DataplaneError::MissingObject(name).into())
}

/// `k` with its address replaced (the map's own address type).
fn key_with<A, B>(k: &ServiceKey<A>, addr: B) -> ServiceKey<B> {
    ServiceKey { addr, port: k.port, proto: k.proto, scope: k.scope }
}

fn backend_with<A, B>(b: &Backend<A>, addr: B) -> Backend<B> {
    Backend { addr, port: b.port, proto: b.proto, flags: b.flags }
}
