//! Map sync: bring the maps from what they hold to the desired state with the fewest
//! writes, in an order that never lets a packet see a half-written service.
//!
//! `Syncer` keeps a mirror of the maps (`mirror`: read back at start-up, so a restarted
//! agent writes nothing for services that did not change while it was away). Each `apply`
//! or `apply_changes` is one pass (`Syncer::pass`), which plans what to write and what to
//! remove (`plan`) and takes these steps in this order, each writing only what differs
//! from the mirror:
//!
//! 1. The node's entries (`node`): `put_node_config` of each family whose facts changed
//!    (`set_node_facts`), before any frontend a flow could reach needs the SNAT address.
//! 2. Orphans (`retire`): slots, metadata and source ranges that no `SERVICES` value
//!    carries, found at read-back, are deleted.
//! 3. Into empty maps (a node's first start) everything is new: it is written kind by kind
//!    in batches (`bulk`: id marks, backends, slots, source ranges, metadata, then the
//!    services); the pass then ends with the affinity sweep of step 8.
//! 4. Each wanted frontend, in key order (`write`):
//!    1. `put_id_marks`: the ids' high-water marks, when a new id reaches them (before
//!       anything names it);
//!    2. `put_backend`: backends it needs that are not in `BACKENDS` yet (or whose flags
//!       changed);
//!    3. `put_meta`: its metadata, if it changed;
//!    4. `put_range`: source ranges it gains;
//!    5. `put_slot`: its backend list, into the slot generation that is *not* active;
//!    6. `put_service`: the `SERVICES` value, switching generation and count in one atomic
//!       write;
//!    7. `del_slot`: slots past the new count in the generation now active (leftovers of
//!       an older, longer list);
//!    8. `del_range`: source ranges it lost.
//!
//!    One that finds a map full waits for step 6; one that fails otherwise keeps what it
//!    had and is reported (if its source ranges are no longer in force, its `SERVICES`
//!    entry is deleted: fail closed).
//! 5. Each frontend no longer wanted (`retire`):
//!    1. `del_service`: its `SERVICES` entry, first, so no new packet reaches the rest;
//!    2. `del_slot`: its slots, both generations;
//!    3. `del_meta`: its metadata;
//!    4. `del_range`: its source ranges;
//!    5. `del_stats`: its counters.
//! 6. The frontends that found a map full, again, as in step 4 (`write`): removals have
//!    freed room, and if `BACKEND_SLOTS` was full every spare generation is deleted first
//!    (`del_slot`). A list no longer than the active one that still does not fit rewrites
//!    the active generation in place: `put_slot` over it, `put_service`, `del_slot` of the
//!    tail.
//! 7. Backends no frontend holds any more (`retire`): `del_backend`, last, after every
//!    frontend that pointed at them has switched away.
//! 8. Purges (`purges`): `purge_conntrack` of UDP entries naming a removed UDP frontend, a
//!    backend a UDP frontend dropped or a deleted UDP backend (TCP entries are left, so
//!    open connections finish); `purge_affinity` of entries naming a dropped backend, a
//!    removed frontend or one whose affinity was turned off; at the first pass after a
//!    start, `purge_affinity` of every entry of a service id no frontend with affinity
//!    holds.
//!
//!    Then the Service CIDR entries (`cidrs`): `put_service_cidr` of the CIDRs and of a
//!    host entry per frontend address inside them that changed, `del_service_cidr` of
//!    those no longer wanted, after every frontend of the pass.
//! 9. The hook of `before_first_services`, if the batch of step 3 did not run it.
//! 10. `destroy_udp_sockets`: the connected UDP sockets pointed at the UDP backends step 7
//!     deleted, last, once no slot names those backends and no conntrack entry leads to
//!     them, so an application that reconnects reaches a live backend.
//!
//! A failed write is per frontend: every other frontend is still programmed, and what
//! failed is retried by the next pass. The lists under steps 4 and 5, and where steps 1
//! and 10 stand, are held against the code by `order_tests`.
//!
//! Both families go through the same code: a frontend's address picks its family's maps
//! (`SERVICES6`, `BACKENDS6`, `SOURCE_RANGES6` for IPv6, see `store`), while service ids,
//! backend ids, slots and metadata are one space shared by both, so every guarantee above
//! holds for IPv6 frontends unchanged.
pub mod ids;
pub mod store;

