//! The translation kept up to date object by object.
//!
//! `Translator` holds the parsed form of every Service and EndpointSlice (only the fields
//! the model reads; the API objects themselves are not kept) and, per Service, the result
//! of translating it: its candidate frontends, its health check and its warnings. An
//! object change marks the Services it touches (a slice touches the Service its label
//! names, before and after the change); `commit` re-translates only those, re-resolves only
//! the frontend addresses their candidates asked for (before or after), and returns the
//! frontend keys whose desired entry changed. A full translation is the same code with
//! every Service marked, so the two cannot disagree (the property test in `tests` checks
//! it over random change sequences).
//!
//! Claims: two candidates for one `addr:port/proto` resolve exactly as the batch rule in
//! `resolve` says (priority, then the Service holding it now, then
//! namespace/name, then the order within the Service), evaluated when the address is
//! re-resolved, i.e. whenever one of its claimants changed.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice, networking::v1::ServiceCIDR},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use smallvec::SmallVec;

use super::{
    KIND_SERVICE, KIND_SLICE,
    frontends::{Candidate, claim_priority, expand_service, sctp_port_rewrites},
    local_ready_endpoints,
    problems::{ObjectId, Problem, Warnings, id_from_meta, id_key, missing_id, non_empty},
    services::{ParsedService, parse_service},
    slices::{ParsedSlice, ServiceEndpoints, parse_slice_object, trigger_time},
    warn_unmatched_slice_ports,
};
use crate::{
    hashing::HashMap as FastMap,
    memory::{HeapSize, Usage},
    model::{
        service_cidrs::ServiceCidrs,
        types::{ClaimKey, Claims, DesiredState, FrontendKey, HealthCheck, IpPrefix, NodeInfo, Scope, Warning},
    },
};

/// Which Service holds each frontend address in the maps now: the translation's input for
/// conflicts (`Claims`, or the sync's mirror of the maps, which answers without building a
/// map of every address).
pub trait ClaimSource {
    /// Does Service `namespace/name` hold `key`?
    fn holds(&self, key: &ClaimKey, namespace: &str, name: &str) -> bool;
}

impl ClaimSource for Claims {
    fn holds(&self, key: &ClaimKey, namespace: &str, name: &str) -> bool {
        self.get(key).is_some_and(|h| h.namespace == namespace && h.name == name)
    }
}

/// What one Service contributes, recomputed when it or one of its slices changes.
#[derive(Default)]
struct ServiceState {
    /// Upserted and not deleted since (a headless or other proxy's Service is present
    /// without being translated: its slices are not orphans).
    present: bool,
    /// Parsed once per object change. `None`: present but not ours (headless, another
    /// proxy's) or malformed (then `parse_warnings` says why).
    parsed: Option<ParsedService>,
    parse_warnings: Vec<Warning>,
    candidates: Vec<Candidate>,
    health: Option<(u16, HealthCheck)>,
    /// Slice ports no port of this Service matches.
    slice_warnings: Vec<Warning>,
}

struct SliceState {
    service: Option<ObjectId>,
    parsed: Option<ParsedSlice>,
    warnings: Vec<Warning>,
    /// Its last-change-trigger-time as of its last upsert: an upsert carrying the same
    /// time (a relist, a status-only update) is not a new change to time.
    trigger: Option<std::time::SystemTime>,
}

/// The trigger times of the EndpointSlice changes since the last `take_trigger_times`:
/// data for the agent, which alone reads the clock (kube-proxy's
/// `network_programming_duration_seconds` is the time from each to the map write).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TriggerTimes {
    pub times: Vec<std::time::SystemTime>,
    /// Slices (`namespace/name`) whose annotation is not a time, with its value (warned
    /// about by the agent).
    pub malformed: Vec<(String, String)>,
}

/// A candidate's place in the claim order of its address: (priority, owner, index within
/// the owner's candidates). Whether the owner holds the address now is looked up when the
/// address is resolved.
type Claimant = (u8, ObjectId, usize);

/// The winner of an address: who, and whether it held the address when resolved.
struct Winner {
    owner: ObjectId,
    index: usize,
    held: bool,
}

