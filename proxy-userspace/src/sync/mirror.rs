//! The mirror: what the maps hold, as the sync last wrote it or read it back at start-up,
//! so a pass compares the desired state with memory, not with the kernel, and a restarted
//! agent writes nothing for services that did not change while it was away.
//!
//! It also counts who holds each backend (`refs`), so a backend nobody uses any more is
//! found without walking the others, and keeps the totals a report gives (`Counts`) as
//! frontends and backends come and go. It writes nothing: the steps of a pass write the
//! maps, then record here what they wrote.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::BuildHasher,
    net::IpAddr,
};

use hashbrown::{HashTable, hash_table};
use proxy_common::{MaglevKey, ServiceMeta, ServiceValue, SlotKey, svc_flags};

use super::{
    ids::{BackendId, ServiceId},
    store::{AnyBackend, AnyServiceKey, Snapshot},
};
use crate::{
    hashing::{HashMap as FastMap, RandomState},
    model::{ClaimHolder, IpFamily, IpPrefix},
};

/// A backend's identity: frontends sharing an endpoint (address, port, protocol) share its
/// `BACKENDS` (or `BACKENDS6`) entry; its flags are not part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct BackendIdent {
    pub(super) addr: IpAddr,
    /// In network byte order, as in the maps.
    pub(super) port: u16,
    pub(super) proto: u8,
}

impl BackendIdent {
    pub(super) fn of(b: &AnyBackend) -> Self {
        BackendIdent { addr: b.addr, port: b.port, proto: b.proto }
    }

    /// Which family's map holds it.
    pub(super) fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }
}

/// One frontend as the maps hold it.
#[derive(Clone, Debug)]
pub(super) struct Programmed {
    pub(super) value: ServiceValue,
    /// Backend ids in the active generation's slots, by index.
    pub(super) active: Vec<BackendId>,
    /// Backend ids left in the inactive generation's slots, by index.
    pub(super) inactive: Vec<BackendId>,
    /// Its Maglev table as written (`MAGLEV`), by slot; empty without one.
    pub(super) maglev: Vec<BackendId>,
    pub(super) meta: Option<ServiceMeta>,
    pub(super) ranges: BTreeSet<IpPrefix>,
    /// The SERVICES entry has been written (false while a new frontend failed midway).
    pub(super) in_map: bool,
    /// The backends this frontend keeps alive (counted in `Mirror::refs`): what it wants
    /// once programmed; after a failure, also what its slots still point at.
    refs: Vec<BackendId>,
}

impl Programmed {
    /// A frontend with nothing written yet, under its new id.
    pub(super) fn new(id: ServiceId) -> Self {
        Programmed {
            value: ServiceValue { id: id.get(), ..Default::default() },
            active: vec![],
            inactive: vec![],
            maglev: vec![],
            meta: None,
            ranges: BTreeSet::new(),
            in_map: false,
            refs: Vec::new(),
        }
    }

    /// A frontend as a start-up batch writes it: `value` published, `active` its only
    /// generation.
    pub(super) fn written(
        value: ServiceValue,
        active: Vec<BackendId>,
        maglev: Vec<BackendId>,
        meta: ServiceMeta,
        ranges: BTreeSet<IpPrefix>,
    ) -> Self {
        Programmed {
            value,
            active,
            inactive: Vec::new(),
            maglev,
            meta: Some(meta),
            ranges,
            in_map: true,
            refs: Vec::new(),
        }
    }

    /// The service id its `SERVICES` value carries (a `u32` there: the layout is shared
    /// with the datapath).
    pub(super) fn id(&self) -> ServiceId {
        ServiceId::new(self.value.id)
    }

    pub(super) fn has_affinity(&self) -> bool {
        self.value.flags & svc_flags::AFFINITY != 0
    }

    /// The Service it was written for (from its metadata, so also right after a restart).
    /// Namespaces and names are DNS labels (at most 63 bytes): the metadata fields hold
    /// them whole.
    pub(super) fn holder(&self) -> Option<ClaimHolder> {
        let meta = self.meta.as_ref()?;
        Some(ClaimHolder { namespace: c_str(&meta.namespace), name: c_str(&meta.name) })
    }

