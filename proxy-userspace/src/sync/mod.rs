//! Map sync: bring the maps from what they hold to the desired state with the fewest
//! writes, in an order that never lets a packet see a half-written service.
//!
//! Order of writes for one changed frontend:
//! 1. backends it needs that are not in `BACKENDS` yet;
//! 2. its slots, into the slot generation that is *not* active;
//! 3. source ranges it gains;
//! 4. the `SERVICES` value, switching generation and count in one atomic update;
//! 5. source ranges it lost.
//!
//! Removed frontends lose their `SERVICES` entry first, then slots, metadata and counters.
//! Backends no longer referenced are deleted last. UDP conntrack entries pointing at a
//! removed backend are purged (kube-proxy does the same: a UDP "flow" would otherwise stick
//! to a dead pod forever), TCP entries are left so open connections finish.
//!
//! The state the maps hold is read back at start-up (`Syncer::new`), so a restarted agent
//! writes nothing for services that did not change while it was away.
//!
//! Both families go through the same code: a frontend's address picks its family's maps
//! (`SERVICES6`, `BACKENDS6`, `SOURCE_RANGES6` for IPv6, see `store`), while service ids,
//! backend ids, slots and metadata are one space shared by both, so every guarantee above
//! holds for IPv6 frontends unchanged.
pub mod ids;
pub mod store;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    marker::PhantomData,
    net::IpAddr,
};

use proxy_common::{
    IdMarks, PROTO_UDP, ServiceMeta, ServiceValue, SlotKey, backend_flags, port_from_map, port_to_map, svc_flags,
};
use tracing::{error, warn};

pub use ids::{BackendId, ServiceId};
pub use store::{AnyBackend, AnyServiceKey, CtFacts, MapStore, MemStore, Snapshot, StoreError};

use crate::model::{
    BackendAddr, ClaimHolder, ClaimKey, ClaimSource, Claims, DesiredState, FrontendEntry, FrontendKey, FrontendKind,
    IpFamily, IpPrefix, Protocol, Scope,
};

/// (service id, backend id) pairs.
type PairSet = HashSet<(ServiceId, BackendId)>;
/// A backend's identity: services sharing an endpoint share its `BACKENDS` (or `BACKENDS6`)
/// entry.
type BackendIdent = (IpAddr, u16, u8);

#[derive(Clone, Debug)]
struct Programmed {
    value: ServiceValue,
    /// Backend ids in the active generation's slots, by index.
    active: Vec<BackendId>,
    /// Backend ids left in the inactive generation's slots, by index.
    inactive: Vec<BackendId>,
    meta: Option<ServiceMeta>,
    ranges: BTreeSet<IpPrefix>,
    /// The SERVICES entry has been written (false while a new frontend failed midway).
    in_map: bool,
    /// The backends this frontend keeps alive (counted in `Syncer::refs`): what it wants
    /// once programmed; after a failure, also what its slots still point at.
    refs: Vec<BackendId>,
}

impl Programmed {
    /// The service id its `SERVICES` value carries (a `u32` there: the layout is shared
    /// with the datapath).
    fn id(&self) -> ServiceId {
        ServiceId::new(self.value.id)
    }
}

/// What one `apply` did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Map writes and deletes issued.
    pub writes: u64,
    /// Frontends whose `SERVICES` / `SERVICES6` entry is in the map (written, not merely
    /// wanted), both families.
    pub services: usize,
    pub backends: usize,
    /// Of those, the IPv6 ones (in `SERVICES6`, `BACKENDS6`).
    pub services6: usize,
    pub backends6: usize,
    /// `BACKEND_SLOTS` entries in use (both generations of every frontend).
    pub slots: usize,
    pub conntrack_purged: usize,
    /// UDP backends deleted by this sync, as (address, port in network byte order, the map
    /// layout): connected UDP sockets the socket-level hooks pointed at them are destroyed
    /// (`dataplane::sock::destroy_udp_sockets`), so their applications reconnect.
    pub removed_udp_backends: Vec<(IpAddr, u16)>,
    /// Session-affinity entries removed because their backend left the frontend.
    pub affinity_purged: usize,
    /// Frontends that could not be programmed (the previous state for them stays, except
    /// that a frontend whose source ranges are not in force is not served: `fail_closed`).
    pub errors: Vec<(FrontendKey, StoreError)>,
    /// Of those, the frontends not served because their loadBalancerSourceRanges did not
    /// fit (`SOURCE_RANGES` / `SOURCE_RANGES6` full), with their Service port: retried by
    /// every sync until they fit.
    pub unserved_ranges: Vec<(FrontendKey, String)>,
}

/// What the frontend writes of one sync leave for the purges at its end.
#[derive(Default)]
struct Purges {
    /// UDP (service, backend) pairs whose conntrack entries go.
    ct_pairs: PairSet,
    /// (service, backend) pairs a frontend with session affinity dropped: their affinity
    /// entries must go, or new connections of a pinned client would keep going to a backend
    /// that left the Service (kube-proxy's per-endpoint `recent` lists go with the
    /// endpoint's chain).
    affinity_pairs: PairSet,
    /// Services whose every affinity entry goes: removed, or their affinity turned off. An
    /// entry left behind names a backend by id under a service id; nothing may find it again.
    affinity_services: HashSet<ServiceId>,
}

/// How far ahead of the ids handed out the persisted high-water mark is moved: one
/// `SYNC_IDS` write per this many new ids, and at most this many ids skipped per restart.
const ID_MARK_AHEAD: u32 = 1024;

/// Allocates 32-bit ids of type `I`, monotonically (wrapping), skipping ids in use, so a
/// freed id is not handed out again soon: stale conntrack or affinity entries of a deleted
/// service then never alias a new one. Across restarts too: `mark` (persisted in
/// `SYNC_IDS` before any id reaching it is handed out) bounds every id handed out on these
/// pins, and a restarted agent resumes there, not at the highest id still live.
#[derive(Debug)]
struct IdAlloc<I> {
    next: u32,
    used: HashSet<u32>,
    /// The persisted high-water mark: every id handed out is below it.
    mark: u32,
    id: PhantomData<I>,
}

// Not derived: a derive would require `I: Default`, which ids have no use for.
impl<I> Default for IdAlloc<I> {
    fn default() -> Self {
        IdAlloc { next: 0, used: HashSet::new(), mark: 0, id: PhantomData }
    }
}