/// The translation of every object seen so far, kept incrementally. See the module docs.
pub struct Translator {
    node: NodeInfo,
    /// Hashed, not ordered: a Service is looked up several times per commit, and nothing
    /// walks them in order. Boxed: the table's empty buckets hold a pointer, not a state.
    services: FastMap<ObjectId, Box<ServiceState>>,
    slices: FastMap<ObjectId, SliceState>,
    /// Slices by the Service their label names, in name order (whether or not it exists).
    groups: FastMap<ObjectId, SmallSet<ObjectId>>,
    /// Objects without namespace or name: warned about, never translated.
    unnamed: BTreeSet<(&'static str, String)>,
    claimants: FastMap<ClaimKey, SmallSet<Claimant>>,
    winners: FastMap<ClaimKey, Winner>,
    /// Addresses with more than one claimant (their losers are warned about).
    contested: BTreeSet<ClaimKey>,
    /// What `warnings` reports, kept as the objects change so that it costs the number of
    /// warnings, not the number of objects: slices and Services with warnings of their own,
    /// and the Services named by slices that do not exist.
    warned_slices: BTreeSet<ObjectId>,
    warned_services: BTreeSet<ObjectId>,
    orphan_groups: BTreeSet<ObjectId>,
    /// Health-check node port -> the Services asking for it, first wins.
    health: BTreeMap<u16, BTreeSet<ObjectId>>,
    desired: DesiredState,
    dirty_services: BTreeSet<ObjectId>,
    dirty_keys: BTreeSet<ClaimKey>,
    dirty_health: BTreeSet<u16>,
    triggers: TriggerTimes,
    /// ServiceCIDR objects and the `--service-cidr` fallback (`desired.service_cidrs`).
    cidrs: ServiceCidrs,
}

impl Translator {
    pub fn new(node: NodeInfo) -> Self {
        Translator {
            node,
            services: FastMap::default(),
            slices: FastMap::default(),
            groups: FastMap::default(),
            unnamed: BTreeSet::new(),
            claimants: FastMap::default(),
            winners: FastMap::default(),
            contested: BTreeSet::new(),
            warned_slices: BTreeSet::new(),
            warned_services: BTreeSet::new(),
            orphan_groups: BTreeSet::new(),
            health: BTreeMap::new(),
            desired: DesiredState::default(),
            dirty_services: BTreeSet::new(),
            dirty_keys: BTreeSet::new(),
            dirty_health: BTreeSet::new(),
            triggers: TriggerTimes::default(),
            cidrs: ServiceCidrs::default(),
        }
    }

    /// The trigger times of the slice changes upserted since the last call, and the slices
    /// whose annotation could not be read. Deletions carry none (as in kube-proxy).
    pub fn take_trigger_times(&mut self) -> TriggerTimes {
        std::mem::take(&mut self.triggers)
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// The desired state as of the last `commit`.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn into_desired(self) -> DesiredState {
        self.desired
    }

    /// The node's facts changed: every Service is re-expanded at the next `commit` (its
    /// NodePort addresses or zone may differ); slices are re-hinted for a new zone. The
    /// node's name is fixed for the translator's life (`local` was decided with it).
    pub fn set_node(&mut self, node: NodeInfo) {
        if node == self.node {
            return;
        }
        if node.zone != self.node.zone {
            for s in self.slices.values_mut() {
                if let Some(p) = s.parsed.as_mut() {
                    p.rehint(node.zone.as_deref());
                }
            }
        }
        self.node = NodeInfo { name: std::mem::take(&mut self.node.name), ..node };
        self.dirty_services.extend(self.services.keys().cloned());
    }

    /// A ServiceCIDR was added or changed: in `desired().service_cidrs` at once (no
    /// frontend depends on it).
    pub fn upsert_service_cidr(&mut self, obj: &ServiceCIDR) {
        self.cidrs.upsert(obj);
        self.desired.service_cidrs = self.cidrs.ranges();
    }