    /// Was it written for Service `namespace/name` (`holder`, without building it)?
    pub(super) fn held_by(&self, namespace: &str, name: &str) -> bool {
        self.meta.as_ref().is_some_and(|m| c_str_eq(&m.namespace, namespace) && c_str_eq(&m.name, name))
    }
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

/// What a report tells about the whole mirror.
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
/// new id, so they would only hold room (a full `SOURCE_RANGES` stays full). Deleted by
/// the next pass before it writes anything (`Syncer::delete_orphans`).
#[derive(Debug, Default)]
pub(super) struct Orphans {
    pub(super) slots: Vec<SlotKey>,
    pub(super) meta: Vec<ServiceId>,
    pub(super) ranges: Vec<(ServiceId, IpPrefix)>,
    /// Maglev slots of no service, or past their service's table size.
    pub(super) maglev: Vec<MaglevKey>,
}

/// A backend in the maps, by id.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tracked {
    /// Its `BACKENDS` / `BACKENDS6` value (its identity and flags).
    pub(super) value: AnyBackend,
    /// How many frontends keep it (`Programmed::refs`); one at 0 is deleted at the end of
    /// the pass that dropped it, so a pass touching few frontends never walks every
    /// backend.
    pub(super) refs: u32,
}

/// Backend ids by identity, the identities read from the backends' own entries (`by_id`,
/// passed in): every id here is a key of that map.
#[derive(Debug, Default)]
struct IdentIndex {
    table: HashTable<BackendId>,
    hasher: RandomState,
}

impl IdentIndex {
    fn hash(&self, ident: &BackendIdent) -> u64 {
        self.hasher.hash_one(ident)
    }

    fn ident_of(by_id: &FastMap<BackendId, Tracked>, id: BackendId) -> BackendIdent {
        BackendIdent::of(&by_id[&id].value)
    }

    fn find(&self, ident: &BackendIdent, by_id: &FastMap<BackendId, Tracked>) -> Option<BackendId> {
        self.table.find(self.hash(ident), |id| Self::ident_of(by_id, *id) == *ident).copied()
    }

    /// How the table rehashes an id it holds when it grows: by its backend's identity.
    fn rehash<'a>(hasher: &'a RandomState, by_id: &'a FastMap<BackendId, Tracked>) -> impl Fn(&BackendId) -> u64 + 'a {
        move |id| hasher.hash_one(Self::ident_of(by_id, *id))
    }

    /// `id` (already in `by_id`) is now the id of its identity, in place of any other.
    fn insert(&mut self, id: BackendId, by_id: &FastMap<BackendId, Tracked>) {
        let ident = Self::ident_of(by_id, id);
        let entry = self.table.entry(
            self.hasher.hash_one(ident),
            |other| Self::ident_of(by_id, *other) == ident,
            Self::rehash(&self.hasher, by_id),
        );
        match entry {
            hash_table::Entry::Occupied(mut o) => *o.get_mut() = id,
            hash_table::Entry::Vacant(v) => {
                v.insert(id);
            }
        }
    }

    /// Room for `more` ids without growing.
    fn reserve(&mut self, more: usize, by_id: &FastMap<BackendId, Tracked>) {
        self.table.reserve(more, Self::rehash(&self.hasher, by_id));
    }

    /// `ident` no longer has `id` (another id it may have since stays).
    fn remove(&mut self, ident: &BackendIdent, id: BackendId) {
        if let Ok(o) = self.table.find_entry(self.hash(ident), |other| *other == id) {
            o.remove();
        }
    }
}

impl HeapSize for IdentIndex {
    fn heap_bytes(&self) -> usize {
        crate::memory::hash_table_bytes(self.table.capacity(), size_of::<BackendId>())
    }
}

#[derive(Debug, Default)]
pub(super) struct Mirror {
    /// Boxed: a hash table keeps room for up to twice its entries, and a frontend is 304
    /// bytes (its metadata alone 152).
    pub(super) frontends: FastMap<AnyServiceKey, Box<Programmed>>,
    /// The backends: one entry per backend holds its value (its identity) and references.
    by_id: FastMap<BackendId, Tracked>,
    /// The id of each identity (the lookup a frontend's endpoints need): ids only, hashed
    /// by their backend's identity as `by_id` holds it, so no identity is stored twice.
    by_ident: IdentIndex,
    /// Kept as frontends and backends come and go, so a report costs nothing per frontend.
    counts: Counts,
}

