//! Kubernetes API source: one watcher per resource, streaming each change to the agent as
//! it comes. kube-rs handles relisting on 410 Gone and reconnecting with backoff. No store
//! of the API objects is kept here: the agent keeps only the parsed form of what it needs
//! (`model::Translator`), so memory follows the model, not the objects' size.
//!
//! A (re)list streams its objects as they are read (each parsed and dropped on arrival, so
//! the whole list is never held at once), then one `Delta::Relisted` with the keys it saw:
//! only then are the objects it did not see deleted, so a relist never looks like
//! "everything was deleted".
use std::{collections::HashSet, pin::pin, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc::Sender;
use tracing::{error, info, warn};

use super::{Delta, Resource, SourceEvent, Update, apiserver::HintCell};
use crate::model::ObjectKey;

/// Services kube-proxy ignores are filtered server-side too (as kube-proxy does).
const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// kube-proxy uses the same selector for slices: the EndpointSlice controller copies the
/// Service's labels, so the slices of another proxy's Services are filtered out with them
/// (and are not reported as naming a Service that does not exist).
const SLICE_SELECTOR: &str = SERVICE_SELECTOR;
/// Objects per page of the Service and EndpointSlice lists (kube-rs and client-go ask for
/// 500). The watcher decodes a whole page before handing its objects on, and the agent's
/// peak memory at start-up holds one page of each resource beside the translation: at
/// 10,000 Services x 10 endpoints pages of 100 kept VmHWM at 60.5-62.0 MiB against
/// 63.6-67.0 MiB with 500, start to ready unchanged (0.78-0.80 s against 0.79-0.81 s).
/// The price is five times the list requests for the same bytes (1,000 per resource at
/// 100,000 Services).
const PAGE: u32 = 100;

fn spawn_watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    resource: Resource,
    wrap: fn(Delta<K>) -> Update,
    tx: Sender<SourceEvent>,
    hint: Option<HintCell>,
) where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    tokio::spawn(async move {
        // managedFields are the bulk of most objects and never read.
        let stream = watcher(api, cfg).default_backoff().modify(|o: &mut K| o.meta_mut().managed_fields = None);
        let mut stream = pin!(stream);
        let mut listed: HashSet<ObjectKey> = HashSet::new();
        // Until the first complete list, a failure may be the bootstrap deadlock (`hint`).
        let mut synced = false;
        while let Some(ev) = stream.next().await {
            let msgs = match ev {
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    listed.insert(key_of(&o));
                    vec![SourceEvent::Update(wrap(Delta::Apply(Arc::new(o))))]
                }
                Ok(watcher::Event::InitDone) => {
                    synced = true;
                    let seen = std::mem::take(&mut listed);
                    vec![SourceEvent::Update(wrap(Delta::Relisted(seen))), SourceEvent::Synced(resource)]
                }
                Ok(watcher::Event::Apply(o)) => vec![SourceEvent::Update(wrap(Delta::Apply(Arc::new(o))))],
                Ok(watcher::Event::Delete(o)) => vec![SourceEvent::Update(wrap(Delta::Delete(key_of(&o))))],
                Err(e) => {
                    // kube-rs retries with backoff; the maps keep their state meanwhile.
                    match hint.as_ref().and_then(|h| h.get()).filter(|_| !synced) {
                        Some(hint) => error!(resource = ?resource, error = %e, "{hint}; retrying"),
                        None => warn!(resource = ?resource, error = %e, "watch error, retrying"),
                    }
                    continue;
                }
            };
            for msg in msgs {
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    });
}

fn key_of<K: kube::Resource>(o: &K) -> ObjectKey {
    let meta = o.meta();
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// Watch Services, EndpointSlices, this node's Node and ServiceCIDRs. `hint`: what to tell the operator
/// when the API server cannot be reached before the first list (the bootstrap deadlock,
/// see `apiserver::bootstrap_hint`), once known.
pub fn start(client: Client, node_name: &str, tx: Sender<SourceEvent>, hint: HintCell) {
    spawn_watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_SELECTOR).page_size(PAGE),
        Resource::Services,
        Update::Services,
        tx.clone(),
        Some(hint.clone()),
    );
    spawn_watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SLICE_SELECTOR).page_size(PAGE),
        Resource::EndpointSlices,
        Update::Slices,
        tx.clone(),
        Some(hint.clone()),
    );
    tokio::spawn(watch_service_cidrs(Api::<ServiceCIDR>::all(client.clone()), tx.clone()));
    spawn_watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        Resource::Node,
        Update::Nodes,
        tx,
        Some(hint),
    );
}

/// Watch ServiceCIDRs (`networking.k8s.io/v1`, GA in Kubernetes 1.33) if the API serves
/// them. A 404 on the first list means it does not (an older API server, or the beta API
/// only): said once, and the agent's `--service-cidr` stands in. Any other failure (no
/// RBAC yet, the API server unreachable) is the watcher's to retry.
async fn watch_service_cidrs(api: Api<ServiceCIDR>, tx: Sender<SourceEvent>) {
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            info!("the API server has no networking.k8s.io/v1 ServiceCIDR resource: using --service-cidr");
            let _ = tx.send(SourceEvent::Update(Update::NoServiceCidrApi)).await;
            return;
        }
        _ => {}
    }
    spawn_watch(api, watcher::Config::default(), Resource::ServiceCidrs, Update::ServiceCidrs, tx, None);
}
