//! The objects the operator commands (`explain`, `verify`) reason about, read once from
//! the same sources the agent uses: a directory of manifests, or the Kubernetes API
//! (kubeconfig or in-cluster config), plus this node's Node object.
use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, ListParams};

use crate::source::{Objects, files};

/// Every Service and EndpointSlice, and `node_name`'s Node, as the agent would see them now.
pub fn load_objects(
    manifests: Option<&Path>,
    kubeconfig: Option<&str>,
    context: Option<&str>,
    api_server: Option<&str>,
    node_name: &str,
) -> Result<Objects> {
    if let Some(dir) = manifests {
        let (objects, warnings) =
            files::load_dir(dir, node_name).with_context(|| format!("reading manifests from {}", dir.display()))?;
        for w in warnings {
            tracing::warn!(file = %w.file.display(), problem = %w.message, "manifest skipped");
        }
        return Ok(objects);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    rt.block_on(async {
        let api_server = crate::source::apiserver::parse(api_server.unwrap_or_default())?;
        let (client, _) = crate::agent::kube_client(kubeconfig, context, api_server.as_ref()).await?;
        let lp = ListParams::default();
        let services = Api::<Service>::all(client.clone()).list(&lp).await.context("listing Services")?;
        let slices = Api::<EndpointSlice>::all(client.clone()).list(&lp).await.context("listing EndpointSlices")?;
        let node = Api::<Node>::all(client).get_opt(node_name).await.context("reading this node's Node")?;
        Ok(Objects {
            services: services.items.into_iter().map(Arc::new).collect(),
            slices: slices.items.into_iter().map(Arc::new).collect(),
            node,
        })
    })
}