    pub fn delete_service_cidr(&mut self, name: &str) {
        self.cidrs.delete(name);
        self.desired.service_cidrs = self.cidrs.ranges();
    }

    /// After a relist that saw only `seen`: every other ServiceCIDR is deleted.
    pub fn retain_service_cidrs(&mut self, seen: &HashSet<ObjectKey>) {
        let names = seen.iter().map(|(_, name)| name.clone()).collect();
        self.cidrs.retain(&names);
        self.desired.service_cidrs = self.cidrs.ranges();
    }

    /// The `--service-cidr` ranges, in force beside the objects' (the agent passes them
    /// only where ServiceCIDR objects cannot be had).
    pub fn set_service_cidr_fallback(&mut self, cidrs: impl IntoIterator<Item = IpPrefix>) {
        self.cidrs.set_fallback(cidrs);
        self.desired.service_cidrs = self.cidrs.ranges();
    }

    /// A Service was added or changed.
    pub fn upsert_service(&mut self, svc: &Service) {
        let Some(id) = id_from_meta(&svc.metadata) else {
            self.unnamed.insert((KIND_SERVICE, missing_id(&svc.metadata)));
            return;
        };
        // Interned: the id its slices already name, if any.
        let id = self.groups.get_key_value(&id).map_or(id, |(k, _)| k.clone());
        let mut state = ServiceState { present: true, ..ServiceState::default() };
        match parse_service(svc) {
            Ok(Some(parsed)) => {
                for problem in &parsed.notes {
                    state.parse_warnings.push(warning(KIND_SERVICE, &id, problem.clone()));
                }
                state.parsed = Some(parsed);
            }
            Ok(None) => {}
            Err(problem) => state.parse_warnings.push(warning(KIND_SERVICE, &id, problem)),
        }
        // The derived parts are recomputed at commit; keep the old ones until then so
        // their claims can be withdrawn.
        match self.services.get_mut(&id) {
            Some(old) => {
                old.present = true;
                old.parsed = state.parsed;
                old.parse_warnings = state.parse_warnings;
            }
            None => {
                self.services.insert(id.clone(), Box::new(state));
            }
        }
        self.dirty_services.insert(id);
    }

    /// A Service was deleted.
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let id = ObjectId::new(namespace, name);
        if let Some(state) = self.services.get_mut(&id) {
            // Emptied now, removed at commit once its claims are withdrawn.
            state.present = false;
            state.parsed = None;
            state.parse_warnings.clear();
            self.dirty_services.insert(id);
        }
    }