impl Mirror {
    /// Room for `frontends` more frontends and `backends` more backends without growing.
    pub(super) fn make_room(&mut self, frontends: usize, backends: usize) {
        self.frontends.reserve(frontends);
        self.by_id.reserve(backends);
        self.by_ident.reserve(backends, &self.by_id);
    }

    /// The mirror of what `snap` holds, and what it holds that no service carries.
    pub(super) fn read_back(snap: &Snapshot) -> (Mirror, Orphans) {
        let mut m = Mirror::default();
        for (id, b) in &snap.backends {
            m.track_backend(*id, *b);
        }
        let mut slots: HashMap<(ServiceId, u32), BTreeMap<u32, BackendId>> = HashMap::new();
        for (k, b) in &snap.slots {
            slots.entry((ServiceId::new(k.svc_id), k.generation())).or_default().insert(k.index(), *b);
        }
        let mut maglev: HashMap<u32, BTreeMap<u32, BackendId>> = HashMap::new();
        for (k, b) in &snap.maglev {
            maglev.entry(k.svc_id).or_default().insert(k.slot, *b);
        }
        let sizes: HashMap<u32, u32> = snap.services.iter().map(|(_, v)| (v.id, v.maglev_size)).collect();
        let meta: HashMap<ServiceId, ServiceMeta> = snap.meta.iter().copied().collect();
        let mut ranges: HashMap<ServiceId, BTreeSet<IpPrefix>> = HashMap::new();
        for (id, p) in &snap.ranges {
            ranges.entry(*id).or_default().insert(*p);
        }
        for (k, v) in &snap.services {
            let id = ServiceId::new(v.id);
            let ids = |generation: u32| -> Vec<BackendId> {
                slots.get(&(id, generation)).map(|m| m.values().copied().collect()).unwrap_or_default()
            };
            let mut active = ids(v.generation);
            // Anything past `count` is stale; the next update of this service rewrites it.
            active.truncate(v.count as usize);
            let inactive = ids(v.generation ^ 1);
            // A table is taken as written only whole (every slot below its size): a
            // partial one is rewritten by the next update of its frontend.
            let table: Vec<BackendId> = maglev.get(&v.id).map(|t| t.values().copied().collect()).unwrap_or_default();
            let table = if table.len() == v.maglev_size as usize
                && maglev.get(&v.id).is_some_and(|t| t.keys().next_back().is_none_or(|last| *last + 1 == v.maglev_size))
            {
                table
            } else {
                Vec::new()
            };
            // Until the first pass says what it wants, a frontend keeps whatever its slots
            // point at.
            let refs = m.live(active.iter().chain(&inactive));
            for r in &refs {
                m.add_ref(*r);
            }
            m.put_frontend(
                *k,
                Programmed {
                    value: *v,
                    active,
                    inactive,
                    maglev: table,
                    meta: meta.get(&id).copied(),
                    ranges: ranges.remove(&id).unwrap_or_default(),
                    in_map: true,
                    refs,
                },
            );
        }
        let live: HashSet<u32> = snap.services.iter().map(|(_, v)| v.id).collect();
        let orphans = Orphans {
            slots: snap.slots.iter().filter(|(k, _)| !live.contains(&k.svc_id)).map(|(k, _)| *k).collect(),
            meta: meta.keys().filter(|id| !live.contains(&id.get())).copied().collect(),
            // What the frontends did not take.
            ranges: ranges.into_iter().flat_map(|(id, set)| set.into_iter().map(move |p| (id, p))).collect(),
            maglev: snap
                .maglev
                .iter()
                .filter(|(k, _)| sizes.get(&k.svc_id).is_none_or(|size| k.slot >= *size))
                .map(|(k, _)| *k)
                .collect(),
        };
        (m, orphans)
    }