impl<I: Copy + From<u32> + Into<u32>> IdAlloc<I> {
    fn reserve(&mut self, id: I) {
        let id: u32 = id.into();
        self.used.insert(id);
        if id >= self.next {
            self.next = id.wrapping_add(1);
        }
    }
    fn alloc(&mut self) -> I {
        loop {
            // 0 is never used so a zeroed value is recognisably unset.
            let id = self.next.max(1);
            self.next = id.wrapping_add(1);
            if self.used.insert(id) {
                return I::from(id);
            }
        }
    }
    fn free(&mut self, id: I) {
        self.used.remove(&id.into());
    }
    /// Continue after the mark an earlier agent persisted: ids below it may have been
    /// handed out and released while entries still name them.
    fn resume(&mut self, mark: u32) {
        self.next = self.next.max(mark);
        self.mark = mark;
    }
    /// The ids handed out reached the persisted mark: it must move before they are used.
    /// (After 2^32 ids the counter wraps, as it always did.)
    fn mark_needed(&self) -> bool {
        self.next > self.mark
    }
    /// The next mark: `ID_MARK_AHEAD` ids ahead, never behind the current one.
    fn mark_ahead(&self) -> u32 {
        self.next.saturating_add(ID_MARK_AHEAD).max(self.mark)
    }
}

pub struct Syncer<S: MapStore> {
    store: S,
    frontends: HashMap<AnyServiceKey, Programmed>,
    backends: HashMap<BackendIdent, (BackendId, AnyBackend)>,
    backend_by_id: HashMap<BackendId, BackendIdent>,
    /// How many frontends keep each backend (`Programmed::refs`); one at 0 is deleted at
    /// the end of the sync that dropped it, so a sync touching few frontends never walks
    /// every backend.
    refs: HashMap<BackendId, u32>,
    /// Backends at 0 whose delete failed, or found unused at start-up: retried.
    unreferenced: HashSet<BackendId>,
    /// Frontends whose last write or removal failed: retried by every sync.
    retry: BTreeSet<FrontendKey>,
    svc_ids: IdAlloc<ServiceId>,
    backend_ids: IdAlloc<BackendId>,
    /// Affinity entries of service ids no frontend holds are still to be swept (once, at
    /// the first sync after a start: see `sweep_affinity`).
    sweep_pending: bool,
    /// Entries read back under service ids that no `SERVICES` value carries: deleted by
    /// the next sync before it writes anything (see `delete_orphans`).
    orphans: Orphans,
    total_writes: u64,
    /// Kept as frontends and backends come and go, so a report costs nothing per frontend.
    counts: Counts,
    /// Run once, by the next sync, before any `SERVICES` entry is written (`takeover`
    /// adopts netfilter's flows there; see [`Syncer::before_first_services`]).
    before_services: Option<BeforeServices>,
}

/// A programmed frontend's ids: its service id and each active backend with its id (what
/// `takeover` needs to seed conntrack entries that name them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendIds {
    pub key: AnyServiceKey,
    pub svc_id: u32,
    pub backends: Vec<(AnyBackend, u32)>,
}

/// See [`Syncer::before_first_services`].
pub type BeforeServices = Box<dyn FnOnce(&[FrontendIds]) + Send>;

/// What `SyncReport` tells about the whole mirror.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    /// Frontends in the map, by family (IPv4, IPv6).
    in_map: [usize; 2],
    slots: usize,
    backends6: usize,
}

/// Slots, metadata and source ranges of service ids that no `SERVICES` value carries. Only
/// the agent writes them, and nothing reaches them without a `SERVICES` value: they are
/// what a frontend left when it failed before its entry was written, or was taken out
/// (fail closed), and the agent then restarted. A restarted agent gives such a frontend a
/// new id, so they would only hold room (a full `SOURCE_RANGES` stays full).
#[derive(Debug, Default)]
struct Orphans {
    slots: Vec<SlotKey>,
    meta: Vec<ServiceId>,
    ranges: Vec<(ServiceId, IpPrefix)>,
}

/// Which frontends a sync looks at.
enum SyncScope<'a> {
    /// Every desired frontend and every programmed one.
    All,
    /// Only these (plus the ones that failed last time).
    Keys(&'a BTreeSet<FrontendKey>),
}

fn service_key(k: &FrontendKey) -> AnyServiceKey {
    AnyServiceKey { addr: k.addr, port: port_to_map(k.port), proto: k.proto.number(), scope: k.scope.number() }
}

fn frontend_key(k: &AnyServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        addr: k.addr,
        port: port_from_map(k.port),
        proto: Protocol::from_number(k.proto)?,
        scope: Scope::from_number(k.scope)?,
    })
}

fn backend_value(b: &BackendAddr, proto: u8) -> AnyBackend {
    let mut flags = 0;
    if b.local {
        flags |= backend_flags::LOCAL;
    }
    if b.terminating {
        flags |= backend_flags::TERMINATING;
    }
    AnyBackend { addr: b.addr, port: port_to_map(b.port), proto, flags }
}

/// A NUL-padded metadata field back as a string.
fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A NUL-padded metadata field equals `s`.
fn c_str_eq(b: &[u8], s: &str) -> bool {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end] == s.as_bytes()
}