    /// An EndpointSlice was added or changed.
    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let Some(id) = id_from_meta(&slice.metadata) else {
            self.unnamed.insert((KIND_SLICE, missing_id(&slice.metadata)));
            return;
        };
        let mut p = parse_slice_object(slice, &id, &self.node);
        // Interned: the Service's own id (or its other slices'), not a copy.
        if let Some(service) = &mut p.service {
            if let Some((k, _)) = self.services.get_key_value(&*service) {
                *service = k.clone();
            } else if let Some((k, _)) = self.groups.get_key_value(&*service) {
                *service = k.clone();
            }
        }
        let before = self.slices.get(&id).and_then(|s| s.trigger);
        let trigger = match trigger_time(slice) {
            Some(Ok(t)) => {
                if before != Some(t) {
                    self.triggers.times.push(t);
                }
                Some(t)
            }
            Some(Err(raw)) => {
                self.triggers.malformed.push((id.to_string(), raw));
                None
            }
            None => None,
        };
        self.remove_slice(&id);
        if let Some(service) = &p.service {
            self.groups.entry(service.clone()).or_default().insert(id.clone());
            self.dirty_services.insert(service.clone());
        }
        if !p.warnings.is_empty() {
            self.warned_slices.insert(id.clone());
        }
        self.slices.insert(id, SliceState { service: p.service, parsed: p.parsed, warnings: p.warnings, trigger });
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        self.remove_slice(&ObjectId::new(namespace, name));
    }

    fn remove_slice(&mut self, id: &ObjectId) {
        let Some(old) = self.slices.remove(id) else { return };
        self.warned_slices.remove(id);
        if let Some(service) = old.service {
            if let Some(group) = self.groups.get_mut(&service) {
                group.remove(id);
                if group.is_empty() {
                    self.groups.remove(&service);
                }
            }
            self.dirty_services.insert(service);
        }
    }

    /// After a relist that saw only `seen`: every other Service is deleted.
    pub fn retain_services(&mut self, seen: &HashSet<ObjectKey>) {
        let gone: Vec<ObjectId> = self.services.keys().filter(|id| !seen.contains(&id_key(id))).cloned().collect();
        for id in gone {
            self.delete_service(id.namespace(), id.name());
        }
    }

    /// After a relist that saw only `seen`: every other EndpointSlice is deleted.
    pub fn retain_slices(&mut self, seen: &HashSet<ObjectKey>) {
        let gone: Vec<ObjectId> = self.slices.keys().filter(|id| !seen.contains(&id_key(id))).cloned().collect();
        for id in gone {
            self.remove_slice(&id);
        }
    }

    /// Exactly these Services (a complete list), as one relist.
    pub fn replace_services(&mut self, all: &[impl std::borrow::Borrow<Service>]) {
        let seen = all.iter().filter_map(|s| object_key(&s.borrow().metadata)).collect();
        self.retain_services(&seen);
        self.unnamed.retain(|(kind, _)| *kind != KIND_SERVICE);
        for s in all {
            self.upsert_service(s.borrow());
        }
    }

    /// Exactly these EndpointSlices (a complete list), as one relist.
    pub fn replace_slices(&mut self, all: &[impl std::borrow::Borrow<EndpointSlice>]) {
        let seen = all.iter().filter_map(|s| object_key(&s.borrow().metadata)).collect();
        self.retain_slices(&seen);
        self.unnamed.retain(|(kind, _)| *kind != KIND_SLICE);
        for s in all {
            self.upsert_slice(s.borrow());
        }
    }

    /// Re-translate what changed since the last commit. `claims` says who holds each
    /// address now. Returns the frontend keys (both scopes) whose desired entry was added,
    /// changed or removed, in key order.
    pub fn commit(&mut self, claims: &impl ClaimSource) -> BTreeSet<FrontendKey> {
        for id in std::mem::take(&mut self.dirty_services) {
            self.retranslate(&id);
            let warned =
                self.services.get(&id).is_some_and(|s| !s.parse_warnings.is_empty() || !s.slice_warnings.is_empty());
            set_membership(&mut self.warned_services, &id, warned);
            let orphaned = self.groups.contains_key(&id) && !self.services.contains_key(&id);
            set_membership(&mut self.orphan_groups, &id, orphaned);
        }
        let mut changed = BTreeSet::new();
        for key in std::mem::take(&mut self.dirty_keys) {
            self.resolve(key, claims, &mut changed);
        }
        for port in std::mem::take(&mut self.dirty_health) {
            self.resolve_health(port);
        }
        // "already programmed" in the conflict warnings is as of now, for every contested
        // address (few), not only the re-resolved ones.
        for key in &self.contested {
            if let Some(w) = self.winners.get_mut(key) {
                w.held = claims.holds(key, w.owner.namespace(), w.owner.name());
            }
        }
        changed
    }

    /// Recompute one Service's candidates, health check and slice warnings from its parsed
    /// form and its slices; withdraw its old claims and file the new ones.
    fn retranslate(&mut self, id: &ObjectId) {
        let Some(state) = self.services.get_mut(id) else { return };
        for (index, c) in std::mem::take(&mut state.candidates).into_iter().enumerate() {
            let key = ClaimKey { addr: c.addr, port: c.port, proto: c.proto };
            if let Some(set) = self.claimants.get_mut(&key) {
                set.remove(&(claim_priority(c.kind), id.clone(), index));
                if set.is_empty() {
                    self.claimants.remove(&key);
                }
            }
            self.dirty_keys.insert(key);
        }
        if let Some((port, _)) = state.health.take() {
            if let Some(set) = self.health.get_mut(&port) {
                set.remove(id);
                if set.is_empty() {
                    self.health.remove(&port);
                }
            }
            self.dirty_health.insert(port);
        }
        state.slice_warnings.clear();

        let group: Vec<&ParsedSlice> = self
            .groups
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|s| self.slices.get(s).and_then(|s| s.parsed.as_ref()))
            .collect();
        let endpoints = (!group.is_empty()).then_some(ServiceEndpoints { slices: group });
        if let Some(parsed) = &state.parsed {
            if let Some(group) = &endpoints {
                let mut w = Warnings::default();
                warn_unmatched_slice_ports(id, parsed, group, &mut w);
                state.slice_warnings = w.0;
            }
            state.candidates = expand_service(id, parsed, endpoints.as_ref(), &self.node);
            if let Some(problem) = sctp_port_rewrites(&state.candidates) {
                state.slice_warnings.push(warning(KIND_SERVICE, id, problem));
            }
            if let Some(port) = parsed.health_check_node_port {
                let check = HealthCheck {
                    namespace: id.namespace().to_owned(),
                    name: id.name().to_owned(),
                    local_endpoints: local_ready_endpoints(parsed, endpoints.as_ref()),
                };
                state.health = Some((port, check));
                self.health.entry(port).or_default().insert(id.clone());
                self.dirty_health.insert(port);
            }
            for (index, c) in state.candidates.iter().enumerate() {
                let key = ClaimKey { addr: c.addr, port: c.port, proto: c.proto };
                self.claimants.entry(key).or_default().insert((claim_priority(c.kind), id.clone(), index));
                self.dirty_keys.insert(key);
            }
        } else if !state.present {
            self.services.remove(id);
        }
    }

    /// Pick the winner of `key` among its claimants and update the desired frontends.
    ///
    /// First claim wins, in both scopes: by priority (`claim_priority`), then the Service
    /// that holds it now (`claims`), then Service namespace/name, then the candidate's
    /// order within its Service; losers get one warning per Service (`warnings`). The
    /// holder goes before newcomers so that adding a Service never moves a live address
    /// (and its connections) to another Service; the priority still goes first so that an
    /// externalIP squatting on a clusterIP before that Service existed does not keep it.
    fn resolve(&mut self, key: ClaimKey, claims: &impl ClaimSource, changed: &mut BTreeSet<FrontendKey>) {
        let best = self.claimants.get(&key).and_then(|set| {
            set.iter().min_by_key(|(prio, owner, index)| {
                (*prio, !claims.holds(&key, owner.namespace(), owner.name()), owner, *index)
            })
        });
        let fk = |scope| FrontendKey { addr: key.addr, port: key.port, proto: key.proto, scope };
        let (internal, external) = match best {
            Some((_, owner, index)) => {
                let c = &self.services[owner].candidates[*index];
                let held = claims.holds(&key, owner.namespace(), owner.name());
                self.winners.insert(key, Winner { owner: owner.clone(), index: *index, held });
                (Some(&c.internal), c.external.as_ref())
            }
            None => {
                self.winners.remove(&key);
                (None, None)
            }
        };
        if self.claimants.get(&key).is_some_and(|s| s.len() > 1) {
            self.contested.insert(key);
        } else {
            self.contested.remove(&key);
        }
        for (scope, entry) in [(Scope::Internal, internal), (Scope::External, external)] {
            let k = fk(scope);
            match entry {
                Some(e) if self.desired.frontends.get(&k) != Some(e) => {
                    self.desired.frontends.insert(k, Arc::clone(e));
                    changed.insert(k);
                }
                Some(_) => {}
                None => {
                    if self.desired.frontends.remove(&k).is_some() {
                        changed.insert(k);
                    }
                }
            }
        }
    }

    fn resolve_health(&mut self, port: u16) {
        let winner = self.health.get(&port).and_then(|set| set.first());
        match winner.and_then(|id| self.services[id].health.as_ref()) {
            Some((_, check)) => {
                self.desired.health_checks.insert(port, check.clone());
            }
            None => {
                self.desired.health_checks.remove(&port);
            }
        }
    }

    /// Every warning the objects give now (as of the last `commit`), grouped by object.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out: Vec<Warning> = self
            .unnamed
            .iter()
            .map(|(kind, object)| Warning {
                object: object.clone(),
                kind,
                message: Problem::MissingMetadata.to_string(),
            })
            .collect();
        for id in &self.warned_slices {
            out.extend(self.slices[id].warnings.iter().cloned());
        }
        out.extend(self.cidrs.warnings());
        for id in &self.warned_services {
            let state = &self.services[id];
            out.extend(state.parse_warnings.iter().cloned());
            out.extend(state.slice_warnings.iter().cloned());
        }
        // Slices naming a Service that does not exist (their own, not-yet-collected
        // slices of a just-deleted Service excepted).
        for service in &self.orphan_groups {
            for slice in self.groups.get(service).into_iter().flatten() {
                let owned = self.slices.get(slice).and_then(|s| s.parsed.as_ref()).is_some_and(|p| p.owned_by_service);
                if !owned {
                    out.push(warning(KIND_SLICE, slice, Problem::NoSuchService(service.to_string())));
                }
            }
        }
        for (port, set) in &self.health {
            let mut ids = set.iter();
            let Some(owner) = ids.next() else { continue };
            for id in ids {
                let owner = owner.to_string();
                out.push(warning(KIND_SERVICE, id, Problem::HealthCheckConflict { port: *port, owner }));
            }
        }
        let mut lost: BTreeMap<&ObjectId, Vec<String>> = BTreeMap::new();
        for key in &self.contested {
            let (Some(winner), Some(set)) = (self.winners.get(key), self.claimants.get(key)) else { continue };
            let winner_kind = self.services[&winner.owner].candidates[winner.index].kind;
            let programmed = if winner.held { ", already programmed" } else { "" };
            for (_, owner, index) in set.iter().filter(|(_, o, i)| (o, *i) != (&winner.owner, winner.index)) {
                let kind = self.services[owner].candidates[*index].kind;
                lost.entry(owner).or_default().push(format!(
                    "{}/{} ({kind:?}, used by {winner_kind:?} of {}{programmed})",
                    SocketAddr::new(key.addr, key.port),
                    key.proto,
                    winner.owner
                ));
            }
        }
        for (owner, mut list) in lost {
            list.sort();
            out.push(warning(KIND_SERVICE, owner, Problem::Conflict(list.join(", "))));
        }
        out
    }
}