mod bulk;
mod cidrs;
mod mirror;
mod node;
mod plan;
mod purges;
mod retire;
mod write;

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use proxy_common::port_from_map;
use tracing::warn;

pub use ids::{BackendId, ServiceId};
pub use plan::{MaglevConfig, service_meta};
pub use store::{
    AnyBackend, AnyServiceKey, CidrEntry, CtFacts, MapStore, MemStore, NodeFacts, Snapshot, SocketsDestroyed,
    StoreError,
};

use self::{
    ids::Ids,
    mirror::{Mirror, Orphans, Programmed},
    node::NodeEntries,
    plan::{SyncScope, plan, service_key},
    purges::Purges,
};
use crate::model::{ClaimKey, ClaimSource, Claims, DesiredState, FrontendKey, Protocol, Scope};

/// What one `apply` did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Map writes and deletes issued (the node's entries not counted: see `node`).
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
    /// at the pass's end (step 10), so their applications reconnect.
    pub removed_udp_backends: Vec<(IpAddr, u16)>,
    /// What that destruction did; `None` when there was nothing to destroy or the store
    /// serves no sockets.
    pub udp_sockets: Option<SocketsDestroyed>,
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

/// What one pass accumulates as its steps go, for the steps after them and its report.
#[derive(Default)]
struct Pass {
    /// Map writes and deletes issued.
    writes: u64,
    /// Backends whose last reference went: deleted at the end unless taken again.
    released: HashSet<BackendId>,
    /// What the purges at the end take out.
    purges: Purges,
    /// The report so far (errors, unserved frontends, UDP backends deleted).
    report: SyncReport,
}

/// A programmed frontend's ids: its service id and each active backend with its id (what
/// `takeover` needs to seed conntrack entries that name them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendIds {
    pub key: AnyServiceKey,
    pub svc_id: u32,
    pub backends: Vec<(AnyBackend, u32)>,
}

/// See [`Syncer::before_first_services`]. The hook is handed a way to build every
/// frontend's ids, which it calls only if it needs them (at 100,000 Services they are tens
/// of megabytes, at the moment of the start-up's peak).
pub type BeforeServices = Box<dyn FnOnce(&dyn Fn() -> Vec<FrontendIds>) + Send>;

/// The map sync: a store, the mirror of what it holds, and what the next pass must retry.
pub struct Syncer<S: MapStore> {
    store: S,
    /// What the maps hold.
    mirror: Mirror,
    ids: Ids,
    /// Frontends whose last write or removal failed: retried by every pass.
    retry: BTreeSet<FrontendKey>,
    /// Backends at 0 references whose delete failed, or found unused at start-up: retried.
    unreferenced: HashSet<BackendId>,
    /// Entries read back under service ids that no `SERVICES` value carries: deleted by
    /// the next pass before it writes anything (see `delete_orphans`).
    orphans: Orphans,
    /// Affinity entries of service ids no frontend holds are still to be swept (once, at
    /// the first pass after a start: see `sweep_affinity`).
    sweep_pending: bool,
    /// The node's facts, written by step 1 when they change.
    node: NodeEntries,
    total_writes: u64,
    /// Run once, by the next pass, before any `SERVICES` entry is written (`takeover`
    /// adopts netfilter's flows there; see [`Syncer::before_first_services`]).
    before_services: Option<BeforeServices>,
    /// Maglev table size and the north-south default (`set_maglev`).
    maglev: MaglevConfig,
    /// The Service CIDR entries as the maps hold them.
    cidrs: cidrs::CidrEntries,
}

impl<S: MapStore> Syncer<S> {
    /// Read back what the maps hold, so the first `apply` only writes differences.
    pub fn new(store: S) -> Result<Self, StoreError> {
        let mut s = Syncer {
            store,
            mirror: Mirror::default(),
            ids: Ids::default(),
            retry: BTreeSet::new(),
            unreferenced: HashSet::new(),
            orphans: Orphans::default(),
            sweep_pending: true,
            node: NodeEntries::default(),
            total_writes: 0,
            before_services: None,
            maglev: MaglevConfig::default(),
            cidrs: cidrs::CidrEntries::default(),
        };
        s.read_back()?;
        Ok(s)
    }

