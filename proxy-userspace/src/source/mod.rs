//! Where Kubernetes objects come from: the API server (`kube`, watchers + reflector
//! stores) or a directory of YAML files (`files`). Both report changes on a channel and
//! hand out a consistent snapshot of everything they know.
pub mod files;
pub mod kube;

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// Everything the translation needs, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    /// Shared, not copied: a snapshot per sync costs a reference count per object.
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// The agent's own Node, when known.
    pub node: Option<Node>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Node,
}

#[derive(Debug)]
pub enum SourceEvent {
    /// Something changed; a snapshot taken now includes it.
    Changed,
    /// The initial list of a resource is complete (every page, every slice): only after all
    /// three is it safe to reconcile the maps against the snapshot.
    Synced(Resource),
}

/// A running source.
#[derive(Clone)]
pub enum Source {
    Kube(Arc<kube::KubeStores>),
    Files(Arc<std::sync::Mutex<Objects>>),
}

impl Source {
    pub fn snapshot(&self) -> Objects {
        match self {
            Source::Kube(s) => s.snapshot(),
            Source::Files(o) => o.lock().map(|g| g.clone()).unwrap_or_default(),
        }
    }
}