/// A small ordered set kept sorted, its first entry inline: the sets indexed per address
/// and per Service hold one entry almost always, where a `BTreeSet` allocates a node for
/// eleven and a `Vec` one allocation for the one.
#[derive(Debug)]
struct SmallSet<T>(SmallVec<[T; 1]>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        SmallSet(SmallVec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    fn insert(&mut self, v: T) {
        if let Err(at) = self.0.binary_search(&v) {
            self.0.insert(at, v);
        }
    }

    fn remove(&mut self, v: &T) {
        if let Ok(at) = self.0.binary_search(v) {
            self.0.remove(at);
        }
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

fn set_membership(set: &mut BTreeSet<ObjectId>, id: &ObjectId, member: bool) {
    if member {
        if !set.contains(id) {
            set.insert(id.clone());
        }
    } else {
        set.remove(id);
    }
}

fn warning(kind: &'static str, id: &ObjectId, problem: Problem) -> Warning {
    Warning { object: id.to_string(), kind, message: problem.to_string() }
}

/// Ids of objects, for callers that diff snapshots (the manifests source).
pub type ObjectKey = (String, String);

/// `namespace/name` of an object's metadata, if both are set.
pub fn object_key(meta: &ObjectMeta) -> Option<ObjectKey> {
    Some((non_empty(meta.namespace.as_deref())?.to_owned(), non_empty(meta.name.as_deref())?.to_owned()))
}

// Memory accounting (`crate::memory`): object ids are shared `Arc`s, counted where each
// is created (a Service's key, a slice's key, the Service a slice names), nowhere else.

impl HeapSize for ObjectId {
    fn heap_bytes(&self) -> usize {
        0
    }
}

/// An object id's own allocation, where it is counted.
fn id_bytes(id: &ObjectId) -> usize {
    id.own_heap_bytes()
}

impl HeapSize for ParsedService {
    fn heap_bytes(&self) -> usize {
        self.cluster_ips.heap_bytes()
            + self.families.heap_bytes()
            + self.ports.capacity() * std::mem::size_of::<super::services::ParsedPort>()
            + self.ports.iter().map(|p| p.name.heap_bytes()).sum::<usize>()
            + self.external_ips.heap_bytes()
            + self.lb_ips.heap_bytes()
            + self.source_ranges.heap_bytes()
            + self.notes.capacity() * std::mem::size_of::<Problem>()
    }
}

impl HeapSize for Candidate {
    fn heap_bytes(&self) -> usize {
        self.internal.heap_bytes() + self.external.heap_bytes()
    }
}

impl HeapSize for ServiceState {
    fn heap_bytes(&self) -> usize {
        self.parsed.heap_bytes()
            + self.parse_warnings.heap_bytes()
            + self.candidates.heap_bytes()
            + self.health.heap_bytes()
            + self.slice_warnings.heap_bytes()
    }
}

impl HeapSize for ParsedSlice {
    fn heap_bytes(&self) -> usize {
        self.ports.capacity() * std::mem::size_of::<super::slices::SlicePort>()
            + self.ports.iter().map(|p| p.name.heap_bytes()).sum::<usize>()
            + self.endpoints.capacity() * std::mem::size_of::<super::slices::ParsedEndpoint>()
            + self.zones.heap_bytes()
    }
}

/// The Service id it names is counted by `Translator::memory_usage` (shared or not).
impl HeapSize for SliceState {
    fn heap_bytes(&self) -> usize {
        self.parsed.heap_bytes() + self.warnings.heap_bytes()
    }
}

impl<T: HeapSize> HeapSize for SmallSet<T> {
    fn heap_bytes(&self) -> usize {
        let spilled = if self.0.spilled() { self.0.capacity() * size_of::<T>() } else { 0 };
        spilled + self.0.iter().map(T::heap_bytes).sum::<usize>()
    }
}

impl HeapSize for Winner {
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl Translator {
    /// Estimated heap bytes of each part (see `crate::memory`).
    pub fn memory_usage(&self) -> Vec<Usage> {
        let services = self.services.heap_bytes() + self.services.keys().map(id_bytes).sum::<usize>();
        // A Service id a slice names is its own allocation unless the Service's key (or
        // its group's) is the same `Arc`.
        let interned = |s: &ObjectId| {
            self.services.get_key_value(s).is_some_and(|(k, _)| k.shares(s))
                || self.groups.get_key_value(s).is_some_and(|(k, _)| k.shares(s))
        };
        let own_service_ids: BTreeSet<&ObjectId> =
            self.slices.values().filter_map(|s| s.service.as_ref()).filter(|s| !interned(s)).collect();
        let slices = self.slices.heap_bytes()
            + self.slices.keys().map(id_bytes).sum::<usize>()
            + own_service_ids.into_iter().map(id_bytes).sum::<usize>();
        let indexes = self.groups.heap_bytes()
            + self.unnamed.heap_bytes()
            + self.claimants.heap_bytes()
            + self.winners.heap_bytes()
            + self.contested.heap_bytes()
            + self.warned_slices.heap_bytes()
            + self.warned_services.heap_bytes()
            + self.orphan_groups.heap_bytes()
            + self.health.heap_bytes()
            + self.dirty_services.heap_bytes()
            + self.dirty_keys.heap_bytes()
            + self.dirty_health.heap_bytes()
            + self.triggers.times.heap_bytes()
            + self.triggers.malformed.heap_bytes();
        vec![
            Usage { structure: "translator.services", bytes: services },
            Usage { structure: "translator.slices", bytes: slices },
            Usage { structure: "translator.indexes", bytes: indexes },
            Usage { structure: "translator.desired", bytes: self.desired.heap_bytes() },
        ]
    }
}