    /// Build Maglev tables of `cfg.table_size` slots, and use Maglev for north-south
    /// frontends without an annotation when `cfg.north_south` says so. Frontends whose
    /// algorithm or table this changes are rewritten by the next `apply` (the first pass
    /// looks at every frontend).
    pub fn set_maglev(&mut self, cfg: MaglevConfig) {
        self.store.set_maglev_table_size(cfg.table_size);
        self.maglev = cfg;
    }

    /// (Re)build the mirror and the id allocators from what the maps hold.
    fn read_back(&mut self) -> Result<(), StoreError> {
        let snap = self.store.snapshot()?;
        self.store.adopt(&snap)?;
        let (mirror, orphans) = Mirror::read_back(&snap);
        self.ids = Ids::read_back(
            snap.services.iter().map(|(_, v)| ServiceId::new(v.id)),
            snap.backends.iter().map(|(id, _)| *id),
            snap.id_marks,
        );
        self.unreferenced = mirror.unreferenced();
        self.mirror = mirror;
        self.cidrs = cidrs::CidrEntries::read_back(&snap);
        self.orphans = orphans;
        self.retry.clear();
        Ok(())
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Estimated heap bytes of what the sync keeps (not the store's), by structure (see
    /// `crate::memory`).
    pub fn memory_usage(&self) -> Vec<crate::memory::Usage> {
        use crate::memory::{HeapSize, Usage};
        let mut out = self.mirror.memory_usage();
        out.push(Usage { structure: "sync.ids", bytes: self.ids.heap_bytes() });
        out.push(Usage {
            structure: "sync.pending",
            bytes: self.retry.heap_bytes()
                + self.unreferenced.heap_bytes()
                + self.orphans.slots.capacity() * std::mem::size_of::<proxy_common::SlotKey>()
                + self.orphans.meta.capacity() * std::mem::size_of::<ServiceId>()
                + self.orphans.ranges.capacity() * std::mem::size_of::<(ServiceId, crate::model::IpPrefix)>()
                + self.orphans.maglev.capacity() * std::mem::size_of::<proxy_common::MaglevKey>(),
        });
        out
    }

    /// Map writes issued since this syncer was created.
    pub fn total_writes(&self) -> u64 {
        self.total_writes
    }

    pub fn service_count(&self) -> usize {
        self.mirror.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.mirror.backend_count()
    }

    /// Does the datapath translate TCP connections to `addr` now (a programmed frontend
    /// with backends)? The agent asks it of the API server's address at start.
    pub fn serves_tcp(&self, addr: std::net::SocketAddr) -> bool {
        self.mirror.frontends.iter().any(|(k, p)| {
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
        let [v4, v6] = self.mirror.in_map();
        v4 + v6
    }

    /// `BACKEND_SLOTS` entries the mirror knows of (both generations of every frontend).
    pub fn slot_count(&self) -> usize {
        self.mirror.slots()
    }

    /// Which Service each programmed frontend address belongs to (from the metadata
    /// written with it, so also right after a restart): the model's `Claims` input.
    pub fn claims(&self) -> Claims {
        let mut claims = Claims::new();
        for (k, p) in self.mirror.frontends.iter().filter(|(_, p)| p.in_map) {
            let (Some(holder), Some(proto)) = (p.holder(), Protocol::from_number(k.proto)) else {
                continue;
            };
            claims.insert(ClaimKey { addr: k.addr, port: port_from_map(k.port), proto }, holder);
        }
        claims
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

    /// Keep `facts` in the node's entries (`NODE_CONFIG`, `NODE_CONFIG6`) from the next
    /// pass on, one per family (a family never given has its entry left as it is); each is
    /// written when it changes, before any frontend (step 1).
    pub fn set_node_facts(&mut self, facts: impl IntoIterator<Item = NodeFacts>) {
        self.node.set(facts);
    }

    /// Have the next sync call `hook` with (a way to build) every frontend's ids before it writes any
    /// `SERVICES` entry: into empty maps (a node's first start) the service entries are
    /// written last, so whatever `hook` seeds (adopted conntrack entries) is in place
    /// before a packet can be balanced by the new frontends. With frontends already in the
    /// maps (a restart) there is no such moment: the hook runs after the sync, with the
    /// ids as programmed.
    pub fn before_first_services(&mut self, hook: BeforeServices) {
        self.before_services = Some(hook);
    }

    fn sync(&mut self, desired: &DesiredState, scope: SyncScope) -> SyncReport {
        let changed = match scope {
            SyncScope::All => None,
            SyncScope::Keys(keys) => Some(keys),
        };
        let mut report = self.pass(desired, scope);
        // After every frontend (see `cidrs`).
        let writes = self.cidrs.write(&mut self.store, desired, changed);
        report.writes += writes;
        self.total_writes += writes;
        // Step 9: not run by a start-up batch (maps were not empty, or it failed): now.
        self.run_before_services(Self::frontend_ids);
        // Step 10.
        if !report.removed_udp_backends.is_empty() {
            report.udp_sockets = self.store.destroy_udp_sockets(&report.removed_udp_backends);
        }
        report
    }

    /// Steps 1 to 8 of the module doc.
    fn pass(&mut self, desired: &DesiredState, scope: SyncScope) -> SyncReport {
        self.node.write(&mut self.store);
        let mut writes = self.delete_orphans();
        if matches!(scope, SyncScope::All)
            && self.mirror.is_empty()
            && let Some(report) = self.bulk_start(desired, &mut writes)
        {
            return report;
        }
        let mut pass = Pass { writes, released: std::mem::take(&mut self.unreferenced), ..Pass::default() };
        let plan = plan(desired, scope, &std::mem::take(&mut self.retry), &self.mirror);
        let deferred = self.write_frontends(plan.wanted, &mut pass);
        self.retire_frontends(plan.stale, &mut pass);
        self.write_deferred(deferred, &mut pass);
        self.retire_backends(&mut pass);
        let purged = pass.purges.run(&mut self.store);
        let mut report = pass.report;
        report.conntrack_purged = purged.conntrack;
        report.affinity_purged = purged.affinity;
        self.sweep_affinity(&mut report);
        self.total_writes += pass.writes;
        report.writes = pass.writes;
        self.count_into(&mut report);
        report
    }

    /// The mirror's totals, into a report.
    fn count_into(&self, report: &mut SyncReport) {
        report.services = self.programmed_count();
        report.backends = self.mirror.backend_count();
        report.services6 = self.mirror.in_map()[1];
        report.backends6 = self.mirror.backends6();
        report.slots = self.mirror.slots();
    }

    /// Once per syncer (the first pass after a start, retried until it succeeds): the
    /// affinity sweep (`purges::sweep_affinity`).
    fn sweep_affinity(&mut self, report: &mut SyncReport) {
        if !self.sweep_pending {
            return;
        }
        let live: HashSet<ServiceId> =
            self.mirror.frontends.values().filter(|p| p.has_affinity()).map(|p| p.id()).collect();
        match purges::sweep_affinity(&mut self.store, &live) {
            Ok(n) => {
                report.affinity_purged += n;
                self.sweep_pending = false;
            }
            Err(e) => warn!(error = %e, "cannot sweep stale session-affinity entries; will retry on next sync"),
        }
    }

    /// The ids of frontend `key`, programmed as `p`.
    fn ids_of(&self, key: &AnyServiceKey, p: &Programmed) -> FrontendIds {
        FrontendIds {
            key: *key,
            svc_id: p.value.id,
            backends: p.active.iter().filter_map(|id| self.mirror.backend_of(*id).map(|b| (b, id.get()))).collect(),
        }
    }

    /// The ids of every frontend in the maps.
    fn frontend_ids(&self) -> Vec<FrontendIds> {
        self.mirror.frontends.iter().filter(|(_, p)| p.in_map).map(|(k, p)| self.ids_of(k, p)).collect()
    }

    fn run_before_services(&mut self, ids: impl Fn(&Self) -> Vec<FrontendIds>) {
        if let Some(hook) = self.before_services.take() {
            hook(&|| ids(self));
        }
    }
}

impl<S: MapStore> ClaimSource for Syncer<S> {
    /// Does Service `namespace/name` hold `key` in the maps now (the `Claims` entry
    /// `claims` would give, without building them all)?
    fn holds(&self, key: &ClaimKey, namespace: &str, name: &str) -> bool {
        [Scope::Internal, Scope::External].into_iter().any(|scope| {
            let fk = FrontendKey { addr: key.addr, port: key.port, proto: key.proto, scope };
            self.mirror.frontends.get(&service_key(&fk)).is_some_and(|p| p.in_map && p.held_by(namespace, name))
        })
    }
}

pub mod verify;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod prop_tests;

#[cfg(test)]
mod order_tests;

#[cfg(test)]
mod maglev_tests;
