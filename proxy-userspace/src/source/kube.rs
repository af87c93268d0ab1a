//! Kubernetes API source: one watcher + reflector store per resource. kube-rs handles
//! relisting on 410 Gone and reconnecting with backoff; the store swaps its contents only
//! when a relist is complete, so a relist never looks like "everything was deleted".
use std::pin::pin;

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use super::{Objects, Resource, SourceEvent};

/// Services kube-proxy ignores are filtered server-side too (as kube-proxy does).
const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// kube-proxy uses the same selector for slices: the EndpointSlice controller copies the
/// Service's labels, so the slices of another proxy's Services are filtered out with them
/// (and are not reported as naming a Service that does not exist).
const SLICE_SELECTOR: &str = SERVICE_SELECTOR;

pub struct KubeStores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
}

impl KubeStores {
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: self.services.state(),
            slices: self.slices.state(),
            node: self.nodes.state().first().map(|n| (**n).clone()),
        }
    }
}

fn spawn_watch<K>(api: Api<K>, cfg: watcher::Config, resource: Resource, tx: UnboundedSender<SourceEvent>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    tokio::spawn(async move {
        let stream = watcher(api, cfg).default_backoff().reflect(writer);
        let mut stream = pin!(stream);
        while let Some(ev) = stream.next().await {
            let msg = match ev {
                Ok(watcher::Event::InitDone) => SourceEvent::Synced(resource),
                // Pages of a relist: the store publishes them at InitDone.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(_) => SourceEvent::Changed,
                Err(e) => {
                    // kube-rs retries with backoff; the maps keep their state meanwhile.
                    warn!(resource = ?resource, error = %e, "watch error, retrying");
                    continue;
                }
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
    reader
}

pub fn start(client: Client, node_name: &str, tx: UnboundedSender<SourceEvent>) -> KubeStores {
    let services = spawn_watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_SELECTOR),
        Resource::Services,
        tx.clone(),
    );
    let slices = spawn_watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SLICE_SELECTOR),
        Resource::EndpointSlices,
        tx.clone(),
    );
    let nodes = spawn_watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        Resource::Node,
        tx,
    );
    KubeStores { services, slices, nodes }
}
