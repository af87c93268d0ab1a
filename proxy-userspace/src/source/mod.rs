//! Where Kubernetes objects come from: the API server (`kube`: watchers streaming each
//! change, `SourceEvent::Update`) or a directory of YAML files (`files`: a snapshot of
//! every object, `SourceEvent::Changed` when it changed; the agent diffs it, see
//! `Snapshots`). Both say when each resource is fully listed.
pub mod apiserver;
pub mod files;
pub mod kube;

use std::{collections::HashMap, sync::Arc};

use ::kube::Resource as KubeResource;
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    memory::{HeapSize, Usage},
    model::{ObjectKey, object_key},
};

/// Everything the translation needs, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    /// Shared, not copied: a snapshot per sync costs a reference count per object.
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// The agent's own Node, when known.
    pub node: Option<Node>,
    /// ServiceCIDRs (the files source's; the API source streams them as updates).
    pub service_cidrs: Vec<Arc<ServiceCIDR>>,
}

impl Objects {
    /// Heap bytes of the objects, each counted whole (the snapshots share them).
    pub fn heap_usage(&self) -> Vec<Usage> {
        vec![
            Usage { structure: "source.services", bytes: self.services.heap_bytes() },
            Usage { structure: "source.slices", bytes: self.slices.heap_bytes() },
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Node,
    /// ServiceCIDRs: listed or not, the others are enough to reconcile (a Service CIDR only
    /// adds refusals).
    ServiceCidrs,
}

/// What must be fully listed before the maps are reconciled against the objects.
pub const REQUIRED: [Resource; 3] = [Resource::Services, Resource::EndpointSlices, Resource::Node];

/// One change to one kind of object.
#[derive(Debug)]
pub enum Delta<K> {
    Apply(Arc<K>),
    /// (namespace, name) of the deleted object.
    Delete((String, String)),
    /// A (re)list is complete: it saw these objects (each sent as `Apply`); the others
    /// are gone.
    Relisted(std::collections::HashSet<ObjectKey>),
}

#[derive(Debug)]
pub enum Update {
    Services(Delta<Service>),
    Slices(Delta<EndpointSlice>),
    Nodes(Delta<Node>),
    /// ServiceCIDRs are cluster-scoped: their namespace is empty.
    ServiceCidrs(Delta<ServiceCIDR>),
    /// The API server has no `networking.k8s.io/v1` ServiceCIDR resource: the agent's
    /// `--service-cidr` stands in for the objects.
    NoServiceCidrApi,
}

#[derive(Debug)]
pub enum SourceEvent {
    /// The files source changed: a snapshot taken now includes it.
    Changed,
    /// The API source: this object changed.
    Update(Update),
    /// The initial list of a resource is complete (every page, every slice): only after all
    /// three is it safe to reconcile the maps against the snapshot.
    Synced(Resource),
}

/// A running source.
#[derive(Clone)]
pub enum Source {
    /// Changes come as `SourceEvent::Update`s.
    Kube,
    Files(Arc<std::sync::Mutex<Objects>>),
}

/// A snapshot could not be taken: the caller must keep the maps as they are (an empty
/// snapshot would read as "every Service deleted" and remove every frontend).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the manifest source's state is poisoned (a reader thread panicked while updating it)")]
    Poisoned,
}

impl Source {
    /// The files source's objects now (`None` for the API source, which streams changes).
    pub fn snapshot(&self) -> Option<Result<Objects, SnapshotError>> {
        match self {
            Source::Kube => None,
            // A panic mid-update may have left the objects half-changed: refuse rather
            // than guess.
            Source::Files(o) => Some(o.lock().map(|g| g.clone()).map_err(|_| SnapshotError::Poisoned)),
        }
    }
}

/// Turns the files source's whole snapshots into per-object deltas, by identity: a file
/// that did not change keeps its parsed objects (the same `Arc`s), so only the objects of
/// changed files are applied. Holding the previous snapshot's `Arc`s (shared with the
/// source, not copies) also keeps a new object from reusing an old one's address.
#[derive(Default)]
pub struct Snapshots {
    services: HashMap<ObjectKey, Arc<Service>>,
    slices: HashMap<ObjectKey, Arc<EndpointSlice>>,
    node: Option<Node>,
    service_cidrs: HashMap<ObjectKey, Arc<ServiceCIDR>>,
}

impl Snapshots {
    /// What changed since the previous snapshot. Objects without namespace or name cannot
    /// be told apart: they are handed on every time (the translation warns about them).
    pub fn diff(&mut self, objects: Objects) -> Vec<Update> {
        let mut out: Vec<Update> =
            diff_kind(&mut self.services, objects.services, object_key).into_iter().map(Update::Services).collect();
        out.extend(diff_kind(&mut self.slices, objects.slices, object_key).into_iter().map(Update::Slices));
        out.extend(
            diff_kind(&mut self.service_cidrs, objects.service_cidrs, cluster_scoped_key)
                .into_iter()
                .map(Update::ServiceCidrs),
        );
        if objects.node != self.node {
            self.node.clone_from(&objects.node);
            out.push(Update::Nodes(match objects.node {
                Some(n) => Delta::Apply(Arc::new(n)),
                None => Delta::Delete(Default::default()),
            }));
        }
        out
    }
}

/// A cluster-scoped object's key: no namespace, its name.
fn cluster_scoped_key(meta: &ObjectMeta) -> Option<ObjectKey> {
    Some((String::new(), meta.name.clone().filter(|n| !n.is_empty())?))
}

fn diff_kind<K: KubeResource>(
    known: &mut HashMap<ObjectKey, Arc<K>>,
    now: Vec<Arc<K>>,
    key_of: fn(&ObjectMeta) -> Option<ObjectKey>,
) -> Vec<Delta<K>> {
    let mut out = Vec::new();
    let mut seen: HashMap<ObjectKey, Arc<K>> = HashMap::with_capacity(now.len());
    for o in now {
        let Some(key) = key_of(o.meta()) else {
            out.push(Delta::Apply(o));
            continue;
        };
        if known.get(&key).is_none_or(|old| !Arc::ptr_eq(old, &o)) {
            out.push(Delta::Apply(o.clone()));
        }
        // The same object in two files: the later file wins (one object per name, as
        // in the API).
        seen.insert(key, o);
    }
    for key in known.keys().filter(|k| !seen.contains_key(*k)) {
        out.push(Delta::Delete(key.clone()));
    }
    *known = seen;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files' ServiceCIDRs (cluster-scoped: no namespace) go to the translation as
    /// deltas like the other kinds: applied once, not again while the file is unchanged, a
    /// delete named ("", name) when it goes.
    #[test]
    fn service_cidrs_of_files_are_diffed_by_name() {
        let cidr: ServiceCIDR = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}
        }))
        .expect("ServiceCIDR");
        let objects = Objects { service_cidrs: vec![Arc::new(cidr)], ..Objects::default() };
        let mut s = Snapshots::default();
        let first = s.diff(objects.clone());
        assert!(
            matches!(first.as_slice(), [Update::ServiceCidrs(Delta::Apply(c))] if c.metadata.name.as_deref() == Some("kubernetes"))
        );
        assert!(s.diff(objects).is_empty(), "unchanged: nothing to apply");
        let gone = s.diff(Objects::default());
        assert!(
            matches!(gone.as_slice(), [Update::ServiceCidrs(Delta::Delete((ns, name)))] if ns.is_empty() && name == "kubernetes")
        );
    }

    /// A poisoned file source is an error, never an empty snapshot (which would make the
    /// next sync delete every frontend).
    #[test]
    fn poisoned_source_is_an_error_not_an_empty_snapshot() {
        let svc: Service =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a", "namespace": "d"}})).expect("service");
        let objects = Arc::new(std::sync::Mutex::new(Objects { services: vec![Arc::new(svc)], ..Objects::default() }));
        let source = Source::Files(objects.clone());
        assert_eq!(source.snapshot().expect("files").expect("healthy source").services.len(), 1);
        let poisoner = objects.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().expect("lock");
            panic!("reader thread panics while holding the lock (test)");
        })
        .join();
        assert!(matches!(source.snapshot(), Some(Err(SnapshotError::Poisoned))));
    }
}