    /// Nothing at all: the maps are empty (a node's first start).
    pub(super) fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.by_id.is_empty()
    }

    /// Backends no frontend holds.
    pub(super) fn unreferenced(&self) -> HashSet<BackendId> {
        self.by_id.iter().filter(|(_, t)| t.refs == 0).map(|(id, _)| *id).collect()
    }

    /// Backends in the maps.
    pub(super) fn backend_count(&self) -> usize {
        self.by_id.len()
    }

    /// The id of the backend with this identity.
    pub(super) fn backend_id(&self, ident: &BackendIdent) -> Option<BackendId> {
        self.by_ident.find(ident, &self.by_id)
    }

    /// A frontend holds this backend.
    pub(super) fn referenced(&self, id: BackendId) -> bool {
        self.by_id.get(&id).is_some_and(|t| t.refs > 0)
    }

    /// A backend's value rewritten in place (its flags changed; same identity, same id).
    pub(super) fn set_backend_value(&mut self, id: BackendId, b: AnyBackend) {
        if let Some(t) = self.by_id.get_mut(&id) {
            // `by_ident` finds the id by the identity held here.
            debug_assert!(BackendIdent::of(&t.value) == BackendIdent::of(&b), "a backend's identity changed in place");
            t.value = b;
        }
    }

    fn add_ref(&mut self, id: BackendId) {
        // Only backends in the maps are counted (`live` filters the others out).
        if let Some(t) = self.by_id.get_mut(&id) {
            t.refs += 1;
        }
    }

    /// Frontends whose `SERVICES` entry is in the map, by family (IPv4, IPv6).
    pub(super) fn in_map(&self) -> [usize; 2] {
        self.counts.in_map
    }

    /// `BACKEND_SLOTS` entries (both generations of every frontend).
    pub(super) fn slots(&self) -> usize {
        self.counts.slots
    }

    pub(super) fn backends6(&self) -> usize {
        self.counts.backends6
    }

    /// Take a frontend out of the mirror (and out of the counts) to change it.
    pub(super) fn take_frontend(&mut self, key: &AnyServiceKey) -> Option<Programmed> {
        let p = *self.frontends.remove(key)?;
        self.counts.in_map[usize::from(key.addr.is_ipv6())] -= usize::from(p.in_map);
        self.counts.slots -= p.active.len() + p.inactive.len();
        Some(p)
    }

    /// Put a frontend (back) into the mirror (boxed already, or boxed here).
    pub(super) fn put_frontend(&mut self, key: AnyServiceKey, p: impl Into<Box<Programmed>>) {
        let p = p.into();
        self.counts.in_map[usize::from(key.addr.is_ipv6())] += usize::from(p.in_map);
        self.counts.slots += p.active.len() + p.inactive.len();
        if let Some(old) = self.frontends.insert(key, p) {
            // Never happens (callers take first); keep the counts right regardless.
            self.counts.in_map[usize::from(key.addr.is_ipv6())] -= usize::from(old.in_map);
            self.counts.slots -= old.active.len() + old.inactive.len();
        }
    }

    /// A backend now in the maps: into the indexes and counts.
    pub(super) fn track_backend(&mut self, id: BackendId, b: AnyBackend) {
        if let Some(old) = self.by_id.get(&id) {
            // An id is tracked once (ids are allocated unique); keep the index and the
            // count right regardless.
            self.by_ident.remove(&BackendIdent::of(&old.value), id);
            self.counts.backends6 -= usize::from(old.value.addr.is_ipv6());
        }
        self.by_id.insert(id, Tracked { value: b, refs: 0 });
        self.by_ident.insert(id, &self.by_id);
        self.counts.backends6 += usize::from(b.addr.is_ipv6());
    }

    /// A backend deleted from the maps: out of the indexes and counts.
    pub(super) fn untrack_backend(&mut self, id: BackendId, ident: BackendIdent) {
        self.by_ident.remove(&ident, id);
        if self.by_id.remove(&id).is_some() {
            self.counts.backends6 -= usize::from(ident.addr.is_ipv6());
        }
    }

    pub(super) fn backend_of(&self, id: BackendId) -> Option<AnyBackend> {
        self.by_id.get(&id).map(|t| t.value)
    }

    /// These ids, less those of deleted backends (a spare generation may still name them).
    pub(super) fn live<'a>(&self, ids: impl Iterator<Item = &'a BackendId>) -> Vec<BackendId> {
        let mut out: Vec<BackendId> = ids.filter(|id| self.by_id.contains_key(id)).copied().collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Point a frontend's references at `now`; backends left with none go to `released`.
    pub(super) fn set_refs(
        &mut self,
        prog: &mut Programmed,
        mut now: Vec<BackendId>,
        released: &mut HashSet<BackendId>,
    ) {
        now.sort_unstable();
        now.dedup();
        for r in &now {
            self.add_ref(*r);
        }
        for r in std::mem::replace(&mut prog.refs, now) {
            if let Some(t) = self.by_id.get_mut(&r)
                && t.refs > 0
            {
                t.refs -= 1;
                if t.refs == 0 {
                    released.insert(r);
                }
            }
        }
    }
}

