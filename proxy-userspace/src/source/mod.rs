//! Where Kubernetes objects come from: the API server (`kube`: watchers streaming each
//! change, `SourceEvent::Update`) or a directory of YAML files (`files`: the changes of
//! each rescan, `SourceEvent::Files`, then `SourceEvent::Changed`). Both say when each
//! resource is fully listed. Neither keeps the objects: each is parsed into the
//! translation as it comes.
pub mod apiserver;
pub mod files;
pub mod kube;

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};

use crate::model::ObjectKey;

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
    /// The files source: some of one rescan's changes (a file's), in order.
    Files(Vec<Update>),
    /// The files source: every change of a rescan is told (a sync may follow).
    Changed,
    /// The API source: this object changed.
    Update(Update),
    /// The initial list of a resource is complete (every page, every slice): only after all
    /// three is it safe to reconcile the maps against the snapshot.
    Synced(Resource),
}

/// How many events the source may queue ahead of the agent: a source that reads faster
/// than the translation takes its objects in waits, rather than holding them all parsed.
pub const QUEUE: usize = 1024;

/// Which source is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Kube,
    Files,
}