fn copy_str(dst: &mut [u8], s: &str) {
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

pub fn service_meta(e: &FrontendEntry) -> ServiceMeta {
    let mut m = ServiceMeta {
        namespace: [0; proxy_common::META_NAMESPACE_LEN],
        name: [0; proxy_common::META_NAME_LEN],
        port_name: [0; proxy_common::META_PORT_NAME_LEN],
        kind: e.kind.number(),
        _pad: [0; 7],
    };
    copy_str(&mut m.namespace, &e.service.namespace);
    copy_str(&mut m.name, &e.service.name);
    copy_str(&mut m.port_name, &e.service.port_name);
    m
}

fn service_flags(e: &FrontendEntry) -> u32 {
    let mut f = 0;
    if e.affinity_timeout.is_some() {
        f |= svc_flags::AFFINITY;
    }
    if !e.source_ranges.is_empty() {
        f |= svc_flags::SOURCE_RANGES;
    }
    if e.local_only {
        f |= svc_flags::LOCAL_ONLY;
    }
    f |= match e.kind {
        FrontendKind::ClusterIP => 0,
        FrontendKind::NodePort => svc_flags::NODEPORT,
        FrontendKind::ExternalIP => svc_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => svc_flags::LOADBALANCER,
    };
    f
}

/// The slots map is full (an insert of a new slot key failed).
fn is_slots_full(e: &StoreError) -> bool {
    matches!(e, StoreError::MapFull { map, .. } if *map == proxy_common::map_names::BACKEND_SLOTS)
}

impl<S: MapStore> Syncer<S> {
    /// Read back what the maps hold, so the first `apply` only writes differences.
    pub fn new(store: S) -> Result<Self, StoreError> {
        let mut s = Syncer {
            store,
            frontends: HashMap::new(),
            backends: HashMap::new(),
            backend_by_id: HashMap::new(),
            refs: HashMap::new(),
            unreferenced: HashSet::new(),
            retry: BTreeSet::new(),
            svc_ids: IdAlloc::default(),
            backend_ids: IdAlloc::default(),
            sweep_pending: true,
            orphans: Orphans::default(),
            total_writes: 0,
            counts: Counts::default(),
            before_services: None,
        };
        s.read_back()?;
        Ok(s)
    }

    /// (Re)build the mirror from what the maps hold.
    fn read_back(&mut self) -> Result<(), StoreError> {
        let snap = self.store.snapshot()?;
        let s = self;
        s.frontends.clear();
        s.backends.clear();
        s.backend_by_id.clear();
        s.refs.clear();
        s.retry.clear();
        s.svc_ids = IdAlloc::default();
        s.backend_ids = IdAlloc::default();
        s.counts = Counts::default();
        for (id, b) in &snap.backends {
            s.backend_ids.reserve(*id);
            s.track_backend(*id, *b);
        }
        let mut slots: HashMap<(ServiceId, u32), BTreeMap<u32, BackendId>> = HashMap::new();
        for (k, b) in &snap.slots {
            slots.entry((ServiceId::new(k.svc_id), k.generation())).or_default().insert(k.index(), *b);
        }
        let meta: HashMap<ServiceId, ServiceMeta> = snap.meta.iter().copied().collect();
        let mut ranges: HashMap<ServiceId, BTreeSet<IpPrefix>> = HashMap::new();
        for (id, p) in &snap.ranges {
            ranges.entry(*id).or_default().insert(*p);
        }
        for (k, v) in &snap.services {
            let id = ServiceId::new(v.id);
            s.svc_ids.reserve(id);
            let ids = |generation: u32| -> Vec<BackendId> {
                slots.get(&(id, generation)).map(|m| m.values().copied().collect()).unwrap_or_default()
            };
            let mut active = ids(v.generation);
            // Anything past `count` is stale; the next update of this service rewrites it.
            active.truncate(v.count as usize);
            let inactive = ids(v.generation ^ 1);
            // Until the first sync says what it wants, a frontend keeps whatever its slots
            // point at.
            let refs = s.live(active.iter().chain(&inactive));
            for r in &refs {
                *s.refs.entry(*r).or_default() += 1;
            }
            s.put_frontend(
                *k,
                Programmed {
                    value: *v,
                    active,
                    inactive,
                    meta: meta.get(&id).copied(),
                    ranges: ranges.remove(&id).unwrap_or_default(),
                    in_map: true,
                    refs,
                },
            );
        }
        let live: HashSet<u32> = snap.services.iter().map(|(_, v)| v.id).collect();
        s.orphans = Orphans {
            slots: snap.slots.iter().filter(|(k, _)| !live.contains(&k.svc_id)).map(|(k, _)| *k).collect(),
            meta: meta.keys().filter(|id| !live.contains(&id.get())).copied().collect(),
            // What the frontends did not take.
            ranges: ranges.into_iter().flat_map(|(id, set)| set.into_iter().map(move |p| (id, p))).collect(),
        };
        s.svc_ids.resume(snap.id_marks.next_service_id);
        s.backend_ids.resume(snap.id_marks.next_backend_id);
        s.unreferenced = s.backend_by_id.keys().filter(|i| !s.refs.contains_key(*i)).copied().collect();
        Ok(())
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Map writes issued since this syncer was created.
    pub fn total_writes(&self) -> u64 {
        self.total_writes
    }

    pub fn service_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Does the datapath translate TCP connections to `addr` now (a programmed frontend
    /// with backends)? The agent asks it of the API server's address at start.
    pub fn serves_tcp(&self, addr: std::net::SocketAddr) -> bool {
        self.frontends.iter().any(|(k, p)| {
            p.in_map
                && !p.active.is_empty()
                && k.addr == addr.ip()
                && port_from_map(k.port) == addr.port()
                && k.proto == Protocol::Tcp.number()
        })
    }

    /// Frontends whose `SERVICES` entry is in the map: a frontend that failed before its
    /// entry was written (map full) is wanted, not programmed.
    pub fn programmed_count(&self) -> usize {
        self.counts.in_map[0] + self.counts.in_map[1]
    }

    /// Take a frontend out of the mirror (and out of the counts) to change it.
    fn take_frontend(&mut self, key: &AnyServiceKey) -> Option<Programmed> {
        let p = self.frontends.remove(key)?;
        self.counts.in_map[usize::from(key.addr.is_ipv6())] -= usize::from(p.in_map);
        self.counts.slots -= p.active.len() + p.inactive.len();
        Some(p)
    }

    /// Put a frontend (back) into the mirror.
    fn put_frontend(&mut self, key: AnyServiceKey, p: Programmed) {
        self.counts.in_map[usize::from(key.addr.is_ipv6())] += usize::from(p.in_map);
        self.counts.slots += p.active.len() + p.inactive.len();
        if let Some(old) = self.frontends.insert(key, p) {
            // Never happens (callers take first); keep the counts right regardless.
            self.counts.in_map[usize::from(key.addr.is_ipv6())] -= usize::from(old.in_map);
            self.counts.slots -= old.active.len() + old.inactive.len();
        }
    }

    /// Which Service each programmed frontend address belongs to (from the metadata
    /// written with it, so also right after a restart): the model's `Claims` input.
    pub fn claims(&self) -> Claims {
        let mut claims = Claims::new();
        for (k, p) in self.frontends.iter().filter(|(_, p)| p.in_map) {
            let (Some(meta), Some(proto)) = (p.meta.as_ref(), Protocol::from_number(k.proto)) else {
                continue;
            };
            let key = ClaimKey { addr: k.addr, port: port_from_map(k.port), proto };
            // Namespaces and names are DNS labels (at most 63 bytes): the metadata fields
            // hold them whole.
            claims.insert(key, ClaimHolder { namespace: c_str(&meta.namespace), name: c_str(&meta.name) });
        }
        claims
    }

    /// Does Service `namespace/name` hold `key` in the maps now (the `Claims` entry
    /// `claims` would give, without building them all)?
    fn holds_claim(&self, key: &ClaimKey, namespace: &str, name: &str) -> bool {
        [Scope::Internal, Scope::External].into_iter().any(|scope| {
            let fk = FrontendKey { addr: key.addr, port: key.port, proto: key.proto, scope };
            self.frontends.get(&service_key(&fk)).is_some_and(|p| {
                p.in_map
                    && p.meta.as_ref().is_some_and(|m| c_str_eq(&m.namespace, namespace) && c_str_eq(&m.name, name))
            })
        })
    }

    /// Bring the maps to `desired`, looking at every frontend. Failures are per frontend:
    /// one that cannot be written keeps its previous state and is reported; every other
    /// frontend is still programmed.
    pub fn apply(&mut self, desired: &DesiredState) -> SyncReport {
        self.sync(desired, SyncScope::All)
    }

    /// Bring the frontends `changed` (and those that failed last time) to `desired`; every
    /// other frontend is assumed to be as programmed. With `changed` from
    /// `Translator::commit`, the maps end up exactly as `apply` would leave them, at a cost
    /// that depends on the change, not on the number of Services.
    pub fn apply_changes(&mut self, desired: &DesiredState, changed: &BTreeSet<FrontendKey>) -> SyncReport {
        self.sync(desired, SyncScope::Keys(changed))
    }

    /// Have the next sync call `hook` with every frontend's ids before it writes any
    /// `SERVICES` entry: into empty maps (a node's first start) the service entries are
    /// written last, so whatever `hook` seeds (adopted conntrack entries) is in place
    /// before a packet can be balanced by the new frontends. With frontends already in the
    /// maps (a restart) there is no such moment: the hook runs after the sync, with the
    /// ids as programmed.
    pub fn before_first_services(&mut self, hook: BeforeServices) {
        self.before_services = Some(hook);
    }

    /// The ids of every frontend in the maps.
    fn frontend_ids(&self) -> Vec<FrontendIds> {
        self.frontends
            .iter()
            .filter(|(_, p)| p.in_map)
            .map(|(k, p)| FrontendIds {
                key: *k,
                svc_id: p.value.id,
                backends: p
                    .active
                    .iter()
                    .filter_map(|id| {
                        let ident = self.backend_by_id.get(id)?;
                        self.backends.get(ident).map(|(_, b)| (*b, id.get()))
                    })
                    .collect(),
            })
            .collect()
    }

    fn run_before_services(&mut self, ids: impl FnOnce(&Self) -> Vec<FrontendIds>) {
        if let Some(hook) = self.before_services.take() {
            hook(&ids(self));
        }
    }

    fn sync(&mut self, desired: &DesiredState, scope: SyncScope) -> SyncReport {
        let report = self.sync_inner(desired, scope);
        // Not run by a start-up batch (maps were not empty, or it failed): now.
        self.run_before_services(Self::frontend_ids);
        report
    }

    fn sync_inner(&mut self, desired: &DesiredState, scope: SyncScope) -> SyncReport {
        let mut writes = self.delete_orphans();
        // Empty maps (a node's first start): every entry is new, so write them kind by
        // kind in a few batched syscalls instead of one syscall each.
        if matches!(scope, SyncScope::All) && self.frontends.is_empty() && self.backends.is_empty() {
            match self.bulk_load(desired) {
                Ok(mut report) => {
                    report.writes += writes;
                    self.total_writes += writes;
                    self.sweep_affinity(&mut report);
                    return report;
                }
                Err(e) => {
                    // Whatever landed is read back; the one-by-one path below does the rest
                    // and names each frontend that does not fit.
                    warn!(error = %e, "batched start-up write failed; writing one entry at a time");
                    if let Err(e) = self.read_back() {
                        warn!(error = %e, "cannot read the maps back");
                    }
                    // What the batch wrote for frontends it did not get to.
                    writes += self.delete_orphans();
                }
            }
        }
        let mut report = SyncReport::default();
        let mut released: HashSet<BackendId> = std::mem::take(&mut self.unreferenced);
        let mut purges = Purges::default();
        let mut purge_services: HashSet<ServiceId> = HashSet::new();

        // What to write (in key order, so ids are handed out in the same order whatever
        // the scope) and what to remove.
        let retry = std::mem::take(&mut self.retry);
        let (wanted, stale): (Vec<(&FrontendKey, &FrontendEntry)>, Vec<AnyServiceKey>) = match scope {
            SyncScope::All => {
                let keys: HashSet<AnyServiceKey> = desired.frontends.keys().map(service_key).collect();
                let stale = self.frontends.keys().filter(|k| !keys.contains(k)).copied().collect();
                (desired.frontends.iter().collect(), stale)
            }
            SyncScope::Keys(changed) => {
                let mut wanted = Vec::new();
                let mut stale = Vec::new();
                for fk in changed.iter().chain(retry.iter().filter(|k| !changed.contains(k))) {
                    match desired.frontends.get_key_value(fk) {
                        Some(kv) => wanted.push(kv),
                        None if self.frontends.contains_key(&service_key(fk)) => stale.push(service_key(fk)),
                        None => {}
                    }
                }
                wanted.sort_by_key(|(k, _)| **k);
                (wanted, stale)
            }
        };

        let mut full: Vec<(&FrontendKey, &FrontendEntry)> = Vec::new();
        let mut slots_full = false;
        for (fk, entry) in wanted {
            let key = service_key(fk);
            match self.apply_frontend(&key, entry, &mut released, &mut purges, &mut writes) {
                Ok(()) => {}
                // Retried once the removals below have made room.
                Err(e @ StoreError::MapFull { .. }) => {
                    slots_full |= is_slots_full(&e);
                    full.push((fk, entry));
                }
                Err(e) => {
                    // Reported, not logged: the caller logs it once per change, not on
                    // every sync while a map stays full.
                    self.fail_closed(fk, entry, &e, &mut writes, &mut report);
                    self.retry.insert(*fk);
                    report.errors.push((*fk, e));
                }
            }
        }

        // Frontends that are no longer desired.
        for key in stale {
            let had_affinity = self.frontends.get(&key).is_some_and(|p| p.value.flags & svc_flags::AFFINITY != 0);
            match self.remove_frontend(&key, &mut released, &mut writes) {
                Ok(id) => {
                    if key.proto == PROTO_UDP {
                        purge_services.insert(id);
                    }
                    if had_affinity {
                        purges.affinity_services.insert(id);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot remove frontend; will retry on next sync");
                    if let Some(fk) = frontend_key(&key) {
                        self.retry.insert(fk);
                    }
                }
            }
        }

        // Frontends that found a map full get a second chance now that removed frontends
        // have freed their entries (a delete never needs room, a write may), and after the
        // spare generations of every other frontend are freed ("free before write"). A
        // spare is unreachable: no SERVICES value points at it. Spares switched away from
        // during the first pass above are included: a packet that read the SERVICES value
        // before that switch looks its slot up within the same program run (microseconds,
        // under RCU), while this point comes after every other frontend's writes and the
        // removals; should one still miss, it is counted `error` and passed untouched.
        if slots_full {
            self.reclaim_spares(&mut writes);
        }
        for (fk, entry) in full {
            let key = service_key(fk);
            if let Err(e) = self.apply_frontend(&key, entry, &mut released, &mut purges, &mut writes) {
                warn!(frontend = %fk, service = %entry.service, error = %e, "cannot program frontend");
                self.fail_closed(fk, entry, &e, &mut writes, &mut report);
                self.retry.insert(*fk);
                report.errors.push((*fk, e));
            }
        }

        // Backends no longer used by any frontend go last.
        let mut removed_udp = HashSet::new();
        for id in released {
            if self.refs.contains_key(&id) {
                continue;
            }
            let Some(&ident) = self.backend_by_id.get(&id) else { continue };
            match self.store.del_backend(id, IpFamily::of(ident.0)) {
                Ok(()) => {
                    writes += 1;
                    // Only UDP entries are purged (TCP flows finish on their own), and the
                    // purge walks the whole conntrack table: a TCP backend leaving costs none.
                    if ident.2 == PROTO_UDP {
                        report.removed_udp_backends.push((ident.0, ident.1));
                        removed_udp.insert(id);
                    }
                    self.untrack_backend(id, ident);
                }
                Err(e) => {
                    warn!(backend_id = id.get(), error = %e, "cannot delete backend");
                    self.unreferenced.insert(id);
                }
            }
        }

        if !purges.ct_pairs.is_empty() || !purge_services.is_empty() || !removed_udp.is_empty() {
            let pred = |f: CtFacts| {
                f.proto == PROTO_UDP
                    && (purge_services.contains(&f.svc_id)
                        || purges.ct_pairs.contains(&(f.svc_id, f.backend_id))
                        || removed_udp.contains(&f.backend_id))
            };
            match self.store.purge_conntrack(&pred) {
                Ok(n) => report.conntrack_purged = n,
                Err(e) => warn!(error = %e, "cannot purge UDP conntrack entries"),
            }
        }

        if !purges.affinity_pairs.is_empty() || !purges.affinity_services.is_empty() {
            let pred = |svc, backend| {
                purges.affinity_services.contains(&svc) || purges.affinity_pairs.contains(&(svc, backend))
            };
            match self.store.purge_affinity(&pred) {
                Ok(n) => report.affinity_purged = n,
                Err(e) => warn!(error = %e, "cannot purge session-affinity entries"),
            }
        }
        self.sweep_affinity(&mut report);

        self.total_writes += writes;
        report.writes = writes;
        self.count_into(&mut report);
        report
    }

    /// The mirror's totals, into a report.
    fn count_into(&self, report: &mut SyncReport) {
        report.services = self.programmed_count();
        report.backends = self.backends.len();
        report.services6 = self.counts.in_map[1];
        report.backends6 = self.counts.backends6;
        report.slots = self.slot_count();
    }

    /// Once per syncer (the first sync after a start, retried until it succeeds): delete
    /// the affinity entries of service ids that no frontend with session affinity holds.
    /// They were left by a frontend removed while no agent ran, by an agent that did not
    /// purge them yet, or written by a packet that raced a removal; with the persisted id
    /// marks no new frontend takes their id, and this takes them out of the LRU at once.
    fn sweep_affinity(&mut self, report: &mut SyncReport) {
        if !self.sweep_pending {
            return;
        }
        let live: HashSet<ServiceId> =
            self.frontends.values().filter(|p| p.value.flags & svc_flags::AFFINITY != 0).map(Programmed::id).collect();
        match self.store.purge_affinity(&|svc, _| !live.contains(&svc)) {
            Ok(n) => {
                report.affinity_purged += n;
                self.sweep_pending = false;
            }
            Err(e) => warn!(error = %e, "cannot sweep stale session-affinity entries; will retry on next sync"),
        }
    }

    /// Delete the orphans found at read-back; what cannot be deleted is retried next time.
    /// Returns the deletes issued.
    fn delete_orphans(&mut self) -> u64 {
        let o = std::mem::take(&mut self.orphans);
        let mut writes = 0;
        for k in o.slots {
            match self.store.del_slot(&k) {
                Ok(()) => writes += 1,
                Err(_) => self.orphans.slots.push(k),
            }
        }
        for id in o.meta {
            match self.store.del_meta(id) {
                Ok(()) => writes += 1,
                Err(_) => self.orphans.meta.push(id),
            }
        }
        for (id, p) in o.ranges {
            match self.store.del_range(id, p) {
                Ok(()) => writes += 1,
                Err(_) => self.orphans.ranges.push((id, p)),
            }
        }
        if writes > 0 {
            tracing::info!(deleted = writes, "deleted slots, metadata and source ranges of no service");
        }
        writes
    }

    /// Persist the id marks if the ids handed out reached them (before any of those ids is
    /// written anywhere).
    fn persist_id_marks(&mut self, writes: &mut u64) -> Result<(), StoreError> {
        if !self.svc_ids.mark_needed() && !self.backend_ids.mark_needed() {
            return Ok(());
        }
        // Both move ahead in the one write (new services usually bring new backends).
        let marks =
            IdMarks { next_service_id: self.svc_ids.mark_ahead(), next_backend_id: self.backend_ids.mark_ahead() };
        self.store.put_id_marks(&marks)?;
        *writes += 1;
        self.svc_ids.mark = marks.next_service_id;
        self.backend_ids.mark = marks.next_backend_id;
        Ok(())
    }

    fn new_service_id(&mut self, writes: &mut u64) -> Result<ServiceId, StoreError> {
        let id = self.svc_ids.alloc();
        if let Err(e) = self.persist_id_marks(writes) {
            self.svc_ids.free(id);
            return Err(e);
        }
        Ok(id)
    }

    fn new_backend_id(&mut self, writes: &mut u64) -> Result<BackendId, StoreError> {
        let id = self.backend_ids.alloc();
        if let Err(e) = self.persist_id_marks(writes) {
            self.backend_ids.free(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Fail closed: a frontend that wants loadBalancerSourceRanges is served only with
    /// exactly those in force (its `SOURCE_RANGES` flag set, every wanted prefix and no
    /// other in the trie). After a failed write that may not hold (typically a full trie:
    /// the old value, without the restriction, would stay open to every source), so its
    /// `SERVICES` entry is removed; it is retried by every sync and served again once the
    /// write succeeds whole. A frontend never served stays unserved.
    fn fail_closed(
        &mut self,
        fk: &FrontendKey,
        entry: &FrontendEntry,
        err: &StoreError,
        writes: &mut u64,
        report: &mut SyncReport,
    ) {
        if entry.source_ranges.is_empty() {
            return;
        }
        let key = service_key(fk);
        let Some(mut p) = self.take_frontend(&key) else { return };
        let wanted: BTreeSet<IpPrefix> = entry.source_ranges.iter().copied().collect();
        let in_force = p.value.flags & svc_flags::SOURCE_RANGES != 0 && p.ranges == wanted;
        if p.in_map && !in_force {
            match self.store.del_service(&key) {
                Ok(()) => {
                    *writes += 1;
                    p.in_map = false;
                    // Without a SERVICES entry the next write fills generation 0 and takes
                    // `inactive` to be what it holds (`switch_generation`): keep the lists
                    // in that convention.
                    if p.value.generation == 0 {
                        std::mem::swap(&mut p.active, &mut p.inactive);
                        p.value.generation = 1;
                    }
                    warn!(
                        service = %entry.service,
                        frontend = %fk,
                        error = %err,
                        "loadBalancerSourceRanges not in force: frontend no longer served (fail closed) until they are written"
                    );
                }
                Err(e) => error!(
                    service = %entry.service,
                    frontend = %fk,
                    error = %e,
                    "cannot take out a frontend whose loadBalancerSourceRanges are not in force"
                ),
            }
        }
        let ranges_full = matches!(err, StoreError::MapFull { map, .. }
            if *map == proxy_common::map_names::SOURCE_RANGES || *map == proxy_common::map_names::SOURCE_RANGES6);
        if !p.in_map && ranges_full {
            report.unserved_ranges.push((*fk, entry.service.to_string()));
        }
        self.put_frontend(key, p);
    }

    /// A backend now in the maps: into the mirror's indexes and counts.
    fn track_backend(&mut self, id: BackendId, b: AnyBackend) {
        let ident = (b.addr, b.port, b.proto);
        self.backends.insert(ident, (id, b));
        self.backend_by_id.insert(id, ident);
        self.counts.backends6 += usize::from(b.addr.is_ipv6());
    }

    /// A backend deleted from the maps: out of the mirror, its id free again.
    fn untrack_backend(&mut self, id: BackendId, ident: BackendIdent) {
        self.backends.remove(&ident);
        self.backend_by_id.remove(&id);
        self.counts.backends6 -= usize::from(ident.0.is_ipv6());
        self.backend_ids.free(id);
    }

    /// Program `desired` into empty maps with batched writes, in the order a packet needs
    /// them: backends, slots, source ranges and metadata, then the services pointing at
    /// them. Nothing is reachable before its service entry, so the order inside each kind
    /// does not matter. On error the mirror is stale: the caller reads the maps back.
    fn bulk_load(&mut self, desired: &DesiredState) -> Result<SyncReport, StoreError> {
        let mut backends: Vec<(BackendId, AnyBackend)> = Vec::new();
        let mut slots: Vec<(SlotKey, BackendId)> = Vec::new();
        let mut ranges: Vec<(ServiceId, IpPrefix)> = Vec::new();
        let mut metas: Vec<(ServiceId, ServiceMeta)> = Vec::with_capacity(desired.frontends.len());
        let mut services: Vec<(AnyServiceKey, ServiceValue)> = Vec::with_capacity(desired.frontends.len());
        let mut programmed: Vec<(AnyServiceKey, Programmed)> = Vec::with_capacity(desired.frontends.len());
        for (fk, entry) in &desired.frontends {
            let key = service_key(fk);
            let mut ids = Vec::with_capacity(entry.backends.len());
            for b in &entry.backends {
                let v = backend_value(b, key.proto);
                let ident = (v.addr, v.port, v.proto);
                let id = match self.backends.get(&ident) {
                    Some((id, _)) => *id,
                    None => {
                        let id = self.backend_ids.alloc();
                        self.track_backend(id, v);
                        backends.push((id, v));
                        id
                    }
                };
                ids.push(id);
            }
            let id = self.svc_ids.alloc();
            slots.extend(ids.iter().enumerate().map(|(i, b)| (SlotKey::new(id.get(), 0, i as u32), *b)));
            ranges.extend(entry.source_ranges.iter().map(|p| (id, *p)));
            let meta = service_meta(entry);
            metas.push((id, meta));
            let value = ServiceValue {
                id: id.get(),
                count: ids.len() as u32,
                flags: service_flags(entry),
                generation: 0,
                affinity_timeout: entry.affinity_timeout.unwrap_or(0),
                _reserved: 0,
            };
            services.push((key, value));
            let prog = Programmed {
                value,
                active: ids,
                inactive: Vec::new(),
                meta: Some(meta),
                ranges: entry.source_ranges.iter().copied().collect(),
                in_map: true,
                refs: Vec::new(),
            };
            programmed.push((key, prog));
        }
        // The marks first: nothing may name an id the marks do not cover.
        let mut mark_writes = 0;
        self.persist_id_marks(&mut mark_writes)?;
        self.store.put_backends(&backends)?;
        self.store.put_slots(&slots)?;
        for (id, p) in &ranges {
            self.store.put_range(*id, *p)?;
        }
        self.store.put_metas(&metas)?;
        // Everything a frontend needs is written; nothing is reachable yet.
        self.run_before_services(|s| {
            programmed
                .iter()
                .map(|(key, p)| FrontendIds {
                    key: *key,
                    svc_id: p.value.id,
                    backends: p.active.iter().filter_map(|id| s.backend_of(*id).map(|b| (b, id.get()))).collect(),
                })
                .collect()
        });
        self.store.put_services(&services)?;
        let mut released = HashSet::new();
        for (key, mut prog) in programmed {
            let refs = prog.active.clone();
            self.set_refs(&mut prog, refs, &mut released);
            self.put_frontend(key, prog);
        }
        let writes = mark_writes + (backends.len() + slots.len() + ranges.len() + metas.len() + services.len()) as u64;
        self.total_writes += writes;
        let mut report = SyncReport { writes, ..SyncReport::default() };
        self.count_into(&mut report);
        Ok(report)
    }

    fn backend_of(&self, id: BackendId) -> Option<AnyBackend> {
        self.backends.get(self.backend_by_id.get(&id)?).map(|(_, b)| *b)
    }

    /// These ids, less those of deleted backends (a spare generation may still name them).
    fn live<'a>(&self, ids: impl Iterator<Item = &'a BackendId>) -> Vec<BackendId> {
        let mut out: Vec<BackendId> = ids.filter(|id| self.backend_by_id.contains_key(id)).copied().collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Point a frontend's references at `now`; backends left with none go to `released`.
    fn set_refs(&mut self, prog: &mut Programmed, mut now: Vec<BackendId>, released: &mut HashSet<BackendId>) {
        now.sort_unstable();
        now.dedup();
        for r in &now {
            *self.refs.entry(*r).or_default() += 1;
        }
        for r in std::mem::replace(&mut prog.refs, now) {
            if let Some(n) = self.refs.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&r);
                    released.insert(r);
                }
            }
        }
    }

    /// `BACKEND_SLOTS` entries the mirror knows of (both generations of every frontend).
    pub fn slot_count(&self) -> usize {
        self.counts.slots
    }

    /// Ensure the backend exists with the right flags; returns its id.
    fn ensure_backend(&mut self, b: &AnyBackend, writes: &mut u64) -> Result<BackendId, StoreError> {
        let ident = (b.addr, b.port, b.proto);
        if let Some((id, cur)) = self.backends.get(&ident) {
            if cur == b {
                return Ok(*id);
            }
            let id = *id;
            self.store.put_backend(id, b)?;
            *writes += 1;
            self.backends.insert(ident, (id, *b));
            return Ok(id);
        }
        let id = self.new_backend_id(writes)?;
        if let Err(e) = self.store.put_backend(id, b) {
            self.backend_ids.free(id);
            return Err(e);
        }
        *writes += 1;
        self.track_backend(id, *b);
        Ok(id)
    }

    fn apply_frontend(
        &mut self,
        key: &AnyServiceKey,
        entry: &FrontendEntry,
        released: &mut HashSet<BackendId>,
        purges: &mut Purges,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let wanted: Vec<AnyBackend> = entry.backends.iter().map(|b| backend_value(b, key.proto)).collect();
        let mut ids = Vec::with_capacity(wanted.len());
        for v in &wanted {
            match self.ensure_backend(v, writes) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    // It keeps what it had, and what it wants (of what exists) stays for
                    // the retry.
                    let existing: Vec<BackendId> = wanted
                        .iter()
                        .filter_map(|v| self.backends.get(&(v.addr, v.port, v.proto)))
                        .map(|b| b.0)
                        .collect();
                    match self.take_frontend(key) {
                        Some(mut p) => {
                            let held = self.live(p.active.iter().chain(&p.inactive));
                            self.set_refs(&mut p, [existing, held].concat(), released);
                            self.put_frontend(*key, p);
                        }
                        // Not programmed at all: nothing holds the backends it created.
                        None => released.extend(existing),
                    }
                    return Err(e);
                }
            }
        }
        let flags = service_flags(entry);
        let affinity_timeout = entry.affinity_timeout.unwrap_or(0);
        let meta = service_meta(entry);
        let ranges: BTreeSet<IpPrefix> = entry.source_ranges.iter().copied().collect();

        let mut prog = match self.take_frontend(key) {
            Some(p) => p,
            None => match self.new_service_id(writes) {
                Ok(id) => Programmed {
                    value: ServiceValue { id: id.get(), ..Default::default() },
                    active: vec![],
                    inactive: vec![],
                    meta: None,
                    ranges: BTreeSet::new(),
                    in_map: false,
                    refs: Vec::new(),
                },
                Err(e) => {
                    // Not programmed at all: nothing holds the backends it ensured.
                    released.extend(ids);
                    return Err(e);
                }
            },
        };
        // Whatever happens, the record goes back into the mirror with what was written, so
        // the next sync continues from there and a removal cleans up everything.
        let before = prog.active.clone();
        let old_flags = prog.value.flags;
        let result = self.write_frontend(key, &mut prog, &ids, flags, affinity_timeout, &meta, &ranges, writes);
        let affinity = (old_flags | flags) & svc_flags::AFFINITY != 0;
        if key.proto == PROTO_UDP || affinity {
            let now: HashSet<BackendId> = prog.active.iter().copied().collect();
            for old in before.iter().chain(&prog.inactive) {
                if !now.contains(old) {
                    if key.proto == PROTO_UDP {
                        purges.ct_pairs.insert((prog.id(), *old));
                    }
                    if affinity {
                        purges.affinity_pairs.insert((prog.id(), *old));
                    }
                }
            }
        }
        // Affinity turned off (and the value without it written): no entry of it may be
        // found again should it be turned back on.
        if old_flags & svc_flags::AFFINITY != 0 && prog.value.flags & svc_flags::AFFINITY == 0 {
            purges.affinity_services.insert(prog.id());
        }
        let refs = match &result {
            Ok(()) => ids,
            Err(_) => [ids, self.live(prog.active.iter().chain(&prog.inactive))].concat(),
        };
        self.set_refs(&mut prog, refs, released);
        self.put_frontend(*key, prog);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn write_frontend(
        &mut self,
        key: &AnyServiceKey,
        prog: &mut Programmed,
        ids: &[BackendId],
        flags: u32,
        affinity_timeout: u32,
        meta: &ServiceMeta,
        ranges: &BTreeSet<IpPrefix>,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let id = prog.id();
        if prog.meta.as_ref() != Some(meta) {
            self.store.put_meta(id, meta)?;
            *writes += 1;
            prog.meta = Some(*meta);
        }
        let gained: Vec<IpPrefix> = ranges.difference(&prog.ranges).copied().collect();
        for p in gained {
            self.store.put_range(id, p)?;
            *writes += 1;
            prog.ranges.insert(p);
        }
        let unchanged = prog.in_map
            && prog.active == ids
            && prog.value.flags == flags
            && prog.value.affinity_timeout == affinity_timeout;
        if !unchanged {
            match self.switch_generation(key, prog, ids, flags, affinity_timeout, writes) {
                Ok(()) => {}
                Err(e) if is_slots_full(&e) && prog.in_map && ids.len() <= prog.active.len() => {
                    // The spare generation cannot hold the new list and the map is full,
                    // but the new list is no longer than the active one (a scale-down or a
                    // pod replaced): rewrite the active generation in place, which needs no
                    // new entry. Removals therefore always succeed. What it wrote into the
                    // (unreachable) spare is given back first.
                    self.release_spare(prog, writes);
                    self.shrink_in_place(key, prog, ids, flags, affinity_timeout, writes)?;
                }
                Err(e) => {
                    if is_slots_full(&e) {
                        // The spare generation it half filled is unreachable: give its slots
                        // back so other frontends can still change. The frontend keeps what
                        // it had (or stays unprogrammed) and is reported.
                        self.release_spare(prog, writes);
                    }
                    return Err(e);
                }
            }
        }
        let lost: Vec<IpPrefix> = prog.ranges.difference(ranges).copied().collect();
        for p in lost {
            self.store.del_range(id, p)?;
            *writes += 1;
            prog.ranges.remove(&p);
        }
        Ok(())
    }

    /// The normal update: fill the generation that is not active, then switch `SERVICES`
    /// to it in one atomic write; slots past the new count are deleted after the switch.
    fn switch_generation(
        &mut self,
        key: &AnyServiceKey,
        prog: &mut Programmed,
        ids: &[BackendId],
        flags: u32,
        affinity_timeout: u32,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let id = prog.id();
        let generation = if prog.in_map { prog.value.generation ^ 1 } else { 0 };
        // Fill the inactive generation; slots already holding the right id are kept.
        for (i, bid) in ids.iter().enumerate() {
            if prog.inactive.get(i) != Some(bid) {
                self.store.put_slot(&SlotKey::new(id.get(), generation, i as u32), *bid)?;
                *writes += 1;
                if i < prog.inactive.len() {
                    prog.inactive[i] = *bid;
                } else {
                    prog.inactive.push(*bid);
                }
            }
        }
        // Slots past the new count in this generation are leftovers of an older,
        // longer backend list: unreachable once the count below is in place.
        let stale_tail = ids.len()..prog.inactive.len();
        let value =
            ServiceValue { id: id.get(), count: ids.len() as u32, flags, generation, affinity_timeout, _reserved: 0 };
        self.store.put_service(key, &value)?;
        *writes += 1;
        prog.value = value;
        prog.in_map = true;
        for i in stale_tail {
            self.store.del_slot(&SlotKey::new(id.get(), generation, i as u32))?;
            *writes += 1;
        }
        prog.inactive.truncate(ids.len());
        // The filled generation is now active; the previous one is the spare.
        std::mem::swap(&mut prog.active, &mut prog.inactive);
        Ok(())
    }

    /// Fallback when `BACKEND_SLOTS` is full and the new list is no longer than the active
    /// one: rewrite the active generation in place.
    ///
    /// Why a reader never sees this half-done in a harmful way: a packet reads the
    /// `SERVICES` value (count `c`), picks one index below `c`, and looks that slot up.
    /// 1. Slots below the new count `c'` are overwritten first, while the published count
    ///    is still `c`. Overwriting an existing key needs no free entry (the kernel swaps
    ///    in a per-CPU spare element), so it cannot fail on a full map. Every slot below `c`
    ///    holds, at every instant, a backend of the old list or of the new one, and all of
    ///    them are still in `BACKENDS` (unused backends are deleted at the end of the sync,
    ///    after this). A new flow in that window goes to an old or a new backend, like one
    ///    that raced the atomic switch; only the spread over them is briefly uneven.
    /// 2. One atomic `SERVICES` write publishes `c'` (and flags): from then on no new flow
    ///    picks a removed backend.
    /// 3. Slots `c'..c` are deleted last; a packet that read the old count just before step
    ///    2 and looks one up just after step 3 finds no slot and is counted `error` and
    ///    passed untouched (a SYN is retransmitted) - the same microsecond window as a
    ///    concurrent service delete, and only when the map is full.
    ///
    /// Established flows are not affected: they follow conntrack, not the slots.
    fn shrink_in_place(
        &mut self,
        key: &AnyServiceKey,
        prog: &mut Programmed,
        ids: &[BackendId],
        flags: u32,
        affinity_timeout: u32,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let id = prog.id();
        let generation = prog.value.generation;
        for (i, bid) in ids.iter().enumerate() {
            if prog.active[i] != *bid {
                self.store.put_slot(&SlotKey::new(id.get(), generation, i as u32), *bid)?;
                *writes += 1;
                prog.active[i] = *bid;
            }
        }
        let value =
            ServiceValue { id: id.get(), count: ids.len() as u32, flags, generation, affinity_timeout, _reserved: 0 };
        self.store.put_service(key, &value)?;
        *writes += 1;
        prog.value = value;
        for i in ids.len()..prog.active.len() {
            self.store.del_slot(&SlotKey::new(id.get(), generation, i as u32))?;
            *writes += 1;
        }
        prog.active.truncate(ids.len());
        tracing::info!(svc_id = id.get(), count = ids.len(), "BACKEND_SLOTS full: backend list shrunk in place");
        Ok(())
    }

    /// Delete the slots of a frontend's spare generation (unreachable: no `SERVICES` value
    /// points at it). Best effort; what cannot be deleted stays in the mirror.
    fn release_spare(&mut self, prog: &mut Programmed, writes: &mut u64) {
        let generation = if prog.in_map { prog.value.generation ^ 1 } else { 0 };
        while let Some(last) = prog.inactive.len().checked_sub(1) {
            if self.store.del_slot(&SlotKey::new(prog.value.id, generation, last as u32)).is_err() {
                break;
            }
            *writes += 1;
            prog.inactive.pop();
        }
    }

    /// Free the spare generation of every frontend (see `apply` for why that is safe).
    fn reclaim_spares(&mut self, writes: &mut u64) {
        let keys: Vec<AnyServiceKey> =
            self.frontends.iter().filter(|(_, p)| !p.inactive.is_empty()).map(|(k, _)| *k).collect();
        let before = *writes;
        for k in keys {
            if let Some(mut p) = self.take_frontend(&k) {
                self.release_spare(&mut p, writes);
                self.put_frontend(k, p);
            }
        }
        tracing::info!(slots_freed = *writes - before, "BACKEND_SLOTS full: freed the spare generations");
    }

    /// Remove a frontend; returns its id (0, never allocated, if it was not programmed).
    fn remove_frontend(
        &mut self,
        key: &AnyServiceKey,
        released: &mut HashSet<BackendId>,
        writes: &mut u64,
    ) -> Result<ServiceId, StoreError> {
        let Some(mut prog) = self.take_frontend(key) else { return Ok(ServiceId::new(0)) };
        let result = self.delete_frontend(key, &prog, writes);
        match &result {
            Ok(_) => {
                self.set_refs(&mut prog, Vec::new(), released);
                self.svc_ids.free(prog.id());
            }
            Err(_) => {
                // Half removed: its slots may still point at its backends.
                let held = self.live(prog.active.iter().chain(&prog.inactive));
                self.set_refs(&mut prog, held, released);
                self.put_frontend(*key, prog);
            }
        }
        result
    }

    fn delete_frontend(
        &mut self,
        key: &AnyServiceKey,
        prog: &Programmed,
        writes: &mut u64,
    ) -> Result<ServiceId, StoreError> {
        let id = prog.id();
        if prog.in_map {
            self.store.del_service(key)?;
            *writes += 1;
        }
        for (generation, list) in [(prog.value.generation, &prog.active), (prog.value.generation ^ 1, &prog.inactive)] {
            for i in 0..list.len() {
                self.store.del_slot(&SlotKey::new(id.get(), generation, i as u32))?;
                *writes += 1;
            }
        }
        if prog.meta.is_some() {
            self.store.del_meta(id)?;
            *writes += 1;
        }
        for p in &prog.ranges {
            self.store.del_range(id, *p)?;
            *writes += 1;
        }
        self.store.del_stats(id)?;
        Ok(id)
    }
}

impl<S: MapStore> ClaimSource for Syncer<S> {
    fn holds(&self, key: &ClaimKey, namespace: &str, name: &str) -> bool {
        self.holds_claim(key, namespace, name)
    }
}

pub mod verify;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod prop_tests;