// Memory accounting (`crate::memory`).

crate::memory::no_heap!(BackendIdent, BackendId, ServiceId, AnyServiceKey, AnyBackend, Tracked);

use crate::memory::HeapSize;

impl HeapSize for Programmed {
    fn heap_bytes(&self) -> usize {
        self.active.heap_bytes()
            + self.inactive.heap_bytes()
            + self.maglev.heap_bytes()
            + self.ranges.heap_bytes()
            + self.refs.heap_bytes()
    }
}

impl Mirror {
    /// Estimated heap bytes: the frontends, and the backend indexes.
    pub(super) fn memory_usage(&self) -> Vec<crate::memory::Usage> {
        use crate::memory::Usage;
        vec![
            Usage { structure: "sync.mirror_frontends", bytes: self.frontends.heap_bytes() },
            Usage { structure: "sync.backend_indexes", bytes: self.by_ident.heap_bytes() + self.by_id.heap_bytes() },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(i: u32, port: u16) -> AnyBackend {
        let addr = if i.is_multiple_of(3) {
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, i as u16])
        } else {
            IpAddr::from(i.to_be_bytes())
        };
        AnyBackend { addr, port, proto: 6, flags: 0 }
    }

    /// The identity index holds ids only and reads the identities from the backends'
    /// entries: every identity finds its id through growth, removal and replacement, and
    /// a removal by a stale id leaves the identity's current id alone.
    #[test]
    fn backend_ids_by_identity_through_growth_removal_and_replacement() {
        let mut m = Mirror::default();
        let n = 5_000;
        for i in 1..=n {
            m.track_backend(BackendId::new(i), backend(i, 80));
        }
        for i in 1..=n {
            assert_eq!(m.backend_id(&BackendIdent::of(&backend(i, 80))), Some(BackendId::new(i)));
        }
        assert_eq!(m.backend_id(&BackendIdent::of(&backend(1, 81))), None, "the port is part of the identity");
        // Every even backend goes.
        for i in (2..=n).step_by(2) {
            m.untrack_backend(BackendId::new(i), BackendIdent::of(&backend(i, 80)));
        }
        for i in 1..=n {
            let want = (!i.is_multiple_of(2)).then_some(BackendId::new(i));
            assert_eq!(m.backend_id(&BackendIdent::of(&backend(i, 80))), want, "backend {i}");
        }
        assert_eq!(m.backend_count(), (n as usize).div_ceil(2));
        // An identity tracked again under a new id: the new id is found; untracking the old
        // id afterwards leaves the new one.
        let b = backend(1, 80);
        m.track_backend(BackendId::new(n + 1), b);
        assert_eq!(m.backend_id(&BackendIdent::of(&b)), Some(BackendId::new(n + 1)));
        m.untrack_backend(BackendId::new(1), BackendIdent::of(&b));
        assert_eq!(m.backend_id(&BackendIdent::of(&b)), Some(BackendId::new(n + 1)));
        // An id tracked again with another identity: found by the new one only.
        m.track_backend(BackendId::new(3), backend(3, 8080));
        assert_eq!(m.backend_id(&BackendIdent::of(&backend(3, 8080))), Some(BackendId::new(3)));
        assert_eq!(m.backend_id(&BackendIdent::of(&backend(3, 80))), None);
    }

    /// Room made for a start-up's backends holds them all: neither backend table grows
    /// (and holds its old buckets beside its new ones) while they are tracked, and a
    /// tracked backend still finds its id.
    #[test]
    fn room_made_up_front_holds_every_backend() {
        let mut m = Mirror::default();
        let n = 20_000;
        m.make_room(0, n as usize);
        let room = (m.by_id.capacity(), m.by_ident.table.capacity());
        assert!(room.0 >= n as usize && room.1 >= n as usize, "{room:?}");
        for i in 1..=n {
            m.track_backend(BackendId::new(i), backend(i, 80));
        }
        assert_eq!((m.by_id.capacity(), m.by_ident.table.capacity()), room);
        assert_eq!(m.backend_id(&BackendIdent::of(&backend(n, 80))), Some(BackendId::new(n)));
    }
}
