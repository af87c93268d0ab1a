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

/// A snapshot could not be taken: the caller must keep the maps as they are (an empty
/// snapshot would read as "every Service deleted" and remove every frontend).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the manifest source's state is poisoned (a reader thread panicked while updating it)")]
    Poisoned,
}

impl Source {
    pub fn snapshot(&self) -> Result<Objects, SnapshotError> {
        match self {
            Source::Kube(s) => Ok(s.snapshot()),
            // A panic mid-update may have left the objects half-changed: refuse rather
            // than guess.
            Source::Files(o) => o.lock().map(|g| g.clone()).map_err(|_| SnapshotError::Poisoned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A poisoned file source is an error, never an empty snapshot (which would make the
    /// next sync delete every frontend).
    #[test]
    fn poisoned_source_is_an_error_not_an_empty_snapshot() {
        let svc: Service =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a", "namespace": "d"}})).expect("service");
        let objects = Arc::new(std::sync::Mutex::new(Objects { services: vec![Arc::new(svc)], ..Objects::default() }));
        let source = Source::Files(objects.clone());
        assert_eq!(source.snapshot().expect("healthy source").services.len(), 1);
        let poisoner = objects.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().expect("lock");
            panic!("reader thread panics while holding the lock (test)");
        })
        .join();
        assert!(matches!(source.snapshot(), Err(SnapshotError::Poisoned)));
    }
}
